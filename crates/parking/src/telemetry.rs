//! Telemetry from `/proc` and `/sys`, under configurable roots so tests can use a fake tree.
//!
//! * `/proc/stat` `cpuN` lines → per-CPU busy and total jiffies; deltas give busy fractions;
//! * `/proc/PID/task/TID/schedstat` → a thread's run and run-queue wait time (ns);
//! * `/proc/PID/task/TID/stat` field 39 → the CPU the thread last ran on;
//! * `/sys/devices/system/cpu/cpuN/cpuidle/stateK/{name,usage,time}` → C-state residency.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where `/proc` and `/sys` are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPaths {
    /// Normally `/proc`.
    pub proc_root: PathBuf,
    /// Normally `/sys`.
    pub sys_root: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        HostPaths {
            proc_root: "/proc".into(),
            sys_root: "/sys".into(),
        }
    }
}

/// Cumulative jiffies of one CPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// user + nice + system + irq + softirq + steal.
    pub busy: u64,
    /// busy + idle + iowait.
    pub total: u64,
}

/// Why a telemetry read failed.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("Cannot read {path}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("Malformed {path}: {what}")]
    Malformed { path: String, what: String },
}

fn read(path: &Path) -> Result<String, TelemetryError> {
    fs::read_to_string(path).map_err(|source| TelemetryError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Reads the per-CPU lines of `/proc/stat`.
pub fn read_cpu_times(paths: &HostPaths) -> Result<BTreeMap<usize, CpuTimes>, TelemetryError> {
    let path = paths.proc_root.join("stat");
    let text = read(&path)?;
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let Some(id) = f
            .next()
            .and_then(|c| c.strip_prefix("cpu"))
            .filter(|s| !s.is_empty())
        else {
            continue;
        };
        let id: usize = id.parse().map_err(|_| TelemetryError::Malformed {
            path: path.display().to_string(),
            what: format!("bad CPU name in `{line}`"),
        })?;
        let v: Vec<u64> = f.map(|x| x.parse().unwrap_or(0)).collect();
        let g = |i: usize| v.get(i).copied().unwrap_or(0);
        let busy = g(0) + g(1) + g(2) + g(5) + g(6) + g(7);
        out.insert(
            id,
            CpuTimes {
                busy,
                total: busy + g(3) + g(4),
            },
        );
    }
    if out.is_empty() {
        return Err(TelemetryError::Malformed {
            path: path.display().to_string(),
            what: "no cpuN lines".into(),
        });
    }
    Ok(out)
}

/// Busy fraction of each CPU in `cpus` between two reads (0 for a CPU with no elapsed time).
pub fn busy_fractions(
    prev: &BTreeMap<usize, CpuTimes>,
    cur: &BTreeMap<usize, CpuTimes>,
    cpus: &[usize],
) -> Vec<f64> {
    cpus.iter()
        .map(|id| match (prev.get(id), cur.get(id)) {
            (Some(a), Some(b)) if b.total > a.total => {
                (b.busy.saturating_sub(a.busy) as f64 / (b.total - a.total) as f64).clamp(0.0, 1.0)
            }
            _ => 0.0,
        })
        .collect()
}

/// Scheduler figures of one thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadSched {
    /// Time on a CPU, ns (cumulative).
    pub run_ns: u64,
    /// Time runnable but waiting on a run queue, ns (cumulative).
    pub wait_ns: u64,
    /// CPU it last ran on.
    pub last_cpu: Option<usize>,
}

/// Reads a thread's schedstat and last CPU. `Err` with `NotFound` means the thread is gone.
pub fn read_thread(paths: &HostPaths, pid: u32, tid: u32) -> io::Result<ThreadSched> {
    let dir = paths.proc_root.join(format!("{pid}/task/{tid}"));
    let sched = fs::read_to_string(dir.join("schedstat"))?;
    let mut f = sched
        .split_whitespace()
        .map(|x| x.parse::<u64>().unwrap_or(0));
    let (run_ns, wait_ns) = (f.next().unwrap_or(0), f.next().unwrap_or(0));
    let last_cpu = fs::read_to_string(dir.join("stat")).ok().and_then(|s| {
        let after = &s[s.rfind(')')? + 1..];
        // Fields after the command: state is field 3, processor is field 39.
        after
            .split_whitespace()
            .nth(39 - 3)
            .and_then(|x| x.parse().ok())
    });
    Ok(ThreadSched {
        run_ns,
        wait_ns,
        last_cpu,
    })
}

/// A thread's `schedstat` and `stat` kept open and re-read with `pread` at offset 0, which procfs
/// regenerates: no path lookup per sample. The descriptors stay bound to that very task, so a reused
/// thread id can never be read by mistake; once the task is gone, reads fail.
#[derive(Debug)]
pub struct ThreadReader {
    schedstat: fs::File,
    stat: fs::File,
    buf: Vec<u8>,
}

impl ThreadReader {
    /// Opens the files of `tid` in process `pid`. `NotFound` means the thread is gone.
    pub fn open(paths: &HostPaths, pid: u32, tid: u32) -> io::Result<ThreadReader> {
        let dir = paths.proc_root.join(format!("{pid}/task/{tid}"));
        Ok(ThreadReader {
            schedstat: fs::File::open(dir.join("schedstat"))?,
            stat: fs::File::open(dir.join("stat"))?,
            buf: vec![0; 1024],
        })
    }

    fn pread(file: &fs::File, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = file.read_at(buf, 0)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::NotFound, "thread is gone"));
        }
        Ok(n)
    }

    /// The CPU the thread last ran on (one `pread` of `stat`).
    pub fn last_cpu(&mut self) -> io::Result<Option<usize>> {
        let n = Self::pread(&self.stat, &mut self.buf)?;
        let text = String::from_utf8_lossy(&self.buf[..n]);
        Ok(text.rfind(')').and_then(|i| {
            text[i + 1..]
                .split_whitespace()
                .nth(39 - 3)
                .and_then(|x| x.parse().ok())
        }))
    }

    /// Samples the thread. `where_ran` also reads the CPU it last ran on (one more read; a caller
    /// that knows it — the thread may run on one CPU only — passes false and gets `None`).
    pub fn read(&mut self, where_ran: bool) -> io::Result<ThreadSched> {
        let n = Self::pread(&self.schedstat, &mut self.buf)?;
        let text = String::from_utf8_lossy(&self.buf[..n]);
        let mut f = text
            .split_whitespace()
            .map(|x| x.parse::<u64>().unwrap_or(0));
        let (run_ns, wait_ns) = (f.next().unwrap_or(0), f.next().unwrap_or(0));
        let last_cpu = if where_ran { self.last_cpu()? } else { None };
        Ok(ThreadSched {
            run_ns,
            wait_ns,
            last_cpu,
        })
    }
}

/// Reads `Cpus_allowed_list` of a thread from `/proc/PID/task/TID/status`.
pub fn read_allowed_list(paths: &HostPaths, pid: u32, tid: u32) -> io::Result<String> {
    let s = fs::read_to_string(paths.proc_root.join(format!("{pid}/task/{tid}/status")))?;
    s.lines()
        .find_map(|l| {
            l.strip_prefix("Cpus_allowed_list:")
                .map(|v| v.trim().to_string())
        })
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no Cpus_allowed_list"))
}

/// Cumulative counters of one cpuidle state of one CPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdleState {
    /// State name (`POLL`, `C1`, `C6`, …).
    pub name: String,
    /// Times entered.
    pub usage: u64,
    /// Time spent, µs.
    pub time_us: u64,
}

/// Reads `cpuN/cpuidle/stateK` for one CPU; empty when the host exposes no cpuidle.
pub fn read_idle_states(paths: &HostPaths, cpu: usize) -> Vec<IdleState> {
    let dir = paths
        .sys_root
        .join(format!("devices/system/cpu/cpu{cpu}/cpuidle"));
    let mut out = Vec::new();
    for k in 0.. {
        let s = dir.join(format!("state{k}"));
        let Ok(name) = fs::read_to_string(s.join("name")) else {
            break;
        };
        let num = |f: &str| {
            fs::read_to_string(s.join(f))
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        out.push(IdleState {
            name: name.trim().to_string(),
            usage: num("usage"),
            time_us: num("time"),
        });
    }
    out
}

/// Residency of each idle state between two reads, as a fraction of `elapsed_us`.
pub fn residency(prev: &[IdleState], cur: &[IdleState], elapsed_us: u64) -> Vec<(String, f64)> {
    cur.iter()
        .map(|c| {
            let before = prev
                .iter()
                .find(|p| p.name == c.name)
                .map_or(c.time_us, |p| p.time_us);
            let d = c.time_us.saturating_sub(before) as f64;
            (
                c.name.clone(),
                if elapsed_us == 0 {
                    0.0
                } else {
                    (d / elapsed_us as f64).min(1.0)
                },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake() -> (tempfile::TempDir, HostPaths) {
        let dir = tempfile::tempdir().unwrap();
        let paths = HostPaths {
            proc_root: dir.path().join("proc"),
            sys_root: dir.path().join("sys"),
        };
        fs::create_dir_all(&paths.proc_root).unwrap();
        (dir, paths)
    }

    #[test]
    fn proc_stat_deltas_give_busy_fractions() {
        let (_d, paths) = fake();
        let stat = |a: &str| fs::write(paths.proc_root.join("stat"), a).unwrap();
        stat("cpu  1 1 1 1\ncpu0 10 0 10 80 0 0 0 0 0 0\ncpu1 0 0 0 100 0 0 0 0\nintr 5\n");
        let a = read_cpu_times(&paths).unwrap();
        stat("cpu  1 1 1 1\ncpu0 40 0 20 120 0 5 5 0 0 0\ncpu1 0 0 0 200 0 0 0 0\nintr 5\n");
        let b = read_cpu_times(&paths).unwrap();
        // cpu0: busy +50 of +90 total; cpu1 idle; cpu7 unknown → 0.
        let f = busy_fractions(&a, &b, &[0, 1, 7]);
        assert!((f[0] - 50.0 / 90.0).abs() < 1e-12);
        assert_eq!(&f[1..], &[0.0, 0.0]);
        fs::write(paths.proc_root.join("stat"), "intr 5\n").unwrap();
        assert!(
            read_cpu_times(&paths)
                .unwrap_err()
                .to_string()
                .contains("no cpuN lines")
        );
    }

    #[test]
    fn thread_files_and_vanished_threads() {
        let (_d, paths) = fake();
        let t = paths.proc_root.join("7/task/9");
        fs::create_dir_all(&t).unwrap();
        fs::write(t.join("schedstat"), "1500 300 12\n").unwrap();
        let mut stat = "9 (vcpu 0) S".to_string();
        for i in 4..=52 {
            stat.push_str(&format!(" {}", if i == 39 { 1 } else { 0 }));
        }
        fs::write(t.join("stat"), stat).unwrap();
        fs::write(t.join("status"), "Name:\tx\nCpus_allowed_list:\t0-1\n").unwrap();
        let s = read_thread(&paths, 7, 9).unwrap();
        assert_eq!(
            s,
            ThreadSched {
                run_ns: 1500,
                wait_ns: 300,
                last_cpu: Some(1)
            }
        );
        assert_eq!(read_allowed_list(&paths, 7, 9).unwrap(), "0-1");
        let mut r = ThreadReader::open(&paths, 7, 9).unwrap();
        assert_eq!(r.read(true).unwrap(), s);
        assert_eq!(r.read(false).unwrap().last_cpu, None);
        fs::write(t.join("schedstat"), "2500 400 13\n").unwrap();
        assert_eq!(r.read(true).unwrap().run_ns, 2500);
        assert_eq!(
            ThreadReader::open(&paths, 7, 10).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        assert_eq!(
            read_thread(&paths, 7, 10).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn cpuidle_residency() {
        let (_d, paths) = fake();
        let s = |k: usize, name: &str, usage: u64, time: u64| {
            let d = paths
                .sys_root
                .join(format!("devices/system/cpu/cpu1/cpuidle/state{k}"));
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("name"), format!("{name}\n")).unwrap();
            fs::write(d.join("usage"), usage.to_string()).unwrap();
            fs::write(d.join("time"), time.to_string()).unwrap();
        };
        s(0, "POLL", 5, 100);
        s(1, "C6", 2, 1000);
        let a = read_idle_states(&paths, 1);
        s(1, "C6", 9, 91_000);
        let b = read_idle_states(&paths, 1);
        assert_eq!(
            residency(&a, &b, 100_000),
            vec![("POLL".into(), 0.0), ("C6".into(), 0.9)]
        );
        assert!(read_idle_states(&paths, 0).is_empty());
    }
}
