//! The consolidation round: overloaded hosts shed VMs (detector + selection), the VMs are placed by
//! power-aware best-fit decreasing (PABFD), then underloaded hosts are drained and left to sleep.

use crate::detect::{Detector, HostSample};
use crate::hash_order::Emulation;
pub use crate::hash_order::SchedOrder;
use crate::place_index::{PlaceIndex, order_key};
use crate::power::PowerModel;
use crate::select::{self, Candidate, Selection};
use crate::{Model, SplitMix64};

/// Longest VM utilisation history kept (in control periods).
pub const HISTORY_LEN: usize = 30;

/// One VM as the policy sees it.
#[derive(Debug, Clone)]
pub struct VmView {
    /// Host the VM runs on now.
    pub host: u32,
    /// Capacity of the VM's single virtual CPU (MIPS).
    pub mips: f64,
    /// RAM (MB): sets the migration time.
    pub ram_mb: u32,
    /// CPU demand now (MIPS) = utilisation × mips.
    pub requested_mips: f64,
    /// CPU utilisation now (0..1 of the VM's capacity).
    pub utilization: f64,
    /// Past utilisation samples (0..1), most recent first, at most [`HISTORY_LEN`].
    pub history: Vec<f64>,
}

/// One host as the policy sees it.
#[derive(Debug, Clone)]
pub struct HostView {
    /// Number of physical cores.
    pub pes: u32,
    /// Capacity of one core (MIPS).
    pub pe_mips: f64,
    /// Power model.
    pub power: PowerModel,
    /// Measured CPU utilisation at the last sample (0..1).
    pub utilization: f64,
    /// VMs on the host, in placement order.
    pub vms: Vec<u32>,
    /// Reference-code emulation (used by `Model::CloudSim` only; leave the default otherwise).
    pub sched: SchedOrder,
}

impl HostView {
    /// Total capacity (MIPS).
    pub fn total_mips(&self) -> f64 {
        self.pe_mips * self.pes as f64
    }

    /// A live host with `cores` cores of `core_mips` MIPS each (see [`crate::power::core_mips`])
    /// and power model `power`, idle and empty (the caller adds its VMs and utilisation).
    ///
    /// It is one processing element of all its cores: a live VM's vCPUs may keep several cores
    /// busy, and the per-core cap that fits CloudSim's one-core VMs would cut such a VM's demand.
    /// Capacity and power curve are the same either way.
    pub fn live(cores: u32, power: PowerModel, core_mips: f64) -> HostView {
        HostView {
            pes: 1,
            pe_mips: f64::from(cores) * core_mips,
            power,
            utilization: 0.0,
            vms: Vec::new(),
            sched: SchedOrder::default(),
        }
    }
}

/// A snapshot of the cluster, as the caller hands it to [`optimize`] (which only reads it).
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// Hosts, indexed by host id.
    pub hosts: Vec<HostView>,
    /// VMs, indexed by VM id (VMs not on any host are simply not listed in a host's `vms`).
    pub vms: Vec<VmView>,
}

impl ClusterView {
    /// The whole snapshot, borrowed.
    pub fn view(&self) -> View<'_> {
        View {
            hosts: &self.hosts,
            vms: &self.vms,
        }
    }
}

/// A borrowed cluster: hosts and VMs may have different owners ([`optimize`] reads the caller's VMs
/// and its own copy of the hosts, which holds the round's tentative placements).
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    /// Hosts, indexed by host id.
    pub hosts: &'a [HostView],
    /// VMs, indexed by VM id.
    pub vms: &'a [VmView],
}

impl<'a> View<'a> {
    /// These hosts with these VMs.
    pub fn of(hosts: &'a [HostView], vms: &'a [VmView]) -> Self {
        View { hosts, vms }
    }
}

/// Where a VM may go beyond room and load: the caller's must-rules, which [`find_host`] and every
/// placement [`optimize_with`] makes honour.
///
/// Both questions are asked of the round's tentative cluster: `view` lists, on each host, the VMs
/// placed there so far in the round (and no longer those that left), so a rule such as
/// anti-affinity sees the VMs the round itself has just moved. Implementations must be pure and
/// deterministic, like the rest of the round.
pub trait Rules {
    /// Whether VM `vm` may leave the host it runs on (`false`: pinned there). A VM that may not
    /// move is never selected off an overloaded host, and a host holding one is never drained.
    fn may_move(&self, view: View<'_>, vm: u32) -> bool;
    /// Whether VM `vm` may go to host `host` now: the host takes VMs (not in maintenance,
    /// powered off or being emptied), the VM is not pinned elsewhere, no VM it must not share a
    /// host with is there.
    fn allows(&self, view: View<'_>, vm: u32, host: usize) -> bool;
}

/// No rules: every VM may go anywhere there is room. What the simulator runs; the checks compile
/// away, so [`optimize`] costs what it did before rules existed.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRules;

impl Rules for NoRules {
    #[inline(always)]
    fn may_move(&self, _: View<'_>, _: u32) -> bool {
        true
    }
    #[inline(always)]
    fn allows(&self, _: View<'_>, _: u32, _: usize) -> bool {
        true
    }
}

/// The usual must-rules as tables indexed like the [`ClusterView`]: hosts that take no VMs,
/// VM–host pins and VM–VM anti-affinity groups. A host or VM beyond a table's end has no rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleSet {
    /// Per host id: `true` if it takes no VMs (maintenance, powered off or powering off, being
    /// emptied). VMs may still leave it.
    pub closed: Vec<bool>,
    /// Per VM id: the host it must run on. A pinned VM never moves off that host, and goes
    /// nowhere else.
    pub pins: Vec<Option<u32>>,
    /// Per VM id: its anti-affinity group; no two VMs of one group share a host.
    pub groups: Vec<Option<u32>>,
}

impl RuleSet {
    fn pin(&self, vm: u32) -> Option<u32> {
        self.pins.get(vm as usize).copied().flatten()
    }
    fn group(&self, vm: u32) -> Option<u32> {
        self.groups.get(vm as usize).copied().flatten()
    }
}

impl Rules for RuleSet {
    fn may_move(&self, view: View<'_>, vm: u32) -> bool {
        let here = view.vms.get(vm as usize).map(|v| v.host);
        self.pin(vm).is_none_or(|p| Some(p) != here)
    }

    fn allows(&self, view: View<'_>, vm: u32, host: usize) -> bool {
        if self.closed.get(host).copied().unwrap_or(false) {
            return false;
        }
        if self.pin(vm).is_some_and(|p| p as usize != host) {
            return false;
        }
        let Some(g) = self.group(vm) else {
            return true;
        };
        !view.hosts[host]
            .vms
            .iter()
            .any(|&u| u != vm && self.group(u) == Some(g))
    }
}

/// Policy configuration for a round.
#[derive(Debug, Clone, Copy)]
pub struct PolicyConfig {
    /// Overload detector.
    pub detector: Detector,
    /// VM selection for overloaded hosts.
    pub selection: Selection,
    /// Reference-code or paper semantics.
    pub model: Model,
    /// Bandwidth available to one migration (MB/s); migration time = RAM / this.
    pub migration_mb_per_s: f64,
    /// Control period (s).
    pub interval_s: f64,
}

/// A VM move decided by the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    /// The VM.
    pub vm: u32,
    /// Where it runs now.
    pub from: u32,
    /// Where it goes.
    pub to: u32,
}

/// The outcome of one round.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decisions {
    /// Migrations, in the order they should start.
    pub migrations: Vec<Migration>,
    /// Overloaded hosts found this round.
    pub overloaded: Vec<u32>,
    /// Underloaded hosts drained this round (they can sleep once their VMs have left).
    pub sleeps: Vec<u32>,
    /// Per host, the most VMs its reference scheduler's table has held by the end of the round
    /// (the caller keeps it in [`SchedOrder::peak_entries`] for the next round; see
    /// [`crate::hash_order`]).
    pub table_peaks: Vec<u32>,
}

/// CPU the host's scheduler grants now: (sum of allocations, MIPS still free). Demands above a core's
/// capacity are capped; when the sum exceeds the host every VM is scaled down by the same factor
/// (rounded down to whole MIPS), and nothing is free.
pub fn host_allocation(view: View<'_>, h: usize) -> (f64, f64) {
    let host = &view.hosts[h];
    let cap = host.total_mips();
    let mut avail = cap;
    let mut over = false;
    let mut total = 0.0;
    let mut sum = 0.0;
    for &v in &host.vms {
        let c = view.vms[v as usize].requested_mips.min(host.pe_mips);
        total += c;
        sum += c;
        if !over {
            if avail >= c {
                avail -= c;
            } else {
                over = true;
            }
        }
    }
    if !over {
        return (sum, avail);
    }
    let scale = cap / total;
    let mut sum = 0.0;
    for &v in &host.vms {
        let c = view.vms[v as usize].requested_mips.min(host.pe_mips);
        sum += (c * scale).floor();
    }
    (sum, 0.0)
}

/// Host utilisation history (most recent first, zero tail trimmed), optionally with one more VM.
fn host_history(
    view: View<'_>,
    h: usize,
    extra: Option<u32>,
    buf: &mut [f64; HISTORY_LEN],
) -> usize {
    let host = &view.hosts[h];
    let total = host.total_mips();
    buf.fill(0.0);
    for &v in host.vms.iter().chain(extra.iter()) {
        let vm = &view.vms[v as usize];
        for (i, x) in vm.history.iter().take(HISTORY_LEN).enumerate() {
            buf[i] += x * vm.mips / total;
        }
    }
    match buf.iter().rposition(|&x| x != 0.0) {
        Some(i) => i + 1,
        None => 1,
    }
}

/// As [`host_history`] for the regression detectors, which read only the 10 newest points: those are
/// summed exactly as there, and the rest only checked for being non-zero (the trimmed length decides
/// whether the history is long enough).
fn lr_history(view: View<'_>, h: usize, extra: Option<u32>, buf: &mut [f64; HISTORY_LEN]) -> usize {
    const W: usize = crate::detect::LR_WINDOW;
    let host = &view.hosts[h];
    let total = host.total_mips();
    buf.fill(0.0);
    for &v in host.vms.iter().chain(extra.iter()) {
        let vm = &view.vms[v as usize];
        for (i, x) in vm.history.iter().take(W).enumerate() {
            buf[i] += x * vm.mips / total;
        }
    }
    if buf[W - 1] != 0.0 {
        return W;
    }
    let tail = host.vms.iter().chain(extra.iter()).any(|&v| {
        view.vms[v as usize]
            .history
            .iter()
            .take(HISTORY_LEN)
            .skip(W)
            .any(|&x| x * view.vms[v as usize].mips / total != 0.0)
    });
    if tail {
        return W;
    }
    match buf[..W].iter().rposition(|&x| x != 0.0) {
        Some(i) => i + 1,
        None => 1,
    }
}

/// Is host `h` overloaded (optionally as if VM `extra` were added)?
pub fn is_overloaded(view: View<'_>, h: usize, extra: Option<u32>, cfg: &PolicyConfig) -> bool {
    let host = &view.hosts[h];
    let total = host.total_mips();
    let mut req = 0.0;
    let mut max_ram = i32::MIN as f64;
    for &v in host.vms.iter().chain(extra.iter()) {
        let vm = &view.vms[v as usize];
        req += vm.requested_mips;
        max_ram = max_ram.max(vm.ram_mb as f64);
    }
    let requested_utilization = req / total;
    if let Detector::Thr(t) = cfg.detector {
        return requested_utilization > t;
    }
    let mut buf = [0.0; HISTORY_LEN];
    let n = if matches!(cfg.detector, Detector::Lr(_) | Detector::Lrr(_)) {
        lr_history(view, h, extra, &mut buf)
    } else {
        host_history(view, h, extra, &mut buf)
    };
    let sample = HostSample {
        history: &buf[..n],
        requested_utilization,
        max_migration_time_s: max_ram / cfg.migration_mb_per_s,
    };
    cfg.detector
        .is_overloaded(&sample, cfg.model, cfg.interval_s)
}

/// Per-round cache of each host's summed history (untrimmed, in VM-list order).
pub type HistoryCache = Vec<Option<[f64; HISTORY_LEN]>>;

/// [`is_overloaded`] with the host's own history sum cached for the round. Adding the extra VM's
/// history to the cached sum performs the same floating-point additions, in the same order, as summing
/// the list with the VM appended.
fn is_overloaded_cached(
    view: View<'_>,
    h: usize,
    extra: Option<u32>,
    cfg: &PolicyConfig,
    cache: &mut [Option<[f64; HISTORY_LEN]>],
) -> bool {
    if let Detector::Thr(_) = cfg.detector {
        return is_overloaded(view, h, extra, cfg);
    }
    let host = &view.hosts[h];
    let total = host.total_mips();
    let mut req = 0.0;
    let mut max_ram = i32::MIN as f64;
    for &v in host.vms.iter().chain(extra.iter()) {
        let vm = &view.vms[v as usize];
        req += vm.requested_mips;
        max_ram = max_ram.max(vm.ram_mb as f64);
    }
    let mut buf = *cache[h].get_or_insert_with(|| {
        let mut b = [0.0; HISTORY_LEN];
        for &v in &host.vms {
            let vm = &view.vms[v as usize];
            for (i, x) in vm.history.iter().take(HISTORY_LEN).enumerate() {
                b[i] += x * vm.mips / total;
            }
        }
        b
    });
    if let Some(v) = extra {
        let vm = &view.vms[v as usize];
        for (i, x) in vm.history.iter().take(HISTORY_LEN).enumerate() {
            buf[i] += x * vm.mips / total;
        }
    }
    let n = match buf.iter().rposition(|&x| x != 0.0) {
        Some(i) => i + 1,
        None => 1,
    };
    let sample = HostSample {
        history: &buf[..n],
        requested_utilization: req / total,
        max_migration_time_s: max_ram / cfg.migration_mb_per_s,
    };
    cfg.detector
        .is_overloaded(&sample, cfg.model, cfg.interval_s)
}

/// The hosts [`find_host`] has to look at. Idle empty hosts of one type all score the same, so only
/// the lowest-numbered of each type can win; keeping them apart makes a placement cost O(busy hosts)
/// instead of O(all hosts) without changing any choice.
#[derive(Debug, Clone, Default)]
pub struct Candidates {
    busy: Vec<usize>,
    idle: Vec<(TypeKey, Vec<usize>)>,
    /// Whether idle hosts may be chosen in this phase.
    pub idle_allowed: bool,
}

/// Identifies a host type (core MIPS, cores, idle and peak watts).
type TypeKey = (u64, u32, u64, u64);

fn type_key(h: &HostView) -> TypeKey {
    let w = &h.power.watts;
    (h.pe_mips.to_bits(), h.pes, w[0].to_bits(), w[10].to_bits())
}

impl Candidates {
    /// Split the hosts of `view` into busy ones and idle empty ones (grouped by type).
    pub fn new(view: View<'_>) -> Self {
        let mut c = Candidates {
            idle_allowed: true,
            ..Default::default()
        };
        for (i, h) in view.hosts.iter().enumerate() {
            if h.vms.is_empty() && h.utilization == 0.0 {
                let k = type_key(h);
                match c.idle.iter_mut().find(|e| e.0 == k) {
                    Some(e) => e.1.push(i),
                    None => c.idle.push((k, vec![i])),
                }
            } else {
                c.busy.push(i);
            }
        }
        c
    }

    fn is_busy(&self, h: usize) -> bool {
        self.busy.binary_search(&h).is_ok()
    }

    /// Host `h` just received a VM: it is no longer idle.
    pub fn mark_busy(&mut self, view: View<'_>, h: usize) {
        let k = type_key(&view.hosts[h]);
        if let Some(e) = self.idle.iter_mut().find(|e| e.0 == k)
            && let Ok(i) = e.1.binary_search(&h)
        {
            e.1.remove(i);
            if let Err(p) = self.busy.binary_search(&h) {
                self.busy.insert(p, h);
            }
        }
    }

    /// Calls `f` on every busy host and, per idle type, on the first idle host that is neither
    /// excluded nor refused by `allowed`, in host order.
    fn each(&self, excluded: &[bool], allowed: impl Fn(usize) -> bool, mut f: impl FnMut(usize)) {
        let mut firsts: Vec<usize> = Vec::new();
        if self.idle_allowed {
            for (_, set) in &self.idle {
                if let Some(&h) = set.iter().find(|&&h| !excluded[h] && allowed(h)) {
                    firsts.push(h);
                }
            }
            firsts.sort_unstable();
        }
        let mut j = 0;
        for &h in &self.busy {
            while j < firsts.len() && firsts[j] < h {
                f(firsts[j]);
                j += 1;
            }
            f(h);
        }
        for &h in &firsts[j..] {
            f(h);
        }
    }
}

/// Per-round caches shared by the placements of one [`optimize`] call.
#[derive(Debug, Clone)]
pub struct Round {
    /// Per host: (allocated MIPS, free MIPS, power at the allocated load − power now).
    alloc: Vec<Option<(f64, f64, f64)>>,
    /// Per host: the least rise in watts per MIPS anywhere on its power curve (a lower bound for
    /// pruning the PABFD scan).
    min_slope: Vec<f64>,
    /// Per host: capacity of one core and of the host (MIPS), kept apart from the host views so
    /// the PABFD scan reads one small array.
    pe_mips: Vec<f64>,
    total_mips: Vec<f64>,
    hist: HistoryCache,
    power_now: Vec<f64>,
    cands: Candidates,
    /// The reference scheduler's summing order (inert under `Model::Paper`).
    sched: Emulation,
    /// The busy hosts indexed for a best-first PABFD search (`None`: scan them all).
    index: Option<PlaceIndex>,
}

/// Host `h`'s (allocated MIPS, free MIPS, power at the allocated load − power now), cached.
fn alloc_entry(
    alloc: &mut [Option<(f64, f64, f64)>],
    sched: &Emulation,
    power_now: &[f64],
    view: View<'_>,
    h: usize,
) -> (f64, f64, f64) {
    *alloc[h].get_or_insert_with(|| {
        let host = &view.hosts[h];
        let (sum, avail) = sched.allocation(view, h);
        let base = host.power.watts_at(sum / host.total_mips()) - power_now[h];
        (sum, avail, base)
    })
}

impl Round {
    /// Fresh caches for `view`; `emulate` switches on the reference scheduler's summing order.
    pub fn new(view: View<'_>, emulate: bool) -> Self {
        Self::build(view, emulate, true)
    }

    /// As [`Round::new`]; `indexed: false` keeps [`find_host`] on the list-order scan (the tests'
    /// reference for the index).
    fn build(view: View<'_>, emulate: bool, indexed: bool) -> Self {
        let n = view.hosts.len();
        let mut round = Round {
            alloc: vec![None; n],
            min_slope: view
                .hosts
                .iter()
                .map(|h| {
                    let w = &h.power.watts;
                    let rise = (0..10).map(|i| w[i + 1] - w[i]).fold(f64::MAX, f64::min);
                    // (a falling stretch makes this negative, which keeps the bound valid)
                    rise * 10.0 / h.total_mips()
                })
                .collect(),
            pe_mips: view.hosts.iter().map(|h| h.pe_mips).collect(),
            total_mips: view.hosts.iter().map(|h| h.total_mips()).collect(),
            hist: vec![None; n],
            power_now: view
                .hosts
                .iter()
                .map(|h| h.power.watts_at(h.utilization))
                .collect(),
            cands: Candidates::new(view),
            sched: Emulation::new(view.hosts, emulate),
            index: None,
        };
        if indexed {
            let mut index = PlaceIndex::new(view.hosts);
            for h in round.cands.busy.clone() {
                index.touch(h);
            }
            round.index = Some(index);
            round.refresh(view);
        }
        round
    }

    /// Files the hosts whose VM list changed in the index again; `false` (and no index from then
    /// on) if one cannot be filed.
    fn refresh(&mut self, view: View<'_>) -> bool {
        let Some(index) = &mut self.index else {
            return false;
        };
        for h in index.take_dirty() {
            let h = h as usize;
            if !self.cands.is_busy(h) {
                continue;
            }
            let (sum, avail, base) =
                alloc_entry(&mut self.alloc, &self.sched, &self.power_now, view, h);
            if !index.file(h, sum, avail, base, self.sched.untried(h, sum)) {
                self.index = None;
                return false;
            }
        }
        true
    }

    /// Host `h` takes no VM for the rest of the round (every later [`find_host`] excludes it).
    fn exclude(&mut self, h: usize) {
        if let Some(index) = &mut self.index {
            index.remove_for_good(h);
        }
    }

    /// A VM left host `h` (the scheduler rebuilds its free MIPS in hash order).
    fn removed(&mut self, h: usize) {
        self.invalidate(h);
        self.sched.removed(h);
    }

    /// VM `v` was added to host `h` (now holding `len` VMs).
    fn added(&mut self, h: usize, v: u32, len: usize) {
        self.invalidate(h);
        self.sched.added(h, v, len);
    }

    /// Host `h`'s VM list changed.
    pub fn invalidate(&mut self, h: usize) {
        self.alloc[h] = None;
        self.hist[h] = None;
        if let Some(index) = &mut self.index {
            index.touch(h);
        }
    }
}

/// PABFD host choice for VM `vm`: among the hosts not `excluded` that `rules` allow, the one whose
/// power rises least and that stays not overloaded. Ties go to the lower host id. With [`NoRules`]
/// this is exactly the simulator's placement.
///
/// The busy hosts are searched best-first through the round's index (`place_index`), which chooses
/// exactly as the list-order scan below does, trial placements of the emulated scheduler included.
pub fn find_host<R: Rules + ?Sized>(
    view: View<'_>,
    vm: u32,
    excluded: &[bool],
    round: &mut Round,
    cfg: &PolicyConfig,
    rules: &R,
) -> Option<usize> {
    let req = view.vms[vm as usize].requested_mips;
    if round.index.is_some() && req.is_finite() && req >= 0.0 && round.refresh(view) {
        return find_host_indexed(view, vm, excluded, round, cfg, rules);
    }
    find_host_scan(view, vm, excluded, round, cfg, rules)
}

/// [`find_host`] by the index: the groups of hosts in increasing order of a lower bound on their
/// power rise, each group's hosts in increasing bound order, until the bounds pass the best rise
/// found. The best is kept as the scan keeps it (a host replaces it with a smaller rise, or an equal
/// one and a lower id, and only if the detector finds it not overloaded), so the choice is the
/// scan's.
fn find_host_indexed<R: Rules + ?Sized>(
    view: View<'_>,
    vm: u32,
    excluded: &[bool],
    round: &mut Round,
    cfg: &PolicyConfig,
    rules: &R,
) -> Option<usize> {
    let Round {
        alloc,
        pe_mips,
        total_mips,
        hist,
        power_now,
        cands,
        sched,
        index,
        ..
    } = round;
    let index = index.as_mut()?;
    let req = view.vms[vm as usize].requested_mips;
    // The reference code tries the VM on every host that fits (create, check, destroy), which can
    // change how a host sums its free MIPS (`Model::CloudSim`). Only a host not tried since its VM
    // list changed can change; this placement still sees its old figures, the next one the new.
    let mut changed: Vec<usize> = Vec::new();
    let mut tried: Vec<usize> = Vec::new();
    for h in index.untried_fitting(req) {
        if excluded[h] || pe_mips[h] < req || !rules.allows(view, vm, h) {
            continue;
        }
        let (sum, _, _) = alloc_entry(alloc, sched, power_now, view, h);
        if sched.trial(h, sum, view.hosts[h].vms.len() as u32) {
            changed.push(h);
        }
        tried.push(h);
    }
    for &h in &tried {
        index.tried(h);
    }
    // (rise, host) of the best host so far
    let mut best: Option<(f64, usize)> = None;
    // the scan's checks, in its order, up to the rise (the trials are done above)
    let mut consider = |h: usize, best: &mut Option<(f64, usize)>| {
        if excluded[h] || pe_mips[h] < req || !rules.allows(view, vm, h) {
            return;
        }
        let (sum, avail, _) = alloc_entry(alloc, sched, power_now, view, h);
        if avail < req {
            return;
        }
        let after = (sum + req) / total_mips[h];
        if after > 1.0 {
            return;
        }
        let diff = view.hosts[h].power.watts_at(after) - power_now[h];
        if best.is_some_and(|(min, b)| diff > min || (diff == min && h > b)) {
            return;
        }
        if sum != 0.0 && is_overloaded_cached(view, h, Some(vm), cfg, hist) {
            return;
        }
        *best = Some((diff, h));
    };
    if cands.idle_allowed {
        // idle empty hosts of one type all rise alike: the first allowed one of each type
        for (_, set) in &cands.idle {
            if let Some(&h) = set
                .iter()
                .find(|&&h| !excluded[h] && rules.allows(view, vm, h))
            {
                consider(h, &mut best);
            }
        }
    }
    let search = &*index;
    for (first, g, add) in search.plan(req) {
        if best.is_some_and(|(min, _)| first > order_key(min)) {
            break;
        }
        for (base, h) in search.hosts(g) {
            if best.is_some_and(|(min, _)| base + add > min) {
                break;
            }
            consider(h, &mut best);
        }
    }
    for h in changed {
        alloc[h] = None;
        index.touch(h);
    }
    best.map(|(_, h)| h)
}

/// [`find_host`] by scanning the candidates in host order (the reference code's loop).
fn find_host_scan<R: Rules + ?Sized>(
    view: View<'_>,
    vm: u32,
    excluded: &[bool],
    round: &mut Round,
    cfg: &PolicyConfig,
    rules: &R,
) -> Option<usize> {
    let Round {
        alloc,
        min_slope,
        pe_mips,
        total_mips,
        hist,
        power_now,
        cands,
        sched,
        index: _,
    } = round;
    let req = view.vms[vm as usize].requested_mips;
    let mut min = f64::MAX;
    let mut best = None;
    cands.each(
        excluded,
        |h| rules.allows(view, vm, h),
        |h| {
            if excluded[h] || pe_mips[h] < req || !rules.allows(view, vm, h) {
                return;
            }
            let (sum, avail, base) = *alloc[h].get_or_insert_with(|| {
                let host = &view.hosts[h];
                let (sum, avail) = sched.allocation(view, h);
                let base = host.power.watts_at(sum / host.total_mips()) - power_now[h];
                (sum, avail, base)
            });
            if avail < req {
                return;
            }
            // the reference code tries the VM on every such host (create, check, destroy), which can
            // change how the host sums its free MIPS
            if sched.trial(h, sum, view.hosts[h].vms.len() as u32) {
                alloc[h] = None;
            }
            let after = (sum + req) / total_mips[h];
            if after > 1.0 {
                return;
            }
            // the power curves rise at least `min_slope` W per MIPS, so the rise here is at least this
            // (less a margin far above the rounding error): a host that cannot beat `min` is skipped
            // without evaluating the curve, exactly as the test below would skip it
            if base + min_slope[h] * req - 1e-9 >= min {
                return;
            }
            let diff = view.hosts[h].power.watts_at(after) - power_now[h];
            // checking the power first and the detector only for a would-be winner gives the same
            // choice as the reverse order, at a fraction of the cost
            if diff >= min {
                return;
            }
            if sum != 0.0 && is_overloaded_cached(view, h, Some(vm), cfg, hist) {
                return;
            }
            min = diff;
            best = Some(h);
        },
    );
    best
}

fn sort_by_demand(view: View<'_>, vms: &mut [u32]) {
    vms.sort_by(|a, b| {
        let (a, b) = (
            view.vms[*a as usize].requested_mips,
            view.vms[*b as usize].requested_mips,
        );
        b.total_cmp(&a)
    });
}

/// One consolidation round over `snapshot`, which is only read: the round's tentative placements go
/// to a copy of the hosts. The returned decisions say what to do. No rules: [`optimize_with`] with
/// [`NoRules`], the simulator's round.
pub fn optimize(snapshot: &ClusterView, cfg: &PolicyConfig, rng: &mut SplitMix64) -> Decisions {
    optimize_with(snapshot, cfg, rng, &NoRules)
}

/// [`optimize`] under the caller's must-rules: a VM that may not move is never selected off an
/// overloaded host, every placement (VMs shed by overloaded hosts, VMs of drained hosts) goes only
/// where `rules` allow given the round's tentative placements, and an under-loaded host is drained
/// only if every one of its VMs can be placed so (else it keeps them all).
pub fn optimize_with<R: Rules + ?Sized>(
    snapshot: &ClusterView,
    cfg: &PolicyConfig,
    rng: &mut SplitMix64,
    rules: &R,
) -> Decisions {
    round_with(snapshot, cfg, rng, rules, true)
}

/// [`optimize_with`]; `indexed: false` places by the list-order scan only.
fn round_with<R: Rules + ?Sized>(
    snapshot: &ClusterView,
    cfg: &PolicyConfig,
    rng: &mut SplitMix64,
    rules: &R,
    indexed: bool,
) -> Decisions {
    let n = snapshot.hosts.len();
    let mut hosts = snapshot.hosts.clone();
    let vms = &snapshot.vms[..];
    let emulate = cfg.model == Model::CloudSim;
    let mut round = Round::build(snapshot.view(), emulate, indexed);
    let mut out = Decisions::default();

    // 1. overloaded hosts and the VMs they shed
    let over: Vec<bool> = (0..n)
        .map(|h| is_overloaded_cached(View::of(&hosts, vms), h, None, cfg, &mut round.hist))
        .collect();
    let mut shed: Vec<u32> = Vec::new();
    for h in (0..n).filter(|&h| over[h]) {
        // never a target this round (excluded from both placements below)
        round.exclude(h);
        out.overloaded.push(h as u32);
        loop {
            let idx = {
                // VMs that may not move are no candidates (with no rules, every VM is one)
                let movable: Vec<usize> = (0..hosts[h].vms.len())
                    .filter(|&i| rules.may_move(View::of(&hosts, vms), hosts[h].vms[i]))
                    .collect();
                let cands: Vec<Candidate<'_>> = movable
                    .iter()
                    .map(|&i| {
                        let vm = &vms[hosts[h].vms[i] as usize];
                        Candidate {
                            ram_mb: vm.ram_mb,
                            utilization: vm.utilization,
                            history: &vm.history,
                        }
                    })
                    .collect();
                select::select(cfg.selection, &cands, rng).map(|c| movable[c])
            };
            let Some(idx) = idx else { break };
            let v = hosts[h].vms.remove(idx);
            round.removed(h);
            shed.push(v);
            if !is_overloaded_cached(View::of(&hosts, vms), h, None, cfg, &mut round.hist) {
                break;
            }
        }
    }

    // 2. place them (PABFD), never back on an overloaded host
    sort_by_demand(View::of(&hosts, vms), &mut shed);
    let mut received = vec![false; n];
    for v in shed {
        if let Some(t) = find_host(View::of(&hosts, vms), v, &over, &mut round, cfg, rules) {
            round.cands.mark_busy(View::of(&hosts, vms), t);
            hosts[t].vms.push(v);
            round.added(t, v, hosts[t].vms.len());
            received[t] = true;
            out.migrations.push(Migration {
                vm: v,
                from: vms[v as usize].host,
                to: t as u32,
            });
        }
    }

    // 3. drain underloaded hosts, least utilised first
    let off: Vec<bool> = (0..n)
        .map(|h| match cfg.model {
            Model::CloudSim => hosts[h].utilization == 0.0,
            Model::Paper => hosts[h].vms.is_empty(),
        })
        .collect();
    let mut excl_under: Vec<bool> = (0..n)
        .map(|h| over[h] || off[h] || (cfg.model == Model::Paper && received[h]))
        .collect();
    let mut excl_place: Vec<bool> = (0..n).map(|h| over[h] || off[h]).collect();
    for h in (0..n).filter(|&h| excl_place[h]) {
        round.exclude(h);
    }
    // idle empty hosts count as switched off in both models, so the underload phase never uses them
    round.cands.idle_allowed = false;
    let mut n_excl_under = excl_under.iter().filter(|&&x| x).count();
    // Measured utilisations do not change during the round and exclusions only grow, so walking the
    // hosts once in (utilisation, id) order finds the same least-utilised host each time as a full
    // scan would (a host that is empty when passed can only gain VMs by becoming a placement target,
    // which excludes it).
    let limit = match cfg.model {
        Model::CloudSim => 1.0,
        Model::Paper => f64::INFINITY,
    };
    let mut walk: Vec<usize> = (0..n)
        .filter(|&h| {
            let u = hosts[h].utilization;
            !excl_under[h] && u < limit && (cfg.model == Model::Paper || u > 0.0)
        })
        .collect();
    walk.sort_by(|&a, &b| {
        hosts[a]
            .utilization
            .total_cmp(&hosts[b].utilization)
            .then(a.cmp(&b))
    });
    let mut pos = 0;
    loop {
        if n_excl_under == n {
            break;
        }
        let mut under = None;
        while pos < walk.len() {
            let h = walk[pos];
            pos += 1;
            if !excl_under[h] && !hosts[h].vms.is_empty() {
                under = Some(h);
                break;
            }
        }
        let Some(h) = under else { break };
        excl_under[h] = true;
        n_excl_under += 1;
        excl_place[h] = true;
        round.exclude(h);
        let mut moving = hosts[h].vms.clone();
        if moving.is_empty() {
            continue;
        }
        // a host with a VM that may not move keeps them all
        if !moving
            .iter()
            .all(|&v| rules.may_move(View::of(&hosts, vms), v))
        {
            continue;
        }
        sort_by_demand(View::of(&hosts, vms), &mut moving);
        let mut placed: Vec<(u32, usize)> = Vec::with_capacity(moving.len());
        let mut ok = true;
        for &v in &moving {
            match find_host(
                View::of(&hosts, vms),
                v,
                &excl_place,
                &mut round,
                cfg,
                rules,
            ) {
                Some(t) => {
                    hosts[t].vms.push(v);
                    round.added(t, v, hosts[t].vms.len());
                    placed.push((v, t));
                }
                None => {
                    ok = false;
                    break;
                }
            }
        }
        if !ok {
            for &(v, t) in &placed {
                let list = &mut hosts[t].vms;
                if let Some(i) = list.iter().position(|&x| x == v) {
                    list.remove(i);
                }
                round.removed(t);
            }
            continue;
        }
        for &(v, t) in &placed {
            if !excl_under[t] {
                excl_under[t] = true;
                n_excl_under += 1;
            }
            out.migrations.push(Migration {
                vm: v,
                from: vms[v as usize].host,
                to: t as u32,
            });
        }
        out.sleeps.push(h as u32);
    }
    out.table_peaks = round.sched.into_peaks();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::power::{HP_ML110_G4, HP_ML110_G5};
    use expect_test::expect;

    fn host(power: PowerModel, pe: f64, utilization: f64, vms: &[u32]) -> HostView {
        HostView {
            pes: 2,
            pe_mips: pe,
            power,
            utilization,
            vms: vms.to_vec(),
            sched: SchedOrder::default(),
        }
    }

    fn vm(host: u32, mips: f64, ram: u32, u: f64) -> VmView {
        VmView {
            host,
            mips,
            ram_mb: ram,
            requested_mips: mips * u,
            utilization: u,
            history: vec![u; 30],
        }
    }

    fn cfg(d: Detector) -> PolicyConfig {
        PolicyConfig {
            detector: d,
            selection: Selection::Mmt,
            model: Model::CloudSim,
            migration_mb_per_s: 62.5,
            interval_s: 300.0,
        }
    }

    fn show(d: &Decisions) -> String {
        let m: Vec<String> = d
            .migrations
            .iter()
            .map(|m| format!("vm{} {}->{}", m.vm, m.from, m.to))
            .collect();
        format!(
            "over {:?} | {} | sleep {:?}",
            d.overloaded,
            m.join(", "),
            d.sleeps
        )
    }

    #[test]
    fn allocation_scales_down_when_oversubscribed() {
        let view = ClusterView {
            hosts: vec![host(HP_ML110_G4, 1860.0, 0.0, &[0, 1, 2])],
            vms: vec![
                vm(0, 2500.0, 870, 1.0),
                vm(0, 2000.0, 1740, 0.9),
                vm(0, 1000.0, 1740, 0.5),
            ],
        };
        // demands 2500 (capped to 1860), 1800, 500 = 4160 > 3720: scale 3720/4160
        let (sum, avail) = host_allocation(view.view(), 0);
        let expect_sum = (1860.0f64 * 3720.0 / 4160.0).floor()
            + (1800.0f64 * 3720.0 / 4160.0).floor()
            + (500.0f64 * 3720.0 / 4160.0).floor();
        assert_eq!((sum, avail), (expect_sum, 0.0));
        assert!(sum <= 3720.0 && sum > 3717.0);
    }

    #[test]
    fn placement_and_underload_table() {
        // host 0 (G4) overloaded at 95 %; host 1 (G5) lightly loaded; host 2 (G5) at 10 % with one VM;
        // host 3 (G4) empty and asleep.
        let hosts = vec![
            host(HP_ML110_G4, 1860.0, 0.95, &[0, 1]),
            host(HP_ML110_G5, 2660.0, 0.30, &[2]),
            host(HP_ML110_G5, 2660.0, 0.094, &[3]),
            host(HP_ML110_G4, 1860.0, 0.0, &[]),
        ];
        let vms = vec![
            vm(0, 2000.0, 1740, 0.9),   // 1800 MIPS
            vm(0, 2000.0, 613, 0.8675), // 1735 MIPS (host 0 total 3535/3720 = 0.95)
            vm(1, 2500.0, 870, 0.64),   // 1600 MIPS on host 1 (5320): 0.30
            vm(2, 1000.0, 613, 0.5),    // 500 MIPS on host 2: 0.094
        ];
        let mut out = String::new();
        for (d, model) in [
            (Detector::Thr(0.8), Model::CloudSim),
            (Detector::Mad(2.5), Model::CloudSim),
            (Detector::Lr(1.2), Model::CloudSim),
            (Detector::Thr(0.8), Model::Paper),
        ] {
            let view = ClusterView {
                hosts: hosts.clone(),
                vms: vms.clone(),
            };
            let c = PolicyConfig { model, ..cfg(d) };
            let dec = optimize(&view, &c, &mut SplitMix64::new(1));
            // the snapshot is only read: the same snapshot gives the same round again
            assert_eq!(optimize(&view, &c, &mut SplitMix64::new(1)), dec);
            out += &format!(
                "{:<4} {:<8} {}\n",
                d.name(),
                format!("{model:?}"),
                show(&dec)
            );
        }
        // THR 0.8: host 0 (3535/3720 = 0.95) sheds its 613 MB VM (MMT) → 1800/3720 = 0.48. PABFD for
        // vm1 (1735 MIPS): host 1 → 3335/5320 = 0.627, +17.1 W over 105 W; host 2 → 2235/5320 = 0.42,
        // +14.4 W over 96.8 W; empty host 3 → 0.466, +15.2 W over 86 W idle: host 2 wins.
        // Underload (CloudSim): host 2 is still the least utilised by its last measurement and is
        // not excluded for having just received vm1, so it is drained, vm1 included: the reference
        // code emits vm1 twice (0→2 then →1). The paper mode excludes hosts that received VMs and
        // drains host 1 onto host 2 instead.
        // MAD: flat histories give MAD 0 → threshold 1.0, nothing is overloaded; host 2 drains to
        // host 1 (host 0 has only 185 MIPS free); then host 0 cannot drain (vm1 fits nowhere).
        // LR: flat 0.95 forecast × 1.2 ≥ 1 → host 0 overloaded; otherwise as THR.
        expect![[r#"
            thr  CloudSim over [0] | vm1 0->2, vm1 0->1, vm3 2->1 | sleep [2]
            mad  CloudSim over [] | vm3 2->1 | sleep [2]
            lr   CloudSim over [0] | vm1 0->2, vm1 0->1, vm3 2->1 | sleep [2]
            thr  Paper    over [0] | vm1 0->2, vm2 1->2 | sleep [1]
        "#]]
        .assert_eq(&out);
    }

    /// PABFD as the reference code writes it: every non-excluded host in list order, the detector
    /// asked of every fitting host, the first host with the least power increase wins.
    fn reference_find_host(
        view: View<'_>,
        vm: u32,
        excluded: &[bool],
        cfg: &PolicyConfig,
    ) -> Option<usize> {
        let req = view.vms[vm as usize].requested_mips;
        let mut min = f64::MAX;
        let mut best = None;
        for h in 0..view.hosts.len() {
            let host = &view.hosts[h];
            if excluded[h] || host.pe_mips < req {
                continue;
            }
            let (sum, avail) = host_allocation(view, h);
            if avail < req {
                continue;
            }
            if sum != 0.0 && is_overloaded(view, h, Some(vm), cfg) {
                continue;
            }
            let after = (sum + req) / host.total_mips();
            if after > 1.0 {
                continue;
            }
            let diff = host.power.watts_at(after) - host.power.watts_at(host.utilization);
            if diff < min {
                min = diff;
                best = Some(h);
            }
        }
        best
    }

    #[test]
    fn fast_placement_equals_the_reference_linear_scan_on_random_clusters() {
        let mut rng = SplitMix64::new(0x5eed);
        let mut checked = 0;
        let mut ties = 0;
        for case in 0..300 {
            // few distinct loads on many hosts of two types, so equal power increases are common
            let n_hosts = 2 + rng.below(40);
            let levels = [0.0, 0.1, 0.25, 0.4, 0.5, 0.8];
            let mut hosts = Vec::new();
            let mut vms = Vec::new();
            for h in 0..n_hosts {
                let (power, pe) = if rng.below(2) == 0 {
                    (HP_ML110_G4, 1860.0)
                } else {
                    (HP_ML110_G5, 2660.0)
                };
                let mut ids = Vec::new();
                for _ in 0..rng.below(4) {
                    let u = levels[rng.below(levels.len())];
                    ids.push(vms.len() as u32);
                    vms.push(vm(
                        h as u32,
                        [500.0, 1000.0, 2000.0, 2500.0][rng.below(4)],
                        870,
                        u,
                    ));
                }
                hosts.push(host(power, pe, 0.0, &ids));
            }
            let mut view = ClusterView { hosts, vms };
            for h in 0..n_hosts {
                let (sum, _) = host_allocation(view.view(), h);
                view.hosts[h].utilization = sum / view.hosts[h].total_mips();
            }
            let detector = [Detector::Thr(0.8), Detector::Thr(1.0), Detector::Mad(2.5)][case % 3];
            let c = PolicyConfig {
                model: Model::Paper,
                ..cfg(detector)
            };
            let excluded: Vec<bool> = (0..n_hosts).map(|_| rng.below(5) == 0).collect();
            let mut round = Round::new(view.view(), false);
            // place a stream of new VMs, as PABFD does within a round
            for _ in 0..8 {
                let u = levels[1 + rng.below(levels.len() - 1)];
                let v = view.vms.len() as u32;
                view.vms
                    .push(vm(u32::MAX, [500.0, 1000.0, 2000.0][rng.below(3)], 613, u));
                let want = reference_find_host(view.view(), v, &excluded, &c);
                let got = find_host(view.view(), v, &excluded, &mut round, &c, &NoRules);
                assert_eq!(got, want, "case {case}, vm {v}");
                checked += 1;
                if let Some(t) = got {
                    let req = view.vms[v as usize].requested_mips;
                    let best = {
                        let hv = &view.hosts[t];
                        let (sum, _) = host_allocation(view.view(), t);
                        hv.power.watts_at((sum + req) / hv.total_mips())
                            - hv.power.watts_at(hv.utilization)
                    };
                    // count choices where a later host had exactly the same increase
                    ties += (t + 1..n_hosts)
                        .filter(|&o| {
                            let hv = &view.hosts[o];
                            let (sum, avail) = host_allocation(view.view(), o);
                            !excluded[o]
                                && avail >= req
                                && hv.power.watts_at((sum + req) / hv.total_mips())
                                    - hv.power.watts_at(hv.utilization)
                                    == best
                        })
                        .count()
                        .min(1);
                    round.cands.mark_busy(view.view(), t);
                    view.hosts[t].vms.push(v);
                    round.added(t, v, view.hosts[t].vms.len());
                }
            }
        }
        assert_eq!(checked, 300 * 8);
        assert!(ties > 50, "only {ties} placements had a tie to break");
    }

    /// A cluster for the index's test: many hosts of a few kinds at a few load levels (so exact
    /// ties are common), some idle, some measured above or below their VMs' demand.
    fn tie_heavy_cluster(rng: &mut SplitMix64) -> ClusterView {
        let n_hosts = 20 + rng.below(300);
        let levels = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.4, 0.6, 0.8, 1.0];
        let mut hosts = Vec::new();
        let mut vms = Vec::new();
        for h in 0..n_hosts {
            let mut hv = match rng.below(4) {
                0 => host(HP_ML110_G4, 1860.0, 0.0, &[]),
                1 => host(HP_ML110_G5, 2660.0, 0.0, &[]),
                // live hosts: one processing element of all cores
                2 => HostView::live(2, HP_ML110_G5, 2660.0),
                _ => HostView::live(4, HP_ML110_G4, 1860.0),
            };
            // the reference scheduler's state from earlier rounds (read under `Model::CloudSim`)
            hv.sched = SchedOrder {
                by_uid: rng.below(2) == 0,
                peak_entries: [0, 3, 6, 12, 13][rng.below(5)],
            };
            let n_vms = [0, 1, 2, 2, 3, 4, 6][rng.below(7)];
            for _ in 0..n_vms {
                hv.vms.push(vms.len() as u32);
                let mips = [500.0, 1000.0, 1860.0, 2660.0][rng.below(4)];
                let mut v = vm(h as u32, mips, [613, 870, 1740][rng.below(3)], 0.0);
                let level = levels[rng.below(levels.len())];
                let len = [3, 10, 12, HISTORY_LEN][rng.below(4)];
                v.history = (0..len)
                    .map(|_| {
                        if rng.below(3) == 0 {
                            level
                        } else {
                            (level + 0.1 * rng.next_f64()).min(1.0)
                        }
                    })
                    .collect();
                v.utilization = v.history[0];
                v.requested_mips = v.mips * v.utilization;
                vms.push(v);
            }
            hosts.push(hv);
        }
        let mut view = ClusterView { hosts, vms };
        for h in 0..n_hosts {
            let (sum, _) = host_allocation(view.view(), h);
            let u = sum / view.hosts[h].total_mips();
            view.hosts[h].utilization = match rng.below(5) {
                0 => (u + 0.05 * rng.next_f64()).min(1.0),
                1 => (u - 0.05 * rng.next_f64()).max(0.0),
                _ => u,
            };
        }
        view
    }

    #[test]
    fn indexed_placement_decides_exactly_as_the_scan_on_random_clusters() {
        let mut rng = SplitMix64::new(0x1d3);
        let (mut moved, mut drained) = (0, 0);
        for case in 0..600 {
            let view = tie_heavy_cluster(&mut rng);
            let detector = [
                Detector::Thr(0.8),
                Detector::Thr(1.0),
                Detector::Mad(2.5),
                Detector::Iqr(1.5),
                Detector::Lr(1.2),
                Detector::Lrr(1.2),
            ][rng.below(6)];
            let c = PolicyConfig {
                model: [Model::Paper, Model::CloudSim][case % 2],
                selection: [Selection::Mmt, Selection::Rs, Selection::Mu][rng.below(3)],
                ..cfg(detector)
            };
            let (n_hosts, n_vms) = (view.hosts.len(), view.vms.len());
            let rules = if rng.below(2) == 0 {
                RuleSet::default()
            } else {
                RuleSet {
                    closed: (0..n_hosts).map(|_| rng.below(10) == 0).collect(),
                    pins: view
                        .vms
                        .iter()
                        .map(|v| match rng.below(12) {
                            0 => Some(v.host),
                            1 => Some(rng.below(n_hosts) as u32),
                            _ => None,
                        })
                        .collect(),
                    groups: (0..n_vms)
                        .map(|_| (rng.below(4) == 0).then(|| rng.below(5) as u32))
                        .collect(),
                }
            };
            let seed = rng.next_u64();
            let scan = round_with(&view, &c, &mut SplitMix64::new(seed), &rules, false);
            let indexed = round_with(&view, &c, &mut SplitMix64::new(seed), &rules, true);
            assert_eq!(indexed, scan, "case {case}: {detector:?}");
            moved += scan.migrations.len();
            drained += scan.sleeps.len();
        }
        assert!(moved > 3000, "only {moved} migrations");
        assert!(drained > 750, "only {drained} hosts drained");
    }

    #[test]
    fn underloaded_host_stays_when_its_vms_do_not_fit() {
        // two G4 hosts each at 60 %: draining either would overload the other under THR 0.8
        let hosts = vec![
            host(HP_ML110_G4, 1860.0, 0.6, &[0]),
            host(HP_ML110_G4, 1860.0, 0.6, &[1]),
        ];
        let vms = vec![vm(0, 2000.0, 870, 1.0).clone(), vm(1, 2000.0, 870, 1.0)];
        let mut vms = vms;
        for v in &mut vms {
            v.requested_mips = 0.6 * 3720.0;
            v.utilization = v.requested_mips / v.mips;
        }
        let view = ClusterView { hosts, vms };
        let dec = optimize(&view, &cfg(Detector::Thr(0.8)), &mut SplitMix64::new(1));
        assert!(
            dec.migrations.is_empty() && dec.sleeps.is_empty(),
            "{dec:?}"
        );
    }

    /// Applies `d`'s migrations in order: where each VM ends the round.
    fn final_hosts(view: &ClusterView, d: &Decisions) -> Vec<u32> {
        let mut at: Vec<u32> = view.vms.iter().map(|v| v.host).collect();
        for m in &d.migrations {
            at[m.vm as usize] = m.to;
        }
        at
    }

    /// A random cluster of G4/G5 hosts with 0-4 VMs each, utilisations set from the VMs.
    fn random_cluster(rng: &mut SplitMix64) -> ClusterView {
        let n_hosts = 2 + rng.below(30);
        let mut hosts = Vec::new();
        let mut vms = Vec::new();
        for h in 0..n_hosts {
            let (power, pe) = if rng.below(2) == 0 {
                (HP_ML110_G4, 1860.0)
            } else {
                (HP_ML110_G5, 2660.0)
            };
            let mut ids = Vec::new();
            for _ in 0..rng.below(5) {
                ids.push(vms.len() as u32);
                let mut v = vm(
                    h as u32,
                    [500.0, 1000.0, 2000.0, 2500.0][rng.below(4)],
                    [613, 870, 1740][rng.below(3)],
                    0.0,
                );
                v.history = (0..HISTORY_LEN).map(|_| rng.next_f64()).collect();
                v.utilization = v.history[0];
                v.requested_mips = v.mips * v.utilization;
                vms.push(v);
            }
            hosts.push(host(power, pe, 0.0, &ids));
        }
        let mut view = ClusterView { hosts, vms };
        for h in 0..n_hosts {
            let (sum, _) = host_allocation(view.view(), h);
            view.hosts[h].utilization = sum / view.hosts[h].total_mips();
        }
        view
    }

    fn random_cfg(rng: &mut SplitMix64) -> PolicyConfig {
        let detector = [
            Detector::Thr(0.8),
            Detector::Thr(0.6),
            Detector::Mad(2.5),
            Detector::Lr(1.2),
        ][rng.below(4)];
        let selection = [Selection::Mmt, Selection::Rs, Selection::Mu][rng.below(3)];
        let model = [Model::CloudSim, Model::Paper][rng.below(2)];
        PolicyConfig {
            selection,
            model,
            ..cfg(detector)
        }
    }

    #[test]
    fn an_empty_rule_set_decides_exactly_what_no_rules_decide() {
        let mut rng = SplitMix64::new(0xa11);
        let mut moved = 0;
        for case in 0..200 {
            let view = random_cluster(&mut rng);
            let c = random_cfg(&mut rng);
            let seed = rng.next_u64();
            let plain = optimize(&view, &c, &mut SplitMix64::new(seed));
            let ruled = optimize_with(&view, &c, &mut SplitMix64::new(seed), &RuleSet::default());
            assert_eq!(plain, ruled, "case {case}");
            moved += plain.migrations.len();
        }
        assert!(moved > 100, "only {moved} migrations in 200 rounds");
    }

    #[test]
    fn no_decision_breaks_a_pin_a_group_or_a_closed_host_on_random_clusters() {
        let mut rng = SplitMix64::new(0xb0b);
        let (mut moved, mut kept_by_rules) = (0, 0);
        for case in 0..300 {
            let view = random_cluster(&mut rng);
            let c = random_cfg(&mut rng);
            let (n_hosts, n_vms) = (view.hosts.len(), view.vms.len());
            let rules = RuleSet {
                closed: (0..n_hosts).map(|_| rng.below(6) == 0).collect(),
                // some VMs pinned where they run, a few to another host
                pins: view
                    .vms
                    .iter()
                    .map(|v| match rng.below(8) {
                        0 => Some(v.host),
                        1 => Some(rng.below(n_hosts) as u32),
                        _ => None,
                    })
                    .collect(),
                groups: (0..n_vms)
                    .map(|_| (rng.below(3) == 0).then(|| rng.below(3) as u32))
                    .collect(),
            };
            let seed = rng.next_u64();
            let d = optimize_with(&view, &c, &mut SplitMix64::new(seed), &rules);
            let plain = optimize(&view, &c, &mut SplitMix64::new(seed));
            kept_by_rules += usize::from(d != plain);
            let at = final_hosts(&view, &d);
            for m in &d.migrations {
                moved += 1;
                let v = m.vm as usize;
                assert!(
                    !rules.closed[m.to as usize],
                    "case {case}: {m:?} to a closed host"
                );
                if let Some(p) = rules.pins[v] {
                    assert_ne!(
                        p, view.vms[v].host,
                        "case {case}: {m:?} moves a VM pinned there"
                    );
                    assert_eq!(p, m.to, "case {case}: {m:?} goes off its pin");
                }
            }
            // every VM that moved shares its final host with no VM of its group
            for m in &d.migrations {
                let v = m.vm as usize;
                let Some(g) = rules.groups[v] else { continue };
                if at[v] != m.to {
                    continue; // moved again later in the round
                }
                for u in (0..n_vms).filter(|&u| u != v && at[u] == at[v]) {
                    assert_ne!(
                        rules.groups[u],
                        Some(g),
                        "case {case}: vm{v} and vm{u} on {}",
                        at[v]
                    );
                }
            }
            for &h in &d.sleeps {
                assert!(
                    (0..n_vms).all(|u| at[u] != h),
                    "case {case}: host {h} drained but still holds a VM: {d:?}"
                );
            }
        }
        assert!(moved > 100, "only {moved} migrations");
        assert!(
            kept_by_rules > 50,
            "the rules changed only {kept_by_rules} rounds"
        );
    }

    fn paper(d: Detector) -> PolicyConfig {
        PolicyConfig {
            model: Model::Paper,
            ..cfg(d)
        }
    }

    #[test]
    fn a_pinned_vm_is_not_selected_off_an_overloaded_host_and_goes_only_to_its_pin() {
        // host 0 (G4) at 95 % with vm0 (1800 MIPS, 1740 MB) and vm1 (1735 MIPS, 613 MB): MMT takes
        // vm1, the smaller; hosts 1 and 2 (G5) lightly loaded, host 3 (G4) empty.
        let view = ClusterView {
            hosts: vec![
                host(HP_ML110_G4, 1860.0, 0.95, &[0, 1]),
                host(HP_ML110_G5, 2660.0, 0.30, &[2]),
                host(HP_ML110_G5, 2660.0, 0.094, &[3]),
                host(HP_ML110_G4, 1860.0, 0.0, &[]),
            ],
            vms: vec![
                vm(0, 2000.0, 1740, 0.9),
                vm(0, 2000.0, 613, 0.8675),
                vm(1, 2500.0, 870, 0.64),
                vm(2, 1000.0, 613, 0.5),
            ],
        };
        let c = paper(Detector::Thr(0.8));
        let plain = optimize(&view, &c, &mut SplitMix64::new(1));
        assert_eq!(plain.migrations[0].vm, 1, "{plain:?}");
        let vm0_plain = plain.migrations.iter().find(|m| m.vm == 0);
        assert!(vm0_plain.is_none(), "{plain:?}");

        // vm1 pinned to host 0: vm0 leaves instead
        let mut rules = RuleSet {
            pins: vec![None, Some(0), None, None],
            ..Default::default()
        };
        let d = optimize_with(&view, &c, &mut SplitMix64::new(1), &rules);
        assert!(d.migrations.iter().all(|m| m.vm != 1), "{d:?}");
        assert_eq!(d.migrations[0].vm, 0, "{d:?}");
        // vm0 pinned to the empty host 3 as well: it goes there, whatever PABFD prefers
        let free_choice = d.migrations[0].to;
        assert_ne!(free_choice, 3, "pick a pin PABFD would not choose: {d:?}");
        rules.pins[0] = Some(3);
        let d = optimize_with(&view, &c, &mut SplitMix64::new(1), &rules);
        assert_eq!(
            d.migrations[0],
            Migration {
                vm: 0,
                from: 0,
                to: 3
            },
            "{d:?}"
        );
        // both pinned where they are: host 0 stays overloaded, nothing moves off it
        rules.pins = vec![Some(0), Some(0), None, None];
        let d = optimize_with(&view, &c, &mut SplitMix64::new(1), &rules);
        assert_eq!(d.overloaded, vec![0]);
        assert!(d.migrations.iter().all(|m| m.from != 0), "{d:?}");
    }

    #[test]
    fn two_shed_vms_of_one_group_do_not_land_on_one_host_in_one_round() {
        // host 0 (G5) over capacity sheds vm0 and vm1 (200 MIPS, 613 MB each) under THR 1.0. Host 1
        // (G5 at 90 %) rises 2 W per 10 % there, host 2 (G4 at 50 %) 4 W per 10 % of a smaller
        // host, so PABFD puts both on host 1 unless they are one anti-affinity group.
        let view = ClusterView {
            hosts: vec![
                host(HP_ML110_G5, 2660.0, 0.99, &[0, 1, 2, 3]),
                host(HP_ML110_G5, 2660.0, 0.9, &[4, 5]),
                host(HP_ML110_G4, 1860.0, 0.5, &[6]),
            ],
            vms: vec![
                vm(0, 200.0, 613, 1.0),
                vm(0, 200.0, 613, 1.0),
                vm(0, 2600.0, 1740, 1.0),
                vm(0, 2600.0, 1740, 1.0),
                vm(1, 2394.0, 870, 1.0),
                vm(1, 2394.0, 870, 1.0),
                vm(2, 1860.0, 870, 1.0),
            ],
        };
        let c = paper(Detector::Thr(1.0));
        let plain = optimize(&view, &c, &mut SplitMix64::new(1));
        let to: Vec<u32> = plain.migrations.iter().map(|m| m.to).collect();
        assert_eq!(
            to,
            vec![1, 1],
            "without the rule both go to host 1: {plain:?}"
        );
        let mut rules = RuleSet {
            groups: vec![Some(7), Some(7)],
            ..Default::default()
        };
        let d = optimize_with(&view, &c, &mut SplitMix64::new(1), &rules);
        let to: Vec<u32> = d.migrations.iter().map(|m| m.to).collect();
        assert_eq!(to, vec![1, 2], "{d:?}");
        // and none joins a host that holds its group already: with host 1 holding one, vm0 goes
        // to host 2 and vm1 has nowhere to go
        rules.groups = vec![Some(7), Some(7), None, None, Some(7)];
        let d = optimize_with(&view, &c, &mut SplitMix64::new(1), &rules);
        let to: Vec<(u32, u32)> = d.migrations.iter().map(|m| (m.vm, m.to)).collect();
        assert_eq!(to, vec![(0, 2)], "{d:?}");
    }

    #[test]
    fn a_host_whose_vm_cannot_move_is_not_drained() {
        // host 0 (G4) at 13 % with one VM; host 1 (G5) at 40 %: without rules host 0 is drained.
        let view = ClusterView {
            hosts: vec![
                host(HP_ML110_G4, 1860.0, 0.134, &[0]),
                host(HP_ML110_G5, 2660.0, 0.40, &[1]),
            ],
            vms: vec![vm(0, 500.0, 613, 1.0), vm(1, 2128.0, 870, 1.0)],
        };
        let c = paper(Detector::Thr(0.8));
        let plain = optimize(&view, &c, &mut SplitMix64::new(1));
        assert_eq!(plain.sleeps, vec![0], "{plain:?}");
        assert_eq!(
            plain.migrations,
            vec![Migration {
                vm: 0,
                from: 0,
                to: 1
            }]
        );
        let blocked = [
            // pinned where it runs
            RuleSet {
                pins: vec![Some(0)],
                ..Default::default()
            },
            // its only other host holds its group
            RuleSet {
                groups: vec![Some(1), Some(1)],
                ..Default::default()
            },
            // its only other host takes no VMs
            RuleSet {
                closed: vec![false, true],
                ..Default::default()
            },
        ];
        for rules in blocked {
            let d = optimize_with(&view, &c, &mut SplitMix64::new(1), &rules);
            assert_eq!(
                d,
                Decisions {
                    table_peaks: d.table_peaks.clone(),
                    ..Default::default()
                },
                "{rules:?}"
            );
        }
    }

    #[test]
    fn find_host_skips_closed_idle_hosts_and_follows_pins() {
        // four idle G4 hosts: PABFD takes the first, unless it is closed or the VM is pinned
        let view = ClusterView {
            hosts: (0..4)
                .map(|_| host(HP_ML110_G4, 1860.0, 0.0, &[]))
                .collect(),
            vms: vec![vm(u32::MAX, 1000.0, 613, 0.5)],
        };
        let c = paper(Detector::Thr(0.8));
        let excluded = vec![false; 4];
        let pick = |rules: &RuleSet| {
            let mut round = Round::new(view.view(), false);
            find_host(view.view(), 0, &excluded, &mut round, &c, rules)
        };
        assert_eq!(pick(&RuleSet::default()), Some(0));
        let closed = RuleSet {
            closed: vec![true, true],
            ..Default::default()
        };
        assert_eq!(pick(&closed), Some(2));
        let pinned = RuleSet {
            pins: vec![Some(3)],
            ..Default::default()
        };
        assert_eq!(pick(&pinned), Some(3));
        let pinned_closed = RuleSet {
            closed: vec![false, false, false, true],
            pins: vec![Some(3)],
            ..Default::default()
        };
        assert_eq!(pick(&pinned_closed), None);
    }
}
