//! The automation loop's REST bodies: the policy (`GET|PUT /v1/policy`), plans (`GET /v1/plans`,
//! `POST /v1/plans/{id}/apply|reject`), host power states, the dashboard's time series
//! (`GET /v1/stats/series`) and the loop's recent rounds (`GET /v1/automation/rounds`).
//!
//! A [`Policy`] arrives whole (every field present, unknown fields refused) and is checked by
//! [`Policy::validate`] before anything changes; each refusal names the field and its range.
//! A [`Plan`] is what one round of the loop decided: migrations and host power actions, each with its
//! reason, the cluster version it was computed on (`basis`) and, when previewed, its predicted effect.
//!
//! ```
//! use tern_api::automation::{Policy, PolicyError};
//! let mut p = Policy::default();
//! assert_eq!(p.validate(), Ok(()));
//! p.aggressiveness = 7;
//! assert_eq!(
//!     p.validate().unwrap_err().to_string(),
//!     "aggressiveness = 7 is out of range: allowed 1..=5"
//! );
//! ```

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// How far the loop may act on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AutomationLevel {
    /// Plans are proposals only; an operator applies (`POST /v1/plans/{id}/apply`) or rejects them.
    #[default]
    Manual,
    /// Placements and plans that move no running VM (a host powered on for capacity, an empty host
    /// powered off) are applied at once; plans with migrations wait for approval.
    Partial,
    /// Plans are applied as soon as they are made (unless the preview vetoes them).
    Full,
}

/// The overload detector (Beloglazov & Buyya 2012), as `tern sim --policy` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DetectorKind {
    /// Static threshold: overloaded above `parameter` (0.1..=1.0).
    Thr,
    /// Interquartile range, safety parameter 0..=5.
    Iqr,
    /// Median absolute deviation, safety parameter 0..=5.
    Mad,
    /// Local regression, safety parameter 0.5..=2.0 (the paper's best: 1.2).
    #[default]
    Lr,
    /// Robust local regression, safety parameter 0.5..=2.0.
    Lrr,
}

impl DetectorKind {
    /// The name `tern sim` uses (`lr`).
    pub fn name(self) -> &'static str {
        match self {
            DetectorKind::Thr => "thr",
            DetectorKind::Iqr => "iqr",
            DetectorKind::Mad => "mad",
            DetectorKind::Lr => "lr",
            DetectorKind::Lrr => "lrr",
        }
    }

    /// The allowed range of the detector's parameter, inclusive.
    pub fn parameter_range(self) -> (f64, f64) {
        match self {
            DetectorKind::Thr => (0.1, 1.0),
            DetectorKind::Iqr | DetectorKind::Mad => (0.0, 5.0),
            DetectorKind::Lr | DetectorKind::Lrr => (0.5, 2.0),
        }
    }
}

/// Which VM leaves an overloaded host first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SelectionKind {
    /// Minimum migration time (predicted from memory and dirty rate when known).
    #[default]
    Mmt,
    /// Random (seeded).
    Rs,
    /// Maximum correlation with the host's other VMs.
    Mc,
    /// Minimum utilisation.
    Mu,
}

impl SelectionKind {
    /// The name `tern sim` uses (`mmt`).
    pub fn name(self) -> &'static str {
        match self {
            SelectionKind::Mmt => "mmt",
            SelectionKind::Rs => "rs",
            SelectionKind::Mc => "mc",
            SelectionKind::Mu => "mu",
        }
    }
}

/// Host power management (DPM style): power drained hosts off, power hosts on when capacity is short.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PowerPolicy {
    /// Whether the loop powers hosts off and on at all.
    pub enabled: bool,
    /// Powered-on empty hosts kept beyond need (0..=1000), on top of the HA reserve.
    pub spare_hosts: u32,
    /// A drained host stays empty this long before it is powered off, seconds (0..=86400).
    pub off_hold_s: u32,
    /// Capacity stays short this long before a host is powered on, seconds (0..=86400).
    pub on_hold_s: u32,
}

impl Default for PowerPolicy {
    fn default() -> Self {
        PowerPolicy {
            enabled: true,
            spare_hosts: 0,
            off_hold_s: 60,
            on_hold_s: 10,
        }
    }
}

/// `GET|PUT /v1/policy`: the automation loop's knobs. A PUT carries every field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// How far the loop acts on its own.
    pub automation: AutomationLevel,
    /// 1 (only relieve overloads) ..= 5 (consolidate eagerly); the thresholds each level sets are
    /// tabled in docs/automation.md.
    pub aggressiveness: u8,
    /// The loop's period, seconds (2..=3600).
    pub interval_s: u32,
    /// Overload detector.
    pub detector: DetectorKind,
    /// VM selection on overloaded hosts.
    pub selection: SelectionKind,
    /// The detector's parameter (range per detector: [`DetectorKind::parameter_range`]).
    pub parameter: f64,
    /// A host must stay over- or under-loaded this long before a plan acts on it, seconds (0..=86400).
    pub hold_s: u32,
    /// A consolidation plan must cut predicted energy by at least this much, percent (0..=100);
    /// relieving an overload needs no margin.
    pub min_improvement_pct: f64,
    /// After a move a VM stays put this long, seconds (0..=86400); doubled on each further move
    /// within 4 × cooldown, at most 16 ×.
    pub cooldown_s: u32,
    /// Migrations the loop may have running at once (1..=64).
    pub max_migrations: u32,
    /// Host power management.
    pub power: PowerPolicy,
    /// A move predicted not to converge by pre-copy is planned with post-copy (after
    /// [`POST_COPY_FALLBACK_AFTER_ROUNDS`] rounds) when post-copy is predicted to finish it,
    /// instead of being held back. Off by default: after the switch a lost link loses the VM
    /// (the cluster restarts it from its disk). Absent in a policy stored by an older
    /// controller: off.
    #[serde(default)]
    pub post_copy_fallback: bool,
}

/// The pre-copy rounds before the switch of a move [`Policy::post_copy_fallback`] plans with
/// post-copy: the full copy alone. Such a move is one pre-copy would not finish (its guest
/// dirties pages faster than rounds carry them, or the full copy alone nearly fills the
/// timeout), so a further round would re-send pages that are owed again by its end — and the
/// timeout, checked after each round, could abandon the move before a later switch.
pub const POST_COPY_FALLBACK_AFTER_ROUNDS: u32 = 1;

impl Default for Policy {
    fn default() -> Self {
        Policy {
            automation: AutomationLevel::Manual,
            aggressiveness: 3,
            interval_s: 10,
            detector: DetectorKind::Lr,
            selection: SelectionKind::Mmt,
            parameter: 1.2,
            hold_s: 30,
            min_improvement_pct: 5.0,
            cooldown_s: 120,
            max_migrations: 2,
            power: PowerPolicy::default(),
            post_copy_fallback: false,
        }
    }
}

/// Why a [`Policy`] is refused: the field, the value given and what is allowed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyError {
    /// A number outside its range.
    #[error("{field} = {value} is out of range: allowed {min}..={max}")]
    Range {
        /// The field (`power.off_hold_s` for nested ones).
        field: &'static str,
        /// The value given.
        value: f64,
        /// The least allowed.
        min: f64,
        /// The most allowed.
        max: f64,
    },
    /// The detector's parameter outside that detector's range.
    #[error("parameter = {value} is out of range for detector {detector}: allowed {min}..={max}")]
    Parameter {
        /// The detector's name.
        detector: &'static str,
        /// The value given.
        value: f64,
        /// The least allowed.
        min: f64,
        /// The most allowed.
        max: f64,
    },
}

/// Least loop period, seconds.
pub const MIN_INTERVAL_S: u32 = 2;
/// Longest loop period, seconds.
pub const MAX_INTERVAL_S: u32 = 3600;
/// Longest hold, cooldown or power hold, seconds (a day).
pub const MAX_HOLD_S: u32 = 86_400;
/// Most concurrent migrations the loop may start.
pub const MAX_MIGRATIONS: u32 = 64;
/// Most spare hosts.
pub const MAX_SPARE_HOSTS: u32 = 1000;

fn range(field: &'static str, value: f64, min: f64, max: f64) -> Result<(), PolicyError> {
    // `!(a <= b)` also refuses NaN.
    if !(min <= value && value <= max) {
        return Err(PolicyError::Range {
            field,
            value,
            min,
            max,
        });
    }
    Ok(())
}

impl Policy {
    /// Checks every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), PolicyError> {
        range("aggressiveness", f64::from(self.aggressiveness), 1.0, 5.0)?;
        range(
            "interval_s",
            f64::from(self.interval_s),
            f64::from(MIN_INTERVAL_S),
            f64::from(MAX_INTERVAL_S),
        )?;
        let (min, max) = self.detector.parameter_range();
        if !(min <= self.parameter && self.parameter <= max) {
            return Err(PolicyError::Parameter {
                detector: self.detector.name(),
                value: self.parameter,
                min,
                max,
            });
        }
        let hold = f64::from(MAX_HOLD_S);
        range("hold_s", f64::from(self.hold_s), 0.0, hold)?;
        range("min_improvement_pct", self.min_improvement_pct, 0.0, 100.0)?;
        range("cooldown_s", f64::from(self.cooldown_s), 0.0, hold)?;
        range(
            "max_migrations",
            f64::from(self.max_migrations),
            1.0,
            f64::from(MAX_MIGRATIONS),
        )?;
        range(
            "power.spare_hosts",
            f64::from(self.power.spare_hosts),
            0.0,
            f64::from(MAX_SPARE_HOSTS),
        )?;
        range(
            "power.off_hold_s",
            f64::from(self.power.off_hold_s),
            0.0,
            hold,
        )?;
        range(
            "power.on_hold_s",
            f64::from(self.power.on_hold_s),
            0.0,
            hold,
        )?;
        Ok(())
    }
}

/// Where a plan stands.
///
/// ```text
/// proposed ──apply──▶ applying ──▶ applied | failed
///    ├──reject──▶ rejected
///    ├──(cluster changed under it)──▶ superseded
///    └──(preview or migration model says harmful)──▶ vetoed
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PlanState {
    /// Waiting for approval (manual, partial) or about to be applied (full).
    Proposed,
    /// Its actions are being carried out.
    Applying,
    /// Every action done.
    Applied,
    /// Refused by an operator.
    Rejected,
    /// The cluster changed since it was computed; it was not (or no longer) applied.
    Superseded,
    /// An action failed; the rest were not started.
    Failed,
    /// Predicted to do harm (worse than doing nothing, or a move that would not converge); never
    /// applied. `detail` says why.
    Vetoed,
}

impl PlanState {
    /// Whether the plan will change no more.
    pub fn is_final(self) -> bool {
        !matches!(self, PlanState::Proposed | PlanState::Applying)
    }

    /// The name used on the wire (`superseded`).
    pub fn name(self) -> &'static str {
        match self {
            PlanState::Proposed => "proposed",
            PlanState::Applying => "applying",
            PlanState::Applied => "applied",
            PlanState::Rejected => "rejected",
            PlanState::Superseded => "superseded",
            PlanState::Failed => "failed",
            PlanState::Vetoed => "vetoed",
        }
    }
}

/// Where one action of a plan stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ActionStatus {
    /// Not started.
    #[default]
    Pending,
    /// Started; its outcome is awaited.
    Running,
    /// Done.
    Done,
    /// Tried and failed.
    Failed,
    /// Not started because the plan stopped (failed or superseded) before it.
    Skipped,
}

/// A migration's predicted cost (the migration policy's model, from memory, dirty rate and bandwidth).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrationPrediction {
    /// Total time, seconds.
    pub time_s: f64,
    /// Bytes sent.
    pub bytes: u64,
    /// Downtime (the final pause), milliseconds.
    pub downtime_ms: f64,
    /// Whether the pre-copy rounds converge within the downtime budget.
    pub converges: bool,
}

/// A migration's measured cost, once done.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrationActual {
    /// Total time, seconds.
    pub time_s: f64,
    /// Bytes sent.
    pub bytes: u64,
    /// Downtime, milliseconds.
    pub downtime_ms: f64,
}

/// One step of a plan, with its reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PlanAction {
    /// Move a VM live.
    Migrate {
        /// The VM.
        vm: String,
        /// Where it runs.
        from: String,
        /// Where it goes.
        to: String,
        /// Why: `overloaded host h1`, `under-loaded host h2 drained`, ...
        reason: String,
        /// The predicted cost, if a model was available.
        predicted: Option<MigrationPrediction>,
        /// The measured cost, once done.
        actual: Option<MigrationActual>,
        /// Where this step stands.
        #[serde(default)]
        status: ActionStatus,
        /// Moved with post-copy after this many pre-copy rounds ([`Policy::post_copy_fallback`]);
        /// absent: pre-copy only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        post_copy_after: Option<u32>,
    },
    /// Power a host off (it is empty).
    PowerOff {
        /// The host.
        host: String,
        /// Why: `drained; 1 spare host kept`.
        reason: String,
        /// Where this step stands.
        #[serde(default)]
        status: ActionStatus,
    },
    /// Power a host on.
    PowerOn {
        /// The host.
        host: String,
        /// Why: `capacity short for 20 s`.
        reason: String,
        /// Where this step stands.
        #[serde(default)]
        status: ActionStatus,
    },
}

impl PlanAction {
    /// Where this step stands.
    pub fn status(&self) -> ActionStatus {
        match self {
            PlanAction::Migrate { status, .. }
            | PlanAction::PowerOff { status, .. }
            | PlanAction::PowerOn { status, .. } => *status,
        }
    }

    /// The step's reason.
    pub fn reason(&self) -> &str {
        match self {
            PlanAction::Migrate { reason, .. }
            | PlanAction::PowerOff { reason, .. }
            | PlanAction::PowerOn { reason, .. } => reason,
        }
    }
}

/// Predicted figures over the preview's horizon (the simulator's model).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PredictedOutcome {
    /// Energy of the hosts, kWh (SPECpower models, parked cores counted).
    pub energy_kwh: f64,
    /// Time hosts spent at 100 % CPU over their active time, percent.
    pub slatah_pct: f64,
    /// CPU lost to migrations over CPU requested, percent.
    pub pdm_pct: f64,
    /// Hosts powered on at the end of the horizon.
    pub hosts_on: u32,
}

/// A plan's preview: the same cluster run forward with and without it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PlanEffect {
    /// How far ahead, seconds.
    pub horizon_s: u64,
    /// With the plan applied.
    pub with: PredictedOutcome,
    /// Doing nothing.
    pub without: PredictedOutcome,
}

/// `GET /v1/plans/{id}`: what one round of the loop decided.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Plan {
    /// Its id (rising).
    pub id: u64,
    /// Where it stands.
    pub state: PlanState,
    /// When it was made, ms on the controller's clock.
    pub created_ms: u64,
    /// When it reached a final state, if it has.
    #[serde(default)]
    pub finished_ms: Option<u64>,
    /// The automation level it was made under.
    pub automation: AutomationLevel,
    /// The cluster version it was computed on; the plan is superseded once the cluster moves on.
    pub basis: u64,
    /// Why, in one sentence.
    pub reason: String,
    /// The steps, in the order they are carried out.
    pub actions: Vec<PlanAction>,
    /// The predicted effect, when previewed.
    pub effect: Option<PlanEffect>,
    /// Why it failed, was vetoed or superseded.
    pub detail: Option<String>,
}

/// A host's power state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HostPower {
    /// Powered on.
    #[default]
    On,
    /// A power-off was asked and is under way.
    PoweringOff,
    /// Powered off.
    Off,
    /// A power-on was asked and is under way.
    PoweringOn,
    /// It did not come up after a power-on; not chosen again until an operator clears it.
    FailedToWake,
}

/// One point of `GET /v1/stats/series`: the cluster at the end of a loop interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SeriesPoint {
    /// When, ms on the controller's clock.
    pub t_ms: u64,
    /// Hosts powered on.
    pub hosts_on: u32,
    /// Modelled power of the hosts, W.
    pub power_w: f64,
    /// Modelled energy since the series began, kWh.
    pub energy_kwh: f64,
    /// SLATAH since the series began, percent.
    pub slatah_pct: f64,
    /// VMs known.
    pub vms: u32,
}

/// `GET /v1/stats/series`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StatsSeries {
    /// The loop's period, seconds.
    pub interval_s: u32,
    /// Oldest first.
    pub points: Vec<SeriesPoint>,
}

/// One VM's history point in a round: the mean of its utilisation samples since the round
/// before, 0..1 of its vCPUs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RoundPoint {
    pub vm: String,
    pub utilization: f64,
}

/// One round of the automation loop: when it ran, the load it decided on, and what it found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AutomationRound {
    /// When it ran, ms on the controller's clock.
    pub at_ms: u64,
    /// The history point each VM got (a VM with no sample since the round before is left out),
    /// by VM name.
    pub points: Vec<RoundPoint>,
    /// Hosts the detector found overloaded.
    pub overloaded: Vec<String>,
    /// Hosts the round's plan drained.
    pub drained: Vec<String>,
    /// The plan the round made, if any.
    pub plan: Option<u64>,
}

/// `GET /v1/automation/rounds`: the leader's most recent rounds since it took office, oldest
/// first (at most 256).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AutomationRounds {
    /// The controller's clock when it answered, ms (to place `at_ms` on the caller's clock).
    pub now_ms: u64,
    /// The loop's period, seconds.
    pub interval_s: u32,
    pub rounds: Vec<AutomationRound>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_policy_is_valid_and_round_trips() {
        let p = Policy::default();
        assert_eq!(p.validate(), Ok(()));
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<Policy>(&json).unwrap(), p);
        assert!(json.contains(r#""automation":"manual""#), "{json}");
        assert!(json.contains(r#""detector":"lr""#), "{json}");
    }

    #[test]
    fn a_float_survives_an_encode_and_decode_bit_for_bit() {
        // The shortest decimal of this value is one that a fast, inexact float parser reads
        // back one unit in the last place off: a policy stored in etcd would drift on each
        // read and write. (Found by the cluster_api fuzz target.)
        let p = Policy {
            min_improvement_pct: 4.444444444444445e63,
            parameter: 0.1 + 0.2,
            ..Policy::default()
        };
        let json = serde_json::to_string(&p).unwrap();
        let back: Policy = serde_json::from_str(&json).unwrap();
        assert_eq!(
            back.min_improvement_pct.to_bits(),
            p.min_improvement_pct.to_bits()
        );
        assert_eq!(back.parameter.to_bits(), p.parameter.to_bits());
        assert_eq!(serde_json::to_string(&back).unwrap(), json);
    }

    #[test]
    fn each_bad_field_is_named_with_its_range() {
        type Case = (fn(&mut Policy), &'static str);
        let cases: Vec<Case> = vec![
            (
                |p| p.aggressiveness = 0,
                "aggressiveness = 0 is out of range: allowed 1..=5",
            ),
            (
                |p| p.interval_s = 1,
                "interval_s = 1 is out of range: allowed 2..=3600",
            ),
            (
                |p| p.parameter = 3.0,
                "parameter = 3 is out of range for detector lr: allowed 0.5..=2",
            ),
            (
                |p| {
                    p.detector = DetectorKind::Thr;
                    p.parameter = 1.2;
                },
                "parameter = 1.2 is out of range for detector thr: allowed 0.1..=1",
            ),
            (
                |p| p.parameter = f64::NAN,
                "parameter = NaN is out of range for detector lr: allowed 0.5..=2",
            ),
            (
                |p| p.hold_s = 100_000,
                "hold_s = 100000 is out of range: allowed 0..=86400",
            ),
            (
                |p| p.min_improvement_pct = -1.0,
                "min_improvement_pct = -1 is out of range: allowed 0..=100",
            ),
            (
                |p| p.cooldown_s = 86_401,
                "cooldown_s = 86401 is out of range: allowed 0..=86400",
            ),
            (
                |p| p.max_migrations = 0,
                "max_migrations = 0 is out of range: allowed 1..=64",
            ),
            (
                |p| p.power.spare_hosts = 1001,
                "power.spare_hosts = 1001 is out of range: allowed 0..=1000",
            ),
            (
                |p| p.power.off_hold_s = 90_000,
                "power.off_hold_s = 90000 is out of range: allowed 0..=86400",
            ),
            (
                |p| p.power.on_hold_s = 90_000,
                "power.on_hold_s = 90000 is out of range: allowed 0..=86400",
            ),
        ];
        for (bad, msg) in cases {
            let mut p = Policy::default();
            bad(&mut p);
            assert_eq!(p.validate().unwrap_err().to_string(), msg);
        }
    }

    #[test]
    fn a_policy_must_be_whole_and_known_fields_only() {
        let mut v = serde_json::to_value(Policy::default()).unwrap();
        v["colour"] = "red".into();
        assert!(serde_json::from_value::<Policy>(v).is_err());
        let mut v = serde_json::to_value(Policy::default()).unwrap();
        v.as_object_mut().unwrap().remove("hold_s");
        let e = serde_json::from_value::<Policy>(v).unwrap_err().to_string();
        assert!(e.contains("hold_s"), "{e}");
        let mut v = serde_json::to_value(Policy::default()).unwrap();
        v["automation"] = "sometimes".into();
        assert!(serde_json::from_value::<Policy>(v).is_err());
    }

    #[test]
    fn the_post_copy_fallback_is_off_by_default_and_a_boolean() {
        let p = Policy::default();
        assert!(!p.post_copy_fallback);
        // A policy stored before the knob existed reads as off.
        let mut v = serde_json::to_value(&p).unwrap();
        v.as_object_mut().unwrap().remove("post_copy_fallback");
        assert_eq!(serde_json::from_value::<Policy>(v).unwrap(), p);
        // On: valid, and kept through a round trip.
        let on = Policy {
            post_copy_fallback: true,
            ..Policy::default()
        };
        assert_eq!(on.validate(), Ok(()));
        let v = serde_json::to_value(&on).unwrap();
        assert_eq!(v["post_copy_fallback"], true);
        assert_eq!(serde_json::from_value::<Policy>(v).unwrap(), on);
        // Anything but a boolean is refused.
        for bad in [
            serde_json::json!(1),
            serde_json::json!("yes"),
            serde_json::json!(null),
        ] {
            let mut v = serde_json::to_value(&p).unwrap();
            v["post_copy_fallback"] = bad.clone();
            assert!(serde_json::from_value::<Policy>(v).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_plan_serialises_as_the_contract_shows() {
        let plan = Plan {
            id: 7,
            state: PlanState::Proposed,
            created_ms: 1234567,
            finished_ms: None,
            automation: AutomationLevel::Manual,
            basis: 42,
            reason: "host h2 under-loaded: drained to power it off".into(),
            actions: vec![
                PlanAction::Migrate {
                    vm: "vm-3".into(),
                    from: "h2".into(),
                    to: "h1".into(),
                    reason: "under-loaded host h2 drained".into(),
                    predicted: Some(MigrationPrediction {
                        time_s: 1.9,
                        bytes: 71303168,
                        downtime_ms: 31.0,
                        converges: true,
                    }),
                    actual: None,
                    status: ActionStatus::Pending,
                    post_copy_after: None,
                },
                PlanAction::PowerOff {
                    host: "h2".into(),
                    reason: "drained; 1 spare host kept".into(),
                    status: ActionStatus::Pending,
                },
            ],
            effect: None,
            detail: None,
        };
        let v = serde_json::to_value(&plan).unwrap();
        assert_eq!(v["state"], "proposed");
        assert_eq!(v["actions"][0]["kind"], "migrate");
        assert_eq!(v["actions"][0]["predicted"]["converges"], true);
        // A pre-copy move leaves post_copy_after out, as a plan stored before it existed.
        assert!(v["actions"][0].get("post_copy_after").is_none(), "{v}");
        assert_eq!(v["actions"][1]["kind"], "power_off");
        assert_eq!(v["actions"][1]["status"], "pending");
        let back: Plan = serde_json::from_value(v).unwrap();
        assert_eq!(back, plan);
    }

    #[test]
    fn host_info_from_an_older_controller_still_parses() {
        let old = r#"{"name":"h1","state":"up","maintenance":false,
            "capacity":{"cores":2,"memory_mib":4096,"power_model":"hp-ml110-g5",
                        "volume_node":null,"volume_node_id":null},
            "agent_url":"http://10.77.0.11:7000","vms":[],"vcpus_used":0,
            "memory_mib_used":0,"cpu_utilization":null}"#;
        let h: crate::cluster::HostInfo = serde_json::from_str(old).unwrap();
        assert_eq!(h.power, HostPower::On);
        assert_eq!(h.parked_cores, None);
        let mut v = serde_json::to_value(&h).unwrap();
        v["power"] = "failed_to_wake".into();
        v["parked_cores"] = 1.into();
        let h: crate::cluster::HostInfo = serde_json::from_value(v).unwrap();
        assert_eq!(h.power, HostPower::FailedToWake);
        assert_eq!(h.parked_cores, Some(1));
    }

    #[test]
    fn plan_states_and_power_states_use_snake_case() {
        for s in [
            PlanState::Proposed,
            PlanState::Applying,
            PlanState::Applied,
            PlanState::Rejected,
            PlanState::Superseded,
            PlanState::Failed,
            PlanState::Vetoed,
        ] {
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.name())
            );
        }
        assert_eq!(
            serde_json::to_string(&HostPower::FailedToWake).unwrap(),
            r#""failed_to_wake""#
        );
        assert_eq!(
            serde_json::to_string(&HostPower::PoweringOn).unwrap(),
            r#""powering_on""#
        );
    }
}
