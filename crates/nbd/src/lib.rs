//! The NBD protocol: fixed-newstyle handshake, transmission phase, structured replies; server and client

#![forbid(unsafe_code)]
