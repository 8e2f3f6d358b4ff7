//! What every benchmark does before it measures: find the workspace, build the release `tern`,
//! export the test guest, ask a peer for its version, make a scratch folder.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, ensure};

/// The workspace's root folder.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Builds `tern` in release mode and returns the binary's path.
pub fn build_release_tern() -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    println!("building tern (release)…");
    let st = Command::new(env!("CARGO"))
        .current_dir(&root)
        .args(["build", "--release", "--quiet", "-p", "tern"])
        .status()?;
    ensure!(st.success(), "cargo build --release -p tern failed");
    Ok(root.join("target/release/tern"))
}

/// A fresh scratch folder for benchmark `name`, unique to this process.
pub fn scratch_dir(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("tern-bench-{name}-{}", std::process::id()));
    // 0700: the VMMs' API sockets go here, and a VMM refuses a directory others may enter.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Writes the embedded test guest to `dir/testguest.elf` with `tern image export` (the very bytes
/// `builtin:testguest` boots) and returns its path.
pub fn export_testguest(tern: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let elf = dir.join("testguest.elf");
    let st = Command::new(tern)
        .args(["image", "export", "testguest", "--out"])
        .arg(&elf)
        .status()?;
    ensure!(st.success(), "tern image export failed");
    Ok(elf)
}

/// The first line of `program --version` (a peer's version, printed next to its figures).
pub fn peer_version(program: &str) -> anyhow::Result<String> {
    let out = Command::new(program)
        .arg("--version")
        .output()
        .with_context(|| format!("cannot run {program} (install qemu-system-x86)"))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("?")
        .to_string())
}

/// The host's load averages (1, 5, 15 min) from /proc/loadavg, printed next to figures taken on a
/// shared machine.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// qemu-nbd's cache arguments for the NBD benchmarks: `TERN_BENCH_QEMU_CACHE=none` gives
/// `--cache=none --aio=native` (`O_DIRECT`, as a Tern node reads its LUN and as a LUN shared by
/// hosts must be served), anything else `--cache=writeback` (this host's page cache).
pub fn qemu_nbd_cache_args() -> &'static [&'static str] {
    match std::env::var("TERN_BENCH_QEMU_CACHE").as_deref() {
        Ok("none") => &["--cache=none", "--aio=native"],
        _ => &["--cache=writeback"],
    }
}
