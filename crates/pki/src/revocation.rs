//! Certificate verifiers that check the CA's revocation list (`ca-crl.pem`), either as read once
//! or following the file as it changes.
//!
//! Each verifier wraps rustls' WebPKI verifier (chain to the CA, dates, key usage, name) built with
//! the CRLs. A *fixed* verifier never touches the file system after it is built: what a process
//! that sandboxes itself (a VMM under seccomp, where a `stat` would kill it) must use. A *following*
//! one compares, at every verification, the file's identity (inode, size, modification time) with
//! the one it was built from, and rebuilds on a change, so a revocation written by `tern pki
//! revoke` reaches a running server or client at its next handshake. A file missing when the
//! verifier is built means no CRL. Once a list was loaded, a file that goes missing or empty (an
//! in-place copy truncates before it writes) or that cannot be read or parsed keeps the last good
//! list in force, reported once on stderr: a revocation is never undone by a half-written file. A CRL of another issuer than the peer's (a directory mixing two CAs' files) decides
//! nothing: only a CRL signed by the certificate's CA revokes it.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

/// What identifies one version of the CRL file: `None` when it is absent.
type Stamp = Option<(u64, u64, i64, i64)>;

fn stamp(path: &Path) -> io::Result<Stamp> {
    match fs::metadata(path) {
        Ok(m) => Ok(Some((m.ino(), m.len(), m.mtime(), m.mtime_nsec()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads the CRLs of `path` (none when it is absent).
pub(crate) fn read_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    parse_crls(path, &bytes)
}

/// The CRLs in PEM `bytes` (`path` labels errors); empty text is no CRL.
pub(crate) fn parse_crls(
    path: &Path,
    bytes: &[u8],
) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    let crls = CertificateRevocationListDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} holds no valid PEM CRL: {e}", path.display()))?;
    if crls.is_empty() && !bytes.is_empty() {
        return Err(format!("{} holds no PEM CRL", path.display()));
    }
    Ok(crls)
}

/// Where a verifier's CRLs come from.
#[derive(Debug, Clone)]
pub(crate) enum CrlSource {
    /// These, for the verifier's whole life (no file access after it is built).
    Fixed(Vec<CertificateRevocationListDer<'static>>),
    /// This file, re-read when it changes.
    Follow(PathBuf),
}

/// The part both verifiers share: the CRL file followed (if any) and when it was last read.
#[derive(Debug)]
struct Watch<V: ?Sized> {
    path: Option<PathBuf>,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    current: Mutex<Current<V>>,
}

/// The verifier in force, the stamp of the file it was last compared with, and whether it holds a
/// list (then a missing or empty file does not replace it).
#[derive(Debug)]
struct Current<V: ?Sized> {
    stamp: Stamp,
    verifier: Arc<V>,
    has_list: bool,
}

impl<V: ?Sized> Watch<V> {
    fn get(
        &self,
        build: impl Fn(
            Arc<RootCertStore>,
            Arc<CryptoProvider>,
            Vec<CertificateRevocationListDer<'static>>,
        ) -> Result<Arc<V>, String>,
    ) -> Arc<V> {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let Some(path) = &self.path else {
            return cur.verifier.clone();
        };
        let now = match stamp(path) {
            Ok(s) => s,
            // Cannot even stat it: keep what is in force.
            Err(_) => return cur.verifier.clone(),
        };
        if now != cur.stamp {
            let has_list = cur.has_list;
            let rebuilt = read_crls(path).and_then(|crls| {
                if crls.is_empty() && has_list {
                    return Err(format!("{} is missing or empty", path.display()));
                }
                let holds = !crls.is_empty();
                build(self.roots.clone(), self.provider.clone(), crls).map(|v| (v, holds))
            });
            match rebuilt {
                Ok((v, holds)) => {
                    cur.verifier = v;
                    cur.has_list = holds;
                }
                Err(e) => eprintln!("tern-pki: {e}; the previous revocation list stays in force"),
            }
            // Also on failure: report a bad file once, not at every handshake.
            cur.stamp = now;
        }
        cur.verifier.clone()
    }
}

/// The first CRLs of a source, the followed file and its stamp.
fn initial(
    crl: &CrlSource,
) -> Result<
    (
        Stamp,
        Option<PathBuf>,
        Vec<CertificateRevocationListDer<'static>>,
    ),
    String,
> {
    match crl {
        CrlSource::Fixed(crls) => Ok((None, None, crls.clone())),
        CrlSource::Follow(path) => {
            let s = stamp(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            Ok((s, Some(path.clone()), read_crls(path)?))
        }
    }
}

fn build_client(
    mandatory: bool,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let b = WebPkiClientVerifier::builder_with_provider(roots, provider)
        .with_crls(crls)
        .only_check_end_entity_revocation()
        .allow_unknown_revocation_status();
    let b = if mandatory {
        b
    } else {
        b.allow_unauthenticated()
    };
    b.build()
        .map_err(|e| format!("cannot build the client verifier: {e}"))
}

fn build_server(
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<Arc<WebPkiServerVerifier>, String> {
    WebPkiServerVerifier::builder_with_provider(roots, provider)
        .with_crls(crls)
        .only_check_end_entity_revocation()
        .allow_unknown_revocation_status()
        .build()
        .map_err(|e| format!("cannot build the server verifier: {e}"))
}

/// Verifies clients' certificates against the CA and the CRL file (module docs).
#[derive(Debug)]
pub(crate) struct ClientVerifier {
    watch: Watch<dyn ClientCertVerifier>,
    hints: Vec<DistinguishedName>,
    /// False: a client may present no certificate (it then authenticates otherwise, e.g. a token).
    mandatory: bool,
}

impl ClientVerifier {
    /// Builds from `crl` (a followed file as it is now: unreadable or invalid is an error here).
    pub(crate) fn new(
        crl: &CrlSource,
        roots: Arc<RootCertStore>,
        provider: Arc<CryptoProvider>,
        mandatory: bool,
    ) -> Result<Self, String> {
        let (s, path, crls) = initial(crl)?;
        let has_list = !crls.is_empty();
        let inner = build_client(mandatory, roots.clone(), provider.clone(), crls)?;
        let hints = inner.root_hint_subjects().to_vec();
        Ok(ClientVerifier {
            watch: Watch {
                path,
                roots,
                provider,
                current: Mutex::new(Current {
                    stamp: s,
                    verifier: inner,
                    has_list,
                }),
            },
            hints,
            mandatory,
        })
    }

    fn inner(&self) -> Arc<dyn ClientCertVerifier> {
        self.watch
            .get(|r, p, c| build_client(self.mandatory, r, p, c))
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner().supported_verify_schemes()
    }
}

/// Verifies servers' certificates against the CA, the name dialled and the CRL file.
#[derive(Debug)]
pub(crate) struct ServerVerifier {
    watch: Watch<WebPkiServerVerifier>,
}

impl ServerVerifier {
    /// Builds from `crl` (a followed file as it is now: unreadable or invalid is an error here).
    pub(crate) fn new(
        crl: &CrlSource,
        roots: Arc<RootCertStore>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, String> {
        let (s, path, crls) = initial(crl)?;
        let has_list = !crls.is_empty();
        let inner = build_server(roots.clone(), provider.clone(), crls)?;
        Ok(ServerVerifier {
            watch: Watch {
                path,
                roots,
                provider,
                current: Mutex::new(Current {
                    stamp: s,
                    verifier: inner,
                    has_list,
                }),
            },
        })
    }

    fn inner(&self) -> Arc<WebPkiServerVerifier> {
        self.watch.get(build_server)
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner()
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner().supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IssueOptions, Role, files, init_ca, issue, revoke};

    fn cert(dir: &Path) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(dir.join(files::CLIENT_CERT)).unwrap()
    }

    #[test]
    fn a_followed_list_that_goes_missing_or_empty_keeps_the_last_good_one() {
        let d = tempfile::tempdir().unwrap();
        init_ca(d.path()).unwrap();
        let opts = IssueOptions::default();
        let srv = issue(d.path(), "srv", Role::Host, &opts).unwrap();
        let bad = issue(d.path(), "bad", Role::User, &opts).unwrap();
        let crl_path = srv.join(files::CA_CRL);
        let before = fs::read(&crl_path).unwrap();
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(d.path().join(files::CA_CERT)).unwrap())
            .unwrap();
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let v = ClientVerifier::new(
            &CrlSource::Follow(crl_path.clone()),
            Arc::new(roots),
            provider,
            true,
        )
        .unwrap();
        let verify = || v.verify_client_cert(&cert(&bad), &[], UnixTime::now());
        verify().expect("not revoked yet");

        revoke(d.path(), "bad").unwrap();
        let revoked = || {
            matches!(
                verify(),
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Revoked
                ))
            )
        };
        assert!(revoked(), "{:?}", verify());
        // Truncated (the first step of an in-place copy): the list stays.
        fs::write(&crl_path, b"").unwrap();
        assert!(
            revoked(),
            "an empty file undid the revocation: {:?}",
            verify()
        );
        // Removed: the list stays.
        fs::remove_file(&crl_path).unwrap();
        assert!(
            revoked(),
            "a missing file undid the revocation: {:?}",
            verify()
        );
        // Damaged: the list stays.
        fs::write(&crl_path, b"not a CRL").unwrap();
        assert!(
            revoked(),
            "a damaged file undid the revocation: {:?}",
            verify()
        );
        // A valid list replaces it, even one that revokes less (an older copy put back).
        fs::write(&crl_path, &before).unwrap();
        verify().expect("the valid list written last is in force");
    }

    #[test]
    fn a_followed_file_absent_at_start_means_no_list_until_one_appears() {
        let d = tempfile::tempdir().unwrap();
        init_ca(d.path()).unwrap();
        let opts = IssueOptions::default();
        let srv = issue(d.path(), "srv", Role::Host, &opts).unwrap();
        let bad = issue(d.path(), "bad", Role::User, &opts).unwrap();
        let crl_path = srv.join(files::CA_CRL);
        fs::remove_file(&crl_path).unwrap();
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(d.path().join(files::CA_CERT)).unwrap())
            .unwrap();
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let v = ClientVerifier::new(
            &CrlSource::Follow(crl_path.clone()),
            Arc::new(roots),
            provider,
            true,
        )
        .unwrap();
        let verify = || v.verify_client_cert(&cert(&bad), &[], UnixTime::now());
        verify().expect("no list: nothing revoked");
        // An empty file is still no list.
        fs::write(&crl_path, b"").unwrap();
        verify().expect("an empty file: nothing revoked");
        // The revocation (written into every issued directory) reaches it.
        revoke(d.path(), "bad").unwrap();
        assert!(verify().is_err(), "the list that appeared was not followed");
    }
}
