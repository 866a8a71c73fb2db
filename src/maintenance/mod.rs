//! Table maintenance in the service: what keeps a year of 15-minute commits as cheap as the
//! first day.
//!
//! - [`compact`]: closed partitions' small files rewritten at the target size, and the
//!   manifests of many small appends merged, in one `replace` snapshot;
//! - [`expire`]: snapshot expiry with Iceberg's conventions, then the files only expired
//!   snapshots referenced (any storage);
//! - metadata hygiene: metadata files that fall out of the log are deleted after every commit
//!   (`write.metadata.delete-after-commit.enabled`, [`crate::commit::delete_dropped_metadata`]);
//! - [`orphans`]: files nothing references, left by attempts that died (local warehouses).
//!
//! `run` maintains each table after its offload, under the same lease, daily at
//! `maintenance.at` (UTC) and after every `maintenance.expire_every_commits` commits, within
//! `maintenance.timeout`. `iceberg-offload maintain` runs it by hand.

pub mod compact;
pub mod expire;
pub mod orphans;
pub mod repair;

use std::time::Instant;

pub use orphans::{CleanupReport, cleanup_orphans, referenced_files};

use crate::commit::Journal;
use crate::config::{MaintenanceConfig, TableConfig};
use crate::error::{OffloadError, Result};
use crate::services::Services;
use crate::sink::table as target;

pub use crate::report::MaintenanceReport;

/// The steps of a run (`maintain --only`): all by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Steps {
    /// Closed partitions' small files rewritten.
    pub compact: bool,
    /// Manifests merged when there are too many (`manifests_max`).
    pub metadata: bool,
    pub expire: bool,
}

impl Default for Steps {
    fn default() -> Self {
        Self { compact: true, metadata: true, expire: true }
    }
}

impl Steps {
    /// `expire,compact,metadata` (any subset).
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let mut steps = Steps { compact: false, metadata: false, expire: false };
        for word in text.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match word {
                "compact" => steps.compact = true,
                "metadata" => steps.metadata = true,
                "expire" => steps.expire = true,
                other => return Err(format!("unknown maintenance step {other:?}: expected expire, compact, metadata")),
            }
        }
        Ok(steps)
    }
}

/// Maintains one table: compaction, then expiry (the original's order: what compaction
/// replaced goes once its snapshots expire). Not while commit attempts are pending: their
/// outcome is decided from the history (I5), which neither step may change under them. A
/// compaction that fails (a concurrent append won) does not stop the expiry. The caller holds
/// the table's lease.
pub async fn maintain_table(
    svc: &Services,
    cfg: &TableConfig,
    mc: &MaintenanceConfig,
    steps: Steps,
    dry_run: bool,
) -> Result<MaintenanceReport> {
    let ident = target::ident(cfg);
    let mut report = MaintenanceReport { table: cfg.name().to_string(), ..Default::default() };
    let table = svc.catalog.load_table(&ident).await?;
    let journal = Journal::load(&table, svc.limits.storage).await?;
    if !journal.entries().is_empty() {
        report.skipped = Some(format!(
            "{} commit attempts are pending; maintenance waits until they are resolved",
            journal.entries().len()
        ));
        return Ok(report);
    }
    if (steps.compact && mc.compact) || steps.metadata {
        let mut policy = mc.compaction;
        if !(steps.compact && mc.compact) {
            policy.max_bytes = 0;
        }
        let compactor = compact::Compactor {
            replacer: &svc.replacer,
            catalog: &svc.catalog,
            cfg,
            policy,
            limits: svc.limits,
            deadline: std::time::Instant::now() + mc.timeout / 2,
            repair: None,
        };
        match compactor.run(dry_run).await {
            Ok(r) => report.compact = Some(r),
            Err(e) => report.failed = Some(format!("compaction: {e}")),
        }
    }
    if steps.expire {
        let table = svc.catalog.load_table(&ident).await?;
        report.expire = Some(expire_keeping_the_view(svc, cfg, mc, &table, dry_run).await?);
    }
    if !dry_run {
        report.metadata_bytes =
            tokio::time::timeout(svc.limits.storage, metadata_bytes(svc, &ident)).await.ok().flatten();
    }
    Ok(report)
}

/// Expiry, after the table's view (I13) moved onto the current snapshot: the snapshot the view
/// reads stays. When that snapshot cannot be known (ClickHouse unreachable), nothing expires.
async fn expire_keeping_the_view(
    svc: &Services,
    cfg: &TableConfig,
    mc: &MaintenanceConfig,
    table: &iceberg::table::Table,
    dry_run: bool,
) -> Result<expire::ExpireReport> {
    let pinned = match (&cfg.view, dry_run) {
        (None, _) => Ok(None),
        (Some(name), true) => crate::tiers::read_pinned(&svc.ch, name).await.map(|p| p.and_then(|p| p.snapshot_id)),
        (Some(_), false) => crate::tiers::repin_after_maintenance(svc, cfg, table).await,
    };
    let pinned = match pinned {
        Ok(p) => p,
        Err(e) => {
            let skipped = format!(
                "the snapshot the view {} reads is unknown ({e}); expiry waits",
                cfg.view.as_ref().map(|v| v.to_string()).unwrap_or_default()
            );
            return Ok(expire::ExpireReport {
                snapshots_before: table.metadata().snapshots().len(),
                skipped: Some(skipped),
                ..Default::default()
            });
        }
    };
    let retention = expire::Retention::of(table.metadata(), mc.retention);
    let now_ms = crate::util::now_epoch_ns() / 1_000_000;
    expire::expire(&svc.catalog, &target::ident(cfg), retention, now_ms, dry_run, svc.limits, pinned).await
}

/// The size of the table's current metadata file; `None` when it cannot be read now (the
/// gauge keeps its last value rather than failing a maintenance run that succeeded).
async fn metadata_bytes(svc: &Services, ident: &iceberg::TableIdent) -> Option<u64> {
    let table = svc.catalog.load_table(ident).await.ok()?;
    let location = table.metadata_location()?;
    let input = table.file_io().new_input(location).ok()?;
    Some(input.metadata().await.ok()?.size)
}

/// Runs a due maintenance within its time limit; its failure is reported, never the table's.
pub async fn run_if_due(svc: &Services, cfg: &TableConfig, mc: &MaintenanceConfig, windows: u64) {
    let now = chrono::Utc::now();
    if !svc.maintenance.due(cfg.name(), windows, mc, now) {
        return;
    }
    let started = Instant::now();
    let result = match tokio::time::timeout(mc.timeout, maintain_table(svc, cfg, mc, Steps::default(), false)).await {
        Ok(r) => r,
        Err(_) => Err(OffloadError::Timeout(mc.timeout)),
    };
    match &result {
        Ok(r) if r.failed.is_none() => {
            svc.maintenance.done(cfg.name(), now);
            if r.skip_reason().is_none()
                && let Some(state) = &svc.state
                && let Err(e) =
                    state.record_maintenance_success(cfg.name(), chrono::Utc::now().timestamp_millis()).await
            {
                tracing::warn!(table = cfg.name(), "maintenance success not recorded in the state store: {e}");
            }
        }
        _ => svc.maintenance.failed(cfg.name(), now),
    }
    crate::events::Maintained { table: cfg.name(), result: &result, duration: started.elapsed() }.emit(&svc.metrics);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_parsed_from_a_comma_separated_list() {
        assert_eq!(Steps::parse("expire").unwrap(), Steps { compact: false, metadata: false, expire: true });
        assert_eq!(Steps::parse("compact, metadata").unwrap(), Steps { compact: true, metadata: true, expire: false });
        assert!(Steps::parse("expire,orphans").unwrap_err().contains("\"orphans\""));
    }
}
