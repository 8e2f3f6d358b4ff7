//! The embedded Tern test guest: builds crates/guest and exposes its ELF image

#![forbid(unsafe_code)]
