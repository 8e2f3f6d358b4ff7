//! A shared-volume cluster for the VM-disk tests: a real etcd on loopback and `tern volume serve`
//! node processes on one LUN file. Needs root, KVM, etcd and qemu-img; fails loudly without them.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tern_test_support::{Etcd, require_tools};
use tern_volume::control::{self, Request};

use super::{free_port, require_kvm, scratch, tern, tern_cmd};

/// Formats a 64 MiB LUN file at `lun` with `tern volume format`.
pub fn format_lun(lun: &std::path::Path) {
    let (code, _, err) = tern_cmd(&[
        "volume",
        "format",
        "--size",
        "64M",
        "--lun",
        lun.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
}

/// A volume control request to the node at `addr`.
pub fn call(addr: &str, req: Request) -> Result<Value, control::ControlError> {
    control::call(addr, &req, false, Duration::from_secs(30))
}

pub use tern_test_support::{ChildGuard as Proc, wait_for};

/// etcd on loopback, volume node processes on one LUN file, and one file `vm1.raw` (4 MiB).
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub etcd_url: String,
    pub lun: PathBuf,
    pub nodes: Vec<(String, Proc)>,
    _etcd: Etcd,
}

impl Cluster {
    pub fn start() -> Cluster {
        require_kvm();
        require_tools(&["etcd", "qemu-img"]);
        let dir = scratch();
        let etcd = Etcd::start();
        let etcd_url = etcd.url.clone();
        let lun = dir.path().join("lun");
        format_lun(&lun);
        Cluster {
            dir,
            etcd_url,
            lun,
            nodes: Vec::new(),
            _etcd: etcd,
        }
    }

    /// Starts node `id` and waits until it answers and knows the coordinator.
    pub fn spawn(&mut self, id: u32, extra: &[&str]) -> String {
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(self.dir.path().join(format!("node{id}.log"))).unwrap();
        let child = Command::new(tern())
            .args(["volume", "serve", "--node-id", &id.to_string()])
            .args(["--listen", &addr, "--etcd", &self.etcd_url])
            .args(["--lease-ttl-ms", "1500", "--lun"])
            .arg(&self.lun)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.nodes.push((addr.clone(), Proc(child)));
        wait_for(
            "the node and a coordinator",
            Duration::from_secs(30),
            || call(&addr, Request::Status).is_ok_and(|s| s["coordinator"]["node_id"].is_u64()),
        );
        addr
    }

    pub fn log(&self, id: u32) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("node{id}.log"))).unwrap_or_default()
    }
}

/// The test guest as `src` on the volume disk `disk` (`volume://NODE/FILE`), API socket `sock`,
/// runtime directory `rt`, once its disk check passed and it has beaten three times.
pub fn start_volume_guest(
    dir: &std::path::Path,
    disk: &str,
    sock: &std::path::Path,
    rt: &std::path::Path,
) -> super::RunningVm {
    let mut src = super::RunningVm::start_tern(
        dir,
        "src",
        &[
            "vm",
            "run",
            "--kernel",
            "builtin:testguest",
            "--memory-mib",
            "64",
            "--disk",
            disk,
            "--cmdline",
            "tern.hb_ms=50 tern.blk=verify",
            "--name",
            "src",
            "--api-sock",
            sock.to_str().unwrap(),
            "--runtime-dir",
            rt.to_str().unwrap(),
        ],
    );
    let line = src.wait_line(Duration::from_secs(60), |l| l.starts_with("BLK verify"));
    assert!(line.starts_with("BLK verify ok"), "{line}");
    src.wait_line(Duration::from_secs(30), |l| {
        l.starts_with("HB ") && super::field(l, "seq").is_some_and(|s| s >= 3)
    });
    src
}
