//! Fuzz target: the volume control protocol (`tern_volume::control`), both ways. A node decodes
//! a request envelope from any client (`node/exports.rs`: `serde_json::from_slice::<Envelope>`)
//! and the coordinator applies the namespace changes it asks for (`namespace::create`, `delete`,
//! `resize`, `allocate`, `deallocate`) to the volume's metadata; a client decodes a node's reply
//! (`control::decode_reply`) and the typed answer it expects.
//!
//! Input: `[mode: u8]` then JSON. Even mode: a request envelope; odd mode: a reply. Properties:
//! no panic; every accepted namespace change leaves metadata that encodes within a slot and
//! decodes back to itself; a decoded envelope re-encodes to an equal one.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_volume::control::{Envelope, Reply, Request, Response, decode_reply};
use tern_volume::format::{FileEntry, HOLE, LeaseRecord, MAX_PAYLOAD, Metadata};
use tern_volume::namespace;

/// A 64-extent volume (67 MiB) with a thin file `thin` (8 extents, two mapped) and a
/// preallocated one `full` (4 extents).
fn volume() -> (Metadata, u32) {
    let mut m = Metadata {
        seq: 7,
        generation: 3,
        ..Default::default()
    };
    let mut thin = vec![HOLE; 8];
    thin[1] = 10;
    thin[5] = 11;
    m.files.insert(
        "thin".into(),
        FileEntry {
            size: 8 << 20,
            preallocated: false,
            map: thin,
            lease: LeaseRecord::default(),
        },
    );
    m.files.insert(
        "full".into(),
        FileEntry {
            size: 4 << 20,
            preallocated: true,
            map: vec![0, 1, 2, 3],
            lease: LeaseRecord {
                epoch: 2,
                holder: Some(1),
                handover_from: None,
            },
        },
    );
    (m, 64)
}

fn apply(req: &Request) {
    let (m, extents) = volume();
    let change = match req {
        Request::Create {
            name,
            size,
            preallocated,
        } => namespace::create(&m, extents, name, *size, *preallocated),
        Request::Remove { name } => namespace::delete(&m, name),
        Request::Resize { name, size } => namespace::resize(&m, extents, name, *size),
        Request::Allocate { name, logical } => namespace::allocate(&m, extents, name, *logical)
            .and_then(|c| namespace::deallocate(&c.next, name, logical.saturating_sub(1), 2)),
        _ => return,
    };
    let Ok(change) = change else {
        return;
    };
    let next = change.next;
    let payload = next.encode_payload();
    if payload.len() as u64 > MAX_PAYLOAD {
        return; // the coordinator refuses to commit it (store::Volume::commit)
    }
    let back = Metadata::decode_payload(&payload, next.seq, next.generation, extents)
        .expect("a namespace change the coordinator accepts decodes again");
    assert_eq!(back, next, "metadata changed through an encode/decode");
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, json)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        let Ok(env) = serde_json::from_slice::<Envelope>(json) else {
            return;
        };
        let again: Envelope =
            serde_json::from_slice(&serde_json::to_vec(&env).expect("an envelope encodes"))
                .expect("an encoded envelope decodes");
        assert_eq!(again, env);
        apply(&env.request);
    } else {
        let Ok(resp) = decode_reply(json) else {
            return;
        };
        let wire =
            serde_json::to_vec(&Reply::from_result(Ok(resp.clone()))).expect("a reply encodes");
        assert_eq!(decode_reply(&wire).expect("an encoded reply decodes"), resp);
        if let Response::File(f) = resp {
            let _ = f.into_map();
        }
    }
});
