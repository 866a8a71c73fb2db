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
    /// A fingerprint of the tables the member is configured with.
    pub tables_hash: String,
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
    pub async fn heartbeat_member(&self, id: &str, host: &str, tables_hash: &str) -> Result<()> {
        let now = self.now_ms_sql();
        let sql = format!(
            "INSERT INTO offload_members (member_id, host, started_at_ms, heartbeat_at_ms, tables_hash) \
             VALUES ($1, $2, {now}, {now}, $3) \
             ON CONFLICT (member_id) DO UPDATE SET heartbeat_at_ms = {now}, lost_at_ms = NULL, tables_hash = $3"
        );
        self.limited(async {
            sqlx::query(&sql).bind(id).bind(host).bind(tables_hash).execute(&self.pool).await?;
            Ok(())
        })
        .await
    }

    /// Removes a member: this one leaving at once (SIGTERM; the others take its tables at their
    /// next look), or one found gone for sure (`holder_is_gone`). True for exactly one caller,
    /// however many remove it at once: that one counts a loss.
    pub async fn remove_member(&self, id: &str) -> Result<bool> {
        self.limited(async {
            let res =
                sqlx::query("DELETE FROM offload_members WHERE member_id = $1").bind(id).execute(&self.pool).await?;
            Ok(res.rows_affected() == 1)
        })
        .await
    }

    pub async fn members(&self) -> Result<Vec<Member>> {
        let sql = format!(
            "SELECT member_id, host, heartbeat_at_ms, lost_at_ms, tables_hash, {} FROM offload_members ORDER BY member_id",
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
                        tables_hash: r.try_get(4)?,
                        now_ms: r.try_get(5)?,
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

    /// Takes over a lease held by a member that is silent *now* (its heartbeat older than
    /// `timeout_ms` at this statement, not at the last look): a member that came back keeps
    /// its leases.
    pub async fn take_over_lease_of_silent_member(
        &self,
        table: &str,
        member: &str,
        holder: &str,
        ttl: std::time::Duration,
        timeout_ms: i64,
    ) -> Result<Option<super::Lease>> {
        let sql = format!(
            "UPDATE offload_leases SET holder = $1, expires_at_ms = $2, token = token + 1 \
             WHERE table_name = $3 AND holder = $4 AND EXISTS (SELECT 1 FROM offload_members \
             WHERE member_id = $4 AND heartbeat_at_ms < {} - $5)",
            self.now_ms_sql()
        );
        self.limited(async {
            let res = sqlx::query(&sql)
                .bind(holder)
                .bind(super::now_ms() + ttl.as_millis() as i64)
                .bind(table)
                .bind(member)
                .bind(timeout_ms)
                .execute(&self.pool)
                .await?;
            if res.rows_affected() != 1 {
                return Ok(None);
            }
            Ok(Some(self.lease_taken(table, holder).await?))
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
