//! Where a VM goes: power-aware best-fit decreasing (PABFD) over the hosts that fit it, with the
//! rules that must never break (pinning, anti-affinity) and admission control for host failures.
//!
//! The power figures come from `tern-policy`'s SPECpower models, the ones the simulator uses: among
//! the hosts with room, the one whose power rises least takes the VM (ties: the first by name), as
//! in the simulator's placement. Pure: the same candidates always give the same answer.

#![deny(clippy::disallowed_methods)]
use tern_api::cluster::VmCreate;
use tern_policy::{HP_ML110_G4, HP_ML110_G5, PowerModel};

/// One host as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The host's name.
    pub name: String,
    /// Up and not in maintenance.
    pub usable: bool,
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
    let mut usable: Vec<&Candidate> = cands.iter().filter(|c| c.usable).collect();
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

/// Chooses a host for `vm` by PABFD; `leaving` (the host a VM moves away from) is excluded.
pub fn choose(
    cands: &[Candidate],
    vm: &VmCreate,
    leaving: Option<&str>,
    vcpus_per_core: u32,
    reserve: u32,
) -> Placement {
    if let Err(why) = admits(cands, vm, vcpus_per_core, reserve) {
        return Placement::None(why);
    }
    let mut best: Option<(f64, &Candidate)> = None;
    let mut reasons = Vec::new();
    for c in cands {
        if Some(c.name.as_str()) == leaving {
            continue;
        }
        if !c.usable {
            reasons.push(format!("{} is down or in maintenance", c.name));
            continue;
        }
        if let Err(why) = fits(c, vm, vcpus_per_core) {
            reasons.push(why);
            continue;
        }
        let model = power_model(&c.power_model);
        let cores = f64::from(c.cores.max(1));
        let before = model.watts_at(c.cpu_demand / cores);
        let after = model.watts_at((c.cpu_demand + f64::from(vm.vcpus)) / cores);
        let rise = after - before;
        if best.is_none_or(|(b, _)| rise < b) {
            best = Some((rise, c));
        }
    }
    match best {
        Some((_, c)) => Placement::Host(c.name.clone()),
        None if reasons.is_empty() => Placement::None("no host is registered".into()),
        None => Placement::None(reasons.join("; ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, cores: u32, mem: u64, demand: f64) -> Candidate {
        Candidate {
            name: name.into(),
            usable: true,
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
            choose(&cands, &vm("x", 1, 64), None, 4, 0),
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
            choose(&[a.clone(), b.clone()], &v, None, 4, 0),
            Placement::Host("b".into())
        );
        v.host = Some("a".into());
        let Placement::None(why) = choose(&[a, b], &v, None, 4, 0) else {
            panic!("pinned to a host that cannot take it");
        };
        assert!(why.contains("MiB"), "{why}");
    }

    #[test]
    fn admission_keeps_room_for_a_host_failure() {
        let cands = [host("a", 1, 1024, 0.0), host("b", 1, 1024, 0.0)];
        assert_eq!(
            choose(&cands, &vm("x", 1, 1024), None, 4, 1),
            Placement::Host("a".into())
        );
        let mut full = cands.clone();
        full[0].memory_mib_used = 512;
        let Placement::None(why) = choose(&full, &vm("x", 1, 1024), None, 4, 1) else {
            panic!("admitted past the reserve");
        };
        assert!(why.contains("admission control"), "{why}");
        // Without the reserve it fits on b.
        assert_eq!(
            choose(&full, &vm("x", 1, 1024), None, 4, 0),
            Placement::Host("b".into())
        );
    }

    #[test]
    fn the_host_being_left_and_unusable_hosts_are_skipped() {
        let mut a = host("a", 4, 4096, 0.0);
        let b = host("b", 4, 4096, 0.0);
        assert_eq!(
            choose(&[a.clone(), b.clone()], &vm("x", 1, 64), Some("a"), 4, 0),
            Placement::Host("b".into())
        );
        a.usable = false;
        assert_eq!(
            choose(&[a, b], &vm("x", 1, 64), None, 4, 0),
            Placement::Host("b".into())
        );
    }
}
