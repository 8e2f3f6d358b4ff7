//! Fuzz target: the VMM control API's lines (`docs/api.md`), both ways. The VMM reads request
//! lines from its unix socket (`tern_api::vmm::parse_request`, bounded at `MAX_REQUEST_BYTES`)
//! and turns a `migrate` request's options into the migration's configuration as
//! `tern_vmm::api` does; `tern vm` and the agents read answer and progress lines
//! (`tern_api::vmm::Response`).
//!
//! Input: `[mode: u8]` then one line. Even mode: a request; odd mode: an answer. Properties: no
//! panic; an accepted request re-encodes to a line that parses to the same request; migrate
//! options either pass `check_options` or are refused with an error, never a panic.

#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tern_api::vmm::{Request, Response, parse_request};
use tern_migration::machine::sender::check_options;
use tern_migration::{ConvergenceConfig, OnTimeout};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, line)) = data.split_first() else {
        return;
    };
    // Both sides read lines into a String: bytes that are not UTF-8 end the connection.
    let Ok(line) = std::str::from_utf8(line) else {
        return;
    };
    if mode & 1 == 0 {
        let Ok(req) = parse_request(line) else {
            return;
        };
        let again = serde_json::to_string(&req).expect("a request encodes");
        assert_eq!(
            parse_request(&again).expect("an encoded request parses"),
            req
        );
        if let Request::Migrate(m) = req {
            // As tern_vmm::api::run_migration builds the migration's options.
            let cfg = ConvergenceConfig {
                downtime_budget: Duration::from_millis(m.downtime_ms),
                timeout: Duration::from_secs_f64(m.timeout_s.clamp(0.1, 86_400.0)),
                on_timeout: if m.force_on_timeout {
                    OnTimeout::Force
                } else {
                    OnTimeout::Abort
                },
                max_bandwidth: m.max_bandwidth_mibps.map(|x| x << 20),
                ..Default::default()
            };
            let _ = check_options(m.streams, &cfg);
        }
    } else {
        let Ok(resp) = serde_json::from_str::<Response>(line) else {
            return;
        };
        let again = serde_json::to_string(&resp).expect("an answer encodes");
        let back: Response = serde_json::from_str(&again).expect("an encoded answer decodes");
        assert_eq!(serde_json::to_string(&back).expect("encodes"), again);
    }
});
