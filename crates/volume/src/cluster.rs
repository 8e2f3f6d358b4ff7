//! The etcd shell around a [`Node`]: coordinator election under a short-TTL etcd lease, the
//! coordinator generation (the etcd revision of the winning election key), membership with path
//! state, and the node's periodic duties (lease renewal, path probing, fault-file watching).
//!
//! Step-down rule: the coordinator's right to write metadata ends at `last keep-alive sent + TTL`
//! on its own clock, which is never later than etcd's own expiry of the session; no metadata is
//! written past that instant even if the process was frozen and resumed.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions, PutOptions};
use serde_json::json;

use crate::format::NodeId;
use crate::lease::WatchdogTimings;
use crate::node::{LeaderInfo, Node, NodeConfig, NodeExports};

/// Options of `tern volume serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The LUN.
    pub lun: PathBuf,
    /// Node id (≥ 1).
    pub node_id: NodeId,
    /// Listen address (NBD + control).
    pub listen: String,
    /// etcd endpoints.
    pub etcd: Vec<String>,
    /// Never use the direct path.
    pub no_direct: bool,
    /// While this file exists, every LUN access fails (injected path loss). With it, the node's
    /// LUN also gets a volatile write cache (unflushed writes are lost with the path).
    pub fault_file: Option<PathBuf>,
    /// While this file exists, this node cannot reach other nodes (injected partition).
    pub partition_file: Option<PathBuf>,
    /// etcd session TTL for the coordinator election, seconds.
    pub session_ttl_s: i64,
    /// Write-lease TTL, milliseconds.
    pub lease_ttl_ms: u64,
    /// Mutual TLS (a `tern pki issue` directory for host `node-ID`): required on the port, and
    /// presented to the other nodes.
    pub tls_dir: Option<PathBuf>,
    /// Connections served at once.
    pub max_connections: usize,
    /// From accept to the selected export.
    pub handshake_timeout: Duration,
    /// Idle connections in transmission are closed after this (`None`: never).
    pub idle_timeout: Option<Duration>,
}

/// Why the service could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Node id 0.
    #[error("Node ids start at 1")]
    BadNodeId,
    /// LUN unusable.
    #[error("Cannot use the LUN {path}")]
    Open {
        /// LUN path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: crate::store::OpenError,
    },
    /// Listen failed.
    #[error("Cannot listen on {addr}")]
    Listen {
        /// Address.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// etcd unreachable at start.
    #[error("Cannot reach etcd at {}: {why}", endpoints.join(","))]
    Etcd {
        /// Endpoints.
        endpoints: Vec<String>,
        /// What went wrong.
        why: String,
    },
    /// The TLS directory is unusable, or its certificate is not this node's.
    #[error("Cannot use --tls-dir {dir}: {why}")]
    Tls {
        /// The directory.
        dir: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Runtime failure.
    #[error("Service I/O failed")]
    Io(#[from] std::io::Error),
}

/// Load the node's TLS directory and check its certificate is volume node `node_id`'s. The
/// server side follows `ca-crl.pem` as it changes (a node is long-running and never runs inside
/// the sandboxed VMM, whose volume-disk client keeps [`crate::control::set_client_tls`]'s list
/// read once), so a revoked peer is refused at its next connection without a restart.
fn node_tls(dir: &std::path::Path, node_id: NodeId) -> Result<tern_nbd::ServerTls, ServeError> {
    let err = |why: String| ServeError::Tls {
        dir: dir.to_owned(),
        why,
    };
    let tls =
        tern_pki::TlsDir::load_watching(dir).map_err(|e| err(crate::control::error_chain(&e)))?;
    let me = tls.identity();
    let want = crate::control::certificate_name_of_node(node_id);
    if me.role != tern_pki::Role::Host || me.name != want {
        return Err(err(format!(
            "its certificate is {me} (name {:?}, role {}); node {node_id} needs a host certificate \
             named {want:?} (tern pki issue --role host --name {want})",
            me.name, me.role
        )));
    }
    crate::control::set_client_tls(dir).map_err(|e| err(crate::control::error_chain(&e)))?;
    Ok(tern_nbd::ServerTls {
        config: tls.server_config(),
        identify: Arc::new(|c| {
            tern_pki::peer_identity(c)
                .map(|i| tern_nbd::PeerId {
                    name: i.name,
                    role: i.role.to_string(),
                })
                .map_err(|e| e.to_string())
        }),
    })
}

/// How long `serve` keeps trying an etcd that does not answer yet before it gives up.
const ETCD_START_WAIT: Duration = Duration::from_secs(10);

fn uuid_hex(node: &Node) -> String {
    node.superblock()
        .uuid
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn election_name(node: &Node) -> String {
    format!("tern/volume/{}/coordinator", uuid_hex(node))
}

fn members_prefix(node: &Node) -> String {
    format!("tern/volume/{}/nodes/", uuid_hex(node))
}

/// The etcd leases a node holds: its coordinator session (while campaigning or in office) and
/// its membership entry. A clean stop revokes both, so the others elect a new coordinator and
/// drop this node from `status` at once instead of after the TTLs.
#[derive(Debug, Default)]
struct EtcdLeases {
    session: AtomicI64,
    member: AtomicI64,
}

/// Run a node until the process is killed, or stopped with SIGINT/SIGTERM: then it flushes
/// every open file, steps down, leaves the membership list and exits with status 0. Write
/// leases it holds are not released (a local VM disk may still be writing under them): they
/// expire after their TTL.
pub fn serve(opts: ServeOptions) -> Result<(), ServeError> {
    if let Ok(spec) = std::env::var(COMMIT_WATCHDOG_ENV) {
        return commit_watchdog_main(&spec, opts.node_id);
    }
    if opts.node_id == 0 {
        return Err(ServeError::BadNodeId);
    }
    let tls = match &opts.tls_dir {
        Some(d) => Some(node_tls(d, opts.node_id)?),
        None => None,
    };
    // Bind first, so a `:0` port resolves to the address peers must use.
    let listener = TcpListener::bind(&opts.listen).map_err(|source| ServeError::Listen {
        addr: opts.listen.clone(),
        source,
    })?;
    let listen = listener.local_addr()?.to_string();
    let cfg = NodeConfig {
        node_id: opts.node_id,
        listen: listen.clone(),
        no_direct: opts.no_direct,
        lease_ttl_ms: opts.lease_ttl_ms,
        lun: std::path::absolute(&opts.lun).unwrap_or_else(|_| opts.lun.clone()),
        fault_file: opts
            .fault_file
            .as_ref()
            .map(|f| std::path::absolute(f).unwrap_or_else(|_| f.clone())),
    };
    let node = Node::new(cfg, &opts.lun).map_err(|source| ServeError::Open {
        path: opts.lun.clone(),
        source,
    })?;
    if opts.fault_file.is_some() {
        node.set_volatile_cache(true);
    }
    if !opts.no_direct {
        node.set_commit_watchdog(Box::new(spawn_commit_watchdog(
            opts.node_id,
            opts.session_ttl_s as u64 * 1000,
        )?));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let etcd_error = |why: String| ServeError::Etcd {
        endpoints: opts.etcd.clone(),
        why,
    };
    // With --tls-dir and https:// endpoints, etcd is reached over TLS: the CA as the only trust
    // anchor, the node's certificate as client certificate (etcd's --client-cert-auth).
    let etcd_options = match &opts.tls_dir {
        Some(dir) if opts.etcd.iter().any(|e| e.starts_with("https://")) => {
            let read = |name: &str| {
                std::fs::read(dir.join(name)).map_err(|e| ServeError::Tls {
                    dir: dir.clone(),
                    why: format!("{name}: {e}"),
                })
            };
            let tls = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read("ca-cert.pem")?))
                .identity(etcd_client::Identity::from_pem(
                    read("client-cert.pem")?,
                    read("client-key.pem")?,
                ));
            Some(etcd_client::ConnectOptions::new().with_tls(tls))
        }
        _ => None,
    };
    // The client connects lazily: make one real request so a wrong --etcd fails here, clearly.
    // An etcd started a moment ago (`etcd &` just before) gets up to ETCD_START_WAIT to answer.
    let client = rt.block_on(async {
        let started = tokio::time::Instant::now();
        let mut told = false;
        loop {
            let connect = async {
                let mut c = Client::connect(&opts.etcd, etcd_options.clone()).await?;
                c.get("tern/volume/probe", None).await?;
                Ok::<_, etcd_client::Error>(c)
            };
            let why = match tokio::time::timeout(Duration::from_secs(2), connect).await {
                Ok(Ok(c)) => return Ok(c),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer within 2 s".to_string(),
            };
            if started.elapsed() >= ETCD_START_WAIT {
                return Err(etcd_error(format!(
                    "{why} (tried for {} s)",
                    ETCD_START_WAIT.as_secs()
                )));
            }
            if !told {
                eprintln!(
                    "tern volume serve: waiting for etcd at {} ({why})",
                    opts.etcd.join(",")
                );
                told = true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })?;

    let leases = Arc::new(EtcdLeases::default());
    if !opts.no_direct {
        rt.spawn(election_loop(
            Arc::clone(&node),
            client.clone(),
            opts.session_ttl_s,
            Arc::clone(&leases),
        ));
    }
    rt.spawn(leader_loop(Arc::clone(&node), client.clone()));
    rt.spawn(watch_loop(
        Arc::clone(&node),
        client.clone(),
        opts.session_ttl_s,
        Arc::clone(&leases),
    ));
    rt.spawn(stop_on_signal(Arc::clone(&node), client.clone(), leases));
    {
        let node = Arc::clone(&node);
        std::thread::spawn(move || {
            loop {
                node.renew_leases();
                std::thread::sleep(Duration::from_millis(
                    (node.config().lease_ttl_ms / 4).max(50),
                ));
            }
        });
    }
    {
        let node = Arc::clone(&node);
        let fault = opts.fault_file.clone();
        let partition = opts.partition_file.clone();
        std::thread::spawn(move || {
            loop {
                if let Some(f) = &fault {
                    node.set_path_lost(f.exists());
                }
                if let Some(f) = &partition {
                    node.set_partitioned(f.exists());
                }
                node.probe_path();
                std::thread::sleep(Duration::from_millis(100));
            }
        });
    }
    eprintln!(
        "tern volume: node {} serving on {listen}{}",
        opts.node_id,
        if tls.is_some() { " (TLS required)" } else { "" }
    );
    // Our kept control connections to the other nodes are never used near their handshake
    // deadline (ours: the cluster's nodes share `--handshake-timeout-ms`), which closes a
    // connection idle in option haggling.
    crate::control_conn::keep_idle_below(opts.handshake_timeout);
    let limits = tern_nbd::ListenerOptions {
        tls,
        max_connections: opts.max_connections,
        handshake_timeout: opts.handshake_timeout,
        // A peer's control connection kept past its own cap (`control_conn`, 50 s) is refused
        // at its next request: a revoked peer's ends within about a minute.
        max_option_age: tern_nbd::server::DEFAULT_MAX_OPTION_AGE,
        idle_timeout: opts.idle_timeout,
        log_prefix: Some(format!("tern volume: node {}", opts.node_id)),
    };
    tern_nbd::run_listener_with(
        listener,
        Arc::new(NodeExports(node)),
        limits,
        Arc::default(),
    )?;
    Ok(())
}

/// On SIGINT or SIGTERM: flush, step down, leave the membership list, say so, exit 0.
async fn stop_on_signal(node: Arc<Node>, mut client: Client, leases: Arc<EtcdLeases>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!(
            "tern volume: node {}: cannot catch SIGINT/SIGTERM; a stop will not be announced",
            node.id()
        );
        return;
    };
    let sig = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    eprintln!(
        "tern volume: node {} stopping ({sig}): flushing open files, leaving the cluster",
        node.id()
    );
    let n = Arc::clone(&node);
    let flushed = tokio::task::spawn_blocking(move || n.flush_all())
        .await
        .unwrap_or(0);
    // Step down first (no metadata written from here on), then let etcd know.
    let was_coordinator = node.is_coordinator();
    node.set_coordinator_deadline(0);
    for id in [
        leases.session.swap(0, Ordering::SeqCst),
        leases.member.swap(0, Ordering::SeqCst),
    ] {
        if id != 0 {
            let _ = tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(id)).await;
        }
    }
    let held = node.held_lease_count();
    eprintln!(
        "tern volume: node {} stopped: {flushed} open file(s) flushed{}{}",
        node.id(),
        if was_coordinator {
            ", coordinator role given up"
        } else {
            ""
        },
        if held > 0 {
            format!(", {held} write lease(s) left to expire after their TTL")
        } else {
            String::new()
        }
    );
    std::process::exit(0);
}

/// Campaign for coordinator under a short-TTL etcd lease; step down when the lease is gone.
async fn election_loop(node: Arc<Node>, mut client: Client, ttl_s: i64, leases: Arc<EtcdLeases>) {
    let mut last = String::new();
    loop {
        if let Err(e) = one_term(&node, &mut client, ttl_s, &leases).await
            && e != last
        {
            // Say each distinct problem once, not every retry.
            eprintln!("tern volume: node {}: election: {e}", node.id());
            last = e;
        }
        node.set_coordinator_deadline(0);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn one_term(
    node: &Arc<Node>,
    client: &mut Client,
    ttl_s: i64,
    leases: &EtcdLeases,
) -> Result<(), String> {
    // etcd starts the session's clock when it grants it, i.e. after we ask: count from before.
    let asked = node.now_ms();
    let lease = client
        .lease_grant(ttl_s, None)
        .await
        .map_err(|e| e.to_string())?;
    let lease_id = lease.id();
    leases.session.store(lease_id, Ordering::SeqCst);
    let (mut keeper, mut stream) = client
        .lease_keep_alive(lease_id)
        .await
        .map_err(|e| e.to_string())?;
    // Keep-alive task: publishes the local deadline (send time + TTL) into a shared cell.
    let deadline = Arc::new(std::sync::atomic::AtomicU64::new(
        asked + ttl_s as u64 * 1000,
    ));
    let ka_deadline = Arc::clone(&deadline);
    let ka_node = Arc::clone(node);
    let keepalive = tokio::spawn(async move {
        loop {
            let sent = ka_node.now_ms();
            if keeper.keep_alive().await.is_err() {
                break;
            }
            match tokio::time::timeout(Duration::from_secs(ttl_s as u64), stream.message()).await {
                Ok(Ok(Some(r))) if r.ttl() > 0 => {
                    ka_deadline.store(
                        sent + r.ttl() as u64 * 1000,
                        std::sync::atomic::Ordering::SeqCst,
                    );
                    if ka_node.is_coordinator() {
                        ka_node.set_coordinator_deadline(sent + r.ttl() as u64 * 1000);
                    }
                }
                _ => break,
            }
            tokio::time::sleep(Duration::from_millis((ttl_s as u64 * 1000 / 3).max(100))).await;
        }
        ka_deadline.store(0, std::sync::atomic::Ordering::SeqCst);
        ka_node.set_coordinator_deadline(0);
    });
    let value = json!({ "node_id": node.id(), "addr": node.config().listen }).to_string();
    let res = client.campaign(election_name(node), value, lease_id).await;
    // The generation fences older coordinators: a reply without the election key is an error,
    // not generation 0.
    let result = match res.map(|r| r.leader().map(|k| k.rev() as u64)) {
        Err(e) => Err(e.to_string()),
        Ok(None) => Err("etcd answered the campaign without the election key".to_string()),
        Ok(Some(generation)) => {
            let elected_ms = node.now_ms();
            // A predecessor stalled between a write's check and the write itself is killed by
            // its commit watchdog within the grace after its deadline, which passed before we
            // won: wait the margin before our first write (the take-over commit).
            let margin = WatchdogTimings::for_ttl(ttl_s as u64 * 1000).margin_ms;
            tokio::time::sleep(Duration::from_millis(margin)).await;
            let d = deadline.load(std::sync::atomic::Ordering::SeqCst);
            if d <= node.now_ms() {
                Err("session expired while campaigning".to_string())
            } else {
                let n2 = Arc::clone(node);
                let became = tokio::task::spawn_blocking(move || {
                    n2.become_coordinator_elected_at(generation, d, elected_ms)
                })
                .await;
                match became {
                    Ok(Ok(())) => {
                        eprintln!(
                            "tern volume: node {} is coordinator, generation {generation}",
                            node.id()
                        );
                        // Hold office until the session's local deadline passes.
                        // (A stall past the deadline ends the term too, even if etcd still
                        // answers: campaigning again restores a coordinator.)
                        while deadline.load(std::sync::atomic::Ordering::SeqCst) > node.now_ms()
                            && node.is_coordinator()
                        {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(format!("session lost; node {} steps down", node.id()))
                    }
                    Ok(Err(e)) => Err(format!("taking office failed: {e}")),
                    Err(e) => Err(e.to_string()),
                }
            }
        }
    };
    node.set_coordinator_deadline(0);
    keepalive.abort();
    let _ = leases
        .session
        .compare_exchange(lease_id, 0, Ordering::SeqCst, Ordering::SeqCst);
    let _ = client.lease_revoke(lease_id).await;
    result
}

/// The environment variable that turns `tern volume serve` into the commit watchdog of its
/// parent (value: `PID TTL_MS`, the parent's pid and etcd session TTL).
const COMMIT_WATCHDOG_ENV: &str = "TERN_VOLUME_COMMIT_WATCHDOG";

/// The node's end of its commit watchdog: one line per change of the armed deadline on the
/// watchdog's stdin (`-` when nothing is armed). A watchdog that died (killed on its own: the
/// node outlived it) is started again at the next arming, so the node goes on writing instead
/// of holding the coordinator's office while refusing every write.
struct ChildWatchdog {
    node_id: NodeId,
    ttl_ms: u64,
    stdin: std::sync::Mutex<std::process::ChildStdin>,
}

impl crate::node::CommitWatchdog for ChildWatchdog {
    fn arm(&self, deadline_ms: Option<u64>) -> std::io::Result<()> {
        use std::io::Write;
        let line = match deadline_ms {
            Some(d) => format!("{d}\n"),
            None => "-\n".to_string(),
        };
        let mut w = self.stdin.lock().unwrap_or_else(|e| e.into_inner());
        match w.write_all(line.as_bytes()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                eprintln!(
                    "tern volume: node {}: the commit watchdog is gone: starting another",
                    self.node_id
                );
                *w = spawn_commit_watchdog_process(self.node_id, self.ttl_ms)?;
                // The write is issued only once the new watchdog holds its deadline.
                w.write_all(line.as_bytes())
            }
            r => r,
        }
    }
}

/// Start the commit watchdog of this node: this executable again, with the same arguments and
/// [`COMMIT_WATCHDOG_ENV`] set, so it needs no files of its own. It lives until this process
/// ends (its stdin closes); if it dies first, the next arming starts another, and a write is
/// refused only when none can be started.
fn spawn_commit_watchdog(node_id: NodeId, ttl_ms: u64) -> Result<ChildWatchdog, ServeError> {
    let stdin = spawn_commit_watchdog_process(node_id, ttl_ms)?;
    Ok(ChildWatchdog {
        node_id,
        ttl_ms,
        stdin: std::sync::Mutex::new(stdin),
    })
}

/// One commit watchdog process; its stdin is the node's end.
fn spawn_commit_watchdog_process(
    node_id: NodeId,
    ttl_ms: u64,
) -> std::io::Result<std::process::ChildStdin> {
    let exe = std::env::current_exe()?;
    let mut child = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(
            COMMIT_WATCHDOG_ENV,
            format!("{} {ttl_ms}", std::process::id()),
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let stdin = child
        .stdin
        .take()
        .ok_or_else(|| std::io::Error::other("the commit watchdog has no stdin"))?;
    std::thread::spawn(move || {
        let status = child.wait();
        eprintln!("tern volume: node {node_id}: the commit watchdog ended ({status:?})");
    });
    Ok(stdin)
}

/// The commit watchdog process (see [`WatchdogTimings::commit_watchdog_kills`]): reads the
/// armed deadline from stdin, and SIGKILLs the parent (through a pidfd, so never another
/// process under a reused pid) when a write stays armed past the deadline plus the grace.
/// A stopped (SIGSTOP) parent is killed without running again, so its checked write never
/// lands. Exits when the parent does.
fn commit_watchdog_main(spec: &str, node_id: NodeId) -> Result<(), ServeError> {
    let bad =
        || std::io::Error::other(format!("{COMMIT_WATCHDOG_ENV}={spec:?}: want 'PID TTL_MS'"));
    let mut it = spec.split_whitespace().map(|v| v.parse::<u64>());
    let (Some(Ok(pid)), Some(Ok(ttl_ms))) = (it.next(), it.next()) else {
        return Err(bad().into());
    };
    let parent = rustix::process::getppid().map(|p| p.as_raw_nonzero().get() as u64);
    if parent != Some(pid) {
        // The node is gone already (this process was re-parented).
        return Ok(());
    }
    let pid = rustix::process::Pid::from_raw(pid as i32).ok_or_else(bad)?;
    let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
        .map_err(std::io::Error::from)?;
    let timings = WatchdogTimings::for_ttl(ttl_ms);
    let armed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    {
        let armed = Arc::clone(&armed);
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                armed.store(line.trim().parse().unwrap_or(0), Ordering::SeqCst);
            }
            // The node ended (or closed the pipe): nothing left to guard.
            std::process::exit(0);
        });
    }
    loop {
        std::thread::sleep(Duration::from_millis(timings.tick_ms));
        let a = armed.load(Ordering::SeqCst);
        let now = crate::node::boottime_ms();
        let deadline = (a != 0).then_some(a);
        if timings.commit_watchdog_kills(deadline, now) {
            eprintln!(
                "tern volume: node {node_id}: commit watchdog: a metadata write was still pending \
                 {} ms after the coordinator session's deadline: killing the node, pid {pid} \
                 (SIGKILL)",
                now - a
            );
            if let Err(e) =
                rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL)
            {
                eprintln!("tern volume: node {node_id}: commit watchdog: the kill failed: {e}");
            }
            std::process::exit(0);
        }
    }
}

/// Track who the coordinator is.
async fn leader_loop(node: Arc<Node>, mut client: Client) {
    loop {
        let r =
            tokio::time::timeout(Duration::from_secs(2), client.leader(election_name(&node))).await;
        match r {
            Ok(Ok(r)) => {
                let info = r.kv().and_then(|kv| {
                    let v: serde_json::Value = serde_json::from_slice(kv.value()).ok()?;
                    Some(LeaderInfo {
                        node_id: v["node_id"].as_u64()? as NodeId,
                        addr: v["addr"].as_str()?.to_owned(),
                        generation: kv.create_revision() as u64,
                    })
                });
                node.set_leader(info);
            }
            Ok(Err(_)) => {
                // "no leader" is an error in the election API; keep polling.
                node.set_leader(None);
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publish this node's membership entry (with its path state) and read everyone else's.
async fn watch_loop(node: Arc<Node>, mut client: Client, ttl_s: i64, leases: Arc<EtcdLeases>) {
    let mut member_lease: Option<i64> = None;
    let mut last_published = String::new();
    let mut last_refresh = Instant::now();
    loop {
        // Membership: our entry under a lease of our own, refreshed each round.
        let me = node.member_json().to_string();
        if member_lease.is_none() {
            member_lease = client
                .lease_grant(ttl_s.max(2) * 2, None)
                .await
                .ok()
                .map(|l| l.id());
            leases
                .member
                .store(member_lease.unwrap_or(0), Ordering::SeqCst);
            last_published.clear();
        }
        if let Some(id) = member_lease {
            let alive = client.lease_keep_alive(id).await.ok();
            if let Some((mut k, mut s)) = alive {
                let ok = k.keep_alive().await.is_ok()
                    && matches!(s.message().await, Ok(Some(r)) if r.ttl() > 0);
                if !ok {
                    member_lease = None;
                }
            } else {
                member_lease = None;
            }
            if let Some(id) = member_lease
                && (me != last_published || last_refresh.elapsed() > Duration::from_secs(5))
            {
                let key = format!("{}{}", members_prefix(&node), node.id());
                if client
                    .put(key, me.clone(), Some(PutOptions::new().with_lease(id)))
                    .await
                    .is_ok()
                {
                    last_published = me;
                    last_refresh = Instant::now();
                }
            }
        }
        if let Ok(r) = client
            .get(members_prefix(&node), Some(GetOptions::new().with_prefix()))
            .await
        {
            let mut m = std::collections::BTreeMap::new();
            for kv in r.kvs() {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(kv.value())
                    && let Some(id) = v["node_id"].as_u64()
                {
                    m.insert(id as NodeId, v);
                }
            }
            // Our own entry is always current.
            m.insert(node.id(), node.member_json());
            *node.members.lock().unwrap_or_else(|e| e.into_inner()) = m;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `client`'s handshake with a node server built from `server` is accepted.
    fn accepted(server: &tern_nbd::ServerTls, client: &tern_pki::TlsDir) -> bool {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let cfg = server.config.clone();
        let srv = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            tern_pki::accept(cfg, tcp, Duration::from_secs(5)).map(|(_, id)| id.name)
        });
        let tcp = std::net::TcpStream::connect(addr).unwrap();
        // In TLS 1.3 the client's side may complete before the server refuses it: the server's
        // verdict is what counts.
        let _ = tern_pki::connect(
            client.client_config(),
            tern_pki::TlsDir::server_name("node-1"),
            tcp,
            Duration::from_secs(5),
        );
        let srv = srv.join().unwrap();
        match srv {
            Ok(name) => {
                assert_eq!(name, "ctl");
                true
            }
            Err(e) => {
                assert!(format!("{e:?}").contains("Revoked"), "{e:?}");
                false
            }
        }
    }

    #[test]
    fn a_node_server_refuses_a_client_revoked_while_it_runs() {
        let ca = tempfile::tempdir().unwrap();
        tern_pki::init_ca(ca.path()).unwrap();
        let opts = tern_pki::IssueOptions::default();
        let node = tern_pki::issue(ca.path(), "node-1", tern_pki::Role::Host, &opts).unwrap();
        let ctl = tern_pki::issue(ca.path(), "ctl", tern_pki::Role::Controller, &opts).unwrap();
        let server = node_tls(&node, 1).unwrap();
        let client = tern_pki::TlsDir::load(&ctl).unwrap();
        assert!(accepted(&server, &client));
        // `tern pki revoke` rewrites the node directory's ca-crl.pem: the running server sees it.
        tern_pki::revoke(ca.path(), "ctl").unwrap();
        assert!(!accepted(&server, &client), "a revoked client was served");
    }
}
