//! Fuzz target: the NBD client reading a server's bytes — the fixed-newstyle greeting, option
//! replies (structured replies, GO with its infos, LIST, Tern's control option) and the replies
//! to reads, writes, flushes, trims and write-zeroes, simple or structured, over a real loopback
//! socket whose server side plays the fuzzer's bytes.
//!
//! Input: `[script: u8]` then the server's byte stream. `script & 3` picks the conversation:
//! 0 connects a `Client` to export `m` and runs requests (the other bits choose which), 1 does
//! the same with the pipelining `SharedClient`, 2 lists the exports, 3 sends one control
//! request. Properties: no panic, no hang (every read has a
//! timeout and the server side closes), no allocation beyond the protocol's bounds.

#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tern_nbd::{Client, SharedClient};

const TIMEOUT: Duration = Duration::from_secs(2);

fuzz_target!(|data: &[u8]| {
    let Some((&script, server)) = data.split_first() else {
        return;
    };
    tern_fuzz::with_scripted_server(server, |addr| match script & 3 {
        1 => {
            // The pipelining client the volume's redirected I/O uses: replies matched by cookie.
            let Ok(c) = SharedClient::connect_timeout(addr, "m", TIMEOUT) else {
                return;
            };
            let _ = (c.size(), c.transmission_flags(), c.is_alive());
            let mut buf = vec![0u8; if script & 4 != 0 { 8192 } else { 512 }];
            let _ = c.read(0, &mut buf);
            if script & 8 != 0 {
                let _ = c.write(4096, &buf[..512], script & 16 != 0);
            }
            if script & 32 != 0 {
                let _ = c.flush();
            }
            if script & 64 != 0 {
                let _ = c.trim(0, 4096);
            }
            if script & 128 != 0 {
                let _ = c.write_zeroes(0, 4096, false);
            }
            let _ = c.read(512, &mut buf[..512]);
        }
        0 => {
            let Ok(mut c) = Client::connect_timeout(addr, "m", TIMEOUT) else {
                return;
            };
            let _ = (c.size(), c.transmission_flags(), c.structured());
            let mut buf = vec![0u8; if script & 4 != 0 { 8192 } else { 512 }];
            let _ = c.read(0, &mut buf);
            if script & 8 != 0 {
                let _ = c.write(4096, &buf[..512], script & 16 != 0);
            }
            if script & 32 != 0 {
                let _ = c.flush();
            }
            if script & 64 != 0 {
                let _ = c.trim(0, 4096);
            }
            if script & 128 != 0 {
                let _ = c.write_zeroes(0, 4096, false);
            }
            let _ = c.read(512, &mut buf[..512]);
            let _ = c.disconnect();
        }
        2 => {
            let _ = tern_nbd::list_exports(addr);
        }
        _ => {
            let _ = tern_nbd::control(addr, br#"{"request":{"op":"status"}}"#, TIMEOUT);
        }
    });
});
