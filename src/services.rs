//! What a table operation is given: the ClickHouse client, the catalog, the state store, the
//! metrics, and this process's memory of when each table's audit and maintenance are next
//! due. Built once by the CLI, shared by the offload, the audit, maintenance and repair.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use iceberg::Catalog;

use crate::audit::Audits;
use crate::commit::CommitContext;
use crate::config::{CatalogLimits, MaintenanceConfig};
use crate::metrics::Metrics;
use crate::source::ClickHouse;
use crate::state::StateStore;

/// The services one table's offload uses.
#[derive(Clone)]
pub struct Services {
    pub ch: ClickHouse,
    pub catalog: Arc<dyn Catalog>,
    pub state: Option<StateStore>,
    pub metrics: Arc<Metrics>,
    pub limits: CatalogLimits,
    /// `clickhouse.max_clock_skew`.
    pub max_clock_skew: std::time::Duration,
    pub audit: AuditSettings,
    /// What the audits of this process know (I9), shared by its cycles.
    pub audits: Arc<Audits>,
    /// When each table was last maintained by this process.
    pub maintenance: Arc<MaintenanceSchedule>,
    /// The catalog's compare-and-swap for `replace` commits (compaction).
    pub replacer: Arc<crate::commit::replace::Replacer>,
    /// When each table's hot partitions were last looked at for eviction by this process.
    pub evictions: Arc<EvictionSchedule>,
    /// How ClickHouse reaches the warehouse for the views (I13).
    pub views: ViewStorage,
}

/// How ClickHouse reads a warehouse on S3 for the views: the named collection that holds the
/// credentials (`clickhouse.iceberg_s3_collection`) and the endpoint the catalog writes to
/// (`s3.endpoint`, path-style), `None` for AWS's own.
#[derive(Debug, Clone, Default)]
pub struct ViewStorage {
    pub s3_collection: Option<String>,
    pub s3_endpoint: Option<String>,
}

/// Eviction runs at most once per [`EvictionSchedule::EVERY`] per table in a process: its
/// proof reads the partitions and audits their days, and partitions are due by the day.
#[derive(Debug, Default)]
pub struct EvictionSchedule {
    last: Mutex<HashMap<String, std::time::Instant>>,
}

impl EvictionSchedule {
    pub const EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

    /// Whether `table`'s eviction is due now; if so, it counts as begun.
    pub fn due(&self, table: &str) -> bool {
        let mut last = self.last.lock().expect("not poisoned");
        let due = last.get(table).is_none_or(|at| at.elapsed() >= Self::EVERY);
        if due {
            last.insert(table.to_string(), std::time::Instant::now());
        }
        due
    }
}

/// `service.audit_recent_days`, `service.audit_full_every`.
#[derive(Debug, Clone, Copy)]
pub struct AuditSettings {
    pub recent_days: u32,
    pub full_every: std::time::Duration,
}

impl Services {
    pub fn commit_context(&self) -> CommitContext {
        CommitContext { catalog: self.catalog.clone(), limits: self.limits }
    }
}

/// When each table was last maintained by this process, and its commits since.
#[derive(Debug, Default)]
pub struct MaintenanceSchedule {
    tables: Mutex<HashMap<String, LastRun>>,
}

/// A table's last maintenance: when, the commits since, and after a failure when to retry.
#[derive(Debug)]
struct LastRun {
    at: chrono::DateTime<chrono::Utc>,
    commits: u64,
    retry_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// A failed maintenance is retried after this long (not at every cycle, not a day later).
const RETRY_AFTER: chrono::Duration = chrono::Duration::hours(1);

impl MaintenanceSchedule {
    /// Records `windows` commits of `table`; returns whether maintenance is due now: never run
    /// by this process, the daily time passed since the last run, or enough commits.
    pub fn due(&self, table: &str, windows: u64, mc: &MaintenanceConfig, now: chrono::DateTime<chrono::Utc>) -> bool {
        if !mc.enabled {
            return false;
        }
        let mut tables = self.tables.lock().expect("not poisoned");
        let Some(last) = tables.get_mut(table) else { return true };
        last.commits += windows;
        if let Some(retry_at) = last.retry_at {
            return now >= retry_at;
        }
        let daily = now.date_naive().and_time(mc.at).and_utc();
        let boundary = if daily <= now { daily } else { daily - chrono::Duration::days(1) };
        last.at < boundary || (mc.expire_every_commits > 0 && last.commits >= mc.expire_every_commits)
    }

    pub fn done(&self, table: &str, now: chrono::DateTime<chrono::Utc>) {
        self.tables
            .lock()
            .expect("not poisoned")
            .insert(table.to_string(), LastRun { at: now, commits: 0, retry_at: None });
    }

    pub fn failed(&self, table: &str, now: chrono::DateTime<chrono::Utc>) {
        let mut tables = self.tables.lock().expect("not poisoned");
        let last = tables.entry(table.to_string()).or_insert(LastRun { at: now, commits: 0, retry_at: None });
        last.retry_at = Some(now + RETRY_AFTER);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(every: u64) -> MaintenanceConfig {
        MaintenanceConfig {
            enabled: true,
            at: chrono::NaiveTime::from_hms_opt(3, 0, 0).unwrap(),
            expire_every_commits: every,
            timeout: std::time::Duration::from_secs(60),
            retention: crate::config::Retention { max_age: std::time::Duration::from_secs(86_400), min_keep: 1 },
            compact: true,
            compaction: crate::config::CompactionPolicy {
                target_size: 128 << 20,
                after: std::time::Duration::from_secs(3600),
                max_bytes: 1 << 30,
                manifests_max: 100,
            },
        }
    }

    fn at(s: &str) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&chrono::Utc)
    }

    #[test]
    fn maintenance_is_due_at_start_daily_and_after_enough_commits() {
        let s = MaintenanceSchedule::default();
        let mc = config(10);
        assert!(s.due("t", 3, &mc, at("2026-12-01T10:00:00Z")), "never run by this process");
        s.done("t", at("2026-12-01T10:00:00Z"));
        assert!(!s.due("t", 4, &mc, at("2026-12-01T12:00:00Z")));
        assert!(!s.due("t", 5, &mc, at("2026-12-02T02:59:00Z")), "9 commits, before 03:00");
        assert!(s.due("t", 0, &mc, at("2026-12-02T03:00:00Z")), "the daily time passed");
        s.done("t", at("2026-12-02T03:00:00Z"));
        assert!(s.due("t", 10, &mc, at("2026-12-02T03:15:00Z")), "10 commits since");
        s.failed("t", at("2026-12-02T03:15:00Z"));
        assert!(!s.due("t", 0, &mc, at("2026-12-02T04:00:00Z")), "a failure waits an hour");
        assert!(s.due("t", 0, &mc, at("2026-12-02T04:15:00Z")));
        assert!(!MaintenanceSchedule::default().due(
            "t",
            0,
            &MaintenanceConfig { enabled: false, ..mc },
            at("2026-12-02T03:00:00Z")
        ));
    }
}
