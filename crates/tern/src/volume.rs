//! `tern volume …`: format a LUN, serve it, manage virtual-disk files and leases.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use tern_volume::format::{EXTENT_SIZE, MIN_LUN_SIZE};
use tern_volume::lun::FileLun;
use tern_volume::store::{self, FormatOptions};

/// Subcommands of `tern volume`.
#[derive(Debug, clap::Subcommand)]
pub enum VolumeCommand {
    /// Write a new, empty volume onto a LUN (a block device, or a file created at --size).
    Format(FormatArgs),
}

/// `tern volume format`.
#[derive(Debug, clap::Args)]
pub struct FormatArgs {
    /// The LUN: a block device or a regular file (created if missing).
    #[arg(long)]
    lun: PathBuf,
    /// Size of the volume, e.g. 8G, 512M (required when the file does not exist yet; a smaller
    /// existing file is grown to it).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Overwrite a LUN that already holds a volume or other data.
    #[arg(long)]
    force: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// Parse sizes like `4096`, `64K`, `64M`, `8G`, `1T` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size unit {c:?} (use K, M, G or T)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 4096, 64M, 8G)"))?;
    n.checked_mul(mult)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("size {s:?} is out of range"))
}

pub fn run(cmd: VolumeCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        VolumeCommand::Format(a) => format(a),
    }
}

fn format(a: FormatArgs) -> anyhow::Result<ExitCode> {
    let exists = a.lun.exists();
    if !exists {
        let size = a
            .size
            .context("the LUN does not exist; give --size to create it")?;
        anyhow::ensure!(
            size >= MIN_LUN_SIZE,
            "--size {size} is below the minimum volume size of {MIN_LUN_SIZE} bytes"
        );
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&a.lun)
            .with_context(|| format!("creating {}", a.lun.display()))?;
        f.set_len(size)?;
    } else if let Some(size) = a.size {
        let md = std::fs::metadata(&a.lun)?;
        if md.is_file() && md.len() < size {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&a.lun)?
                .set_len(size)?;
        }
    }
    let lun = FileLun::open(&a.lun).with_context(|| format!("opening {}", a.lun.display()))?;
    let uuid = uuid_now();
    let sb = match store::format(
        &lun,
        FormatOptions {
            force: a.force,
            uuid,
        },
    ) {
        Ok(sb) => sb,
        Err(e) => {
            if !exists {
                let _ = std::fs::remove_file(&a.lun);
            }
            return Err(e.into());
        }
    };
    let uuid_hex: String = sb.uuid.iter().map(|b| format!("{b:02x}")).collect();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "lun": a.lun, "uuid": uuid_hex, "size": sb.lun_size,
                "extent_size": EXTENT_SIZE, "extents": sb.extent_count,
            })
        );
    } else {
        println!(
            "formatted {}: volume {uuid_hex}, {} extents of {} MiB ({} bytes usable)",
            a.lun.display(),
            sb.extent_count,
            EXTENT_SIZE >> 20,
            u64::from(sb.extent_count) * EXTENT_SIZE
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn uuid_now() -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS's randomness per process; two hashes give 128 bits.
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let mut u = [0u8; 16];
    for (i, chunk) in u.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(t);
        h.write_usize(i);
        chunk.copy_from_slice(&h.finish().to_le_bytes());
    }
    u
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_binary_units_and_reject_garbage() {
        assert_eq!(parse_size("8G"), Ok(8 << 30));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
