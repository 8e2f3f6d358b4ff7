//! Least privilege and revocation in a running `tern cluster up` (real etcd with client-certificate
//! authentication and RBAC, network-namespace hosts, agents, volume nodes, a controller):
//!
//! - etcd maps each client certificate's CN to a user: a volume node's and a host's (agent's)
//!   certificate are refused writing the controller's desired state with a permission error, and
//!   reading it; the controller's certificate writes it; the admin user's certificate reads nothing;
//!   a host reads who leads; and the cluster works (every host up and reporting, a volume created).
//! - `tern pki revoke` on a host's certificate: the controller's API and another host's agent refuse
//!   it at the next connection with an error naming revocation, etcd refuses it too, and an
//!   unrevoked host certificate keeps working — all without restarting anything.
//!
//! Needs root, KVM and etcd; fails loudly without them.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::cluster::{Lab, client_config, http};
use common::tern_ok;

/// etcd-client over TLS with the certificate in `pki/name`, within 10 s: runs `f`.
fn with_etcd<T>(
    url: &str,
    pki: &Path,
    name: &str,
    f: impl AsyncFnOnce(etcd_client::Client) -> Result<T, etcd_client::Error>,
) -> Result<T, String> {
    let dir = pki.join(name);
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    let tls = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(read("ca-cert.pem")))
        .identity(etcd_client::Identity::from_pem(
            read("client-cert.pem"),
            read("client-key.pem"),
        ));
    let opts = etcd_client::ConnectOptions::new()
        .with_tls(tls)
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(5));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let run = async {
            let c = etcd_client::Client::connect([url], Some(opts)).await?;
            f(c).await
        };
        match tokio::time::timeout(Duration::from_secs(10), run).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("no answer within 10 s".to_owned()),
        }
    })
}

fn put(url: &str, pki: &Path, name: &str, key: &str) -> Result<(), String> {
    let key = key.to_owned();
    with_etcd(url, pki, name, async move |mut c| {
        c.put(key, "probe", None).await.map(|_| ())
    })
}

fn get_prefix(url: &str, pki: &Path, name: &str, prefix: &str) -> Result<usize, String> {
    let prefix = prefix.to_owned();
    with_etcd(url, pki, name, async move |mut c| {
        let opts = etcd_client::GetOptions::new().with_prefix();
        c.get(prefix, Some(opts)).await.map(|r| r.kvs().len())
    })
}

fn delete(url: &str, pki: &Path, name: &str, key: &str) -> Result<(), String> {
    let key = key.to_owned();
    with_etcd(url, pki, name, async move |mut c| {
        c.delete(key, None).await.map(|_| ())
    })
}

fn denied(r: Result<impl std::fmt::Debug, String>, what: &str) {
    match r {
        Err(e) => assert!(e.contains("permission denied"), "{what}: {e}"),
        Ok(v) => panic!("{what}: allowed ({v:?})"),
    }
}

#[test]
fn etcd_gives_each_certificate_only_its_keys_and_revoked_certificates_are_refused_everywhere() {
    let lab = Lab::up("rbac", 2, 1);
    let pki: PathBuf = lab.info.tls_dir.as_ref().unwrap().parent().unwrap().into();
    let etcd = lab.info.etcd.clone();
    let probe = format!("/tern/desired/vms/rbac-probe-{}", std::process::id());

    // The cluster works under RBAC: every host up and reporting, a volume node serves.
    let hosts = lab.hosts();
    assert_eq!(hosts.len(), 2, "{hosts:?}");
    lab.info.hosts[0].volume(&["create", "rbac-disk.raw", "--size", "16M"]);

    // A volume node and an agent cannot touch the controller's desired state.
    denied(put(&etcd, &pki, "node-1", &probe), "node-1 writing");
    denied(put(&etcd, &pki, "h0", &probe), "h0 writing");
    denied(
        get_prefix(&etcd, &pki, "h0", "/tern/desired/"),
        "h0 reading",
    );
    denied(
        get_prefix(&etcd, &pki, "node-1", "/tern/hosts/"),
        "node-1 reading",
    );
    // A host cannot write another host's record, nor the volume keys.
    denied(
        put(&etcd, &pki, "h0", "/tern/hosts/h1"),
        "h0 writing h1's record",
    );
    denied(
        put(&etcd, &pki, "h0", "tern/volume/x"),
        "h0 writing volume keys",
    );
    // The admin user goes through the controller, never etcd.
    denied(get_prefix(&etcd, &pki, "admin", "/tern/"), "admin reading");
    // What each needs: an agent reads who leads, a node its volume keys.
    assert_eq!(get_prefix(&etcd, &pki, "h0", "/tern/leader"), Ok(1));
    assert!(get_prefix(&etcd, &pki, "node-1", "tern/volume/").unwrap() > 0);
    // The controller's certificate may write there (the probe is removed at once).
    put(&etcd, &pki, "controller-1", &probe).unwrap();
    assert_eq!(get_prefix(&etcd, &pki, "controller-1", &probe), Ok(1));
    delete(&etcd, &pki, "controller-1", &probe).unwrap();

    // Revocation: h1's certificate, while everything runs.
    let h0 = client_config(&pki.join("h0"));
    let h1 = client_config(&pki.join("h1"));
    let ctl = &lab.info.controllers[0];
    let agent0 = &lab.info.hosts[0];
    let before = http(Some(&h1), None, ctl, "GET", "/v1/hosts", None);
    assert!(before.is_ok(), "h1 before revocation: {before:?}");
    let said = tern_ok(["pki", "revoke", "--dir", pki.to_str().unwrap(), "h1"]);
    assert!(
        said.contains("h1 (serial ") && said.contains("revoked"),
        "{said}"
    );

    let e = http(Some(&h1), None, ctl, "GET", "/v1/hosts", None).unwrap_err();
    assert!(e.contains("CertificateRevoked"), "controller API: {e}");
    let e = http(
        Some(&h1),
        Some(&agent0.namespace),
        &agent0.agent_url,
        "GET",
        "/v1/agent/status",
        None,
    )
    .unwrap_err();
    assert!(e.contains("CertificateRevoked"), "agent h0: {e}");
    let e = get_prefix(&etcd, &pki, "h1", "/tern/leader").unwrap_err();
    assert!(!e.contains("permission denied"), "etcd let h1 in: {e}");
    let etcd_log = pki.parent().unwrap().join("logs").join("etcd.log");
    let log = std::fs::read_to_string(&etcd_log).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("certificate") && l.contains("revoked")),
        "etcd's log names no revoked certificate:\n{log}"
    );

    // The unrevoked host certificate still works everywhere.
    let (st, _) = http(Some(&h0), None, ctl, "GET", "/v1/hosts", None).unwrap();
    assert_ne!(st, 0);
    http(
        Some(&h0),
        Some(&agent0.namespace),
        &agent0.agent_url,
        "GET",
        "/v1/agent/status",
        None,
    )
    .unwrap();
    assert_eq!(get_prefix(&etcd, &pki, "h0", "/tern/leader"), Ok(1));
}
