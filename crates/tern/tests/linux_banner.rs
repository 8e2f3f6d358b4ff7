//! A stock Linux kernel boots far enough under `tern vm run` to print its banner on the serial
//! console. The ELF vmlinux is extracted here from Debian's compressed kernel
//! (`/boot/vmlinuz-*`, package linux-image-amd64): find the compressed payload by its magic,
//! decompress it with the system's tool, keep the result if it is an ELF.
//! Needs root, /dev/kvm, the kernel package and xz/gzip/zstd.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{RunningVm, require_kvm, scratch};

/// The kernel's own code runs in KVM's instruction emulator on this kind of host (one core each):
/// the two boots take turns so that each gets a core and its time budget means something.
static ONE_LINUX_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn take_turn() -> std::sync::MutexGuard<'static, ()> {
    ONE_LINUX_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

fn installed_kernel() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("vmlinuz-"))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!("no /boot/vmlinuz-* found: install Debian's linux-image-amd64 package for this test")
    })
}

/// Finds the compressed vmlinux inside a bzImage and decompresses it (the approach of the
/// kernel's scripts/extract-vmlinux, written anew).
fn extract_vmlinux(bzimage: &Path, out: &Path) -> bool {
    let data = std::fs::read(bzimage).expect("read the kernel");
    let formats: [(&[u8], &str, &[&str]); 3] = [
        (b"\xfd7zXZ\x00", "xz", &["-dc", "--single-stream"]),
        (b"\x28\xb5\x2f\xfd", "zstd", &["-dc"]),
        (b"\x1f\x8b\x08", "gzip", &["-dc"]),
    ];
    for (magic, tool, args) in formats {
        let mut from = 0;
        while let Some(pos) = data[from..]
            .windows(magic.len())
            .position(|w| w == magic)
            .map(|p| p + from)
        {
            from = pos + 1;
            let Ok(mut child) = Command::new(tool)
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
            else {
                break;
            };
            let mut stdin = child.stdin.take().unwrap();
            let payload = data[pos..].to_vec();
            let feeder = std::thread::spawn(move || {
                let _ = stdin.write_all(&payload);
            });
            let output = child.wait_with_output().expect("decompressor output");
            let _ = feeder.join();
            if output.stdout.starts_with(b"\x7fELF") {
                std::fs::write(out, &output.stdout).expect("write vmlinux");
                return true;
            }
        }
    }
    false
}

/// Turns every PT_NOTE program header into PT_NULL, so that the PVH entry is not found and the
/// kernel boots through the Linux 64-bit boot protocol (boot_params) instead.
fn hide_pvh_note(elf: &mut [u8]) {
    let phoff = u64::from_le_bytes(elf[32..40].try_into().unwrap()) as usize;
    let phnum = u16::from_le_bytes(elf[56..58].try_into().unwrap()) as usize;
    for i in 0..phnum {
        let off = phoff + i * 56;
        if u32::from_le_bytes(elf[off..off + 4].try_into().unwrap()) == 4 {
            elf[off..off + 4].copy_from_slice(&0u32.to_le_bytes());
        }
    }
}

fn vmlinux(dir: &Path) -> PathBuf {
    let bz = installed_kernel();
    let vmlinux = dir.join("vmlinux");
    assert!(
        extract_vmlinux(&bz, &vmlinux),
        "could not extract an ELF vmlinux from {} (need xz, zstd or gzip)",
        bz.display()
    );
    vmlinux
}

#[test]
fn elf_vmlinux_from_the_debian_kernel_prints_its_banner() {
    require_kvm();
    let _turn = take_turn();
    let dir = scratch();
    let k = vmlinux(dir.path()).display().to_string();
    let rt = dir.path().join("rt").display().to_string();
    let mut vm = RunningVm::start(
        dir.path(),
        &[
            "--kernel",
            &k,
            "--memory-mib",
            "256",
            "--cmdline",
            "console=ttyS0 earlyprintk=serial,ttyS0,115200",
            "--runtime-dir",
            &rt,
        ],
    );
    let line = vm.wait_line(Duration::from_secs(120), |l| l.contains("Linux version"));
    assert!(
        line.contains("Linux version 6") || line.contains("Linux version"),
        "{line}"
    );
    // The e820 map Tern gave is what Linux reports.
    let map = vm.wait_line(Duration::from_secs(60), |l| {
        l.contains("BIOS-e820: [mem 0x0000000000100000-")
    });
    assert!(map.contains("usable"), "{map}");
}

#[test]
fn the_linux_64_bit_boot_protocol_gets_the_kernel_to_its_banner() {
    require_kvm();
    let _turn = take_turn();
    let dir = scratch();
    let path = vmlinux(dir.path());
    let mut elf = std::fs::read(&path).unwrap();
    hide_pvh_note(&mut elf);
    std::fs::write(&path, elf).unwrap();
    let k = path.display().to_string();
    let rt = dir.path().join("rt").display().to_string();
    let sock = dir.path().join("api.sock").display().to_string();
    let mut vm = RunningVm::start(
        dir.path(),
        &[
            "--kernel",
            &k,
            "--memory-mib",
            "256",
            "--cmdline",
            "console=ttyS0 earlyprintk=serial,ttyS0,115200 tern.marker=zeropage",
            "--api-sock",
            &sock,
            "--runtime-dir",
            &rt,
        ],
    );
    common::wait_for_path(Path::new(&sock), Duration::from_secs(30));
    let (_, status, _) = common::tern_cmd(&["vm", "status", "--api-sock", &sock]);
    assert!(
        status.contains("\"linux64\""),
        "booted through boot_params: {status}"
    );
    vm.wait_line(Duration::from_secs(120), |l| l.contains("Linux version"));
    // The command line and the memory map came through the zero page.
    vm.wait_line(Duration::from_secs(30), |l| {
        l.contains("Command line:") && l.contains("tern.marker=zeropage")
    });
    vm.wait_line(Duration::from_secs(60), |l| {
        l.contains("BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable")
    });
}
