//! Both tiers as one table (I13): a ClickHouse view per table (`tables[].view`), the union of
//! the hot rows above a split `S` (the source, as the offload reads it) and the Iceberg table
//! read at one snapshot `N`, at or below `S`.
//!
//! The view pins `N` and `S` in one statement, with `S` at or below `W(N)`. `N` holds every
//! row at or below `W(N)` (I2, I3), so any such pair, old or new, serves every settled row once
//! as long as the hot tier still holds the rows above its `S`: rewriting the view only makes
//! it fresher, and a stale rewrite (a slow process, a lost race) is never wrong. `S` is `W(N)`;
//! with eviction on, it is the start of the UTC day `evict_after` ago when that is earlier, so
//! that the days the hot tier keeps are read from it alone (recent queries never open Iceberg)
//! and what eviction may drop lies at or below `S`. Eviction reads the pair back from
//! ClickHouse before it drops anything.

use iceberg::table::Table;
use serde::{Deserialize, Serialize};

use crate::commit::TableView;
use crate::config::{TableConfig, ViewName};
use crate::error::{OffloadError, Result};
use crate::events::{self, ViewCause};
use crate::services::{Services, ViewStorage};
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
    /// The snapshot's sequence number: a view never moves to an older snapshot (a process
    /// that lost its lease and wakes up late must not undo a newer pair).
    #[serde(default)]
    pub sequence_number: Option<i64>,
    /// Where the view splits: hot rows above, Iceberg's at or below (`watermark` when absent).
    #[serde(default)]
    pub split: Option<Position>,
}

impl Pinned {
    const NOTHING: Pinned = Pinned { snapshot_id: None, watermark: None, sequence_number: None, split: None };

    /// Where the view splits the tiers.
    pub fn split(&self) -> Option<&Position> {
        self.split.as_ref().or(self.watermark.as_ref())
    }

    /// Whether this pair reads a later snapshot than `other` (format 1 tables have no
    /// sequence numbers: never).
    fn later_than(&self, other: &Pinned) -> bool {
        matches!((self.sequence_number, other.sequence_number), (Some(a), Some(b)) if a > b)
    }
}

/// Who writes a view's comment: a view whose comment does not say so is not this service's.
const WRITER: &str = "iceberg-offload";

/// A view's comment: who wrote it, and the pair it pins.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Comment {
    by: String,
    #[serde(flatten)]
    pinned: Pinned,
}

/// What a refresh did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refreshed {
    /// The view now pins this.
    Written(Pinned),
    /// The view already pinned this (the same pair, or a later one).
    Kept(Pinned),
}

/// What ClickHouse has under a view's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Existing {
    Absent,
    /// A view this service wrote, and the pair it pins.
    Ours(Pinned),
    /// Anything else: a table, a view of someone else's. Never replaced.
    Other {
        engine: String,
    },
}

/// Where ClickHouse reads the Iceberg table from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColdStorage {
    /// A directory the ClickHouse server can read (`icebergLocal`).
    Local(String),
    /// An S3 prefix (`icebergS3`), with the credentials of a named collection.
    S3 { collection: String, url: String },
}

impl ColdStorage {
    /// Where a table at `location` (its metadata's `location`) is read from.
    pub fn of(location: &str, access: &ViewStorage) -> std::result::Result<Self, String> {
        let bare = location.strip_prefix("file://").or_else(|| location.strip_prefix("file:")).unwrap_or(location);
        if bare.starts_with('/') {
            return Ok(Self::Local(bare.trim_end_matches('/').to_string()));
        }
        let Some(key) = location.strip_prefix("s3://").or_else(|| location.strip_prefix("s3a://")) else {
            return Err(format!(
                "the Iceberg table is at {location}; a view reads a local warehouse (icebergLocal) or S3 (icebergS3), not this"
            ));
        };
        let Some(collection) = access.s3_collection.clone() else {
            return Err(format!(
                "the Iceberg table is on S3 ({location}): set clickhouse.iceberg_s3_collection to a ClickHouse named \
                 collection that holds the credentials (CREATE NAMED COLLECTION … AS access_key_id = …, \
                 secret_access_key = …); the view's text never holds them"
            ));
        };
        let key = key.trim_end_matches('/');
        let url = match &access.s3_endpoint {
            Some(endpoint) => format!("{}/{key}/", endpoint.trim_end_matches('/')),
            None => match key.split_once('/') {
                Some((bucket, path)) => format!("https://{bucket}.s3.amazonaws.com/{path}/"),
                None => format!("https://{key}.s3.amazonaws.com/"),
            },
        };
        Ok(Self::S3 { collection, url })
    }

    fn table_function(&self) -> String {
        match self {
            Self::Local(path) => format!("icebergLocal('{}')", escape_literal(path)),
            Self::S3 { collection, url } => {
                format!("icebergS3({}, url = '{}')", quote_ident(collection), escape_literal(url))
            }
        }
    }
}

/// The Iceberg side of a view: the table's storage and the pinned pair.
#[derive(Debug, Clone)]
pub struct ColdSide {
    pub storage: ColdStorage,
    pub snapshot_id: i64,
    pub watermark: Position,
    pub sequence_number: Option<i64>,
    /// At or below `watermark`.
    pub split: Position,
}

impl ColdSide {
    /// The view's Iceberg side for `table` at `snapshot_id`, whose watermark is `w`, split where
    /// the view of `source` splits now.
    pub fn at(
        table: &Table,
        snapshot_id: i64,
        w: &Position,
        source: &SourceTable,
        access: &ViewStorage,
    ) -> std::result::Result<Self, String> {
        Ok(ColdSide {
            storage: ColdStorage::of(table.metadata().location(), access)?,
            snapshot_id,
            watermark: w.clone(),
            sequence_number: table.metadata().snapshot_by_id(snapshot_id).map(|s| s.sequence_number()),
            split: split_at(w, source.table.evict_after, source.retention(), crate::util::now_epoch_ns()),
        })
    }

    fn pinned(&self) -> Pinned {
        Pinned {
            snapshot_id: Some(self.snapshot_id),
            watermark: Some(self.watermark.clone()),
            sequence_number: self.sequence_number,
            split: Some(self.split.clone()),
        }
    }
}

/// Where a view of a table whose watermark is `w` splits at `now_ns`: `w`, or with
/// `evict_after` the last instant before the UTC day that began `evict_after` ago, when that
/// is earlier. Rows above it stay in the hot tier (eviction drops only what lies at or below
/// the split the view pins).
pub fn split_at(
    w: &Position,
    evict_after: Option<std::time::Duration>,
    ttl: Option<std::time::Duration>,
    now_ns: i64,
) -> Position {
    const NS_PER_DAY: i64 = 86_400_000_000_000;
    let Some(after) = evict_after else { return w.clone() };
    let mut split = (now_ns - after.as_nanos() as i64).div_euclid(NS_PER_DAY) * NS_PER_DAY - 1;
    // Never below what the source's TTL may already have deleted (an hour's margin): the view
    // reads everything above the split from the hot tier.
    if let Some(ttl) = ttl {
        split = split.max(now_ns - ttl.as_nanos() as i64 + 3_600_000_000_000);
    }
    if split < w.cursor_ns { Position::at(split) } else { w.clone() }
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
        let pinned = cold.map(ColdSide::pinned).unwrap_or(Pinned::NOTHING);
        let comment = serde_json::to_string(&Comment { by: WRITER.into(), pinned }).expect("pinned serialises");
        format!(
            "CREATE OR REPLACE VIEW {} AS {} COMMENT '{}'",
            self.quoted_name(),
            self.select_sql(cold),
            escape_literal(&comment)
        )
    }

    /// The view's query: the hot side alone, or the hot rows above the split `UNION ALL` the
    /// Iceberg rows at or below it.
    pub fn select_sql(&self, cold: Option<&ColdSide>) -> String {
        let columns = self.source.columns.iter().map(|c| quote_ident(&c.name)).collect::<Vec<_>>().join(", ");
        let hot = format!("SELECT {columns} FROM {}", self.source.from());
        let Some(cold) = cold else { return hot };
        let bounds = self.source.bounds();
        let above = bounds.literal_predicate(Some(&cold.split), None);
        // A NULL cursor is never offloaded, so always hot.
        let above =
            if self.source.cursor_is_nullable() { format!("({above}) OR {} IS NULL", bounds.cursor) } else { above };
        let at_or_below = bounds.literal_predicate(None, Some(&cold.split));
        format!("{hot} WHERE {above} UNION ALL SELECT {columns} FROM {} WHERE {at_or_below}", self.cold_select(cold))
    }

    /// The Iceberg side as the view reads it, a subquery: the snapshot, cast back to the
    /// source's types (eviction's proof reads the same rows the view serves).
    pub fn cold_select(&self, cold: &ColdSide) -> String {
        let casts: Vec<String> = self
            .source
            .columns
            .iter()
            .map(|c| format!("CAST({q} AS {t}) AS {q}", q = quote_ident(&c.name), t = c.ch_type))
            .collect();
        format!(
            "(SELECT {} FROM {} SETTINGS iceberg_snapshot_id = {})",
            casts.join(", "),
            cold.storage.table_function(),
            cold.snapshot_id
        )
    }

    /// What the view pins now, as ClickHouse has it; `None` when there is no such view or it
    /// was not written by this service.
    pub async fn pinned(&self, ch: &ClickHouse) -> Result<Option<Pinned>> {
        read_pinned(ch, self.name).await
    }

    /// Writes the view pinned on `cold` (the hot tier alone when `None`), unless ClickHouse
    /// already has that pair or a later one. Refuses to replace anything but a view this
    /// service wrote. Returns whether it was written.
    pub async fn refresh(&self, ch: &ClickHouse, cold: Option<&ColdSide>) -> Result<Refreshed> {
        let want = cold.map(ColdSide::pinned).unwrap_or(Pinned::NOTHING);
        match existing(ch, self.name).await? {
            Existing::Other { engine } => Err(OffloadError::Schema {
                table: self.source.table.source(),
                message: format!(
                    "{} exists and is not a view this service wrote (engine {engine}); it is never replaced: \
                     name another view in tables[].view, or drop it yourself",
                    self.name
                ),
            }),
            Existing::Ours(now) if now == want || now.later_than(&want) => Ok(Refreshed::Kept(now)),
            Existing::Ours(now) => match never_lower(&now, cold) {
                // Rows below the split it pins may be evicted: a lower split would lose them.
                None => Ok(Refreshed::Kept(now)),
                Some(cold) => self.write(ch, cold.as_ref()).await,
            },
            Existing::Absent => self.write(ch, cold).await,
        }
    }

    async fn write(&self, ch: &ClickHouse, cold: Option<&ColdSide>) -> Result<Refreshed> {
        let want = cold.map(ColdSide::pinned).unwrap_or(Pinned::NOTHING);
        let sql = self.create_sql(cold);
        ch.query_text(&sql, &[]).await.map_err(|e| self.explain(e))?;
        Ok(Refreshed::Written(want))
    }
}

/// The pair to write over `now` so that the split never goes down (eviction dropped what lies
/// below the split a view pinned): `cold` with its split raised to `now`'s when that is still
/// at or below `cold`'s `W`; `None` (keep `now`) when it is not (a rollback, a `W` moved back)
/// or when `cold` is nothing.
fn never_lower(now: &Pinned, cold: Option<&ColdSide>) -> Option<Option<ColdSide>> {
    let Some(old) = now.split() else { return Some(cold.cloned()) };
    let cold = cold?;
    if old.cursor_ns <= cold.split.cursor_ns {
        return Some(Some(cold.clone()));
    }
    if old.cursor_ns < cold.watermark.cursor_ns || *old == cold.watermark {
        return Some(Some(ColdSide { split: old.clone(), ..cold.clone() }));
    }
    None
}

impl HybridView<'_> {
    pub fn explain(&self, e: OffloadError) -> OffloadError {
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
                (Some(snapshot_id), Some(w)) => Some(
                    ColdSide::at(table, snapshot_id, w, self.source, &svc.views)
                        .map_err(|message| OffloadError::Schema { table: self.source.table.source(), message })?,
                ),
                _ => None,
            };
            self.refresh(&svc.ch, cold.as_ref()).await
        };
        match written.await {
            Ok(Refreshed::Written(p)) => {
                events::ViewRewritten { table: t, view: &name, snapshot_id, split: p.split(), cause }.emit(&svc.metrics)
            }
            Ok(Refreshed::Kept(p)) => events::ViewCurrent { table: t, split: p.split() }.emit(&svc.metrics),
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
    Ok(match existing(ch, name).await? {
        Existing::Ours(p) => Some(p),
        _ => None,
    })
}

/// What ClickHouse has under `name`.
pub async fn existing(ch: &ClickHouse, name: &ViewName) -> Result<Existing> {
    let rows = ch
        .query_rows(
            "SELECT engine, comment FROM system.tables WHERE database = {db:String} AND name = {name:String}",
            &[("db".into(), name.db.clone()), ("name".into(), name.name.clone())],
        )
        .await?;
    let Some(row) = rows.first() else { return Ok(Existing::Absent) };
    let engine = row.first().cloned().unwrap_or_default();
    let ours = row.get(1).and_then(|c| serde_json::from_str::<Comment>(c).ok()).filter(|c| c.by == WRITER);
    Ok(match ours {
        Some(c) if engine == "View" => Existing::Ours(c.pinned),
        _ => Existing::Other { engine },
    })
}

/// After maintenance (I13): the view of `cfg`'s table moved onto `table`'s current snapshot,
/// and the snapshot it reads now, which expiry must keep (the older one when the move failed).
/// `None` when the table has no view or the view pins no snapshot.
pub async fn repin_after_maintenance(svc: &Services, cfg: &TableConfig, table: &Table) -> Result<Option<i64>> {
    let Some(name) = &cfg.view else { return Ok(None) };
    let source = SourceTable::describe(&svc.ch, cfg).await?;
    let view = HybridView { name, source: &source };
    let read = TableView::of(table.clone())?;
    // I11: a W measured on another source, cursor or tiebreak than the configuration's would
    // split the view on the wrong columns; the offload refuses such a table, and so does this.
    if read.measured_on.difference(&source.measure()).is_none() {
        view.pin(svc, table, read.snapshot_id(), read.watermark.as_ref(), ViewCause::Maintenance).await;
    }
    Ok(view.pinned(&svc.ch).await?.and_then(|p| p.snapshot_id))
}

/// What `validate` checks for a table's view, each a line: `Ok` or the missing piece.
/// `table`: the Iceberg table when it exists.
pub async fn check(
    ch: &ClickHouse,
    source: &SourceTable,
    name: &ViewName,
    table: Option<&Table>,
    warehouse: Option<&str>,
    access: &ViewStorage,
) -> Vec<std::result::Result<String, String>> {
    let mut lines = vec![];
    let scalar = |sql: String, params: Vec<(String, String)>| async move {
        ch.query_text(&sql, &params).await.map(|t| t.trim().to_string()).map_err(|e| e.to_string())
    };
    let has_setting =
        scalar("SELECT count() FROM system.settings WHERE name = 'iceberg_snapshot_id'".into(), vec![]).await;
    lines.push(match has_setting.as_deref() {
        Ok("1") => Ok("ClickHouse reads an Iceberg snapshot by id (iceberg_snapshot_id)".into()),
        Ok(_) => Err("this ClickHouse has no setting iceberg_snapshot_id: the view cannot pin a snapshot (ClickHouse 25.x or later has it)".into()),
        Err(e) => Err(format!("cannot read system.settings: {e}")),
    });
    let db = vec![("db".into(), name.db.clone())];
    lines.push(
        match scalar("SELECT count() FROM system.databases WHERE name = {db:String}".into(), db).await.as_deref() {
            Ok("1") => Ok(format!("database {} exists", name.db)),
            Ok(_) => {
                Err(format!("database {} does not exist: create it (the service does not create databases)", name.db))
            }
            Err(e) => Err(format!("cannot read system.databases: {e}")),
        },
    );
    lines.push(match existing(ch, name).await {
        Ok(Existing::Other { engine }) => Err(format!(
            "{name} exists and is not a view this service wrote (engine {engine}); it is never replaced: name another view"
        )),
        Ok(Existing::Ours(_)) => Ok(format!("{name} is this service's view")),
        Ok(Existing::Absent) => Ok(format!("{name} will be created")),
        Err(e) => Err(format!("cannot read system.tables: {e}")),
    });
    lines.push(grants(ch, name).await);
    let storage = match table {
        Some(t) => ColdStorage::of(t.metadata().location(), access),
        None => {
            warehouse.map(|w| ColdStorage::of(w, access)).unwrap_or_else(|| Err("the table does not exist yet".into()))
        }
    };
    lines.push(match storage {
        Ok(ColdStorage::Local(path)) => reachable(ch, &path).await,
        Ok(ColdStorage::S3 { collection, url }) => collection_exists(ch, &collection, &url).await,
        Err(e) => Err(e),
    });
    let read = table.and_then(|t| TableView::of(t.clone()).ok());
    if let Some(read) = read
        && let (Some(snapshot_id), Some(w)) = (read.snapshot_id(), &read.watermark)
        && let Ok(side) = ColdSide::at(&read.table, snapshot_id, w, source, access)
    {
        let view = HybridView { name, source };
        let count = format!("SELECT count() FROM ({})", view.select_sql(Some(&side)));
        lines.push(match ch.query_text(&count, &[]).await {
            Ok(n) => Ok(format!("the view's query runs ({} rows now)", n.trim())),
            Err(e) => Err(format!("the view's query fails: {}", view.explain(e))),
        });
    }
    lines
}

/// Whether the service's user may create and replace the view: a probe view next to it,
/// created and dropped.
async fn grants(ch: &ClickHouse, name: &ViewName) -> std::result::Result<String, String> {
    // A name nothing else has: the probe must never replace anything.
    let probe_name = format!("{}_offload_probe_{}", name.name, uuid::Uuid::now_v7().simple());
    let probe = format!("{}.{}", quote_ident(&name.db), quote_ident(&probe_name));
    let created = ch.query_text(&format!("CREATE VIEW {probe} AS SELECT 1"), &[]).await;
    let dropped = ch.query_text(&format!("DROP VIEW IF EXISTS {probe}"), &[]).await;
    match (created, dropped) {
        (Ok(_), Ok(_)) => Ok(format!("this user may create, replace and drop views in {}", name.db)),
        (Err(e), _) | (_, Err(e)) => Err(format!(
            "this user may not create and drop views in {} (grant CREATE VIEW and DROP VIEW on {}.*): {e}",
            name.db, name.db
        )),
    }
}

/// Whether ClickHouse may read files under `path` (its `user_files_path`): reading a file that
/// does not exist there fails with "does not exist", elsewhere with "access denied".
async fn reachable(ch: &ClickHouse, path: &str) -> std::result::Result<String, String> {
    let probe = format!("{}/.offload-probe-that-does-not-exist", path.trim_end_matches('/'));
    let sql = format!("SELECT count() FROM file('{}', 'RawBLOB')", escape_literal(&probe));
    match ch.query_text(&sql, &[]).await {
        Ok(_) => Ok(format!("ClickHouse reads files under {path}")),
        Err(OffloadError::ClickHouse { code: 481, .. }) => Err(format!(
            "ClickHouse may not read {path} (PATH_ACCESS_DENIED): icebergLocal reads only under the server's \
             user_files_path; put the warehouse there, or link it there and set the catalog's warehouse to that path"
        )),
        Err(OffloadError::ClickHouse { code: 107 | 636, .. }) => Ok(format!("ClickHouse reads files under {path}")),
        Err(e) => Err(format!("cannot tell whether ClickHouse reads {path}: {e}")),
    }
}

/// Whether the named collection the views read S3 with exists (its credentials are checked by
/// the view's query, once the table exists).
async fn collection_exists(ch: &ClickHouse, collection: &str, url: &str) -> std::result::Result<String, String> {
    let sql = "SELECT count() FROM system.named_collections WHERE name = {c:String}";
    match ch.query_text(sql, &[("c".into(), collection.to_string())]).await.map(|t| t.trim().to_string()) {
        Ok(n) if n == "1" => Ok(format!("ClickHouse reads {url} with the named collection {collection}")),
        Ok(_) => Err(format!(
            "ClickHouse has no named collection {collection} (clickhouse.iceberg_s3_collection): create it with the \
             warehouse's credentials"
        )),
        Err(e) => Err(format!("cannot read system.named_collections (grant SHOW NAMED COLLECTIONS): {e}")),
    }
}

/// Text inside a single-quoted SQL literal.
fn escape_literal(text: &str) -> String {
    escaped_to_literal(&text.replace('\\', "\\\\"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_are_read_with_iceberg_local_or_iceberg_s3() {
        let none = ViewStorage::default();
        assert_eq!(ColdStorage::of("file:///wh/cold/t/", &none).unwrap(), ColdStorage::Local("/wh/cold/t".into()));
        assert_eq!(ColdStorage::of("file:/wh/cold/t", &none).unwrap(), ColdStorage::Local("/wh/cold/t".into()));
        assert_eq!(ColdStorage::of("/wh/cold/t", &none).unwrap(), ColdStorage::Local("/wh/cold/t".into()));
        let err = ColdStorage::of("s3://bucket/wh/t", &none).unwrap_err();
        assert!(err.contains("s3://bucket/wh/t") && err.contains("iceberg_s3_collection"), "{err}");
        let aws = ViewStorage { s3_collection: Some("lake".into()), s3_endpoint: None };
        let s3 = ColdStorage::of("s3://bucket/wh/t/", &aws).unwrap();
        assert_eq!(s3.table_function(), "icebergS3(`lake`, url = 'https://bucket.s3.amazonaws.com/wh/t/')");
        let minio = ViewStorage { s3_endpoint: Some("http://127.0.0.1:9000/".into()), ..aws };
        assert_eq!(
            ColdStorage::of("s3a://bucket/wh/t", &minio).unwrap().table_function(),
            "icebergS3(`lake`, url = 'http://127.0.0.1:9000/bucket/wh/t/')"
        );
        assert!(ColdStorage::of("gs://bucket/t", &minio).is_err());
    }

    #[test]
    fn the_split_is_w_or_the_start_of_the_day_evict_after_ago() {
        let at = |t: &str| chrono::DateTime::parse_from_rfc3339(t).unwrap().timestamp_nanos_opt().unwrap();
        let w = Position { cursor_ns: at("2026-12-06T04:35:00Z"), tiebreak: Some("42".into()) };
        let now = at("2026-12-06T04:40:00Z");
        let days = |n: u64| Some(std::time::Duration::from_secs(n * 86_400));
        assert_eq!(split_at(&w, None, days(7), now), w);
        // 2 days before 04:40 on the 6th is the 4th: rows before the 4th may go, the rest stay hot.
        assert_eq!(split_at(&w, days(2), days(7), now), Position::at(at("2026-12-04T00:00:00Z") - 1));
        // A W further back than that: the split is W (the hot tier holds everything above it).
        let behind = Position { cursor_ns: at("2026-12-02T10:00:00Z"), tiebreak: Some("7".into()) };
        assert_eq!(split_at(&behind, days(2), days(7), now), behind);
        // A TTL of 2 days may already have deleted rows of the 4th before 04:40: the split stays
        // an hour above what it may have deleted.
        assert_eq!(split_at(&w, days(2), days(2), now), Position::at(at("2026-12-04T05:40:00Z")));
    }

    #[test]
    fn the_split_a_view_pins_never_goes_down() {
        let at = |ns: i64| Position::at(ns);
        let side = |w: i64, split: i64| ColdSide {
            storage: ColdStorage::Local("/wh/t".into()),
            snapshot_id: 2,
            watermark: Position { cursor_ns: w, tiebreak: Some("9".into()) },
            sequence_number: Some(2),
            split: at(split),
        };
        let pinned = |split: i64| Pinned {
            snapshot_id: Some(1),
            watermark: Some(at(500)),
            sequence_number: Some(1),
            split: Some(at(split)),
        };
        // Forward: as asked.
        assert_eq!(never_lower(&pinned(100), Some(&side(600, 200))).unwrap().unwrap().split, at(200));
        // A lower split asked (evict_after raised, a clock behind): raised to the pinned one.
        assert_eq!(never_lower(&pinned(300), Some(&side(600, 200))).unwrap().unwrap().split, at(300));
        // W below the pinned split (a rollback): the view stays where it is.
        assert!(never_lower(&pinned(300), Some(&side(250, 250))).is_none());
        // Nothing offloaded any more: the view stays too.
        assert!(never_lower(&pinned(300), None).is_none());
    }

    #[test]
    fn literals_keep_quotes_and_backslashes() {
        assert_eq!(escape_literal(r"it's C:\x"), r"it\'s C:\\x");
    }
}
