//! The nbd section of `cargo xtask bench tls`.

pub fn run(_runs: usize) -> anyhow::Result<()> {
    anyhow::bail!("the nbd section of bench tls is not built yet")
}
