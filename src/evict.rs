//! Eviction of hot partitions (`tables[].evict_after`, I13): a ClickHouse partition is dropped
//! only once Iceberg provably holds every row of it, so that the hot tier keeps what is recent
//! and the view serves the rest from Iceberg.
//!
//! A partition goes only when all of these hold, checked in this order:
//! - the table's partition key is a day (or coarser) of the cursor alone, so a partition is a
//!   closed range of cursor values (checked before anything else; refused with the reason);
//! - no commit attempt is pending (I5);
//! - its newest cursor value is older than `evict_after`;
//! - every row of it is at or below `W` and at or below where the view splits, as ClickHouse has
//!   the view now (a NULL cursor is never below);
//! - ClickHouse counts as many rows in it as its parts hold (no row policy hides any);
//! - over the partition's cursor range, the source (as the offload reads it) and the snapshot
//!   the view reads (cast back as the view casts it) hold the same rows: the same count and the
//!   same sum of row hashes over every offloaded column, both computed by ClickHouse. A late row,
//!   a late correction or a row skipped with `watermark set` makes them differ;
//! - the caller holds the table's lease.
//!
//! Eviction needs the view (its snapshot is where the proof reads Iceberg, and where readers
//! find the evicted rows) and every column offloaded (a drop would lose the others).
//!
//! What is dropped is exactly what was proved: the partition's active parts are listed before
//! the proof and dropped by name (`DROP PART`), so a part that arrives meanwhile (a late row)
//! stays, and a part merged meanwhile makes the drop stop (the next run decides again).

use chrono::NaiveDate;

use crate::commit::{Journal, Position, TableView};
use crate::config::TableConfig;
use crate::error::{OffloadError, Result};
use crate::events;
use crate::services::Services;
use crate::sink::table as target;
use crate::source::query::SourceTable;
use crate::tiers::{ColdSide, HybridView};
use crate::util::quote_ident;

const NS_PER_DAY: i64 = 86_400_000_000_000;

/// The functions of a time value whose result is a day or a coarser unit.
const DAY_OR_COARSER: &[&str] = &[
    "toYYYYMMDD",
    "toYYYYMM",
    "toYear",
    "toDate",
    "toDate32",
    "toStartOfDay",
    "toMonday",
    "toStartOfWeek",
    "toStartOfMonth",
    "toStartOfQuarter",
    "toStartOfYear",
];

/// Whether a table partitioned by `key` (`system.tables.partition_key`) can be evicted by
/// partition: the key must be a day (or coarser) of the cursor alone. Otherwise the reason.
pub fn check_partition_key(key: &str, cursor: &str, cursor_is_date: bool) -> std::result::Result<(), String> {
    let compact: String = key.chars().filter(|c| !c.is_whitespace()).collect();
    let inner = compact.strip_prefix('(').and_then(|k| k.strip_suffix(')')).unwrap_or(&compact);
    let bare = |name: &str| name == cursor || name == format!("`{cursor}`");
    let ok = (cursor_is_date && bare(inner))
        || DAY_OR_COARSER.iter().any(|f| {
            inner
                .strip_prefix(f)
                .and_then(|rest| rest.strip_prefix('('))
                .and_then(|rest| rest.strip_suffix(')'))
                .is_some_and(|args| args.split(',').next().is_some_and(bare))
        });
    if ok {
        return Ok(());
    }
    let shown = if key.trim().is_empty() { "none (one partition)".to_string() } else { key.to_string() };
    Err(format!(
        "evict_after needs a partition key that is the day (or a coarser unit) of the cursor {cursor:?} alone, \
         such as toYYYYMMDD({cursor}), toDate({cursor}) or toYYYYMM({cursor}); the table's key is {shown}, so a \
         partition is not a closed range of cursor values and cannot be proved offloaded as a whole"
    ))
}

/// What happens to one partition, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Proved held by Iceberg; dropped (or would be, in a dry run).
    Evict,
    /// Not due yet: its newest row is younger than `evict_after`.
    NotDue,
    /// Due, but something stops the drop: the reason.
    Blocked(String),
}

/// One partition of the hot table.
#[derive(Debug, Clone)]
pub struct PartitionPlan {
    pub partition_id: String,
    pub rows: u64,
    /// Its newest cursor value (ns).
    pub newest_ns: i64,
    pub days: Vec<NaiveDate>,
    /// Iceberg's rows over those days, when they were counted.
    pub iceberg_rows: Option<u64>,
    pub verdict: Verdict,
    /// The active parts listed before the proof: what a drop removes.
    pub parts: Vec<String>,
    /// Whether the drop was done.
    pub dropped: bool,
}

/// An eviction run over one table.
#[derive(Debug, Clone, Default)]
pub struct EvictReport {
    pub table: String,
    pub partitions: Vec<PartitionPlan>,
}

/// Evicts (or, in a dry run, lists) `cfg`'s partitions. The caller holds the table's lease.
pub async fn evict(svc: &Services, cfg: &TableConfig, now_ns: i64, dry_run: bool) -> Result<EvictReport> {
    let Some(after) = cfg.evict_after else {
        return Err(refused(cfg, "evict_after is not set for this table".into()));
    };
    let source = SourceTable::describe(&svc.ch, cfg).await?;
    let key = partition_key(&svc.ch, cfg).await?;
    check_partition_key(&key, &cfg.cursor, source.unit().nanos() >= NS_PER_DAY).map_err(|m| refused(cfg, m))?;
    let mut report = EvictReport { table: cfg.name().to_string(), partitions: vec![] };
    let due_before = now_ns - after.as_nanos() as i64;
    let partitions = partitions(svc, &source).await?;
    let table = TableView::load(&svc.catalog, &target::ident(cfg)).await?;
    let blocked_all = Guards::read(svc, &source, &table).await?;
    for (partition_id, rows, newest_ns) in partitions {
        let mut plan = PartitionPlan {
            partition_id,
            rows,
            newest_ns,
            days: vec![],
            iceberg_rows: None,
            verdict: Verdict::NotDue,
            parts: vec![],
            dropped: false,
        };
        if newest_ns < due_before {
            plan.verdict = match &blocked_all {
                Err(why) => Verdict::Blocked(why.clone()),
                Ok(guards) => guards.prove(svc, &source, &mut plan).await?,
            };
            if plan.verdict == Verdict::Evict && !dry_run {
                drop_parts(svc, &source, &mut plan).await?;
            }
        }
        report.partitions.push(plan);
    }
    if !dry_run {
        report.emit(svc, after, now_ns);
    }
    Ok(report)
}

/// Runs a due eviction of `cfg`'s table (hourly, `tables[].evict_after` set); its failure is
/// logged, never the table's. The caller holds the table's lease.
pub async fn run_if_due(svc: &Services, cfg: &TableConfig) {
    if cfg.evict_after.is_none() || !svc.evictions.due(cfg.name()) {
        return;
    }
    let now_ns = crate::util::now_epoch_ns();
    if let Err(error) = evict(svc, cfg, now_ns, false).await {
        events::EvictionFailed { table: cfg.name(), error: &error }.emit(&svc.metrics);
    }
}

impl EvictReport {
    /// The partitions due that stay, with how long each has been due.
    fn emit(&self, svc: &Services, after: std::time::Duration, now_ns: i64) {
        let blocked: Vec<(&str, &str, f64)> = self
            .partitions
            .iter()
            .filter_map(|p| match &p.verdict {
                Verdict::Blocked(why) => {
                    let due_ns = p.newest_ns + after.as_nanos() as i64;
                    Some((p.partition_id.as_str(), why.as_str(), (now_ns - due_ns).max(0) as f64 / 1e9))
                }
                _ => None,
            })
            .collect();
        events::EvictionChecked { table: &self.table, blocked: &blocked }.emit(&svc.metrics);
    }
}

fn refused(cfg: &TableConfig, message: String) -> OffloadError {
    OffloadError::Schema { table: cfg.source(), message }
}

pub async fn partition_key(ch: &crate::source::ClickHouse, cfg: &TableConfig) -> Result<String> {
    let rows = ch
        .query_rows(
            "SELECT partition_key FROM system.tables WHERE database = {db:String} AND name = {tbl:String}",
            &[("db".into(), cfg.source_db.clone()), ("tbl".into(), cfg.source_table.clone())],
        )
        .await?;
    Ok(rows.first().and_then(|r| r.first()).cloned().unwrap_or_default())
}

/// The table's partitions: id, rows, newest cursor value (ns). Answered from the parts'
/// min-max indexes, without reading the rows.
async fn partitions(svc: &Services, source: &SourceTable) -> Result<Vec<(String, u64, i64)>> {
    let c = quote_ident(&source.table.cursor);
    let sql = format!(
        "SELECT _partition_id, count(), ifNull(toUnixTimestamp64Nano(toDateTime64(max({c}), 9, 'UTC')), 0) \
         FROM {}.{} GROUP BY _partition_id ORDER BY _partition_id",
        quote_ident(&source.table.source_db),
        quote_ident(&source.table.source_table)
    );
    svc.ch
        .query_rows(&sql, &[])
        .await?
        .into_iter()
        .map(|r| match (r.first(), r.get(1).and_then(|n| n.parse().ok()), r.get(2).and_then(|n| n.parse().ok())) {
            (Some(id), Some(rows), Some(newest)) => Ok((id.clone(), rows, newest)),
            _ => Err(OffloadError::ClickHouseStream(format!("unexpected partition row {r:?}"))),
        })
        .collect()
}

/// What every partition's proof is measured against: `W`, the view's split `S` and the
/// snapshot the view reads (where the proof reads Iceberg).
struct Guards<'a> {
    w: Position,
    split: Position,
    view: HybridView<'a>,
    cold: ColdSide,
}

impl<'a> Guards<'a> {
    /// The table-wide conditions: something offloaded, nothing pending, the view serving
    /// Iceberg rows. `Err` holds why no partition can go now.
    async fn read(
        svc: &Services,
        source: &'a SourceTable,
        table: &TableView,
    ) -> Result<std::result::Result<Guards<'a>, String>> {
        let Some(w) = table.watermark.clone() else { return Ok(Err("nothing is offloaded yet".into())) };
        let journal = Journal::load(&table.table, svc.limits.storage).await?;
        if !journal.entries().is_empty() {
            return Ok(Err(format!("{} commit attempts are pending (I5)", journal.entries().len())));
        }
        let Some(view) = HybridView::of(&source.table, source) else {
            return Ok(Err("the table has no view (evict_after needs one)".into()));
        };
        let pinned = crate::tiers::read_pinned(&svc.ch, view.name).await?;
        let Some((snapshot_id, split)) = pinned.as_ref().and_then(|p| Some((p.snapshot_id?, p.split()?.clone())))
        else {
            return Ok(Err(format!("the view {} serves no Iceberg rows yet", view.name)));
        };
        // The pinned snapshot, read where the view splits: what the view serves below the split.
        let mut cold = ColdSide::at(&table.table, snapshot_id, &split, source, &svc.views)
            .map_err(|m| refused(&source.table, m))?;
        cold.split = split.clone();
        Ok(Ok(Guards { w, split, view, cold }))
    }

    /// The proof for one due partition: every row of it at or below `W` and `S`, ClickHouse's
    /// count of it equal to its parts' (no row hidden from this user), and the same rows in
    /// Iceberg over its cursor range: the same count and the same sum of row hashes, computed
    /// by ClickHouse over the source (as the offload reads it) and over the snapshot the view
    /// reads (cast back as the view casts it).
    async fn prove(&self, svc: &Services, source: &SourceTable, plan: &mut PartitionPlan) -> Result<Verdict> {
        let parts = active_parts(svc, source, &plan.partition_id).await?;
        let in_parts: u64 = parts.iter().map(|(_, rows)| rows).sum();
        let (rows, oldest_ns, above) = self.partition_rows(svc, source, &plan.partition_id).await?;
        if above > 0 {
            return Ok(Verdict::Blocked(format!(
                "{above} of its {rows} rows are above W or above where the view splits (not offloaded yet, or served hot)"
            )));
        }
        if rows != in_parts {
            return Ok(Verdict::Blocked(format!(
                "ClickHouse shows {rows} of the {in_parts} rows its parts hold (a row policy, deleted rows?): \
                 a drop would remove rows no proof has seen"
            )));
        }
        plan.days = days_between(oldest_ns, plan.newest_ns);
        let range = (oldest_ns, plan.newest_ns);
        let hot = content(svc, &source.from(), source, range).await?;
        let cold = content(svc, &self.view.cold_select(&self.cold), source, range).await?;
        plan.iceberg_rows = Some(cold.0);
        if hot != cold {
            return Ok(Verdict::Blocked(format!(
                "Iceberg does not hold the same rows over its cursor range: {} rows in ClickHouse, {} in Iceberg{}",
                hot.0,
                cold.0,
                if hot.0 == cold.0 { " (same count, different content: a late correction?)" } else { "" }
            )));
        }
        plan.rows = rows;
        plan.parts = parts.into_iter().map(|(name, _)| name).collect();
        Ok(Verdict::Evict)
    }

    /// The partition's rows (as stored), its oldest cursor value, and its rows not provably
    /// at or below both `W` and `S` (a NULL cursor counts there).
    async fn partition_rows(
        &self,
        svc: &Services,
        source: &SourceTable,
        partition_id: &str,
    ) -> Result<(u64, i64, u64)> {
        let bounds = source.bounds();
        let c = &bounds.cursor;
        let below = [&self.w, &self.split]
            .iter()
            .map(|w| format!("ifNull({}, 0)", bounds.literal_predicate(None, Some(w))))
            .collect::<Vec<_>>()
            .join(" AND ");
        let sql = format!(
            "SELECT count(), ifNull(toUnixTimestamp64Nano(toDateTime64(min({c}), 9, 'UTC')), 0), countIf(NOT ({below})) \
             FROM {}.{} WHERE _partition_id = {{p:String}}",
            quote_ident(&source.table.source_db),
            quote_ident(&source.table.source_table)
        );
        let rows = svc.ch.query_rows(&sql, &[("p".into(), partition_id.to_string())]).await?;
        let r = rows.first().cloned().unwrap_or_default();
        let n = |i: usize| r.get(i).and_then(|v| v.parse::<i64>().ok());
        match (n(0), n(1), n(2)) {
            (Some(rows), Some(oldest), Some(above)) => Ok((rows as u64, oldest, above as u64)),
            _ => Err(OffloadError::ClickHouseStream(format!("unexpected partition answer {r:?}"))),
        }
    }
}

/// The rows of `from` whose cursor lies in `range` (ns, inclusive): their count and the sum of
/// their hashes over every offloaded column (of a tuple: `cityHash64` of a NULL argument is
/// NULL, and `sum` would skip the row).
async fn content(svc: &Services, from: &str, source: &SourceTable, range: (i64, i64)) -> Result<(u64, String)> {
    let c = quote_ident(&source.table.cursor);
    let columns: Vec<String> = source.columns.iter().map(|col| quote_ident(&col.name)).collect();
    let sql = format!(
        "SELECT count(), toString(sum(cityHash64(tuple({})))) FROM {from} WHERE {c} >= fromUnixTimestamp64Nano({{lo:Int64}}, 'UTC') \
         AND {c} <= fromUnixTimestamp64Nano({{hi:Int64}}, 'UTC')",
        columns.join(", ")
    );
    let params = [("lo".to_string(), range.0.to_string()), ("hi".to_string(), range.1.to_string())];
    let rows = svc.ch.query_rows(&sql, &params).await?;
    match rows.first().map(|r| (r.first().and_then(|n| n.parse().ok()), r.get(1).cloned())) {
        Some((Some(n), Some(sum))) => Ok((n, sum)),
        _ => Err(OffloadError::ClickHouseStream(format!("unexpected content answer {rows:?}"))),
    }
}

/// The partition's active parts and their rows.
async fn active_parts(svc: &Services, source: &SourceTable, partition_id: &str) -> Result<Vec<(String, u64)>> {
    let rows = svc
        .ch
        .query_rows(
            "SELECT name, rows FROM system.parts WHERE database = {db:String} AND table = {tbl:String} \
             AND partition_id = {p:String} AND active ORDER BY name",
            &[
                ("db".into(), source.table.source_db.clone()),
                ("tbl".into(), source.table.source_table.clone()),
                ("p".into(), partition_id.to_string()),
            ],
        )
        .await?;
    Ok(rows.into_iter().filter_map(|r| Some((r.first()?.clone(), r.get(1)?.parse().ok()?))).collect())
}

/// Drops the parts listed before the proof, by name, in one statement.
async fn drop_parts(svc: &Services, source: &SourceTable, plan: &mut PartitionPlan) -> Result<()> {
    let table = format!("{}.{}", quote_ident(&source.table.source_db), quote_ident(&source.table.source_table));
    let drops: Vec<String> = plan
        .parts
        .iter()
        .map(|part| format!("DROP PART '{}'", part.replace('\\', "\\\\").replace('\'', "\\'")))
        .collect();
    if let Err(e) = svc.ch.query_text(&format!("ALTER TABLE {table} {}", drops.join(", ")), &[]).await {
        // ClickHouse runs the commands one after the other: say which parts went (each was proved).
        let left: Vec<String> =
            active_parts(svc, source, &plan.partition_id).await?.into_iter().map(|(name, _)| name).collect();
        let gone = plan.parts.iter().filter(|p| !left.contains(p)).count();
        plan.verdict = Verdict::Blocked(format!(
            "its parts changed since the proof (a merge?): {gone} of its {} proved parts dropped, the others \
             kept; the next look decides again: {e}",
            plan.parts.len()
        ));
        return Ok(());
    }
    plan.dropped = true;
    events::PartitionEvicted {
        table: source.table.name(),
        partition_id: &plan.partition_id,
        hot_rows: plan.rows,
        iceberg_rows: plan.iceberg_rows.unwrap_or(0),
        days: &plan.days,
    }
    .emit(&svc.metrics);
    Ok(())
}

fn days_between(first_ns: i64, last_ns: i64) -> Vec<NaiveDate> {
    let (first, last) = (first_ns.div_euclid(NS_PER_DAY), last_ns.div_euclid(NS_PER_DAY));
    (first..=last).map(|d| date_of_day(d as i32)).collect()
}

fn date_of_day(d: i32) -> NaiveDate {
    NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid") + chrono::TimeDelta::days(d.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_keys_of_a_day_or_coarser_of_the_cursor_alone() {
        for key in ["toYYYYMMDD(ts)", "toYYYYMM(ts)", "toDate(ts)", "(toStartOfWeek(ts, 1))", "toMonday(`ts`)"] {
            assert_eq!(check_partition_key(key, "ts", false), Ok(()), "{key}");
        }
        assert_eq!(check_partition_key("d", "d", true), Ok(()));
        for key in
            ["", "toYYYYMMDD(event_time)", "(toYYYYMMDD(ts), symbol)", "toStartOfHour(ts)", "ts", "intDiv(seq, 1000)"]
        {
            let err = check_partition_key(key, "ts", false).unwrap_err();
            assert!(err.contains("toYYYYMMDD(ts)"), "{key}: {err}");
        }
    }

    #[test]
    fn a_partition_covers_the_utc_days_of_its_rows() {
        let d = |s: &str| NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
        let at = |s: &str| chrono::DateTime::parse_from_rfc3339(s).unwrap().timestamp_nanos_opt().unwrap();
        assert_eq!(days_between(at("2026-12-01T00:00:00Z"), at("2026-12-01T23:59:59Z")), vec![d("2026-12-01")]);
        // A partition by the server's day in UTC+1 spans two UTC days.
        assert_eq!(
            days_between(at("2026-11-30T23:00:00Z"), at("2026-12-01T22:59:59Z")),
            vec![d("2026-11-30"), d("2026-12-01")]
        );
    }
}
