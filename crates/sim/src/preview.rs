//! Plan preview: run a live cluster forward from its present state, with and without a plan, and
//! compare energy, SLATAH and PDM.
//!
//! The day simulator ([`crate::simulate`]) starts from an empty data centre and a day of traces;
//! the live loop needs the opposite: *this* placement now, *these* utilisation histories, and a
//! few moves and host power actions to start at t = 0. [`preview`] is that entry point. It follows
//! the paper model's accounting (docs/sim.md) with the live loop's differences:
//!
//! - **Forecast.** Each VM's demand over the horizon comes from its recent history: the last value
//!   held ([`Forecast::HoldLast`]) or the recorded window replayed oldest first, over and over
//!   ([`Forecast::Replay`]).
//! - **Migrations** start at t = 0 and take the VM's own `migration_time_s` (the migration
//!   model's prediction, not RAM / bandwidth); meanwhile the VM gets 90 % of its share on the
//!   source, which is still charged in full, and the destination reserves 10 % (CloudSim's cost
//!   model, which PDM measures).
//! - **Host power.** A powered-on host draws its SPECpower watts *even when empty* (a live host
//!   idles, it does not sleep); a host powered off draws nothing. A power-off in the scenario
//!   takes effect `delay_s` after the host's last VM has left, and only if it is empty then. A
//!   power-on takes effect at once.
//! - **Parked cores.** A host with a per-core deep C-state saves `parked_core_saving_w` for each
//!   parked core, ramping from 0 at idle to the full figure at 10 % load, never below the curve's
//!   own idle power (the model of `tern-parking`'s `power` module, see docs/parking.md); the cores
//!   parked are those the load leaves idle: `pes − max(1, ⌈u · pes⌉)`.
//! - **SLATAH** is the time a host is asked for more CPU than it has over the time it is active;
//!   **PDM** the CPU lost to migrations over the CPU requested (both as ratios of sums).
//!
//! No policy runs during the horizon: the preview answers "this plan now, then nothing" against
//! "nothing", which is the question a plan's approval asks.

#![deny(clippy::disallowed_methods)]

use tern_policy::PowerModel;

/// One host as the preview starts it.
#[derive(Debug, Clone)]
pub struct PreviewHost {
    /// Physical cores.
    pub pes: u32,
    /// Capacity of one core (MIPS, or any unit the VMs use too).
    pub pe_mips: f64,
    /// SPECpower curve.
    pub power: PowerModel,
    /// Watts one parked core saves under load (0 for a CPU without a per-core deep state).
    pub parked_core_saving_w: f64,
    /// Powered on now.
    pub on: bool,
}

/// One VM as the preview starts it.
#[derive(Debug, Clone)]
pub struct PreviewVm {
    /// Host it runs on now (an index into the hosts).
    pub host: u32,
    /// Its capacity (same unit as the hosts' `pe_mips`).
    pub mips: f64,
    /// Its utilisation history, 0..1 of `mips`, most recent first (one point per interval).
    pub history: Vec<f64>,
    /// How long moving it takes, seconds.
    pub migration_time_s: f64,
}

/// How the future demand is guessed from the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Forecast {
    /// The last value, held.
    HoldLast,
    /// The recorded window replayed from its oldest point, repeated.
    #[default]
    Replay,
}

/// What the preview starts from.
#[derive(Debug, Clone)]
pub struct PreviewInput {
    /// Hosts, by index.
    pub hosts: Vec<PreviewHost>,
    /// VMs, by index.
    pub vms: Vec<PreviewVm>,
    /// Length of one forecast step, seconds (the loop's interval).
    pub interval_s: f64,
    /// Steps to run.
    pub steps: u32,
    /// How demand is forecast.
    pub forecast: Forecast,
}

/// A move started at t = 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreviewMove {
    /// The VM.
    pub vm: u32,
    /// Its destination.
    pub to: u32,
}

/// The actions of a plan, as the preview applies them.
#[derive(Debug, Clone, Default)]
pub struct Scenario {
    /// Moves, all started at t = 0.
    pub moves: Vec<PreviewMove>,
    /// Hosts to power off (host, delay after it is empty in seconds).
    pub power_off: Vec<(u32, f64)>,
    /// Hosts powered on at t = 0.
    pub power_on: Vec<u32>,
}

/// The predicted figures over the horizon.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PreviewOutcome {
    /// Energy of all hosts, kWh.
    pub energy_kwh: f64,
    /// Overloaded time over active time, percent.
    pub slatah_pct: f64,
    /// CPU lost to migrations over CPU requested, percent.
    pub pdm_pct: f64,
    /// Hosts powered on at the end.
    pub hosts_on: u32,
    /// Migrations completed within the horizon.
    pub migrations: u32,
}

/// Power of a host at utilisation `u` with `parked` cores parked, each saving up to
/// `saving_w_per_core` (ramping in over the first 10 % of load), never below the curve's idle.
pub fn parked_host_power_w(power: &PowerModel, u: f64, parked: u32, saving_w_per_core: f64) -> f64 {
    let u = if u.is_finite() {
        u.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let p = power.watts_at(u);
    let ramp = (u / 0.1).clamp(0.0, 1.0);
    let saved = f64::from(parked) * ramp * saving_w_per_core.max(0.0);
    (p - saved).max(power.watts_at(0.0).min(p))
}

/// Cores a host at utilisation `u` leaves idle for the parking policy: `pes − max(1, ⌈u · pes⌉)`.
pub fn idle_cores(pes: u32, u: f64) -> u32 {
    let busy = (u.clamp(0.0, 1.0) * f64::from(pes) - 1e-9).ceil().max(1.0) as u32;
    pes.saturating_sub(busy)
}

fn demand_at(vm: &PreviewVm, step: u32, forecast: Forecast) -> f64 {
    let n = vm.history.len();
    if n == 0 {
        return 0.0;
    }
    let u = match forecast {
        Forecast::HoldLast => vm.history[0],
        // oldest first: history[n-1], history[n-2], …, history[0], then again
        Forecast::Replay => vm.history[n - 1 - (step as usize % n)],
    };
    u.clamp(0.0, 1.0) * vm.mips
}

/// Runs `input` forward for its horizon under `scenario` (an empty one: doing nothing).
/// Out-of-range indices in the scenario are ignored.
pub fn preview(input: &PreviewInput, scenario: &Scenario) -> PreviewOutcome {
    let nh = input.hosts.len();
    let nv = input.vms.len();
    let horizon = input.interval_s * f64::from(input.steps);
    let mut on: Vec<bool> = input.hosts.iter().map(|h| h.on).collect();
    for &h in &scenario.power_on {
        if let Some(x) = on.get_mut(h as usize) {
            *x = true;
        }
    }
    // per VM: Some((destination, completion time)) while a move is under way
    let mut moving: Vec<Option<(u32, f64)>> = vec![None; nv];
    for m in &scenario.moves {
        let (v, to) = (m.vm as usize, m.to);
        if v < nv && (to as usize) < nh && input.vms[v].host != to && moving[v].is_none() {
            moving[v] = Some((to, input.vms[v].migration_time_s.max(0.0)));
        }
    }
    let mut host_of: Vec<u32> = input.vms.iter().map(|v| v.host).collect();
    // power-offs waiting for their host to empty: (host, delay)
    let pending_off: Vec<(u32, f64)> = scenario
        .power_off
        .iter()
        .copied()
        .filter(|&(h, _)| (h as usize) < nh)
        .collect();
    let mut off_at: Vec<Option<f64>> = vec![None; nh];

    let mut events: Vec<f64> = (0..=input.steps)
        .map(|k| f64::from(k) * input.interval_s)
        .collect();
    events.extend(moving.iter().flatten().map(|&(_, t)| t));
    events.retain(|&t| (0.0..=horizon).contains(&t));
    events.sort_by(f64::total_cmp);
    events.dedup();

    let (mut energy_j, mut active_s, mut violation_s) = (0.0, 0.0, 0.0);
    let (mut requested, mut lost) = (0.0, 0.0);
    let mut migrations = 0u32;
    let mut alloc_sum = vec![0.0f64; nh];
    let mut req_sum = vec![0.0f64; nh];
    let mut busy = vec![false; nh];
    let mut occupied = vec![false; nh];
    for w in events.windows(2) {
        let (a, b) = (w[0], w[1]);
        // complete the moves due by `a`
        for v in 0..nv {
            if let Some((to, end)) = moving[v]
                && end <= a
            {
                host_of[v] = to;
                moving[v] = None;
                migrations += 1;
            }
        }
        // a host emptied by the plan powers off after its delay
        if !pending_off.is_empty() {
            occupied.fill(false);
            for v in 0..nv {
                if let Some(o) = occupied.get_mut(host_of[v] as usize) {
                    *o = true;
                }
                if let Some((to, _)) = moving[v] {
                    occupied[to as usize] = true;
                }
            }
            for &(h, delay) in &pending_off {
                let h = h as usize;
                if !occupied[h] && off_at[h].is_none() {
                    off_at[h] = Some(a + delay);
                }
            }
        }
        for h in 0..nh {
            if off_at[h].is_some_and(|t| t <= a) {
                on[h] = false;
            }
        }
        let dt = b - a;
        let step = ((a / input.interval_s).floor() as u32).min(input.steps.saturating_sub(1));
        // each host's demand: residents at full share (the outgoing ones included), incoming at 10 %
        req_sum.fill(0.0);
        alloc_sum.fill(0.0);
        busy.fill(false);
        let demand: Vec<f64> = input
            .vms
            .iter()
            .map(|vm| demand_at(vm, step, input.forecast))
            .collect();
        for v in 0..nv {
            let h = host_of[v] as usize;
            if h >= nh {
                continue;
            }
            req_sum[h] += demand[v];
            busy[h] = true;
            if let Some((to, _)) = moving[v] {
                req_sum[to as usize] += 0.1 * demand[v];
                busy[to as usize] = true;
            }
        }
        for h in 0..nh {
            let cap = input.hosts[h].pe_mips * f64::from(input.hosts[h].pes);
            alloc_sum[h] = req_sum[h].min(cap);
        }
        for v in 0..nv {
            let h = host_of[v] as usize;
            if h >= nh {
                continue;
            }
            let cap = input.hosts[h].pe_mips * f64::from(input.hosts[h].pes);
            let scale = if req_sum[h] > cap && req_sum[h] > 0.0 {
                cap / req_sum[h]
            } else {
                1.0
            };
            requested += demand[v] * dt;
            if moving[v].is_some() {
                // the VM gets 90 % of its share while it moves
                lost += (demand[v] - 0.9 * demand[v] * scale) * dt;
            }
        }
        for h in 0..nh {
            if !on[h] {
                continue;
            }
            let host = &input.hosts[h];
            let cap = host.pe_mips * f64::from(host.pes);
            let u = if cap > 0.0 { alloc_sum[h] / cap } else { 0.0 };
            let parked = idle_cores(host.pes, u);
            energy_j += parked_host_power_w(&host.power, u, parked, host.parked_core_saving_w) * dt;
            if busy[h] {
                active_s += dt;
                if req_sum[h] > cap * (1.0 + 1e-12) {
                    violation_s += dt;
                }
            }
        }
    }
    for v in 0..nv {
        if let Some((_, end)) = moving[v]
            && end <= horizon
        {
            migrations += 1;
        }
    }
    for h in 0..nh {
        if off_at[h].is_some_and(|t| t <= horizon) {
            on[h] = false;
        }
    }
    let pct = |x: f64, of: f64| if of > 0.0 { 100.0 * x / of } else { 0.0 };
    PreviewOutcome {
        energy_kwh: energy_j / 3.6e6,
        slatah_pct: pct(violation_s, active_s),
        pdm_pct: pct(lost, requested),
        hosts_on: on.iter().filter(|&&x| x).count() as u32,
        migrations,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_policy::{HP_ML110_G4, HP_ML110_G5};

    fn host(power: PowerModel, on: bool) -> PreviewHost {
        PreviewHost {
            pes: 2,
            pe_mips: 1000.0,
            power,
            parked_core_saving_w: 0.0,
            on,
        }
    }

    fn vm(host: u32, u: f64) -> PreviewVm {
        PreviewVm {
            host,
            mips: 1000.0,
            history: vec![u; 10],
            migration_time_s: 10.0,
        }
    }

    fn input(hosts: Vec<PreviewHost>, vms: Vec<PreviewVm>) -> PreviewInput {
        PreviewInput {
            hosts,
            vms,
            interval_s: 60.0,
            steps: 10,
            forecast: Forecast::HoldLast,
        }
    }

    #[test]
    fn doing_nothing_costs_each_on_host_its_curve_by_hand() {
        // host 0 at 25 % (one VM of half a core on 2 cores), host 1 on and empty, host 2 off
        let i = input(
            vec![
                host(HP_ML110_G4, true),
                host(HP_ML110_G5, true),
                host(HP_ML110_G5, false),
            ],
            vec![vm(0, 0.5)],
        );
        let o = preview(&i, &Scenario::default());
        let want = (HP_ML110_G4.watts_at(0.25) + HP_ML110_G5.watts_at(0.0)) * 600.0 / 3.6e6;
        assert!((o.energy_kwh - want).abs() < 1e-12, "{o:?} {want}");
        assert_eq!(o.hosts_on, 2);
        assert_eq!((o.slatah_pct, o.pdm_pct, o.migrations), (0.0, 0.0, 0));
    }

    #[test]
    fn draining_and_powering_off_a_host_saves_its_idle_power_less_the_move() {
        let i = input(
            vec![host(HP_ML110_G5, true), host(HP_ML110_G5, true)],
            vec![vm(0, 0.4), vm(1, 0.2)],
        );
        let nothing = preview(&i, &Scenario::default());
        let plan = Scenario {
            moves: vec![PreviewMove { vm: 1, to: 0 }],
            power_off: vec![(1, 30.0)],
            power_on: vec![],
        };
        let with = preview(&i, &plan);
        assert_eq!(with.hosts_on, 1);
        assert_eq!(with.migrations, 1);
        assert!(with.energy_kwh < nothing.energy_kwh, "{with:?} {nothing:?}");
        // host 1 draws until the move ends (10 s) and its delay passes (30 s): 40 s of it remain
        let h1_until_off = 10.0 * HP_ML110_G5.watts_at(0.1) + 30.0 * HP_ML110_G5.watts_at(0.0);
        assert!(with.energy_kwh * 3.6e6 > h1_until_off);
        // 10 % of the moving VM's 200 MIPS lost for 10 s, over 600 s of 600 MIPS requested
        let pdm = 100.0 * (0.1 * 200.0 * 10.0) / (600.0 * 600.0);
        assert!((with.pdm_pct - pdm).abs() < 1e-9, "{}", with.pdm_pct);
        assert_eq!(nothing.pdm_pct, 0.0);
    }

    #[test]
    fn moving_onto_a_full_host_shows_as_slatah() {
        let i = input(
            vec![host(HP_ML110_G5, true), host(HP_ML110_G5, true)],
            vec![vm(0, 1.0), vm(0, 0.8), vm(1, 0.5)],
        );
        let nothing = preview(&i, &Scenario::default());
        assert_eq!(nothing.slatah_pct, 0.0);
        let bad = Scenario {
            moves: vec![PreviewMove { vm: 2, to: 0 }],
            ..Scenario::default()
        };
        let with = preview(&i, &bad);
        // host 0 asked for 1.8 + 0.05 cores while the move runs, then 2.3 of 2: always overloaded
        assert!(with.slatah_pct > 90.0, "{with:?}");
    }

    #[test]
    fn replay_walks_the_history_oldest_first() {
        let v = PreviewVm {
            host: 0,
            mips: 100.0,
            history: vec![0.3, 0.2, 0.1],
            migration_time_s: 0.0,
        };
        let got: Vec<f64> = (0..5)
            .map(|k| demand_at(&v, k, Forecast::Replay).round())
            .collect();
        assert_eq!(got, vec![10.0, 20.0, 30.0, 10.0, 20.0]);
        assert_eq!(demand_at(&v, 4, Forecast::HoldLast), 30.0);
    }

    #[test]
    fn parked_cores_save_from_ten_percent_and_never_below_idle() {
        let m = HP_ML110_G5;
        assert_eq!(parked_host_power_w(&m, 0.0, 1, 5.0), m.watts_at(0.0));
        assert!((parked_host_power_w(&m, 0.05, 1, 1.0) - (m.watts_at(0.05) - 0.5)).abs() < 1e-9);
        assert!((parked_host_power_w(&m, 0.3, 1, 5.0) - (m.watts_at(0.3) - 5.0)).abs() < 1e-9);
        assert_eq!(parked_host_power_w(&m, 0.3, 10, 50.0), m.watts_at(0.0));
        assert_eq!(idle_cores(4, 0.0), 3);
        assert_eq!(idle_cores(4, 0.25), 3);
        assert_eq!(idle_cores(4, 0.26), 2);
        assert_eq!(idle_cores(4, 1.0), 0);
    }
}
