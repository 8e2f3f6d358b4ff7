//! Fuzz target: the migration sender reading the target's answers — frames from the control
//! stream decoded as `tcp/send.rs` decodes them (`read_frame`, no layout) and fed to
//! `machine::sender::Sender::heard`, with the sender stepping through its phases as the shell
//! would (welcome → round 0 → acknowledged rounds → pause → commit → running).
//!
//! Input: `[rounds: u8]` (pre-copy rounds before the switch-over, low 3 bits), then frames as
//! `tern_fuzz::next_frame` reads them. Properties: no panic; the migration completes only after
//! a `Running` answer that follows a commit; the outcome agrees with what the source VM does.

#![no_main]

use std::io::Cursor;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tern_migration::machine::sender::{Ending, FailureAction, Heard, Sender, SenderPhase};
use tern_migration::wire::read_frame;
use tern_migration::{ConvergenceConfig, Outcome};

fuzz_target!(|data: &[u8]| {
    let Some((&script, mut rest)) = data.split_first() else {
        return;
    };
    let mut rounds_left = script & 7;
    let mut s = Sender::new(ConvergenceConfig::default());
    let mut now = Duration::ZERO;
    let mut ending = Ending::LinkLost;
    while let Some(bytes) = tern_fuzz::next_frame(&mut rest) {
        now += Duration::from_millis(3);
        let Ok(frame) = read_frame(&mut Cursor::new(bytes), None) else {
            break;
        };
        let before = s.phase();
        match s.heard(now, frame) {
            Ok(Heard::Welcomed(_)) => {
                s.accepted(now).expect("welcomed in the handshake");
                s.dirty_log_armed().expect("armed in pre-copy");
                s.sent(1 << 20, Duration::from_millis(2))
                    .expect("sending in pre-copy");
                s.round_end_sent().expect("round 0 ends in pre-copy");
            }
            Ok(Heard::RoundAcked(round)) => {
                assert_eq!(before, SenderPhase::PreCopy, "a round ack outside pre-copy");
                assert_eq!(round, s.round(), "acknowledged a round not awaited");
                if rounds_left > 0 {
                    rounds_left -= 1;
                    // Much still dirty: keep copying (or throttle), unless the policy gives up.
                    let _ = s.synced(now, 64 << 20);
                    if s.phase() == SenderPhase::PreCopy {
                        let _ = s.sent(1 << 20, Duration::from_millis(2));
                        let _ = s.round_end_sent();
                    }
                } else {
                    let _ = s.synced(now, 4096);
                    if s.paused(now).is_ok() {
                        s.state_saved().expect("state saved once, paused");
                        s.storage_released()
                            .expect("storage released after the state");
                        s.commit_sent().expect("commit after the storage");
                    }
                }
            }
            Ok(Heard::Running(_)) => {
                assert_eq!(
                    before,
                    SenderPhase::AwaitingAck,
                    "running before the commit"
                );
                ending = Ending::Completed;
                break;
            }
            Err(_answer) => {
                ending = Ending::Failed;
                break;
            }
        }
    }
    if ending == Ending::LinkLost && s.phase() == SenderPhase::AwaitingAck {
        ending = Ending::NoAnswer;
    }
    let was = s.phase();
    let cleanup = s.finish(ending);
    match cleanup.outcome {
        Outcome::Completed => assert_eq!(was, SenderPhase::Completed),
        Outcome::InDoubt => assert!(
            matches!(cleanup.action, Some(FailureAction::InDoubt)),
            "in doubt, yet the source acts: {:?}",
            cleanup.action
        ),
        _ => assert!(
            !matches!(cleanup.action, Some(FailureAction::InDoubt)),
            "a definite outcome with an undecided source"
        ),
    }
});
