//! Fuzz target: the VMM's saved-state blob (`tern_vmm::state::decode`), which a target VMM reads
//! from a migration's `State` frame and a restore reads from a snapshot file: header (magic,
//! version, length cap, crc32c) and the bincode body of the typed `VmState` tree (vCPUs with
//! their MSRs, CPUID and XSAVE area, interrupt controllers, PIT, clock, devices).
//!
//! Input: `[mode: u8]` then bytes. Mode with the top bit set: the bytes are a body, wrapped in a
//! valid header and checksum so mutations reach the body decoder; otherwise the bytes are
//! decoded as they are. Properties: no panic; no allocation beyond the length cap; an accepted
//! state re-encodes to bytes that decode to the same encoding; the per-vCPU checks a restore
//! runs first (`VcpuState::check`) do not panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_vmm::state::{self, STATE_MAGIC, STATE_VERSION};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let sealed;
    let bytes = if mode & 0x80 != 0 {
        let mut b = Vec::with_capacity(24 + rest.len());
        b.extend_from_slice(&STATE_MAGIC);
        b.extend_from_slice(&STATE_VERSION.to_le_bytes());
        b.extend_from_slice(&(rest.len() as u64).to_le_bytes());
        b.extend_from_slice(&crc32c::crc32c(rest).to_le_bytes());
        b.extend_from_slice(rest);
        sealed = b;
        &sealed[..]
    } else {
        rest
    };
    let Ok((st, used)) = state::decode(bytes) else {
        return;
    };
    assert!(used <= bytes.len());
    let again = state::encode(&st);
    let (st2, used2) = state::decode(&again).expect("an encoded state decodes");
    assert_eq!(used2, again.len());
    assert_eq!(
        state::encode(&st2),
        again,
        "state changed through an encode/decode"
    );
    for (i, v) in st.vcpus.iter().enumerate() {
        let _ = v.check(i, &[0x10, 0x1b, 0xc000_0080]);
    }
});
