//! `tern cluster up|down`: a whole test cluster on one machine, in one command.
//!
//! ```text
//!   root namespace                     NAME-cl (the control namespace, 10.77.0.200)
//!   127.0.0.1:P1 ──relay──────────────▶ tern controller --listen 10.77.0.200:8080
//!   127.0.0.1:P2 ──relay──────────────▶ tern controller --listen 10.77.0.200:8081
//!   127.0.0.1:P0 ──relay──────────────▶ etcd 10.77.0.200:2379
//!                                          │ switch NAME-sw (one layer-2 segment)
//!   NAME-h0 (10.77.0.10): tern volume serve --node-id 1 :10809, tern agent --host-id h0 :7000, VMMs
//!   NAME-h1 (10.77.0.11): tern volume serve --node-id 2 :10809, tern agent --host-id h1 :7000, VMMs
//!   …
//! ```
//!
//! Every host is a network namespace of a `tern-netlab` topology; etcd and the controllers live in
//! the topology's client namespace, so a host cut off from the switch (its link down) loses etcd
//! and the controllers as a real host would. The operator's side (the root namespace) reaches the
//! controllers and etcd through loopback relays that this process runs, so `tern cluster vms
//! --controller https://127.0.0.1:P1` (with the admin's `--tls-dir`) works from anywhere on the
//! machine.
//!
//! By default the cluster runs over TLS: it makes a PKI in `/run/tern/cluster-NAME/pki` (a CA,
//! a host certificate per host named like the host with its address as SAN, a host certificate
//! `node-N` per volume node with the same address, one per controller, one for etcd and an
//! `admin` user), starts etcd on https with client-certificate auth, the CA's revocation list and
//! one etcd user per certificate with only the keys its kind uses ([`etcd_rbac`]), and gives every
//! process its `--tls-dir`: the volume nodes serve only NBD over TLS and reach etcd over TLS
//! themselves, and the VMMs the agents start present their host's certificate to them. The
//! controllers take `--admins admin` and the token file `/run/tern/cluster-NAME/tokens` (`tern
//! cluster token add` appends to it). `--insecure` runs everything on plain HTTP and plain NBD instead.
//!
//! All files (etcd's data, the shared LUN, the PKI, the hosts' runtime folders, logs and the
//! state file `state.json`) live in `/run/tern/cluster-NAME`. `tern cluster down --name NAME` asks the `up`
//! process to stop (SIGTERM) and waits; if that process is gone, it removes what the state file
//! lists itself. Either way nothing stays: no process, no namespace, no file.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tern_netlab::{BuildTopologyError, Topology, TopologySpec};
use tern_parking::daemon::Signals;

/// Where every cluster's folder lives.
pub const RUN_DIR: &str = "/run/tern";
/// etcd's client port in the control namespace.
pub const ETCD_PORT: u16 = 2379;
const ETCD_PEER_PORT: u16 = 2380;
/// The first controller's port in the control namespace (the next ones follow).
pub const CONTROLLER_PORT: u16 = 8080;
/// Each agent's port on its host's address.
pub const AGENT_PORT: u16 = 7000;
/// Each volume node's port on its host's address.
pub const VOLUME_PORT: u16 = 10809;
/// Most hosts a test cluster may have.
pub const MAX_HOSTS: usize = 16;
/// Most controllers a test cluster may have.
pub const MAX_CONTROLLERS: usize = 5;

/// Options of `tern cluster up`.
#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// The cluster's name: its namespaces are NAME-h0…, NAME-sw and NAME-cl, its folder
    /// /run/tern/cluster-NAME (1-20 of a-z, 0-9, '-').
    #[arg(long, default_value = "lab")]
    pub name: String,
    /// Hosts (network namespaces, each with a volume node and an agent), 1-16.
    #[arg(long)]
    pub hosts: usize,
    /// The capacity each host's agent declares, one CORES:POWER_MODEL per host in host order
    /// (e.g. `2:hp-ml110-g5,4:hp-ml110-g4`); default 2:hp-ml110-g5 for every host. Placement
    /// reads these (docs/cluster.md, "Placement"); the VMs still share this machine's CPUs.
    #[arg(long, value_delimiter = ',')]
    pub host_shape: Vec<String>,
    /// Controllers (one leads, the others stand by), 1-5.
    #[arg(long, default_value_t = 2)]
    pub controllers: usize,
    /// Size of the shared LUN (a sparse file), e.g. 4G.
    #[arg(long, default_value = "4G")]
    pub lun_size: String,
    /// Print the cluster's addresses as one JSON line on stdout once it is up (progress goes to
    /// stderr): `{"controllers": [...], "etcd": "...", "hosts": [...], ...}`.
    #[arg(long)]
    pub json: bool,
    /// Give every host a test BMC (OpenIPMI's ipmi_sim, in the control namespace): `ipmitool …
    /// chassis power off` kills everything on that host (agent, VMMs, volume node), `power on`
    /// starts its volume node and agent again, `power soft` stops them with SIGTERM first. Their
    /// addresses and credentials are printed (with --json under "bmcs"); reach them with
    /// `tern host power … --netns NAME-cl`. A Wake-on-LAN magic packet for a host's br0 MAC
    /// (`tern host wake --netns NAME-cl --broadcast 10.77.0.255 --mac MAC`) powers it on too.
    #[arg(long)]
    pub bmc: bool,
    /// The fraction of one real CPU each host's declared core stands for (0 < F <= 1), passed to
    /// every agent as `--cpu-share F`: e.g. 4 hosts of 2 cores on a 2-core machine at 0.25 see
    /// real, varying load from their VMs' vCPU threads at a quarter of the cost (docs/cluster.md).
    #[arg(long, value_name = "F")]
    pub host_cpu_share: Option<f64>,
    /// Plain HTTP everywhere (etcd, controllers, agents): no PKI, no authentication. By default
    /// the cluster runs over TLS with certificates made for it (docs/cluster.md).
    #[arg(long)]
    pub insecure: bool,
}

/// Options of `tern cluster down`.
#[derive(Debug, Clone, clap::Args)]
pub struct DownArgs {
    /// The cluster's name (as given to `tern cluster up`).
    #[arg(long, default_value = "lab")]
    pub name: String,
}

/// What a running cluster is made of; written to `/run/tern/cluster-NAME/state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabState {
    /// The cluster's name.
    pub name: String,
    /// The `tern cluster up` process that owns it.
    pub pid: u32,
    /// Its folder.
    pub dir: PathBuf,
    /// etcd, as the operator reaches it (a loopback relay).
    pub etcd: String,
    /// etcd, as hosts and controllers reach it.
    pub etcd_internal: String,
    /// etcd's process.
    pub etcd_pid: u32,
    /// The controllers.
    pub controllers: Vec<LabController>,
    /// The hosts.
    pub hosts: Vec<LabHost>,
    /// The network namespaces of the cluster.
    pub namespaces: Vec<String>,
    /// The namespace of etcd and the controllers.
    pub control_namespace: String,
    /// The cluster's PKI folder (CA and one `--tls-dir` per process), `None` with `--insecure`.
    #[serde(default)]
    pub pki: Option<PathBuf>,
}

impl LabState {
    /// The admin user's `--tls-dir` (`None` with `--insecure`).
    pub fn admin_tls_dir(&self) -> Option<PathBuf> {
        self.pki.as_ref().map(|p| p.join(ADMIN))
    }

    /// The controllers' token file (`None` with `--insecure`).
    pub fn tokens_file(&self) -> Option<PathBuf> {
        self.pki.as_ref().map(|_| self.dir.join("tokens"))
    }
}

/// The name of the test cluster's admin user certificate.
pub const ADMIN: &str = "admin";

/// One controller of a test cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabController {
    /// Its URL for the operator (a loopback relay).
    pub url: String,
    /// Its URL inside the cluster.
    pub internal_url: String,
    /// Its process.
    pub pid: u32,
}

/// One host of a test cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabHost {
    /// The host's name (its agent's `--host-id`).
    pub name: String,
    /// Its network namespace.
    pub namespace: String,
    /// Its address.
    pub address: Ipv4Addr,
    /// Its agent's URL (inside the cluster).
    pub agent_url: String,
    /// Its agent's process.
    pub agent_pid: u32,
    /// Its volume node (`ADDR:PORT`).
    pub volume_node: String,
    /// Its volume node's id.
    pub volume_node_id: u32,
    /// Its volume node's process.
    pub volume_pid: u32,
    /// The folder of its VMs' runtime entries and sockets.
    pub runtime_dir: PathBuf,
    /// The host's `--tls-dir` (its `host` certificate; `None` with `--insecure`): what `tern
    /// volume --tls-dir` takes in its namespace to reach its TLS-only volume node.
    #[serde(default)]
    pub tls_dir: Option<PathBuf>,
}

/// What to build.
#[derive(Debug, Clone)]
pub struct LabSpec {
    /// The cluster's name.
    pub name: String,
    /// Hosts.
    pub hosts: usize,
    /// Controllers.
    pub controllers: usize,
    /// LUN size (`tern volume format --size`).
    pub lun_size: String,
    /// The `tern` binary every process runs.
    pub tern: PathBuf,
}

impl LabSpec {
    fn validate(&self) -> anyhow::Result<()> {
        let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
        ensure!(
            !self.name.is_empty()
                && self.name.len() <= 20
                && self.name.chars().all(ok)
                && !self.name.starts_with('-'),
            "cluster name {:?} must be 1-20 of a-z, 0-9 and '-', not starting with '-'",
            self.name
        );
        ensure!(
            (1..=MAX_HOSTS).contains(&self.hosts),
            "--hosts {} is out of range: a test cluster has 1 to {MAX_HOSTS} hosts",
            self.hosts
        );
        ensure!(
            (1..=MAX_CONTROLLERS).contains(&self.controllers),
            "--controllers {} is out of range: a test cluster has 1 to {MAX_CONTROLLERS} controllers",
            self.controllers
        );
        Ok(())
    }
}

/// Extras of a test cluster.
#[derive(Debug, Clone, Default)]
pub struct LabOptions {
    /// Give every host a test BMC (ipmi_sim) and the controllers their addresses, so the
    /// automation loop can power hosts off and on.
    pub bmc: bool,
    /// Every agent's `--cpu-share` (the agent's default, 1, when `None`).
    pub host_cpu_share: Option<f64>,
    /// Plain HTTP everywhere, no PKI (default: TLS).
    pub insecure: bool,
}

/// The folder of cluster `name`.
pub fn cluster_dir(name: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("cluster-{name}"))
}

/// The state file of cluster `name`.
pub fn state_path(name: &str) -> PathBuf {
    cluster_dir(name).join("state.json")
}

/// Reads the state file of cluster `name`, if there is one.
pub fn read_state(name: &str) -> anyhow::Result<Option<LabState>> {
    let path = state_path(name);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
            format!("{} is not a cluster state file", path.display())
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

struct Proc {
    what: String,
    child: Child,
}

/// A running test cluster. Dropping it (or [`Lab::shutdown`]) stops every process, deletes the
/// namespaces and removes the folder.
pub struct Lab {
    state: LabState,
    topology: Option<Topology>,
    procs: Vec<Proc>,
    relays_stop: Arc<AtomicBool>,
    down: bool,
    bmcs: Vec<LabBmc>,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab").field("state", &self.state).finish()
    }
}

fn url_etcd(lab: &Lab) -> String {
    lab.state.etcd_internal.clone()
}

fn host_name(i: usize) -> String {
    format!("h{i}")
}

/// The certificate name of volume node `id` (`tern volume serve` requires it).
fn node_name(id: u32) -> String {
    tern_volume::control::certificate_name_of_node(id)
}

/// The capacity a test host's agent declares (`--host-shape CORES:POWER_MODEL`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostShape {
    /// `--cores`.
    pub cores: u32,
    /// `--power-model`.
    pub power_model: String,
}

impl Default for HostShape {
    fn default() -> Self {
        HostShape {
            cores: 2,
            power_model: "hp-ml110-g5".into(),
        }
    }
}

/// Parses `--host-shape` values: none, or exactly one per host.
pub fn parse_host_shapes(values: &[String], hosts: usize) -> anyhow::Result<Vec<HostShape>> {
    if values.is_empty() {
        return Ok(vec![HostShape::default(); hosts]);
    }
    ensure!(
        values.len() == hosts,
        "--host-shape gives {} shape(s) for {hosts} host(s): give one CORES:POWER_MODEL per host",
        values.len()
    );
    values
        .iter()
        .map(|v| {
            let bad = || {
                anyhow::anyhow!(
                    "--host-shape {v:?} is not CORES:POWER_MODEL with CORES in 1..=1024 and a power model the agent knows (hp-ml110-g4, hp-ml110-g5)"
                )
            };
            let (cores, model) = v.split_once(':').ok_or_else(bad)?;
            let cores: u32 = cores.parse().map_err(|_| bad())?;
            ensure!((1..=1024).contains(&cores), bad());
            ensure!(
                tern_controller::place::known_power_model(model).is_some(),
                bad()
            );
            Ok(HostShape {
                cores,
                power_model: model.to_string(),
            })
        })
        .collect()
}

impl Lab {
    /// Builds and starts the cluster, reporting each step through `progress`; returns once every
    /// host's agent is registered with the leading controller. Every host declares the default
    /// shape.
    pub fn start(spec: &LabSpec, progress: &dyn Fn(&str)) -> anyhow::Result<Lab> {
        Lab::start_shaped(spec, &vec![HostShape::default(); spec.hosts], progress)
    }

    /// [`Lab::start`] with the capacity each host's agent declares (one shape per host).
    pub fn start_shaped(
        spec: &LabSpec,
        shapes: &[HostShape],
        progress: &dyn Fn(&str),
    ) -> anyhow::Result<Lab> {
        Lab::start_with(spec, shapes, &LabOptions::default(), progress)
    }

    /// [`Lab::start_shaped`] with the extras of [`LabOptions`].
    pub fn start_with(
        spec: &LabSpec,
        shapes: &[HostShape],
        opts: &LabOptions,
        progress: &dyn Fn(&str),
    ) -> anyhow::Result<Lab> {
        spec.validate()?;
        ensure!(
            shapes.len() == spec.hosts,
            "{} host shape(s) for {} host(s)",
            shapes.len(),
            spec.hosts
        );
        ensure!(
            is_root(),
            "tern cluster up needs root (network namespaces, /run/tern, KVM)"
        );
        if which("etcd").is_none() {
            bail!(
                "etcd is not on PATH: the cluster keeps its state in etcd (Debian: apt install etcd-server, or bash scripts/install-deps.sh)"
            );
        }
        let dir = cluster_dir(&spec.name);
        if let Some(old) = read_state(&spec.name).ok().flatten() {
            if pid_alive(old.pid) {
                bail!(
                    "cluster {:?} is already up (tern cluster up, pid {}): stop it first with `tern cluster down --name {}`, or pick another --name",
                    spec.name,
                    old.pid,
                    spec.name
                );
            }
            bail!(
                "cluster {:?} was not taken down (its state file {} is left from pid {}, which is gone): `tern cluster down --name {}` removes what is left",
                spec.name,
                state_path(&spec.name).display(),
                old.pid,
                spec.name
            );
        }
        progress(&format!(
            "building {} host namespaces, a switch and the control namespace {}-cl",
            spec.hosts, spec.name
        ));
        let topology = match Topology::build(TopologySpec::new(spec.name.clone(), spec.hosts)) {
            Ok(t) => t,
            Err(BuildTopologyError::Exists { namespace, .. }) => bail!(
                "the name {:?} is in use: network namespace {namespace} exists. `tern cluster down --name {}` (or `tern net down --name {}`) removes it, or pick another --name",
                spec.name,
                spec.name,
                spec.name
            ),
            Err(e) => return Err(e).context("cannot build the cluster's namespaces"),
        };
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot clear {}", dir.display()))?;
        }
        std::fs::create_dir_all(dir.join("logs"))
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let control_ns = topology.client_ns().context("the topology has a client")?;
        let control_addr = Topology::client_addr();
        let namespaces = topology.namespaces();
        let mut lab = Lab {
            state: LabState {
                name: spec.name.clone(),
                pid: std::process::id(),
                dir: dir.clone(),
                etcd: String::new(),
                etcd_internal: format!("http://{control_addr}:{ETCD_PORT}"),
                etcd_pid: 0,
                controllers: Vec::new(),
                hosts: Vec::new(),
                namespaces,
                control_namespace: control_ns.clone(),
                pki: None,
            },
            topology: Some(topology),
            procs: Vec::new(),
            relays_stop: Arc::new(AtomicBool::new(false)),
            down: false,
            bmcs: Vec::new(),
        };
        // From here on, a failure drops `lab`, which takes everything down again.
        lab.write_state()?;

        // The PKI: a CA and one certificate per process, plus the admin user.
        let host_addrs: Vec<Ipv4Addr> = {
            let t = lab.topology.as_ref().context("topology")?;
            (0..spec.hosts).map(|i| t.host_addr(i)).collect()
        };
        if !opts.insecure {
            progress(&format!(
                "making the cluster's PKI in {}",
                dir.join("pki").display()
            ));
            let pki = make_pki(&dir, &host_addrs, spec.controllers, control_addr)?;
            set_client_tls(Some(crate::cluster::client_tls(&pki.join(ADMIN))?));
            lab.state.pki = Some(pki);
            lab.write_state()?;
        }
        let pki = lab.state.pki.clone();
        let tls_dir = |name: &str| pki.as_ref().map(|p| p.join(name));
        let scheme = if pki.is_some() { "https" } else { "http" };
        if pki.is_some() {
            lab.state.etcd_internal = format!("https://{control_addr}:{ETCD_PORT}");
        }

        // etcd, in the control namespace.
        progress(&format!(
            "starting etcd at {} (in {control_ns})",
            lab.state.etcd_internal
        ));
        let url = lab.state.etcd_internal.clone();
        let peer = format!("http://127.0.0.1:{ETCD_PEER_PORT}");
        let mut etcd = Command::new("ip");
        etcd.args(["netns", "exec", &control_ns, "etcd"])
            .arg("--data-dir")
            .arg(dir.join("etcd"))
            .args(["--name", "default"])
            .args(["--listen-client-urls", &url])
            .args(["--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")]);
        if let Some(d) = tls_dir("etcd") {
            // Clients must present a certificate of the cluster CA that the CA's revocation list
            // (re-read at each connection) does not name (the peer URL is loopback in the control
            // namespace, with no other member).
            etcd.arg("--cert-file")
                .arg(d.join("server-cert.pem"))
                .arg("--key-file")
                .arg(d.join("server-key.pem"))
                .arg("--trusted-ca-file")
                .arg(d.join("ca-cert.pem"))
                .arg("--client-crl-file")
                .arg(d.join(tern_pki::files::CA_CRL))
                .arg("--client-cert-auth");
        }
        lab.state.etcd_pid = lab.spawn("etcd", etcd)?;
        let etcd_addr = SocketAddr::from((control_addr, ETCD_PORT));
        lab.wait_port("etcd", &control_ns, etcd_addr, Duration::from_secs(20))?;
        let port = relay(&control_ns, None, 0, etcd_addr, lab.relays_stop.clone())?;
        lab.state.etcd = format!("{scheme}://127.0.0.1:{port}");
        if let Some(p) = &pki {
            progress("etcd: users and roles per certificate, then authentication on");
            let controllers: Vec<String> = (1..=spec.controllers)
                .map(|c| format!("controller-{c}"))
                .collect();
            let hosts: Vec<String> = (0..spec.hosts).map(host_name).collect();
            let nodes = (1..=spec.hosts)
                .map(|n| u32::try_from(n).map(node_name))
                .collect::<Result<Vec<_>, _>>()
                .context("host count")?;
            etcd_rbac(&lab.state.etcd, p, &controllers, &hosts, &nodes)?;
        }

        // The shared LUN.
        let lun = dir.join("lun");
        progress(&format!(
            "formatting the shared LUN {} ({})",
            lun.display(),
            spec.lun_size
        ));
        let out = Command::new(&spec.tern)
            .args(["volume", "format", "--lun"])
            .arg(&lun)
            .args(["--size", &spec.lun_size])
            .output()
            .context("cannot run tern volume format")?;
        ensure!(
            out.status.success(),
            "tern volume format failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );

        // A volume node and an agent per host.
        let topology = lab.topology.as_ref().context("topology")?;
        let hosts: Vec<(String, Ipv4Addr)> = (0..spec.hosts)
            .map(|i| (topology.host_ns(i), topology.host_addr(i)))
            .collect();
        for (i, (ns, addr)) in hosts.iter().enumerate() {
            let node_id = u32::try_from(i + 1).context("host count")?;
            let volume_node = format!("{addr}:{VOLUME_PORT}");
            progress(&format!(
                "host {}: volume node {node_id} at {volume_node}",
                host_name(i)
            ));
            // Over TLS the node serves only NBD_OPT_STARTTLS with its `node-N` certificate
            // (the agents' VMMs present their host's) and reaches etcd with it directly.
            let mut serve = Command::new("ip");
            serve
                .args(["netns", "exec", ns])
                .arg(&spec.tern)
                .args(["volume", "serve", "--lun"])
                .arg(&lun)
                .args(["--node-id", &node_id.to_string()])
                .args(["--listen", &volume_node])
                .args(["--etcd", &url]);
            if let Some(d) = tls_dir(&node_name(node_id)) {
                serve.arg("--tls-dir").arg(d);
            }
            let volume_pid = lab.spawn(&format!("volume-{}", host_name(i)), serve)?;
            lab.state.hosts.push(LabHost {
                name: host_name(i),
                namespace: ns.clone(),
                address: *addr,
                agent_url: format!("{scheme}://{addr}:{AGENT_PORT}"),
                agent_pid: 0,
                volume_node,
                volume_node_id: node_id,
                volume_pid,
                runtime_dir: dir.join(host_name(i)),
                tls_dir: tls_dir(&host_name(i)),
            });
        }
        for i in 0..spec.hosts {
            let h = lab.state.hosts[i].clone();
            let addr = SocketAddr::from((h.address, VOLUME_PORT));
            lab.wait_port(
                &format!("volume-{}", h.name),
                &h.namespace,
                addr,
                Duration::from_secs(20),
            )?;
        }
        for (i, shape) in shapes.iter().enumerate() {
            let h = lab.state.hosts[i].clone();
            std::fs::create_dir_all(&h.runtime_dir)?;
            progress(&format!("host {}: agent at {}", h.name, h.agent_url));
            let mut agent = Command::new("ip");
            agent
                .args(["netns", "exec", &h.namespace])
                .arg(&spec.tern)
                .args(["agent", "--host-id", &h.name])
                .args(["--etcd", &url])
                .args(["--listen", &format!("{}:{AGENT_PORT}", h.address)])
                .args(["--volume-node", &h.volume_node])
                .args(["--volume-node-id", &h.volume_node_id.to_string()])
                .args(["--cores", &shape.cores.to_string()])
                .args(["--memory-mib", "4096"])
                .args(["--power-model", &shape.power_model])
                .args(
                    opts.host_cpu_share
                        .map(|f| ["--cpu-share".to_string(), f.to_string()])
                        .into_iter()
                        .flatten(),
                )
                .arg("--runtime-dir")
                .arg(&h.runtime_dir)
                .arg("--state-dir")
                .arg(h.runtime_dir.join("state"));
            if let Some(d) = tls_dir(&h.name) {
                agent.arg("--tls-dir").arg(d);
            }
            lab.state.hosts[i].agent_pid = lab.spawn(&format!("agent-{}", h.name), agent)?;
        }

        // The BMCs come before the controllers, which get their addresses (`--power-file`).
        let mut power_file = None;
        if opts.bmc {
            // a BMC's power-on reruns the agent's command line read from /proc: wait until the
            // agents run (listen), so it is theirs and not `ip netns exec`'s
            lab.wait_agents()?;
            lab.add_bmcs(progress)?;
            let path = lab.state.dir.join("power.json");
            let entries: Vec<serde_json::Value> = lab
                .bmc_info()
                .into_iter()
                .map(|b| {
                    serde_json::json!({
                        "host": b.host, "bmc": b.bmc, "user": b.user,
                        "password_file": b.password_file,
                    })
                })
                .collect();
            std::fs::write(&path, serde_json::to_string_pretty(&entries)?)
                .with_context(|| format!("cannot write {}", path.display()))?;
            power_file = Some(path);
        }

        // The controllers. Each advertises a loopback URL that works in every namespace: this
        // process relays it from the root namespace (for the operator) and from each host's
        // namespace (for its agent, whose connection then leaves through the host's own link, so
        // a host cut off from the switch cannot reach the controllers).
        for c in 0..spec.controllers {
            let port = CONTROLLER_PORT + u16::try_from(c).context("controller count")?;
            let addr = SocketAddr::from((control_addr, port));
            let relay_port = relay(&control_ns, None, 0, addr, lab.relays_stop.clone())?;
            for h in &lab.state.hosts {
                relay(
                    &h.namespace,
                    Some(&h.namespace),
                    relay_port,
                    addr,
                    lab.relays_stop.clone(),
                )
                .with_context(|| {
                    format!("cannot relay 127.0.0.1:{relay_port} in {}", h.namespace)
                })?;
            }
            let url = format!("{scheme}://127.0.0.1:{relay_port}");
            let mut ctl = Command::new("ip");
            ctl.args(["netns", "exec", &control_ns])
                .arg(&spec.tern)
                .args(["controller", "--etcd", &url_etcd(&lab)])
                .args(["--listen", &addr.to_string()])
                .args(["--advertise-url", &url]);
            if let Some(d) = tls_dir(&format!("controller-{}", c + 1)) {
                let tokens = lab.state.tokens_file().context("a token file")?;
                ctl.arg("--tls-dir")
                    .arg(d)
                    .arg("--tokens")
                    .arg(tokens)
                    .args(["--admins", ADMIN]);
            }
            if let Some(p) = &power_file {
                ctl.arg("--power-file").arg(p);
            }
            let pid = lab.spawn(&format!("controller-{}", c + 1), ctl)?;
            progress(&format!(
                "controller {}: {url} (listening on {scheme}://{addr} in {control_ns})",
                c + 1
            ));
            lab.state.controllers.push(LabController {
                url,
                internal_url: format!("{scheme}://{addr}"),
                pid,
            });
        }
        lab.write_state()?;
        lab.wait_agents()?;
        progress("waiting for a leader and every host to register");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            lab.check_alive()?;
            if let Some(leader) = lab.leader() {
                let hosts = get_json::<Vec<tern_api::cluster::HostInfo>>(
                    &lab.state.controllers[leader].url,
                    "/v1/hosts",
                );
                if let Ok(hosts) = hosts {
                    let up = hosts
                        .iter()
                        .filter(|h| h.state == tern_api::cluster::HostState::Up)
                        .count();
                    // Every host's reports reach the leader (it takes requests that change
                    // something only once it has heard from all of them).
                    let reporting = hosts.iter().filter(|h| h.cpu_utilization.is_some()).count();
                    if up == spec.hosts && reporting == spec.hosts {
                        break;
                    }
                }
            }
            ensure!(
                Instant::now() < deadline,
                "the cluster did not come up in 30 s: no controller leads with all {} hosts registered (logs in {})",
                spec.hosts,
                dir.join("logs").display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(lab)
    }

    /// What the cluster is made of.
    pub fn state(&self) -> &LabState {
        &self.state
    }

    /// The index of the controller that answers as the leader now, if any.
    pub fn leader(&self) -> Option<usize> {
        self.state
            .controllers
            .iter()
            .position(|c| matches!(http(&c.url, "GET", "/v1/hosts", None), Ok((200, _))))
    }

    /// Kills (SIGKILL) host `i`'s agent and every VMM in its namespace, as a host crash would; its
    /// volume node keeps running. Returns the processes killed.
    pub fn kill_host(&mut self, i: usize) -> anyhow::Result<Vec<u32>> {
        let h = self.state.hosts.get(i).context("no such host")?.clone();
        let pids = kill_host_processes(&h)?;
        self.reap();
        Ok(pids)
    }

    /// Kills (SIGKILL) controller `i`.
    pub fn kill_controller(&mut self, i: usize) -> anyhow::Result<()> {
        let c = self
            .state
            .controllers
            .get(i)
            .context("no such controller")?;
        let _ = kill(Pid::from_raw(c.pid as i32), Signal::SIGKILL);
        self.reap();
        Ok(())
    }

    /// Waits until every host's agent listens (20 s each at most).
    fn wait_agents(&mut self) -> anyhow::Result<()> {
        for h in self.state.hosts.clone() {
            let addr = SocketAddr::from((h.address, AGENT_PORT));
            self.wait_port(
                &format!("agent-{}", h.name),
                &h.namespace,
                addr,
                Duration::from_secs(20),
            )?;
        }
        Ok(())
    }

    /// The log file of a process (`etcd`, `agent-h0`, `volume-h1`, `controller-1`).
    pub fn log_path(&self, what: &str) -> PathBuf {
        self.state.dir.join("logs").join(format!("{what}.log"))
    }

    fn spawn(&mut self, what: &str, mut cmd: Command) -> anyhow::Result<u32> {
        let log = std::fs::File::create(self.log_path(what))
            .with_context(|| format!("cannot create the log of {what}"))?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: the operator's Ctrl-C reaches `cluster up` only, which then
            // stops everything in order.
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        let pid = child.id();
        self.procs.push(Proc {
            what: what.to_string(),
            child,
        });
        Ok(pid)
    }

    fn reap(&mut self) {
        for p in &mut self.procs {
            let _ = p.child.try_wait();
        }
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        for p in &mut self.procs {
            if let Ok(Some(status)) = p.child.try_wait() {
                let log = self.state.dir.join("logs").join(format!("{}.log", p.what));
                bail!(
                    "{} exited while the cluster was starting ({status}); its log {}:\n{}",
                    p.what,
                    log.display(),
                    tail(&log, 15)
                );
            }
        }
        Ok(())
    }

    fn wait_port(
        &mut self,
        what: &str,
        ns: &str,
        addr: SocketAddr,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            self.check_alive()?;
            if tern_netlab::ns::connect_from(ns, addr, Duration::from_millis(500)).is_ok() {
                return Ok(());
            }
            if start.elapsed() > timeout {
                let log = self.log_path(what);
                bail!(
                    "{what} did not answer on {addr} within {timeout:?}; its log {}:\n{}",
                    log.display(),
                    tail(&log, 15)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn write_state(&self) -> anyhow::Result<()> {
        let path = self.state.dir.join("state.json");
        let tmp = self.state.dir.join("state.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.state)?)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }

    /// Stops everything and removes the namespaces and the folder; returns what was left that
    /// could not be removed (empty when all went).
    pub fn shutdown(mut self) -> Vec<String> {
        self.down = true;
        self.teardown()
    }

    fn teardown(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        // The BMCs first: no power request starts anything while the rest goes down.
        self.bmcs.clear();
        let files = volume_files(&self.state);
        // Controllers first (nothing new is started), then agents, then whatever runs in the
        // hosts (VMMs), then the volume nodes (they flush and step down), then etcd.
        let groups: [&dyn Fn(&str) -> bool; 4] = [
            &|w| w.starts_with("controller-"),
            &|w| w.starts_with("agent-"),
            &|w| w.starts_with("volume-"),
            &|w| w == "etcd",
        ];
        for (g, in_group) in groups.iter().enumerate() {
            if g == 2 {
                for h in &self.state.hosts {
                    kill_namespace(&h.namespace, &[h.volume_pid]);
                }
            }
            let mut group: Vec<&mut Proc> = self
                .procs
                .iter_mut()
                .filter(|p| in_group(&p.what))
                .collect();
            // etcd inherits this process's blocked SIGTERM (see `up`) and holds nothing worth a
            // clean stop: its folder goes with the cluster's
            let sig = if g == 3 {
                Signal::SIGKILL
            } else {
                Signal::SIGTERM
            };
            for p in &mut group {
                if let Ok(None) = p.child.try_wait() {
                    let _ = kill(Pid::from_raw(p.child.id() as i32), sig);
                }
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            for p in &mut group {
                while matches!(p.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                if matches!(p.child.try_wait(), Ok(None)) {
                    let _ = p.child.kill();
                    let _ = p.child.wait();
                }
            }
        }
        for ns in &self.state.namespaces {
            kill_namespace(ns, &[]);
        }
        self.relays_stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.topology.take()
            && let Err(e) = t.teardown()
        {
            problems.push(format!("namespaces: {e}"));
        }
        remove_claims(&self.state, &files);
        if let Err(e) = std::fs::remove_dir_all(&self.state.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            problems.push(format!("{}: {e}", self.state.dir.display()));
        }
        problems
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.down {
            self.down = true;
            for p in self.teardown() {
                eprintln!("tern cluster: could not remove {p}");
            }
        }
    }
}

/// The files of the cluster's volume (their per-host claim files are removed at the end).
fn volume_files(state: &LabState) -> Vec<String> {
    let Some(h) = state.hosts.first() else {
        return Vec::new();
    };
    let tern = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("tern"));
    let out = Command::new("ip")
        .args(["netns", "exec", &h.namespace])
        .arg(tern)
        .args(["volume", "ls", "--json", "--node", &h.volume_node])
        .args(
            h.tls_dir
                .iter()
                .flat_map(|d| [OsStr::new("--tls-dir"), d.as_os_str()]),
        )
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    #[derive(Deserialize)]
    struct Listed {
        name: String,
    }
    out.ok()
        .and_then(|o| {
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
            let files = v.get("files").cloned().unwrap_or(v);
            serde_json::from_value::<Vec<Listed>>(files).ok()
        })
        .map(|l| l.into_iter().map(|f| f.name).collect())
        .unwrap_or_default()
}

/// Removes the per-host claim files (`tern_volume::client::claim_path`) of this cluster's
/// disks; every VMM holding one is gone by now.
fn remove_claims(state: &LabState, files: &[String]) {
    for h in &state.hosts {
        for f in files {
            let _ = std::fs::remove_file(tern_volume::client::claim_path(&h.volume_node, f));
        }
    }
}

/// SIGKILLs host `h`'s agent, then every other process in its namespace but its volume node.
pub fn kill_host_processes(h: &LabHost) -> anyhow::Result<Vec<u32>> {
    let mut killed = vec![h.agent_pid];
    // Stop the agent first so it cannot start anything while the rest dies.
    let _ = kill(Pid::from_raw(h.agent_pid as i32), Signal::SIGKILL);
    for _ in 0..3 {
        let pids = pids_in_namespace(&h.namespace)?;
        for pid in pids {
            if pid != h.volume_pid && pid != h.agent_pid {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                killed.push(pid);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    killed.sort_unstable();
    killed.dedup();
    Ok(killed)
}

/// The processes whose network namespace is `ns`.
pub fn pids_in_namespace(ns: &str) -> anyhow::Result<Vec<u32>> {
    let target = std::fs::metadata(format!("/run/netns/{ns}"))
        .with_context(|| format!("no network namespace {ns}"))?;
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(m) = std::fs::metadata(entry.path().join("ns/net"))
            && m.ino() == target.ino()
            && m.dev() == target.dev()
        {
            pids.push(pid);
        }
    }
    Ok(pids)
}

fn kill_namespace(ns: &str, except: &[u32]) {
    for _ in 0..50 {
        let pids: Vec<u32> = pids_in_namespace(ns)
            .unwrap_or_default()
            .into_iter()
            .filter(|p| !except.contains(p))
            .collect();
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Listens on loopback port `port` (0: any) of namespace `listen_ns` (`None`: the root
/// namespace) and relays every connection to `target`, connecting from inside namespace `ns`.
/// Returns the port.
fn relay(
    ns: &str,
    listen_ns: Option<&str>,
    port: u16,
    target: SocketAddr,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<u16> {
    let listener = match listen_ns {
        None => TcpListener::bind(("127.0.0.1", port)),
        Some(lns) => {
            tern_netlab::ns::in_namespace(lns, move || TcpListener::bind(("127.0.0.1", port)))?
        }
    }
    .context("cannot bind a loopback port")?;
    listener.set_nonblocking(true)?;
    let port = listener.local_addr()?.port();
    let ns = ns.to_string();
    std::thread::Builder::new()
        .name(format!("relay-{port}"))
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let ns = ns.clone();
                        let _ = std::thread::Builder::new()
                            .name("relay-conn".into())
                            .spawn(move || relay_one(client, &ns, target));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        })?;
    Ok(port)
}

fn relay_one(client: TcpStream, ns: &str, target: SocketAddr) {
    let _ = client.set_nonblocking(false);
    let Ok(server) = tern_netlab::ns::connect_from(ns, target, Duration::from_secs(2)) else {
        return;
    };
    let (Ok(mut c2), Ok(mut s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let up = std::thread::spawn(move || {
        let mut client = client;
        let mut server = server;
        let _ = std::io::copy(&mut client, &mut server);
        let _ = server.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut s2, &mut c2);
    let _ = c2.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
}

// ----- a small HTTP/1.1 client for the controllers' and agents' JSON APIs -----

/// The TLS settings of [`http`] and [`http_in`] for `https://` URLs (the admin user's, set by
/// [`Lab::start_with`] for a TLS cluster).
static CLIENT_TLS: std::sync::Mutex<Option<Arc<rustls::ClientConfig>>> =
    std::sync::Mutex::new(None);

/// Sets the TLS settings [`http`] and [`http_in`] use for `https://` URLs.
pub fn set_client_tls(cfg: Option<Arc<rustls::ClientConfig>>) {
    *CLIENT_TLS.lock().unwrap_or_else(|e| e.into_inner()) = cfg;
}

/// `ADDR:PORT` of an `http://` or `https://` URL, and whether it is https.
fn url_addr(base: &str) -> anyhow::Result<(&str, SocketAddr, bool)> {
    let (hostport, tls) = match base.split_once("://") {
        Some(("http", rest)) => (rest, false),
        Some(("https", rest)) => (rest, true),
        _ => bail!("{base:?} is not an http:// or https:// URL"),
    };
    let hostport = hostport.trim_end_matches('/');
    let addr: SocketAddr = hostport
        .parse()
        .with_context(|| format!("{base:?} does not name ADDR:PORT"))?;
    Ok((hostport, addr, tls))
}

/// Sends one request to `base` (`http://HOST:PORT`, or `https://` with the settings of
/// [`set_client_tls`]) + `path` and returns the status and body. One connection per request
/// (`Connection: close`); 10 s timeouts.
pub fn http(
    base: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let (hostport, addr, tls) = url_addr(base)?;
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .with_context(|| format!("cannot connect to {base}"))?;
    http_over(stream, addr, tls, hostport, method, path, body)
}

fn http_over(
    stream: TcpStream,
    addr: SocketAddr,
    tls: bool,
    hostport: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    if !tls {
        return http_on(stream, hostport, method, path, body);
    }
    let cfg = CLIENT_TLS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .with_context(|| {
            format!("https://{hostport}: no TLS settings (the cluster's admin --tls-dir)")
        })?;
    let name = tern_pki::TlsDir::server_name(&addr.ip().to_string());
    let conn =
        rustls::ClientConnection::new(cfg, name).with_context(|| format!("TLS to {hostport}"))?;
    let tls = rustls::StreamOwned::new(conn, stream);
    http_on(tls, hostport, method, path, body).with_context(|| format!("https://{hostport}"))
}

/// Like [`http`], connecting from inside network namespace `ns`.
pub fn http_in(
    ns: &str,
    base: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let (hostport, addr, tls) = url_addr(base)?;
    let stream = tern_netlab::ns::connect_from(ns, addr, Duration::from_secs(3))
        .with_context(|| format!("cannot connect to {base} from {ns}"))?;
    http_over(stream, addr, tls, hostport, method, path, body)
}

fn http_on<S: Read + Write>(
    mut stream: S,
    host: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad HTTP status line {status_line:?} from {host}"))?;
    let mut chunked = false;
    let mut length = None;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else if k == "content-length" {
                length = v.parse::<usize>().ok();
            }
        }
    }
    let mut out = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                .context("bad chunk size")?;
            if n == 0 {
                break;
            }
            let mut chunk = vec![0; n + 2];
            reader.read_exact(&mut chunk)?;
            out.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = length {
        out.resize(n, 0);
        reader.read_exact(&mut out)?;
    } else {
        read_to_close(&mut reader, &mut out)?;
    }
    Ok((status, String::from_utf8_lossy(&out).into_owned()))
}

/// Reads until the peer closes; a TLS peer that closes without `close_notify` (as hyper does
/// after `Connection: close`) ends the body as well.
fn read_to_close<R: Read>(r: &mut R, out: &mut Vec<u8>) -> std::io::Result<()> {
    match r.read_to_end(out) {
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(()),
        other => other.map(|_| ()),
    }
}

/// GETs `path` and decodes a 200 answer.
pub fn get_json<T: serde::de::DeserializeOwned>(base: &str, path: &str) -> anyhow::Result<T> {
    let (status, body) = http(base, "GET", path, None)?;
    ensure!(status == 200, "GET {path}: {status} {body}");
    serde_json::from_str(&body).with_context(|| format!("GET {path}: unexpected body {body}"))
}

// ----- test BMCs (`tern cluster up --bmc`) -----

/// One host's test BMC, as `tern cluster up` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct BmcInfo {
    /// The host it powers.
    pub host: String,
    /// Its address (`ADDR:PORT`, UDP), in `netns`.
    pub bmc: String,
    /// The network namespace it listens in (the control namespace).
    pub netns: String,
    /// The admin user.
    pub user: String,
    /// Its password.
    pub password: String,
    /// A file holding the password (for `tern host power --password-file`).
    pub password_file: PathBuf,
    /// The MAC whose Wake-on-LAN magic packet powers the host on (its br0's).
    pub wake_mac: String,
}

/// A host's test BMC and its Wake-on-LAN listener (which powers it on through the BMC).
#[derive(Debug)]
struct LabBmc {
    waker: tern_power::wol::WakeWatcher,
    bmc: tern_power::bmc_sim::SimBmc,
}

/// The MAC of bridge br0 in namespace `ns` (a test host's address lives on it).
fn host_mac(ns: &str) -> anyhow::Result<tern_power::wol::MacAddr> {
    let out = Command::new("ip")
        .args(["-n", ns, "-br", "link", "show", "br0"])
        .output()
        .with_context(|| format!("cannot run ip link show br0 in {ns}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mac = text
        .split_whitespace()
        .nth(2)
        .with_context(|| format!("no br0 in {ns}: {text:?}"))?;
    Ok(mac.parse()?)
}

/// The BMC user of every test host.
pub const BMC_USER: &str = "admin";

impl Lab {
    /// Gives every host a test BMC (ipmi_sim) in the control namespace. Its power-off kills every
    /// process in the host's namespace, as pulling the plug would; its soft-off sends SIGTERM
    /// first; its power-on starts the host's volume node and, once that listens, its agent, with
    /// the very command lines they run now (read from `/proc`).
    pub fn add_bmcs(&mut self, progress: &dyn Fn(&str)) -> anyhow::Result<()> {
        use tern_power::PowerDriver;
        use tern_power::bmc_sim::conf::sh_quote;
        use tern_power::bmc_sim::{SimBmc, SimBmcOptions};
        let dir = self.state.dir.clone();
        let mut secret = [0u8; 8];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut secret))
            .context("cannot read /dev/urandom for the BMC password")?;
        let password: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        let password_file = dir.join("bmc-password");
        std::fs::write(&password_file, format!("{password}\n"))
            .and_then(|()| {
                std::fs::set_permissions(
                    &password_file,
                    std::os::unix::fs::PermissionsExt::from_mode(0o600),
                )
            })
            .with_context(|| format!("cannot write {}", password_file.display()))?;
        let logs = dir.join("logs");
        for h in self.state.hosts.clone() {
            let argv = |pid: u32, what: &str| -> anyhow::Result<String> {
                let raw = std::fs::read(format!("/proc/{pid}/cmdline")).with_context(|| {
                    format!("cannot read the command line of {what} (pid {pid})")
                })?;
                let args: Vec<String> = raw
                    .split(|&b| b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| sh_quote(&String::from_utf8_lossy(a)))
                    .collect();
                ensure!(
                    args.len() > 1,
                    "{what} (pid {pid}) has no command line: is it still running?"
                );
                Ok(args.join(" "))
            };
            let volume = argv(h.volume_pid, &format!("volume-{}", h.name))?;
            let agent = argv(h.agent_pid, &format!("agent-{}", h.name))?;
            let ns = sh_quote(&h.namespace);
            let log = |what: &str| {
                sh_quote(
                    &logs
                        .join(format!("{what}-{}.log", h.name))
                        .display()
                        .to_string(),
                )
            };
            let on = format!(
                "(\n  setsid ip netns exec {ns} {volume} </dev/null >>{vlog} 2>&1 &\n  \
                 i=0\n  \
                 until ip netns exec {ns} ss -Hltn 'sport = :{VOLUME_PORT}' | grep -q . || [ \"$i\" -ge 100 ]; do sleep 0.1; i=$((i+1)); done\n  \
                 setsid ip netns exec {ns} {agent} </dev/null >>{alog} 2>&1 &\n\
                 ) </dev/null >/dev/null 2>&1 &",
                vlog = log("volume"),
                alog = log("agent"),
            );
            let off = format!(
                "for i in 1 2 3; do ip netns pids {ns} | xargs -r kill -KILL; sleep 0.05; done"
            );
            let soft = format!(
                "ip netns pids {ns} | xargs -r kill -TERM\n\
                 i=0\n\
                 while [ -n \"$(ip netns pids {ns})\" ] && [ \"$i\" -lt 20 ]; do sleep 0.1; i=$((i+1)); done\n\
                 {off}"
            );
            let mut o = SimBmcOptions::new(h.name.clone(), BMC_USER, password.clone());
            o.addr = Topology::client_addr();
            o.netns = Some(self.state.control_namespace.clone());
            o.power_on_cmd = Some(on);
            o.power_off_cmd = Some(off);
            o.soft_off_cmd = Some(soft);
            o.initially_on = true;
            o.power_off_on_drop = false;
            o.parent_dir = Some(dir.clone());
            let bmc = SimBmc::start(o)
                .with_context(|| format!("cannot start the test BMC of host {}", h.name))?;
            progress(&format!(
                "host {}: BMC at {} (in {})",
                h.name,
                bmc.addr(),
                self.state.control_namespace
            ));
            let mac = host_mac(&h.namespace)?;
            let listener = tern_power::wol::WolListener::bind(
                Some(&h.namespace),
                std::net::SocketAddrV4::new(
                    Ipv4Addr::UNSPECIFIED,
                    tern_power::wol::packet::DEFAULT_PORT,
                ),
            )
            .with_context(|| format!("cannot listen for magic packets in {}", h.namespace))?;
            let driver = bmc.driver();
            let waker = tern_power::wol::WakeWatcher::spawn(listener, mac, move |_| {
                if let Err(e) = driver.power_on() {
                    eprintln!("tern cluster: Wake-on-LAN: {e}");
                }
            });
            self.bmcs.push(LabBmc { waker, bmc });
        }
        Ok(())
    }

    /// The test BMCs (empty without `--bmc`).
    pub fn bmc_info(&self) -> Vec<BmcInfo> {
        self.bmcs
            .iter()
            .map(|LabBmc { waker, bmc: b }| BmcInfo {
                host: b.host().to_string(),
                bmc: b.addr().to_string(),
                netns: self.state.control_namespace.clone(),
                user: b.user().to_string(),
                password: b.password().to_string(),
                password_file: self.state.dir.join("bmc-password"),
                wake_mac: waker.mac().to_string(),
            })
            .collect()
    }
}

// ----- the commands -----

/// `tern cluster up`.
pub fn up(args: UpArgs) -> anyhow::Result<ExitCode> {
    // Blocked before any thread or child exists (threads inherit the mask). Children inherit it
    // too: the `tern` processes unblock them as they start (main.rs); etcd keeps it and is
    // stopped with SIGKILL, the BMCs (ipmi_sim) are killed by their own drop.
    let signals = Signals::block(&[Signal::SIGINT, Signal::SIGTERM])
        .context("cannot set up signal handling")?;
    let json = args.json;
    let say = move |s: &str| {
        if json {
            eprintln!("{s}");
        } else {
            println!("{s}");
        }
    };
    let spec = LabSpec {
        name: args.name.clone(),
        hosts: args.hosts,
        controllers: args.controllers,
        lun_size: args.lun_size.clone(),
        tern: std::env::current_exe().context("cannot find the tern binary")?,
    };
    let shapes = parse_host_shapes(&args.host_shape, args.hosts)?;
    let started = Instant::now();
    if let Some(f) = args.host_cpu_share {
        tern_agent::telemetry::CpuShare::new(f).context("--host-cpu-share")?;
    }
    let opts = LabOptions {
        bmc: args.bmc,
        host_cpu_share: args.host_cpu_share,
        insecure: args.insecure,
    };
    let lab = Lab::start_with(&spec, &shapes, &opts, &say)?;
    let bmcs = lab.bmc_info();
    let st = lab.state().clone();
    if json {
        let out = serde_json::json!({
            "name": st.name,
            "controllers": st.controllers.iter().map(|c| c.url.clone()).collect::<Vec<_>>(),
            "etcd": st.etcd,
            "hosts": st.hosts,
            "state_file": state_path(&st.name),
            "pid": st.pid,
            "bmcs": bmcs,
            "tls_dir": st.admin_tls_dir(),
            "tokens": st.tokens_file(),
        });
        println!("{out}");
    } else {
        say(&format!(
            "cluster {} is up in {:.1} s: {} hosts, {} controllers",
            st.name,
            started.elapsed().as_secs_f64(),
            st.hosts.len(),
            st.controllers.len()
        ));
        for c in &st.controllers {
            say(&format!("  controller {}", c.url));
        }
        say(&format!("  etcd       {}", st.etcd));
        for b in &bmcs {
            say(&format!(
                "  BMC of {}  {} in {} (user {}, password file {})",
                b.host,
                b.bmc,
                b.netns,
                b.user,
                b.password_file.display()
            ));
        }
        match (st.admin_tls_dir(), st.tokens_file()) {
            (Some(admin), Some(tokens)) => {
                say(&format!(
                    "TLS: the admin user's certificate is in {} (CA, certificate, key); pass it as --tls-dir or:",
                    admin.display()
                ));
                say(&format!("  export TERN_TLS_DIR={}", admin.display()));
                say(&format!(
                    "  tern cluster hosts --controller {}",
                    st.controllers[0].url
                ));
                say(&format!(
                    "a bearer token (e.g. for the dashboard at {}/#token=TOKEN, CA {}): tern cluster token add --file {} --name NAME --role viewer|admin",
                    st.controllers[0].url,
                    admin.join("ca-cert.pem").display(),
                    tokens.display()
                ));
            }
            _ => say(&format!(
                "try: tern cluster hosts --controller {} (plain HTTP, no authentication: --insecure)",
                st.controllers[0].url
            )),
        }
        say(&format!(
            "stop: Ctrl-C, or tern cluster down --name {}",
            st.name
        ));
    }
    let _ = std::io::stdout().flush();
    loop {
        if let Some(sig) = signals.wait(Duration::from_secs(1)) {
            eprintln!("tern cluster: {sig}: taking cluster {} down", st.name);
            break;
        }
    }
    let problems = lab.shutdown();
    if problems.is_empty() {
        eprintln!("tern cluster: cluster {} is down, nothing left", st.name);
        Ok(ExitCode::SUCCESS)
    } else {
        bail!(
            "cluster {} is down but left: {}",
            st.name,
            problems.join("; ")
        )
    }
}

/// `tern cluster down`.
pub fn down(args: DownArgs) -> anyhow::Result<ExitCode> {
    ensure!(
        is_root(),
        "tern cluster down needs root (network namespaces, /run/tern)"
    );
    let state = read_state(&args.name)?;
    let Some(state) = state else {
        let removed = Topology::remove(&args.name).context("cannot remove namespaces")?;
        let dir = cluster_dir(&args.name);
        let had_dir = dir.exists();
        if had_dir {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot remove {}", dir.display()))?;
        }
        if removed.is_empty() && !had_dir {
            println!("no cluster named {}: nothing to remove", args.name);
        } else {
            println!(
                "cluster {}: removed what was left ({} namespaces{})",
                args.name,
                removed.len(),
                if had_dir { ", its folder" } else { "" }
            );
        }
        return Ok(ExitCode::SUCCESS);
    };
    if pid_alive(state.pid) {
        let _ = kill(Pid::from_raw(state.pid as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        while pid_alive(state.pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        ensure!(
            !pid_alive(state.pid),
            "tern cluster up (pid {}) did not stop within 60 s",
            state.pid
        );
        if !cluster_dir(&args.name).exists() {
            println!("cluster {} is down", args.name);
            return Ok(ExitCode::SUCCESS);
        }
    }
    // The owner is gone: remove what the state file lists.
    let files = volume_files(&state);
    for c in &state.controllers {
        kill_if(c.pid, &["tern"]);
    }
    for h in &state.hosts {
        kill_if(h.agent_pid, &["tern"]);
        kill_namespace(&h.namespace, &[]);
    }
    for ns in &state.namespaces {
        kill_namespace(ns, &[]);
    }
    kill_if(state.etcd_pid, &["etcd"]);
    let removed = Topology::remove(&args.name).context("cannot remove namespaces")?;
    remove_claims(&state, &files);
    let dir = cluster_dir(&args.name);
    std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    println!(
        "cluster {} is down (its `up` process had gone; removed {} namespaces and {})",
        args.name,
        removed.len(),
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// SIGKILLs `pid` if it still runs one of `programs` (a PID reused by something else is left).
fn kill_if(pid: u32, programs: &[&str]) {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let first = cmdline.split(|&b| b == 0).next().unwrap_or_default();
    let name = Path::new(std::str::from_utf8(first).unwrap_or(""))
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("")
        .to_string();
    if programs.iter().any(|p| *p == name) {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
}

/// Whether process `pid` exists (and is not a zombie).
pub fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st != "Z"))
        })
        .unwrap_or(false)
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `tern cluster up|down` (flattened into `tern cluster`).
#[derive(Debug, clap::Subcommand)]
pub enum LabCommand {
    /// Start a test cluster.
    Up(UpArgs),
    /// Take a test cluster down.
    Down(DownArgs),
}

/// Runs a [`LabCommand`].
pub fn run(cmd: LabCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        LabCommand::Up(a) => up(a),
        LabCommand::Down(a) => down(a),
    }
}

/// etcd's role for the controllers: the whole Tern keyspace.
const ETCD_ROLE_CONTROLLER: &str = "tern-controller";
/// etcd's role for the agents: reading who leads (`/tern/leader`); each host also gets a role of
/// its own for its record (`tern-host-NAME`).
const ETCD_ROLE_AGENT: &str = "tern-agent";
/// etcd's role for the volume nodes: their election and membership keys (`tern/volume/`).
const ETCD_ROLE_VOLUME: &str = "tern-volume";

/// Least privilege in the cluster's etcd (docs/security.md "etcd"): with `--client-cert-auth`,
/// etcd takes a client certificate's CN as its user once authentication is on. Adds a user per
/// certificate that talks to etcd (no password: only the certificate authenticates it) with the
/// role of its kind — `controller-N`: read-write `/tern/`; host `NAME` (its agent): read
/// `/tern/leader*`, read-write the key `/tern/hosts/NAME` only; `node-N` (a volume node): read-write
/// `tern/volume/*` — then `root` (etcd requires it; no certificate names it, so nobody can change
/// this afterwards) and turns authentication on. Any other certificate of the CA (the `admin` user,
/// `etcd`'s own) is refused every key. Connects through `url` with `etcd`'s certificate.
fn etcd_rbac(
    url: &str,
    pki: &Path,
    controllers: &[String],
    hosts: &[String],
    nodes: &[String],
) -> anyhow::Result<()> {
    use etcd_client::{Permission, UserAddOptions};
    let dir = pki.join("etcd");
    let read = |f: &str| {
        std::fs::read(dir.join(f)).with_context(|| format!("cannot read {}", dir.join(f).display()))
    };
    let tls = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(read("ca-cert.pem")?))
        .identity(etcd_client::Identity::from_pem(
            read("client-cert.pem")?,
            read("client-key.pem")?,
        ));
    let opts = etcd_client::ConnectOptions::new()
        .with_tls(tls)
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(10));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("a tokio runtime")?;
    rt.block_on(async {
        let mut c = etcd_client::Client::connect([url], Some(opts))
            .await
            .with_context(|| format!("cannot connect to etcd at {url}"))?;
        let mut grants: Vec<(String, Permission)> = vec![
            (
                ETCD_ROLE_CONTROLLER.into(),
                Permission::read_write("/tern/").with_prefix(),
            ),
            (
                ETCD_ROLE_AGENT.into(),
                Permission::read(tern_controller::shell::store::ELECTION).with_prefix(),
            ),
            (
                ETCD_ROLE_VOLUME.into(),
                Permission::read_write("tern/volume/").with_prefix(),
            ),
        ];
        let mut users: Vec<(&str, Vec<String>)> = Vec::new();
        for n in controllers {
            users.push((n, vec![ETCD_ROLE_CONTROLLER.into()]));
        }
        for h in hosts {
            let own = format!("tern-host-{h}");
            let key = format!("{}{h}", tern_api::agent::HOSTS_PREFIX);
            grants.push((own.clone(), Permission::read_write(key)));
            users.push((h, vec![ETCD_ROLE_AGENT.into(), own]));
        }
        for n in nodes {
            users.push((n, vec![ETCD_ROLE_VOLUME.into()]));
        }
        users.push(("root", vec!["root".into()]));
        let mut roles: Vec<&str> = vec!["root"];
        roles.extend(grants.iter().map(|(r, _)| r.as_str()));
        roles.dedup();
        for r in roles {
            c.role_add(r)
                .await
                .with_context(|| format!("etcd: cannot add role {r}"))?;
        }
        for (r, p) in grants {
            c.role_grant_permission(r.as_str(), p)
                .await
                .with_context(|| format!("etcd: cannot grant role {r} its keys"))?;
        }
        for (u, rs) in users {
            c.user_add(u, "", Some(UserAddOptions::new().with_no_pwd()))
                .await
                .with_context(|| format!("etcd: cannot add user {u}"))?;
            for r in rs {
                c.user_grant_role(u, r.as_str())
                    .await
                    .with_context(|| format!("etcd: cannot grant role {r} to {u}"))?;
            }
        }
        c.auth_enable()
            .await
            .context("etcd: cannot turn authentication on")?;
        anyhow::Ok(())
    })
}

/// Makes the cluster's PKI in `DIR/pki`: the CA, `etcd` (role controller, SAN the control
/// address), one host certificate per host named like the host (SAN its address), `controller-N`
/// per controller (SAN the control address; 127.0.0.1 is always in) and the `admin` user; and an
/// empty token file `DIR/tokens` (0600). Returns the PKI folder.
fn make_pki(
    dir: &Path,
    hosts: &[Ipv4Addr],
    controllers: usize,
    control_addr: Ipv4Addr,
) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    use tern_pki::{IssueOptions, Role};
    let pki = dir.join("pki");
    tern_pki::init_ca(&pki).with_context(|| format!("cannot make a CA in {}", pki.display()))?;
    let with_san = |ip: Ipv4Addr| IssueOptions {
        sans: vec![ip.to_string()],
        ..IssueOptions::default()
    };
    let issue = |name: &str, role: Role, opts: &IssueOptions| {
        tern_pki::issue(&pki, name, role, opts)
            .with_context(|| format!("cannot issue the certificate of {name}"))
            .map(|_| ())
    };
    // etcd's own certificate with the narrowest role that serves: it is no controller, so its key
    // (on the etcd machine) cannot command agents or fence volume nodes.
    issue("etcd", Role::Host, &with_san(control_addr))?;
    for (i, addr) in hosts.iter().enumerate() {
        issue(&host_name(i), Role::Host, &with_san(*addr))?;
        // The host's volume node: its certificate names the node id, and its address as SAN
        // (the VMMs and the other nodes check it against the address they dial).
        let node = u32::try_from(i + 1).context("host count")?;
        issue(&node_name(node), Role::Host, &with_san(*addr))?;
    }
    for c in 0..controllers {
        issue(
            &format!("controller-{}", c + 1),
            Role::Controller,
            &with_san(control_addr),
        )?;
    }
    issue(ADMIN, Role::User, &IssueOptions::default())?;
    let tokens = dir.join("tokens");
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tokens)
        .with_context(|| format!("cannot create {}", tokens.display()))?;
    Ok(pki)
}
