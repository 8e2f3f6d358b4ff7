//! The test guest's console lines (docs/guest-interface.md), parsed: what a host test, benchmark or
//! migration check reads off the serial port. Pure; lines it does not know are `None`.

/// One recognised console line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestLine {
    /// `TERN-GUEST up cpus=<n> tsc_khz=<k> mem_mib=<m>`
    Up {
        cpus: u32,
        tsc_khz: u64,
        mem_mib: u64,
    },
    /// `HB seq=<n> t_us=<µs> maxgap_us=<µs>[ cpu=<k>]`
    Heartbeat {
        seq: u64,
        t_us: u64,
        maxgap_us: u64,
        cpu: Option<u32>,
    },
    /// `DIRTY pages=<n> rate=<pages/s>[ cpu=<k>]`
    Dirty {
        pages: u64,
        rate: u64,
        cpu: Option<u32>,
    },
    /// `BLK verify ok sectors=<n>`
    BlkOk { sectors: u64 },
    /// `BLK verify FAIL <reason>`
    BlkFail { reason: String },
    /// `PANIC <message>`
    Panic { message: String },
}

fn field<T: std::str::FromStr>(words: &[&str], key: &str) -> Option<T> {
    words
        .iter()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// Parses one line (without its `\n`; a trailing `\r` is ignored).
pub fn parse(line: &str) -> Option<GuestLine> {
    let line = line.trim_end_matches(['\r', '\n']);
    if let Some(msg) = line.strip_prefix("PANIC ") {
        return Some(GuestLine::Panic {
            message: msg.to_string(),
        });
    }
    if let Some(reason) = line.strip_prefix("BLK verify FAIL ") {
        return Some(GuestLine::BlkFail {
            reason: reason.to_string(),
        });
    }
    let words: Vec<&str> = line.split_ascii_whitespace().collect();
    match words.as_slice() {
        ["TERN-GUEST", "up", rest @ ..] => Some(GuestLine::Up {
            cpus: field(rest, "cpus")?,
            tsc_khz: field(rest, "tsc_khz")?,
            mem_mib: field(rest, "mem_mib")?,
        }),
        ["HB", rest @ ..] => Some(GuestLine::Heartbeat {
            seq: field(rest, "seq")?,
            t_us: field(rest, "t_us")?,
            maxgap_us: field(rest, "maxgap_us")?,
            cpu: field(rest, "cpu"),
        }),
        ["DIRTY", rest @ ..] => Some(GuestLine::Dirty {
            pages: field(rest, "pages")?,
            rate: field(rest, "rate")?,
            cpu: field(rest, "cpu"),
        }),
        ["BLK", "verify", "ok", rest @ ..] => Some(GuestLine::BlkOk {
            sectors: field(rest, "sectors")?,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_with_and_without_cpu() {
        assert_eq!(
            parse("HB seq=3 t_us=602329 maxgap_us=110"),
            Some(GuestLine::Heartbeat {
                seq: 3,
                t_us: 602329,
                maxgap_us: 110,
                cpu: None
            })
        );
        assert_eq!(
            parse("HB seq=1 t_us=5 maxgap_us=7 cpu=1\r"),
            Some(GuestLine::Heartbeat {
                seq: 1,
                t_us: 5,
                maxgap_us: 7,
                cpu: Some(1)
            })
        );
    }

    #[test]
    fn up_dirty_blk_and_panic_lines() {
        assert_eq!(
            parse("TERN-GUEST up cpus=2 tsc_khz=2596120 mem_mib=512"),
            Some(GuestLine::Up {
                cpus: 2,
                tsc_khz: 2596120,
                mem_mib: 512
            })
        );
        assert_eq!(
            parse("DIRTY pages=400 rate=20000"),
            Some(GuestLine::Dirty {
                pages: 400,
                rate: 20000,
                cpu: None
            })
        );
        assert_eq!(
            parse("BLK verify ok sectors=2048"),
            Some(GuestLine::BlkOk { sectors: 2048 })
        );
        assert_eq!(
            parse("BLK verify FAIL read back differs at sector 3"),
            Some(GuestLine::BlkFail {
                reason: "read back differs at sector 3".into()
            })
        );
        assert_eq!(
            parse("PANIC bad value"),
            Some(GuestLine::Panic {
                message: "bad value".into()
            })
        );
    }

    #[test]
    fn malformed_or_unknown_lines_are_none() {
        assert_eq!(parse("HB seq=x t_us=1 maxgap_us=1"), None);
        assert_eq!(parse("HB seq=1"), None);
        assert_eq!(parse("BLK device slot=23"), None);
        assert_eq!(parse(""), None);
    }
}
