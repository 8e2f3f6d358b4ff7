//! `cargo xtask bench volume`: 4 KiB sequential and random read/write through the volume's direct
//! path, its redirected path, our NBD server on the raw LUN file, and `qemu-nbd` serving the same
//! bytes of the same file (the peer), all in one run; then the take-over time after the
//! coordinator is killed, with default timings.
//!
//! Every path is driven by the same synchronous NBD client at queue depth 1, so the figures differ
//! only by what sits behind the socket; then by `qemu-img bench` (QEMU's own NBD client, 4 KiB
//! sequential reads and writes) at several queue depths, which shows whether a path keeps
//! requests in flight (the redirected path's two hops above all). `TERN_BENCH_QEMU_CACHE=none`
//! serves the peer with `O_DIRECT`, as the node reads its LUN (default: qemu-nbd's writeback
//! page cache).

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bench_common::build_release_tern;
use anyhow::{Context, bail, ensure};
use tern_nbd::Client;
use tern_test_support::{ChildGuard, Etcd, free_port, wait_for};
use tern_volume::control::{self, LeaseAction, Request};

/// Options of the volume benchmark.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// 4 KiB operations per pattern and path.
    #[arg(long, default_value_t = 20000)]
    ops: u64,
    /// Size of the file the operations range over, MiB.
    #[arg(long, default_value_t = 256)]
    file_mib: u64,
    /// Skip the coordinator take-over measurement.
    #[arg(long)]
    no_takeover: bool,
    /// 4 KiB operations per `qemu-img bench` run (queue-depth table; 0 skips it).
    #[arg(long, default_value_t = 20000)]
    qd_ops: u64,
    /// Queue depths `qemu-img bench` keeps in flight.
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 4, 16, 32])]
    depths: Vec<u32>,
}

const BS: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Figures {
    mib_s: f64,
    iops: f64,
    mean_us: f64,
    p99_us: f64,
}

/// A tiny xorshift for reproducible random offsets.
fn offsets(n: u64, blocks: u64, random: bool) -> Vec<u64> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|i| {
            if random {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % blocks) * BS as u64
            } else {
                (i % blocks) * BS as u64
            }
        })
        .collect()
}

fn run_pattern(c: &mut Client, base: u64, offs: &[u64], write: bool) -> anyhow::Result<Figures> {
    let mut buf = vec![0x5au8; BS];
    let mut lat = Vec::with_capacity(offs.len());
    let start = Instant::now();
    for &o in offs {
        let t = Instant::now();
        if write {
            c.write(base + o, &buf, false)?;
        } else {
            c.read(base + o, &mut buf)?;
        }
        lat.push(t.elapsed().as_nanos() as f64 / 1000.0);
    }
    if write {
        c.flush()?;
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    let n = offs.len() as f64;
    Ok(Figures {
        mib_s: n * BS as f64 / secs / (1 << 20) as f64,
        iops: n / secs,
        mean_us: lat.iter().sum::<f64>() / n,
        p99_us: lat[((n * 0.99) as usize).min(lat.len() - 1)],
    })
}

/// Latencies and busy time of one (path, pattern) cell across rounds.
#[derive(Debug, Clone, Default)]
struct Cell {
    lat_us: Vec<f64>,
    secs: f64,
}

impl Cell {
    fn add(&mut self, (lat, secs): (Vec<f64>, f64)) {
        self.lat_us.extend(lat);
        self.secs += secs;
    }
    fn figures(&self) -> Figures {
        let mut lat = self.lat_us.clone();
        lat.sort_by(f64::total_cmp);
        let n = lat.len().max(1) as f64;
        Figures {
            mib_s: n * BS as f64 / self.secs / (1 << 20) as f64,
            iops: n / self.secs,
            mean_us: lat.iter().sum::<f64>() / n,
            p99_us: lat
                .get(((n * 0.99) as usize).min(lat.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0.0),
        }
    }
}

/// Run one batch; writes end with a FLUSH, counted in the time.
fn run_timed(
    c: &mut Client,
    base: u64,
    offs: &[u64],
    write: bool,
) -> anyhow::Result<(Vec<f64>, f64)> {
    let mut buf = vec![0x5au8; BS];
    let mut lat = Vec::with_capacity(offs.len());
    let start = Instant::now();
    for &o in offs {
        let t = Instant::now();
        if write {
            c.write(base + o, &buf, false)?;
        } else {
            c.read(base + o, &mut buf)?;
        }
        lat.push(t.elapsed().as_nanos() as f64 / 1000.0);
    }
    if write {
        c.flush()?;
    }
    Ok((lat, start.elapsed().as_secs_f64()))
}

/// One `qemu-img bench` run: IOPS and seconds for `count` 4 KiB operations from `offset`.
fn qemu_img_bench(
    url: &str,
    offset: u64,
    count: u64,
    depth: u32,
    write: bool,
) -> anyhow::Result<(u64, f64)> {
    let offset = offset.to_string();
    qemu_img_bench_on(&["-f", "raw", url], &["-o", &offset], count, depth, write)
}

/// One `qemu-img bench` run of `count` 4 KiB operations on `target` (`-f raw URL`, or
/// `--object … --image-opts …`; the image last) with extra options (`-o OFFSET`, `-S STEP`):
/// operations and seconds.
pub(crate) fn qemu_img_bench_on(
    target: &[&str],
    opts: &[&str],
    count: u64,
    depth: u32,
    write: bool,
) -> anyhow::Result<(u64, f64)> {
    let url = target.last().copied().unwrap_or_default();
    let mut cmd = Command::new("qemu-img");
    cmd.args(["bench", "-s", "4096"])
        .args(["-c", &count.to_string(), "-d", &depth.to_string()])
        .args(opts);
    if write {
        cmd.arg("-w");
    }
    let out = cmd.args(target).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "qemu-img bench on {url} failed: {}{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    // "Run completed in 1.234 seconds."
    let secs: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Run completed in "))
        .and_then(|l| l.split_whitespace().next())
        .context("qemu-img bench printed no run time")?
        .parse()?;
    Ok((count, secs))
}

pub(crate) fn need(tool: &str) -> anyhow::Result<()> {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .status()?
        .success();
    ensure!(
        ok,
        "{tool} is required (apt-get install etcd-server qemu-utils)"
    );
    Ok(())
}

fn spawn_node(
    tern: &Path,
    lun: &Path,
    id: u32,
    etcd: &str,
    extra: &[&str],
    log: &Path,
) -> anyhow::Result<(ChildGuard, String)> {
    let addr = format!("127.0.0.1:{}", free_port());
    let child = Command::new(tern)
        .args([
            "volume",
            "serve",
            "--node-id",
            &id.to_string(),
            "--listen",
            &addr,
            "--etcd",
            etcd,
            "--lun",
        ])
        .arg(lun)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()?;
    let p = ChildGuard(child);
    wait_for("node", Duration::from_secs(20), || {
        control::call(&addr, &Request::Status, false, Duration::from_secs(2)).is_ok()
    });
    Ok((p, addr))
}

fn call(addr: &str, req: Request) -> anyhow::Result<serde_json::Value> {
    Ok(control::call(addr, &req, false, Duration::from_secs(30))?)
}

/// `qemu-img bench` on every path at every depth, reads then writes, in interleaved rounds.
fn queue_depths(args: &Args, targets: &[(&str, String, u64)], size: u64) -> anyhow::Result<()> {
    const ROUNDS: u64 = 3;
    let count = (args.qd_ops / ROUNDS).clamp(1, size / BS as u64);
    // [target][depth][read/write] = (ops, seconds)
    let mut cells = vec![vec![[(0u64, 0f64); 2]; args.depths.len()]; targets.len()];
    for (_, url, off) in targets {
        qemu_img_bench(url, *off, count.min(2000), 4, false)?; // warm-up
    }
    for _ in 0..ROUNDS {
        for (k, &depth) in args.depths.iter().enumerate() {
            for (w, write) in [false, true].into_iter().enumerate() {
                for (i, (_, url, off)) in targets.iter().enumerate() {
                    let (n, secs) = qemu_img_bench(url, *off, count, depth, write)?;
                    cells[i][k][w].0 += n;
                    cells[i][k][w].1 += secs;
                }
            }
        }
    }
    let iops = |i: usize, k: usize, w: usize| cells[i][k][w].0 as f64 / cells[i][k][w].1;
    let peer = targets.len() - 1;
    println!(
        "\nqemu-img bench (QEMU's NBD client), 4 KiB sequential, {} ops per cell over {ROUNDS} interleaved rounds\n",
        count * ROUNDS
    );
    println!("| path | depth | read IOPS | vs qemu-nbd | write IOPS | vs qemu-nbd |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (i, (name, _, _)) in targets.iter().enumerate() {
        for (k, depth) in args.depths.iter().enumerate() {
            println!(
                "| {name} | {depth} | {:.0} | {:.2}× | {:.0} | {:.2}× |",
                iops(i, k, 0),
                iops(i, k, 0) / iops(peer, k, 0),
                iops(i, k, 1),
                iops(i, k, 1) / iops(peer, k, 1),
            );
        }
    }
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    for t in ["etcd", "qemu-nbd", "qemu-img"] {
        need(t)?;
    }
    // TERN_BENCH_BIN measures a given build instead of building the tree's.
    let tern = match std::env::var_os("TERN_BENCH_BIN") {
        Some(p) => std::path::PathBuf::from(p),
        None => build_release_tern()?,
    };
    let dir = std::env::temp_dir().join(format!("tern-bench-volume-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| bench(&args, &tern, &dir)))
            .unwrap_or_else(|panic| {
                // A wait that timed out (wait_for panics): keep the logs as for an error.
                eprintln!("node logs kept in {}", dir.display());
                std::panic::resume_unwind(panic)
            });
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("node logs kept in {}", dir.display());
    }
    result
}

fn bench(args: &Args, tern: &Path, dir: &Path) -> anyhow::Result<()> {
    let etcd = Etcd::start();
    let etcd_url = etcd.url.clone();
    let lun = dir.join("lun");
    let lun_size = (2 * args.file_mib + 64) << 20;
    let st = Command::new(tern)
        .args(["volume", "format", "--size", &lun_size.to_string(), "--lun"])
        .arg(&lun)
        .stdout(Stdio::null())
        .status()?;
    ensure!(st.success(), "format failed");

    let (mut n1, a1) = spawn_node(tern, &lun, 1, &etcd_url, &[], &dir.join("n1.log"))?;
    wait_for("node 1 to coordinate", Duration::from_secs(20), || {
        call(&a1, Request::Status)
            .map(|s| s["role"] == "coordinator")
            .unwrap_or(false)
    });
    let (_n2, a2) = spawn_node(
        tern,
        &lun,
        2,
        &etcd_url,
        &["--no-direct"],
        &dir.join("n2.log"),
    )?;
    let (_n3, a3) = spawn_node(tern, &lun, 3, &etcd_url, &[], &dir.join("n3.log"))?;

    let size = args.file_mib << 20;
    // One file per writer: node 1 writes "bench" directly, node 2 (--no-direct) writes "bench-r"
    // through the coordinator; each holds its write lease for the whole run.
    for (name, owner) in [("bench", &a1), ("bench-r", &a2)] {
        call(
            &a1,
            Request::Create {
                name: name.into(),
                size,
                preallocated: true,
            },
        )?;
        call(
            owner,
            Request::Lease {
                name: name.into(),
                action: LeaseAction::Acquire,
            },
        )?;
    }
    // Where the file's bytes sit in the LUN (preallocated on an empty volume: one contiguous run).
    let v = tern_volume::store::Volume::open(&tern_volume::lun::FileLun::open(&lun)?)?;
    let map = &v.meta.files["bench"].map;
    ensure!(
        map.windows(2).all(|w| w[1] == w[0] + 1),
        "file is not contiguous"
    );
    let base = v.sb.extent_offset(map[0]);

    // Peers on the same file: our plain NBD server on the raw LUN file, and qemu-nbd.
    let mut ex = tern_nbd::StaticExports::new();
    ex.insert("raw", Arc::new(tern_nbd::FileBackend::open(&lun, false)?));
    let l = TcpListener::bind("127.0.0.1:0")?;
    let raw_addr = l.local_addr()?.to_string();
    std::thread::spawn(move || tern_nbd::run_listener(l, Arc::new(ex)));
    let qport = free_port();
    let _qemu = ChildGuard(
        Command::new("qemu-nbd")
            .args([
                "-f",
                "raw",
                "-x",
                "q",
                "-b",
                "127.0.0.1",
                "-p",
                &qport.to_string(),
                "-t",
            ])
            .args(crate::bench_common::qemu_nbd_cache_args())
            .arg(&lun)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let qaddr = format!("127.0.0.1:{qport}");
    wait_for("qemu-nbd", Duration::from_secs(10), || {
        Client::connect(&qaddr, "q").is_ok()
    });

    let blocks = size / BS as u64;
    let patterns = [
        ("seq read", false, false),
        ("seq write", false, true),
        ("rand read", true, false),
        ("rand write", true, true),
    ];
    let paths = [
        "direct (tern node)",
        "redirected (tern node → coordinator)",
        "raw file (tern-nbd FileBackend)",
        "qemu-nbd (peer)",
    ];
    let mut clients = [
        (Client::connect(&a1, "bench").context("direct path")?, 0),
        (
            Client::connect(&a2, "bench-r").context("redirected path")?,
            0,
        ),
        (Client::connect(&raw_addr, "raw").context("raw file")?, base),
        (Client::connect(&qaddr, "q").context("qemu-nbd")?, base),
    ];
    for (c, b) in clients.iter_mut() {
        // Warm up every connection and the page cache the same way.
        run_pattern(c, *b, &offsets(args.ops.min(2000), blocks, true), false)?;
    }
    // Interleave: ROUNDS rounds, each running every pattern on every path in turn, so a busy
    // neighbour on the machine slows all paths alike instead of whichever ran at that moment.
    const ROUNDS: u64 = 5;
    let per_round = (args.ops / ROUNDS).max(1);
    let mut cells: Vec<Vec<Cell>> = vec![vec![Cell::default(); patterns.len()]; paths.len()];
    for round in 0..ROUNDS {
        for (j, (_, random, write)) in patterns.iter().enumerate() {
            let offs = offsets(per_round * (round + 1), blocks, *random)
                .split_off((per_round * round) as usize);
            for (i, (c, b)) in clients.iter_mut().enumerate() {
                cells[i][j].add(run_timed(c, *b, &offs, *write)?);
            }
        }
    }
    let rows: Vec<Vec<Figures>> = cells
        .iter()
        .map(|r| r.iter().map(Cell::figures).collect())
        .collect();
    println!(
        "\n4 KiB I/O, queue depth 1, {} ops per pattern and path over a {} MiB file, {ROUNDS} interleaved rounds; qemu-nbd {}\n",
        per_round * ROUNDS,
        args.file_mib,
        crate::bench_common::qemu_nbd_cache_args().join(" ")
    );
    println!("| path | pattern | MiB/s | IOPS | mean µs | p99 µs | vs raw | vs qemu-nbd |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for (i, p) in paths.iter().enumerate() {
        for (j, f) in rows[i].iter().enumerate() {
            println!(
                "| {p} | {} | {:.1} | {:.0} | {:.1} | {:.1} | {:.2}× | {:.2}× |",
                patterns[j].0,
                f.mib_s,
                f.iops,
                f.mean_us,
                f.p99_us,
                f.iops / rows[2][j].iops,
                f.iops / rows[3][j].iops
            );
        }
    }

    // qemu-nbd serves one client at a time (its default `--shared=1`): close ours first.
    drop(clients);
    if args.qd_ops > 0 {
        queue_depths(
            args,
            &[
                (paths[0], format!("nbd://{a1}/bench"), 0),
                (paths[1], format!("nbd://{a2}/bench-r"), 0),
                (paths[2], format!("nbd://{raw_addr}/raw"), base),
                (paths[3], format!("nbd://{qaddr}/q"), base),
            ],
            size,
        )?;
    }

    if !args.no_takeover {
        // Take-over with default timings: node 3 holds a lease, node 1 (coordinator) is killed.
        call(
            &a3,
            Request::Create {
                name: "held".into(),
                size: 1 << 20,
                preallocated: false,
            },
        )?;
        call(
            &a1,
            Request::Lease {
                name: "held".into(),
                action: LeaseAction::Acquire,
            },
        )?;
        let killed = Instant::now();
        drop(std::mem::replace(
            &mut n1,
            ChildGuard(Command::new("true").spawn()?),
        ));
        call(
            &a3,
            Request::Stat {
                name: "held".into(),
                map: false,
            },
        )?;
        let metadata_back = killed.elapsed();
        // The dead node's lease: a new coordinator re-grants it once it expires.
        let regrant = loop {
            match control::call(
                &a3,
                &Request::Lease {
                    name: "held".into(),
                    action: LeaseAction::Acquire,
                },
                false,
                Duration::from_secs(30),
            ) {
                Ok(_) => break killed.elapsed(),
                Err(_) if killed.elapsed() < Duration::from_secs(60) => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => bail!("lease never re-granted: {e}"),
            }
        };
        println!(
            "\nCoordinator killed (SIGKILL), default timings (etcd session TTL 3 s, write-lease TTL 4 s):"
        );
        println!(
            "- metadata operations served again after {:.2} s",
            metadata_back.as_secs_f64()
        );
        println!(
            "- the dead node's write lease re-granted to another node after {:.2} s (goal ≤ 10 s; sanlock: 140 s)",
            regrant.as_secs_f64()
        );
    }
    Ok(())
}
