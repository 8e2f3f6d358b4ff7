//! Fuzz target: the NBD server's transmission phase. A valid handshake (fixed newstyle, no
//! zeroes, structured replies, GO on export `m`) comes first, then the fuzzer's bytes as
//! requests: reads, writes, flushes, trims, write-zeroes, block status, disconnects and anything
//! else, with any flags, offsets and lengths.
//!
//! Input: the request bytes after the handshake. Properties: no panic (the 64 KiB in-memory
//! export panics on any access outside it, so a request the validator lets through out of
//! range is a finding), no allocation beyond `MAX_REQUEST_LEN`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_nbd::proto::*;

fuzz_target!(|data: &[u8]| {
    let ex = tern_fuzz::nbd_exports();
    let mut input = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    input.extend_from_slice(&IHAVEOPT.to_be_bytes());
    input.extend_from_slice(&OPT_STRUCTURED_REPLY.to_be_bytes());
    input.extend_from_slice(&0u32.to_be_bytes());
    let go = encode_go(&GoRequest {
        name: "m".into(),
        infos: vec![],
    });
    input.extend_from_slice(&IHAVEOPT.to_be_bytes());
    input.extend_from_slice(&OPT_GO.to_be_bytes());
    input.extend_from_slice(&(go.len() as u32).to_be_bytes());
    input.extend_from_slice(&go);
    input.extend_from_slice(data);
    let mut out = Vec::new();
    let _ = tern_nbd::serve(&input[..], &mut out, &ex);
});
