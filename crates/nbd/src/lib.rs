//! The NBD protocol (fixed newstyle, structured replies): a server that executes several requests of
//! a connection at once, a one-request-at-a-time client and a pipelining one.
//!
//! ```text
//! client                                   server
//!   |  <- NBDMAGIC IHAVEOPT flags            |   handshake (fixed newstyle)
//!   |  client flags ->                       |
//!   |  OPT_STRUCTURED_REPLY ->   <- ACK      |
//!   |  OPT_GO(name, infos) -> <- INFO.. ACK  |
//!   |  request(cookie) ->  <- reply(cookie)  |   transmission: many in flight, replies
//!   |  request(cookie) ->  <- reply(cookie)  |   matched by cookie (any order)
//! ```
//!
//! [`proto`] holds the pure codec and the request validator ([`proto::validate`]), which every
//! request passes before any data is touched: bad magic closes the connection, an oversized or
//! out-of-range request gets an NBD error reply, and no allocation exceeds
//! [`proto::MAX_REQUEST_LEN`]. [`server::serve`] runs over any `Read`/`Write` pair, so tests feed it
//! arbitrary bytes; the volume service's redirected I/O relays each client connection to the
//! coordinator ([`server::Relay`] over a [`client::RelayConnection`]: many requests in flight, no
//! thread per request) and uses [`client::SharedClient`] for everything else.

#![forbid(unsafe_code)]

pub mod client;
pub mod proto;
pub mod server;
pub mod tls;

pub use client::{
    Client, ClientError, RelayConnection, RelayReply, SharedClient, control, control_tls,
    list_exports, list_exports_tls,
};
pub use proto::Errno;
pub use server::{
    Backend, Exports, FileBackend, ListenerOptions, ListenerStats, Peer, Refusal, Relay, Relayed,
    ServeError, StaticExports, run_listener, run_listener_with, serve, serve_tcp, serve_tcp_with,
};
pub use tls::{ClientTls, PeerId, ServerTls};
