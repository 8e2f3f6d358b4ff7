//! The dashboard in a real browser: etcd, two `tern controller`s (a leader and a follower), two
//! `tern agent`s running real test-guest VMMs, and Debian's `chromium` headless, driven over the
//! Chrome DevTools Protocol (a WebSocket; `Runtime`, `Log`, `Page`, `Input`).
//!
//! It checks that the page loads with no console error, exception or failed request; shows the
//! hosts and the VMs where the API says they run, with a command line full of markup shown as
//! text (no element made from it); shows a migration in flight (the target's agent is frozen with
//! SIGSTOP so the task stays running) and the VM on its new host once it is done, without a
//! reload; on the follower, names the leader and links to it; plots the automation loop's series;
//! and that clicking "Apply" on a proposed plan makes the controller carry it out. Everything runs
//! over TLS with certificates of a scratch CA (`tern-pki`): the test calls the API as the admin
//! user, Chromium (which ignores the scratch CA being unknown to it) opens the page with an admin
//! bearer token in the URL's fragment, which the page must take off the address bar; at the end,
//! with no token stored, the page asks for one (401) and shows the cluster once it is typed in.
//! Needs root, KVM, etcd and chromium (fails loudly without them).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tern_test_support::{ChildGuard, Etcd, free_port, require_kvm, require_tools, wait_for, which};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// The controllers' election lease.
const CONTROLLER_TTL_MS: u64 = 3_000;
/// The agents' lease: long, so an agent frozen for a few seconds keeps its host.
const AGENT_TTL_MS: u64 = 30_000;
/// The admin's bearer token (its hash is in the controllers' token file).
const ADMIN_TOKEN: &str = "dashboard-admin-token-0123456789";

/// TLS as the admin user, for the test's own `https://` calls.
static ADMIN_TLS: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();

/// A byte stream, plain or TLS.
trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

// ----- HTTP to the controllers (status, headers, body) -----

struct Reply {
    status: u16,
    headers: String,
    body: Value,
}

fn http(method: &str, base: &str, path: &str, body: Option<&Value>) -> Reply {
    try_http(method, base, path, body)
        .unwrap_or_else(|e| panic!("{method} {base}{path}: cannot connect: {e}"))
}

/// [`http`], or the error if nothing listens (yet).
fn try_http(method: &str, base: &str, path: &str, body: Option<&Value>) -> std::io::Result<Reply> {
    let https = base.starts_with("https://");
    let addr = base
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut s: Box<dyn Stream> = if https {
        let cfg = ADMIN_TLS.get().expect("the admin's TLS settings").clone();
        let conn = rustls::ClientConnection::new(cfg, tern_pki::TlsDir::server_name("127.0.0.1"))
            .map_err(std::io::Error::other)?;
        Box::new(rustls::StreamOwned::new(conn, tcp))
    } else {
        Box::new(tcp)
    };
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // Read the head, then exactly Content-Length bytes (Chromium's DevTools server may keep the
    // connection open), else to the end.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s
            .read(&mut chunk)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        assert!(
            n > 0,
            "{method} {path}: the connection closed before the head ended"
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut rest = buf[head_end + 4..].to_vec();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: no status in {head:?}"));
    let length = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    });
    match length {
        Some(len) => {
            while rest.len() < len {
                let n = s
                    .read(&mut chunk)
                    .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
                assert!(n > 0, "{method} {path}: the body ended early");
                rest.extend_from_slice(&chunk[..n]);
            }
            rest.truncate(len);
        }
        None => match s.read_to_end(&mut rest) {
            // a TLS peer closing without close_notify after `Connection: close`
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
            r => {
                r.unwrap();
            }
        },
    }
    let rest = String::from_utf8_lossy(&rest).into_owned();
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let raw = if chunked { dechunk(&rest) } else { rest };
    let body = if raw.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&raw).unwrap_or(Value::String(raw))
    };
    Ok(Reply {
        status,
        headers: head,
        body,
    })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn get(base: &str, path: &str) -> Value {
    let r = http("GET", base, path, None);
    assert_eq!(r.status, 200, "GET {path}: {}", r.body);
    r.body
}

fn header<'a>(r: &'a Reply, name: &str) -> Option<&'a str> {
    r.headers.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

// ----- the cluster -----

fn controller(etcd: &str, port: u16, pki: &Path, name: &str, log: &Path) -> ChildGuard {
    let child = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["controller", "--etcd", etcd])
        .arg("--tls-dir")
        .arg(pki.join(name))
        .arg("--tokens")
        .arg(pki.join("tokens"))
        .args(["--admins", "admin"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--lease-ttl-ms", &CONTROLLER_TTL_MS.to_string()])
        .args(["--agent-lease-ttl-ms", &AGENT_TTL_MS.to_string()])
        .args(["--ha-reserve-hosts", "0"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("tern controller starts");
    ChildGuard(child)
}

fn agent(etcd: &str, host: &str, port: u16, pki: &Path, dir: &Path) -> ChildGuard {
    std::fs::create_dir_all(dir).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["agent", "--host-id", host, "--etcd", etcd])
        .arg("--tls-dir")
        .arg(pki.join(host))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--cores", "2", "--memory-mib", "2048"])
        .args(["--lease-ttl-ms", &AGENT_TTL_MS.to_string()])
        .args(["--report-interval-ms", "500"])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--runtime-dir")
        .arg(dir.join("run"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("agent.log")).unwrap())
        .spawn()
        .expect("tern agent starts");
    ChildGuard(child)
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

fn vm_info(leader: &str, name: &str) -> Value {
    get(leader, &format!("/v1/vms/{name}"))
}

/// Polls `ok` every 100 ms until it holds; after `timeout` panics naming `what` with `context()`
/// (the API's view and the processes' logs).
fn wait_until(
    what: &str,
    timeout: Duration,
    mut ok: impl FnMut() -> bool,
    context: impl Fn() -> String,
) {
    let start = Instant::now();
    while !ok() {
        if start.elapsed() >= timeout {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                context()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ----- Chromium and the DevTools protocol -----

/// A headless Chromium in its own process group, its profile in a scratch directory; on drop
/// the whole group gets SIGTERM, then SIGKILL, and the directory is removed.
struct Chromium {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Chromium {
    fn start() -> Chromium {
        require_tools(&["chromium"]);
        let exe = which("chromium").expect("chromium is on PATH");
        let dir = tempfile::Builder::new()
            .prefix("tern-dashboard-chromium-")
            .tempdir()
            .unwrap();
        let profile = dir.path().join("profile");
        let child = Command::new(exe)
            .args(["--headless=new", "--remote-debugging-port=0"])
            .arg(format!("--user-data-dir={}", profile.display()))
            // Root cannot use Chromium's sandbox.
            .args(["--no-sandbox", "--disable-gpu", "--no-first-run"])
            // The scratch CA is not in its trust store.
            .arg("--ignore-certificate-errors")
            .args(["--no-default-browser-check", "--disable-extensions"])
            .args(["--disable-background-networking", "--disable-sync"])
            .arg("about:blank")
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("chromium.log")).unwrap())
            .spawn()
            .expect("chromium starts");
        let mut c = Chromium {
            child,
            dir,
            port: 0,
        };
        let active = profile.join("DevToolsActivePort");
        let start = Instant::now();
        c.port = loop {
            let port = std::fs::read_to_string(&active)
                .ok()
                .and_then(|t| t.lines().next()?.trim().parse::<u16>().ok());
            if let Some(p) = port {
                break p;
            }
            if let Ok(Some(status)) = c.child.try_wait() {
                panic!(
                    "chromium exited ({status}) before writing DevToolsActivePort: {}",
                    c.log()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "chromium wrote no DevToolsActivePort within 30 s: {}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        c
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("chromium.log")).unwrap_or_default()
    }

    /// The DevTools WebSocket URL of the browser's first page (`/json/list`).
    fn page_socket(&self) -> String {
        let base = format!("http://127.0.0.1:{}", self.port);
        let mut found = None;
        wait_for("chromium's page target", Duration::from_secs(20), || {
            let Ok(list) = try_http("GET", &base, "/json/list", None) else {
                return false;
            };
            let list = list.body;
            found = list.as_array().and_then(|a| {
                a.iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(String::from))
            });
            found.is_some()
        });
        found.unwrap()
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let group = self.child.id();
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{group}")])
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Whatever of the group is left (renderers, zygotes).
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{group}")])
            .status();
        let _ = self.child.wait();
    }
}

/// One page's DevTools session: commands by id, events kept for the error check.
struct Cdp {
    ws: WebSocket<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    events: Vec<Value>,
}

impl Cdp {
    fn connect(url: &str) -> Cdp {
        let (ws, _) = tungstenite::connect(url).unwrap_or_else(|e| panic!("connect {url}: {e}"));
        if let MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
        }
        let mut cdp = Cdp {
            ws,
            next_id: 0,
            events: Vec::new(),
        };
        for domain in ["Runtime.enable", "Log.enable", "Page.enable"] {
            cdp.call(domain, json!({}));
        }
        // A fixed, tall viewport: every panel is laid out on screen.
        cdp.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1280, "height": 2400, "deviceScaleFactor": 1, "mobile": false}),
        );
        cdp
    }

    /// Reads one message if one arrives within the socket's timeout.
    fn read(&mut self) -> Option<Value> {
        match self.ws.read() {
            Ok(Message::Text(t)) => Some(serde_json::from_str(t.as_str()).unwrap()),
            Ok(_) => None,
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("DevTools socket: {e}"),
        }
    }

    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"id": id, "method": method, "params": params});
        self.ws
            .send(Message::text(msg.to_string()))
            .unwrap_or_else(|e| panic!("{method}: {e}"));
        let start = Instant::now();
        loop {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{method}: no answer within 30 s"
            );
            let Some(v) = self.read() else { continue };
            if v["id"] == id {
                assert!(
                    v.get("error").is_none(),
                    "{method} {params}: {}",
                    v["error"]
                );
                return v["result"].clone();
            }
            if v.get("method").is_some() {
                self.events.push(v);
            }
        }
    }

    /// Evaluates `expr` in the page (promises awaited) and returns its value.
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        );
        assert!(
            r.get("exceptionDetails").is_none(),
            "{expr}: {}",
            r["exceptionDetails"]
        );
        r["result"]["value"].clone()
    }

    fn navigate(&mut self, url: &str) {
        let r = self.call("Page.navigate", json!({"url": url}));
        assert!(r.get("errorText").is_none(), "navigate {url}: {r}");
        self.wait("the page to load", Duration::from_secs(20), |c| {
            c.eval("document.readyState") == "complete"
        });
    }

    /// Polls `ok` every 100 ms (events keep being collected) until it holds.
    fn wait(&mut self, what: &str, timeout: Duration, mut ok: impl FnMut(&mut Cdp) -> bool) {
        let start = Instant::now();
        while !ok(self) {
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}; page text:\n{}",
                self.eval("document.body.innerText")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Console errors, uncaught exceptions and error log entries (failed requests, CSP
    /// violations) seen so far.
    fn errors(&mut self) -> Vec<String> {
        while let Some(v) = self.read() {
            if v.get("method").is_some() {
                self.events.push(v);
            }
        }
        self.events
            .iter()
            .filter_map(|e| {
                let p = &e["params"];
                match e["method"].as_str()? {
                    "Runtime.exceptionThrown" => Some(format!(
                        "exception: {} {}",
                        p["exceptionDetails"]["text"],
                        p["exceptionDetails"]["exception"]["description"]
                    )),
                    "Runtime.consoleAPICalled"
                        if matches!(p["type"].as_str(), Some("error" | "assert")) =>
                    {
                        Some(format!("console.{}: {}", p["type"], p["args"]))
                    }
                    "Log.entryAdded" if p["entry"]["level"] == "error" => Some(format!(
                        "log ({}): {} {}",
                        p["entry"]["source"], p["entry"]["text"], p["entry"]["url"]
                    )),
                    _ => None,
                }
            })
            .collect()
    }

    fn assert_no_errors(&mut self, when: &str) {
        let errors = self.errors();
        assert!(
            errors.is_empty(),
            "{when}: the page logged errors: {errors:#?}"
        );
    }

    /// Clicks the element `selector` names with a real mouse press and release at its centre.
    fn click(&mut self, selector: &str) {
        let sel = serde_json::to_string(selector).unwrap();
        let at = self.eval(&format!(
            "(() => {{ const e = document.querySelector({sel}); if (!e) return null; \
             e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); \
             return {{x: r.x + r.width / 2, y: r.y + r.height / 2}}; }})()"
        ));
        assert!(at.is_object(), "nothing matches {selector}");
        for kind in ["mouseMoved", "mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": at["x"], "y": at["y"], "button": "left", "clickCount": 1}),
            );
        }
    }

    /// The text of each row's cells in the table body `id`.
    fn rows(&mut self, body_id: &str) -> Vec<Vec<String>> {
        let v = self.eval(&format!(
            "[...document.querySelectorAll('#{body_id} tr')].map(r => [...r.cells].map(c => c.textContent))"
        ));
        serde_json::from_value(v).unwrap()
    }
}

// ----- the test -----

#[test]
fn the_dashboard_shows_the_cluster_live_and_applies_a_plan_in_a_real_browser() {
    require_kvm();
    require_tools(&["chromium", "etcd"]);
    let etcd = Etcd::start();
    let dir = tempfile::Builder::new()
        .prefix("tern-dashboard-")
        .tempdir()
        .unwrap();

    // The PKI: a CA, the controllers', the hosts' and the admin's certificates, an admin token.
    let pki = dir.path().join("pki");
    tern_pki::init_ca(&pki).unwrap();
    let o = tern_pki::IssueOptions::default();
    for (name, role) in [
        ("c0", tern_pki::Role::Controller),
        ("c1", tern_pki::Role::Controller),
        ("h1", tern_pki::Role::Host),
        ("h2", tern_pki::Role::Host),
        ("admin", tern_pki::Role::User),
    ] {
        tern_pki::issue(&pki, name, role, &o).unwrap();
    }
    let line = tern_api::auth::token_line("browser", tern_api::auth::Role::Admin, ADMIN_TOKEN);
    std::fs::write(pki.join("tokens"), line.unwrap() + "\n").unwrap();
    let admin = tern_pki::TlsDir::load(&pki.join("admin")).unwrap();
    let _ = ADMIN_TLS.set(admin.client_config());

    let ports = [free_port(), free_port()];
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("https://127.0.0.1:{p}"))
        .collect();
    let _controllers: Vec<ChildGuard> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let log = dir.path().join(format!("c{i}.log"));
            controller(&etcd.url, *p, &pki, &format!("c{i}"), &log)
        })
        .collect();
    let agent_ports = [free_port(), free_port()];
    let agents: Vec<ChildGuard> = ["h1", "h2"]
        .iter()
        .zip(agent_ports)
        .map(|(h, p)| agent(&etcd.url, h, p, &pki, &dir.path().join(h)))
        .collect();
    let logs = || {
        let mut s = String::new();
        for f in ["c0.log", "c1.log", "h1/agent.log", "h2/agent.log"] {
            let t = std::fs::read_to_string(dir.path().join(f)).unwrap_or_default();
            let tail: Vec<&str> = t.lines().rev().take(15).collect();
            s += &format!(
                "--- {f}\n{}\n",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        s
    };

    // One controller leads (its own /dashboard/leader says so); the other knows it.
    let mut lead = None;
    wait_for("a controller to lead", Duration::from_secs(30), || {
        lead = (0..2).find(|i| {
            try_http("GET", &urls[*i], "/dashboard/leader", None)
                .is_ok_and(|r| r.status == 200 && r.body["leading"] == true)
        });
        lead.is_some()
    });
    let (l, f) = (lead.unwrap(), 1 - lead.unwrap());
    let (leader, follower) = (urls[l].as_str(), urls[f].as_str());
    wait_for(
        "the follower to name the leader",
        Duration::from_secs(10),
        || {
            let r = http("GET", follower, "/dashboard/leader", None);
            r.body["leading"] == false && r.body["leader_url"] == leader
        },
    );

    // Both hosts up and reported: VMs can be created.
    let web = json!({"name": "web-1", "vcpus": 1, "memory_mib": 64,
        "kernel": "builtin:testguest", "cmdline": "tern.hb_ms=1000"});
    // VM names are restricted, but a command line is free text: it must show as text.
    let markup = "tern.hb_ms=1000 note=<img/src=x/onerror=alert(1)><b>bold</b>&amp;";
    let db = json!({"name": "db-1", "vcpus": 1, "memory_mib": 64,
        "kernel": "builtin:testguest", "cmdline": markup});
    for spec in [&web, &db] {
        let start = Instant::now();
        loop {
            let r = http("POST", leader, "/v1/vms", Some(spec));
            if r.status == 201 {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30) && r.status == 503,
                "creating {}: {} {}\n{}",
                spec["name"],
                r.status,
                r.body,
                logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    for vm in ["web-1", "db-1"] {
        wait_until(
            &format!("{vm} running"),
            Duration::from_secs(60),
            || vm_info(leader, vm)["state"] == "running",
            || format!("{}\n{}", vm_info(leader, vm), logs()),
        );
    }

    // The page's headers.
    let page = http("GET", leader, "/", None);
    assert_eq!(page.status, 200);
    assert_eq!(
        header(&page, "content-type"),
        Some("text/html; charset=utf-8")
    );
    let csp = header(&page, "content-security-policy").expect("a CSP header");
    assert!(
        csp.starts_with("default-src 'none'") && csp.contains("script-src 'sha256-"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe"), "{csp}");

    let chromium = Chromium::start();
    let mut cdp = Cdp::connect(&chromium.page_socket());

    // 1. The leader's page shows the hosts and the VMs where the API says they run. The token
    // comes in the URL's fragment and leaves the address bar at once.
    cdp.navigate(&format!("{leader}/#token={ADMIN_TOKEN}"));
    cdp.wait(
        "the token off the address bar",
        Duration::from_secs(10),
        |c| c.eval("location.hash") == "",
    );
    assert_eq!(
        cdp.eval("sessionStorage.getItem('tern-token')"),
        ADMIN_TOKEN
    );
    cdp.wait("the hosts table", Duration::from_secs(20), |c| {
        let names: Vec<String> = c.rows("hosts-body").iter().map(|r| r[0].clone()).collect();
        names == ["h1", "h2"]
    });
    let hosts = get(leader, "/v1/hosts");
    for row in cdp.rows("hosts-body") {
        let h = hosts
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == row[0].as_str())
            .unwrap();
        assert_eq!(row[1], "up", "{row:?}");
        assert_eq!(row[3], "on", "power: {row:?}");
        for vm in h["vms"].as_array().unwrap() {
            assert!(row[8].contains(vm.as_str().unwrap()), "{row:?} vs {h}");
        }
    }
    let where_ = |vm: &str| vm_info(leader, vm)["host"].as_str().unwrap().to_string();
    cdp.wait(
        "both VMs running where the API says",
        Duration::from_secs(10),
        |c| {
            let rows = c.rows("vms-body");
            ["web-1", "db-1"].iter().all(|vm| {
                rows.iter()
                    .any(|r| r[0] == *vm && r[1] == where_(vm) && r[2] == "running")
            })
        },
    );
    // The markup in the command line is text: shown verbatim, no element made from it.
    let shown = cdp.rows("vms-body");
    let db_row = shown.iter().find(|r| r[0] == "db-1").unwrap();
    assert_eq!(db_row[6], markup);
    assert_eq!(
        cdp.eval("document.querySelectorAll('img, b').length"),
        0,
        "an element was made from API data"
    );
    let summary = cdp.eval("document.getElementById('summary').textContent");
    assert!(
        summary
            .as_str()
            .unwrap()
            .contains("2 of 2 hosts up · 2 of 2 VMs running"),
        "{summary}"
    );
    cdp.assert_no_errors("the leader's page");

    // 2. A migration in flight, with its predicted cost: the target's agent is frozen, so the task
    // stays running.
    let from = where_("web-1");
    let to = if from == "h1" { "h2" } else { "h1" };
    let target_agent = &agents[if to == "h1" { 0 } else { 1 }];
    signal(target_agent.id(), "STOP");
    let r = http(
        "POST",
        leader,
        "/v1/vms/web-1/migrate",
        Some(&json!({"to": to})),
    );
    // (If this panics, dropping the agent's guard kills it, stopped or not.)
    let moved = {
        assert_eq!(r.status, 202, "{}", r.body);
        let task = r.body["task"].as_u64().unwrap();
        cdp.wait("the migration in flight", Duration::from_secs(15), |c| {
            c.rows("tasks-body").iter().any(|r| {
                r[0] == task.to_string()
                    && r[1] == "migrate"
                    && r[2] == "web-1"
                    && r[3] == from
                    && r[4] == to
                    && r[5] == "running"
                    // the controller's prediction for it (time and pause)
                    && r[6].ends_with(" ms")
                    && r[6].contains(" s, downtime ")
            })
        });
        task
    };
    signal(target_agent.id(), "CONT");
    let task = || get(leader, &format!("/v1/tasks/{moved}"));
    wait_until(
        "the migration to succeed",
        Duration::from_secs(60),
        || {
            let t = task();
            assert_ne!(t["state"], "failed", "{t}\n{}", logs());
            t["state"] == "succeeded"
        },
        || format!("{}\n{}", task(), logs()),
    );
    // The page follows without a reload: the VM on its new host, nothing in flight.
    cdp.wait("web-1 on its new host", Duration::from_secs(15), |c| {
        let vms = c.rows("vms-body");
        let tasks = c.rows("tasks-body");
        vms.iter()
            .any(|r| r[0] == "web-1" && r[1] == to && r[2] == "running")
            && tasks.len() == 1
            && tasks[0][0] == "No migration under way."
    });
    cdp.assert_no_errors("the migration");

    // 3. The follower's page names the leader and links to its dashboard, asking /v1 nothing
    // (another origin: its own sessionStorage, so the token comes again in the fragment).
    cdp.navigate(&format!("{follower}/#token={ADMIN_TOKEN}"));
    cdp.wait("the not-the-leader banner", Duration::from_secs(10), |c| {
        c.eval("document.getElementById('banner').hidden") == false
            && c.eval(&format!(
                "!!document.querySelector('#banner a[href=\"{leader}/\"]')"
            )) == true
    });
    let text = cdp.eval("document.getElementById('banner').textContent");
    assert!(
        text.as_str().unwrap().contains("does not lead") && text.as_str().unwrap().contains(leader),
        "{text}"
    );
    assert_eq!(cdp.rows("hosts-body").len(), 0);
    cdp.assert_no_errors("the follower's page");

    // 4. The automation loop's series plotted, and a proposed plan applied from the page.
    plan_applied_from_the_page(&mut cdp, leader, &logs);
    cdp.assert_no_errors("applying a plan");

    // 5. No token stored: the page gets 401, asks for one, and shows the cluster once it is typed.
    cdp.eval("sessionStorage.clear()");
    cdp.navigate(&format!("{leader}/"));
    cdp.wait("the token form", Duration::from_secs(10), |c| {
        c.eval("document.getElementById('login').hidden") == false
    });
    assert_eq!(
        cdp.rows("hosts-body").len(),
        0,
        "data shown without a token"
    );
    cdp.eval(&format!(
        "document.getElementById('login-token').value = {}; \
         document.getElementById('login').requestSubmit(); true",
        serde_json::to_string(ADMIN_TOKEN).unwrap()
    ));
    cdp.wait(
        "the hosts with the typed token",
        Duration::from_secs(20),
        |c| {
            c.rows("hosts-body").len() == 2
                && c.eval("document.getElementById('login').hidden") == true
        },
    );
    let errors = cdp.errors();
    assert!(
        errors.iter().all(|e| e.contains("401")),
        "only the 401 before the token was typed: {errors:#?}"
    );
}

/// Manual automation: the loop only proposes. Two idle VMs on two hosts: draining one host is the
/// consolidation it proposes. The page plots the loop's series, lists the plan with its buttons,
/// and a real click on "Apply" makes the controller move the VM.
fn plan_applied_from_the_page(cdp: &mut Cdp, leader: &str, logs: &dyn Fn() -> String) {
    let hosts = get(leader, "/v1/hosts");
    let used = hosts
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| !h["vms"].as_array().unwrap().is_empty())
        .count();
    assert_eq!(used, 2, "each host runs one VM: {hosts}");
    let mut policy = get(leader, "/v1/policy");
    policy["automation"] = json!("manual");
    policy["interval_s"] = json!(2);
    policy["hold_s"] = json!(0);
    policy["min_improvement_pct"] = json!(0);
    policy["cooldown_s"] = json!(0);
    policy["power"]["enabled"] = json!(false);
    let r = http("PUT", leader, "/v1/policy", Some(&policy));
    assert_eq!(r.status, 200, "PUT /v1/policy: {}", r.body);

    let mut plan = Value::Null;
    let why = || {
        let series = get(leader, "/v1/stats/series");
        let hosts = get(leader, "/v1/hosts");
        let vms = get(leader, "/v1/vms");
        let plans = get(leader, "/v1/plans");
        format!(
            "plans {plans}\nseries {series}\nhosts {hosts}\nvms {vms}\n{}",
            logs()
        )
    };
    wait_until(
        "a proposed plan",
        Duration::from_secs(60),
        || {
            let plans = get(leader, "/v1/plans");
            plan = plans
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["state"] == "proposed")
                .cloned()
                .unwrap_or(Value::Null);
            !plan.is_null()
        },
        why,
    );
    let id = plan["id"].as_u64().unwrap();
    let moves: Vec<(String, String)> = plan["actions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == "migrate")
        .map(|a| {
            (
                a["vm"].as_str().unwrap().to_string(),
                a["to"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(!moves.is_empty(), "plan {id} moves nothing: {plan}");

    cdp.navigate(&format!("{leader}/#token={ADMIN_TOKEN}"));
    // The series: each plot draws a line through the loop's points, the latest value in its
    // caption.
    cdp.wait("the plots", Duration::from_secs(20), |c| {
        c.eval(
            "['plot-hosts', 'plot-energy', 'plot-sla'].every(id => { \
               const l = document.querySelector('#' + id + ' polyline'); \
               return l && l.getAttribute('points').split(' ').length >= 2; })",
        ) == true
    });
    let series = get(leader, "/v1/stats/series");
    let last_on = series["points"].as_array().unwrap().last().unwrap()["hosts_on"].clone();
    cdp.wait("the hosts-on caption", Duration::from_secs(10), |c| {
        c.eval("document.querySelector('#plot-hosts figcaption span').textContent")
            == format!("(now {last_on})").as_str()
    });

    // The plan's row, with labelled buttons; a real click on Apply.
    let apply = format!("#plans-body button[aria-label=\"Apply plan {id}\"]");
    let reject = format!("#plans-body button[aria-label=\"Reject plan {id}\"]");
    let exists = |c: &mut Cdp, sel: &str| {
        c.eval(&format!(
            "!!document.querySelector({})",
            serde_json::to_string(sel).unwrap()
        )) == true
    };
    cdp.wait("the plan's Apply button", Duration::from_secs(15), |c| {
        exists(c, &apply)
    });
    assert!(exists(cdp, &reject), "plan {id} has no Reject button");
    let row = cdp
        .rows("plans-body")
        .into_iter()
        .find(|r| r[0] == id.to_string())
        .unwrap();
    assert_eq!(row[1], "proposed", "{row:?}");
    for (vm, to) in &moves {
        assert!(
            row[3].contains(&format!("migrate {vm} from")) && row[3].contains(&format!("to {to}")),
            "{row:?}"
        );
    }
    cdp.click(&apply);
    wait_until(
        "the plan to be applied",
        Duration::from_secs(30),
        || {
            let state = &get(leader, &format!("/v1/plans/{id}"))["state"];
            assert!(
                state == "proposed" || state == "applying" || state == "applied",
                "plan {id} is {state}\n{}",
                logs()
            );
            state == "applying" || state == "applied"
        },
        why,
    );
    cdp.wait("the page to say so", Duration::from_secs(10), |c| {
        let msg = c.eval("document.getElementById('plans-msg').textContent");
        msg.as_str()
            .unwrap_or("")
            .starts_with(&format!("Plan {id} applied"))
    });
    // Carried out: the VMs run where the plan sends them, and the page shows the plan applied.
    wait_until(
        "the plan's moves",
        Duration::from_secs(60),
        || {
            let state = &get(leader, &format!("/v1/plans/{id}"))["state"];
            assert!(state != "failed", "plan {id} failed\n{}", logs());
            state == "applied"
                && moves.iter().all(|(vm, to)| {
                    let v = vm_info(leader, vm);
                    v["host"] == to.as_str() && v["state"] == "running"
                })
        },
        why,
    );
    cdp.wait("the plan shown applied", Duration::from_secs(10), |c| {
        c.rows("plans-body")
            .iter()
            .any(|r| r[0] == id.to_string() && r[1] == "applied")
    });
}
