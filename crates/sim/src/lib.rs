//! The data-centre simulator: drives tern-policy over utilisation traces and reports energy, SLA and migrations

#![forbid(unsafe_code)]
