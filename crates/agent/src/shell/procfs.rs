//! What the agent reads from `/proc`: CPU time of threads and of the host, a process's resident
//! memory, and whether a process listens on a TCP port. Parsers take the file's text so they are
//! tested without a live process; the readers around them are thin.

use std::path::Path;

/// Clock ticks per second of the times in `/proc` (`USER_HZ`, 100 on every Linux architecture
/// Tern runs on).
pub const USER_HZ: u64 = 100;

/// `utime + stime` (clock ticks) from the text of `/proc/PID/task/TID/stat` (or `/proc/PID/stat`).
///
/// The command name (field 2) is in parentheses and may hold spaces and `)`: fields are counted
/// after the last `)`.
pub fn parse_stat_cpu_ticks(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    // After the name: state is field 3; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    Some(utime + stime)
}

/// Resident memory in KiB from the text of `/proc/PID/status` (`VmRSS:`).
pub fn parse_status_rss_kib(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resident guest RAM in KiB from the text of `/proc/PID/smaps` of a VMM: the sum of `Rss` over
/// the mappings that hold guest memory, or `None` if there are none.
///
/// The VMM maps each guest RAM region as one private anonymous read-write mapping created with
/// `MAP_NORESERVE` (vm-memory's anonymous regions): `rw-p`, no file, `nr` among its `VmFlags`.
/// glibc's per-thread arenas are `MAP_NORESERVE` too, but their reservations are `---p` and
/// their usable parts grow from 132 KiB; thread stacks are not `nr`. So the `rw-p` `nr`
/// anonymous mappings of at least [`GUEST_RAM_MIN_KIB`] are the guest's RAM — where the kernel
/// merged an arena's usable part into a guest region (as seen on a migration target), that
/// part's few resident pages are counted with it. The resident pages are the ones the guest
/// touched: what a migration's first pass can send (it also skips pages that read as zero).
pub fn parse_smaps_guest_rss_kib(text: &str) -> Option<u64> {
    let ram = parse_smaps_guest_ram(text);
    (!ram.is_empty()).then(|| ram.iter().map(|r| r.rss_kib).sum())
}

/// One guest RAM mapping of a VMM, as [`parse_smaps_guest_rss_kib`] finds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestRam {
    /// Its first address in the VMM.
    pub start: u64,
    /// The address after its last byte.
    pub end: u64,
    /// Resident, KiB.
    pub rss_kib: u64,
}

/// The guest RAM mappings in the text of `/proc/PID/smaps` of a VMM (the rule of
/// [`parse_smaps_guest_rss_kib`]), in address order.
pub fn parse_smaps_guest_ram(text: &str) -> Vec<GuestRam> {
    let mut found = Vec::new();
    // (shape matches so far, start, end, size, rss)
    let mut cur: Option<(bool, u64, u64, u64, u64)> = None;
    let flush = |c: Option<(bool, u64, u64, u64, u64)>, found: &mut Vec<GuestRam>| {
        if let Some((true, start, end, size, rss_kib)) = c
            && size >= GUEST_RAM_MIN_KIB
        {
            found.push(GuestRam {
                start,
                end,
                rss_kib,
            });
        }
    };
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let Some(first) = f.next() else { continue };
        if first.contains('-') && !first.ends_with(':') {
            // a mapping's header: ADDR-ADDR PERMS OFFSET DEV INODE [PATH]
            flush(cur.take(), &mut found);
            let (start, end) = first
                .split_once('-')
                .and_then(|(a, b)| {
                    Some((
                        u64::from_str_radix(a, 16).ok()?,
                        u64::from_str_radix(b, 16).ok()?,
                    ))
                })
                .unwrap_or((0, 0));
            let perms = f.next().unwrap_or("");
            let inode = f.nth(2).unwrap_or("");
            let path = f.next();
            let shape = perms == "rw-p" && inode == "0" && path.is_none() && end > start;
            cur = Some((shape, start, end, 0, 0));
            continue;
        }
        let Some(c) = cur.as_mut() else { continue };
        let value = || f.clone().next().and_then(|v| v.parse::<u64>().ok());
        match first {
            "Size:" => c.3 = value().unwrap_or(0),
            "Rss:" => c.4 = value().unwrap_or(0),
            "VmFlags:" => c.0 &= f.clone().any(|fl| fl == "nr"),
            _ => {}
        }
    }
    flush(cur, &mut found);
    found
}

/// The most pages of the guest RAM range [`NonzeroSampler`] draws (one 8-byte page-map read
/// each) for one estimate.
pub const NONZERO_MAX_DRAWS: u64 = 4096;
/// The most present pages [`NonzeroSampler`] reads (4 KiB each) for one estimate.
pub const NONZERO_MAX_READS: u64 = 512;

/// What a drawn guest page held, as the page map and the VMM's memory showed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrawnPage {
    /// Not present in the page map (never touched, or swapped out).
    Absent,
    /// Present and all zero (a page of zeroes, or a mapping of the shared zero page).
    Zero,
    /// Present and not all zero.
    NonZero,
}

/// The pure part of [`guest_nonzero_kib`]: draws 4 KiB pages uniformly at random (with
/// replacement, from a seeded SplitMix64 generator) over the guest RAM ranges, takes what each
/// held ([`DrawnPage`]) and estimates the RAM that is present and not zero. It stops after
/// [`NONZERO_MAX_DRAWS`] draws or [`NONZERO_MAX_READS`] present pages, whichever comes first, so
/// an estimate costs at most that many reads whatever the RAM's size. Each draw is a Bernoulli
/// trial for "present and not zero", so the share of such draws times the range is unbiased (no
/// layout, huge pages included, can line the draws up with the written pages).
#[derive(Debug, Clone)]
pub struct NonzeroSampler {
    /// (first page index, pages) of each range.
    ranges: Vec<(u64, u64)>,
    total_pages: u64,
    rng: u64,
    draws: u64,
    present: u64,
    nonzero: u64,
}

impl NonzeroSampler {
    /// A sampler over `ram` (page-aligned ranges, as in smaps), its draws fixed by `seed`.
    pub fn new(ram: &[GuestRam], seed: u64) -> Self {
        let ranges: Vec<(u64, u64)> = ram
            .iter()
            .map(|r| {
                (
                    r.start / PAGE,
                    (r.end / PAGE).saturating_sub(r.start / PAGE),
                )
            })
            .filter(|&(_, n)| n > 0)
            .collect();
        NonzeroSampler {
            total_pages: ranges.iter().map(|&(_, n)| n).sum(),
            ranges,
            rng: seed,
            draws: 0,
            present: 0,
            nonzero: 0,
        }
    }

    /// The next page to look at (its address in the VMM divided by 4096), or `None` when the
    /// estimate is complete. Each page given must be [`record`](Self::record)ed before the next.
    pub fn next_page(&mut self) -> Option<u64> {
        if self.total_pages == 0
            || self.draws >= NONZERO_MAX_DRAWS
            || self.present >= NONZERO_MAX_READS
        {
            return None;
        }
        // SplitMix64
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // uniform over the pages (the multiply-shift's bias is below 2^-24 for any RAM size)
        let mut k = ((u128::from(z) * u128::from(self.total_pages)) >> 64) as u64;
        for &(first, n) in &self.ranges {
            if k < n {
                return Some(first + k);
            }
            k -= n;
        }
        None
    }

    /// What the page [`next_page`](Self::next_page) gave held.
    pub fn record(&mut self, page: DrawnPage) {
        self.draws += 1;
        match page {
            DrawnPage::Absent => {}
            DrawnPage::Zero => self.present += 1,
            DrawnPage::NonZero => {
                self.present += 1;
                self.nonzero += 1;
            }
        }
    }

    /// How many pages were drawn (page-map reads) and how many of them were read (present).
    pub fn reads(&self) -> (u64, u64) {
        (self.draws, self.present)
    }

    /// The guest RAM that is present and not zero, KiB: the range times the share of draws
    /// that were; when the present-page bound ended the draws, the present share is taken as
    /// (present − 1) / (draws − 1), which is unbiased under that stopping rule. Rounded up, so
    /// one non-zero page seen counts. `None` before any draw (a range of no pages is 0).
    pub fn estimate_kib(&self) -> Option<u64> {
        if self.total_pages == 0 {
            return Some(0);
        }
        if self.draws == 0 {
            return None;
        }
        let (total, nz, k, n) = (
            u128::from(self.total_pages) * 4,
            u128::from(self.nonzero),
            u128::from(self.present),
            u128::from(self.draws),
        );
        let kib = if self.present >= NONZERO_MAX_READS && n > 1 {
            // (nz / k) of the present pages, (k − 1) / (n − 1) of the range present
            (total * nz * (k - 1)).div_ceil(k * (n - 1))
        } else {
            (total * nz).div_ceil(n)
        };
        Some(u64::try_from(kib).unwrap_or(u64::MAX))
    }
}

/// Page size of the guest RAM as the page map counts it.
const PAGE: u64 = 4096;

/// The host's CPU time from the first line of `/proc/stat`: `(busy, total)` in clock ticks, where
/// idle and iowait count as not busy (guest time is already inside user time).
pub fn parse_host_cpu(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let vals: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|v| v.parse().ok())
        .collect::<Option<Vec<u64>>>()?;
    if vals.len() < 4 {
        return None;
    }
    let total: u64 = vals.iter().sum();
    let idle = vals[3] + vals.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Whether the text of `/proc/net/tcp` or `/proc/net/tcp6` shows a socket listening on `port`.
pub fn parse_net_tcp_listens(text: &str, port: u16) -> bool {
    text.lines().skip(1).any(|l| {
        let mut f = l.split_whitespace();
        let local = f.nth(1);
        let state = f.nth(1);
        state == Some("0A")
            && local
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                == Some(port)
    })
}

/// `utime + stime` of thread `tid` of process `pid`, clock ticks.
pub fn thread_cpu_ticks(pid: u32, tid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    parse_stat_cpu_ticks(&text)
}

/// `utime + stime` of process `pid` (all its threads), clock ticks.
pub fn process_cpu_ticks(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_cpu_ticks(&text)
}

/// Resident memory of process `pid`, MiB.
pub fn rss_mib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status_rss_kib(&text).map(|k| k / 1024)
}

/// The smallest mapping [`parse_smaps_guest_rss_kib`] takes for guest RAM, KiB (the smallest
/// guest Tern runs has more).
pub const GUEST_RAM_MIN_KIB: u64 = 4096;

/// Resident guest RAM of VMM `pid`, KiB ([`parse_smaps_guest_rss_kib`]).
pub fn guest_rss_kib(pid: u32) -> Option<u64> {
    parse_smaps_guest_rss_kib(&std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?)
}

/// Why [`guest_nonzero_kib`] has no figure.
#[derive(Debug, thiserror::Error)]
pub enum GuestNonzeroError {
    /// A file of the process could not be opened or read (another user's process, a process
    /// gone).
    #[error("cannot read /proc/{pid}/{file}")]
    Proc {
        /// The process.
        pid: u32,
        /// The file under `/proc/PID`.
        file: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The PID now names another process than the VMM the caller saw (or none).
    #[error(
        "process {pid} is no longer the VMM started at tick {start_ticks} (PID reused or gone)"
    )]
    NotTheVmm {
        /// The process.
        pid: u32,
        /// The VMM's start time, clock ticks after boot.
        start_ticks: u64,
    },
    /// The process maps no guest RAM ([`parse_smaps_guest_ram`]).
    #[error("process {pid} maps no guest RAM (no rw-p MAP_NORESERVE mapping of 4 MiB or more)")]
    NoGuestRam {
        /// The process.
        pid: u32,
    },
    /// The page-map entry or the memory of a drawn page could not be read.
    #[error("cannot read /proc/{pid}/{file} at guest page address {addr:#x}")]
    Read {
        /// The process.
        pid: u32,
        /// `pagemap` or `mem`.
        file: &'static str,
        /// The page's address in the VMM.
        addr: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The guest RAM of VMM `pid` (started at `start_ticks`, as `/proc/PID/stat` gives it) that is
/// resident and not zero, KiB: what a migration's first pass sends (it skips pages that read as
/// zero), estimated by [`NonzeroSampler`] from pages drawn at random (`seed`) over the guest
/// RAM ranges: each one's 8-byte entry in `/proc/PID/pagemap`, then, if present, its 4 KiB
/// through `/proc/PID/mem`. At most [`NONZERO_MAX_DRAWS`] + [`NONZERO_MAX_READS`] reads,
/// whatever the guest's size. The resident figure alone counts a whole 2 MiB huge page for
/// every huge page the guest touched (the VMM asks for transparent huge pages): an idle 64 MiB
/// test guest showed 6 MiB resident where a migration sent 59 pages.
///
/// The files are opened before the process's start time is checked against `start_ticks`, so
/// a PID reused since the caller's snapshot is refused, never read.
pub fn guest_nonzero_kib(pid: u32, start_ticks: u64, seed: u64) -> Result<u64, GuestNonzeroError> {
    let open = |file: &'static str| {
        std::fs::File::open(format!("/proc/{pid}/{file}"))
            .map_err(|source| GuestNonzeroError::Proc { pid, file, source })
    };
    let (pagemap, mem) = (open("pagemap")?, open("mem")?);
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).map_err(|source| {
        GuestNonzeroError::Proc {
            pid,
            file: "smaps",
            source,
        }
    })?;
    // the PID names the same process as when the files were opened only if it still runs
    // with the start time the caller saw
    if tern_vmctl::runtime::process_start_ticks(pid) != Some(start_ticks) {
        return Err(GuestNonzeroError::NotTheVmm { pid, start_ticks });
    }
    let ram = parse_smaps_guest_ram(&smaps);
    if ram.is_empty() {
        return Err(GuestNonzeroError::NoGuestRam { pid });
    }
    sample_nonzero_kib(pid, &pagemap, &mem, &ram, seed)
}

/// The I/O loop of [`guest_nonzero_kib`] over `ram`, with `pagemap` and `mem` open.
fn sample_nonzero_kib(
    pid: u32,
    pagemap: &std::fs::File,
    mem: &std::fs::File,
    ram: &[GuestRam],
    seed: u64,
) -> Result<u64, GuestNonzeroError> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    let mut sampler = NonzeroSampler::new(ram, seed);
    let mut entry = [0u8; 8];
    let mut data = [0u8; PAGE as usize];
    while let Some(page) = sampler.next_page() {
        let addr = page * PAGE;
        let fail = |file, source| GuestNonzeroError::Read {
            pid,
            file,
            addr,
            source,
        };
        pagemap
            .read_exact_at(&mut entry, page * 8)
            .map_err(|e| fail("pagemap", e))?;
        let drawn = if u64::from_le_bytes(entry) & PRESENT == 0 {
            DrawnPage::Absent
        } else {
            mem.read_exact_at(&mut data, addr)
                .map_err(|e| fail("mem", e))?;
            if data.iter().any(|&b| b != 0) {
                DrawnPage::NonZero
            } else {
                DrawnPage::Zero
            }
        };
        sampler.record(drawn);
    }
    Ok(sampler.estimate_kib().unwrap_or(0))
}

/// The host's `(busy, total)` CPU ticks.
pub fn host_cpu() -> Option<(u64, u64)> {
    parse_host_cpu(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// Whether process `pid` (in its own network namespace) has a socket listening on `port`.
pub fn listens(pid: u32, port: u16) -> bool {
    ["tcp", "tcp6"].iter().any(|f| {
        std::fs::read_to_string(Path::new(&format!("/proc/{pid}/net/{f}")))
            .is_ok_and(|t| parse_net_tcp_listens(&t, port))
    })
}

/// Utilisation (0..1) of `cpus` CPUs that used `ticks` clock ticks in `elapsed_ms`.
pub fn utilization(ticks: u64, elapsed_ms: u64, cpus: u32) -> Option<f64> {
    if elapsed_ms == 0 || cpus == 0 {
        return None;
    }
    let capacity = elapsed_ms as f64 / 1000.0 * USER_HZ as f64 * f64::from(cpus);
    Some((ticks as f64 / capacity).clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Excerpt of a test-guest VMM's smaps (64 MiB guest): the binary, a glibc arena
    /// reservation, a thread stack, the guest's RAM (188 KiB touched) and libc.
    const SMAPS: &str = "\
55c3e089c000-55c3e1391000 r--p 00000000 fe:00 16295834                   /usr/bin/tern
Size:              11220 kB
Rss:                3472 kB
VmFlags: rd mr mw me
7fea28021000-7fea2c000000 ---p 00000000 00:00 0
Size:              65404 kB
Rss:                   0 kB
VmFlags: mr mw me nr
7fea36600000-7fea36800000 rw-p 00000000 00:00 0
Size:               2048 kB
Rss:                  20 kB
VmFlags: rd wr mr mw me ac nh
7fea2c000000-7fea2c021000 rw-p 00000000 00:00 0
Size:                132 kB
Rss:                  60 kB
VmFlags: rd wr mr mw me nr
7fea36800000-7fea3a800000 rw-p 00000000 00:00 0
Size:              65536 kB
KernelPageSize:        4 kB
Rss:                 188 kB
Pss:                 188 kB
VmFlags: rd wr mr mw me nr
7fea3a980000-7fea3aad6000 r-xp 00026000 fe:00 326279                     /usr/lib/x86_64-linux-gnu/libc.so.6
Size:               1368 kB
Rss:                1024 kB
VmFlags: rd ex mr mw me
";

    #[test]
    fn guest_ram_is_the_anonymous_noreserve_whole_mib_mappings() {
        assert_eq!(parse_smaps_guest_rss_kib(SMAPS), Some(188));
        // a guest split around the MMIO gap: two regions, summed
        let split = format!(
            "{SMAPS}7f0000000000-7f0040000000 rw-p 00000000 00:00 0\nSize: 1048576 kB\nRss: 512 kB\nVmFlags: rd wr mr mw me nr\n"
        );
        assert_eq!(parse_smaps_guest_rss_kib(&split), Some(700));
        // a migration target's guest region merged with an arena's first 132 KiB
        let merged = SMAPS.replace(
            "7fea36800000-7fea3a800000 rw-p 00000000 00:00 0\nSize:              65536 kB",
            "7fea36800000-7fea3a821000 rw-p 00000000 00:00 0\nSize:              65668 kB",
        );
        assert_ne!(merged, SMAPS);
        assert_eq!(parse_smaps_guest_rss_kib(&merged), Some(188));
        // no such mapping (not a VMM): nothing, so the caller falls back on VmRSS
        let only_libc = &SMAPS[SMAPS.find("7fea3a980000").unwrap()..];
        assert_eq!(parse_smaps_guest_rss_kib(only_libc), None);
        assert_eq!(parse_smaps_guest_rss_kib(""), None);
    }

    #[test]
    fn guest_ram_mappings_carry_their_addresses_for_the_page_map() {
        assert_eq!(
            parse_smaps_guest_ram(SMAPS),
            vec![GuestRam {
                start: 0x7fea_3680_0000,
                end: 0x7fea_3a80_0000,
                rss_kib: 188,
            }]
        );
        // a header whose range does not parse is not guest RAM
        let bad = SMAPS.replace("7fea36800000-7fea3a800000", "7fea36800000-zz");
        assert_eq!(parse_smaps_guest_ram(&bad), vec![]);
    }

    const GIB: u64 = 1 << 30;

    /// One estimate over a synthetic memory: `page(k)` says what page `k` of `ram` holds.
    /// Returns the estimate and the page-map and memory reads it took.
    fn estimate(ram: &[GuestRam], seed: u64, page: impl Fn(u64) -> DrawnPage) -> (u64, u64, u64) {
        let mut s = NonzeroSampler::new(ram, seed);
        while let Some(p) = s.next_page() {
            let first = ram
                .iter()
                .find(|r| (r.start / PAGE..r.end / PAGE).contains(&p))
                .expect("a drawn page lies in a range");
            // index over the ranges as one
            let before: u64 = ram
                .iter()
                .take_while(|r| r.start != first.start)
                .map(|r| (r.end - r.start) / PAGE)
                .sum();
            s.record(page(before + p - first.start / PAGE));
        }
        let (draws, reads) = s.reads();
        (s.estimate_kib().expect("drawn"), draws, reads)
    }

    fn ram(bytes: &[u64]) -> Vec<GuestRam> {
        // ranges 1 GiB apart, as around an MMIO gap
        let mut start = 0x7f00_0000_0000;
        bytes
            .iter()
            .map(|&b| {
                let r = GuestRam {
                    start,
                    end: start + b,
                    rss_kib: 0,
                };
                start += b + GIB;
                r
            })
            .collect()
    }

    /// A fixed pseudo-random bit per page, independent of the sampler's generator.
    fn hashed(k: u64, salt: u64) -> u64 {
        let mut z = k.wrapping_mul(0xD6E8_FEB8_6659_FD93) ^ salt;
        z ^= z >> 32;
        z = z.wrapping_mul(0xD6E8_FEB8_6659_FD93);
        z ^ (z >> 32)
    }

    #[test]
    fn a_memory_of_known_non_zero_share_is_estimated_within_tolerance() {
        // 1.5 GiB in two ranges; 40 % of the pages present, 25 % of all pages non-zero (the
        // non-zero ones among the present ones), scattered
        let ram = ram(&[GIB, GIB / 2]);
        let total_kib = (GIB + GIB / 2) / 1024;
        let page = |k: u64| match hashed(k, 7) % 20 {
            0..5 => DrawnPage::NonZero,
            5..8 => DrawnPage::Zero,
            _ => DrawnPage::Absent,
        };
        let truth = total_kib / 4;
        let mut sum = 0;
        for seed in 0..50 {
            let (kib, ..) = estimate(&ram, seed, page);
            // ~1280 draws: a relative standard error of ~5 %
            assert!(
                kib.abs_diff(truth) < truth / 5,
                "seed {seed}: {kib} KiB against {truth}"
            );
            sum += kib;
        }
        let mean = sum / 50;
        assert!(
            mean.abs_diff(truth) < truth / 50,
            "mean {mean} KiB against {truth}"
        );
        // all present and non-zero, all present and zero, nothing present: exact
        assert_eq!(estimate(&ram, 1, |_| DrawnPage::NonZero).0, total_kib);
        assert_eq!(estimate(&ram, 1, |_| DrawnPage::Zero).0, 0);
        assert_eq!(estimate(&ram, 1, |_| DrawnPage::Absent).0, 0);
    }

    #[test]
    fn the_reads_are_bounded_whatever_the_ram_size() {
        for size in [64 << 20, 64 * GIB, 1024 * GIB] {
            let ram = ram(&[size]);
            // a guest that touched little: every draw, few reads
            let (_, draws, reads) = estimate(&ram, 3, |k| {
                if k % 64 == 0 {
                    DrawnPage::NonZero
                } else {
                    DrawnPage::Absent
                }
            });
            assert_eq!(draws, NONZERO_MAX_DRAWS, "{size} bytes");
            assert!(reads < NONZERO_MAX_READS, "{size} bytes: {reads} reads");
            // a fully touched guest: the read bound ends it
            let (kib, draws, reads) = estimate(&ram, 3, |_| DrawnPage::Zero);
            assert_eq!(
                (kib, draws, reads),
                (0, NONZERO_MAX_READS, NONZERO_MAX_READS)
            );
        }
        // no pages at all: no draw, nothing non-zero
        let mut s = NonzeroSampler::new(&[], 1);
        assert_eq!(s.next_page(), None);
        assert_eq!(s.estimate_kib(), Some(0));
        // pages but nothing drawn yet: no figure
        assert_eq!(NonzeroSampler::new(&ram(&[GIB]), 1).estimate_kib(), None);
    }

    #[test]
    fn whole_gib_of_huge_pages_written_in_their_first_4_kib_are_not_over_counted() {
        // 1 GiB of a 2 GiB guest touched as 512 huge pages, only the first 4 KiB of each
        // written: an even stride over the present pages would read only those first pages
        // (present / 512 = 512) and report 1 GiB non-zero
        let ram = ram(&[2 * GIB]);
        let page = |k: u64| match k {
            k if k >= GIB / PAGE => DrawnPage::Absent,
            k if k % 512 == 0 => DrawnPage::NonZero,
            _ => DrawnPage::Zero,
        };
        let truth = 512 * 4;
        let runs = 400;
        let (mut sum, mut max) = (0, 0);
        for seed in 0..runs {
            let (kib, ..) = estimate(&ram, seed, page);
            sum += kib;
            max = max.max(kib);
        }
        let mean = sum / runs;
        assert!(
            mean.abs_diff(truth) < truth / 5,
            "mean {mean} KiB against {truth}"
        );
        assert!(max < 32 * 1024, "one estimate reached {max} KiB");
    }

    #[test]
    fn the_draws_spread_over_every_range_and_every_page_of_a_huge_page() {
        let ram = ram(&[GIB, GIB / 4]);
        let mut s = NonzeroSampler::new(&ram, 9);
        let (mut second, mut offsets) = (0, [0u32; 512]);
        while let Some(p) = s.next_page() {
            assert!(
                ram.iter()
                    .any(|r| (r.start / PAGE..r.end / PAGE).contains(&p)),
                "page {p:#x} outside the ranges"
            );
            second += u32::from(p >= ram[1].start / PAGE);
            offsets[(p % 512) as usize] += 1;
            s.record(DrawnPage::Absent);
        }
        // a fifth of 4096 draws in the second range; every 4 KiB offset of a 2 MiB page ~8 times
        assert!(
            (700..940).contains(&second),
            "{second} draws in the second range"
        );
        assert!(offsets.iter().all(|&n| n < 30), "{offsets:?}");
        // the same seed draws the same pages
        let draws = |seed| {
            let mut s = NonzeroSampler::new(&ram, seed);
            (0..5)
                .map(|_| {
                    let p = s.next_page();
                    s.record(DrawnPage::Absent);
                    p
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(draws(4), draws(4));
        assert_ne!(draws(4), draws(5));
    }

    #[test]
    fn one_non_zero_page_seen_counts_and_the_read_bound_keeps_the_estimate_unbiased() {
        // 1 of 4096 draws non-zero over 64 GiB: 16 MiB
        let mut s = NonzeroSampler::new(&ram(&[64 * GIB]), 1);
        for k in 0..NONZERO_MAX_DRAWS {
            s.next_page().expect("a draw");
            s.record(if k == 0 {
                DrawnPage::NonZero
            } else {
                DrawnPage::Absent
            });
        }
        assert_eq!(s.next_page(), None);
        assert_eq!(s.estimate_kib(), Some(16 * 1024));
        // of every 8 draws 4 present, 1 of them non-zero, over 1 GiB: the 512th present page
        // is draw 1022, and the present share is taken as 511 / 1021, so the estimate is
        // 1 GiB × 511/1021 × 128/512
        let mut s = NonzeroSampler::new(&ram(&[GIB]), 1);
        let mut k = 0;
        while s.next_page().is_some() {
            s.record(match k % 8 {
                0 => DrawnPage::NonZero,
                1 | 3 | 5 => DrawnPage::Zero,
                _ => DrawnPage::Absent,
            });
            k += 1;
        }
        assert_eq!(s.reads(), (1022, NONZERO_MAX_READS));
        let want = (GIB / 1024 * 128 * 511).div_ceil(512 * 1021);
        assert_eq!(s.estimate_kib(), Some(want));
    }

    #[test]
    fn this_process_memory_is_estimated_through_the_page_map() {
        // 32 MiB of zeroes (fresh pages from the kernel), every other page of its first half
        // written: 8 MiB non-zero, whatever of the rest is present (huge pages) reads as zero
        let mut buf = vec![0u8; 32 << 20];
        let base = buf.as_ptr() as u64;
        let start = base.next_multiple_of(PAGE);
        let end = (base + buf.len() as u64) / PAGE * PAGE;
        let first = (start - base) as usize;
        for k in (0..(end - start) / PAGE / 2).step_by(2) {
            buf[first + (k * PAGE) as usize] = 1;
        }
        let range = [GuestRam {
            start,
            end,
            rss_kib: 0,
        }];
        let pid = std::process::id();
        let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
        let mem = std::fs::File::open("/proc/self/mem").unwrap();
        let truth = (end - start) / 1024 / 4;
        for seed in 0..4 {
            let kib = sample_nonzero_kib(pid, &pagemap, &mem, &range, seed).unwrap();
            assert!(
                kib.abs_diff(truth) < truth * 3 / 10,
                "seed {seed}: {kib} KiB against {truth}"
            );
        }
        std::hint::black_box(&buf);
        // a PID whose start time is not the one given is refused before any read
        let ticks = tern_vmctl::runtime::process_start_ticks(pid).unwrap();
        assert!(matches!(
            guest_nonzero_kib(pid, ticks + 1, 1),
            Err(GuestNonzeroError::NotTheVmm { .. })
        ));
        assert!(matches!(
            guest_nonzero_kib(u32::MAX, ticks, 1),
            Err(GuestNonzeroError::Proc { .. })
        ));
    }

    #[test]
    fn thread_stat_times_are_counted_after_a_name_with_spaces_and_parens() {
        // Fields 14 and 15 (utime, stime) are 1234 and 56.
        let text = "4242 (vcpu 0) (x)) R 1 4242 4242 0 -1 4194560 100 0 0 0 1234 56 0 0 20 0 3 0 \
                    777 1000000 200 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(parse_stat_cpu_ticks(text), Some(1290));
    }

    #[test]
    fn a_truncated_or_garbled_stat_line_gives_nothing() {
        assert_eq!(parse_stat_cpu_ticks("4242 (vcpu) R 1 2 3"), None);
        assert_eq!(parse_stat_cpu_ticks("no parenthesis here"), None);
        assert_eq!(
            parse_stat_cpu_ticks("1 (x) R 1 1 1 0 -1 0 0 0 0 0 abc 5 0"),
            None
        );
    }

    #[test]
    fn rss_comes_from_the_vmrss_line() {
        let text = "Name:\ttern\nVmPeak:\t  900000 kB\nVmRSS:\t   70656 kB\nThreads:\t5\n";
        assert_eq!(parse_status_rss_kib(text), Some(70656));
        assert_eq!(parse_status_rss_kib("Name:\tkthreadd\n"), None);
    }

    #[test]
    fn host_cpu_counts_idle_and_iowait_as_not_busy() {
        let text = "cpu  100 5 50 800 40 3 2 0 0 0\ncpu0 50 2 25 400 20 1 1 0 0 0\nintr 1\n";
        // total = 100+5+50+800+40+3+2+0 = 1000; idle = 800 + 40.
        assert_eq!(parse_host_cpu(text), Some((160, 1000)));
        assert_eq!(parse_host_cpu("intr 1\n"), None);
    }

    #[test]
    fn a_listening_socket_is_found_by_port_and_state() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
            0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n   \
            1: 0100007F:1F91 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 2 1\n";
        assert!(parse_net_tcp_listens(text, 8080), "0x1F90 listens");
        assert!(
            !parse_net_tcp_listens(text, 8081),
            "0x1F91 is established, not listening"
        );
        assert!(!parse_net_tcp_listens(text, 9000));
        let v6 = "  sl  local_address                         remote_address                        st\n   \
            0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 0\n";
        assert!(parse_net_tcp_listens(v6, 8080));
    }

    #[test]
    fn utilization_is_ticks_over_the_capacity_of_the_interval() {
        // One CPU for 1 s is 100 ticks.
        assert_eq!(utilization(50, 1000, 1), Some(0.5));
        assert_eq!(utilization(50, 1000, 2), Some(0.25));
        assert_eq!(utilization(500, 1000, 1), Some(1.0), "clamped");
        assert_eq!(utilization(5, 0, 1), None);
    }

    #[test]
    fn this_process_is_read_live() {
        let pid = std::process::id();
        assert!(rss_mib(pid).is_some());
        assert!(process_cpu_ticks(pid).is_some());
        let (busy, total) = host_cpu().expect("/proc/stat");
        assert!(busy <= total && total > 0);
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(listens(pid, port));
        drop(l);
        assert!(!listens(pid, port));
        let tid = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .find_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .unwrap();
        assert!(thread_cpu_ticks(pid, tid).is_some());
    }
}
