//! `tern net …`: build and remove test topologies of network namespaces (hosts, a switch, a client).

use std::process::ExitCode;

use anyhow::{Context, bail};
use tern_netlab::{BuildTopologyError, Topology, TopologySpec};

/// Subcommands of `tern net`.
#[derive(Debug, clap::Subcommand)]
pub enum NetCommand {
    /// Build a topology: NAME-sw (switch bridge sw0), NAME-h0… (each a bridge br0 with an uplink to the
    /// switch), and NAME-cl (a client on the switch). Needs root. Run programs inside with
    /// `ip netns exec NAME-h0 …`.
    Up {
        /// Prefix of the namespace names.
        #[arg(long, default_value = "tern")]
        name: String,
        /// Number of hosts.
        #[arg(long, default_value_t = 2)]
        hosts: usize,
        /// Leave out the client namespace.
        #[arg(long)]
        no_client: bool,
        /// Delete namespaces of the same name left from an earlier run first.
        #[arg(long)]
        replace: bool,
    },
    /// Remove a topology built by `tern net up` (or what is left of it); a missing one is not an
    /// error.
    Down {
        /// Prefix of the namespace names.
        #[arg(long, default_value = "tern")]
        name: String,
    },
    /// Show a topology's namespaces and addresses.
    Status {
        /// Prefix of the namespace names.
        #[arg(long, default_value = "tern")]
        name: String,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: NetCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        NetCommand::Up {
            name,
            hosts,
            no_client,
            replace,
        } => {
            let spec = TopologySpec {
                name: name.clone(),
                hosts,
                client: !no_client,
                replace_stale: replace,
            };
            let topo = match Topology::build(spec) {
                Err(e @ BuildTopologyError::Exists { .. }) => bail!(
                    "{e}: remove it with `tern net down --name {name}`, or rebuild it with `tern net up --name {name} --replace`"
                ),
                other => other.context("building the topology")?,
            };
            print_status(&topo, false)?;
            topo.leak();
            Ok(ExitCode::SUCCESS)
        }
        NetCommand::Down { name } => {
            // Idempotent: a topology that is not there (any more) is what `down` wants.
            let removed = Topology::remove(&name)?;
            if removed.is_empty() {
                println!("no topology named {name}: nothing to remove");
            } else {
                println!("removed topology {name} ({})", removed.join(", "));
            }
            Ok(ExitCode::SUCCESS)
        }
        NetCommand::Status { name, json } => {
            let topo =
                Topology::open(&name)?.with_context(|| format!("no topology named {name:?}"))?;
            print_status(&topo, json)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_status(topo: &Topology, json: bool) -> anyhow::Result<()> {
    let hosts: Vec<serde_json::Value> = (0..topo.spec().hosts)
        .map(|i| {
            serde_json::json!({
                "namespace": topo.host_ns(i),
                "address": topo.host_addr(i).to_string(),
                "bridge": tern_netlab::HOST_BRIDGE,
                "switch_port": topo.switch_port_of_host(i),
            })
        })
        .collect();
    let client = topo.client_ns().map(
        |ns| serde_json::json!({ "namespace": ns, "address": Topology::client_addr().to_string() }),
    );
    if json {
        let value = serde_json::json!({
            "name": topo.spec().name,
            "switch": { "namespace": topo.switch_ns(), "bridge": tern_netlab::SWITCH_BRIDGE },
            "hosts": hosts,
            "client": client,
        });
        println!("{value}");
    } else {
        println!(
            "topology {}: switch {} (bridge {})",
            topo.spec().name,
            topo.switch_ns(),
            tern_netlab::SWITCH_BRIDGE
        );
        for (i, _) in hosts.iter().enumerate() {
            println!(
                "  host {i}: namespace {}, address {}, bridge {}, switch port {}",
                topo.host_ns(i),
                topo.host_addr(i),
                tern_netlab::HOST_BRIDGE,
                topo.switch_port_of_host(i)
            );
        }
        if let Some(ns) = topo.client_ns() {
            println!(
                "  client: namespace {ns}, address {}",
                Topology::client_addr()
            );
        }
    }
    Ok(())
}
