//! The audit (I9, and the original's daily `maintenance_audit_log`): per UTC day of the cursor,
//! the rows the source holds at or below `W` against the rows in Iceberg.
//!
//! - `missing`: the source has rows Iceberg lacks: late rows (they arrived below `W` after
//!   their window committed), or rows moved over by something other than `watermark set`;
//! - `extra`: Iceberg has rows the source lacks: duplicates (another writer), or source rows
//!   deleted after they were offloaded (a mutation, a TTL on another column than the cursor);
//! - `ok`: equal counts.
//!
//! Only days the source's TTL still holds in full are audited: from the day after
//! `now − TTL interval` plus one day of margin. A table without a TTL is audited whole. Ranges
//! an operator moved `W` over (`watermark set`) are left out of the source's count. The last
//! `service.audit_recent_days` days up to `W` are audited every cycle; every retained day once
//! per `service.audit_full_every` (and at the first cycle of a process).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::NaiveDate;

use crate::commit::{Position, TableView, recorded_moves};
use crate::error::Result;
use crate::sink::days::{Day, DayCounters};
use crate::source::ClickHouse;
use crate::source::query::SourceTable;

pub use crate::report::{AuditStatus, AuditTotals, DayAudit, Scope};

/// What the audits of one process know, per table: when the last full audit ran, and the
/// latest verdict of every retained day (the metrics are their sums).
#[derive(Debug, Default)]
pub struct Audits {
    pub counters: DayCounters,
    tables: Mutex<HashMap<String, TableAudits>>,
}

#[derive(Debug, Default)]
struct TableAudits {
    last_full: Option<Instant>,
    days: BTreeMap<NaiveDate, DayAudit>,
}

impl Audits {
    /// The audit due for `table` this cycle, if any. A full audit counts as done once begun:
    /// one that fails or runs out of time is not retried before `full_every` (recent audits go
    /// on meanwhile), so a slow full audit cannot take every cycle's time.
    pub fn due(&self, table: &str, recent_days: u32, full_every: Duration) -> Option<Scope> {
        let mut tables = self.tables.lock().expect("not poisoned");
        let t = tables.entry(table.to_string()).or_default();
        if !full_every.is_zero() && t.last_full.is_none_or(|at| at.elapsed() >= full_every) {
            t.last_full = Some(Instant::now());
            Some(Scope::Full)
        } else if recent_days > 0 {
            Some(Scope::Recent)
        } else {
            None
        }
    }

    /// Whether this process knows when `table`'s last full audit ran.
    pub fn knows(&self, table: &str) -> bool {
        self.tables.lock().expect("not poisoned").get(table).is_some_and(|t| t.last_full.is_some())
    }

    /// What the state store remembers: the last full audit ended `age` ago.
    pub fn remember_full(&self, table: &str, age: Duration) {
        let mut tables = self.tables.lock().expect("not poisoned");
        let t = tables.entry(table.to_string()).or_default();
        // An age beyond what `Instant` can hold is "long ago": due.
        t.last_full = Instant::now().checked_sub(age);
    }

    /// Keeps an audit's verdicts (a full audit replaces them all) and drops days before
    /// `first` (out of the source's retention now); returns the sums over the days held.
    pub fn record(&self, table: &str, scope: Scope, first: Option<NaiveDate>, results: &[DayAudit]) -> AuditTotals {
        let mut tables = self.tables.lock().expect("not poisoned");
        let t = tables.entry(table.to_string()).or_default();
        if scope == Scope::Full {
            t.days.clear();
        }
        for r in results {
            t.days.insert(r.day, r.clone());
        }
        if let Some(first) = first {
            t.days.retain(|d, _| *d >= first);
        }
        let mut totals = AuditTotals::default();
        for r in t.days.values() {
            let status = r.status();
            totals.days[AuditStatus::ALL.iter().position(|s| *s == status).expect("listed")] += 1;
            totals.missing_rows += r.source_rows.saturating_sub(r.iceberg_rows);
            totals.extra_rows += r.iceberg_rows.saturating_sub(r.source_rows);
        }
        totals
    }
}

/// The days an audit of a table whose watermark is `w` covers, when ClickHouse's clock says
/// `now_ns`: `(first, last)`, `first` `None` for "from the beginning".
pub fn days_to_audit(
    w: &Position,
    now_ns: i64,
    retention: Option<Duration>,
    scope: Scope,
    recent_days: u32,
) -> (Option<NaiveDate>, NaiveDate) {
    let last = date_of_ns(w.cursor_ns);
    // The day that holds `now − retention` may have lost rows; the next one is kept whole
    // when the TTL is on the cursor, and one more day is a margin for a TTL on another
    // column that runs a little earlier (event time under an arrival-time cursor).
    let retained = retention.map(|r| date_of_ns(now_ns.saturating_sub(r.as_nanos() as i64)) + chrono::Days::new(2));
    let recent = last.checked_sub_days(chrono::Days::new(recent_days.saturating_sub(1).into()));
    let first = match scope {
        Scope::Full => retained,
        Scope::Recent => retained.max(recent),
    };
    (first, last)
}

/// The days to audit now, `(first, last)`, and the first day the verdicts kept may cover
/// (`retained`): [`days_to_audit`], and never the source's oldest day or before when rows were
/// deleted there: the source deletes in ways its TTL does not show ([`SourceTable::deletes_unseen`]),
/// or Iceberg holds days the source no longer has (deleted by hand, `DROP PARTITION`). The
/// oldest day may be partly deleted; older ones are gone.
/// One table as the audit sees it.
pub struct Subject<'a> {
    pub audits: &'a Audits,
    pub name: &'a str,
    pub source: &'a SourceTable,
    pub ch: &'a ClickHouse,
    pub view: &'a TableView,
}

impl Subject<'_> {
    pub async fn plan(
        &self,
        now_ns: i64,
        scope: Scope,
        recent_days: u32,
    ) -> Result<(Option<NaiveDate>, NaiveDate, Option<NaiveDate>)> {
        plan(self.audits, self.name, self.source, self.ch, self.view, (now_ns, scope, recent_days)).await
    }

    pub async fn audit(&self, first: Option<NaiveDate>, last: NaiveDate) -> Result<Vec<DayAudit>> {
        audit_days(self.audits, self.name, self.source, self.ch, self.view, first, last).await
    }
}

async fn plan(
    audits: &Audits,
    table_name: &str,
    source: &SourceTable,
    ch: &ClickHouse,
    view: &TableView,
    (now_ns, scope, recent_days): (i64, Scope, u32),
) -> Result<(Option<NaiveDate>, NaiveDate, Option<NaiveDate>)> {
    let Some(w) = &view.watermark else { return Ok((None, date_of_ns(0), None)) };
    let retention = source.retention();
    let (first, last) = days_to_audit(w, now_ns, retention, scope, recent_days);
    let (retained, _) = days_to_audit(w, now_ns, retention, Scope::Full, 0);
    let floor = match source.first_day(ch).await? {
        None => None,
        Some(oldest) => {
            let counter = audits.counters.of(table_name);
            let before = day_number(oldest) - 1;
            let lost = !counter.count(&view.table, &source.table.cursor, None, before).await?.is_empty();
            (lost || source.deletes_unseen()).then(|| oldest + chrono::Days::new(1))
        }
    };
    Ok((first.max(floor), last, retained.max(floor)))
}

/// Audits the given days of a table: the source's count per day against Iceberg's.
async fn audit_days(
    audits: &Audits,
    table_name: &str,
    source: &SourceTable,
    ch: &ClickHouse,
    view: &TableView,
    first: Option<NaiveDate>,
    last: NaiveDate,
) -> Result<Vec<DayAudit>> {
    let Some(w) = &view.watermark else { return Ok(vec![]) };
    if first.is_some_and(|f| f > last) {
        return Ok(vec![]);
    }
    let skipped = moved_over(view, &source.measure());
    let in_source = source.rows_per_day(ch, w, first, last, &skipped).await?;
    let counter = audits.counters.of(table_name);
    let in_iceberg = counter.count(&view.table, &source.table.cursor, first.map(day_number), day_number(last)).await?;
    let mut days: BTreeMap<NaiveDate, DayAudit> = BTreeMap::new();
    for (day, n) in in_source {
        days.entry(day).or_insert(DayAudit { day, source_rows: 0, iceberg_rows: 0 }).source_rows = n;
    }
    for (day, n) in in_iceberg {
        let day = date_of_day(day);
        days.entry(day).or_insert(DayAudit { day, source_rows: 0, iceberg_rows: 0 }).iceberg_rows = n;
    }
    Ok(days.into_values().collect())
}

/// The ranges `(lo, hi]` an operator moved `W` over (`watermark set --apply`): their rows were
/// skipped on purpose and are not missing. A backward move gives an empty range; moves made for
/// another measure than the current one do not apply. A move that re-recorded `W` for a new
/// measure (I11) keeps `lo`'s cursor only: its tiebreak belongs to the old measure and may not
/// even parse as the current one (the rows at that one cursor value count as missing).
fn moved_over(view: &TableView, current: &crate::window::Measure) -> Vec<(Option<Position>, Position)> {
    recorded_moves(view.table.metadata())
        .into_iter()
        .filter(|m| m.measure == *current)
        .map(|m| {
            let same = m.lo_measure.as_ref() == Some(current);
            (m.lo.map(|lo| if same { lo } else { Position::at(lo.cursor_ns) }), m.hi)
        })
        .collect()
}

fn date_of_ns(ns: i64) -> NaiveDate {
    chrono::DateTime::from_timestamp_nanos(ns).date_naive()
}

fn day_number(d: NaiveDate) -> Day {
    (d - NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid")).num_days() as Day
}

fn date_of_day(d: Day) -> NaiveDate {
    NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid") + chrono::TimeDelta::days(d.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(date: &str) -> i64 {
        NaiveDate::parse_from_str(date, "%Y-%m-%d")
            .unwrap()
            .and_hms_opt(12, 0, 0)
            .unwrap()
            .and_utc()
            .timestamp_nanos_opt()
            .unwrap()
    }
    fn d(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

    #[test]
    fn the_days_audited_stay_inside_the_retention() {
        let w = Position::at(at("2026-12-01"));
        let week = Some(Duration::from_secs(7 * 86_400));
        // now − 7 days = 2026-11-24 12:00: that day is partly gone; the 25th is the margin.
        assert_eq!(days_to_audit(&w, at("2026-12-01"), week, Scope::Full, 2), (Some(d("2026-11-26")), d("2026-12-01")));
        assert_eq!(
            days_to_audit(&w, at("2026-12-01"), week, Scope::Recent, 2),
            (Some(d("2026-11-30")), d("2026-12-01"))
        );
        assert_eq!(days_to_audit(&w, at("2026-12-01"), None, Scope::Full, 2), (None, d("2026-12-01")));
        // W far behind: the recent days are out of the retention; nothing before it.
        let old = Position::at(at("2026-11-01"));
        let (first, last) = days_to_audit(&old, at("2026-12-01"), week, Scope::Recent, 2);
        assert!(first.unwrap() > last);
    }

    #[test]
    fn verdicts_are_kept_per_day_and_summed_without_clamping() {
        let audits = Audits::default();
        let day = |s: &str, src, ice| DayAudit { day: d(s), source_rows: src, iceberg_rows: ice };
        assert_eq!(audits.due("t", 2, Duration::from_secs(86_400)), Some(Scope::Full));
        let totals = audits.record(
            "t",
            Scope::Full,
            None,
            &[day("2026-11-29", 10, 10), day("2026-11-30", 12, 10), day("2026-12-01", 5, 8)],
        );
        assert_eq!(totals, AuditTotals { days: [1, 1, 1], missing_rows: 2, extra_rows: 3 });
        assert_eq!(audits.due("t", 2, Duration::from_secs(86_400)), Some(Scope::Recent));
        assert_eq!(audits.due("t", 0, Duration::ZERO), None);
        // A recent audit updates its days; a day out of the retention is dropped.
        let totals = audits.record("t", Scope::Recent, Some(d("2026-11-30")), &[day("2026-12-01", 8, 8)]);
        assert_eq!(totals, AuditTotals { days: [1, 1, 0], missing_rows: 2, extra_rows: 0 });
    }
}
