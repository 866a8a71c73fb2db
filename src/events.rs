//! Internal events: each one emits its log line and updates its metrics in one typed
//! place (after Vector's internal events). Log lines keep the guide's grep markers
//! (`CYCLE STARTED`, `COMPLETED`, `✗ Offload failed`).

use std::time::Duration;

use crate::error::ErrorClass;
use crate::metrics::Metrics;

fn unix_now() -> f64 {
    chrono::Utc::now().timestamp_millis() as f64 / 1000.0
}

pub struct CycleStarted<'a> {
    pub cycle_id: &'a str,
    pub tables: usize,
}

impl CycleStarted<'_> {
    pub fn emit(&self, m: &Metrics) {
        m.cycle_started(unix_now());
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
    pub status: &'a str,
    pub duration: Duration,
    pub succeeded: usize,
    pub failed: usize,
    pub skipped: usize,
    pub rows: u64,
}

impl CycleCompleted<'_> {
    pub fn emit(&self, m: &Metrics) {
        let secs = self.duration.as_secs_f64();
        m.cycles_total.with_label_values(&[self.status]).inc();
        m.cycle_duration_seconds.observe(secs);
        m.cycle_finished(secs);
        match self.status {
            "success" => m.last_success_timestamp.set(unix_now()),
            _ => m.last_failure_timestamp.set(unix_now()),
        }
        tracing::info!(
            cycle_id = self.cycle_id,
            status = self.status,
            duration_seconds = secs,
            succeeded = self.succeeded,
            failed = self.failed,
            skipped = self.skipped,
            rows = self.rows,
            "CYCLE COMPLETED: status={} tables ok={} failed={} skipped={} rows={} duration={:.2}s",
            self.status,
            self.succeeded,
            self.failed,
            self.skipped,
            self.rows,
            secs
        );
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
    /// True when the table changed under us (I4 fenced the commit).
    pub conflict: bool,
    pub reason: &'a str,
}

impl CommitFailed<'_> {
    pub fn emit(&self, m: &Metrics) {
        let result = if self.conflict { "conflict" } else { "error" };
        m.commits_total.with_label_values(&[self.table, result]).inc();
        tracing::warn!(table = self.table, result, "commit not made: {}", self.reason);
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

pub struct LateRows<'a> {
    pub table: &'a str,
    pub rows: i64,
}

impl LateRows<'_> {
    pub fn emit(&self, _m: &Metrics) {
        tracing::warn!(
            table = self.table,
            late_rows = self.rows,
            "{} rows at or below the watermark of {} are in ClickHouse but not in Iceberg: they arrived after their window \
             committed (later than settle_delay allows); increase settle_delay",
            self.rows,
            self.table
        );
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
