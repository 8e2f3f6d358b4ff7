//! `tern vm migrate`: ask a VM's VMM to move it live to a waiting `tern vm receive`, show the
//! progress it streams back, and print the report.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use tern_vmctl::{MigrateError, MigrateRequest, MigrationReport, Progress, Request};

use super::progress;
use super::target::VmRef;

/// Options of `tern vm migrate`.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// The VM.
    #[command(flatten)]
    pub vm: VmRef,
    /// The waiting target, HOST:PORT (required unless --cancel).
    #[arg(long, value_name = "HOST:PORT", required_unless_present = "cancel")]
    pub to: Option<String>,
    /// Parallel TCP data streams.
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub streams: u16,
    /// Largest acceptable pause (source pause → target running), ms.
    #[arg(long, default_value_t = 50, value_name = "MS")]
    pub downtime_ms: u64,
    /// Give up (or force the switch-over) after this many seconds.
    #[arg(long, default_value_t = 60.0, value_name = "SECONDS")]
    pub timeout: f64,
    /// What to do at the timeout.
    #[arg(long, value_enum, default_value = "abort")]
    pub on_timeout: OnTimeoutArg,
    /// Bandwidth cap, MiB/s (default: none).
    #[arg(long, value_name = "MIBPS")]
    pub max_bandwidth_mibps: Option<u64>,
    /// Compare a digest of all guest memory on the target before it resumes (costs pause time,
    /// about 0.7 s per GiB here): an end-to-end check of all memory, on top of the per-page
    /// (in place) or per-frame (--copy-pages) crc32c.
    #[arg(long)]
    pub verify_memory: bool,
    /// Switch to post-copy after N pre-copy rounds (1..=1000): the source pauses for good,
    /// sends the state and the list of pages still dirty, and the target resumes the guest at
    /// once, fetching each missing page on demand while the source pushes the rest. Failure
    /// rule: after the switch the VM's memory is split across both hosts, so if the link is
    /// lost the target stops the guest and the source cannot resume either (it stays paused
    /// and refuses to run again): the VM is lost, as in QEMU's post-copy (outcome
    /// failed_post_copy, exit 4). The target needs
    /// userfaultfd (root). See docs/migration.md, "Post-copy".
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub post_copy_after: Option<u32>,
    /// Copy every page into a frame whose crc32c covers all its bytes (Pages frames), instead
    /// of the default on plain TCP: each page sent straight from guest memory and read straight
    /// into the target's (PageData frames, protocol 5; no copy on either side), where each data
    /// page carries its own crc32c, taken when the source read it and compared by the target
    /// once the page is in its memory. A page the guest rewrote while it was being sent does
    /// not match: it is held suspect until its next copy (it is dirty, so it comes again), and a
    /// page still suspect at the commit, or sent while the source was paused, fails the
    /// migration (the source runs on). Over TLS pages are always copied (TLS's AEAD covers every
    /// byte); with a target older than protocol 5 too. See docs/migration.md, "PageData and what
    /// protects the page data".
    #[arg(long)]
    pub copy_pages: bool,
    /// No-op: sending pages in place is the default now (kept so scripts that passed it work).
    #[arg(long, hide = true, conflicts_with = "copy_pages")]
    pub pages_in_place: bool,
    /// Print the final report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Cancel the migration under way on this VM.
    #[arg(long)]
    pub cancel: bool,
    /// Settle a migration that ended in doubt (exit 3: the commit went out unanswered, the VM
    /// is paused here): ask the target at --to (over mutual TLS with --tls-dir) whether it
    /// committed and has the VM. It does: the paused copy here stops (exit 0). Nothing listens
    /// at --to (connection refused: the receive is gone, and a target that committed keeps its
    /// address while the VM runs there): the copy here resumes (exit 1). No answer, no route, or
    /// an answer that does not fit: nothing changes, still in doubt (exit 3).
    #[arg(long, conflicts_with = "cancel")]
    pub resolve: bool,
    /// Offer only this protocol version (testing aid).
    #[arg(long, hide = true, value_name = "N")]
    pub x_protocol_version: Option<u16>,
    /// The node id of the target host's volume node (the node its `tern vm receive --disk
    /// volume://NODE_ADDR/FILE` names): the disks' write leases are handed to it at switch-over.
    /// Required when the VM has a writable volume:// disk.
    #[arg(long, value_name = "NODE_ID")]
    pub disk_successor: Option<String>,
    /// Migrate over mutual TLS with this host's certificate (`tern pki issue --role host`): every
    /// stream is TLS, the target must present a host certificate of the same CA. The files are
    /// read here and handed to the VMM over its API socket.
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// The name the target's certificate must carry (its `tern pki issue --name` or a --san)
    /// [default: the host part of --to].
    #[arg(long, value_name = "NAME", requires = "tls_dir")]
    pub tls_name: Option<String>,
}

/// The host part of HOST:PORT (`[v6]:port` too), the default name a target's certificate must carry.
pub(super) fn host_of(to: &str) -> &str {
    let host = to.rsplit_once(':').map_or(to, |(h, _)| h);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// `--on-timeout`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum OnTimeoutArg {
    /// Give up; the VM keeps running on the source.
    Abort,
    /// Switch over anyway, accepting a longer pause.
    Force,
}

/// `1.5 GiB`, `64.0 MiB`, `12.0 KiB`, `512 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (unit, size) in UNITS {
        if n >= size {
            return format!("{:.1} {unit}", n as f64 / size as f64);
        }
    }
    format!("{n} B")
}

/// The report as one line for people: no JSON quoting, sizes in binary units.
pub fn report_line(r: &MigrationReport, to: &str) -> String {
    let outcome = r.outcome.words();
    format!(
        "migration to {to} {outcome} in {} ms: downtime {} ms, {} round{}, {} sent, {} zero pages skipped, \
         throttle max {:.1} %, {}",
        r.total_ms,
        r.downtime_ms,
        r.rounds,
        if r.rounds == 1 { "" } else { "s" },
        human_bytes(r.bytes_sent),
        r.pages_zero_skipped,
        r.throttle_max_pct,
        if r.converged {
            "converged"
        } else {
            "switched over at the timeout"
        }
    )
}

/// The pause step by step on one line (`None` if the report has no steps): ms per step, the
/// bytes where a step wrote any, the target's steps grouped.
pub fn breakdown_line(r: &MigrationReport) -> Option<String> {
    if r.downtime_steps.is_empty() {
        return None;
    }
    let total: u64 = r.downtime_steps.iter().map(|s| s.us).sum();
    let mut out = format!("pause {:.1} ms:", total as f64 / 1000.0);
    let mut side = None;
    for s in &r.downtime_steps {
        let target = s.step.on_target();
        if side != Some(target) {
            out += if side.is_none() {
                " source"
            } else if target {
                " | target"
            } else {
                " |"
            };
            side = Some(target);
        } else {
            out.push(',');
        }
        let name = s.step.as_str();
        let name = name
            .strip_prefix("target_")
            .unwrap_or(name)
            .replace('_', " ");
        out += &format!(" {name} {:.1}", s.us as f64 / 1000.0);
        if s.bytes > 0 {
            out += &format!(" ({})", human_bytes(s.bytes));
        }
    }
    Some(out)
}

/// The rounds on one line (`None` if the report has none, as an older VMM's): per round its
/// time, bytes, the throttle when there was one, the dirty pages left and the decision.
pub fn rounds_line(r: &MigrationReport) -> Option<String> {
    let rounds = r.rounds_detail.as_ref().filter(|d| !d.is_empty())?;
    let shown: Vec<_> = rounds
        .iter()
        .map(|d| {
            let throttle = if d.throttle_pct > 0.0 {
                format!(" at {:.1} %", d.throttle_pct)
            } else {
                String::new()
            };
            format!(
                "{} {:.1} ms {}{throttle} -> {} dirty, {}",
                d.round,
                d.us as f64 / 1000.0,
                human_bytes(d.bytes),
                d.dirty_pages,
                d.decision.as_str().replace('_', " ")
            )
        })
        .collect();
    Some(format!("rounds: {}", shown.join("; ")))
}

pub fn run(a: MigrateArgs) -> anyhow::Result<ExitCode> {
    let sock = a.vm.socket()?;
    if a.cancel {
        return super::control_at(&sock, Request::MigrateCancel);
    }
    if a.resolve {
        let tls = a.tls_dir.as_deref().map(|d| (d, a.tls_name.as_deref()));
        let to = a.to.as_deref().unwrap_or_default();
        return super::resolve::run(&sock, &a.vm.describe(), to, tls);
    }
    anyhow::ensure!(
        (1..=64).contains(&a.streams),
        "--streams {} is out of range (give 1 to 64)",
        a.streams
    );
    anyhow::ensure!(
        a.timeout.is_finite() && a.timeout > 0.0,
        "--timeout {} is not a positive number of seconds",
        a.timeout
    );
    let to = a.to.clone().unwrap_or_default();
    let tls = match &a.tls_dir {
        None => None,
        Some(dir) => {
            let pem = tern_pki::PemFiles::read(dir)
                .with_context(|| format!("cannot use --tls-dir {}", dir.display()))?;
            let crl_pem = tern_pki::PemFiles::read_crl(dir)
                .with_context(|| format!("cannot use --tls-dir {}", dir.display()))?;
            let target_name = a
                .tls_name
                .clone()
                .unwrap_or_else(|| host_of(&to).to_owned());
            tern_pki::TlsDir::try_server_name(&target_name)
                .map_err(|e| anyhow::anyhow!("bad --tls-name: {e}"))?;
            Some(tern_api::vmm::MigrateTls {
                dir: dir.display().to_string(),
                ca_cert_pem: pem.ca_cert,
                cert_pem: pem.cert,
                key_pem: pem.key,
                crl_pem,
                target_name,
            })
        }
    };
    let req = MigrateRequest {
        to: to.clone(),
        streams: a.streams,
        downtime_ms: a.downtime_ms,
        timeout_s: a.timeout,
        force_on_timeout: matches!(a.on_timeout, OnTimeoutArg::Force),
        max_bandwidth_mibps: a.max_bandwidth_mibps,
        verify_memory: a.verify_memory,
        protocol_version: a.x_protocol_version,
        disk_successor: a.disk_successor.clone(),
        tls: tls.map(Box::new),
        post_copy_after: a.post_copy_after,
        pages_in_place: !a.copy_pages,
    };
    let bar = progress::bar("{spinner} round {prefix} [{bar:30}] {bytes}/{total_bytes} {msg}");
    let mut on_progress = |p: &Progress| {
        let Some(b) = &bar else { return };
        b.set_length(p.bytes_sent + p.bytes_remaining);
        b.set_position(p.bytes_sent);
        b.set_prefix(p.round.to_string());
        b.set_message(format!(
            "{} dirty {:.0} MiB/s bw {:.0} MiB/s downtime~{} throttle {:.1} %",
            p.phase.as_str().replace('_', "-"),
            p.dirty_bytes_per_sec / 1048576.0,
            p.bandwidth_bytes_per_sec / 1048576.0,
            p.expected_downtime_ms
                .map_or("?".to_string(), |d| format!("{d:.0} ms")),
            p.throttle_pct,
        ));
    };
    let result = tern_vmctl::migrate(&sock, req, &mut on_progress);
    progress::clear(bar);
    let failure = match result {
        Ok(report) => Ok(report),
        // Not even asked, or no answer: an error, as any refused command.
        Err(MigrateError::Call(e)) => return Err(e.into()),
        Err(e) => Err(e),
    };
    let report: Option<MigrationReport> = match &failure {
        Ok(r) => Some(r.clone()),
        Err(e) => e.report().cloned(),
    };
    if a.json {
        // Through a JSON value: its keys in the order this command always printed them.
        println!("{}", serde_json::to_value(&report)?);
    } else if let Some(r) = &report {
        eprintln!("{}", report_line(r, &to));
        if let Some(line) = rounds_line(r) {
            eprintln!("  {line}");
        }
        if let Some(line) = breakdown_line(r) {
            eprintln!("  {line}");
        }
        if let Some(p) = &r.post_copy {
            eprintln!(
                "  post-copy {} ms: {} pages owed, {} demanded ({} faults, longest {:.1} ms), {} pushed",
                p.post_copy_ms,
                p.pages_owed,
                p.pages_demanded,
                p.demand_faults,
                p.max_fault_latency_us as f64 / 1000.0,
                p.pages_pushed
            );
        }
    }
    let e = match failure {
        Ok(_) => {
            if !a.json {
                eprintln!(
                    "tern: {} runs on {to} now; its VMM here has stopped",
                    a.vm.describe()
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => e,
    };
    let code = ExitCode::from(e.end().exit_code());
    match e {
        MigrateError::InDoubt { reason, .. } => eprintln!(
            "tern: migration in doubt: {reason}; the VM stays paused here; check the target, then `tern vm resume` or `tern vm stop`"
        ),
        MigrateError::Lost { reason, .. } => eprintln!(
            "tern: {reason}; the VM is lost: the target stopped it, and the paused copy here refuses to run again (its memory is stale): stop it and start the VM from its disks"
        ),
        MigrateError::Failed {
            outcome, reason, ..
        } => eprintln!(
            "tern: migration failed ({}): {reason}; the VM keeps running here",
            outcome.words()
        ),
        other => anyhow::bail!(other),
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_tls_name_is_the_host_of_the_target_address() {
        assert_eq!(host_of("node-b:7000"), "node-b");
        assert_eq!(host_of("10.0.0.2:7000"), "10.0.0.2");
        assert_eq!(host_of("[fd00::2]:7000"), "fd00::2");
        assert_eq!(host_of("node-b"), "node-b");
    }
    use tern_api::vmm::Outcome;

    #[test]
    fn the_report_line_has_no_json_quotes_and_readable_sizes() {
        let r: MigrationReport = serde_json::from_str(
            r#"{"total_ms":812,"downtime_ms":9,"rounds":3,"bytes_sent":70254592,
                "pages_zero_skipped":15000,"throttle_max_pct":0.0,"converged":true,
                "outcome":"completed"}"#,
        )
        .unwrap();
        assert_eq!(
            report_line(&r, "10.0.0.2:7000"),
            "migration to 10.0.0.2:7000 completed in 812 ms: downtime 9 ms, 3 rounds, 67.0 MiB sent, \
             15000 zero pages skipped, throttle max 0.0 %, converged"
        );
        let t = MigrationReport {
            outcome: Outcome::TimedOut,
            rounds: 1,
            converged: false,
            ..r
        };
        let line = report_line(&t, "h:1");
        assert!(line.starts_with("migration to h:1 timed out in"), "{line}");
        assert!(line.contains(" 1 round,"), "{line}");
        assert!(!line.contains('"'), "{line}");
    }

    #[test]
    fn the_breakdown_line_shows_each_step_by_side() {
        let r: MigrationReport = serde_json::from_str(
            r#"{"total_ms":812,"downtime_ms":5,"rounds":3,"bytes_sent":70254592,
                "pages_zero_skipped":15000,"throttle_max_pct":0.0,"converged":true,
                "outcome":"completed","downtime_steps":[
                {"step":"dirty_log","us":400,"bytes":0},
                {"step":"final_pages","us":3000,"bytes":2097152},
                {"step":"state_sent","us":90,"bytes":9000},
                {"step":"target_data","us":100,"bytes":0},
                {"step":"target_restore","us":1000,"bytes":0},
                {"step":"target_resume","us":200,"bytes":0},
                {"step":"ack","us":710,"bytes":0}]}"#,
        )
        .unwrap();
        assert_eq!(
            breakdown_line(&r).unwrap(),
            "pause 5.5 ms: source dirty log 0.4, final pages 3.0 (2.0 MiB), state sent 0.1 (8.8 KiB) \
             | target data 0.1, restore 1.0, resume 0.2 | ack 0.7"
        );
        let none = MigrationReport {
            downtime_steps: Box::default(),
            ..r
        };
        assert_eq!(breakdown_line(&none), None);
    }

    #[test]
    fn the_rounds_line_shows_each_round_and_is_absent_from_an_older_report() {
        let r: MigrationReport = serde_json::from_str(
            r#"{"total_ms":600,"downtime_ms":5,"rounds":3,"bytes_sent":70254592,
                "pages_zero_skipped":15000,"throttle_max_pct":90.0,"converged":true,
                "outcome":"completed","rounds_detail":[
                {"round":0,"us":260000,"pages_data":66000,"pages_zero":500,"bytes":272629760,
                 "dirty_pages":65536,"throttle_pct":0.0,"decision":"throttle"},
                {"round":1,"us":20500,"pages_data":5120,"pages_zero":0,"bytes":20971520,
                 "dirty_pages":16,"throttle_pct":90.0,"decision":"switch_over"},
                {"round":2,"us":3000,"pages_data":14,"pages_zero":2,"bytes":70000,
                 "dirty_pages":0,"throttle_pct":90.0,"decision":"stop_and_copy"}]}"#,
        )
        .unwrap();
        assert_eq!(
            rounds_line(&r).unwrap(),
            "rounds: 0 260.0 ms 260.0 MiB -> 65536 dirty, throttle; \
             1 20.5 ms 20.0 MiB at 90.0 % -> 16 dirty, switch over; \
             2 3.0 ms 68.4 KiB at 90.0 % -> 0 dirty, stop and copy"
        );
        let older = MigrationReport {
            rounds_detail: None,
            ..r
        };
        assert_eq!(rounds_line(&older), None);
        assert!(
            !serde_json::to_string(&older)
                .unwrap()
                .contains("rounds_detail")
        );
    }

    #[test]
    fn sizes_use_the_largest_fitting_binary_unit() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(12 << 10), "12.0 KiB");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
    }
}
