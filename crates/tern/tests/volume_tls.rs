//! Volume nodes with mutual TLS (`tern volume serve --tls-dir`): real etcd, two node processes
//! on one LUN file, certificates from tern-pki, `qemu-img`/`qemu-io`/`nbdinfo` as the standard
//! clients. Each refusal (plain TCP, a user writing, a node claiming another's id, node-to-node
//! messages from a non-node certificate) is followed by the legitimate client being served.
//! And a KVM test guest on a `volume://` disk of TLS-only nodes (`tern vm run|receive
//! --tls-dir`): a VMM without a certificate or with another CA's is refused, the host's
//! certificate reads and writes, the VM migrates with its lease over TLS, and a jailed VMM
//! writes the LUN directly. Needs `etcd`, `qemu-img`, `qemu-io`, `nbdinfo` on PATH (and root
//! and /dev/kvm for the VM test); fails loudly without them.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tern_nbd::proto::{REP_ERR_POLICY, REP_ERR_TLS_REQD};
use tern_nbd::{Client, ClientError, ClientTls};
use tern_pki::{IssueOptions, Role, TlsDir};
use tern_test_support::{ChildGuard, Etcd, free_port, require_tools, wait_for};
use tern_volume::control::{Envelope, ErrorKind, LeaseAction, Reply, Request};

const TERN: &str = env!("CARGO_BIN_EXE_tern");
const T: Duration = Duration::from_secs(30);
const FILE_SIZE: u64 = 8 << 20;

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        tern_pki::init_ca(&dir.path().join("ca")).unwrap();
        Pki { dir }
    }
    fn issue(&self, name: &str, role: Role) -> PathBuf {
        tern_pki::issue(
            &self.dir.path().join("ca"),
            name,
            role,
            &IssueOptions::default(),
        )
        .unwrap()
    }
}

fn client_tls(dir: &Path) -> ClientTls {
    ClientTls {
        config: TlsDir::load(dir).unwrap().client_config(),
        server_name: None,
    }
}

/// One control request with the certificate in `dir`: the node's reply.
fn call(addr: &str, dir: &Path, env: &Envelope) -> Reply {
    try_call(addr, dir, env).unwrap()
}

fn try_call(addr: &str, dir: &Path, env: &Envelope) -> Result<Reply, ClientError> {
    let bytes = serde_json::to_vec(env).unwrap();
    let reply = tern_nbd::control_tls(addr, &bytes, T, Some(&client_tls(dir)))?;
    Ok(serde_json::from_slice(&reply).unwrap())
}

fn plain(request: Request) -> Envelope {
    Envelope {
        forwarded: false,
        request,
        from: None,
    }
}

fn assert_denied(r: &Reply, what: &str) {
    assert!(!r.ok, "{what} was accepted: {r:?}");
    assert_eq!(r.kind, Some(ErrorKind::Denied), "{what}: {r:?}");
}

fn tern(args: &[&str]) -> std::process::Output {
    Command::new(TERN).args(args).output().unwrap()
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn tern_ok(args: &[&str]) -> String {
    let o = tern(args);
    assert!(o.status.success(), "tern {args:?}: {}", text(&o));
    text(&o)
}

struct Node {
    addr: String,
    _proc: ChildGuard,
}

fn spawn_node(id: u32, lun: &Path, etcd: &Etcd, tls: &Path, log: &Path) -> Node {
    let addr = format!("127.0.0.1:{}", free_port());
    let child = Command::new(TERN)
        .args(["volume", "serve", "--node-id", &id.to_string()])
        .args(["--listen", &addr, "--etcd", &etcd.url])
        .args(["--lease-ttl-ms", "1500", "--handshake-timeout-ms", "3000"])
        .arg("--lun")
        .arg(lun)
        .arg("--tls-dir")
        .arg(tls)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    Node {
        addr,
        _proc: ChildGuard(child),
    }
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

/// `--object tls-creds-x509` and `--image-opts` for export `name` of the node at `addr`.
fn qemu_nbd_tls(creds: &Path, addr: &str, name: &str) -> Vec<String> {
    let (host, port) = addr.rsplit_once(':').unwrap();
    vec![
        "--object".into(),
        format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            creds.display()
        ),
        "--image-opts".into(),
        format!("driver=nbd,host={host},port={port},export={name},tls-creds=tls0"),
    ]
}

fn qemu_img_read(creds: &Path, addr: &str, name: &str, out: &Path) -> Result<Vec<u8>, String> {
    let o = Command::new("qemu-img")
        .arg("convert")
        .args(qemu_nbd_tls(creds, addr, name))
        .args(["-O", "raw"])
        .arg(out)
        .output()
        .unwrap();
    if o.status.success() {
        Ok(std::fs::read(out).unwrap())
    } else {
        Err(text(&o))
    }
}

#[test]
fn tls_volume_nodes_serve_standard_clients_and_authorize_by_certificate() {
    require_tools(&["qemu-img", "qemu-io", "nbdinfo"]);
    let pki = Pki::new();
    let n1 = pki.issue("node-1", Role::Host);
    let n2 = pki.issue("node-2", Role::Host);
    let host = pki.issue("h0", Role::Host);
    let ctl = pki.issue("ctl", Role::Controller);
    let user = pki.issue("alice", Role::User);
    let etcd = Etcd::start();
    let work = tempfile::tempdir().unwrap();
    let lun = work.path().join("lun");
    tern_ok(&[
        "volume",
        "format",
        "--size",
        "128M",
        "--lun",
        lun.to_str().unwrap(),
    ]);
    let node1 = spawn_node(1, &lun, &etcd, &n1, &work.path().join("node1.log"));
    let node2 = spawn_node(2, &lun, &etcd, &n2, &work.path().join("node2.log"));
    let (a1, a2) = (node1.addr.as_str(), node2.addr.as_str());
    let status = |addr: &str| call(addr, &ctl, &plain(Request::Status));
    wait_for("both nodes see a coordinator", T, || {
        [a1, a2].iter().all(|a| {
            try_call(a, &ctl, &plain(Request::Status)).is_ok_and(|r| {
                r.ok && serde_json::to_value(&r).unwrap()["data"]["coordinator"]["node_id"].is_u64()
            })
        })
    });
    let coord = serde_json::to_value(status(a1)).unwrap()["data"]["coordinator"].clone();
    let coord_id = coord["node_id"].as_u64().unwrap() as u32;
    let coord_addr = coord["addr"].as_str().unwrap().to_owned();

    // The CLI: plain refused, with the controller's certificate fine.
    let o = tern(&["volume", "status", "--node", a1]);
    assert!(
        !o.status.success(),
        "plain tern volume status: {}",
        text(&o)
    );
    let ctl_s = ctl.to_str().unwrap();
    let host_s = host.to_str().unwrap();
    tern_ok(&["volume", "status", "--node", a1, "--tls-dir", ctl_s]);
    tern_ok(&[
        "volume",
        "create",
        "disk",
        "--size",
        "8M",
        "--node",
        a1,
        "--tls-dir",
        host_s,
    ]);
    tern_ok(&[
        "volume",
        "lease",
        "acquire",
        "disk",
        "--node",
        a1,
        "--tls-dir",
        host_s,
    ]);

    // A host writes the file through node 1 (which holds the lease) with Tern's TLS client…
    let data = pattern(FILE_SIZE as usize, 11);
    {
        let mut c = Client::connect_tls(a1, "disk", T, Some(&client_tls(&host))).unwrap();
        for (i, chunk) in data.chunks(1 << 20).enumerate() {
            c.write((i as u64) << 20, chunk, false).unwrap();
        }
        c.flush().unwrap();
        c.disconnect().unwrap();
    }
    // …and qemu-img with tls-creds-x509 reads it back byte for byte, from either node.
    let out = work.path().join("out.raw");
    assert_eq!(qemu_img_read(&host, a1, "disk", &out).unwrap(), data);
    assert_eq!(qemu_img_read(&user, a2, "disk", &out).unwrap(), data);
    // qemu-io writes over TLS.
    let o = Command::new("qemu-io")
        .args(qemu_nbd_tls(&host, a1, "disk"))
        .args(["-c", "write -P 0x3c 1048576 65536", "-c", "flush"])
        .output()
        .unwrap();
    assert!(o.status.success(), "qemu-io write over TLS: {}", text(&o));
    let mut want = data.clone();
    want[1 << 20..(1 << 20) + 65536].fill(0x3c);
    assert_eq!(qemu_img_read(&host, a1, "disk", &out).unwrap(), want);

    // Without TLS: refused (qemu-img, and NBD_REP_ERR_TLS_REQD to our client).
    let o = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(format!("nbd://{a1}/disk"))
        .arg(work.path().join("plain.raw"))
        .output()
        .unwrap();
    assert!(!o.status.success(), "plain qemu-img convert: {}", text(&o));
    assert!(matches!(
        Client::connect_timeout(a1, "disk", T),
        Err(ClientError::Refused { reply, .. }) if reply == REP_ERR_TLS_REQD
    ));
    // nbdinfo over nbds:// lists the files.
    let o = Command::new("nbdinfo")
        .arg("--list")
        .arg(format!("nbds://{a1}/?tls-certificates={}", host.display()))
        .output()
        .unwrap();
    assert!(
        o.status.success() && text(&o).contains("disk"),
        "{}",
        text(&o)
    );

    // A user reads but does not write: the export is read-only, and control writes are denied.
    let o = Command::new("qemu-io")
        .args(qemu_nbd_tls(&user, a1, "disk"))
        .args(["-c", "write -P 0x77 0 4096"])
        .output()
        .unwrap();
    let said = text(&o);
    assert!(
        !o.status.success() || said.contains("ermission") || said.contains("read-only"),
        "a user certificate wrote: {said}"
    );
    assert_eq!(qemu_img_read(&host, a1, "disk", &out).unwrap(), want);
    let r = call(
        a1,
        &user,
        &plain(Request::Create {
            name: "mine".into(),
            size: 1 << 20,
            preallocated: false,
        }),
    );
    assert_denied(&r, "create by a user");
    assert_denied(
        &call(
            a1,
            &user,
            &plain(Request::Lease {
                name: "disk".into(),
                action: LeaseAction::Release,
            }),
        ),
        "lease release by a user",
    );

    // A node cannot claim another's id: node 2's certificate opening node 1's redirected export
    // at the coordinator, or sending a coordinator lease request for node 1.
    let epoch = serde_json::to_value(call(
        a1,
        &ctl,
        &plain(Request::Stat {
            name: "disk".into(),
            map: false,
        }),
    ))
    .unwrap()["data"]["lease"]["epoch"]
        .as_u64()
        .unwrap();
    // The node that is not the coordinator claims the coordinator's id.
    let (other_id, other_dir) = if coord_id == 1 { (2, &n2) } else { (1, &n1) };
    let victim = coord_id;
    let export = format!("disk@{victim}.{epoch}");
    match Client::connect_tls(&coord_addr, &export, T, Some(&client_tls(other_dir))) {
        Err(ClientError::Refused { reply, message, .. }) => {
            assert_eq!(reply, REP_ERR_POLICY, "{message}");
            assert!(message.contains(&format!("node-{victim}")), "{message}");
        }
        other => panic!("node {other_id} opened {export}: {other:?}"),
    }
    let forged = Envelope {
        forwarded: true,
        request: Request::CoordLease {
            name: "disk".into(),
            node: victim,
            epoch,
            action: LeaseAction::Release,
            renew: false,
        },
        from: Some((victim, "127.0.0.1:1".into())),
    };
    assert_denied(
        &call(&coord_addr, other_dir, &forged),
        "a lease release for another node",
    );
    // Node-to-node messages from certificates that are not volume nodes.
    for (who, dir) in [("host", &host), ("controller", &ctl), ("user", &user)] {
        assert_denied(
            &call(
                a1,
                dir,
                &plain(Request::Revoke {
                    name: "disk".into(),
                }),
            ),
            &format!("revoke from a {who} certificate"),
        );
        assert_denied(
            &call(&coord_addr, dir, &forged),
            &format!("forwarded from a {who}"),
        );
    }
    assert_denied(
        &call(a1, &host, &plain(Request::FenceNode { node: 2 })),
        "fence from a host certificate",
    );

    // After every refusal: node 1 still holds the lease at the same epoch, both nodes serve.
    let st = serde_json::to_value(call(
        a2,
        &ctl,
        &plain(Request::Stat {
            name: "disk".into(),
            map: false,
        }),
    ))
    .unwrap();
    assert_eq!(st["data"]["lease"]["holder"].as_u64(), Some(1), "{st}");
    assert_eq!(st["data"]["lease"]["epoch"].as_u64(), Some(epoch), "{st}");
    assert_eq!(qemu_img_read(&host, a2, "disk", &out).unwrap(), want);
    let mut c = Client::connect_tls(a1, "disk", T, Some(&client_tls(&host))).unwrap();
    c.write(0, &[9u8; 4096], true).unwrap();
    c.disconnect().unwrap();
    want[..4096].fill(9);
    assert_eq!(qemu_img_read(&user, a1, "disk", &out).unwrap(), want);
}

#[test]
fn a_node_refuses_to_start_with_a_certificate_not_its_own() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let lun = work.path().join("lun");
    tern_ok(&[
        "volume",
        "format",
        "--size",
        "64M",
        "--lun",
        lun.to_str().unwrap(),
    ]);
    for (name, role) in [
        ("node-2", Role::Host),
        ("node-1", Role::User),
        ("h0", Role::Host),
    ] {
        let d = pki.issue(name, role);
        let o = Command::new(TERN)
            .args([
                "volume",
                "serve",
                "--node-id",
                "1",
                "--listen",
                "127.0.0.1:0",
            ])
            .args(["--etcd", "http://127.0.0.1:1", "--lun"])
            .arg(&lun)
            .arg("--tls-dir")
            .arg(&d)
            .output()
            .unwrap();
        let said = text(&o);
        assert!(!o.status.success(), "{name}/{role}: {said}");
        assert!(
            said.contains("node-1") && said.contains("--tls-dir"),
            "{said}"
        );
    }
}

/// Starts both TLS nodes on a fresh LUN and waits until each knows the coordinator.
fn tls_cluster(work: &Path, etcd: &Etcd, n1: &Path, n2: &Path, ctl: &Path) -> (Node, Node) {
    let lun = work.join("lun");
    tern_ok(&[
        "volume",
        "format",
        "--size",
        "128M",
        "--lun",
        lun.to_str().unwrap(),
    ]);
    let node1 = spawn_node(1, &lun, etcd, n1, &work.join("node1.log"));
    let node2 = spawn_node(2, &lun, etcd, n2, &work.join("node2.log"));
    wait_for("both nodes see a coordinator", T, || {
        [&node1.addr, &node2.addr].iter().all(|a| {
            try_call(a, ctl, &plain(Request::Status)).is_ok_and(|r| {
                r.ok && serde_json::to_value(&r).unwrap()["data"]["coordinator"]["node_id"].is_u64()
            })
        })
    });
    (node1, node2)
}

/// (holder, epoch) of `file`'s write lease, asked with the controller's certificate.
fn lease_of(addr: &str, ctl: &Path, file: &str) -> (Option<u64>, u64) {
    let v = serde_json::to_value(call(
        addr,
        ctl,
        &plain(Request::Stat {
            name: file.into(),
            map: false,
        }),
    ))
    .unwrap();
    (
        v["data"]["lease"]["holder"].as_u64(),
        v["data"]["lease"]["epoch"].as_u64().unwrap(),
    )
}

/// `tern vm run` of the test guest on `disk` (virtio-blk check, then heartbeats), its API socket
/// in the private directory `dir/TAG`, with `extra` arguments (`--tls-dir`, `--jail` …).
fn run_guest(dir: &Path, tag: &str, disk: &str, extra: &[&str]) -> (common::RunningVm, PathBuf) {
    let api = dir.join(tag);
    common::private_dir(&api);
    let sock = api.join("api.sock");
    let mut args = vec![
        "vm".to_string(),
        "run".into(),
        "--kernel".into(),
        "builtin:testguest".into(),
        "--memory-mib".into(),
        "64".into(),
        "--disk".into(),
        disk.into(),
        "--cmdline".into(),
        "tern.hb_ms=50 tern.blk=verify".into(),
        "--name".into(),
        format!("{tag}-{}", std::process::id()),
        "--api-sock".into(),
        sock.display().to_string(),
        "--runtime-dir".into(),
        dir.join("rt").display().to_string(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (common::RunningVm::start_tern(dir, tag, &args), sock)
}

fn expect_blk_ok(vm: &mut common::RunningVm) {
    let line = vm.wait_line(Duration::from_secs(60), |l| l.starts_with("BLK verify"));
    assert!(line.starts_with("BLK verify ok"), "{line}");
    vm.wait_line(Duration::from_secs(30), |l| {
        l.starts_with("HB ") && common::field(l, "seq").is_some_and(|s| s >= 3)
    });
}

/// A VMM that must not get its disk: it exits non-zero without running the guest. Its stderr.
fn expect_refused(dir: &Path, tag: &str, disk: &str, extra: &[&str]) -> String {
    let (mut vm, _) = run_guest(dir, tag, disk, extra);
    let code = vm.wait_exit(Duration::from_secs(60));
    let err = vm.stderr();
    assert_ne!(code, 0, "{tag}: the VMM got its disk: {err}");
    assert!(
        vm.collect_for(Duration::from_millis(10))
            .iter()
            .all(|l| !l.starts_with("BLK")),
        "{tag}: the refused VM ran its guest"
    );
    err
}

/// Every thread of the VMM `pid` runs under a seccomp filter (`Seccomp: 2`), the volume disk's
/// lease renewer (`volume-renew`, which makes the disk's TLS connections) among them.
fn assert_every_thread_filtered(pid: u32) {
    let mut names = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(st) = std::fs::read_to_string(t.path().join("status")) else {
            continue; // the thread ended meanwhile
        };
        let field = |k: &str| {
            st.lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        let name = field("Name:");
        assert_eq!(
            field("Seccomp:"),
            "2",
            "thread {name} of the VMM runs unfiltered"
        );
        names.push(name);
    }
    assert!(names.iter().any(|n| n == "volume-renew"), "{names:?}");
}

/// The VMM's path counters for its volume disk (direct writes, writes through the node), from
/// its exit line.
/// `tern vm stop` of the VM at `sock`; it exits 0 within 15 s.
fn stop_vm(vm: &mut common::RunningVm, sock: &Path) {
    let (rc, _, err) = common::tern_cmd(&["vm", "stop", "--api-sock", sock.to_str().unwrap()]);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(vm.wait_exit(Duration::from_secs(15)), 0, "{}", vm.stderr());
}

/// The test guest's block pattern is whole in `file`, read through the node at `addr` over TLS
/// (with the credentials in `creds`) into `out`.
fn assert_guest_pattern(creds: &Path, addr: &str, file: &str, out: &Path) {
    let image = qemu_img_read(creds, addr, file, out).unwrap();
    assert_eq!(
        tern_guest_image::blk_pattern_mismatch(&image, tern_guest_image::BLK_VERIFY_SECTORS),
        None
    );
}

fn disk_counters(stderr: &str) -> (u64, u64) {
    let line = stderr
        .lines()
        .find(|l| l.contains("volume disk"))
        .unwrap_or_else(|| panic!("no volume disk counters on stderr:\n{stderr}"));
    let f = |k| common::field(line, k).unwrap_or_else(|| panic!("no {k} in {line}"));
    (f("direct_writes"), f("node_writes"))
}

#[test]
fn a_vm_disk_over_tls_is_refused_without_a_certificate_migrates_and_runs_jailed() {
    common::require_kvm();
    require_tools(&["qemu-img"]);
    const FILE: &str = "vm1.raw";
    let pki = Pki::new();
    let (n1, n2) = (
        pki.issue("node-1", Role::Host),
        pki.issue("node-2", Role::Host),
    );
    let (h0, h1) = (pki.issue("h0", Role::Host), pki.issue("h1", Role::Host));
    let ctl = pki.issue("ctl", Role::Controller);
    let user = pki.issue("alice", Role::User);
    let foreign = Pki::new();
    let stranger = foreign.issue("h0", Role::Host);
    let etcd = Etcd::start();
    let work = common::scratch();
    let dir = work.path();
    let (node1, node2) = tls_cluster(dir, &etcd, &n1, &n2, &ctl);
    let (a1, a2) = (node1.addr.as_str(), node2.addr.as_str());
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    tern_ok(&[
        "volume",
        "create",
        FILE,
        "--size",
        "4M",
        "--node",
        a1,
        "--tls-dir",
        &s(&h0),
    ]);
    let on_n1 = format!("volume://{a1}/{FILE}");
    let on_n2 = format!("volume://{a2}/{FILE}");

    // A VMM without a certificate, with another CA's, or with a user's (read-only) cannot open
    // the disk for writing; none of them takes the lease.
    let err = expect_refused(dir, "plain", &on_n1, &[]);
    assert!(err.contains(a1) && err.contains("--tls-dir"), "{err}");
    let err = expect_refused(dir, "foreign", &on_n1, &["--tls-dir", &s(&stranger)]);
    assert!(err.contains(a1) && err.contains("UnknownIssuer"), "{err}");
    let err = expect_refused(dir, "user", &on_n1, &["--tls-dir", &s(&user)]);
    assert!(err.contains("may only read"), "{err}");
    assert_eq!(
        lease_of(a1, &ctl, FILE).0,
        None,
        "a refused VMM took the lease"
    );

    // With the host's certificate: the guest writes, flushes and reads its pattern back.
    let (mut src, src_sock) = run_guest(dir, "src", &on_n1, &["--tls-dir", &s(&h0)]);
    expect_blk_ok(&mut src);
    assert_every_thread_filtered(src.child.id());
    let (holder, epoch_before) = lease_of(a1, &ctl, FILE);
    assert_eq!(holder, Some(1), "node 1 holds the lease for the VM");

    // Live migration to node 2's host, over TLS on every wire: the lease moves with the VM.
    let port = common::free_port();
    let listen = format!("127.0.0.1:{port}");
    let dst_api = dir.join("dst");
    common::private_dir(&dst_api);
    let dst_sock = dst_api.join("api.sock");
    let mut dst = common::RunningVm::start_tern(
        dir,
        "dst",
        &[
            "vm",
            "receive",
            "--listen",
            &listen,
            "--name",
            &format!("dst-{}", std::process::id()),
            "--disk",
            &on_n2,
            "--api-sock",
            &s(&dst_sock),
            "--runtime-dir",
            &s(&dir.join("rt")),
            "--tls-dir",
            &s(&h1),
        ],
    );
    common::wait_for_text(
        &dir.join("dst.stderr"),
        "waiting for a migration",
        Duration::from_secs(20),
    );
    let (rc, out, err) = common::tern_cmd(&[
        "vm",
        "migrate",
        "--api-sock",
        &s(&src_sock),
        "--to",
        &listen,
        "--tls-dir",
        &s(&h0),
        "--disk-successor",
        "2",
        "--json",
    ]);
    assert_eq!(rc, 0, "migrate: {err}\n{out}\nsource: {}", src.stderr());
    assert_eq!(
        src.wait_exit(Duration::from_secs(15)),
        0,
        "{}",
        src.stderr()
    );
    src.collect_for(Duration::from_millis(200));
    let last = src.last_hb().unwrap();
    let first = dst.wait_line(Duration::from_secs(10), |l| l.starts_with("HB "));
    assert_eq!(common::field(&first, "seq"), Some(last + 1), "{first}");
    let (holder, epoch_after) = lease_of(a2, &ctl, FILE);
    assert_eq!(
        holder,
        Some(2),
        "node 2 holds the lease after the hand-over"
    );
    assert!(
        epoch_after > epoch_before,
        "{epoch_before} -> {epoch_after}"
    );
    stop_vm(&mut dst, &dst_sock);
    assert_eq!(
        lease_of(a1, &ctl, FILE).0,
        None,
        "the lease is released at exit"
    );

    // What the guest wrote is on the volume, read back over TLS by qemu-img.
    assert_guest_pattern(&h0, a1, FILE, &dir.join("readback.raw"));

    // Jailed: the VMM opens the node connection (TLS) and the LUN before it drops to nobody,
    // writes the (now allocated) extents directly, and releases the lease over TLS at exit.
    let jail = dir.join("jail");
    let (mut vm, sock) = run_guest(
        dir,
        "jailed",
        &on_n1,
        &[
            "--tls-dir",
            &s(&h0),
            "--jail",
            "--jail-uid",
            "65534",
            "--jail-gid",
            "65534",
            "--jail-dir",
            &s(&jail),
        ],
    );
    expect_blk_ok(&mut vm);
    assert_every_thread_filtered(vm.child.id());
    let status = std::fs::read_to_string(format!("/proc/{}/status", vm.child.id())).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l == "Uid:\t65534\t65534\t65534\t65534"),
        "the jailed VMM runs as nobody:\n{status}"
    );
    assert_eq!(lease_of(a1, &ctl, FILE).0, Some(1));
    stop_vm(&mut vm, &sock);
    let (direct, _) = disk_counters(&vm.stderr());
    assert!(
        direct > 0,
        "the jailed VMM wrote no extent directly: {}",
        vm.stderr()
    );
    assert_eq!(
        lease_of(a1, &ctl, FILE).0,
        None,
        "the jailed VMM released its lease"
    );
    assert_guest_pattern(&h0, a2, FILE, &dir.join("readback2.raw"));
    // The unprivileged VMM could not unlink its claim file from root's claim directory.
    let _ = std::fs::remove_file(tern_volume::client::claim_path(a1, FILE));
}
