//! Crash injection at every metadata write step, then recovery: the state is the old or the new
//! one, checksums valid, other files' data untouched. Also the format's bad-input cases.

use std::path::Path;

use tern_volume::format::{EXTENT_SIZE, MIN_LUN_SIZE, Metadata, SuperblockError};
use tern_volume::lun::{FaultPlan, FaultyLun, FileLun, Lun};
use tern_volume::namespace::{self, Change};
use tern_volume::store::{self, FormatError, FormatOptions, OpenError, Volume};

const LUN: u64 = 16 << 20;

fn new_lun(dir: &Path, name: &str, size: u64) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

fn fmt(p: &Path) -> Volume {
    let lun = FileLun::open(p).unwrap();
    store::format(
        &lun,
        FormatOptions {
            force: false,
            uuid: [7; 16],
        },
    )
    .unwrap();
    Volume::open(&lun).unwrap()
}

type Op = fn(&Metadata, u32) -> Change;

fn ops() -> Vec<(&'static str, Op)> {
    vec![
        ("create preallocated", |m, n| {
            namespace::create(m, n, "c", 2 * EXTENT_SIZE, true).unwrap()
        }),
        ("create thin", |m, n| {
            namespace::create(m, n, "d", 5 * EXTENT_SIZE, false).unwrap()
        }),
        ("resize", |m, n| {
            namespace::resize(m, n, "a", 3 * EXTENT_SIZE + 1).unwrap()
        }),
        ("allocate", |m, n| {
            namespace::allocate(m, n, "b", 2).unwrap()
        }),
        ("delete", |m, _| namespace::delete(m, "b").unwrap()),
        ("deallocate", |m, _| {
            namespace::deallocate(m, "b", 0, 2).unwrap()
        }),
        ("lease grant", |m, _| {
            let mut next = m.clone();
            next.seq += 1;
            let l = &mut next.files.get_mut("a").unwrap().lease;
            l.epoch += 1;
            l.holder = Some(2);
            Change { next, zero: vec![] }
        }),
    ]
}

#[test]
fn crash_at_every_metadata_write_step_recovers_old_or_new_state() {
    let dir = tempfile::tempdir().unwrap();
    let base = new_lun(dir.path(), "base", LUN);
    let mut v = fmt(&base);
    let lun = FileLun::open(&base).unwrap();
    let n = v.sb.extent_count;
    // A preallocated file with recognisable data, and a thin file with one extent mapped.
    let c = namespace::create(&v.meta, n, "a", 2 * EXTENT_SIZE, true).unwrap();
    v.zero_extents(&lun, &c.zero).unwrap();
    v.commit(&lun, c.next, 1).unwrap();
    let c = namespace::create(&v.meta, n, "b", 4 * EXTENT_SIZE, false).unwrap();
    v.commit(&lun, c.next, 1).unwrap();
    let c = namespace::allocate(&v.meta, n, "b", 0).unwrap();
    v.zero_extents(&lun, &c.zero).unwrap();
    v.commit(&lun, c.next, 1).unwrap();
    let a_ext = v.meta.files["a"].map.clone();
    let pattern = vec![0x5au8; EXTENT_SIZE as usize];
    for &p in &a_ext {
        lun.write_at(&pattern, v.sb.extent_offset(p)).unwrap();
    }
    lun.flush().unwrap();
    drop(lun);

    let mut total_crashes = 0;
    for (what, op) in ops() {
        for torn in [false, true] {
            let mut k = 0;
            loop {
                let img = dir.path().join("img");
                std::fs::copy(&base, &img).unwrap();
                let old = Volume::open(&FileLun::open(&img).unwrap()).unwrap();
                let change = op(&old.meta, n);
                let faulty = FaultyLun::new(
                    FileLun::open(&img).unwrap(),
                    FaultPlan {
                        crash_at: Some(k),
                        torn,
                    },
                );
                let mut v2 = old.clone();
                let res = v2
                    .zero_extents(&faulty, &change.zero)
                    .map_err(|e| e.to_string())
                    .and_then(|()| {
                        v2.commit(&faulty, change.next.clone(), 1)
                            .map_err(|e| e.to_string())
                    });
                let after = Volume::open(&FileLun::open(&img).unwrap()).unwrap_or_else(|e| {
                    panic!("{what}: crash at step {k} (torn {torn}) left no readable metadata: {e}")
                });
                let mut expected_new = change.next.clone();
                expected_new.seq = old.meta.seq + 1;
                expected_new.generation = 1;
                if faulty.crashed() {
                    total_crashes += 1;
                    assert!(res.is_err());
                    assert!(
                        after.meta == old.meta || after.meta == expected_new,
                        "{what}: crash at step {k} (torn {torn}) gave a third state: {:?}",
                        after.meta
                    );
                } else {
                    res.unwrap();
                    assert_eq!(
                        after.meta, expected_new,
                        "{what}: completed commit must be visible"
                    );
                    break;
                }
                // Data of file "a" is never touched by another file's metadata operation.
                let l = FileLun::open(&img).unwrap();
                for &p in &a_ext {
                    let mut b = vec![0u8; EXTENT_SIZE as usize];
                    l.read_at(&mut b, after.sb.extent_offset(p)).unwrap();
                    assert!(b == pattern, "{what}: data of file a damaged at step {k}");
                }
                k += 1;
                assert!(k < 100, "{what}: commit never completed");
            }
        }
    }
    assert!(
        total_crashes >= 6 * 2 * 3,
        "each operation must have several write steps ({total_crashes})"
    );
}

#[test]
fn deposed_coordinator_generation_is_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_lun(dir.path(), "lun", LUN);
    let mut old = fmt(&p);
    let lun = FileLun::open(&p).unwrap();
    let mut newer = Volume::open(&lun).unwrap();
    let c = namespace::create(&newer.meta, newer.sb.extent_count, "x", 10, false).unwrap();
    newer.commit(&lun, c.next, 9).unwrap();
    let c = namespace::create(&old.meta, old.sb.extent_count, "y", 10, false).unwrap();
    let err = old.commit(&lun, c.next, 5).unwrap_err();
    assert!(err.to_string().contains("Fenced"), "{err}");
    let now = Volume::open(&lun).unwrap();
    assert!(now.meta.files.contains_key("x") && !now.meta.files.contains_key("y"));
}

#[test]
fn format_and_open_refuse_bad_luns_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let small = new_lun(dir.path(), "small", MIN_LUN_SIZE - 1);
    let err = store::format(
        &FileLun::open(&small).unwrap(),
        FormatOptions {
            force: false,
            uuid: [0; 16],
        },
    )
    .unwrap_err();
    assert!(matches!(err, FormatError::TooSmall { .. }), "{err}");

    let blank = new_lun(dir.path(), "blank", LUN);
    let err = Volume::open(&FileLun::open(&blank).unwrap()).unwrap_err();
    assert!(
        matches!(err, OpenError::Superblock(SuperblockError::NotFormatted)),
        "{err}"
    );

    let foreign = dir.path().join("foreign");
    let mut bytes = vec![0u8; LUN as usize];
    bytes[..4].copy_from_slice(b"QFI\xfb");
    std::fs::write(&foreign, &bytes).unwrap();
    let flun = FileLun::open(&foreign).unwrap();
    assert!(matches!(
        Volume::open(&flun),
        Err(OpenError::Superblock(SuperblockError::Foreign(_)))
    ));
    let err = store::format(
        &flun,
        FormatOptions {
            force: false,
            uuid: [0; 16],
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, FormatError::NotEmpty("foreign data")),
        "{err}"
    );
    assert_eq!(
        &std::fs::read(&foreign).unwrap()[..4],
        b"QFI\xfb",
        "refused format must write nothing"
    );

    let v = new_lun(dir.path(), "v", LUN);
    fmt(&v);
    let vl = FileLun::open(&v).unwrap();
    assert!(matches!(
        store::format(
            &vl,
            FormatOptions {
                force: false,
                uuid: [0; 16]
            }
        ),
        Err(FormatError::NotEmpty(_))
    ));
    let mut sb = std::fs::read(&v).unwrap();
    sb[8] = 2;
    std::fs::write(&v, &sb).unwrap();
    let err = Volume::open(&FileLun::open(&v).unwrap()).unwrap_err();
    assert!(
        err.to_string().contains("version 2 is not supported"),
        "{err}"
    );

    // A LUN file truncated after formatting.
    let t = new_lun(dir.path(), "t", LUN);
    fmt(&t);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&t)
        .unwrap()
        .set_len(LUN - EXTENT_SIZE)
        .unwrap();
    assert!(matches!(
        Volume::open(&FileLun::open(&t).unwrap()),
        Err(OpenError::Truncated { .. })
    ));
}

#[test]
fn enospc_on_a_full_volume_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_lun(dir.path(), "lun", MIN_LUN_SIZE + 2 * EXTENT_SIZE);
    let mut v = fmt(&p);
    let lun = FileLun::open(&p).unwrap();
    assert_eq!(v.sb.extent_count, 3);
    let c = namespace::create(&v.meta, 3, "a", 3 * EXTENT_SIZE, true).unwrap();
    v.commit(&lun, c.next, 1).unwrap();
    let before = std::fs::read(&p).unwrap();
    let err = namespace::create(&v.meta, 3, "b", 1, true).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("No space left on the volume (ENOSPC): need 1 free 1 MiB extents, 0 free"),
        "{err}"
    );
    // Thin files over-commit: a file ten times the volume is created, its space comes later.
    let c = namespace::create(&v.meta, 3, "thin", 10 * EXTENT_SIZE, false).unwrap();
    v.commit(&lun, c.next, 1).unwrap();
    assert!(matches!(
        namespace::allocate(&v.meta, 3, "thin", 0),
        Err(namespace::NamespaceError::NoSpace { .. })
    ));
    let after = std::fs::read(&p).unwrap();
    assert_eq!(
        before[3 << 20..],
        after[3 << 20..],
        "data extents untouched"
    );
}
