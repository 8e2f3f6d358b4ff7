//! Live migration from the client's side: send `migrate`, pass the progress lines on, and read
//! the end as one of four facts about where the VM runs ([`MigrationEnd`]), the contract behind
//! `tern vm migrate`'s exit status 0 / 1 / 3 / 4.
//!
//! | end | exit | the VM |
//! |---|---|---|
//! | `Completed` | 0 | runs on the target; the source VMM has stopped |
//! | `Failed` | 1 | runs here as before (refused, cancelled, timed out, failed, or the VMM could not be asked) |
//! | `InDoubt` | 3 | stays paused here: the commit went out unanswered, the target may run it |
//! | `Lost` | 4 | runs nowhere: post-copy failed after the switch, the target stopped it and the copy here stays paused for good |

use std::path::Path;

use tern_api::vmm::{MigrateRequest, MigrationReport, Outcome, Progress, Request};

use crate::client::{CallError, call_streaming};

/// Where the VM runs after a migration, as the exit status of `tern vm migrate` tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationEnd {
    /// On the target (exit 0).
    Completed,
    /// Here, as before (exit 1).
    Failed,
    /// Paused here, perhaps running on the target (exit 3).
    InDoubt,
    /// Nowhere: post-copy failed after the switch; stopped on the target, paused for good here
    /// (its memory is stale), so only a start from its disks brings it back (exit 4).
    Lost,
}

impl MigrationEnd {
    /// The end an outcome means.
    pub fn of(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Completed => MigrationEnd::Completed,
            Outcome::InDoubt => MigrationEnd::InDoubt,
            Outcome::FailedPostCopy => MigrationEnd::Lost,
            Outcome::Refused | Outcome::Cancelled | Outcome::TimedOut | Outcome::Failed => {
                MigrationEnd::Failed
            }
        }
    }

    /// `tern vm migrate`'s exit status: 0, 1, 3 or 4.
    pub fn exit_code(self) -> u8 {
        match self {
            MigrationEnd::Completed => 0,
            MigrationEnd::Failed => 1,
            MigrationEnd::InDoubt => 3,
            MigrationEnd::Lost => 4,
        }
    }

    /// The end an exit status of `tern vm migrate` means (none, from a signal: failed).
    pub fn from_exit_code(code: Option<i32>) -> Self {
        match code {
            Some(0) => MigrationEnd::Completed,
            Some(3) => MigrationEnd::InDoubt,
            Some(4) => MigrationEnd::Lost,
            _ => MigrationEnd::Failed,
        }
    }
}

/// Why a migration did not complete.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The VMM could not be asked, or the connection broke before its answer; counted as failed
    /// (the VMM refuses a second migration while one runs, so ask it before retrying).
    #[error(transparent)]
    Call(#[from] CallError),
    /// The VMM answered that the migration did not happen; the VM runs here.
    #[error("the migration failed ({}): {reason}", outcome.words())]
    Failed {
        /// How it ended (`failed` when the VMM refused before starting).
        outcome: Outcome,
        /// The VMM's reason.
        reason: String,
        /// The report, when the migration had started.
        report: Option<MigrationReport>,
    },
    /// The commit went out unanswered: the VM stays paused here and the target may run it.
    #[error("the migration is in doubt: {reason}")]
    InDoubt {
        /// The VMM's reason.
        reason: String,
        /// The report.
        report: MigrationReport,
    },
    /// Post-copy failed after the switch (outcome `failed_post_copy`): the target stopped the
    /// guest and the VM stays paused here for good; it is lost.
    #[error("the migration failed in post-copy; the VM is lost: {reason}")]
    Lost {
        /// The VMM's reason.
        reason: String,
        /// The report.
        report: MigrationReport,
    },
    /// The VMM answered success without its report.
    #[error("bad response from the VMM: a completed migration without its report")]
    NoReport,
}

impl MigrateError {
    /// Where the VM runs now.
    pub fn end(&self) -> MigrationEnd {
        match self {
            MigrateError::InDoubt { .. } => MigrationEnd::InDoubt,
            MigrateError::Lost { .. } => MigrationEnd::Lost,
            // A success answer without its report: the VMM stops, the VM runs on the target.
            MigrateError::NoReport => MigrationEnd::Completed,
            MigrateError::Call(_) | MigrateError::Failed { .. } => MigrationEnd::Failed,
        }
    }

    /// The migration's report, when the VMM sent one.
    pub fn report(&self) -> Option<&MigrationReport> {
        match self {
            MigrateError::Failed { report, .. } => report.as_ref(),
            MigrateError::InDoubt { report, .. } | MigrateError::Lost { report, .. } => {
                Some(report)
            }
            MigrateError::Call(_) | MigrateError::NoReport => None,
        }
    }
}

/// Migrates the VM at `sock` as `req` says, giving each progress line to `on_progress`; returns
/// the report once the VM runs on the target (its VMM here then stops). Blocks for the whole
/// migration (no read timeout: the request's own `timeout_s` bounds it).
pub fn migrate(
    sock: &Path,
    req: MigrateRequest,
    on_progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationReport, MigrateError> {
    let resp = call_streaming(sock, &Request::Migrate(req), on_progress)?;
    if resp.ok {
        return resp.report.ok_or(MigrateError::NoReport);
    }
    let reason = resp.error.unwrap_or_else(|| "no reason given".into());
    match resp.report {
        Some(report) if report.outcome == Outcome::InDoubt => {
            Err(MigrateError::InDoubt { reason, report })
        }
        Some(report) if report.outcome == Outcome::FailedPostCopy => {
            Err(MigrateError::Lost { reason, report })
        }
        report => Err(MigrateError::Failed {
            // A report claiming completion on a refusal is no completion: the VM runs here.
            outcome: match report.as_ref().map(|r| r.outcome) {
                None | Some(Outcome::Completed) => Outcome::Failed,
                Some(o) => o,
            },
            reason,
            report,
        }),
    }
}

/// Cancels the migration under way on the VM at `sock` (before its commit).
pub fn cancel(sock: &Path) -> Result<(), crate::ControlError> {
    crate::control::request(sock, &Request::MigrateCancel).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::tests::fake_vmm;

    fn report(outcome: &str) -> String {
        format!(
            r#"{{"total_ms":812,"downtime_ms":9,"rounds":3,"bytes_sent":4096,"pages_zero_skipped":1,"throttle_max_pct":0.0,"converged":true,"outcome":"{outcome}"}}"#
        )
    }

    fn run(lines: Vec<String>) -> (Result<MigrationReport, MigrateError>, Vec<u32>, String) {
        let dir = tempfile::tempdir().unwrap();
        let (sock, h) = fake_vmm(dir.path(), lines);
        let mut rounds = Vec::new();
        let mut req = MigrateRequest::new("10.0.0.2:7000");
        req.disk_successor = Some("2".into());
        let r = migrate(&sock, req, &mut |p| rounds.push(p.round));
        (r, rounds, h.join().unwrap())
    }

    #[test]
    fn a_completed_migration_gives_its_report_after_the_progress() {
        let progress = r#"{"ok":true,"progress":{"phase":"commit","round":4,"bytes_sent":1,"bytes_remaining":0,"dirty_bytes_per_sec":0.0,"bandwidth_bytes_per_sec":0.0,"expected_downtime_ms":2.0,"throttle_pct":0.0,"elapsed_ms":5}}"#;
        let (r, rounds, sent) = run(vec![
            progress.into(),
            format!(r#"{{"ok":true,"report":{}}}"#, report("completed")),
        ]);
        let r = r.unwrap();
        assert_eq!((r.outcome, r.total_ms), (Outcome::Completed, 812));
        assert_eq!(rounds, [4]);
        let sent: serde_json::Value = serde_json::from_str(&sent).unwrap();
        assert_eq!(sent["op"], "migrate");
        assert_eq!(sent["to"], "10.0.0.2:7000");
        assert_eq!(sent["disk_successor"], "2");
    }

    #[test]
    fn each_answer_maps_to_where_the_vm_runs() {
        let cases = [
            (
                format!(
                    r#"{{"ok":false,"error":"refused by the target","report":{}}}"#,
                    report("refused")
                ),
                MigrationEnd::Failed,
                Some(Outcome::Refused),
                "the migration failed (refused): refused by the target",
            ),
            (
                r#"{"ok":false,"error":"a migration is already under way"}"#.to_string(),
                MigrationEnd::Failed,
                None,
                "the migration failed (failed): a migration is already under way",
            ),
            (
                format!(
                    r#"{{"ok":false,"error":"no answer to the commit","report":{}}}"#,
                    report("in_doubt")
                ),
                MigrationEnd::InDoubt,
                Some(Outcome::InDoubt),
                "the migration is in doubt: no answer to the commit",
            ),
            (
                format!(
                    r#"{{"ok":false,"error":"the target stopped answering page requests","report":{}}}"#,
                    report("failed_post_copy")
                ),
                MigrationEnd::Lost,
                Some(Outcome::FailedPostCopy),
                "the migration failed in post-copy; the VM is lost: the target stopped answering page requests",
            ),
            (
                format!(r#"{{"ok":false,"report":{}}}"#, report("completed")),
                MigrationEnd::Failed,
                Some(Outcome::Completed),
                "the migration failed (failed): no reason given",
            ),
        ];
        for (line, end, outcome, text) in cases {
            let (r, _, _) = run(vec![line.clone()]);
            let e = r.unwrap_err();
            assert_eq!(e.end(), end, "{line}");
            assert_eq!(e.report().map(|r| r.outcome), outcome, "{line}");
            assert_eq!(e.to_string(), text);
        }
        let (r, _, _) = run(vec![r#"{"ok":true}"#.into()]);
        assert!(matches!(r, Err(MigrateError::NoReport)));
    }

    #[test]
    fn a_vmm_that_cannot_be_reached_is_a_failed_migration() {
        let e = migrate(
            Path::new("/nonexistent/vm.sock"),
            MigrateRequest::new("h:1"),
            &mut |_| {},
        )
        .unwrap_err();
        assert!(matches!(e, MigrateError::Call(CallError::Connect { .. })));
        assert_eq!(e.end(), MigrationEnd::Failed);
    }

    #[test]
    fn exit_statuses_and_outcomes_agree() {
        for o in [
            Outcome::Completed,
            Outcome::Refused,
            Outcome::Cancelled,
            Outcome::TimedOut,
            Outcome::Failed,
            Outcome::InDoubt,
            Outcome::FailedPostCopy,
        ] {
            let end = MigrationEnd::of(o);
            assert_eq!(end.exit_code(), o.exit_code(), "{o:?}");
            assert_eq!(
                MigrationEnd::from_exit_code(Some(i32::from(end.exit_code()))),
                end
            );
        }
        assert_eq!(
            MigrationEnd::of(Outcome::FailedPostCopy),
            MigrationEnd::Lost
        );
        assert_eq!(MigrationEnd::from_exit_code(None), MigrationEnd::Failed);
        assert_eq!(MigrationEnd::from_exit_code(Some(2)), MigrationEnd::Failed);
    }
}
