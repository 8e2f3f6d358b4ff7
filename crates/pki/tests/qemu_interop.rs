//! QEMU's own TLS stack (GnuTLS, `tls-creds-x509`) uses directories that `tern-pki` issued, on both
//! ends: qemu-nbd serves an image with a host's directory and requires a client certificate,
//! qemu-img reads it with another holder's directory, byte for byte; a foreign CA is refused.

use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use tern_pki::{IssueOptions, Role};
use tern_test_support::{ChildGuard, free_port, require_tools, wait_for};

fn qemu_img_read(client_dir: &Path, port: u16, out: &Path) -> std::process::Output {
    Command::new("qemu-img")
        .arg("convert")
        .arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            client_dir.display()
        ))
        .arg("--image-opts")
        .arg(format!(
            "driver=nbd,host=127.0.0.1,port={port},tls-creds=tls0"
        ))
        .arg("-O")
        .arg("raw")
        .arg(out)
        .output()
        .unwrap()
}

#[test]
fn qemu_nbd_and_qemu_img_use_tern_issued_directories() {
    require_tools(&["qemu-nbd", "qemu-img"]);
    let ca = tempfile::tempdir().unwrap();
    tern_pki::init_ca(ca.path()).unwrap();
    let server_dir =
        tern_pki::issue(ca.path(), "node-a", Role::Host, &IssueOptions::default()).unwrap();
    let client_dir =
        tern_pki::issue(ca.path(), "alice", Role::User, &IssueOptions::default()).unwrap();

    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("disk.raw");
    let content: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&image, &content).unwrap();

    let port = free_port();
    let _server = ChildGuard(
        Command::new("qemu-nbd")
            .arg("--object")
            .arg(format!(
                "tls-creds-x509,id=tls0,endpoint=server,verify-peer=on,dir={}",
                server_dir.display()
            ))
            .args(["--tls-creds", "tls0", "--persistent", "--read-only"])
            .args(["-f", "raw", "-b", "127.0.0.1", "-p", &port.to_string()])
            .arg(&image)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("qemu-nbd to listen", Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });

    let out = work.path().join("copy.raw");
    let r = qemu_img_read(&client_dir, port, &out);
    assert!(
        r.status.success(),
        "qemu-img refused a Tern-issued pair: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(std::fs::read(&out).unwrap() == content, "copy differs");

    // A client holding a certificate from another CA is refused.
    let other = tempfile::tempdir().unwrap();
    tern_pki::init_ca(other.path()).unwrap();
    let foreign = tern_pki::issue(
        other.path(),
        "mallory",
        Role::Host,
        &IssueOptions::default(),
    )
    .unwrap();
    // It trusts our CA (public) so that only the server's check of its certificate can fail.
    std::fs::copy(ca.path().join("ca-cert.pem"), foreign.join("ca-cert.pem")).unwrap();
    let out2 = work.path().join("copy2.raw");
    let r = qemu_img_read(&foreign, port, &out2);
    assert!(
        !r.status.success(),
        "qemu-nbd served a client whose certificate another CA issued"
    );
}
