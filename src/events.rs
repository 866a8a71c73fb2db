//! Internal events: each one emits its log line and updates its metrics in one typed
//! place (after Vector's internal events). Log lines keep the guide's grep markers
//! (`CYCLE STARTED`, `COMPLETED`, `✗ Offload failed`).

use std::time::Duration;

use crate::error::{ErrorClass, OffloadError};
use crate::metrics::Metrics;
use crate::report::{CycleStatus, Resolution};
use crate::window::Position;

fn unix_now() -> f64 {
    chrono::Utc::now().timestamp_millis() as f64 / 1000.0
}

pub struct CycleStarted<'a> {
    pub cycle_id: &'a str,
    pub tables: usize,
    /// Over tables this replica gained between boundaries: not one of the guide's cycles.
    pub off_schedule: bool,
}

impl CycleStarted<'_> {
    pub fn emit(&self, m: &Metrics) {
        if !self.off_schedule {
            m.cycle_started(unix_now());
        }
        tracing::info!(
            cycle_id = self.cycle_id,
            tables = self.tables,
            "CYCLE STARTED: offloading {} tables",
            self.tables
        );
    }
}

pub struct CycleCompleted<'a> {
    pub cycle_id: &'a str,
    pub status: CycleStatus,
    pub duration: Duration,
    pub succeeded: usize,
    pub failed: usize,
    pub skipped: usize,
    pub rows: u64,
    /// Over tables this replica gained between boundaries: logged, and counted only in
    /// `offload_offschedule_cycles_total`, so that a short one neither resolves
    /// `IcebergOffloadCycleTooSlow` nor stands for a whole cycle's success or failure.
    pub off_schedule: bool,
}

impl CycleCompleted<'_> {
    pub fn emit(&self, m: &Metrics) {
        let secs = self.duration.as_secs_f64();
        if !self.off_schedule {
            self.count(m, secs);
        }
        tracing::info!(
            cycle_id = self.cycle_id,
            status = self.status.as_str(),
            duration_seconds = secs,
            succeeded = self.succeeded,
            failed = self.failed,
            skipped = self.skipped,
            rows = self.rows,
            off_schedule = self.off_schedule,
            "CYCLE COMPLETED: status={} tables ok={} failed={} skipped={} rows={} duration={:.2}s",
            self.status.as_str(),
            self.succeeded,
            self.failed,
            self.skipped,
            self.rows,
            secs
        );
    }

    /// The guide's cycle metrics.
    fn count(&self, m: &Metrics, secs: f64) {
        m.cycle_duration_seconds.observe(secs);
        m.cycle_finished(secs);
        match self.status {
            // The guide's statuses: a cycle cut short by a shutdown is none of them, and
            // neither a success nor a failure.
            CycleStatus::Interrupted => m.cycles_interrupted_total.inc(),
            CycleStatus::Success => {
                m.cycles_total.with_label_values(&[self.status.as_str()]).inc();
                m.last_success_timestamp.set(unix_now());
            }
            CycleStatus::Partial | CycleStatus::Failed => {
                m.cycles_total.with_label_values(&[self.status.as_str()]).inc();
                m.last_failure_timestamp.set(unix_now());
            }
        }
    }
}

pub struct WindowCommitted<'a> {
    pub table: &'a str,
    pub layer: &'a str,
    pub rows: u64,
    pub files: usize,
    pub bytes: u64,
    pub snapshot_id: i64,
    pub watermark: &'a str,
    pub watermark_data_seconds: f64,
    pub duration: Duration,
    pub resolved_after_error: bool,
}

impl WindowCommitted<'_> {
    pub fn emit(&self, m: &Metrics) {
        m.rows_total.with_label_values(&[self.table, self.layer]).inc_by(self.rows);
        let result = if self.resolved_after_error { "unknown_resolved" } else { "committed" };
        m.commits_total.with_label_values(&[self.table, result]).inc();
        m.bytes_written_total.with_label_values(&[self.table]).inc_by(self.bytes);
        m.files_written_total.with_label_values(&[self.table]).inc_by(self.files as u64);
        m.table_succeeded(self.table, unix_now());
        m.watermark_data_timestamp_seconds.with_label_values(&[self.table]).set(self.watermark_data_seconds);
        let secs = self.duration.as_secs_f64();
        tracing::info!(
            table = self.table,
            rows = self.rows,
            files = self.files,
            snapshot_id = self.snapshot_id,
            watermark = self.watermark,
            duration_seconds = secs,
            resolved_after_error = self.resolved_after_error,
            "committed window: {} rows in {} files, snapshot {}, watermark {} ({:.2}s)",
            self.rows,
            self.files,
            self.snapshot_id,
            self.watermark,
            secs
        );
    }
}

pub struct CommitFailed<'a> {
    pub table: &'a str,
    pub error: &'a OffloadError,
}

impl CommitFailed<'_> {
    pub fn emit(&self, m: &Metrics) {
        let result = match self.error {
            // I4 fenced the commit: the table changed under us.
            OffloadError::CommitConflict { .. } => "conflict",
            // I5: the outcome is unknown; the attempt's files are kept.
            OffloadError::CommitPending { .. } => "pending",
            _ => "error",
        };
        m.commits_total.with_label_values(&[self.table, result]).inc();
        tracing::warn!(table = self.table, result, "commit not made: {}", self.error);
    }
}

/// How many of the table's commit attempts have an unknown outcome (I5).
pub struct PendingCommits<'a> {
    pub table: &'a str,
    pub count: usize,
    /// When the oldest of them started (Unix milliseconds).
    pub oldest_started_ms: Option<i64>,
}

impl PendingCommits<'_> {
    pub fn emit(&self, m: &Metrics) {
        m.set_pending_commits(self.table, self.count, self.oldest_started_ms.map(|ms| ms as f64 / 1000.0));
        if self.count > 0 {
            tracing::warn!(
                table = self.table,
                pending_commits = self.count,
                "{} commit attempts of {} have an unknown outcome; their files are kept until the table's history resolves them",
                self.count,
                self.table
            );
        }
    }
}

/// A commit attempt left pending by an earlier run was resolved from the table's history (I5).
pub struct PendingResolved<'a> {
    pub table: &'a str,
    pub layer: &'a str,
    pub run_id: &'a str,
    pub resolution: Resolution,
    pub rows: u64,
}

impl PendingResolved<'_> {
    pub fn emit(&self, m: &Metrics) {
        match self.resolution {
            Resolution::Committed(snapshot_id) => {
                // Its rows landed: they count now, once.
                m.rows_total.with_label_values(&[self.table, self.layer]).inc_by(self.rows);
                m.commits_total.with_label_values(&[self.table, "unknown_resolved"]).inc();
                tracing::info!(
                    table = self.table,
                    run_id = self.run_id,
                    snapshot_id,
                    rows = self.rows,
                    "a pending commit attempt landed (snapshot {snapshot_id}, {} rows)",
                    self.rows
                );
            }
            Resolution::Impossible => tracing::info!(
                table = self.table,
                run_id = self.run_id,
                "a pending commit attempt can never land (the table moved past the snapshot it required); its files were deleted"
            ),
            Resolution::Undecidable => tracing::warn!(
                table = self.table,
                run_id = self.run_id,
                "a pending commit attempt cannot be decided (the snapshot it required was expired); its files are left to `iceberg-offload cleanup`, which deletes only unreferenced files"
            ),
            Resolution::Pending => {}
        }
    }
}

/// The table property `offload.watermark.position` disagrees with the table's history
/// (typically after a rollback): the history wins (I3).
pub struct WatermarkPropertyDisagrees<'a> {
    pub table: &'a str,
    pub property: Option<&'a Position>,
    pub history: Option<&'a Position>,
}

impl WatermarkPropertyDisagrees<'_> {
    pub fn emit(&self, _m: &Metrics) {
        let show = |p: Option<&Position>| p.map(|p| p.display()).unwrap_or_else(|| "none".into());
        tracing::warn!(
            table = self.table,
            property = show(self.property),
            history = show(self.history),
            "the watermark property of {} says {} but the table's history says {} (rolled back?): the history is used, and the rolled-back windows are offloaded again",
            self.table,
            show(self.property),
            show(self.history)
        );
    }
}

/// I7: the state-store mirror disagreed with Iceberg and was corrected.
pub struct MirrorCorrected<'a> {
    pub table: &'a str,
    pub before: &'a str,
    pub after: &'a str,
}

impl MirrorCorrected<'_> {
    pub fn emit(&self, _m: &Metrics) {
        tracing::info!(
            table = self.table,
            before = self.before,
            after = self.after,
            "state-store mirror of {} corrected from Iceberg: watermark {} -> {}",
            self.table,
            self.before,
            self.after
        );
    }
}

pub struct TableOffloaded<'a> {
    pub table: &'a str,
    pub layer: &'a str,
    pub rows: u64,
    pub windows: usize,
    pub duration: Duration,
    pub snapshot_id: Option<i64>,
    pub watermark: Option<String>,
    pub rows_behind: Option<u64>,
    pub ttl_headroom_seconds: Option<f64>,
    pub late_rows: Option<i64>,
    pub watermark_ns: Option<i64>,
}

impl TableOffloaded<'_> {
    pub fn emit(&self, m: &Metrics) {
        let secs = self.duration.as_secs_f64();
        let rate = if secs > 0.0 { self.rows as f64 / secs } else { 0.0 };
        m.duration_seconds.with_label_values(&[self.table, self.layer]).observe(secs);
        m.runs_total.with_label_values(&[self.table, if self.windows > 0 { "success" } else { "noop" }]).inc();
        m.consecutive_failures.with_label_values(&[self.table]).set(0.0);
        if self.rows > 0 {
            m.rows_per_second.observe(self.table, rate);
        }
        // Offloaded up to the watermark as of now, quiet or not.
        m.table_succeeded(self.table, unix_now());
        if let Some(n) = self.rows_behind {
            m.rows_behind.with_label_values(&[self.table]).set(n as f64);
        }
        if let Some(h) = self.ttl_headroom_seconds {
            m.ttl_headroom_seconds.with_label_values(&[self.table]).set(h);
        }
        if let Some(ns) = self.watermark_ns {
            m.watermark_data_timestamp_seconds.with_label_values(&[self.table]).set(ns as f64 / 1e9);
        }
        if let Some(n) = self.late_rows {
            m.late_rows.with_label_values(&[self.table]).set(n as f64);
        }
        tracing::info!(
            table = self.table,
            rows = self.rows,
            windows = self.windows,
            duration_seconds = secs,
            rows_per_second = rate,
            snapshot_id = self.snapshot_id,
            watermark = self.watermark.as_deref(),
            "✓ Offloaded {}: {} rows in {} windows, {:.2}s, {:.0} rows/s{}",
            self.table,
            self.rows,
            self.windows,
            secs,
            rate,
            self.snapshot_id.map(|s| format!(", snapshot {s}")).unwrap_or_default()
        );
    }
}

pub struct TableFailed<'a> {
    pub table: &'a str,
    pub class: ErrorClass,
    pub kind: &'a str,
    pub message: &'a str,
    pub attempt: u32,
    pub will_retry: bool,
    pub duration: Duration,
}

impl TableFailed<'_> {
    pub fn emit(&self, m: &Metrics) {
        m.errors_total.with_label_values(&[self.table, self.class.as_str()]).inc();
        m.consecutive_failures.with_label_values(&[self.table]).inc();
        if !self.will_retry {
            m.runs_total.with_label_values(&[self.table, "failure"]).inc();
        }
        tracing::error!(
            table = self.table,
            error_type = self.class.as_str(),
            error_kind = self.kind,
            attempt = self.attempt,
            will_retry = self.will_retry,
            duration_seconds = self.duration.as_secs_f64(),
            "✗ Offload failed: {} [{}] {}{}",
            self.table,
            self.class,
            self.message,
            if self.will_retry { " (will retry)" } else { "" }
        );
    }
}

/// A shutdown interrupted the table before it finished: not a failure, not a success.
pub struct TableInterrupted<'a> {
    pub table: &'a str,
}

impl TableInterrupted<'_> {
    pub fn emit(&self, m: &Metrics) {
        m.runs_total.with_label_values(&[self.table, "interrupted"]).inc();
        tracing::info!(
            table = self.table,
            "interrupted {} (shutdown); the next start resumes from the Iceberg watermark",
            self.table
        );
    }
}

pub struct TableSkipped<'a> {
    pub table: &'a str,
    pub reason: &'a str,
}

impl TableSkipped<'_> {
    pub fn emit(&self, m: &Metrics) {
        m.runs_total.with_label_values(&[self.table, "skipped"]).inc();
        tracing::warn!(table = self.table, "skipped {}: {}", self.table, self.reason);
    }
}

/// At start, a table's last success as the state store remembers it: a service that keeps
/// crashing shows a growing lag, not a fresh one.
pub struct LastSuccessRecalled<'a> {
    pub table: &'a str,
    pub unix_seconds: f64,
}

impl LastSuccessRecalled<'_> {
    pub fn emit(&self, m: &Metrics) {
        m.table_succeeded(self.table, self.unix_seconds);
        tracing::debug!(
            table = self.table,
            last_success = self.unix_seconds,
            "last success recalled from the state store"
        );
    }
}

/// The source's columns changed during a run: the window in hand is read again with them.
pub struct SourceColumnsChanged<'a> {
    pub table: &'a str,
}

impl SourceColumnsChanged<'_> {
    pub fn emit(&self, _m: &Metrics) {
        tracing::info!(
            table = self.table,
            "the columns of {} changed while it was offloaded; the window is read again with them",
            self.table
        );
    }
}

/// ClickHouse's clock minus this host's, measured at each table's run (I1).
pub struct ClockSkew {
    pub seconds: f64,
}

impl ClockSkew {
    pub fn emit(&self, m: &Metrics) {
        m.clock_skew_seconds.set(self.seconds);
        if self.seconds.abs() >= 1.0 {
            tracing::info!(
                clock_skew_seconds = self.seconds,
                "ClickHouse's clock is {:+.1} s from this host's; windows are cut on ClickHouse's clock",
                self.seconds
            );
        }
    }
}

/// A window read more rows than were planned: rows arrived below the settle limit after the
/// window was planned. They are in the window's range, so they are taken (I1).
pub struct WindowGrew<'a> {
    pub table: &'a str,
    pub planned: u64,
    pub read: u64,
}

impl WindowGrew<'_> {
    pub fn emit(&self, _m: &Metrics) {
        tracing::warn!(
            table = self.table,
            planned = self.planned,
            read = self.read,
            "{} rows arrived in the window of {} after it was planned (below the settle limit: later than settle_delay \
             allows); they are offloaded with it",
            self.read - self.planned,
            self.table
        );
    }
}

/// A maintenance run of a table ended (expiry and the files it freed).
pub struct Maintained<'a> {
    pub table: &'a str,
    pub result: &'a crate::error::Result<crate::report::MaintenanceReport>,
    pub duration: Duration,
}

impl Maintained<'_> {
    pub fn emit(&self, m: &Metrics) {
        m.maintenance_duration_seconds.with_label_values(&[self.table]).set(self.duration.as_secs_f64());
        if let Ok(r) = self.result
            && let Some(c) = &r.compact
        {
            self.emit_compaction(m, c);
        }
        match self.result {
            Ok(r) if r.failed.is_some() => {
                m.maintenance_runs_total.with_label_values(&[self.table, "failure"]).inc();
                tracing::warn!(
                    table = self.table,
                    "maintenance of {}: {} (the offload is not affected; retried later)",
                    self.table,
                    r.failed.as_deref().unwrap_or_default()
                );
            }
            Ok(r) => {
                if let Some(why) = r.skip_reason() {
                    m.maintenance_runs_total.with_label_values(&[self.table, "skipped"]).inc();
                    tracing::info!(table = self.table, "maintenance of {} skipped: {why}", self.table);
                    return;
                }
                m.maintenance_runs_total.with_label_values(&[self.table, "success"]).inc();
                m.maintenance_last_success_timestamp_seconds.with_label_values(&[self.table]).set(unix_now());
                if let Some(bytes) = r.metadata_bytes {
                    m.table_metadata_bytes.with_label_values(&[self.table]).set(bytes as f64);
                }
                if let Some(e) = &r.expire {
                    m.snapshots_expired_total.with_label_values(&[self.table]).inc_by(e.snapshots_expired as u64);
                    m.maintenance_files_deleted_total
                        .with_label_values(&[self.table])
                        .inc_by((e.files_deleted + e.metadata_files_deleted) as u64);
                    m.table_snapshots
                        .with_label_values(&[self.table])
                        .set(e.snapshots_before.saturating_sub(e.snapshots_expired) as f64);
                    tracing::info!(
                        table = self.table,
                        snapshots_expired = e.snapshots_expired,
                        files_deleted = e.files_deleted,
                        metadata_files_deleted = e.metadata_files_deleted,
                        duration_seconds = self.duration.as_secs_f64(),
                        "maintenance of {}: {} snapshots expired, {} files deleted",
                        self.table,
                        e.snapshots_expired,
                        e.files_deleted + e.metadata_files_deleted
                    );
                }
            }
            Err(e) => {
                m.maintenance_runs_total.with_label_values(&[self.table, "failure"]).inc();
                tracing::warn!(
                    table = self.table,
                    error_kind = e.kind(),
                    "maintenance of {} failed (the offload is not affected; retried at the next run): {e}",
                    self.table
                );
            }
        }
    }

    /// The table's compaction: files and bytes rewritten, what is left small, manifests.
    fn emit_compaction(&self, m: &Metrics, c: &crate::report::CompactReport) {
        m.compaction_files_rewritten_total.with_label_values(&[self.table]).inc_by(c.files_rewritten as u64);
        m.compaction_bytes_rewritten_total.with_label_values(&[self.table]).inc_by(c.bytes_rewritten);
        let left = if c.files_written > 0 { c.small_files.saturating_sub(c.files_rewritten) } else { c.small_files };
        m.table_small_files.with_label_values(&[self.table]).set(left as f64);
        m.table_manifests.with_label_values(&[self.table]).set(c.manifests_after.max(1) as f64);
        if c.files_rewritten > 0 {
            tracing::info!(
                table = self.table,
                files_rewritten = c.files_rewritten,
                bytes_rewritten = c.bytes_rewritten,
                files_written = c.files_written,
                partitions = c.partitions,
                manifests_before = c.manifests_before,
                manifests_after = c.manifests_after,
                "compaction of {}: {} files in {} partitions rewritten into {}",
                self.table,
                c.files_rewritten,
                c.partitions,
                c.files_written
            );
        }
    }
}

/// An audit of a table finished (I9): its verdicts per day become the audit metrics; a day
/// with missing or extra rows is a warning naming it.
pub struct Audited<'a> {
    pub table: &'a str,
    pub scope: crate::report::Scope,
    pub results: &'a [crate::report::DayAudit],
    pub totals: &'a crate::report::AuditTotals,
}

impl Audited<'_> {
    pub fn emit(&self, m: &Metrics) {
        use crate::report::AuditStatus;
        for r in self.results.iter().filter(|r| r.status() != AuditStatus::Ok) {
            let (what, advice) = match r.status() {
                AuditStatus::Missing => (
                    "late rows: in ClickHouse at or below the watermark, not in Iceberg",
                    "they arrived after their window committed; see docs/runbooks (late rows)",
                ),
                _ => (
                    "extra rows: in Iceberg beyond ClickHouse's count",
                    "duplicates or source rows deleted after offload; see docs/runbooks (extra rows)",
                ),
            };
            tracing::warn!(
                table = self.table,
                day = %r.day,
                source_rows = r.source_rows,
                iceberg_rows = r.iceberg_rows,
                status = r.status().as_str(),
                "audit {} {}: {} {what} (ClickHouse {}, Iceberg {}); {advice}",
                self.table,
                r.day,
                r.source_rows.abs_diff(r.iceberg_rows),
                r.source_rows,
                r.iceberg_rows,
            );
        }
        tracing::info!(
            table = self.table,
            scope = self.scope.as_str(),
            days = self.results.len(),
            missing_rows = self.totals.missing_rows,
            extra_rows = self.totals.extra_rows,
            "audit of {} ({} days)",
            self.table,
            self.results.len()
        );
        m.late_rows.with_label_values(&[self.table]).set(self.totals.missing_rows as f64);
        m.audit_extra_rows.with_label_values(&[self.table]).set(self.totals.extra_rows as f64);
        for (status, n) in AuditStatus::ALL.iter().zip(self.totals.days) {
            m.audit_days.with_label_values(&[self.table, status.as_str()]).set(n as f64);
        }
        m.audit_last_timestamp_seconds
            .with_label_values(&[self.table, self.scope.as_str()])
            .set(crate::util::now_epoch_ns() as f64 / 1e9);
    }
}

pub struct NullCursorRows<'a> {
    pub table: &'a str,
    pub cursor: &'a str,
    pub rows: u64,
}

impl NullCursorRows<'_> {
    pub fn emit(&self, m: &Metrics) {
        m.null_cursor_rows.with_label_values(&[self.table]).set(self.rows as f64);
        if self.rows == 0 {
            return;
        }
        tracing::warn!(
            table = self.table,
            null_cursor_rows = self.rows,
            "{} rows of {} have a NULL {} (the cursor): they can never be offloaded; fix them at the source",
            self.rows,
            self.table,
            self.cursor
        );
    }
}

/// What the state store remembers of a table's audits and maintenance, at start or when the
/// table comes to this replica: the alerts on work not done for days need the time it was last
/// done, not the time this process last did it.
pub struct HistoryRecalled<'a> {
    pub table: &'a str,
    pub full_audit_unix: Option<f64>,
    pub maintenance_unix: Option<f64>,
}

impl HistoryRecalled<'_> {
    pub fn emit(&self, m: &Metrics) {
        if let Some(t) = self.full_audit_unix {
            m.audit_last_timestamp_seconds.with_label_values(&[self.table, crate::report::Scope::Full.as_str()]).set(t);
        }
        if let Some(t) = self.maintenance_unix {
            m.maintenance_last_success_timestamp_seconds.with_label_values(&[self.table]).set(t);
        }
    }
}

/// This replica's heartbeat reached the state store.
pub struct ReplicaHeartbeat<'a> {
    pub member: &'a str,
    /// The first one: the replica joined.
    pub first: bool,
    pub every: Duration,
    pub timeout: Duration,
}

impl ReplicaHeartbeat<'_> {
    pub fn emit(&self, m: &Metrics) {
        m.member_heartbeat(unix_now());
        if self.first {
            tracing::info!(
                member = self.member,
                "replica member {} joined: heartbeat every {:.1}s, gone after {:.0}s of silence",
                self.member,
                self.every.as_secs_f64(),
                self.timeout.as_secs_f64()
            );
        }
    }
}

/// A replica found lost: silent past the member timeout without leaving, or a process of this
/// host that no longer runs. Its tables go to the live replicas.
pub struct ReplicaLost<'a> {
    pub member: &'a str,
    pub why: LostBecause,
}

/// How a member was found lost.
pub enum LostBecause {
    /// No heartbeat for this long (past the member timeout), without leaving.
    Silent(Duration),
    /// A process of this host that no longer runs (a crash, a restart): found at once.
    ProcessGone,
}

impl ReplicaLost<'_> {
    pub fn emit(&self, m: &Metrics) {
        m.replica_members_lost_total.inc();
        let why = match self.why {
            LostBecause::Silent(d) => format!("no heartbeat for {:.0}s", d.as_secs_f64()),
            LostBecause::ProcessGone => "its process no longer runs on this host".to_string(),
        };
        tracing::warn!(
            member = self.member,
            "replica {} is gone ({why}): its tables go to the live replicas at once, its leases are taken over",
            self.member
        );
    }
}

/// Tables this replica gained while it waited for the next boundary (a replica lost, leaving
/// or joining): they are run at once, in a cycle of their own.
pub struct OffScheduleCycle<'a> {
    pub gained: &'a [&'a str],
}

impl OffScheduleCycle<'_> {
    pub fn emit(&self, m: &Metrics) {
        m.offschedule_cycles_total.inc();
        tracing::info!(
            tables = self.gained.len(),
            "off-schedule cycle: running at once the {} tables this replica gained ({}); the others wait for the boundary",
            self.gained.len(),
            self.gained.join(", ")
        );
    }
}

/// The tables this replica owns for the cycle, among the live members it sees.
pub struct ReplicaOwnership<'a> {
    pub members: usize,
    /// (table, owned by this replica)
    pub tables: &'a [(&'a str, bool)],
    /// Tables whose owner changed since the previous cycle (gained or lost).
    pub gained: &'a [&'a str],
    pub lost: &'a [&'a str],
}

impl ReplicaOwnership<'_> {
    pub fn emit(&self, m: &Metrics) {
        let owned = self.tables.iter().filter(|(_, o)| *o).count();
        m.replica_members.set(self.members as f64);
        m.replica_tables_owned.set(owned as f64);
        for (table, is_owned) in self.tables {
            m.table_owned.with_label_values(&[table]).set(if *is_owned { 1.0 } else { 0.0 });
        }
        for table in self.lost {
            m.forget_table(table);
        }
        if !self.gained.is_empty() || !self.lost.is_empty() {
            tracing::info!(
                members = self.members,
                owned,
                "replicas: {} live, this one owns {owned} of {} tables (gained: {}; handed over: {})",
                self.members,
                self.tables.len(),
                if self.gained.is_empty() { "none".to_string() } else { self.gained.join(", ") },
                if self.lost.is_empty() { "none".to_string() } else { self.lost.join(", ") },
            );
        }
    }
}

/// Whether the live replicas are configured with different tables (then each runs all of its
/// own, and the leases decide who runs a table).
pub struct ReplicaTablesMismatch {
    pub mismatched: bool,
}

impl ReplicaTablesMismatch {
    pub fn emit(&self, m: &Metrics) {
        m.replica_tables_mismatch.set(if self.mismatched { 1.0 } else { 0.0 });
        if self.mismatched {
            tracing::warn!(
                "the live replicas are configured with different tables: each runs all of its tables this cycle (leases decide); give every replica the same [[tables]]"
            );
        }
    }
}

/// A lease taken from a holder known to be gone, without waiting for it to expire.
pub struct LeaseTakenOver<'a> {
    pub table: &'a str,
    pub from: &'a str,
}

impl LeaseTakenOver<'_> {
    pub fn emit(&self, m: &Metrics) {
        m.replica_takeovers_total.inc();
        tracing::warn!(table = self.table, "took over the lease of {} from {}, which is gone", self.table, self.from);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completed(status: CycleStatus) -> CycleCompleted<'static> {
        CycleCompleted {
            cycle_id: "c",
            status,
            duration: Duration::from_secs(1),
            succeeded: 0,
            failed: 0,
            skipped: 1,
            rows: 0,
            off_schedule: false,
        }
    }

    #[test]
    fn an_interrupted_cycle_is_neither_a_success_nor_a_failure() {
        let m = Metrics::new();
        completed(CycleStatus::Interrupted).emit(&m);
        assert_eq!(m.last_success_timestamp.get(), 0.0, "offload_last_success_timestamp unchanged");
        assert_eq!(m.last_failure_timestamp.get(), 0.0);
        assert_eq!(m.cycles_interrupted_total.get(), 1);
        for s in crate::metrics::CYCLE_STATUSES {
            assert_eq!(m.cycles_total.with_label_values(&[s]).get(), 0, "{s}");
        }
        CycleCompleted { off_schedule: true, ..completed(CycleStatus::Success) }.emit(&m);
        assert_eq!(m.last_success_timestamp.get(), 0.0, "an off-schedule cycle is not one of the guide's cycles");
        assert_eq!(m.cycle_duration_seconds.get_sample_count(), 1, "only the interrupted cycle observed");
        completed(CycleStatus::Success).emit(&m);
        assert!(m.last_success_timestamp.get() > 0.0);
        assert_eq!(m.cycles_total.with_label_values(&["success"]).get(), 1);
    }
}

/// Why a hot+cold view was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewCause {
    /// A run found the view missing, or pinned on another snapshot than the table's current
    /// one (a start, maintenance, a repair, another replica).
    Stale,
    /// A window's commit moved `W`.
    Commit,
    /// Maintenance replaced the current snapshot (compaction, a repair).
    Maintenance,
}

impl ViewCause {
    fn as_str(self) -> &'static str {
        match self {
            Self::Stale => "the table's current snapshot differs from the one it read",
            Self::Commit => "a commit moved the watermark",
            Self::Maintenance => "maintenance replaced the current snapshot",
        }
    }
}

/// A table's hot+cold view now reads a new snapshot and splits at a new position (I13).
pub struct ViewRewritten<'a> {
    pub table: &'a str,
    pub view: &'a str,
    pub snapshot_id: Option<i64>,
    pub split: Option<&'a Position>,
    pub cause: ViewCause,
}

impl ViewRewritten<'_> {
    pub fn emit(&self, m: &Metrics) {
        m.views.rewrites_total.with_label_values(&[self.table]).inc();
        m.views.rewrite_failures_total.with_label_values(&[self.table]);
        if let Some(w) = self.split {
            m.views.watermark_data_timestamp_seconds.with_label_values(&[self.table]).set(w.cursor_ns as f64 / 1e9);
        }
        let w = self.split.map(Position::display).unwrap_or_else(|| "none (hot tier only)".into());
        tracing::info!(
            table = self.table,
            view = self.view,
            snapshot_id = self.snapshot_id,
            "view {} rewritten ({}): Iceberg snapshot {}, hot rows above {w}",
            self.view,
            self.cause.as_str(),
            self.snapshot_id.map(|s| s.to_string()).unwrap_or_else(|| "none".into())
        );
    }
}

/// A table's hot+cold view was found already pinned on the table's current snapshot.
pub struct ViewCurrent<'a> {
    pub table: &'a str,
    pub split: Option<&'a Position>,
}

impl ViewCurrent<'_> {
    pub fn emit(&self, m: &Metrics) {
        // Exported at 0 from the first look, so that a rate over them has data.
        m.views.rewrites_total.with_label_values(&[self.table]);
        m.views.rewrite_failures_total.with_label_values(&[self.table]);
        if let Some(w) = self.split {
            m.views.watermark_data_timestamp_seconds.with_label_values(&[self.table]).set(w.cursor_ns as f64 / 1e9);
        }
    }
}

/// A table's hot+cold view could not be written: it keeps its older pair (exact, less fresh).
pub struct ViewRewriteFailed<'a> {
    pub table: &'a str,
    pub view: &'a str,
    pub error: &'a OffloadError,
}

impl ViewRewriteFailed<'_> {
    pub fn emit(&self, m: &Metrics) {
        m.views.rewrite_failures_total.with_label_values(&[self.table]).inc();
        m.views.rewrites_total.with_label_values(&[self.table]);
        tracing::warn!(
            table = self.table,
            view = self.view,
            "view {} not rewritten; it keeps serving its older snapshot and watermark (exact, but less fresh): {}",
            self.view,
            self.error
        );
    }
}

/// A hot-tier partition dropped: Iceberg was proved to hold every row of it.
pub struct PartitionEvicted<'a> {
    pub table: &'a str,
    pub partition_id: &'a str,
    pub hot_rows: u64,
    pub iceberg_rows: u64,
    pub days: &'a [chrono::NaiveDate],
}

impl PartitionEvicted<'_> {
    pub fn emit(&self, m: &Metrics) {
        m.eviction.partitions_total.with_label_values(&[self.table]).inc();
        m.eviction.rows_total.with_label_values(&[self.table]).inc_by(self.hot_rows);
        let days: Vec<String> = self.days.iter().map(|d| d.to_string()).collect();
        tracing::info!(
            table = self.table,
            partition = self.partition_id,
            hot_rows = self.hot_rows,
            iceberg_rows = self.iceberg_rows,
            "evicted partition {} of {}: {} rows dropped from ClickHouse; Iceberg holds {} rows of {}",
            self.partition_id,
            self.table,
            self.hot_rows,
            self.iceberg_rows,
            days.join(", ")
        );
    }
}

/// A table's eviction run: the partitions due that stay, and for how long the oldest of them
/// has been due.
pub struct EvictionChecked<'a> {
    pub table: &'a str,
    /// (partition, why it stays, seconds it has been due)
    pub blocked: &'a [(&'a str, &'a str, f64)],
}

impl EvictionChecked<'_> {
    pub fn emit(&self, m: &Metrics) {
        let longest = self.blocked.iter().map(|b| b.2).fold(0.0, f64::max);
        // Exported at 0 from the first look, so that an increase over them has data.
        m.eviction.partitions_total.with_label_values(&[self.table]);
        m.eviction.rows_total.with_label_values(&[self.table]);
        m.eviction.failures_total.with_label_values(&[self.table]);
        m.eviction.blocked_partitions.with_label_values(&[self.table]).set(self.blocked.len() as f64);
        m.eviction.blocked_seconds.with_label_values(&[self.table]).set(longest);
        for (partition, why, due) in self.blocked {
            tracing::warn!(
                table = self.table,
                partition = partition,
                due_seconds = due,
                "partition {partition} of {} is due for eviction but stays: {why}",
                self.table
            );
        }
    }
}

/// A table's eviction could not run (the partition key refused, ClickHouse or the catalog
/// unreachable): nothing was dropped.
pub struct EvictionFailed<'a> {
    pub table: &'a str,
    pub error: &'a OffloadError,
}

impl EvictionFailed<'_> {
    pub fn emit(&self, m: &Metrics) {
        m.eviction.failures_total.with_label_values(&[self.table]).inc();
        tracing::error!(
            table = self.table,
            "eviction of {} did not run; nothing was dropped: {}",
            self.table,
            self.error
        );
    }
}
