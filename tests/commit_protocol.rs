//! `commit_window`'s branches against a scripted catalog double (RisingWave's exactly-once
//! sink tests do the same): the double wraps a real SQLite SQL catalog and, for each commit,
//! does what the script says — refuse, fail and apply (now, later or never), hang, or report
//! a success it did not persist. Each test names the invariant it checks (docs/exactly-once.md).
//!
//! Faults from outside the process (a proxy in front of a REST catalog, a connection dropped
//! during PostgreSQL's COMMIT, a lock held by another process) are in tests/test_catalog_faults.py.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use iceberg::spec::DataFile;
use iceberg::table::Table;
use iceberg::transaction::{ApplyTransactionAction, Transaction};
use iceberg::{Catalog, ErrorKind, TableCommit, TableIdent};

use iceberg_offload::commit::{
    self, Attempt, AttemptKind, CommitContext, Journal, Resolution, TableView, snapshot_of_run,
};
use iceberg_offload::config::CatalogLimits;
use iceberg_offload::error::{OffloadError, PendingCause};

/// What the double does with the next commit.
#[derive(Debug, Clone)]
enum Step {
    Pass,
    /// A definite refusal: what a compare-and-swap that lost looks like (409).
    Refuse,
    /// Applies the commit, then answers as a 504 would.
    ApplyThenFail,
    /// Answers as a 504 would at once, and applies the commit after the delay.
    FailThenApplyAfter(Duration),
    /// Answers as a 504 would and never applies it.
    FailNeverApply,
    /// Never answers.
    Hang,
    /// Reports success without persisting (iceberg-catalog-sql's ignored SQL COMMIT error).
    ReportSuccessWithoutPersisting,
    /// Answers 504, and the reload that follows fails too.
    FailAndReloadFails,
    /// Applies the commit, and answers 409: a proxy that re-sent the request after a lost
    /// answer, the copy refused because the original landed.
    ApplyThenRefuse,
}

#[derive(Debug)]
struct ScriptedCatalog {
    inner: Arc<dyn Catalog>,
    script: Mutex<VecDeque<Step>>,
    fail_next_load: Mutex<bool>,
}

fn server_error() -> iceberg::Error {
    iceberg::Error::new(ErrorKind::Unexpected, "A server-side gateway timeout occurred; the commit state is unknown.")
}

iceberg_offload::forward_catalog!(ScriptedCatalog, inner, {
    async fn load_table(&self, t: &TableIdent) -> iceberg::Result<Table> {
        if std::mem::take(&mut *self.fail_next_load.lock().unwrap()) {
            return Err(iceberg::Error::new(ErrorKind::Unexpected, "503 Service Unavailable"));
        }
        self.inner.load_table(t).await
    }
    async fn update_table(&self, commit: TableCommit) -> iceberg::Result<Table> {
        let step = self.script.lock().unwrap().pop_front().unwrap_or(Step::Pass);
        match step {
            Step::Pass => self.inner.update_table(commit).await,
            Step::Refuse => Err(iceberg::Error::new(ErrorKind::CatalogCommitConflicts, "409: requirement failed")),
            Step::ApplyThenFail => {
                self.inner.update_table(commit).await?;
                Err(server_error())
            }
            Step::FailThenApplyAfter(delay) => {
                let inner = self.inner.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = inner.update_table(commit).await;
                });
                Err(server_error())
            }
            Step::FailNeverApply => Err(server_error()),
            Step::Hang => std::future::pending().await,
            Step::ReportSuccessWithoutPersisting => {
                let current = self.inner.load_table(commit.identifier()).await?;
                commit.apply(current)
            }
            Step::ApplyThenRefuse => {
                self.inner.update_table(commit).await?;
                Err(iceberg::Error::new(ErrorKind::CatalogCommitConflicts, "409: requirement failed"))
            }
            Step::FailAndReloadFails => {
                *self.fail_next_load.lock().unwrap() = true;
                Err(server_error())
            }
        }
    }
});

struct Fixture {
    _dir: tempfile::TempDir,
    catalog: Arc<ScriptedCatalog>,
    ident: TableIdent,
    limits: CatalogLimits,
}

impl Fixture {
    async fn new(script: Vec<Step>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (inner, ident) = common::sqlite_catalog(dir.path(), "scripted").await;
        let catalog =
            Arc::new(ScriptedCatalog { inner, script: Mutex::new(script.into()), fail_next_load: Mutex::new(false) });
        let limits = CatalogLimits { commit: Duration::from_millis(1500), ..Default::default() };
        Fixture { _dir: dir, catalog, ident, limits }
    }

    fn cx(&self) -> CommitContext {
        CommitContext { catalog: self.catalog.clone(), limits: self.limits }
    }

    async fn view(&self) -> TableView {
        TableView::load(&(self.catalog.clone() as Arc<dyn Catalog>), &self.ident).await.unwrap()
    }

    async fn journal(&self, view: &TableView) -> Journal {
        Journal::load(&view.table, Duration::from_secs(5)).await.unwrap()
    }

    /// Writes ten rows and commits them as the window ending at `hi_s`.
    async fn attempt(
        &self,
        view: &TableView,
        journal: &mut Journal,
        run_id: &str,
        hi_s: i64,
    ) -> (Vec<String>, Result<commit::Committed, OffloadError>) {
        let files = write(view, run_id, (hi_s - 10)..hi_s).await;
        let paths: Vec<String> = files.iter().map(|f| f.file_path().to_string()).collect();
        let attempt = Attempt { run_id: run_id.into(), measure: measure("k2.scripted"), kind: AttemptKind::Window };
        let result = commit::commit_window(&self.cx(), view, journal, files, &window(hi_s), 10, &attempt).await;
        (paths, result)
    }

    async fn exist(&self, paths: &[String]) -> Vec<bool> {
        let table = self.view().await.table;
        let mut out = vec![];
        for p in paths {
            out.push(table.file_io().exists(p).await.unwrap());
        }
        out
    }
}

mod common;
use common::{measure, window};

async fn write(view: &TableView, prefix: &str, ids: std::ops::Range<i64>) -> Vec<DataFile> {
    common::write(view, prefix, ids, 0).await
}

fn pending_cause(r: &Result<commit::Committed, OffloadError>) -> Option<PendingCause> {
    match r {
        Err(OffloadError::CommitPending { cause, .. }) => Some(*cause),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn i5_a_definite_refusal_deletes_the_files_at_once() {
    let f = Fixture::new(vec![Step::Refuse]).await;
    let view = f.view().await;
    let mut journal = f.journal(&view).await;
    let (paths, result) = f.attempt(&view, &mut journal, "refused", 100).await;
    assert!(matches!(result, Err(OffloadError::CommitConflict { .. })), "{result:?}");
    assert_eq!(f.exist(&paths).await, vec![false; paths.len()], "I8: a refused attempt's files are deleted");
    assert!(journal.entries().is_empty());
    assert!(f.view().await.snapshot_id().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn i5_an_error_after_the_commit_applied_is_resolved_as_committed() {
    let f = Fixture::new(vec![Step::ApplyThenFail]).await;
    let view = f.view().await;
    let mut journal = f.journal(&view).await;
    let (paths, result) = f.attempt(&view, &mut journal, "applied", 100).await;
    let committed = result.expect("resolved as committed");
    assert!(committed.resolved_after_error);
    assert_eq!(f.exist(&paths).await, vec![true; paths.len()], "a landed commit's files are never deleted");
    assert!(journal.entries().is_empty());
    assert_eq!(f.view().await.watermark, Some(window(100).hi));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn i5_a_504_applied_later_keeps_the_files_and_resolves_as_committed() {
    let f = Fixture::new(vec![Step::FailThenApplyAfter(Duration::from_millis(700))]).await;
    let view = f.view().await;
    let mut journal = f.journal(&view).await;
    let (paths, result) = f.attempt(&view, &mut journal, "late", 100).await;
    assert_eq!(pending_cause(&result), Some(PendingCause::ServerError), "{result:?}");
    assert_eq!(journal.entries().len(), 1, "the pending attempt is recorded durably");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The catalog applied it meanwhile: the files must still be there.
    let after = f.view().await;
    assert_eq!(f.exist(&paths).await, vec![true; paths.len()], "the table references these files now");
    let mut reread = f.journal(&after).await;
    assert_eq!(reread.entries().len(), 1, "the journal survives the process (read back from the table location)");
    let settled = reread.settle(&after.table).await.unwrap();
    assert!(matches!(settled[0].resolution, Resolution::Committed(_)), "{settled:?}");
    assert!(reread.entries().is_empty());
    assert_eq!(after.watermark, Some(window(100).hi));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn i5_a_504_never_applied_stays_pending_until_a_retry_lands_then_its_files_go() {
    let f = Fixture::new(vec![Step::FailNeverApply, Step::Pass]).await;
    let view = f.view().await;
    let mut journal = f.journal(&view).await;
    let (first, result) = f.attempt(&view, &mut journal, "lost", 100).await;
    assert_eq!(pending_cause(&result), Some(PendingCause::ServerError));
    assert_eq!(f.exist(&first).await, vec![true; first.len()], "unknown outcome: nothing deleted");
    // The same window again, fenced on the same snapshot: at most one of the two can land.
    let retry_view = f.view().await;
    assert_eq!(retry_view.snapshot_id(), view.snapshot_id());
    let (second, result) = f.attempt(&retry_view, &mut journal, "retry", 100).await;
    let committed = result.expect("the retry commits");
    let settled = journal.settle(&committed.table).await.unwrap();
    assert_eq!(settled.len(), 1);
    assert_eq!(settled[0].resolution, Resolution::Impossible, "the table moved past the snapshot it required");
    assert_eq!(f.exist(&first).await, vec![false; first.len()], "files of an attempt that can never land are deleted");
    assert_eq!(f.exist(&second).await, vec![true; second.len()]);
    assert!(journal.entries().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn i10_a_commit_that_never_answers_times_out_and_is_pending() {
    let f = Fixture::new(vec![Step::Hang]).await;
    let view = f.view().await;
    let mut journal = f.journal(&view).await;
    let started = std::time::Instant::now();
    let (paths, result) = f.attempt(&view, &mut journal, "hung", 100).await;
    assert!(started.elapsed() < f.limits.commit + Duration::from_secs(5), "bounded by commit_timeout");
    assert_eq!(pending_cause(&result), Some(PendingCause::Timeout), "{result:?}");
    assert_eq!(result.as_ref().unwrap_err().class().as_str(), "timeout");
    assert_eq!(f.exist(&paths).await, vec![true; paths.len()]);
    assert_eq!(journal.entries()[0].cause, Some(PendingCause::Timeout));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn i5_a_success_the_catalog_does_not_show_is_pending_not_deleted() {
    let f = Fixture::new(vec![Step::ReportSuccessWithoutPersisting]).await;
    let view = f.view().await;
    let mut journal = f.journal(&view).await;
    let (paths, result) = f.attempt(&view, &mut journal, "unconfirmed", 100).await;
    assert_eq!(pending_cause(&result), Some(PendingCause::Unconfirmed), "{result:?}");
    assert_eq!(f.exist(&paths).await, vec![true; paths.len()]);
    let entry = &journal.entries()[0];
    assert!(!entry.commit_files.is_empty(), "the manifests and metadata file of the reported commit are recorded");
    assert!(snapshot_of_run(f.view().await.table.metadata(), "unconfirmed").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn i5_when_the_table_cannot_be_read_again_nothing_is_deleted() {
    let f = Fixture::new(vec![Step::FailAndReloadFails]).await;
    let view = f.view().await;
    let mut journal = f.journal(&view).await;
    let (paths, result) = f.attempt(&view, &mut journal, "blind", 100).await;
    assert_eq!(pending_cause(&result), Some(PendingCause::ServerError), "{result:?}");
    assert_eq!(f.exist(&paths).await, vec![true; paths.len()]);
    assert_eq!(journal.entries().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn i3_the_watermark_comes_from_the_snapshot_history() {
    let f = Fixture::new(vec![]).await;
    for (i, hi) in [100, 200].into_iter().enumerate() {
        let view = f.view().await;
        let mut journal = f.journal(&view).await;
        f.attempt(&view, &mut journal, &format!("w{i}"), hi).await.1.unwrap();
    }
    let view = f.view().await;
    assert_eq!(view.watermark, Some(window(200).hi));
    assert!(matches!(view.origin, commit::WatermarkOrigin::Snapshot(_)));
    assert!(view.disagreement.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn i5_a_refusal_of_a_resent_copy_does_not_delete_the_files_of_the_original_that_landed() {
    let f = Fixture::new(vec![Step::ApplyThenRefuse]).await;
    let view = f.view().await;
    let mut journal = f.journal(&view).await;
    let (paths, result) = f.attempt(&view, &mut journal, "resent", 100).await;
    assert!(result.expect("found in the table despite the 409").resolved_after_error);
    assert_eq!(f.exist(&paths).await, vec![true; paths.len()], "the landed commit's files are kept");
    assert!(commit::files::metadata_files_ahead(&f.view().await.table).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn i5_an_attempt_whose_required_history_was_expired_is_undecidable_not_impossible() {
    let f = Fixture::new(vec![Step::Pass, Step::FailNeverApply]).await;
    // A first window, then an attempt fenced on it whose outcome stays unknown.
    let view = f.view().await;
    let mut journal = f.journal(&view).await;
    f.attempt(&view, &mut journal, "first", 100).await.1.unwrap();
    let required = f.view().await;
    let (pending, result) = f.attempt(&required, &mut journal, "unknown", 200).await;
    assert_eq!(pending_cause(&result), Some(PendingCause::ServerError));
    // Two more windows, then every snapshot but the newest is expired.
    for (run, hi) in [("second", 200), ("third", 300)] {
        let v = f.view().await;
        f.attempt(&v, &mut journal, run, hi).await.1.unwrap();
    }
    let table = f.view().await.table;
    let tx = Transaction::new(&table);
    let tx = tx.expire_snapshots().retain_last(1).expire_older_than_ms(i64::MAX).apply(tx).unwrap();
    let expired = tx.commit(f.catalog.as_ref()).await.unwrap();
    assert_eq!(expired.metadata().snapshots().count(), 1);
    let settled = journal.settle(&expired).await.unwrap();
    let unknown = settled.iter().find(|s| s.attempt.run_id == "unknown").expect("settled");
    assert_eq!(unknown.resolution, Resolution::Undecidable, "the history back to its required snapshot is gone");
    assert_eq!(f.exist(&pending).await, vec![true; pending.len()], "unprovable: its files are left to cleanup");
}
