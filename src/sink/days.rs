//! Rows of the target table per UTC day of the cursor, for the audit (I9).
//!
//! Counted from the manifests: a data file whose cursor bounds lie within one day adds its
//! record count to that day without being read. Only a file whose rows span several days is
//! read, its cursor column alone. Manifests and data files never change once written, so each
//! manifest's counts are kept ([`DayCounter`]) and a cycle's audit reads only what is new.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use arrow_array::{Array, Date32Array, Int64Array};
use arrow_schema::{DataType, TimeUnit};
use futures::{StreamExt, TryStreamExt};
use iceberg::Runtime;
use iceberg::arrow::ArrowReaderBuilder;
use iceberg::spec::{Datum, ManifestContentType, ManifestList, PrimitiveLiteral, PrimitiveType, Transform};
use iceberg::table::Table;

use crate::error::{OffloadError, Result};

/// Days since 1970-01-01 (UTC).
pub type Day = i32;

const NS_PER_DAY: i64 = 86_400_000_000_000;
const US_PER_DAY: i64 = 86_400_000_000;

/// What one manifest holds, per day: settled counts, and the files still to read.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
struct ManifestDays {
    days: BTreeMap<Day, u64>,
    /// Files spanning several days (or without bounds), not read yet: (path, first, last day).
    spanning: Vec<(String, Day, Day)>,
}

/// Per-manifest day counts of one table, kept between cycles, and in the table's own storage
/// (`offload/audit-days.json`) for the next process: a `once` under cron would otherwise read
/// every manifest of the recent days at every start. Manifests never change, so a count once
/// made stays true; an unreadable file is counted again.
#[derive(Debug, Default)]
pub struct DayCounter {
    manifests: Mutex<HashMap<String, ManifestDays>>,
    loaded: std::sync::atomic::AtomicBool,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Persisted {
    cursor_field_id: i32,
    manifests: HashMap<String, ManifestDays>,
}

fn persisted_path(table: &Table) -> String {
    format!("{}/offload/audit-days.json", table.metadata().location().trim_end_matches('/'))
}

impl DayCounter {
    /// Rows of `table`'s current snapshot per day of `cursor`, for the days `first..=last`
    /// (`first` `None`: from the beginning).
    pub async fn count(
        &self,
        table: &Table,
        cursor: &str,
        first: Option<Day>,
        last: Day,
    ) -> Result<BTreeMap<Day, u64>> {
        let meta = table.metadata();
        let Some(snapshot) = meta.current_snapshot() else { return Ok(BTreeMap::new()) };
        let field = meta.current_schema().field_by_name(cursor).ok_or_else(|| OffloadError::Schema {
            table: table.identifier().to_string(),
            message: format!("the cursor column {cursor:?} is not in the Iceberg table"),
        })?;
        let field_id = field.id;
        let list = data_manifest_list(table, snapshot).await?;
        if !self.loaded.swap(true, std::sync::atomic::Ordering::Relaxed) {
            self.load(table, field_id).await;
        }
        let in_range = |d: Day| first.is_none_or(|f| d >= f) && d <= last;
        let all_paths: HashSet<String> = list.entries().iter().map(|m| m.manifest_path.clone()).collect();
        let (per_manifest, mut changed) = self.manifests_in_range(table, &list, field_id, first, last).await?;
        // Files spanning days of the range are read once; their counts join the manifest's.
        let to_read: HashSet<String> = per_manifest
            .iter()
            .flat_map(|(_, d)| d.spanning.iter())
            .filter(|(_, lo, hi)| first.is_none_or(|f| *hi >= f) && *lo <= last)
            .map(|(p, ..)| p.clone())
            .collect();
        let read = if to_read.is_empty() { HashMap::new() } else { read_days(table, cursor, &to_read).await? };
        changed |= !read.is_empty();
        let mut total = BTreeMap::new();
        let snapshot = {
            let mut cache = self.manifests.lock().expect("not poisoned");
            cache.retain(|p, _| all_paths.contains(p));
            for (path, mut days) in per_manifest {
                days.spanning.retain(|(p, ..)| match read.get(p) {
                    Some(counts) => {
                        for (d, n) in counts {
                            *days.days.entry(*d).or_default() += n;
                        }
                        false
                    }
                    None => true,
                });
                for (d, n) in days.days.range(first.unwrap_or(Day::MIN)..=last) {
                    *total.entry(*d).or_default() += n;
                }
                debug_assert!(days.days.keys().all(|d| !in_range(*d) || total.contains_key(d)));
                cache.insert(path, days);
            }
            changed.then(|| Persisted { cursor_field_id: field_id, manifests: cache.clone() })
        };
        if let Some(p) = snapshot {
            self.save(table, &p).await;
        }
        Ok(total)
    }

    /// The day counts of each manifest that may hold days of `first..=last`, from the cache or
    /// read now; `true` with them when one was read (the cache changed).
    async fn manifests_in_range(
        &self,
        table: &Table,
        list: &ManifestList,
        field_id: i32,
        first: Option<Day>,
        last: Day,
    ) -> Result<(Vec<(String, ManifestDays)>, bool)> {
        let mut changed = false;
        let pruning = Pruning::of(table.metadata(), field_id);
        let mut per_manifest = Vec::with_capacity(list.entries().len());
        for m in list.entries() {
            // A manifest whose partitions (a time transform of the cursor) lie outside the
            // range holds nothing to count: not read.
            if let Some((lo, hi)) = pruning.as_ref().and_then(|p| p.days_of(m))
                && (hi < first.unwrap_or(Day::MIN) || lo > last)
            {
                continue;
            }
            let cached = self.manifests.lock().expect("not poisoned").get(&m.manifest_path).cloned();
            let days = match cached {
                Some(d) => d,
                None => {
                    changed = true;
                    manifest_days(&m.load_manifest(table.file_io()).await?, field_id)
                }
            };
            per_manifest.push((m.manifest_path.clone(), days));
        }
        Ok((per_manifest, changed))
    }

    /// What an earlier process counted (best effort: a missing or unreadable file is ignored).
    async fn load(&self, table: &Table, field_id: i32) {
        let read = async { table.file_io().new_input(persisted_path(table))?.read().await };
        let Ok(Ok(bytes)) = tokio::time::timeout(std::time::Duration::from_secs(10), read).await else { return };
        match serde_json::from_slice::<Persisted>(&bytes) {
            Ok(p) if p.cursor_field_id == field_id => self.manifests.lock().expect("not poisoned").extend(p.manifests),
            Ok(_) => {}
            Err(e) => tracing::debug!(table = %table.identifier(), "the audit's day counts are counted again: {e}"),
        }
    }

    async fn save(&self, table: &Table, p: &Persisted) {
        let bytes = serde_json::to_vec(p).expect("serialisable");
        let write = async { table.file_io().new_output(persisted_path(table))?.write(bytes.into()).await };
        if let Ok(Err(e)) | Err(e) = tokio::time::timeout(std::time::Duration::from_secs(10), write)
            .await
            .map_err(|_| iceberg::Error::new(iceberg::ErrorKind::Unexpected, "timed out"))
        {
            tracing::debug!(table = %table.identifier(), "the audit's day counts are not kept for the next process: {e}");
        }
    }
}

/// The manifest list of `snapshot`; an error if it lists delete manifests (the audit counts
/// data files only).
async fn data_manifest_list(table: &Table, snapshot: &iceberg::spec::Snapshot) -> Result<ManifestList> {
    let meta = table.metadata();
    let bytes = table.file_io().new_input(snapshot.manifest_list())?.read().await?;
    let list = ManifestList::parse_with_version(&bytes, meta.format_version())?;
    if list.entries().iter().any(|m| m.content == ManifestContentType::Deletes) {
        return Err(OffloadError::Audit(format!(
            "{} has delete files (written by another engine): the audit counts data files and cannot count it",
            table.identifier()
        )));
    }
    Ok(list)
}

/// How manifests are skipped by their partition summaries: the finest time transform of the
/// cursor in the table's default spec, and where it sits in the partition tuple.
struct Pruning {
    spec_id: i32,
    index: usize,
    transform: Transform,
}

impl Pruning {
    fn of(meta: &iceberg::spec::TableMetadata, cursor_id: i32) -> Option<Self> {
        let spec = meta.default_partition_spec();
        let rank = |t: &Transform| match t {
            Transform::Hour => Some(0),
            Transform::Day => Some(1),
            Transform::Month => Some(2),
            Transform::Year => Some(3),
            _ => None,
        };
        spec.fields()
            .iter()
            .enumerate()
            .filter(|(_, f)| f.source_id == cursor_id)
            .filter_map(|(i, f)| rank(&f.transform).map(|r| (r, i, f.transform)))
            .min_by_key(|(r, ..)| *r)
            .map(|(_, index, transform)| Pruning { spec_id: spec.spec_id(), index, transform })
    }

    /// The days a manifest's partitions cover (`None`: unknown, read it).
    fn days_of(&self, m: &iceberg::spec::ManifestFile) -> Option<(Day, Day)> {
        if m.partition_spec_id != self.spec_id {
            return None;
        }
        let summary = m.partitions.as_ref()?.get(self.index)?;
        let value = |b: Option<&[u8]>| -> Option<i32> {
            let datum = Datum::try_from_bytes(b?, PrimitiveType::Int).ok()?;
            match datum.literal() {
                PrimitiveLiteral::Int(v) => Some(*v),
                _ => None,
            }
        };
        let (lo, hi) = (
            value(summary.lower_bound.as_ref().map(|v| v.as_slice()))?,
            value(summary.upper_bound.as_ref().map(|v| v.as_slice()))?,
        );
        let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?;
        let day = |d: chrono::NaiveDate| (d - epoch).num_days() as Day;
        let month_start = |m: i32| epoch.checked_add_months(chrono::Months::new(u32::try_from(m).ok()?));
        Some(match self.transform {
            Transform::Day => (lo, hi),
            Transform::Hour => (lo.div_euclid(24), hi.div_euclid(24)),
            Transform::Month => (day(month_start(lo)?), day(month_start(hi + 1)?) - 1),
            Transform::Year => (day(month_start(lo * 12)?), day(month_start((hi + 1) * 12)?) - 1),
            _ => return None,
        })
    }
}

/// The day counts a manifest's live data files give from their bounds alone.
fn manifest_days(manifest: &iceberg::spec::Manifest, field_id: i32) -> ManifestDays {
    let mut out = ManifestDays::default();
    for entry in manifest.entries().iter().filter(|e| e.is_alive()) {
        let file = entry.data_file();
        let lo = file.lower_bounds().get(&field_id).and_then(day_of);
        let hi = file.upper_bounds().get(&field_id).and_then(day_of);
        match (lo, hi) {
            (Some(lo), Some(hi)) if lo == hi => *out.days.entry(lo).or_default() += file.record_count(),
            (Some(lo), Some(hi)) => out.spanning.push((file.file_path().to_string(), lo, hi)),
            _ => out.spanning.push((file.file_path().to_string(), Day::MIN, Day::MAX)),
        }
    }
    out
}

/// The UTC day of a cursor bound (date, timestamp in µs or ns).
fn day_of(datum: &Datum) -> Option<Day> {
    match (datum.data_type(), datum.literal()) {
        (PrimitiveType::Date, PrimitiveLiteral::Int(d)) => Some(*d),
        (PrimitiveType::Timestamp | PrimitiveType::Timestamptz, PrimitiveLiteral::Long(us)) => {
            Some(us.div_euclid(US_PER_DAY) as Day)
        }
        (PrimitiveType::TimestampNs | PrimitiveType::TimestamptzNs, PrimitiveLiteral::Long(ns)) => {
            Some(ns.div_euclid(NS_PER_DAY) as Day)
        }
        _ => None,
    }
}

/// A cursor bound in ns since the epoch (date, timestamp in µs or ns).
pub fn cursor_ns(datum: &Datum) -> Option<i64> {
    match (datum.data_type(), datum.literal()) {
        (PrimitiveType::Date, PrimitiveLiteral::Int(d)) => (*d as i64).checked_mul(NS_PER_DAY),
        (PrimitiveType::Timestamp | PrimitiveType::Timestamptz, PrimitiveLiteral::Long(us)) => us.checked_mul(1_000),
        (PrimitiveType::TimestampNs | PrimitiveType::TimestamptzNs, PrimitiveLiteral::Long(ns)) => Some(*ns),
        _ => None,
    }
}

/// Reads the cursor column of the given data files and counts their rows per day.
async fn read_days(
    table: &Table,
    cursor: &str,
    paths: &HashSet<String>,
) -> Result<HashMap<String, BTreeMap<Day, u64>>> {
    let scan = table.scan().select([cursor]).build()?;
    let tasks: Vec<_> = scan
        .plan_files()
        .await?
        .try_filter(|t| futures::future::ready(paths.contains(&t.data_file_path)))
        .try_collect()
        .await?;
    let mut out = HashMap::new();
    for task in tasks {
        let path = task.data_file_path.clone();
        let one = futures::stream::iter([Ok(task)]).boxed();
        let reader = ArrowReaderBuilder::new(table.file_io().clone(), Runtime::current()).build();
        let mut batches = reader.read(one)?.stream();
        let counts: &mut BTreeMap<Day, u64> = out.entry(path).or_default();
        while let Some(batch) = batches.next().await {
            let batch = batch?;
            count_days(batch.column(0).as_ref(), counts)?;
        }
    }
    Ok(out)
}

fn count_days(column: &dyn Array, counts: &mut BTreeMap<Day, u64>) -> Result<()> {
    let per_day = match column.data_type() {
        DataType::Date32 => None,
        DataType::Timestamp(TimeUnit::Microsecond, _) => Some(US_PER_DAY),
        DataType::Timestamp(TimeUnit::Nanosecond, _) => Some(NS_PER_DAY),
        other => return Err(OffloadError::Audit(format!("cursor column of type {other} cannot be audited"))),
    };
    match per_day {
        None => {
            let days = column.as_any().downcast_ref::<Date32Array>().expect("Date32");
            for d in days.iter().flatten() {
                *counts.entry(d).or_default() += 1;
            }
        }
        Some(unit) => {
            let raw = arrow_cast::cast(column, &DataType::Int64).map_err(|e| OffloadError::Crash(e.to_string()))?;
            let values = raw.as_any().downcast_ref::<Int64Array>().expect("Int64");
            for v in values.iter().flatten() {
                *counts.entry(v.div_euclid(unit) as Day).or_default() += 1;
            }
        }
    }
    Ok(())
}

/// One counter per table, shared by the cycles of a process.
#[derive(Debug, Default)]
pub struct DayCounters(Mutex<HashMap<String, Arc<DayCounter>>>);

impl DayCounters {
    pub fn of(&self, table: &str) -> Arc<DayCounter> {
        self.0.lock().expect("not poisoned").entry(table.to_string()).or_default().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_of_bounds() {
        assert_eq!(day_of(&Datum::date(20_000)), Some(20_000));
        assert_eq!(day_of(&Datum::timestamptz_micros(US_PER_DAY * 3 - 1)), Some(2));
        assert_eq!(day_of(&Datum::timestamptz_micros(-1)), Some(-1), "before 1970 floors");
        assert_eq!(day_of(&Datum::timestamp_nanos(NS_PER_DAY * 5)), Some(5));
        assert_eq!(day_of(&Datum::long(5)), None);
    }
}
