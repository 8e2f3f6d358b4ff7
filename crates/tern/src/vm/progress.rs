//! Progress on the terminal: a bar or a spinner on stderr when it is a terminal, nothing at all
//! when it is piped or redirected (so scripts and logs see only the result lines).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// Whether progress is shown: stderr is a terminal.
pub fn shown() -> bool {
    std::io::stderr().is_terminal()
}

/// A bar of `template` (indicatif syntax), or `None` when stderr is not a terminal.
pub fn bar(template: &str) -> Option<ProgressBar> {
    if !shown() {
        return None;
    }
    let b = ProgressBar::new(0);
    b.set_style(
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    Some(b)
}

/// A spinner with `message` and the elapsed time, ticking on its own, or `None` when stderr is
/// not a terminal. For operations that report no figures while they run.
pub fn spinner(message: String) -> Option<ProgressBar> {
    if !shown() {
        return None;
    }
    let s = ProgressBar::new_spinner();
    s.set_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    s.set_message(message);
    s.enable_steady_tick(Duration::from_millis(100));
    Some(s)
}

/// Removes a bar or spinner from the terminal.
pub fn clear(b: Option<ProgressBar>) {
    if let Some(b) = b {
        b.finish_and_clear();
    }
}
