//! `--disk volume://NODE_ADDR/FILE`: registers the `volume` scheme with the VMM's block-backend
//! registry (opening a `tern_volume::client::VolumeDisk`), and gives every opened disk's write
//! lease back when the command ends. Keeps tern-vmm free of tern-volume.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tern_vmm::devices::block_backend::{self, BlockBackend};
use tern_volume::client::VolumeDisk;
use tern_volume::control::{self, Request};

/// `--tls-dir`: the certificate every connection of this process to a volume node presents
/// (NBD_OPT_STARTTLS on the disks' NBD connections, TLS for their lease messages). Loaded now,
/// before the jail closes the files off; without it the connections stay plain.
pub fn use_tls(dir: Option<&Path>) -> anyhow::Result<()> {
    if let Some(d) = dir {
        control::set_client_tls(d).with_context(|| {
            format!(
                "cannot use --tls-dir {} for volume disks (give a `tern pki issue --role host` \
                 directory)",
                d.display()
            )
        })?;
    }
    Ok(())
}

/// What a jailed VMM must see of a `volume://` disk's host files, asked of its node before the
/// jail is entered (the jail then holds only these): the LUN, which a writable disk opens for
/// direct I/O as root inside the jail, and the per-host claim directory. The node's
/// `--fault-file` (a test-only injection) is not made visible: a jailed disk sees real I/O errors
/// of the LUN only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailPaths {
    /// The LUN (`None`: a reader, or a node without a direct path, `--no-direct`).
    pub lun: Option<PathBuf>,
    /// Its size in bytes (0 when unknown): a jailed VMM's file-size limit must allow writes
    /// anywhere in it.
    pub lun_bytes: u64,
    /// The claim directory (`tern_volume::client::CLAIM_DIR`), for writable disks.
    pub claim_dir: Option<PathBuf>,
}

/// The host files volume disk `path` (`volume://NODE_ADDR/FILE`) needs, from its node's status.
pub fn jail_paths(path: &Path, readonly: bool) -> anyhow::Result<JailPaths> {
    if readonly {
        // A reader does all its I/O over NBD.
        return Ok(JailPaths {
            lun: None,
            lun_bytes: 0,
            claim_dir: None,
        });
    }
    let text = path.to_string_lossy();
    let spec = text.strip_prefix("volume://").unwrap_or(&text);
    let (addr, _) = tern_volume::client::parse_spec(spec)?;
    let status = control::request(&addr, &Request::Status, false, Duration::from_secs(30))
        .and_then(|r| Ok(r.into_status()?))
        .with_context(|| format!("cannot ask volume node {addr} where its LUN is (for --jail)"))?;
    let lun = (!status.no_direct).then_some(status.lun);
    Ok(JailPaths {
        lun_bytes: lun
            .as_deref()
            .and_then(|l| std::fs::metadata(l).ok())
            .map_or(0, |m| m.len()),
        lun,
        claim_dir: Some(PathBuf::from(tern_volume::client::CLAIM_DIR)),
    })
}

/// A volume file as a VMM block backend.
#[derive(Debug)]
struct VolumeBackend(Arc<VolumeDisk>);

impl BlockBackend for VolumeBackend {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset).map_err(io::Error::other)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_at(data, offset).map_err(io::Error::other)
    }
    fn flush(&self) -> io::Result<()> {
        self.0.flush().map_err(io::Error::other)
    }
    fn len(&self) -> u64 {
        self.0.len()
    }
    fn read_only(&self) -> bool {
        self.0.read_only()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.discard(offset, len).map_err(io::Error::other)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> io::Result<()> {
        // The node frees the whole extents either way (a thin file stays thin); reads of the
        // range return zeroes.
        self.0.write_zeroes(offset, len).map_err(io::Error::other)
    }
    fn successor_id(&self) -> Option<String> {
        Some(self.0.node_id().to_string())
    }
    fn release_to(&self, successor: &str) -> io::Result<()> {
        let node = successor.parse().map_err(|_| {
            io::Error::other(format!("volume successor {successor:?} is not a node id"))
        })?;
        self.0.release_to(node).map_err(io::Error::other)
    }
    fn abort_handover(&self) -> io::Result<()> {
        self.0.abort_handover().map_err(io::Error::other)
    }
    fn take_over(&self) -> io::Result<()> {
        self.0.take_over().map_err(io::Error::other)
    }
}

/// The volume disks opened by this process; dropping it flushes them, releases their leases and
/// prints their path counters.
#[derive(Debug)]
pub struct VolumeDisks(Arc<Mutex<Vec<Arc<VolumeDisk>>>>);

/// Registers `volume://` disks. `incoming`: a migration target, whose writable disks wait for
/// the hand-over (`VolumeDisk::open_incoming`) instead of acquiring the lease.
pub fn register(incoming: bool) -> VolumeDisks {
    // A disk's lease renewer is a thread of this VMM, so it runs under a filter like every
    // other: the API's, which covers the lease messages (sockets, TLS) the API thread sends too.
    tern_volume::client::on_thread_start(Box::new(|| {
        tern_vmm::seccomp::enter_or_exit(tern_vmm::seccomp::ThreadKind::Api)
    }));
    let opened: Arc<Mutex<Vec<Arc<VolumeDisk>>>> = Arc::default();
    let list = Arc::clone(&opened);
    let for_migration = Arc::clone(&opened);
    // The live-migration adapter moves these disks' write leases with the VM.
    tern_vmm::migrate::register_handover_disks(Box::new(move || {
        for_migration
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|d| Arc::new(VolumeBackend(Arc::clone(d))) as Arc<dyn BlockBackend>)
            .collect()
    }));
    block_backend::register_scheme(
        "volume",
        Box::new(move |spec, readonly| {
            let disk = if incoming && !readonly {
                VolumeDisk::open_incoming(spec)
            } else {
                VolumeDisk::open(spec, readonly)
            };
            let disk = disk.map(Arc::new).map_err(|e| match e {
                // A node that takes only TLS refuses the plain first message: say what to give.
                tern_volume::client::OpenError::Node { .. } if control::client_tls().is_none() => {
                    format!(
                        "{e} (a volume node started with --tls-dir needs this VMM's --tls-dir: \
                         the host's certificate)"
                    )
                }
                e => e.to_string(),
            })?;
            list.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Arc::clone(&disk));
            Ok(Box::new(VolumeBackend(disk)))
        }),
    );
    VolumeDisks(opened)
}

impl Drop for VolumeDisks {
    fn drop(&mut self) {
        for d in self.0.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            if let Err(e) = d.close() {
                eprintln!("tern: {e}");
            }
            let c = d.counters();
            eprintln!(
                "tern: volume disk {}: direct_writes={} node_writes={} replayed={} redirects={}",
                d.name(),
                c.direct_writes.load(Relaxed),
                c.node_writes.load(Relaxed),
                c.replayed.load(Relaxed),
                c.redirects.load(Relaxed)
            );
        }
    }
}
