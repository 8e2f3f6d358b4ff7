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

/// How many resident guest pages [`guest_nonzero_kib`] reads at most.
pub const NONZERO_SAMPLE_PAGES: usize = 512;

/// Which of `present` resident pages to read: all of them up to `max`, else `max` spread
/// evenly over them (the first of every `present / max`), so the pages read stand for all.
pub fn pick_samples(present: usize, max: usize) -> Vec<usize> {
    if present <= max {
        return (0..present).collect();
    }
    (0..max).map(|k| k * present / max).collect()
}

/// The non-zero part of `present` resident pages, KiB, when `nonzero` of `sampled` of them read
/// as non-zero (4 KiB pages; rounded up, so one non-zero page seen counts).
pub fn nonzero_estimate_kib(present: u64, sampled: u64, nonzero: u64) -> Option<u64> {
    if sampled == 0 {
        return (present == 0).then_some(0);
    }
    Some((present * nonzero * 4).div_ceil(sampled))
}

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

/// The guest RAM of VMM `pid` that is resident and not zero, KiB: what a migration's first pass
/// sends (it skips pages that read as zero), estimated from a sample. The guest RAM's resident
/// pages are found in `/proc/PID/pagemap` and up to [`NONZERO_SAMPLE_PAGES`] of them, spread
/// evenly, are read through `/proc/PID/mem`. The resident figure alone counts a whole 2 MiB huge
/// page for every huge page the guest touched (the VMM asks for transparent huge pages): an idle
/// 64 MiB test guest showed 6 MiB resident where a migration sent 59 pages. `None` if the VMM's
/// memory cannot be read (another user's process, a process gone).
pub fn guest_nonzero_kib(pid: u32) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let ram = parse_smaps_guest_ram(&smaps);
    if ram.is_empty() {
        return None;
    }
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap")).ok()?;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).ok()?;
    const PAGE: u64 = 4096;
    const PRESENT: u64 = 1 << 63;
    // smaps counts the resident pages; the page map says which they are, in address order
    let resident = ram.iter().map(|r| r.rss_kib / 4).sum::<u64>() as usize;
    let picks = pick_samples(resident, NONZERO_SAMPLE_PAGES);
    let mut next = picks.iter().copied().peekable();
    let (mut seen, mut sampled, mut nonzero) = (0usize, 0u64, 0u64);
    let mut entries = vec![0u8; 8 * 4096];
    let mut data = [0u8; PAGE as usize];
    'ranges: for r in &ram {
        let mut page = r.start / PAGE;
        let last = r.end / PAGE;
        while page < last {
            let n = ((last - page) as usize).min(4096);
            let buf = &mut entries[..8 * n];
            pagemap.read_exact_at(buf, page * 8).ok()?;
            for (k, e) in buf.chunks_exact(8).enumerate() {
                let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
                if e & PRESENT == 0 {
                    continue;
                }
                if next.peek() == Some(&seen) {
                    next.next();
                    mem.read_exact_at(&mut data, (page + k as u64) * PAGE)
                        .ok()?;
                    sampled += 1;
                    nonzero += u64::from(data.iter().any(|&b| b != 0));
                }
                seen += 1;
                if next.peek().is_none() {
                    break 'ranges;
                }
            }
            page += n as u64;
        }
    }
    nonzero_estimate_kib(resident as u64, sampled, nonzero)
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

    #[test]
    fn the_pages_read_are_spread_over_the_resident_ones_and_stand_for_them() {
        assert_eq!(pick_samples(3, 512), vec![0, 1, 2]);
        assert_eq!(pick_samples(0, 512), Vec::<usize>::new());
        let picks = pick_samples(1536, 512);
        assert_eq!(picks.len(), 512);
        assert_eq!((picks[0], picks[1], picks[511]), (0, 3, 1533));
        assert!(picks.windows(2).all(|w| w[0] < w[1]));
        // 6 MiB resident (three touched huge pages), 20 of the 512 pages read are not zero
        assert_eq!(nonzero_estimate_kib(1536, 512, 20), Some(240));
        // one non-zero page seen counts at least a page
        assert_eq!(nonzero_estimate_kib(1_000_000, 512, 1), Some(7813));
        assert_eq!(nonzero_estimate_kib(10, 10, 0), Some(0));
        assert_eq!(nonzero_estimate_kib(0, 0, 0), Some(0));
        // resident pages but none could be read: no figure
        assert_eq!(nonzero_estimate_kib(10, 0, 0), None);
    }

    #[test]
    fn the_non_zero_guest_ram_of_a_process_that_is_gone_is_unknown() {
        assert_eq!(guest_nonzero_kib(u32::MAX), None);
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
