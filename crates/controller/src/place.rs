//! Where a VM goes: the hosts that break no must-rule, then `tern-policy`'s PABFD among them.
//!
//! The must-rules are checked here, host by host: the host is up and not in maintenance, the VM's
//! vCPUs fit the host's vCPU slots (`vcpus_per_core` × cores) and its memory fits, the VM is not
//! pinned elsewhere, no VM of its anti-affinity group is there; and, for a new VM, admission
//! control keeps room for the HA reserve. The hosts that fail one are marked excluded, and the
//! choice among the others is [`tern_policy::cluster::find_host`], the very function the
//! simulator's consolidation round places VMs with: the host whose power rises least and that
//! stays within its capacity, ties to the first by name. Only when no permitted host has the CPU
//! room PABFD asks for (the cluster is over-committed, e.g. by new VMs not yet measured, each
//! counted at whole vCPUs) does the VM go to the permitted host left least loaded.
//!
//! How a host's record maps to the policy's view ([`host_view`]): its power model by name
//! ([`power_model`]), the MIPS of one of its cores from that model ([`tern_policy::power::core_mips`]:
//! the server's clock in MHz, as CloudSim rates it), its capacity cores × that, as one processing
//! element ([`tern_policy::HostView::live`]). Its load is the CPU its VMs demand ([`host_load_mips`]).
//! Pure: the same candidates always give the same answer.

#![deny(clippy::disallowed_methods)]
use tern_api::cluster::VmCreate;
use tern_policy::cluster::{NoRules, Round, find_host};
use tern_policy::{
    ClusterView, Detector, HP_ML110_G4, HP_ML110_G5, HostView, Model, PolicyConfig, PowerModel,
    Selection, VmView,
};

/// The policy configuration placement runs [`find_host`] with: a host may take a VM while its
/// demand stays within its capacity (THR 1.0), with the paper's semantics (nothing of CloudSim's
/// peculiarities). Selection and migration speed play no part in placement.
pub const PLACEMENT_POLICY: PolicyConfig = PolicyConfig {
    detector: Detector::Thr(1.0),
    selection: Selection::Mmt,
    model: Model::Paper,
    migration_mb_per_s: 125.0,
    interval_s: 300.0,
};

/// One host as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The host's name.
    pub name: String,
    /// Why the host takes no VMs (down, in maintenance, or held by the automation powering it
    /// off or off); `None`: it may take them.
    pub unusable: Option<&'static str>,
    /// Physical cores.
    pub cores: u32,
    /// Memory for VMs, MiB.
    pub memory_mib: u64,
    /// The power model's name.
    pub power_model: String,
    /// vCPUs of the VMs placed (or arriving) here.
    pub vcpus_used: u32,
    /// Memory of the VMs placed (or arriving) here, MiB.
    pub memory_mib_used: u64,
    /// CPU demand of those VMs, in cores (measured utilisation × vCPUs; unmeasured VMs count whole).
    pub cpu_demand: f64,
    /// Anti-affinity groups of those VMs.
    pub groups: Vec<String>,
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// This host.
    Host(String),
    /// None; why, for the error reply.
    None(String),
}

/// The power model a host names, by its SPECpower name or a short alias; unknown names use the
/// ML110 G5 curve (agents refuse unknown names when they register, see [`known_power_model`]).
pub fn power_model(name: &str) -> PowerModel {
    known_power_model(name).unwrap_or(HP_ML110_G5)
}

/// The power model of that name, if Tern knows it.
pub fn known_power_model(name: &str) -> Option<PowerModel> {
    match name {
        "HpProLiantMl110G4Xeon3040" | "hp-ml110-g4" => Some(HP_ML110_G4),
        "HpProLiantMl110G5Xeon3075" | "hp-ml110-g5" => Some(HP_ML110_G5),
        _ => None,
    }
}

/// MIPS of one core of a host with power model `name` (the model's server clock; 2660, the
/// ML110 G5's, for a name Tern does not know).
pub fn core_mips(name: &str) -> f64 {
    let model = power_model(name);
    tern_policy::power::core_mips(model.name).unwrap_or(2660.0)
}

/// A host as `tern-policy` sees it: `cores` cores of its power model's MIPS, empty and idle.
pub fn host_view(cores: u32, power_model_name: &str) -> HostView {
    HostView::live(
        cores.max(1),
        power_model(power_model_name),
        core_mips(power_model_name),
    )
}

/// The CPU the VMs on `c` demand, MIPS: their demand in cores (measured utilisation × vCPUs, or
/// whole vCPUs while unmeasured) × the MIPS of one of its cores.
pub fn host_load_mips(c: &Candidate) -> f64 {
    c.cpu_demand * core_mips(&c.power_model)
}

/// The CPU a VM to place demands, MIPS: measured utilisation × vCPUs × the MIPS of a core of the
/// host it was measured on (`measured`: that host's power model name and the utilisation, 0..1);
/// unmeasured, whole vCPUs at the fastest core among `cands` (in a cluster of one host type: whole
/// cores, wherever it goes).
pub fn vm_demand_mips(cands: &[Candidate], vm: &VmCreate, measured: Option<(&str, f64)>) -> f64 {
    let vcpus = f64::from(vm.vcpus);
    match measured {
        Some((model, u)) => u.clamp(0.0, 1.0) * vcpus * core_mips(model),
        None => {
            let fastest = cands
                .iter()
                .map(|c| core_mips(&c.power_model))
                .fold(0.0, f64::max);
            vcpus * if fastest > 0.0 { fastest } else { 2660.0 }
        }
    }
}

/// Whether `vm` fits on `c` (room and rules), or why not.
pub fn fits(c: &Candidate, vm: &VmCreate, vcpus_per_core: u32) -> Result<(), String> {
    if let Some(pin) = &vm.host
        && pin != &c.name
    {
        return Err(format!("{} is pinned to {pin}", vm.name));
    }
    let slots = u64::from(c.cores) * u64::from(vcpus_per_core);
    if u64::from(c.vcpus_used) + u64::from(vm.vcpus) > slots {
        return Err(format!(
            "{}: {} of {slots} vCPU slots used, {} more needed",
            c.name, c.vcpus_used, vm.vcpus
        ));
    }
    if c.memory_mib_used + vm.memory_mib > c.memory_mib {
        return Err(format!(
            "{}: {} of {} MiB used, {} more needed",
            c.name, c.memory_mib_used, c.memory_mib, vm.memory_mib
        ));
    }
    if let Some(g) = &vm.anti_affinity
        && c.groups.iter().any(|x| x == g)
    {
        return Err(format!(
            "{} already runs a VM of anti-affinity group {g}",
            c.name
        ));
    }
    Ok(())
}

/// Whether the usable hosts could still hold every VM (and `vm`) with the `reserve` largest of them
/// gone: memory and vCPU slots summed over the cluster.
pub fn admits(
    cands: &[Candidate],
    vm: &VmCreate,
    vcpus_per_core: u32,
    reserve: u32,
) -> Result<(), String> {
    if reserve == 0 {
        return Ok(());
    }
    let mut usable: Vec<&Candidate> = cands.iter().filter(|c| c.unusable.is_none()).collect();
    if usable.len() <= reserve as usize {
        return Err(format!(
            "admission control keeps room for {reserve} host failure(s), and only {} host(s) are usable",
            usable.len()
        ));
    }
    usable.sort_by(|a, b| b.memory_mib.cmp(&a.memory_mib).then(a.name.cmp(&b.name)));
    let kept = &usable[reserve as usize..];
    let mem_cap: u64 = kept.iter().map(|c| c.memory_mib).sum();
    let slot_cap: u64 = kept
        .iter()
        .map(|c| u64::from(c.cores) * u64::from(vcpus_per_core))
        .sum();
    let mem_used: u64 = cands.iter().map(|c| c.memory_mib_used).sum::<u64>() + vm.memory_mib;
    let slots_used: u64 =
        cands.iter().map(|c| u64::from(c.vcpus_used)).sum::<u64>() + u64::from(vm.vcpus);
    if mem_used > mem_cap || slots_used > slot_cap {
        return Err(format!(
            "admission control keeps room for {reserve} host failure(s): {mem_used} of {mem_cap} MiB and \
             {slots_used} of {slot_cap} vCPU slots would be used"
        ));
    }
    Ok(())
}

/// Chooses a host for `vm`: the hosts that break no must-rule (see the module doc; `leaving`, the
/// host a VM moves away from, is excluded too), then PABFD ([`find_host`]) among them. `measured`
/// is the VM's measured utilisation and the power model of the host it was measured on, if any.
pub fn choose(
    cands: &[Candidate],
    vm: &VmCreate,
    leaving: Option<&str>,
    measured: Option<(&str, f64)>,
    vcpus_per_core: u32,
    reserve: u32,
) -> Placement {
    if let Err(why) = admits(cands, vm, vcpus_per_core, reserve) {
        return Placement::None(why);
    }
    let mut excluded = Vec::with_capacity(cands.len());
    let mut reasons = Vec::new();
    for c in cands {
        let why = if Some(c.name.as_str()) == leaving {
            Some(None)
        } else if let Some(why) = c.unusable {
            Some(Some(format!("{} is {why}", c.name)))
        } else {
            fits(c, vm, vcpus_per_core).err().map(Some)
        };
        excluded.push(why.is_some());
        if let Some(Some(why)) = why {
            reasons.push(why);
        }
    }
    if excluded.iter().all(|&x| x) {
        return if reasons.is_empty() {
            Placement::None("no host is registered".into())
        } else {
            Placement::None(reasons.join("; "))
        };
    }
    let req = vm_demand_mips(cands, vm, measured);
    match pabfd(cands, &excluded, req) {
        Some(h) => Placement::Host(cands[h].name.clone()),
        None => {
            // over-committed: the permitted host left least loaded (ties: the first)
            let mut best: Option<(f64, usize)> = None;
            for (i, c) in cands.iter().enumerate() {
                if excluded[i] {
                    continue;
                }
                let cap = host_view(c.cores, &c.power_model).total_mips();
                let after = (host_load_mips(c) + req) / cap;
                if best.is_none_or(|(b, _)| after < b) {
                    best = Some((after, i));
                }
            }
            match best {
                Some((_, i)) => Placement::Host(cands[i].name.clone()),
                None => Placement::None(reasons.join("; ")),
            }
        }
    }
}

/// PABFD over the candidates: each host's view from its record with its VMs' demand as one load,
/// the new VM (demanding `req` MIPS) last, and the simulator's [`find_host`].
fn pabfd(cands: &[Candidate], excluded: &[bool], req: f64) -> Option<usize> {
    let mut view = ClusterView {
        hosts: Vec::with_capacity(cands.len()),
        vms: Vec::with_capacity(cands.len() + 1),
    };
    for (i, c) in cands.iter().enumerate() {
        let mut h = host_view(c.cores, &c.power_model);
        if c.vcpus_used > 0 || c.cpu_demand > 0.0 {
            let load = host_load_mips(c);
            h.utilization = load.min(h.total_mips()) / h.total_mips();
            h.vms.push(view.vms.len() as u32);
            view.vms.push(load_vm(i as u32, load));
        }
        view.hosts.push(h);
    }
    let vm = view.vms.len() as u32;
    view.vms.push(load_vm(u32::MAX, req));
    let mut round = Round::new(view.view(), false);
    find_host(
        view.view(),
        vm,
        excluded,
        &mut round,
        &PLACEMENT_POLICY,
        &NoRules,
    )
}

/// A VM of `mips` MIPS, all of them in demand, on `host`.
fn load_vm(host: u32, mips: f64) -> VmView {
    VmView {
        host,
        mips,
        ram_mb: 0,
        requested_mips: mips,
        utilization: if mips > 0.0 { 1.0 } else { 0.0 },
        history: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, cores: u32, mem: u64, demand: f64) -> Candidate {
        Candidate {
            name: name.into(),
            unusable: None,
            cores,
            memory_mib: mem,
            power_model: "hp-ml110-g5".into(),
            vcpus_used: demand as u32,
            memory_mib_used: 0,
            cpu_demand: demand,
            groups: Vec::new(),
        }
    }

    fn vm(name: &str, vcpus: u32, mem: u64) -> VmCreate {
        VmCreate {
            name: name.into(),
            vcpus,
            memory_mib: mem,
            kernel: "builtin:testguest".into(),
            cmdline: String::new(),
            disk: None,
            host: None,
            anti_affinity: None,
            restart_priority: 50,
        }
    }

    #[test]
    fn the_host_whose_power_rises_least_wins() {
        // G5's curve rises 3.3 W from 0 to 10 % but 2 W from 90 to 100 %... at these loads the
        // busier host's rise is smaller: best fit packs.
        let cands = [host("a", 4, 4096, 0.0), host("b", 4, 4096, 3.0)];
        let rise = |d: f64| {
            power_model("hp-ml110-g5").watts_at((d + 1.0) / 4.0)
                - power_model("hp-ml110-g5").watts_at(d / 4.0)
        };
        let expect = if rise(3.0) < rise(0.0) { "b" } else { "a" };
        assert_eq!(
            choose(&cands, &vm("x", 1, 64), None, None, 4, 0),
            Placement::Host(expect.into())
        );
    }

    #[test]
    fn pinning_anti_affinity_and_room_are_never_broken() {
        let mut a = host("a", 1, 128, 0.0);
        let b = host("b", 1, 4096, 0.0);
        a.groups.push("db".into());
        let mut v = vm("x", 1, 256);
        v.anti_affinity = Some("db".into());
        // a lacks memory and holds group db; b fits.
        assert_eq!(
            choose(&[a.clone(), b.clone()], &v, None, None, 4, 0),
            Placement::Host("b".into())
        );
        v.host = Some("a".into());
        let Placement::None(why) = choose(&[a, b], &v, None, None, 4, 0) else {
            panic!("pinned to a host that cannot take it");
        };
        assert!(why.contains("MiB"), "{why}");
    }

    #[test]
    fn admission_keeps_room_for_a_host_failure() {
        let cands = [host("a", 1, 1024, 0.0), host("b", 1, 1024, 0.0)];
        assert_eq!(
            choose(&cands, &vm("x", 1, 1024), None, None, 4, 1),
            Placement::Host("a".into())
        );
        let mut full = cands.clone();
        full[0].memory_mib_used = 512;
        let Placement::None(why) = choose(&full, &vm("x", 1, 1024), None, None, 4, 1) else {
            panic!("admitted past the reserve");
        };
        assert!(why.contains("admission control"), "{why}");
        // Without the reserve it fits on b.
        assert_eq!(
            choose(&full, &vm("x", 1, 1024), None, None, 4, 0),
            Placement::Host("b".into())
        );
    }

    #[test]
    fn the_host_being_left_and_unusable_hosts_are_skipped() {
        let mut a = host("a", 4, 4096, 0.0);
        let b = host("b", 4, 4096, 0.0);
        assert_eq!(
            choose(
                &[a.clone(), b.clone()],
                &vm("x", 1, 64),
                Some("a"),
                None,
                4,
                0
            ),
            Placement::Host("b".into())
        );
        a.unusable = Some("in maintenance");
        assert_eq!(
            choose(&[a, b], &vm("x", 1, 64), None, None, 4, 0),
            Placement::Host("b".into())
        );
    }

    #[test]
    fn an_over_committed_cluster_places_on_the_least_loaded_permitted_host() {
        // every host's CPU is taken by unmeasured VMs (whole vCPUs): PABFD finds no room, the
        // vCPU slots still allow the VM, and the host left least loaded takes it
        let cands = [
            host("a", 2, 4096, 2.0),
            host("b", 4, 4096, 4.0),
            host("c", 2, 4096, 3.0),
        ];
        assert_eq!(
            choose(&cands, &vm("x", 1, 64), None, None, 4, 0),
            Placement::Host("b".into())
        );
        // a VM measured nearly idle (1 %) finds no free MIPS on full hosts either
        assert_eq!(
            choose(
                &cands,
                &vm("x", 1, 64),
                None,
                Some(("hp-ml110-g5", 0.01)),
                4,
                0
            ),
            Placement::Host("b".into())
        );
    }

    #[test]
    fn host_views_map_cores_and_power_model_names_alike() {
        let g4 = host_view(2, "hp-ml110-g4");
        assert_eq!(
            (g4.pes, g4.pe_mips, g4.power.name),
            (1, 3720.0, HP_ML110_G4.name)
        );
        let g5 = host_view(4, "HpProLiantMl110G5Xeon3075");
        assert_eq!((g5.pes, g5.pe_mips), (1, 4.0 * 2660.0));
        assert_eq!(g5.power, HP_ML110_G5);
        // a measured VM's demand is in MIPS of the host it was measured on
        let v = vm("x", 2, 64);
        assert_eq!(vm_demand_mips(&[], &v, Some(("hp-ml110-g4", 0.5))), 1860.0);
        let cands = [host("a", 2, 4096, 0.0)];
        assert_eq!(vm_demand_mips(&cands, &v, None), 2.0 * 2660.0);
    }
}
