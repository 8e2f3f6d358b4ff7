//! The cluster's processes over TLS, as real binaries: etcd with client-certificate auth (its
//! `--trusted-ca-file`/`--client-cert-auth`), `tern controller --tls-dir --tokens --admins` and
//! `tern agent --tls-dir` with certificates made by `tern-pki`.
//!
//! etcd refuses a plain client, a client without a certificate and one of another CA, and still
//! serves the controller and the agent, which reach it with theirs (the agent's host registers, the
//! controller leads). The controller's API refuses plain TCP, an expired certificate and another
//! CA's, answers 401 without credentials, 403 to a host certificate used as a user and to a viewer
//! (certificate or token) changing anything, and serves the admin after each refusal; `tern
//! cluster` with `--tls-dir`/`--token` (and `TERN_TLS_DIR`/`TERN_TOKEN`) and `tern cluster token
//! add` work against it. Needs root and the etcd binary (fails loudly without them).
//!
//! And `tern cluster up` as it runs by default (TLS): its volume nodes refuse plain NBD, a VM on
//! a volume disk runs with its host's certificate, and a live migration through the API moves
//! the disk's lease to the other host's node over TLS; with `--insecure` the plain path stays
//! (a VM's disk and a plain NBD client served without certificates) (root, KVM and etcd).

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tern_pki::{IssueOptions, Role};
use tern_test_support::{ChildGuard, free_port, require_root, require_tools, wait_for};

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        tern_pki::init_ca(&ca).unwrap();
        tern_pki::init_ca(&dir.path().join("other")).unwrap();
        let o = IssueOptions::default();
        for (name, role) in [
            ("etcd", Role::Controller),
            ("ctl", Role::Controller),
            ("h1", Role::Host),
            ("admin", Role::User),
            ("viewer", Role::User),
            ("node-1", Role::Host),
        ] {
            tern_pki::issue(&ca, name, role, &o).unwrap();
        }
        let expired = IssueOptions {
            valid_days: 1,
            not_before_offset_days: -30,
            ..IssueOptions::default()
        };
        tern_pki::issue(&ca, "late", Role::User, &expired).unwrap();
        tern_pki::issue(&dir.path().join("other"), "admin", Role::User, &o).unwrap();
        Pki { dir }
    }

    fn ours(&self, name: &str) -> PathBuf {
        self.dir.path().join("ca").join(name)
    }

    fn theirs(&self, name: &str) -> PathBuf {
        self.dir.path().join("other").join(name)
    }
}

/// etcd on https with client-certificate auth.
struct TlsEtcd {
    url: String,
    _child: ChildGuard,
    _data: tempfile::TempDir,
}

impl TlsEtcd {
    fn start(pki: &Pki) -> TlsEtcd {
        require_tools(&["etcd"]);
        let data = tempfile::tempdir().unwrap();
        let (port, peer_port) = (free_port(), free_port());
        let url = format!("https://127.0.0.1:{port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let d = pki.ours("etcd");
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(data.path().join("data"))
            .args(["--listen-client-urls", &url])
            .args(["--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")])
            .arg("--cert-file")
            .arg(d.join("server-cert.pem"))
            .arg("--key-file")
            .arg(d.join("server-key.pem"))
            .arg("--trusted-ca-file")
            .arg(d.join("ca-cert.pem"))
            .arg("--client-cert-auth")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(data.path().join("etcd.log")).unwrap())
            .spawn()
            .expect("etcd starts");
        let child = ChildGuard(child);
        wait_for("etcd's client port", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        TlsEtcd {
            url,
            _child: child,
            _data: data,
        }
    }
}

/// A `get` through etcd-client with `tls` (`None`: plain), within 5 s: `Err` if refused.
fn etcd_get(url: &str, tls: Option<etcd_client::TlsOptions>) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(3));
        let opts = match tls {
            Some(t) => opts.with_tls(t),
            None => opts,
        };
        let get = async {
            let mut c = etcd_client::Client::connect([url], Some(opts)).await?;
            c.get("/tern/probe", None).await.map(|_| ())
        };
        match tokio::time::timeout(Duration::from_secs(5), get).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("no answer in 5 s".into()),
        }
    })
}

fn etcd_tls(ca_dir: &Path, cert_dir: Option<&Path>) -> etcd_client::TlsOptions {
    let read = |p: PathBuf| std::fs::read(p).unwrap();
    let t = etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(
        read(ca_dir.join("ca-cert.pem")),
    ));
    match cert_dir {
        Some(d) => t.identity(etcd_client::Identity::from_pem(
            read(d.join("client-cert.pem")),
            read(d.join("client-key.pem")),
        )),
        None => t,
    }
}

/// One request over TLS as `tls` (with a bearer token if given): status and JSON body, `Err` if
/// the connection or the handshake failed.
fn call(
    tls: &Arc<rustls::ClientConfig>,
    token: Option<&str>,
    method: &str,
    url: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), String> {
    let client = tern_controller::shell::http::Client::tls(Arc::clone(tls))
        .with_token(token.map(str::to_string));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let r = rt
        .block_on(client.request(
            method.parse().unwrap(),
            url,
            body.map(|b| b.to_string().into_bytes()),
            Duration::from_secs(10),
        ))
        .map_err(|e| e.to_string())?;
    Ok((
        r.status,
        serde_json::from_slice(&r.body).unwrap_or(Value::Null),
    ))
}

/// A client trusting our CA and presenting `dir`'s certificate, whichever CA signed it.
fn client(ca: &Path, dir: Option<&Path>) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = |p: PathBuf| {
        CertificateDer::pem_file_iter(p)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca.join("ca-cert.pem")) {
        roots.add(c).unwrap();
    }
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    Arc::new(match dir {
        Some(d) => b
            .with_client_auth_cert(
                certs(d.join("client-cert.pem")),
                PrivateKeyDer::from_pem_file(d.join("client-key.pem")).unwrap(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    })
}

fn tern(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .env_remove("TERN_CONTROLLER")
        .env_remove("TERN_TLS_DIR")
        .env_remove("TERN_TOKEN")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn etcd_the_controller_and_the_agent_refuse_strangers_and_keep_serving_their_peers() {
    require_root();
    let pki = Pki::new();
    let etcd = TlsEtcd::start(&pki);
    let ca = pki.ours("admin");

    // etcd: plain, certificate-less and foreign clients are refused; a host's certificate is served.
    let host = pki.ours("h1");
    assert!(etcd_get(&etcd.url.replace("https", "http"), None).is_err());
    assert_eq!(
        etcd_get(&etcd.url, Some(etcd_tls(&ca, Some(&host)))),
        Ok(())
    );
    let r = etcd_get(&etcd.url, Some(etcd_tls(&ca, None)));
    assert!(r.is_err(), "etcd served a client with no certificate");
    let r = etcd_get(&etcd.url, Some(etcd_tls(&ca, Some(&pki.theirs("admin")))));
    assert!(r.is_err(), "etcd served another CA's client");
    assert_eq!(
        etcd_get(&etcd.url, Some(etcd_tls(&ca, Some(&host)))),
        Ok(())
    );

    // The controller and an agent, each with its certificate.
    let scratch = tempfile::tempdir().unwrap();
    let tokens = scratch.path().join("tokens");
    std::fs::write(&tokens, "").unwrap();
    let port = free_port();
    let base = format!("https://127.0.0.1:{port}");
    let _ctl = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["controller", "--etcd", &etcd.url])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--lease-ttl-ms", "2000", "--ha-reserve-hosts", "0"])
            .arg("--tls-dir")
            .arg(pki.ours("ctl"))
            .arg("--tokens")
            .arg(&tokens)
            .args(["--admins", "admin"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(scratch.path().join("controller.log")).unwrap())
            .spawn()
            .expect("tern controller starts"),
    );
    let agent_port = free_port();
    let _agent = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["agent", "--host-id", "h1", "--etcd", &etcd.url])
            .args(["--listen", &format!("127.0.0.1:{agent_port}")])
            .args(["--cores", "2", "--memory-mib", "2048"])
            .args(["--lease-ttl-ms", "3000", "--report-interval-ms", "300"])
            .arg("--tls-dir")
            .arg(&host)
            .arg("--state-dir")
            .arg(scratch.path().join("state"))
            .arg("--runtime-dir")
            .arg(scratch.path().join("run"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(scratch.path().join("agent.log")).unwrap())
            .spawn()
            .expect("tern agent starts"),
    );
    let logs = || {
        ["controller.log", "agent.log"]
            .iter()
            .map(|f| std::fs::read_to_string(scratch.path().join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    let admin = client(&ca, Some(&pki.ours("admin")));
    let hosts_up = || {
        matches!(call(&admin, None, "GET", &format!("{base}/v1/hosts"), None),
            Ok((200, v)) if v[0]["name"] == "h1" && v[0]["state"] == "up" && !v[0]["cpu_utilization"].is_null())
    };
    for _ in 0..200 {
        if hosts_up() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        hosts_up(),
        "the controller (etcd over TLS) does not show host h1 registered and reporting over TLS:\n{}",
        logs()
    );
    let admin_ok = || {
        let r = call(&admin, None, "GET", &format!("{base}/v1/vms"), None);
        assert!(
            matches!(r, Ok((200, _))),
            "the admin is not served: {r:?}\n{}",
            logs()
        );
    };

    // The API: plain TCP gets no HTTP answer.
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    tcp.write_all(b"GET /v1/vms HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = Vec::new();
    let _ = tcp.read_to_end(&mut out);
    assert!(
        !String::from_utf8_lossy(&out).contains("HTTP/1.1"),
        "plain HTTP answered"
    );
    admin_ok();
    // Another CA's certificate named like the admin, and an expired one of ours: refused.
    for dir in [pki.theirs("admin"), pki.ours("late")] {
        let r = call(
            &client(&ca, Some(&dir)),
            None,
            "GET",
            &format!("{base}/v1/vms"),
            None,
        );
        assert!(r.is_err(), "{} was served: {r:?}", dir.display());
        admin_ok();
    }
    // No credentials: 401. A host certificate as a user: 403.
    let (st, v) = call(
        &client(&ca, None),
        None,
        "GET",
        &format!("{base}/v1/vms"),
        None,
    )
    .unwrap();
    assert_eq!(st, 401, "{v}");
    let (st, v) = call(
        &client(&ca, Some(&host)),
        None,
        "GET",
        &format!("{base}/v1/vms"),
        None,
    )
    .unwrap();
    assert_eq!(st, 403, "{v}");
    admin_ok();
    // A viewer certificate reads and cannot create.
    let viewer = client(&ca, Some(&pki.ours("viewer")));
    let spec = json!({"name": "v1", "vcpus": 1, "memory_mib": 64, "kernel": "builtin:testguest"});
    assert_eq!(
        call(&viewer, None, "GET", &format!("{base}/v1/hosts"), None)
            .unwrap()
            .0,
        200
    );
    let (st, v) = call(
        &viewer,
        None,
        "POST",
        &format!("{base}/v1/vms"),
        Some(&spec),
    )
    .unwrap();
    assert_eq!(st, 403, "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains("needs role admin"),
        "{v}"
    );

    // The CLI: the admin's directory, then a viewer token made by `tern cluster token add` (the
    // controller re-reads the file) used with a directory that holds only the CA.
    let admin_dir = pki.ours("admin");
    let (ok, out, err) = tern(
        &["cluster", "hosts", "--controller", &base, "--json"],
        &[("TERN_TLS_DIR", admin_dir.to_str().unwrap())],
    );
    assert!(ok && out.contains("\"h1\""), "{out}{err}");
    let (ok, token, err) = tern(
        &[
            "cluster",
            "token",
            "add",
            "--file",
            tokens.to_str().unwrap(),
            "--name",
            "ci",
            "--role",
            "viewer",
        ],
        &[],
    );
    assert!(ok, "{err}");
    let token = token.trim().to_string();
    assert!(token.len() >= 32, "{token:?}");
    let file = std::fs::read_to_string(&tokens).unwrap();
    assert!(
        file.starts_with("ci viewer ") && !file.contains(&token),
        "{file}"
    );
    let ca_only = scratch.path().join("ca-only");
    std::fs::create_dir(&ca_only).unwrap();
    std::fs::copy(admin_dir.join("ca-cert.pem"), ca_only.join("ca-cert.pem")).unwrap();
    let ca_only = ca_only.to_str().unwrap();
    wait_for(
        "the controller to read the new token",
        Duration::from_secs(10),
        || {
            tern(
                &[
                    "cluster",
                    "vms",
                    "--controller",
                    &base,
                    "--tls-dir",
                    ca_only,
                    "--token",
                    &token,
                ],
                &[],
            )
            .0
        },
    );
    let (ok, _, err) = tern(
        &["cluster", "vm", "create", "v2", "--controller", &base],
        &[("TERN_TLS_DIR", ca_only), ("TERN_TOKEN", &token)],
    );
    assert!(!ok && err.contains("needs role admin"), "{err}");
    let (ok, _, err) = tern(
        &[
            "cluster",
            "vms",
            "--controller",
            &base,
            "--tls-dir",
            ca_only,
        ],
        &[],
    );
    assert!(!ok && err.contains("401"), "{err}");
    admin_ok();
    // etcd still serves its peers' certificates after everything above.
    assert_eq!(
        etcd_get(&etcd.url, Some(etcd_tls(&ca, Some(&host)))),
        Ok(())
    );

    // A volume node with its --tls-dir reaches the same etcd with its certificate: it joins and
    // answers `tern volume status` (as the admin) naming itself the coordinator.
    let lun = scratch.path().join("lun");
    let (ok, _, err) = tern(
        &[
            "volume",
            "format",
            "--lun",
            lun.to_str().unwrap(),
            "--size",
            "64M",
        ],
        &[],
    );
    assert!(ok, "{err}");
    let node = format!("127.0.0.1:{}", free_port());
    let _volume = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_tern"))
            .args([
                "volume",
                "serve",
                "--lun",
                lun.to_str().unwrap(),
                "--node-id",
                "1",
            ])
            .args(["--listen", &node, "--etcd", &etcd.url])
            .arg("--tls-dir")
            .arg(pki.ours("node-1"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(scratch.path().join("volume.log")).unwrap())
            .spawn()
            .expect("tern volume serve starts"),
    );
    let admin_dir = admin_dir.to_str().unwrap();
    let status = || {
        tern(
            &["volume", "status", "--node", &node, "--tls-dir", admin_dir],
            &[],
        )
    };
    for _ in 0..100 {
        if status().1.contains("coordinator: node 1") {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, out, err) = status();
    assert!(
        out.contains("coordinator: node 1"),
        "the volume node did not take office through etcd over TLS: {out}{err}\n{}",
        std::fs::read_to_string(scratch.path().join("volume.log")).unwrap_or_default()
    );
}

/// The command line of the VMM process running VM `name` (`tern vm run|receive … --name NAME`).
fn vmm_cmdline(name: &str) -> Option<Vec<String>> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let raw = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<String> = raw
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let named = args.windows(2).any(|w| w[0] == "--name" && w[1] == name);
        let vmm = args
            .windows(2)
            .any(|w| w[0] == "vm" && (w[1] == "run" || w[1] == "receive"));
        (named
            && vmm
            && !args
                .iter()
                .any(|a| a == "setpriv" || a.ends_with("/setpriv")))
        .then_some(args)
    })
}

#[test]
fn the_test_cluster_runs_and_migrates_a_vm_on_tls_only_volume_nodes() {
    let lab = common::cluster::Lab::up("vtls", 2, 1);
    // No volume node of the cluster speaks plain NBD.
    for h in &lab.info.hosts {
        let addr = h.volume_node.clone();
        let r = tern_netlab::ns::in_namespace(&h.namespace, move || {
            tern_nbd::Client::connect_timeout(addr.as_str(), "any", Duration::from_secs(10))
                .map(drop)
        })
        .unwrap();
        assert!(
            matches!(&r, Err(tern_nbd::ClientError::Refused { reply, .. })
                if *reply == tern_nbd::proto::REP_ERR_TLS_REQD),
            "plain NBD to {}'s node: {r:?}",
            h.name
        );
    }
    // `tern volume` in h0's namespace with h0's certificate.
    let h0 = lab.host("h0").clone();
    assert!(h0.tls_dir.is_some(), "the cluster runs over TLS");
    let lease = || {
        let v = h0.volume(&["stat", "vt-1.raw"]);
        (
            v["lease"]["holder"].as_u64(),
            v["lease"]["epoch"].as_u64().unwrap(),
        )
    };
    h0.volume(&["create", "vt-1.raw", "--size", "16M"]);
    lab.create("vt-1", Some("vt-1.raw"), None);
    let vms = lab.wait_running(&["vt-1"], Duration::from_secs(60));
    let from = lab.host(vms[0].host.as_deref().unwrap()).clone();
    let to = lab
        .info
        .hosts
        .iter()
        .find(|h| h.name != from.name)
        .unwrap()
        .clone();
    let (holder, epoch) = lease();
    assert_eq!(
        holder,
        Some(u64::from(from.volume_node_id)),
        "{}",
        lab.logs()
    );
    // The VMM presents its host's certificate to the node.
    let args = vmm_cmdline("vt-1").expect("the VMM of vt-1");
    let i = args
        .iter()
        .position(|a| a == "--tls-dir")
        .unwrap_or_else(|| {
            panic!("the VMM runs without --tls-dir: {args:?}");
        });
    assert_eq!(
        Some(Path::new(&args[i + 1])),
        from.tls_dir.as_deref(),
        "{args:?}"
    );
    wait_for(
        "heartbeats before the move",
        Duration::from_secs(20),
        || common::cluster::hb_seqs(&lab.console(&from.name, "vt-1")).len() >= 3,
    );

    // A live migration to the other host: the lease goes to its node at a higher epoch.
    let (st, body) = lab.api(
        "POST",
        "/v1/vms/vt-1/migrate",
        Some(&json!({"to": to.name.clone()})),
    );
    assert_eq!(st, 202, "{body}");
    wait_for(
        "vt-1 running on the other host",
        Duration::from_secs(90),
        || {
            lab.vms().iter().any(|v| {
                v.name == "vt-1"
                    && v.state == tern_api::cluster::VmState::Running
                    && v.host.as_deref() == Some(to.name.as_str())
            })
        },
    );
    wait_for(
        "the lease with the other host's node",
        Duration::from_secs(20),
        || lease().0 == Some(u64::from(to.volume_node_id)),
    );
    assert!(lease().1 > epoch, "{epoch} -> {:?}", lease());
    assert_eq!(lab.vm("vt-1").unwrap().restarts, 0);
    wait_for("heartbeats after the move", Duration::from_secs(20), || {
        common::cluster::hb_seqs(&lab.console(&to.name, "vt-1")).len() >= 2
    });
    let seqs = common::cluster::hb_seqs(&lab.console(&to.name, "vt-1"));
    assert!(
        seqs[0] > 1,
        "vt-1's heartbeats restarted after the move: {seqs:?}"
    );
}

#[test]
fn an_insecure_test_cluster_keeps_plain_nbd_for_its_vm_disks() {
    let lab = common::cluster::Lab::up_with("vpln", 2, 1, &["--insecure"]);
    let h0 = lab.host("h0").clone();
    assert_eq!(h0.tls_dir, None);
    h0.volume(&["create", "vp-1.raw", "--size", "16M"]);
    lab.create_on("vp-1", Some("vp-1.raw"), None, Some("h0"));
    lab.wait_running(&["vp-1"], Duration::from_secs(60));
    let args = vmm_cmdline("vp-1").expect("the VMM of vp-1");
    assert!(!args.iter().any(|a| a == "--tls-dir"), "{args:?}");
    wait_for("heartbeats", Duration::from_secs(20), || {
        common::cluster::hb_seqs(&lab.console("h0", "vp-1")).len() >= 2
    });
    // The node serves plain NBD: a plain client reads the VM's disk.
    let addr = h0.volume_node.clone();
    let size = tern_netlab::ns::in_namespace(&h0.namespace, move || {
        tern_nbd::Client::connect_timeout(addr.as_str(), "vp-1.raw", Duration::from_secs(10))
            .map(|c| c.size())
    })
    .unwrap()
    .expect("a plain NBD client of an --insecure cluster's node");
    assert_eq!(size, 16 << 20);
}
