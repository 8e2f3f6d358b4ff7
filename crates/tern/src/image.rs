//! `tern image …`: write out a guest image that Tern embeds, so another VMM (QEMU) can boot the very
//! same guest.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;

/// Subcommands of `tern image`.
#[derive(Debug, clap::Subcommand)]
pub enum ImageCommand {
    /// Write an embedded guest image to a file.
    ///
    /// Without --out the image goes to standard output when that is a pipe or a file
    /// (`tern image export testguest > guest.elf`), and to NAME.elf in the current directory
    /// when it is a terminal.
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
        out: Option<PathBuf>,
    },
    /// List the embedded images.
    List,
}

/// Where `export` writes when no --out is given.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Destination {
    Stdout,
    File(PathBuf),
}

/// `--out` if given (`-` is standard output); otherwise standard output unless it is a terminal,
/// where binary bytes would only garble the screen, in which case `NAME.elf` here.
fn destination(out: Option<PathBuf>, name: &str, stdout_is_terminal: bool) -> Destination {
    match out {
        Some(p) if p.as_os_str() == "-" => Destination::Stdout,
        Some(p) => Destination::File(p),
        None if stdout_is_terminal => Destination::File(PathBuf::from(format!("{name}.elf"))),
        None => Destination::Stdout,
    }
}

fn write_file(path: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("wrote {name} ({} bytes) to {}", bytes.len(), path.display());
    Ok(())
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
            match destination(out, &name, std::io::stdout().is_terminal()) {
                Destination::Stdout => std::io::stdout()
                    .lock()
                    .write_all(bytes)
                    .context("writing the image to standard output")?,
                Destination::File(path) => write_file(&path, &name, bytes)?,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_out_the_image_goes_to_a_pipe_or_to_name_elf_on_a_terminal() {
        assert_eq!(destination(None, "testguest", false), Destination::Stdout);
        assert_eq!(
            destination(None, "testguest", true),
            Destination::File("testguest.elf".into())
        );
        assert_eq!(
            destination(Some("-".into()), "testguest", true),
            Destination::Stdout
        );
        assert_eq!(
            destination(Some("g.elf".into()), "testguest", false),
            Destination::File("g.elf".into())
        );
    }
}
