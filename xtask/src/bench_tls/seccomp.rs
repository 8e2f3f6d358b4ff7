//! The seccomp section of `cargo xtask bench tls`.

pub fn run(_runs: usize) -> anyhow::Result<()> {
    anyhow::bail!("the seccomp section of bench tls is not built yet")
}
