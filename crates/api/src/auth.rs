//! Who may use the cluster REST API: the two user roles, the bearer-token file and the rules that
//! map a caller to what it may do. Pure: the controller's shell reads the file and the TLS peer,
//! this module decides.
//!
//! * **Roles**: a `viewer` reads everything; an `admin` also changes things (create, delete,
//!   migrate, maintenance, policy, plans, host power).
//! * **The token file** (`tern controller --tokens FILE`): one line per token,
//!   `NAME ROLE SHA256-HEX` (the hex SHA-256 of the token, never the token itself); `#` starts a
//!   comment, blank lines are skipped. `tern cluster token add` makes a random token, prints it
//!   once and appends its line.
//! * A presented token is compared with **every** line's hash in constant time (no early exit), so
//!   the time taken says nothing about which line, or how much of it, matched.
//!
//! ```
//! use tern_api::auth::{Role, TokenFile, token_line};
//! let line = token_line("ci", Role::Viewer, "s3cret-token-0123").unwrap();
//! let file = TokenFile::parse(&line).unwrap();
//! assert_eq!(file.find("s3cret-token-0123").map(|t| t.role), Some(Role::Viewer));
//! assert!(file.find("s3cret-token-012").is_none());
//! ```

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// What a user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Reads everything, changes nothing.
    Viewer,
    /// Reads and changes everything.
    Admin,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Viewer => "viewer",
            Role::Admin => "admin",
        })
    }
}

/// A role name that is neither `viewer` nor `admin`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}: the roles are viewer and admin")]
pub struct BadRole(pub String);

impl FromStr for Role {
    type Err = BadRole;
    fn from_str(s: &str) -> Result<Role, BadRole> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "admin" => Ok(Role::Admin),
            _ => Err(BadRole(s.to_string())),
        }
    }
}

/// One line of the token file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenEntry {
    /// Who holds the token (shown in logs and 403 answers).
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// SHA-256 of the token.
    pub sha256: [u8; 32],
}

/// The parsed token file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenFile {
    entries: Vec<TokenEntry>,
}

/// Why a token file (or a new line for it) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenFileError {
    /// A line is not `NAME ROLE SHA256-HEX`.
    #[error("line {line}: {why} (a line is NAME ROLE SHA256-HEX, e.g. `ci viewer 3a7b…`)")]
    BadLine {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// Two lines name the same holder.
    #[error("line {line}: the name {name:?} is already used on line {first}")]
    DuplicateName {
        /// 1-based line number of the second use.
        line: usize,
        /// The name.
        name: String,
        /// 1-based line number of the first use.
        first: usize,
    },
    /// A bad name for a new token.
    #[error("token name {0:?} must be 1-63 of a-z, A-Z, 0-9, '-', '_', '.' and '@'")]
    BadName(String),
    /// A token too short to be a secret.
    #[error("a token must have at least 16 characters (it has {0})")]
    ShortToken(usize),
}

fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
}

/// The SHA-256 of a token.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Equality of two 32-byte strings in time independent of where they differ.
pub fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The token file line for `token` held by `name` with `role` (no trailing newline).
pub fn token_line(name: &str, role: Role, token: &str) -> Result<String, TokenFileError> {
    if !valid_name(name) {
        return Err(TokenFileError::BadName(name.to_string()));
    }
    if token.len() < 16 {
        return Err(TokenFileError::ShortToken(token.len()));
    }
    Ok(format!("{name} {role} {}", hex(&hash_token(token))))
}

impl TokenFile {
    /// Parses the file's text; any bad line refuses the whole file, naming the line.
    pub fn parse(text: &str) -> Result<TokenFile, TokenFileError> {
        let mut entries: Vec<(usize, TokenEntry)> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let content = raw.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let bad = |why: String| TokenFileError::BadLine { line, why };
            let fields: Vec<&str> = content.split_whitespace().collect();
            let [name, role, sum] = fields[..] else {
                return Err(bad(format!("{} field(s), not 3", fields.len())));
            };
            if !valid_name(name) {
                return Err(bad(format!(
                    "the name {name:?} is not 1-63 of a-z, A-Z, 0-9, '-', '_', '.', '@'"
                )));
            }
            let role: Role = role.parse().map_err(|e: BadRole| bad(e.to_string()))?;
            let sha256 = unhex(sum).ok_or_else(|| {
                bad(format!(
                    "{sum:?} is not a SHA-256 in hex (64 of 0-9, a-f); the file never holds the token itself"
                ))
            })?;
            if let Some((first, _)) = entries.iter().find(|(_, e)| e.name == name) {
                return Err(TokenFileError::DuplicateName {
                    line,
                    name: name.to_string(),
                    first: *first,
                });
            }
            entries.push((
                line,
                TokenEntry {
                    name: name.to_string(),
                    role,
                    sha256,
                },
            ));
        }
        Ok(TokenFile {
            entries: entries.into_iter().map(|(_, e)| e).collect(),
        })
    }

    /// The entry whose hash is the token's: every entry is compared, in constant time each.
    pub fn find(&self, token: &str) -> Option<&TokenEntry> {
        let sum = hash_token(token);
        let mut found = None;
        for e in &self.entries {
            if constant_time_eq(&e.sha256, &sum) {
                found = Some(e);
            }
        }
        found
    }

    /// The entries, in file order.
    pub fn entries(&self) -> &[TokenEntry] {
        &self.entries
    }

    /// Whether a holder of this name is listed.
    pub fn has_name(&self, name: &str) -> bool {
        self.entries.iter().any(|e| e.name == name)
    }
}

/// What a request needs, from its method and path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing: the dashboard's static page (it holds no cluster data).
    Public,
    /// A host certificate: an agent posting its report.
    Host,
    /// `viewer` or more: every other read.
    Viewer,
    /// `admin`: every change.
    Admin,
}

/// What the controller's request `method path` needs (see docs/security.md).
pub fn controller_need(method: &str, path: &str) -> Need {
    if path == "/v1/agent/reports" {
        return Need::Host;
    }
    match method {
        "GET" | "HEAD" if path == "/" => Need::Public,
        "GET" | "HEAD" => Need::Viewer,
        _ => Need::Admin,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_round_trips_and_finds_only_the_exact_token() {
        let text = format!(
            "# users\n{}\n\n{}  # the CI\n",
            token_line("alice", Role::Admin, "alice-token-0123456789").unwrap(),
            token_line("ci", Role::Viewer, "ci-token-0123456789ab").unwrap()
        );
        let f = TokenFile::parse(&text).unwrap();
        assert_eq!(f.entries().len(), 2);
        let a = f.find("alice-token-0123456789").unwrap();
        assert_eq!((a.name.as_str(), a.role), ("alice", Role::Admin));
        assert_eq!(f.find("ci-token-0123456789ab").unwrap().role, Role::Viewer);
        assert!(f.find("alice-token-012345678").is_none());
        assert!(f.find("").is_none());
        assert!(!text.contains("alice-token"), "the file holds no token");
    }

    #[test]
    fn bad_token_files_are_refused_naming_the_line() {
        let sum = "ab".repeat(32);
        let cases = [
            (format!("a viewer {sum} extra"), "line 1: 4 field(s), not 3"),
            (format!("a root {sum}"), "unknown role \"root\""),
            ("a admin s3cret".to_string(), "is not a SHA-256 in hex"),
            (format!("a/b admin {sum}"), "the name \"a/b\" is not"),
            (
                format!("a admin {sum}\nb viewer {sum}\na viewer {sum}"),
                "line 3: the name \"a\" is already used on line 1",
            ),
        ];
        for (text, want) in cases {
            let e = TokenFile::parse(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        assert!(matches!(
            token_line("x", Role::Admin, "short"),
            Err(TokenFileError::ShortToken(5))
        ));
        assert!(matches!(
            token_line("", Role::Admin, "long-enough-token-123"),
            Err(TokenFileError::BadName(_))
        ));
    }

    #[test]
    fn constant_time_eq_compares_every_byte() {
        let a = [7u8; 32];
        let mut b = a;
        assert!(constant_time_eq(&a, &b));
        b[31] = 8;
        assert!(!constant_time_eq(&a, &b));
        b = a;
        b[0] = 0;
        assert!(!constant_time_eq(&a, &b));
    }

    #[test]
    fn reads_need_a_viewer_changes_an_admin_and_reports_a_host() {
        assert_eq!(controller_need("GET", "/"), Need::Public);
        assert_eq!(controller_need("GET", "/v1/vms"), Need::Viewer);
        assert_eq!(controller_need("GET", "/metrics"), Need::Viewer);
        assert_eq!(controller_need("GET", "/openapi.json"), Need::Viewer);
        assert_eq!(controller_need("GET", "/dashboard/leader"), Need::Viewer);
        assert_eq!(controller_need("POST", "/v1/vms"), Need::Admin);
        assert_eq!(controller_need("DELETE", "/v1/vms/a"), Need::Admin);
        assert_eq!(controller_need("PUT", "/v1/policy"), Need::Admin);
        assert_eq!(controller_need("POST", "/v1/plans/3/apply"), Need::Admin);
        assert_eq!(controller_need("POST", "/v1/agent/reports"), Need::Host);
        assert_eq!(controller_need("GET", "/v1/agent/reports"), Need::Host);
    }
}
