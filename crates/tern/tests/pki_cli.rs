//! `tern pki` as an operator runs it: a CA, certificates in QEMU-named directories with private
//! modes, an existing CA kept unless --force, and errors that name the bad value and the valid ones.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

const TERN: &str = env!("CARGO_BIN_EXE_tern");

fn tern(args: &[&str]) -> Output {
    Command::new(TERN).args(args).output().expect("run tern")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_issue_and_refusals() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("pki");
    let d = ca.to_str().unwrap();

    let o = tern(&["pki", "init", "--dir", d]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(mode(&ca), 0o700);
    assert_eq!(mode(&ca.join("ca-key.pem")), 0o600);
    let key = std::fs::read(ca.join("ca-key.pem")).unwrap();

    // A second init keeps the CA and says how to replace it.
    let o = tern(&["pki", "init", "--dir", d]);
    assert!(!o.status.success());
    assert!(text(&o).contains("--force"), "{}", text(&o));
    assert_eq!(std::fs::read(ca.join("ca-key.pem")).unwrap(), key);

    let o = tern(&[
        "pki", "issue", "--dir", d, "--name", "node-a", "--role", "host", "--san", "10.9.8.7",
        "--days", "30",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("--tls-dir"), "{}", text(&o));
    let dir = ca.join("node-a");
    assert_eq!(mode(&dir), 0o700);
    for f in ["server-key.pem", "client-key.pem"] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
    let tls = tern_pki::TlsDir::load(&dir).unwrap();
    assert_eq!(tls.identity().name, "node-a");
    assert_eq!(tls.identity().role, tern_pki::Role::Host);

    // An unknown role lists the valid ones.
    let o = tern(&["pki", "issue", "--dir", d, "--name", "x", "--role", "admin"]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("\"admin\"") && t.contains("host, controller, user"),
        "{t}"
    );

    // A bad name, a bad validity, a missing CA: each named.
    let o = tern(&[
        "pki", "issue", "--dir", d, "--name", "a/b", "--role", "user",
    ]);
    assert!(
        !o.status.success() && text(&o).contains("\"a/b\""),
        "{}",
        text(&o)
    );
    let o = tern(&[
        "pki", "issue", "--dir", d, "--name", "b", "--role", "user", "--days", "0",
    ]);
    assert!(
        !o.status.success() && text(&o).contains("1 to 3650"),
        "{}",
        text(&o)
    );
    let none = tmp.path().join("none");
    let o = tern(&[
        "pki",
        "issue",
        "--dir",
        none.to_str().unwrap(),
        "--name",
        "b",
        "--role",
        "user",
    ]);
    assert!(
        !o.status.success() && text(&o).contains("tern pki init"),
        "{}",
        text(&o)
    );

    // --force replaces the CA.
    let o = tern(&["pki", "init", "--dir", d, "--force"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_ne!(std::fs::read(ca.join("ca-key.pem")).unwrap(), key);
}
