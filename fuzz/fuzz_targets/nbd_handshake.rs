//! Fuzz target: the NBD server's option haggling (`tern_nbd::serve`) on arbitrary client bytes:
//! client flags, then any options (EXPORT_NAME, LIST, INFO, GO, STRUCTURED_REPLY, the meta
//! context options, Tern's control option, unknown ones) and, once an export is chosen, the
//! transmission phase. The export `m` is 64 KiB in memory.
//!
//! Input: the client's byte stream. Properties: no panic (the in-memory export panics on any
//! access outside it), no allocation beyond the option and request bounds.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let ex = tern_fuzz::nbd_exports();
    let mut out = Vec::new();
    let _ = tern_nbd::serve(data, &mut out, &ex);
});
