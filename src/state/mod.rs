//! The state store: the operators' view of the offload (`offload_watermarks`, as in the
//! guide), an append-only history of runs (`offload_runs`), and the single-writer lease
//! per table (`offload_leases`).
//!
//! It is a mirror, never the truth (I3): the watermark that decides what is read next
//! comes from Iceberg. Losing this database loses history, not correctness. SQLite by
//! default, PostgreSQL when the URL says `postgres://`; migrations are versioned.

mod leases;
mod members;
mod migrations;

pub use leases::{acquire, acquire_from, holder_is_gone, hostname, process_holder};
pub use members::Member;

use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use crate::config::StateConfig;
use crate::database::{ensure_sqlite_parent, redact_url, with_password};
use crate::error::{OffloadError, Result};
use crate::window::Position;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

#[derive(Debug, Clone)]
pub struct StateStore {
    pool: AnyPool,
    dialect: Dialect,
    url: String,
    /// I10: each statement's time limit.
    timeout: Duration,
}

/// One row of `offload_watermarks`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct WatermarkRow {
    pub table_name: String,
    pub target_table: Option<String>,
    pub last_offload_timestamp: String,
    pub last_offload_max_sequence: Option<String>,
    pub last_offload_row_count: i64,
    pub status: String,
    pub last_successful_run: Option<String>,
    pub last_run_duration_seconds: Option<i64>,
    pub failure_count: i64,
    pub last_error_message: Option<String>,
    pub last_snapshot_id: Option<i64>,
    pub updated_at: Option<String>,
}

/// One attempt of one table, for `offload_runs`.
#[derive(Debug, Clone, Default)]
pub struct RunRecord {
    pub run_id: String,
    pub cycle_id: String,
    pub table_name: String,
    pub target_table: String,
    pub window_lo: Option<String>,
    pub window_hi: Option<String>,
    pub rows: i64,
    pub snapshot_id: Option<i64>,
    pub duration_seconds: f64,
    pub status: String,
    pub error_type: Option<String>,
    pub error_kind: Option<String>,
    pub error_message: Option<String>,
    /// The lease holder (process) that ran the attempt.
    pub holder: String,
    pub started_at_ms: i64,
    pub finished_at_ms: i64,
}

#[derive(Debug, Clone)]
pub struct Lease {
    pub table_name: String,
    pub holder: String,
    pub token: i64,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl StateStore {
    pub async fn open(cfg: &StateConfig) -> anyhow::Result<Self> {
        sqlx::any::install_default_drivers();
        let mut url = cfg.url.clone();
        if let Some(pw) = cfg.password.read("state password")? {
            url = with_password(&url, &pw)?;
        }
        let dialect = if url.starts_with("sqlite:") {
            ensure_sqlite_parent(&url)?;
            Dialect::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Dialect::Postgres
        } else {
            anyhow::bail!("state.url {}: use sqlite:PATH or postgres://…", redact_url(&url));
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if dialect == Dialect::Sqlite { 1 } else { 4 })
            .acquire_timeout(Duration::from_secs(10))
            .connect(&url)
            .await
            .map_err(|e| anyhow::anyhow!("cannot open the state store {}: {e}", redact_url(&url)))?;
        let store = Self { pool, dialect, url: redact_url(&url), timeout: cfg.timeout };
        if dialect == Dialect::Sqlite {
            // Readers (status, watermark show) must not block the scheduler's writes.
            sqlx::query("PRAGMA journal_mode=WAL").execute(&store.pool).await.ok();
            sqlx::query("PRAGMA busy_timeout=10000").execute(&store.pool).await.ok();
            // A mirror: a power cut may lose its last write, never Iceberg's (I3, I7).
            sqlx::query("PRAGMA synchronous=NORMAL").execute(&store.pool).await.ok();
        }
        migrations::run(&store.pool, dialect)
            .await
            .map_err(|e| anyhow::anyhow!("state store {}: migration failed: {e}", store.url))?;
        Ok(store)
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// I10: a state-store call that does not answer within `state.timeout` fails as
    /// unreachable; the offload goes on without the mirror (I3).
    async fn limited<T>(&self, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r,
            Err(_) => {
                Err(OffloadError::StateUnreachable(format!("no answer within {:?} ({})", self.timeout, self.url)))
            }
        }
    }

    /// `CAST($n AS TIMESTAMPTZ)` on PostgreSQL, `$n` (text) on SQLite.
    fn ts(&self, n: usize) -> String {
        match self.dialect {
            Dialect::Sqlite => format!("${n}"),
            Dialect::Postgres => format!("CAST(${n} AS TIMESTAMPTZ)"),
        }
    }

    fn now(&self) -> &'static str {
        match self.dialect {
            Dialect::Sqlite => "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
            Dialect::Postgres => "NOW()",
        }
    }

    pub async fn ping(&self) -> Result<()> {
        self.limited(async {
            sqlx::query("SELECT 1").execute(&self.pool).await?;
            Ok(())
        })
        .await
    }

    /// Creates the table's row if missing (status `initialized`, as the original seeded).
    pub async fn ensure_table(&self, table: &str, target: &str) -> Result<()> {
        self.limited(async {
            let sql = format!(
                "INSERT INTO offload_watermarks (table_name, target_table, last_offload_timestamp, status, created_at, updated_at) \
                 VALUES ($1, $2, {}, 'initialized', {now}, {now}) ON CONFLICT (table_name) DO NOTHING",
                self.ts(3),
                now = self.now()
            );
            sqlx::query(&sql).bind(table).bind(target).bind("1970-01-01T00:00:00Z").execute(&self.pool).await?;
            Ok(())
        })
        .await
    }

    /// Sets the operators' status of a table: `running` when a run starts, `interrupted` when a
    /// shutdown abandoned it before its commit (not a failure, and not left "running").
    pub async fn set_status(&self, table: &str, status: &str) -> Result<()> {
        self.limited(async {
            let sql =
                format!("UPDATE offload_watermarks SET status = $1, updated_at = {} WHERE table_name = $2", self.now());
            sqlx::query(&sql).bind(status).bind(table).execute(&self.pool).await?;
            Ok(())
        })
        .await
    }

    /// I7: mirrors the watermark of a window just committed (the table's run goes on).
    pub async fn record_window_committed(
        &self,
        table: &str,
        watermark: &Position,
        rows: i64,
        duration_seconds: f64,
        snapshot_id: Option<i64>,
        sequence_number: i64,
    ) -> Result<()> {
        crate::fault::hit("state_update")?;
        self.limited(async {
            // Never backwards: a writer whose table view is older than the mirror's changes nothing.
            let sql = format!(
                "UPDATE offload_watermarks SET last_offload_timestamp = {}, last_offload_max_sequence = $2, \
                 last_offload_row_count = $3, last_successful_run = {now}, last_run_duration_seconds = $4, \
                 last_snapshot_id = $5, iceberg_sequence_number = $6, updated_at = {now} WHERE table_name = $7 \
                 AND (iceberg_sequence_number IS NULL OR iceberg_sequence_number <= $6)",
                self.ts(1),
                now = self.now()
            );
            sqlx::query(&sql)
                .bind(watermark.cursor_rfc3339())
                .bind(watermark.tiebreak.clone())
                .bind(rows)
                .bind(duration_seconds.ceil() as i64)
                .bind(snapshot_id)
                .bind(sequence_number)
                .bind(table)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
        .await
    }

    /// I7: sets the mirror's watermark to what Iceberg says, if it says something else (the
    /// update after a commit failed, another writer, a rollback), unless the mirror was written
    /// from a newer view of the table (`sequence_number`: the table's last sequence number,
    /// which never decreases). A mirror naming a snapshot the table does not have (`in_table`
    /// says no: the table was recreated, or the snapshot expired) is corrected regardless.
    /// Returns the mirror's watermark before, when it was corrected.
    pub async fn reconcile_watermark(
        &self,
        table: &str,
        watermark: Option<&Position>,
        snapshot_id: Option<i64>,
        sequence_number: i64,
        in_table: &(dyn Fn(i64) -> bool + Sync),
    ) -> Result<Option<String>> {
        self.limited(async {
            let row = sqlx::query(
                "SELECT CAST(last_offload_timestamp AS TEXT), last_offload_max_sequence, last_snapshot_id, \
                 iceberg_sequence_number FROM offload_watermarks WHERE table_name = $1",
            )
            .bind(table)
            .fetch_optional(&self.pool)
            .await?;
            let Some(row) = row else { return Ok(None) };
            let (before_ts, before_seq): (Option<String>, Option<String>) = (row.try_get(0)?, row.try_get(1)?);
            let (mirror_snapshot, mirror_sequence): (Option<i64>, Option<i64>) = (row.try_get(2)?, row.try_get(3)?);
            let foreign = mirror_snapshot.is_some_and(|id| !in_table(id));
            if mirror_snapshot == snapshot_id || (!foreign && mirror_sequence.is_some_and(|s| s > sequence_number)) {
                return Ok(None);
            }
            let wm = watermark.map(Position::cursor_rfc3339).unwrap_or_else(|| "1970-01-01T00:00:00Z".into());
            let sql = format!(
                "UPDATE offload_watermarks SET last_offload_timestamp = {}, last_offload_max_sequence = $2, \
                 last_snapshot_id = $3, iceberg_sequence_number = $4, updated_at = {} WHERE table_name = $5 \
                 AND (iceberg_sequence_number IS NULL OR iceberg_sequence_number <= $4 OR $6)",
                self.ts(1),
                self.now()
            );
            let res = sqlx::query(&sql)
                .bind(wm)
                .bind(watermark.and_then(|w| w.tiebreak.clone()))
                .bind(snapshot_id)
                .bind(sequence_number)
                .bind(table)
                .bind(foreign)
                .execute(&self.pool)
                .await?;
            if res.rows_affected() == 0 {
                return Ok(None);
            }
            let before = match (before_ts, before_seq) {
                (Some(t), Some(s)) => format!("{t} #{s}"),
                (Some(t), None) => t,
                (None, _) => "none".into(),
            };
            Ok(Some(before))
        })
        .await
    }

    /// Closes a successful table run. Windows it committed were mirrored one by one (I7); a run
    /// that found nothing to offload is healthy too, with its watermark unchanged.
    pub async fn record_table_success(&self, table: &str, duration_seconds: f64, committed: bool) -> Result<()> {
        self.limited(async {
            let sql = format!(
                "UPDATE offload_watermarks SET status = 'success',{} last_successful_run = {now}, \
                 last_run_duration_seconds = $1, failure_count = 0, last_error_message = NULL, updated_at = {now} \
                 WHERE table_name = $2",
                if committed { "" } else { " last_offload_row_count = 0," },
                now = self.now()
            );
            sqlx::query(&sql).bind(duration_seconds.ceil() as i64).bind(table).execute(&self.pool).await?;
            Ok(())
        })
        .await
    }

    pub async fn record_failure(&self, table: &str, message: &str, duration_seconds: f64) -> Result<()> {
        self.limited(async {
            let message: String = message.chars().take(1000).collect();
            let sql = format!(
                "UPDATE offload_watermarks SET status = 'failed', failure_count = failure_count + 1, last_error_message = $1, \
                 last_run_duration_seconds = $2, updated_at = {} WHERE table_name = $3",
                self.now()
            );
            sqlx::query(&sql).bind(message).bind(duration_seconds.ceil() as i64).bind(table).execute(&self.pool).await?;
            Ok(())
        })
        .await
    }

    pub async fn record_run(&self, r: &RunRecord) -> Result<()> {
        self.limited(async {
            let sql = format!(
                "INSERT INTO offload_runs (run_id, cycle_id, table_name, target_table, window_lo, window_hi, rows_written, snapshot_id, \
                 duration_seconds, status, error_type, error_kind, error_message, holder, started_at_ms, finished_at_ms, finished_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, {})",
                self.now()
            );
            sqlx::query(&sql)
                .bind(&r.run_id)
                .bind(&r.cycle_id)
                .bind(&r.table_name)
                .bind(&r.target_table)
                .bind(r.window_lo.clone())
                .bind(r.window_hi.clone())
                .bind(r.rows)
                .bind(r.snapshot_id)
                .bind(r.duration_seconds)
                .bind(&r.status)
                .bind(r.error_type.clone())
                .bind(r.error_kind.clone())
                .bind(r.error_message.as_ref().map(|m| m.chars().take(2000).collect::<String>()))
                .bind(&r.holder)
                .bind(r.started_at_ms)
                .bind(r.finished_at_ms)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
        .await
    }

    /// I9: the audit's verdict per day (one row per table and day, the latest kept); rows of
    /// days before `retained` (out of the source's retention now) are deleted.
    pub async fn record_audit(
        &self,
        table: &str,
        days: &[crate::report::DayAudit],
        retained: Option<chrono::NaiveDate>,
    ) -> Result<()> {
        self.limited(async {
            let sql = format!(
                "INSERT INTO offload_audit (table_name, day, source_rows, iceberg_rows, status, checked_at) \
                 VALUES ($1, $2, $3, $4, $5, {now}) ON CONFLICT (table_name, day) DO UPDATE SET \
                 source_rows = excluded.source_rows, iceberg_rows = excluded.iceberg_rows, status = excluded.status, \
                 checked_at = excluded.checked_at",
                now = self.now()
            );
            let mut tx = self.pool.begin().await?;
            if let Some(first) = retained {
                sqlx::query("DELETE FROM offload_audit WHERE table_name = $1 AND day < $2")
                    .bind(table)
                    .bind(first.to_string())
                    .execute(&mut *tx)
                    .await?;
            }
            for d in days {
                sqlx::query(&sql)
                    .bind(table)
                    .bind(d.day.to_string())
                    .bind(d.source_rows as i64)
                    .bind(d.iceberg_rows as i64)
                    .bind(d.status().as_str())
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// The audit's verdicts held for `table` from `retained` on, summed (what the metrics
    /// show, whichever process audited which days).
    pub async fn audit_totals(
        &self,
        table: &str,
        retained: Option<chrono::NaiveDate>,
    ) -> Result<crate::report::AuditTotals> {
        self.limited(async {
            let rows = sqlx::query(
                "SELECT status, COUNT(*), CAST(SUM(source_rows - iceberg_rows) AS BIGINT) FROM offload_audit \
                 WHERE table_name = $1 AND day >= $2 GROUP BY status",
            )
            .bind(table)
            .bind(retained.map(|d| d.to_string()).unwrap_or_default())
            .fetch_all(&self.pool)
            .await?;
            let mut totals = crate::report::AuditTotals::default();
            for r in rows {
                let status: String = r.try_get(0)?;
                let days: i64 = r.try_get(1)?;
                let diff: i64 = r.try_get(2)?;
                match status.as_str() {
                    "ok" => totals.days[0] = days as u64,
                    "missing" => (totals.days[1], totals.missing_rows) = (days as u64, diff.max(0) as u64),
                    _ => (totals.days[2], totals.extra_rows) = (days as u64, (-diff).max(0) as u64),
                }
            }
            Ok(totals)
        })
        .await
    }

    /// When the table's last full audit finished (ms since the epoch).
    pub async fn last_full_audit(&self, table: &str) -> Result<Option<i64>> {
        self.last_time("offload_audit_runs", "last_full_ms", table).await
    }

    pub async fn record_full_audit(&self, table: &str, at_ms: i64) -> Result<()> {
        self.record_time("offload_audit_runs", "last_full_ms", table, at_ms).await
    }

    /// When the table's last successful maintenance run ended (ms since the epoch).
    pub async fn last_maintenance_success(&self, table: &str) -> Result<Option<i64>> {
        self.last_time("offload_maintenance_runs", "last_success_ms", table).await
    }

    pub async fn record_maintenance_success(&self, table: &str, at_ms: i64) -> Result<()> {
        self.record_time("offload_maintenance_runs", "last_success_ms", table, at_ms).await
    }

    /// A per-table time (ms) kept in `relation.column` (a constant of this module, never input).
    async fn last_time(&self, relation: &str, column: &str, table: &str) -> Result<Option<i64>> {
        let sql = format!("SELECT {column} FROM {relation} WHERE table_name = $1");
        self.limited(async {
            let row = sqlx::query(&sql).bind(table).fetch_optional(&self.pool).await?;
            Ok(row.map(|r| r.try_get::<i64, _>(0)).transpose()?)
        })
        .await
    }

    async fn record_time(&self, relation: &str, column: &str, table: &str, at_ms: i64) -> Result<()> {
        let sql = format!(
            "INSERT INTO {relation} (table_name, {column}) VALUES ($1, $2) \
             ON CONFLICT (table_name) DO UPDATE SET {column} = excluded.{column}"
        );
        self.limited(async {
            sqlx::query(&sql).bind(table).bind(at_ms).execute(&self.pool).await?;
            Ok(())
        })
        .await
    }

    pub async fn watermarks(&self) -> Result<Vec<WatermarkRow>> {
        self.limited(async {
            let rows = sqlx::query(
                "SELECT table_name, target_table, CAST(last_offload_timestamp AS TEXT), last_offload_max_sequence, \
                 last_offload_row_count, status, CAST(last_successful_run AS TEXT), last_run_duration_seconds, failure_count, \
                 last_error_message, last_snapshot_id, CAST(updated_at AS TEXT) FROM offload_watermarks ORDER BY table_name",
            )
            .fetch_all(&self.pool)
            .await?;
            rows.iter().map(watermark_row).collect()
        })
        .await
    }

    /// I6: takes the table's lease unless another live holder has it.
    pub async fn acquire_lease(&self, table: &str, holder: &str, ttl: Duration) -> Result<Lease> {
        self.limited(async {
            let now = now_ms();
            let res = sqlx::query(
                "INSERT INTO offload_leases (table_name, holder, expires_at_ms, token) VALUES ($1, $2, $3, 1) \
                 ON CONFLICT (table_name) DO UPDATE SET holder = excluded.holder, expires_at_ms = excluded.expires_at_ms, \
                 token = offload_leases.token + 1 \
                 WHERE offload_leases.expires_at_ms < $4 OR offload_leases.holder = excluded.holder",
            )
            .bind(table)
            .bind(holder)
            .bind(now + ttl.as_millis() as i64)
            .bind(now)
            .execute(&self.pool)
            .await?;
            let row = sqlx::query("SELECT holder, expires_at_ms, token FROM offload_leases WHERE table_name = $1")
                .bind(table)
                .fetch_one(&self.pool)
                .await?;
            let current: String = row.try_get(0)?;
            let expires: i64 = row.try_get(1)?;
            let token: i64 = row.try_get(2)?;
            if res.rows_affected() == 1 && current == holder {
                Ok(Lease { table_name: table.into(), holder: holder.into(), token })
            } else {
                let until = chrono::DateTime::from_timestamp_millis(expires).map(|t| t.to_rfc3339()).unwrap_or_default();
                Err(OffloadError::LeaseHeld { table: table.into(), holder: current, until })
            }
        })
        .await
    }

    /// Takes over a lease whose holder is known to be dead (a crashed process on this host),
    /// without waiting for it to expire. Only succeeds if that holder still has it.
    pub async fn take_over_lease(
        &self,
        table: &str,
        dead_holder: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>> {
        self.limited(async {
            let res = sqlx::query(
                "UPDATE offload_leases SET holder = $1, expires_at_ms = $2, token = token + 1 WHERE table_name = $3 AND holder = $4",
            )
            .bind(holder)
            .bind(now_ms() + ttl.as_millis() as i64)
            .bind(table)
            .bind(dead_holder)
            .execute(&self.pool)
            .await?;
            if res.rows_affected() != 1 {
                return Ok(None);
            }
            Ok(Some(self.lease_taken(table, holder).await?))
        })
        .await
    }

    /// The lease `holder` has just taken over (its new token).
    async fn lease_taken(&self, table: &str, holder: &str) -> Result<Lease> {
        let token: i64 = sqlx::query("SELECT token FROM offload_leases WHERE table_name = $1")
            .bind(table)
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?;
        Ok(Lease { table_name: table.into(), holder: holder.into(), token })
    }

    /// Extends a held lease; false if it was lost (expired and taken by another holder).
    pub async fn renew_lease(&self, lease: &Lease, ttl: Duration) -> Result<bool> {
        self.limited(async {
            let res = sqlx::query(
                "UPDATE offload_leases SET expires_at_ms = $1 WHERE table_name = $2 AND holder = $3 AND token = $4",
            )
            .bind(now_ms() + ttl.as_millis() as i64)
            .bind(&lease.table_name)
            .bind(&lease.holder)
            .bind(lease.token)
            .execute(&self.pool)
            .await?;
            Ok(res.rows_affected() == 1)
        })
        .await
    }

    pub async fn release_lease(&self, lease: &Lease) -> Result<()> {
        self.limited(async {
            sqlx::query("DELETE FROM offload_leases WHERE table_name = $1 AND holder = $2 AND token = $3")
                .bind(&lease.table_name)
                .bind(&lease.holder)
                .bind(lease.token)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
        .await
    }
}

fn watermark_row(r: &AnyRow) -> Result<WatermarkRow> {
    Ok(WatermarkRow {
        table_name: r.try_get(0)?,
        target_table: r.try_get(1)?,
        last_offload_timestamp: r.try_get::<Option<String>, _>(2)?.unwrap_or_default(),
        last_offload_max_sequence: r.try_get(3)?,
        last_offload_row_count: r.try_get::<Option<i64>, _>(4)?.unwrap_or(0),
        status: r.try_get(5)?,
        last_successful_run: r.try_get(6)?,
        last_run_duration_seconds: r.try_get(7)?,
        failure_count: r.try_get::<Option<i64>, _>(8)?.unwrap_or(0),
        last_error_message: r.try_get(9)?,
        last_snapshot_id: r.try_get(10)?,
        updated_at: r.try_get(11)?,
    })
}
