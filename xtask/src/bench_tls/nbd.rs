//! The nbd section of `cargo xtask bench tls`: 4 KiB scattered reads and writes under
//! `qemu-io` (QEMU's NBD client, with a `tls-creds-x509` object) against a Tern volume
//! node started with `--tls-dir` and against `qemu-nbd --tls-creds` serving the very same bytes
//! (the file's extents in the LUN, through a raw `offset`/`size` window); then the same with TLS
//! off on both, for what TLS itself costs. Goal (issue 12): Tern with TLS ≥ 1× qemu-nbd with TLS.
//!
//! `qemu-img bench` would be the natural load but takes no `--object` (QEMU 10), so it cannot
//! use TLS: `qemu-io` runs a script instead — `read`/`write` one at a time (depth 1), or
//! `aio_read`/`aio_write` in batches of 16 closed by `aio_flush` (depth 16). Offsets step by 7919
//! blocks (a prime), wrapped at the end of the 256 MiB file, so they scatter over the whole
//! file. Each run's time includes connecting (and the TLS handshake), the same for both servers.
//! Tern and qemu-nbd of one phase run in alternating rounds, so a busy neighbour slows both
//! alike; the tables give medians. `TERN_BENCH_BIN=PATH` measures that tern binary instead of
//! building the workspace's (an earlier build, for a before/after in the same conditions).
//! `TERN_BENCH_QEMU_CACHE=none` runs qemu-nbd with `--cache=none --aio=native` (`O_DIRECT`, as
//! a Tern node reads its LUN, and as a LUN shared by several hosts must be served) instead of
//! its default here, `--cache=writeback` (reads from this host's page cache).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use tern_test_support::{ChildGuard, Etcd, free_port, wait_for};

use crate::bench_common::{
    build_release_tern, load_average, peer_version, qemu_nbd_cache_args, scratch_dir,
};
use crate::bench_volume::need;

const FILE_MIB: u64 = 256;
/// Between two offsets, in bytes: 7919 blocks of 4 KiB.
const STEP: u64 = 7919 * 4096;
const DEPTHS: [u32; 2] = [1, 16];
const OPS: u64 = 10_000;

/// Where and how to reach one server: `--object`/`--image-opts` arguments for `qemu-io`.
struct Target {
    args: Vec<String>,
}

impl Target {
    fn new(port: u16, export: &str, creds: Option<&Path>) -> Target {
        let mut args = Vec::new();
        let mut opts = format!("driver=nbd,host=127.0.0.1,port={port},export={export}");
        if let Some(dir) = creds {
            args.push("--object".into());
            args.push(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                dir.display()
            ));
            opts.push_str(",tls-creds=tls0");
        }
        args.push("--image-opts".into());
        args.push(opts);
        Target { args }
    }

    /// IOPS of one run: `OPS` 4 KiB operations at scattered offsets, `depth` in flight (in
    /// batches: `depth` aio requests, then `aio_flush` waits for them).
    fn iops(&self, depth: u32, write: bool) -> anyhow::Result<f64> {
        let size = FILE_MIB << 20;
        let mut script = String::new();
        for i in 0..OPS {
            let off = (i * STEP) % (size - 4096);
            let cmd = match (depth, write) {
                (1, false) => "read -q",
                (1, true) => "write -q -P 0x5a",
                (_, false) => "aio_read -q",
                (_, true) => "aio_write -q -P 0x5a",
            };
            script.push_str(&format!("{cmd} {off} 4096\n"));
            if depth > 1 && (i + 1) % u64::from(depth) == 0 {
                script.push_str("aio_flush\n");
            }
        }
        script.push_str(if depth > 1 {
            "aio_flush\nflush\n"
        } else {
            "flush\n"
        });
        let mut child = Command::new("qemu-io")
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let t = Instant::now();
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().context("qemu-io stdin")?;
            stdin.write_all(script.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        let secs = t.elapsed().as_secs_f64();
        ensure!(
            out.status.success() && out.stderr.is_empty(),
            "qemu-io {}: {}",
            self.args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(OPS as f64 / secs)
    }
}

fn run_tern(tern: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(tern).args(args).output()?;
    ensure!(
        out.status.success(),
        "tern {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A volume node on `lun`, with `--tls-dir` when `tls` is given; its address once it answers
/// and sees itself coordinator.
fn tern_node(
    tern: &Path,
    lun: &Path,
    etcd: &str,
    tls: Option<&Path>,
    log: &Path,
) -> anyhow::Result<(ChildGuard, String)> {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(tern);
    cmd.args(["volume", "serve", "--node-id", "1", "--listen", &addr])
        .args(["--etcd", etcd, "--lun"])
        .arg(lun);
    if let Some(d) = tls {
        cmd.arg("--tls-dir").arg(d);
    }
    let child = ChildGuard(
        cmd.stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()?,
    );
    let mut status = vec!["volume", "status", "--json", "--node", &addr];
    let d;
    if let Some(t) = tls {
        d = t.display().to_string();
        status.extend(["--tls-dir", &d]);
    }
    wait_for("the node to coordinate", Duration::from_secs(30), || {
        run_tern(tern, &status).is_ok_and(|s| s.contains("\"role\":\"coordinator\""))
    });
    Ok((child, addr))
}

/// `qemu-nbd` serving the file's bytes of the LUN (`offset`, `size`), with TLS when `creds`.
fn qemu_nbd(
    lun: &Path,
    offset: u64,
    size: u64,
    creds: Option<&Path>,
) -> anyhow::Result<(ChildGuard, u16)> {
    let port = free_port();
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-x", "q", "-b", "127.0.0.1", "-p", &port.to_string(), "-t"])
        .arg("--shared=8")
        .args(qemu_nbd_cache_args());
    if let Some(dir) = creds {
        cmd.arg("--object")
            .arg(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on",
                dir.display()
            ))
            .arg("--tls-creds=tls0");
    }
    cmd.arg("--image-opts").arg(format!(
        "driver=raw,offset={offset},size={size},file.driver=file,file.filename={}",
        lun.display()
    ));
    let child = ChildGuard(cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?);
    wait_for("qemu-nbd", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    Ok((child, port))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// [depth][read, write] medians of Tern and qemu-nbd, measured in alternating rounds.
type Table = Vec<[(f64, f64); 2]>;

fn measure(runs: usize, tern: &Target, qemu: &Target) -> anyhow::Result<Table> {
    for t in [tern, qemu] {
        t.iops(4, false)?; // warm-up: connections, page cache
    }
    let mut out = Vec::new();
    for depth in DEPTHS {
        let mut cell = [(0.0, 0.0); 2];
        for (k, write) in [false, true].into_iter().enumerate() {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for _ in 0..runs {
                a.push(tern.iops(depth, write)?);
                b.push(qemu.iops(depth, write)?);
            }
            cell[k] = (median(a), median(b));
        }
        out.push(cell);
    }
    Ok(out)
}

pub fn run(runs: usize) -> anyhow::Result<()> {
    for t in ["etcd", "qemu-nbd", "qemu-io"] {
        need(t)?;
    }
    // TERN_BENCH_BIN=PATH: that tern binary instead of the workspace's (an earlier build).
    let tern = match std::env::var_os("TERN_BENCH_BIN") {
        Some(p) => std::path::PathBuf::from(p),
        None => build_release_tern()?,
    };
    let dir = scratch_dir("tls-nbd")?;
    let res = bench(runs.max(1), &tern, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    res
}

fn bench(runs: usize, tern: &Path, dir: &Path) -> anyhow::Result<()> {
    let pki = dir.join("pki");
    let pki_s = pki.display().to_string();
    run_tern(tern, &["pki", "init", "--dir", &pki_s])?;
    for (name, role) in [("node-1", "host"), ("qemu-nbd", "host"), ("bench", "host")] {
        run_tern(
            tern,
            &[
                "pki", "issue", "--dir", &pki_s, "--name", name, "--role", role,
            ],
        )?;
    }
    let (node_dir, qemu_dir, client_dir) =
        (pki.join("node-1"), pki.join("qemu-nbd"), pki.join("bench"));
    let client_s = client_dir.display().to_string();

    let etcd = Etcd::start();
    let lun = dir.join("lun");
    let size = FILE_MIB << 20;
    run_tern(
        tern,
        &[
            "volume",
            "format",
            "--size",
            &(size + (64 << 20)).to_string(),
            "--lun",
            &lun.display().to_string(),
        ],
    )?;

    // Phase 1: TLS on both.
    let (node, addr) = tern_node(tern, &lun, &etcd.url, Some(&node_dir), &dir.join("n1.log"))?;
    let cli = ["--node", addr.as_str(), "--tls-dir", client_s.as_str()];
    run_tern(
        tern,
        &[
            &[
                "volume",
                "create",
                "bench",
                "--size",
                &size.to_string(),
                "--preallocate",
            ][..],
            &cli,
        ]
        .concat(),
    )?;
    run_tern(
        tern,
        &[&["volume", "lease", "acquire", "bench"][..], &cli].concat(),
    )?;
    // Where the file's bytes sit in the LUN (preallocated on an empty volume: one run).
    let v = tern_volume::store::Volume::open(&tern_volume::lun::FileLun::open(&lun)?)?;
    let map = &v.meta.files["bench"].map;
    ensure!(
        map.windows(2).all(|w| w[1] == w[0] + 1),
        "file is not contiguous"
    );
    let base = v.sb.extent_offset(map[0]);
    let port = addr.rsplit_once(':').context("node address")?.1.parse()?;
    let (q, qport) = qemu_nbd(&lun, base, size, Some(&qemu_dir))?;
    let tls = measure(
        runs,
        &Target::new(port, "bench", Some(&client_dir)),
        &Target::new(qport, "q", Some(&client_dir)),
    )?;
    drop(q);
    drop(node);

    // Phase 2: plain on both, the same file and LUN window.
    let (node, addr) = tern_node(tern, &lun, &etcd.url, None, &dir.join("n1-plain.log"))?;
    let cli = ["--node", addr.as_str()];
    wait_for("the write lease again", Duration::from_secs(30), || {
        run_tern(
            tern,
            &[&["volume", "lease", "acquire", "bench"][..], &cli].concat(),
        )
        .is_ok()
    });
    let port = addr.rsplit_once(':').context("node address")?.1.parse()?;
    let (q, qport) = qemu_nbd(&lun, base, size, None)?;
    let plain = measure(
        runs,
        &Target::new(port, "bench", None),
        &Target::new(qport, "q", None),
    )?;
    drop(q);
    drop(node);

    println!(
        "\nNBD, 4 KiB scattered (step 7919 blocks) over a {FILE_MIB} MiB volume file, qemu-io \
         ({}), qemu-nbd {}, {OPS} ops per run, median of {runs} runs; load average {}\n",
        peer_version("qemu-io")?,
        qemu_nbd_cache_args().join(" "),
        load_average()
    );
    println!(
        "| depth | op | Tern TLS IOPS | qemu-nbd TLS IOPS | Tern TLS / qemu-nbd TLS | Tern plain IOPS | qemu-nbd plain IOPS | Tern plain / qemu-nbd plain | Tern TLS / plain | qemu-nbd TLS / plain |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, depth) in DEPTHS.iter().enumerate() {
        for (k, op) in ["read", "write"].iter().enumerate() {
            let (tt, qt) = tls[i][k];
            let (tp, qp) = plain[i][k];
            println!(
                "| {depth} | {op} | {tt:.0} | {qt:.0} | {:.2}× | {tp:.0} | {qp:.0} | {:.2}× | {:.2}× | {:.2}× |",
                tt / qt,
                tp / qp,
                tt / tp,
                qt / qp
            );
        }
    }
    Ok(())
}
