//! What a guest's virtio-blk DISCARD and WRITE_ZEROES become on a `volume://` disk: the disk's
//! `discard` / `write_zeroes` send NBD TRIM / WRITE_ZEROES to its node, which frees the thin
//! file's whole extents (and zeroes partial ones); the range reads as zeroes; a later write into
//! a freed range takes a new extent instead of landing in the one given back (real etcd, a real
//! node process).

mod common;

use common::tern_cmd;
use common::volume::{Cluster, call};
use tern_volume::client::VolumeDisk;
use tern_volume::control::Request;

const FILE: &str = "trim.raw";
const MIB: u64 = 1 << 20;

fn allocated(addr: &str) -> u64 {
    let v = call(
        addr,
        Request::Stat {
            name: FILE.into(),
            map: false,
        },
    )
    .unwrap();
    v["allocated_extents"]
        .as_u64()
        .unwrap_or_else(|| panic!("no allocated_extents in {v}"))
}

fn read(d: &VolumeDisk, offset: u64, len: u64) -> Vec<u8> {
    let mut b = vec![0u8; len as usize];
    d.read_at(&mut b, offset).unwrap();
    b
}

#[test]
fn discard_and_write_zeroes_on_a_volume_disk_free_its_extents() {
    let mut c = Cluster::start();
    let n1 = c.spawn(1, &[]);
    let (code, _, err) = tern_cmd(&["volume", "create", FILE, "--size", "8M", "--node", &n1]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(allocated(&n1), 0, "a thin file starts empty");

    let d = VolumeDisk::open(&format!("{n1}/{FILE}"), false).unwrap();
    for i in 0..8 {
        d.write_at(&vec![0x77u8; MIB as usize], i * MIB).unwrap();
    }
    d.flush().unwrap();
    assert_eq!(allocated(&n1), 8);

    // DISCARD of extents 2, 3 and 4.
    d.discard(2 * MIB, 3 * MIB).unwrap();
    assert_eq!(
        allocated(&n1),
        5,
        "three whole extents freed; node log:\n{}",
        c.log(1)
    );
    assert!(read(&d, 2 * MIB, 3 * MIB).iter().all(|&b| b == 0));
    assert!(read(&d, MIB, MIB).iter().all(|&b| b == 0x77));
    assert!(read(&d, 5 * MIB, MIB).iter().all(|&b| b == 0x77));

    // WRITE_ZEROES over extent 5 and the first 4 KiB of extent 6.
    d.write_zeroes(5 * MIB, MIB + 4096).unwrap();
    assert_eq!(
        allocated(&n1),
        4,
        "the whole extent freed, the partial one kept"
    );
    assert!(read(&d, 5 * MIB, MIB + 4096).iter().all(|&b| b == 0));
    assert!(
        read(&d, 6 * MIB + 4096, MIB - 4096)
            .iter()
            .all(|&b| b == 0x77)
    );

    // Writing into a freed range takes an extent again; the data is where it was written.
    d.write_at(&vec![0x55u8; 4096], 3 * MIB).unwrap();
    d.flush().unwrap();
    assert_eq!(allocated(&n1), 5);
    assert!(read(&d, 3 * MIB, 4096).iter().all(|&b| b == 0x55));
    assert!(read(&d, 3 * MIB + 4096, 4096).iter().all(|&b| b == 0));
    assert!(read(&d, 0, MIB).iter().all(|&b| b == 0x77));
    d.close().unwrap();

    // A reader sees the same through the node.
    let r = VolumeDisk::open(&format!("{n1}/{FILE}"), true).unwrap();
    assert!(read(&r, 3 * MIB, 4096).iter().all(|&b| b == 0x55));
    assert!(read(&r, 2 * MIB, MIB).iter().skip(8192).all(|&b| b == 0));
    assert!(r.discard(0, MIB).is_err(), "a reader cannot discard");
    assert!(read(&r, 0, MIB).iter().all(|&b| b == 0x77));
}
