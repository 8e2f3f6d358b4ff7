//! The sandboxed VMM: `--seccomp off|log|kill` (per-thread filters, `tern_vmm::seccomp`) and
//! `--jail` (Firecracker's jailer, inside the VMM process itself).
//!
//! `--jail`, while the process has one thread and before anything is opened:
//! 1. a new mount namespace (`unshare(CLONE_NEWNS)`, every mount made private);
//! 2. a tmpfs at `JAIL_DIR/NAME` holding only what the VM needs, bind-mounted at the same
//!    absolute paths as outside: `/dev/kvm`, `/dev/net/tun` (with NICs), the kernel and initrd
//!    files, each disk (read-only disks read-only), for writable `volume://` disks the LUN their
//!    node names and the claim directory, the directories of the API socket, the runtime entry
//!    and the serial file, the API's snapshot directory (made 0700 for the jail user when
//!    missing), and a fresh `/proc`;
//! 3. `pivot_root` into it, the old root detached: nothing else of the host's file system is
//!    reachable;
//! 4. `no_new_privs`.
//!
//! The VM is then built as root inside the jail (KVM, taps, disks opened), the API socket bound and
//! the runtime entry written; then [`lock_down`] drops every thread to `--jail-uid/--jail-gid`
//! (default the `tern` user, else `nobody`), with no supplementary groups and hence no
//! capabilities, sets the rlimits (open files, processes, file size, address space by the VM's
//! memory plus a margin) and installs the main thread's seccomp filter. The runtime entry and the
//! socket stay where they were made; an unprivileged VMM cannot remove them from root's
//! directories at its end, so `tern vm list` shows the entry as dead (`--prune` removes it) and
//! the next VMM of that name replaces the stale socket.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, bail};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::sys::resource::{Resource, setrlimit};
use nix::unistd::{Gid, Group, Uid, User};
use tern_vmm::config::{KernelSource, VmConfig};
use tern_vmm::seccomp::{self, DropIds, FilterOptions, SeccompMode, ThreadKind};

/// Where the per-VM jail directories are made.
pub const DEFAULT_JAIL_DIR: &str = "/run/tern/jail";

/// Room for everything but guest RAM in the address-space limit: thread stacks, glibc's
/// per-thread malloc arenas (64 MiB of reservation each), the binary, migration buffers.
const ADDRESS_SPACE_MARGIN: u64 = 4 << 30;

/// Open files a jailed VMM may hold.
const MAX_OPEN_FILES: u64 = 1024;

/// Processes (threads) the jail user may have.
const MAX_PROCESSES: u64 = 1024;

/// Options of `tern vm run` and `tern vm receive` for the sandbox.
#[derive(Debug, Clone, clap::Args)]
pub struct SandboxArgs {
    /// Seccomp filters on every VMM thread: kill (a thread making a syscall outside its
    /// allow-list stops the VMM with a report naming it), log (allowed, logged by the kernel), or
    /// off.
    #[arg(long, default_value = "kill", value_name = "off|log|kill")]
    pub seccomp: String,
    /// Run the VMM jailed: its own mount namespace with only the files the VM needs, then as an
    /// unprivileged user with rlimits once KVM, taps and disks are open.
    #[arg(long)]
    pub jail: bool,
    /// The user a jailed VMM runs as (default: the `tern` user, else `nobody`).
    #[arg(long, value_name = "UID", requires = "jail")]
    pub jail_uid: Option<u32>,
    /// The group a jailed VMM runs as (default: the jail user's group).
    #[arg(long, value_name = "GID", requires = "jail")]
    pub jail_gid: Option<u32>,
    /// Where the per-VM jail directory NAME is made.
    #[arg(long, default_value = DEFAULT_JAIL_DIR, value_name = "DIR", requires = "jail")]
    pub jail_dir: PathBuf,
}

/// The ids this VMM drops to at [`lock_down`], set by [`start`] with `--jail`.
static DROP_TO: OnceLock<DropIds> = OnceLock::new();

/// The largest LUN a jailed VMM's volume disks write directly (bytes), set by [`start`]: the
/// file-size limit must let `pwrite` reach its end.
static LUN_BYTES: OnceLock<u64> = OnceLock::new();

/// What a jail must make visible, besides `/dev/kvm`.
#[derive(Debug, Default)]
pub struct JailFiles {
    /// Files bind-mounted read-write.
    pub files: Vec<PathBuf>,
    /// Files bind-mounted read-only.
    pub readonly_files: Vec<PathBuf>,
    /// Directories bind-mounted read-write (created when missing).
    pub dirs: Vec<PathBuf>,
    /// Whether taps are opened (`/dev/net/tun`).
    pub tun: bool,
    /// Volume disks (`volume://…`, read-only or not): their node tells, before the jail is
    /// entered, which host files they need (`volume_disk::jail_paths`).
    pub volume_disks: Vec<(PathBuf, bool)>,
    /// The API's snapshot directory: bound read-write, and when missing created 0700 for the
    /// jail user (the unprivileged VMM writes the snapshots).
    pub snapshot_dir: Option<PathBuf>,
}

impl JailFiles {
    /// What the VM of `cfg` opens: kernel, initrd, disks, serial file, API socket and runtime
    /// directories, `/dev/net/tun` for NICs.
    pub fn for_config(cfg: &VmConfig) -> anyhow::Result<JailFiles> {
        let mut j = JailFiles {
            tun: !cfg.nets.is_empty(),
            ..Default::default()
        };
        if let KernelSource::File(p) = &cfg.kernel {
            j.readonly_files.push(p.clone());
        }
        j.readonly_files.extend(cfg.initrd.clone());
        j.add_disks(cfg.disks.iter().map(|d| (d.path.clone(), d.readonly)))?;
        j.dirs.push(cfg.runtime_dir.clone());
        j.dirs.extend(cfg.api_sock.as_deref().and_then(parent));
        if let tern_vmm::config::SerialOutput::File(p) = &cfg.serial {
            j.dirs.extend(parent(p));
        }
        Ok(j)
    }

    /// What `tern vm receive` opens once the source connects: its `--disk`s, `--net` taps, API
    /// socket, runtime directory and `--serial file:`.
    pub fn for_receive(
        disks: &[String],
        nets: bool,
        api_sock: Option<&Path>,
        runtime_dir: &Path,
        serial: &str,
    ) -> anyhow::Result<JailFiles> {
        let mut j = JailFiles {
            tun: nets,
            ..Default::default()
        };
        let parsed = disks
            .iter()
            .map(|d| tern_vmm::config::parse_disk(d).map(|d| (d.path, d.readonly)))
            .collect::<Result<Vec<_>, _>>()?;
        j.add_disks(parsed)?;
        j.dirs.push(runtime_dir.to_path_buf());
        j.dirs.extend(api_sock.and_then(parent));
        if let Some(p) = serial.strip_prefix("file:") {
            j.dirs.extend(parent(Path::new(p)));
        }
        Ok(j)
    }

    /// Adds the API's snapshot directory.
    pub fn with_snapshot_dir(mut self, dir: &Path) -> JailFiles {
        self.snapshot_dir = Some(std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf()));
        self
    }

    /// Adds disks given as `PATH[,readonly]` or already parsed.
    pub fn add_disks(
        &mut self,
        disks: impl IntoIterator<Item = (PathBuf, bool)>,
    ) -> anyhow::Result<()> {
        for (path, readonly) in disks {
            if path.to_string_lossy().contains("://") {
                self.volume_disks.push((path, readonly));
                continue;
            }
            let path = std::path::absolute(&path).unwrap_or(path);
            if readonly {
                self.readonly_files.push(path);
            } else {
                self.files.push(path);
            }
        }
        Ok(())
    }
}

fn parent(p: &Path) -> Option<PathBuf> {
    std::path::absolute(p).ok()?.parent().map(Path::to_path_buf)
}

/// Reads the options, compiles the seccomp filters, and with `--jail` builds the jail for `files`
/// and enters it. Call before the VM is built and before any thread starts.
pub fn start(args: &SandboxArgs, name: &str, files: &JailFiles) -> anyhow::Result<()> {
    let mode: SeccompMode = args.seccomp.parse()?;
    let drop_to = if args.jail {
        let ids = jail_ids(args)?;
        enter_jail(&args.jail_dir.join(name), files, ids)?;
        let _ = DROP_TO.set(ids);
        Some(ids)
    } else {
        None
    };
    let opts = FilterOptions {
        drop_ids: drop_to,
        volume_disks: !files.volume_disks.is_empty(),
    };
    seccomp::configure(mode, opts).context("cannot set up the seccomp filters")
}

/// The filter of the API and of the threads started from the main thread from here on
/// (`signals`, `api`, `api-conn`, the migration's control). Call on the main thread before the
/// API starts.
pub fn enter_api_filter() -> anyhow::Result<()> {
    seccomp::enter(ThreadKind::Api).context("cannot sandbox the API")
}

/// Drops a jailed VMM to its unprivileged ids with its rlimits, then installs the main thread's
/// filter. Call once the API socket and the runtime entry exist, before the VM resumes.
pub fn lock_down(cfg: &VmConfig) -> anyhow::Result<()> {
    if let Some(ids) = DROP_TO.get() {
        drop_privileges(*ids, cfg)?;
    }
    seccomp::enter(ThreadKind::Main).context("cannot sandbox the main thread")
}

fn jail_ids(args: &SandboxArgs) -> anyhow::Result<DropIds> {
    let user = match args.jail_uid {
        Some(uid) => User::from_uid(Uid::from_raw(uid)).ok().flatten(),
        None => ["tern", "nobody"]
            .iter()
            .find_map(|n| User::from_name(n).ok().flatten()),
    };
    let uid = match (args.jail_uid, &user) {
        (Some(uid), _) => uid,
        (None, Some(u)) => u.uid.as_raw(),
        (None, None) => bail!("no `tern` or `nobody` user on this host: give --jail-uid"),
    };
    let gid = match (args.jail_gid, &user) {
        (Some(gid), _) => gid,
        (None, Some(u)) => u.gid.as_raw(),
        (None, None) => Group::from_name("nogroup")
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw())
            .context("give --jail-gid")?,
    };
    if uid == 0 || gid == 0 {
        bail!("--jail needs an unprivileged user and group, not root (uid {uid}, gid {gid})");
    }
    Ok(DropIds { uid, gid })
}

fn one_thread() -> bool {
    std::fs::read_dir("/proc/self/task").is_ok_and(|d| d.count() == 1)
}

fn enter_jail(root: &Path, files: &JailFiles, ids: DropIds) -> anyhow::Result<()> {
    // Volume disks: their node names the LUN (opened as root inside the jail, like any disk) and
    // writers take a claim in the claim directory; the node connection is a socket, opened
    // inside the jail before the drop and again by the disk's lease messages afterwards (the
    // jail keeps the host's network namespace).
    let mut luns: Vec<PathBuf> = Vec::new();
    let mut claim_dirs: Vec<PathBuf> = Vec::new();
    let mut lun_bytes = 0;
    for (disk, readonly) in &files.volume_disks {
        let p = super::volume_disk::jail_paths(disk, *readonly)?;
        lun_bytes = lun_bytes.max(p.lun_bytes);
        luns.extend(p.lun.filter(|l| !luns.contains(l)));
        claim_dirs.extend(p.claim_dir.filter(|d| !claim_dirs.contains(d)));
    }
    let _ = LUN_BYTES.set(lun_bytes);
    if !one_thread() {
        bail!("--jail must be set up before the VMM starts any thread");
    }
    std::fs::create_dir_all(root)
        .with_context(|| format!("cannot create the jail directory {}", root.display()))?;
    unshare(CloneFlags::CLONE_NEWNS).context("cannot make a mount namespace (run as root)")?;
    let none: Option<&str> = None;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .context("cannot make the mounts private")?;
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755,size=1m"),
    )
    .with_context(|| format!("cannot mount the jail's tmpfs on {}", root.display()))?;
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    let bind = |src: &Path, dir: bool, readonly: bool| -> anyhow::Result<()> {
        let dst = inside(src);
        if dir {
            std::fs::create_dir_all(src)
                .with_context(|| format!("cannot create {}", src.display()))?;
            std::fs::create_dir_all(&dst)?;
        } else {
            if let Some(p) = dst.parent() {
                std::fs::create_dir_all(p)?;
            }
            std::fs::File::create(&dst)?;
        }
        mount(Some(src), &dst, none, MsFlags::MS_BIND, none)
            .with_context(|| format!("cannot bind {} into the jail", src.display()))?;
        if readonly {
            mount(
                none,
                &dst,
                none,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                none,
            )
            .with_context(|| format!("cannot make {} read-only in the jail", src.display()))?;
        }
        Ok(())
    };
    bind(Path::new("/dev/kvm"), false, false)?;
    if files.tun {
        bind(Path::new("/dev/net/tun"), false, false)?;
    }
    // Every file's mount point is made in the jail's tmpfs before any directory is bound over
    // it (a mount point made inside a bound directory would be a host file).
    for f in files.files.iter().chain(&luns) {
        bind(f, false, false)?;
    }
    for f in &files.readonly_files {
        bind(f, false, true)?;
    }
    for d in files.dirs.iter().chain(&claim_dirs) {
        bind(d, true, false)?;
    }
    if let Some(d) = &files.snapshot_dir {
        if !d.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .with_context(|| format!("cannot create the snapshot directory {}", d.display()))?;
            nix::unistd::chown(
                d,
                Some(Uid::from_raw(ids.uid)),
                Some(Gid::from_raw(ids.gid)),
            )
            .with_context(|| format!("cannot give {} to the jail user", d.display()))?;
        }
        bind(d, true, false)?;
    }
    let proc_dir = inside(Path::new("/proc"));
    std::fs::create_dir_all(&proc_dir)?;
    mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        none,
    )
    .context("cannot mount /proc in the jail")?;
    let old = inside(Path::new("/.old-root"));
    std::fs::create_dir_all(&old)?;
    nix::unistd::pivot_root(root, &old).context("cannot pivot_root into the jail")?;
    nix::unistd::chdir("/")?;
    umount2("/.old-root", MntFlags::MNT_DETACH).context("cannot detach the host's root")?;
    let _ = std::fs::remove_dir("/.old-root");
    nix::sys::prctl::set_no_new_privs().context("cannot set no_new_privs")?;
    Ok(())
}

fn drop_privileges(ids: DropIds, cfg: &VmConfig) -> anyhow::Result<()> {
    let largest_disk = cfg
        .disks
        .iter()
        .filter_map(|d| std::fs::metadata(&d.path).ok())
        .map(|m| m.len())
        .max()
        .unwrap_or(0);
    let memory = cfg.memory_bytes();
    // Files the VMM may grow: disks (never past their size), snapshots (memory + state), the
    // console; and volume disks' LUNs, written directly anywhere up to their end.
    let luns = LUN_BYTES.get().copied().unwrap_or(0);
    let file_size = largest_disk.max(memory).max(luns) + (1 << 30);
    let limits = [
        (Resource::RLIMIT_NOFILE, MAX_OPEN_FILES),
        (Resource::RLIMIT_NPROC, MAX_PROCESSES),
        (Resource::RLIMIT_FSIZE, file_size),
        (Resource::RLIMIT_AS, memory + ADDRESS_SPACE_MARGIN),
    ];
    for (res, v) in limits {
        setrlimit(res, v, v).with_context(|| format!("cannot set {res:?} to {v}"))?;
    }
    let (uid, gid) = (Uid::from_raw(ids.uid), Gid::from_raw(ids.gid));
    nix::unistd::setgroups(&[]).context("cannot drop the supplementary groups")?;
    nix::unistd::setresgid(gid, gid, gid).with_context(|| format!("cannot take gid {gid}"))?;
    nix::unistd::setresuid(uid, uid, uid).with_context(|| format!("cannot take uid {uid}"))?;
    Ok(())
}
