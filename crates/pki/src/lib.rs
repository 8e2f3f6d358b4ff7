//! The cluster PKI: one certificate authority, one certificate per host, controller and user, and the
//! rustls configurations every Tern service and client uses for mutual TLS.
//!
//! # Layout on disk
//!
//! The files use the names QEMU's `tls-creds-x509` object (and libvirt, qemu-img, qemu-nbd, nbdinfo)
//! expect, so one directory serves Tern and QEMU alike:
//!
//! ```text
//! D/ca-cert.pem                  0644  the CA certificate (self-signed)
//! D/ca-key.pem                   0600  the CA key: only `tern pki issue` and `revoke` read it
//! D/ca-crl.pem                   0644  the CA's revocation list (empty at first)
//! D/N/                           0700  what `--tls-dir D/N` names
//! D/N/ca-cert.pem                0644  a copy of the CA certificate (the trust anchor)
//! D/N/server-cert.pem            0644  N's certificate ...
//! D/N/client-cert.pem            0644  ... the same certificate under QEMU's client name
//! D/N/server-key.pem             0600  N's key ...
//! D/N/client-key.pem             0600  ... the same key under QEMU's client name
//! D/N/ca-crl.pem                 0644  a copy of the revocation list (QEMU reads it too)
//! ```
//!
//! # Revocation
//!
//! [`revoke`] adds a certificate's serial to the CA's CRL and writes the new CRL into `D/` and
//! every `D/N/`. Every configuration [`TlsDir`] builds checks its directory's `ca-crl.pem`: read
//! once by [`TlsDir::load`], re-read whenever the file changes (at the next handshake, no restart)
//! by [`TlsDir::load_watching`]. A revoked peer is refused as a server and as a client (rustls'
//! `CertificateError::Revoked`; the refused side sees the `CertificateRevoked` alert). A host whose
//! `--tls-dir` is not under `D/` needs the new `ca-crl.pem` copied into it.
//!
//! One key pair and one certificate carrying both the `serverAuth` and `clientAuth` extended key
//! usages serve a node as a listener and as a client.
//!
//! # Identity
//!
//! A certificate says who its holder is: subject CN = the name, subject OU = the role (`host`,
//! `controller`, `user`), and subject alternative names = the name as a DNS name, every `--san`, plus
//! `localhost` and `127.0.0.1`. [`peer_identity`] reads name and role back from a peer's end-entity
//! certificate once rustls has verified its chain to the CA, its validity dates and its key usage.
//!
//! **Architecture Invariant:** a connection's [`Identity`] exists only after the handshake verified the
//! peer's chain to the cluster CA; callers parse no application byte before [`accept`] or [`connect`]
//! returned it, and check the role themselves (a valid `user` certificate is not a `host`).
//!
//! # Example
//!
//! ```
//! use tern_pki::{IssueOptions, Role, TlsDir};
//! let d = tempfile::tempdir().unwrap();
//! tern_pki::init_ca(d.path()).unwrap();
//! let dir = tern_pki::issue(d.path(), "node-a", Role::Host, &IssueOptions::default()).unwrap();
//! let tls = TlsDir::load(&dir).unwrap();
//! assert_eq!(tls.identity().name, "node-a");
//! assert_eq!(tls.identity().role, Role::Host);
//! let _server = tls.server_config();
//! let _client = tls.client_config();
//! ```

#![forbid(unsafe_code)]

mod ca;
mod crl;
#[cfg(feature = "http")]
pub mod http;
mod revocation;
mod tls;

pub use ca::{InitError, IssueError, IssueOptions, init_ca, init_ca_with, issue};
pub use crl::{RevokeError, Revoked, ensure_crl, revoke, serial_hex, serial_of};
pub use tls::{
    HandshakeError, LoadError, PeerError, PemFiles, TlsDir, accept, connect, identity_of_cert,
    peer_identity,
};

/// Re-exported so callers name the same rustls this crate configures.
pub use rustls;

use std::fmt;
use std::str::FromStr;

/// File names inside a CA directory and a `--tls-dir` (QEMU's `tls-creds-x509` names).
pub mod files {
    /// The CA certificate, in the CA directory and in every issued directory.
    pub const CA_CERT: &str = "ca-cert.pem";
    /// The CA key, only in the CA directory.
    pub const CA_KEY: &str = "ca-key.pem";
    /// The holder's certificate under QEMU's server name.
    pub const SERVER_CERT: &str = "server-cert.pem";
    /// The holder's key under QEMU's server name.
    pub const SERVER_KEY: &str = "server-key.pem";
    /// The holder's certificate under QEMU's client name (same bytes as the server one).
    pub const CLIENT_CERT: &str = "client-cert.pem";
    /// The holder's key under QEMU's client name (same bytes as the server one).
    pub const CLIENT_KEY: &str = "client-key.pem";
    /// The CA's certificate revocation list, in the CA directory and copied into every issued
    /// directory (QEMU's `tls-creds-x509` name for it).
    pub const CA_CRL: &str = "ca-crl.pem";
}

/// What a certificate's holder is allowed to be in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A hypervisor host: runs VMs, serves volumes, migrates.
    Host,
    /// The cluster controller.
    Controller,
    /// A person or tool using the API.
    User,
}

impl Role {
    /// Every role, in the order `--help` lists them.
    pub const ALL: [Role; 3] = [Role::Host, Role::Controller, Role::User];

    /// The name written into the certificate's OU and accepted on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Host => "host",
            Role::Controller => "controller",
            Role::User => "user",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is none of `host`, `controller`, `user`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Unknown role {given:?}: the valid roles are host, controller, user")]
pub struct ParseRoleError {
    /// What was given.
    pub given: String,
}

impl FromStr for Role {
    type Err = ParseRoleError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| ParseRoleError {
                given: s.to_owned(),
            })
    }
}

/// Who holds a certificate: its CN and its role (OU).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The subject CN, which is also a DNS SAN.
    pub name: String,
    /// The subject OU.
    pub role: Role,
}

impl Identity {
    /// `Ok` when the role is `expected`; otherwise an error naming both (for logs and refusals).
    pub fn require_role(&self, expected: Role) -> Result<(), PeerError> {
        if self.role == expected {
            Ok(())
        } else {
            Err(PeerError::WrongRole {
                name: self.name.clone(),
                role: self.role,
                expected,
            })
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.role)
    }
}

/// Checks a certificate holder's name: 1-63 characters of `a-z A-Z 0-9 - .`, labels separated by
/// single dots, no label starting or ending with `-`. It becomes a DNS SAN and a directory name.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err(format!(
            "name {name:?} is {} characters long: it must be 1 to 63",
            name.len()
        ));
    }
    for label in name.split('.') {
        let ok_chars = label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if label.is_empty() || !ok_chars || label.starts_with('-') || label.ends_with('-') {
            return Err(format!(
                "name {name:?} is not a DNS name: use letters, digits, '-' and '.' \
                 (no empty label, no label starting or ending with '-')"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_round_trips_and_unknown_lists_the_valid_ones() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
        let e = "admin".parse::<Role>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "Unknown role \"admin\": the valid roles are host, controller, user"
        );
    }

    #[test]
    fn names_must_be_dns_labels() {
        for ok in ["a", "node-1", "host.example", "N0"] {
            validate_name(ok).unwrap();
        }
        for bad in [
            "",
            "..",
            "a/b",
            "-a",
            "a-",
            "a..b",
            "a_b",
            &"x".repeat(64),
            "é",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
