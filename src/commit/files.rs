//! I8 — Nothing stray: the files of an attempt that can never land are deleted, and no
//! metadata file that a directory reader would take as current is left behind.
//!
//! Directory readers (ClickHouse `icebergLocal()` without a pinned metadata file) take the
//! highest-numbered `*.metadata.json` as the table. iceberg-catalog-sql writes that file
//! *before* its compare-and-swap, so a lost or interrupted commit leaves one behind. Such a
//! file is found by what it contains (the attempt's run id), never by age, so another
//! writer's commit in flight is never touched.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use iceberg::table::Table;

use crate::sink::table::DELETE_AFTER_COMMIT;

/// What one attempt wrote: its data files, and the manifests, manifest list and metadata
/// file of its commit when they are known. Deleted together, once, when I5 allows.
pub struct AttemptFiles<'a> {
    pub table: &'a Table,
    pub run_id: &'a str,
    pub paths: &'a [String],
    /// Each storage operation's time limit (I10).
    pub limit: Duration,
}

impl AttemptFiles<'_> {
    /// Deletes the attempt's files. Metadata files that carry its run id go first: they
    /// reference the data files, and a directory reader would read them as the table.
    /// Failures are logged: what stays is unreferenced and removed by `iceberg-offload cleanup`.
    pub async fn discard(&self) -> usize {
        let ident = self.table.identifier();
        let mut removed = 0;
        for path in metadata_files_of_run(self.table, self.run_id)
            .into_iter()
            .chain(commit_files_named(self.table, self.run_id))
        {
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    removed += 1;
                    tracing::info!(table = %ident, run_id = self.run_id, file = %path.display(),
                        "removed the metadata file of a commit that did not land");
                }
                Err(e) => {
                    tracing::warn!(table = %ident, file = %path.display(), "cannot remove a stray metadata file: {e}")
                }
            }
        }
        removed
            + delete_paths(self.table, self.paths.iter().map(String::as_str), self.limit, "a file of a failed attempt")
                .await
    }
}

/// Deletes `*.metadata.json` files that can never become current: not the current file,
/// not in the metadata log, and numbered within the versions the log covers, up to the
/// current one. A commit based on an older version can no longer win its compare-and-swap,
/// so these are lost commits (ours or another writer's), whatever they contain. Files
/// numbered below the log's oldest entry are old history the log no longer lists
/// (`write.metadata.previous-versions-max`), not ours to delete. Local warehouses only.
pub fn sweep_dead_metadata(table: &Table) -> usize {
    let Some(dir) = local_metadata_dir(table) else { return 0 };
    let Some(current) = table.metadata_location() else { return 0 };
    let current_version = version_of(&file_name(current)).unwrap_or(0);
    let oldest_logged = table
        .metadata()
        .metadata_log()
        .iter()
        .filter_map(|m| version_of(&file_name(&m.metadata_file)))
        .min()
        .unwrap_or(current_version);
    let mut removed = 0;
    for (name, path) in stray_metadata_files(table, &dir) {
        if version_of(&name).is_some_and(|v| (oldest_logged..=current_version).contains(&v)) {
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    removed += 1;
                    tracing::info!(table = %table.identifier(), file = %name, "removed the metadata file of a lost commit");
                }
                Err(e) => {
                    tracing::warn!(table = %table.identifier(), file = %name, "cannot remove a stray metadata file: {e}")
                }
            }
        }
    }
    removed
}

/// Metadata files above the current version: commits not (yet) swapped in. A directory
/// reader takes the highest of them as the table; the tests assert there are none after a fault.
pub fn metadata_files_ahead(table: &Table) -> Vec<String> {
    let (Some(dir), Some(current)) = (local_metadata_dir(table), table.metadata_location()) else { return vec![] };
    let current_version = version_of(&file_name(current)).unwrap_or(0);
    stray_metadata_files(table, &dir)
        .into_iter()
        .filter(|(name, _)| version_of(name).is_some_and(|v| v > current_version))
        .map(|(name, _)| name)
        .collect()
}

/// Metadata files in the table's folder that are neither current nor in its metadata log.
fn stray_metadata_files(table: &Table, dir: &Path) -> Vec<(String, PathBuf)> {
    let keep: HashSet<String> = table
        .metadata()
        .metadata_log()
        .iter()
        .map(|m| file_name(&m.metadata_file))
        .chain(table.metadata_location().map(file_name))
        .collect();
    let Ok(entries) = std::fs::read_dir(dir) else { return vec![] };
    entries
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().to_string(), e.path()))
        // `vN.metadata.json`: an adopted table's original history (Hadoop catalog), never ours.
        .filter(|(name, _)| name.ends_with(".metadata.json") && !name.starts_with('v') && !keep.contains(name))
        .collect()
}

/// Stray metadata files whose content names this run id: written for this attempt's commit.
fn metadata_files_of_run(table: &Table, run_id: &str) -> Vec<PathBuf> {
    let Some(dir) = local_metadata_dir(table) else { return vec![] };
    let needle = format!("\"{run_id}\"");
    stray_metadata_files(table, &dir)
        .into_iter()
        .filter(|(_, path)| std::fs::read(path).is_ok_and(|bytes| contains(&bytes, needle.as_bytes())))
        .map(|(_, path)| path)
        .collect()
}

/// Manifests and manifest lists of this attempt's commit: iceberg-rust names them after the
/// commit uuid, which is the run id (`commit::append`).
fn commit_files_named(table: &Table, run_id: &str) -> Vec<PathBuf> {
    if uuid::Uuid::parse_str(run_id).is_err() {
        return vec![];
    }
    let Some(dir) = local_metadata_dir(table) else { return vec![] };
    let Ok(entries) = std::fs::read_dir(dir) else { return vec![] };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.ends_with(".avro") && name.contains(run_id)
        })
        .map(|e| e.path())
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// The folder of the table's metadata files, for a warehouse on the local file system.
fn local_metadata_dir(table: &Table) -> Option<PathBuf> {
    let current = table.metadata_location()?;
    // `file:///p`, `file:/p`, or a bare `/p` (Iceberg Java's Hadoop catalog, adopted tables).
    let path = current
        .strip_prefix("file://")
        .or_else(|| current.strip_prefix("file:"))
        .or_else(|| current.starts_with('/').then_some(current))?;
    Path::new(path).parent().map(Path::to_path_buf)
}

pub(crate) fn file_name(path: &str) -> String {
    path.rsplit('/').next().unwrap_or(path).to_string()
}

pub(crate) fn version_of(name: &str) -> Option<u64> {
    name.split(['-', '.']).next()?.trim_start_matches('v').parse().ok()
}

/// Metadata files a commit dropped from the table's metadata log (beyond
/// `write.metadata.previous-versions-max`), deleted when the table says
/// `write.metadata.delete-after-commit.enabled` (Iceberg's convention; on for the tables this
/// service creates). The paths come from the two logs, so this works on any storage.
pub async fn delete_dropped_metadata(before: &Table, after: &Table, limit: Duration) -> usize {
    let enabled =
        after.metadata().properties().get(DELETE_AFTER_COMMIT).is_some_and(|v| v.eq_ignore_ascii_case("true"));
    if !enabled {
        return 0;
    }
    // Only a log that continues `before`'s (it lists `before`'s file) says what was dropped:
    // the versions older than the oldest it still lists. A catalog with other versioning is left alone.
    let after_log = after.metadata().metadata_log();
    let Some(before_location) = before.metadata_location() else { return 0 };
    if !after_log.iter().any(|m| m.metadata_file == before_location) {
        return 0;
    }
    let oldest_kept = after_log.iter().map(|m| m.timestamp_ms).min().unwrap_or(i64::MAX);
    let kept: HashSet<&str> = after_log.iter().map(|m| m.metadata_file.as_str()).collect();
    // The `vN.metadata.json` files of a table adopted from a Hadoop catalog stay: they are the
    // original's history, and a rollback of the migration points Spark at them again.
    let dropped: Vec<&str> = before
        .metadata()
        .metadata_log()
        .iter()
        .filter(|m| m.timestamp_ms < oldest_kept && !kept.contains(m.metadata_file.as_str()))
        .filter(|m| !file_name(&m.metadata_file).starts_with('v'))
        .map(|m| m.metadata_file.as_str())
        .collect();
    delete_paths(after, dropped, limit, "an old metadata file").await
}

/// Deletes files of the table's storage, each within `limit`; a failure is a warning naming
/// `what` the file was (what stays is unreferenced: `iceberg-offload cleanup`). Returns how
/// many went.
pub async fn delete_paths<'p>(
    table: &Table,
    paths: impl IntoIterator<Item = &'p str>,
    limit: Duration,
    what: &str,
) -> usize {
    let ident = table.identifier();
    let mut removed = 0;
    for path in paths {
        match tokio::time::timeout(limit, table.file_io().delete(path)).await {
            Ok(Ok(())) => removed += 1,
            Ok(Err(e)) => tracing::warn!(table = %ident, path = %path, "cannot delete {what}: {e}"),
            Err(_) => tracing::warn!(table = %ident, path = %path, "deleting {what} timed out"),
        }
    }
    removed
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
    fn run_ids_are_found_as_whole_json_strings() {
        let doc = br#"{"summary":{"offload.run-id":"0190-abc"}}"#;
        assert!(contains(doc, br#""0190-abc""#));
        assert!(!contains(doc, br#""0190-ab""#));
    }
}
