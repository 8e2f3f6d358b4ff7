//! Thin files stay thin, and over-commit fails cleanly: a node served in-process (coordinator
//! of its own volume, no etcd needed) driven by real NBD tools.
//!
//! * `qemu-img convert` of a sparse qcow2 into a thin file allocates only the data's extents;
//!   `qemu-img map` and `nbdinfo --map` see the holes; `nbdcopy` of a sparse raw file too.
//! * WRITE_ZEROES and TRIM free whole extents and zero partial ones (`qemu-io`).
//! * A thin file larger than the volume is created; the write that finds no free extent gets
//!   `ENOSPC`, everything written before (this file and others) reads back intact, and freeing
//!   an extent lets the same write through.
//!
//! Needs `qemu-img`, `qemu-io`, `nbdinfo`, `nbdcopy` on PATH (fails loudly without them).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Cluster, DIRECT, MIB, NO_DIRECT, TIMEOUT};
use tern_nbd::{Client, ClientError, Errno};
use tern_volume::control::{self, LeaseAction, Request};
use tern_volume::lun::FileLun;

struct Served {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    addr: String,
    cluster: Cluster,
}

/// Format a LUN of `extents` data extents and serve it from one in-process coordinator node.
fn serve(extents: u64) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::new(dir.path(), extents, DIRECT);
    Served {
        dir: dir.path().to_owned(),
        _dir: dir,
        addr: cluster.addr.clone(),
        cluster,
    }
}

fn ctl(addr: &str, req: Request) -> serde_json::Value {
    control::call(addr, &req, false, TIMEOUT).unwrap_or_else(|e| panic!("{req:?} failed: {e}"))
}

/// Create a thin file and take its write lease for the node.
fn thin_file(addr: &str, name: &str, size: u64) {
    ctl(
        addr,
        Request::Create {
            name: name.into(),
            size,
            preallocated: false,
        },
    );
    ctl(
        addr,
        Request::Lease {
            name: name.into(),
            action: LeaseAction::Acquire,
        },
    );
}

fn allocated(addr: &str, name: &str) -> u64 {
    ctl(
        addr,
        Request::Stat {
            name: name.into(),
            map: false,
        },
    )["allocated_extents"]
        .as_u64()
        .unwrap()
}

fn free(addr: &str) -> u64 {
    ctl(addr, Request::List)["free_extents"].as_u64().unwrap()
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} is needed for this test (qemu-utils, libnbd-bin): {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn url(s: &Served, name: &str) -> String {
    format!("nbd://{}/{name}", s.addr)
}

/// A 64 MiB qcow2 holding 3 MiB of data at 0, 20 MiB and 50 MiB.
fn sparse_qcow2(dir: &Path) -> String {
    let p = dir.join("src.qcow2").to_str().unwrap().to_owned();
    run("qemu-img", &["create", "-q", "-f", "qcow2", &p, "64M"]);
    for (pat, off) in [("0x11", "0"), ("0x22", "20M"), ("0x33", "50M")] {
        run(
            "qemu-io",
            &["-f", "qcow2", "-c", &format!("write -P {pat} {off} 1M"), &p],
        );
    }
    p
}

/// `(offset, length, data?)` runs of `qemu-img map --output=json`.
fn qemu_map(target: &str) -> Vec<(u64, u64, bool)> {
    let out = run("qemu-img", &["map", "--output=json", "-f", "raw", target]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// Bytes `nbdinfo --map` reports as data, and as `hole,zero`.
fn nbdinfo_map(target: &str) -> (u64, u64) {
    let out = run("nbdinfo", &["--map", target]);
    let (mut data, mut holes) = (0, 0);
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let len: u64 = f[1].parse().unwrap();
        match f[2] {
            "0" => data += len,
            "3" => holes += len,
            other => panic!("unexpected state {other} in {line:?}"),
        }
    }
    (data, holes)
}

#[test]
fn qemu_img_convert_of_a_sparse_qcow2_allocates_only_the_data_extents() {
    let s = serve(128);
    let src = sparse_qcow2(&s.dir);
    thin_file(&s.addr, "vm1.raw", 64 * MIB);
    run(
        "qemu-img",
        &["convert", "-n", "-O", "raw", &src, &url(&s, "vm1.raw")],
    );
    assert_eq!(
        allocated(&s.addr, "vm1.raw"),
        3,
        "3 MiB of data must take 3 extents, not the whole 64"
    );
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            &src,
            &url(&s, "vm1.raw"),
        ],
    );
    let map = qemu_map(&url(&s, "vm1.raw"));
    let data: Vec<(u64, u64)> = map.iter().filter(|r| r.2).map(|r| (r.0, r.1)).collect();
    assert_eq!(
        data,
        vec![(0, MIB), (20 * MIB, MIB), (50 * MIB, MIB)],
        "qemu-img map: {map:?}"
    );
    assert_eq!(nbdinfo_map(&url(&s, "vm1.raw")), (3 * MIB, 61 * MIB));

    // nbdcopy of a sparse raw file keeps it sparse too.
    let raw = s.dir.join("sparse.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(32 * MIB).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![0x44; 2 * MIB as usize], 8 * MIB).unwrap();
    drop(f);
    thin_file(&s.addr, "copy.raw", 32 * MIB);
    run("nbdcopy", &[raw.to_str().unwrap(), &url(&s, "copy.raw")]);
    assert_eq!(allocated(&s.addr, "copy.raw"), 2);
    assert_eq!(nbdinfo_map(&url(&s, "copy.raw")), (2 * MIB, 30 * MIB));
}

#[test]
fn write_zeroes_and_trim_free_whole_extents_and_zero_partial_ones() {
    let s = serve(64);
    thin_file(&s.addr, "t.raw", 64 * MIB);
    let io = |cmd: &str| run("qemu-io", &["-f", "raw", &url(&s, "t.raw"), "-c", cmd]);
    // Regression: a 32 MiB write-zeroes plus a 16 MiB discard on a fresh file allocated 48 MiB.
    // (`-u`: the zeroes may be unmapped, as `qemu-img convert` and guests ask.)
    io("write -z -u 0 32M");
    io("discard 32M 16M");
    assert_eq!(allocated(&s.addr, "t.raw"), 0);
    // Data, then a zeroing and a discard of whole extents: the extents go back to the volume.
    io("write -P 0x5a 0 8M");
    assert_eq!(allocated(&s.addr, "t.raw"), 8);
    let before = free(&s.addr);
    io("write -z -u 0 4M");
    io("discard 4M 2M");
    assert_eq!(allocated(&s.addr, "t.raw"), 2);
    assert_eq!(free(&s.addr), before + 6);
    io("read -P 0 0 6M");
    io("read -P 0x5a 6M 2M");
    // A partial extent is zeroed in place and stays allocated.
    io("discard 6656K 512K");
    assert_eq!(allocated(&s.addr, "t.raw"), 2);
    io("read -P 0x5a 6M 512K");
    io("read -P 0 6656K 512K");
    io("read -P 0x5a 7M 1M");
    // Without `-u` qemu asks for NO_HOLE: the zeroes are written and the range stays allocated
    // (as qemu-nbd does), also over a hole.
    io("write -z 7M 1M");
    io("read -P 0 7M 1M");
    assert_eq!(allocated(&s.addr, "t.raw"), 2);
    io("write -z 12M 1M");
    assert_eq!(allocated(&s.addr, "t.raw"), 3);
    io("discard 12M 1M");
    // FAST_ZERO on a thin file is served (it only frees and zeroes partial extents).
    let mut c = Client::connect(&s.addr, "t.raw").unwrap();
    let flags = c.transmission_flags();
    assert_ne!(
        flags & tern_nbd::proto::TF_SEND_FAST_ZERO,
        0,
        "FAST_ZERO must be offered"
    );
    c.write(10 * MIB, &[7u8; 4096], false).unwrap();
    c.write_zeroes(10 * MIB, MIB as u32, false).unwrap();
    let mut b = vec![1u8; 4096];
    c.read(10 * MIB, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    // Left allocated: extent 6 (partly zeroed) and extent 7 (NO_HOLE zeroes).
    assert_eq!(allocated(&s.addr, "t.raw"), 2);
    assert_eq!(nbdinfo_map(&url(&s, "t.raw")), (2 * MIB, 62 * MIB));
}

#[test]
fn an_over_committed_volume_returns_enospc_at_write_time_and_loses_nothing_else() {
    // 8 extents; a 64 MiB thin file over-commits the volume 8 times.
    let s = serve(8);
    thin_file(&s.addr, "big.raw", 64 * MIB);
    thin_file(&s.addr, "other.raw", 4 * MIB);
    let mut other = Client::connect(&s.addr, "other.raw").unwrap();
    other.write(0, &vec![0xee; MIB as usize], false).unwrap();
    let mut big = Client::connect(&s.addr, "big.raw").unwrap();
    for i in 0..7u8 {
        big.write(u64::from(i) * MIB, &vec![i + 1; MIB as usize], false)
            .unwrap();
    }
    assert_eq!(free(&s.addr), 0);
    let err = big.write(40 * MIB, &[9u8; 4096], false).unwrap_err();
    assert!(
        matches!(err, ClientError::Remote(Errno::NoSpc)),
        "expected ENOSPC, got {err:?}"
    );
    // The connection, the file's earlier data, the other file and the metadata are intact.
    big.flush().unwrap();
    let mut b = vec![0u8; MIB as usize];
    for i in 0..7u8 {
        big.read(u64::from(i) * MIB, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == i + 1), "extent {i} damaged");
    }
    big.read(40 * MIB, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0), "the refused write left data");
    other.read(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0xee), "another file was damaged");
    assert_eq!(allocated(&s.addr, "big.raw"), 7);
    // Freeing one extent lets the same write through.
    big.trim(3 * MIB, MIB as u32).unwrap();
    big.write(40 * MIB, &[9u8; 4096], false).unwrap();
    big.read(40 * MIB, &mut b[..4096]).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 9));
    big.read(3 * MIB, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0), "the trimmed extent reads zero");
    let reopened =
        tern_volume::store::Volume::open(&FileLun::open(&s.dir.join("lun")).unwrap()).unwrap();
    assert_eq!(reopened.meta.files["big.raw"].size, 64 * MIB);
}

/// A second node on the same LUN that forwards to the served coordinator (node 1).
fn second_node(s: &Served, id: u32, no_direct: bool) -> String {
    let opts = if no_direct { NO_DIRECT } else { DIRECT };
    s.cluster.follower(id, opts).1
}

#[test]
fn nodes_that_are_not_the_coordinator_free_extents_through_it() {
    let s = serve(64);
    for (id, no_direct) in [(2, false), (3, true)] {
        let addr = second_node(&s, id, no_direct);
        let name = format!("f{id}.raw");
        thin_file(&addr, &name, 16 * MIB);
        let target = format!("nbd://{addr}/{name}");
        let io = |cmd: &str| run("qemu-io", &["-f", "raw", &target, "-c", cmd]);
        io("write -P 0x7e 0 4M");
        assert_eq!(allocated(&s.addr, &name), 4, "node {id}");
        io("discard 1M 2M");
        io("write -z -u 3M 1M");
        io("discard 512K 512K");
        assert_eq!(allocated(&s.addr, &name), 1, "node {id}");
        io("read -P 0x7e 0 512K");
        io("read -P 0 512K 15872K");
        assert_eq!(nbdinfo_map(&target), (MIB, 15 * MIB), "node {id}");
    }
}
