//! `tern pki`: create the cluster CA and issue host, controller and user certificates (tern-pki).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use tern_pki::{IssueOptions, Role};

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create the cluster CA: DIR/ca-cert.pem (0644) and DIR/ca-key.pem (0600).
    ///
    /// Keep DIR (above all ca-key.pem) on the machine that issues certificates; hosts only need
    /// the directories `tern pki issue` writes.
    #[command(after_help = "Example:\n  tern pki init --dir /etc/tern/pki")]
    Init(InitArgs),
    /// Issue a certificate signed by the CA in DIR, into DIR/NAME/ (0700).
    ///
    /// DIR/NAME holds ca-cert.pem, server-cert.pem + server-key.pem and the same certificate and key
    /// as client-cert.pem + client-key.pem (keys 0600): QEMU's tls-creds-x509 names, so the one
    /// directory serves `--tls-dir DIR/NAME` of every Tern command and `-object
    /// tls-creds-x509,dir=DIR/NAME` of qemu-img, qemu-nbd and QEMU. The certificate says who holds
    /// it: CN = NAME, OU = ROLE, and NAME, localhost, 127.0.0.1 and every --san as alternative
    /// names. Issuing an existing NAME again replaces its files (renewal).
    #[command(
        after_help = "Examples:\n  tern pki issue --dir /etc/tern/pki --name node-a --role host --san 10.0.0.11\n  tern pki issue --dir /etc/tern/pki --name alice --role user --days 30"
    )]
    Issue(IssueArgs),
    /// Revoke a certificate: add its serial to the CA's revocation list DIR/ca-crl.pem.
    ///
    /// The new list, signed by the CA, is written to DIR/ca-crl.pem and into every directory
    /// under DIR that `tern pki issue` made (DIR/*/ca-crl.pem). Every Tern process (and QEMU's
    /// tls-creds-x509) checks the ca-crl.pem of its --tls-dir: the controller, the agents, the
    /// volume nodes' servers and etcd (--client-crl-file) from their next connection on, without
    /// a restart; a volume node's own connections to other nodes, and VMMs, as the list was when
    /// they started. Copy it into any --tls-dir kept elsewhere (write and rename). Connections
    /// already open stay open.
    #[command(
        after_help = "Examples:\n  tern pki revoke --dir /etc/tern/pki node-a\n  tern pki revoke --dir /etc/tern/pki 3f:09:a1:5c:02:7e:d4:11"
    )]
    Revoke(RevokeArgs),
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The CA directory (`tern pki init --dir DIR`).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// The certificate: the NAME it was issued to (its directory DIR/NAME), or its serial number
    /// in hex (':' separators allowed).
    #[arg(value_name = "NAME|SERIAL")]
    what: String,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// The CA directory (created 0700 if missing).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Replace an existing CA. Every certificate the old one issued stops being trusted.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    /// The CA directory (`tern pki init --dir DIR`).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// The holder's name: a DNS name (letters, digits, '-', '.'; 1-63 characters). Hosts use their
    /// node name; clients connecting to a host expect it.
    #[arg(long, value_name = "NAME")]
    name: String,
    /// What the holder may do: host (runs VMs, migrates, serves volumes), controller, user.
    #[arg(long, value_name = "ROLE")]
    role: Role,
    /// An extra subject alternative name: an IP address or a DNS name (repeatable).
    #[arg(long = "san", value_name = "DNS_OR_IP")]
    sans: Vec<String>,
    /// Validity in days (1 to 3650).
    #[arg(long, value_name = "N", default_value_t = 365)]
    days: u32,
}

pub fn run(cmd: PkiCommand) -> Result<ExitCode> {
    match cmd {
        PkiCommand::Init(a) => {
            tern_pki::init_ca_with(&a.dir, a.force)?;
            println!(
                "CA created: {} (keep {} private)",
                a.dir.join(tern_pki::files::CA_CERT).display(),
                a.dir.join(tern_pki::files::CA_KEY).display()
            );
        }
        PkiCommand::Issue(a) => {
            let role = a.role;
            let opts = IssueOptions {
                sans: a.sans,
                valid_days: a.days,
                not_before_offset_days: 0,
            };
            let out = tern_pki::issue(&a.dir, &a.name, role, &opts)
                .with_context(|| format!("Cannot issue a certificate for {}", a.name))?;
            println!(
                "{} ({role}) issued: use --tls-dir {}",
                a.name,
                out.display()
            );
        }
        PkiCommand::Revoke(a) => {
            let r = tern_pki::revoke(&a.dir, &a.what)
                .with_context(|| format!("Cannot revoke {}", a.what))?;
            let state = if r.already {
                "was already revoked"
            } else {
                "revoked"
            };
            println!(
                "{} (serial {}) {state}: the revocation list is in {} and {} directories under it",
                a.what,
                r.serial,
                a.dir.join(tern_pki::files::CA_CRL).display(),
                r.written.len().saturating_sub(1)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
