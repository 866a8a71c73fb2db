//! Versioned schema migrations of the state store. Append new versions; never edit old ones.

use sqlx::AnyPool;
use sqlx::Row;

use super::Dialect;

/// (version, statements). Column types that differ by dialect are placeholders:
/// `{TS}` a timestamp (TEXT, RFC 3339, on SQLite; TIMESTAMPTZ on PostgreSQL), `{ID}` an
/// auto-increment key, `{NOW}` a default of the current time.
const MIGRATIONS: &[(i64, &[&str])] = &[
    (
        1,
        &[
            "CREATE TABLE IF NOT EXISTS offload_watermarks (
            table_name TEXT PRIMARY KEY,
            last_offload_timestamp {TS} NOT NULL,
            last_offload_max_sequence TEXT,
            last_offload_row_count BIGINT DEFAULT 0,
            status TEXT NOT NULL DEFAULT 'initialized',
            last_successful_run {TS},
            last_run_duration_seconds INTEGER,
            failure_count INTEGER DEFAULT 0,
            last_error_message TEXT,
            created_at {TS} {NOW},
            updated_at {TS} {NOW},
            target_table TEXT,
            last_snapshot_id BIGINT)",
            "CREATE INDEX IF NOT EXISTS idx_watermarks_status ON offload_watermarks(status)",
            "CREATE INDEX IF NOT EXISTS idx_watermarks_last_run ON offload_watermarks(last_successful_run DESC)",
            "CREATE TABLE IF NOT EXISTS offload_runs (
            id {ID},
            run_id TEXT NOT NULL,
            cycle_id TEXT NOT NULL,
            table_name TEXT NOT NULL,
            target_table TEXT NOT NULL,
            window_lo TEXT,
            window_hi TEXT,
            rows_written BIGINT NOT NULL DEFAULT 0,
            snapshot_id BIGINT,
            duration_seconds DOUBLE PRECISION,
            status TEXT NOT NULL,
            error_type TEXT,
            error_kind TEXT,
            error_message TEXT,
            finished_at {TS})",
            "CREATE INDEX IF NOT EXISTS idx_runs_table ON offload_runs(table_name, id)",
            "CREATE TABLE IF NOT EXISTS offload_leases (
            table_name TEXT PRIMARY KEY,
            holder TEXT NOT NULL,
            expires_at_ms BIGINT NOT NULL,
            token BIGINT NOT NULL)",
        ],
    ),
    (
        // Who ran each attempt and when, so that single-writer behaviour can be audited.
        2,
        &[
            "ALTER TABLE offload_runs ADD COLUMN holder TEXT",
            "ALTER TABLE offload_runs ADD COLUMN started_at_ms BIGINT",
            "ALTER TABLE offload_runs ADD COLUMN finished_at_ms BIGINT",
        ],
    ),
    (
        // I7: the table's last sequence number as of the view that last wrote the mirror, so
        // that a writer with an older view never moves the mirror backwards.
        3,
        &["ALTER TABLE offload_watermarks ADD COLUMN iceberg_sequence_number BIGINT"],
    ),
    (
        // I9: the audit's latest verdict per table and day of the cursor (the original's
        // maintenance_audit_log, one row per day instead of one per run).
        4,
        &["CREATE TABLE IF NOT EXISTS offload_audit (
            table_name TEXT NOT NULL,
            day TEXT NOT NULL,
            source_rows BIGINT NOT NULL,
            iceberg_rows BIGINT NOT NULL,
            status TEXT NOT NULL,
            checked_at {TS} {NOW},
            PRIMARY KEY (table_name, day))"],
    ),
    (
        // I9: when each table's last full audit ran, so that `once` under cron audits every
        // retained day daily, not at every start.
        5,
        &["CREATE TABLE IF NOT EXISTS offload_audit_runs (table_name TEXT PRIMARY KEY, last_full_ms BIGINT NOT NULL)"],
    ),
    (
        // Replicas: each `run` process heartbeats here; the live ones share the tables. Times
        // are the state store's clock, so hosts whose clocks disagree still agree on who is live.
        6,
        &["CREATE TABLE IF NOT EXISTS offload_members (
            member_id TEXT PRIMARY KEY,
            host TEXT NOT NULL,
            started_at_ms BIGINT NOT NULL,
            heartbeat_at_ms BIGINT NOT NULL,
            lost_at_ms BIGINT,
            tables_hash TEXT NOT NULL DEFAULT '')"],
    ),
    (
        // When each table's last maintenance succeeded, so that a restart does not forget it
        // (the alert on maintenance not done for two days needs the time, not this process's).
        7,
        &[
            "CREATE TABLE IF NOT EXISTS offload_maintenance_runs (table_name TEXT PRIMARY KEY, last_success_ms BIGINT NOT NULL)",
        ],
    ),
];

fn dialect_sql(stmt: &str, dialect: Dialect) -> String {
    let (ts, id, now) = match dialect {
        Dialect::Sqlite => ("TEXT", "INTEGER PRIMARY KEY AUTOINCREMENT", ""),
        Dialect::Postgres => ("TIMESTAMPTZ", "BIGSERIAL PRIMARY KEY", "DEFAULT NOW()"),
    };
    stmt.replace("{TS}", ts).replace("{ID}", id).replace("{NOW}", now)
}

/// Applies the migrations; replicas starting together on a fresh database race on the same
/// `CREATE TABLE IF NOT EXISTS` (PostgreSQL answers the loser with a unique violation), and
/// the loser applies them again once the winner's tables exist.
pub async fn run(pool: &AnyPool, dialect: Dialect) -> Result<(), sqlx::Error> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match apply(pool, dialect).await {
            Err(e) if attempt < 5 && crate::database::lost_create_race(&e) => {
                tokio::time::sleep(std::time::Duration::from_millis(200 * attempt)).await;
            }
            other => return other,
        }
    }
}

async fn apply(pool: &AnyPool, dialect: Dialect) -> Result<(), sqlx::Error> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS offload_schema_migrations (version BIGINT PRIMARY KEY, applied_at TEXT NOT NULL)",
    )
    .execute(pool)
    .await?;
    let applied: i64 = sqlx::query("SELECT COALESCE(MAX(version), 0) FROM offload_schema_migrations")
        .fetch_one(pool)
        .await?
        .try_get(0)?;
    for (version, statements) in MIGRATIONS {
        if *version <= applied {
            continue;
        }
        let mut tx = pool.begin().await?;
        for stmt in *statements {
            sqlx::query(&dialect_sql(stmt, dialect)).execute(&mut *tx).await?;
        }
        let insert = sqlx::query("INSERT INTO offload_schema_migrations (version, applied_at) VALUES ($1, $2)")
            .bind(*version)
            .bind(chrono::Utc::now().to_rfc3339())
            .execute(&mut *tx)
            .await;
        match insert {
            Ok(_) => tx.commit().await?,
            // Another process applied the same version concurrently.
            Err(_) => tx.rollback().await?,
        }
    }
    Ok(())
}
