//! NBD over TLS with the standard peers: `qemu-img`/`qemu-io` (`--object tls-creds-x509`) and
//! `nbdinfo` (`nbds://`, libnbd with GnuTLS) against our server, and our client against
//! `qemu-nbd --tls-creds`. The certificate directories are tern-pki's, in the file layout QEMU and
//! libnbd read. A missing tool fails the test loudly.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tern_nbd::{
    Client, ClientTls, FileBackend, ListenerOptions, ListenerStats, PeerId, ServerTls,
    StaticExports,
};
use tern_pki::{IssueOptions, Role, TlsDir};
use tern_test_support::{free_port, require_tools};

const SIZE: u64 = 4 << 20;

struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        tern_pki::init_ca(&ca).unwrap();
        Pki { _dir: dir, ca }
    }
    fn issue(&self, name: &str) -> PathBuf {
        tern_pki::issue(&self.ca, name, Role::Host, &IssueOptions::default()).unwrap()
    }
}

fn tool(name: &str) -> Command {
    require_tools(&[name]);
    Command::new(name)
}

fn output(mut c: Command) -> (bool, String) {
    let out = c.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn run(c: Command) -> String {
    let dbg = format!("{c:?}");
    let (ok, text) = output(c);
    assert!(ok, "{dbg} failed: {text}");
    text
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

/// Our server with TLS required over a file holding `data`; its port.
fn serve_tls(dir: &Path, file: &Path) -> u16 {
    let tls = TlsDir::load(dir).unwrap();
    let mut ex = StaticExports::new();
    ex.insert("disk", Arc::new(FileBackend::open(file, false).unwrap()));
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let opts = ListenerOptions {
        tls: Some(ServerTls {
            config: tls.server_config(),
            identify: Arc::new(|c| {
                tern_pki::peer_identity(c)
                    .map(|i| PeerId {
                        name: i.name,
                        role: i.role.to_string(),
                    })
                    .map_err(|e| e.to_string())
            }),
        }),
        ..ListenerOptions::default()
    };
    std::thread::spawn(move || {
        tern_nbd::run_listener_with(l, Arc::new(ex), opts, Arc::new(ListenerStats::default()))
    });
    port
}

/// `--object tls-creds-x509,...,endpoint=client` and the `--image-opts` of our export.
fn qemu_tls_args(creds: &Path, port: u16) -> Vec<String> {
    vec![
        "--object".into(),
        format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            creds.display()
        ),
        "--image-opts".into(),
        format!("driver=nbd,host=127.0.0.1,port={port},export=disk,tls-creds=tls0"),
    ]
}

#[test]
fn qemu_img_and_qemu_io_read_and_write_over_tls_and_plain_is_refused() {
    let pki = Pki::new();
    let (srv, cli) = (pki.issue("srv"), pki.issue("qemu"));
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("disk.raw");
    let data = pattern(SIZE as usize, 7);
    std::fs::write(&disk, &data).unwrap();
    let port = serve_tls(&srv, &disk);

    // Read: qemu-img convert out of the export, byte for byte.
    let out = work.path().join("out.raw");
    let mut c = tool("qemu-img");
    c.arg("convert").args(qemu_tls_args(&cli, port));
    c.args(["-O", "raw"]).arg(&out);
    run(c);
    assert_eq!(
        std::fs::read(&out).unwrap(),
        data,
        "qemu-img convert over TLS"
    );

    // Write: qemu-io, then the file holds it.
    let mut c = tool("qemu-io");
    c.args(qemu_tls_args(&cli, port));
    c.args(["-c", "write -P 0xa5 65536 131072", "-c", "flush"]);
    run(c);
    let now = std::fs::read(&disk).unwrap();
    assert!(now[65536..196608].iter().all(|&b| b == 0xa5));
    assert_eq!(&now[..65536], &data[..65536]);

    // Without TLS: refused.
    let mut c = tool("qemu-img");
    c.args(["convert", "-f", "raw", "-O", "raw"])
        .arg(format!("nbd://127.0.0.1:{port}/disk"))
        .arg(work.path().join("plain.raw"));
    let (ok, text) = output(c);
    assert!(!ok, "plain qemu-img convert succeeded: {text}");
    assert!(text.to_lowercase().contains("tls"), "{text}");

    // A certificate from another CA: refused; the real client is still served.
    let other = Pki::new();
    let stranger = other.issue("qemu");
    // QEMU checks the server against the directory's CA: give it ours, with the stranger's key.
    std::fs::copy(pki.ca.join("ca-cert.pem"), stranger.join("ca-cert.pem")).unwrap();
    let mut c = tool("qemu-img");
    c.arg("convert").args(qemu_tls_args(&stranger, port));
    c.args(["-O", "raw"]).arg(work.path().join("stranger.raw"));
    let (ok, text) = output(c);
    assert!(!ok, "a foreign client certificate was accepted: {text}");
    let mut c = tool("qemu-img");
    c.arg("convert").args(qemu_tls_args(&cli, port));
    c.args(["-O", "raw"]).arg(&out);
    run(c);
    assert_eq!(std::fs::read(&out).unwrap(), now);
}

#[test]
fn nbdinfo_lists_and_reads_over_nbds() {
    let pki = Pki::new();
    let (srv, cli) = (pki.issue("srv"), pki.issue("nbdinfo"));
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("disk.raw");
    let data = pattern(SIZE as usize, 9);
    std::fs::write(&disk, &data).unwrap();
    let port = serve_tls(&srv, &disk);
    let q = format!("tls-certificates={}", cli.display());
    let mut c = tool("nbdinfo");
    c.arg("--list").arg(format!("nbds://127.0.0.1:{port}/?{q}"));
    let out = run(c);
    assert!(
        out.contains("export=\"disk\"") || out.contains("disk"),
        "{out}"
    );
    let mut c = tool("nbdinfo");
    c.arg("--json")
        .arg(format!("nbds://127.0.0.1:{port}/disk?{q}"));
    let out = run(c);
    assert!(out.contains(&format!("\"export-size\": {SIZE}")), "{out}");
    // Read through libnbd's TLS: nbdcopy to a file, byte for byte.
    let copy = work.path().join("copy.raw");
    let mut c = tool("nbdcopy");
    c.arg(format!("nbds://127.0.0.1:{port}/disk?{q}"))
        .arg(&copy);
    run(c);
    assert_eq!(std::fs::read(&copy).unwrap(), data);
    // Plain nbd:// is refused.
    let mut c = tool("nbdinfo");
    c.arg(format!("nbd://127.0.0.1:{port}/disk"));
    let (ok, text) = output(c);
    assert!(!ok, "plain nbdinfo succeeded: {text}");
}

struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn our_client_against_qemu_nbd_with_tls_creds() {
    let pki = Pki::new();
    let (srv, cli) = (pki.issue("qemu-nbd"), pki.issue("tern"));
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("disk.raw");
    let data = pattern(SIZE as usize, 3);
    std::fs::write(&disk, &data).unwrap();
    let port = free_port();
    let mut c = tool("qemu-nbd");
    c.args([
        "--persistent",
        "--shared=4",
        "--format=raw",
        "--bind=127.0.0.1",
        "--export-name=disk",
    ])
    .arg(format!("--port={port}"))
    .arg("--object")
    .arg(format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on",
        srv.display()
    ))
    .arg("--tls-creds=tls0")
    .arg(&disk)
    .stdout(Stdio::null());
    let _q = Child(c.spawn().unwrap());
    let tls = ClientTls {
        config: TlsDir::load(&cli).unwrap().client_config(),
        server_name: None,
    };
    let addr = format!("127.0.0.1:{port}");
    tern_test_support::wait_for("qemu-nbd listening", Duration::from_secs(10), || {
        std::net::TcpStream::connect(&addr).is_ok()
    });
    let mut cl = Client::connect_tls(&addr, "disk", Duration::from_secs(10), Some(&tls)).unwrap();
    assert_eq!(cl.size(), SIZE);
    let mut back = vec![0u8; SIZE as usize];
    for (i, chunk) in back.chunks_mut(1 << 20).enumerate() {
        cl.read((i as u64) << 20, chunk).unwrap();
    }
    assert_eq!(back, data);
    cl.write(8192, &[0x5a; 4096], true).unwrap();
    cl.disconnect().unwrap();
    assert!(
        std::fs::read(&disk).unwrap()[8192..12288]
            .iter()
            .all(|&b| b == 0x5a)
    );
    // qemu-nbd refuses our plain client.
    assert!(Client::connect_timeout(&addr, "disk", Duration::from_secs(10)).is_err());
    // And a certificate of another CA.
    let other = Pki::new();
    let stranger = ClientTls {
        config: TlsDir::load(&other.issue("tern")).unwrap().client_config(),
        server_name: None,
    };
    assert!(Client::connect_tls(&addr, "disk", Duration::from_secs(10), Some(&stranger)).is_err());
    let sc =
        tern_nbd::SharedClient::connect_tls(&addr, "disk", Duration::from_secs(10), Some(&tls))
            .unwrap();
    let mut b = vec![0u8; 4096];
    sc.read(8192, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0x5a));
}
