//! The files a test BMC runs on, rendered from its options: `ipmi_sim`'s LAN configuration
//! (`lan.conf`, see ipmi_lan(5)), its start-up commands (`bmc.emu`, ipmi_sim_cmd(5)) and the
//! chassis control program it runs for every power request (`chassis-control`). Pure: the shell
//! writes what these return.
//!
//! The chassis control program is how ipmi_sim hands power to the outside world: it runs
//! `PROGRAM MC get power` (answer `power:0|1`), `PROGRAM MC set power 0|1`, `… set shutdown 1`
//! (soft-off), `… set reset 1`, `… set boot X`, and an exit status other than 0 becomes a failed
//! IPMI command. Ours keeps the power state in the file `power`, runs the caller's commands
//! (`on.sh`, `off.sh`, `soft.sh`) with their output in `hooks.log`, and appends one line per
//! change to `events`. ipmi_sim waits for it, so the commands must return once their work is
//! started (start daemons in the background) and stopped.
#![deny(clippy::disallowed_methods)]

use std::net::Ipv4Addr;

/// The BMC's IPMB address.
pub const BMC_IPMB: &str = "0x20";
/// Longest user name ipmi_sim takes.
pub const MAX_USER_LEN: usize = 16;
/// Longest password (IPMI 2.0).
pub const MAX_PASSWORD_LEN: usize = 20;

/// What the rendered files need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered<'a> {
    /// The BMC's name (ipmi_sim's `name`).
    pub name: &'a str,
    /// Listening address.
    pub addr: Ipv4Addr,
    /// Listening UDP port.
    pub port: u16,
    /// The one admin user.
    pub user: &'a str,
    /// Its password.
    pub password: &'a str,
    /// The folder holding every file.
    pub dir: &'a str,
}

/// Why a credential cannot go into `lan.conf`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "Invalid BMC {what}: {reason} (1-{max} printable ASCII characters, no space, '\"' or '\\')"
)]
pub struct InvalidCredential {
    /// "user" or "password".
    pub what: &'static str,
    /// The limit.
    pub max: usize,
    /// What is wrong.
    pub reason: &'static str,
}

/// Checks a user name or password for `lan.conf` (quoted, no escapes).
pub fn check_credential(
    what: &'static str,
    value: &str,
    max: usize,
) -> Result<(), InvalidCredential> {
    let err = |reason| InvalidCredential { what, max, reason };
    if value.is_empty() {
        return Err(err("it is empty"));
    }
    if value.len() > max {
        return Err(err("it is too long"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    {
        return Err(err("it has a character outside the allowed set"));
    }
    Ok(())
}

/// Quotes `s` for a POSIX shell.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `lan.conf`: one LAN channel on `addr:port`, one admin user, our chassis control program.
pub fn lan_conf(r: &Rendered<'_>) -> String {
    let auths = "none md2 md5 straight";
    format!(
        "# Test BMC {name}, written by tern-power (see ipmi_lan(5)).\n\
         name \"{name}\"\n\
         set_working_mc {BMC_IPMB}\n\
         \x20 startlan 1\n\
         \x20   addr {addr} {port}\n\
         \x20   priv_limit admin\n\
         \x20   allowed_auths_callback {auths}\n\
         \x20   allowed_auths_user {auths}\n\
         \x20   allowed_auths_operator {auths}\n\
         \x20   allowed_auths_admin {auths}\n\
         \x20   guid 7465726e2d706f7765722d626d630000\n\
         \x20 endlan\n\
         \x20 chassis_control \"{dir}/chassis-control {BMC_IPMB}\"\n\
         \x20 user 2 true \"{user}\" \"{password}\" admin 10 {auths}\n",
        name = r.name,
        addr = r.addr,
        port = r.port,
        dir = r.dir,
        user = r.user,
        password = r.password,
    )
}

/// `bmc.emu`: one enabled management controller with chassis support at the BMC's address.
pub fn bmc_emu() -> String {
    format!(
        "# The BMC: device id 0, revision 1, firmware 1.0, IPMI 2.0 device support bits 0x9f\n\
         # (chassis, sensors, SDR, SEL, FRU, event receiver).\n\
         mc_setbmc {BMC_IPMB}\n\
         mc_add {BMC_IPMB} 0 no-device-sdrs 0x01 1 0 0x9f 0x000000 0x0000\n\
         mc_enable {BMC_IPMB}\n"
    )
}

/// The chassis control program (a POSIX shell script) for a BMC whose files live in `dir`.
/// `soft_off` says whether a soft-off request runs `soft.sh` and powers off, or is ignored (as an
/// operating system that does not honour ACPI would).
pub fn chassis_control(dir: &str, soft_off: bool) -> String {
    let dir = sh_quote(dir);
    let soft = if soft_off {
        "if [ \"$(current)\" = on ]; then hook soft || fail soft; \
         echo off > \"$dir/power\"; echo soft >> \"$dir/events\"; fi"
    } else {
        "echo soft-ignored >> \"$dir/events\""
    };
    format!(
        r#"#!/bin/sh
# Chassis control of a tern-power test BMC. ipmi_sim runs: chassis-control MC get|set PARAM [VALUE]...
dir={dir}
current() {{ cat "$dir/power" 2>/dev/null || echo off; }}
hook() {{
    [ -f "$dir/$1.sh" ] || return 0
    /bin/sh "$dir/$1.sh" </dev/null >>"$dir/hooks.log" 2>&1
}}
fail() {{ echo "$1-failed" >> "$dir/events"; echo "the $1 command failed (see $dir/hooks.log)"; exit 1; }}
shift
op=$1
shift
case "$op" in
get)
    for p in "$@"; do
        case "$p" in
        power) if [ "$(current)" = on ]; then echo power:1; else echo power:0; fi ;;
        boot) echo boot:default ;;
        *) echo "unsupported parameter $p"; exit 1 ;;
        esac
    done
    ;;
set)
    while [ $# -ge 2 ]; do
        p=$1
        v=$2
        shift 2
        case "$p:$v" in
        power:1)
            if [ "$(current)" != on ]; then hook on || fail on; echo on > "$dir/power"; echo on >> "$dir/events"; fi ;;
        power:0)
            if [ "$(current)" = on ]; then hook off || fail off; echo off > "$dir/power"; echo off >> "$dir/events"; fi ;;
        shutdown:1)
            {soft} ;;
        reset:1)
            if [ "$(current)" = on ]; then hook off || fail off; hook on || fail on; echo reset >> "$dir/events"; fi ;;
        boot:*|identify:*) ;;
        *) echo "unsupported request $p $v"; exit 1 ;;
        esac
    done
    ;;
*)
    echo "unsupported operation $op"
    exit 1
    ;;
esac
exit 0
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r() -> Rendered<'static> {
        Rendered {
            name: "tern-h0",
            addr: Ipv4Addr::LOCALHOST,
            port: 16231,
            user: "admin",
            password: "s3cret",
            dir: "/tmp/x",
        }
    }

    #[test]
    fn lan_conf_names_the_address_user_and_control_program() {
        let c = lan_conf(&r());
        assert!(c.contains("\n    addr 127.0.0.1 16231\n"), "{c}");
        assert!(
            c.contains("user 2 true \"admin\" \"s3cret\" admin 10"),
            "{c}"
        );
        assert!(
            c.contains("chassis_control \"/tmp/x/chassis-control 0x20\""),
            "{c}"
        );
        assert!(c.contains("name \"tern-h0\""), "{c}");
    }

    #[test]
    fn credentials_that_would_break_the_file_are_refused() {
        assert!(check_credential("user", "admin", MAX_USER_LEN).is_ok());
        for bad in ["", "a b", "a\"b", "a\\b", "é", "12345678901234567"] {
            let e = check_credential("user", bad, MAX_USER_LEN).unwrap_err();
            assert!(e.to_string().contains("1-16 printable ASCII"), "{e}");
        }
    }

    #[test]
    fn the_control_script_quotes_its_folder_and_picks_the_soft_off_rule() {
        let s = chassis_control("/tmp/it's", true);
        assert!(s.contains(r"dir='/tmp/it'\''s'"), "{s}");
        assert!(s.contains("hook soft || fail soft"), "{s}");
        let s = chassis_control("/tmp/x", false);
        assert!(s.contains("soft-ignored"), "{s}");
        assert!(!s.contains("hook soft"), "{s}");
    }

    #[test]
    fn sh_quote_wraps_and_escapes() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("x'y"), r"'x'\''y'");
    }
}
