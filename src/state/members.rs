//! Replica membership (`offload_members`): the `run` processes that share the tables write a
//! heartbeat here. Every time is the state store's own clock, so replicas on hosts whose
//! clocks disagree still agree on who is live.

use sqlx::Row;

use super::{Dialect, StateStore};
use crate::error::Result;

/// A member row as the state store holds it, with the store's clock at the time of reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: String,
    pub host: String,
    pub heartbeat_at_ms: i64,
    /// Set once, by the replica that found the member's heartbeat too old.
    pub lost_at_ms: Option<i64>,
    /// The state store's clock when the row was read.
    pub now_ms: i64,
}

impl Member {
    pub fn heartbeat_age_ms(&self) -> i64 {
        self.now_ms - self.heartbeat_at_ms
    }
}

impl StateStore {
    /// The store's clock in Unix milliseconds, as SQL.
    fn now_ms_sql(&self) -> &'static str {
        match self.dialect {
            Dialect::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000 AS BIGINT)",
            Dialect::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        }
    }

    /// Records that the member is alive now (joining on its first call). A member that was
    /// found lost and comes back is a member again.
    pub async fn heartbeat_member(&self, id: &str, host: &str) -> Result<()> {
        let now = self.now_ms_sql();
        let sql = format!(
            "INSERT INTO offload_members (member_id, host, started_at_ms, heartbeat_at_ms) VALUES ($1, $2, {now}, {now}) \
             ON CONFLICT (member_id) DO UPDATE SET heartbeat_at_ms = {now}, lost_at_ms = NULL"
        );
        self.limited(async {
            sqlx::query(&sql).bind(id).bind(host).execute(&self.pool).await?;
            Ok(())
        })
        .await
    }

    /// Leaves at once (SIGTERM): the other members take the tables at their next cycle.
    pub async fn remove_member(&self, id: &str) -> Result<()> {
        self.limited(async {
            sqlx::query("DELETE FROM offload_members WHERE member_id = $1").bind(id).execute(&self.pool).await?;
            Ok(())
        })
        .await
    }

    pub async fn members(&self) -> Result<Vec<Member>> {
        let sql = format!(
            "SELECT member_id, host, heartbeat_at_ms, lost_at_ms, {} FROM offload_members ORDER BY member_id",
            self.now_ms_sql()
        );
        self.limited(async {
            let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
            rows.iter()
                .map(|r| {
                    Ok(Member {
                        id: r.try_get(0)?,
                        host: r.try_get(1)?,
                        heartbeat_at_ms: r.try_get(2)?,
                        lost_at_ms: r.try_get(3)?,
                        now_ms: r.try_get(4)?,
                    })
                })
                .collect()
        })
        .await
    }

    /// Marks a member whose heartbeat is older than `timeout_ms` as lost. True for exactly one
    /// caller, however many replicas find it at once: that one counts the loss.
    pub async fn mark_member_lost(&self, id: &str, timeout_ms: i64) -> Result<bool> {
        let now = self.now_ms_sql();
        let sql = format!(
            "UPDATE offload_members SET lost_at_ms = {now} \
             WHERE member_id = $1 AND lost_at_ms IS NULL AND heartbeat_at_ms < {now} - $2"
        );
        self.limited(async {
            let res = sqlx::query(&sql).bind(id).bind(timeout_ms).execute(&self.pool).await?;
            Ok(res.rows_affected() == 1)
        })
        .await
    }

    /// Forgets members silent for longer than `older_than_ms` (their leases expired long ago).
    pub async fn forget_members(&self, older_than_ms: i64) -> Result<u64> {
        let sql = format!("DELETE FROM offload_members WHERE heartbeat_at_ms < {} - $1", self.now_ms_sql());
        self.limited(async { Ok(sqlx::query(&sql).bind(older_than_ms).execute(&self.pool).await?.rows_affected()) })
            .await
    }
}
