//! `cargo xtask fuzz`: builds every cargo-fuzz target in `fuzz/` once, then runs each for a
//! bounded time on its committed seed corpus (`fuzz/corpus/<target>/`, read-only here: new
//! inputs go to a scratch directory in the build's target directory), two at a time by default.
//! The build goes where cargo puts it: `fuzz/target/`, or `CARGO_TARGET_DIR` (a relative one
//! taken from the directory `cargo xtask` runs in, as cargo takes it), and the runs use the
//! binaries from there. Any crash, leak of memory past the RSS limit or hang fails the run,
//! naming the input that caused it and the command that reproduces it. `--seed-corpus` writes
//! the seed corpora instead (`fuzz_seeds.rs`). docs/security.md, "Fuzzing", explains the targets
//! and the budget.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

/// The cargo-fuzz version CI installs (scripts/install-deps.sh).
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Wall-clock budget of a whole default run on a 2-core CI machine, build included.
const BUDGET: Duration = Duration::from_secs(300);

/// What the default per-target time assumes the build takes when `fuzz/target` is cold
/// (measured: docs/security.md, "Fuzzing"); a warm build takes seconds.
const COLD_BUILD: Duration = Duration::from_secs(180);

/// The shortest run worth starting.
const MIN_SECONDS: u64 = 5;

/// Options of `cargo xtask fuzz`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds each target runs. Default: what fits every target, two at a time, into a
    /// 5-minute budget after a cold build.
    #[arg(long)]
    seconds: Option<u64>,
    /// Run only these targets (repeatable); default: every target in fuzz/.
    #[arg(long = "target")]
    targets: Vec<String>,
    /// Targets run at the same time (each fuzzer uses one core).
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// Write the generated seeds into fuzz/corpus/ from the encoders and exit (other files
    /// there are kept).
    #[arg(long)]
    seed_corpus: bool,
    /// Build the targets and exit.
    #[arg(long)]
    build_only: bool,
}

/// The fuzz tree: `<workspace>/fuzz`.
fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .join("fuzz")
}

/// Flags of every build and of the reproduction command, so a crash reproduces in the very
/// build that found it: no sanitizer (the parsers are safe Rust: ASan would find nothing more
/// and halve the speed), debug assertions and overflow checks on, optimised, 16 codegen units
/// (a faster build on 2 cores for a little speed).
const BUILD_FLAGS: &[&str] = &[
    "--sanitizer",
    "none",
    "--debug-assertions",
    "--release",
    "--codegen-units",
    "16",
];

/// The target triple cargo-fuzz builds for (its default: the host's).
const TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// The variables that set cargo's target directory, in cargo's order of precedence.
const TARGET_DIR_VARS: &[&str] = &["CARGO_TARGET_DIR", "CARGO_BUILD_TARGET_DIR"];

/// libFuzzer options of every run: per-input timeout (a hang is a finding), the RSS cap (memory
/// growth is a finding), final statistics for the report.
const RUN_FLAGS: &[&str] = &["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"];

/// The fuzz tree and the environment of every cargo command run in it.
struct Tree {
    /// `<workspace>/fuzz`, the commands' working directory.
    dir: PathBuf,
    /// [`TARGET_DIR_VARS`] set to a relative path, made absolute.
    env: Vec<(&'static str, PathBuf)>,
}

impl Tree {
    fn new() -> Result<Tree> {
        let cwd = std::env::current_dir().context("reading the working directory")?;
        let env = TARGET_DIR_VARS
            .iter()
            .filter_map(|&var| {
                absolute_target_dir(std::env::var_os(var), &cwd).map(|dir| (var, dir))
            })
            .collect();
        Ok(Tree {
            dir: fuzz_dir(),
            env,
        })
    }

    /// `cargo` run in `fuzz/`.
    fn cargo(&self) -> Command {
        let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        c.current_dir(&self.dir).env("RUSTC_BOOTSTRAP", "1");
        for (var, dir) in &self.env {
            c.env(var, dir);
        }
        c
    }

    /// `cargo fuzz` run in `fuzz/`.
    fn cargo_fuzz(&self) -> Command {
        let mut c = self.cargo();
        c.arg("fuzz");
        c
    }

    /// The target directory cargo builds `fuzz/` into, as `cargo metadata` reports it.
    fn target_dir(&self) -> Result<PathBuf> {
        let out = self
            .cargo()
            .args(["metadata", "--no-deps", "--format-version", "1"])
            .output()
            .context("running cargo metadata")?;
        ensure!(
            out.status.success(),
            "cargo metadata failed in {}: {}",
            self.dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let meta: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("reading cargo metadata's output")?;
        match meta["target_directory"].as_str() {
            Some(d) => Ok(PathBuf::from(d)),
            None => bail!("cargo metadata names no target_directory"),
        }
    }
}

/// A target-directory variable's value made absolute against `cwd`, the directory `cargo
/// xtask` runs in (cargo takes a relative one from its own working directory, which the fuzz
/// commands do not share), or `None` when it needs no change: unset, empty or already absolute.
fn absolute_target_dir(value: Option<OsString>, cwd: &Path) -> Option<PathBuf> {
    let value = PathBuf::from(value?);
    (!value.as_os_str().is_empty() && value.is_relative()).then(|| cwd.join(value))
}

/// Runs `cargo xtask fuzz`.
pub fn run(args: Args) -> Result<()> {
    if args.seed_corpus {
        let corpus = fuzz_dir().join("corpus");
        let corpora = crate::fuzz_seeds::all()?;
        let w = crate::fuzz_seeds::write(&corpus, &corpora)?;
        println!(
            "fuzz: wrote {} seeds ({} already there) for {} targets in {}",
            w.written,
            w.current,
            corpora.len(),
            corpus.display()
        );
        if !w.others.is_empty() {
            println!(
                "fuzz: kept {} the generator does not write (inputs added by hand, seeds of an \
                 older encoder; `git rm` those no longer wanted):",
                match w.others.len() {
                    1 => "1 file".to_owned(),
                    n => format!("{n} files"),
                }
            );
            for f in &w.others {
                println!("fuzz:   {}", f.strip_prefix(&corpus).unwrap_or(f).display());
            }
        }
        return Ok(());
    }
    let tree = Tree::new()?;
    check_cargo_fuzz(&tree)?;
    let all = list_targets(&tree)?;
    let targets: Vec<String> = if args.targets.is_empty() {
        all.clone()
    } else {
        for t in &args.targets {
            ensure!(
                all.contains(t),
                "no fuzz target {t:?}; the targets are: {}",
                all.join(", ")
            );
        }
        args.targets.clone()
    };
    ensure!(args.jobs >= 1, "--jobs must be at least 1");

    let target_dir = tree.target_dir()?;
    let t0 = Instant::now();
    let status = tree
        .cargo_fuzz()
        .arg("build")
        .args(BUILD_FLAGS)
        .status()
        .context("running cargo fuzz build")?;
    ensure!(status.success(), "cargo fuzz build failed ({status})");
    let build = t0.elapsed();
    println!(
        "fuzz: built {} targets in {:.0?} in {}",
        all.len(),
        build,
        target_dir.display()
    );
    if args.build_only {
        return Ok(());
    }

    let seconds = args
        .seconds
        .unwrap_or_else(|| default_seconds(targets.len(), args.jobs));
    ensure!(seconds >= 1, "--seconds must be at least 1");
    println!(
        "fuzz: running {} targets for {seconds} s each, {} at a time",
        targets.len(),
        args.jobs
    );
    let results = run_all(&tree.dir, &target_dir, &targets, seconds, args.jobs)?;
    report(&tree.dir, &target_dir, &results, t0.elapsed())
}

/// Seconds per target so that a cold build plus every target, `jobs` at a time, fits the budget.
fn default_seconds(targets: usize, jobs: usize) -> u64 {
    let waves = targets.div_ceil(jobs.max(1)).max(1) as u64;
    let left = BUDGET.saturating_sub(COLD_BUILD).as_secs();
    // Each run also loads its corpus and prints its statistics: a second of slack per wave.
    (left / waves).saturating_sub(1).max(MIN_SECONDS)
}

fn check_cargo_fuzz(tree: &Tree) -> Result<()> {
    let out = tree.cargo_fuzz().arg("--version").output();
    match out {
        Ok(o) if o.status.success() => Ok(()),
        _ => bail!(
            "cargo-fuzz is not installed: `cargo install cargo-fuzz --version {CARGO_FUZZ_VERSION} --locked` \
             (scripts/install-deps.sh does this)"
        ),
    }
}

fn list_targets(tree: &Tree) -> Result<Vec<String>> {
    let out = tree
        .cargo_fuzz()
        .arg("list")
        .output()
        .context("running cargo fuzz list")?;
    ensure!(
        out.status.success(),
        "cargo fuzz list failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let targets: Vec<String> = String::from_utf8(out.stdout)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    ensure!(!targets.is_empty(), "fuzz/ has no targets");
    Ok(targets)
}

/// One target's run.
#[derive(Debug)]
struct RunResult {
    target: String,
    ok: bool,
    runs: Option<u64>,
    seconds: f64,
    crash: Option<PathBuf>,
    log: PathBuf,
}

struct Running {
    target: String,
    child: Child,
    started: Instant,
    log: PathBuf,
}

/// Starts `target`'s binary from the build in `target_dir` on its corpus in `dir` (`fuzz/`).
fn start(dir: &Path, target_dir: &Path, target: &str, seconds: u64) -> Result<Running> {
    let bin = target_dir.join(TRIPLE).join("release").join(target);
    ensure!(bin.exists(), "{} was not built", bin.display());
    let work = target_dir.join("fuzz-run");
    let scratch = work.join("corpus").join(target);
    let artifacts = dir.join("artifacts").join(target);
    let logs = work.join("logs");
    for d in [&scratch, &artifacts, &logs] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let log = logs.join(format!("{target}.log"));
    let log_file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = Command::new(&bin);
    cmd.args(RUN_FLAGS)
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()));
    let dict = dir.join("dict").join(format!("{target}.dict"));
    if dict.exists() {
        cmd.arg(format!("-dict={}", dict.display()));
    }
    // New inputs go to the scratch directory (first); the committed seeds are only read.
    cmd.arg(&scratch);
    let seeds = dir.join("corpus").join(target);
    if seeds.exists() {
        cmd.arg(&seeds);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(Running {
        target: target.to_owned(),
        child,
        started: Instant::now(),
        log,
    })
}

fn finish(mut r: Running) -> Result<RunResult> {
    let status = r.child.wait()?;
    // vmm_snapshot's scratch file (fuzz_targets/vmm_snapshot.rs names it by its process id).
    let scratch = format!("tern-fuzz-snapshot-{}", r.child.id());
    for dir in [Path::new("/dev/shm").to_path_buf(), std::env::temp_dir()] {
        let _ = std::fs::remove_file(dir.join(&scratch));
    }
    let text = std::fs::read_to_string(&r.log).unwrap_or_default();
    let runs = text
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|v| v.trim().parse().ok());
    let crash = text
        .lines()
        .find_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim()))
        .map(PathBuf::from);
    Ok(RunResult {
        target: r.target,
        ok: status.success() && crash.is_none(),
        runs,
        seconds: r.started.elapsed().as_secs_f64(),
        crash,
        log: r.log,
    })
}

fn run_all(
    dir: &Path,
    target_dir: &Path,
    targets: &[String],
    seconds: u64,
    jobs: usize,
) -> Result<Vec<RunResult>> {
    let mut queue = targets.iter();
    let mut running: Vec<Running> = Vec::new();
    let mut done = Vec::new();
    loop {
        while running.len() < jobs {
            match queue.next() {
                Some(t) => running.push(start(dir, target_dir, t, seconds)?),
                None => break,
            }
        }
        if running.is_empty() {
            return Ok(done);
        }
        let mut i = 0;
        while i < running.len() {
            if running[i].child.try_wait()?.is_some() {
                let r = finish(running.swap_remove(i))?;
                println!(
                    "fuzz: {:<20} {} ({} runs in {:.0} s)",
                    r.target,
                    if r.ok { "ok" } else { "FAILED" },
                    r.runs.map_or("?".into(), |n| n.to_string()),
                    r.seconds
                );
                done.push(r);
            } else {
                i += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn report(dir: &Path, target_dir: &Path, results: &[RunResult], total: Duration) -> Result<()> {
    // The reproduction builds where this run built, so it reuses the build.
    let env = if target_dir == dir.join("target") {
        String::new()
    } else {
        format!("CARGO_TARGET_DIR={} ", target_dir.display())
    };
    println!("fuzz: {:<20} {:>12} {:>10}", "target", "runs", "runs/s");
    for r in results {
        let rate = r
            .runs
            .map_or("?".into(), |n| format!("{:.0}", n as f64 / r.seconds));
        println!(
            "fuzz: {:<20} {:>12} {:>10}",
            r.target,
            r.runs.map_or("?".into(), |n| n.to_string()),
            rate
        );
    }
    println!("fuzz: {:.0?} in all, build included", total);
    let failed: Vec<&RunResult> = results.iter().filter(|r| !r.ok).collect();
    if failed.is_empty() {
        return Ok(());
    }
    for r in &failed {
        eprintln!(
            "fuzz: target {} failed; its log: {}",
            r.target,
            r.log.display()
        );
        let text = std::fs::read_to_string(&r.log).unwrap_or_default();
        for l in text
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            eprintln!("    {l}");
        }
        match &r.crash {
            Some(input) => eprintln!(
                "fuzz: the input: {}\nfuzz: reproduce: (cd {} && {env}RUSTC_BOOTSTRAP=1 cargo fuzz run {} {} {})",
                input.display(),
                dir.display(),
                BUILD_FLAGS.join(" "),
                r.target,
                input.display()
            ),
            None => eprintln!("fuzz: the fuzzer exited without writing an input (see the log)"),
        }
    }
    bail!(
        "{} of {} fuzz targets failed: {}",
        failed.len(),
        results.len(),
        failed
            .iter()
            .map(|r| r.target.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fuzz targets declared in fuzz/Cargo.toml.
    fn declared_targets() -> Vec<String> {
        let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
        manifest
            .split("[[bin]]")
            .skip(1)
            .map(|bin| {
                let line = bin.lines().find(|l| l.starts_with("name = ")).unwrap();
                line["name = ".len()..].trim_matches('"').to_owned()
            })
            .collect()
    }

    #[test]
    fn ci_installs_the_cargo_fuzz_version_xtask_names() {
        let root = fuzz_dir().parent().unwrap().to_path_buf();
        let script = std::fs::read_to_string(root.join("scripts/install-deps.sh")).unwrap();
        assert!(
            script.contains(&format!("cargo_fuzz_version={CARGO_FUZZ_VERSION}\n")),
            "scripts/install-deps.sh does not install cargo-fuzz {CARGO_FUZZ_VERSION}"
        );
    }

    #[test]
    fn every_target_has_seeds_a_generator_and_documentation() {
        let targets = declared_targets();
        assert!(targets.len() >= 12, "fuzz/Cargo.toml declares {targets:?}");
        let seeds = crate::fuzz_seeds::all().expect("the seed generator runs");
        let docs = std::fs::read_to_string(fuzz_dir().join("../docs/security.md")).unwrap();
        let section = docs
            .split("## Fuzzing")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .expect("docs/security.md has a Fuzzing section");
        for t in &targets {
            let committed = std::fs::read_dir(fuzz_dir().join("corpus").join(t))
                .map(|d| d.count())
                .unwrap_or(0);
            assert!(committed > 0, "fuzz/corpus/{t} has no seeds");
            assert!(
                seeds.get(t.as_str()).is_some_and(|s| !s.is_empty()),
                "the seed generator writes nothing for {t}"
            );
            assert!(
                section.contains(&format!("`{t}`")),
                "docs/security.md's Fuzzing section does not describe {t}"
            );
        }
        assert_eq!(
            seeds.len(),
            targets.len(),
            "seeds for targets that do not exist"
        );
    }

    #[test]
    fn a_relative_target_dir_is_taken_from_where_xtask_runs() {
        let cwd = Path::new("/src/tern");
        assert_eq!(
            absolute_target_dir(Some("build/fz".into()), cwd),
            Some(PathBuf::from("/src/tern/build/fz"))
        );
        assert_eq!(
            absolute_target_dir(Some("../fz".into()), cwd),
            Some(PathBuf::from("/src/tern/../fz"))
        );
        // Absolute, empty or unset: cargo reads it as it is.
        assert_eq!(absolute_target_dir(Some("/tmp/fz".into()), cwd), None);
        assert_eq!(absolute_target_dir(Some("".into()), cwd), None);
        assert_eq!(absolute_target_dir(None, cwd), None);
    }

    #[test]
    fn the_default_run_fits_the_budget_after_a_cold_build() {
        for (targets, jobs) in [(12, 2), (12, 1), (20, 2), (1, 2)] {
            let s = default_seconds(targets, jobs);
            assert!(s >= MIN_SECONDS);
            let waves = (targets as u64).div_ceil(jobs as u64);
            let total = COLD_BUILD.as_secs() + waves * (s + 1);
            assert!(
                total <= BUDGET.as_secs() || s == MIN_SECONDS,
                "{targets} targets, {jobs} jobs: {s} s each makes {total} s"
            );
        }
    }
}
