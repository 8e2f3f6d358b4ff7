//! PlanetLab trace loading: a folder of day folders, a `traces.tar.xz` archive or the copy built into
//! the binary ([`crate::bundled`]); the VM order (sorted names, CloudSim's recorded order, or an order
//! file); strict parsing with errors that name the file and line.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::workload::SAMPLES;

/// The largest trace file read, bytes (a PlanetLab file of 288 samples is under 1 KiB).
pub const MAX_TRACE_FILE_BYTES: u64 = 64 << 10;
/// The most entries an archive may hold.
pub const MAX_ARCHIVE_ENTRIES: usize = 200_000;
/// The most trace bytes kept from one archive (the built-in ten days hold 18 MB).
pub const MAX_ARCHIVE_BYTES: u64 = 256 << 20;

/// Error reading traces.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// A file or archive is larger than a bound, checked before anything of its size is read.
    #[error("{what} is too large: {found} {unit}, more than the limit {limit} ({limit_name})")]
    TooLarge {
        /// The file, or the archive.
        what: String,
        /// Its size or count.
        found: u64,
        /// The bound.
        limit: u64,
        /// Bytes or entries.
        unit: &'static str,
        /// The bound's name.
        limit_name: &'static str,
    },
    /// A file or folder could not be read.
    #[error("Cannot read {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The day is not in the trace set.
    #[error("Day {day} not found in {path} (days present: {present})")]
    NoDay {
        /// Requested day.
        day: String,
        /// Trace source.
        path: PathBuf,
        /// Days that are there.
        present: String,
    },
    /// A trace file is malformed.
    #[error("{file}:{line}: {msg}")]
    Parse {
        /// File (day/name).
        file: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// No CloudSim file order is recorded for the day.
    #[error(
        "No CloudSim file order is recorded for day {day} (recorded: {recorded}); use `--trace-order sorted` or an order file"
    )]
    NoRecordedOrder {
        /// Requested day.
        day: String,
        /// Days that have one.
        recorded: String,
    },
    /// The order file does not match the day's files.
    #[error("{file}:{line}: {msg}")]
    Order {
        /// Order file.
        file: String,
        /// 1-based line (0 when about the whole file).
        line: usize,
        /// What is wrong.
        msg: String,
    },
}

/// The traces of one day, in VM order.
#[derive(Debug, Clone)]
pub struct DayTraces {
    /// Day folder name (YYYYMMDD).
    pub day: String,
    /// File names, one per VM.
    pub names: Vec<String>,
    /// Samples (percent) per VM.
    pub samples: Vec<[u8; SAMPLES]>,
}

/// A set of PlanetLab day folders.
#[derive(Debug)]
pub enum TraceSet {
    /// A folder holding `<day>/<file>`.
    Dir(PathBuf),
    /// An archive (a file, or the copy built into the binary), decompressed in memory: its label
    /// for messages, and day → (file name, bytes).
    Archive(PathBuf, BTreeMap<String, Vec<(String, Vec<u8>)>>),
}

/// Which trace goes to which VM (the reference code gives VM types in four contiguous blocks of
/// this order, so it changes the results).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceOrder {
    /// File names sorted bytewise.
    Sorted,
    /// The order CloudSim 3.0.3's `File.listFiles()` returned, as recorded for the ten PlanetLab days
    /// (built into the binary, see [`crate::bundled`]).
    CloudSim,
    /// An order file: one trace name per line, listing exactly the day's files.
    File(PathBuf),
}

impl std::fmt::Display for TraceOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TraceOrder::Sorted => f.write_str("sorted names"),
            TraceOrder::CloudSim => f.write_str("CloudSim 3.0.3 file order"),
            TraceOrder::File(p) => write!(f, "order file {}", p.display()),
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TraceError + '_ {
    move |source| TraceError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl TraceSet {
    /// Open a folder or a `.tar.xz` archive.
    pub fn open(path: &Path) -> Result<Self, TraceError> {
        Self::open_filtered(path, None)
    }

    /// Open for one day only: an archive is decompressed only as far as that day's files go.
    pub fn open_day(path: &Path, day: &str) -> Result<Self, TraceError> {
        Self::open_filtered(path, Some(day))
    }

    /// The ten PlanetLab days built into the binary.
    pub fn bundled() -> Result<Self, TraceError> {
        Self::read_archive(
            Path::new(crate::bundled::TRACES_LABEL),
            crate::bundled::TRACES_XZ,
            None,
        )
    }

    /// One day of the built-in traces (decompressed only as far as that day's files go).
    pub fn bundled_day(day: &str) -> Result<Self, TraceError> {
        Self::read_archive(
            Path::new(crate::bundled::TRACES_LABEL),
            crate::bundled::TRACES_XZ,
            Some(day),
        )
    }

    fn open_filtered(path: &Path, only: Option<&str>) -> Result<Self, TraceError> {
        let meta = std::fs::metadata(path).map_err(io(path))?;
        if meta.is_dir() {
            return Ok(TraceSet::Dir(path.to_path_buf()));
        }
        let file = std::fs::File::open(path).map_err(io(path))?;
        Self::read_archive(path, std::io::BufReader::new(file), only)
    }

    fn read_archive(
        path: &Path,
        reader: impl Read,
        only: Option<&str>,
    ) -> Result<Self, TraceError> {
        let mut archive = tar::Archive::new(xz2::read::XzDecoder::new(reader));
        let mut days: BTreeMap<String, Vec<(String, Vec<u8>)>> = BTreeMap::new();
        let (mut entries, mut kept) = (0usize, 0u64);
        for entry in archive.entries().map_err(io(path))? {
            let mut entry = entry.map_err(io(path))?;
            entries += 1;
            if entries > MAX_ARCHIVE_ENTRIES {
                return Err(TraceError::TooLarge {
                    what: format!("archive {}", path.display()),
                    found: entries as u64,
                    limit: MAX_ARCHIVE_ENTRIES as u64,
                    unit: "entries",
                    limit_name: "MAX_ARCHIVE_ENTRIES",
                });
            }
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let p = entry.path().map_err(io(path))?.into_owned();
            let parts: Vec<String> = p
                .components()
                .filter_map(|c| match c {
                    std::path::Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
                    _ => None,
                })
                .collect();
            if parts.len() < 2 {
                continue;
            }
            let day = parts[parts.len() - 2].clone();
            let name = parts[parts.len() - 1].clone();
            if let Some(only) = only
                && day != only
            {
                if days.contains_key(only) {
                    // the archive keeps each day's files together: the day is complete
                    break;
                }
                days.entry(day).or_default();
                continue;
            }
            let size = entry.size();
            let what = || format!("{}/{day}/{name}", path.display());
            if size > MAX_TRACE_FILE_BYTES {
                return Err(TraceError::TooLarge {
                    what: what(),
                    found: size,
                    limit: MAX_TRACE_FILE_BYTES,
                    unit: "bytes",
                    limit_name: "MAX_TRACE_FILE_BYTES",
                });
            }
            kept += size;
            if kept > MAX_ARCHIVE_BYTES {
                return Err(TraceError::TooLarge {
                    what: format!("archive {}", path.display()),
                    found: kept,
                    limit: MAX_ARCHIVE_BYTES,
                    unit: "bytes of traces",
                    limit_name: "MAX_ARCHIVE_BYTES",
                });
            }
            // The header's size is bounded above; the read is bounded by it too.
            let mut bytes = Vec::with_capacity(size as usize);
            (&mut entry)
                .take(MAX_TRACE_FILE_BYTES)
                .read_to_end(&mut bytes)
                .map_err(io(path))?;
            days.entry(day).or_default().push((name, bytes));
        }
        Ok(TraceSet::Archive(path.to_path_buf(), days))
    }

    fn path(&self) -> &Path {
        match self {
            TraceSet::Dir(p) | TraceSet::Archive(p, _) => p,
        }
    }

    /// Day folders present, sorted.
    pub fn days(&self) -> Result<Vec<String>, TraceError> {
        match self {
            TraceSet::Archive(_, d) => Ok(d.keys().cloned().collect()),
            TraceSet::Dir(p) => {
                let mut out = Vec::new();
                for e in std::fs::read_dir(p).map_err(io(p))? {
                    let e = e.map_err(io(p))?;
                    if e.file_type().map_err(io(p))?.is_dir() {
                        out.push(e.file_name().to_string_lossy().into_owned());
                    }
                }
                out.sort();
                Ok(out)
            }
        }
    }

    /// Load one day, the VMs in the given order (an order must list exactly the day's files).
    pub fn load_day(&self, day: &str, order: &TraceOrder) -> Result<DayTraces, TraceError> {
        let mut files: Vec<(String, Vec<u8>)> = match self {
            TraceSet::Archive(p, d) => d.get(day).cloned().ok_or_else(|| TraceError::NoDay {
                day: day.to_string(),
                path: p.clone(),
                present: d.keys().cloned().collect::<Vec<_>>().join(", "),
            })?,
            TraceSet::Dir(p) => {
                let dir = p.join(day);
                if !dir.is_dir() {
                    return Err(TraceError::NoDay {
                        day: day.to_string(),
                        path: p.clone(),
                        present: self.days()?.join(", "),
                    });
                }
                let mut v = Vec::new();
                for e in std::fs::read_dir(&dir).map_err(io(&dir))? {
                    let e = e.map_err(io(&dir))?;
                    if !e.file_type().map_err(io(&dir))?.is_file() {
                        continue;
                    }
                    let len = e.metadata().map_err(io(&e.path()))?.len();
                    if len > MAX_TRACE_FILE_BYTES {
                        return Err(TraceError::TooLarge {
                            what: e.path().display().to_string(),
                            found: len,
                            limit: MAX_TRACE_FILE_BYTES,
                            unit: "bytes",
                            limit_name: "MAX_TRACE_FILE_BYTES",
                        });
                    }
                    let bytes = std::fs::read(e.path()).map_err(io(&e.path()))?;
                    v.push((e.file_name().to_string_lossy().into_owned(), bytes));
                }
                v
            }
        };
        files.sort_by(|a, b| a.0.cmp(&b.0));
        match order {
            TraceOrder::Sorted => {}
            TraceOrder::CloudSim => {
                let text = crate::bundled::cloudsim_order(day).ok_or_else(|| {
                    TraceError::NoRecordedOrder {
                        day: day.to_string(),
                        recorded: crate::bundled::cloudsim_order_days().join(", "),
                    }
                })?;
                let label = format!("{}/{day}.txt", crate::bundled::ORDER_LABEL);
                files = apply_order(files, &label, text)?;
            }
            TraceOrder::File(path) => {
                let text = std::fs::read_to_string(path).map_err(io(path))?;
                files = apply_order(files, &path.display().to_string(), &text)?;
            }
        }
        let mut names = Vec::with_capacity(files.len());
        let mut samples = Vec::with_capacity(files.len());
        for (name, bytes) in files {
            samples.push(parse_trace(
                &format!("{}/{day}/{name}", self.path().display()),
                &bytes,
            )?);
            names.push(name);
        }
        Ok(DayTraces {
            day: day.to_string(),
            names,
            samples,
        })
    }
}

fn apply_order(
    files: Vec<(String, Vec<u8>)>,
    label: &str,
    text: &str,
) -> Result<Vec<(String, Vec<u8>)>, TraceError> {
    let mut by_name: BTreeMap<String, Vec<u8>> = files.into_iter().collect();
    let total = by_name.len();
    let mut out = Vec::with_capacity(total);
    for (i, line) in text.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        let bytes = by_name.remove(line).ok_or_else(|| TraceError::Order {
            file: label.to_string(),
            line: i + 1,
            msg: format!("`{line}` is not a trace file of this day (or is listed twice)"),
        })?;
        out.push((line.to_string(), bytes));
    }
    if let Some(missing) = by_name.keys().next() {
        return Err(TraceError::Order {
            file: label.to_string(),
            line: 0,
            msg: format!(
                "lists {} of the day's {total} files; `{missing}` is missing",
                out.len()
            ),
        });
    }
    Ok(out)
}

/// Parse one trace: exactly 288 lines, each an integer percentage 0..=100.
pub fn parse_trace(file: &str, bytes: &[u8]) -> Result<[u8; SAMPLES], TraceError> {
    let err = |line: usize, msg: String| TraceError::Parse {
        file: file.to_string(),
        line,
        msg,
    };
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        err(line, "not UTF-8 text".to_string())
    })?;
    let mut out = [0u8; SAMPLES];
    let mut n = 0;
    for (i, raw) in text.lines().enumerate() {
        let s = raw.trim();
        if s.is_empty() && i >= SAMPLES {
            continue;
        }
        if n == SAMPLES {
            return Err(err(i + 1, format!("more than {SAMPLES} samples")));
        }
        let v: i64 = s
            .parse()
            .map_err(|_| err(i + 1, format!("`{s}` is not an integer percentage")))?;
        if !(0..=100).contains(&v) {
            return Err(err(i + 1, format!("{v} is outside 0..=100")));
        }
        out[n] = v as u8;
        n += 1;
    }
    if n < SAMPLES {
        return Err(err(n + 1, format!("only {n} samples, expected {SAMPLES}")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::expect;

    fn good() -> String {
        (0..SAMPLES).map(|i| format!("{}\n", i % 100)).collect()
    }

    /// A `.tar.xz` of the given (path, claimed size, data) entries, headers as written.
    fn archive(entries: &[(&str, u64, &[u8])]) -> Vec<u8> {
        let mut tar = Vec::new();
        for &(path, size, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_path(path).unwrap();
            h.set_size(size);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_cksum();
            tar.extend_from_slice(h.as_bytes());
            tar.extend_from_slice(data);
            tar.resize(tar.len().div_ceil(512) * 512, 0);
        }
        tar.resize(tar.len() + 1024, 0);
        let mut xz = Vec::new();
        let mut enc = xz2::write::XzEncoder::new(&mut xz, 1);
        std::io::Write::write_all(&mut enc, &tar).unwrap();
        enc.finish().unwrap();
        xz
    }

    #[test]
    fn archive_entries_are_bounded_before_they_are_read() {
        let label = Path::new("t.tar.xz");
        // A header that claims a terabyte, with no data behind it: refused by its claim.
        let huge = archive(&[("20110303/vm1", 1 << 40, b"")]);
        let e = TraceSet::read_archive(label, &huge[..], None).unwrap_err();
        expect![[r#"t.tar.xz/20110303/vm1 is too large: 1099511627776 bytes, more than the limit 65536 (MAX_TRACE_FILE_BYTES)"#]]
            .assert_eq(&e.to_string());
        let big = vec![b'1'; (MAX_TRACE_FILE_BYTES + 1) as usize];
        let over = archive(&[("20110303/vm1", big.len() as u64, &big)]);
        assert!(matches!(
            TraceSet::read_archive(label, &over[..], None),
            Err(TraceError::TooLarge {
                limit_name: "MAX_TRACE_FILE_BYTES",
                ..
            })
        ));
        // Within the bound: read whole.
        let g = good();
        let ok = archive(&[("20110303/vm1", g.len() as u64, g.as_bytes())]);
        let set = TraceSet::read_archive(label, &ok[..], None).unwrap();
        let day = set.load_day("20110303", &TraceOrder::Sorted).unwrap();
        assert_eq!(day.names, ["vm1"]);
    }

    #[test]
    fn a_folder_trace_file_over_the_bound_is_refused_naming_it() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("20110303")).unwrap();
        let f = t.path().join("20110303/vm1");
        std::fs::File::create(&f)
            .unwrap()
            .set_len(MAX_TRACE_FILE_BYTES + 1)
            .unwrap();
        let e = TraceSet::open(t.path())
            .unwrap()
            .load_day("20110303", &TraceOrder::Sorted)
            .unwrap_err();
        assert!(
            e.to_string().contains("vm1 is too large")
                && e.to_string().contains("MAX_TRACE_FILE_BYTES"),
            "{e}"
        );
    }

    #[test]
    fn malformed_traces_are_rejected_with_file_and_line() {
        let mut bad_value = good();
        bad_value = bad_value.replacen("7\n", "x7\n", 1);
        let short: String = (0..10).map(|_| "5\n").collect();
        let long = good() + "5\n";
        let mut out_of_range = good();
        out_of_range = out_of_range.replacen("3\n", "300\n", 1);
        let mut out = String::new();
        for (name, text) in [
            ("bad", bad_value),
            ("short", short),
            ("long", long),
            ("range", out_of_range),
        ] {
            out += &format!(
                "{}\n",
                parse_trace(&format!("d/{name}"), text.as_bytes()).unwrap_err()
            );
        }
        out += &format!(
            "{}\n",
            parse_trace("d/bin", &[b'1', b'\n', 0xff, 0xfe]).unwrap_err()
        );
        expect![[r#"
            d/bad:8: `x7` is not an integer percentage
            d/short:11: only 10 samples, expected 288
            d/long:289: more than 288 samples
            d/range:4: 300 is outside 0..=100
            d/bin:2: not UTF-8 text
        "#]]
        .assert_eq(&out);
        assert_eq!(parse_trace("ok", good().as_bytes()).unwrap()[99], 99);
    }

    #[test]
    fn folder_and_order_file() {
        let dir = tempfile::tempdir().unwrap();
        let day = dir.path().join("20990101");
        std::fs::create_dir(&day).unwrap();
        for n in ["b", "a", "c d"] {
            std::fs::write(day.join(n), good()).unwrap();
        }
        let set = TraceSet::open(dir.path()).unwrap();
        assert_eq!(set.days().unwrap(), ["20990101"]);
        let d = set.load_day("20990101", &TraceOrder::Sorted).unwrap();
        assert_eq!(d.names, ["a", "b", "c d"]);
        let order = dir.path().join("order.txt");
        std::fs::write(&order, "c d\na\nb\n").unwrap();
        assert_eq!(
            set.load_day("20990101", &TraceOrder::File(order.clone()))
                .unwrap()
                .names,
            ["c d", "a", "b"]
        );
        std::fs::write(&order, "c d\nzz\n").unwrap();
        let e = set
            .load_day("20990101", &TraceOrder::File(order.clone()))
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with("order.txt:2: `zz` is not a trace file of this day (or is listed twice)"),
            "{e}"
        );
        std::fs::write(&order, "a\n").unwrap();
        let e = set
            .load_day("20990101", &TraceOrder::File(order.clone()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("lists 1 of the day's 3 files"), "{e}");
        let e = set
            .load_day("20990101", &TraceOrder::CloudSim)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "No CloudSim file order is recorded for day 20990101 (recorded: 20110303,"
            ),
            "{e}"
        );
        let e = set
            .load_day("20000101", &TraceOrder::Sorted)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("Day 20000101 not found") && e.contains("20990101"),
            "{e}"
        );
        std::fs::write(day.join("broken"), "1\n2\n").unwrap();
        let e = set
            .load_day("20990101", &TraceOrder::Sorted)
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with("20990101/broken:3: only 2 samples, expected 288"),
            "{e}"
        );
    }
}
