//! The parking knobs (the Windows core-parking setting set), their validation, and power-plan files.
//!
//! Every knob has a snake_case name and, where Windows has one, its `powercfg` alias
//! (`CPMINCORES`, …); both are accepted case-insensitively by [`Knobs::set`].

use serde::{Deserialize, Serialize};

/// The knobs of the parking policy. Percentages are whole percent (0–100); times are counted in
/// check intervals, as Windows counts them. Serialised (status JSON) under the names
/// [`Knobs::set`] and plan files take: `headroom`, not `headroom_pct`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Knobs {
    /// Minimum share of logical CPUs (per NUMA node) kept unparked, % (CPMINCORES). 100 disables parking.
    #[serde(rename = "min_cores")]
    pub min_cores_pct: u32,
    /// Maximum share of logical CPUs (per NUMA node) unparked, % (CPMAXCORES).
    #[serde(rename = "max_cores")]
    pub max_cores_pct: u32,
    /// Mean busy % of the unparked CPUs above which more are unparked (increase threshold).
    #[serde(rename = "increase_threshold")]
    pub increase_threshold_pct: u32,
    /// Mean busy % of the unparked CPUs below which one may be parked (decrease threshold).
    #[serde(rename = "decrease_threshold")]
    pub decrease_threshold_pct: u32,
    /// Check intervals that must pass after a change before more CPUs may be unparked (CPINCREASETIME).
    pub increase_time: u32,
    /// Check intervals of sustained low load, and since the last change, before a CPU is parked
    /// (CPDECREASETIME).
    pub decrease_time: u32,
    /// % of time that must have had at most N CPUs busy for the concurrency to count as N (CPCONCURRENCY).
    #[serde(rename = "concurrency")]
    pub concurrency_pct: u32,
    /// If the least busy unparked CPU is busier than this %, one more is unparked (CPHEADROOM).
    #[serde(rename = "headroom")]
    pub headroom_pct: u32,
    /// Target busy % per unparked CPU used to size the set from the demand (CPDISTRIBUTION).
    #[serde(rename = "distribution")]
    pub distribution_pct: u32,
    /// A CPU busier than this % counts as over-utilised and forces an unpark (over-utilisation threshold).
    #[serde(rename = "over_utilisation")]
    pub over_utilisation_pct: u32,
    /// The check interval, in milliseconds (PERFCHECK).
    pub interval_ms: u32,
}

/// A named starting point, like a Windows power plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Plan {
    /// Windows "Balanced" values (min 4 %, increase 3, decrease 10 intervals, headroom 50 %).
    Balanced,
    /// "High performance": never parks (min 100 %), slow to park if lowered.
    HighPerformance,
    /// Windows "Power saver" values: it reacts in 1 interval up and 2 down, but its min cores of
    /// 100 % disables parking (as Windows does); lower `min_cores` to use its timings.
    PowerSaver,
}

impl Plan {
    /// Parses a plan name (`balanced`, `high-performance`, `power-saver`).
    pub fn parse(name: &str) -> Result<Plan, KnobError> {
        match name.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "balanced" => Ok(Plan::Balanced),
            "high-performance" | "highperformance" | "performance" => Ok(Plan::HighPerformance),
            "power-saver" | "powersaver" | "saver" => Ok(Plan::PowerSaver),
            _ => Err(KnobError::UnknownPlan(name.to_string())),
        }
    }

    /// The knob values of this plan.
    pub fn knobs(self) -> Knobs {
        let balanced = Knobs {
            min_cores_pct: 4,
            max_cores_pct: 100,
            increase_threshold_pct: 85,
            decrease_threshold_pct: 50,
            increase_time: 3,
            decrease_time: 10,
            concurrency_pct: 95,
            headroom_pct: 50,
            distribution_pct: 90,
            over_utilisation_pct: 85,
            interval_ms: 100,
        };
        match self {
            Plan::Balanced => balanced,
            Plan::HighPerformance => Knobs {
                min_cores_pct: 100,
                increase_time: 7,
                decrease_time: 20,
                over_utilisation_pct: 60,
                ..balanced
            },
            Plan::PowerSaver => Knobs {
                min_cores_pct: 100,
                increase_time: 1,
                decrease_time: 2,
                concurrency_pct: 97,
                headroom_pct: 20,
                over_utilisation_pct: 90,
                ..balanced
            },
        }
    }
}

impl Default for Knobs {
    fn default() -> Self {
        Plan::Balanced.knobs()
    }
}

/// Why a knob assignment or a plan file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KnobError {
    #[error("Unknown knob `{0}` (known: {KNOB_NAMES})")]
    UnknownKnob(String),
    #[error("Knob `{knob}`: `{value}` is not a whole number")]
    NotANumber { knob: String, value: String },
    #[error("Knob `{knob}` = {value} is outside {min}..={max}")]
    OutOfRange {
        knob: &'static str,
        value: u64,
        min: u64,
        max: u64,
    },
    #[error("min_cores ({min} %) is above max_cores ({max} %)")]
    MinAboveMax { min: u32, max: u32 },
    #[error(
        "decrease_threshold ({decrease} %) must be below increase_threshold ({increase} %) for hysteresis"
    )]
    ThresholdsInverted { decrease: u32, increase: u32 },
    #[error("Expected KNOB=VALUE, got `{0}`")]
    NotAnAssignment(String),
    #[error("Unknown plan `{0}` (known: balanced, high-performance, power-saver)")]
    UnknownPlan(String),
    #[error("Plan file line {line}: {source}")]
    PlanFile {
        line: usize,
        #[source]
        source: Box<KnobError>,
    },
}

/// The knob names accepted by [`Knobs::set`], for error messages and `--help`.
pub const KNOB_NAMES: &str = "min_cores, max_cores, increase_threshold, decrease_threshold, \
increase_time, decrease_time, concurrency, headroom, distribution, over_utilisation, interval_ms";

impl Knobs {
    /// Checks every range and the relations between knobs.
    pub fn validate(&self) -> Result<(), KnobError> {
        let pct = |knob: &'static str, value: u32, min: u64| {
            if u64::from(value) < min || value > 100 {
                Err(KnobError::OutOfRange {
                    knob,
                    value: value.into(),
                    min,
                    max: 100,
                })
            } else {
                Ok(())
            }
        };
        pct("min_cores", self.min_cores_pct, 0)?;
        pct("max_cores", self.max_cores_pct, 1)?;
        pct("increase_threshold", self.increase_threshold_pct, 1)?;
        pct("decrease_threshold", self.decrease_threshold_pct, 0)?;
        pct("concurrency", self.concurrency_pct, 1)?;
        pct("headroom", self.headroom_pct, 1)?;
        pct("distribution", self.distribution_pct, 1)?;
        pct("over_utilisation", self.over_utilisation_pct, 1)?;
        let range = |knob: &'static str, value: u32, min: u64, max: u64| {
            if u64::from(value) < min || u64::from(value) > max {
                Err(KnobError::OutOfRange {
                    knob,
                    value: value.into(),
                    min,
                    max,
                })
            } else {
                Ok(())
            }
        };
        range("increase_time", self.increase_time, 0, 10_000)?;
        range("decrease_time", self.decrease_time, 1, 10_000)?;
        range("interval_ms", self.interval_ms, 1, 600_000)?;
        if self.min_cores_pct > self.max_cores_pct {
            return Err(KnobError::MinAboveMax {
                min: self.min_cores_pct,
                max: self.max_cores_pct,
            });
        }
        if self.decrease_threshold_pct >= self.increase_threshold_pct {
            return Err(KnobError::ThresholdsInverted {
                decrease: self.decrease_threshold_pct,
                increase: self.increase_threshold_pct,
            });
        }
        Ok(())
    }

    /// Sets one knob by name or powercfg alias. Does not validate relations between knobs: call
    /// [`Knobs::validate`] after a batch (so `min_cores=50 max_cores=60` can be applied in any order).
    pub fn set(&mut self, knob: &str, value: &str) -> Result<(), KnobError> {
        let key = knob.trim().to_ascii_lowercase().replace('-', "_");
        let slot = match key.as_str() {
            "min_cores" | "cpmincores" => &mut self.min_cores_pct,
            "max_cores" | "cpmaxcores" => &mut self.max_cores_pct,
            "increase_threshold" => &mut self.increase_threshold_pct,
            "decrease_threshold" => &mut self.decrease_threshold_pct,
            "increase_time" | "cpincreasetime" => &mut self.increase_time,
            "decrease_time" | "cpdecreasetime" => &mut self.decrease_time,
            "concurrency" | "cpconcurrency" => &mut self.concurrency_pct,
            "headroom" | "cpheadroom" => &mut self.headroom_pct,
            "distribution" | "cpdistribution" => &mut self.distribution_pct,
            "over_utilisation" | "over_utilization" => &mut self.over_utilisation_pct,
            "interval_ms" | "perfcheck" => &mut self.interval_ms,
            _ => return Err(KnobError::UnknownKnob(knob.to_string())),
        };
        let trimmed = value.trim().trim_end_matches('%').trim();
        *slot = trimmed.parse::<u32>().map_err(|_| KnobError::NotANumber {
            knob: knob.to_string(),
            value: value.to_string(),
        })?;
        Ok(())
    }

    /// Applies `KNOB=VALUE` assignments in order, then validates the result. On error `self` is
    /// left unchanged.
    pub fn apply_assignments<S: AsRef<str>>(&mut self, assignments: &[S]) -> Result<(), KnobError> {
        let mut next = *self;
        for a in assignments {
            let (k, v) = split_assignment(a.as_ref())?;
            next.set(k, v)?;
        }
        next.validate()?;
        *self = next;
        Ok(())
    }

    /// Parses a power-plan file: `key = value` lines, `#` comments, blank lines; an optional
    /// `plan = balanced|high-performance|power-saver` line picks the base (it must come first).
    pub fn from_plan_file(text: &str) -> Result<Knobs, KnobError> {
        let mut knobs = Knobs::default();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let wrap = |e: KnobError| KnobError::PlanFile {
                line: i + 1,
                source: Box::new(e),
            };
            let (k, v) = split_assignment(line).map_err(wrap)?;
            if k.trim().eq_ignore_ascii_case("plan") {
                knobs = Plan::parse(v).map_err(wrap)?.knobs();
            } else {
                knobs.set(k, v).map_err(wrap)?;
            }
        }
        knobs.validate()?;
        Ok(knobs)
    }

    /// Renders the knobs as a plan file that [`Knobs::from_plan_file`] reads back.
    pub fn to_plan_file(&self) -> String {
        format!(
            "min_cores = {}\nmax_cores = {}\nincrease_threshold = {}\ndecrease_threshold = {}\n\
             increase_time = {}\ndecrease_time = {}\nconcurrency = {}\nheadroom = {}\n\
             distribution = {}\nover_utilisation = {}\ninterval_ms = {}\n",
            self.min_cores_pct,
            self.max_cores_pct,
            self.increase_threshold_pct,
            self.decrease_threshold_pct,
            self.increase_time,
            self.decrease_time,
            self.concurrency_pct,
            self.headroom_pct,
            self.distribution_pct,
            self.over_utilisation_pct,
            self.interval_ms
        )
    }
}

fn split_assignment(s: &str) -> Result<(&str, &str), KnobError> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() && !v.trim().is_empty() => Ok((k.trim(), v.trim())),
        _ => Err(KnobError::NotAnAssignment(s.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_plan_is_valid() {
        for plan in [Plan::Balanced, Plan::HighPerformance, Plan::PowerSaver] {
            plan.knobs().validate().unwrap();
        }
    }

    #[test]
    fn bad_values_give_clear_errors() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["min_cores=60", "max_cores=50"],
                "min_cores (60 %) is above max_cores (50 %)",
            ),
            (
                &["headroom=101"],
                "Knob `headroom` = 101 is outside 1..=100",
            ),
            (
                &["interval_ms=0"],
                "Knob `interval_ms` = 0 is outside 1..=600000",
            ),
            (
                &["min_cores=-1"],
                "Knob `min_cores`: `-1` is not a whole number",
            ),
            (&["bogus=1"], "Unknown knob `bogus`"),
            (&["min_cores"], "Expected KNOB=VALUE, got `min_cores`"),
            (
                &["decrease_threshold=90"],
                "decrease_threshold (90 %) must be below increase_threshold (85 %) for hysteresis",
            ),
        ];
        for (input, want) in cases {
            let mut k = Knobs::default();
            let err = k.apply_assignments(input).unwrap_err().to_string();
            assert!(
                err.starts_with(want),
                "{input:?}: got `{err}`, want `{want}`"
            );
            assert_eq!(
                k,
                Knobs::default(),
                "a refused batch must leave knobs unchanged"
            );
        }
    }

    #[test]
    fn aliases_and_order_independence() {
        let mut k = Knobs::default();
        k.apply_assignments(&["CPMAXCORES=60", "CPMINCORES=55", "cpheadroom=30%"])
            .unwrap();
        assert_eq!(
            (k.min_cores_pct, k.max_cores_pct, k.headroom_pct),
            (55, 60, 30)
        );
    }

    /// Regression: `status --json` said `headroom_pct` where `set` takes `headroom`.
    #[test]
    fn json_names_are_the_knob_names() {
        let k = Knobs {
            headroom_pct: 33,
            ..Knobs::default()
        };
        let v = serde_json::to_value(k).unwrap();
        let obj = v.as_object().unwrap();
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        let mut names: Vec<&str> = KNOB_NAMES.split(", ").collect();
        keys.sort_unstable();
        names.sort_unstable();
        assert_eq!(keys, names);
        // Every name read back through `set` gives the same knobs.
        let mut back = Knobs::default();
        for (name, value) in obj {
            back.set(name, &value.to_string()).unwrap();
        }
        assert_eq!(back, k);
        assert_eq!(serde_json::from_value::<Knobs>(v).unwrap(), k);
        assert!(k.to_plan_file().contains("headroom = 33"));
    }

    #[test]
    fn plan_file_round_trips_and_reports_line() {
        let k = Knobs {
            headroom_pct: 33,
            ..Plan::PowerSaver.knobs()
        };
        assert_eq!(Knobs::from_plan_file(&k.to_plan_file()).unwrap(), k);
        let text = "plan = power-saver # base\n\nheadroom = 33\n";
        assert_eq!(Knobs::from_plan_file(text).unwrap(), k);
        let err = Knobs::from_plan_file("plan = balanced\nheadroom = lots\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "Plan file line 2: Knob `headroom`: `lots` is not a whole number"
        );
    }
}
