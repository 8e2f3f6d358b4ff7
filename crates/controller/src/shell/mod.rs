//! The controller's I/O shell: a thin layer around [`crate::core::Controller`] that
//!
//! * campaigns for leadership through etcd's election API (`/tern/leader`, on a lease of
//!   `--lease-ttl-ms`); the leader key's revision is the generation. On winning it loads the
//!   desired state (`/tern/desired/...`) and the host records (`/tern/hosts/`), feeds a `HostUp`
//!   for each and then `Elected`, and watches `/tern/hosts/` (`HostUp` / `HostExpired`);
//! * ticks the core every [`TICK`];
//! * carries out the core's actions **in order**, one batch at a time (a single lock serialises
//!   every batch): `StoreVm`/`StoreMaintenance` as etcd transactions guarded by the leader key's
//!   create revision — a refused or failed one feeds `Deposed`, drops the rest of the batch and
//!   makes the election loop resign and campaign again; `Send` as an HTTP POST to the agent's
//!   `/v1/agent/commands` (in the background; the answer or the error is fed back as `Reply` or
//!   `SendFailed`); `FenceLeases` as a volume `fence_node` request to a live host's volume node
//!   (fed back as `Fenced`);
//! * never sends a command once its own election lease's deadline (last keep-alive sent + TTL −
//!   margin) has passed: it feeds `Deposed` instead;
//! * serves the REST API ([`api`]); an API call answers success only after the `Store*` actions it
//!   caused succeeded (else 503, and the next leader reloads what etcd holds: nothing half-made).
//!   With `--tls-dir` it serves only TLS ([`tls`]), recognises every caller by certificate or
//!   bearer token and checks its role ([`auth`]); it then reaches etcd over TLS with its
//!   certificate and commands each agent over mutual TLS, checking that the agent's certificate
//!   names the host it commands.
//!
//! [`Shell::in_memory`] runs the same shell with an in-process store instead of etcd (always the
//! leader, generation rising by one each time it steps down and takes office again): the API
//! tests drive the real router against the real core with no etcd.

pub mod api;
pub mod auth;
pub mod automation;
mod dashboard;
pub mod http;
pub mod store;
pub mod tls;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use etcd_client::{EventType, ResignOptions, WatchOptions};
use tern_api::agent::{CommandResponse, HOSTS_PREFIX, HostRecord};
use tokio::sync::{Notify, mpsc};

use crate::core::{Action, Config, Controller, Input};
use store::{ELECTION, ETCD_TIMEOUT, Store};

/// How often the core is ticked.
pub const TICK: Duration = Duration::from_millis(100);

/// Why the shell could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// etcd could not be reached.
    #[error("cannot connect to etcd at {endpoints}: {source}")]
    Etcd {
        /// The endpoints given.
        endpoints: String,
        /// The cause.
        source: etcd_client::Error,
    },
    /// The API address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// A bad setting.
    #[error("{0}")]
    Invalid(String),
    /// The `--tls-dir` could not be loaded.
    #[error(transparent)]
    Tls(#[from] tls::TlsSetupError),
}

/// The shell's settings.
#[derive(Debug, Clone)]
pub struct ShellConfig {
    /// etcd endpoints (`http://127.0.0.1:2379`).
    pub etcd: Vec<String>,
    /// Where the API listens.
    pub listen: SocketAddr,
    /// The URL other processes reach this controller at (stored as the leader key's value);
    /// `http://LISTEN` when `None`.
    pub url: Option<String>,
    /// The election lease's TTL, ms (rounded up to whole seconds for etcd; at least 2 s).
    pub lease_ttl_ms: u64,
    /// The core's knobs.
    pub core: Config,
    /// The controller's `--tls-dir` (CA, certificate, key): etcd and the agents are then reached
    /// over TLS with it. `None`: plain connections everywhere.
    pub tls_dir: Option<PathBuf>,
}

/// etcd connection options for a `--tls-dir` and `https://` endpoints: the CA as the only trust
/// anchor, our certificate as the client certificate (etcd's `--client-cert-auth`).
pub fn etcd_options(
    tls_dir: Option<&Path>,
    endpoints: &[String],
) -> Result<etcd_client::ConnectOptions, StartError> {
    let opts = etcd_client::ConnectOptions::new();
    // TLS for https:// endpoints only (an http:// etcd is the operator's explicit choice).
    let https = endpoints.iter().any(|e| e.starts_with("https://"));
    let Some(dir) = tls_dir.filter(|_| https) else {
        return Ok(opts);
    };
    let read = |name: &str| {
        std::fs::read(dir.join(name))
            .map_err(|e| StartError::Invalid(format!("--tls-dir {}: {name}: {e}", dir.display())))
    };
    let tls = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(read("ca-cert.pem")?))
        .identity(etcd_client::Identity::from_pem(
            read("client-cert.pem")?,
            read("client-key.pem")?,
        ));
    Ok(opts.with_tls(tls))
}

/// State shared by the API handlers, the election loop and the background tasks.
#[derive(Debug)]
pub struct Shared {
    core: Mutex<Controller>,
    /// Held while a batch of actions is carried out: batches never interleave.
    exec: tokio::sync::Mutex<()>,
    started: Instant,
    store: Store,
    url: String,
    leader_url: Mutex<Option<String>>,
    /// No command is sent at or after this time (ms since start); 0 when not leading.
    lease_deadline_ms: AtomicU64,
    inputs: mpsc::UnboundedSender<Input>,
    step_down: Notify,
    leader_changes: AtomicU64,
    /// Set by [`Shell::stop`]: the election loop resigns and ends.
    stopping: AtomicBool,
    /// Set by the election loop when it has ended (leadership resigned, lease revoked).
    election_done: AtomicBool,
    /// The automation loop ([`automation`]); locked after the core when both are held.
    automation: Mutex<automation::Automation>,
    /// Held while plans are written to the store: writes of plan states never overtake each
    /// other.
    plans_store: tokio::sync::Mutex<()>,
    /// How commands reach the agents (TLS settings once given).
    agents: Mutex<http::Client>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running controller shell.
#[derive(Debug, Clone)]
pub struct Shell {
    shared: Arc<Shared>,
}

impl Shared {
    /// Milliseconds since this shell started (the core's clock).
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The core, locked (read it; feed it only through [`Shared::feed`]).
    pub fn core(&self) -> MutexGuard<'_, Controller> {
        lock(&self.core)
    }

    /// This controller's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The leader's URL as last seen in etcd (this controller's own while it leads).
    pub fn leader_url(&self) -> Option<String> {
        if self.core().generation().is_some() {
            return Some(self.url.clone());
        }
        lock(&self.leader_url).clone()
    }

    /// Times the leader key changed hands, as this controller saw it.
    pub fn leader_changes(&self) -> u64 {
        self.leader_changes.load(Ordering::SeqCst)
    }

    /// The desired-state store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The automation loop's state, locked (take the core's lock first when holding both).
    pub fn automation(&self) -> MutexGuard<'_, automation::Automation> {
        lock(&self.automation)
    }

    /// Feeds one input, then carries out the actions it caused, in order.
    pub async fn feed(&self, input: Input) {
        let _batch = self.exec.lock().await;
        let actions = {
            let mut core = self.core();
            core.step(input, self.now_ms());
            core.drain_actions()
        };
        let _ = self.execute(actions).await;
    }

    /// Runs an API call on the core and carries out its actions; the call's result stands only
    /// if every `Store*` action succeeded.
    pub async fn api<T>(
        &self,
        call: impl FnOnce(&mut Controller, u64) -> Result<T, crate::core::ApiError>,
    ) -> Result<T, ApiFailure> {
        let _batch = self.exec.lock().await;
        let (result, actions) = {
            let mut core = self.core();
            let r = call(&mut core, self.now_ms());
            (r, core.drain_actions())
        };
        let executed = self.execute(actions).await;
        let value = result.map_err(ApiFailure::Core)?;
        match executed {
            // Every write was stored: the change stands (the next leader carries out what a
            // command cut short by a step-down would have done).
            Ok(())
            | Err(Stopped {
                unstored: false, ..
            }) => Ok(value),
            Err(Stopped { why, .. }) => Err(ApiFailure::NotStored(why)),
        }
    }

    /// Carries out `actions` in order. A failed store (or a send past the lease deadline) feeds
    /// `Deposed`, drops the rest and asks the election loop to step down.
    async fn execute(&self, actions: Vec<Action>) -> Result<(), Stopped> {
        let mut actions = actions.into_iter();
        while let Some(action) = actions.next() {
            match action {
                Action::StoreVm { name, record } => {
                    if let Err(e) = self.store.store_vm(&name, record.as_ref()).await {
                        let why = self.deposed(format!("storing VM {name}: {e}"));
                        return Err(Stopped {
                            why,
                            unstored: true,
                        });
                    }
                }
                Action::StoreMaintenance { host, on } => {
                    if let Err(e) = self.store.store_maintenance(&host, on).await {
                        let why = self.deposed(format!("storing {host}'s maintenance: {e}"));
                        return Err(Stopped {
                            why,
                            unstored: true,
                        });
                    }
                }
                Action::Send {
                    host,
                    agent_url,
                    command,
                } => {
                    if self.now_ms() >= self.lease_deadline_ms.load(Ordering::SeqCst) {
                        let why = self.deposed(
                            "the election lease's deadline passed before a command went out".into(),
                        );
                        let unstored = actions.any(|a| {
                            matches!(a, Action::StoreVm { .. } | Action::StoreMaintenance { .. })
                        });
                        return Err(Stopped { why, unstored });
                    }
                    let inputs = self.inputs.clone();
                    let timeout = Duration::from_millis(self.core().config().command_timeout_ms);
                    let client = lock(&self.agents).clone();
                    tokio::spawn(async move {
                        let input =
                            send_command(&client, &host, &agent_url, &command, timeout).await;
                        let _ = inputs.send(input);
                    });
                }
                Action::FenceLeases {
                    host,
                    volume_node_id,
                } => {
                    let via: Vec<String> = self
                        .core()
                        .hosts()
                        .into_iter()
                        .filter(|h| h.name != host && h.state == tern_api::cluster::HostState::Up)
                        .filter_map(|h| h.capacity.volume_node)
                        .collect();
                    let inputs = self.inputs.clone();
                    tokio::spawn(async move {
                        let result = fence(volume_node_id, via).await;
                        let _ = inputs.send(Input::Fenced { host, result });
                    });
                }
            }
        }
        Ok(())
    }

    /// Steps down: the core is deposed (its queued actions dropped) and the election loop resigns.
    fn deposed(&self, why: String) -> String {
        eprintln!("tern controller: stepping down: {why}");
        {
            let mut core = self.core();
            core.step(Input::Deposed, self.now_ms());
            core.drain_actions();
        }
        self.lease_deadline_ms.store(0, Ordering::SeqCst);
        self.store.set_guard(None);
        self.step_down.notify_one();
        why
    }
}

/// Why a batch of actions was cut short (the shell stepped down).
#[derive(Debug)]
struct Stopped {
    why: String,
    /// Some desired-state write of the batch was not stored.
    unstored: bool,
}

/// Why an API call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiFailure {
    /// The core refused it.
    #[error(transparent)]
    Core(crate::core::ApiError),
    /// The core accepted it but its desired state could not be stored: this controller stepped
    /// down, and the next leader starts from what etcd holds.
    #[error("the change could not be stored ({0}); this controller stepped down")]
    NotStored(String),
}

/// POSTs a command to an agent and turns the answer into the core's input.
/// POSTs a command to an agent; over TLS the agent's certificate must be host `host`'s.
async fn send_command(
    client: &http::Client,
    host: &str,
    agent_url: &str,
    command: &tern_api::agent::Command,
    timeout: Duration,
) -> Input {
    let url = format!("{}/v1/agent/commands", agent_url.trim_end_matches('/'));
    let body = serde_json::to_vec(command).expect("a command serialises");
    let failed = |error: String| Input::SendFailed {
        cmd: command.id,
        error,
    };
    let expect = tern_pki::Identity {
        name: host.to_string(),
        role: tern_pki::Role::Host,
    };
    let client = client.clone().expecting(Some(expect));
    match client
        .request(hyper::Method::POST, &url, Some(body), timeout)
        .await
    {
        Err(e) => failed(format!("sending to {host}: {e}")),
        Ok(r) if r.status != 200 => failed(format!(
            "{host} answered {}: {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        )),
        Ok(r) => match serde_json::from_slice::<CommandResponse>(&r.body) {
            Ok(resp) => Input::Reply {
                cmd: command.id,
                seq: resp.seq,
                reply: resp.reply,
            },
            Err(e) => failed(format!("{host}'s answer does not parse: {e}")),
        },
    }
}

/// Fences a volume node's write leases through the first of `via` that answers.
async fn fence(node: Option<u32>, via: Vec<String>) -> Result<u32, String> {
    let Some(node) = node else {
        // The host serves no volume node: it can hold no disk lease.
        return Ok(0);
    };
    if via.is_empty() {
        return Err(format!(
            "no live host's volume node to ask to fence node {node}"
        ));
    }
    tokio::task::spawn_blocking(move || {
        let mut errors = Vec::new();
        for addr in &via {
            let req = tern_volume::control::Request::FenceNode { node };
            match tern_volume::control::request(addr, &req, false, Duration::from_secs(20))
                .and_then(|r| r.into_fenced().map_err(Into::into))
            {
                Ok(f) => return Ok(f.files.len() as u32),
                Err(e) => errors.push(format!("{addr}: {e}")),
            }
        }
        Err(errors.join("; "))
    })
    .await
    .map_err(|e| e.to_string())?
}

impl Shell {
    fn build(store: Store, url: String, core: Config) -> (Shell, mpsc::UnboundedReceiver<Input>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            core: Mutex::new(Controller::new(core)),
            exec: tokio::sync::Mutex::new(()),
            started: Instant::now(),
            store,
            url,
            leader_url: Mutex::new(None),
            lease_deadline_ms: AtomicU64::new(0),
            inputs: tx,
            step_down: Notify::new(),
            stopping: AtomicBool::new(false),
            election_done: AtomicBool::new(false),
            leader_changes: AtomicU64::new(0),
            automation: Mutex::new(automation::Automation::new(core.ha_reserve_hosts)),
            plans_store: tokio::sync::Mutex::new(()),
            agents: Mutex::new(http::Client::plain()),
        });
        (Shell { shared }, rx)
    }

    /// The shared state (for the API router and tests).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Sends the commands to agents with `client` (TLS settings: [`http::Client::tls`]).
    pub fn set_agent_client(&self, client: http::Client) {
        *lock(&self.shared.agents) = client;
    }

    /// Gives the automation loop a power driver for `host` (its power actions fail with "no power
    /// driver for host …" otherwise).
    pub fn set_power_driver(&self, host: &str, driver: Arc<dyn tern_power::PowerDriver>) {
        self.shared.automation().set_driver(host, driver);
    }

    /// Starts the input and tick loops (call inside a tokio runtime).
    fn start_loops(&self, mut rx: mpsc::UnboundedReceiver<Input>) {
        let s = Arc::clone(&self.shared);
        tokio::spawn(async move {
            while let Some(input) = rx.recv().await {
                s.feed(input).await;
            }
        });
        let s = Arc::clone(&self.shared);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(TICK);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                if s.core().generation().is_some() {
                    let _ = s.inputs.send(Input::Tick);
                }
            }
        });
        automation::start(Arc::clone(&self.shared));
    }

    /// A shell on an in-process store that leads at once (generation 1, then one more each time
    /// it steps down and takes office again). Call inside a tokio runtime.
    pub fn in_memory(core: Config, url: &str) -> Shell {
        let (shell, rx) = Shell::build(Store::memory(), url.to_string(), core);
        shell.start_loops(rx);
        let s = Arc::clone(&shell.shared);
        tokio::spawn(async move {
            let mut generation = 0;
            loop {
                generation += 1;
                s.lease_deadline_ms.store(u64::MAX, Ordering::SeqCst);
                if let Err(e) = take_office(&s, generation).await {
                    eprintln!("tern controller (in memory): {e}");
                }
                s.step_down.notified().await;
                if s.stopping.load(Ordering::SeqCst) {
                    s.election_done.store(true, Ordering::SeqCst);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        shell
    }

    /// In memory: an agent registers (or re-registers) its host.
    pub async fn host_up(&self, record: HostRecord) {
        self.shared
            .store
            .put_host(Some(&record), &record.name.clone());
        self.shared.feed(Input::HostUp(record)).await;
    }

    /// Steps down as if the election lease had run out (in memory, the shell then takes office
    /// again with the next generation, reading the stored state afresh).
    pub async fn step_down(&self, why: &str) {
        let _batch = self.shared.exec.lock().await;
        self.shared.deposed(why.to_string());
    }

    /// In memory: a host's record vanishes (its agent's lease expired).
    pub async fn host_expired(&self, name: &str) {
        self.shared.store.put_host(None, name);
        let host = name.to_string();
        self.shared.feed(Input::HostExpired { host }).await;
    }

    /// Sets the election lease's deadline (ms on [`Shared::now_ms`]'s clock), as keep-alives do:
    /// no command goes out at or after it.
    pub fn set_lease_deadline(&self, deadline_ms: u64) {
        self.shared
            .lease_deadline_ms
            .store(deadline_ms, Ordering::SeqCst);
    }

    /// Waits until this controller leads (or `timeout` passes); returns its generation.
    pub async fn wait_leading(&self, timeout: Duration) -> Option<u64> {
        let start = Instant::now();
        loop {
            if let Some(g) = self.shared.core().generation() {
                return Some(g);
            }
            if start.elapsed() >= timeout {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Connects to etcd and starts campaigning (call inside a tokio runtime).
    pub async fn start_etcd(cfg: &ShellConfig) -> Result<Shell, StartError> {
        if cfg.lease_ttl_ms < 1000 {
            return Err(StartError::Invalid(format!(
                "--lease-ttl-ms {} is too short: at least 1000",
                cfg.lease_ttl_ms
            )));
        }
        let tls = cfg
            .tls_dir
            .as_deref()
            .map(tls::ServerTls::load)
            .transpose()?;
        let options = etcd_options(cfg.tls_dir.as_deref(), &cfg.etcd)?;
        let connect = etcd_client::Client::connect(&cfg.etcd, Some(options));
        let client = tokio::time::timeout(ETCD_TIMEOUT, connect)
            .await
            .map_err(|_| {
                StartError::Invalid(format!("etcd at {} did not answer", cfg.etcd.join(",")))
            })?
            .map_err(|source| StartError::Etcd {
                endpoints: cfg.etcd.join(","),
                source,
            })?;
        let url = cfg.url.clone().unwrap_or_else(|| {
            let scheme = if tls.is_some() { "https" } else { "http" };
            format!("{scheme}://{}", cfg.listen)
        });
        let store = Store::Etcd {
            client: Box::new(client.clone()),
            guard: Mutex::new(None),
        };
        let (shell, rx) = Shell::build(store, url, cfg.core);
        if let Some(t) = &tls {
            shell.set_agent_client(http::Client::tls(t.dir.client_config()));
        }
        shell.start_loops(rx);
        tokio::spawn(election_loop(
            Arc::clone(&shell.shared),
            client.clone(),
            cfg.lease_ttl_ms,
        ));
        tokio::spawn(observe_leader(Arc::clone(&shell.shared), client));
        Ok(shell)
    }

    /// Stops campaigning: resigns the leadership (if held) and revokes the election lease, so
    /// another controller can lead at once instead of after the TTL. Waits up to 3 s.
    pub async fn stop(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        if self.shared.core().generation().is_some() {
            let _batch = self.shared.exec.lock().await;
            self.shared.deposed("stopping".into());
        }
        let start = Instant::now();
        while !self.shared.election_done.load(Ordering::SeqCst)
            && start.elapsed() < Duration::from_secs(3)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Serves the REST API on `listen` until the process ends.
    pub async fn serve(&self, listen: SocketAddr) -> Result<(), StartError> {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: listen,
                source,
            })?;
        self.serve_on(listener).await
    }

    /// Serves the REST API on a bound listener until the process ends.
    pub async fn serve_on(&self, listener: tokio::net::TcpListener) -> Result<(), StartError> {
        let addr = listener.local_addr().map_err(|source| StartError::Listen {
            addr: "0.0.0.0:0".parse().expect("an address"),
            source,
        })?;
        axum::serve(
            tern_pki::http::plain_listener(listener),
            api::router(Arc::clone(&self.shared)),
        )
        .await
        .map_err(|source| StartError::Listen { addr, source })
    }

    /// Serves the REST API on a bound listener over TLS only, every call checked by
    /// [`auth::check`] against `access` (which the caller may replace, e.g. when the token file
    /// changes), until the process ends.
    pub async fn serve_tls_on(
        &self,
        listener: tokio::net::TcpListener,
        tls: &tls::ServerTls,
        access: auth::SharedAccess,
    ) {
        let router = api::router(Arc::clone(&self.shared))
            .layer(axum::middleware::from_fn_with_state(access, auth::check));
        tls::serve_tls(listener, router, Arc::clone(&tls.config), "tern controller").await;
    }
}

/// Loads the stored state and feeds it: hosts that vanished meanwhile expire, the registered ones
/// come up, then `Elected`.
async fn take_office(s: &Arc<Shared>, generation: u64) -> Result<i64, String> {
    let loaded = s.store.load().await.map_err(|e| e.to_string())?;
    let registered: BTreeSet<String> = loaded.hosts.iter().map(|h| h.name.clone()).collect();
    let known: Vec<String> = s.core().hosts().into_iter().map(|h| h.name).collect();
    for host in known.into_iter().filter(|h| !registered.contains(h)) {
        s.feed(Input::HostExpired { host }).await;
    }
    for record in loaded.hosts {
        s.feed(Input::HostUp(record)).await;
    }
    s.feed(Input::Elected {
        generation,
        desired: loaded.desired,
        maintenance: loaded.maintenance,
    })
    .await;
    automation::take_office(s, generation).await;
    eprintln!(
        "tern controller: leading at {} with generation {generation}",
        s.url
    );
    Ok(loaded.revision)
}

/// Campaigns, leads while the election lease holds, steps down, and campaigns again.
async fn election_loop(s: Arc<Shared>, client: etcd_client::Client, ttl_ms: u64) {
    while !s.stopping.load(Ordering::SeqCst) {
        if let Err(e) = one_term(&s, client.clone(), ttl_ms).await {
            eprintln!("tern controller: {e}");
        }
        s.lease_deadline_ms.store(0, Ordering::SeqCst);
        s.store.set_guard(None);
        if s.core().generation().is_some() {
            s.feed(Input::Deposed).await;
        }
        if !s.stopping.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    s.election_done.store(true, Ordering::SeqCst);
}

async fn one_term(
    s: &Arc<Shared>,
    mut client: etcd_client::Client,
    ttl_ms: u64,
) -> Result<(), String> {
    let ttl_s = ttl_ms.div_ceil(1000).max(2);
    let margin = (ttl_ms / 5).min(1000);
    let asked = s.now_ms();
    let lease = tokio::time::timeout(ETCD_TIMEOUT, client.lease_grant(ttl_s as i64, None))
        .await
        .map_err(|_| "etcd did not grant a lease in time".to_string())?
        .map_err(|e| format!("lease grant: {e}"))?;
    let lease_id = lease.id();
    // The local deadline: last keep-alive sent + TTL − margin (the first one counts from before
    // the grant was asked for).
    let deadline = Arc::new(AtomicU64::new(asked + ttl_s * 1000 - margin));
    let (mut keeper, mut stream) = client
        .lease_keep_alive(lease_id)
        .await
        .map_err(|e| format!("lease keep-alive: {e}"))?;
    let ka_deadline = Arc::clone(&deadline);
    let ka = Arc::clone(s);
    let keepalive = tokio::spawn(async move {
        loop {
            let sent = ka.now_ms();
            if keeper.keep_alive().await.is_err() {
                break;
            }
            match tokio::time::timeout(Duration::from_secs(ttl_s), stream.message()).await {
                Ok(Ok(Some(r))) if r.ttl() > 0 => {
                    let d = sent + r.ttl() as u64 * 1000 - margin;
                    ka_deadline.store(d, Ordering::SeqCst);
                    if ka.lease_deadline_ms.load(Ordering::SeqCst) != 0 {
                        ka.lease_deadline_ms.store(d, Ordering::SeqCst);
                    }
                }
                _ => break,
            }
            tokio::time::sleep(Duration::from_millis(ttl_s * 1000 / 3)).await;
        }
    });
    let result = lead(s, &mut client, lease_id, &deadline).await;
    keepalive.abort();
    s.lease_deadline_ms.store(0, Ordering::SeqCst);
    s.store.set_guard(None);
    let _ = tokio::time::timeout(Duration::from_secs(1), client.lease_revoke(lease_id)).await;
    result
}

async fn lead(
    s: &Arc<Shared>,
    client: &mut etcd_client::Client,
    lease_id: i64,
    deadline: &AtomicU64,
) -> Result<(), String> {
    let alive = || deadline.load(Ordering::SeqCst) > s.now_ms();
    let campaign = client.campaign(ELECTION, s.url.clone(), lease_id);
    let stopping = || s.stopping.load(Ordering::SeqCst);
    let won = tokio::select! {
        r = campaign => r.map_err(|e| format!("campaign: {e}"))?,
        _ = async { while alive() && !stopping() { tokio::time::sleep(Duration::from_millis(50)).await } } => {
            return Err(if stopping() { "stopping".into() } else {
                "the election lease ran out while campaigning".into()
            });
        }
    };
    if stopping() {
        return Err("stopping".into());
    }
    let leader = won
        .leader()
        .cloned()
        .ok_or("etcd answered the campaign without the leader key")?;
    let generation = leader.rev();
    if generation <= 0 || !alive() {
        return Err("the election lease ran out while campaigning".into());
    }
    s.store.set_guard(Some((leader.key().to_vec(), generation)));
    s.lease_deadline_ms
        .store(deadline.load(Ordering::SeqCst), Ordering::SeqCst);
    let result = hold_office(s, client, generation as u64, &alive).await;
    let resign = client.resign(Some(ResignOptions::new().with_leader(leader)));
    let _ = tokio::time::timeout(Duration::from_secs(1), resign).await;
    result
}

async fn hold_office(
    s: &Arc<Shared>,
    client: &mut etcd_client::Client,
    generation: u64,
    alive: &impl Fn() -> bool,
) -> Result<(), String> {
    let revision = take_office(s, generation).await?;
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let mut watch = client
        .watch(HOSTS_PREFIX, Some(opts))
        .await
        .map_err(|e| format!("watching {HOSTS_PREFIX}: {e}"))?;
    loop {
        tokio::select! {
            msg = watch.message() => {
                let resp = match msg {
                    Ok(Some(r)) => r,
                    Ok(None) => return Err("the hosts watch ended".into()),
                    Err(e) => return Err(format!("the hosts watch failed: {e}")),
                };
                if resp.canceled() {
                    return Err(format!("the hosts watch was cancelled: {}", resp.cancel_reason()));
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let name = String::from_utf8_lossy(kv.key())
                        .trim_start_matches(HOSTS_PREFIX)
                        .to_string();
                    match ev.event_type() {
                        EventType::Put => match serde_json::from_slice::<HostRecord>(kv.value()) {
                            Ok(r) => s.feed(Input::HostUp(r)).await,
                            Err(e) => eprintln!("tern controller: ignoring host record {name}: {e}"),
                        },
                        EventType::Delete => s.feed(Input::HostExpired { host: name }).await,
                    }
                }
            }
            _ = s.step_down.notified() => return Err("stepped down".into()),
            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                if !alive() {
                    return Err("the election lease was not renewed in time".into());
                }
                if s.core().generation() != Some(generation) {
                    return Err("deposed".into());
                }
            }
        }
    }
}

/// Follows who leads (for the 503 answers of a controller that does not) and counts changes.
async fn observe_leader(s: Arc<Shared>, mut client: etcd_client::Client) {
    let mut last: Option<Vec<u8>> = None;
    loop {
        let r = tokio::time::timeout(Duration::from_secs(2), client.leader(ELECTION)).await;
        let now = match r {
            Ok(Ok(r)) => r.kv().map(|kv| (kv.key().to_vec(), kv.value().to_vec())),
            // "no leader" is an error in etcd's election API.
            Ok(Err(_)) => None,
            Err(_) => continue,
        };
        let key = now.as_ref().map(|(k, _)| k.clone());
        if key.is_some() && key != last {
            s.leader_changes.fetch_add(1, Ordering::SeqCst);
        }
        if key.is_some() {
            last = key;
        }
        *lock(&s.leader_url) = now.map(|(_, v)| String::from_utf8_lossy(&v).into_owned());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
