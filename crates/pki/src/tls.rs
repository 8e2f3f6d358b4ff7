//! Loading a `--tls-dir`, building rustls configurations (ring provider, client certificates required),
//! reading a verified peer's identity, and blocking handshakes with a deadline.

use std::fmt;
use std::fs;
use std::io;
use std::net::{IpAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, CommonState, RootCertStore, ServerConfig, ServerConnection,
    StreamOwned,
};

use crate::revocation::{ClientVerifier, CrlSource, ServerVerifier, parse_crls, read_crls};
use crate::{Identity, Role, files};
use rustls::server::danger::ClientCertVerifier;

/// Why a `--tls-dir` could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file the directory must hold is missing.
    #[error(
        "{path} is missing: a --tls-dir holds ca-cert.pem, server-cert.pem and server-key.pem (or client-cert.pem and client-key.pem); create one with `tern pki issue`"
    )]
    Missing { path: PathBuf },
    /// A file could not be read.
    #[error("Cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file holds no usable PEM of the expected kind.
    #[error("{path} holds no valid PEM {what}")]
    Pem {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: Option<rustls::pki_types::pem::Error>,
    },
    /// The private key is readable by others than its owner.
    #[error(
        "{path} has mode {mode:04o}: a private key must not be readable by group or others (chmod 600)"
    )]
    KeyPermissions { path: PathBuf, mode: u32 },
    /// The CA certificate cannot serve as a trust anchor.
    #[error("{path} is not a usable CA certificate")]
    Ca {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    /// Our own certificate carries no Tern identity.
    #[error("{path} carries no Tern identity")]
    Identity {
        path: PathBuf,
        #[source]
        source: PeerError,
    },
    /// The revocation list (`ca-crl.pem`) cannot be read or used.
    #[error("Cannot use the revocation list {path}: {why}")]
    Crl { path: PathBuf, why: String },
    /// rustls refused the key or certificate.
    #[error("rustls refused the certificate or key in {dir}")]
    Config {
        dir: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// Why a peer's identity could not be read or is not the one required.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// The peer presented no certificate (cannot happen after a mutual-TLS handshake).
    #[error("The peer presented no certificate")]
    NoCertificate,
    /// The certificate is not valid DER X.509.
    #[error("The peer certificate cannot be parsed: {0}")]
    Parse(String),
    /// The certificate has no subject CN.
    #[error("The peer certificate has no subject CN")]
    NoName,
    /// The certificate's OU is missing or not a Tern role.
    #[error("The peer certificate's OU {ou:?} is not a role (host, controller, user)")]
    NoRole { ou: Option<String> },
    /// The peer's role is not the one this endpoint accepts.
    #[error("Peer {name} has role {role}, but only {expected} is accepted here")]
    WrongRole {
        name: String,
        role: Role,
        expected: Role,
    },
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The handshake did not complete within the deadline.
    #[error("The TLS handshake did not complete within {}ms", after.as_millis())]
    Timeout { after: Duration },
    /// The peer closed the connection before the handshake completed (a port scan, a plain client).
    #[error("The peer closed the connection during the TLS handshake")]
    Closed,
    /// TLS refused the peer: not TLS at all, an unknown CA, an expired certificate, a wrong name...
    #[error("TLS handshake failed")]
    Tls(#[source] rustls::Error),
    /// The socket failed.
    #[error("I/O error during the TLS handshake")]
    Io(#[source] io::Error),
    /// The handshake completed but the peer's certificate carries no Tern identity.
    #[error("The peer's certificate carries no Tern identity")]
    Peer(#[source] PeerError),
}

/// A loaded `--tls-dir`: the CA as trust anchor, our certificate and key, and the rustls
/// configurations built from them (ring provider, TLS 1.2 and 1.3, client certificates required).
#[derive(Debug, Clone)]
pub struct TlsDir {
    dir: PathBuf,
    identity: Identity,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    optional_client_verifier: Arc<dyn ClientCertVerifier>,
}

impl TlsDir {
    /// Loads `dir/ca-cert.pem` and `dir/server-{cert,key}.pem` (or, when a directory only holds
    /// QEMU's client names, `dir/client-{cert,key}.pem`), and the revocation list `dir/ca-crl.pem`
    /// if present, read once: the configurations never touch the file system afterwards (what a
    /// process that sandboxes itself needs). The key must be mode 0600 or tighter. A long-running
    /// service uses [`TlsDir::load_watching`] instead.
    pub fn load(dir: &Path) -> Result<TlsDir, LoadError> {
        let pem = PemFiles::read(dir)?;
        let path = dir.join(files::CA_CRL);
        let crls = read_crls(&path).map_err(|why| LoadError::Crl { path, why })?;
        Self::build(dir, &pem, &CrlSource::Fixed(crls))
    }

    /// [`TlsDir::load`], but every configuration follows `dir/ca-crl.pem`: it re-reads the file
    /// when it changes (checked with a `stat` at each handshake), so a certificate revoked while
    /// the process runs is refused at its next connection. Not for a process under a seccomp
    /// filter that forbids `stat`/`open`.
    pub fn load_watching(dir: &Path) -> Result<TlsDir, LoadError> {
        let pem = PemFiles::read(dir)?;
        Self::build(dir, &pem, &CrlSource::Follow(dir.join(files::CA_CRL)))
    }

    /// Builds from PEM already read (a process that cannot read the files itself, e.g. a VMM that
    /// dropped its privileges, gets them from one that can), with no revocation list. `dir` only
    /// labels errors; no file is read.
    pub fn from_pem(dir: &Path, pem: &PemFiles) -> Result<TlsDir, LoadError> {
        Self::build(dir, pem, &CrlSource::Fixed(Vec::new()))
    }

    /// [`TlsDir::from_pem`] with the revocation list's PEM (`ca-crl.pem`'s text, as
    /// [`PemFiles::read_crl`] returns it) checked for the configurations' whole life. No file is read.
    pub fn from_pem_with_crl(
        dir: &Path,
        pem: &PemFiles,
        crl: Option<&str>,
    ) -> Result<TlsDir, LoadError> {
        let path = dir.join(files::CA_CRL);
        let crls = match crl {
            Some(text) => parse_crls(&path, text.as_bytes()).map_err(|why| LoadError::Crl {
                path: path.clone(),
                why,
            })?,
            None => Vec::new(),
        };
        Self::build(dir, pem, &CrlSource::Fixed(crls))
    }

    /// A client configuration for a directory that holds only the CA (a token user's): its
    /// `ca-cert.pem` as the only trust anchor and, when it has one, its `ca-crl.pem` (read once)
    /// refusing revoked servers; no client certificate, no resumption.
    pub fn ca_only_client_config(dir: &Path) -> Result<Arc<ClientConfig>, LoadError> {
        let ca_path = dir.join(files::CA_CERT);
        let mut roots = RootCertStore::empty();
        for c in parse_certs(&ca_path, &read(&ca_path)?)? {
            roots.add(c).map_err(|source| LoadError::Ca {
                path: ca_path.clone(),
                source,
            })?;
        }
        let crl_path = dir.join(files::CA_CRL);
        let crls = match PemFiles::read_crl(dir)? {
            Some(text) => parse_crls(&crl_path, text.as_bytes()).map_err(|why| LoadError::Crl {
                path: crl_path.clone(),
                why,
            })?,
            None => Vec::new(),
        };
        // ring, as `build`
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            ServerVerifier::new(&CrlSource::Fixed(crls), Arc::new(roots), provider.clone())
                .map_err(|why| LoadError::Crl {
                    path: crl_path,
                    why,
                })?;
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|source| LoadError::Config {
                dir: dir.to_owned(),
                source,
            })?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        client.resumption = Resumption::disabled();
        Ok(Arc::new(client))
    }

    fn build(dir: &Path, pem: &PemFiles, crl_source: &CrlSource) -> Result<TlsDir, LoadError> {
        let ca_path = dir.join(files::CA_CERT);
        let cert_path = dir.join(files::SERVER_CERT);
        let key_path = dir.join(files::SERVER_KEY);
        let ca = parse_certs(&ca_path, pem.ca_cert.as_bytes())?;
        let chain = parse_certs(&cert_path, pem.cert.as_bytes())?;
        let key =
            PrivateKeyDer::from_pem_slice(pem.key.as_bytes()).map_err(|e| LoadError::Pem {
                path: key_path.clone(),
                what: "private key",
                source: Some(e),
            })?;

        let mut roots = RootCertStore::empty();
        for c in ca {
            roots.add(c).map_err(|source| LoadError::Ca {
                path: ca_path.clone(),
                source,
            })?;
        }
        let roots = Arc::new(roots);
        let identity = identity_of_cert(&chain[0]).map_err(|source| LoadError::Identity {
            path: cert_path.clone(),
            source,
        })?;
        let cfg_err = |source| LoadError::Config {
            dir: dir.to_owned(),
            source,
        };
        // ring, not aws-lc-rs (no cmake/C toolchain in the build); rustls 0.23.48 deprecates it only
        // because it lacks post-quantum key exchange, which nothing in the cluster needs yet.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());

        // Both sides check the revocation list, fixed or followed (revocation.rs).
        let crl = crl_source;
        let crl_err = |why: String| LoadError::Crl {
            path: dir.join(files::CA_CRL),
            why,
        };
        let client_verifier: Arc<dyn ClientCertVerifier> = Arc::new(
            ClientVerifier::new(crl, roots.clone(), provider.clone(), true).map_err(crl_err)?,
        );
        let optional_client_verifier: Arc<dyn ClientCertVerifier> = Arc::new(
            ClientVerifier::new(crl, roots.clone(), provider.clone(), false).map_err(crl_err)?,
        );
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(cfg_err)?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(cfg_err)?;
        // Every connection authenticates in full: no tickets, no session cache.
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});

        let server_verifier =
            Arc::new(ServerVerifier::new(crl, roots, provider.clone()).map_err(crl_err)?);
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(cfg_err)?
            .dangerous()
            .with_custom_certificate_verifier(server_verifier)
            .with_client_auth_cert(chain, key)
            .map_err(cfg_err)?;
        client.resumption = Resumption::disabled();

        Ok(TlsDir {
            dir: dir.to_owned(),
            identity,
            server: Arc::new(server),
            client: Arc::new(client),
            optional_client_verifier,
        })
    }

    /// The directory this was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Our own identity (from our certificate).
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Server side: requires a client certificate chained to the CA and presents ours.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// For a server that also takes clients without a certificate (they authenticate otherwise,
    /// e.g. with a token): verifies a certificate when one is presented — chain to the CA, dates,
    /// key usage and the directory's revocation list, followed as it changes — like
    /// [`TlsDir::server_config`]'s, but does not require one.
    pub fn optional_client_verifier(&self) -> Arc<dyn ClientCertVerifier> {
        self.optional_client_verifier.clone()
    }

    /// Client side: presents our certificate and verifies that the server's chains to the CA and is
    /// valid for the [`ServerName`] given to [`connect`].
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }

    /// The name a client expects the server's certificate to carry: an IP address or a DNS name.
    /// A string that is neither yields a name no certificate can carry, so the handshake fails
    /// with "not valid for name" (use [`TlsDir::try_server_name`] to reject it up front).
    pub fn server_name(name_or_ip: &str) -> ServerName<'static> {
        Self::try_server_name(name_or_ip)
            .unwrap_or(ServerName::IpAddress(IpAddr::from([0, 0, 0, 0]).into()))
    }

    /// [`TlsDir::server_name`], refusing a string that is neither an IP address nor a DNS name.
    pub fn try_server_name(name_or_ip: &str) -> Result<ServerName<'static>, String> {
        ServerName::try_from(name_or_ip.to_owned())
            .map_err(|_| format!("{name_or_ip:?} is neither an IP address nor a DNS name"))
    }
}

fn parse_certs(path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, LoadError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| LoadError::Pem {
            path: path.to_owned(),
            what: "certificate",
            source: Some(e),
        })?;
    if certs.is_empty() {
        return Err(LoadError::Pem {
            path: path.to_owned(),
            what: "certificate",
            source: None,
        });
    }
    Ok(certs)
}

/// The three PEM files of a `--tls-dir`, as text.
#[derive(Clone, PartialEq, Eq)]
pub struct PemFiles {
    /// `ca-cert.pem`.
    pub ca_cert: String,
    /// `server-cert.pem` (or `client-cert.pem`).
    pub cert: String,
    /// `server-key.pem` (or `client-key.pem`).
    pub key: String,
}

impl fmt::Debug for PemFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PemFiles")
            .field("ca_cert", &self.ca_cert.len())
            .field("cert", &self.cert.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

impl PemFiles {
    /// Reads `dir`'s CA certificate, certificate and key (the key must be 0600 or tighter).
    pub fn read(dir: &Path) -> Result<PemFiles, LoadError> {
        let (cert_path, key_path) = if dir.join(files::SERVER_CERT).exists() {
            (dir.join(files::SERVER_CERT), dir.join(files::SERVER_KEY))
        } else if dir.join(files::CLIENT_CERT).exists() {
            (dir.join(files::CLIENT_CERT), dir.join(files::CLIENT_KEY))
        } else {
            return Err(LoadError::Missing {
                path: dir.join(files::SERVER_CERT),
            });
        };
        let text = |path: &Path| {
            let bytes = read(path)?;
            String::from_utf8(bytes).map_err(|_| LoadError::Pem {
                path: path.to_owned(),
                what: "text",
                source: None,
            })
        };
        let meta = fs::metadata(&key_path).map_err(|source| read_err(&key_path, source))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(LoadError::KeyPermissions {
                path: key_path,
                mode,
            });
        }
        Ok(PemFiles {
            ca_cert: text(&dir.join(files::CA_CERT))?,
            cert: text(&cert_path)?,
            key: text(&key_path)?,
        })
    }
}

impl PemFiles {
    /// `dir/ca-crl.pem`'s text, `None` when the directory has none (for
    /// [`TlsDir::from_pem_with_crl`] in a process that cannot read the directory itself).
    pub fn read_crl(dir: &Path) -> Result<Option<String>, LoadError> {
        let path = dir.join(files::CA_CRL);
        match fs::read_to_string(&path) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(LoadError::Read { path, source }),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, LoadError> {
    fs::read(path).map_err(|source| read_err(path, source))
}

fn read_err(path: &Path, source: io::Error) -> LoadError {
    if source.kind() == io::ErrorKind::NotFound {
        LoadError::Missing {
            path: path.to_owned(),
        }
    } else {
        LoadError::Read {
            path: path.to_owned(),
            source,
        }
    }
}

/// Name (subject CN) and role (subject OU) of a DER certificate. Only meaningful for a certificate
/// whose chain was verified (as rustls does during the handshake).
pub fn identity_of_cert(der: &CertificateDer<'_>) -> Result<Identity, PeerError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| PeerError::Parse(e.to_string()))?;
    let subject = cert.subject();
    let name = subject
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .ok_or(PeerError::NoName)?
        .to_owned();
    let ou = subject
        .iter_organizational_unit()
        .next()
        .and_then(|a| a.as_str().ok())
        .map(str::to_owned);
    let role = ou
        .as_deref()
        .and_then(|s| s.parse::<Role>().ok())
        .ok_or(PeerError::NoRole { ou })?;
    Ok(Identity { name, role })
}

/// Name and role of the peer of an established connection (from its end-entity certificate).
pub fn peer_identity(conn: &CommonState) -> Result<Identity, PeerError> {
    let certs = conn.peer_certificates().ok_or(PeerError::NoCertificate)?;
    let leaf = certs.first().ok_or(PeerError::NoCertificate)?;
    identity_of_cert(leaf)
}

/// Server side of a handshake over an accepted socket, within `deadline`. On success the socket's
/// timeouts are cleared (blocking, no timeout) and the peer's verified identity is returned; the
/// caller checks its role.
pub fn accept(
    cfg: Arc<ServerConfig>,
    tcp: TcpStream,
    deadline: Duration,
) -> Result<(StreamOwned<ServerConnection, TcpStream>, Identity), HandshakeError> {
    let conn = ServerConnection::new(cfg).map_err(HandshakeError::Tls)?;
    let mut stream = StreamOwned::new(conn, tcp);
    handshake(&mut stream.conn, &mut stream.sock, deadline)?;
    let id = peer_identity(&stream.conn).map_err(HandshakeError::Peer)?;
    Ok((stream, id))
}

/// Client side of a handshake, within `deadline`, verifying the server's certificate against the CA
/// and `name`. With TLS 1.3 the server checks our certificate after we finish, so a refusal of *our*
/// certificate shows as an error on the first read.
pub fn connect(
    cfg: Arc<ClientConfig>,
    name: ServerName<'static>,
    tcp: TcpStream,
    deadline: Duration,
) -> Result<(StreamOwned<ClientConnection, TcpStream>, Identity), HandshakeError> {
    let conn = ClientConnection::new(cfg, name).map_err(HandshakeError::Tls)?;
    let mut stream = StreamOwned::new(conn, tcp);
    handshake(&mut stream.conn, &mut stream.sock, deadline)?;
    let id = peer_identity(&stream.conn).map_err(HandshakeError::Peer)?;
    Ok((stream, id))
}

fn handshake<C, D>(
    conn: &mut C,
    tcp: &mut TcpStream,
    deadline: Duration,
) -> Result<(), HandshakeError>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
    D: rustls::SideData,
{
    let start = Instant::now();
    tcp.set_nonblocking(false).map_err(HandshakeError::Io)?;
    let timeout = HandshakeError::Timeout { after: deadline };
    while conn.is_handshaking() || conn.wants_write() {
        let left = deadline.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(timeout);
        }
        tcp.set_read_timeout(Some(left))
            .and_then(|()| tcp.set_write_timeout(Some(left)))
            .map_err(HandshakeError::Io)?;
        match conn.complete_io(tcp) {
            Ok((0, 0)) if conn.is_handshaking() && !conn.wants_write() => {
                // Nothing moved and nothing to send: the peer closed.
                return Err(HandshakeError::Closed);
            }
            Ok(_) => {}
            Err(e) => return Err(classify(e, deadline)),
        }
    }
    tcp.set_read_timeout(None)
        .and_then(|()| tcp.set_write_timeout(None))
        .map_err(HandshakeError::Io)?;
    Ok(())
}

fn classify(e: io::Error, deadline: Duration) -> HandshakeError {
    if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return HandshakeError::Tls(tls.clone());
    }
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            HandshakeError::Timeout { after: deadline }
        }
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => HandshakeError::Closed,
        _ => HandshakeError::Io(e),
    }
}
