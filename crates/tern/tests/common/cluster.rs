//! A test cluster for the `tern cluster` integration tests: a running `tern cluster up` (real
//! etcd, network-namespace hosts, an agent and a volume node per host, controllers) read through
//! its JSON line and state file, REST calls to whichever controller leads (over TLS with the
//! cluster's admin certificate, as `tern cluster up` runs by default), HTTP/1.1 from inside a
//! host's namespace, and the guests' heartbeats. Needs root, KVM and etcd; fails loudly without
//! them.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};
use tern_api::cluster::{HostInfo, TaskInfo, TaskState, VmInfo, VmState};
use tern_test_support::{require_kvm, require_tools};

use super::tern;

/// One host of the test cluster, as `tern cluster up --json` prints it.
#[derive(Debug, Clone, Deserialize)]
pub struct LabHost {
    pub name: String,
    pub namespace: String,
    pub agent_url: String,
    pub agent_pid: u32,
    pub volume_node: String,
    pub volume_node_id: u32,
    pub volume_pid: u32,
    pub runtime_dir: PathBuf,
    /// The host's certificate (`null` with `--insecure`): `tern volume --tls-dir` in its
    /// namespace, whose volume node takes only TLS.
    pub tls_dir: Option<PathBuf>,
}

impl LabHost {
    /// `tern volume ARGS --json` in the host's namespace against its volume node (with its
    /// certificate when the cluster runs over TLS); it must succeed, and its JSON output.
    pub fn volume(&self, args: &[&str]) -> Value {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.namespace, tern(), "volume"])
            .args(args)
            .args(["--node", &self.volume_node, "--json"])
            .args(
                self.tls_dir
                    .iter()
                    .flat_map(|d| [std::ffi::OsStr::new("--tls-dir"), d.as_os_str()]),
            )
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tern volume {args:?} on {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

/// The JSON line `tern cluster up --json` prints once the cluster is up.
#[derive(Debug, Clone, Deserialize)]
pub struct UpInfo {
    pub name: String,
    pub controllers: Vec<String>,
    pub etcd: String,
    pub hosts: Vec<LabHost>,
    pub state_file: PathBuf,
    /// The admin user's TLS directory (`null` with `--insecure`).
    pub tls_dir: Option<PathBuf>,
    /// The controllers' token file (`null` with `--insecure`).
    pub tokens: Option<PathBuf>,
}

/// A controller in the cluster's state file.
#[derive(Debug, Clone, Deserialize)]
pub struct ControllerState {
    pub url: String,
    pub pid: u32,
}

/// The part of the cluster's state file these tests read.
#[derive(Debug, Clone, Deserialize)]
pub struct StateFile {
    pub controllers: Vec<ControllerState>,
    pub namespaces: Vec<String>,
}

/// A running `tern cluster up`; dropping it takes the cluster down.
pub struct Lab {
    pub child: Option<Child>,
    pub info: UpInfo,
    pub state: StateFile,
    /// TLS as the admin user (`None` with `--insecure`).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    _scratch: tempfile::TempDir,
    stderr: PathBuf,
}

impl Lab {
    /// `tern cluster up --hosts HOSTS --controllers CONTROLLERS`, named after `tag` and this process.
    pub fn up(tag: &str, hosts: usize, controllers: usize) -> Lab {
        Lab::up_with(tag, hosts, controllers, &[])
    }

    /// [`Lab::up`] with more `tern cluster up` options.
    pub fn up_with(tag: &str, hosts: usize, controllers: usize, extra: &[&str]) -> Lab {
        require_kvm();
        require_tools(&["etcd", "ip"]);
        let name = format!("e{tag}{}", std::process::id() % 100_000);
        let scratch = tempfile::tempdir().unwrap();
        let stderr = scratch.path().join("up.stderr");
        let mut child = Command::new(tern())
            .args(["cluster", "up", "--name", &name, "--json"])
            .args(["--hosts", &hosts.to_string()])
            .args(["--controllers", &controllers.to_string()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("tern cluster up starts");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_default();
        let info: UpInfo = match serde_json::from_str(line.trim()) {
            Ok(i) => i,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "tern cluster up did not print its JSON line ({line:?}); stderr:\n{}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                );
            }
        };
        let state: StateFile =
            serde_json::from_slice(&std::fs::read(&info.state_file).unwrap()).unwrap();
        assert_eq!(info.name, name);
        assert_eq!(info.hosts.len(), hosts);
        assert_eq!(info.controllers.len(), controllers);
        let insecure = extra.contains(&"--insecure");
        let scheme = if insecure { "http" } else { "https" };
        assert!(
            info.etcd.starts_with(&format!("{scheme}://127.0.0.1:")),
            "{}",
            info.etcd
        );
        assert_eq!(info.tls_dir.is_none(), insecure, "{:?}", info.tls_dir);
        let tls = info.tls_dir.as_deref().map(client_config);
        Lab {
            child: Some(child),
            info,
            state,
            tls,
            _scratch: scratch,
            stderr,
        }
    }

    /// Sends a request to whichever controller leads (a stand-by answers 503); a leader that is
    /// still gathering its hosts' first reports ("not ready", 503) is asked again for up to 20 s.
    pub fn api(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
        let start = Instant::now();
        loop {
            let r = self.api_once(method, path, body);
            if r.0 == 503 && r.1.contains("not ready") && start.elapsed() < Duration::from_secs(20)
            {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            return r;
        }
    }

    fn api_once(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
        let body = body.map(|b| b.to_string());
        let mut last = (0, String::from("no controller answered"));
        for c in &self.info.controllers {
            match http(self.tls.as_ref(), None, c, method, path, body.as_deref()) {
                Ok((503, b)) => last = (503, b),
                Ok(r) => return r,
                // A dead controller's refusal must not hide a live one's 503 (its "not ready"
                // is what `api` waits out after a fail-over).
                Err(e) if last.0 != 503 => last = (0, e),
                Err(_) => {}
            }
        }
        last
    }

    /// TLS as `name` of the cluster's PKI (`controller-1`, `h0`, ...; `None` with `--insecure`).
    pub fn pki_client(&self, name: &str) -> Option<Arc<rustls::ClientConfig>> {
        let pki = self.info.tls_dir.as_ref()?.parent()?.to_path_buf();
        Some(client_config(&pki.join(name)))
    }

    /// `GET /v1/vms` (empty while no controller answers 200).
    pub fn vms(&self) -> Vec<VmInfo> {
        let (st, body) = self.api("GET", "/v1/vms", None);
        if st != 200 {
            return Vec::new();
        }
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET /v1/vms: {e}: {body}"))
    }

    pub fn vm(&self, name: &str) -> Option<VmInfo> {
        self.vms().into_iter().find(|v| v.name == name)
    }

    pub fn hosts(&self) -> Vec<HostInfo> {
        let (st, body) = self.api("GET", "/v1/hosts", None);
        assert_eq!(st, 200, "GET /v1/hosts: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// A 1-vCPU, 64 MiB test guest with a heartbeat every 200 ms, placed by the controller, on
    /// volume file `disk` and in anti-affinity group `group` if given.
    pub fn create(&self, name: &str, disk: Option<&str>, group: Option<&str>) -> VmInfo {
        self.create_on(name, disk, group, None)
    }

    /// [`Lab::create`], pinned to `host` if given.
    pub fn create_on(
        &self,
        name: &str,
        disk: Option<&str>,
        group: Option<&str>,
        host: Option<&str>,
    ) -> VmInfo {
        let body = json!({
            "name": name, "vcpus": 1, "memory_mib": 64, "kernel": "builtin:testguest",
            "cmdline": "tern.hb_ms=200", "disk": disk, "anti_affinity": group, "host": host,
        });
        let (st, body) = self.api("POST", "/v1/vms", Some(&body));
        assert!(st == 200 || st == 201, "POST /v1/vms {name}: {st} {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Waits until every VM in `names` runs on a host, failing the test (with the logs) after
    /// `timeout`.
    pub fn wait_running(&self, names: &[&str], timeout: Duration) -> Vec<VmInfo> {
        let start = Instant::now();
        loop {
            let last = self.vms();
            let ok = names.iter().all(|n| {
                last.iter()
                    .any(|v| v.name == *n && v.state == VmState::Running && v.host.is_some())
            });
            if ok {
                return last;
            }
            assert!(
                start.elapsed() < timeout,
                "{names:?} not all running within {timeout:?}: {last:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until task `id` has succeeded or failed, failing the test (with the logs) after
    /// `timeout`; the task.
    pub fn wait_task(&self, id: u64, timeout: Duration) -> TaskInfo {
        let start = Instant::now();
        loop {
            let (st, body) = self.api("GET", &format!("/v1/tasks/{id}"), None);
            assert_eq!(st, 200, "GET /v1/tasks/{id}: {body}");
            let t: TaskInfo = serde_json::from_str(&body).unwrap();
            if matches!(t.state, TaskState::Succeeded | TaskState::Failed) {
                return t;
            }
            assert!(
                start.elapsed() < timeout,
                "task {id} not done in {timeout:?}: {t:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn host(&self, name: &str) -> &LabHost {
        self.info.hosts.iter().find(|h| h.name == name).unwrap()
    }

    /// What VM `vm`'s console wrote on `host` so far.
    pub fn console(&self, host: &str, vm: &str) -> String {
        std::fs::read_to_string(self.host(host).runtime_dir.join(format!("{vm}.console")))
            .unwrap_or_default()
    }

    /// `tern cluster up`'s stderr and the last lines of each of the cluster's logs.
    pub fn logs(&self) -> String {
        let dir = self.info.state_file.parent().unwrap().join("logs");
        let mut s = format!(
            "--- cluster up stderr:\n{}",
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        );
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            s += &format!(
                "\n--- {}:\n{}",
                e.path().display(),
                lines[lines.len().saturating_sub(12)..].join("\n")
            );
        }
        s
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !matches!(child.try_wait(), Ok(Some(_))) {
            let _ = child.kill();
            let _ = child.wait();
            let _ = Command::new(tern())
                .args(["cluster", "down", "--name", &self.info.name])
                .status();
        }
    }
}

/// The rustls client configuration of a `tern pki` directory (its CA trusted, its certificate
/// presented).
pub fn client_config(dir: &Path) -> Arc<rustls::ClientConfig> {
    tern_pki::TlsDir::load(dir)
        .unwrap_or_else(|e| panic!("--tls-dir {}: {e}", dir.display()))
        .client_config()
}

/// One HTTP/1.1 request (`Connection: close`), from inside namespace `ns` if given; an
/// `https://` URL needs `tls`.
pub fn http(
    tls: Option<&Arc<rustls::ClientConfig>>,
    ns: Option<&str>,
    base: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), String> {
    let (host, https) = match base.split_once("://") {
        Some(("https", rest)) => (rest.trim_end_matches('/'), true),
        _ => (
            base.trim_start_matches("http://").trim_end_matches('/'),
            false,
        ),
    };
    let addr: SocketAddr = host.parse().map_err(|e| format!("{base}: {e}"))?;
    let stream = match ns {
        Some(ns) => tern_netlab::ns::connect_from(ns, addr, Duration::from_secs(2)),
        None => TcpStream::connect_timeout(&addr, Duration::from_secs(2)),
    }
    .map_err(|e| format!("connect {base}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut raw = Vec::new();
    if https {
        let cfg = tls.ok_or_else(|| format!("{base}: an https URL and no TLS settings"))?;
        let name = tern_pki::TlsDir::server_name(&addr.ip().to_string());
        let conn =
            rustls::ClientConnection::new(Arc::clone(cfg), name).map_err(|e| e.to_string())?;
        let mut tls = rustls::StreamOwned::new(conn, stream);
        tls.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        match tls.read_to_end(&mut raw) {
            // hyper closes after `Connection: close` without TLS's close_notify
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
            r => {
                r.map_err(|e| e.to_string())?;
            }
        }
    } else {
        let mut stream = stream;
        stream
            .write_all(req.as_bytes())
            .map_err(|e| e.to_string())?;
        stream.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").ok_or("no header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("bad status line")?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok((status, body))
}

/// The body of a `Transfer-Encoding: chunked` response.
fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out += &rest[..n];
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The sequence numbers of the `HB ` lines in a test guest's console, in order.
pub fn hb_seqs(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter(|l| l.starts_with("HB "))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|f| f.strip_prefix("seq=")?.parse().ok())
        })
        .collect()
}
