//! Prints migration figures for the in-memory test VM over loopback TCP (protocol and transport
//! cost only, no KVM): `cargo run --release -p tern-migration --example loopback_figures`.
//! Workloads: idle 1 GiB, 256 MiB at 20,000 pages/s, 256 MiB at maximum rate; three runs each.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::TcpListener;
use std::thread;
use std::time::Duration;

use common::MemVm;
use tern_migration::{CancelToken, MigrateOptions, ReceiveOptions, receive};

const MIB: u64 = 1 << 20;

fn main() {
    let streams: u16 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    println!("streams={streams}");
    for (name, bytes, rate) in [
        ("idle 1 GiB", 1024 * MIB, 1),
        ("256 MiB @ 20,000 pages/s", 256 * MIB, 20_000),
        ("256 MiB @ max rate", 256 * MIB, 0),
    ] {
        for run in 0..3 {
            let mut src = MemVm::source(bytes, rate);
            src.keep_snapshots = false;
            src.wait_writes(if rate == 1 { 0 } else { 1000 }, Duration::from_secs(5));
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let h = thread::spawn(move || {
                let mut tgt = MemVm::target(bytes, 1, 1000);
                tgt.keep_snapshots = false;
                let r = receive(
                    &listener,
                    &mut tgt,
                    &ReceiveOptions::default(),
                    &CancelToken::new(),
                );
                r.map(|_| ()).map_err(|e| e.to_string())
            });
            let opts = MigrateOptions {
                streams,
                ..Default::default()
            };
            let r =
                tern_migration::migrate(&mut src, addr, &opts, &CancelToken::new(), &mut |_| {});
            let t = h.join().unwrap();
            match r {
                Ok(rep) => println!("{name} run {run}: {}", rep.to_json()),
                Err(f) => println!(
                    "{name} run {run}: FAILED {} {} target {t:?}",
                    f.error,
                    f.report.to_json()
                ),
            }
        }
    }
}
