//! Small helpers shared by several modules.

use std::time::Duration;

/// Parses a human duration such as `15m`, `300s`, `1h30m`, `250ms`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("invalid duration {text:?}: expected a number, e.g. \"15m\""));
        }
        let n: u64 = rest[..digits].parse().map_err(|_| format!("invalid duration {text:?}"))?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        total += match unit {
            "ms" => Duration::from_millis(n),
            "s" | "" => Duration::from_secs(n),
            "m" | "min" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            "d" => Duration::from_secs(n * 86400),
            other => {
                return Err(format!("invalid duration {text:?}: unknown unit {other:?} (use ms, s, m, h or d)"));
            }
        };
    }
    Ok(total)
}

/// Formats nanoseconds since the Unix epoch as RFC 3339 UTC with nanoseconds.
pub fn format_epoch_ns(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let nanos = ns.rem_euclid(1_000_000_000) as u32;
    match chrono::DateTime::from_timestamp(secs, nanos) {
        Some(t) => t.format("%Y-%m-%dT%H:%M:%S%.9fZ").to_string(),
        None => format!("{ns}ns"),
    }
}

pub fn now_epoch_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX)
}

/// Checks an identifier from the configuration: letters, digits and `_`, not starting with a digit.
/// Identifiers are also quoted when used, so this is a second line of defence.
pub fn validate_identifier(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {name:?} is not a valid identifier: use letters, digits and '_', not starting with a digit"
        ))
    }
}

/// Quotes an identifier for ClickHouse SQL.
pub fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('\\', "\\\\").replace('`', "\\`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn epoch_formatting() {
        assert_eq!(format_epoch_ns(1_500_000_000), "1970-01-01T00:00:01.500000000Z");
        assert_eq!(format_epoch_ns(-1_000_000_000), "1969-12-31T23:59:59.000000000Z");
    }

    #[test]
    fn identifiers() {
        assert!(validate_identifier("column", "exchange_timestamp").is_ok());
        assert!(validate_identifier("column", "a; DROP TABLE x").is_err());
        assert!(validate_identifier("column", "1abc").is_err());
        assert_eq!(quote_ident("a`b"), "`a\\`b`");
    }
}
