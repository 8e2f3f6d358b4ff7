//! Days × policies in parallel (std threads over a shared work index) and the paper-style summary.
