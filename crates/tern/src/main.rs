//! `tern`: the one command line of the Tern hypervisor cluster.
//!
//! This file only parses the top level and hands each subcommand to its module; every module is a
//! thin shell over one library crate (`vm` → tern-vmm and tern-migration, `volume` → tern-volume,
//! `park` → tern-parking, `sim` → tern-sim and tern-policy).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod agent;
mod cluster;
mod cluster_up;
mod controller;
mod demo;
mod demo_cluster;
mod host_power;
mod image;
mod net;
mod park;
mod pki;
mod sim;
mod vm;
mod volume;

/// Tern: run, move and pack virtual machines on Linux KVM.
#[derive(Debug, Parser)]
#[command(name = "tern", version, propagate_version = true, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one VM in the foreground, list this host's VMs, and drive them by name (pause, resume,
    /// status, stop, snapshot, migrate).
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// Export a guest image that Tern embeds, so other VMMs can boot the very same guest.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// The cluster shared volume: format a LUN, serve it, manage virtual-disk files and leases.
    #[command(subcommand)]
    Volume(volume::VolumeCommand),
    /// Core parking: pack this host's vCPU threads onto the fewest cores.
    #[command(subcommand)]
    Park(park::ParkCommand),
    /// The data-centre simulator: consolidation policies over utilisation traces.
    #[command(subcommand)]
    Sim(sim::SimCommand),
    /// Test topologies of network namespaces: hosts, a switch and a client on one machine.
    #[command(subcommand)]
    Net(net::NetCommand),
    /// Show the system doing its job on an embedded default (see README.md).
    Demo(demo::DemoArgs),
    /// The host agent: registers this host in etcd and runs the VMs the cluster's controller asks for.
    Agent(agent::AgentArgs),
    /// The cluster controller: leads through etcd, places, moves and restarts VMs, serves the API.
    Controller(controller::ControllerArgs),
    /// The cluster through the controller's API (hosts, VMs, migrations, maintenance); a test
    /// cluster on this machine (up, down).
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Host power: on, off and status through a host's BMC (IPMI), and Wake-on-LAN.
    #[command(subcommand)]
    Host(host_power::HostCommand),
    /// The cluster PKI: a CA and host, controller and user certificates for `--tls-dir`.
    #[command(subcommand)]
    Pki(pki::PkiCommand),
}

fn main() -> ExitCode {
    // A signal mask survives fork and exec: a parent that takes SIGINT/SIGTERM through a signalfd
    // (`tern cluster up`, `tern park daemon`) has them blocked, and every `tern` it starts (the
    // test cluster's volume nodes, agents, controllers) would never see a SIGTERM and could only
    // be killed. Each command starts with them unblocked and installs what it needs.
    let mut stop = nix::sys::signal::SigSet::empty();
    stop.add(nix::sys::signal::Signal::SIGINT);
    stop.add(nix::sys::signal::Signal::SIGTERM);
    let _ = stop.thread_unblock();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Vm(cmd) => vm::run(cmd),
        Command::Image(cmd) => image::run(cmd),
        Command::Volume(cmd) => volume::run(cmd),
        Command::Park(cmd) => park::run(cmd),
        Command::Sim(cmd) => sim::run(cmd),
        Command::Net(cmd) => net::run(cmd),
        Command::Demo(args) => demo::run(args),
        Command::Agent(args) => agent::run(args),
        Command::Controller(args) => controller::run(args),
        Command::Cluster(cmd) => cluster::run(cmd),
        Command::Host(cmd) => host_power::run(cmd),
        Command::Pki(cmd) => pki::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("tern: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
