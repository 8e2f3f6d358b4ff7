//! The typed, validated configuration of one VM; built from user input before any KVM call.
//!
//! [`VmConfigInput`] is what a user typed; [`VmConfigInput::validate`] turns it into a [`VmConfig`] or
//! one [`ConfigError`] whose message names the problem and what to do about it.

use std::fs::File;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::layout;

/// Largest number of vCPUs Tern describes (8-bit APIC IDs in the MP table; 0xff is broadcast).
pub const MAX_VCPUS: u8 = 254;
/// Largest kernel command line accepted (Linux's x86 COMMAND_LINE_SIZE).
pub const MAX_CMDLINE_BYTES: usize = 2048;
/// Smallest guest memory Tern accepts.
pub const MIN_MEMORY_MIB: u64 = 4;
/// Guest RAM's huge pages when `--huge-pages` is not given and the host's THP allows them
/// (measured: docs/vmm.md, "Huge pages").
pub const DEFAULT_HUGE_PAGES: HugePages = HugePages::On;
/// Where the kernel tells its transparent huge page mode.
pub const THP_ENABLED_PATH: &str = "/sys/kernel/mm/transparent_hugepage/enabled";

/// Whether guest RAM is backed by transparent huge pages (`--huge-pages on|off`).
///
/// A host-side choice the guest cannot see: a migration's target follows its own setting, not
/// its source's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HugePages {
    /// `madvise(MADV_HUGEPAGE)` on every RAM region: the kernel backs each 2 MiB-aligned range
    /// of it with one huge page where it can, at its first touch.
    On,
    /// `madvise(MADV_NOHUGEPAGE)`: 4 KiB pages only, even on a host whose THP mode is `always`.
    Off,
}

impl std::fmt::Display for HugePages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HugePages::On => "on",
            HugePages::Off => "off",
        })
    }
}

impl std::str::FromStr for HugePages {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "on" => Ok(HugePages::On),
            "off" => Ok(HugePages::Off),
            _ => Err(ConfigError::BadHugePages(s.to_string())),
        }
    }
}

/// The host's transparent huge page mode, the selected word of [`THP_ENABLED_PATH`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThpMode {
    /// Every anonymous mapping gets huge pages.
    Always,
    /// Only mappings advised with `MADV_HUGEPAGE` get them.
    Madvise,
    /// None.
    Never,
    /// No THP in this kernel (the file is missing or unreadable).
    Unsupported,
}

impl ThpMode {
    /// The mode from the file's text, e.g. `always [madvise] never`.
    pub fn parse(text: &str) -> ThpMode {
        let selected = text
            .split_whitespace()
            .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'));
        match selected {
            Some("always") => ThpMode::Always,
            Some("madvise") => ThpMode::Madvise,
            Some("never") => ThpMode::Never,
            _ => ThpMode::Unsupported,
        }
    }

    /// Whether `MADV_HUGEPAGE` gets a mapping huge pages under this mode.
    pub fn allows_huge_pages(self) -> bool {
        matches!(self, ThpMode::Always | ThpMode::Madvise)
    }
}

impl std::fmt::Display for ThpMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ThpMode::Always => "always",
            ThpMode::Madvise => "madvise",
            ThpMode::Never => "never",
            ThpMode::Unsupported => "not built into this kernel",
        })
    }
}

/// Where the guest kernel comes from.
#[derive(Clone)]
pub enum KernelSource {
    /// A kernel file on the host (ELF vmlinux, PVH ELF or bzImage).
    File(PathBuf),
    /// An image embedded in the program (e.g. `builtin:testguest`).
    Embedded {
        /// The name shown in messages.
        name: String,
        /// The ELF bytes.
        bytes: Arc<[u8]>,
    },
}

impl std::fmt::Debug for KernelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelSource::File(p) => write!(f, "File({})", p.display()),
            KernelSource::Embedded { name, bytes } => {
                write!(f, "Embedded({name}, {} bytes)", bytes.len())
            }
        }
    }
}

impl KernelSource {
    /// A name for messages.
    pub fn describe(&self) -> String {
        match self {
            KernelSource::File(p) => p.display().to_string(),
            KernelSource::Embedded { name, .. } => name.clone(),
        }
    }
}

/// The format of a kernel image, found from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum KernelFormat {
    /// An ELF executable (booted through PVH when it has the note, else the 64-bit Linux protocol).
    Elf,
    /// A Linux bzImage (setup header magic `HdrS` at 0x202).
    BzImage,
}

/// Where the serial console's output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialOutput {
    /// The VMM's standard output.
    Stdout,
    /// Appended to a file (created if missing).
    File(PathBuf),
    /// Discarded.
    Null,
}

/// A virtio-blk disk over a raw image file (or a registered `SCHEME://…` backend).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The raw image file.
    pub path: PathBuf,
    /// Refuse guest writes (the device offers VIRTIO_BLK_F_RO and the file is opened read-only).
    pub readonly: bool,
}

/// A virtio-net NIC over a tap (`--net tap=NAME,mac=MAC[,ip=ADDR]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The tap interface (created if missing).
    pub tap: String,
    /// The NIC's MAC address.
    pub mac: [u8; 6],
    /// The guest's IPv4 address, if given (for gratuitous ARP in the announce; otherwise
    /// learnt from the guest's own traffic).
    pub ip: Option<std::net::Ipv4Addr>,
    /// A bridge (in the VMM's network namespace) the tap is made a port of.
    pub bridge: Option<String>,
}

/// What the user asked for, unchecked.
#[derive(Debug, Clone)]
pub struct VmConfigInput {
    /// The kernel.
    pub kernel: KernelSource,
    /// An initramfs (Linux only).
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Disks, in order (`--disk PATH[,readonly]`).
    pub disks: Vec<String>,
    /// Serial output (`stdout`, `file:PATH`, `null`).
    pub serial: String,
    /// The control socket path.
    pub api_sock: Option<PathBuf>,
    /// The VM's name (runtime entry `NAME.json`).
    pub name: String,
    /// The runtime directory for the entry.
    pub runtime_dir: PathBuf,
}

/// A validated VM configuration: every field was checked against the host before any KVM call.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The kernel.
    pub kernel: KernelSource,
    /// Its format.
    pub kernel_format: KernelFormat,
    /// The initramfs.
    pub initrd: Option<PathBuf>,
    /// The command line (without the device descriptions Tern appends for Linux).
    pub cmdline: String,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Disks.
    pub disks: Vec<DiskConfig>,
    /// NICs (set after validation, e.g. from `parse_net`; they take the slots after the disks).
    pub nets: Vec<NetConfig>,
    /// When NICs announce themselves after a restore or migration.
    pub announce: crate::devices::announce::AnnounceSchedule,
    /// Serial output.
    pub serial: SerialOutput,
    /// The control socket path.
    pub api_sock: Option<PathBuf>,
    /// The VM's name.
    pub name: String,
    /// The runtime directory.
    pub runtime_dir: PathBuf,
    /// Transparent huge pages for guest RAM: [`DEFAULT_HUGE_PAGES`] where the host allows them,
    /// else off; [`VmConfig::with_huge_pages`] sets it.
    pub huge_pages: HugePages,
}

impl VmConfig {
    /// Guest memory in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }
}

/// Facts about the host that validation checks against (read by [`HostLimits::probe`]).
#[derive(Debug, Clone, Copy)]
pub struct HostLimits {
    /// The host's total memory in MiB.
    pub mem_total_mib: u64,
    /// The host's transparent huge page mode.
    pub thp: ThpMode,
}

impl HostLimits {
    /// Reads the host's limits from /proc.
    pub fn probe() -> Self {
        let mem_total_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| parse_meminfo_total_kib(&s))
            .map(|kib| kib / 1024)
            .unwrap_or(u64::MAX >> 20);
        let thp = std::fs::read_to_string(THP_ENABLED_PATH)
            .map(|s| ThpMode::parse(&s))
            .unwrap_or(ThpMode::Unsupported);
        HostLimits { mem_total_mib, thp }
    }
}

fn parse_meminfo_total_kib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Why a configuration was refused. Each message names the problem and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The kernel file could not be read.
    #[error(
        "cannot read kernel {path} (give an existing, readable kernel file or builtin:testguest)"
    )]
    KernelUnreadable {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is neither ELF nor bzImage.
    #[error(
        "{what} is not a kernel: neither an ELF image nor a bzImage (give a vmlinux, a PVH ELF or a bzImage)"
    )]
    NotAKernel {
        /// The kernel's name.
        what: String,
    },
    /// An embedded kernel name that does not exist.
    #[error("unknown built-in kernel {name:?} (the built-in images are: {known})")]
    UnknownBuiltin {
        /// The name asked for.
        name: String,
        /// The names that exist.
        known: String,
    },
    /// The initrd could not be read.
    #[error("cannot read initrd {path} (give an existing, readable initramfs file)")]
    InitrdUnreadable {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Zero or too little memory.
    #[error("--memory-mib {0} is too small (give at least {MIN_MEMORY_MIB})")]
    MemoryTooSmall(u64),
    /// More memory than the host has.
    #[error(
        "--memory-mib {asked} is more than this host's {host} MiB of memory (give a smaller size)"
    )]
    MemoryTooLarge {
        /// Asked for.
        asked: u64,
        /// The host's total.
        host: u64,
    },
    /// Zero vCPUs or too many.
    #[error("--vcpus {asked} is out of range (give 1 to {max})")]
    VcpusOutOfRange {
        /// Asked for.
        asked: u32,
        /// The limit.
        max: u32,
    },
    /// A bad command line.
    #[error("bad --cmdline: {0} (give printable ASCII, at most {MAX_CMDLINE_BYTES} bytes)")]
    BadCmdline(&'static str),
    /// A bad disk description.
    #[error("bad --disk {arg:?}: {reason} (write --disk PATH or --disk PATH,readonly)")]
    BadDiskArg {
        /// The argument.
        arg: String,
        /// What is wrong.
        reason: String,
    },
    /// A disk image that cannot be opened.
    #[error("cannot open disk image {path} (give an existing raw image file you may {mode})")]
    DiskUnreadable {
        /// The path.
        path: PathBuf,
        /// "read" or "read and write".
        mode: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Too many disks for the virtio-mmio slots Tern wires to interrupts.
    #[error("{0} disks asked for, Tern has {max} virtio-mmio slots with interrupts (give fewer --disk)", max = layout::VIRTIO_MMIO_IRQ_SLOTS)]
    TooManyDisks(usize),
    /// A bad NIC description.
    #[error(
        "bad --net {arg:?}: {reason} (write --net tap=NAME,mac=52:54:00:12:34:56[,ip=10.77.0.2][,bridge=br0])"
    )]
    BadNetArg {
        /// The argument.
        arg: String,
        /// What is wrong.
        reason: String,
    },
    /// Too many virtio devices for the slots with interrupts.
    #[error("{0} virtio devices (disks and NICs) asked for, Tern has {max} virtio-mmio slots with interrupts", max = layout::VIRTIO_MMIO_IRQ_SLOTS)]
    TooManyDevices(usize),
    /// A bad serial destination.
    #[error("bad --serial {0:?} (write stdout, null or file:PATH)")]
    BadSerial(String),
    /// A `--huge-pages` value that is neither on nor off.
    #[error("bad --huge-pages {0:?} (write on or off)")]
    BadHugePages(String),
    /// Huge pages asked for on a host whose THP mode gives none.
    #[error(
        "--huge-pages on, but this host's transparent huge pages are {0} ({THP_ENABLED_PATH}); set it to madvise or always, or give --huge-pages off"
    )]
    HugePagesUnavailable(ThpMode),
    /// An API socket that another process is serving.
    #[error(
        "API socket {0} is in use by a running process (stop that VM or give another --api-sock)"
    )]
    ApiSockInUse(PathBuf),
    /// An API socket path that exists and is not a socket.
    #[error(
        "API socket path {0} exists and is not a socket (remove it or give another --api-sock)"
    )]
    ApiSockNotSocket(PathBuf),
    /// An API socket in a directory that does not exist.
    #[error("API socket directory {0} does not exist (create it or give another --api-sock)")]
    ApiSockDirMissing(PathBuf),
    /// A bad VM name.
    #[error("bad --name {0:?} (use 1-64 characters from A-Z a-z 0-9 . _ -, not starting with '.')")]
    BadName(String),
    /// A VM of the same name is registered by a live process.
    #[error("a VM named {name:?} is already running as pid {pid} (stop it or give another --name)")]
    NameInUse {
        /// The name.
        name: String,
        /// The owner.
        pid: u32,
    },
}

impl VmConfigInput {
    /// Checks everything that can be checked without KVM and returns the typed configuration.
    pub fn validate(self, host: &HostLimits) -> Result<VmConfig, ConfigError> {
        validate_name(&self.name)?;
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall(self.memory_mib));
        }
        if self.memory_mib > host.mem_total_mib {
            return Err(ConfigError::MemoryTooLarge {
                asked: self.memory_mib,
                host: host.mem_total_mib,
            });
        }
        if self.vcpus == 0 || self.vcpus > u32::from(MAX_VCPUS) {
            return Err(ConfigError::VcpusOutOfRange {
                asked: self.vcpus,
                max: u32::from(MAX_VCPUS),
            });
        }
        validate_cmdline(&self.cmdline)?;
        let serial = parse_serial(&self.serial)?;
        let kernel_format = kernel_format(&self.kernel)?;
        if let Some(initrd) = &self.initrd {
            File::open(initrd)
                .and_then(|f| f.metadata())
                .map_err(|source| ConfigError::InitrdUnreadable {
                    path: initrd.clone(),
                    source,
                })?;
        }
        let mut disks = Vec::new();
        for arg in &self.disks {
            disks.push(parse_disk(arg)?);
        }
        if disks.len() > layout::VIRTIO_MMIO_IRQ_SLOTS {
            return Err(ConfigError::TooManyDisks(disks.len()));
        }
        for d in &disks {
            // `SCHEME://…` (e.g. `volume://NODE/FILE`): opened by its registered backend.
            if let Some((scheme, _)) =
                crate::devices::block_backend::split_scheme(&d.path.to_string_lossy())
            {
                if !crate::devices::block_backend::scheme_known(scheme) {
                    return Err(ConfigError::BadDiskArg {
                        arg: d.path.display().to_string(),
                        reason: format!("unknown disk scheme {scheme}://"),
                    });
                }
                continue;
            }
            let mut opts = std::fs::OpenOptions::new();
            opts.read(true).write(!d.readonly);
            opts.open(&d.path)
                .map_err(|source| ConfigError::DiskUnreadable {
                    path: d.path.clone(),
                    mode: if d.readonly { "read" } else { "read and write" },
                    source,
                })?;
        }
        // The name first: a VM's default socket is named after it.
        check_name_free(&self.runtime_dir, &self.name)?;
        if let Some(sock) = &self.api_sock {
            check_api_sock(sock)?;
        }
        Ok(VmConfig {
            kernel: self.kernel,
            kernel_format,
            initrd: self.initrd,
            cmdline: self.cmdline,
            memory_mib: self.memory_mib,
            vcpus: u8::try_from(self.vcpus).unwrap_or(MAX_VCPUS),
            disks,
            nets: Vec::new(),
            announce: crate::devices::announce::AnnounceSchedule::default(),
            serial,
            api_sock: self.api_sock,
            name: self.name,
            runtime_dir: self.runtime_dir,
            huge_pages: if host.thp.allows_huge_pages() {
                DEFAULT_HUGE_PAGES
            } else {
                HugePages::Off
            },
        })
    }
}

fn validate_name(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::BadName(name.to_string()))
    }
}

fn validate_cmdline(cmdline: &str) -> Result<(), ConfigError> {
    if cmdline.len() > MAX_CMDLINE_BYTES - 200 {
        return Err(ConfigError::BadCmdline("too long"));
    }
    if !cmdline.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(ConfigError::BadCmdline(
            "contains a control or non-ASCII character",
        ));
    }
    Ok(())
}

/// Parses `stdout`, `null` or `file:PATH`.
pub fn parse_serial(s: &str) -> Result<SerialOutput, ConfigError> {
    match s {
        "stdout" => Ok(SerialOutput::Stdout),
        "null" => Ok(SerialOutput::Null),
        _ => match s.strip_prefix("file:") {
            Some(p) if !p.is_empty() => Ok(SerialOutput::File(PathBuf::from(p))),
            _ => Err(ConfigError::BadSerial(s.to_string())),
        },
    }
}

/// Parses `PATH` or `PATH,readonly` (also `PATH,ro`); PATH may be a `SCHEME://…` spec
/// (`volume://NODE_ADDR/FILE`), opened by the backend registered for the scheme.
pub fn parse_disk(arg: &str) -> Result<DiskConfig, ConfigError> {
    let bad = |reason: &str| ConfigError::BadDiskArg {
        arg: arg.to_string(),
        reason: reason.to_string(),
    };
    let mut parts = arg.split(',');
    let path = parts.next().unwrap_or_default();
    if path.is_empty() {
        return Err(bad("no path"));
    }
    let mut readonly = false;
    for opt in parts {
        match opt {
            "readonly" | "ro" => readonly = true,
            other => return Err(bad(&format!("unknown option {other:?}"))),
        }
    }
    Ok(DiskConfig {
        path: PathBuf::from(path),
        readonly,
    })
}

/// Parses `tap=NAME,mac=MAC[,ip=ADDR]`.
pub fn parse_net(arg: &str) -> Result<NetConfig, ConfigError> {
    let bad = |reason: &str| ConfigError::BadNetArg {
        arg: arg.to_string(),
        reason: reason.to_string(),
    };
    let (mut tap, mut mac, mut ip, mut bridge) = (None, None, None, None);
    for opt in arg.split(',') {
        let (k, v) = opt
            .split_once('=')
            .ok_or_else(|| bad(&format!("{opt:?} is not KEY=VALUE")))?;
        match k {
            "tap" if crate::devices::tap::valid_ifname(v) => tap = Some(v.to_string()),
            "tap" => {
                return Err(bad(
                    "the tap name must be 1 to 15 bytes without '/' or spaces",
                ));
            }
            "mac" => {
                mac = Some(
                    parse_mac(v)
                        .ok_or_else(|| bad("the MAC must look like 52:54:00:12:34:56 (unicast)"))?,
                )
            }
            "bridge" if crate::devices::tap::valid_ifname(v) => bridge = Some(v.to_string()),
            "bridge" => {
                return Err(bad(
                    "the bridge name must be 1 to 15 bytes without '/' or spaces",
                ));
            }
            "ip" => {
                ip = Some(
                    v.parse()
                        .map_err(|_| bad("the ip must be an IPv4 address"))?,
                )
            }
            other => return Err(bad(&format!("unknown key {other:?}"))),
        }
    }
    Ok(NetConfig {
        tap: tap.ok_or_else(|| bad("tap=NAME is missing"))?,
        mac: mac.ok_or_else(|| bad("mac=MAC is missing"))?,
        ip,
        bridge,
    })
}

/// Parses a unicast MAC address `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut n = 0;
    for part in s.split(':') {
        if n == 6 || part.len() != 2 {
            return None;
        }
        mac[n] = u8::from_str_radix(part, 16).ok()?;
        n += 1;
    }
    (n == 6 && mac[0] & 1 == 0).then_some(mac)
}

impl VmConfig {
    /// Adds NICs (checked: they must fit the virtio-mmio slots with interrupts after the disks).
    pub fn with_nets(mut self, nets: Vec<NetConfig>) -> Result<Self, ConfigError> {
        let n = self.disks.len() + nets.len();
        if n > layout::VIRTIO_MMIO_IRQ_SLOTS {
            return Err(ConfigError::TooManyDevices(n));
        }
        self.nets = nets;
        Ok(self)
    }

    /// Sets guest RAM's huge pages (`--huge-pages`); `on` is refused on a host whose THP mode
    /// gives none (`never`, or no THP in its kernel).
    pub fn with_huge_pages(
        mut self,
        huge_pages: HugePages,
        host: &HostLimits,
    ) -> Result<Self, ConfigError> {
        if huge_pages == HugePages::On && !host.thp.allows_huge_pages() {
            return Err(ConfigError::HugePagesUnavailable(host.thp));
        }
        self.huge_pages = huge_pages;
        Ok(self)
    }
}

/// Finds the format of a kernel image from its first bytes.
pub fn detect_format(head: &[u8]) -> Option<KernelFormat> {
    if head.len() >= 4 && head[..4] == *b"\x7fELF" {
        return Some(KernelFormat::Elf);
    }
    if head.len() >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Some(KernelFormat::BzImage);
    }
    None
}

fn kernel_format(kernel: &KernelSource) -> Result<KernelFormat, ConfigError> {
    let head = match kernel {
        KernelSource::Embedded { bytes, .. } => bytes[..bytes.len().min(0x400)].to_vec(),
        KernelSource::File(path) => {
            let unreadable = |source| ConfigError::KernelUnreadable {
                path: path.clone(),
                source,
            };
            let f = File::open(path).map_err(unreadable)?;
            if f.metadata().map_err(unreadable)?.is_dir() {
                return Err(unreadable(std::io::Error::from_raw_os_error(libc::EISDIR)));
            }
            let mut head = Vec::with_capacity(0x400);
            f.take(0x400).read_to_end(&mut head).map_err(unreadable)?;
            head
        }
    };
    detect_format(&head).ok_or_else(|| ConfigError::NotAKernel {
        what: kernel.describe(),
    })
}

fn check_api_sock(sock: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::FileTypeExt;
    if let Some(dir) = sock
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.is_dir())
    {
        return Err(ConfigError::ApiSockDirMissing(dir.to_path_buf()));
    }
    match std::fs::symlink_metadata(sock) {
        Err(_) => Ok(()),
        Ok(md) if !md.file_type().is_socket() => Err(ConfigError::ApiSockNotSocket(sock.into())),
        Ok(_) => {
            if UnixStream::connect(sock).is_ok() {
                Err(ConfigError::ApiSockInUse(sock.into()))
            } else {
                // A stale socket of a VMM that died: it is replaced when the API starts.
                Ok(())
            }
        }
    }
}

fn check_name_free(runtime_dir: &Path, name: &str) -> Result<(), ConfigError> {
    match crate::runtime::read_entry(runtime_dir, name) {
        Ok(Some(entry)) if crate::runtime::is_live(&entry) => Err(ConfigError::NameInUse {
            name: name.to_string(),
            pid: entry.pid,
        }),
        // No entry, or a stale one of a VMM that died (or not an entry at all): it is overwritten.
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf_kernel() -> KernelSource {
        let mut bytes = vec![0u8; 64];
        bytes[..4].copy_from_slice(b"\x7fELF");
        KernelSource::Embedded {
            name: "test".into(),
            bytes: bytes.into(),
        }
    }

    fn input() -> VmConfigInput {
        VmConfigInput {
            kernel: elf_kernel(),
            initrd: None,
            cmdline: "tern.hb_ms=50".into(),
            memory_mib: 256,
            vcpus: 1,
            disks: vec![],
            serial: "stdout".into(),
            api_sock: None,
            name: "vm1".into(),
            runtime_dir: std::env::temp_dir().join("tern-config-test-none"),
        }
    }

    const HOST: HostLimits = HostLimits {
        mem_total_mib: 1024,
        thp: ThpMode::Madvise,
    };

    #[test]
    fn a_good_config_validates_with_typed_fields() {
        let cfg = input().validate(&HOST).unwrap();
        assert_eq!(cfg.kernel_format, KernelFormat::Elf);
        assert_eq!(cfg.vcpus, 1);
        assert_eq!(cfg.memory_bytes(), 256 << 20);
        assert_eq!(cfg.serial, SerialOutput::Stdout);
    }

    #[test]
    fn zero_memory_is_refused() {
        let mut i = input();
        i.memory_mib = 0;
        let e = i.validate(&HOST).unwrap_err();
        assert!(matches!(e, ConfigError::MemoryTooSmall(0)));
        assert!(e.to_string().contains("at least"));
    }

    #[test]
    fn memory_beyond_the_host_is_refused() {
        let mut i = input();
        i.memory_mib = 4096;
        let e = i.validate(&HOST).unwrap_err();
        assert!(matches!(
            e,
            ConfigError::MemoryTooLarge {
                asked: 4096,
                host: 1024
            }
        ));
    }

    #[test]
    fn vcpus_zero_and_too_many_are_refused() {
        for n in [0, 255, 10_000] {
            let mut i = input();
            i.vcpus = n;
            assert!(matches!(
                i.validate(&HOST).unwrap_err(),
                ConfigError::VcpusOutOfRange { .. }
            ));
        }
    }

    #[test]
    fn control_characters_in_the_cmdline_are_refused() {
        let mut i = input();
        i.cmdline = "a\nb".into();
        assert!(matches!(
            i.validate(&HOST).unwrap_err(),
            ConfigError::BadCmdline(_)
        ));
        let mut i = input();
        i.cmdline = "x".repeat(5000);
        assert!(matches!(
            i.validate(&HOST).unwrap_err(),
            ConfigError::BadCmdline(_)
        ));
    }

    #[test]
    fn a_missing_kernel_file_is_named_in_the_error() {
        let mut i = input();
        i.kernel = KernelSource::File("/nonexistent/vmlinux".into());
        let e = i.validate(&HOST).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/vmlinux"), "{e}");
    }

    #[test]
    fn a_file_that_is_not_a_kernel_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("notakernel");
        std::fs::write(&p, b"hello world, certainly not a kernel").unwrap();
        let mut i = input();
        i.kernel = KernelSource::File(p);
        assert!(matches!(
            i.validate(&HOST).unwrap_err(),
            ConfigError::NotAKernel { .. }
        ));
    }

    #[test]
    fn bzimage_is_recognised_by_its_header_magic() {
        let mut head = vec![0u8; 0x400];
        head[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_format(&head), Some(KernelFormat::BzImage));
        assert_eq!(detect_format(b"\x7fELF...."), Some(KernelFormat::Elf));
        assert_eq!(detect_format(&[0u8; 10]), None);
    }

    #[test]
    fn serial_and_disk_arguments_parse() {
        assert_eq!(parse_serial("null").unwrap(), SerialOutput::Null);
        assert_eq!(
            parse_serial("file:/tmp/x").unwrap(),
            SerialOutput::File("/tmp/x".into())
        );
        assert!(parse_serial("file:").is_err());
        assert!(parse_serial("tty").is_err());
        let d = parse_disk("/a.img,readonly").unwrap();
        assert!(d.readonly);
        assert_eq!(d.path, PathBuf::from("/a.img"));
        assert!(!parse_disk("/a.img").unwrap().readonly);
        assert!(parse_disk("/a.img,rw2").is_err());
        assert!(parse_disk(",ro").is_err());
    }

    #[test]
    fn net_arguments_parse() {
        let n = parse_net("tap=tt0,mac=52:54:00:aB:cd:ef,ip=10.77.0.2").unwrap();
        assert_eq!(n.tap, "tt0");
        assert_eq!(n.mac, [0x52, 0x54, 0, 0xab, 0xcd, 0xef]);
        assert_eq!(n.ip, Some(std::net::Ipv4Addr::new(10, 77, 0, 2)));
        assert_eq!(parse_net("mac=52:54:00:00:00:01,tap=x").unwrap().ip, None);
        assert_eq!(
            parse_net("mac=52:54:00:00:00:01,tap=x,bridge=br0")
                .unwrap()
                .bridge
                .as_deref(),
            Some("br0")
        );
        for bad in [
            "tap=x",
            "mac=52:54:00:00:00:01",
            "tap=x,mac=53:54:00:00:00:01",
            "tap=x,mac=52:54:00:00:00",
            "tap=x,mac=52:54:00:00:00:01:02",
            "tap=a/b,mac=52:54:00:00:00:01",
            "tap=x,mac=52:54:00:00:00:01,ip=1.2.3",
            "tap=x,mac=52:54:00:00:00:01,speed=9",
            "tap",
        ] {
            let e = parse_net(bad).unwrap_err().to_string();
            assert!(e.starts_with("bad --net"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_missing_disk_is_refused() {
        let mut i = input();
        i.disks = vec!["/nonexistent/disk.img".into()];
        assert!(matches!(
            i.validate(&HOST).unwrap_err(),
            ConfigError::DiskUnreadable { .. }
        ));
    }

    #[test]
    fn bad_names_are_refused() {
        for name in ["", ".hidden", "a/b", "x y"] {
            let mut i = input();
            i.name = name.into();
            assert!(matches!(
                i.validate(&HOST).unwrap_err(),
                ConfigError::BadName(_)
            ));
        }
    }

    #[test]
    fn an_api_socket_served_by_a_live_process_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("api.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&p).unwrap();
        let mut i = input();
        i.api_sock = Some(p.clone());
        assert!(matches!(
            i.validate(&HOST).unwrap_err(),
            ConfigError::ApiSockInUse(_)
        ));
        let mut i = input();
        i.api_sock = Some(dir.path().join("nodir/api.sock"));
        assert!(matches!(
            i.validate(&HOST).unwrap_err(),
            ConfigError::ApiSockDirMissing(_)
        ));
    }

    #[test]
    fn huge_pages_follow_the_default_where_the_host_allows_them_and_are_off_elsewhere() {
        assert_eq!(
            input().validate(&HOST).unwrap().huge_pages,
            DEFAULT_HUGE_PAGES
        );
        for thp in [ThpMode::Always, ThpMode::Madvise] {
            let host = HostLimits { thp, ..HOST };
            let cfg = input().validate(&host).unwrap();
            assert_eq!(cfg.huge_pages, DEFAULT_HUGE_PAGES, "{thp}");
            for hp in [HugePages::On, HugePages::Off] {
                let c = cfg.clone().with_huge_pages(hp, &host).unwrap();
                assert_eq!(c.huge_pages, hp, "{thp}");
            }
        }
        for thp in [ThpMode::Never, ThpMode::Unsupported] {
            let host = HostLimits { thp, ..HOST };
            let cfg = input().validate(&host).unwrap();
            assert_eq!(cfg.huge_pages, HugePages::Off, "{thp}");
            let off = cfg.clone().with_huge_pages(HugePages::Off, &host).unwrap();
            assert_eq!(off.huge_pages, HugePages::Off);
            let e = cfg.with_huge_pages(HugePages::On, &host).unwrap_err();
            assert!(
                matches!(e, ConfigError::HugePagesUnavailable(m) if m == thp),
                "{e}"
            );
            let msg = e.to_string();
            assert!(
                msg.contains(THP_ENABLED_PATH) && msg.contains("--huge-pages off"),
                "{msg}"
            );
        }
    }

    #[test]
    fn huge_pages_and_thp_modes_parse() {
        assert_eq!("on".parse::<HugePages>().unwrap(), HugePages::On);
        assert_eq!("off".parse::<HugePages>().unwrap(), HugePages::Off);
        for bad in ["", "On", "yes", "2M"] {
            let e = bad.parse::<HugePages>().unwrap_err();
            assert!(
                matches!(&e, ConfigError::BadHugePages(v) if v == bad),
                "{e}"
            );
            assert!(e.to_string().contains("on or off"), "{e}");
        }
        assert_eq!(ThpMode::parse("always [madvise] never\n"), ThpMode::Madvise);
        assert_eq!(ThpMode::parse("[always] madvise never"), ThpMode::Always);
        assert_eq!(ThpMode::parse("always madvise [never]"), ThpMode::Never);
        assert_eq!(ThpMode::parse(""), ThpMode::Unsupported);
        assert_eq!(ThpMode::parse("always madvise never"), ThpMode::Unsupported);
    }

    #[test]
    fn meminfo_total_parses() {
        assert_eq!(
            parse_meminfo_total_kib("MemTotal:       24000000 kB\nMemFree: 1 kB\n"),
            Some(24_000_000)
        );
    }
}
