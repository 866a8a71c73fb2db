//! Fault injection points for the crash-recovery tests, compiled only with the
//! `fault-injection` feature (test builds). `ICEBERG_OFFLOAD_FAULT=point:action[:nth],…`:
//! at the `nth` time (default 1st) the process passes `point`, `abort` kills it on the spot
//! (no unwinding, no cleanup — like SIGKILL) and `error` makes the step fail.
//!
//! Points, in the order one window passes them: `after_read_start`, `mid_stream`,
//! `after_files_written`, `before_commit`, `commit_error` (the catalog call fails, nothing
//! committed), `commit_lost` (`error` only: the catalog reports success but persisted
//! nothing, as iceberg-catalog-sql does when its SQL COMMIT fails), `commit_unknown` (the
//! commit lands but the caller sees an error),
//! `after_commit` (before the state store), `state_update` (inside it). Maintenance passes
//! `expire_before_commit` (its record written) and `expire_after_commit` (before its deletes),
//! and its expiry commit goes through the same `commit_*` points.

use crate::error::OffloadError;

#[cfg(feature = "fault-injection")]
pub fn hit(point: &str) -> Result<(), OffloadError> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static SEEN: Mutex<Option<HashMap<String, usize>>> = Mutex::new(None);
    let Ok(spec) = std::env::var("ICEBERG_OFFLOAD_FAULT") else { return Ok(()) };
    for item in spec.split(',') {
        let parts: Vec<&str> = item.split(':').collect();
        if parts.first() != Some(&point) {
            continue;
        }
        let nth: usize = parts.get(2).and_then(|n| n.parse().ok()).unwrap_or(1);
        let count = {
            let mut seen = SEEN.lock().expect("lock");
            let c = seen.get_or_insert_with(HashMap::new).entry(point.to_string()).or_insert(0);
            *c += 1;
            *c
        };
        if count != nth {
            continue;
        }
        match parts.get(1).copied() {
            Some("abort") => {
                eprintln!("fault injection: abort at {point}");
                std::process::abort();
            }
            Some("error") => return Err(OffloadError::Crash(format!("fault injected at {point}"))),
            other => panic!("ICEBERG_OFFLOAD_FAULT: unknown action {other:?} for {point}"),
        }
    }
    Ok(())
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn hit(_point: &str) -> Result<(), OffloadError> {
    Ok(())
}

/// The same, as an iceberg error, for points inside the catalog call.
#[cfg(feature = "fault-injection")]
fn hit_iceberg(point: &str) -> iceberg::Result<()> {
    hit(point).map_err(|e| iceberg::Error::new(iceberg::ErrorKind::Unexpected, e.to_string()))
}

/// Test builds only: a catalog wrapper that fails commits at the `commit_*` points. The
/// production catalog path has no fault hooks; faults from outside the process (a proxy, a
/// lock, a signal) are what the rest of the suite injects.
#[cfg(feature = "fault-injection")]
#[derive(Debug)]
pub struct FaultyCatalog {
    inner: std::sync::Arc<dyn iceberg::Catalog>,
}

#[cfg(feature = "fault-injection")]
impl FaultyCatalog {
    pub fn new(inner: std::sync::Arc<dyn iceberg::Catalog>) -> Self {
        Self { inner }
    }
}

#[cfg(feature = "fault-injection")]
crate::forward_catalog!(FaultyCatalog, inner, {
    async fn load_table(&self, table: &iceberg::TableIdent) -> iceberg::Result<iceberg::table::Table> {
        self.inner.load_table(table).await
    }
    async fn update_table(&self, commit: iceberg::TableCommit) -> iceberg::Result<iceberg::table::Table> {
        hit_iceberg("commit_error")?;
        if hit("commit_lost").is_err() {
            // What iceberg-catalog-sql does when its SQL COMMIT fails: report the staged
            // table as committed although nothing was persisted.
            let current = self.inner.load_table(commit.identifier()).await?;
            return commit.apply(current);
        }
        let table = self.inner.update_table(commit).await?;
        hit_iceberg("commit_unknown")?;
        Ok(table)
    }
});
