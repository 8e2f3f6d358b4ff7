//! `tern image …`: write out a guest image that Tern embeds, so another VMM (QEMU) can boot the very
//! same guest.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

/// Subcommands of `tern image`.
#[derive(Debug, clap::Subcommand)]
pub enum ImageCommand {
    /// Write an embedded guest image to a file.
    ///
    /// The test guest is a static x86_64 ELF with a PVH entry; boot it under QEMU with e.g.
    /// `qemu-system-x86_64 -accel kvm -M microvm -cpu qemu64,tsc-frequency=<host TSC Hz>,+tsc-deadline
    /// -m 512 -kernel FILE -append 'tern.hb_ms=100' -nodefaults -serial stdio -display none
    /// -no-reboot -device isa-debug-exit,iobase=0x501,iosize=1` (see docs/guest.md).
    Export {
        /// The embedded image: `testguest`.
        name: String,
        /// Where to write it (`-` for standard output). An existing file is replaced.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// List the embedded images.
    List,
}

pub fn run(cmd: ImageCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ImageCommand::Export { name, out } => {
            let Some(bytes) = tern_guest_image::builtin(&name) else {
                anyhow::bail!(
                    "no embedded image named {name:?}; available: {}",
                    tern_guest_image::NAMES.join(", ")
                );
            };
            if out.as_os_str() == "-" {
                std::io::stdout()
                    .lock()
                    .write_all(bytes)
                    .context("writing the image to standard output")?;
            } else {
                std::fs::write(&out, bytes)
                    .with_context(|| format!("cannot write {}", out.display()))?;
                eprintln!("wrote {name} ({} bytes) to {}", bytes.len(), out.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        ImageCommand::List => {
            for name in tern_guest_image::NAMES {
                let len = tern_guest_image::builtin(name).map_or(0, <[u8]>::len);
                println!("{name}\t{len} bytes\tx86_64 ELF, PVH entry (docs/guest.md)");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
