//! `tern vm list`: the VMs of this host, from the runtime directory, with each live VM's state
//! asked through its control socket. Entries left by VMMs that died are shown as `dead` (or
//! removed with `--prune`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use tern_vmctl::runtime::{self, DEFAULT_RUNTIME_DIR, RuntimeEntry};

/// Options of `tern vm list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Remove the entries (and sockets) of VMs whose process is gone instead of listing them.
    #[arg(long)]
    pub prune: bool,
    /// Directory of runtime entries.
    #[arg(long, default_value = DEFAULT_RUNTIME_DIR, value_name = "DIR")]
    pub runtime_dir: PathBuf,
}

/// How long a VM may take to answer `status` before it is listed as `unresponsive`.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// One line of the list.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Row {
    /// The VM's name.
    pub name: String,
    /// The VMM's process.
    pub pid: u32,
    /// `running`, `paused`, `transitioning`, `stopping` (from the VM), `unresponsive` (its socket
    /// does not answer), `unknown` (no socket), or `dead` (the process is gone: a stale entry).
    pub state: String,
    /// vCPU count, when known.
    pub vcpus: Option<u8>,
    /// Guest memory, MiB, when known.
    pub memory_mib: Option<u64>,
    /// Time since the VM started here, ms, when known.
    pub uptime_ms: Option<u64>,
    /// The control socket, if any.
    pub api_sock: Option<PathBuf>,
    /// The runtime entry file.
    pub entry: PathBuf,
}

pub fn run(a: ListArgs) -> anyhow::Result<ExitCode> {
    let dir = &a.runtime_dir;
    let mut rows = Vec::new();
    for listed in runtime::list_entries(dir)? {
        let entry = match listed.entry {
            Ok(e) => e,
            Err(e) => {
                eprintln!("tern: skipped {}: {e:#}", listed.path.display());
                continue;
            }
        };
        let live = runtime::is_live(&entry);
        if a.prune && !live {
            match runtime::remove_stale(dir, &entry.name) {
                Ok(_) => eprintln!(
                    "tern: removed the stale entry of VM {:?} (pid {} is gone)",
                    entry.name, entry.pid
                ),
                Err(e) => eprintln!("tern: {e}"),
            }
            continue;
        }
        rows.push(row(entry, listed.path, live, now_unix_ms()));
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        eprintln!("tern: no VMs in {}", dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", table(&rows));
    let dead = rows.iter().filter(|r| r.state == "dead").count();
    if dead > 0 {
        eprintln!(
            "tern: {dead} stale entr{} of VMs whose process is gone; `tern vm list --prune` removes {}",
            if dead == 1 { "y" } else { "ies" },
            if dead == 1 { "it" } else { "them" }
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One row: the entry's facts, refreshed from the VM's `status` when it answers.
fn row(entry: RuntimeEntry, path: PathBuf, live: bool, now_ms: u64) -> Row {
    let mut r = Row {
        name: entry.name.clone(),
        pid: entry.pid,
        state: "dead".into(),
        vcpus: entry.vcpus,
        memory_mib: entry.memory_mib,
        uptime_ms: None,
        api_sock: entry.api_sock.clone(),
        entry: path,
    };
    if !live {
        return r;
    }
    r.uptime_ms = entry.started_unix_ms.map(|t| now_ms.saturating_sub(t));
    let Some(sock) = &entry.api_sock else {
        r.state = "unknown".into();
        return r;
    };
    match tern_vmctl::status(sock, STATUS_TIMEOUT) {
        Ok(st) => {
            r.state = st.state.as_str().into();
            r.vcpus = Some(st.vcpus);
            r.memory_mib = Some(st.memory_mib);
            r.uptime_ms = Some(st.uptime_ms);
        }
        Err(_) => r.state = "unresponsive".into(),
    }
    r
}

/// `1d02h`, `3h05m`, `4m07s`, `12s`.
pub fn format_uptime(ms: u64) -> String {
    let s = ms / 1000;
    let (d, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d{h:02}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// The text table: a header and one aligned line per VM.
pub fn table(rows: &[Row]) -> String {
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let cells: Vec<[String; 7]> = std::iter::once(
        [
            "NAME", "PID", "STATE", "VCPUS", "MEMORY", "UPTIME", "SOCKET",
        ]
        .map(String::from),
    )
    .chain(rows.iter().map(|r| {
        [
            r.name.clone(),
            r.pid.to_string(),
            r.state.clone(),
            opt(r.vcpus.map(|v| v.to_string())),
            opt(r.memory_mib.map(|m| format!("{m} MiB"))),
            opt(r.uptime_ms.map(format_uptime)),
            opt(r.api_sock.as_ref().map(|p| p.display().to_string())),
        ]
    }))
    .collect();
    let mut width = [0usize; 7];
    for line in &cells {
        for (w, c) in width.iter_mut().zip(line) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for line in &cells {
        let mut text = String::new();
        for (i, c) in line.iter().enumerate() {
            // Numbers right-aligned, words left-aligned; no padding after the last column.
            let numeric = matches!(i, 1 | 3);
            if i > 0 {
                text.push_str("  ");
            }
            if i == line.len() - 1 {
                text.push_str(c);
            } else if numeric {
                text.push_str(&format!("{c:>w$}", w = width[i]));
            } else {
                text.push_str(&format!("{c:<w$}", w = width[i]));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptimes_read_in_the_two_largest_units() {
        assert_eq!(format_uptime(0), "0s");
        assert_eq!(format_uptime(12_999), "12s");
        assert_eq!(format_uptime(247_000), "4m07s");
        assert_eq!(format_uptime(3 * 3_600_000 + 5 * 60_000), "3h05m");
        assert_eq!(format_uptime(26 * 3_600_000), "1d02h");
    }

    #[test]
    fn the_table_aligns_columns_and_marks_unknowns() {
        let r = |name: &str, pid, state: &str, vcpus, mib, up, sock: Option<&str>| Row {
            name: name.into(),
            pid,
            state: state.into(),
            vcpus,
            memory_mib: mib,
            uptime_ms: up,
            api_sock: sock.map(PathBuf::from),
            entry: PathBuf::from(format!("/run/tern/vms/{name}.json")),
        };
        let t = table(&[
            r(
                "web",
                4242,
                "running",
                Some(2),
                Some(256),
                Some(65_000),
                Some("/run/tern/vms/web.sock"),
            ),
            r("old-db", 17, "dead", None, None, None, None),
        ]);
        let expected = "\
NAME     PID  STATE    VCPUS  MEMORY   UPTIME  SOCKET
web     4242  running      2  256 MiB  1m05s   /run/tern/vms/web.sock
old-db    17  dead         -  -        -       -
";
        assert_eq!(t, expected);
    }
}
