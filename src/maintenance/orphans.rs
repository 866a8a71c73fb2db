//! Orphan-file cleanup (I8 for attempts that died before they could clean up after
//! themselves): files under a table's location that no snapshot, manifest or metadata file
//! references, and that are older than a floor (so no attempt still writing is touched).
//! Local warehouses only, like the directory readers this protects.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use iceberg::spec::ManifestList;
use iceberg::table::Table;

use crate::error::{OffloadError, Result};

#[derive(Debug, Default, serde::Serialize)]
pub struct CleanupReport {
    pub table: String,
    pub files_scanned: usize,
    pub files_referenced: usize,
    pub orphans: Vec<String>,
    pub deleted: bool,
}

/// Every file the table's metadata references: metadata files, manifest lists, manifests and
/// data files of every snapshot still in the metadata.
pub async fn referenced_files(table: &Table) -> Result<HashSet<String>> {
    let meta = table.metadata();
    let io = table.file_io();
    let mut refs: HashSet<String> = meta.metadata_log().iter().map(|m| m.metadata_file.clone()).collect();
    if let Some(current) = table.metadata_location() {
        refs.insert(current.to_string());
    }
    for snapshot in meta.snapshots() {
        let list_path = snapshot.manifest_list().to_string();
        let bytes = io.new_input(&list_path)?.read().await?;
        let list = ManifestList::parse_with_version(&bytes, meta.format_version())?;
        refs.insert(list_path);
        for manifest_file in list.entries() {
            refs.insert(manifest_file.manifest_path.clone());
            let manifest = manifest_file.load_manifest(io).await?;
            for entry in manifest.entries() {
                refs.insert(entry.data_file().file_path().to_string());
            }
        }
    }
    Ok(refs)
}

/// Finds (and unless `dry_run`, deletes) unreferenced files older than `older_than`. Files
/// of commit attempts still pending (`protected`, I5) and the attempt journal are kept.
pub async fn cleanup_orphans(
    table: &Table,
    older_than: Duration,
    dry_run: bool,
    protected: &[String],
) -> Result<CleanupReport> {
    let mut report = CleanupReport { table: table.identifier().to_string(), deleted: !dry_run, ..Default::default() };
    let location = table.metadata().location();
    let Some(root) = location.strip_prefix("file://").or_else(|| location.strip_prefix("file:")) else {
        return Err(OffloadError::Schema {
            table: report.table.clone(),
            message: format!("orphan cleanup only handles local warehouses, not {location}"),
        });
    };
    let mut refs: HashSet<PathBuf> =
        referenced_files(table).await?.iter().map(|p| PathBuf::from(local_path(p))).collect();
    refs.extend(protected.iter().map(|p| PathBuf::from(local_path(p))));
    let journal_dir = PathBuf::from(local_path(&crate::commit::Journal::path_of(table)))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default();
    report.files_referenced = refs.len();
    let mut stack = vec![PathBuf::from(root)];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                if path != journal_dir {
                    stack.push(path);
                }
                continue;
            }
            report.files_scanned += 1;
            let old = meta.modified().ok().and_then(|m| m.elapsed().ok()).is_some_and(|age| age >= older_than);
            // version-hint and stray metadata are the metadata sweep's business.
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if refs.contains(&path) || !old || name.ends_with(".metadata.json") || name == "version-hint.text" {
                continue;
            }
            report.orphans.push(path.display().to_string());
            if !dry_run {
                std::fs::remove_file(&path)
                    .map_err(|e| OffloadError::Crash(format!("cannot delete {}: {e}", path.display())))?;
            }
        }
    }
    report.orphans.sort();
    Ok(report)
}

fn local_path(uri: &str) -> &str {
    uri.strip_prefix("file://").or_else(|| uri.strip_prefix("file:")).unwrap_or(uri)
}
