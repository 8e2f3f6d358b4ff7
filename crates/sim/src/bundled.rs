//! The PlanetLab traces and CloudSim's recorded file orders, built into the binary so `tern sim` needs
//! no files wherever it is installed. The trace archive is `data/planetlab/traces.tar.xz` as shipped
//! (2.2 MB, already xz); the order files are packed and xz-compressed by `build.rs` (≈ 0.4 MB of names
//! → ≈ 60 kB). Both are decompressed on use.

use std::io::Read;
use std::sync::OnceLock;

/// `data/planetlab/traces.tar.xz`, byte for byte.
pub const TRACES_XZ: &[u8] = include_bytes!("../../../data/planetlab/traces.tar.xz");

/// How messages name the built-in archive.
pub const TRACES_LABEL: &str = "(built-in) data/planetlab/traces.tar.xz";

/// How messages name the built-in order files.
pub const ORDER_LABEL: &str = "(built-in) data/planetlab/cloudsim-listfiles-order";

const ORDER_XZ: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/cloudsim-order.xz"));

/// Day → its recorded order (names, one per line), decompressed once.
fn orders() -> &'static Vec<(String, String)> {
    static ORDERS: OnceLock<Vec<(String, String)>> = OnceLock::new();
    ORDERS.get_or_init(|| {
        let mut text = String::new();
        // the blob is made by build.rs from files in the tree; failing to read it is a build defect
        xz2::read::XzDecoder::new(ORDER_XZ)
            .read_to_string(&mut text)
            .expect("the built-in order blob is valid xz-compressed UTF-8");
        let mut out: Vec<(String, String)> = Vec::new();
        for line in text.lines() {
            match (line.strip_prefix('/'), out.last_mut()) {
                (Some(day), _) => out.push((day.to_string(), String::new())),
                (None, Some((_, names))) => {
                    names.push_str(line);
                    names.push('\n');
                }
                (None, None) => {}
            }
        }
        out
    })
}

/// CloudSim 3.0.3's `File.listFiles()` order of `day`'s trace files (one name per line), if recorded.
pub fn cloudsim_order(day: &str) -> Option<&'static str> {
    orders()
        .iter()
        .find(|(d, _)| d == day)
        .map(|(_, names)| names.as_str())
}

/// Days with a recorded CloudSim order, sorted.
pub fn cloudsim_order_days() -> Vec<&'static str> {
    orders().iter().map(|(d, _)| d.as_str()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_orders_equal_the_files_in_the_tree() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../data/planetlab/cloudsim-listfiles-order");
        let mut days = Vec::new();
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let day = p.file_stem().unwrap().to_string_lossy().into_owned();
            let file = std::fs::read_to_string(&p).unwrap();
            let want: Vec<&str> = file.lines().filter(|l| !l.is_empty()).collect();
            let got: Vec<&str> = cloudsim_order(&day).unwrap().lines().collect();
            assert_eq!(got, want, "{day}");
            days.push(day);
        }
        days.sort();
        assert_eq!(cloudsim_order_days(), days);
        assert_eq!(days.len(), 10);
        assert!(cloudsim_order("20990101").is_none());
    }
}
