//! Snapshot expiry, with Iceberg's conventions: snapshots older than
//! `history.expire.max-snapshot-age-ms` go, at least `history.expire.min-snapshots-to-keep`
//! stay, and so does every snapshot the watermark's history walk still needs (I3: down to the
//! newest snapshot that carries this service's marker). Then the files only the expired
//! snapshots referenced are deleted: their manifest lists, manifests no remaining snapshot
//! lists, and data files only those manifests held. Paths come from the metadata, nothing is
//! listed, so this works on any storage.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use iceberg::spec::{ManifestList, Operation, TableMetadata};
use iceberg::table::Table;
use iceberg::transaction::{ApplyTransactionAction, Transaction};
use iceberg::{Catalog, TableIdent};

use crate::commit::{self, AttemptFiles, PROP_POSITION, PinnedCatalog, TableView};
use crate::error::{OffloadError, Result};

pub use crate::config::Retention;
pub use crate::report::ExpireReport;

impl Retention {
    /// The table's own `history.expire.*` properties, else the configured `default`.
    pub fn of(meta: &TableMetadata, default: Retention) -> Retention {
        let prop = |k: &str| meta.properties().get(k).and_then(|v| v.parse::<u64>().ok());
        Retention {
            max_age: prop("history.expire.max-snapshot-age-ms").map(Duration::from_millis).unwrap_or(default.max_age),
            min_keep: prop("history.expire.min-snapshots-to-keep")
                .map(|n| n.max(1) as usize)
                .unwrap_or(default.min_keep),
        }
    }
}

/// The snapshots of the current ancestry expiry must keep for I3: from the current one down
/// to the newest that carries the watermark marker (all of the ancestry when none does).
pub fn needed_for_watermark(meta: &TableMetadata) -> usize {
    let mut next = meta.current_snapshot().map(|s| s.snapshot_id());
    let mut depth = 0;
    while let Some(snapshot) = next.and_then(|id| meta.snapshot_by_id(id)) {
        depth += 1;
        if snapshot.summary().additional_properties.contains_key(PROP_POSITION) {
            return depth;
        }
        next = snapshot.parent_snapshot_id();
    }
    depth.max(1)
}

/// How many snapshots of the current history stay: the retention's, those the watermark's walk
/// needs (I3), the previous one, and down to the one a view reads (I13). `Err` when the view
/// reads a snapshot off the current history: nothing may expire until it moves.
fn snapshots_to_keep(
    meta: &TableMetadata,
    retention: Retention,
    pinned: Option<i64>,
) -> std::result::Result<usize, String> {
    let keep = retention.min_keep.max(needed_for_watermark(meta)).max(ALWAYS_KEEP);
    match pinned.map(|id| (id, depth_in_history(meta, id))) {
        None => Ok(keep),
        Some((_, Some(depth))) => Ok(keep.max(depth)),
        Some((id, None)) => Err(format!(
            "the table's view reads snapshot {id}, which is not in the current history (a rollback?); \
             expiry waits until the view moves to the current snapshot"
        )),
    }
}

/// How deep `id` lies in the current snapshot's history (1: the current snapshot); `None`
/// when it is not in it.
fn depth_in_history(meta: &TableMetadata, id: i64) -> Option<usize> {
    let mut next = meta.current_snapshot().map(|s| s.snapshot_id());
    let mut depth = 0;
    while let Some(snapshot) = next.and_then(|i| meta.snapshot_by_id(i)) {
        depth += 1;
        if snapshot.snapshot_id() == id {
            return Some(depth);
        }
        next = snapshot.parent_snapshot_id();
    }
    None
}

/// The previous snapshot always stays: a reader that planned on it a moment ago, before the
/// last commit, must still find its files.
const ALWAYS_KEEP: usize = 2;

/// What an expiry is about to delete, written next to the attempt journal before its commit:
/// a run cut short (timeout, shutdown, crash, an answer lost) leaves no file behind that no
/// later run would find. Settled at the next run from the table's history.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct ExpiryRecord {
    run_id: String,
    /// The snapshot the expiry was fenced on: once the table moved past it, it can never land.
    required_snapshot: Option<i64>,
    snapshots: Vec<i64>,
    files: Vec<String>,
}

fn record_path(table: &Table) -> String {
    format!("{}/offload/expiry.json", table.metadata().location().trim_end_matches('/'))
}

/// Table property set by the expiry commit: its metadata file carries the run id, so a lost
/// commit's file is found by content (I8) like an offload attempt's.
const PROP_MAINTENANCE_RUN: &str = "offload.maintenance-run";

/// Expires what `retention` allows and deletes what only the expired snapshots referenced.
/// `now_ms`: this host's clock (snapshot timestamps are the writers' clocks). The commit is
/// fenced on the table as read here (the plan is made on it): a concurrent commit makes it
/// lose, nothing changes, the next run retries. `pinned`: a snapshot a hot+cold view reads
/// (I13), kept with every newer one of the current history.
pub async fn expire(
    catalog: &Arc<dyn Catalog>,
    ident: &TableIdent,
    retention: Retention,
    now_ms: i64,
    dry_run: bool,
    limits: crate::config::CatalogLimits,
    pinned: Option<i64>,
) -> Result<ExpireReport> {
    let table = catalog.load_table(ident).await?;
    let mut report = ExpireReport { snapshots_before: table.metadata().snapshots().len(), ..Default::default() };
    if !dry_run {
        report.files_deleted += settle_record(&table, limits.storage).await;
    }
    let meta = table.metadata();
    // Another engine's retention, or a view's snapshot off the history: nothing expires.
    let keep = match own_retention(meta).map_or_else(|| snapshots_to_keep(meta, retention, pinned), Err) {
        Ok(keep) => keep,
        Err(why) => {
            report.skipped = Some(why);
            return Ok(report);
        }
    };
    let cutoff = now_ms.saturating_sub(retention.max_age.as_millis() as i64);
    let doomed = plan(meta, keep, cutoff);
    report.snapshots_expired = doomed.len();
    if doomed.is_empty() || dry_run {
        return Ok(report);
    }
    let record = ExpiryRecord {
        run_id: uuid::Uuid::now_v7().to_string(),
        required_snapshot: meta.current_snapshot_id(),
        files: dead_files(&table, &doomed, limits.storage).await?,
        snapshots: doomed,
    };
    write_record(&table, &record, limits.storage).await?;
    crate::fault::hit("expire_before_commit")?;
    let tx = Transaction::new(&table);
    let tx = tx.update_table_properties().set(PROP_MAINTENANCE_RUN.to_string(), record.run_id.clone()).apply(tx)?;
    let tx = tx.expire_snapshots().expire_older_than_ms(cutoff).retain_last(keep).apply(tx)?;
    let pinned = PinnedCatalog::new(catalog.clone(), table.clone());
    let sent = tokio::time::timeout(limits.commit, tx.commit(&pinned)).await;
    // Whatever the answer, what the catalog holds now decides what may be deleted.
    let now = tokio::time::timeout(limits.call, catalog.load_table(ident))
        .await
        .map_err(|_| OffloadError::Timeout(limits.call))??;
    let landed = record.snapshots.iter().all(|id| now.metadata().snapshot_by_id(*id).is_none());
    if !landed {
        report.snapshots_expired = 0;
        // Refused, or the table moved on: it can never land (I5). Otherwise (a timeout, a
        // 5xx) it may still: the record stays, and the next run decides.
        let refused = matches!(&sent, Ok(Err(e)) if e.kind() == iceberg::ErrorKind::CatalogCommitConflicts);
        if refused || now.metadata().current_snapshot_id() != record.required_snapshot {
            AttemptFiles { table: &table, run_id: &record.run_id, paths: &[], limit: limits.storage }.discard().await;
            remove_record(&table, limits.storage).await;
        }
        return match sent {
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(OffloadError::Timeout(limits.commit)),
            Ok(Ok(_)) => Err(OffloadError::Crash(
                "the expiry was reported committed, but the table still has its snapshots".into(),
            )),
        };
    }
    check_watermark_kept(ident, &table, &now);
    crate::fault::hit("expire_after_commit")?;
    report.files_deleted += delete_files(&now, &record.files, limits.storage).await;
    remove_record(&table, limits.storage).await;
    report.metadata_files_deleted = commit::delete_dropped_metadata(&table, &now, limits.storage).await;
    Ok(report)
}

/// I3: an expiry never moves `W`; if it did, say so loudly.
fn check_watermark_kept(ident: &TableIdent, before: &Table, after: &Table) {
    let w_before = TableView::of(before.clone()).ok().and_then(|v| v.watermark);
    let w_after = TableView::of(after.clone()).ok().and_then(|v| v.watermark);
    if w_before != w_after {
        tracing::error!(table = %ident, before = ?w_before, after = ?w_after, "the watermark changed across an expiry (I3): report this");
    }
}

/// Branches and tags, or a `main` with its own retention, are another engine's policy:
/// iceberg-rust's expiry would follow theirs instead of ours, so the table is left alone.
fn own_retention(meta: &TableMetadata) -> Option<String> {
    let json = serde_json::to_value(meta).ok()?;
    let refs = json.get("refs")?.as_object()?;
    let others: Vec<&String> = refs.keys().filter(|k| *k != "main").collect();
    if !others.is_empty() {
        return Some(format!("the table has branches or tags ({others:?}): their retention is not ours to apply"));
    }
    let main = refs.get("main")?;
    ["min-snapshots-to-keep", "max-snapshot-age-ms", "max-ref-age-ms"]
        .iter()
        .any(|k| main.get(k).is_some_and(|v| !v.is_null()))
        .then(|| "the main branch has its own retention (set by another engine)".to_string())
}

/// The snapshots the expiry will remove: those older than `cutoff`, except the newest `keep`
/// of the current ancestry (what iceberg-rust's action removes for a table with only `main`).
fn plan(meta: &TableMetadata, keep: usize, cutoff: i64) -> Vec<i64> {
    let mut kept: HashSet<i64> = HashSet::new();
    let mut next = meta.current_snapshot().map(|s| s.snapshot_id());
    while let Some(snapshot) = next.and_then(|id| meta.snapshot_by_id(id)) {
        if kept.len() < keep || snapshot.timestamp_ms() >= cutoff {
            kept.insert(snapshot.snapshot_id());
        }
        next = snapshot.parent_snapshot_id();
    }
    meta.snapshots()
        .filter(|s| !kept.contains(&s.snapshot_id()) && s.timestamp_ms() < cutoff)
        .map(|s| s.snapshot_id())
        .collect()
}

/// The files only the `doomed` snapshots reference: their manifest lists, manifests no other
/// snapshot lists, and data files only those manifests hold.
async fn dead_files(table: &Table, doomed: &[i64], limit: Duration) -> Result<Vec<String>> {
    let io = table.file_io();
    let meta = table.metadata();
    let doomed: HashSet<i64> = doomed.iter().copied().collect();
    let read_list = |path: String| async move {
        let bytes = tokio::time::timeout(limit, io.new_input(&path)?.read())
            .await
            .map_err(|_| OffloadError::Timeout(limit))??;
        Ok::<_, OffloadError>(ManifestList::parse_with_version(&bytes, meta.format_version())?)
    };
    // Appends only: every manifest a snapshot lists stays listed by its descendants, so only
    // the expired manifest lists die (a manifest merged away by another engine, or one of a
    // rolled-back append, is left to `cleanup`). Skips reading every retained list: with 480
    // retained snapshots that took seconds per run.
    if meta.snapshots().all(|s| s.summary().operation == Operation::Append) {
        return Ok(meta
            .snapshots()
            .filter(|s| doomed.contains(&s.snapshot_id()))
            .map(|s| s.manifest_list().to_string())
            .collect());
    }
    // Only the oldest kept snapshot of each kept line (its parent expired or absent) is read:
    // a manifest (or a live data file) an expired snapshot shares with any kept snapshot is in
    // that root too, since Iceberg never lists a manifest again once a commit dropped it. With
    // 480 retained snapshots this reads 1 list instead of 480.
    let kept: HashSet<i64> = meta.snapshots().map(|s| s.snapshot_id()).filter(|id| !doomed.contains(id)).collect();
    let mut live = vec![];
    let mut dead_lists = vec![];
    for s in meta.snapshots() {
        if doomed.contains(&s.snapshot_id()) {
            dead_lists.push(s.manifest_list().to_string());
        } else if s.parent_snapshot_id().is_none_or(|p| !kept.contains(&p)) {
            live.extend(read_list(s.manifest_list().to_string()).await?.entries().iter().cloned());
        }
    }
    let live_manifests: HashSet<&str> = live.iter().map(|m| m.manifest_path.as_str()).collect();
    let mut dead_manifests = vec![];
    let mut seen = HashSet::new();
    for path in &dead_lists {
        for m in read_list(path.clone()).await?.entries() {
            if !live_manifests.contains(m.manifest_path.as_str()) && seen.insert(m.manifest_path.clone()) {
                dead_manifests.push(m.clone());
            }
        }
    }
    let mut files: Vec<String> = vec![];
    if !dead_manifests.is_empty() {
        // A data file dies with its manifests only if no live manifest still holds it.
        let mut live_data = HashSet::new();
        let mut loaded = HashSet::new();
        for m in live.iter().filter(|m| loaded.insert(m.manifest_path.clone())) {
            for e in m.load_manifest(io).await?.entries().iter().filter(|e| e.is_alive()) {
                live_data.insert(e.data_file().file_path().to_string());
            }
        }
        for m in &dead_manifests {
            for e in m.load_manifest(io).await?.entries() {
                if !live_data.contains(e.data_file().file_path()) {
                    files.push(e.data_file().file_path().to_string());
                }
            }
        }
        files.extend(dead_manifests.iter().map(|m| m.manifest_path.clone()));
    }
    files.extend(dead_lists);
    files.sort();
    files.dedup();
    Ok(files)
}

async fn delete_files(table: &Table, files: &[String], limit: Duration) -> usize {
    commit::delete_paths(table, files.iter().map(String::as_str), limit, "an expired file").await
}

async fn write_record(table: &Table, record: &ExpiryRecord, limit: Duration) -> Result<()> {
    let bytes = serde_json::to_vec(record).expect("serialisable");
    let write = async { table.file_io().new_output(record_path(table))?.write(bytes.into()).await };
    tokio::time::timeout(limit, write).await.map_err(|_| OffloadError::Timeout(limit))??;
    Ok(())
}

async fn remove_record(table: &Table, limit: Duration) {
    if let Err(e) = tokio::time::timeout(limit, table.file_io().delete(record_path(table))).await.unwrap_or(Ok(())) {
        tracing::warn!(table = %table.identifier(), "cannot remove the expiry record: {e}");
    }
}

/// An expiry an earlier run did not finish: its files go if its snapshots are gone from the
/// table (it landed), the record alone if they are all still there (it did not).
async fn settle_record(table: &Table, limit: Duration) -> usize {
    let read = async { table.file_io().new_input(record_path(table))?.read().await };
    let Ok(Ok(bytes)) = tokio::time::timeout(limit, read).await else { return 0 };
    let Ok(record) = serde_json::from_slice::<ExpiryRecord>(&bytes) else {
        tracing::warn!(table = %table.identifier(), "the expiry record cannot be read; its files are left to `cleanup`");
        remove_record(table, limit).await;
        return 0;
    };
    let meta = table.metadata();
    let gone = record.snapshots.iter().filter(|id| meta.snapshot_by_id(**id).is_none()).count();
    if gone == 0 && meta.current_snapshot_id() == record.required_snapshot {
        return 0; // may still land: undecided
    }
    let deleted = if gone == record.snapshots.len() { delete_files(table, &record.files, limit).await } else { 0 };
    if gone == 0 {
        AttemptFiles { table, run_id: &record.run_id, paths: &[], limit }.discard().await;
    }
    remove_record(table, limit).await;
    deleted
}
