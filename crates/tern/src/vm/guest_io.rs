//! `tern vm console-input` (text to the guest's serial port) and `tern vm dirty-rate` (a sample of
//! how fast the guest dirties its memory): one control request each, see docs/api.md.

use std::process::ExitCode;

use tern_vmm::api::{self, Request};

use super::target::VmRef;

/// Options of `tern vm console-input`.
#[derive(Debug, clap::Args)]
pub struct ConsoleInputArgs {
    /// The VM.
    #[command(flatten)]
    pub vm: VmRef,
    /// The text to send; a newline is added unless it ends with one (or with --raw).
    #[arg(value_name = "TEXT")]
    pub text: String,
    /// Send the text exactly as given (no newline added).
    #[arg(long)]
    pub raw: bool,
    /// How long to wait, per piece, for the guest to read earlier input and make room, ms.
    #[arg(long, default_value_t = 5000, value_name = "MS")]
    pub wait_ms: u64,
}

/// Options of `tern vm dirty-rate`.
#[derive(Debug, clap::Args)]
pub struct DirtyRateArgs {
    /// The VM.
    #[command(flatten)]
    pub vm: VmRef,
    /// How long dirty logging stays on for the sample, ms (10 to 10000).
    #[arg(long, default_value_t = 200, value_name = "MS")]
    pub window_ms: u64,
    /// Print the sample as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The text's bytes in pieces the serial FIFO takes whole, split only at character boundaries.
fn pieces(text: &str, max: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut cut = rest.len().min(max);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (head, tail) = rest.split_at(cut);
        out.push(head);
        rest = tail;
    }
    out
}

pub fn console_input(a: ConsoleInputArgs) -> anyhow::Result<ExitCode> {
    let sock = a.vm.socket()?;
    let mut text = a.text;
    if !a.raw && !text.ends_with('\n') {
        text.push('\n');
    }
    if text.is_empty() {
        anyhow::bail!("nothing to send (give some TEXT)");
    }
    let wait_ms = a.wait_ms.min(tern_api::vmm::CONSOLE_INPUT_MAX_WAIT_MS);
    let all = pieces(&text, tern_api::vmm::CONSOLE_INPUT_MAX_BYTES);
    for (i, piece) in all.iter().enumerate() {
        let req = Request::ConsoleInput {
            data: (*piece).to_string(),
            wait_ms,
        };
        let resp = api::call(&sock, &req)?;
        if !resp.ok {
            anyhow::bail!(
                "the VM refused piece {} of {} ({} of {} bytes sent): {}",
                i + 1,
                all.len(),
                all[..i].iter().map(|p| p.len()).sum::<usize>(),
                text.len(),
                resp.error.unwrap_or_else(|| "no reason given".into())
            );
        }
    }
    println!("ok");
    Ok(ExitCode::SUCCESS)
}

pub fn dirty_rate(a: DirtyRateArgs) -> anyhow::Result<ExitCode> {
    let sock = a.vm.socket()?;
    let resp = api::call(
        &sock,
        &Request::DirtyRate {
            window_ms: a.window_ms,
        },
    )?;
    if !resp.ok {
        anyhow::bail!(
            "the VM refused: {}",
            resp.error.unwrap_or_else(|| "no reason given".into())
        );
    }
    let Some(d) = resp.dirty_rate else {
        anyhow::bail!("the VM answered dirty_rate without a sample (an older VMM?)");
    };
    if a.json {
        println!("{}", serde_json::to_string(&d)?);
    } else {
        println!(
            "{} pages/s ({:.1} MiB/s): {} pages dirtied in {} ms; sampling cost the VMM {} µs",
            d.pages_per_s,
            d.pages_per_s as f64 * 4096.0 / (1 << 20) as f64,
            d.pages,
            d.window_ms,
            d.cost_us
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::pieces;

    #[test]
    fn text_is_cut_into_fifo_sized_pieces_at_character_boundaries() {
        assert_eq!(pieces("load 70\n", 64), ["load 70\n"]);
        let long = "a".repeat(130);
        let p = pieces(&long, 64);
        assert_eq!(p.iter().map(|s| s.len()).collect::<Vec<_>>(), [64, 64, 2]);
        // "é" is two bytes: a piece never splits it.
        let text = format!("{}é", "a".repeat(63));
        assert_eq!(pieces(&text, 64), ["a".repeat(63), "é".to_string()]);
        assert!(pieces("", 64).is_empty());
    }
}
