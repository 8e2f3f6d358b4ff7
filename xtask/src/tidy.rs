//! `cargo xtask tidy`: the rules of ARCHITECTURE.md that a machine can check, checked on every run of
//! the tests (`tidy_rules_hold_on_this_tree` below runs under `cargo test`).
//!
//! Each rule reads source text, not compiled code, so it is a cheap guard rather than a proof; each
//! breach is reported as `path:line: rule: what was found`, every breach at once.
//!
//! - **pure**: the modules ARCHITECTURE.md calls pure name no clock, socket, thread, file or process
//!   (outside their `#[cfg(test)]` part), and each opens with `#![deny(clippy::disallowed_methods)]`
//!   so clippy also refuses clippy.toml's list of clock, thread, socket, file and process calls
//!   there. The list below must name files that exist, so it follows the code when modules move.
//! - **anyhow**: only the `tern` binary and `xtask` depend on or name `anyhow`; libraries return
//!   typed errors.
//! - **unsafe**: `unsafe` code only in `tern-vmm` (and the freestanding test guest, which is a kernel),
//!   each `unsafe` block preceded by a `// SAFETY:` comment.
//! - **decoded-default**: no value decoded from another process is defaulted silently: no
//!   `v["field"].as_u64().unwrap_or(..)`-style reads.
//! - **no-kvm**: the crates ARCHITECTURE.md keeps away from KVM ([`NO_KVM`]) reach neither
//!   `tern-vmm` nor a KVM crate through any dependency, by Cargo.lock's dependency graph.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// Files (or folders, with a trailing `/`) that must stay pure: no clock, socket, thread, file or
/// process. Paths are relative to the repository root.
pub const PURE: &[&str] = &[
    "crates/policy/src/",
    "crates/migration/src/machine/",
    "crates/migration/src/wire.rs",
    "crates/migration/src/config.rs",
    "crates/migration/src/report.rs",
    "crates/migration/src/vm.rs",
    "crates/api/src/",
    "crates/agent/src/core.rs",
    "crates/controller/src/core.rs",
    "crates/controller/src/place.rs",
    "crates/volume/src/format.rs",
    "crates/volume/src/namespace.rs",
    "crates/volume/src/lease.rs",
    "crates/parking/src/policy.rs",
    "crates/parking/src/power.rs",
    "crates/parking/src/replay.rs",
    "crates/nbd/src/proto.rs",
    "crates/vmm/src/devices/announce.rs",
    "crates/automation/src/",
    "crates/sim/src/preview.rs",
    "crates/power/src/ipmi/cli.rs",
    "crates/power/src/wol/packet.rs",
    "crates/power/src/state.rs",
    "crates/power/src/bmc_sim/conf.rs",
];

/// The line by which a pure module turns on clippy's check of clippy.toml's disallowed methods.
const CLIPPY_OPT_IN: &str = "#![deny(clippy::disallowed_methods)]";

/// What a pure module may not name: each with the reason given in a breach.
const IMPURE: &[(&str, &str)] = &[
    ("Instant::now", "reads the clock"),
    ("SystemTime", "reads the clock"),
    ("std::time::Instant", "reads the clock"),
    ("ToSocketAddrs", "resolves names"),
    ("TcpStream", "opens sockets"),
    ("TcpListener", "opens sockets"),
    ("UdpSocket", "opens sockets"),
    ("UnixStream", "opens sockets"),
    ("UnixListener", "opens sockets"),
    ("std::thread", "starts or sleeps threads"),
    ("thread::spawn", "starts threads"),
    ("thread::sleep", "sleeps"),
    ("std::fs", "touches files"),
    ("File::open", "touches files"),
    ("File::create", "touches files"),
    ("OpenOptions", "touches files"),
    ("std::process", "starts processes"),
    ("tokio", "does asynchronous I/O"),
];

/// Crates (by folder) allowed to use `anyhow`.
const ANYHOW_ALLOWED: &[&str] = &["crates/tern", "xtask"];

/// Packages that never link KVM (ARCHITECTURE.md): the agent and the controller run VMMs only as
/// child processes, and the clients' crates stay usable where no KVM is.
pub const NO_KVM: &[&str] = &[
    "tern-agent",
    "tern-controller",
    "tern-api",
    "tern-vmctl",
    "tern-migration",
    "tern-automation",
    "tern-power",
];

/// Packages that link KVM.
const KVM_PACKAGES: &[&str] = &["tern-vmm", "kvm-ioctls", "kvm-bindings"];

/// Crates (by folder) allowed to contain `unsafe` code.
const UNSAFE_ALLOWED: &[&str] = &["crates/vmm", "crates/guest"];

/// One breach of a rule, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breach {
    pub path: PathBuf,
    pub line: usize,
    pub rule: &'static str,
    pub what: String,
}

impl fmt::Display for Breach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}",
            self.path.display(),
            self.line,
            self.rule,
            self.what
        )
    }
}

/// `cargo xtask tidy`: checks the tree and fails listing every breach.
pub fn run() -> anyhow::Result<()> {
    let root = repo_root();
    let breaches = check_tree(&root)?;
    if breaches.is_empty() {
        eprintln!("tidy: every rule holds");
        return Ok(());
    }
    for b in &breaches {
        eprintln!("{b}");
    }
    bail!(
        "tidy: {} breach(es) of ARCHITECTURE.md's rules",
        breaches.len()
    )
}

/// The repository root (the parent of `xtask/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Every breach in the tree at `root`.
pub fn check_tree(root: &Path) -> anyhow::Result<Vec<Breach>> {
    let mut breaches = Vec::new();
    for pure in PURE {
        let path = root.join(pure);
        if !path.exists() {
            breaches.push(Breach {
                path: PathBuf::from(pure),
                line: 0,
                rule: "pure",
                what: "listed as pure in xtask/src/tidy.rs but missing: update the list".into(),
            });
            continue;
        }
        // Clippy checks what it can (clippy.toml's disallowed-methods) where the module opts in.
        let opt_in = if pure.ends_with('/') {
            ["lib.rs", "mod.rs"]
                .iter()
                .map(|f| path.join(f))
                .find(|p| p.exists())
        } else {
            Some(path.clone())
        };
        let denied = opt_in
            .and_then(|p| std::fs::read_to_string(p).ok())
            .is_some_and(|t| t.lines().any(|l| l.trim() == CLIPPY_OPT_IN));
        if !denied {
            breaches.push(Breach {
                path: PathBuf::from(pure),
                line: 1,
                rule: "pure",
                what: format!(
                    "a pure module must open with `{CLIPPY_OPT_IN}` (in lib.rs or mod.rs for a folder)"
                ),
            });
        }
    }
    if let Ok(lock) = std::fs::read_to_string(root.join("Cargo.lock")) {
        breaches.extend(check_no_kvm(&lock));
    }
    let mut files = Vec::new();
    for top in ["crates", "xtask"] {
        collect(&root.join(top), &mut files)?;
    }
    files.sort();
    for file in files {
        let rel = file.strip_prefix(root).unwrap_or(&file).to_path_buf();
        let rel_str = rel.to_string_lossy().replace('\\', "/");
        if rel_str.ends_with("Cargo.toml") {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            breaches.extend(check_manifest(&rel, &text));
            continue;
        }
        if !rel_str.ends_with(".rs") {
            continue;
        }
        // This file names the patterns it looks for.
        if rel_str == "xtask/src/tidy.rs" {
            continue;
        }
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let krate = crate_dir(&rel_str);
        let in_src = rel_str.contains("/src/");
        if is_pure(&rel_str) {
            breaches.extend(check_pure(&rel, &text));
        }
        if in_src && !ANYHOW_ALLOWED.contains(&krate.as_str()) {
            breaches.extend(check_anyhow(&rel, &text));
        }
        breaches.extend(check_unsafe(
            &rel,
            &text,
            UNSAFE_ALLOWED.contains(&krate.as_str()),
        ));
        if in_src {
            breaches.extend(check_decoded_defaults(&rel, &text));
        }
    }
    Ok(breaches)
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let path = entry.path();
        let name = entry.file_name();
        if name == "target" || name.to_string_lossy().starts_with('.') {
            continue;
        }
        if entry.file_type()?.is_dir() {
            collect(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

/// `crates/NAME` or `xtask` for a path relative to the root.
fn crate_dir(rel: &str) -> String {
    let mut parts = rel.split('/');
    match (parts.next(), parts.next()) {
        (Some("crates"), Some(name)) => format!("crates/{name}"),
        (Some(top), _) => top.to_string(),
        _ => String::new(),
    }
}

fn is_pure(rel: &str) -> bool {
    PURE.iter().any(|p| {
        if p.ends_with('/') {
            rel.starts_with(p)
        } else {
            rel == *p
        }
    })
}

/// The code lines of a Rust file: (line number, text without a trailing `//` comment), up to the first
/// `#[cfg(test)]`, skipping comment lines.
fn code_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .take_while(|(_, l)| l.trim() != "#[cfg(test)]")
        .filter_map(|(i, l)| {
            let t = l.trim_start();
            if t.starts_with("//") {
                return None;
            }
            let code = match l.find("//") {
                // A `//` inside a string literal is rare in these files; a false cut only hides code.
                Some(pos) if !l[..pos].contains('"') => &l[..pos],
                _ => l,
            };
            Some((i + 1, code))
        })
}

/// The **pure** rule for one file.
pub fn check_pure(rel: &Path, text: &str) -> Vec<Breach> {
    let mut out = Vec::new();
    for (line, code) in code_lines(text) {
        for (needle, why) in IMPURE {
            if contains_token(code, needle) {
                out.push(Breach {
                    path: rel.to_path_buf(),
                    line,
                    rule: "pure",
                    what: format!(
                        "names `{needle}` ({why}) in a module ARCHITECTURE.md calls pure"
                    ),
                });
            }
        }
    }
    out
}

/// Whether `code` contains `needle` not as part of a longer identifier.
fn contains_token(code: &str, needle: &str) -> bool {
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    code.match_indices(needle).any(|(at, _)| {
        let before = code[..at].chars().next_back();
        let after = code[at + needle.len()..].chars().next();
        !before.is_some_and(ident) && !after.is_some_and(ident)
    })
}

/// The **anyhow** rule for a source file of a library crate.
pub fn check_anyhow(rel: &Path, text: &str) -> Vec<Breach> {
    code_lines(text)
        .filter(|(_, code)| contains_token(code, "anyhow"))
        .map(|(line, _)| Breach {
            path: rel.to_path_buf(),
            line,
            rule: "anyhow",
            what: "`anyhow` outside crates/tern and xtask: return a typed error enum".into(),
        })
        .collect()
}

/// The **anyhow** rule for a manifest.
pub fn check_manifest(rel: &Path, text: &str) -> Vec<Breach> {
    let rel_str = rel.to_string_lossy().replace('\\', "/");
    if rel_str == "Cargo.toml" || ANYHOW_ALLOWED.contains(&crate_dir(&rel_str).as_str()) {
        return Vec::new();
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.trim_start().starts_with("anyhow"))
        .map(|(i, _)| Breach {
            path: rel.to_path_buf(),
            line: i + 1,
            rule: "anyhow",
            what: "depends on `anyhow`: only crates/tern and xtask may".into(),
        })
        .collect()
}

/// The packages `name` depends on, directly or not, by the `[[package]]` tables of a Cargo.lock
/// (dev-dependencies of workspace members included; versions are ignored, so a name stands for
/// all its versions).
pub fn lock_closure(lock: &str, name: &str) -> std::collections::BTreeSet<String> {
    use std::collections::{BTreeMap, BTreeSet};
    let mut deps: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for pkg in lock.split("[[package]]").skip(1) {
        let Some(pkg_name) = pkg
            .lines()
            .find_map(|l| l.strip_prefix("name = "))
            .map(|n| n.trim().trim_matches('"'))
        else {
            continue;
        };
        let list = deps.entry(pkg_name).or_default();
        if let Some((_, rest)) = pkg.split_once("dependencies = [") {
            let body = rest.split(']').next().unwrap_or("");
            list.extend(
                body.split(',')
                    .map(|d| d.trim().trim_matches('"'))
                    .filter_map(|d| d.split_whitespace().next()),
            );
        }
    }
    let mut seen = BTreeSet::new();
    let mut todo = vec![name];
    while let Some(n) = todo.pop() {
        for &d in deps.get(n).map(Vec::as_slice).unwrap_or_default() {
            if seen.insert(d.to_string()) {
                todo.push(d);
            }
        }
    }
    seen
}

/// The **no-kvm** rule over a Cargo.lock.
pub fn check_no_kvm(lock: &str) -> Vec<Breach> {
    let mut out = Vec::new();
    for &krate in NO_KVM {
        let closure = lock_closure(lock, krate);
        for &kvm in KVM_PACKAGES {
            if closure.contains(kvm) {
                out.push(Breach {
                    path: PathBuf::from("Cargo.lock"),
                    line: 0,
                    rule: "no-kvm",
                    what: format!(
                        "{krate} depends on {kvm} (ARCHITECTURE.md: it never links KVM; talk to a VMM through tern-vmctl)"
                    ),
                });
            }
        }
    }
    out
}

/// The **unsafe** rule for one file: no `unsafe` outside the allowed crates; inside them, each
/// `unsafe {` block is preceded by a `// SAFETY:` comment (on the lines just above, or on its line).
pub fn check_unsafe(rel: &Path, text: &str, allowed: bool) -> Vec<Breach> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, raw) in lines.iter().enumerate() {
        let t = raw.trim_start();
        if t.starts_with("//") {
            continue;
        }
        let code = strip_strings(raw);
        let has_unsafe = contains_token(&code, "unsafe");
        if !has_unsafe {
            continue;
        }
        // `#![forbid(unsafe_code)]`, `#[unsafe(no_mangle)]` and lint names are not unsafe code.
        let is_block = code.contains("unsafe {") || code.trim_end().ends_with("unsafe");
        let is_item = code.contains("unsafe fn") || code.contains("unsafe impl");
        if !(is_block || is_item) {
            continue;
        }
        if !allowed {
            out.push(Breach {
                path: rel.to_path_buf(),
                line: i + 1,
                rule: "unsafe",
                what: "`unsafe` outside tern-vmm (ARCHITECTURE.md: the only crate with unsafe)"
                    .into(),
            });
            continue;
        }
        if is_block && !has_safety_comment(&lines, i) {
            out.push(Breach {
                path: rel.to_path_buf(),
                line: i + 1,
                rule: "unsafe",
                what: "an `unsafe` block without a `// SAFETY:` comment just above it".into(),
            });
        }
    }
    out
}

/// Replaces the contents of string literals with spaces, so words inside them are not code.
fn strip_strings(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut in_str = false;
    let mut escaped = false;
    for c in line.chars() {
        if in_str {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
                out.push('"');
                continue;
            }
            out.push(' ');
        } else {
            if c == '"' {
                in_str = true;
            }
            out.push(c);
        }
    }
    out
}

/// Whether line `at` or the comment/attribute/code lines of the statement just above it carry
/// `SAFETY:`. Looks back over the comment block directly above, and over up to 6 lines of the same
/// statement (an `unsafe` block inside a multi-line expression).
fn has_safety_comment(lines: &[&str], at: usize) -> bool {
    if lines[at].contains("SAFETY:") {
        return true;
    }
    let mut i = at;
    let mut code_lines_seen = 0;
    while i > 0 {
        i -= 1;
        let t = lines[i].trim_start();
        if t.contains("SAFETY:") {
            return true;
        }
        if t.starts_with("//") || t.starts_with("#[") {
            continue;
        }
        // A statement that ended above, or a block that opened, ends the search.
        if t.ends_with(';') || t.ends_with('}') || t.is_empty() {
            return false;
        }
        code_lines_seen += 1;
        if code_lines_seen > 6 {
            return false;
        }
    }
    false
}

/// The **decoded-default** rule: `x["field"].as_u64().unwrap_or(…)`, `x.get("field")` … `.as_str()`
/// … `.unwrap_or_default()` and the like, within one statement (which may span lines).
pub fn check_decoded_defaults(rel: &Path, text: &str) -> Vec<Breach> {
    const AS: &[&str] = &[
        ".as_u64()",
        ".as_i64()",
        ".as_f64()",
        ".as_str()",
        ".as_bool()",
        ".as_array()",
        ".as_object()",
    ];
    let mut out = Vec::new();
    let mut statement = String::new();
    let mut first_line = 0;
    for (line, code) in code_lines(text) {
        let compact: String = code.split_whitespace().collect();
        if statement.is_empty() {
            first_line = line;
        }
        statement.push_str(&compact);
        let ends = compact.ends_with(';') || compact.ends_with('{') || compact.ends_with('}');
        if !ends {
            continue;
        }
        let keyed = statement.find("[\"").or_else(|| statement.find(".get(\""));
        let found = keyed.is_some_and(|at| {
            let rest = &statement[at..];
            AS.iter()
                .filter_map(|a| rest.find(a))
                .min()
                .is_some_and(|a| rest[a..].contains(".unwrap_or"))
        });
        if found {
            out.push(Breach {
                path: rel.to_path_buf(),
                line: first_line,
                rule: "decoded-default",
                what: "a decoded field defaulted with unwrap_or: decode into a typed struct, and \
                       make a missing or wrong field an error"
                    .into(),
            });
        }
        statement.clear();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("crates/x/src/m.rs")
    }

    #[test]
    fn tidy_rules_hold_on_this_tree() {
        let breaches = check_tree(&repo_root()).expect("the tree can be read");
        let listed: Vec<String> = breaches.iter().map(ToString::to_string).collect();
        assert!(
            breaches.is_empty(),
            "ARCHITECTURE.md's rules are broken:\n{}",
            listed.join("\n")
        );
    }

    #[test]
    fn pure_rule_finds_a_clock_and_a_socket_but_not_in_tests_or_comments() {
        let text = "use std::time::Instant;\n// Instant::now in a comment\nfn f() { let s = std::net::TcpStream::connect(\"x\"); let a = std::net::Ipv4Addr::LOCALHOST; }\n#[cfg(test)]\nmod tests { fn g() { std::thread::sleep(d); } }\n";
        let found = check_pure(p(), text);
        let lines: Vec<usize> = found.iter().map(|b| b.line).collect();
        assert_eq!(lines, vec![1, 3], "{found:?}");
        assert!(found[0].what.contains("clock"));
        assert!(found[1].what.contains("sockets"));
    }

    #[test]
    fn pure_rule_ignores_longer_identifiers() {
        assert!(check_pure(p(), "struct MyInstant_nowish;\nlet fsx = 1;\n").is_empty());
        assert!(contains_token("x std::fs::read", "std::fs"));
        assert!(!contains_token("x mystd::fs", "std::fs"));
    }

    #[test]
    fn anyhow_rule_flags_a_library_manifest_and_source() {
        let manifest = "[dependencies]\nanyhow.workspace = true\n";
        let found = check_manifest(Path::new("crates/volume/Cargo.toml"), manifest);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].line, 2);
        assert!(check_manifest(Path::new("crates/tern/Cargo.toml"), manifest).is_empty());
        assert_eq!(
            check_anyhow(p(), "fn f() -> anyhow::Result<()> { Ok(()) }\n").len(),
            1
        );
    }

    #[test]
    fn unsafe_rule_wants_safety_comments_and_the_right_crate() {
        let good = "fn f() {\n    // SAFETY: the pointer is valid.\n    unsafe { g() }\n}\n";
        assert!(check_unsafe(p(), good, true).is_empty());
        let bad = "fn f() {\n    let x = 1;\n    unsafe { g() }\n}\n";
        let found = check_unsafe(p(), bad, true);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].line, 3);
        let found = check_unsafe(p(), good, false);
        assert_eq!(
            found.len(),
            1,
            "unsafe outside tern-vmm is a breach even with a comment"
        );
        let attrs = "#![forbid(unsafe_code)]\n#[unsafe(no_mangle)]\nlet s = \"unsafe { }\";\n";
        assert!(check_unsafe(p(), attrs, false).is_empty());
    }

    #[test]
    fn unsafe_rule_accepts_a_comment_above_a_multi_line_statement() {
        let text = "    // SAFETY: paused; nothing else maps it.\n    let rc =\n        unsafe { libc::madvise(a, b, c) };\n";
        assert!(check_unsafe(p(), text, true).is_empty());
    }

    #[test]
    fn decoded_default_rule_flags_silent_defaults() {
        let text = "let e = v[\"epoch\"].as_u64().unwrap_or(0);\nlet t = v.get(\"ttl\").and_then(|x| x.as_u64()).unwrap_or(0);\nlet n = v[\"name\"]\n    .as_str()\n    .unwrap_or_default();\nlet ok = x.unwrap_or(0);\nlet m = map.get(\"k\").copied().unwrap_or(0);\nlet s = v[\"s\"].as_str().ok_or(E::Missing)?;\n";
        let found = check_decoded_defaults(p(), text);
        let lines: Vec<usize> = found.iter().map(|b| b.line).collect();
        assert_eq!(lines, vec![1, 2, 3], "{found:?}");
    }

    #[test]
    fn no_kvm_rule_follows_dependencies_through_the_lock() {
        let lock = "version = 4\n\n[[package]]\nname = \"tern-agent\"\nversion = \"0.1.0\"\ndependencies = [\n \"tern-vmctl\",\n \"serde 1.0.0\",\n]\n\n[[package]]\nname = \"tern-vmctl\"\nversion = \"0.1.0\"\ndependencies = [\n \"tern-api\",\n]\n\n[[package]]\nname = \"tern-api\"\nversion = \"0.1.0\"\n";
        let closure = lock_closure(lock, "tern-agent");
        assert_eq!(
            closure.into_iter().collect::<Vec<_>>(),
            ["serde", "tern-api", "tern-vmctl"]
        );
        assert!(check_no_kvm(lock).is_empty());
        let bad = lock.replace("\"tern-api\",\n]", "\"tern-api\",\n \"tern-vmm\",\n]");
        let found: Vec<String> = check_no_kvm(&bad).iter().map(|b| b.what.clone()).collect();
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found[0].starts_with("tern-agent depends on tern-vmm"),
            "{found:?}"
        );
        assert!(
            found[1].starts_with("tern-vmctl depends on tern-vmm"),
            "{found:?}"
        );
    }

    #[test]
    fn a_breach_prints_as_path_line_rule_and_what() {
        let b = Breach {
            path: PathBuf::from("crates/a/src/b.rs"),
            line: 7,
            rule: "pure",
            what: "x".into(),
        };
        assert_eq!(b.to_string(), "crates/a/src/b.rs:7: pure: x");
    }
}
