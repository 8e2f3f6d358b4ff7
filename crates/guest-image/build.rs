//! Builds the test guest (crates/guest) with a nested cargo invocation, its own target directory and
//! freestanding flags, checks its CPL0 code with objdump (no SSE/AVX, no branch out of the kernel
//! code), and leaves the ELF at `$OUT_DIR/tern-testguest.elf` for `include_bytes!`.

use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "src/cpl0check.rs"]
#[allow(dead_code)]
mod cpl0check;

const TARGET: &str = "x86_64-unknown-linux-gnu";

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let guest = manifest_dir
        .join("../guest")
        .canonicalize()
        .expect("crates/guest exists next to crates/guest-image");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    for f in ["Cargo.toml", "Cargo.lock", "link.ld", "src"] {
        println!("cargo:rerun-if-changed={}", guest.join(f).display());
    }
    println!("cargo:rerun-if-changed=src/cpl0check.rs");

    let elf = build_guest(&guest, &out);
    check_cpl0(&elf);
    let dest = out.join("tern-testguest.elf");
    std::fs::copy(&elf, &dest)
        .unwrap_or_else(|e| fail(&format!("copying {} failed: {e}", elf.display())));
}

fn fail(msg: &str) -> ! {
    // A build script reports through a panic; keep it one clear line.
    panic!("tern-guest-image: {msg}");
}

fn build_guest(guest: &Path, out: &Path) -> PathBuf {
    let target_dir = out.join("guest-target");
    let link_script = guest.join("link.ld");
    let flags = [
        format!("-Clink-arg=-T{}", link_script.display()),
        "-Clink-arg=-nostartfiles".into(),
        "-Clink-arg=-nostdlib".into(),
        "-Clink-arg=-static".into(),
        "-Clink-arg=-no-pie".into(),
        "-Clink-arg=-Wl,--build-id=none".into(),
        "-Crelocation-model=static".into(),
        "-Cno-redzone=yes".into(),
        "-Cpanic=abort".into(),
    ];
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // The guest has its own lock file (smoltcp and its dependencies): make sure those sources are in
    // the local registry (a no-op once they are; needs crates.io on a fresh machine). A failure here
    // shows up as a clear error from the offline build below.
    let _ = Command::new(&cargo)
        .current_dir(guest)
        .args(["fetch", "--locked", "--manifest-path"])
        .arg(guest.join("Cargo.toml"))
        .env_remove("CARGO_TARGET_DIR")
        .status();
    let mut cmd = Command::new(cargo);
    cmd.current_dir(guest)
        .args([
            "build",
            "--release",
            "--offline",
            "--locked",
            "--target",
            TARGET,
            "--manifest-path",
        ])
        .arg(guest.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    for var in [
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_PROFILE_RELEASE_DEBUG",
        "CARGO_PROFILE_RELEASE_LTO",
        "CARGO_PROFILE_RELEASE_PANIC",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_LLVM_COV",
        "CARGO_ENCODED_RUSTFLAGS",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"));
    let status = cmd
        .status()
        .unwrap_or_else(|e| fail(&format!("cannot run cargo for the guest: {e}")));
    if !status.success() {
        fail("building the test guest (crates/guest) failed; see the errors above");
    }
    target_dir.join(TARGET).join("release").join("tern-guest")
}

fn objdump(args: &[&str], elf: &Path) -> String {
    let out = Command::new("objdump")
        .args(args)
        .arg(elf)
        .output()
        .unwrap_or_else(|e| {
            fail(&format!(
                "cannot run objdump (install binutils) to check the guest: {e}"
            ))
        });
    if !out.status.success() {
        fail(&format!(
            "objdump {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Disassembles the CPL0 code region by region, each in its own processor mode, and refuses the build
/// if anything there would not run in KVM-PVM's instruction emulator.
fn check_cpl0(elf: &Path) {
    let symtab = objdump(&["-t"], elf);
    let sym = |name: &str| {
        cpl0check::symbol(&symtab, name)
            .unwrap_or_else(|| fail(&format!("symbol {name} missing in the guest")))
    };
    let (entry32, long64, text_end) = (sym("pvh_entry32"), sym("long64"), sym("cpl0_text_end"));
    let (tramp, tramp_code_end, tramp_end) = (
        sym("ap_tramp_start"),
        sym("ap_tramp_code_end"),
        sym("ap_tramp_end"),
    );
    // The checked regions must cover the CPL0 sections exactly: nothing may hide after the markers.
    let headers = objdump(&["-h"], elf);
    for (name, start, end) in [(".ktext", entry32, text_end), (".ktramp", tramp, tramp_end)] {
        let (addr, size) = cpl0check::section(&headers, name)
            .unwrap_or_else(|| fail(&format!("section {name} missing in the guest")));
        if (addr, addr + size) != (start, end) {
            fail(&format!(
                "section {name} spans {addr:#x}..{:#x} but the checked code spans {start:#x}..{end:#x}; \
                 keep the boot.s markers at its start and end",
                addr + size
            ));
        }
    }
    let allowed = [(entry32, text_end), (tramp, tramp_end)];
    let regions = [
        ("16-bit AP trampoline", "i8086", tramp, tramp_code_end),
        ("32-bit PVH entry", "i386", entry32, long64),
        ("64-bit kernel", "x86-64", long64, text_end),
    ];
    let mut total = 0;
    for (name, mode, start, end) in regions {
        let listing = objdump(
            &[
                "-d",
                "--no-show-raw-insn",
                "-M",
                mode,
                &format!("--start-address={start:#x}"),
                &format!("--stop-address={end:#x}"),
            ],
            elf,
        );
        let (violations, count) = cpl0check::check(&listing, &allowed);
        if count == 0 {
            fail(&format!(
                "no instructions found in the guest's {name} ({start:#x}..{end:#x})"
            ));
        }
        total += count;
        if let Some(v) = violations.first() {
            fail(&format!(
                "the guest's CPL0 code ({name}) has {} refused instruction(s); first at {:#x}: `{}`: {}",
                violations.len(),
                v.addr,
                v.text,
                v.why
            ));
        }
    }
    println!("cargo:rustc-env=TERN_GUEST_CPL0_INSNS={total}");
}
