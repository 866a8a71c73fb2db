//! Taking over a table the original pipeline wrote (`iceberg-offload adopt`): a Spark table in
//! a Hadoop catalog (a directory with `vN.metadata.json` and `version-hint.text`) is
//! registered in our catalog, and the original's watermark becomes our first `W`.
//!
//! The steps, each safe to repeat:
//! 1. find the Hadoop table's current metadata file (the newest `vN` at or above the hint);
//! 2. check it against the source: format v2, every source column present by name with the
//!    type the source maps to, the configured partition spec (`sink::table::check_compatible`);
//! 3. read the original's watermark (`offload_watermarks.last_offload_timestamp`, PostgreSQL),
//!    refusing a row left `running` or `failed` unless forced;
//! 4. write a copy of that metadata under a name iceberg-rust can continue from
//!    (`{N+1:05}-{uuid}.metadata.json`, with our properties added) and register it;
//! 5. commit `W` = the original's watermark as an empty snapshot marked `offload.adopted-from`
//!    (I2/I3: from then on `W` is read from the history like any other). The original's
//!    semantics were `cursor > last_offload_timestamp`: a position without a tiebreak is
//!    exactly that (every row at that cursor value is done).
//!
//! The original's files are never modified by `adopt`, and its `vN.metadata.json` files are
//! never deleted (`commit::files`); what maintenance later does to its data files limits the
//! rollback (docs/migration.md).

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use iceberg::io::FileIO;
use iceberg::spec::{FormatVersion, TableMetadata, TableMetadataBuilder};
use iceberg::table::{StaticTable, Table};
use iceberg::{Catalog, MetadataLocation, NamespaceIdent, TableIdent};

use crate::commit::{DELETE_AFTER_COMMIT, Position, SUMMARY_ADOPTED_FROM};
use crate::config::TableConfig;

/// The original table's current state in its Hadoop catalog.
pub struct HadoopTable {
    /// The current `vN.metadata.json` (or the file given).
    pub metadata_location: String,
    /// `N`.
    pub version: u64,
    pub metadata: TableMetadata,
}

/// A local path as a `file://` URL; URLs unchanged.
pub fn as_url(path: &str) -> String {
    if path.starts_with('/') { format!("file://{path}") } else { path.to_string() }
}

/// Finds the Hadoop table's current metadata: `from` is the table's directory (holding
/// `metadata/version-hint.text`) or one `*.metadata.json` file.
pub async fn locate(io: &FileIO, from: &str) -> anyhow::Result<HadoopTable> {
    let from = as_url(from.trim_end_matches('/'));
    let (metadata_location, version) = if from.ends_with(".metadata.json") {
        let name = from.rsplit('/').next().unwrap_or(&from);
        let version = crate::commit::files::version_of(name)
            .with_context(|| format!("{from}: cannot tell the version from the file name (vN.metadata.json)"))?;
        if let Some(next) = next_hadoop_version(&from)
            && io.exists(&next).await?
        {
            anyhow::bail!(
                "{from} is not the table's newest version: {next} exists; give the table's directory instead"
            );
        }
        (from.clone(), version)
    } else {
        let dir = format!("{from}/metadata");
        let hint_path = format!("{dir}/version-hint.text");
        let hint = io.new_input(&hint_path)?.read().await.with_context(|| {
            format!("{hint_path}: cannot read it; give the table's directory in the original's Hadoop warehouse (…/cold/<table>) or one of its vN.metadata.json files")
        })?;
        let text = String::from_utf8_lossy(&hint).trim().to_string();
        let mut version: u64 =
            text.parse().with_context(|| format!("{hint_path}: {text:?} is not a version number"))?;
        // Hadoop's catalog writes vN+1 before it moves the hint: the newest file is current.
        while io.exists(format!("{dir}/v{}.metadata.json", version + 1)).await? {
            version += 1;
        }
        (format!("{dir}/v{version}.metadata.json"), version)
    };
    let metadata = TableMetadata::read_from(io, &metadata_location)
        .await
        .with_context(|| format!("cannot read the original table's metadata {metadata_location}"))?;
    Ok(HadoopTable { metadata_location, version, metadata })
}

/// `…/vN.metadata.json` → `…/v{N+1}.metadata.json`: the file the original's Hadoop catalog
/// writes next. `None` for other names.
pub fn next_hadoop_version(path: &str) -> Option<String> {
    let (dir, name) = path.rsplit_once('/')?;
    let n: u64 = name.strip_prefix('v')?.strip_suffix(".metadata.json")?.parse().ok()?;
    Some(format!("{dir}/v{}.metadata.json", n + 1))
}

/// Refuses when the original wrote a version after the one being adopted: it is still running.
async fn ensure_original_stopped(io: &FileIO, adopted: &str) -> anyhow::Result<()> {
    if let Some(next) = next_hadoop_version(adopted)
        && io.exists(&next).await?
    {
        anyhow::bail!(
            "the original pipeline wrote {next} after {adopted}: it is still running. Stop it first (docs/migration.md, step 1), then adopt again"
        );
    }
    Ok(())
}

impl HadoopTable {
    /// The original table as a read-only table, to check and inspect it.
    pub async fn as_table(&self, io: &FileIO, ident: &TableIdent) -> anyhow::Result<Table> {
        Ok(StaticTable::from_metadata_file(&self.metadata_location, ident.clone(), io.clone()).await?.into_table())
    }

    /// What keeps the service from writing to this table, if anything.
    pub fn refusal(&self) -> Option<String> {
        (self.metadata.format_version() != FormatVersion::V2).then(|| {
            format!(
                "{} is Iceberg format {}; this service writes format 2 tables only (upgrade it with Spark: ALTER TABLE … SET TBLPROPERTIES ('format-version'='2'))",
                self.metadata_location,
                self.metadata.format_version()
            )
        })
    }

    /// The largest cursor value in the table (microseconds → ns), from the manifests' column
    /// bounds: rows above the original's watermark mean it appended a window it never recorded.
    pub async fn cursor_upper_bound(&self, table: &Table, cursor: &str) -> anyhow::Result<Option<i64>> {
        use iceberg::spec::{Datum, PrimitiveLiteral};
        let Some(snapshot) = self.metadata.current_snapshot() else { return Ok(None) };
        let Some(field) = self.metadata.current_schema().field_by_name(cursor) else { return Ok(None) };
        let bytes = table.file_io().new_input(snapshot.manifest_list())?.read().await?;
        let list = iceberg::spec::ManifestList::parse_with_version(&bytes, self.metadata.format_version())?;
        let mut max: Option<i64> = None;
        for m in list.entries() {
            if m.content != iceberg::spec::ManifestContentType::Data {
                continue;
            }
            let manifest = m.load_manifest(table.file_io()).await?;
            for e in manifest.entries().iter().filter(|e| e.is_alive()) {
                let bound = e.data_file().upper_bounds().get(&field.id).map(Datum::literal);
                if let Some(&PrimitiveLiteral::Long(us)) = bound {
                    max = Some(max.map_or(us, |m: i64| m.max(us)));
                }
            }
        }
        Ok(max.map(|us| us.saturating_mul(1_000)))
    }
}

/// The original's watermark row (`offload_watermarks`, one row per table).
#[derive(Debug, Clone)]
pub struct OriginalWatermark {
    pub table_name: String,
    pub last_offload_ns: i64,
    pub status: String,
    pub row_count: Option<i64>,
    pub last_successful_run: Option<String>,
    pub updated_at: Option<String>,
    pub failure_count: Option<i32>,
    pub last_error: Option<String>,
}

impl OriginalWatermark {
    /// Reads `table_name`'s row. The URL is never logged or printed.
    pub async fn read(url: &str, table_name: &str) -> anyhow::Result<Self> {
        use sqlx::Connection;
        use sqlx::Row;
        let password = url::Url::parse(url).ok().and_then(|u| u.password().map(str::to_string)).unwrap_or_default();
        let hide = |m: String| crate::source::client::redact(&crate::source::client::redact(&m, url), &password);
        let mut conn = sqlx::postgres::PgConnection::connect(url)
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to the original's PostgreSQL: {}", hide(e.to_string())))?;
        let row = sqlx::query(
            "SELECT last_offload_timestamp, status, last_offload_row_count, last_successful_run::text, \
             updated_at::text, failure_count, last_error_message FROM offload_watermarks WHERE table_name = $1",
        )
        .bind(table_name)
        .fetch_optional(&mut conn)
        .await
        .context("reading offload_watermarks from the original's PostgreSQL")?;
        conn.close().await.ok();
        let row = row.with_context(|| {
            format!(
                "offload_watermarks has no row for {table_name:?}; give the original's table name with --original-name"
            )
        })?;
        let ts: chrono::DateTime<chrono::Utc> = row.try_get(0)?;
        Ok(Self {
            table_name: table_name.to_string(),
            last_offload_ns: ts.timestamp_nanos_opt().context("last_offload_timestamp is out of range")?,
            status: row.try_get(1)?,
            row_count: row.try_get(2)?,
            last_successful_run: row.try_get(3)?,
            updated_at: row.try_get(4)?,
            failure_count: row.try_get(5)?,
            last_error: row.try_get(6)?,
        })
    }

    /// Why this row cannot be taken as it is: a run in progress or one that failed.
    pub fn refusal(&self) -> Option<String> {
        match self.status.as_str() {
            "success" | "initialized" => None,
            "running" => Some(format!(
                "the original's watermark for {} is in status 'running' (updated {}): a run may still be appending, or one died after appending without recording it. Stop the Prefect deployment and make sure no Spark job runs (docker exec k2-spark-iceberg ps), then adopt with --force; the audit after adoption shows any window appended twice",
                self.table_name,
                self.updated_at.as_deref().unwrap_or("?")
            )),
            "failed" => Some(format!(
                "the original's last run for {} failed ({} failures, last error: {}): its append may or may not have landed. Check the table's last snapshot in Spark (SELECT * FROM <table>.snapshots) against the watermark, then adopt with --force; the audit after adoption shows missing or doubled rows",
                self.table_name,
                self.failure_count.unwrap_or(0),
                self.last_error.as_deref().unwrap_or("none recorded")
            )),
            other => Some(format!(
                "the original's watermark for {} has an unknown status {other:?}; check it, then adopt with --force",
                self.table_name
            )),
        }
    }

    /// The original's semantics, `cursor > last_offload_timestamp`, as a position.
    pub fn position(&self) -> Position {
        Position::at(self.last_offload_ns)
    }
}

/// The properties an adopted table gains: what this service records on the tables it creates,
/// minus the compression (the original's stays).
pub fn adopted_properties(t: &TableConfig, from: &str) -> HashMap<String, String> {
    HashMap::from([
        ("offload.source".to_string(), t.source()),
        ("offload.cursor".to_string(), t.cursor.clone()),
        (SUMMARY_ADOPTED_FROM.to_string(), from.to_string()),
        // Old metadata versions are deleted as they leave the log, except the original's
        // vN.metadata.json files (see `delete_dropped_metadata`).
        (DELETE_AFTER_COMMIT.to_string(), "true".to_string()),
        ("write.metadata.previous-versions-max".to_string(), "100".to_string()),
    ])
}

/// Writes the copy of the original's metadata that our catalog registers: same table, our
/// properties added, the original's file in its metadata log, named so that iceberg-rust can
/// number the next version (`{N+1:05}-{uuid}.metadata.json`, above every `vN` for directory
/// readers). Returns its location.
pub async fn write_adopted_metadata(
    io: &FileIO,
    original: &HadoopTable,
    properties: HashMap<String, String>,
) -> anyhow::Result<String> {
    let meta =
        TableMetadataBuilder::new_from_metadata(original.metadata.clone(), Some(original.metadata_location.clone()))
            .set_properties(properties)?
            .build()?
            .metadata;
    let location = format!(
        "{}/metadata/{:05}-{}.metadata.json",
        meta.location().trim_end_matches('/'),
        original.version + 1,
        uuid::Uuid::new_v4()
    );
    let parsed: MetadataLocation = location.parse()?;
    meta.write_to(io, &parsed).await.with_context(|| format!("writing {location}"))?;
    Ok(location)
}

/// Registers `location` as the table `ident`, creating its namespace when missing.
pub async fn register(catalog: &Arc<dyn Catalog>, ident: &TableIdent, location: String) -> anyhow::Result<Table> {
    let ns: &NamespaceIdent = ident.namespace();
    if !catalog.namespace_exists(ns).await?
        && let Err(e) = catalog.create_namespace(ns, HashMap::new()).await
        && !catalog.namespace_exists(ns).await?
    {
        return Err(e.into());
    }
    Ok(catalog.register_table(ident, location).await?)
}

/// `iceberg-offload adopt`'s arguments.
pub struct Request {
    pub table: String,
    pub from: String,
    pub watermark: Option<String>,
    pub original_url_env: String,
    pub original_name: Option<String>,
    pub force: bool,
    pub apply: bool,
}

/// Where the first `W` comes from.
enum Start {
    Given(Position),
    Original(OriginalWatermark),
}

impl Start {
    fn position(&self) -> Position {
        match self {
            Self::Given(p) => p.clone(),
            Self::Original(o) => o.position(),
        }
    }
}

/// `iceberg-offload adopt`: checks, prints what it would do, and with `apply` does it.
pub async fn run(cfg: &crate::config::Config, req: &Request) -> anyhow::Result<u8> {
    use crate::sink::{catalog, table as target};
    let t = cfg.tables.iter().find(|t| t.name() == req.table).ok_or_else(|| {
        let names: Vec<&str> = cfg.tables.iter().map(|t| t.name()).collect();
        anyhow::anyhow!("no table named {:?} in the configuration; tables: {}", req.table, names.join(", "))
    })?;
    let storage = catalog::storage_properties(&cfg.catalog)?;
    let io = crate::sink::storage::file_io(&storage);
    let catalog = catalog::build(&cfg.catalog).await?;
    let ident = target::ident(t);
    if catalog.table_exists(&ident).await? {
        return resume(cfg, t, req, &catalog, &ident).await;
    }
    // The watermark first, the table second: a run of the original finishing in between
    // would then show as a newer version (refused below), never as a W the table lacks.
    let start = start(req, t).await?;
    let original = locate(&io, &req.from).await?;
    if let Some(why) = original.refusal() {
        anyhow::bail!("cannot adopt {}: {why}", t.target());
    }
    let original_table = original.as_table(&io, &ident).await?;
    let ch = crate::source::ClickHouse::new(&cfg.clickhouse)?;
    ch.check_version().await?;
    let source = crate::source::query::SourceTable::describe(&ch, t).await?;
    let projection = source.projection()?;
    target::check_compatible(&original_table, t, &projection)
        .map_err(|e| anyhow::anyhow!("cannot adopt {} as {}: {e}", original.metadata_location, t.target()))?;
    let w = start.position();
    if w.cursor_ns > crate::util::now_epoch_ns() {
        anyhow::bail!("the watermark {} is in the future", w.display());
    }
    let newest = original.cursor_upper_bound(&original_table, &t.cursor).await?;
    let above = newest.filter(|max| *max > w.cursor_ns);
    print_plan(t, &original, &start, above);
    // Rows at or below W that the table cannot hold (after its newest row): the original
    // recorded a window this version does not contain; starting at W would skip them.
    let skipped = match newest {
        Some(max) if max < w.cursor_ns => source.count(&ch, Some(&Position::at(max)), &w).await?,
        None => source.count(&ch, None, &w).await?,
        _ => 0,
    };
    if skipped > 0 && !req.force {
        anyhow::bail!(
            "the source holds {skipped} rows after the table's newest row ({}) and at or below the watermark {}: no version of the table adopted holds them, and starting at the watermark would never offload them. Is {} the original's newest version? Give --watermark {} to offload them, or add --force",
            newest.map(|m| Position::at(m).display()).unwrap_or_else(|| "none".into()),
            w.display(),
            original.metadata_location,
            newest.map(|m| Position::at(m).cursor_rfc3339()).unwrap_or_else(|| "1970-01-01T00:00:00Z".into())
        );
    }
    if let Some(max) = above
        && !req.force
    {
        anyhow::bail!(
            "{} holds rows with {} up to {}, after the watermark {}: the original appended a window it never recorded. Starting at the watermark offloads those rows again (the audit then reports them and `repair` removes the second copy); starting at --watermark {} skips the rows of that range the original missed. Choose one and add --force",
            original.metadata_location,
            t.cursor,
            Position::at(max).display(),
            w.display(),
            Position::at(max).cursor_rfc3339()
        );
    }
    if !req.apply {
        println!("dry run: nothing changed; add --apply to register the table and record the watermark");
        return Ok(0);
    }
    ensure_original_stopped(&io, &original.metadata_location).await?;
    let location = write_adopted_metadata(&io, &original, adopted_properties(t, &original.metadata_location)).await?;
    let table = register(&catalog, &ident, location.clone()).await?;
    println!("registered {} at {location}", t.target());
    commit_start(cfg, t, &catalog, table, &w, &original.metadata_location, &source).await
}

/// The table is already in the catalog: done when it has a watermark, the last step again
/// when `adopt --apply` stopped between registering and recording `W`.
async fn resume(
    cfg: &crate::config::Config,
    t: &TableConfig,
    req: &Request,
    catalog: &Arc<dyn Catalog>,
    ident: &TableIdent,
) -> anyhow::Result<u8> {
    let view = crate::commit::TableView::load(catalog, ident).await?;
    let Some(from) = view.table.metadata().properties().get(SUMMARY_ADOPTED_FROM).cloned() else {
        anyhow::bail!(
            "{} is already in the catalog and was not registered by `adopt` (did the service run before adopting? then it created a new table and offloaded from the first source row): drop it from the catalog (and its files) first, or adopt into another target",
            t.target()
        );
    };
    if let Some(w) = &view.watermark {
        println!(
            "{} is already in the catalog, adopted from {from}, with watermark {}: nothing to adopt",
            t.target(),
            w.display()
        );
        return Ok(0);
    }
    let io = crate::sink::storage::file_io(&crate::sink::catalog::storage_properties(&cfg.catalog)?);
    ensure_original_stopped(&io, &from).await?;
    let start = start(req, t).await?;
    println!("{} was registered from {from}; its watermark was not recorded yet", t.target());
    println!("  watermark:      {} ({})", start.position().display(), describe_start(&start));
    if !req.apply {
        println!("dry run: nothing changed; add --apply to record the watermark");
        return Ok(0);
    }
    let ch = crate::source::ClickHouse::new(&cfg.clickhouse)?;
    let source = crate::source::query::SourceTable::describe(&ch, t).await?;
    commit_start(cfg, t, catalog, view.table, &start.position(), &from, &source).await
}

async fn start(req: &Request, t: &TableConfig) -> anyhow::Result<Start> {
    if let Some(text) = &req.watermark {
        return Ok(Start::Given(Position::parse(text).map_err(|e| anyhow::anyhow!("--watermark: {e}"))?));
    }
    if req.original_url_env.contains("://") || req.original_url_env.contains('@') {
        anyhow::bail!(
            "--original-url-env takes the name of an environment variable holding the URL, not the URL itself (it would show in process lists and logs)"
        );
    }
    let url = std::env::var(&req.original_url_env).map_err(|_| {
        anyhow::anyhow!(
            "set {} to the original's PostgreSQL URL (postgresql://user:password@host:5432/prefect), or give --watermark <time>",
            req.original_url_env
        )
    })?;
    let name = req.original_name.clone().unwrap_or_else(|| t.name().to_string());
    let original = OriginalWatermark::read(&url, &name).await?;
    if let Some(why) = original.refusal() {
        if !req.force {
            anyhow::bail!("{why}");
        }
        tracing::warn!(table = t.name(), "adopting despite: {why}");
    }
    Ok(Start::Original(original))
}

fn describe_start(start: &Start) -> String {
    match start {
        Start::Given(_) => "given with --watermark".into(),
        Start::Original(o) => format!(
            "offload_watermarks row {:?}: status {}, last success {}, {} rows in its last run",
            o.table_name,
            o.status,
            o.last_successful_run.as_deref().unwrap_or("never"),
            o.row_count.map(|n| n.to_string()).unwrap_or_else(|| "?".into())
        ),
    }
}

fn print_plan(t: &TableConfig, original: &HadoopTable, start: &Start, above: Option<i64>) {
    let meta = &original.metadata;
    let summary = meta.current_snapshot().map(|s| s.summary().additional_properties.clone()).unwrap_or_default();
    println!("adopt {} ({} → {})", t.name(), t.source(), t.target());
    println!("  original table:  {} (version {}, format 2)", original.metadata_location, original.version);
    println!(
        "  content:         {} snapshots, {} rows in {} data files",
        meta.snapshots().count(),
        summary.get("total-records").map(String::as_str).unwrap_or("0"),
        summary.get("total-data-files").map(String::as_str).unwrap_or("0")
    );
    println!("  schema:          every source column found by name with its type (field ids kept)");
    println!("  watermark:       {} ({})", start.position().display(), describe_start(start));
    println!("  first window:    rows with {} > {}", t.cursor, start.position().cursor_rfc3339());
    if let Some(max) = above {
        println!("  WARNING:         the table holds rows up to {}, after the watermark", Position::at(max).display());
    }
}

/// Step 5: `W` committed as the table's first marked snapshot (no files), under the table's
/// lease, through the commit protocol like every window.
async fn commit_start(
    cfg: &crate::config::Config,
    t: &TableConfig,
    catalog: &Arc<dyn Catalog>,
    table: Table,
    w: &Position,
    from: &str,
    source: &crate::source::query::SourceTable,
) -> anyhow::Result<u8> {
    use crate::commit::{self, Attempt, AttemptKind, CommitContext, Journal, TableView, Window};
    let state = crate::state::StateStore::open(&cfg.state).await?;
    let holder = crate::state::process_holder("adopt");
    let lease = crate::state::acquire(&state, t.name(), &holder, cfg.service.lease_ttl).await?;
    let result = async {
        let view = TableView::of(table)?;
        let mut journal = Journal::load(&view.table, cfg.catalog.limits.storage).await?;
        let window = Window { lo: None, hi: w.clone(), planned_rows: 0, bounded: false };
        let attempt =
            Attempt { kind: AttemptKind::Adoption { from: from.to_string() }, ..Attempt::new(source.measure()) };
        let cx = CommitContext { catalog: catalog.clone(), limits: cfg.catalog.limits };
        commit::commit_window(&cx, &view, &mut journal, vec![], &window, 0, &attempt).await
    }
    .await;
    state.release_lease(&lease).await.ok();
    let committed = result?;
    tracing::warn!(
        table = t.name(),
        watermark = w.display(),
        snapshot_id = committed.snapshot_id,
        from,
        "adopted {} from {from}",
        t.target()
    );
    println!("adopted: {} starts after {} (snapshot {})", t.target(), w.display(), committed.snapshot_id);
    Ok(0)
}
