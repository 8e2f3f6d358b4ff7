//! Fuzz target: the JSON bodies the cluster's processes accept from the network — the
//! controller's REST API (`POST /v1/vms`: `VmCreate`, `…/migrate`: `MigrateRequest`,
//! `…/maintenance`: `MaintenanceRequest`, `PUT /v1/automation/policy`: `Policy`, the agents'
//! `AgentReport`), the agent's command endpoint (`Command`) and the controller reading an
//! agent's `CommandResponse` — decoded strictly with serde_json as the shells do, then
//! validated where the shell validates.
//!
//! Input: `[mode: u8]` then the body; `mode % 7` picks the type. Properties: no panic; an
//! accepted body re-encodes to JSON that decodes and encodes to the same bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tern_api::agent::{AgentReport, Command, CommandResponse};
use tern_api::automation::Policy;
use tern_api::cluster::{MaintenanceRequest, MigrateRequest, VmCreate};

fn decode<T: Serialize + DeserializeOwned>(body: &[u8]) -> Option<T> {
    let v: T = serde_json::from_slice(body).ok()?;
    let once = serde_json::to_vec(&v).expect("an accepted body encodes");
    let back: T = serde_json::from_slice(&once).expect("an encoded body decodes");
    assert_eq!(
        serde_json::to_vec(&back).expect("encodes"),
        once,
        "a body changed through an encode/decode"
    );
    Some(v)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    match mode % 7 {
        0 => {
            if let Some(v) = decode::<VmCreate>(body) {
                let _ = v.validate();
            }
        }
        1 => {
            if let Some(m) = decode::<MigrateRequest>(body) {
                let _ = m.validate();
            }
        }
        2 => {
            let _ = decode::<MaintenanceRequest>(body);
        }
        3 => {
            if let Some(p) = decode::<Policy>(body) {
                let _ = p.validate();
            }
        }
        4 => {
            let _ = decode::<AgentReport>(body);
        }
        5 => {
            let _ = decode::<Command>(body);
        }
        _ => {
            let _ = decode::<CommandResponse>(body);
        }
    }
});
