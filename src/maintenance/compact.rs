//! Compaction of closed partitions, and the manifests of many small appends merged.
//!
//! A partition is closed when every file in it holds only rows older than `W` minus
//! `compact_after`: no window will write there again (a late row may, and is compacted on a
//! later run). Its files smaller than ¾ of `write.target-file-size-bytes` are read and
//! written again as files of the target size, rows sorted by the cursor then the tiebreak
//! (files in cursor order, each sorted: memory is one input file, never a partition).
//!
//! One `replace` snapshot per run carries it all, committed through our own compare-and-swap
//! ([`crate::commit::replace`]) and fenced on the snapshot it read (I4): a concurrent append
//! wins and this run's files are deleted (I8); an append that finds this snapshot first is
//! refused and starts over at I3, its rows written once. The manifests that held replaced
//! files are merged into one (EXISTING entries) beside one of ADDED and one of DELETED
//! entries; when the table lists more than `compact_manifests_max` manifests, every manifest
//! of the default spec is merged the same way. The old data files stay until expiry drops the
//! snapshots that reference them.
//!
//! Invariants checked before the commit: the rows read equal the rows written and the record
//! counts of the files replaced; otherwise nothing is committed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use arrow_array::RecordBatch;
use futures::{StreamExt, TryStreamExt};
use iceberg::Runtime;
use iceberg::arrow::ArrowReaderBuilder;
use iceberg::scan::FileScanTask;
use iceberg::spec::{
    DataContentType, DataFile, FormatVersion, ManifestContentType, ManifestFile, ManifestList, ManifestListWriter,
    ManifestWriterBuilder, Operation, Snapshot, SnapshotReference, SnapshotRetention, Struct, Summary,
};
use iceberg::table::Table;
use iceberg::{TableRequirement, TableUpdate};

use crate::commit::replace::CasOutcome;
use crate::commit::{AttemptFiles, Resolution, TableView, delete_dropped_metadata, fate};
use crate::config::{CatalogLimits, TableConfig};
use crate::error::{OffloadError, Result};
use crate::sink::writer::WindowWriter;

pub use crate::config::CompactionPolicy;
pub use crate::report::CompactReport;

/// A live data file of the current snapshot, with what an EXISTING entry must keep.
#[derive(Clone)]
pub(super) struct Live {
    file: DataFile,
    snapshot_id: i64,
    sequence_number: i64,
    file_sequence_number: Option<i64>,
    /// Cursor bounds in ns (None: unknown, so never closed).
    cursor: Option<(i64, i64)>,
}

/// What a compaction commit about to be sent wrote, kept in `offload/compaction.json`: a run
/// cut short leaves its files findable; the next run decides from the table's history.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Record {
    run_id: String,
    required_snapshot: Option<i64>,
    snapshot_id: i64,
    /// Data files, manifests, manifest list and (SQL catalog) metadata file, once known. A
    /// run killed while rewriting leaves data files this does not list yet: `cleanup` takes
    /// them (they are named `compact-<run id>-…`).
    written: Vec<String>,
}

fn record_path(table: &Table) -> String {
    format!("{}/offload/compaction.json", table.metadata().location().trim_end_matches('/'))
}

/// Table property the replace commit sets: its metadata file carries the run id (I8).
const PROP_COMPACTION_RUN: &str = "offload.compaction-run";
/// Snapshot summary marker of a compaction.
const SUMMARY_COMPACTION_RUN: &str = "offload.compaction-run";
/// Entries per merged manifest (about 8 MB, Iceberg's `commit.manifest.target-size-bytes`).
const ENTRIES_PER_MANIFEST: usize = 8_000;

/// What a run needs besides the table.
pub struct Compactor<'a> {
    pub replacer: &'a crate::commit::replace::Replacer,
    pub catalog: &'a Arc<dyn iceberg::Catalog>,
    pub cfg: &'a TableConfig,
    pub policy: CompactionPolicy,
    pub limits: CatalogLimits,
    /// No partition is started after this (the run's time limit must leave room to commit).
    pub deadline: std::time::Instant,
    /// A repair (`iceberg-offload repair`): these files rewritten with surplus copies removed,
    /// instead of the closed partitions' small files.
    pub repair: Option<super::repair::Repair>,
}

impl Compactor<'_> {
    pub async fn run(&self, dry_run: bool) -> Result<CompactReport> {
        let ident = crate::sink::table::ident(self.cfg);
        let table = self.catalog.load_table(&ident).await?;
        let mut report = CompactReport::default();
        let mut records = self.settle(&table, dry_run).await;
        let plan = match &self.repair {
            Some(r) => Plan::for_files(&table, self.cfg, self.limits, &r.files).await?,
            None => Plan::make(&table, self.cfg, self.policy, self.limits).await?,
        };
        let plan = match plan {
            Ok(plan) => plan,
            Err(why) => {
                report.skipped = Some(why);
                return Ok(report);
            }
        };
        report.partitions = plan.partitions.len();
        report.files_rewritten = plan.replaced().count();
        report.bytes_rewritten = plan.replaced().map(|l| l.file.file_size_in_bytes()).sum();
        report.manifests_before = plan.manifests.len();
        report.small_files = plan.small_files;
        if plan.partitions.is_empty() && !plan.merge_all {
            report.manifests_after = report.manifests_before;
            return Ok(report);
        }
        if dry_run {
            return Ok(report);
        }
        let run_id = uuid::Uuid::now_v7().to_string();
        let mut plan = plan;
        let record = Record {
            run_id: run_id.clone(),
            required_snapshot: table.metadata().current_snapshot_id(),
            snapshot_id: new_snapshot_id(table.metadata()),
            written: vec![],
        };
        // Write-ahead (I5): a run cut short from here on leaves a record the next run settles.
        records.put(&table, record.clone(), self.limits.storage).await?;
        let written = match self.rewrite(&table, &mut plan, &run_id).await {
            Ok(w) => w,
            Err(e) => {
                records.forget(&table, &run_id, self.limits.storage).await;
                return Err(e);
            }
        };
        report.partitions = plan.partitions.len();
        report.files_rewritten = plan.replaced().count();
        report.bytes_rewritten = plan.replaced().map(|l| l.file.file_size_in_bytes()).sum();
        report.rows = written.iter().map(|f| f.record_count()).sum();
        report.files_written = written.len();
        report.bytes_written = written.iter().map(|f| f.file_size_in_bytes()).sum();
        let paths: Vec<String> = written.iter().map(|f| f.file_path().to_string()).collect();
        let result = self.commit(&table, &plan, written, record, &mut records).await;
        match result {
            Ok((after, manifests)) => {
                report.manifests_after = manifests;
                records.settle(&after, self.limits.storage).await;
                delete_dropped_metadata(&table, &after, self.limits.storage).await;
                Ok(report)
            }
            Err((e, discard)) => {
                if discard {
                    let mut all = paths;
                    all.extend(records.files_of(&run_id));
                    AttemptFiles { table: &table, run_id: &run_id, paths: &all, limit: self.limits.storage }
                        .discard()
                        .await;
                    records.forget(&table, &run_id, self.limits.storage).await;
                }
                Err(e)
            }
        }
    }

    /// Earlier runs' commits whose outcome was unknown: each is decided from the table's
    /// history (landed: forgotten; the table moved past its fence: its files deleted) or kept.
    /// An undecided one does not stop this run: both are fenced on the same snapshot, so at
    /// most one lands, and this run's outcome decides the other.
    async fn settle(&self, table: &Table, dry_run: bool) -> Records {
        let mut records = Records::load(table, self.limits.storage).await;
        if !dry_run {
            records.settle(table, self.limits.storage).await;
        }
        records
    }

    /// Reads the files to replace, partition by partition, and writes them again.
    async fn rewrite(&self, table: &Table, plan: &mut Plan, run_id: &str) -> Result<Vec<DataFile>> {
        let tasks = scan_tasks(table, plan).await?;
        let prefix = format!("compact-{run_id}");
        let mut writer =
            WindowWriter::new_sized(table, &prefix, self.cfg.integer_encoding, true, Some(plan.target_size as usize))
                .await?;
        let mut written = vec![];
        let mut removed = 0u64;
        let result = self.copy_partitions(table, plan, tasks, &mut writer, &mut removed).await;
        match result {
            Ok((rows, done)) => {
                plan.partitions.truncate(done);
                written.extend(writer.close().await?);
                let out: u64 = written.iter().map(|f| f.record_count()).sum();
                let expected: u64 = plan.replaced().map(|l| l.file.record_count()).sum();
                let surplus = self.repair.as_ref().map_or(0, |r| r.keep.surplus);
                if rows != expected || out + removed != expected || removed != surplus {
                    let paths: Vec<String> = written.iter().map(|f| f.file_path().to_string()).collect();
                    AttemptFiles { table, run_id, paths: &paths, limit: self.limits.storage }.discard().await;
                    return Err(OffloadError::Crash(format!(
                        "rewrite of {}: {expected} rows to rewrite, {rows} read, {removed} removed (planned {surplus}), {out} written; nothing committed",
                        table.identifier()
                    )));
                }
                Ok(written)
            }
            Err(e) => {
                // What the writer closed so far is named after the run: found and deleted.
                if let Ok(files) = writer.close().await {
                    let paths: Vec<String> = files.iter().map(|f| f.file_path().to_string()).collect();
                    AttemptFiles { table, run_id, paths: &paths, limit: self.limits.storage }.discard().await;
                }
                Err(e)
            }
        }
    }

    /// Reads each partition's files, sorted, into `writer` (a repair drops the surplus copies,
    /// counted in `removed`); stops before a partition once the deadline has passed. Returns
    /// the rows read and how many partitions were done.
    async fn copy_partitions(
        &self,
        table: &Table,
        plan: &Plan,
        mut tasks: HashMap<String, FileScanTask>,
        writer: &mut WindowWriter,
        removed: &mut u64,
    ) -> Result<(u64, usize)> {
        let mut emitted = HashMap::new();
        let mut rows = 0;
        for (done, partition) in plan.partitions.iter().enumerate() {
            if done > 0 && std::time::Instant::now() >= self.deadline {
                tracing::info!(table = %table.identifier(), done, left = plan.partitions.len() - done,
                    "compaction: the run's time is half over; the other partitions wait for the next run");
                return Ok((rows, done));
            }
            for live in partition {
                let task = tasks.remove(live.file.file_path()).ok_or_else(|| {
                    OffloadError::Crash(format!("{} is not in the table's scan", live.file.file_path()))
                })?;
                let batch = self.read_sorted(table, task).await?;
                if batch.num_rows() as u64 != live.file.record_count() {
                    return Err(OffloadError::Crash(format!(
                        "{} has {} rows in its manifest but {} were read",
                        live.file.file_path(),
                        live.file.record_count(),
                        batch.num_rows()
                    )));
                }
                rows += batch.num_rows() as u64;
                let batch = match &self.repair {
                    Some(r) => {
                        let (kept, dropped) = r.keep.filter(&writer.conform(&batch)?, &mut emitted)?;
                        *removed += dropped;
                        kept
                    }
                    None => batch,
                };
                writer.write(batch).await?;
            }
        }
        Ok((rows, plan.partitions.len()))
    }

    /// One data file, its rows sorted by the cursor then the tiebreak.
    async fn read_sorted(&self, table: &Table, task: FileScanTask) -> Result<RecordBatch> {
        let reader = ArrowReaderBuilder::new(table.file_io().clone(), Runtime::current()).build();
        let batches: Vec<RecordBatch> =
            reader.read(futures::stream::iter([Ok(task)]).boxed())?.stream().try_collect().await?;
        let schema = match batches.first() {
            Some(b) => b.schema(),
            None => return Ok(RecordBatch::new_empty(Arc::new(arrow_schema::Schema::empty()))),
        };
        let batch = arrow_select::concat::concat_batches(&schema, &batches)
            .map_err(|e| OffloadError::Crash(format!("compaction: {e}")))?;
        let mut keys = vec![];
        for name in std::iter::once(&self.cfg.cursor).chain(self.cfg.tiebreak.as_ref()) {
            if let Some(c) = batch.column_by_name(name) {
                keys.push(arrow_ord::sort::SortColumn { values: c.clone(), options: None });
            }
        }
        if keys.is_empty() {
            tracing::warn!(table = %table.identifier(), cursor = %self.cfg.cursor,
                "compaction: the cursor column is not in the table; rows keep their order");
            return Ok(batch);
        }
        let order = arrow_ord::sort::lexsort_to_indices(&keys, None)
            .map_err(|e| OffloadError::Crash(format!("compaction: sorting: {e}")))?;
        arrow_select::take::take_record_batch(&batch, &order)
            .map_err(|e| OffloadError::Crash(format!("compaction: {e}")))
    }

    /// Manifests, manifest list, and the compare-and-swap. `Err((e, true))`: it can never
    /// land, delete what was written; `Err((e, false))`: unknown, the record stays.
    async fn commit(
        &self,
        table: &Table,
        plan: &Plan,
        written: Vec<DataFile>,
        mut record: Record,
        records: &mut Records,
    ) -> std::result::Result<(Table, usize), (OffloadError, bool)> {
        let run_id = record.run_id.clone();
        let snapshot_id = record.snapshot_id;
        let required = record.required_snapshot;
        record.written = written.iter().map(|f| f.file_path().to_string()).collect();
        let (updates, requirements, manifests, commit_files) =
            self.snapshot(table, plan, written, &run_id, snapshot_id).await.map_err(|e| (e, true))?;
        record.written.extend(commit_files);
        if self.replacer.is_sql() {
            record.written.push(crate::commit::replace::metadata_file_of(table, &run_id).map_err(|e| (e, true))?);
        }
        records.put(table, record, self.limits.storage).await.map_err(|e| (e, true))?;
        crate::fault::hit("compact_before_commit").map_err(|e| (e, false))?;
        let sent =
            tokio::time::timeout(self.limits.commit, self.replacer.commit(table, &run_id, requirements, updates)).await;
        let reloaded = tokio::time::timeout(self.limits.call, self.catalog.load_table(table.identifier()))
            .await
            .map_err(|_| OffloadError::Timeout(self.limits.call))
            .and_then(|r| r.map_err(OffloadError::from));
        let conflict = |why: String| OffloadError::CommitConflict {
            table: table.identifier().to_string(),
            source: Box::new(iceberg::Error::new(iceberg::ErrorKind::CatalogCommitConflicts, why)),
        };
        let now = match reloaded {
            Ok(t) => t,
            Err(e) => {
                return match sent {
                    Ok(Err(not_sent)) => Err((not_sent, true)),
                    _ => Err((e, false)),
                };
            }
        };
        if now.metadata().snapshot_by_id(snapshot_id).is_some() {
            crate::fault::hit("compact_after_commit").map_err(|e| (e, false))?;
            return Ok((now, manifests));
        }
        let moved = now.metadata().current_snapshot_id() != required;
        match sent {
            Ok(Err(not_sent)) => Err((not_sent, true)),
            Ok(Ok(CasOutcome::Refused(why))) => Err((conflict(why), true)),
            Ok(Ok(CasOutcome::Landed)) => Err((
                OffloadError::Crash("the catalog accepted the compaction but the table does not show it".into()),
                moved,
            )),
            Ok(Ok(CasOutcome::Unknown(why))) => Err((conflict(format!("outcome unknown: {why}")), moved)),
            Err(_) => Err((OffloadError::Timeout(self.limits.commit), moved)),
        }
    }

    /// The replace snapshot: ADDED, EXISTING (merged) and DELETED manifests, the carried ones,
    /// the manifest list, and the catalog updates that make it current.
    async fn snapshot(
        &self,
        table: &Table,
        plan: &Plan,
        written: Vec<DataFile>,
        run_id: &str,
        snapshot_id: i64,
    ) -> Result<(Vec<TableUpdate>, Vec<TableRequirement>, usize, Vec<String>)> {
        let meta = table.metadata();
        let sequence = meta.next_sequence_number();
        let dir = format!("{}/metadata", meta.location().trim_end_matches('/'));
        let summary = replace_summary(plan, &written, run_id);
        let manifests = write_manifests(table, plan, written, &dir, run_id, snapshot_id, sequence).await?;
        let count = manifests.len();
        let list_path = format!("{dir}/snap-{snapshot_id}-1-{run_id}.avro");
        let commit_files = write_manifest_list(table, plan, manifests, &list_path, snapshot_id, sequence).await?;

        let snapshot = Snapshot::builder()
            .with_snapshot_id(snapshot_id)
            .with_parent_snapshot_id(meta.current_snapshot_id())
            .with_sequence_number(sequence)
            .with_timestamp_ms(chrono::Utc::now().timestamp_millis().max(meta.last_updated_ms() + 1))
            .with_manifest_list(list_path)
            .with_summary(Summary {
                operation: Operation::Replace,
                additional_properties: summary.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            })
            .with_schema_id(meta.current_schema_id())
            .build();
        let updates = replace_updates(snapshot, run_id, snapshot_id);
        let requirements = vec![
            TableRequirement::UuidMatch { uuid: meta.uuid() },
            TableRequirement::RefSnapshotIdMatch { r#ref: "main".to_string(), snapshot_id: meta.current_snapshot_id() },
        ];
        Ok((updates, requirements, count, commit_files))
    }
}

/// The new snapshot's manifests: one of ADDED entries (`written`), the merged manifests'
/// EXISTING entries in manifests of `ENTRIES_PER_MANIFEST`, one of DELETED entries (the
/// replaced files), then the manifests carried unchanged.
async fn write_manifests(
    table: &Table,
    plan: &Plan,
    written: Vec<DataFile>,
    dir: &str,
    run_id: &str,
    snapshot_id: i64,
    sequence: i64,
) -> Result<Vec<ManifestFile>> {
    let meta = table.metadata();
    let io = table.file_io();
    let schema = meta.current_schema().clone();
    let spec = meta.default_partition_spec().as_ref().clone();
    let mut n = 0;
    let mut next_writer = || {
        let path = format!("{dir}/{run_id}-m{n}.avro");
        n += 1;
        Ok::<_, OffloadError>(
            ManifestWriterBuilder::new(io.new_output(path)?, Some(snapshot_id), schema.clone(), spec.clone())
                .build_v2_data(),
        )
    };
    let mut manifests: Vec<ManifestFile> = vec![];
    if !written.is_empty() {
        let mut w = next_writer()?;
        for f in written {
            w.add_file(f, sequence)?;
        }
        manifests.push(w.write_manifest_file().await?);
    }
    let replaced: HashSet<&str> = plan.replaced().map(|l| l.file.file_path()).collect();
    let mut deleted = next_writer()?;
    let mut any_deleted = false;
    let mut existing = Vec::new();
    for live in plan.merged_entries() {
        if replaced.contains(live.file.file_path()) {
            let file_seq = live.file_sequence_number.or(Some(live.sequence_number));
            deleted.add_delete_file(live.file.clone(), live.sequence_number, file_seq)?;
            any_deleted = true;
        } else {
            existing.push(live);
        }
    }
    for chunk in existing.chunks(ENTRIES_PER_MANIFEST) {
        let mut w = next_writer()?;
        for live in chunk {
            let file_seq = live.file_sequence_number.or(Some(live.sequence_number));
            w.add_existing_file(live.file.clone(), live.snapshot_id, live.sequence_number, file_seq)?;
        }
        manifests.push(w.write_manifest_file().await?);
    }
    if any_deleted {
        manifests.push(deleted.write_manifest_file().await?);
    }
    // Carried unchanged: manifests not merged, except those left with DELETED entries only
    // (an earlier replace's): they describe the past, and the past is in older snapshots.
    manifests.extend(
        plan.manifests
            .iter()
            .filter(|m| !plan.merged.contains(&m.manifest_path))
            .filter(|m| m.has_added_files() || m.has_existing_files() || m.content == ManifestContentType::Deletes)
            .cloned(),
    );
    Ok(manifests)
}

/// Writes the manifest list at `list_path`; returns the files this commit wrote (the new
/// manifests, then the list), for the compaction record.
async fn write_manifest_list(
    table: &Table,
    plan: &Plan,
    manifests: Vec<ManifestFile>,
    list_path: &str,
    snapshot_id: i64,
    sequence: i64,
) -> Result<Vec<String>> {
    let meta = table.metadata();
    let io = table.file_io();
    let own_paths = plan.manifests.iter().map(|m| m.manifest_path.as_str()).collect::<HashSet<_>>();
    let mut commit_files: Vec<String> =
        manifests.iter().map(|m| m.manifest_path.clone()).filter(|p| !own_paths.contains(p.as_str())).collect();
    commit_files.push(list_path.to_string());
    let mut list = ManifestListWriter::v2(
        io.new_output(list_path)?.writer().await?,
        snapshot_id,
        meta.current_snapshot_id(),
        sequence,
    );
    list.add_manifests(manifests.into_iter())?;
    list.close().await?;
    Ok(commit_files)
}

/// The replace snapshot's summary: what it adds and removes, the table's new totals, and the
/// compaction marker.
fn replace_summary(plan: &Plan, written: &[DataFile], run_id: &str) -> BTreeMap<&'static str, String> {
    let added_rows: u64 = written.iter().map(|f| f.record_count()).sum();
    let added_size: u64 = written.iter().map(|f| f.file_size_in_bytes()).sum();
    let added_files = written.len();
    let replaced: HashSet<&str> = plan.replaced().map(|l| l.file.file_path()).collect();
    let removed_rows: u64 = plan.replaced().map(|l| l.file.record_count()).sum();
    let removed_size: u64 = plan.replaced().map(|l| l.file.file_size_in_bytes()).sum();
    let removed_files = replaced.len();
    let totals = plan.totals;
    BTreeMap::from([
        ("added-data-files", added_files.to_string()),
        ("deleted-data-files", removed_files.to_string()),
        ("added-records", added_rows.to_string()),
        ("deleted-records", removed_rows.to_string()),
        ("added-files-size", added_size.to_string()),
        ("removed-files-size", removed_size.to_string()),
        ("changed-partition-count", plan.partitions.len().to_string()),
        ("total-records", (totals.records - removed_rows + added_rows).to_string()),
        ("total-data-files", (totals.files - removed_files as u64 + added_files as u64).to_string()),
        ("total-files-size", (totals.size - removed_size + added_size).to_string()),
        ("total-delete-files", "0".to_string()),
        ("total-position-deletes", "0".to_string()),
        ("total-equality-deletes", "0".to_string()),
        (SUMMARY_COMPACTION_RUN, run_id.to_string()),
    ])
}

/// The catalog updates that make `snapshot` current: the run id as a table property (I8),
/// the snapshot, and `main` moved to it.
fn replace_updates(snapshot: Snapshot, run_id: &str, snapshot_id: i64) -> Vec<TableUpdate> {
    vec![
        TableUpdate::SetProperties { updates: HashMap::from([(PROP_COMPACTION_RUN.to_string(), run_id.to_string())]) },
        TableUpdate::AddSnapshot { snapshot },
        TableUpdate::SetSnapshotRef {
            ref_name: "main".to_string(),
            reference: SnapshotReference::new(
                snapshot_id,
                SnapshotRetention::Branch {
                    min_snapshots_to_keep: None,
                    max_snapshot_age_ms: None,
                    max_ref_age_ms: None,
                },
            ),
        },
    ]
}

/// The scan tasks of the files `plan` replaces, by path.
async fn scan_tasks(table: &Table, plan: &Plan) -> Result<HashMap<String, FileScanTask>> {
    let wanted: HashSet<&str> = plan.replaced().map(|l| l.file.file_path()).collect();
    let mut tasks: HashMap<String, FileScanTask> = HashMap::new();
    if !wanted.is_empty() {
        let scan = table.scan().select_all().build()?;
        let mut stream = scan.plan_files().await?;
        while let Some(task) = stream.try_next().await? {
            if wanted.contains(task.data_file_path.as_str()) {
                tasks.insert(task.data_file_path.clone(), task);
            }
        }
    }
    Ok(tasks)
}

/// Totals of the current snapshot, counted from its live entries.
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    records: u64,
    files: u64,
    size: u64,
}

/// What one run will rewrite.
struct Plan {
    /// Partitions to compact, oldest first; each its small files in cursor order.
    partitions: Vec<Vec<Live>>,
    manifests: Vec<ManifestFile>,
    /// Manifests whose entries are written again (EXISTING or DELETED).
    merged: HashSet<String>,
    merge_all: bool,
    /// The live entries of the merged manifests.
    entries: Vec<Live>,
    target_size: u64,
    small_files: usize,
    totals: Totals,
    /// Every live data file of the default spec.
    all: Vec<Live>,
    /// Each manifest's live entries.
    of_manifest: HashMap<String, Vec<Live>>,
    /// Manifests of the default spec.
    default_spec: HashSet<String>,
}

impl Plan {
    fn replaced(&self) -> impl Iterator<Item = &Live> {
        self.partitions.iter().flatten()
    }

    fn merged_entries(&self) -> impl Iterator<Item = &Live> {
        self.entries.iter()
    }

    /// The files `paths` (all live, else nothing is done), one group per partition, in cursor
    /// order; manifests merged as a compaction does.
    async fn for_files(
        table: &Table,
        cfg: &TableConfig,
        limits: CatalogLimits,
        paths: &HashSet<String>,
    ) -> Result<std::result::Result<Plan, String>> {
        let policy =
            CompactionPolicy { target_size: 128 << 20, after: Duration::ZERO, max_bytes: 0, manifests_max: usize::MAX };
        let mut plan = match Plan::make(table, cfg, policy, limits).await? {
            Ok(p) => p,
            Err(why) => return Ok(Err(why)),
        };
        let mut by_partition: HashMap<Struct, Vec<Live>> = HashMap::new();
        for live in plan.all.drain(..).filter(|l| paths.contains(l.file.file_path())) {
            by_partition.entry(live.file.partition().clone()).or_default().push(live);
        }
        let found: usize = by_partition.values().map(Vec::len).sum();
        if found != paths.len() {
            return Ok(Err(format!(
                "{} of the {} files to rewrite are no longer live; run again",
                paths.len() - found,
                paths.len()
            )));
        }
        let mut partitions: Vec<Vec<Live>> = by_partition.into_values().collect();
        for p in &mut partitions {
            p.sort_by_key(|l| l.cursor.map(|c| c.0));
        }
        partitions.sort_by_key(|p| p.first().and_then(|l| l.cursor.map(|c| c.0)));
        plan.select(partitions);
        Ok(Ok(plan))
    }

    /// Which manifests a replace of `partitions`' files rewrites, and their live entries.
    fn select(&mut self, partitions: Vec<Vec<Live>>) {
        let replaced: HashSet<String> = partitions.iter().flatten().map(|l| l.file.file_path().to_string()).collect();
        self.merged = self
            .of_manifest
            .iter()
            .filter(|(path, ls)| {
                self.default_spec.contains(*path)
                    && (self.merge_all || ls.iter().any(|l| replaced.contains(l.file.file_path())))
            })
            .map(|(path, _)| path.clone())
            .collect();
        self.entries = self.merged.iter().flat_map(|p| self.of_manifest.get(p).cloned().unwrap_or_default()).collect();
        self.partitions = partitions;
    }

    /// `Ok(Err(why))`: nothing can be compacted for a reason worth reporting.
    async fn make(
        table: &Table,
        cfg: &TableConfig,
        policy: CompactionPolicy,
        limits: CatalogLimits,
    ) -> Result<std::result::Result<Plan, String>> {
        let meta = table.metadata();
        if meta.format_version() != FormatVersion::V2 {
            return Ok(Err(format!("format version {} tables are not compacted yet (v2 only)", meta.format_version())));
        }
        let Some(snapshot) = meta.current_snapshot() else { return Ok(Err("the table has no snapshot".into())) };
        let view = TableView::of(table.clone())?;
        let Some(w) = view.watermark else { return Ok(Err("the table has no watermark yet".into())) };
        let manifests = read_manifest_list(table, snapshot, limits.storage).await?;
        if manifests.iter().any(|m| m.content == ManifestContentType::Deletes) {
            return Ok(Err("the table has delete files (written by another engine): not compacted".into()));
        }
        let cursor_id = meta.current_schema().field_by_name(&cfg.cursor).map(|f| f.id);
        let spec_id = meta.default_partition_spec_id();
        let target_size = meta
            .properties()
            .get("write.target-file-size-bytes")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(policy.target_size);
        let entries = match LiveEntries::read(table, &manifests, snapshot.snapshot_id(), cursor_id, spec_id).await? {
            Ok(entries) => entries,
            Err(why) => return Ok(Err(why)),
        };
        let closed_before = w.cursor_ns.saturating_sub(policy.after.as_nanos() as i64);
        let (candidates, small_files) = closed_small_files(entries.by_partition, closed_before, target_size);
        let partitions = within_budget(candidates, policy.max_bytes);
        let merge_all = manifests.iter().filter(|m| m.partition_spec_id == spec_id).count() > policy.manifests_max;
        let default_spec: HashSet<String> =
            manifests.iter().filter(|m| m.partition_spec_id == spec_id).map(|m| m.manifest_path.clone()).collect();
        let mut plan = Plan {
            partitions: vec![],
            manifests,
            merged: HashSet::new(),
            merge_all,
            entries: vec![],
            target_size,
            small_files,
            totals: entries.totals,
            all: entries.all,
            of_manifest: entries.of_manifest,
            default_spec,
        };
        plan.select(partitions);
        Ok(Ok(plan))
    }
}

/// The manifests of `snapshot`, from its manifest list.
async fn read_manifest_list(table: &Table, snapshot: &Snapshot, limit: Duration) -> Result<Vec<ManifestFile>> {
    let meta = table.metadata();
    let io = table.file_io();
    let bytes = tokio::time::timeout(limit, io.new_input(snapshot.manifest_list())?.read())
        .await
        .map_err(|_| OffloadError::Timeout(limit))??;
    Ok(ManifestList::parse_with_version(&bytes, meta.format_version())?.entries().to_vec())
}

/// The live entries of the current snapshot's manifests.
struct LiveEntries {
    totals: Totals,
    /// The default spec's live files, by partition.
    by_partition: HashMap<Struct, Vec<Live>>,
    /// Each manifest's live entries.
    of_manifest: HashMap<String, Vec<Live>>,
    /// Every live data file of the default spec.
    all: Vec<Live>,
}

impl LiveEntries {
    /// Loads every manifest. `Ok(Err(why))`: the table has delete files, and is not compacted.
    async fn read(
        table: &Table,
        manifests: &[ManifestFile],
        snapshot_id: i64,
        cursor_id: Option<i32>,
        spec_id: i32,
    ) -> Result<std::result::Result<Self, String>> {
        let io = table.file_io();
        let mut totals = Totals::default();
        let mut by_partition: HashMap<Struct, Vec<Live>> = HashMap::new();
        let mut of_manifest: HashMap<String, Vec<Live>> = HashMap::new();
        let mut all: Vec<Live> = vec![];
        for m in manifests {
            let manifest = m.load_manifest(io).await?;
            for e in manifest.entries().iter().filter(|e| e.is_alive()) {
                let file = e.data_file().clone();
                if file.content_type() != DataContentType::Data {
                    return Ok(Err("the table has delete files (written by another engine): not compacted".into()));
                }
                totals.records += file.record_count();
                totals.files += 1;
                totals.size += file.file_size_in_bytes();
                let live = Live {
                    cursor: cursor_id.and_then(|id| {
                        Some((
                            crate::sink::days::cursor_ns(file.lower_bounds().get(&id)?)?,
                            crate::sink::days::cursor_ns(file.upper_bounds().get(&id)?)?,
                        ))
                    }),
                    snapshot_id: e.snapshot_id().unwrap_or(snapshot_id),
                    sequence_number: e.sequence_number().unwrap_or(0),
                    file_sequence_number: e.file_sequence_number,
                    file,
                };
                if m.partition_spec_id == spec_id {
                    by_partition.entry(live.file.partition().clone()).or_default().push(live.clone());
                    all.push(live.clone());
                }
                of_manifest.entry(m.manifest_path.clone()).or_default().push(live);
            }
        }
        Ok(Ok(LiveEntries { totals, by_partition, of_manifest, all }))
    }
}

/// The closed partitions (every file's rows older than `closed_before`) with two small files
/// or more (under ¾ of `target_size`): their small files in cursor order, oldest partition
/// first. Also returns how many small files the closed partitions hold.
fn closed_small_files(
    by_partition: HashMap<Struct, Vec<Live>>,
    closed_before: i64,
    target_size: u64,
) -> (Vec<Vec<Live>>, usize) {
    let small = |l: &Live| l.file.file_size_in_bytes() * 4 < target_size * 3;
    let mut candidates: Vec<Vec<Live>> = vec![];
    let mut small_files = 0;
    for files in by_partition.into_values() {
        let closed = files.iter().all(|l| l.cursor.is_some_and(|(_, hi)| hi < closed_before));
        if !closed {
            continue;
        }
        let mut smalls: Vec<Live> = files.into_iter().filter(small).collect();
        small_files += smalls.len();
        if smalls.len() >= 2 {
            smalls.sort_by_key(|l| l.cursor.map(|c| c.0));
            candidates.push(smalls);
        }
    }
    candidates.sort_by_key(|p| p.first().and_then(|l| l.cursor.map(|c| c.0)));
    (candidates, small_files)
}

/// The candidate partitions, oldest first, that fit in `max_bytes` rewritten.
fn within_budget(candidates: Vec<Vec<Live>>, max_bytes: u64) -> Vec<Vec<Live>> {
    let mut partitions = vec![];
    let mut budget = max_bytes;
    for p in candidates {
        let size: u64 = p.iter().map(|l| l.file.file_size_in_bytes()).sum();
        // The first partition goes even past the budget (else a huge one never would);
        // a budget of 0 is a manifest-only run.
        if max_bytes == 0 || (!partitions.is_empty() && size > budget) {
            break;
        }
        budget = budget.saturating_sub(size);
        partitions.push(p);
    }
    partitions
}

/// A snapshot id not in the table (positive, as Java's).
fn new_snapshot_id(meta: &iceberg::spec::TableMetadata) -> i64 {
    loop {
        let id = (rand::random::<u64>() >> 1) as i64;
        if id != 0 && meta.snapshot_by_id(id).is_none() {
            return id;
        }
    }
}

/// The files of compactions whose outcome is not known yet: they may still land, so no orphan
/// scan may take them.
pub async fn pending_files(table: &Table, limit: Duration) -> Vec<String> {
    Records::load(table, limit).await.0.into_iter().flat_map(|r| r.written).collect()
}

/// The compactions whose outcome is not known yet, in `offload/compaction.json`.
#[derive(Debug, Default)]
struct Records(Vec<Record>);

impl Records {
    /// Best effort: an unreadable file is reported and its files left to `cleanup`.
    async fn load(table: &Table, limit: Duration) -> Self {
        let read = async { table.file_io().new_input(record_path(table))?.read().await };
        let Ok(Ok(bytes)) = tokio::time::timeout(limit, read).await else { return Self::default() };
        match serde_json::from_slice::<Vec<Record>>(&bytes) {
            Ok(records) => Self(records),
            Err(e) => {
                tracing::warn!(table = %table.identifier(), "the compaction record cannot be read ({e}); its files are left to `cleanup`");
                Self::default()
            }
        }
    }

    /// Decides each from `table`: landed, or never (the table moved past its fence: its
    /// files go), or still unknown (kept).
    async fn settle(&mut self, table: &Table, limit: Duration) {
        let meta = table.metadata();
        let before = self.0.len();
        let mut kept = vec![];
        for record in std::mem::take(&mut self.0) {
            let landed = meta.snapshot_by_id(record.snapshot_id).map(|s| s.snapshot_id());
            match fate(meta, landed, record.required_snapshot) {
                Resolution::Committed(_) => {}
                Resolution::Pending => kept.push(record),
                Resolution::Impossible => {
                    AttemptFiles { table, run_id: &record.run_id, paths: &record.written, limit }.discard().await;
                }
                // It may have landed and its snapshot expired since: its files may be live.
                // Nothing is deleted; what no snapshot references goes with `cleanup`.
                Resolution::Undecidable => tracing::warn!(table = %table.identifier(), run_id = %record.run_id,
                    "a compaction's outcome cannot be proven (history expired); its files are left to `cleanup`"),
            }
        }
        self.0 = kept;
        if self.0.len() != before {
            self.save(table, limit).await.ok();
        }
    }

    /// Written before any file is, and again with every file before the commit is sent
    /// (write-ahead, like the attempt journal, I5).
    async fn put(&mut self, table: &Table, record: Record, limit: Duration) -> Result<()> {
        self.0.retain(|r| r.run_id != record.run_id);
        self.0.push(record);
        self.save(table, limit).await
    }

    fn files_of(&self, run_id: &str) -> Vec<String> {
        self.0.iter().filter(|r| r.run_id == run_id).flat_map(|r| r.written.clone()).collect()
    }

    async fn forget(&mut self, table: &Table, run_id: &str, limit: Duration) {
        self.0.retain(|r| r.run_id != run_id);
        self.save(table, limit).await.ok();
    }

    async fn save(&self, table: &Table, limit: Duration) -> Result<()> {
        let io = table.file_io();
        let path = record_path(table);
        let write = async {
            if self.0.is_empty() {
                io.delete(&path).await
            } else {
                io.new_output(&path)?.write(serde_json::to_vec(&self.0).expect("serialisable").into()).await
            }
        };
        match tokio::time::timeout(limit, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::warn!(table = %table.identifier(), "cannot write the compaction record: {e}");
                Err(e.into())
            }
            Err(_) => Err(OffloadError::Timeout(limit)),
        }
    }
}
