//! Fuzz the transmission-phase parser: a valid handshake, then arbitrary request bytes.
#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use tern_nbd::proto::*;
use tern_nbd::{Backend, Errno, StaticExports};

struct Mem(Mutex<Vec<u8>>);

impl Backend for Mem {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
        let v = self.0.lock().unwrap();
        buf.copy_from_slice(&v[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, data: &[u8], offset: u64, _fua: bool) -> Result<(), Errno> {
        let mut v = self.0.lock().unwrap();
        v[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<(), Errno> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut ex = StaticExports::new();
    ex.insert("m", Arc::new(Mem(Mutex::new(vec![0; 65536]))));
    let mut input = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes().to_vec();
    input.extend_from_slice(&IHAVEOPT.to_be_bytes());
    input.extend_from_slice(&OPT_STRUCTURED_REPLY.to_be_bytes());
    input.extend_from_slice(&0u32.to_be_bytes());
    let go = encode_go(&GoRequest { name: "m".into(), infos: vec![] });
    input.extend_from_slice(&IHAVEOPT.to_be_bytes());
    input.extend_from_slice(&OPT_GO.to_be_bytes());
    input.extend_from_slice(&(go.len() as u32).to_be_bytes());
    input.extend_from_slice(&go);
    input.extend_from_slice(data);
    let mut out = Vec::new();
    let _ = tern_nbd::serve(&input[..], &mut out, &ex);
});
