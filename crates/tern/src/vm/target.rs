//! Which running VM a control command talks to: `--api-sock PATH`, or `--name NAME` looked up in
//! the runtime directory.

use std::path::{Path, PathBuf};

use tern_vmctl::DEFAULT_RUNTIME_DIR;

/// `--api-sock PATH | --name NAME [--runtime-dir DIR]`, shared by every control subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct VmRef {
    /// Which VM: exactly one of --api-sock and --name.
    #[command(flatten)]
    pub by: VmSelector,
    /// Directory of runtime entries (where --name is looked up).
    #[arg(long, default_value = DEFAULT_RUNTIME_DIR, value_name = "DIR")]
    pub runtime_dir: PathBuf,
}

/// `--api-sock PATH` or `--name NAME`, one of them.
#[derive(Debug, Clone, clap::Args)]
#[group(required = true, multiple = false)]
pub struct VmSelector {
    /// The VM's control socket.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// The VM's name (as `tern vm list` shows it); its socket is found through its runtime entry.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
}

impl VmRef {
    /// The control socket to connect to.
    pub fn socket(&self) -> anyhow::Result<PathBuf> {
        match (&self.by.api_sock, &self.by.name) {
            (Some(sock), _) => Ok(sock.clone()),
            (None, Some(name)) => socket_of(&self.runtime_dir, name),
            (None, None) => anyhow::bail!("give --api-sock PATH or --name NAME"),
        }
    }

    /// How messages name the VM.
    pub fn describe(&self) -> String {
        match (&self.by.name, &self.by.api_sock) {
            (Some(n), _) => format!("VM {n:?}"),
            (None, Some(s)) => format!("the VM at {}", s.display()),
            (None, None) => "the VM".into(),
        }
    }
}

/// The control socket of the live VM named `name` in `dir`.
pub fn socket_of(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    Ok(tern_vmctl::find(dir, name)?.sock)
}
