//! The REST API over TLS: a `--tls-dir` loaded into rustls configurations (ring provider), the
//! accept loop that completes each handshake before any byte of HTTP is read, and the verified
//! peer certificate handed to the handlers as a request extension ([`PeerCert`]).
//!
//! The controller's server configuration *asks* for a client certificate but also serves
//! clients without one (a browser, `curl` with a bearer token): a presented certificate must
//! chain to the cluster CA and be in date, or the handshake fails; a client without one is then
//! a caller with no identity, which [`super::auth`] answers 401 unless it shows a token. A plain
//! TCP client (no TLS at all) fails the handshake and is dropped: nothing in clear is served.
//!
//! Without `--tls-dir` the API is served in clear on [`tern_pki::http::plain_listener`], whose
//! accepted connections get `TCP_NODELAY` as the TLS loop's do.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tern_pki::{Identity, TlsDir};

pub use tern_pki::http::{HANDSHAKE_TIMEOUT, PeerCert, serve_tls};

/// Why a `--tls-dir` could not be turned into a server configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The directory is incomplete, unreadable or its key too open.
    #[error("--tls-dir {dir}: {source}")]
    Load {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: tern_pki::LoadError,
    },
    /// rustls refused the CA, certificate or key.
    #[error("--tls-dir {dir}: {why}")]
    Config {
        /// The directory.
        dir: PathBuf,
        /// What rustls said.
        why: String,
    },
}

/// The controller's TLS settings: its own identity and the server configuration.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// This controller's certificate identity.
    pub identity: Identity,
    /// Requests a client certificate, verifies it when given, serves without.
    pub config: Arc<ServerConfig>,
    /// The directory, loaded (its client configuration calls the agents).
    pub dir: TlsDir,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    // ring, as tern-pki: no C toolchain in the build.
    #[allow(deprecated)]
    Arc::new(rustls::crypto::ring::default_provider())
}

impl ServerTls {
    /// Loads `dir` (checked by [`TlsDir::load`]: files present, key 0600) into a server
    /// configuration with an optional, verified client certificate.
    pub fn load(dir: &Path) -> Result<ServerTls, TlsSetupError> {
        let loaded = TlsDir::load_watching(dir).map_err(|source| TlsSetupError::Load {
            dir: dir.to_owned(),
            source,
        })?;
        let bad = |why: String| TlsSetupError::Config {
            dir: dir.to_owned(),
            why,
        };
        let certs = |name: &str| {
            CertificateDer::pem_file_iter(dir.join(name))
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| bad(format!("{name}: {e}")))
        };
        let (cert_file, key_file) = if dir.join("server-cert.pem").exists() {
            ("server-cert.pem", "server-key.pem")
        } else {
            ("client-cert.pem", "client-key.pem")
        };
        let chain = certs(cert_file)?;
        let key = PrivateKeyDer::from_pem_file(dir.join(key_file))
            .map_err(|e| bad(format!("{key_file}: {e}")))?;
        // A certificate is optional (token clients) but checked when presented, against the CA
        // and the directory's revocation list (re-read when it changes).
        let verifier = loaded.optional_client_verifier();
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| bad(e.to_string()))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // Every connection authenticates in full, as `TlsDir`'s: on a resumption rustls restores
        // the stored client certificate without asking the verifier, so a ticket saved before a
        // `tern pki revoke` would let the revoked key back in. No tickets, no session cache.
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(ServerTls {
            identity: loaded.identity().clone(),
            config: Arc::new(config),
            dir: loaded,
        })
    }
}
