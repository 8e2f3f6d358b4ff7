//! `tern volume …`: format a LUN, serve it, manage virtual-disk files and leases.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use tern_volume::control::{
    FileInfo, FileList, LeaseAction, LeaseGrant, ReplyError, Request, Response,
};
use tern_volume::format::{EXTENT_SIZE, MIN_LUN_SIZE};
use tern_volume::lun::FileLun;
use tern_volume::store::{self, FormatOptions};

/// Subcommands of `tern volume`.
#[derive(Debug, clap::Subcommand)]
pub enum VolumeCommand {
    /// Write a new, empty volume onto a LUN (a block device, or a file created at --size).
    Format(FormatArgs),
    /// Run this host's volume service: NBD exports of the files and the control protocol on
    /// --listen, coordinator election through etcd, direct I/O on the LUN (redirected through the
    /// coordinator when the LUN fails or with --no-direct).
    Serve(ServeArgs),
    /// Create a virtual-disk file (thin unless --preallocate).
    Create {
        /// File name (also its NBD export name): 1-128 of [A-Za-z0-9._-].
        name: String,
        /// Size, e.g. 64M, 8G.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Allocate and zero all extents now.
        #[arg(long)]
        preallocate: bool,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Delete a file (refused while a node holds its write lease).
    Rm {
        /// File name.
        name: String,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Grow a file.
    Resize {
        /// File name.
        name: String,
        /// New size (not smaller than the current one).
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// List files.
    Ls {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Show one file: size, allocation, write lease.
    Stat {
        /// File name.
        name: String,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Show the coordinator, its generation and every node's path state (direct or redirected).
    Status {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Write leases: acquire, release, hand over to another node.
    #[command(subcommand)]
    Lease(LeaseCommand),
}

/// Which node a client subcommand talks to.
#[derive(Debug, clap::Args)]
pub struct NodeArgs {
    /// The node's --listen address.
    #[arg(long, default_value = "127.0.0.1:10809")]
    node: String,
    /// Talk to a node started with --tls-dir: a directory from `tern pki issue` (CA, certificate,
    /// key); the node's certificate must name the --node host (an IP SAN for an address).
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// `tern volume lease …`.
#[derive(Debug, clap::Subcommand)]
pub enum LeaseCommand {
    /// Take the write lease of a file for the node named by --node.
    Acquire {
        /// File name.
        name: String,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Give the write lease up.
    Release {
        /// File name.
        name: String,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Hand the lease to node --to in one compare-and-swap (or --abort a pending hand-over, giving
    /// it back to the source).
    Handover {
        /// File name.
        name: String,
        /// Successor's node id.
        #[arg(long, required_unless_present = "abort")]
        to: Option<u32>,
        /// Take a pending hand-over back.
        #[arg(long, conflicts_with = "to")]
        abort: bool,
        #[command(flatten)]
        node: NodeArgs,
    },
}

/// `tern volume serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The LUN every node opens (a block device or a file), formatted with `tern volume format`.
    #[arg(long)]
    lun: PathBuf,
    /// This node's id (1, 2, …), unique in the cluster.
    #[arg(long)]
    node_id: u32,
    /// Address for NBD clients, the control protocol and peers.
    #[arg(long, default_value = "127.0.0.1:10809")]
    listen: String,
    /// etcd endpoint(s), comma-separated.
    #[arg(long, default_value = "http://127.0.0.1:2379", value_delimiter = ',')]
    etcd: Vec<String>,
    /// Never do direct I/O on the LUN (a host without SAN access): all I/O goes to the coordinator.
    #[arg(long)]
    no_direct: bool,
    /// Fault injection: while this file exists every LUN access of this node fails with EIO; the
    /// node's LUN also gets a volatile write cache, so writes not yet flushed are lost with the path.
    #[arg(long)]
    fault_file: Option<PathBuf>,
    /// Fault injection: while this file exists this node cannot reach the other nodes (its
    /// requests to the coordinator fail), like a network partition.
    #[arg(long)]
    partition_file: Option<PathBuf>,
    /// TTL in seconds of the coordinator's etcd session (take-over time after a coordinator dies).
    #[arg(long, default_value_t = 3)]
    session_ttl: i64,
    /// TTL of write leases in milliseconds.
    #[arg(long, default_value_t = 4000)]
    lease_ttl_ms: u64,
    /// Require mutual TLS on the port (NBD_OPT_STARTTLS; plain connections are refused) and use
    /// it to reach the other nodes: a directory from `tern pki issue --role host --name node-ID`
    /// (the certificate's name must be node-ID for this --node-id; give it the listen address
    /// with --san so peers can check it).
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Connections served at once; more are accepted and closed at once.
    #[arg(long, default_value_t = tern_nbd::server::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// A connection must have selected an export (greeting, TLS, options) within this many
    /// milliseconds of being accepted, or it is closed.
    #[arg(long, default_value_t = 10_000)]
    handshake_timeout_ms: u64,
    /// Close a connection that sends no request for this many seconds (0: never; VM disks may
    /// be idle for long).
    #[arg(long, default_value_t = 0)]
    idle_timeout_s: u64,
}

/// `tern volume format`.
#[derive(Debug, clap::Args)]
pub struct FormatArgs {
    /// The LUN: a block device or a regular file (created if missing).
    #[arg(long)]
    lun: PathBuf,
    /// Size of the volume, e.g. 8G, 512M (required when the file does not exist yet; a smaller
    /// existing file is grown to it).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Overwrite a LUN that already holds a volume or other data.
    #[arg(long)]
    force: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// Parse sizes like `4096`, `64K`, `64M`, `8G`, `1T` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size unit {c:?} (use K, M, G or T)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 4096, 64M, 8G)"))?;
    n.checked_mul(mult)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("size {s:?} is out of range"))
}

pub fn run(cmd: VolumeCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        VolumeCommand::Format(a) => format(a),
        VolumeCommand::Serve(a) => {
            anyhow::ensure!(
                a.session_ttl >= 1,
                "--session-ttl must be at least 1 second"
            );
            anyhow::ensure!(a.lease_ttl_ms >= 100, "--lease-ttl-ms must be at least 100");
            anyhow::ensure!(
                a.max_connections >= 1,
                "--max-connections must be at least 1"
            );
            anyhow::ensure!(
                a.handshake_timeout_ms >= 100,
                "--handshake-timeout-ms must be at least 100"
            );
            tern_volume::cluster::serve(tern_volume::cluster::ServeOptions {
                lun: a.lun,
                node_id: a.node_id,
                listen: a.listen,
                etcd: a.etcd,
                no_direct: a.no_direct,
                fault_file: a.fault_file,
                partition_file: a.partition_file,
                session_ttl_s: a.session_ttl,
                lease_ttl_ms: a.lease_ttl_ms,
                tls_dir: a.tls_dir,
                max_connections: a.max_connections,
                handshake_timeout: std::time::Duration::from_millis(a.handshake_timeout_ms),
                idle_timeout: (a.idle_timeout_s > 0)
                    .then(|| std::time::Duration::from_secs(a.idle_timeout_s)),
            })?;
            Ok(ExitCode::SUCCESS)
        }
        VolumeCommand::Create {
            name,
            size,
            preallocate,
            node,
        } => client(
            &node,
            Request::Create {
                name,
                size,
                preallocated: preallocate,
            },
            print_file,
        ),
        VolumeCommand::Rm { name, node } => client(&node, Request::Remove { name }, |r| {
            println!("removed {}", r.into_removed()?.name);
            Ok(())
        }),
        VolumeCommand::Resize { name, size, node } => {
            client(&node, Request::Resize { name, size }, print_file)
        }
        VolumeCommand::Ls { node } => client(&node, Request::List, |r| {
            print!("{}", ls_table(&r.into_files()?));
            Ok(())
        }),
        VolumeCommand::Stat { name, node } => {
            client(&node, Request::Stat { name, map: false }, print_file)
        }
        VolumeCommand::Status { node } => client(&node, Request::Status, |r| {
            let v = r.into_status()?;
            match &v.coordinator {
                Some(c) => println!(
                    "coordinator: node {} at {} (generation {})",
                    c.node_id, c.addr, c.generation
                ),
                None => println!("coordinator: none elected"),
            }
            let role = match v.role {
                tern_volume::control::Role::Coordinator => "coordinator",
                tern_volume::control::Role::Node => "node",
            };
            println!(
                "this node: {} ({role}), path {}",
                v.node_id,
                v.path.as_str()
            );
            println!(
                "LUN: {}{}{}",
                v.lun.display(),
                if v.no_direct {
                    " (--no-direct: not opened)"
                } else {
                    ""
                },
                v.fault_file
                    .as_ref()
                    .map(|f| format!(", fault file {}", f.display()))
                    .unwrap_or_default()
            );
            for n in &v.nodes {
                println!("  node {} at {}: {}", n.node_id, n.addr, n.path.as_str());
            }
            Ok(())
        }),
        VolumeCommand::Lease(LeaseCommand::Acquire { name, node }) => client(
            &node,
            Request::Lease {
                name,
                action: LeaseAction::Acquire,
            },
            print_lease,
        ),
        VolumeCommand::Lease(LeaseCommand::Release { name, node }) => client(
            &node,
            Request::Lease {
                name,
                action: LeaseAction::Release,
            },
            print_lease,
        ),
        VolumeCommand::Lease(LeaseCommand::Handover {
            name,
            to,
            abort,
            node,
        }) => {
            let action = match (to, abort) {
                (_, true) => LeaseAction::AbortHandover,
                (Some(to), false) => LeaseAction::Handover { to },
                (None, false) => anyhow::bail!("give --to NODE or --abort"),
            };
            client(&node, Request::Lease { name, action }, print_lease)
        }
    }
}

/// Bytes in binary units, exact where it can be (`20 GiB`, `1536 KiB`), else one decimal.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    while unit + 1 < UNITS.len() && bytes >= 1 << (10 * (unit + 1)) {
        unit += 1;
    }
    let div = 1u64 << (10 * unit);
    if bytes.is_multiple_of(div) {
        format!("{} {}", bytes / div, UNITS[unit])
    } else {
        format!("{:.1} {}", bytes as f64 / div as f64, UNITS[unit])
    }
}

/// The `volume ls` table: columns sized to their widest cell, sizes in binary units.
fn ls_table(v: &FileList) -> String {
    let extent = v.extent_size;
    let mut rows = vec![[
        "NAME".to_owned(),
        "SIZE".to_owned(),
        "ALLOCATED".to_owned(),
        "TYPE".to_owned(),
        "WRITER".to_owned(),
        "EPOCH".to_owned(),
    ]];
    for f in &v.files {
        rows.push([
            f.name.clone(),
            human_size(f.size),
            human_size(f.allocated_extents * extent),
            if f.preallocated { "prealloc" } else { "thin" }.to_owned(),
            f.lease
                .holder
                .map_or_else(|| "-".into(), |h| format!("node {h}")),
            f.lease.epoch.to_string(),
        ]);
    }
    let mut width = [0usize; 6];
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let line = format!(
            "{:<w0$}  {:>w1$}  {:>w2$}  {:<w3$}  {:<w4$}  {:>w5$}",
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            r[5],
            w0 = width[0],
            w1 = width[1],
            w2 = width[2],
            w3 = width[3],
            w4 = width[4],
            w5 = width[5],
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    let extents = u64::from(v.extents);
    let sizes: u64 = v.files.iter().map(|f| f.size).sum();
    out.push_str(&format!(
        "volume: {} free of {}; files total {}{} (generation {})\n",
        human_size(v.free_extents * extent),
        human_size(extents * extent),
        human_size(sizes),
        if sizes > extents * extent {
            ", over-committed (thin files take space at first write)"
        } else {
            ""
        },
        v.generation
    ));
    out
}

/// How long a client waits for a node that refuses connections (one just started with
/// `tern volume serve … &` binds its port a moment later).
const NODE_START_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Connect to the node first, so an unreachable node is reported with its cause. A refused
/// connection is retried for [`NODE_START_WAIT`].
fn check_reachable(addr: &str) -> anyhow::Result<()> {
    use std::net::{TcpStream, ToSocketAddrs};
    let hint = || {
        format!("cannot reach node {addr} (is `tern volume serve --listen {addr}` running there?)")
    };
    let addrs: Vec<_> = addr
        .to_socket_addrs()
        .with_context(|| format!("{} — {addr:?} is not a HOST:PORT address", hint()))?
        .collect();
    let start = std::time::Instant::now();
    let mut last = None;
    loop {
        for a in &addrs {
            match TcpStream::connect_timeout(a, std::time::Duration::from_secs(5)) {
                Ok(_) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        let refused = last
            .as_ref()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused);
        if !refused || start.elapsed() >= NODE_START_WAIT {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    match last {
        Some(e) => Err(anyhow::Error::new(e).context(hint())),
        None => anyhow::bail!("{}: {addr:?} resolves to no address", hint()),
    }
}

/// Sends `req` to the node, then prints the typed answer: as JSON with `--json`, else through
/// `human`, which fails if the answer is not the kind the request calls for.
fn client(
    node: &NodeArgs,
    req: Request,
    human: impl Fn(Response) -> Result<(), ReplyError>,
) -> anyhow::Result<ExitCode> {
    if let Some(d) = &node.tls_dir {
        tern_volume::control::set_client_tls(d)
            .with_context(|| format!("--tls-dir {}", d.display()))?;
    }
    check_reachable(&node.node)?;
    // Generous: a metadata operation may wait through a coordinator take-over.
    let r =
        tern_volume::control::request(&node.node, &req, false, std::time::Duration::from_secs(30))?;
    if node.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        human(r).with_context(|| format!("node {} answered oddly", node.node))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn print_file(r: Response) -> Result<(), ReplyError> {
    let f: FileInfo = r.into_file()?;
    let holder = f
        .lease
        .holder
        .map(|h| format!("node {h}"))
        .unwrap_or_else(|| "none".into());
    println!(
        "{}: {} ({} bytes), {}, {} allocated, write lease: {holder} (epoch {})",
        f.name,
        human_size(f.size),
        f.size,
        if f.preallocated {
            "preallocated"
        } else {
            "thin"
        },
        human_size(f.allocated_extents * EXTENT_SIZE),
        f.lease.epoch,
    );
    Ok(())
}

fn print_lease(r: Response) -> Result<(), ReplyError> {
    let l: LeaseGrant = r.into_lease()?;
    let holder = l
        .holder
        .map(|h| format!("node {h}"))
        .unwrap_or_else(|| "nobody".into());
    println!("{}: held by {holder}, epoch {}", l.name, l.epoch);
    Ok(())
}

fn format(a: FormatArgs) -> anyhow::Result<ExitCode> {
    let exists = a.lun.exists();
    if !exists {
        let size = a
            .size
            .context("the LUN does not exist; give --size to create it")?;
        anyhow::ensure!(
            size >= MIN_LUN_SIZE,
            "--size {size} is below the minimum volume size of {MIN_LUN_SIZE} bytes"
        );
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&a.lun)
            .with_context(|| format!("creating {}", a.lun.display()))?;
        f.set_len(size)?;
    } else if let Some(size) = a.size {
        let md = std::fs::metadata(&a.lun)?;
        if md.is_file() && md.len() < size {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&a.lun)?
                .set_len(size)?;
        }
    }
    let lun = FileLun::open(&a.lun).with_context(|| format!("opening {}", a.lun.display()))?;
    let uuid = uuid_now();
    let sb = match store::format(
        &lun,
        FormatOptions {
            force: a.force,
            uuid,
        },
    ) {
        Ok(sb) => sb,
        Err(e) => {
            if !exists {
                let _ = std::fs::remove_file(&a.lun);
            }
            return Err(e.into());
        }
    };
    let uuid_hex: String = sb.uuid.iter().map(|b| format!("{b:02x}")).collect();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "lun": a.lun, "uuid": uuid_hex, "size": sb.lun_size,
                "extent_size": EXTENT_SIZE, "extents": sb.extent_count,
            })
        );
    } else {
        println!(
            "formatted {}: volume {uuid_hex}, {} extents of {} MiB ({} bytes usable)",
            a.lun.display(),
            sb.extent_count,
            EXTENT_SIZE >> 20,
            u64::from(sb.extent_count) * EXTENT_SIZE
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn uuid_now() -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS's randomness per process; two hashes give 128 bits.
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let mut u = [0u8; 16];
    for (i, chunk) in u.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(t);
        h.write_usize(i);
        chunk.copy_from_slice(&h.finish().to_le_bytes());
    }
    u
}

#[cfg(test)]
mod tests {
    use super::{FileList, human_size, ls_table, parse_size};

    #[test]
    fn sizes_print_in_binary_units() {
        assert_eq!(human_size(20 << 30), "20 GiB");
        assert_eq!(human_size(3 << 20), "3 MiB");
        assert_eq!(human_size(1536 << 10), "1.5 MiB");
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(0), "0 B");
    }

    #[test]
    fn ls_columns_line_up_whatever_the_name_lengths() {
        let v: FileList = serde_json::from_value(serde_json::json!({
            "files": [
                { "name": "a", "size": 21474836480u64, "preallocated": false, "allocated_extents": 3,
                  "lease": { "epoch": 12, "holder": 2, "remaining_ms": null, "handover_from": null },
                  "map": null },
                { "name": "a-much-longer-name-than-the-header.raw", "size": 1048576, "preallocated": true,
                  "allocated_extents": 1,
                  "lease": { "epoch": 0, "holder": null, "remaining_ms": null, "handover_from": null },
                  "map": null },
            ],
            "extent_size": 1048576, "extents": 8189, "free_extents": 8185, "generation": 7,
        }))
        .expect("a file list");
        let t = ls_table(&v);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        // Every column starts at the same place in the header and in each row.
        let col = |l: &str, what: &str| l.find(what).unwrap_or_else(|| panic!("{what} in {l:?}"));
        assert_eq!(col(lines[0], "TYPE"), col(lines[1], "thin"));
        assert_eq!(col(lines[0], "TYPE"), col(lines[2], "prealloc"));
        assert_eq!(col(lines[0], "WRITER"), col(lines[1], "node 2"));
        assert_eq!(
            col(lines[0], "SIZE") + "SIZE".len(),
            col(lines[1], "20 GiB") + "20 GiB".len(),
            "sizes are right-aligned under their header"
        );
        assert!(lines[3].contains("8.0 GiB free of 8.0 GiB"), "{t}");
        assert!(lines[3].contains("over-committed"), "{t}");
    }

    #[test]
    fn sizes_parse_with_binary_units_and_reject_garbage() {
        assert_eq!(parse_size("8G"), Ok(8 << 30));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
