//! Fuzz target: the migration receiver — frames as the target reads them from the source on the
//! control and data streams, decoded as `tcp/recv.rs` decodes them (a `PageData` frame refused
//! below the version that defines it) and fed to `machine::receiver::Receiver` in arrival
//! order, a decoded `PageData` frame's pages that do not match their checksums included.
//!
//! Input: records `[connection: u8] [frame]`, `frame` as `tern_fuzz::next_frame` reads it
//! (`[0x80|kind][len u16][payload]` sealed, or raw frame bytes). Connection 0 is the control
//! stream; connection k ≥ 1 is the k-th data connection, whose first frame must join it.
//! Properties: no panic; every page the receiver hands out to be written lies inside the agreed
//! memory layout; a commit happens only after every announced stream ended.

#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use tern_migration::machine::receiver::{Failure, Receiver, ReceiverPhase, Step};
use tern_migration::wire::{FrameKind, MemoryDigest, decode};
use tern_migration::{PAGE_SIZE, StreamName};

fuzz_target!(|data: &[u8]| {
    let target = tern_fuzz::migration_target_vm();
    let mut rx = Receiver::new();
    let mut rest = data;
    let mut control_open = false;
    // Data connection → its stream index, once joined.
    let mut joined: HashMap<u8, u16> = HashMap::new();
    while let Some(&conn) = rest.first() {
        rest = &rest[1..];
        let Some(bytes) = tern_fuzz::next_frame(&mut rest) else {
            break;
        };
        // Control frames after the welcome and data frames after a join are decoded against
        // the agreed layout; the first frame of every connection without one.
        let first = if conn == 0 {
            !control_open
        } else {
            !joined.contains_key(&conn)
        };
        let layout = if first { None } else { rx.layout().cloned() };
        let page_data = bytes.get(5) == Some(&(FrameKind::PageData as u8));
        let decoded = decode(&bytes, layout.as_ref()).ok();
        let Some((frame, _)) = decoded.filter(|_| !page_data || rx.accepts_page_data()) else {
            // A stream that breaks fails the whole migration.
            rx.failed(Failure::Other);
            break;
        };
        let result = if conn == 0 && first {
            control_open = true;
            match rx.control_opened(frame) {
                Ok(Ok(_)) => {
                    let described = rx.described().cloned().expect("a hello was accepted");
                    let prepared = described
                        .check_compatible(&target)
                        .map_err(|e| e.to_string());
                    rx.prepared(prepared).map(|_| Step::Wait)
                }
                Ok(Err(_refusal)) => break,
                Err(v) => Err(v),
            }
        } else if first {
            if rx.all_joined() && rx.phase() == ReceiverPhase::Receiving {
                // The shell accepts no more data connections once every stream joined.
                continue;
            }
            rx.data_opened(frame).map(|stream| {
                joined.insert(conn, stream);
                Step::Wait
            })
        } else if conn == 0 {
            rx.frame(StreamName::Control, frame)
        } else {
            rx.frame(StreamName::Data(joined[&conn]), frame)
        };
        match result {
            Ok(Step::Apply(batch)) => {
                let layout = rx.layout().expect("pages only arrive after the welcome");
                for (gpa, _) in batch.iter() {
                    assert!(
                        layout.contains_range(gpa, PAGE_SIZE),
                        "page {gpa:#x} outside the agreed layout"
                    );
                }
            }
            Ok(Step::Aborted(_)) => break,
            Ok(Step::ChecksumFailed(_)) => {
                rx.failed(Failure::Other);
                break;
            }
            Ok(Step::AckRound(_) | Step::Wait) => {}
            Err(_violation) => {
                rx.failed(Failure::Other);
                break;
            }
        }
        if rx.ready_to_commit() {
            assert!(rx.all_ended(), "commit before every stream ended");
            let layout = rx.layout().cloned().expect("agreed layout");
            match rx.commit(None) {
                Ok(work) => {
                    if let Some(want) = work.digest {
                        let got = MemoryDigest::of_memory(&layout, want.chunk_bytes, |_, buf| {
                            buf.fill(0);
                            Ok::<(), ()>(())
                        })
                        .expect("reading zeroes cannot fail");
                        let _ = want.first_difference(&got);
                    }
                    rx.committed(true).expect("a commit in progress completes");
                }
                Err(_) => {
                    rx.failed(Failure::Other);
                }
            }
            break;
        }
    }
});
