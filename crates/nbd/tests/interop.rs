//! Interoperability with standard NBD tools: `qemu-img`, `qemu-io`, `nbdinfo`, `nbdcopy` against
//! our server, and our client against `qemu-nbd`. These tools are part of the CI image; a missing
//! tool fails the test loudly.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_nbd::{Client, FileBackend, StaticExports};
use tern_test_support::{free_port, require_tools};

const SIZE: u64 = 4 << 20;

fn tool(name: &str) -> Command {
    require_tools(&[name]);
    Command::new(name)
}

fn run(mut c: Command) -> String {
    let out = c.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{c:?} failed: {text}");
    text
}

fn serve_file() -> (String, tempfile::NamedTempFile) {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(SIZE).unwrap();
    let mut ex = StaticExports::new();
    ex.insert(
        "disk",
        Arc::new(FileBackend::open(f.path(), false).unwrap()),
    );
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || tern_nbd::run_listener(l, Arc::new(ex)));
    (format!("nbd://127.0.0.1:{port}/disk"), f)
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

#[test]
fn nbdinfo_reports_size_and_flags() {
    let (uri, _f) = serve_file();
    let mut c = tool("nbdinfo");
    c.arg("--json").arg(&uri);
    let out = run(c);
    assert!(out.contains(&format!("\"export-size\": {SIZE}")), "{out}");
    assert!(out.contains("\"can_flush\": true"), "{out}");
    assert!(out.contains("\"can_multi_conn\": true"), "{out}");
    let mut l = tool("nbdinfo");
    l.arg("--list").arg(uri.trim_end_matches("/disk"));
    assert!(run(l).contains("disk"));
}

#[test]
fn qemu_img_convert_into_and_out_of_our_server() {
    let (uri, f) = serve_file();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let data = pattern(SIZE as usize, 1);
    std::fs::write(&src, &data).unwrap();
    let mut c = tool("qemu-img");
    c.args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&uri);
    run(c);
    assert_eq!(
        std::fs::read(f.path()).unwrap(),
        data,
        "qemu-img convert into the export"
    );
    let out = dir.path().join("out.qcow2");
    let mut c = tool("qemu-img");
    c.args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&uri)
        .arg(&out);
    run(c);
    let mut c = tool("qemu-img");
    c.args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(&src)
        .arg(&out);
    assert!(run(c).contains("identical"));
}

#[test]
fn qemu_io_write_flush_read_verify() {
    let (uri, f) = serve_file();
    let mut c = tool("qemu-io");
    c.args([
        "-f",
        "raw",
        "-c",
        "write -P 0xab 65536 131072",
        "-c",
        "flush",
        "-c",
        "write -z 65536 4096",
    ])
    .args([
        "-c",
        "write -P 0xcd -f 1048576 4096",
        "-c",
        "read -P 0xab 69632 126976",
        "-c",
        "read -P 0 65536 4096",
    ])
    .args([
        "-c",
        "discard 2097152 65536",
        "-c",
        "read -P 0xcd 1048576 4096",
    ])
    .arg(&uri);
    let out = run(c);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.contains("error"), "{out}");
    let disk = std::fs::read(f.path()).unwrap();
    assert!(disk[65536..69632].iter().all(|&b| b == 0));
    assert!(disk[69632..196608].iter().all(|&b| b == 0xab));
    assert!(disk[1048576..1052672].iter().all(|&b| b == 0xcd));
}

#[test]
fn nbdcopy_round_trip() {
    let (uri, f) = serve_file();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let data = pattern(SIZE as usize, 9);
    std::fs::write(&src, &data).unwrap();
    let mut c = tool("nbdcopy");
    c.arg(&src).arg(&uri);
    run(c);
    assert_eq!(std::fs::read(f.path()).unwrap(), data);
}

#[test]
fn our_client_against_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("q.raw");
    std::fs::write(&img, vec![0u8; SIZE as usize]).unwrap();
    let port = free_port();
    let mut child = tool("qemu-nbd")
        .args([
            "-f",
            "raw",
            "-x",
            "q",
            "-b",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
        ])
        .arg(&img)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}");
    let start = Instant::now();
    let mut client = loop {
        match Client::connect(&addr, "q") {
            Ok(c) => break c,
            Err(e) if start.elapsed() > Duration::from_secs(10) => {
                let _ = child.kill();
                panic!("qemu-nbd did not come up: {e}");
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let data = pattern(65536, 3);
    client.write(8192, &data, true).unwrap();
    client.flush().unwrap();
    client.write_zeroes(8192, 4096, false).unwrap();
    let mut back = vec![0u8; 65536];
    client.read(8192, &mut back).unwrap();
    assert!(back[..4096].iter().all(|&b| b == 0));
    assert_eq!(&back[4096..], &data[4096..]);
    client.disconnect().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let disk = std::fs::read(&img).unwrap();
    assert_eq!(&disk[12288..8192 + 65536], &data[4096..]);
}

/// A backend with a hole in the middle, to check what tools make of `base:allocation`.
struct Holey;
impl tern_nbd::Backend for Holey {
    fn size(&self) -> u64 {
        3 << 20
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), tern_nbd::Errno> {
        for (i, b) in buf.iter_mut().enumerate() {
            let at = offset + i as u64;
            *b = if (1 << 20..2 << 20).contains(&at) {
                0
            } else {
                0xab
            };
        }
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64, _: bool) -> Result<(), tern_nbd::Errno> {
        Err(tern_nbd::Errno::Perm)
    }
    fn flush(&self) -> Result<(), tern_nbd::Errno> {
        Ok(())
    }
    fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> Result<Vec<tern_nbd::proto::StatusExtent>, tern_nbd::Errno> {
        use tern_nbd::proto::StatusExtent;
        let end = offset + u64::from(len);
        let mut v = Vec::new();
        for (a, b, hole) in [
            (0, 1 << 20, false),
            (1 << 20, 2 << 20, true),
            (2 << 20, 3 << 20, false),
        ] {
            let (s, e) = (offset.max(a), end.min(b));
            if s < e {
                v.push(StatusExtent {
                    len: e - s,
                    hole,
                    zero: hole,
                });
            }
        }
        Ok(v)
    }
}

#[test]
fn nbdinfo_map_and_qemu_img_map_read_base_allocation() {
    let mut ex = StaticExports::new();
    ex.insert("h", Arc::new(Holey));
    ex.insert("plain", {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(SIZE).unwrap();
        let b = FileBackend::open(f.path(), true).unwrap();
        drop(f);
        Arc::new(b)
    });
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || tern_nbd::run_listener(l, Arc::new(ex)));
    let mut c = tool("nbdinfo");
    c.args(["--map", &format!("nbd://127.0.0.1:{port}/h")]);
    let map = run(c);
    let rows: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 3, "{map}");
    assert_eq!(rows[0][..3], ["0", "1048576", "0"], "{map}");
    assert_eq!(rows[1][..3], ["1048576", "1048576", "3"], "{map}");
    assert_eq!(rows[1][3], "hole,zero", "{map}");
    assert_eq!(rows[2][..3], ["2097152", "1048576", "0"], "{map}");
    let mut q = tool("qemu-img");
    q.args([
        "map",
        "--output=json",
        "-f",
        "raw",
        &format!("nbd://127.0.0.1:{port}/h"),
    ]);
    let out = run(q);
    let zero_run = format!("\"start\": {}, \"length\": {}", 1 << 20, 1 << 20);
    assert!(
        out.lines()
            .any(|l| l.contains(&zero_run) && l.contains("\"data\": false")),
        "{out}"
    );
    // A backend without its own block status reports all data.
    let mut c = tool("nbdinfo");
    c.args(["--map", &format!("nbd://127.0.0.1:{port}/plain")]);
    let map = run(c);
    assert_eq!(map.lines().count(), 1, "{map}");
    assert!(map.contains("data"), "{map}");
}
