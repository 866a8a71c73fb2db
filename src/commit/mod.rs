//! The exactly-once commit protocol.
//!
//! This module is the specification in `docs/exactly-once.md` turned into code; each step
//! names the invariant it keeps. One window goes through it in this order:
//!
//! 1. **I3 Iceberg's history is the truth** — [`TableView::load`] reads `W` from the newest
//!    snapshot of the current ancestry that carries our marker ([`view`]).
//! 2. **I5 Unknown stays unknown until proven** — [`Journal::settle`] resolves the attempts
//!    earlier runs left pending (committed, can never land, or still pending) before
//!    anything else; only those that can never land lose their files ([`journal`]).
//! 3. **I1 Deterministic windows** — [`plan_window`] fixes `(W(k-1), W(k)]` before anything
//!    is read: never later than `now − settle_delay`, bounded in rows and partitions.
//! 4. **I2 One door in** — [`commit_window`] is the only code that appends: one snapshot
//!    with the window's files and, atomically, `W(k)` (summary markers and the table
//!    property [`PROP_POSITION`] as a fallback).
//! 5. **I4 Fenced commit** — through [`PinnedCatalog`], the catalog's compare-and-swap
//!    requires the snapshot whose `W` was read; a stale writer is refused, never rebased.
//! 6. **I5** again — the attempt is written to the journal *before* its commit is sent. A
//!    definite refusal deletes its files at once; every other failure (5xx, timeout,
//!    dropped connection, a success the catalog does not show when read again) leaves it
//!    pending, its files kept ([`Failure`]).
//! 7. **I8 Nothing stray** — files of an attempt that can never land are deleted, and a
//!    metadata file written for it is found by its run id and removed ([`files`]).
//! 8. **I10 Time-bounded** — the commit has `catalog.commit_timeout`; every other catalog
//!    and storage call has its own limit ([`CommitLimits`]).
//!
//! I6 (lease) lives in the state store, I7 (mirror after truth) in the offload of a table,
//! I9 (late rows) in [`crate::audit`].

pub mod files;
pub mod journal;
pub mod pinned;
pub mod replace;
pub mod view;

use std::collections::HashMap;
use std::sync::Arc;

use iceberg::spec::{DataFile, ManifestList};
use iceberg::table::Table;
use iceberg::transaction::{ApplyTransactionAction, Transaction};
use iceberg::{Catalog, ErrorKind};

pub use self::files::{AttemptFiles, delete_dropped_metadata, delete_paths, sweep_dead_metadata};
pub use self::journal::{Journal, PendingAttempt, Resolution, Settled, fate, resolve, snapshot_of_run};
pub use self::pinned::PinnedCatalog;
pub use self::view::{MeasuredOn, TableView, WatermarkOrigin};
use crate::config::CatalogLimits as CommitLimits;
use crate::error::{OffloadError, PendingCause, Result, catalog_timed_out, cause_of, is_connection_error};
pub use crate::sink::table::DELETE_AFTER_COMMIT;
use crate::source::ClickHouse;
use crate::source::query::SourceTable;
pub use crate::window::{CursorUnit, Measure, Position, Window};

/// Table property: the watermark as RFC 3339 UTC (for people).
pub const PROP_WATERMARK: &str = "offload.watermark";
/// Table property and snapshot-summary marker: the exact watermark position, JSON.
pub const PROP_POSITION: &str = "offload.watermark.position";
/// Snapshot summary markers.
pub const SUMMARY_RUN_ID: &str = "offload.run-id";
pub const SUMMARY_WINDOW_LO: &str = "offload.window-lo";
pub const SUMMARY_WINDOW_HI: &str = "offload.window-hi";
pub const SUMMARY_ROWS: &str = "offload.rows";
pub const SUMMARY_SOURCE: &str = "offload.source";
/// Snapshot summary marker and table property: what `W` was measured on (I11).
pub const PROP_MEASURE: &str = "offload.measure";
/// Snapshot summary marker of a watermark moved by an operator (`watermark set`).
pub const SUMMARY_MOVED: &str = "offload.watermark-moved";
/// Snapshot summary marker and table property of a table taken over from another pipeline
/// (`adopt`): the metadata file it was registered from.
pub const SUMMARY_ADOPTED_FROM: &str = "offload.adopted-from";
/// Table property: every range an operator moved `W` over, JSON `[Move]`. Kept in the
/// properties because snapshots expire: the audit (I9) leaves these rows out for good.
pub const PROP_MOVES: &str = "offload.watermark-moves";

/// A range `(lo, hi]` an operator moved `W` over, and what `hi` was measured on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Move {
    pub lo: Option<Position>,
    pub hi: Position,
    pub measure: crate::window::Measure,
    /// What `lo` was measured on (another measure when the move re-recorded `W`, I11).
    #[serde(default)]
    pub lo_measure: Option<crate::window::Measure>,
}

/// The moves recorded in a table's properties (an unreadable list reads as none).
pub fn recorded_moves(meta: &iceberg::spec::TableMetadata) -> Vec<Move> {
    meta.properties().get(PROP_MOVES).and_then(|j| serde_json::from_str(j).ok()).unwrap_or_default()
}

/// I1: plans the next window after `lo`, or `None` when no settled row is waiting. `now_ns`
/// is the source's clock (ClickHouse's `now64()`, I1), not this host's.
pub async fn plan_window(
    source: &SourceTable,
    ch: &ClickHouse,
    lo: Option<&Position>,
    now_ns: i64,
) -> Result<Option<Window>> {
    let settle_ns = source.settle_ns();
    // A cursor value counts once the whole unit it stands for (a day, a second, …) is older
    // than the settle delay (and `closed_after`, I12), on the source's clock. A date's day ends at midnight where the
    // rows are dated: ClickHouse's time zone, so ClickHouse says which day is over.
    let limit_ns = match source.unit() {
        CursorUnit::Day { .. } => source.last_settled_day(ch, settle_ns).await?,
        unit => unit.settled_limit(now_ns, settle_ns),
    };
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
    /// What the window's positions are measured on (I11).
    pub measure: Measure,
    pub kind: AttemptKind,
}

/// What a commit is for. Only a window carries rows; the other two carry `W` alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptKind {
    /// One window's rows.
    Window,
    /// An operator moving `W` on purpose (`watermark set`): marked, and the range moved over
    /// recorded so that the audit (I9) does not count its rows as missing.
    OperatorMove,
    /// The first `W` of a table another pipeline wrote (`adopt`): marked with where the table
    /// came from. The rows at or below `W` are the original's, audited like ours.
    Adoption { from: String },
}

impl Attempt {
    pub fn new(measure: Measure) -> Self {
        Self { run_id: uuid::Uuid::now_v7().to_string(), measure, kind: AttemptKind::Window }
    }
}

#[derive(Debug, Clone)]
pub struct Committed {
    pub snapshot_id: i64,
    /// True when the commit call failed but I5 found our snapshot in the table.
    pub resolved_after_error: bool,
    pub table: Table,
}

/// What the commit protocol needs besides the window: the catalog and the time limits.
#[derive(Clone)]
pub struct CommitContext {
    pub catalog: Arc<dyn Catalog>,
    pub limits: CommitLimits,
}

/// I2 + I4 + I5 + I8: commits one window's files and watermark in one fenced snapshot.
///
/// On `Ok` the window is in the table. On `Err` it is not, or not yet: a definite refusal
/// has deleted the attempt's files; an unknown outcome left them, recorded in `journal`, for
/// a later [`Journal::settle`] to resolve.
pub async fn commit_window(
    cx: &CommitContext,
    view: &TableView,
    journal: &mut Journal,
    files: Vec<DataFile>,
    window: &Window,
    rows: u64,
    attempt: &Attempt,
) -> Result<Committed> {
    let commit_uuid = uuid::Uuid::parse_str(&attempt.run_id).ok();
    let record = PendingAttempt {
        run_id: attempt.run_id.clone(),
        required_snapshot: view.snapshot_id(),
        data_files: files.iter().map(|f| f.file_path().to_string()).collect(),
        // The manifest iceberg-rust will write for this commit is named after its commit uuid,
        // which is the run id: known before the commit, so deletable on any storage.
        commit_files: commit_uuid
            .map(|u| vec![format!("{}/metadata/{u}-m0.avro", view.table.metadata().location().trim_end_matches('/'))])
            .unwrap_or_default(),
        rows,
        bytes: files.iter().map(|f| f.file_size_in_bytes()).sum(),
        window_hi: window.hi.clone(),
        started_at_ms: chrono::Utc::now().timestamp_millis(),
        cause: None,
    };
    // I5, write-ahead: a crash from here on leaves a record the next attempt resolves.
    if let Err(e) = journal.add(record.clone()).await {
        discard(cx, &view.table, &record).await;
        return Err(e);
    }
    let tx = match append(view, files, window, rows, attempt, commit_uuid) {
        Ok(tx) => tx,
        Err(e) => return not_committed(cx, &view.table, journal, &record, e).await,
    };
    let pinned = PinnedCatalog::new(cx.catalog.clone(), view.table.clone());
    let failure = match tokio::time::timeout(cx.limits.commit, tx.commit(&pinned)).await {
        Ok(Ok(reported)) => return confirm(cx, view, journal, record, reported).await,
        Ok(Err(e)) => Failure::of(e, pinned.sent()),
        Err(_) if pinned.sent() => Failure::Unknown(PendingCause::Timeout, None),
        Err(_) => Failure::NotSent(OffloadError::Timeout(cx.limits.commit)),
    };
    after_failure(cx, view, journal, record, failure).await
}

/// I2: one fast append carrying the window's files and, atomically, its watermark.
fn append(
    view: &TableView,
    files: Vec<DataFile>,
    window: &Window,
    rows: u64,
    attempt: &Attempt,
    commit_uuid: Option<uuid::Uuid>,
) -> Result<Transaction> {
    let summary = HashMap::from([
        (SUMMARY_RUN_ID.to_string(), attempt.run_id.clone()),
        (PROP_WATERMARK.to_string(), window.hi.cursor_rfc3339()),
        (PROP_POSITION.to_string(), window.hi.to_json()),
        (SUMMARY_WINDOW_LO.to_string(), window.lo.as_ref().map(Position::to_json).unwrap_or_else(|| "null".into())),
        (SUMMARY_WINDOW_HI.to_string(), window.hi.to_json()),
        (SUMMARY_ROWS.to_string(), rows.to_string()),
        (SUMMARY_SOURCE.to_string(), attempt.measure.source.clone()),
        (PROP_MEASURE.to_string(), attempt.measure.to_json()),
    ]);
    let mut summary = summary;
    match &attempt.kind {
        AttemptKind::Window => {}
        AttemptKind::OperatorMove => {
            summary.insert(SUMMARY_MOVED.to_string(), "true".to_string());
        }
        AttemptKind::Adoption { from } => {
            summary.insert(SUMMARY_ADOPTED_FROM.to_string(), from.clone());
        }
    }
    let tx = Transaction::new(&view.table);
    let mut props = tx
        .update_table_properties()
        .set(PROP_WATERMARK.to_string(), window.hi.cursor_rfc3339())
        .set(PROP_POSITION.to_string(), window.hi.to_json())
        .set(PROP_MEASURE.to_string(), attempt.measure.to_json());
    if attempt.kind == AttemptKind::OperatorMove && window.lo.as_ref() != Some(&window.hi) {
        let mut moves = recorded_moves(view.table.metadata());
        let lo_measure = match &view.measured_on {
            MeasuredOn::Recorded(m) => Some(m.clone()),
            _ => None,
        };
        moves.push(Move { lo: window.lo.clone(), hi: window.hi.clone(), measure: attempt.measure.clone(), lo_measure });
        props = props.set(PROP_MOVES.to_string(), serde_json::to_string(&moves).expect("serialisable"));
    }
    let tx = props.apply(tx)?;
    // File names are unique per attempt, so the duplicate check (which reads every
    // manifest of the table) is unnecessary.
    let mut action = tx.fast_append();
    if let Some(u) = commit_uuid {
        // Manifests and manifest list carry the run id in their names (I8: findable).
        action = action.set_commit_uuid(u);
    }
    Ok(action.with_check_duplicate(false).add_data_files(files).set_snapshot_properties(summary).apply(tx)?)
}

/// How a commit call failed, decided where it failed, by the error's kind and type (I5).
#[derive(Debug)]
pub enum Failure {
    /// The commit never reached the catalog: nothing can land.
    NotSent(OffloadError),
    /// The catalog refused it: compare-and-swap lost, a requirement failed (REST 409), the
    /// table is gone, or the database rejected the SQL catalog's statement (its transaction
    /// did not commit). Nothing landed.
    Refused(iceberg::Error),
    /// Anything else: it may have landed, or may still land.
    Unknown(PendingCause, Option<iceberg::Error>),
}

impl Failure {
    pub fn of(e: iceberg::Error, sent: bool) -> Self {
        if !sent {
            return Failure::NotSent(e.into());
        }
        let refused = matches!(e.kind(), ErrorKind::CatalogCommitConflicts | ErrorKind::TableNotFound)
            || matches!(cause_of::<sqlx::Error>(&e), Some(sqlx::Error::Database(_)))
            // The connection to the catalog could not even be opened: the request never left.
            || cause_of::<reqwest::Error>(&e).is_some_and(|r| r.is_connect());
        if refused {
            return Failure::Refused(e);
        }
        let cause = if catalog_timed_out(&e) {
            PendingCause::Timeout
        } else if is_connection_error(&e) {
            PendingCause::Connection
        } else {
            PendingCause::ServerError
        };
        Failure::Unknown(cause, Some(e))
    }
}

/// I5 after a failed commit call: read the table again, the only witness of what happened.
/// Even a refusal is checked against it: a proxy that re-sends a commit the catalog already
/// applied gets a 409 for the copy, and the files of the applied one must stay.
async fn after_failure(
    cx: &CommitContext,
    view: &TableView,
    journal: &mut Journal,
    record: PendingAttempt,
    failure: Failure,
) -> Result<Committed> {
    let ident = view.table.identifier().clone();
    let (cause, source, refused) = match failure {
        Failure::NotSent(e) => return not_committed(cx, &view.table, journal, &record, e).await,
        Failure::Refused(e) => (PendingCause::ServerError, Some(e), true),
        Failure::Unknown(cause, source) => (cause, source, false),
    };
    let reloaded = match cx.catalog.load_table(&ident).await {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(table = %ident, run_id = %record.run_id, "the table cannot be read again to resolve the commit: {e}");
            return pending(journal, record, cause, vec![], source).await;
        }
    };
    let conflict = |source: Option<iceberg::Error>| OffloadError::CommitConflict {
        table: ident.to_string(),
        source: Box::new(
            source.unwrap_or_else(|| iceberg::Error::new(ErrorKind::CatalogCommitConflicts, cause.to_string())),
        ),
    };
    match resolve(reloaded.metadata(), &record) {
        Resolution::Committed(snapshot_id) => {
            tracing::warn!(table = %ident, run_id = %record.run_id, snapshot_id, cause = cause.as_str(),
                "the commit call failed but the snapshot is in the table: resolved as committed");
            committed(journal, &record, snapshot_id, true, reloaded).await
        }
        // A definite refusal with the table still where it was: nothing landed, nothing will.
        Resolution::Pending if refused => not_committed(cx, &reloaded, journal, &record, conflict(source)).await,
        Resolution::Pending => pending(journal, record, cause, vec![], source).await,
        Resolution::Impossible => not_committed(cx, &reloaded, journal, &record, conflict(source)).await,
        Resolution::Undecidable => unproven(journal, &reloaded, &record, conflict(source)).await,
    }
}

/// I5 for a reported success too: a success only counts once the catalog, read again, holds
/// our snapshot (iceberg-catalog-sql ignores the error of its own SQL COMMIT; a replica may
/// lag). A success that cannot be confirmed is pending, never a reason to delete.
async fn confirm(
    cx: &CommitContext,
    view: &TableView,
    journal: &mut Journal,
    record: PendingAttempt,
    reported: Table,
) -> Result<Committed> {
    let ident = view.table.identifier().clone();
    let resolution = match cx.catalog.load_table(&ident).await {
        Ok(table) => Some((resolve(table.metadata(), &record), table)),
        Err(e) => {
            tracing::warn!(table = %ident, "commit reported success; the catalog cannot be read again to confirm it: {e}");
            None
        }
    };
    match resolution {
        Some((Resolution::Committed(snapshot_id), table)) => {
            committed(journal, &record, snapshot_id, false, table).await
        }
        Some((resolution @ (Resolution::Impossible | Resolution::Undecidable), table)) => {
            // It cannot have landed where the table now stands (I4): the table moved on.
            let mut record = record;
            record.commit_files = own_commit_files(cx, &reported, &record.run_id).await;
            let error = OffloadError::CommitConflict {
                table: ident.to_string(),
                source: Box::new(iceberg::Error::new(
                    ErrorKind::CatalogCommitConflicts,
                    "the catalog reported the commit as done, but the table moved on without it",
                )),
            };
            match resolution {
                Resolution::Impossible => not_committed(cx, &table, journal, &record, error).await,
                _ => unproven(journal, &table, &record, error).await,
            }
        }
        Some((Resolution::Pending, _)) | None => {
            let files = own_commit_files(cx, &reported, &record.run_id).await;
            pending(journal, record, PendingCause::Unconfirmed, files, None).await
        }
    }
}

/// The window is in the table: the attempt leaves the journal.
async fn committed(
    journal: &mut Journal,
    record: &PendingAttempt,
    snapshot_id: i64,
    resolved_after_error: bool,
    table: Table,
) -> Result<Committed> {
    if let Err(e) = journal.remove(&record.run_id).await {
        // The next run finds it committed (its run id is in the table) and drops it.
        tracing::warn!(table = %table.identifier(), "attempt journal not updated after the commit: {e}");
    }
    if resolved_after_error {
        // A failed call may have left a metadata file of a lost compare-and-swap.
        sweep_dead_metadata(&table);
    }
    Ok(Committed { snapshot_id, resolved_after_error, table })
}

/// The window cannot land: I8, its files go, then its journal record.
async fn not_committed(
    cx: &CommitContext,
    table: &Table,
    journal: &mut Journal,
    record: &PendingAttempt,
    error: OffloadError,
) -> Result<Committed> {
    discard(cx, table, record).await;
    if let Err(e) = journal.remove(&record.run_id).await {
        tracing::warn!(table = %table.identifier(), "attempt journal not updated after a refused commit: {e}");
    }
    sweep_dead_metadata(table);
    Err(error)
}

/// The outcome is unknown: the attempt stays in the journal with its files (I5).
async fn pending(
    journal: &mut Journal,
    record: PendingAttempt,
    cause: PendingCause,
    commit_files: Vec<String>,
    source: Option<iceberg::Error>,
) -> Result<Committed> {
    if let Err(e) = journal.mark_pending(&record.run_id, cause, commit_files).await {
        // The write-ahead record (cause unset) is still there, or the journal cannot be
        // written at all: either way nothing is deleted.
        tracing::warn!(run_id = %record.run_id, "attempt journal not updated with the pending cause: {e}");
    }
    let source = source.map(Box::new);
    Err(OffloadError::CommitPending { table: journal.table().to_string(), run_id: record.run_id, cause, source })
}

/// The table moved on without the attempt, but the snapshot it required was expired meanwhile:
/// whether it landed cannot be proven (I5). Its record goes; its files stay for
/// `iceberg-offload cleanup`, which deletes only files that no snapshot references.
async fn unproven(
    journal: &mut Journal,
    table: &Table,
    record: &PendingAttempt,
    error: OffloadError,
) -> Result<Committed> {
    tracing::warn!(table = %table.identifier(), run_id = %record.run_id,
        "{error}; the snapshot it required was expired, so its files are left to `iceberg-offload cleanup`");
    if let Err(e) = journal.remove(&record.run_id).await {
        tracing::warn!(table = %table.identifier(), "attempt journal not updated: {e}");
    }
    Err(error)
}

async fn discard(cx: &CommitContext, table: &Table, record: &PendingAttempt) {
    let paths = record.files();
    AttemptFiles { table, run_id: &record.run_id, paths: &paths, limit: cx.limits.storage }.discard().await;
}

/// The manifest list and manifests the reported snapshot added, and the metadata file the
/// catalog reported: what the attempt's commit wrote besides its data files. Best effort:
/// what cannot be read is left to `iceberg-offload cleanup`.
async fn own_commit_files(cx: &CommitContext, reported: &Table, run_id: &str) -> Vec<String> {
    let meta = reported.metadata();
    let mut files: Vec<String> = reported.metadata_location().map(str::to_string).into_iter().collect();
    let Some(snapshot_id) = snapshot_of_run(meta, run_id) else { return files };
    let Some(snapshot) = meta.snapshot_by_id(snapshot_id) else { return files };
    let list_path = snapshot.manifest_list().to_string();
    let read = async {
        let bytes = reported.file_io().new_input(&list_path)?.read().await?;
        ManifestList::parse_with_version(&bytes, meta.format_version())
    };
    if let Ok(Ok(list)) = tokio::time::timeout(cx.limits.storage, read).await {
        files.extend(
            list.entries().iter().filter(|m| m.added_snapshot_id == snapshot_id).map(|m| m.manifest_path.clone()),
        );
    }
    files.push(list_path);
    files
}
