//! The one grammar of duration flags: a whole number followed by `ms`, `s`, `m` or `h`; a
//! bare number is seconds. Surrounding white space is ignored. Examples: `500ms`, `30s`, `5m`,
//! `1h`, `30`.
//!
//! This is the union of what the store (`s`, `m`, `h`, bare seconds) and the HAProxy agent
//! (`ms`, `s`, `m`, `h`, bare seconds) accepted before they shared it, so no value that
//! worked stops working. (`humantime` would refuse bare numbers and accept `1d`, which the
//! flags never took.)

use std::time::Duration;

use crate::error::InvalidDuration;

/// Parses one duration; use as a clap `value_parser`, which names the flag in its message.
pub fn parse_duration(s: &str) -> Result<Duration, InvalidDuration> {
    let err = |reason: String| InvalidDuration {
        value: s.to_string(),
        reason,
    };
    let t = s.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    if num.is_empty() {
        return Err(err(
            "expected a whole number with ms, s, m or h, e.g. 500ms, 30s, 5m".into(),
        ));
    }
    let n: u64 = num.parse().map_err(|_| err("number too large".into()))?;
    let per_unit_ms: u64 = match unit {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(err(format!("unknown unit {unit:?} (ms, s, m, h)"))),
    };
    n.checked_mul(per_unit_ms)
        .map(Duration::from_millis)
        .ok_or_else(|| err("number too large".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_every_unit_and_bare_seconds() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration(" 5m ").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
    }

    #[test]
    fn errors_quote_the_value_and_say_why() {
        let e = parse_duration("1d").unwrap_err();
        assert_eq!(e.to_string(), r#""1d": unknown unit "d" (ms, s, m, h)"#);
        for bad in ["s", "", "-1s", "1.5s", "ten seconds"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.to_string().starts_with(&format!("{bad:?}: ")), "{bad:?}: {e}");
        }
        assert!(
            parse_duration("1.5s")
                .unwrap_err()
                .reason
                .contains("unit \".5s\"")
        );
        assert_eq!(
            parse_duration("99999999999999999999s").unwrap_err().reason,
            "number too large"
        );
        assert_eq!(
            parse_duration("18446744073709551615h").unwrap_err().reason,
            "number too large"
        );
    }

    #[test]
    fn clap_names_the_flag_and_the_value() {
        use clap::Parser;
        #[derive(Parser, Debug)]
        struct Flags {
            #[arg(long, value_parser = parse_duration)]
            retry_interval: Duration,
        }
        let ok = Flags::try_parse_from(["x", "--retry-interval", "500ms"]).unwrap();
        assert_eq!(ok.retry_interval, Duration::from_millis(500));
        let e = Flags::try_parse_from(["x", "--retry-interval", "5y"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--retry-interval"), "{e}");
        assert!(e.contains(r#""5y": unknown unit "y""#), "{e}");
    }
}
