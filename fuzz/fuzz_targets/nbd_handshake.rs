//! Fuzz the handshake parser with arbitrary client bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_nbd::StaticExports;

fuzz_target!(|data: &[u8]| {
    let ex = StaticExports::new();
    let mut out = Vec::new();
    let _ = tern_nbd::serve(data, &mut out, &ex);
});
