//! `tern sim` as a user runs it: the default run reproduces CloudSim 3.0.3's figure for LR-MMT-1.2 on
//! 20110303 from any working directory and from a copy of the binary with the source tree out of
//! sight (the traces and CloudSim's file orders are built in); relative paths are taken from the
//! current directory and errors name the path tried; `sweep --plot` says where it wrote its plots.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const TERN: &str = env!("CARGO_BIN_EXE_tern");

/// The repository root (the build tree whose data a copied binary must not need).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

fn run_in(dir: &Path, bin: &str, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running {bin}: {e}"))
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// (energy kWh with CloudSim's 2 decimals, migrations) of a `--json` run.
fn energy_and_migrations(o: &Output) -> (String, u64) {
    assert!(o.status.success(), "tern failed: {}", stderr(o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(o)));
    let energy = v["energy_kwh"].as_f64().expect("energy_kwh is a number");
    let migrations = v["migrations"].as_u64().expect("migrations is a number");
    (format!("{energy:.2}"), migrations)
}

const LR_DAY: [&str; 7] = [
    "sim",
    "run",
    "--day",
    "20110303",
    "--policy",
    "lr-mmt-1.2",
    "--json",
];

#[test]
fn default_run_reproduces_cloudsims_167_83_kwh_from_any_directory() {
    let cwd = tempfile::tempdir().unwrap();
    let o = run_in(cwd.path(), TERN, &LR_DAY);
    // CloudSim 3.0.3 on 20110303 (reference notes §1.8): 167.83 kWh, 27649 migrations
    assert_eq!(energy_and_migrations(&o), ("167.83".to_string(), 27649));
    // the text output says which order it used
    let o = run_in(cwd.path(), TERN, &LR_DAY[..6]);
    assert!(o.status.success(), "{}", stderr(&o));
    let first = stdout(&o).lines().next().unwrap_or_default().to_string();
    assert!(first.contains("CloudSim 3.0.3 file order"), "{first}");
    // sorted names stay available and give the other mapping of traces to VM types
    let mut sorted = LR_DAY.to_vec();
    sorted.extend(["--trace-order", "sorted"]);
    let o = run_in(cwd.path(), TERN, &sorted);
    assert_eq!(energy_and_migrations(&o).0, "163.48");
    // the paper model keeps sorted names by default
    let o = run_in(
        cwd.path(),
        TERN,
        &LR_DAY[..6]
            .iter()
            .copied()
            .chain(["--model", "paper"])
            .collect::<Vec<_>>(),
    );
    assert!(
        stdout(&o)
            .lines()
            .next()
            .unwrap_or_default()
            .contains("sorted names"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn a_copy_of_the_binary_runs_with_the_source_tree_out_of_sight() {
    let bin_dir = tempfile::tempdir().unwrap();
    let copy = bin_dir.path().join("tern");
    std::fs::copy(TERN, &copy).unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let repo = repo();
    // a private mount namespace with an empty tmpfs over the repository: nothing of the build tree
    // (its data/ folder included) can be read by the copy
    let script = format!(
        "mount -t tmpfs tern-hidden '{}' && test ! -e '{}' && exec '{}' \"$@\"",
        repo.display(),
        repo.join("data/planetlab").display(),
        copy.display()
    );
    let o = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "sh",
        ])
        .args(LR_DAY)
        .current_dir(cwd.path())
        .output()
        .expect("running unshare (util-linux)");
    assert!(
        o.status.success(),
        "the copied binary failed with the tree hidden (this test needs root for a mount namespace): {}",
        stderr(&o)
    );
    assert_eq!(energy_and_migrations(&o), ("167.83".to_string(), 27649));
}

#[test]
fn relative_paths_are_taken_from_the_current_directory_and_errors_name_them() {
    let cwd = tempfile::tempdir().unwrap();
    // an order file next to the user, named relatively
    std::fs::copy(
        repo().join("data/planetlab/cloudsim-listfiles-order/20110303.txt"),
        cwd.path().join("order.txt"),
    )
    .unwrap();
    let mut args = LR_DAY.to_vec();
    args.extend(["--trace-order", "order.txt"]);
    let o = run_in(cwd.path(), TERN, &args);
    assert_eq!(energy_and_migrations(&o), ("167.83".to_string(), 27649));
    // a folder of DAY.txt files works for `run` too
    std::fs::create_dir(cwd.path().join("orders")).unwrap();
    std::fs::rename(
        cwd.path().join("order.txt"),
        cwd.path().join("orders/20110303.txt"),
    )
    .unwrap();
    let mut args = LR_DAY.to_vec();
    args.extend(["--trace-order", "orders"]);
    assert_eq!(
        energy_and_migrations(&run_in(cwd.path(), TERN, &args)).0,
        "167.83"
    );
    // a missing order file and a missing trace archive: the message names the path as given and
    // where it was looked for
    let where_ = cwd.path().canonicalize().unwrap();
    for (flag, name) in [
        ("--trace-order", "nosuch.txt"),
        ("--traces", "nosuch.tar.xz"),
    ] {
        let mut args = LR_DAY.to_vec();
        args.extend([flag, name]);
        let o = run_in(cwd.path(), TERN, &args);
        assert!(!o.status.success());
        let e = stderr(&o);
        let full = where_.join(name);
        assert!(
            e.contains(name) && e.contains(&full.display().to_string()),
            "{flag}: {e}"
        );
        assert!(e.contains("No such file or directory"), "{flag}: {e}");
    }
    // a folder of traces of a day without a recorded CloudSim order: the default falls back to
    // sorted names and says so; asking for CloudSim's order is an error that says why
    let day = cwd.path().join("traces/20990101");
    std::fs::create_dir_all(&day).unwrap();
    let trace: String = (0..288).map(|i| format!("{}\n", i % 50)).collect();
    for n in ["b", "a"] {
        std::fs::write(day.join(n), &trace).unwrap();
    }
    let args = [
        "sim", "run", "--traces", "traces", "--day", "20990101", "--policy", "dvfs",
    ];
    let o = run_in(cwd.path(), TERN, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("2 VMs, sorted names"), "{}", stdout(&o));
    let mut args = args.to_vec();
    args.extend(["--trace-order", "cloudsim"]);
    let o = run_in(cwd.path(), TERN, &args);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("No CloudSim file order is recorded for day 20990101"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn sweep_prints_where_it_wrote_the_plots_and_says_its_table_holds_medians() {
    let cwd = tempfile::tempdir().unwrap();
    let o = run_in(
        cwd.path(),
        TERN,
        &[
            "sim",
            "sweep",
            "--days",
            "20110306",
            "--policies",
            "npa,dvfs,lr-mmt-1.2,thr-mmt-1.0",
            "--csv",
            "runs.csv",
            "--plot",
            "plots",
            "--threads",
            "2",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("CloudSim 3.0.3 file order"), "{out}");
    assert!(
        out.contains("Medians over the days, per policy"),
        "the table must say its figures are medians: {out}"
    );
    let root = cwd.path().canonicalize().unwrap();
    assert!(
        out.contains(&format!(
            "CSV written to {}",
            root.join("runs.csv").display()
        )),
        "{out}"
    );
    for name in [
        "active_hosts.svg",
        "power.svg",
        "migrations.svg",
        "esv_boxplot.svg",
    ] {
        let path = root.join("plots").join(name);
        assert!(
            out.lines().any(|l| l.trim() == path.display().to_string()),
            "{name} not listed: {out}"
        );
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        if name == "esv_boxplot.svg" {
            assert!(svg.contains(">policy</text>"), "box plot x-axis label");
        } else {
            // a panel per drawn policy; NPA's constant is given in the title instead
            assert!(svg.contains(">hour of the day</text>"));
            assert!(svg.contains("NPA, not drawn"), "{name}");
            for p in ["dvfs", "lr-mmt-1.2", "thr-mmt-1.0"] {
                assert!(svg.contains(&format!("data-series=\"{p}\"")), "{name}: {p}");
            }
            assert!(!svg.contains("data-series=\"npa\""), "{name}");
        }
    }
}
