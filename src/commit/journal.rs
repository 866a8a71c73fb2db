//! I5 — the attempt journal: commit attempts whose outcome is not known yet, recorded
//! durably where any later attempt finds them, even after a crash or a lost state store.
//!
//! It is one small JSON file in the table's own location (`offload/attempts.json`), read and
//! written through the table's `FileIO`, so it works on every warehouse the table does. An
//! attempt is written to it *before* its commit is sent and removed once its outcome is
//! known. What is left in it was interrupted or is pending; [`resolve`] decides each from
//! the table's metadata alone:
//! - its run id is in a snapshot of the table: it **committed** (its files are live);
//! - the table's current snapshot is no longer the one it required: it can **never land**
//!   (every commit is fenced on that snapshot, I4), so its files are deleted;
//! - otherwise it is still **pending**: its files stay. Offloading the same window again
//!   meanwhile is safe, since both attempts require the same snapshot and at most one lands.
//!
//! A single writer per table (I6) keeps two processes from rewriting the file at once; if
//! they ever did, a record could be lost, which leaves unreferenced files for `cleanup`,
//! never a deleted live file.

use std::time::Duration;

use iceberg::io::FileIO;
use iceberg::spec::TableMetadata;
use iceberg::table::Table;
use serde::{Deserialize, Serialize};

use super::files::AttemptFiles;
use super::{Position, SUMMARY_RUN_ID};
use crate::error::{OffloadError, PendingCause, Result};
pub use crate::report::Resolution;

/// One commit attempt whose outcome is not known yet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingAttempt {
    pub run_id: String,
    /// The snapshot the commit was fenced on (I4): the only parent it can ever land on.
    pub required_snapshot: Option<i64>,
    /// The Parquet files it wrote.
    pub data_files: Vec<String>,
    /// Manifests, manifest list and metadata file of its commit, when known.
    #[serde(default)]
    pub commit_files: Vec<String>,
    pub rows: u64,
    pub bytes: u64,
    pub window_hi: Position,
    pub started_at_ms: i64,
    /// `None` while the commit is in flight; why the outcome is unknown once it returned.
    pub cause: Option<PendingCause>,
}

impl PendingAttempt {
    pub fn files(&self) -> Vec<String> {
        self.commit_files.iter().chain(&self.data_files).cloned().collect()
    }
}

/// I5: decides an attempt from the table's metadata alone.
pub fn resolve(meta: &TableMetadata, attempt: &PendingAttempt) -> Resolution {
    fate(meta, snapshot_of_run(meta, &attempt.run_id), attempt.required_snapshot)
}

/// I5 for any commit fenced on `required`: `landed` is its snapshot when the metadata has it.
/// Compactions and expiries are decided by the same rule as appends.
pub fn fate(meta: &TableMetadata, landed: Option<i64>, required: Option<i64>) -> Resolution {
    if let Some(id) = landed {
        return Resolution::Committed(id);
    }
    let current = meta.current_snapshot().map(|s| s.snapshot_id());
    if current == required {
        return Resolution::Pending;
    }
    // Fenced on `required`, it can only ever land as a child of it. If the current snapshot
    // descends from `required` through snapshots all still in the metadata (none of them ours,
    // or its run id would have been found), the table took another path from there, and a
    // snapshot of ours, if it ever existed, is referenced by nothing on that path.
    if descends_unbroken(meta, current, required) { Resolution::Impossible } else { Resolution::Undecidable }
}

/// Whether `from`'s ancestry reaches `to` (`None`: the table's first snapshot) without a
/// snapshot missing from the metadata on the way.
fn descends_unbroken(meta: &TableMetadata, from: Option<i64>, to: Option<i64>) -> bool {
    let mut next = from;
    for _ in 0..=meta.snapshots().len() {
        if next == to {
            return true;
        }
        let Some(id) = next else { return false };
        let Some(snapshot) = meta.snapshot_by_id(id) else { return false };
        next = snapshot.parent_snapshot_id();
    }
    false
}

/// The snapshot whose summary carries this run id, if any (in or out of the current ancestry:
/// a rolled-back snapshot still references its files).
pub fn snapshot_of_run(meta: &TableMetadata, run_id: &str) -> Option<i64> {
    meta.snapshots()
        .find(|s| s.summary().additional_properties.get(SUMMARY_RUN_ID).map(String::as_str) == Some(run_id))
        .map(|s| s.snapshot_id())
}

/// What [`Journal::settle`] did with one attempt.
#[derive(Debug, Clone)]
pub struct Settled {
    pub attempt: PendingAttempt,
    pub resolution: Resolution,
}

/// The table's journal of pending attempts.
pub struct Journal {
    table: String,
    io: FileIO,
    path: String,
    entries: Vec<PendingAttempt>,
    limit: Duration,
    /// The bytes of a journal that could not be parsed, set aside at the first write.
    unreadable: Option<bytes::Bytes>,
}

impl Journal {
    pub fn path_of(table: &Table) -> String {
        format!("{}/offload/attempts.json", table.metadata().location().trim_end_matches('/'))
    }

    /// Reads the table's journal (empty when there is none). A journal that cannot be parsed
    /// is reported, and copied to `attempts.json.unreadable` before it is next written: its
    /// attempts' files stay for `cleanup`, which never deletes a referenced file. Reading
    /// writes nothing.
    pub async fn load(table: &Table, limit: Duration) -> Result<Self> {
        let io = table.file_io().clone();
        let path = Self::path_of(table);
        let mut journal =
            Self { table: table.identifier().to_string(), io, path, entries: vec![], limit, unreadable: None };
        if !journal.storage(journal.io.exists(&journal.path)).await? {
            return Ok(journal);
        }
        let input = journal.io.new_input(&journal.path)?;
        let bytes = match journal.storage(input.read()).await {
            Ok(bytes) => bytes,
            // Deleted since the look above (another writer settled its last attempt: an offload
            // or `watermark set` without our lease, a `cleanup`): no journal is an empty one.
            // Only if a second look agrees: a not-found deeper down (a credentials file, say)
            // must not pass an existing journal off as empty (I5).
            Err(e) if is_not_found(&e) && !journal.storage(journal.io.exists(&journal.path)).await? => {
                return Ok(journal);
            }
            Err(e) => return Err(e),
        };
        match serde_json::from_slice::<Vec<PendingAttempt>>(&bytes) {
            Ok(entries) => journal.entries = entries,
            Err(e) => {
                tracing::error!(table = %table.identifier(), path = %journal.path,
                    "the attempt journal cannot be read ({e}); it is set aside at the next write and its attempts' files are left to `iceberg-offload cleanup`");
                journal.unreadable = Some(bytes);
            }
        }
        Ok(journal)
    }

    /// The table's name, `namespace.table`.
    pub fn table(&self) -> &str {
        &self.table
    }

    pub fn entries(&self) -> &[PendingAttempt] {
        &self.entries
    }

    /// Records an attempt before its commit is sent (write-ahead). If the record cannot be
    /// written, the journal is left as it was and the commit must not be sent.
    pub async fn add(&mut self, attempt: PendingAttempt) -> Result<()> {
        let run_id = attempt.run_id.clone();
        self.entries.retain(|a| a.run_id != attempt.run_id);
        self.entries.push(attempt);
        let saved = self.save().await;
        if saved.is_err() {
            self.entries.retain(|a| a.run_id != run_id);
        }
        saved
    }

    /// Marks an attempt pending, with why its outcome is unknown and the commit files learnt.
    pub async fn mark_pending(&mut self, run_id: &str, cause: PendingCause, commit_files: Vec<String>) -> Result<()> {
        for a in self.entries.iter_mut().filter(|a| a.run_id == run_id) {
            a.cause = Some(cause);
            a.commit_files.extend(commit_files.iter().cloned());
        }
        self.save().await
    }

    /// Removes an attempt whose outcome is known.
    pub async fn remove(&mut self, run_id: &str) -> Result<()> {
        let before = self.entries.len();
        self.entries.retain(|a| a.run_id != run_id);
        if self.entries.len() == before { Ok(()) } else { self.save().await }
    }

    /// I5 + I8: resolves every recorded attempt against the table. Committed ones are
    /// dropped from the journal; those that can never land have their files deleted first;
    /// those still pending stay.
    pub async fn settle(&mut self, table: &Table) -> Result<Vec<Settled>> {
        let mut settled = vec![];
        let mut keep = vec![];
        for attempt in std::mem::take(&mut self.entries) {
            let resolution = resolve(table.metadata(), &attempt);
            match resolution {
                Resolution::Pending => keep.push(attempt),
                Resolution::Impossible => {
                    let paths = attempt.files();
                    AttemptFiles { table, run_id: &attempt.run_id, paths: &paths, limit: self.limit }.discard().await;
                    settled.push(Settled { attempt, resolution });
                }
                Resolution::Committed(_) | Resolution::Undecidable => settled.push(Settled { attempt, resolution }),
            }
        }
        self.entries = keep;
        if !settled.is_empty() {
            self.save().await?;
        }
        Ok(settled)
    }

    async fn save(&mut self) -> Result<()> {
        if let Some(bytes) = self.unreadable.take() {
            let aside = self.io.new_output(format!("{}.unreadable", self.path))?;
            self.storage(aside.write(bytes)).await?;
        }
        if self.entries.is_empty() {
            return self.storage(self.io.delete(&self.path)).await;
        }
        let json = serde_json::to_vec_pretty(&self.entries).expect("attempts serialise");
        if let Some(local) = local_path(&self.path) {
            // Never a truncated journal on a local disk: write aside, then rename over it.
            return self.storage(write_atomically(local, json)).await;
        }
        // Object stores replace an object whole.
        let out = self.io.new_output(&self.path)?;
        self.storage(out.write(json.into())).await
    }

    async fn storage<T>(&self, f: impl std::future::Future<Output = iceberg::Result<T>>) -> Result<T> {
        match tokio::time::timeout(self.limit, f).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(OffloadError::Iceberg(
                iceberg::Error::new(iceberg::ErrorKind::Unexpected, format!("storage: {} timed out", self.path))
                    .with_source(crate::error::CallTimedOut { call: "storage", after: self.limit }),
            )),
        }
    }
}

/// Whether a storage error says the file is not there (opendal's or the OS's own word for it).
fn is_not_found(e: &OffloadError) -> bool {
    let OffloadError::Iceberg(e) = e else { return false };
    crate::error::cause_of::<opendal::Error>(e).is_some_and(|o| o.kind() == opendal::ErrorKind::NotFound)
        || crate::error::cause_of::<std::io::Error>(e).is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
}

fn local_path(uri: &str) -> Option<std::path::PathBuf> {
    uri.strip_prefix("file://").or_else(|| uri.strip_prefix("file:")).map(std::path::PathBuf::from)
}

/// Writes `bytes` to a temporary file next to `path`, syncs it, and renames it over `path`.
async fn write_atomically(path: std::path::PathBuf, bytes: Vec<u8>) -> iceberg::Result<()> {
    let io_error =
        |e: std::io::Error| iceberg::Error::new(iceberg::ErrorKind::Unexpected, "attempt journal").with_source(e);
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    })
    .await
    .map_err(|e| iceberg::Error::new(iceberg::ErrorKind::Unexpected, format!("attempt journal: {e}")))?
    .map_err(io_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_journal_file_that_is_gone_reads_as_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let io = crate::sink::storage::file_io(&Default::default());
        let path = format!("file://{}/offload/attempts.json", dir.path().display());
        let gone = io.new_input(&path).unwrap().read().await.unwrap_err();
        assert!(is_not_found(&OffloadError::Iceberg(gone)));
        let other = iceberg::Error::new(iceberg::ErrorKind::Unexpected, "storage: timed out");
        assert!(!is_not_found(&OffloadError::Iceberg(other)));
    }
}
