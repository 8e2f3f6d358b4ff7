//! Test topologies of Linux network namespaces: several "hosts", a "switch" and a "client".
//!
//! Live migration has to be shown between hosts that are really apart: each host has its own network
//! stack, its VMs' taps sit on the host's bridge, and the hosts meet on a switch whose forwarding table
//! must learn where a migrated VM now lives. On one machine that is a set of network namespaces joined
//! by veth pairs and Linux bridges:
//!
//! ```text
//!              client ns                         switch ns (bridge sw0)
//!          eth0 10.77.0.200 ────────────── cl ─┐
//!                                              ├─ sw0
//!   host ns h0: br0 10.77.0.10 ─ uplink ── h0 ─┤
//!               └─ tap(s) of h0's VMs          │
//!   host ns h1: br0 10.77.0.11 ─ uplink ── h1 ─┘
//!               └─ tap(s) of h1's VMs
//! ```
//!
//! Everything is one layer-2 segment, so a guest keeps its address when it moves between hosts. Only
//! addresses inside these namespaces are used. The crate drives iproute2 (`ip`, `bridge`); building and
//! tearing down need root.
//!
//! **Invariant:** a [`Topology`] owns its namespaces: dropping it deletes them (best effort, errors
//! reported on stderr); [`Topology::leak`] hands them to the command line (`tern net down`).

#![forbid(unsafe_code)]

pub mod ns;
pub mod scenario;

use std::net::Ipv4Addr;
use std::process::{Command, Output};

/// The subnet every topology uses; each topology has its own switch, so they never collide.
pub const SUBNET_PREFIX: [u8; 3] = [10, 77, 0];
/// Prefix length of [`SUBNET_PREFIX`].
pub const SUBNET_BITS: u8 = 24;
/// Name of the bridge inside each host namespace, where the host's VM taps are attached.
pub const HOST_BRIDGE: &str = "br0";
/// Name of the bridge inside the switch namespace.
pub const SWITCH_BRIDGE: &str = "sw0";
/// The most hosts a topology may have (host addresses are .10 to .10 + MAX_HOSTS - 1).
pub const MAX_HOSTS: usize = 64;

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologySpec {
    /// Prefix of every namespace name (`NAME-sw`, `NAME-h0`, …, `NAME-cl`).
    pub name: String,
    /// Number of hosts, 1 to [`MAX_HOSTS`].
    pub hosts: usize,
    /// Whether to add a client namespace on the switch.
    pub client: bool,
    /// Delete namespaces of the same name left over from an earlier run instead of refusing.
    pub replace_stale: bool,
}

impl TopologySpec {
    /// A topology of `hosts` hosts and a client, named `name`.
    pub fn new(name: impl Into<String>, hosts: usize) -> Self {
        Self {
            name: name.into(),
            hosts,
            client: true,
            replace_stale: false,
        }
    }

    fn validate(&self) -> Result<(), BuildTopologyError> {
        let valid_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if self.name.is_empty() || self.name.len() > 32 || !self.name.chars().all(valid_char) {
            return Err(BuildTopologyError::BadName(self.name.clone()));
        }
        if self.hosts == 0 || self.hosts > MAX_HOSTS {
            return Err(BuildTopologyError::BadHostCount(self.hosts));
        }
        Ok(())
    }
}

/// Why a topology could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildTopologyError {
    /// The name is empty, too long, or has characters other than letters, digits, `-` and `_`.
    #[error("Topology name {0:?} must be 1-32 letters, digits, '-' or '_'")]
    BadName(String),
    /// Zero hosts, or more than [`MAX_HOSTS`].
    #[error("A topology needs 1 to {MAX_HOSTS} hosts, not {0}")]
    BadHostCount(usize),
    /// A namespace of that name already exists (left from an earlier build, or someone else's).
    #[error(
        "Network namespace {namespace} already exists: topology {name:?} (or part of it) is still there"
    )]
    Exists {
        /// The namespace found.
        namespace: String,
        /// The topology name asked for.
        name: String,
    },
    /// An `ip`/`bridge` command failed.
    #[error(transparent)]
    Command(#[from] CommandError),
}

/// An iproute2 command that could not run or failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The program could not be started (iproute2 missing?).
    #[error("Could not run `{command}` (is iproute2 installed?)")]
    Spawn {
        /// The command line.
        command: String,
        /// Why it could not start.
        #[source]
        source: std::io::Error,
    },
    /// The program ran and failed.
    #[error("`{command}` failed: {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// What it printed on stderr, trimmed.
        stderr: String,
    },
}

/// A built topology. Dropping it tears it down.
#[derive(Debug)]
pub struct Topology {
    spec: TopologySpec,
    owned: bool,
}

impl Topology {
    /// Builds the namespaces, bridges and links of `spec` and brings everything up.
    ///
    /// On failure, whatever was created is removed again.
    pub fn build(spec: TopologySpec) -> Result<Self, BuildTopologyError> {
        spec.validate()?;
        let topology = Topology { spec, owned: true };
        let existing = list_namespaces()?;
        for ns in topology.namespaces() {
            if existing.contains(&ns) {
                if topology.spec.replace_stale {
                    run("ip", &["netns", "delete", &ns])?;
                } else {
                    // Not ours: do not delete it on drop.
                    let mut t = topology;
                    t.owned = false;
                    return Err(BuildTopologyError::Exists {
                        namespace: ns,
                        name: t.spec.name.clone(),
                    });
                }
            }
        }
        // If anything below fails, dropping `topology` removes what was made.
        topology.create()?;
        // A veth's carrier comes up a moment after both ends are up; until then its bridge port is
        // disabled and drops frames. Return only once every port forwards.
        for ns in topology.namespaces() {
            wait_ports_forwarding(&ns, None)?;
        }
        Ok(topology)
    }

    /// Finds a topology built earlier (by `tern net up`) from its namespaces; `None` if there is none.
    /// The returned value does not own the namespaces: dropping it leaves them.
    pub fn open(name: &str) -> Result<Option<Self>, CommandError> {
        let existing = list_namespaces()?;
        let switch = format!("{name}-sw");
        if !existing.contains(&switch) {
            return Ok(None);
        }
        let hosts = (0..MAX_HOSTS)
            .take_while(|i| existing.contains(&format!("{name}-h{i}")))
            .count();
        let client = existing.contains(&format!("{name}-cl"));
        let spec = TopologySpec {
            name: name.to_owned(),
            hosts,
            client,
            replace_stale: false,
        };
        Ok(Some(Topology { spec, owned: false }))
    }

    fn create(&self) -> Result<(), CommandError> {
        let sw = self.switch_ns();
        run("ip", &["netns", "add", &sw])?;
        run("ip", &["-n", &sw, "link", "set", "lo", "up"])?;
        add_bridge(&sw, SWITCH_BRIDGE)?;
        for i in 0..self.spec.hosts {
            let ns = self.host_ns(i);
            let port = self.switch_port_of_host(i);
            run("ip", &["netns", "add", &ns])?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
            add_bridge(&ns, HOST_BRIDGE)?;
            run(
                "ip",
                &[
                    "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "uplink",
                    "netns", &ns,
                ],
            )?;
            run(
                "ip",
                &[
                    "-n",
                    &sw,
                    "link",
                    "set",
                    &port,
                    "master",
                    SWITCH_BRIDGE,
                    "up",
                ],
            )?;
            run(
                "ip",
                &[
                    "-n",
                    &ns,
                    "link",
                    "set",
                    "uplink",
                    "master",
                    HOST_BRIDGE,
                    "up",
                ],
            )?;
            let addr = format!("{}/{SUBNET_BITS}", self.host_addr(i));
            run("ip", &["-n", &ns, "addr", "add", &addr, "dev", HOST_BRIDGE])?;
        }
        if self.spec.client {
            let cl = self.client_ns().expect("client requested");
            run("ip", &["netns", "add", &cl])?;
            run("ip", &["-n", &cl, "link", "set", "lo", "up"])?;
            run(
                "ip",
                &[
                    "-n", &sw, "link", "add", "cl", "type", "veth", "peer", "name", "eth0",
                    "netns", &cl,
                ],
            )?;
            run(
                "ip",
                &[
                    "-n",
                    &sw,
                    "link",
                    "set",
                    "cl",
                    "master",
                    SWITCH_BRIDGE,
                    "up",
                ],
            )?;
            let addr = format!("{}/{SUBNET_BITS}", Self::client_addr());
            run("ip", &["-n", &cl, "addr", "add", &addr, "dev", "eth0"])?;
            run("ip", &["-n", &cl, "link", "set", "eth0", "up"])?;
        }
        Ok(())
    }

    /// The spec this topology was built from (or, for [`Topology::open`], found to match).
    pub fn spec(&self) -> &TopologySpec {
        &self.spec
    }

    /// Every namespace of the topology: switch, hosts, then the client if there is one.
    pub fn namespaces(&self) -> Vec<String> {
        let mut all = vec![self.switch_ns()];
        all.extend((0..self.spec.hosts).map(|i| self.host_ns(i)));
        all.extend(self.client_ns());
        all
    }

    /// The switch's namespace.
    pub fn switch_ns(&self) -> String {
        format!("{}-sw", self.spec.name)
    }

    /// Host `i`'s namespace.
    pub fn host_ns(&self, i: usize) -> String {
        format!("{}-h{i}", self.spec.name)
    }

    /// The client's namespace, if the topology has a client.
    pub fn client_ns(&self) -> Option<String> {
        self.spec.client.then(|| format!("{}-cl", self.spec.name))
    }

    /// Host `i`'s address (on its bridge `br0`).
    pub fn host_addr(&self, i: usize) -> Ipv4Addr {
        let [a, b, c] = SUBNET_PREFIX;
        Ipv4Addr::new(
            a,
            b,
            c,
            10 + u8::try_from(i).expect("at most MAX_HOSTS hosts"),
        )
    }

    /// The client's address.
    pub fn client_addr() -> Ipv4Addr {
        let [a, b, c] = SUBNET_PREFIX;
        Ipv4Addr::new(a, b, c, 200)
    }

    /// A free address for guest number `n` (0-based): .2 up to .9, then .100 upwards.
    pub fn guest_addr(n: u8) -> Ipv4Addr {
        let [a, b, c] = SUBNET_PREFIX;
        let last = if n < 8 {
            2 + n
        } else {
            100u8.saturating_add(n - 8)
        };
        Ipv4Addr::new(a, b, c, last)
    }

    /// The switch-side port (in the switch namespace) that leads to host `i`.
    pub fn switch_port_of_host(&self, i: usize) -> String {
        format!("h{i}")
    }

    /// A command that runs `program` inside namespace `ns` (through `ip netns exec`).
    pub fn command_in(ns: &str, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, program]);
        cmd
    }

    /// Attaches an existing interface of host `i` (a VM's tap) to the host's bridge, brings it up,
    /// and returns once the bridge port forwards (frames sent before that would be dropped).
    pub fn attach_to_host_bridge(&self, i: usize, ifname: &str) -> Result<(), CommandError> {
        run(
            "ip",
            &[
                "-n",
                &self.host_ns(i),
                "link",
                "set",
                ifname,
                "master",
                HOST_BRIDGE,
                "up",
            ],
        )?;
        // A port whose link has no carrier (e.g. a veth whose peer is still down) forwards once it
        // has one; that is the caller's business. With carrier, the port still needs a moment
        // (the kernel reports the carrier to the bridge asynchronously): wait for it.
        let carrier = Command::new("ip")
            .args(["netns", "exec", &self.host_ns(i), "cat"])
            .arg(format!("/sys/class/net/{ifname}/carrier"))
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "1");
        if carrier {
            wait_ports_forwarding(&self.host_ns(i), Some(ifname))?;
        }
        Ok(())
    }

    /// The switch port whose forwarding entry holds `mac` (e.g. `h1`), or `None` if the switch has not
    /// learnt it. `mac` is compared case-insensitively.
    pub fn switch_port_of_mac(&self, mac: &str) -> Result<Option<String>, CommandError> {
        let out = run(
            "bridge",
            &["-n", &self.switch_ns(), "fdb", "show", "br", SWITCH_BRIDGE],
        )?;
        Ok(parse_fdb_port(&String::from_utf8_lossy(&out.stdout), mac))
    }

    /// Keeps the namespaces after this value is dropped (for `tern net up`).
    pub fn leak(mut self) {
        self.owned = false;
    }

    /// Deletes whatever is left of topology `name` — its switch, any `NAME-hN` host and its client —
    /// even a partial one, and returns the namespaces deleted (none: nothing was there).
    pub fn remove(name: &str) -> Result<Vec<String>, CommandError> {
        let existing = list_namespaces()?;
        let ours = |ns: &str| {
            ns.strip_prefix(name).is_some_and(|rest| {
                rest == "-sw"
                    || rest == "-cl"
                    || rest
                        .strip_prefix("-h")
                        .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
            })
        };
        let found: Vec<String> = existing.into_iter().filter(|ns| ours(ns)).collect();
        delete_namespaces(&found)?;
        Ok(found)
    }

    /// Deletes every namespace of the topology (their links and bridges go with them).
    pub fn teardown(mut self) -> Result<(), CommandError> {
        self.owned = false;
        delete_namespaces(&self.namespaces())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        if let Err(err) = delete_namespaces(&self.namespaces()) {
            eprintln!("tern-netlab: tearing down {}: {err}", self.spec.name);
        }
    }
}

/// A fixed, locally administered MAC for a bridge. A bridge without one takes the lowest MAC of its
/// ports, so it would change whenever a VM's tap joins or leaves, and neighbours that cached the
/// old one (the other hosts) could no longer reach the host's address.
fn bridge_mac(ns: &str, name: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in ns.bytes().chain([b'/']).chain(name.bytes()) {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    let b = h.to_be_bytes();
    format!("02:7e:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3])
}

fn add_bridge(ns: &str, name: &str) -> Result<(), CommandError> {
    let mac = bridge_mac(ns, name);
    // No STP and no forwarding delay: a port forwards the moment it is attached, as a VM's tap must.
    run(
        "ip",
        &[
            "-n",
            ns,
            "link",
            "add",
            name,
            "address",
            &mac,
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
        ],
    )?;
    run("ip", &["-n", ns, "link", "set", name, "up"])?;
    Ok(())
}

fn delete_namespaces(namespaces: &[String]) -> Result<(), CommandError> {
    let existing = list_namespaces()?;
    let mut first_error = None;
    for ns in namespaces.iter().filter(|ns| existing.contains(ns)) {
        if let Err(err) = run("ip", &["netns", "delete", ns]) {
            first_error.get_or_insert(err);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Names of the network namespaces that exist now.
pub fn list_namespaces() -> Result<Vec<String>, CommandError> {
    let out = run("ip", &["netns", "list"])?;
    Ok(parse_netns_list(&String::from_utf8_lossy(&out.stdout)))
}

/// Parses `ip netns list` output: one namespace a line, possibly followed by ` (id: N)`.
fn parse_netns_list(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Parses `bridge fdb show` output and returns the port (`dev`) that holds `mac`, ignoring the
/// bridge's own permanent entries.
fn parse_fdb_port(text: &str, mac: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        let entry_mac = words.next()?;
        if !entry_mac.eq_ignore_ascii_case(mac) {
            return None;
        }
        let rest: Vec<&str> = words.collect();
        if rest.contains(&"permanent") {
            return None;
        }
        let dev = rest.iter().position(|w| *w == "dev")?;
        rest.get(dev + 1).map(|d| (*d).to_owned())
    })
}

/// How long a bridge port may take to reach the forwarding state.
const PORT_UP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits until every bridge port in `ns` (or only `only`) is in the forwarding state.
fn wait_ports_forwarding(ns: &str, only: Option<&str>) -> Result<(), CommandError> {
    let start = std::time::Instant::now();
    loop {
        let out = run("bridge", &["-n", ns, "link", "show"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        if ports_forwarding(&text, only) {
            return Ok(());
        }
        if start.elapsed() > PORT_UP_TIMEOUT {
            return Err(CommandError::Failed {
                command: format!("bridge -n {ns} link show"),
                stderr: format!(
                    "bridge ports not forwarding after {PORT_UP_TIMEOUT:?}: {}",
                    text.trim()
                ),
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Whether `bridge link show` output has every port (or port `only`, which must be listed) in the
/// forwarding state.
fn ports_forwarding(text: &str, only: Option<&str>) -> bool {
    let mut seen = false;
    for line in text.lines().filter(|l| l.contains(" state ")) {
        // "4: tap0: <...> mtu 1500 master br0 state forwarding ..." (name may carry "@peer").
        let name = line
            .split(':')
            .nth(1)
            .map(|n| n.trim().split('@').next().unwrap_or(""))
            .unwrap_or("");
        if only.is_some_and(|o| o != name) {
            continue;
        }
        seen = true;
        if !line.contains("state forwarding") {
            return false;
        }
    }
    seen || only.is_none()
}

fn run(program: &str, args: &[&str]) -> Result<Output, CommandError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| CommandError::Spawn {
            command: command.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(out)
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        Err(CommandError::Failed { command, stderr })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_macs_are_fixed_unicast_and_distinct() {
        let a = bridge_mac("t-h0", "br0");
        assert_eq!(a, bridge_mac("t-h0", "br0"));
        assert_ne!(a, bridge_mac("t-h1", "br0"));
        assert!(a.starts_with("02:7e:"), "{a}");
        assert_eq!(a.len(), 17);
    }

    #[test]
    fn port_states_are_read_from_bridge_link_show() {
        let text = "3: uplink@if4: <BROADCAST,UP> mtu 1500 master br0 state disabled priority 32 cost 2 \n\
                    4: tap0: <BROADCAST,UP> mtu 1500 master br0 state forwarding priority 32 cost 2 \n";
        assert!(!ports_forwarding(text, None));
        assert!(!ports_forwarding(text, Some("uplink")));
        assert!(ports_forwarding(text, Some("tap0")));
        assert!(
            !ports_forwarding(text, Some("tap1")),
            "an unlisted port is not forwarding"
        );
        assert!(ports_forwarding("", None));
    }

    #[test]
    fn fdb_port_is_found_and_permanent_entries_are_ignored() {
        let text = "\
33:33:00:00:00:01 dev h0 self permanent
52:54:00:12:34:56 dev h1 master sw0
52:54:00:12:34:56 dev h0 master sw0 permanent
de:ad:be:ef:00:01 dev cl vlan 1 master sw0
";
        assert_eq!(parse_fdb_port(text, "52:54:00:12:34:56"), Some("h1".into()));
        assert_eq!(parse_fdb_port(text, "DE:AD:BE:EF:00:01"), Some("cl".into()));
        assert_eq!(parse_fdb_port(text, "33:33:00:00:00:01"), None);
        assert_eq!(parse_fdb_port(text, "00:00:00:00:00:00"), None);
    }

    #[test]
    fn netns_list_takes_first_word_of_each_line() {
        assert_eq!(
            parse_netns_list("a-h0 (id: 3)\na-sw\n\n"),
            vec!["a-h0".to_string(), "a-sw".into()]
        );
    }

    #[test]
    fn spec_validation_rejects_bad_names_and_counts() {
        assert!(matches!(
            TopologySpec::new("", 2).validate(),
            Err(BuildTopologyError::BadName(_))
        ));
        assert!(matches!(
            TopologySpec::new("a b", 2).validate(),
            Err(BuildTopologyError::BadName(_))
        ));
        assert!(matches!(
            TopologySpec::new("ok", 0).validate(),
            Err(BuildTopologyError::BadHostCount(0))
        ));
        assert!(matches!(
            TopologySpec::new("ok", MAX_HOSTS + 1).validate(),
            Err(BuildTopologyError::BadHostCount(_))
        ));
        assert!(TopologySpec::new("tern-demo_1", 2).validate().is_ok());
    }

    #[test]
    fn addresses_are_distinct() {
        let t = Topology {
            spec: TopologySpec::new("x", MAX_HOSTS),
            owned: false,
        };
        let mut all: Vec<Ipv4Addr> = (0..MAX_HOSTS).map(|i| t.host_addr(i)).collect();
        all.push(Topology::client_addr());
        all.extend((0..40).map(Topology::guest_addr));
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "every host, guest and client address differs");
    }
}
