//! Revocation: the CA's certificate revocation list (CRL), signed by the CA key, kept as
//! `ca-crl.pem` in the CA directory and copied into every `--tls-dir` under it.
//!
//! The CRL lists serial numbers. `revoke` adds one (of a certificate named by its holder's
//! directory, or given as hex), signs a new CRL with the next CRL number and writes it, through a
//! temporary file renamed into place, to the CA directory and to each issued directory in it. The
//! TLS configurations of [`crate::TlsDir`] re-read the file of their own directory when it
//! changes (checked at each handshake), so a running process refuses a revoked peer on its next
//! connection without a restart. QEMU's `tls-creds-x509` reads the same file name (`ca-crl.pem`).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use rcgen::{
    CertificateRevocationListParams, KeyIdMethod, RevocationReason, RevokedCertParams, SerialNumber,
};
use time::{Duration as TimeDuration, OffsetDateTime};

use crate::ca::{CA_VALID_DAYS, CLOCK_SKEW_MINUTES, load_issuer, write_file};
use crate::files;

/// Why `revoke` (or writing the CRL) failed.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    /// The CA (its certificate or key) is missing or unreadable.
    #[error(transparent)]
    Ca(#[from] crate::IssueError),
    /// Neither a certificate directory of that name nor a hexadecimal serial number.
    #[error(
        "{what:?} is neither a certificate issued in {dir} (no {dir}/{what}/server-cert.pem) nor a serial number (hexadecimal, ':' allowed, 1 to 20 bytes)"
    )]
    Unknown { what: String, dir: PathBuf },
    /// A certificate or the existing CRL could not be read.
    #[error("Cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A certificate or the existing CRL could not be parsed.
    #[error("Cannot parse {path}: {why}")]
    Parse { path: PathBuf, why: String },
    /// rcgen refused to sign the CRL.
    #[error("Cannot sign the CRL")]
    Sign(#[source] rcgen::Error),
    /// A CRL file could not be written.
    #[error("Cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What `revoke` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// The serial number revoked, as colon-separated hex.
    pub serial: String,
    /// True when the serial was already in the CRL (the CRL is still rewritten and copied).
    pub already: bool,
    /// Every file the new CRL was written to (the CA directory's first).
    pub written: Vec<PathBuf>,
}

/// Colon-separated lower-case hex of a serial number's bytes.
pub fn serial_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn parse_serial(s: &str) -> Option<Vec<u8>> {
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    if hex.is_empty() || hex.len() > 40 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let hex = if hex.len() % 2 == 1 {
        format!("0{hex}")
    } else {
        hex
    };
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect()
}

/// The serial number of the certificate in `cert_dir` (its `server-cert.pem`).
pub fn serial_of(cert_dir: &Path) -> Result<Vec<u8>, RevokeError> {
    let path = cert_dir.join(files::SERVER_CERT);
    let pem = fs::read(&path).map_err(|source| RevokeError::Read {
        path: path.clone(),
        source,
    })?;
    let parse = |why: String| RevokeError::Parse {
        path: path.clone(),
        why,
    };
    let (_, p) = x509_parser::pem::parse_x509_pem(&pem).map_err(|e| parse(e.to_string()))?;
    let cert = p.parse_x509().map_err(|e| parse(e.to_string()))?;
    Ok(cert.raw_serial().to_vec())
}

/// One revoked certificate: its serial number's bytes and when it was revoked.
type Entry = (Vec<u8>, OffsetDateTime);

/// The serial numbers (with their revocation times) and CRL number of the CA's current CRL;
/// none and 0 when there is no CRL yet.
fn current(ca_dir: &Path) -> Result<(Vec<Entry>, u64), RevokeError> {
    let path = ca_dir.join(files::CA_CRL);
    let pem = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(source) => return Err(RevokeError::Read { path, source }),
    };
    let parse = |why: String| RevokeError::Parse {
        path: path.clone(),
        why,
    };
    let (_, p) = x509_parser::pem::parse_x509_pem(&pem).map_err(|e| parse(e.to_string()))?;
    let (_, crl) = x509_parser::parse_x509_crl(&p.contents).map_err(|e| parse(e.to_string()))?;
    let number = crl.crl_number().map_or(0, |n| {
        n.to_bytes_be().iter().fold(0u64, |acc, b| {
            acc.saturating_mul(256).saturating_add(u64::from(*b))
        })
    });
    let revoked = crl
        .iter_revoked_certificates()
        .map(|r| (r.raw_serial().to_vec(), r.revocation_date.to_datetime()))
        .collect();
    Ok((revoked, number))
}

/// Signs a CRL listing `revoked` with CRL number `number` and writes it to the CA directory and
/// every issued directory in it (a sub-directory holding `ca-cert.pem`).
fn write_crl(ca_dir: &Path, revoked: &[Entry], number: u64) -> Result<Vec<PathBuf>, RevokeError> {
    let (_, issuer) = load_issuer(ca_dir)?;
    let now = OffsetDateTime::now_utc();
    let params = CertificateRevocationListParams {
        this_update: now - TimeDuration::minutes(CLOCK_SKEW_MINUTES),
        // Far ahead: the CRL does not go stale on its own (it is replaced when a certificate is
        // revoked), and nothing here fetches a fresher one.
        next_update: now + TimeDuration::days(CA_VALID_DAYS),
        crl_number: SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|(serial, at)| RevokedCertParams {
                serial_number: SerialNumber::from_slice(serial),
                revocation_time: *at,
                reason_code: Some(RevocationReason::Unspecified),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&issuer).map_err(RevokeError::Sign)?;
    let pem = crl.pem().map_err(RevokeError::Sign)?;
    let mut targets = vec![ca_dir.join(files::CA_CRL)];
    let entries = fs::read_dir(ca_dir).map_err(|source| RevokeError::Read {
        path: ca_dir.to_owned(),
        source,
    })?;
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir() && p.join(files::CA_CERT).is_file())
        .collect();
    dirs.sort();
    targets.extend(dirs.into_iter().map(|d| d.join(files::CA_CRL)));
    for path in &targets {
        write_file(path, pem.as_bytes(), 0o644).map_err(|source| RevokeError::Write {
            path: path.clone(),
            source,
        })?;
    }
    Ok(targets)
}

/// Writes an empty CRL for the CA in `ca_dir` if it has none yet (so a TLS server given a CRL
/// file, like etcd's `--client-crl-file`, finds one), and copies the current one into every issued
/// directory. Returns the files written.
pub fn ensure_crl(ca_dir: &Path) -> Result<Vec<PathBuf>, RevokeError> {
    let (revoked, number) = current(ca_dir)?;
    write_crl(ca_dir, &revoked, number.max(1))
}

/// Revokes `what` — the name of a certificate issued in `ca_dir` (its directory `ca_dir/NAME`)
/// or a serial number in hex — by adding its serial to the CA's CRL, and writes the new CRL to
/// `ca_dir/ca-crl.pem` and every `ca_dir/*/ca-crl.pem` (module docs). Revoking a serial twice
/// keeps one entry.
pub fn revoke(ca_dir: &Path, what: &str) -> Result<Revoked, RevokeError> {
    let named = ca_dir.join(what);
    let serial = if crate::validate_name(what).is_ok() && named.join(files::SERVER_CERT).is_file() {
        serial_of(&named)?
    } else {
        parse_serial(what).ok_or_else(|| RevokeError::Unknown {
            what: what.to_owned(),
            dir: ca_dir.to_owned(),
        })?
    };
    let (mut revoked, number) = current(ca_dir)?;
    let already = revoked.iter().any(|(s, _)| *s == serial);
    if !already {
        revoked.push((serial.clone(), OffsetDateTime::now_utc()));
    }
    let written = write_crl(ca_dir, &revoked, number + 1)?;
    Ok(Revoked {
        serial: serial_hex(&serial),
        already,
        written,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IssueOptions, Role, init_ca, issue};

    #[test]
    fn revoke_by_name_and_serial_accumulates_and_copies_into_every_dir() {
        let d = tempfile::tempdir().unwrap();
        init_ca(d.path()).unwrap();
        let a = issue(d.path(), "a", Role::Host, &IssueOptions::default()).unwrap();
        let b = issue(d.path(), "b", Role::Host, &IssueOptions::default()).unwrap();
        // A new CA has an empty CRL, copied into each issued directory.
        assert_eq!(current(d.path()).unwrap().0, vec![]);
        assert!(a.join(files::CA_CRL).is_file());

        let r = revoke(d.path(), "a").unwrap();
        assert!(!r.already);
        assert_eq!(r.serial, serial_hex(&serial_of(&a).unwrap()));
        assert_eq!(r.written.len(), 3, "{:?}", r.written);
        let b_serial = serial_hex(&serial_of(&b).unwrap());
        let r2 = revoke(d.path(), &b_serial).unwrap();
        assert!(!r2.already);
        let again = revoke(d.path(), "a").unwrap();
        assert!(again.already);

        let (list, number) = current(d.path()).unwrap();
        let serials: Vec<String> = list.iter().map(|(s, _)| serial_hex(s)).collect();
        assert_eq!(serials, vec![r.serial.clone(), b_serial]);
        assert_eq!(number, 4, "the CRL number grows with each new CRL");
        assert_eq!(
            fs::read(a.join(files::CA_CRL)).unwrap(),
            fs::read(d.path().join(files::CA_CRL)).unwrap()
        );
    }

    #[test]
    fn unknown_names_and_bad_serials_are_refused() {
        let d = tempfile::tempdir().unwrap();
        init_ca(d.path()).unwrap();
        for bad in ["nobody", "zz", "", &"ab".repeat(21)] {
            let e = revoke(d.path(), bad).unwrap_err();
            assert!(
                e.to_string().contains("neither a certificate issued"),
                "{bad:?}: {e}"
            );
        }
        assert_eq!(parse_serial("0a:1B").unwrap(), vec![0x0a, 0x1b]);
        assert_eq!(parse_serial("abc").unwrap(), vec![0x0a, 0xbc]);
    }
}
