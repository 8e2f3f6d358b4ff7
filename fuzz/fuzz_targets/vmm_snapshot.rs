//! Fuzz target: opening a snapshot file (`tern_vmm::snapshot::open`): magic, format version, the
//! bincode VM description (kernel, command line, memory, vCPUs, disks) and the embedded saved
//! state, each bounded before it is read.
//!
//! Input: `[mode: u8]` then bytes. Mode with the top bit set: `[meta_len: u16] [meta]
//! [state body]`, assembled into a well-formed file (magic, version, lengths, state header and
//! checksum, an empty page list) so mutations reach the description and state decoders;
//! otherwise the bytes are the file as is. The file lives in /dev/shm (one per fuzzing process).
//! Properties: no panic; no allocation beyond the description and state caps.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tern_fuzz::{take, take_le};
use tern_vmm::snapshot::{self, SNAPSHOT_MAGIC, SNAPSHOT_VERSION};
use tern_vmm::state::{STATE_MAGIC, STATE_VERSION};

fn path() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("tern-fuzz-snapshot-{}", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let file = if mode & 0x80 != 0 {
        let meta_len = take_le(&mut rest, 2) as usize;
        let meta = take(&mut rest, meta_len);
        let body = rest;
        let mut f = Vec::new();
        f.extend_from_slice(&SNAPSHOT_MAGIC);
        f.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        f.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        f.extend_from_slice(meta);
        f.extend_from_slice(&STATE_MAGIC);
        f.extend_from_slice(&STATE_VERSION.to_le_bytes());
        f.extend_from_slice(&(body.len() as u64).to_le_bytes());
        f.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
        f.extend_from_slice(body);
        f.extend_from_slice(&u64::MAX.to_le_bytes());
        f.extend_from_slice(&0u32.to_le_bytes());
        f
    } else {
        rest.to_vec()
    };
    std::fs::write(path(), &file).expect("write the snapshot file");
    if let Ok(s) = snapshot::open(path()) {
        assert!(s.state.vcpus.len() <= file.len(), "more vCPUs than bytes");
    }
});
