//! The window (I1): positions in a source table, the unit a cursor value stands for, when a
//! value counts as settled, and the SQL that bounds a window. No I/O: the source
//! (`source::query`) and the commit protocol (`commit`) both build on it.
//!
//! A position is `(cursor, tiebreak)`. Windows are `(lo, hi]` on positions. Bounds go to
//! ClickHouse as query parameters typed like the columns themselves, so no row's value is
//! converted before it is compared (a `DateTime64(6)` in 2299 stays in 2299).

use serde::{Deserialize, Serialize};

use crate::util::format_epoch_ns;

/// A position in a source table: the cursor (ns since the epoch, UTC) and, when the table has
/// a tiebreak column, its value. `tiebreak: None` means "every row at this cursor".
///
/// The tiebreak value is kept in ClickHouse's *escaped* text form — the form ClickHouse writes
/// in TabSeparated output and reads back from a query parameter — so any value of any
/// supported type, including strings with TAB, newline, backslash, NUL or bytes that are not
/// UTF-8, goes back to ClickHouse exactly as it came.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub cursor_ns: i64,
    pub tiebreak: Option<String>,
}

impl Position {
    pub fn at(cursor_ns: i64) -> Self {
        Self { cursor_ns, tiebreak: None }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("position serialises")
    }

    /// RFC 3339 with nanoseconds, then `#tiebreak` when there is one.
    pub fn display(&self) -> String {
        match &self.tiebreak {
            Some(t) => format!("{} #{t}", format_epoch_ns(self.cursor_ns)),
            None => format_epoch_ns(self.cursor_ns),
        }
    }

    /// The cursor as RFC 3339 (what `offload.watermark` and the state-store mirror show).
    pub fn cursor_rfc3339(&self) -> String {
        format_epoch_ns(self.cursor_ns)
    }

    /// Parses what [`Self::display`] prints, or a bare RFC 3339 time (`watermark set --to`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (time, tiebreak) = match text.split_once(" #") {
            Some((t, tb)) => (t.trim(), Some(tb.to_string())),
            None => (text.trim(), None),
        };
        let t = chrono::DateTime::parse_from_rfc3339(time)
            .map_err(|e| format!("{time:?} is not an RFC 3339 time ({e}); e.g. 2026-11-30T00:00:00Z"))?;
        let cursor_ns = t.timestamp_nanos_opt().ok_or_else(|| format!("{time:?} is out of range"))?;
        Ok(Self { cursor_ns, tiebreak })
    }
}

/// What a watermark was measured on (I11): the source table, the cursor and the tiebreak,
/// names and ClickHouse types. Recorded with every commit; a configuration that changes any
/// of it for an existing target is refused, since `W` would then mean something else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Measure {
    pub source: String,
    pub cursor: String,
    pub cursor_type: String,
    pub tiebreak: Option<String>,
    pub tiebreak_type: Option<String>,
}

impl Measure {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("measure serialises")
    }

    /// The first field in which `now` differs from `self` (what `W` was measured on), as
    /// (field, recorded, configured).
    pub fn difference(&self, now: &Measure) -> Option<(&'static str, String, String)> {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "none".into());
        if self.source != now.source {
            return Some(("source", self.source.clone(), now.source.clone()));
        }
        if self.cursor != now.cursor {
            return Some(("cursor", self.cursor.clone(), now.cursor.clone()));
        }
        // Positions are instants: a time zone added to or removed from the type changes nothing.
        if without_zone(&self.cursor_type) != without_zone(&now.cursor_type) && !self.cursor_type.is_empty() {
            return Some(("cursor type", self.cursor_type.clone(), now.cursor_type.clone()));
        }
        // Adding a tiebreak is harmless while W has none (its cursor value is wholly done);
        // that case is let through by the caller's view of W, see `MeasuredOn::difference`.
        if self.tiebreak != now.tiebreak {
            return Some(("tiebreak", show(&self.tiebreak), show(&now.tiebreak)));
        }
        if self.tiebreak_type != now.tiebreak_type && self.tiebreak_type.is_some() {
            return Some(("tiebreak type", show(&self.tiebreak_type), show(&now.tiebreak_type)));
        }
        None
    }
}

/// `DateTime64(3, 'UTC')` → `DateTime64(3)`, `DateTime('Europe/Berlin')` → `DateTime`.
fn without_zone(t: &str) -> String {
    match t.split_once('(') {
        Some(("DateTime", _)) => "DateTime".into(),
        Some(("DateTime64", args)) => format!("DateTime64({})", args.split([',', ')']).next().unwrap_or("").trim()),
        _ => t.to_string(),
    }
}

/// One planned window: rows with `lo < position <= hi`.
#[derive(Debug, Clone)]
pub struct Window {
    pub lo: Option<Position>,
    pub hi: Position,
    pub planned_rows: u64,
    /// Whether the window was cut short (rows or partitions): more rows are already settled.
    pub bounded: bool,
}

/// What one cursor value stands for: a `Date` is a whole day, a `DateTime` a second, a
/// `DateTime64(p)` 10^-p s. A value is settled only when the whole unit has passed (I1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CursorUnit {
    /// `Date` (1970–2149) or `Date32` (1900–2299).
    Day { wide: bool },
    /// `DateTime`.
    Second,
    /// `DateTime64(p)`, p in 0..=9.
    Ticks(u32),
}

const NANOS_PER_DAY: i64 = 86_400 * 1_000_000_000;

impl CursorUnit {
    /// The unit of a ClickHouse type (wrappers `Nullable`/`LowCardinality` already removed).
    pub fn of_type(ch_type: &str) -> Option<Self> {
        let t = ch_type.trim();
        if t == "Date" {
            return Some(Self::Day { wide: false });
        }
        if t == "Date32" {
            return Some(Self::Day { wide: true });
        }
        if t == "DateTime" || t.starts_with("DateTime(") {
            return Some(Self::Second);
        }
        let args = t.strip_prefix("DateTime64(")?.strip_suffix(')')?;
        let precision: u32 = args.split(',').next()?.trim().parse().ok()?;
        (precision <= 9).then_some(Self::Ticks(precision))
    }

    pub fn nanos(self) -> i64 {
        match self {
            Self::Day { .. } => NANOS_PER_DAY,
            Self::Second => 1_000_000_000,
            Self::Ticks(p) => 10i64.pow(9 - p),
        }
    }

    /// The last cursor value that is settled at `now_ns` (the source's clock) with `settle_ns`:
    /// the value `v` stands for `[v, v + unit)`, so it is settled once `v + unit + settle <= now`.
    /// Below a millisecond the limit is first rounded down to one, which keeps watermarks
    /// readable and is never later than allowed.
    pub fn settled_limit(self, now_ns: i64, settle_ns: i64) -> i64 {
        let t = now_ns - settle_ns;
        let step = self.nanos().max(1_000_000);
        t.div_euclid(step) * step - self.nanos()
    }

    /// The query-parameter type that holds a bound of this cursor exactly, in UTC.
    fn param_type(self) -> String {
        match self {
            Self::Day { wide: false } => "Date".into(),
            Self::Day { wide: true } => "Date32".into(),
            Self::Second => "DateTime('UTC')".into(),
            Self::Ticks(p) => format!("DateTime64({p}, 'UTC')"),
        }
    }

    /// `ns` as a value of [`Self::param_type`]. Positions come from the column's own values (or
    /// from a settle limit on the unit's grid), so nothing is rounded; a finer `ns` is cut to
    /// the unit, which is where the column's values are.
    fn param_value(self, ns: i64) -> String {
        let secs = ns.div_euclid(1_000_000_000);
        let nanos = ns.rem_euclid(1_000_000_000) as u32;
        let Some(t) = chrono::DateTime::from_timestamp(secs, nanos) else { return ns.to_string() };
        match self {
            Self::Day { .. } => t.format("%Y-%m-%d").to_string(),
            Self::Second => t.format("%Y-%m-%d %H:%M:%S").to_string(),
            Self::Ticks(0) => t.format("%Y-%m-%d %H:%M:%S").to_string(),
            Self::Ticks(p) => {
                let frac = format!("{:09}", nanos);
                format!("{}.{}", t.format("%Y-%m-%d %H:%M:%S"), &frac[..p as usize])
            }
        }
    }
}

/// How a window is bounded in SQL: the quoted cursor and tiebreak columns and their types.
#[derive(Debug, Clone)]
pub struct Bounds {
    pub cursor: String,
    pub unit: CursorUnit,
    /// The quoted tiebreak column and its ClickHouse type.
    pub tiebreak: Option<(String, String)>,
}

impl Bounds {
    /// `lo < position <= hi` on (cursor, tiebreak), with its query parameters. Either bound
    /// may be open.
    pub fn predicate(&self, lo: Option<&Position>, hi: Option<&Position>) -> (String, Vec<(String, String)>) {
        let mut params = vec![];
        let sql = self.predicate_with(lo, hi, &mut |name, ty, value| {
            params.push((name.to_string(), value));
            format!("{{{name}:{ty}}}")
        });
        (sql, params)
    }

    /// The same predicate with its bounds written in (`CAST('…' AS T)`), for SQL that is kept
    /// rather than run once: a view's text cannot carry query parameters. The value is the
    /// one a parameter would carry, so both forms select the same rows.
    pub fn literal_predicate(&self, lo: Option<&Position>, hi: Option<&Position>) -> String {
        self.predicate_with(lo, hi, &mut |_, ty, value| format!("CAST('{}' AS {ty})", escaped_to_literal(&value)))
    }

    /// The predicate, each bound written by `bind(name, type, value)`.
    fn predicate_with(
        &self,
        lo: Option<&Position>,
        hi: Option<&Position>,
        bind: &mut dyn FnMut(&str, &str, String) -> String,
    ) -> String {
        let c = &self.cursor;
        let ty = self.unit.param_type();
        let mut terms = vec![];
        if let Some(lo) = lo {
            let at = bind("lo_c", &ty, self.unit.param_value(lo.cursor_ns));
            match (&self.tiebreak, &lo.tiebreak) {
                (Some((tb, tb_type)), Some(t)) => {
                    let t = bind("lo_t", tb_type, t.clone());
                    terms.push(format!("({c} > {at} OR ({c} = {at} AND {tb} > {t}))"));
                }
                _ => terms.push(format!("{c} > {at}")),
            }
        }
        if let Some(hi) = hi {
            let at = bind("hi_c", &ty, self.unit.param_value(hi.cursor_ns));
            match (&self.tiebreak, &hi.tiebreak) {
                (Some((tb, tb_type)), Some(t)) => {
                    let t = bind("hi_t", tb_type, t.clone());
                    terms.push(format!("({c} < {at} OR ({c} = {at} AND {tb} <= {t}))"));
                }
                _ => terms.push(format!("{c} <= {at}")),
            }
        }
        if terms.is_empty() {
            // Rows whose cursor is NULL are never in a window.
            terms.push(format!("{c} IS NOT NULL"));
        }
        terms.join(" AND ")
    }
}

/// A value in ClickHouse's escaped text form (a query parameter's) as the body of a quoted SQL
/// literal that means the same text: the escape sequences are the same in both, so only a bare
/// quote needs one, and a lone trailing backslash becomes a backslash.
pub fn escaped_to_literal(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    let mut chars = value.chars();
    while let Some(ch) = chars.next() {
        match ch {
            '\\' => match chars.next() {
                Some(next) => {
                    out.push('\\');
                    out.push(next);
                }
                None => out.push_str("\\\\"),
            },
            '\'' => out.push_str("\\'"),
            _ => out.push(ch),
        }
    }
    out
}

/// The escaped text of raw bytes (ClickHouse's `Escaped` format, in which query parameters are
/// read): printable ASCII as it is, the backslash doubled, every other byte `\xHH`. Exact for
/// any bytes.
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02X}")),
        }
    }
    out
}

/// The bytes of a hex string (ClickHouse's `hex()` output).
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = NANOS_PER_DAY;

    #[test]
    fn units_follow_the_cursor_type() {
        assert_eq!(CursorUnit::of_type("Date"), Some(CursorUnit::Day { wide: false }));
        assert_eq!(CursorUnit::of_type("Date32"), Some(CursorUnit::Day { wide: true }));
        assert_eq!(CursorUnit::of_type("DateTime('Europe/Berlin')"), Some(CursorUnit::Second));
        assert_eq!(CursorUnit::of_type("DateTime64(3, 'UTC')"), Some(CursorUnit::Ticks(3)));
        assert_eq!(CursorUnit::of_type("DateTime64(9)"), Some(CursorUnit::Ticks(9)));
        assert_eq!(CursorUnit::of_type("String"), None);
    }

    #[test]
    fn a_value_is_settled_only_when_its_whole_unit_has_passed() {
        // 2025-12-01 10:00:00.500 UTC, settle 5 minutes.
        let now: i64 = 1_764_583_200_500_000_000;
        let settle = 300 * 1_000_000_000;
        let day_start = now.div_euclid(DAY) * DAY;
        // Today is not settled until tomorrow + settle: the limit is yesterday.
        assert_eq!(CursorUnit::Day { wide: false }.settled_limit(now, settle), day_start - DAY);
        // Just after midnight + settle, yesterday is.
        let after = day_start + DAY + settle;
        assert_eq!(CursorUnit::Day { wide: false }.settled_limit(after, settle), day_start);
        // A second stands for [s, s + 1): 09:55:00.5 → 09:54:59.
        assert_eq!(CursorUnit::Second.settled_limit(now, settle), now - settle - 500_000_000 - 1_000_000_000);
        // Milliseconds: 09:55:00.500 → 09:55:00.499.
        assert_eq!(CursorUnit::Ticks(3).settled_limit(now, settle), now - settle - 1_000_000);
        // Microseconds: rounded to the millisecond first, then one tick back.
        assert_eq!(CursorUnit::Ticks(6).settled_limit(now + 123_456, settle), now - settle - 1_000);
    }

    #[test]
    fn bounds_are_typed_like_the_column() {
        let b = Bounds {
            cursor: "`ts`".into(),
            unit: CursorUnit::Ticks(6),
            tiebreak: Some(("`seq`".into(), "String".into())),
        };
        let lo = Position { cursor_ns: 1_764_583_200_123_456_000, tiebreak: Some("a\\tb".into()) };
        let (sql, params) = b.predicate(Some(&lo), Some(&Position::at(1_764_583_300_000_000_000)));
        assert_eq!(
            sql,
            "(`ts` > {lo_c:DateTime64(6, 'UTC')} OR (`ts` = {lo_c:DateTime64(6, 'UTC')} AND `seq` > {lo_t:String})) \
             AND `ts` <= {hi_c:DateTime64(6, 'UTC')}"
        );
        assert_eq!(params[0], ("lo_c".into(), "2025-12-01 10:00:00.123456".into()));
        assert_eq!(params[1], ("lo_t".into(), "a\\tb".into()));
        let day = Bounds { cursor: "`d`".into(), unit: CursorUnit::Day { wide: false }, tiebreak: None };
        let (sql, params) = day.predicate(None, Some(&Position::at(1_764_547_200_000_000_000)));
        assert_eq!(sql, "`d` <= {hi_c:Date}");
        assert_eq!(params[0].1, "2025-12-01");
        assert_eq!(day.predicate(None, None).0, "`d` IS NOT NULL");
    }

    #[test]
    fn literal_bounds_select_what_the_parameters_select() {
        let b = Bounds {
            cursor: "`ts`".into(),
            unit: CursorUnit::Ticks(3),
            tiebreak: Some(("`seq`".into(), "String".into())),
        };
        let w = Position { cursor_ns: 1_764_583_200_123_000_000, tiebreak: Some("it's\\x27\\".into()) };
        assert_eq!(
            b.literal_predicate(Some(&w), None),
            "(`ts` > CAST('2025-12-01 10:00:00.123' AS DateTime64(3, 'UTC')) OR (`ts` = \
             CAST('2025-12-01 10:00:00.123' AS DateTime64(3, 'UTC')) AND `seq` > CAST('it\\'s\\x27\\\\' AS String)))"
        );
        assert_eq!(escaped_to_literal("a\\tb"), "a\\tb", "escape sequences mean the same in both");
    }

    #[test]
    fn any_bytes_escape_exactly() {
        assert_eq!(escape_bytes(b"plain-42"), "plain-42");
        assert_eq!(escape_bytes(b"a\tb\nc\\d\0"), "a\\x09b\\x0Ac\\\\d\\x00");
        assert_eq!(escape_bytes(&[0xff, b'\'', b'"']), "\\xFF'\"");
        assert_eq!(unhex("00FF61"), Some(vec![0, 255, 97]));
        assert_eq!(unhex("0"), None);
    }

    #[test]
    fn positions_round_trip() {
        let p = Position { cursor_ns: 1_700_000_000_123_000_000, tiebreak: Some("42".into()) };
        assert_eq!(serde_json::from_str::<Position>(&p.to_json()).unwrap(), p);
        assert_eq!(p.display(), "2023-11-14T22:13:20.123000000Z #42");
        assert_eq!(Position::parse(&p.display()).unwrap(), p);
        assert_eq!(Position::parse("2023-11-14T22:13:20Z").unwrap(), Position::at(1_700_000_000_000_000_000));
        assert!(Position::parse("yesterday").is_err());
    }
}
