//! Creating the CA and issuing certificates into QEMU-named directories (rcgen, ECDSA P-256).

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration as TimeDuration, OffsetDateTime};

use crate::{Role, files, validate_name};

/// How long a new CA is valid.
pub(crate) const CA_VALID_DAYS: i64 = 3650;
/// Back-dating of every `not_before`, so hosts with slightly slow clocks accept a fresh certificate.
pub(crate) const CLOCK_SKEW_MINUTES: i64 = 5;
/// The longest validity `issue` accepts (the CA's own).
pub const MAX_VALID_DAYS: u32 = 3650;

/// How to issue one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueOptions {
    /// Extra subject alternative names: IP addresses become IP SANs, anything else a DNS SAN.
    pub sans: Vec<String>,
    /// Validity from `not_before`, in days (1 to [`MAX_VALID_DAYS`]).
    pub valid_days: u32,
    /// Shifts `not_before` by this many days from now; tests use a negative value to issue a
    /// certificate that has already expired.
    pub not_before_offset_days: i64,
}

impl Default for IssueOptions {
    fn default() -> Self {
        IssueOptions {
            sans: Vec::new(),
            valid_days: 365,
            not_before_offset_days: 0,
        }
    }
}

/// Why `init_ca` failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A CA already exists there and overwriting was not asked for.
    #[error(
        "A CA already exists in {dir} ({file} is present); pass --force to replace it (every certificate it issued stops being trusted)"
    )]
    Exists { dir: PathBuf, file: &'static str },
    /// rcgen refused to generate the key or the certificate.
    #[error("Cannot generate the CA key or certificate")]
    Generate(#[source] rcgen::Error),
    /// A file or directory could not be written.
    #[error("Cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The CA's first (empty) CRL could not be written.
    #[error("Cannot write the CA's revocation list")]
    Crl(#[source] Box<crate::RevokeError>),
}

/// Why `issue` failed.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The holder's name cannot be a DNS SAN or a directory name.
    #[error("Invalid certificate name: {0}")]
    Name(String),
    /// A `--san` is neither an IP address nor a DNS name.
    #[error("Invalid subject alternative name {san:?}: {reason}")]
    San { san: String, reason: String },
    /// The validity is outside 1..=MAX_VALID_DAYS.
    #[error("Invalid validity of {days} days: it must be 1 to {MAX_VALID_DAYS}")]
    Days { days: u32 },
    /// The offset pushes the dates outside what a certificate can carry.
    #[error("Invalid not-before offset of {days} days: it must be within ±36500")]
    Offset { days: i64 },
    /// There is no CA (or no CA key) in the directory.
    #[error("No CA in {dir}: {file} is missing (run `tern pki init --dir {dir}` first)")]
    NoCa { dir: PathBuf, file: &'static str },
    /// A CA file could not be read.
    #[error("Cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The CA files could not be parsed.
    #[error("Cannot parse the CA in {dir} (ca-cert.pem and ca-key.pem)")]
    ParseCa {
        dir: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    /// rcgen refused to generate the key or the certificate.
    #[error("Cannot generate the key or certificate for {name}")]
    Generate {
        name: String,
        #[source]
        source: rcgen::Error,
    },
    /// A file or directory could not be written.
    #[error("Cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Creates a CA in `dir` (created 0700 if missing): `ca-cert.pem` (0644) and `ca-key.pem` (0600).
/// Refuses to replace an existing CA.
pub fn init_ca(dir: &Path) -> Result<(), InitError> {
    init_ca_with(dir, false)
}

/// [`init_ca`], replacing an existing CA when `overwrite` is true.
pub fn init_ca_with(dir: &Path, overwrite: bool) -> Result<(), InitError> {
    if !overwrite {
        for file in [files::CA_KEY, files::CA_CERT] {
            if dir.join(file).exists() {
                return Err(InitError::Exists {
                    dir: dir.to_owned(),
                    file,
                });
            }
        }
    }
    let key = KeyPair::generate().map_err(InitError::Generate)?;
    let params = ca_params(&key).map_err(InitError::Generate)?;
    let cert = params.self_signed(&key).map_err(InitError::Generate)?;
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| InitError::Write { path, source }
    };
    make_private_dir(dir).map_err(write_err(dir))?;
    let key_path = dir.join(files::CA_KEY);
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600).map_err(write_err(&key_path))?;
    let cert_path = dir.join(files::CA_CERT);
    write_file(&cert_path, cert.pem().as_bytes(), 0o644).map_err(write_err(&cert_path))?;
    // An empty CRL signed by the new CA (a stale one of a replaced CA would match no issuer).
    let crl_path = dir.join(files::CA_CRL);
    let _ = fs::remove_file(&crl_path);
    crate::crl::ensure_crl(dir).map_err(|e| InitError::Crl(Box::new(e)))?;
    Ok(())
}

fn ca_params(key: &KeyPair) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    // The CN carries a fingerprint of the key, so two clusters' CAs never share a subject and a
    // certificate from the other one fails as "unknown issuer" rather than "bad signature".
    let id: String = params.key_identifier(key)[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Tern cluster");
    dn.push(DnType::CommonName, format!("Tern cluster CA {id}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - TimeDuration::minutes(CLOCK_SKEW_MINUTES);
    params.not_after = now + TimeDuration::days(CA_VALID_DAYS);
    Ok(params)
}

/// Issues a certificate for `name` with `role`, signed by the CA in `dir`, into `dir/name/` (0700),
/// and returns that directory (what `--tls-dir` takes). Re-issuing a name replaces its files (renewal).
pub fn issue(
    dir: &Path,
    name: &str,
    role: Role,
    opts: &IssueOptions,
) -> Result<PathBuf, IssueError> {
    validate_name(name).map_err(IssueError::Name)?;
    if opts.valid_days == 0 || opts.valid_days > MAX_VALID_DAYS {
        return Err(IssueError::Days {
            days: opts.valid_days,
        });
    }
    if opts.not_before_offset_days.abs() > 36500 {
        return Err(IssueError::Offset {
            days: opts.not_before_offset_days,
        });
    }
    let mut sans = vec![
        SanType::DnsName(dns(name)?),
        SanType::DnsName(dns("localhost")?),
        SanType::IpAddress(IpAddr::from([127, 0, 0, 1])),
    ];
    for san in &opts.sans {
        let parsed = match san.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => {
                validate_name(san).map_err(|reason| IssueError::San {
                    san: san.clone(),
                    reason: format!("not an IP address, and {reason}"),
                })?;
                SanType::DnsName(dns(san)?)
            }
        };
        if !sans.contains(&parsed) {
            sans.push(parsed);
        }
    }

    let (ca_cert_pem, issuer) = load_issuer(dir)?;
    let gen_err = |source| IssueError::Generate {
        name: name.to_owned(),
        source,
    };
    let key = KeyPair::generate().map_err(gen_err)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Tern cluster");
    dn.push(DnType::OrganizationalUnitName, role.as_str());
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let start = OffsetDateTime::now_utc() + TimeDuration::days(opts.not_before_offset_days)
        - TimeDuration::minutes(CLOCK_SKEW_MINUTES);
    params.not_before = start;
    params.not_after = start + TimeDuration::days(i64::from(opts.valid_days));
    let cert = params.signed_by(&key, &issuer).map_err(gen_err)?;

    let out = dir.join(name);
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| IssueError::Write { path, source }
    };
    make_private_dir(&out).map_err(write_err(&out))?;
    let key_pem = key.serialize_pem();
    let cert_pem = cert.pem();
    for (file, bytes, mode) in [
        (files::SERVER_KEY, key_pem.as_bytes(), 0o600),
        (files::CLIENT_KEY, key_pem.as_bytes(), 0o600),
        (files::SERVER_CERT, cert_pem.as_bytes(), 0o644),
        (files::CLIENT_CERT, cert_pem.as_bytes(), 0o644),
        (files::CA_CERT, ca_cert_pem.as_bytes(), 0o644),
    ] {
        let path = out.join(file);
        write_file(&path, bytes, mode).map_err(write_err(&path))?;
    }
    // The CA's current revocation list, if it has one (a CA made before CRLs existed has none).
    let crl_path = out.join(files::CA_CRL);
    match fs::read(dir.join(files::CA_CRL)) {
        Ok(crl) => write_file(&crl_path, &crl, 0o644).map_err(write_err(&crl_path))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(IssueError::Read {
                path: dir.join(files::CA_CRL),
                source,
            });
        }
    }
    Ok(out)
}

fn dns(name: &str) -> Result<rcgen::string::Ia5String, IssueError> {
    name.try_into().map_err(|_| IssueError::San {
        san: name.to_owned(),
        reason: "not ASCII".to_owned(),
    })
}

pub(crate) fn load_issuer(dir: &Path) -> Result<(String, Issuer<'static, KeyPair>), IssueError> {
    let read = |file: &'static str| {
        let path = dir.join(file);
        fs::read_to_string(&path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                IssueError::NoCa {
                    dir: dir.to_owned(),
                    file,
                }
            } else {
                IssueError::Read { path, source }
            }
        })
    };
    let cert_pem = read(files::CA_CERT)?;
    let key_pem = read(files::CA_KEY)?;
    let parse_err = |source| IssueError::ParseCa {
        dir: dir.to_owned(),
        source,
    };
    let key = KeyPair::from_pem(&key_pem).map_err(parse_err)?;
    let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(parse_err)?;
    Ok((cert_pem, issuer))
}

/// Creates `dir` 0700 if missing; an existing directory is tightened to 0700.
fn make_private_dir(dir: &Path) -> io::Result<()> {
    match fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => fs::set_permissions(dir, fs::Permissions::from_mode(0o700)),
        Err(e) => Err(e),
    }
}

/// Writes `bytes` to `path` with `mode`, through a temporary file renamed into place, so a key is never
/// visible with a wider mode and a crash leaves the old file or the new one.
pub(crate) fn write_file(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = path.with_extension("pem.tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    // The umask may have narrowed the mode; set it exactly.
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)
}
