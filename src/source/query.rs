//! The SQL of one source table. Identifiers come from the validated configuration and
//! `system.columns` and are quoted; every value (window bounds, names) is a query parameter.

use crate::config::{ReadFinal, TableConfig, Uint64As};
use crate::error::{OffloadError, Result};
use crate::source::ClickHouse;
use crate::source::types::ChType;
use crate::util::quote_ident;
use crate::window::{Bounds, CursorUnit, Position, escape_bytes, unhex};
use iceberg::spec::Type;

/// A source column as ClickHouse describes it.
#[derive(Debug, Clone)]
pub struct SourceColumn {
    pub name: String,
    pub ch_type: String,
    pub parsed: ChType,
}

/// What one configured table reads, resolved against `system.columns`.
#[derive(Debug, Clone)]
pub struct SourceTable {
    pub table: TableConfig,
    pub columns: Vec<SourceColumn>,
    /// ClickHouse type name of the tiebreak column, for its query parameter.
    pub tiebreak_type: Option<String>,
    /// ClickHouse type name of the cursor column (wrappers removed).
    pub cursor_type: String,
    /// The TTL expression of the table, if it has one (for operators: data leaves the hot tier).
    pub ttl: Option<String>,
    /// The table engine (`system.tables.engine`).
    pub engine: String,
    /// I12: whether rows are read as ClickHouse answers after merging (`FINAL`).
    pub read_final: bool,
}

/// The select list with its Iceberg types: (column name, SELECT expression, Iceberg type, nullable).
pub type Projection = Vec<(String, String, Type, bool)>;

/// The table's columns in `system.columns`, in order; an error naming the table if it has none
/// (it does not exist).
async fn system_columns(ch: &ClickHouse, table: &TableConfig) -> Result<Vec<SourceColumn>> {
    let rows = ch
        .query_rows(
            "SELECT name, type FROM system.columns WHERE database = {db:String} AND table = {tbl:String} ORDER BY position",
            &[("db".into(), table.source_db.clone()), ("tbl".into(), table.source_table.clone())],
        )
        .await?;
    if rows.is_empty() {
        return Err(OffloadError::Schema {
            table: table.source(),
            message: format!(
                "source table {} does not exist in ClickHouse (no columns in system.columns); check tables[].source",
                table.source()
            ),
        });
    }
    Ok(rows
        .into_iter()
        .filter(|r| r.len() >= 2)
        .map(|r| SourceColumn { parsed: ChType::parse(&r[1]), name: r[0].clone(), ch_type: r[1].clone() })
        .collect())
}

/// The table's engine and TTL expression (if any) from `system.tables`.
async fn engine_and_ttl(ch: &ClickHouse, table: &TableConfig) -> Result<(String, Option<String>)> {
    let meta = ch
        .query_rows(
            "SELECT engine, extract(create_table_query, 'TTL (.*?)(?:SETTINGS|$)') FROM system.tables WHERE database = {db:String} AND name = {tbl:String}",
            &[("db".into(), table.source_db.clone()), ("tbl".into(), table.source_table.clone())],
        )
        .await?
        .into_iter()
        .next()
        .unwrap_or_default();
    let engine = meta.first().cloned().unwrap_or_default();
    let ttl = meta.get(1).map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    Ok((engine, ttl))
}

impl SourceTable {
    /// Reads the table's columns and checks that the configuration fits them.
    pub async fn describe(ch: &ClickHouse, table: &TableConfig) -> Result<Self> {
        let all = system_columns(ch, table).await?;
        let schema_err = |message: String| OffloadError::Schema { table: table.source(), message };
        let find = |name: &str, field: &str| {
            all.iter().find(|c| c.name == name).ok_or_else(|| {
                schema_err(format!(
                    "{field} column {name:?} does not exist in {}; its columns are: {}",
                    table.source(),
                    all.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", ")
                ))
            })
        };
        let columns = match &table.columns {
            None => all.clone(),
            Some(list) => list.iter().map(|n| find(n, "columns").cloned()).collect::<Result<Vec<_>>>()?,
        };
        let cursor = find(&table.cursor, "cursor")?;
        if !cursor.parsed.is_time() || CursorUnit::of_type(&strip_wrappers(&cursor.ch_type)).is_none() {
            return Err(schema_err(format!(
                "cursor column {:?} has type {}; the cursor must be a Date, DateTime or DateTime64 column \
                 (the settle delay is measured on it)",
                cursor.name, cursor.ch_type
            )));
        }
        let tiebreak_type = match &table.tiebreak {
            None => None,
            Some(tb) => {
                let col = find(tb, "tiebreak")?;
                if !col.parsed.is_tiebreak() || col.parsed.unwrap().1 {
                    return Err(schema_err(format!(
                        "tiebreak column {:?} has type {}; it must be a non-Nullable integer, decimal, String, FixedString or UUID",
                        col.name, col.ch_type
                    )));
                }
                Some(strip_wrappers(&col.ch_type))
            }
        };
        for f in &table.partition {
            if !columns.iter().any(|c| c.name == f.column) {
                return Err(schema_err(format!(
                    "partition field {}({}) names a column that is not offloaded",
                    f.transform, f.column
                )));
            }
        }
        let (engine, ttl) = engine_and_ttl(ch, table).await?;
        let read_final = match table.read_final {
            ReadFinal::Auto => merges_rows(&engine),
            ReadFinal::Always => true,
            ReadFinal::Never => false,
        };
        let cursor_type = strip_wrappers(&cursor.ch_type);
        Ok(SourceTable { table: table.clone(), columns, tiebreak_type, cursor_type, ttl, engine, read_final })
    }

    /// The SELECT list and Iceberg type of every offloaded column.
    pub fn projection(&self) -> Result<Projection> {
        let mut ids = 10_000;
        self.columns
            .iter()
            .map(|c| {
                let (expr, ty) =
                    c.parsed.mapping(&quote_ident(&c.name), 0, &mut ids, self.table.uint64).map_err(|e| {
                        OffloadError::Schema {
                            table: self.table.source(),
                            message: format!(
                                "column {:?}: {e} (ClickHouse type {}); leave it out with tables[].columns",
                                c.name, c.ch_type
                            ),
                        }
                    })?;
                Ok((c.name.clone(), expr, ty, c.parsed.unwrap().1))
            })
            .collect()
    }

    /// Turns ClickHouse's refusal of an `accurateCast` into an error that names the table,
    /// the columns it may concern and what to do (`uint64 = "long"`: a value above 2^63-1).
    pub fn explain_read_error(&self, e: OffloadError) -> OffloadError {
        // TOO_MANY_ROWS / TOO_MANY_ROWS_OR_BYTES: a limit of the user's profile, reached because
        // every query insists on an error instead of a truncated result (COMPLETE_RESULTS).
        if let OffloadError::ClickHouse { code: code @ (158 | 396), message } = &e {
            return OffloadError::ClickHouse {
                code: *code,
                message: format!(
                    "{message} — table {}: the server limits the rows a query may return or read; nothing of \
                     this window was committed. Set tables[].max_rows_per_commit below that limit, or lift it \
                     for this user",
                    self.table.source()
                ),
            };
        }
        let OffloadError::ClickHouse { code: 70, message } = &e else { return e };
        if self.table.uint64 != Uint64As::Long || !message.contains("cannot be safely converted into type") {
            return e;
        }
        let columns: Vec<&str> =
            self.columns.iter().filter(|c| c.ch_type.contains("UInt64")).map(|c| c.name.as_str()).collect();
        OffloadError::Schema {
            table: self.table.source(),
            message: format!(
                "a UInt64 value above 9223372036854775807 does not fit Iceberg long (uint64 = \"long\"; \
                 UInt64 columns: {columns:?}); nothing of this window was committed. Keep such columns \
                 out with tables[].columns, or offload into a new table with uint64 = \"decimal\" \
                 (ClickHouse said: {message})"
            ),
        }
    }

    /// The table as every query reads it: after merging (`FINAL`) for the merging engines, so
    /// rows of one key still spread over unmerged parts count once (I12).
    pub fn from(&self) -> String {
        let name = format!("{}.{}", quote_ident(&self.table.source_db), quote_ident(&self.table.source_table));
        if self.read_final { format!("{name} FINAL") } else { name }
    }

    /// How long after its cursor value a row is taken: the settle delay, plus the time its key
    /// may still change (`closed_after`, I12).
    pub fn settle_ns(&self) -> i64 {
        (self.table.settle_delay + self.table.closed_after).as_nanos() as i64
    }

    fn cursor_ns(&self) -> String {
        ns_since_epoch(&quote_ident(&self.table.cursor))
    }

    /// What positions of this table are measured on (I11).
    pub fn measure(&self) -> crate::window::Measure {
        crate::window::Measure {
            source: self.table.source(),
            cursor: self.table.cursor.clone(),
            cursor_type: self.cursor_type.clone(),
            tiebreak: self.table.tiebreak.clone(),
            tiebreak_type: self.tiebreak_type.clone(),
        }
    }

    /// The last day whose rows are settled, as midnight UTC of that date (how a `Date` bound is
    /// kept): the day before the one ClickHouse, in its own time zone, is in at `now − settle`.
    pub async fn last_settled_day(&self, ch: &ClickHouse, settle_ns: i64) -> Result<i64> {
        let sql = "SELECT toUnixTimestamp64Nano(toDateTime64(toDate(now64(9) - toIntervalNanosecond({settle:Int64})) - 1, 9, 'UTC'))";
        let text = ch.query_text(sql, &[("settle".into(), settle_ns.to_string())]).await?;
        text.trim().parse().map_err(|_| OffloadError::ClickHouseStream(format!("unexpected date {text:?}")))
    }

    /// What one cursor value stands for (I1: settled only when the whole unit has passed).
    pub fn unit(&self) -> CursorUnit {
        CursorUnit::of_type(&self.cursor_type).expect("checked by describe")
    }

    /// How windows of this table are bounded in SQL.
    pub fn bounds(&self) -> Bounds {
        Bounds {
            cursor: quote_ident(&self.table.cursor),
            unit: self.unit(),
            tiebreak: self
                .table
                .tiebreak
                .as_deref()
                .map(|tb| (quote_ident(tb), self.tiebreak_type.clone().unwrap_or_else(|| "String".into()))),
        }
    }

    /// `position > lo AND position <= hi` on (cursor, tiebreak), with its parameters.
    pub fn window_predicate(&self, lo: Option<&Position>, hi: &Position) -> (String, Vec<(String, String)>) {
        self.bounds().predicate(lo, Some(hi))
    }

    /// The tiebreak of a row as a bound (escaped text, see [`Position`]): strings are read as
    /// hex, so every byte comes back exactly.
    fn tiebreak_as_text(&self, tb: &str) -> String {
        let bytes_like = self.tiebreak_type.as_deref().is_some_and(|t| t == "String" || t.starts_with("FixedString("));
        if bytes_like { format!("hex({})", quote_ident(tb)) } else { format!("toString({})", quote_ident(tb)) }
    }

    /// Rows in the window and the position of its last row (`None` when empty).
    pub async fn count(&self, ch: &ClickHouse, lo: Option<&Position>, hi: &Position) -> Result<u64> {
        let (pred, params) = self.window_predicate(lo, hi);
        let sql = format!("SELECT count() FROM {} WHERE {pred}", self.from());
        let text = ch.query_text(&sql, &params).await?;
        text.trim().parse().map_err(|_| OffloadError::ClickHouseStream(format!("unexpected count {text:?}")))
    }

    /// Rows in the window, and the smallest cursor among them (ns since the epoch; `None`
    /// when the window is empty), in one scan.
    pub async fn count_and_first(
        &self,
        ch: &ClickHouse,
        lo: Option<&Position>,
        hi: &Position,
    ) -> Result<(u64, Option<i64>)> {
        let (pred, params) = self.window_predicate(lo, hi);
        // The minimum of the raw column, converted once: converting every row first cost
        // 0.16 s of engine time per 10M rows.
        let first = ns_since_epoch(&format!("min({})", quote_ident(&self.table.cursor)));
        let sql = format!("SELECT count(), {first} FROM {} WHERE {pred}", self.from());
        let rows = ch.query_rows(&sql, &params).await?;
        let unexpected = || OffloadError::ClickHouseStream(format!("unexpected count/min {rows:?}"));
        let row = rows.first().filter(|r| r.len() == 2).ok_or_else(unexpected)?;
        let count: u64 = row[0].parse().map_err(|_| unexpected())?;
        // An empty window's minimum is a default or NULL: not read.
        let first = if count > 0 { Some(row[1].parse::<i64>().map_err(|_| unexpected())?) } else { None };
        Ok((count, first))
    }

    /// The position of the `n`-th row (1-based) after `lo`, in (cursor, tiebreak) order:
    /// where a window bounded to `n` rows ends.
    pub async fn nth_position(
        &self,
        ch: &ClickHouse,
        lo: Option<&Position>,
        hi: &Position,
        n: u64,
    ) -> Result<Position> {
        let (pred, mut params) = self.window_predicate(lo, hi);
        let (tb_expr, order) = match &self.table.tiebreak {
            Some(tb) => {
                (self.tiebreak_as_text(tb), format!("{}, {}", quote_ident(&self.table.cursor), quote_ident(tb)))
            }
            None => ("''".to_string(), quote_ident(&self.table.cursor)),
        };
        params.push(("offset".into(), (n - 1).to_string()));
        let sql = format!(
            "SELECT {}, {tb_expr} FROM {} WHERE {pred} ORDER BY {order} LIMIT 1 OFFSET {{offset:UInt64}}",
            self.cursor_ns(),
            self.from()
        );
        let rows = ch.query_rows(&sql, &params).await?;
        let row = rows.into_iter().next().ok_or_else(|| {
            OffloadError::ClickHouseStream(format!("{}: the window shrank while it was planned", self.table.source()))
        })?;
        let cursor_ns = row[0]
            .parse()
            .map_err(|_| OffloadError::ClickHouseStream(format!("unexpected cursor value {:?}", row[0])))?;
        let text = row.get(1).cloned().unwrap_or_default();
        let tiebreak = match &self.table.tiebreak {
            None => None,
            Some(tb) if self.tiebreak_as_text(tb).starts_with("hex(") => {
                Some(escape_bytes(&unhex(&text).ok_or_else(|| {
                    OffloadError::ClickHouseStream(format!("unexpected hex tiebreak value {text:?}"))
                })?))
            }
            // Numbers, decimals and UUIDs print as plain ASCII, which is their escaped form.
            Some(_) => Some(text),
        };
        Ok(Position { cursor_ns, tiebreak })
    }

    /// Whether the cursor column is Nullable (its NULL rows are never eligible).
    pub fn cursor_is_nullable(&self) -> bool {
        self.columns.iter().any(|c| c.name == self.table.cursor && c.parsed.unwrap().1)
    }

    /// Rows with a NULL cursor: never eligible, reported so they are not silently lost.
    pub async fn null_cursor_rows(&self, ch: &ClickHouse) -> Result<u64> {
        let sql = format!("SELECT count() FROM {} WHERE {} IS NULL", self.from(), quote_ident(&self.table.cursor));
        Ok(ch.query_text(&sql, &[]).await?.trim().parse().unwrap_or(0))
    }

    /// Rows after `lo` (all of them, settled or not): how far behind the table is.
    pub async fn rows_after(&self, ch: &ClickHouse, lo: Option<&Position>) -> Result<u64> {
        let (pred, params) = self.bounds().predicate(lo, None);
        let sql = format!("SELECT count() FROM {} WHERE {pred}", self.from());
        let text = ch.query_text(&sql, &params).await?;
        text.trim().parse().map_err(|_| OffloadError::ClickHouseStream(format!("unexpected count {text:?}")))
    }

    /// Seconds until the source TTL may delete the oldest row after `lo`; `+Inf` when no row
    /// waits; `None` when the table has no TTL (or one we cannot evaluate).
    pub async fn ttl_headroom_seconds(&self, ch: &ClickHouse, lo: Option<&Position>) -> Result<Option<f64>> {
        let Some(expr) = self.ttl.as_deref().and_then(ttl_expression) else { return Ok(None) };
        let (pred, params) = self.bounds().predicate(lo, None);
        // The expression comes from the server's own table definition (system.tables).
        let sql = format!(
            "SELECT count(), toUnixTimestamp(min({expr})) - toUnixTimestamp(now()) FROM {} WHERE {pred}",
            self.from()
        );
        let rows = ch.query_rows(&sql, &params).await?;
        let Some(row) = rows.first() else { return Ok(None) };
        if row.first().map(String::as_str) == Some("0") {
            return Ok(Some(f64::INFINITY));
        }
        Ok(row.get(1).and_then(|v| v.parse::<f64>().ok()))
    }

    /// Rows at or below `w` per UTC day of the cursor, for the days `first..=last` (`first`
    /// `None`: from the beginning), leaving out the ranges an operator moved `W` over
    /// (`skipped`: `(lo, hi]`, see `watermark set`): the source side of the audit (I9).
    pub async fn rows_per_day(
        &self,
        ch: &ClickHouse,
        w: &Position,
        first: Option<chrono::NaiveDate>,
        last: chrono::NaiveDate,
        skipped: &[(Option<Position>, Position)],
    ) -> Result<std::collections::BTreeMap<chrono::NaiveDate, u64>> {
        let (pred, mut params) = self.window_predicate(None, w);
        let cursor = quote_ident(&self.table.cursor);
        let day = format!("toDate32(toDateTime64({cursor}, 9, 'UTC'))");
        let mut terms = vec![pred, format!("{day} <= {{last_day:Date32}}")];
        params.push(("last_day".into(), last.to_string()));
        if let Some(first) = first {
            // The raw column bounded too, so that ClickHouse skips older parts by its index.
            let start_ns =
                first.and_hms_opt(0, 0, 0).and_then(|t| t.and_utc().timestamp_nanos_opt()).unwrap_or(i64::MIN);
            terms.push(format!("{cursor} >= fromUnixTimestamp64Nano({{first_ns:Int64}}, 'UTC')"));
            terms.push(format!("{day} >= {{first_day:Date32}}"));
            params.push(("first_ns".into(), start_ns.to_string()));
            params.push(("first_day".into(), first.to_string()));
        }
        for (i, (lo, hi)) in skipped.iter().enumerate() {
            let (mut p, ps) = self.bounds().predicate(lo.as_ref(), Some(hi));
            for (name, value) in ps {
                p = p.replace(&format!("{{{name}:"), &format!("{{skip{i}_{name}:"));
                params.push((format!("skip{i}_{name}"), value));
            }
            terms.push(format!("NOT ({p})"));
        }
        // An alias no source column can be (prefer_column_name_to_alias = 1 is always on).
        let sql = format!(
            "SELECT toString({day}) AS offload_audit_day_, count() FROM {} WHERE {} \
             GROUP BY offload_audit_day_ ORDER BY offload_audit_day_",
            self.from(),
            terms.join(" AND ")
        );
        let unexpected = |r: &Vec<String>| OffloadError::ClickHouseStream(format!("unexpected day count {r:?}"));
        ch.query_rows(&sql, &params)
            .await?
            .iter()
            .map(|r| match (r.first().and_then(|d| d.parse().ok()), r.get(1).and_then(|n| n.parse().ok())) {
                (Some(d), Some(n)) => Ok((d, n)),
                _ => Err(unexpected(r)),
            })
            .collect()
    }

    /// The cursor of the source's oldest row, ns (`None` when the table has no row with one).
    pub async fn oldest_ns(&self, ch: &ClickHouse) -> Result<Option<i64>> {
        let cursor = quote_ident(&self.table.cursor);
        let sql = format!(
            "SELECT count(), toUnixTimestamp64Nano(toDateTime64(min({cursor}), 9, 'UTC')) FROM {} WHERE {cursor} IS NOT NULL",
            self.from()
        );
        let rows = ch.query_rows(&sql, &[]).await?;
        match rows.first().map(|r| (r.first().map(String::as_str), r.get(1))) {
            Some((Some("0"), _)) => Ok(None),
            Some((_, Some(ns))) => {
                ns.parse().map(Some).map_err(|_| OffloadError::ClickHouseStream(format!("unexpected {ns:?}")))
            }
            _ => Err(OffloadError::ClickHouseStream(format!("unexpected answer {rows:?}"))),
        }
    }

    /// The UTC day of the source's oldest row (`None` when the table is empty).
    pub async fn first_day(&self, ch: &ClickHouse) -> Result<Option<chrono::NaiveDate>> {
        Ok(self.oldest_ns(ch).await?.map(|ns| chrono::DateTime::from_timestamp_nanos(ns).date_naive()))
    }

    /// Whether the source may delete rows in a way the audit cannot see coming: a TTL whose
    /// interval is not a constant, or an engine whose TTL lives elsewhere (`Distributed`,
    /// `Merge`, a view over local tables).
    pub fn deletes_unseen(&self) -> bool {
        (self.ttl.is_some() && self.retention().is_none()) || !self.engine.contains("MergeTree")
    }

    /// How long the source keeps a row, from its TTL (`expr + toIntervalDay(7)`): rows older
    /// than that may be gone, so the audit stays out of those days. `None` without a TTL, or
    /// with one whose interval is not a constant.
    pub fn retention(&self) -> Option<std::time::Duration> {
        self.ttl.as_deref().and_then(ttl_expression).and_then(|e| ttl_interval(&e))
    }

    /// The SELECT that reads one window; `order` (from [`Self::partition_order`]) sorts it by
    /// partition.
    pub fn select(
        &self,
        projection: &Projection,
        lo: Option<&Position>,
        hi: &Position,
        order: Option<&str>,
    ) -> (String, Vec<(String, String)>) {
        let list = projection
            .iter()
            .map(|(name, expr, _, _)| format!("{expr} AS {}", quote_ident(name)))
            .collect::<Vec<_>>()
            .join(", ");
        let (pred, params) = self.window_predicate(lo, hi);
        let order = order.map(|o| format!(" ORDER BY {o}")).unwrap_or_default();
        (format!("SELECT {list} FROM {} WHERE {pred}{order}", self.from()), params)
    }

    /// The SELECT of every row at or below `w` whose cursor lies in `range` (ns, inclusive):
    /// what `repair` counts against the table.
    pub fn select_range(
        &self,
        projection: &Projection,
        w: &Position,
        range: (i64, i64),
    ) -> (String, Vec<(String, String)>) {
        let list = projection
            .iter()
            .map(|(name, expr, _, _)| format!("{expr} AS {}", quote_ident(name)))
            .collect::<Vec<_>>()
            .join(", ");
        let (pred, mut params) = self.window_predicate(None, w);
        let cursor = quote_ident(&self.table.cursor);
        params.push(("range_lo".into(), range.0.to_string()));
        params.push(("range_hi".into(), range.1.to_string()));
        let sql = format!(
            "SELECT {list} FROM {} WHERE ({pred}) AND {cursor} >= fromUnixTimestamp64Nano({{range_lo:Int64}}, 'UTC') \
             AND {cursor} <= fromUnixTimestamp64Nano({{range_hi:Int64}}, 'UTC')",
            self.from()
        );
        (sql, params)
    }

    /// The partition values of a row as ClickHouse computes them, for `ORDER BY`: rows of one
    /// partition then come together, so the writer keeps one Parquet writer open at a time.
    /// Computed on the value as offloaded (the projection's expression), with Iceberg's
    /// transforms (`icebergBucket`, `icebergTruncate`, UTC time units). `None` when windows
    /// need no sorting (unpartitioned, or only time transforms of the cursor).
    pub fn partition_order(&self, projection: &Projection) -> Option<String> {
        if !self.table.writes_clustered() {
            return None;
        }
        let keys: Vec<String> = self
            .table
            .partition
            .iter()
            .map(|f| {
                let e = projection
                    .iter()
                    .find(|(name, ..)| *name == f.column)
                    .map(|(_, expr, ..)| expr.clone())
                    .unwrap_or_else(|| quote_ident(&f.column));
                let utc = format!("toDateTime64({e}, 6, 'UTC')");
                let arg =
                    |t: &str| t.split_once('[').map(|(_, n)| n.trim_end_matches(']').to_string()).unwrap_or_default();
                match f.transform.as_str() {
                    "year" => format!("toYear({utc})"),
                    "month" => format!("toStartOfMonth({utc})"),
                    "day" => format!("toDate({utc})"),
                    "hour" => format!("toStartOfHour({utc})"),
                    t if t.starts_with("bucket[") => format!("icebergBucket({}, {e})", arg(t)),
                    t if t.starts_with("truncate[") => format!("icebergTruncate({}, {e})", arg(t)),
                    _ => e,
                }
            })
            .collect();
        Some(keys.join(", "))
    }

    /// Whether ClickHouse accepts `order` for this table (e.g. `icebergBucket` of every type):
    /// asked once per run with `LIMIT 0`, so a function the server lacks costs files, not a window.
    pub async fn accepts_order(&self, ch: &ClickHouse, order: &str) -> Result<()> {
        let sql = format!("SELECT {order} FROM {} LIMIT 0", self.from());
        ch.query_text(&sql, &[]).await.map(|_| ())
    }
}

/// Engines whose rows of one key merge into one over time (I12): Summing, Aggregating,
/// Replacing, Collapsing, VersionedCollapsing, Graphite MergeTree, replicated or shared or not.
pub fn merges_rows(engine: &str) -> bool {
    ["SummingMergeTree", "AggregatingMergeTree", "ReplacingMergeTree", "CollapsingMergeTree", "GraphiteMergeTree"]
        .iter()
        .any(|e| engine.ends_with(e))
}

/// The delete expression of a table's TTL clause (`TTL expr [DELETE], …`), if simple.
fn ttl_expression(ttl: &str) -> Option<String> {
    let first = ttl.split(" SETTINGS ").next()?.split(',').next()?.trim();
    let expr = first.strip_suffix(" DELETE").unwrap_or(first).trim();
    let upper = expr.to_ascii_uppercase();
    if expr.is_empty()
        || [" TO DISK", " TO VOLUME", " WHERE ", " GROUP BY ", " RECOMPRESS"].iter().any(|k| upper.contains(k))
    {
        return None;
    }
    Some(expr.to_string())
}

/// The interval of a TTL expression `… + toInterval<Unit>(N)` (months and years at their
/// longest, so the audit never counts a day the TTL may have started on).
fn ttl_interval(expr: &str) -> Option<std::time::Duration> {
    let at = expr.rfind("toInterval")?;
    let rest = &expr[at + "toInterval".len()..];
    let (unit, rest) = rest.split_once('(')?;
    let n: u64 = rest.split_once(')')?.0.trim().parse().ok()?;
    let seconds = match unit {
        "Second" => 1,
        "Minute" => 60,
        "Hour" => 3_600,
        "Day" => 86_400,
        "Week" => 7 * 86_400,
        "Month" => 31 * 86_400,
        "Quarter" => 92 * 86_400,
        "Year" => 366 * 86_400,
        _ => return None,
    };
    Some(std::time::Duration::from_secs(n.checked_mul(seconds)?))
}

fn strip_wrappers(t: &str) -> String {
    let mut s = t.trim();
    for w in ["LowCardinality(", "Nullable("] {
        if let Some(inner) = s.strip_prefix(w) {
            s = inner.strip_suffix(')').unwrap_or(inner);
        }
    }
    s.to_string()
}

/// Nanoseconds since the epoch of a Date/DateTime/DateTime64 expression, in ClickHouse SQL.
fn ns_since_epoch(expr: &str) -> String {
    format!("toUnixTimestamp64Nano(toDateTime64({expr}, 9, 'UTC'))")
}

#[cfg(test)]
mod tests {
    #[test]
    fn merging_engines_are_recognised() {
        for e in [
            "SummingMergeTree",
            "ReplicatedReplacingMergeTree",
            "VersionedCollapsingMergeTree",
            "SharedAggregatingMergeTree",
        ] {
            assert!(super::merges_rows(e), "{e}");
        }
        for e in ["MergeTree", "ReplicatedMergeTree", "Distributed", "Log"] {
            assert!(!super::merges_rows(e), "{e}");
        }
    }

    #[test]
    fn ttl_expressions() {
        assert_eq!(
            super::ttl_expression("toDateTime(exchange_timestamp) + toIntervalDay(7) ").as_deref(),
            Some("toDateTime(exchange_timestamp) + toIntervalDay(7)")
        );
        assert_eq!(super::ttl_expression("ts + toIntervalDay(1) TO VOLUME 'cold'"), None);
        assert_eq!(super::ttl_expression("ts + toIntervalDay(7) DELETE").as_deref(), Some("ts + toIntervalDay(7)"));
        let days = |n: u64| Some(std::time::Duration::from_secs(n * 86_400));
        assert_eq!(super::ttl_interval("toDateTime(exchange_timestamp) + toIntervalDay(7)"), days(7));
        assert_eq!(super::ttl_interval("ts + toIntervalMonth(1)"), days(31));
        assert_eq!(super::ttl_interval("ts + toIntervalHour(36)"), Some(std::time::Duration::from_secs(36 * 3_600)));
        assert_eq!(super::ttl_interval("ts + toIntervalDay(n)"), None);
        assert_eq!(super::ttl_interval("ts"), None);
    }
}
