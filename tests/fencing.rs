//! I4 (fenced commit) and I8 (nothing stray), on a real SQLite catalog, checked with
//! pyiceberg (an independent reader) when the test tooling is installed (dev/setup.sh).

use std::sync::Arc;
use std::time::Duration;

use iceberg_offload::commit::{self, Attempt, AttemptKind, CommitContext, Journal, TableView};
use iceberg_offload::config::CatalogKind;
use iceberg_offload::error::OffloadError;

mod common;
use common::{catalog_with_table, measure, window};

async fn write(view: &TableView, prefix: &str, ids: std::ops::Range<i64>) -> Vec<iceberg::spec::DataFile> {
    common::write(view, prefix, ids, 1_700_000_000).await
}

/// A SQLite catalog in a temporary folder with the empty target table created.
async fn setup() -> (tempfile::TempDir, Arc<dyn iceberg::Catalog>, iceberg::TableIdent) {
    let dir = tempfile::tempdir().unwrap();
    let (cat, ident) = common::sqlite_catalog(dir.path(), "fence").await;
    (dir, cat, ident)
}

/// The test tooling's REST catalog server (dev/rest_catalog.py: the REST spec in front of
/// pyiceberg's SQL catalog, so requirement checks and compare-and-swap are pyiceberg's), with
/// its SQLite store and warehouse in `dir`. Killed on drop.
struct RestServer(std::process::Child);

impl Drop for RestServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn venv_python() -> String {
    let venv = std::env::var("ICEBERG_OFFLOAD_VENV").expect("run through dev/test.sh (ICEBERG_OFFLOAD_VENV)");
    format!("{venv}/bin/python")
}

async fn setup_rest() -> (tempfile::TempDir, RestServer, Arc<dyn iceberg::Catalog>, iceberg::TableIdent) {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = std::process::Command::new(venv_python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/dev/rest_catalog.py"))
        .args(["--port", &port.to_string()])
        .args(["--catalog-uri", &format!("sqlite:///{}/catalog.db", dir.path().display())])
        .args(["--warehouse", &format!("file://{}/warehouse", dir.path().display())])
        .spawn()
        .unwrap();
    let server = RestServer(child);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "the REST catalog server did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (cat, ident) = catalog_with_table(CatalogKind::Rest, format!("http://127.0.0.1:{port}"), None, "fence").await;
    (dir, server, cat, ident)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_with_a_stale_view_is_refused_and_leaves_nothing() {
    let (dir, cat, ident) = setup().await;
    stale_view_is_refused(dir, cat, ident).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_with_a_stale_view_is_refused_by_a_rest_catalog_too() {
    let (dir, _server, cat, ident) = setup_rest().await;
    stale_view_is_refused(dir, cat, ident).await;
}

fn context(cat: &Arc<dyn iceberg::Catalog>) -> CommitContext {
    CommitContext { catalog: cat.clone(), limits: Default::default() }
}

async fn journal(view: &TableView) -> Journal {
    Journal::load(&view.table, Duration::from_secs(10)).await.unwrap()
}

async fn stale_view_is_refused(dir: tempfile::TempDir, cat: Arc<dyn iceberg::Catalog>, ident: iceberg::TableIdent) {
    // Two writers read the same view (I3)...
    let stale = TableView::load(&cat, &ident).await.unwrap();
    let fresh = TableView::load(&cat, &ident).await.unwrap();
    // ...the first commits its window...
    let files_a = write(&fresh, "writer-a", 0..10).await;
    let a = Attempt { run_id: "run-a".into(), measure: measure("k2.fence"), kind: AttemptKind::Window };
    let cx = context(&cat);
    let mut j = journal(&fresh).await;
    commit::commit_window(&cx, &fresh, &mut j, files_a, &window(1_700_000_100), 10, &a).await.unwrap();
    // ...and the second, still holding the old view, must be refused (I4), not rebased.
    let files_b = write(&stale, "writer-b", 0..10).await;
    let paths_b: Vec<String> = files_b.iter().map(|f| f.file_path().to_string()).collect();
    let b = Attempt { run_id: "run-b".into(), measure: measure("k2.fence"), kind: AttemptKind::Window };
    let err = commit::commit_window(&cx, &stale, &mut j, files_b, &window(1_700_000_100), 10, &b).await.unwrap_err();
    assert!(matches!(err, OffloadError::CommitConflict { .. }), "expected a conflict, got {err}");

    let after = TableView::load(&cat, &ident).await.unwrap();
    assert_eq!(after.table.metadata().snapshots().count(), 1, "only writer A's snapshot exists");
    assert!(commit::snapshot_of_run(after.table.metadata(), "run-b").is_none());
    assert!(j.entries().is_empty(), "a refused attempt leaves the journal: {:?}", j.entries());
    assert!(
        commit::files::metadata_files_ahead(&after.table).is_empty(),
        "no metadata file above the current version may be left for directory readers"
    );
    assert_eq!(after.watermark, Some(window(1_700_000_100).hi));
    // I8: the refused attempt's data files are gone.
    for p in &paths_b {
        assert!(!after.table.file_io().exists(p).await.unwrap(), "{p} was left behind");
    }

    // An independent reader sees A's ten rows, once.
    let out = std::process::Command::new(venv_python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/dev/verify_iceberg.py"))
        .args(["--catalog-uri", &format!("sqlite:///{}/catalog.db", dir.path().display())])
        .args(["--warehouse", &format!("file://{}/warehouse", dir.path().display())])
        .args(["--table", "cold.fence", "--key", "id", "--sum", "id"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for reader in ["pyiceberg", "clickhouse"] {
        assert_eq!(v[reader]["count"], 10, "{reader}: {v}");
        assert_eq!(v[reader]["distinct_keys"], 10, "{reader}: {v}");
        assert_eq!(v[reader]["sums"]["id"].as_str().unwrap(), "45", "{reader}: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_metadata_files_are_found_by_version_or_by_run_id_never_by_age() {
    let (_dir, cat, ident) = setup().await;
    let view = TableView::load(&cat, &ident).await.unwrap();
    let files = write(&view, "w", 0..5).await;
    let a = Attempt { run_id: "run-1".into(), measure: measure("k2.fence"), kind: AttemptKind::Window };
    let mut j = journal(&view).await;
    let committed =
        commit::commit_window(&context(&cat), &view, &mut j, files, &window(1_700_000_100), 5, &a).await.unwrap();
    let current = committed.table.metadata_location().unwrap().trim_start_matches("file://").to_string();
    let meta_dir = std::path::Path::new(&current).parent().unwrap().to_path_buf();
    let current_version: u64 =
        std::path::Path::new(&current).file_name().unwrap().to_str().unwrap()[..5].parse().unwrap();

    // A loser of a compare-and-swap (same version as current: it can never become current),
    // an old next-version file of a writer we know nothing about, and the next-version file
    // of an attempt of ours that can never land (its run id inside).
    let lost = meta_dir.join(format!("{current_version:05}-lost.metadata.json"));
    let unknown = meta_dir.join(format!("{:05}-unknown.metadata.json", current_version + 1));
    let ours = meta_dir.join(format!("{:05}-ours.metadata.json", current_version + 1));
    std::fs::copy(&current, &lost).unwrap();
    std::fs::copy(&current, &unknown).unwrap();
    let text = std::fs::read_to_string(&current).unwrap().replace("\"run-1\"", "\"run-dead\"");
    std::fs::write(&ours, text).unwrap();
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    std::fs::File::options().write(true).open(&unknown).unwrap().set_modified(two_hours_ago).unwrap();

    assert_eq!(commit::sweep_dead_metadata(&committed.table), 1);
    assert!(!lost.exists());
    assert!(unknown.exists() && ours.exists(), "next-version files are never removed by version or age");
    let removed =
        commit::AttemptFiles { table: &committed.table, run_id: "run-dead", paths: &[], limit: Duration::from_secs(5) }
            .discard()
            .await;
    assert_eq!(removed, 1);
    assert!(!ours.exists(), "the metadata file carrying the dead attempt's run id is removed");
    assert!(unknown.exists(), "another writer's file is never touched");
    assert!(std::path::Path::new(&current).exists());
}
