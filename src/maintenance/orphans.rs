//! Orphan-file cleanup (I8 for attempts that died before they could clean up after
//! themselves): files under a table's location that no snapshot, manifest or metadata file
//! references, and that are older than a floor (so no attempt still writing is touched).
//! Local warehouses are walked; S3 is listed through opendal (FileIO cannot list).

use std::collections::{HashMap, HashSet};
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

/// A file under the table's location, and how long ago it was last written.
struct Listed {
    uri: String,
    age: Option<Duration>,
}

/// Finds (and unless `dry_run`, deletes) unreferenced files older than `older_than`, on a
/// local disk or on S3 (listed through opendal with `storage`, the catalog's storage
/// properties). Files of commit attempts and compactions still pending (`protected`, I5) and
/// the service's own records (`offload/`) are kept; `*.metadata.json` and `version-hint.text`
/// are the metadata sweep's business.
pub async fn cleanup_orphans(
    table: &Table,
    older_than: Duration,
    dry_run: bool,
    protected: &[String],
    storage: &HashMap<String, String>,
) -> Result<CleanupReport> {
    let mut report = CleanupReport { table: table.identifier().to_string(), deleted: !dry_run, ..Default::default() };
    let location = table.metadata().location().trim_end_matches('/').to_string();
    let refs: HashSet<String> =
        referenced_files(table).await?.iter().chain(protected).map(|p| normalise(p).to_string()).collect();
    report.files_referenced = refs.len();
    let own = format!("{}/offload/", normalise(&location));
    let listed = if location.starts_with("s3://") || location.starts_with("s3a://") {
        list_s3(&location, storage).await.map_err(|e| OffloadError::Crash(format!("listing {location}: {e}")))?
    } else if location.starts_with('/') || location.starts_with("file:") {
        list_local(normalise(&location))
    } else {
        return Err(OffloadError::Schema {
            table: report.table.clone(),
            message: format!("orphan cleanup lists local and S3 warehouses, not {location}"),
        });
    };
    for file in listed {
        report.files_scanned += 1;
        let path = normalise(&file.uri);
        let name = path.rsplit('/').next().unwrap_or_default();
        let old = file.age.is_some_and(|age| age >= older_than);
        if refs.contains(path)
            || !old
            || path.starts_with(&own)
            || name.ends_with(".metadata.json")
            || name == "version-hint.text"
        {
            continue;
        }
        report.orphans.push(file.uri.clone());
        if !dry_run {
            let deleted = if file.uri.starts_with('/') {
                std::fs::remove_file(&file.uri).map_err(|e| e.to_string())
            } else {
                table.file_io().delete(&file.uri).await.map_err(|e| e.to_string())
            };
            deleted.map_err(|e| OffloadError::Crash(format!("cannot delete {}: {e}", file.uri)))?;
        }
    }
    report.orphans.sort();
    Ok(report)
}

/// A path as it is compared: local paths without their `file:` scheme, S3 URIs as `s3://`.
fn normalise(uri: &str) -> &str {
    uri.strip_prefix("file://").or_else(|| uri.strip_prefix("file:")).unwrap_or(uri)
}

fn list_local(root: &str) -> Vec<Listed> {
    let mut out = vec![];
    let mut stack = vec![PathBuf::from(root)];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(path);
                continue;
            }
            let age = meta.modified().ok().and_then(|m| m.elapsed().ok());
            out.push(Listed { uri: path.display().to_string(), age });
        }
    }
    out
}

/// Every object under `location` (`s3://bucket/prefix`), with its age from S3's
/// last-modified time, through the catalog's storage properties (`s3.*`).
async fn list_s3(location: &str, props: &HashMap<String, String>) -> std::result::Result<Vec<Listed>, String> {
    let url = url::Url::parse(location).map_err(|e| e.to_string())?;
    let bucket = url.host_str().ok_or("no bucket in the location")?;
    let prefix = url.path().trim_matches('/');
    let mut builder = opendal::services::S3::default().bucket(bucket).disable_config_load();
    if let Some(v) = props.get("s3.endpoint") {
        builder = builder.endpoint(v);
    }
    builder = builder.region(props.get("s3.region").or(props.get("client.region")).map_or("us-east-1", |v| v));
    if let Some(v) = props.get("s3.access-key-id") {
        builder = builder.access_key_id(v);
    }
    if let Some(v) = props.get("s3.secret-access-key") {
        builder = builder.secret_access_key(v);
    }
    // Iceberg's default is virtual-host style; `s3.path-style-access = true` asks for paths.
    let path_style = props.get("s3.path-style-access").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    if !path_style {
        builder = builder.enable_virtual_host_style();
    }
    let op = opendal::Operator::new(builder).map_err(|e| e.to_string())?.finish();
    let entries = op.list_with(&format!("{prefix}/")).recursive(true).await.map_err(|e| e.to_string())?;
    let now = chrono::Utc::now().timestamp_millis();
    let mut out = vec![];
    for entry in entries {
        if entry.metadata().is_dir() {
            continue;
        }
        let modified = match entry.metadata().last_modified() {
            Some(t) => Some(t),
            None => op.stat(entry.path()).await.ok().and_then(|m| m.last_modified()),
        };
        let age = modified
            .map(|t| t.into_inner().as_millisecond())
            .and_then(|ms| u64::try_from(now - ms).ok())
            .map(Duration::from_millis);
        out.push(Listed { uri: format!("s3://{bucket}/{}", entry.path().trim_start_matches('/')), age });
    }
    Ok(out)
}
