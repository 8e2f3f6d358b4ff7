//! The VMM's local trust boundary with real processes: the API socket is 0600 in a 0700
//! directory, another uid (`setpriv` to `nobody`) cannot use it while the owner can, and a peer
//! whose uid is not allowed is refused by its credentials (`SO_PEERCRED`) with a clear answer and
//! a log line; `snapshot` writes only into the snapshot directory, never over a file or through a
//! symlink; a restored snapshot opens no disk the command line did not name or allow; a snapshot
//! page address that would overflow is refused, not a panic. Needs root, /dev/kvm and
//! util-linux `setpriv`.

mod common;

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{RunningVm, field, require_kvm, scratch, tern, tern_cmd};

const NOBODY: u32 = 65534;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// `tern ARGS…` as uid/gid `nobody` (no groups): (exit code, stdout, stderr).
fn tern_as_nobody(args: &[&str]) -> (i32, String, String) {
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", tern()])
        .args(args)
        .output()
        .expect("run setpriv (util-linux)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn another_uid_cannot_use_the_api_socket_and_the_owner_can() {
    require_kvm();
    let dir = scratch();
    let (mut vm, sock) = RunningVm::start_testguest(dir.path(), "owned", 64, "tern.hb_ms=50");
    vm.wait_line(Duration::from_secs(30), |l| l.starts_with("HB "));
    assert_eq!(mode(&sock), 0o600, "the socket is the owner's only");
    assert_eq!(mode(dir.path()), 0o700);
    let s = sock.to_str().unwrap();

    let (rc, out, err) = tern_as_nobody(&["vm", "status", "--api-sock", s]);
    assert_ne!(rc, 0, "nobody must not get a status: {out}");
    assert!(
        err.contains("permission denied on") && err.contains("the VMM owner's only"),
        "{err}"
    );
    let (rc, _, err) = tern_as_nobody(&["vm", "stop", "--api-sock", s]);
    assert_ne!(rc, 0, "{err}");

    let (rc, out, err) = tern_cmd(&["vm", "status", "--api-sock", s]);
    assert_eq!(rc, 0, "the owner is served: {err}");
    assert!(out.contains("\"running\""), "{out}");

    // Connections are capped: idle ones up to the cap, then an answer that says so; once they
    // close the VM serves again.
    let idle: Vec<UnixStream> = (0..tern_vmm::api::MAX_API_CONNECTIONS)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = UnixStream::connect(&sock).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut answer = String::new();
    extra.read_to_string(&mut answer).unwrap();
    assert!(answer.contains("API connections at most"), "{answer}");
    drop(idle);
    common::wait_for("the VM to serve again", Duration::from_secs(5), || {
        tern_cmd(&["vm", "status", "--api-sock", s]).0 == 0
    });

    // The default socket's directory, RUNTIME_DIR/api, is created 0700.
    let rt = dir.path().join("rt2");
    let mut named = RunningVm::start_tern(
        dir.path(),
        "named",
        &[
            "vm",
            "run",
            "--kernel",
            "builtin:testguest",
            "--memory-mib",
            "32",
            "--name",
            "named",
            "--runtime-dir",
            rt.to_str().unwrap(),
        ],
    );
    named.wait_line(Duration::from_secs(30), |l| l.starts_with("TERN-GUEST up"));
    assert_eq!(mode(&rt.join("api")), 0o700);
    assert_eq!(mode(&rt.join("api/named.sock")), 0o600);
    let rts = rt.to_str().unwrap();
    assert_eq!(
        tern_cmd(&["vm", "stop", "--name", "named", "--runtime-dir", rts]).0,
        0
    );
    assert_eq!(named.wait_exit(Duration::from_secs(10)), 0);

    // A socket directory others may enter is refused before the VM starts.
    let loose = dir.path().join("loose");
    std::fs::create_dir(&loose).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (rc, _, err) = tern_cmd(&[
        "vm",
        "run",
        "--kernel",
        "builtin:testguest",
        "--api-sock",
        loose.join("a.sock").to_str().unwrap(),
        "--runtime-dir",
        rts,
    ]);
    assert_ne!(rc, 0);
    assert!(
        err.contains("has mode 0755") && err.contains("must be 0700"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");

    assert_eq!(tern_cmd(&["vm", "stop", "--api-sock", s]).0, 0);
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), 0);
}

/// A VMM run as `nobody` (with the kvm group for /dev/kvm) that allows only its own uid: root,
/// who can reach every file, is refused by its peer credentials; `nobody` is served.
#[test]
fn a_peer_whose_uid_is_not_allowed_is_refused_by_its_credentials() {
    require_kvm();
    let kvm_gid = std::fs::metadata("/dev/kvm").unwrap().gid();
    // A directory of nobody's own, outside root's 0700 scratch directories.
    let dir = std::env::temp_dir().join(format!("tern-peer-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    let _cleanup = Cleanup(dir.clone());
    std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let sock = dir.join("api.sock");
    let s = sock.to_str().unwrap();
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        &format!("--groups={kvm_gid}"),
        tern(),
        "vm",
        "run",
        "--kernel",
        "builtin:testguest",
        "--memory-mib",
        "32",
        "--cmdline",
        "tern.hb_ms=100",
        "--api-sock",
        s,
        "--runtime-dir",
        dir.join("rt").to_str().unwrap(),
        "--api-allow-uid",
        &NOBODY.to_string(),
    ]);
    let scratch = scratch();
    let mut vm = RunningVm::start_command(scratch.path(), "nobody", cmd);
    vm.wait_line(Duration::from_secs(30), |l| l.starts_with("HB "));
    assert_eq!(std::fs::metadata(&sock).unwrap().uid(), NOBODY);

    let (rc, _, err) = tern_cmd(&["vm", "status", "--api-sock", s]);
    assert_ne!(rc, 0, "root is not on the VMM's list");
    assert!(
        err.contains("refused: uid 0 (pid ")
            && err.contains("may not use this socket; allowed uids: 65534")
            && err.contains("--api-allow-uid"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    common::wait_for("the VMM's log line", Duration::from_secs(5), || {
        vm.stderr().contains("API connection refused: uid 0")
    });

    let (rc, out, err) = tern_as_nobody(&["vm", "status", "--api-sock", s]);
    assert_eq!(rc, 0, "the owner is served: {err}");
    assert!(out.contains("\"running\""), "{out}");
    let (rc, _, err) = tern_as_nobody(&["vm", "stop", "--api-sock", s]);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), 0);
}

struct Cleanup(std::path::PathBuf);
impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn snapshots_stay_in_their_directory_and_a_restore_opens_only_named_disks() {
    require_kvm();
    let dir = scratch();
    let snaps = dir.path().join("snaps");
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let sock = dir.path().join("api.sock");
    let s = sock.to_str().unwrap();
    let rt = dir.path().join("rt");
    let mut vm = RunningVm::start_tern(
        dir.path(),
        "a",
        &[
            "vm",
            "run",
            "--kernel",
            "builtin:testguest",
            "--memory-mib",
            "64",
            "--cmdline",
            "tern.hb_ms=50",
            "--disk",
            disk.to_str().unwrap(),
            "--api-sock",
            s,
            "--runtime-dir",
            rt.to_str().unwrap(),
            "--snapshot-dir",
            snaps.to_str().unwrap(),
        ],
    );
    vm.wait_line(Duration::from_secs(30), |l| {
        l.starts_with("HB ") && field(l, "seq").is_some_and(|s| s >= 3)
    });
    let snap = |out: &str, stop: bool| {
        let mut a = vec!["vm", "snapshot", "--api-sock", s, "--out", out];
        if stop {
            a.push("--stop");
        }
        tern_cmd(&a)
    };

    // Outside the directory, with `..`, or into a subdirectory: refused, the VM runs on.
    let elsewhere = dir.path().join("x.snap");
    for (out, want) in [
        (
            elsewhere.to_str().unwrap().to_string(),
            "outside this VM's snapshot directory",
        ),
        (format!("{}/../x.snap", snaps.display()), "without `..`"),
        ("../x.snap".to_string(), "without `..`"),
        (
            "sub/x.snap".to_string(),
            "outside this VM's snapshot directory",
        ),
    ] {
        let (rc, _, err) = snap(&out, false);
        assert_ne!(rc, 0, "{out}");
        assert!(err.contains(want), "{out}: {err}");
    }
    assert!(!elsewhere.exists() && !dir.path().join("x.snap").exists());

    // A bare name goes into the directory, created 0700, the file 0600.
    let (rc, _, err) = snap("one.snap", false);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(mode(&snaps), 0o700);
    assert_eq!(mode(&snaps.join("one.snap")), 0o600);
    // Never over an existing file, never through a symlink.
    let before = std::fs::metadata(snaps.join("one.snap")).unwrap().len();
    let (rc, _, err) = snap(snaps.join("one.snap").to_str().unwrap(), false);
    assert_ne!(rc, 0);
    assert!(err.contains("exists already"), "{err}");
    assert_eq!(
        std::fs::metadata(snaps.join("one.snap")).unwrap().len(),
        before
    );
    let target = dir.path().join("target");
    std::os::unix::fs::symlink(&target, snaps.join("link.snap")).unwrap();
    let (rc, _, err) = snap("link.snap", false);
    assert_ne!(rc, 0);
    assert!(err.contains("exists already"), "{err}");
    assert!(!target.exists(), "nothing is written through the symlink");
    let (_, out, _) = tern_cmd(&["vm", "status", "--api-sock", s]);
    assert!(
        out.contains("\"running\""),
        "refusals cost the VM nothing: {out}"
    );

    let (rc, _, err) = snap("last.snap", true);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), 0);
    vm.collect_for(Duration::from_millis(200));
    let last = vm.last_hb().unwrap();
    let file = snaps.join("last.snap");

    // The snapshot names the disk; a restore does not open it unless told to.
    let restore = |extra: &[&str], tag: &str| {
        let sock_b = dir.path().join(format!("{tag}.sock"));
        let mut args = vec![
            "vm",
            "run",
            "--restore",
            file.to_str().unwrap(),
            "--api-sock",
            sock_b.to_str().unwrap(),
            "--runtime-dir",
            rt.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let args = restore(&[], "b");
    let (rc, _, err) = tern_cmd(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_ne!(rc, 0);
    assert!(
        err.contains("the snapshot names disk")
            && err.contains("disk.img")
            && err.contains("--disk"),
        "{err}"
    );
    let other = dir.path().join("elsewhere");
    let args = restore(&["--restore-allow-disk", other.to_str().unwrap()], "b");
    let (rc, _, err) = tern_cmd(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_ne!(rc, 0, "{err}");

    let args = restore(&["--disk", disk.to_str().unwrap()], "c");
    let mut b = RunningVm::start_tern(
        dir.path(),
        "c",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let first = b.wait_line(Duration::from_secs(20), |l| l.starts_with("HB "));
    assert_eq!(field(&first, "seq"), Some(last + 1), "{first}");
    let sock_c = dir.path().join("c.sock");
    assert_eq!(
        tern_cmd(&["vm", "stop", "--api-sock", sock_c.to_str().unwrap()]).0,
        0
    );
    assert_eq!(b.wait_exit(Duration::from_secs(10)), 0);

    // A page address whose end overflows u64 is refused by name, not a panic.
    let mut bytes = std::fs::read(&file).unwrap();
    let meta_len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let state_at = 16 + meta_len;
    let state_len =
        u64::from_le_bytes(bytes[state_at + 12..state_at + 20].try_into().unwrap()) as usize;
    let page_at = state_at + tern_vmm::state::STATE_HEADER_BYTES + state_len;
    bytes[page_at..page_at + 8].copy_from_slice(&(u64::MAX - 4095).to_le_bytes());
    let bad = snaps.join("bad.snap");
    std::fs::write(&bad, &bytes).unwrap();
    let (rc, _, err) = tern_cmd(&[
        "vm",
        "run",
        "--restore",
        bad.to_str().unwrap(),
        "--disk",
        disk.to_str().unwrap(),
        "--api-sock",
        dir.path().join("d.sock").to_str().unwrap(),
        "--runtime-dir",
        rt.to_str().unwrap(),
    ]);
    assert_ne!(rc, 0);
    assert!(
        err.contains("page 0xfffffffffffff000 outside guest memory"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}
