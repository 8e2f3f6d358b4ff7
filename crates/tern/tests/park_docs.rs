//! docs/parking.md's shell blocks run as written: every ```sh block, in order, in one scratch
//! directory laid out like the repository root (the sample trace copied in), with `tern` first on
//! PATH, inside a private mount namespace whose `/run` is a fresh tmpfs — so the documented default
//! runtime directory and control socket (`/run/tern/…`) are scratch ones. Needs root (the daemon
//! sets thread affinity; the namespace needs it too); fails loudly otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;

const TERN: &str = env!("CARGO_BIN_EXE_tern");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The ```sh blocks of a Markdown text, in order.
fn sh_blocks(md: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut cur: Option<String> = None;
    for line in md.lines() {
        match &mut cur {
            None if line.trim_start() == "```sh" => cur = Some(String::new()),
            Some(b) if line.trim_start() == "```" => {
                blocks.push(std::mem::take(b));
                cur = None;
            }
            Some(b) => {
                b.push_str(line);
                b.push('\n');
            }
            None => {}
        }
    }
    assert!(cur.is_none(), "an unterminated ```sh block");
    blocks
}

#[test]
fn the_shell_blocks_are_extracted_in_order() {
    let md = "text\n```sh\na 1\nb\n```\n```\nnot sh\n```\n```sh\nc\n```\n";
    assert_eq!(
        sh_blocks(md),
        vec!["a 1\nb\n".to_string(), "c\n".to_string()]
    );
}

#[test]
fn parking_quick_start_runs_as_written() {
    tern_test_support::require_root_for("park_docs runs `tern park run` as the docs do");
    let md = std::fs::read_to_string(repo().join("docs/parking.md")).unwrap();
    let blocks = sh_blocks(&md);
    assert!(blocks.len() >= 2, "docs/parking.md lost its quick start");

    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("data/parking")).unwrap();
    std::fs::copy(
        repo().join("data/parking/sample-trace.txt"),
        dir.path().join("data/parking/sample-trace.txt"),
    )
    .unwrap();
    let bin = Path::new(TERN).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut all = String::new();
    for (i, block) in blocks.iter().enumerate() {
        let script = dir.path().join(format!("block{i}.sh"));
        std::fs::write(&script, block).unwrap();
        let out = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg("mount -t tmpfs tern-docs-run /run && exec bash -euo pipefail \"$0\"")
            .arg(&script)
            .current_dir(dir.path())
            .env("PATH", &path)
            .output()
            .expect("unshare (util-linux) runs the block");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "block {i} failed ({}):\n{block}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
            out.status
        );
        all.push_str(&stdout);
    }

    // What the quick start promises, from its own output. The daemon writes its last lines as it
    // stops, which may be a moment after the block's last command returned.
    let log_path = dir.path().join("park.log");
    let log_wants = [
        "power model specpower:",
        "by core count",
        "unparked cpu0 (",
        "affinities restored",
    ];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let log = loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log_wants.iter().all(|w| log.contains(w)) || std::time::Instant::now() >= deadline {
            break log;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    for want in [
        "\"headroom\": 50",    // status --json: the knob's own name
        "headroom = 30",       // set answers with the knobs in force
        "by core count",       // status names the power model it picked, and why
        "a parked core saves", // … and the per-core figures
        "unparked",            // the status table
        "policy: energy",      // replay of the sample trace
        "naive <50% rule",
    ] {
        assert!(all.contains(want), "output lacks `{want}`:\n{all}");
    }
    assert!(!all.contains("headroom_pct"), "{all}");
    for want in log_wants {
        assert!(log.contains(want), "park.log lacks `{want}`:\n{log}");
    }
    assert!(
        !log.contains("unparked 0 ("),
        "a CPU named like a count:\n{log}"
    );
    // The scratch /run kept the real one untouched.
    assert!(
        !Path::new("/run/tern/vms/demo.json").exists(),
        "the stand-in registered outside the scratch /run"
    );
}
