//! The metrics of the guide, with its exact names, types, labels and buckets.
//!
//! Values are set only through [`crate::events`], so each event updates its metrics and
//! its log line in one place.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{LabelPair, Metric, MetricFamily, MetricType, Quantile, Summary};
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

use crate::error::ErrorClass;
use crate::report::{AuditStatus, Scope};

pub const DURATION_BUCKETS: &[f64] = &[1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];
pub const CYCLE_BUCKETS: &[f64] = &[5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0];
pub const CYCLE_STATUSES: [&str; 3] = ["success", "partial", "failed"];

pub struct Metrics {
    pub registry: Registry,
    pub rows_total: IntCounterVec,
    pub cycles_total: IntCounterVec,
    pub cycles_interrupted_total: prometheus::IntCounter,
    pub pending_commits: GaugeVec,
    pub pending_commit_age_seconds: GaugeVec,
    pub clock_skew_seconds: Gauge,
    pub errors_total: IntCounterVec,
    pub lag_minutes: GaugeVec,
    pub watermark_timestamp_seconds: GaugeVec,
    pub tables_configured: Gauge,
    pub last_success_timestamp: Gauge,
    pub last_failure_timestamp: Gauge,
    pub duration_seconds: HistogramVec,
    pub cycle_duration_seconds: Histogram,
    pub rows_per_second: RowsPerSecond,
    pub info: GaugeVec,
    pub watermark_data_timestamp_seconds: GaugeVec,
    pub commits_total: IntCounterVec,
    pub runs_total: IntCounterVec,
    pub lag_seconds: GaugeVec,
    pub table_last_success_timestamp_seconds: GaugeVec,
    pub rows_behind: GaugeVec,
    pub ttl_headroom_seconds: GaugeVec,
    pub late_rows: GaugeVec,
    pub audit_extra_rows: GaugeVec,
    pub audit_days: GaugeVec,
    pub audit_last_timestamp_seconds: GaugeVec,
    pub maintenance_runs_total: IntCounterVec,
    pub snapshots_expired_total: IntCounterVec,
    pub maintenance_files_deleted_total: IntCounterVec,
    pub maintenance_last_success_timestamp_seconds: GaugeVec,
    pub table_snapshots: GaugeVec,
    pub compaction_files_rewritten_total: IntCounterVec,
    pub compaction_bytes_rewritten_total: IntCounterVec,
    pub table_small_files: GaugeVec,
    pub table_manifests: GaugeVec,
    pub table_metadata_bytes: GaugeVec,
    pub maintenance_duration_seconds: GaugeVec,
    pub consecutive_failures: GaugeVec,
    pub null_cursor_rows: GaugeVec,
    pub bytes_written_total: IntCounterVec,
    pub files_written_total: IntCounterVec,
    pub build_info: GaugeVec,
    pub scheduler_last_tick_timestamp_seconds: Gauge,
    pub cycle_last_duration_seconds: Gauge,
    pub replica_tables_owned: Gauge,
    pub replica_members: Gauge,
    pub table_owned: GaugeVec,
    pub replica_takeovers_total: prometheus::IntCounter,
    pub replica_members_lost_total: prometheus::IntCounter,
    pub offschedule_cycles_total: prometheus::IntCounter,
    pub replica_heartbeat_age_seconds: Gauge,
    pub replica_tables_mismatch: Gauge,
    /// I13: the hot+cold views.
    pub views: ViewMetrics,
    /// Eviction of hot partitions.
    pub eviction: EvictionMetrics,
    /// Unix time of this replica's last heartbeat written to the state store.
    last_member_heartbeat: Mutex<Option<f64>>,
    /// Unix time of each table's last successful offload, for the lag computed at scrape.
    last_table_success: Mutex<HashMap<String, f64>>,
    /// Unix time the oldest pending commit attempt of each table started, for its age at scrape.
    oldest_pending: Mutex<HashMap<String, Option<f64>>>,
    /// Start of the running cycle (Unix seconds) and the duration of the last finished one.
    cycle_clock: Mutex<(Option<f64>, f64)>,
    heartbeat: Mutex<Option<std::sync::Arc<std::sync::atomic::AtomicI64>>>,
}

/// The metrics of the hot+cold views (I13), per table that has one.
#[derive(Clone)]
pub struct ViewMetrics {
    pub rewrites_total: IntCounterVec,
    pub rewrite_failures_total: IntCounterVec,
    pub watermark_data_timestamp_seconds: GaugeVec,
}

/// A counter per table, registered.
fn table_counter(registry: &Registry, name: &str, help: &str) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), &["table"]).expect("valid metric");
    registry.register(Box::new(c.clone())).expect("unique metric");
    c
}

/// A gauge per table, registered.
fn table_gauge(registry: &Registry, name: &str, help: &str) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), &["table"]).expect("valid metric");
    registry.register(Box::new(g.clone())).expect("unique metric");
    g
}

impl ViewMetrics {
    fn register(registry: &Registry) -> Self {
        Self {
            rewrites_total: table_counter(
                registry,
                "offload_view_rewrites_total",
                "Times the table's hot+cold view was rewritten onto a new Iceberg snapshot and split",
            ),
            rewrite_failures_total: table_counter(
                registry,
                "offload_view_rewrite_failures_total",
                "Failed rewrites of the table's hot+cold view (it stays on its older snapshot and split: still exact, less fresh)",
            ),
            watermark_data_timestamp_seconds: table_gauge(
                registry,
                "offload_view_watermark_data_timestamp_seconds",
                "Where the table's hot+cold view splits (data time): W, or with eviction the start of the day evict_after ago",
            ),
        }
    }
}

/// The metrics of the eviction of hot partitions (`tables[].evict_after`), per table.
#[derive(Clone)]
pub struct EvictionMetrics {
    pub failures_total: IntCounterVec,
    pub partitions_total: IntCounterVec,
    pub rows_total: IntCounterVec,
    pub blocked_partitions: GaugeVec,
    pub blocked_seconds: GaugeVec,
}

impl EvictionMetrics {
    fn register(registry: &Registry) -> Self {
        Self {
            partitions_total: table_counter(
                registry,
                "offload_evicted_partitions_total",
                "Hot-tier partitions dropped from ClickHouse after Iceberg was proved to hold every row of them",
            ),
            rows_total: table_counter(
                registry,
                "offload_evicted_rows_total",
                "Rows of the hot-tier partitions dropped",
            ),
            failures_total: table_counter(
                registry,
                "offload_eviction_failures_total",
                "Eviction runs that could not run at all (partition key refused, ClickHouse or the catalog unreachable); nothing dropped",
            ),
            blocked_partitions: table_gauge(
                registry,
                "offload_eviction_blocked_partitions",
                "Hot-tier partitions due for eviction (newest row older than evict_after) that cannot be dropped yet",
            ),
            blocked_seconds: table_gauge(
                registry,
                "offload_eviction_blocked_seconds",
                "How long the longest-blocked due partition has been due (0 when none is blocked)",
            ),
        }
    }
}

/// Results of `offload_commit_attempts_total`.
pub const COMMIT_RESULTS: [&str; 5] = ["committed", "conflict", "unknown_resolved", "pending", "error"];
/// Results of `offload_maintenance_runs_total`.
pub const MAINTENANCE_RESULTS: [&str; 3] = ["success", "failure", "skipped"];
/// Outcomes of `offload_runs_total`.
pub const RUN_OUTCOMES: [&str; 5] = ["success", "noop", "failure", "skipped", "interrupted"];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let gauge = |name: &str, help: &str| {
            let g = Gauge::new(name, help).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let rows_total = counter("offload_rows_total", "Rows offloaded to Iceberg (committed)", &["table", "layer"]);
        let cycles_total = counter("offload_cycles_total", "Offload cycles by final status", &["status"]);
        for s in CYCLE_STATUSES {
            cycles_total.with_label_values(&[s]);
        }
        let cycles_interrupted_total = prometheus::IntCounter::new(
            "offload_cycles_interrupted_total",
            "Cycles cut short by a shutdown (SIGTERM/SIGINT): neither success nor failure, so not in offload_cycles_total",
        )
        .expect("valid metric");
        registry.register(Box::new(cycles_interrupted_total.clone())).expect("unique metric");
        let errors_total =
            counter("offload_errors_total", "Offload errors by table and type", &["table", "error_type"]);
        let commits_total =
            counter("offload_commit_attempts_total", "Iceberg commit attempts by result", &["table", "result"]);
        let runs_total = counter(
            "offload_runs_total",
            "Table runs by outcome (noop: nothing new to offload)",
            &["table", "outcome"],
        );
        let bytes_written_total =
            counter("offload_bytes_written_total", "Bytes of Parquet data files committed", &["table"]);
        let files_written_total = counter("offload_files_written_total", "Parquet data files committed", &["table"]);
        let duration_seconds = HistogramVec::new(
            HistogramOpts::new("offload_duration_seconds", "Duration of one table's offload")
                .buckets(DURATION_BUCKETS.to_vec()),
            &["table", "layer"],
        )
        .expect("valid metric");
        registry.register(Box::new(duration_seconds.clone())).expect("unique metric");
        let cycle_duration_seconds = Histogram::with_opts(
            HistogramOpts::new("offload_cycle_duration_seconds", "Duration of one offload cycle")
                .buckets(CYCLE_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        registry.register(Box::new(cycle_duration_seconds.clone())).expect("unique metric");
        let int_counter = |name: &str, help: &str| {
            let c = prometheus::IntCounter::new(name, help).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let replica_takeovers_total = int_counter(
            "offload_replica_takeovers_total",
            "Table leases this replica took over from a replica found gone (heartbeat too old) or a dead process of this host",
        );
        let replica_members_lost_total = int_counter(
            "offload_replica_members_lost_total",
            "Replicas found gone by this one: their heartbeat stopped without leaving (SIGKILL, crash, partition); each loss is counted by one replica",
        );
        let offschedule_cycles_total = int_counter(
            "offload_offschedule_cycles_total",
            "Cycles run at once, off the aligned schedule, over the tables this replica gained from the membership (a replica lost, leaving or joining)",
        );
        let rows_per_second = RowsPerSecond::new();
        registry.register(Box::new(rows_per_second.clone())).expect("unique metric");
        // The standard process_* series (resident memory, CPU seconds, open fds, start time):
        // the "memory stays flat" promise has to be visible, not only benchmarked.
        registry
            .register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))
            .expect("unique metric");
        Self {
            rows_total,
            cycles_total,
            cycles_interrupted_total,
            clock_skew_seconds: gauge(
                "offload_clock_skew_seconds",
                "ClickHouse's clock minus this host's, at the last table run (windows are cut on ClickHouse's clock)",
            ),
            pending_commits: gauge_vec(
                "offload_pending_commits",
                "Commit attempts whose outcome is unknown (timeout, 5xx, lost connection); their files are kept until resolved",
                &["table"],
            ),
            pending_commit_age_seconds: gauge_vec(
                "offload_pending_commit_age_seconds",
                "Age of the table's oldest commit attempt whose outcome is unknown (0 when none is pending)",
                &["table"],
            ),
            errors_total,
            lag_minutes: gauge_vec(
                "offload_lag_minutes",
                "Minutes since the table's last successful offload",
                &["table"],
            ),
            watermark_timestamp_seconds: gauge_vec(
                "watermark_timestamp_seconds",
                "Unix time of the table's last successful watermark update",
                &["table"],
            ),
            watermark_data_timestamp_seconds: gauge_vec(
                "offload_watermark_data_timestamp_seconds",
                "The watermark itself: data time (cursor) up to which the table is offloaded",
                &["table"],
            ),
            tables_configured: gauge("offload_tables_configured", "Tables configured for offload"),
            last_success_timestamp: gauge("offload_last_success_timestamp", "Unix time of the last successful cycle"),
            last_failure_timestamp: gauge("offload_last_failure_timestamp", "Unix time of the last failed cycle"),
            duration_seconds,
            cycle_duration_seconds,
            rows_per_second,
            info: gauge_vec(
                "offload_info",
                "Offload pipeline information",
                &["version", "schedule_minutes", "tables", "start_time"],
            ),
            commits_total,
            runs_total,
            bytes_written_total,
            files_written_total,
            lag_seconds: gauge_vec(
                "offload_lag_seconds",
                "Seconds since the table's last successful offload",
                &["table"],
            ),
            table_last_success_timestamp_seconds: gauge_vec(
                "offload_table_last_success_timestamp_seconds",
                "Unix time of the table's last successful run (a quiet table succeeds too)",
                &["table"],
            ),
            rows_behind: gauge_vec(
                "offload_rows_behind",
                "Source rows after the watermark at the table's last run (settled or not)",
                &["table"],
            ),
            ttl_headroom_seconds: gauge_vec(
                "offload_ttl_headroom_seconds",
                "Seconds until the source TTL may delete the oldest row not yet offloaded (+Inf when none is waiting)",
                &["table"],
            ),
            late_rows: gauge_vec(
                "offload_late_rows",
                "Source rows at or below the watermark that are not in Iceberg (arrived after their window committed), summed over the audited days",
                &["table"],
            ),
            audit_extra_rows: gauge_vec(
                "offload_audit_extra_rows",
                "Rows in Iceberg beyond the source's count (duplicates, or source rows deleted after offload), summed over the audited days",
                &["table"],
            ),
            audit_days: gauge_vec(
                "offload_audit_days",
                "Days of the cursor the audit holds a verdict for, by status (ok, missing, extra)",
                &["table", "status"],
            ),
            maintenance_runs_total: counter(
                "offload_maintenance_runs_total",
                "Table maintenance runs by result (success, failure, skipped: commit attempts pending)",
                &["table", "result"],
            ),
            snapshots_expired_total: counter(
                "offload_snapshots_expired_total",
                "Snapshots removed by maintenance (expiry)",
                &["table"],
            ),
            maintenance_files_deleted_total: counter(
                "offload_maintenance_files_deleted_total",
                "Files deleted by maintenance: manifest lists, manifests and data files only expired snapshots referenced, old metadata files",
                &["table"],
            ),
            maintenance_last_success_timestamp_seconds: gauge_vec(
                "offload_maintenance_last_success_timestamp_seconds",
                "Unix time of the table's last successful maintenance run",
                &["table"],
            ),
            table_snapshots: gauge_vec(
                "offload_table_snapshots",
                "Snapshots in the table's metadata after its last maintenance run",
                &["table"],
            ),
            compaction_files_rewritten_total: counter(
                "offload_compaction_files_rewritten_total",
                "Small data files of closed partitions replaced by compaction",
                &["table"],
            ),
            compaction_bytes_rewritten_total: counter(
                "offload_compaction_bytes_rewritten_total",
                "Bytes of the data files replaced by compaction",
                &["table"],
            ),
            table_small_files: gauge_vec(
                "offload_table_small_files",
                "Data files of closed partitions below 3/4 of the target file size, left after the last maintenance run",
                &["table"],
            ),
            table_manifests: gauge_vec(
                "offload_table_manifests",
                "Manifests the table's current snapshot lists, after the last maintenance run",
                &["table"],
            ),
            table_metadata_bytes: gauge_vec(
                "offload_table_metadata_bytes",
                "Size of the table's current metadata.json after its last maintenance run (every commit reads and rewrites it)",
                &["table"],
            ),
            maintenance_duration_seconds: gauge_vec(
                "offload_maintenance_duration_seconds",
                "Duration of the table's last maintenance run",
                &["table"],
            ),
            audit_last_timestamp_seconds: gauge_vec(
                "offload_audit_last_timestamp_seconds",
                "Unix time of the table's last audit, by scope (recent: the last days every cycle; full: every retained day)",
                &["table", "scope"],
            ),
            consecutive_failures: gauge_vec(
                "offload_consecutive_failures",
                "Failed attempts of the table since its last success (retries included)",
                &["table"],
            ),
            null_cursor_rows: gauge_vec(
                "offload_null_cursor_rows",
                "Source rows whose cursor is NULL: never eligible for offload",
                &["table"],
            ),
            build_info: gauge_vec("offload_build_info", "Build information", &["version", "iceberg_rust"]),
            scheduler_last_tick_timestamp_seconds: gauge(
                "offload_scheduler_last_tick_timestamp_seconds",
                "Unix time of the scheduler loop's last tick",
            ),
            cycle_last_duration_seconds: gauge(
                "offload_cycle_last_duration_seconds",
                "Duration of the running cycle so far, or of the last cycle when none is running",
            ),
            replica_tables_owned: gauge(
                "offload_replica_tables_owned",
                "Tables this replica owns at its last cycle (all configured tables for a single replica)",
            ),
            replica_members: gauge(
                "offload_replica_members",
                "Live replicas (this one included) this replica saw at its last cycle",
            ),
            table_owned: gauge_vec(
                "offload_table_owned",
                "1 when this replica owns the table at its last cycle, 0 when another live replica does",
                &["table"],
            ),
            replica_takeovers_total,
            replica_members_lost_total,
            offschedule_cycles_total,
            replica_heartbeat_age_seconds: gauge(
                "offload_replica_heartbeat_age_seconds",
                "Seconds since this replica last wrote its heartbeat to the state store (0 before the first)",
            ),
            replica_tables_mismatch: gauge(
                "offload_replica_tables_mismatch",
                "1 when the live replicas are configured with different tables (each then runs all of its own; leases decide)",
            ),
            last_member_heartbeat: Mutex::new(None),
            last_table_success: Mutex::new(HashMap::new()),
            oldest_pending: Mutex::new(HashMap::new()),
            cycle_clock: Mutex::new((None, 0.0)),
            heartbeat: Mutex::new(None),
            views: ViewMetrics::register(&registry),
            eviction: EvictionMetrics::register(&registry),
            registry,
        }
    }

    /// Creates every per-table series at zero, so alerts and dashboards see them from start.
    pub fn init_table(&self, table: &str, layer: &str) {
        self.rows_total.with_label_values(&[table, layer]);
        for class in ErrorClass::ALL {
            self.errors_total.with_label_values(&[table, class.as_str()]);
        }
        for r in COMMIT_RESULTS {
            self.commits_total.with_label_values(&[table, r]);
        }
        for o in RUN_OUTCOMES {
            self.runs_total.with_label_values(&[table, o]);
        }
        self.bytes_written_total.with_label_values(&[table]);
        self.files_written_total.with_label_values(&[table]);
        // From 0, so that `increase()` sees the first failure (a series born at 1 hides it).
        for result in MAINTENANCE_RESULTS {
            self.maintenance_runs_total.with_label_values(&[table, result]);
        }
        self.consecutive_failures.with_label_values(&[table]).set(0.0);
        self.late_rows.with_label_values(&[table]).set(0.0);
        self.null_cursor_rows.with_label_values(&[table]).set(0.0);
        self.set_pending_commits(table, 0, None);
    }

    /// A heartbeat of this replica reached the state store.
    pub fn member_heartbeat(&self, unix: f64) {
        *self.last_member_heartbeat.lock().expect("lock") = Some(unix);
    }

    /// Another replica owns the table now: the series only its owner keeps current go, so
    /// that a former owner's stale values never hold an alert (counters stay: they are history).
    pub fn forget_table(&self, table: &str) {
        self.last_table_success.lock().expect("lock").remove(table);
        self.oldest_pending.lock().expect("lock").remove(table);
        for g in [
            &self.lag_minutes,
            &self.lag_seconds,
            &self.watermark_timestamp_seconds,
            &self.table_last_success_timestamp_seconds,
            &self.watermark_data_timestamp_seconds,
            &self.rows_behind,
            &self.ttl_headroom_seconds,
            &self.late_rows,
            &self.audit_extra_rows,
            &self.consecutive_failures,
            &self.null_cursor_rows,
            &self.pending_commits,
            &self.pending_commit_age_seconds,
            &self.maintenance_last_success_timestamp_seconds,
            &self.table_snapshots,
            &self.table_small_files,
            &self.table_manifests,
            &self.table_metadata_bytes,
            &self.maintenance_duration_seconds,
        ] {
            let _ = g.remove_label_values(&[table]);
        }
        for status in AuditStatus::ALL {
            let _ = self.audit_days.remove_label_values(&[table, status.as_str()]);
        }
        for scope in [Scope::Recent, Scope::Full] {
            let _ = self.audit_last_timestamp_seconds.remove_label_values(&[table, scope.as_str()]);
        }
    }

    /// The table's commit attempts of unknown outcome (I5): how many, and since when the oldest.
    pub fn set_pending_commits(&self, table: &str, count: usize, oldest_started_unix: Option<f64>) {
        self.pending_commits.with_label_values(&[table]).set(count as f64);
        self.oldest_pending.lock().expect("lock").insert(table.to_string(), oldest_started_unix);
        self.pending_commit_age_seconds.with_label_values(&[table]).set(0.0);
    }

    /// Static series of a running service.
    pub fn init_service(
        &self,
        tables: usize,
        schedule_minutes: f64,
        table_names: &str,
        heartbeat: std::sync::Arc<std::sync::atomic::AtomicI64>,
    ) {
        let start = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        self.tables_configured.set(tables as f64);
        self.info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), &schedule_minutes.to_string(), table_names, &start])
            .set(1.0);
        self.build_info.with_label_values(&[env!("CARGO_PKG_VERSION"), "0.10"]).set(1.0);
        *self.heartbeat.lock().expect("lock") = Some(heartbeat);
    }

    /// The table is known to be offloaded up to its watermark as of `unix` (a quiet table
    /// with nothing new counts: its lag is zero, not growing).
    pub fn table_succeeded(&self, table: &str, unix: f64) {
        self.last_table_success.lock().expect("lock").insert(table.to_string(), unix);
        self.watermark_timestamp_seconds.with_label_values(&[table]).set(unix);
        self.table_last_success_timestamp_seconds.with_label_values(&[table]).set(unix);
    }

    pub fn cycle_started(&self, unix: f64) {
        self.cycle_clock.lock().expect("lock").0 = Some(unix);
    }

    pub fn cycle_finished(&self, seconds: f64) {
        *self.cycle_clock.lock().expect("lock") = (None, seconds);
    }

    /// The text exposition, with lag and pending age recomputed now (so they grow between cycles).
    pub fn render(&self) -> String {
        let now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
        for (table, t) in self.last_table_success.lock().expect("lock").iter() {
            let lag = (now - t).max(0.0);
            self.lag_minutes.with_label_values(&[table]).set(lag / 60.0);
            self.lag_seconds.with_label_values(&[table]).set(lag);
        }
        for (table, oldest) in self.oldest_pending.lock().expect("lock").iter() {
            let age = oldest.map(|t| (now - t).max(0.0)).unwrap_or(0.0);
            self.pending_commit_age_seconds.with_label_values(&[table]).set(age);
        }
        if let Some(t) = *self.last_member_heartbeat.lock().expect("lock") {
            self.replica_heartbeat_age_seconds.set((now - t).max(0.0));
        }
        let (running, last) = *self.cycle_clock.lock().expect("lock");
        self.cycle_last_duration_seconds.set(running.map(|start| now - start).unwrap_or(last));
        if let Some(hb) = self.heartbeat.lock().expect("lock").as_ref() {
            self.scheduler_last_tick_timestamp_seconds.set(hb.load(std::sync::atomic::Ordering::Relaxed) as f64);
        }
        let mut buf = vec![];
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding");
        String::from_utf8(buf).expect("utf8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// `offload_rows_per_second{table}`: a Summary with exact quantiles 0.5, 0.9, 0.99 over the
/// last [`RowsPerSecond::WINDOW`] observations of each table (the `prometheus` crate has no
/// Summary type).
/// Per table: the last observations, their sum and their count.
type Observations = HashMap<String, (VecDeque<f64>, f64, u64)>;

#[derive(Clone)]
pub struct RowsPerSecond {
    desc: Desc,
    inner: std::sync::Arc<Mutex<Observations>>,
}

impl RowsPerSecond {
    pub const WINDOW: usize = 500;
    const QUANTILES: [f64; 3] = [0.5, 0.9, 0.99];

    fn new() -> Self {
        let desc = Desc::new(
            "offload_rows_per_second".into(),
            "Offload throughput of one table run (rows per second)".into(),
            vec!["table".into()],
            HashMap::new(),
        )
        .expect("valid desc");
        Self { desc, inner: Default::default() }
    }

    pub fn observe(&self, table: &str, value: f64) {
        let mut map = self.inner.lock().expect("lock");
        let entry = map.entry(table.to_string()).or_default();
        entry.0.push_back(value);
        if entry.0.len() > Self::WINDOW {
            entry.0.pop_front();
        }
        entry.1 += value;
        entry.2 += 1;
    }
}

impl Collector for RowsPerSecond {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let map = self.inner.lock().expect("lock");
        let mut family = MetricFamily::default();
        family.set_name(self.desc.fq_name.clone());
        family.set_help(self.desc.help.clone());
        family.set_field_type(MetricType::SUMMARY);
        for (table, (window, sum, count)) in map.iter() {
            let mut sorted: Vec<f64> = window.iter().copied().collect();
            sorted.sort_by(|a, b| a.total_cmp(b));
            let mut summary = Summary::default();
            summary.set_sample_sum(*sum);
            summary.set_sample_count(*count);
            let quantiles = Self::QUANTILES
                .iter()
                .map(|q| {
                    let mut quantile = Quantile::default();
                    quantile.set_quantile(*q);
                    let idx = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
                    quantile.set_value(sorted[idx]);
                    quantile
                })
                .collect();
            summary.set_quantile(quantiles);
            let mut label = LabelPair::default();
            label.set_name("table".into());
            label.set_value(table.clone());
            let mut metric = Metric::default();
            metric.set_label(vec![label]);
            metric.set_summary(summary);
            family.mut_metric().push(metric);
        }
        if family.get_metric().is_empty() {
            return vec![];
        }
        vec![family]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_quantiles_are_exact() {
        let m = Metrics::new();
        for v in 1..=100 {
            m.rows_per_second.observe("t", v as f64);
        }
        let text = m.render();
        assert!(text.contains("offload_rows_per_second{table=\"t\",quantile=\"0.5\"} 50"), "{text}");
        assert!(text.contains("offload_rows_per_second{table=\"t\",quantile=\"0.9\"} 90"), "{text}");
        assert!(text.contains("offload_rows_per_second{table=\"t\",quantile=\"0.99\"} 99"), "{text}");
        assert!(text.contains("offload_rows_per_second_count{table=\"t\"} 100"), "{text}");
    }

    #[test]
    fn cycle_statuses_exist_from_start() {
        let text = Metrics::new().render();
        for s in CYCLE_STATUSES {
            assert!(text.contains(&format!("offload_cycles_total{{status=\"{s}\"}} 0")), "{text}");
        }
    }
}
