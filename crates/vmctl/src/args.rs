//! The command line of a VMM process: `tern vm run …` or `tern vm receive …` for a VM spec, so
//! a supervisor (the agent) starts VMMs the way an operator would, with flags `tern vm` parses.

use std::path::{Path, PathBuf};

use tern_api::cluster::VmCreate;

/// What the VMM does first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmmMode {
    /// Boot `kernel` with `cmdline` (`tern vm run`).
    Run {
        /// `--kernel`: a path or `builtin:NAME`.
        kernel: String,
        /// `--cmdline`.
        cmdline: String,
    },
    /// Wait for an incoming migration on `listen` (`tern vm receive`).
    Receive {
        /// `--listen HOST:PORT`.
        listen: String,
    },
}

/// The arguments of one VMM process, built from a spec.
///
/// ```
/// use tern_api::cluster::VmCreate;
/// use tern_vmctl::VmmArgs;
/// let spec: VmCreate = serde_json::from_str(
///     r#"{"name":"web-1","vcpus":2,"memory_mib":64,"kernel":"builtin:testguest"}"#,
/// ).unwrap();
/// let args = VmmArgs::run(&spec, "/run/tern/vms".as_ref()).disk("volume://10.0.0.1:7000/web-1").to_args();
/// assert_eq!(args[..4], ["vm", "run", "--kernel", "builtin:testguest"]);
/// assert!(args.ends_with(&["--disk".into(), "volume://10.0.0.1:7000/web-1".into()]));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmArgs {
    /// Run or receive.
    pub mode: VmmMode,
    /// `--name`.
    pub name: String,
    /// `--vcpus` (for `receive`: the count the incoming VM must have).
    pub vcpus: u32,
    /// `--memory-mib` (for `receive`: the size the incoming VM must have).
    pub memory_mib: u64,
    /// `--runtime-dir`.
    pub runtime_dir: PathBuf,
    /// `--serial`: `stdout`, `null` or `file:PATH`.
    pub serial: String,
    /// `--disk`, one per disk.
    pub disks: Vec<String>,
    /// `--api-sock`, when not the runtime directory's default.
    pub api_sock: Option<PathBuf>,
}

impl VmmArgs {
    fn new(mode: VmmMode, spec: &VmCreate, runtime_dir: &Path) -> Self {
        VmmArgs {
            mode,
            name: spec.name.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            runtime_dir: runtime_dir.to_path_buf(),
            serial: format!("file:{}", console_path(runtime_dir, &spec.name).display()),
            disks: Vec::new(),
            api_sock: None,
        }
    }

    /// `tern vm run` of `spec`, its entry and socket in `runtime_dir` and its console in
    /// `<runtime_dir>/<name>.console`.
    pub fn run(spec: &VmCreate, runtime_dir: &Path) -> Self {
        let mode = VmmMode::Run {
            kernel: spec.kernel.clone(),
            cmdline: spec.cmdline.clone(),
        };
        Self::new(mode, spec, runtime_dir)
    }

    /// `tern vm receive` of `spec` on `listen` (HOST:PORT), refusing a VM of another size.
    pub fn receive(spec: &VmCreate, listen: &str, runtime_dir: &Path) -> Self {
        let mode = VmmMode::Receive {
            listen: listen.to_string(),
        };
        Self::new(mode, spec, runtime_dir)
    }

    /// Adds a disk (a path or `volume://NODE/FILE`, with `,readonly` if so).
    pub fn disk(mut self, disk: impl Into<String>) -> Self {
        self.disks.push(disk.into());
        self
    }

    /// Sets where the console goes (`stdout`, `null`, `file:PATH`).
    pub fn serial(mut self, serial: impl Into<String>) -> Self {
        self.serial = serial.into();
        self
    }

    /// Sets the control socket.
    pub fn api_sock(mut self, sock: impl Into<PathBuf>) -> Self {
        self.api_sock = Some(sock.into());
        self
    }

    /// The arguments after the `tern` binary: `vm run …` or `vm receive …`.
    pub fn to_args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec!["vm".into()];
        match &self.mode {
            VmmMode::Run { kernel, cmdline } => a.extend([
                "run".into(),
                "--kernel".into(),
                kernel.clone(),
                "--cmdline".into(),
                cmdline.clone(),
            ]),
            VmmMode::Receive { listen } => {
                a.extend(["receive".into(), "--listen".into(), listen.clone()])
            }
        }
        a.extend([
            "--name".into(),
            self.name.clone(),
            "--vcpus".into(),
            self.vcpus.to_string(),
            "--memory-mib".into(),
            self.memory_mib.to_string(),
            "--runtime-dir".into(),
            self.runtime_dir.display().to_string(),
            "--serial".into(),
            self.serial.clone(),
        ]);
        if let Some(sock) = &self.api_sock {
            a.extend(["--api-sock".into(), sock.display().to_string()]);
        }
        for d in &self.disks {
            a.extend(["--disk".into(), d.clone()]);
        }
        a
    }
}

/// Where a VM started by [`VmmArgs`] writes its console: `<runtime_dir>/<name>.console`.
pub fn console_path(runtime_dir: &Path, name: &str) -> PathBuf {
    runtime_dir.join(format!("{name}.console"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmCreate {
        serde_json::from_str(
            r#"{"name":"db","vcpus":2,"memory_mib":128,"kernel":"builtin:testguest","cmdline":"tern.hb_ms=50"}"#,
        )
        .unwrap()
    }

    #[test]
    fn run_args_carry_the_spec_and_the_runtime_dir() {
        let a = VmmArgs::run(&spec(), Path::new("/run/t")).to_args();
        assert_eq!(
            a.join(" "),
            "vm run --kernel builtin:testguest --cmdline tern.hb_ms=50 --name db --vcpus 2 \
             --memory-mib 128 --runtime-dir /run/t --serial file:/run/t/db.console"
        );
    }

    #[test]
    fn receive_args_listen_and_check_the_size_with_the_disks_last() {
        let a = VmmArgs::receive(&spec(), "10.0.0.2:7001", Path::new("/run/t"))
            .disk("volume://10.0.0.2:7000/db")
            .disk("/img/b,readonly")
            .serial("null")
            .api_sock("/tmp/db.sock")
            .to_args();
        assert_eq!(
            a.join(" "),
            "vm receive --listen 10.0.0.2:7001 --name db --vcpus 2 --memory-mib 128 \
             --runtime-dir /run/t --serial null --api-sock /tmp/db.sock \
             --disk volume://10.0.0.2:7000/db --disk /img/b,readonly"
        );
    }

    #[test]
    fn an_empty_cmdline_stays_one_argument() {
        let mut s = spec();
        s.cmdline = String::new();
        let a = VmmArgs::run(&s, Path::new("/r")).to_args();
        let i = a.iter().position(|x| x == "--cmdline").unwrap();
        assert_eq!(a[i + 1], "");
        assert_eq!(a[i + 2], "--name");
    }
}
