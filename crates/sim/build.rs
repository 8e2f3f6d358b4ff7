//! Packs the recorded CloudSim file orders (`data/planetlab/cloudsim-listfiles-order/<day>.txt`) into
//! one xz-compressed blob at `$OUT_DIR/cloudsim-order.xz` for `include_bytes!`, so the binary carries
//! them (≈ 0.4 MB of names, ≈ 60 kB compressed). Layout before compression: for each day, a line
//! `/<day>` (a slash cannot start a file name) followed by that day's names, one per line.
//! Cargo reruns this only when the folder or one of its files changes.

use std::io::Write;
use std::path::PathBuf;

fn main() {
    let manifest =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let dir = manifest.join("../../data/planetlab/cloudsim-listfiles-order");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut days: Vec<(String, PathBuf)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("tern-sim: cannot read {}: {e}", dir.display()))
        .map(|e| e.unwrap_or_else(|e| panic!("tern-sim: cannot read {}: {e}", dir.display())))
        .filter_map(|e| {
            let p = e.path();
            let day = p.file_name()?.to_str()?.strip_suffix(".txt")?.to_string();
            Some((day, p))
        })
        .collect();
    days.sort();
    let mut text = String::new();
    for (day, path) in &days {
        println!("cargo:rerun-if-changed={}", path.display());
        let names = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("tern-sim: cannot read {}: {e}", path.display()));
        text.push('/');
        text.push_str(day);
        text.push('\n');
        for line in names.lines().filter(|l| !l.is_empty()) {
            text.push_str(line);
            text.push('\n');
        }
    }
    let mut enc = xz2::write::XzEncoder::new(Vec::new(), 9);
    enc.write_all(text.as_bytes()).expect("xz in memory");
    let blob = enc.finish().expect("xz in memory");
    std::fs::write(out.join("cloudsim-order.xz"), blob).expect("writing to OUT_DIR");
}
