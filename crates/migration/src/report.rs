//! Progress figures during a migration and the final report (JSON on `--json`).

#![deny(clippy::disallowed_methods)]
use serde::{Deserialize, Serialize};

/// How a migration ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The VM runs on the target; the source may be torn down.
    Completed,
    /// The target refused the handshake (version or configuration).
    Refused,
    /// Cancelled by the operator; the source runs.
    Cancelled,
    /// The timeout passed with `--on-timeout abort`; the source runs.
    TimedOut,
    /// A connection, target or protocol failure; the source runs.
    Failed,
    /// Commit was sent but no answer came: the source stays paused, the target may run.
    InDoubt,
}

impl Outcome {
    /// Whether the source VM is running after this outcome.
    pub fn source_runs(self) -> bool {
        !matches!(self, Outcome::Completed | Outcome::InDoubt)
    }

    /// The exit status of `tern vm migrate`: 0 completed (the VM runs on the target), 3 in
    /// doubt (the source stays paused, an operator decides), 1 for every outcome where the
    /// source runs.
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Completed => 0,
            Outcome::InDoubt => 3,
            Outcome::Refused | Outcome::Cancelled | Outcome::TimedOut | Outcome::Failed => 1,
        }
    }
}

/// Phase shown in progress reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProgressPhase {
    /// Handshake.
    Setup,
    /// Pre-copy rounds.
    PreCopy,
    /// VM paused, last pages and state.
    StopAndCopy,
    /// Waiting for the target's "running".
    Commit,
}

/// A progress snapshot, given to the progress callback after every round and about every
/// 100 ms within a round.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Progress {
    /// Phase.
    pub phase: ProgressPhase,
    /// Round (0 = the full copy).
    pub round: u32,
    /// Bytes written to the streams so far.
    pub bytes_sent: u64,
    /// Bytes still to send in this round plus dirty bytes known.
    pub bytes_remaining: u64,
    /// Dirty rate at the last sync, bytes/s.
    pub dirty_bytes_per_sec: f64,
    /// Bandwidth estimate, bytes/s (0 before the first measurement).
    pub bandwidth_bytes_per_sec: f64,
    /// Expected pause if switching over now, ms (`None` while unknown).
    pub expected_downtime_ms: Option<f64>,
    /// Current throttle, percent.
    pub throttle_pct: f64,
    /// Time since the start, ms.
    pub elapsed_ms: u64,
}

/// The final report of a migration, successful or not.
///
/// Serialises to JSON with exactly the fields `total_ms`, `downtime_ms`, `rounds`,
/// `bytes_sent`, `pages_zero_skipped`, `throttle_max_pct`, `converged`, `outcome`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MigrationReport {
    /// Start of the handshake → end (ack, or source resumed), ms.
    pub total_ms: u64,
    /// Source pause → target "running" ack (or → source resumed on failure), ms; 0 if the
    /// source never paused.
    pub downtime_ms: u64,
    /// Pre-copy rounds plus the stop-and-copy round.
    pub rounds: u32,
    /// Bytes written to all streams, frame headers included.
    pub bytes_sent: u64,
    /// Zero pages not sent at all.
    pub pages_zero_skipped: u64,
    /// Highest throttle applied, percent (e.g. 99.9).
    pub throttle_max_pct: f64,
    /// Whether the switch-over came from the downtime budget (not forced by the timeout).
    pub converged: bool,
    /// How it ended.
    pub outcome: Outcome,
}

impl MigrationReport {
    /// The report as one line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_code_follows_where_the_vm_runs() {
        let all = [
            Outcome::Completed,
            Outcome::Refused,
            Outcome::Cancelled,
            Outcome::TimedOut,
            Outcome::Failed,
            Outcome::InDoubt,
        ];
        let got: String = all
            .iter()
            .map(|o| {
                let name = serde_json::to_string(o).unwrap();
                format!(
                    "{name} exit {} source runs {}\n",
                    o.exit_code(),
                    o.source_runs()
                )
            })
            .collect();
        expect_test::expect![[r#"
            "completed" exit 0 source runs false
            "refused" exit 1 source runs true
            "cancelled" exit 1 source runs true
            "timed_out" exit 1 source runs true
            "failed" exit 1 source runs true
            "in_doubt" exit 3 source runs false
        "#]]
        .assert_eq(&got);
    }

    #[test]
    fn report_json_has_exactly_the_documented_fields() {
        let r = MigrationReport {
            total_ms: 120,
            downtime_ms: 9,
            rounds: 3,
            bytes_sent: 4096,
            pages_zero_skipped: 10,
            throttle_max_pct: 97.5,
            converged: true,
            outcome: Outcome::TimedOut,
        };
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        let mut keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "bytes_sent",
                "converged",
                "downtime_ms",
                "outcome",
                "pages_zero_skipped",
                "rounds",
                "throttle_max_pct",
                "total_ms"
            ]
        );
        assert_eq!(v["outcome"], "timed_out");
        let back: Outcome = serde_json::from_value(v["outcome"].clone()).unwrap();
        assert_eq!(back, Outcome::TimedOut);
        assert_eq!(v["downtime_ms"], 9);
        assert_eq!(v["throttle_max_pct"], 97.5);
    }
}
