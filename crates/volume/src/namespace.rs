//! Pure metadata operations: create, delete, resize, allocate. Each returns the new state and the
//! extents that must be zeroed before the new state is committed; the input is never modified, so
//! a failed operation leaves nothing half-done.

#![deny(clippy::disallowed_methods)]
use crate::format::{
    EXTENT_SIZE, FileEntry, HOLE, LeaseRecord, Metadata, extents_for, max_file_size,
    max_mapped_extents, valid_name,
};

/// Why a namespace operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NamespaceError {
    /// Name not acceptable.
    #[error("Invalid file name {0:?}: use 1-128 of [A-Za-z0-9._-], not starting with '.' or '-'")]
    InvalidName(String),
    /// Name taken.
    #[error("A file named {0:?} already exists")]
    Exists(String),
    /// No such file.
    #[error("No file named {0:?}")]
    NotFound(String),
    /// Not enough free extents (a preallocated file, or a thin file's first write to an extent).
    #[error(
        "No space left on the volume (ENOSPC): need {needed} free 1 MiB extents, {free} free \
         (preallocated files take all their extents now; thin files take them at first write \
         and may over-commit the volume)"
    )]
    NoSpace {
        /// Extents needed.
        needed: u64,
        /// Extents free.
        free: u64,
    },
    /// Size zero, larger than [`max_file_size`], or shrinking.
    #[error("Invalid size {size}: {why}")]
    InvalidSize {
        /// Requested size.
        size: u64,
        /// Why.
        why: &'static str,
    },
    /// A writer holds the file.
    #[error("File {name:?} is held for writing by node {holder}")]
    Busy {
        /// File.
        name: String,
        /// Holder.
        holder: u32,
    },
    /// The files would map more logical extents together than the volume allows
    /// ([`max_mapped_extents`]): thin files over-commit the volume only so far.
    #[error(
        "Too much thin over-commit: the files would map {total} extents of 1 MiB in total, the \
         most this volume takes is {max} (its size times four, at least 16 TiB); delete or \
         shrink files first"
    )]
    OverCommitted {
        /// Extents all files would map.
        total: u64,
        /// The most allowed.
        max: u64,
    },
    /// Logical extent beyond the file.
    #[error("Offset beyond the end of {0:?}")]
    OutOfRange(String),
}

/// A new metadata state and the physical extents to zero before committing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The state to commit.
    pub next: Metadata,
    /// Extents newly given to a file (they may hold a deleted file's data).
    pub zero: Vec<u32>,
}

fn take_free(m: &Metadata, extent_count: u32, n: u64) -> Result<Vec<u32>, NamespaceError> {
    let used = m.used_extents(extent_count);
    let free: Vec<u32> = (0..extent_count).filter(|&e| !used[e as usize]).collect();
    if (free.len() as u64) < n {
        return Err(NamespaceError::NoSpace {
            needed: n,
            free: free.len() as u64,
        });
    }
    Ok(free[..n as usize].to_vec())
}

/// A file's size must be 1 byte to [`max_file_size`] (1 TiB, or the volume's size if larger);
/// thin files may exceed the volume.
fn check_size(size: u64, extent_count: u32) -> Result<(), NamespaceError> {
    if size == 0 {
        return Err(NamespaceError::InvalidSize {
            size,
            why: "must be at least 1 byte",
        });
    }
    if size > max_file_size(extent_count) {
        return Err(NamespaceError::InvalidSize {
            size,
            why: "larger than the largest file this volume takes (give 1 byte to 1 TiB, or up to \
                  the volume's size if that is larger)",
        });
    }
    Ok(())
}

/// Refuses a change that makes all files map more than [`max_mapped_extents`] together.
fn check_mapped(m: &Metadata, extent_count: u32, add: u64) -> Result<(), NamespaceError> {
    let total = m.files.values().map(|f| f.map.len() as u64).sum::<u64>() + add;
    let max = max_mapped_extents(extent_count);
    if total > max {
        return Err(NamespaceError::OverCommitted { total, max });
    }
    Ok(())
}

fn bump(m: &Metadata) -> Metadata {
    let mut next = m.clone();
    next.seq = m.seq + 1;
    next
}

/// Create a file.
pub fn create(
    m: &Metadata,
    extent_count: u32,
    name: &str,
    size: u64,
    preallocated: bool,
) -> Result<Change, NamespaceError> {
    if !valid_name(name) {
        return Err(NamespaceError::InvalidName(name.to_owned()));
    }
    if m.files.contains_key(name) {
        return Err(NamespaceError::Exists(name.to_owned()));
    }
    check_size(size, extent_count)?;
    let n = extents_for(size);
    check_mapped(m, extent_count, n)?;
    let (map, zero) = if preallocated {
        let ext = take_free(m, extent_count, n)?;
        (ext.clone(), ext)
    } else {
        (vec![HOLE; n as usize], Vec::new())
    };
    let mut next = bump(m);
    next.files.insert(
        name.to_owned(),
        FileEntry {
            size,
            preallocated,
            map,
            lease: LeaseRecord::default(),
        },
    );
    Ok(Change { next, zero })
}

/// Delete a file (refused while a writer holds it).
pub fn delete(m: &Metadata, name: &str) -> Result<Change, NamespaceError> {
    let f = m
        .files
        .get(name)
        .ok_or_else(|| NamespaceError::NotFound(name.to_owned()))?;
    if let Some(holder) = f.lease.holder {
        return Err(NamespaceError::Busy {
            name: name.to_owned(),
            holder,
        });
    }
    let mut next = bump(m);
    next.files.remove(name);
    Ok(Change {
        next,
        zero: Vec::new(),
    })
}

/// Grow a file to `size` bytes (shrinking is refused: nodes may hold maps of the tail).
pub fn resize(
    m: &Metadata,
    extent_count: u32,
    name: &str,
    size: u64,
) -> Result<Change, NamespaceError> {
    let f = m
        .files
        .get(name)
        .ok_or_else(|| NamespaceError::NotFound(name.to_owned()))?;
    if size < f.size {
        return Err(NamespaceError::InvalidSize {
            size,
            why: "shrinking a file is not supported",
        });
    }
    check_size(size, extent_count)?;
    let old_n = f.map.len() as u64;
    let new_n = extents_for(size);
    let add = new_n - old_n;
    check_mapped(m, extent_count, add)?;
    let mut zero = Vec::new();
    let mut extra = vec![HOLE; add as usize];
    if f.preallocated && add > 0 {
        zero = take_free(m, extent_count, add)?;
        extra.clone_from(&zero);
    }
    let mut next = bump(m);
    let e = next
        .files
        .get_mut(name)
        .ok_or_else(|| NamespaceError::NotFound(name.to_owned()))?;
    e.size = size;
    e.map.extend(extra);
    Ok(Change { next, zero })
}

/// Give logical extent `logical` of a thin file a physical extent (no-op if it has one).
pub fn allocate(
    m: &Metadata,
    extent_count: u32,
    name: &str,
    logical: u64,
) -> Result<Change, NamespaceError> {
    let f = m
        .files
        .get(name)
        .ok_or_else(|| NamespaceError::NotFound(name.to_owned()))?;
    let slot = *f
        .map
        .get(logical as usize)
        .ok_or_else(|| NamespaceError::OutOfRange(name.to_owned()))?;
    if slot != HOLE {
        return Ok(Change {
            next: m.clone(),
            zero: Vec::new(),
        });
    }
    let p = take_free(m, extent_count, 1)?[0];
    let mut next = bump(m);
    if let Some(e) = next.files.get_mut(name) {
        e.map[logical as usize] = p;
    }
    Ok(Change {
        next,
        zero: vec![p],
    })
}

/// Give the physical extents behind logical extents `first .. first + count` of a thin file back
/// to the volume (TRIM / WRITE_ZEROES of whole extents): they become holes, which read as zeroes.
/// Preallocated files keep their extents (the caller zeroes them instead): the change is then a
/// no-op, as it is when every extent is already a hole (`next.seq` unchanged in both cases).
/// Freed extents are zeroed again before any later allocation maps them.
pub fn deallocate(
    m: &Metadata,
    name: &str,
    first: u64,
    count: u64,
) -> Result<Change, NamespaceError> {
    let f = m
        .files
        .get(name)
        .ok_or_else(|| NamespaceError::NotFound(name.to_owned()))?;
    let end = first
        .checked_add(count)
        .filter(|&e| e <= f.map.len() as u64)
        .ok_or_else(|| NamespaceError::OutOfRange(name.to_owned()))?;
    let range = first as usize..end as usize;
    if f.preallocated || f.map[range.clone()].iter().all(|&p| p == HOLE) {
        return Ok(Change {
            next: m.clone(),
            zero: Vec::new(),
        });
    }
    let mut next = bump(m);
    if let Some(e) = next.files.get_mut(name) {
        e.map[range].fill(HOLE);
    }
    Ok(Change {
        next,
        zero: Vec::new(),
    })
}

/// Logical extent index containing byte `offset` of a file.
pub fn extent_index(offset: u64) -> u64 {
    offset / EXTENT_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::MAX_FILE_SIZE;

    #[test]
    fn thin_over_commit_stops_at_the_volume_wide_map_bound() {
        use crate::format::MAX_MAPPED_EXTENTS;
        let per_file = MAX_FILE_SIZE / EXTENT_SIZE;
        let fit = MAX_MAPPED_EXTENTS / per_file;
        let mut m = Metadata::default();
        for i in 0..fit {
            m = create(&m, 4, &format!("t{i}"), MAX_FILE_SIZE, false)
                .unwrap()
                .next;
        }
        let e = create(&m, 4, "one-more", EXTENT_SIZE, false).unwrap_err();
        assert_eq!(
            e,
            NamespaceError::OverCommitted {
                total: MAX_MAPPED_EXTENTS + 1,
                max: MAX_MAPPED_EXTENTS
            }
        );
        assert!(e.to_string().contains("Too much thin over-commit"), "{e}");
        // growing a file past the bound is refused the same way
        let mut m = delete(&m, "t0").unwrap().next;
        for name in ["r", "s"] {
            m = create(&m, 4, name, EXTENT_SIZE, false).unwrap().next;
        }
        let e = resize(&m, 4, "s", MAX_FILE_SIZE).unwrap_err();
        assert_eq!(
            e,
            NamespaceError::OverCommitted {
                total: MAX_MAPPED_EXTENTS + 1,
                max: MAX_MAPPED_EXTENTS
            }
        );
        // without "r" it fits exactly
        let m = delete(&m, "r").unwrap().next;
        assert!(resize(&m, 4, "s", MAX_FILE_SIZE).is_ok());
    }

    #[test]
    fn resizing_past_the_largest_file_is_a_typed_error_naming_size_and_range() {
        let m = create(&Metadata::default(), 4, "a", EXTENT_SIZE, false)
            .unwrap()
            .next;
        for size in [u64::MAX, u64::MAX - EXTENT_SIZE + 2, MAX_FILE_SIZE + 1] {
            let e = resize(&m, 4, "a", size).unwrap_err();
            assert!(
                matches!(e, NamespaceError::InvalidSize { size: s, .. } if s == size),
                "{e}"
            );
            let text = e.to_string();
            assert!(
                text.contains(&size.to_string()) && text.contains("1 TiB"),
                "{text}"
            );
        }
        // The largest size is accepted for a thin file, and the map has one hole per extent.
        let c = resize(&m, 4, "a", MAX_FILE_SIZE).unwrap();
        assert_eq!(
            c.next.files["a"].map.len() as u64,
            MAX_FILE_SIZE / EXTENT_SIZE
        );
        // A preallocated file cannot outgrow the extents the volume has.
        let p = create(&Metadata::default(), 4, "p", EXTENT_SIZE, true)
            .unwrap()
            .next;
        assert!(matches!(
            resize(&p, 4, "p", 5 * EXTENT_SIZE),
            Err(NamespaceError::NoSpace { needed: 4, free: 3 })
        ));
    }

    #[test]
    fn enospc_leaves_state_untouched_and_reports_counts() {
        let m = Metadata::default();
        let c = create(&m, 4, "a", 3 * EXTENT_SIZE, true).unwrap();
        assert_eq!(c.zero.len(), 3);
        let err = create(&c.next, 4, "b", 2 * EXTENT_SIZE, true).unwrap_err();
        assert_eq!(err, NamespaceError::NoSpace { needed: 2, free: 1 });
        assert!(matches!(
            resize(&c.next, 4, "a", 5 * EXTENT_SIZE),
            Err(NamespaceError::NoSpace { .. })
        ));
    }

    #[test]
    fn thin_files_allocate_on_demand_and_deleted_extents_are_reused_zeroed() {
        let m = Metadata::default();
        let c = create(&m, 2, "t", 2 * EXTENT_SIZE, false).unwrap();
        assert!(c.zero.is_empty());
        let c = allocate(&c.next, 2, "t", 1).unwrap();
        assert_eq!(c.zero, vec![0]);
        assert_eq!(c.next.files["t"].map, vec![HOLE, 0]);
        let c = delete(&c.next, "t").unwrap();
        let c = create(&c.next, 2, "u", EXTENT_SIZE, true).unwrap();
        assert_eq!(
            c.zero,
            vec![0],
            "a reused extent must be zeroed before it is mapped"
        );
    }

    #[test]
    fn thin_files_over_commit_the_volume_and_enospc_comes_at_allocation() {
        // Regression (docs quick start): a 20 GiB thin file on an 8 GiB volume is refused.
        let m = Metadata::default();
        let c = create(&m, 2, "big", 20 * EXTENT_SIZE, false).unwrap();
        assert_eq!(c.next.files["big"].map.len(), 20);
        let c = create(&c.next, 2, "big2", 30 * EXTENT_SIZE, false).unwrap();
        let c = allocate(&c.next, 2, "big", 7).unwrap();
        let c = allocate(&c.next, 2, "big2", 29).unwrap();
        let err = allocate(&c.next, 2, "big", 8).unwrap_err();
        assert_eq!(err, NamespaceError::NoSpace { needed: 1, free: 0 });
        assert!(
            err.to_string()
                .contains("thin files take them at first write")
        );
        // A preallocated file still has to fit.
        assert_eq!(
            create(&Metadata::default(), 2, "p", 3 * EXTENT_SIZE, true).unwrap_err(),
            NamespaceError::NoSpace { needed: 3, free: 2 }
        );
        assert!(matches!(
            create(&m, 2, "huge", MAX_FILE_SIZE + 1, false),
            Err(NamespaceError::InvalidSize { .. })
        ));
        assert!(matches!(
            resize(&c.next, 2, "big", MAX_FILE_SIZE + 1),
            Err(NamespaceError::InvalidSize { .. })
        ));
        // On a volume larger than 1 TiB a file may be as large as the volume (format 1 allowed it).
        let n = 1u32 << 21;
        let vol = u64::from(n) * EXTENT_SIZE;
        assert!(create(&m, n, "whole", vol, false).is_ok());
        assert!(matches!(
            create(&m, n, "whole", vol + 1, false),
            Err(NamespaceError::InvalidSize { .. })
        ));
    }

    #[test]
    fn deallocate_frees_thin_extents_for_reuse_and_keeps_preallocated_ones() {
        let m = Metadata::default();
        let c = create(&m, 3, "t", 3 * EXTENT_SIZE, false).unwrap();
        let c = allocate(&c.next, 3, "t", 0).unwrap();
        let c = allocate(&c.next, 3, "t", 1).unwrap();
        let c = allocate(&c.next, 3, "t", 2).unwrap();
        assert_eq!(c.next.free_extents(3), 0);
        let seq = c.next.seq;
        let d = deallocate(&c.next, "t", 1, 2).unwrap();
        assert_eq!(d.next.seq, seq + 1);
        assert_eq!(d.next.files["t"].map, vec![0, HOLE, HOLE]);
        assert_eq!(d.next.free_extents(3), 2);
        // Already holes: nothing to commit.
        assert_eq!(deallocate(&d.next, "t", 1, 2).unwrap().next.seq, d.next.seq);
        assert!(matches!(
            deallocate(&d.next, "t", 2, 2),
            Err(NamespaceError::OutOfRange(_))
        ));
        // A freed extent is zeroed before it is mapped again.
        let r = allocate(&d.next, 3, "t", 2).unwrap();
        assert_eq!(r.zero, vec![1]);
        let p = create(&Metadata::default(), 2, "p", 2 * EXTENT_SIZE, true).unwrap();
        let keep = deallocate(&p.next, "p", 0, 2).unwrap();
        assert_eq!(keep.next, p.next, "preallocated files keep their extents");
    }

    #[test]
    fn clashes_bad_names_shrink_and_busy_delete_are_refused() {
        let c = create(&Metadata::default(), 8, "a", 10, false).unwrap();
        assert_eq!(
            create(&c.next, 8, "a", 10, false).unwrap_err(),
            NamespaceError::Exists("a".into())
        );
        assert!(matches!(
            create(&c.next, 8, "../x", 10, false),
            Err(NamespaceError::InvalidName(_))
        ));
        assert!(matches!(
            resize(&c.next, 8, "a", 5),
            Err(NamespaceError::InvalidSize { .. })
        ));
        let mut held = c.next.clone();
        held.files.get_mut("a").unwrap().lease.holder = Some(2);
        assert!(matches!(
            delete(&held, "a"),
            Err(NamespaceError::Busy { holder: 2, .. })
        ));
    }
}
