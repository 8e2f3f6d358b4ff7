//! Consolidation policy: overload detection, VM selection, placement and host power states; pure and deterministic

#![forbid(unsafe_code)]
