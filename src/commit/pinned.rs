//! I4 — Fenced commit: the catalog's compare-and-swap requires the snapshot whose `W` the
//! attempt read, so a stale writer is refused instead of rebased.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use iceberg::table::Table;
use iceberg::{Catalog, TableCommit, TableIdent};

/// I4: a catalog whose `load_table` returns the table exactly as the attempt read it.
///
/// iceberg-rust's `Transaction::commit` reloads the table and re-applies its actions on
/// the newest metadata, which silently rebases a stale append. With this decorator the
/// reload returns our pinned view, so the commit's requirements name the snapshot we
/// read, and the catalog's compare-and-swap refuses it if anything was committed since.
/// Every error is marked non-retryable: retrying a pinned commit can never succeed, and an
/// unknown outcome is resolved by I5, not by sending the commit again.
#[derive(Debug)]
pub struct PinnedCatalog {
    inner: Arc<dyn Catalog>,
    pinned: Table,
    /// Set when the commit reaches the catalog: before that, a failure is certain to have
    /// changed nothing (I5 needs to know).
    sent: AtomicBool,
}

impl PinnedCatalog {
    pub fn new(inner: Arc<dyn Catalog>, pinned: Table) -> Self {
        Self { inner, pinned, sent: AtomicBool::new(false) }
    }

    /// Whether the commit was handed to the catalog.
    pub fn sent(&self) -> bool {
        self.sent.load(Ordering::SeqCst)
    }
}

crate::forward_catalog!(PinnedCatalog, inner, {
    async fn load_table(&self, table: &TableIdent) -> iceberg::Result<Table> {
        if table == self.pinned.identifier() { Ok(self.pinned.clone()) } else { self.inner.load_table(table).await }
    }
    async fn update_table(&self, commit: TableCommit) -> iceberg::Result<Table> {
        self.sent.store(true, Ordering::SeqCst);
        // Never retried inside iceberg-rust: a pinned commit that conflicted cannot succeed, and
        // any other failure must reach I5 (a retry could re-send a commit that already landed).
        self.inner.update_table(commit).await.map_err(|e| e.with_retryable(false))
    }
});
