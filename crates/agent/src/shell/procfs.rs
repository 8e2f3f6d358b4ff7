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
