//! Removing rows a table holds more often than the source (`iceberg-offload repair`): the
//! windows the original pipeline appended twice after a crash.
//!
//! The audit (I9) names the UTC days with more rows in Iceberg than in ClickHouse. The data
//! files holding rows of those days are read, and each distinct row (over the source's
//! columns, hashed to 128 bits) counted; the source's rows over the same cursor range, at or
//! below `W`, are counted the same way. A row the table holds more often than the source is
//! kept as often as the source holds it; a row the source does not hold is left alone. The
//! files are written again without the surplus in one `replace` snapshot through compaction's
//! commit path, fenced like every commit (I4) and journaled (I5); the rows read, removed and
//! written must add up, or nothing is committed.
//!
//! Only files whose rows all lie in days the source still holds (the audit's range) are
//! touched: elsewhere the source cannot say how many copies are right. Memory: one hash and
//! two counts per row of the files rewritten (about 40 bytes a row).

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::BuildHasher;

use arrow_array::{BooleanArray, RecordBatch};
use arrow_row::{RowConverter, SortField};
use arrow_schema::SchemaRef;
use chrono::NaiveDate;
use futures::{StreamExt, TryStreamExt};
use iceberg::arrow::{ArrowReaderBuilder, schema_to_arrow_schema};
use iceberg::spec::{ManifestContentType, ManifestList};
use iceberg::table::Table;

use crate::audit::{self, Audits, DayAudit, Scope};
use crate::commit::{Position, TableView};
use crate::config::TableConfig;
use crate::error::{OffloadError, Result};
use crate::services::Services;
use crate::sink::writer::conform;
use crate::source::ClickHouse;
use crate::source::query::SourceTable;

/// What a compaction run needs to be a repair: the files, and how many copies of which rows
/// to keep.
pub struct Repair {
    pub files: HashSet<String>,
    pub keep: KeepCopies,
}

/// Rows (by hash) the table holds too often, and how many copies of each to keep.
pub struct KeepCopies {
    hashers: (RandomState, RandomState),
    schema: SchemaRef,
    /// The columns compared: the source's (a column only the table has, filled by another
    /// writer, says nothing about whether two rows are copies of one source row).
    columns: Vec<usize>,
    table: String,
    keep: HashMap<u128, u64>,
    /// Rows to remove in all.
    pub surplus: u64,
}

impl KeepCopies {
    fn new(table: &Table, source_columns: &[String]) -> Result<Self> {
        let schema = std::sync::Arc::new(schema_to_arrow_schema(table.metadata().current_schema())?);
        let columns = source_columns.iter().filter_map(|c| schema.index_of(c).ok()).collect();
        Ok(Self {
            hashers: (RandomState::new(), RandomState::new()),
            schema,
            columns,
            table: table.identifier().to_string(),
            keep: HashMap::new(),
            surplus: 0,
        })
    }

    /// Keeps each row `in_table` holds more often than the source as often as the source
    /// holds it, counting the surplus; returns the rows not in the source at all.
    fn keep_as_in_source(&mut self, in_table: HashMap<u128, u64>, in_source: &BTreeMap<u128, u64>) -> u64 {
        let mut unmatched = 0;
        for (h, n) in in_table {
            // A row the source does not hold (any more, or never in this form) is left as it is:
            // nothing says how many copies are right.
            let Some(&right) = in_source.get(&h) else {
                unmatched += n;
                continue;
            };
            if n > right {
                self.keep.insert(h, right);
                self.surplus += n - right;
            }
        }
        unmatched
    }

    /// One 128-bit hash per row of `batch` (cast to the table's schema first), over every column.
    fn hashes(&self, batch: &RecordBatch) -> Result<Vec<u128>> {
        let batch = conform(&self.schema, &self.table, batch)?
            .project(&self.columns)
            .map_err(|e| OffloadError::Crash(format!("repair: {e}")))?;
        let fields = batch.schema().fields().iter().map(|f| SortField::new(f.data_type().clone())).collect();
        let converter = RowConverter::new(fields).map_err(|e| OffloadError::Crash(format!("repair: {e}")))?;
        let rows =
            converter.convert_columns(batch.columns()).map_err(|e| OffloadError::Crash(format!("repair: {e}")))?;
        Ok(rows
            .iter()
            .map(|r| {
                let bytes = r.as_ref();
                ((self.hashers.0.hash_one(bytes) as u128) << 64) | self.hashers.1.hash_one(bytes) as u128
            })
            .collect())
    }

    /// `batch` without the copies beyond what is kept (`emitted` counts what passed so far);
    /// returns the rows removed.
    pub fn filter(&self, batch: &RecordBatch, emitted: &mut HashMap<u128, u64>) -> Result<(RecordBatch, u64)> {
        let mut removed = 0;
        let mask: BooleanArray = self
            .hashes(batch)?
            .into_iter()
            .map(|h| match self.keep.get(&h) {
                None => Some(true),
                Some(&keep) => {
                    let n = emitted.entry(h).or_insert(0);
                    *n += 1;
                    let pass = *n <= keep;
                    removed += u64::from(!pass);
                    Some(pass)
                }
            })
            .collect();
        let kept = arrow_select::filter::filter_record_batch(batch, &mask)
            .map_err(|e| OffloadError::Crash(format!("repair: {e}")))?;
        Ok((kept, removed))
    }
}

/// What `repair` found and did.
#[derive(Debug, Default)]
pub struct RepairReport {
    /// Days whose Iceberg rows exceed the source's.
    pub days: Vec<DayAudit>,
    pub files: usize,
    /// Rows that are copies beyond the source's count.
    pub surplus: u64,
    /// Days left alone, and why.
    pub left: Vec<String>,
    pub committed: bool,
}

/// A live data file with its cursor range (ns).
struct FileRange {
    path: String,
    lo: i64,
    hi: i64,
}

/// Finds the surplus and, unless `dry_run`, removes it. The caller holds the table's lease.
pub async fn repair(svc: &Services, cfg: &TableConfig, dry_run: bool) -> Result<RepairReport> {
    let ident = crate::sink::table::ident(cfg);
    let view = TableView::load(&svc.catalog, &ident).await?;
    let Some(w) = view.watermark.clone() else {
        return Err(OffloadError::Schema {
            table: cfg.source(),
            message: "the table has no watermark: nothing to repair against".into(),
        });
    };
    let source = SourceTable::describe(&svc.ch, cfg).await?;
    let (days, audited) = days_in_surplus(svc, cfg, &source, &view).await?;
    let mut report = RepairReport { days, ..Default::default() };
    if report.days.is_empty() {
        return Ok(report);
    }
    let table = &view.table;
    let files = files_to_rewrite(table, cfg, &report.days, audited, &mut report.left).await?;
    let Some(range) = files.iter().map(|f| (f.lo, f.hi)).reduce(|a, b| (a.0.min(b.0), a.1.max(b.1))) else {
        return Ok(report);
    };
    // Manifest bounds are microseconds: a nanosecond cursor's last row may lie up to 999 ns later.
    let range = (range.0, range.1.saturating_add(999));
    let projection = source.projection()?;
    let names: Vec<String> = projection.iter().map(|(name, ..)| name.clone()).collect();
    let mut keep = KeepCopies::new(table, &names)?;
    let paths: HashSet<String> = files.iter().map(|f| f.path.clone()).collect();
    let mut in_table = count_table_rows(table, &paths, &keep).await?;
    in_table.retain(|_, n| *n > 1);
    let in_source = count_source_rows(&svc.ch, &source, &projection, &w, range, &keep, &in_table).await?;
    let unmatched = keep.keep_as_in_source(in_table, &in_source);
    if unmatched > 0 {
        report.left.push(format!("{unmatched} rows held more than once are not in the source: left as they are"));
    }
    report.surplus = keep.surplus;
    report.files = paths.len();
    if dry_run || keep.surplus == 0 {
        return Ok(report);
    }
    rewrite_without_surplus(svc, cfg, Repair { files: paths, keep }).await?;
    report.committed = true;
    Ok(report)
}

/// The days a full audit (I9) finds with more rows in Iceberg than in the source, and the
/// range it audited (ns, from the first day's start to the end of the last).
async fn days_in_surplus(
    svc: &Services,
    cfg: &TableConfig,
    source: &SourceTable,
    view: &TableView,
) -> Result<(Vec<DayAudit>, (i64, i64))> {
    let now_ns = crate::util::now_epoch_ns() + svc.ch.clock_offset_ns().await?.1;
    let audits = Audits::default();
    let subject = audit::Subject { audits: &audits, name: cfg.name(), source, ch: &svc.ch, view };
    let (first, last, _) = subject.plan(now_ns, Scope::Full, 0).await?;
    let days = subject.audit(first, last).await?.into_iter().filter(|d| d.iceberg_rows > d.source_rows).collect();
    let audited = (day_start(first.unwrap_or(NaiveDate::MIN)), day_start(last.succ_opt().unwrap_or(last)));
    Ok((days, audited))
}

/// The live files holding rows of the surplus `days` whose rows all lie in the `audited`
/// range; the files left out, and why, are added to `left`.
async fn files_to_rewrite(
    table: &Table,
    cfg: &TableConfig,
    days: &[DayAudit],
    audited: (i64, i64),
    left: &mut Vec<String>,
) -> Result<Vec<FileRange>> {
    let extra: Vec<(i64, i64)> =
        days.iter().map(|d| (day_start(d.day), day_start(d.day.succ_opt().unwrap_or(d.day)))).collect();
    let mut files = vec![];
    let (live, unbounded) = live_files(table, cfg).await?;
    if unbounded > 0 {
        left.push(format!(
            "{unbounded} data files have no bounds of {} in their manifest entry: not examined",
            cfg.cursor
        ));
    }
    for f in live {
        if !extra.iter().any(|(s, e)| f.lo < *e && f.hi >= *s) {
            continue;
        }
        if f.lo < audited.0 {
            left.push(format!("{}: also holds rows of days the source no longer has; left as it is", f.path));
            continue;
        }
        if f.hi >= audited.1 {
            left.push(format!("{}: also holds rows after the last day audited; left as it is", f.path));
            continue;
        }
        files.push(f);
    }
    Ok(files)
}

/// Rewrites `repair.files` without the surplus: one compaction run with no time or size
/// limit, which must not be skipped.
async fn rewrite_without_surplus(svc: &Services, cfg: &TableConfig, repair: Repair) -> Result<()> {
    let compactor = super::compact::Compactor {
        replacer: &svc.replacer,
        catalog: &svc.catalog,
        cfg,
        policy: super::compact::CompactionPolicy {
            target_size: 128 << 20,
            after: std::time::Duration::ZERO,
            max_bytes: u64::MAX,
            manifests_max: usize::MAX,
        },
        limits: svc.limits,
        deadline: std::time::Instant::now() + std::time::Duration::from_secs(365 * 86_400),
        repair: Some(repair),
    };
    let done = compactor.run(false).await?;
    if let Some(why) = done.skipped {
        return Err(OffloadError::Schema { table: cfg.source(), message: format!("repair not done: {why}") });
    }
    Ok(())
}

fn day_start(d: NaiveDate) -> i64 {
    d.and_hms_opt(0, 0, 0).and_then(|t| t.and_utc().timestamp_nanos_opt()).unwrap_or(i64::MIN)
}

/// The current snapshot's live data files with their cursor range, and how many have no
/// cursor bounds in their manifest entry (left out: nothing says which days they hold).
async fn live_files(table: &Table, cfg: &TableConfig) -> Result<(Vec<FileRange>, usize)> {
    let meta = table.metadata();
    let Some(snapshot) = meta.current_snapshot() else { return Ok((vec![], 0)) };
    let Some(cursor) = meta.current_schema().field_by_name(&cfg.cursor).map(|f| f.id) else { return Ok((vec![], 0)) };
    let mut unbounded = 0;
    let io = table.file_io();
    let bytes = io.new_input(snapshot.manifest_list())?.read().await?;
    let mut out = vec![];
    for m in ManifestList::parse_with_version(&bytes, meta.format_version())?.entries() {
        if m.content != ManifestContentType::Data {
            continue;
        }
        for e in m.load_manifest(io).await?.entries().iter().filter(|e| e.is_alive()) {
            let f = e.data_file();
            let lo = f.lower_bounds().get(&cursor).and_then(crate::sink::days::cursor_ns);
            let hi = f.upper_bounds().get(&cursor).and_then(crate::sink::days::cursor_ns);
            match (lo, hi) {
                (Some(lo), Some(hi)) => out.push(FileRange { path: f.file_path().to_string(), lo, hi }),
                _ => unbounded += 1,
            }
        }
    }
    Ok((out, unbounded))
}

/// Copies of each row in the files `paths`.
async fn count_table_rows(table: &Table, paths: &HashSet<String>, keep: &KeepCopies) -> Result<HashMap<u128, u64>> {
    let mut counts = HashMap::new();
    let scan = table.scan().select_all().build()?;
    let tasks: Vec<_> = scan
        .plan_files()
        .await?
        .try_filter(|t| futures::future::ready(paths.contains(&t.data_file_path)))
        .try_collect()
        .await?;
    for task in tasks {
        let reader = ArrowReaderBuilder::new(table.file_io().clone(), iceberg::Runtime::current()).build();
        let mut batches = reader.read(futures::stream::iter([Ok(task)]).boxed())?.stream();
        while let Some(batch) = batches.try_next().await? {
            for h in keep.hashes(&batch)? {
                *counts.entry(h).or_insert(0) += 1;
            }
        }
    }
    Ok(counts)
}

/// Copies in the source of the rows in `wanted`, over the cursor range `range` (ns, inclusive)
/// at or below `w`.
async fn count_source_rows(
    ch: &ClickHouse,
    source: &SourceTable,
    projection: &crate::source::query::Projection,
    w: &Position,
    range: (i64, i64),
    keep: &KeepCopies,
    wanted: &HashMap<u128, u64>,
) -> Result<BTreeMap<u128, u64>> {
    let (sql, params) = source.select_range(projection, w, range);
    let mut counts = BTreeMap::new();
    let mut stream = Box::pin(ch.query_arrow(&sql, &params, 65_536).await?);
    while let Some(batch) = stream.next().await {
        for h in keep.hashes(&batch?)? {
            if wanted.contains_key(&h) {
                *counts.entry(h).or_insert(0) += 1;
            }
        }
    }
    Ok(counts)
}
