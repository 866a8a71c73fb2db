//! Both tiers as one table (I13): a ClickHouse view per table (`tables[].view`), the union of
//! the hot rows above `W` (the source, as the offload reads it) and the Iceberg table read at
//! one snapshot, at or below the `W` that snapshot carries.
//!
//! The view pins a pair, snapshot `N` and `W(N)`, in one statement. `N` holds exactly the rows
//! at or below `W(N)` (I2, I3), so any such pair, old or new, serves every settled row once
//! as long as the hot tier still holds the rows above its `W`: rewriting the view only makes
//! it fresher, and a stale rewrite (a slow process, a lost race) is never wrong. Eviction of
//! hot partitions reads the pair back from ClickHouse before it drops anything.

use iceberg::table::Table;
use serde::{Deserialize, Serialize};

use crate::commit::TableView;
use crate::config::{TableConfig, ViewName};
use crate::error::{OffloadError, Result};
use crate::events::{self, ViewCause};
use crate::services::Services;
use crate::source::ClickHouse;
use crate::source::query::SourceTable;
use crate::util::quote_ident;
use crate::window::{Position, escaped_to_literal};

/// What a view serves from Iceberg: the snapshot it reads and the `W` that snapshot carries.
/// `None` in both while nothing is offloaded (the view is the hot tier alone). Kept as JSON
/// in the view's comment, where operators and eviction read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pinned {
    pub snapshot_id: Option<i64>,
    pub watermark: Option<Position>,
}

/// Where ClickHouse reads the Iceberg table from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColdStorage {
    /// A directory the ClickHouse server can read (`icebergLocal`).
    Local(String),
}

impl ColdStorage {
    /// Where a table at `location` (its metadata's `location`) is read from.
    pub fn of(location: &str) -> std::result::Result<Self, String> {
        let path = location.strip_prefix("file://").unwrap_or(location);
        if path.starts_with('/') {
            return Ok(Self::Local(path.trim_end_matches('/').to_string()));
        }
        Err(format!(
            "the Iceberg table is at {location}; the view reads a local warehouse (icebergLocal), and this location is not one"
        ))
    }

    fn table_function(&self) -> String {
        match self {
            Self::Local(path) => format!("icebergLocal('{}')", escape_literal(path)),
        }
    }
}

/// The Iceberg side of a view: the table's storage and the pinned pair.
#[derive(Debug, Clone)]
pub struct ColdSide {
    pub storage: ColdStorage,
    pub snapshot_id: i64,
    pub watermark: Position,
}

impl ColdSide {
    fn pinned(&self) -> Pinned {
        Pinned { snapshot_id: Some(self.snapshot_id), watermark: Some(self.watermark.clone()) }
    }
}

/// The view of one table, built from the source as the offload reads it.
pub struct HybridView<'a> {
    pub name: &'a ViewName,
    pub source: &'a SourceTable,
}

impl<'a> HybridView<'a> {
    /// The view of `cfg`'s table, when it has one.
    pub fn of(cfg: &'a TableConfig, source: &'a SourceTable) -> Option<Self> {
        cfg.view.as_ref().map(|name| Self { name, source })
    }

    fn quoted_name(&self) -> String {
        format!("{}.{}", quote_ident(&self.name.db), quote_ident(&self.name.name))
    }

    /// `CREATE OR REPLACE VIEW` over the hot rows above `W` and, when something is offloaded,
    /// the Iceberg table at the pinned snapshot, at or below `W`. Both sides carry the
    /// source's columns with the source's types, in the offloaded order.
    pub fn create_sql(&self, cold: Option<&ColdSide>) -> String {
        let columns: Vec<String> = self.source.columns.iter().map(|c| quote_ident(&c.name)).collect();
        let bounds = self.source.bounds();
        let hot_from = self.source.from();
        let mut sql =
            format!("CREATE OR REPLACE VIEW {} AS SELECT {} FROM {hot_from}", self.quoted_name(), columns.join(", "));
        let pinned = match cold {
            None => Pinned { snapshot_id: None, watermark: None },
            Some(cold) => {
                let above = bounds.literal_predicate(Some(&cold.watermark), None);
                let above = if self.source.cursor_is_nullable() {
                    // Never offloaded, so always hot.
                    format!("({above}) OR {} IS NULL", bounds.cursor)
                } else {
                    above
                };
                let casts: Vec<String> = self
                    .source
                    .columns
                    .iter()
                    .map(|c| format!("CAST({q} AS {t}) AS {q}", q = quote_ident(&c.name), t = c.ch_type))
                    .collect();
                let at_or_below = bounds.literal_predicate(None, Some(&cold.watermark));
                sql.push_str(&format!(
                    " WHERE {above} UNION ALL SELECT {} FROM (SELECT {} FROM {} SETTINGS iceberg_snapshot_id = {}) WHERE {at_or_below}",
                    columns.join(", "),
                    casts.join(", "),
                    cold.storage.table_function(),
                    cold.snapshot_id,
                ));
                cold.pinned()
            }
        };
        let comment = serde_json::to_string(&pinned).expect("pinned serialises");
        sql.push_str(&format!(" COMMENT '{}'", escape_literal(&comment)));
        sql
    }

    /// What the view pins now, as ClickHouse has it; `None` when there is no such view or it
    /// was not written by this service.
    pub async fn pinned(&self, ch: &ClickHouse) -> Result<Option<Pinned>> {
        read_pinned(ch, self.name).await
    }

    /// Writes the view pinned on `cold` (the hot tier alone when `None`), unless ClickHouse
    /// already has that pair. Returns whether it was written.
    pub async fn refresh(&self, ch: &ClickHouse, cold: Option<&ColdSide>) -> Result<bool> {
        let want = cold.map(ColdSide::pinned).unwrap_or(Pinned { snapshot_id: None, watermark: None });
        if self.pinned(ch).await?.as_ref() == Some(&want) {
            return Ok(false);
        }
        self.write(ch, cold).await?;
        Ok(true)
    }

    /// Writes the view pinned on `cold`.
    pub async fn write(&self, ch: &ClickHouse, cold: Option<&ColdSide>) -> Result<()> {
        ch.query_text(&self.create_sql(cold), &[]).await.map(drop).map_err(|e| self.explain(e))
    }

    fn explain(&self, e: OffloadError) -> OffloadError {
        let OffloadError::ClickHouse { code, message } = &e else { return e };
        let hint = match code {
            81 => format!("create the database {} first", quote_ident(&self.name.db)),
            481 => "the view reads the warehouse with icebergLocal, which reads only under the server's \
                    user_files_path: put the warehouse there (or link it)"
                .to_string(),
            497 => "grant the service's ClickHouse user CREATE VIEW and DROP VIEW on the view's database, \
                    and the FILE source (or S3) for the Iceberg side"
                .to_string(),
            _ => return e,
        };
        OffloadError::ClickHouse {
            code: *code,
            message: format!("view {} of table {}: {message} — {hint}", self.name, self.source.table.source()),
        }
    }
}

impl HybridView<'_> {
    /// Pins the view on `snapshot_id` of `table` and the `w` it carries (the hot tier alone
    /// before anything is offloaded): written after a commit, otherwise only when ClickHouse
    /// has another pair. Logged and counted; returns whether the view is pinned there now. A
    /// failure leaves the older pair, which stays exact.
    pub async fn pin(
        &self,
        svc: &Services,
        table: &Table,
        snapshot_id: Option<i64>,
        w: Option<&Position>,
        cause: ViewCause,
    ) -> bool {
        let (t, name) = (self.source.table.name(), self.name.to_string());
        let written = async {
            let cold = match (snapshot_id, w) {
                (Some(snapshot_id), Some(w)) => Some(ColdSide {
                    storage: ColdStorage::of(table.metadata().location())
                        .map_err(|message| OffloadError::Schema { table: self.source.table.source(), message })?,
                    snapshot_id,
                    watermark: w.clone(),
                }),
                _ => None,
            };
            match cause {
                ViewCause::Commit => self.write(&svc.ch, cold.as_ref()).await.map(|()| true),
                ViewCause::Stale | ViewCause::Maintenance => self.refresh(&svc.ch, cold.as_ref()).await,
            }
        };
        match written.await {
            Ok(true) => {
                events::ViewRewritten { table: t, view: &name, snapshot_id, watermark: w, cause }.emit(&svc.metrics)
            }
            Ok(false) => events::ViewCurrent { table: t, watermark: w }.emit(&svc.metrics),
            Err(error) => {
                events::ViewRewriteFailed { table: t, view: &name, error: &error }.emit(&svc.metrics);
                return false;
            }
        }
        true
    }
}

/// What the view `name` pins now, as ClickHouse has it; `None` when there is no such view or
/// it was not written by this service.
pub async fn read_pinned(ch: &ClickHouse, name: &ViewName) -> Result<Option<Pinned>> {
    let rows = ch
        .query_rows(
            "SELECT comment FROM system.tables WHERE database = {db:String} AND name = {name:String}",
            &[("db".into(), name.db.clone()), ("name".into(), name.name.clone())],
        )
        .await?;
    Ok(rows.first().and_then(|r| r.first()).and_then(|c| serde_json::from_str(c).ok()))
}

/// After maintenance (I13): the view of `cfg`'s table moved onto `table`'s current snapshot,
/// and the snapshot it reads now, which expiry must keep (the older one when the move failed).
/// `None` when the table has no view or the view pins no snapshot.
pub async fn repin_after_maintenance(svc: &Services, cfg: &TableConfig, table: &Table) -> Result<Option<i64>> {
    let Some(name) = &cfg.view else { return Ok(None) };
    let source = SourceTable::describe(&svc.ch, cfg).await?;
    let view = HybridView { name, source: &source };
    let read = TableView::of(table.clone())?;
    view.pin(svc, table, read.snapshot_id(), read.watermark.as_ref(), ViewCause::Maintenance).await;
    Ok(view.pinned(&svc.ch).await?.and_then(|p| p.snapshot_id))
}

/// Text inside a single-quoted SQL literal.
fn escape_literal(text: &str) -> String {
    escaped_to_literal(&text.replace('\\', "\\\\"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_locations_are_read_with_iceberg_local() {
        assert_eq!(ColdStorage::of("file:///wh/cold/t/").unwrap(), ColdStorage::Local("/wh/cold/t".into()));
        assert_eq!(ColdStorage::of("/wh/cold/t").unwrap(), ColdStorage::Local("/wh/cold/t".into()));
        assert!(ColdStorage::of("s3://bucket/wh/t").unwrap_err().contains("s3://bucket/wh/t"));
    }

    #[test]
    fn literals_keep_quotes_and_backslashes() {
        assert_eq!(escape_literal(r"it's C:\x"), r"it\'s C:\\x");
    }
}
