//! The exactly-once commit protocol.
//!
//! This module is the specification in `shared/design/exactly-once.md` turned into code;
//! each step names the invariant it keeps.
//!
//! - **I1 Deterministic windows** — [`plan_window`]: a window is `(W(k-1), W(k)]` on the
//!   position `(cursor, tiebreak)`. `W(k)` is fixed at planning, never later than
//!   `now − settle_delay`, and bounded to `max_rows_per_commit` rows and to
//!   `max_partitions_per_commit` partitions of a time-partitioned cursor.
//! - **I2 One door in** — [`commit_window`] is the only code that appends: one snapshot
//!   carrying the window's files and, atomically, the watermark (table properties
//!   [`PROP_WATERMARK`] and [`PROP_POSITION`], plus summary markers).
//! - **I3 Iceberg is the truth** — [`TableView::load`] reads `W` from the table's current
//!   metadata at the start of every attempt.
//! - **I4 Fenced commit** — the commit goes through [`PinnedCatalog`], so iceberg-rust
//!   cannot silently rebase it onto a newer snapshot: the catalog's compare-and-swap
//!   requires the snapshot whose `W` we read, and a conflict is final for this attempt.
//! - **I5 Unknown outcome resolved** — after any commit error the table is reloaded and
//!   searched for this attempt's run id before anything else happens; a reported success
//!   is confirmed the same way, because iceberg-catalog-sql can report a lost SQL COMMIT
//!   as a success ([`confirm_reported_success`]).
//! - **I6** (lease) lives in the state store; **I7** (mirror after truth) in the scheduler.
//! - **I8 Nothing stray** — an attempt that did not commit deletes its data files, and
//!   [`sweep_stray_metadata`] deletes metadata files that lost a compare-and-swap, which
//!   directory readers (ClickHouse `icebergLocal()`) would otherwise take as current.
//! - **I9 Late rows** — rows arriving at or below `W` after their window committed are
//!   not in the table; [`late_rows`] counts them against the source.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use iceberg::spec::{DataFile, ManifestList};
use iceberg::table::Table;
use iceberg::transaction::{ApplyTransactionAction, Transaction};
use iceberg::{Catalog, Namespace, NamespaceIdent, TableCommit, TableCreation, TableIdent};
use serde::{Deserialize, Serialize};

use crate::error::{OffloadError, Result};
use crate::source::ClickHouse;
use crate::source::query::SourceTable;
use crate::util::format_epoch_ns;

/// Table property: the watermark as RFC 3339 UTC (for people).
pub const PROP_WATERMARK: &str = "offload.watermark";
/// Table property: the exact watermark position, JSON (for the service).
pub const PROP_POSITION: &str = "offload.watermark.position";
/// Snapshot summary markers.
pub const SUMMARY_RUN_ID: &str = "offload.run-id";
pub const SUMMARY_WINDOW_LO: &str = "offload.window-lo";
pub const SUMMARY_WINDOW_HI: &str = "offload.window-hi";
pub const SUMMARY_ROWS: &str = "offload.rows";
pub const SUMMARY_SOURCE: &str = "offload.source";

/// A position in a source table: the cursor (ns since the epoch, UTC) and, when the
/// table has a tiebreak column, its value. `tiebreak: None` means "every row at this cursor".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub cursor_ns: i64,
    pub tiebreak: Option<String>,
}

impl Position {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("position serialises")
    }
    pub fn display(&self) -> String {
        match &self.tiebreak {
            Some(t) => format!("{} #{t}", format_epoch_ns(self.cursor_ns)),
            None => format_epoch_ns(self.cursor_ns),
        }
    }
}

/// What one attempt read from Iceberg (I3): the table as of one snapshot and its watermark.
#[derive(Debug, Clone)]
pub struct TableView {
    pub table: Table,
    pub watermark: Option<Position>,
}

impl TableView {
    /// I3: load the table and read `W` from its current metadata.
    pub async fn load(catalog: &Arc<dyn Catalog>, ident: &TableIdent) -> Result<Self> {
        let table = catalog.load_table(ident).await?;
        Self::of(table)
    }

    pub fn of(table: Table) -> Result<Self> {
        let watermark = match table.metadata().properties().get(PROP_POSITION) {
            None => None,
            Some(json) => Some(serde_json::from_str(json).map_err(|e| OffloadError::Schema {
                table: table.identifier().to_string(),
                message: format!("table property {PROP_POSITION} = {json:?} is not a watermark position: {e}"),
            })?),
        };
        Ok(Self { table, watermark })
    }

    pub fn snapshot_id(&self) -> Option<i64> {
        self.table.metadata().current_snapshot().map(|s| s.snapshot_id())
    }
}

/// One planned window: rows with `lo < position <= hi`.
#[derive(Debug, Clone)]
pub struct Window {
    pub lo: Option<Position>,
    pub hi: Position,
    pub planned_rows: u64,
    /// Whether the window was cut by `max_rows_per_commit` (more rows are already settled).
    pub bounded: bool,
}

/// I1: plans the next window after `lo`, or `None` when no settled row is waiting.
pub async fn plan_window(
    source: &SourceTable,
    ch: &ClickHouse,
    lo: Option<&Position>,
    now_ns: i64,
) -> Result<Option<Window>> {
    let settle_ns = source.table.settle_delay.as_nanos() as i64;
    // Whole milliseconds keep watermarks readable; any precision would be correct.
    let limit_ns = (now_ns - settle_ns).div_euclid(1_000_000) * 1_000_000;
    if lo.is_some_and(|lo| lo.cursor_ns >= limit_ns) {
        return Ok(None);
    }
    let mut limit = Position { cursor_ns: limit_ns, tiebreak: None };
    let (mut rows, first_ns) = source.count_and_first(ch, lo, &limit).await?;
    let Some(first_ns) = first_ns else { return Ok(None) };
    // Flat memory: a window keeps one Parquet writer open per partition it touches, and a
    // backfill's rows arrive interleaved across days (ClickHouse reads in its own sort order).
    // So a window spans at most `max_partitions_per_commit` partitions of a time transform
    // of the cursor; the rest of the backlog follows in the next windows.
    let mut capped = false;
    if let Some(end_ns) = source.table.partition_span_end_ns(first_ns)
        && end_ns <= limit.cursor_ns
    {
        limit = Position { cursor_ns: end_ns - 1, tiebreak: None };
        rows = source.count(ch, lo, &limit).await?;
        capped = true;
    }
    let max = source.table.max_rows_per_commit;
    if rows <= max {
        return Ok(Some(Window { lo: lo.cloned(), hi: limit, planned_rows: rows, bounded: capped }));
    }
    let hi = source.nth_position(ch, lo, &limit, max).await?;
    // Without a tiebreak every row at the cut's cursor value is included, so count again.
    let planned_rows = if hi.tiebreak.is_some() { max } else { source.count(ch, lo, &hi).await? };
    Ok(Some(Window { lo: lo.cloned(), hi, planned_rows, bounded: true }))
}

/// Identifies one commit attempt; its run id is the marker looked for in I5.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub run_id: String,
    pub source: String,
}

#[derive(Debug, Clone)]
pub struct Committed {
    pub snapshot_id: i64,
    /// True when the commit call failed but I5 found our snapshot in the table.
    pub resolved_after_error: bool,
    pub table: Table,
}

/// I2 + I4 + I5 + I8: commits one window's files and watermark in one fenced snapshot.
pub async fn commit_window(
    catalog: &Arc<dyn Catalog>,
    view: &TableView,
    files: Vec<DataFile>,
    window: &Window,
    rows: u64,
    attempt: &Attempt,
) -> Result<Committed> {
    let ident = view.table.identifier().clone();
    let paths: Vec<String> = files.iter().map(|f| f.file_path().to_string()).collect();
    let summary = HashMap::from([
        (SUMMARY_RUN_ID.to_string(), attempt.run_id.clone()),
        (PROP_WATERMARK.to_string(), format_epoch_ns(window.hi.cursor_ns)),
        (PROP_POSITION.to_string(), window.hi.to_json()),
        (SUMMARY_WINDOW_LO.to_string(), window.lo.as_ref().map(Position::to_json).unwrap_or_else(|| "null".into())),
        (SUMMARY_WINDOW_HI.to_string(), window.hi.to_json()),
        (SUMMARY_ROWS.to_string(), rows.to_string()),
        (SUMMARY_SOURCE.to_string(), attempt.source.clone()),
    ]);
    let tx = Transaction::new(&view.table);
    let tx = tx
        .update_table_properties()
        .set(PROP_WATERMARK.to_string(), format_epoch_ns(window.hi.cursor_ns))
        .set(PROP_POSITION.to_string(), window.hi.to_json())
        .apply(tx)?;
    // File names are unique per attempt, so the duplicate check (which reads every
    // manifest of the table) is unnecessary.
    let tx = tx
        .fast_append()
        .with_check_duplicate(false)
        .add_data_files(files)
        .set_snapshot_properties(summary)
        .apply(tx)?;
    let pinned: Arc<dyn Catalog> = Arc::new(PinnedCatalog { inner: catalog.clone(), pinned: view.table.clone() });
    let commit_error = match tx.commit(pinned.as_ref()).await {
        Ok(table) => return confirm_reported_success(catalog, table, &paths, attempt).await,
        Err(e) => e,
    };
    // I5: the outcome is unknown until the table says otherwise.
    let reloaded = match catalog.load_table(&ident).await {
        Ok(t) => t,
        Err(reload) => {
            // Cannot tell: keep the files (they are unreferenced and invisible unless our
            // commit landed); the next attempt starts at I3 and finds out.
            return Err(OffloadError::CatalogUnreachable(format!(
                "commit of {ident} failed ({commit_error}) and the table could not be reloaded to resolve it: {reload}"
            )));
        }
    };
    if let Some(snapshot) = find_snapshot_of_run(&reloaded, &attempt.run_id) {
        tracing::warn!(table = %ident, run_id = %attempt.run_id, snapshot_id = snapshot,
            "commit reported an error but the snapshot is in the table: resolved as committed ({commit_error})");
        sweep_stray_metadata(&reloaded).await;
        return Ok(Committed { snapshot_id: snapshot, resolved_after_error: true, table: reloaded });
    }
    // Not committed: I8, remove what this attempt wrote.
    delete_files(&reloaded, &paths).await;
    sweep_stray_metadata(&reloaded).await;
    let moved = reloaded.metadata().current_snapshot().map(|s| s.snapshot_id()) != view.snapshot_id();
    if moved || commit_error.kind() == iceberg::ErrorKind::CatalogCommitConflicts {
        return Err(OffloadError::CommitConflict { table: ident.to_string(), message: commit_error.to_string() });
    }
    Err(commit_error.into())
}

/// I5 for a reported success as well: iceberg-catalog-sql ignores the error of its SQL COMMIT
/// (rust-stack.md §8.8), so a success only counts once the catalog, read again, holds our
/// snapshot. If it cannot be read again the success is trusted: the next attempt starts at
/// I3 from whatever the table really holds, so a wrong guess costs a metric, never a row.
async fn confirm_reported_success(
    catalog: &Arc<dyn Catalog>,
    reported: Table,
    paths: &[String],
    attempt: &Attempt,
) -> Result<Committed> {
    let ident = reported.identifier().clone();
    let table = match catalog.load_table(&ident).await {
        Ok(current) => current,
        Err(e) => {
            tracing::warn!(table = %ident, "commit reported success; the catalog could not be read again to confirm it: {e}");
            reported.clone()
        }
    };
    match find_snapshot_of_run(&table, &attempt.run_id) {
        Some(snapshot_id) => {
            sweep_stray_metadata(&table).await;
            Ok(Committed { snapshot_id, resolved_after_error: false, table })
        }
        None => {
            // I8: the attempt's files are referenced by nothing the catalog holds: its data
            // files, and the manifests and manifest list of the snapshot it reported.
            delete_files(&table, paths).await;
            if let Some(lost) = find_snapshot_of_run(&reported, &attempt.run_id) {
                delete_files(&table, &snapshot_own_files(&reported, lost).await).await;
            }
            // The metadata file the catalog wrote before its lost SQL COMMIT: a directory
            // reader would take it as current. Deleted by path, so on object stores too.
            if let Some(stray) = reported.metadata_location()
                && Some(stray) != table.metadata_location()
            {
                delete_files(&table, &[stray.to_string()]).await;
            }
            sweep_stray_metadata(&table).await;
            Err(OffloadError::CommitNotPersisted { table: ident.to_string() })
        }
    }
}

/// The manifest list of `snapshot_id` and the manifests it added (best effort: what cannot be
/// read is left to `iceberg-offload cleanup`).
async fn snapshot_own_files(table: &Table, snapshot_id: i64) -> Vec<String> {
    let meta = table.metadata();
    let Some(snapshot) = meta.snapshot_by_id(snapshot_id) else { return vec![] };
    let list_path = snapshot.manifest_list().to_string();
    let list = match table.file_io().new_input(&list_path) {
        Ok(input) => match input.read().await {
            Ok(bytes) => ManifestList::parse_with_version(&bytes, meta.format_version()).ok(),
            Err(_) => None,
        },
        Err(_) => None,
    };
    let mut files: Vec<String> = list
        .iter()
        .flat_map(|l| l.entries())
        .filter(|m| m.added_snapshot_id == snapshot_id)
        .map(|m| m.manifest_path.clone())
        .collect();
    files.push(list_path);
    files
}

/// The snapshot whose summary carries this run id, if any.
pub fn find_snapshot_of_run(table: &Table, run_id: &str) -> Option<i64> {
    table
        .metadata()
        .snapshots()
        .find(|s| s.summary().additional_properties.get(SUMMARY_RUN_ID).map(String::as_str) == Some(run_id))
        .map(|s| s.snapshot_id())
}

/// I8: deletes data files of an attempt that did not commit.
pub async fn delete_files(table: &Table, paths: &[String]) {
    for p in paths {
        if let Err(e) = table.file_io().delete(p).await {
            tracing::warn!(table = %table.identifier(), path = %p, "could not delete a file of a failed attempt: {e}");
        }
    }
}

/// I8: deletes `*.metadata.json` files that are not the table's history: those of a
/// commit that lost its compare-and-swap (version ≤ current, never current) and those of
/// a writer that died before its swap (version > current, older than an hour, which no
/// live commit can be). Local warehouses only (object stores are not listed by readers
/// the same way).
pub async fn sweep_stray_metadata(table: &Table) -> usize {
    let Some(current) = table.metadata_location() else { return 0 };
    let Some(dir) = current
        .strip_prefix("file://")
        .or_else(|| current.strip_prefix("file:"))
        .and_then(|p| std::path::Path::new(p).parent().map(|d| d.to_path_buf()))
    else {
        return 0;
    };
    let keep: std::collections::HashSet<String> = table
        .metadata()
        .metadata_log()
        .iter()
        .map(|m| file_name(&m.metadata_file))
        .chain(std::iter::once(file_name(current)))
        .collect();
    let current_version = version_of(&file_name(current)).unwrap_or(0);
    let Ok(entries) = std::fs::read_dir(&dir) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !name.ends_with(".metadata.json") || keep.contains(&name) {
            continue;
        }
        let Some(version) = version_of(&name) else { continue };
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .map(|t| t.elapsed().unwrap_or_default() > std::time::Duration::from_secs(3600))
            .unwrap_or(false);
        if version <= current_version || old {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {
                    removed += 1;
                    tracing::info!(table = %table.identifier(), file = %name, "removed stray metadata file (lost or abandoned commit)");
                }
                Err(e) => {
                    tracing::warn!(table = %table.identifier(), file = %name, "could not remove stray metadata file: {e}")
                }
            }
        }
    }
    removed
}

fn file_name(path: &str) -> String {
    path.rsplit('/').next().unwrap_or(path).to_string()
}

fn version_of(name: &str) -> Option<u64> {
    name.split(['-', '.']).next()?.trim_start_matches('v').parse().ok()
}

/// I9: rows at or below the watermark that are in the source but not in the table, for
/// windows already committed: source count up to `W` minus the table's total records.
pub async fn late_rows(source: &SourceTable, ch: &ClickHouse, view: &TableView) -> Result<Option<i64>> {
    let Some(w) = &view.watermark else { return Ok(None) };
    let Some(snapshot) = view.table.metadata().current_snapshot() else { return Ok(None) };
    let Some(total) = snapshot.summary().additional_properties.get("total-records").and_then(|v| v.parse::<i64>().ok())
    else {
        return Ok(None);
    };
    let in_source = source.count(ch, None, w).await? as i64;
    Ok(Some(in_source - total))
}

/// I4: a catalog whose `load_table` returns the table exactly as the attempt read it.
///
/// iceberg-rust's `Transaction::commit` reloads the table and re-applies its actions on
/// the newest metadata, which silently rebases a stale append. With this decorator the
/// reload returns our pinned view, so the commit's requirements name the snapshot we
/// read, and the catalog's compare-and-swap refuses it if anything was committed since.
/// Conflicts are marked non-retryable: retrying a pinned commit can never succeed.
#[derive(Debug)]
pub struct PinnedCatalog {
    inner: Arc<dyn Catalog>,
    pinned: Table,
}

#[async_trait]
impl Catalog for PinnedCatalog {
    async fn list_namespaces(&self, parent: Option<&NamespaceIdent>) -> iceberg::Result<Vec<NamespaceIdent>> {
        self.inner.list_namespaces(parent).await
    }
    async fn create_namespace(
        &self,
        ns: &NamespaceIdent,
        props: HashMap<String, String>,
    ) -> iceberg::Result<Namespace> {
        self.inner.create_namespace(ns, props).await
    }
    async fn get_namespace(&self, ns: &NamespaceIdent) -> iceberg::Result<Namespace> {
        self.inner.get_namespace(ns).await
    }
    async fn namespace_exists(&self, ns: &NamespaceIdent) -> iceberg::Result<bool> {
        self.inner.namespace_exists(ns).await
    }
    async fn update_namespace(&self, ns: &NamespaceIdent, props: HashMap<String, String>) -> iceberg::Result<()> {
        self.inner.update_namespace(ns, props).await
    }
    async fn drop_namespace(&self, ns: &NamespaceIdent) -> iceberg::Result<()> {
        self.inner.drop_namespace(ns).await
    }
    async fn list_tables(&self, ns: &NamespaceIdent) -> iceberg::Result<Vec<TableIdent>> {
        self.inner.list_tables(ns).await
    }
    async fn create_table(&self, ns: &NamespaceIdent, creation: TableCreation) -> iceberg::Result<Table> {
        self.inner.create_table(ns, creation).await
    }
    async fn load_table(&self, table: &TableIdent) -> iceberg::Result<Table> {
        if table == self.pinned.identifier() { Ok(self.pinned.clone()) } else { self.inner.load_table(table).await }
    }
    async fn drop_table(&self, table: &TableIdent) -> iceberg::Result<()> {
        self.inner.drop_table(table).await
    }
    async fn purge_table(&self, table: &TableIdent) -> iceberg::Result<()> {
        self.inner.purge_table(table).await
    }
    async fn table_exists(&self, table: &TableIdent) -> iceberg::Result<bool> {
        self.inner.table_exists(table).await
    }
    async fn rename_table(&self, src: &TableIdent, dest: &TableIdent) -> iceberg::Result<()> {
        self.inner.rename_table(src, dest).await
    }
    async fn register_table(&self, table: &TableIdent, location: String) -> iceberg::Result<Table> {
        self.inner.register_table(table, location).await
    }
    async fn update_table(&self, commit: TableCommit) -> iceberg::Result<Table> {
        crate::fault::hit_iceberg("commit_error")?;
        if crate::fault::hit("commit_lost").is_err() {
            // What iceberg-catalog-sql does when its SQL COMMIT fails: report the staged
            // table as committed although nothing was persisted.
            return commit.apply(self.pinned.clone());
        }
        let table = self.inner.update_table(commit).await.map_err(|e| {
            if e.kind() == iceberg::ErrorKind::CatalogCommitConflicts { e.with_retryable(false) } else { e }
        })?;
        crate::fault::hit_iceberg("commit_unknown")?;
        Ok(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_versions_parse() {
        assert_eq!(version_of("00012-1b2c.metadata.json"), Some(12));
        assert_eq!(version_of("v3.metadata.json"), Some(3));
        assert_eq!(version_of("snap-1.avro"), None);
    }

    #[test]
    fn positions_round_trip() {
        let p = Position { cursor_ns: 1_700_000_000_123_000_000, tiebreak: Some("42".into()) };
        assert_eq!(serde_json::from_str::<Position>(&p.to_json()).unwrap(), p);
        assert_eq!(p.display(), "2023-11-14T22:13:20.123000000Z #42");
    }
}
