//! Booting the embedded guest under QEMU (`-M microvm`), the peer VMM: the command line, the meaning
//! of QEMU's exit status with `isa-debug-exit`, and reading the host TSC frequency QEMU must be told.
//! Pure: these functions build and parse text; the caller runs the process and reads the files.
//!
//! QEMU boots microvm with qboot ([`QEMU_FIRMWARE`]), its fast firmware, not the SeaBIOS it picks by
//! default: SeaBIOS runs seconds of emulated CPL0 code on KVM-PVM hosts, and an operator who cares
//! about start-up time picks qboot too.

/// The firmware QEMU is given (`-bios`); QEMU finds it by name in its data folder
/// (`/usr/share/qemu`, Debian's `qemu-system-data`).
pub const QEMU_FIRMWARE: &str = "qboot.rom";

use std::ffi::OsString;
use std::path::PathBuf;

/// What to boot under QEMU.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// The guest ELF (e.g. written by `tern image export testguest`).
    pub kernel: PathBuf,
    /// The kernel command line (`tern.*` keys).
    pub cmdline: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    /// The host TSC frequency in Hz; QEMU then reports it in CPUID 0x40000010.
    pub tsc_hz: u64,
    /// A raw disk image for a virtio-blk device.
    pub disk: Option<PathBuf>,
    /// Use the modern (version 2) virtio-mmio transport instead of QEMU's legacy default.
    pub virtio_modern: bool,
    /// A virtio-net device over a tap.
    pub net: Option<QemuNet>,
}

/// A virtio-net device over a tap (QEMU creates the tap if missing, in its network namespace).
#[derive(Debug, Clone)]
pub struct QemuNet {
    /// The tap interface name.
    pub tap: String,
    /// The MAC address, `52:54:00:…`.
    pub mac: String,
}

impl QemuConfig {
    /// The arguments after `qemu-system-x86_64`: KVM, microvm with qboot, the guest on COM1 (stdio),
    /// the exit port at 0x501, no reboot (a reset ends QEMU).
    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: &str| a.push(s.into());
        push("-accel");
        push("kvm");
        push("-M");
        push("microvm");
        push("-bios");
        push(QEMU_FIRMWARE);
        push("-cpu");
        push(&format!(
            "qemu64,tsc-frequency={},+tsc-deadline",
            self.tsc_hz
        ));
        push("-m");
        push(&self.memory_mib.to_string());
        push("-smp");
        push(&self.vcpus.to_string());
        push("-nodefaults");
        push("-no-user-config");
        push("-serial");
        push("stdio");
        push("-display");
        push("none");
        push("-no-reboot");
        push("-device");
        push("isa-debug-exit,iobase=0x501,iosize=1");
        push("-append");
        push(&self.cmdline);
        if self.virtio_modern {
            push("-global");
            push("virtio-mmio.force-legacy=false");
        }
        a.push("-kernel".into());
        a.push(self.kernel.clone().into_os_string());
        if let Some(disk) = &self.disk {
            let mut d = OsString::from("file=");
            d.push(disk);
            d.push(",format=raw,if=none,id=disk0,cache=none,aio=threads");
            a.push("-drive".into());
            a.push(d);
            a.push("-device".into());
            a.push("virtio-blk-device,drive=disk0".into());
        }
        if let Some(net) = &self.net {
            a.push("-netdev".into());
            a.push(format!("tap,id=n0,ifname={},script=no,downscript=no", net.tap).into());
            a.push("-device".into());
            a.push(format!("virtio-net-device,netdev=n0,mac={}", net.mac).into());
        }
        a
    }
}

/// The value the guest wrote to port 0x501, from QEMU's exit status (`isa-debug-exit` exits with
/// `(value << 1) | 1`); `None` for an even status (QEMU ended for another reason).
pub fn debug_exit_value(status: i32) -> Option<u8> {
    (status & 1 == 1).then_some((status >> 1) as u8)
}

/// The TSC frequency in Hz from the kernel log: the refined calibration if present, else the
/// detected frequency (`tsc: Detected 2596.132 MHz processor`).
pub fn tsc_hz_from_kernel_log(log: &str) -> Option<u64> {
    let find = |needle: &str| {
        log.lines().rev().find_map(|l| {
            let rest = &l[l.find(needle)? + needle.len()..];
            mhz_to_hz(rest.split_whitespace().next()?)
        })
    };
    find("tsc: Refined TSC clocksource calibration: ").or_else(|| find("tsc: Detected "))
}

/// The TSC frequency in Hz from /proc/cpuinfo's first `cpu MHz` (less exact than the kernel log).
pub fn tsc_hz_from_cpuinfo(cpuinfo: &str) -> Option<u64> {
    cpuinfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "cpu MHz")
            .then(|| mhz_to_hz(v.trim()))
            .flatten()
    })
}

/// "2596.132" → 2_596_132_000, exactly (no floating point).
fn mhz_to_hz(s: &str) -> Option<u64> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let int: u64 = int.parse().ok()?;
    let mut frac_hz = 0u64;
    let mut scale = 100_000u64;
    for c in frac.chars().take(6) {
        frac_hz += c.to_digit(10)? as u64 * scale;
        scale /= 10;
    }
    Some(int * 1_000_000 + frac_hz)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_boot_microvm_with_tsc_frequency_and_exit_port() {
        let c = QemuConfig {
            kernel: "/tmp/g.elf".into(),
            cmdline: "tern.hb_ms=50".into(),
            memory_mib: 256,
            vcpus: 2,
            tsc_hz: 2_596_120_000,
            disk: Some("/tmp/d.img".into()),
            virtio_modern: true,
            net: Some(QemuNet {
                tap: "qt0".into(),
                mac: "52:54:00:00:00:09".into(),
            }),
        };
        let a: Vec<String> = c
            .args()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        let joined = a.join(" ");
        assert!(
            joined.contains(
                "-accel kvm -M microvm -bios qboot.rom -cpu qemu64,tsc-frequency=2596120000,+tsc-deadline"
            )
        );
        assert!(joined.contains("-m 256 -smp 2"));
        assert!(joined.contains("-device isa-debug-exit,iobase=0x501,iosize=1"));
        assert!(joined.contains("-append tern.hb_ms=50"));
        assert!(joined.contains("-kernel /tmp/g.elf"));
        assert!(joined.contains("-global virtio-mmio.force-legacy=false"));
        assert!(joined.contains("-drive file=/tmp/d.img,format=raw"));
        assert!(joined.contains("-device virtio-blk-device,drive=disk0"));
        assert!(joined.contains("-netdev tap,id=n0,ifname=qt0,script=no,downscript=no"));
        assert!(joined.contains("-device virtio-net-device,netdev=n0,mac=52:54:00:00:00:09"));
    }

    #[test]
    fn debug_exit_status_decodes() {
        assert_eq!(debug_exit_value(1), Some(0));
        assert_eq!(debug_exit_value(3), Some(1));
        assert_eq!(debug_exit_value(0), None);
    }

    #[test]
    fn tsc_from_kernel_log_prefers_refined_calibration() {
        let log = "[    0.000062] tsc: Detected 2596.132 MHz processor\n[    1.2] tsc: Refined TSC clocksource calibration: 2596.119 MHz\n";
        assert_eq!(tsc_hz_from_kernel_log(log), Some(2_596_119_000));
        assert_eq!(
            tsc_hz_from_kernel_log("[0.1] tsc: Detected 2596.132 MHz processor"),
            Some(2_596_132_000)
        );
        assert_eq!(tsc_hz_from_kernel_log("nothing here"), None);
    }

    #[test]
    fn tsc_from_cpuinfo() {
        assert_eq!(
            tsc_hz_from_cpuinfo("processor\t: 0\ncpu MHz\t\t: 2596.1\n"),
            Some(2_596_100_000)
        );
        assert_eq!(tsc_hz_from_cpuinfo("processor: 0\n"), None);
    }
}
