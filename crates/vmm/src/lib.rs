//! The Tern VMM: a KVM virtual machine with its memory, vCPUs, boot loaders, devices and saved state.
//!
//! The only crate of the workspace allowed `unsafe`; each block says why it holds in a `// SAFETY:` comment.
