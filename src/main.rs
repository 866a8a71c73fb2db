//! `iceberg-offload`: the command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use clap::{Parser, Subcommand};

use iceberg_offload::commit::{self, Attempt, CommitContext, Journal, Position, TableView, Window};
use iceberg_offload::config::{Config, TableConfig};
use iceberg_offload::metrics::Metrics;
use iceberg_offload::offload::{AuditSettings, Services};
use iceberg_offload::scheduler::{CycleStatus, Scheduler, TableResult};
use iceberg_offload::server::{self, ServerState};
use iceberg_offload::sink::{catalog, table as target};
use iceberg_offload::source::ClickHouse;
use iceberg_offload::source::query::SourceTable;
use iceberg_offload::state::StateStore;

/// Exit codes of `once` (and of the other commands on error).
mod exit {
    pub const OK: u8 = 0;
    /// Configuration, connection or usage error before any table ran.
    pub const ERROR: u8 = 1;
    /// Some tables succeeded, some failed.
    pub const PARTIAL: u8 = 2;
    /// Every table that ran failed.
    pub const FAILED: u8 = 3;
    /// Every table was skipped: another writer holds their leases.
    pub const LEASE_HELD: u8 = 4;
    /// A shutdown (SIGTERM/SIGINT) interrupted the cycle; nothing half-done was committed.
    pub const INTERRUPTED: u8 = 5;
}

#[derive(Parser)]
#[command(
    name = "iceberg-offload",
    version,
    about = "Moves rows from ClickHouse hot-tier tables into Apache Iceberg cold-tier tables, exactly once"
)]
struct Cli {
    /// Configuration file (TOML). Without it, the embedded defaults are used.
    #[arg(long, short, global = true, env = "ICEBERG_OFFLOAD_CONFIG")]
    config: Option<PathBuf>,
    /// Log format.
    #[arg(long, global = true, default_value = "human", value_parser = ["human", "json"], env = "ICEBERG_OFFLOAD_LOG_FORMAT")]
    log_format: String,
    /// Also append logs to this file.
    #[arg(long, global = true, env = "ICEBERG_OFFLOAD_LOG_FILE")]
    log_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The scheduler daemon: one cycle at start, then at each interval boundary (UTC).
    Run,
    /// One cycle. Exit 0 success, 2 partial, 3 failed, 4 all tables leased by another writer,
    /// 5 interrupted by SIGTERM/SIGINT.
    Once,
    /// Checks the configuration and that ClickHouse, the catalog and the state store are reachable.
    Validate,
    /// The 30-second health check: scheduler, last cycle, metrics, per-table watermark, lag and
    /// last error, firing alerts. Exit 0 healthy, 1 unhealthy.
    Status {
        /// The scheduler's HTTP endpoint [default: the configuration's service.metrics_listen,
        /// on localhost when it listens on every address]
        #[arg(long)]
        url: Option<String>,
        /// Prometheus, to list firing IcebergOffload alerts.
        #[arg(long)]
        prometheus: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Deletes files under each table's location (a local disk or S3) that no snapshot
    /// references (left by attempts that died before cleaning up), older than `--older-than`.
    /// Takes each table's lease.
    Cleanup {
        #[arg(long, default_value = "24h")]
        older_than: String,
        /// List what would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Accept an `--older-than` below the safe floor (the longest a window or a compaction
        /// may write before its files are recorded): only when no writer can be running.
        #[arg(long)]
        allow_below_floor: bool,
    },
    /// Audits every day of the cursor the source still holds: rows in ClickHouse at or below
    /// the watermark against rows in Iceberg, per UTC day (ok, missing = late rows, extra =
    /// duplicates). Prints the verdicts and writes them to the state store. Exit 0 when every
    /// day is ok, 1 otherwise.
    Audit {
        /// One table (its `name`); all tables when left out.
        table: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Maintains the tables now (what `run` does daily): compacts the small files of closed
    /// partitions and merges manifests (one `replace` snapshot), then expires snapshots older
    /// than the retention (`[maintenance]`, or the table's `history.expire.*` properties) and
    /// deletes the files only they referenced. Takes each table's lease. `--dry-run` says what
    /// would be done.
    Maintain {
        /// One table (its `name`); all tables when left out.
        #[arg(long)]
        table: Option<String>,
        #[arg(long)]
        dry_run: bool,
        /// Some steps only: any of expire,compact,metadata (comma-separated).
        #[arg(long, value_parser = iceberg_offload::maintenance::Steps::parse)]
        only: Option<iceberg_offload::maintenance::Steps>,
    },
    /// Drops the hot-tier partitions of tables with `evict_after` whose newest row is older
    /// than that, once Iceberg provably holds every row of them (what `run` does hourly): the
    /// partition key a day of the cursor, every row at or below W and the view's split, nothing
    /// pending, the same rows in both tiers over its cursor range (count and row hashes). Lists each partition, whether it goes or stays
    /// and why. Takes each table's lease. `--dry-run` drops nothing.
    Evict {
        /// One table (its `name`); all tables with `evict_after` when left out.
        #[arg(long)]
        table: Option<String>,
        #[arg(long)]
        dry_run: bool,
    },
    /// Takes over a table the original pipeline wrote (Spark, Hadoop catalog): checks it
    /// against the source, registers its current metadata in the configured catalog and
    /// starts from the original's watermark (`offload_watermarks` in its PostgreSQL; rows
    /// with cursor > last_offload_timestamp are offloaded). A dry run unless --apply.
    Adopt {
        /// The table (its `name` in the configuration).
        table: String,
        /// The original table's directory in the Hadoop warehouse (…/cold/<table>), or one of
        /// its vN.metadata.json files.
        #[arg(long)]
        from: String,
        /// Start after this RFC 3339 time instead of the original's watermark row.
        #[arg(long)]
        watermark: Option<String>,
        /// The environment variable holding the original's PostgreSQL URL (never printed).
        #[arg(long, default_value = "ORIGINAL_WATERMARKS_URL")]
        original_url_env: String,
        /// The table's `table_name` in offload_watermarks (default: the source table's name
        /// without its database).
        #[arg(long)]
        original_name: Option<String>,
        /// Adopt although the original's row is `running` or `failed`, or the table holds rows
        /// after the watermark.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        apply: bool,
    },
    /// Removes rows the table holds more often than the source (windows the original
    /// pipeline appended twice): per day the audit finds extra rows, each row is kept as often
    /// as ClickHouse holds it, in one fenced `replace` snapshot. Takes the table's lease (exit
    /// 4 when another writer holds it).
    Repair {
        /// The table (its `name`).
        #[arg(long)]
        table: String,
        /// Say what would be removed, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Watermarks.
    Watermark {
        #[command(subcommand)]
        command: WatermarkCommand,
    },
}

#[derive(Subcommand)]
enum WatermarkCommand {
    /// Per table: Iceberg watermark, state-store mirror, rows behind, last run.
    Show {
        #[arg(long)]
        json: bool,
    },
    /// Moves a table's watermark on purpose, or re-records it for a changed configuration
    /// (source, cursor, tiebreak). A dry run unless --apply: prints what would change.
    Set {
        /// The table, as named in metrics and logs (the source table name).
        table: String,
        /// `current` (keep W, record it for the configuration as it is now), or a position:
        /// an RFC 3339 time, optionally followed by ` #<tiebreak>` (as `watermark show` prints it).
        #[arg(long, default_value = "current")]
        to: String,
        /// Commit the change (an empty snapshot carrying the new watermark), under the table's lease.
        #[arg(long)]
        apply: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _guard = init_logging(&cli.log_format, cli.log_file.as_deref());
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(exit::ERROR);
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::from(exit::ERROR)
        }
    }
}

fn init_logging(format: &str, file: Option<&std::path::Path>) -> Option<()> {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::fmt::writer::MakeWriterExt;
    let filter = EnvFilter::try_from_env("ICEBERG_OFFLOAD_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,iceberg=warn,sqlx=warn,opendal=warn,iceberg_offload=info"));
    let file = file.and_then(|p| std::fs::OpenOptions::new().create(true).append(true).open(p).ok());
    use std::io::IsTerminal;
    let ansi = file.is_none() && std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_ansi(ansi);
    match (format, file) {
        ("json", Some(f)) => builder.json().with_writer(std::io::stderr.and(Arc::new(f))).init(),
        ("json", None) => builder.json().with_writer(std::io::stderr).init(),
        (_, Some(f)) => builder.with_writer(std::io::stderr.and(Arc::new(f))).init(),
        (_, None) => builder.with_writer(std::io::stderr).init(),
    }
    Some(())
}

fn load_config(path: Option<&std::path::Path>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(p) => Config::load(p)?,
        None => Config::embedded()?,
    })
}

/// How ClickHouse reaches the warehouse for the views: the configured named collection, and
/// the endpoint the catalog writes to.
fn view_storage(cfg: &Config) -> iceberg_offload::services::ViewStorage {
    iceberg_offload::services::ViewStorage {
        s3_collection: cfg.clickhouse.iceberg_s3_collection.clone(),
        s3_endpoint: cfg.catalog.properties.get("s3.endpoint").cloned(),
    }
}

async fn services(cfg: &Config, metrics: Arc<Metrics>) -> anyhow::Result<Services> {
    let ch = ClickHouse::new(&cfg.clickhouse)?;
    let catalog = catalog::build(&cfg.catalog).await?;
    let state = match StateStore::open(&cfg.state).await {
        Ok(s) => Some(s),
        Err(e) => {
            // I3: Iceberg is the truth; the mirror is optional for correctness.
            tracing::warn!("state store unavailable, running without lease and mirror: {e:#}");
            None
        }
    };
    Ok(Services {
        ch,
        catalog,
        state,
        metrics,
        limits: cfg.catalog.limits,
        max_clock_skew: cfg.clickhouse.max_clock_skew,
        audit: AuditSettings { recent_days: cfg.service.audit_recent_days, full_every: cfg.service.audit_full_every },
        audits: Default::default(),
        maintenance: Default::default(),
        evictions: Default::default(),
        views: view_storage(cfg),
        replacer: Arc::new(iceberg_offload::commit::replace::Replacer::new(cfg.catalog.clone())),
    })
}

async fn dispatch(cli: Cli) -> anyhow::Result<u8> {
    let cfg = load_config(cli.config.as_deref())?;
    match cli.command {
        Command::Once => once(cfg).await,
        Command::Run => run(cfg).await,
        Command::Validate => validate(&cfg).await,
        Command::Cleanup { older_than, dry_run, allow_below_floor } => {
            cleanup(&cfg, &older_than, dry_run, allow_below_floor).await
        }
        Command::Status { url, prometheus, json } => status(&cfg, url, prometheus, json).await,
        Command::Audit { table, json } => audit(&cfg, table.as_deref(), json).await,
        Command::Evict { table, dry_run } => evict(&cfg, table.as_deref(), dry_run).await,
        Command::Maintain { table, dry_run, only } => {
            maintain(&cfg, table.as_deref(), only.unwrap_or_default(), dry_run).await
        }
        Command::Adopt { table, from, watermark, original_url_env, original_name, force, apply } => {
            let request = iceberg_offload::adopt::Request {
                table,
                from,
                watermark,
                original_url_env,
                original_name,
                force,
                apply,
            };
            iceberg_offload::adopt::run(&cfg, &request).await
        }
        Command::Repair { table, dry_run } => repair(&cfg, &table, dry_run).await,
        Command::Watermark { command: WatermarkCommand::Show { json } } => watermark_show(&cfg, json).await,
        Command::Watermark { command: WatermarkCommand::Set { table, to, apply } } => {
            watermark_set(&cfg, &table, &to, apply).await
        }
    }
}

/// `once`: one cycle now; the exit code says how it went.
async fn once(cfg: Config) -> anyhow::Result<u8> {
    let metrics = Arc::new(Metrics::new());
    let svc = services(&cfg, metrics.clone()).await?;
    check_clickhouse(&svc).await?;
    for t in &cfg.tables {
        metrics.init_table(t.name(), &t.layer);
    }
    let scheduler = Arc::new(Scheduler::new(cfg, svc));
    spawn_signal_handler(scheduler.clone());
    let report = scheduler.run_cycle().await;
    print_report(&report);
    let all_skipped = report.tables.iter().all(|(_, r)| matches!(r, TableResult::Skipped(_)));
    Ok(match report.status {
        CycleStatus::Interrupted => exit::INTERRUPTED,
        _ if all_skipped => exit::LEASE_HELD,
        CycleStatus::Success => exit::OK,
        CycleStatus::Partial => exit::PARTIAL,
        CycleStatus::Failed => exit::FAILED,
    })
}

/// `run`: the scheduler daemon, with its metrics and health endpoint, until a signal stops it.
async fn run(cfg: Config) -> anyhow::Result<u8> {
    let metrics = Arc::new(Metrics::new());
    let svc = services(&cfg, metrics.clone()).await?;
    let ready = Arc::new(AtomicBool::new(check_clickhouse(&svc).await?));
    let schedule = cfg.service.interval.as_secs_f64() / 60.0;
    let tables = cfg.tables.iter().map(|t| t.name()).collect::<Vec<_>>().join(",");
    let listen = cfg.service.metrics_listen.clone();
    let stale_after = (cfg.service.interval.as_secs() as i64 / 2).max(60) + cfg.service.table_timeout.as_secs() as i64;
    let scheduler = Arc::new(Scheduler::new(cfg, svc).with_ready(ready.clone()).with_maintenance().with_replicas());
    // Lag is known from the last successful run before this start, not only after the
    // first cycle: a service that keeps crashing shows a growing lag.
    scheduler.recall(&scheduler.config.tables.iter().collect::<Vec<_>>()).await;
    metrics.init_service(scheduler.config.tables.len(), schedule, &tables, scheduler.heartbeat.clone());
    let state = ServerState { metrics, heartbeat: scheduler.heartbeat.clone(), ready, stale_after };
    let server = tokio::spawn(async move { server::serve(&listen, state).await });
    spawn_signal_handler(scheduler.clone());
    iceberg_offload::systemd::ready();
    tokio::select! {
        _ = scheduler.run_forever() => {}
        r = server => { r??; }
    }
    iceberg_offload::systemd::stopping();
    tracing::info!("scheduler stopped");
    Ok(exit::OK)
}

/// `status`: the health check, printed or as JSON; the exit code says whether it is healthy.
async fn status(cfg: &Config, url: Option<String>, prometheus: Option<String>, json: bool) -> anyhow::Result<u8> {
    let url = url.unwrap_or_else(|| iceberg_offload::status::local_url(&cfg.service.metrics_listen));
    let report = iceberg_offload::status::run(cfg, &url, prometheus.as_deref()).await;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        iceberg_offload::status::print(&report);
    }
    Ok(if report.healthy { exit::OK } else { exit::ERROR })
}

/// Refuses a ClickHouse too old to serve us; any other problem is left to the cycle,
/// where it is classified, counted and retried like every other failure.
async fn check_clickhouse(svc: &Services) -> anyhow::Result<bool> {
    match svc.ch.check_version().await {
        Ok(v) => {
            tracing::info!("ClickHouse {v} at {}", svc.ch.url());
            Ok(true)
        }
        Err(e @ iceberg_offload::error::OffloadError::UnsupportedServer(_)) => Err(e.into()),
        Err(e) => {
            tracing::warn!("ClickHouse check failed at start: {e}");
            Ok(false)
        }
    }
}

fn spawn_signal_handler(scheduler: Arc<Scheduler>) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!(
            "shutdown requested: windows in flight are abandoned before their commit; a commit already sent completes \
             within catalog.commit_timeout"
        );
        scheduler.shutdown.cancel();
    });
}

fn print_report(report: &iceberg_offload::scheduler::CycleReport) {
    println!("cycle {} {} in {:.2}s", report.cycle_id, report.status.as_str(), report.duration.as_secs_f64());
    for (name, r) in &report.tables {
        match r {
            TableResult::Done(o) => println!(
                "  {name}: ok, {} rows in {} windows, watermark {}",
                o.rows,
                o.windows,
                o.watermark.as_deref().unwrap_or("none")
            ),
            TableResult::Failed(e) => println!("  {name}: FAILED [{}] {e}", e.class()),
            TableResult::Skipped(reason) => println!("  {name}: skipped ({reason})"),
            TableResult::Interrupted => println!("  {name}: interrupted (shutdown)"),
            TableResult::NotOwned => println!("  {name}: owned by another replica"),
        }
    }
}

async fn validate(cfg: &Config) -> anyhow::Result<u8> {
    let mut ok = true;
    println!("config: ok ({} tables)", cfg.tables.len());
    let ch = ClickHouse::new(&cfg.clickhouse)?;
    match ch.check_version().await {
        Ok(v) => println!("clickhouse: ok, version {v} at {}", ch.url()),
        Err(e) => {
            ok = false;
            println!("clickhouse: FAILED: {e}");
        }
    }
    let catalog = match catalog::build(&cfg.catalog).await {
        Ok(c) => match c.list_namespaces(None).await {
            Ok(ns) => {
                println!("catalog: ok, {} namespaces", ns.len());
                Some(c)
            }
            Err(e) => {
                ok = false;
                println!("catalog: FAILED: {e}");
                None
            }
        },
        Err(e) => {
            ok = false;
            println!("catalog: FAILED: {e:#}");
            None
        }
    };
    match StateStore::open(&cfg.state).await {
        Ok(s) => println!("state store: ok ({})", s.url()),
        Err(e) => {
            ok = false;
            println!("state store: FAILED: {e:#}");
        }
    }
    for t in &cfg.tables {
        let table = match &catalog {
            Some(c) => c.load_table(&target::ident(t)).await.ok(),
            None => None,
        };
        let described = SourceTable::describe(&ch, t).await;
        let line = match described
            .as_ref()
            .map_err(|e| e.to_string())
            .and_then(|s| s.projection().map_err(|e| e.to_string()))
        {
            Ok(projection) => match (&catalog, &table) {
                (Some(_), Some(table)) => match target::check_compatible(table, t, &projection) {
                    Ok(()) => format!("ok, {} columns, target {} exists and fits", projection.len(), t.target()),
                    Err(e) => {
                        ok = false;
                        format!("FAILED: {e}")
                    }
                },
                (Some(_), None) => format!("ok, {} columns, target {} will be created", projection.len(), t.target()),
                (None, _) => format!("ok, {} columns", projection.len()),
            },
            Err(e) => {
                ok = false;
                format!("FAILED: {e}")
            }
        };
        println!("table {}: {line}", t.source());
        if let Ok(source) = &described {
            ok &= validate_tiers(cfg, &ch, t, source, table.as_ref()).await;
        }
    }
    Ok(if ok { exit::OK } else { exit::ERROR })
}

/// `validate` for a table's view, eviction and TTL (I13): one line per check; `false` when
/// one fails (a warning does not fail).
async fn validate_tiers(
    cfg: &Config,
    ch: &ClickHouse,
    t: &iceberg_offload::config::TableConfig,
    source: &SourceTable,
    table: Option<&iceberg::table::Table>,
) -> bool {
    let mut ok = true;
    if let Some(name) = &t.view {
        let warehouse = table.is_none().then_some(cfg.catalog.warehouse.as_deref()).flatten();
        let warehouse =
            warehouse.map(|w| format!("{}/{}/{}", w.trim_end_matches('/'), t.target_namespace, t.target_table));
        for line in
            iceberg_offload::tiers::check(ch, source, name, table, warehouse.as_deref(), &view_storage(cfg)).await
        {
            match line {
                Ok(l) => println!("  view {name}: ok: {l}"),
                Err(e) => {
                    ok = false;
                    println!("  view {name}: FAILED: {e}");
                }
            }
        }
    }
    if let Some(after) = t.evict_after {
        let key = iceberg_offload::evict::partition_key(ch, t).await.unwrap_or_default();
        let unit_is_day = source.unit().nanos() >= 86_400_000_000_000;
        match iceberg_offload::evict::check_partition_key(&key, &t.cursor, unit_is_day) {
            Ok(()) => println!("  evict_after {}: ok: partitions by {key}", humantime(after)),
            Err(e) => {
                ok = false;
                println!("  evict_after {}: FAILED: {e}", humantime(after));
            }
        }
        if let Some(ttl) = source.retention()
            && ttl < after + std::time::Duration::from_secs(86_400)
        {
            println!(
                "  evict_after {}: WARNING: the source's TTL ({}) deletes rows before eviction would, with less than a day \
                 to spare; set the TTL to evict_after plus a margin (e.g. {} + 2 days) so that it stays a safety net",
                humantime(after),
                humantime(ttl),
                humantime(after)
            );
        }
    }
    let w = table.and_then(|t| iceberg_offload::commit::TableView::of(t.clone()).ok()).and_then(|v| v.watermark);
    if let Ok(Some(headroom)) = source.ttl_headroom_seconds(ch, w.as_ref()).await
        && headroom < 24.0 * 3600.0
    {
        println!(
            "  ttl: WARNING: at the current lag the source's TTL deletes the oldest row not yet offloaded in {:.1} h \
             (IcebergOffloadTTLHeadroomLow fires under 4 h): offload faster or lengthen the TTL",
            headroom / 3600.0
        );
    }
    ok
}

fn humantime(d: std::time::Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s => format!("{s}s"),
    }
}

/// `watermark set`: I11's way out, on purpose and logged. The move is one commit through the
/// commit protocol (fenced, journaled), with no files and the marker `offload.watermark-moved`.
async fn watermark_set(cfg: &Config, name: &str, to: &str, apply: bool) -> anyhow::Result<u8> {
    let t = cfg.tables.iter().find(|t| t.name() == name).ok_or_else(|| {
        let names: Vec<&str> = cfg.tables.iter().map(|t| t.name()).collect();
        anyhow::anyhow!("no table named {name:?} in the configuration; tables: {}", names.join(", "))
    })?;
    let ch = ClickHouse::new(&cfg.clickhouse)?;
    ch.check_version().await?;
    let catalog = catalog::build(&cfg.catalog).await?;
    let source = SourceTable::describe(&ch, t).await?;
    let view = TableView::of(catalog.load_table(&target::ident(t)).await.context("loading the target table")?)?;
    let measure = source.measure();
    let target_w = parse_target(&view, &measure, name, to)?;
    check_target(&ch, &source, name, &target_w).await?;
    print_move(name, t, &view, &target_w, &measure);
    if let Some(w) = &view.watermark {
        print_move_effect(&ch, &source, w, &target_w).await?;
    }
    if !apply {
        println!("dry run: nothing changed; add --apply to commit it");
        return Ok(exit::OK);
    }
    let committed = commit_move(cfg, t, &catalog, &view, &target_w, measure).await?;
    tracing::warn!(
        table = name,
        before = show_position(view.watermark.as_ref()),
        after = target_w.display(),
        snapshot_id = committed.snapshot_id,
        "watermark of {name} moved by an operator (watermark set)"
    );
    println!("applied: snapshot {}", committed.snapshot_id);
    Ok(exit::OK)
}

/// The position `--to` names (`current`: the table's watermark); a tiebreak only if the
/// table is configured with one.
fn parse_target(view: &TableView, measure: &commit::Measure, name: &str, to: &str) -> anyhow::Result<Position> {
    let target_w = if to == "current" {
        view.watermark.clone().ok_or_else(|| anyhow::anyhow!("{name} has no watermark yet; give --to <position>"))?
    } else {
        Position::parse(to).map_err(|e| anyhow::anyhow!("--to: {e}"))?
    };
    if target_w.tiebreak.is_some() && measure.tiebreak.is_none() {
        anyhow::bail!("--to {to:?} has a tiebreak, but {name} is configured without one; give a bare time");
    }
    Ok(target_w)
}

/// Never past what is settled (rows could still arrive below it), and a position ClickHouse
/// can read (a tiebreak must parse as the column's type).
async fn check_target(ch: &ClickHouse, source: &SourceTable, name: &str, target_w: &Position) -> anyhow::Result<()> {
    let settle_ns = source.settle_ns();
    let limit = match source.unit() {
        commit::CursorUnit::Day { .. } => source.last_settled_day(ch, settle_ns).await?,
        unit => unit.settled_limit(iceberg_offload::util::now_epoch_ns() + ch.clock_offset_ns().await?.1, settle_ns),
    };
    if target_w.cursor_ns > limit {
        anyhow::bail!(
            "--to {} is later than what is settled now ({}): rows may still arrive below it",
            target_w.display(),
            Position::at(limit).display()
        );
    }
    source.count(ch, None, target_w).await.with_context(|| {
        format!(
            "ClickHouse cannot read the position {} for {name} (a tiebreak that is not a value of its type?); \
             give a bare time with --to",
            target_w.display()
        )
    })?;
    Ok(())
}

/// A watermark as `watermark set` prints it ("none" for no watermark).
fn show_position(p: Option<&Position>) -> String {
    p.map(|p| p.display()).unwrap_or_else(|| "none".into())
}

/// The watermark and what it is measured on, now and after the move.
fn print_move(name: &str, t: &TableConfig, view: &TableView, target_w: &Position, measure: &commit::Measure) {
    println!("table {name} ({} → {})", t.source(), t.target());
    println!("  watermark now:    {}", show_position(view.watermark.as_ref()));
    let measured = match &view.measured_on {
        commit::MeasuredOn::Nothing => "nothing (no watermark yet)".to_string(),
        commit::MeasuredOn::Recorded(m) => m.to_json(),
        commit::MeasuredOn::Legacy { source, cursor, has_tiebreak } => format!(
            "source {}, cursor {}, {} (recorded before offload.measure existed)",
            source.as_deref().unwrap_or("?"),
            cursor.as_deref().unwrap_or("?"),
            if *has_tiebreak { "with a tiebreak" } else { "no tiebreak" }
        ),
    };
    println!("  measured on now:  {measured}");
    println!("  watermark after:  {}", target_w.display());
    println!("  measured on after: {}", measure.to_json());
}

/// Which way the watermark moves from `w`, by what the source holds between the two positions.
async fn print_move_effect(
    ch: &ClickHouse,
    source: &SourceTable,
    w: &Position,
    target_w: &Position,
) -> anyhow::Result<()> {
    let forward = source.count(ch, Some(w), target_w).await?;
    let backward = source.count(ch, Some(target_w), w).await?;
    if forward > 0 {
        println!("  effect: {forward} source rows between the two will never be offloaded");
    } else if backward > 0 {
        println!(
            "  effect: {backward} source rows between the two will be offloaded again; those already in Iceberg \
             would be duplicated (delete them there first)"
        );
    } else {
        println!("  effect: no source row lies between the two positions");
    }
    Ok(())
}

/// Commits the move to `target_w` under the table's lease: a window with no files, as an
/// operator move.
async fn commit_move(
    cfg: &Config,
    t: &TableConfig,
    catalog: &Arc<dyn iceberg::Catalog>,
    view: &TableView,
    target_w: &Position,
    measure: commit::Measure,
) -> anyhow::Result<commit::Committed> {
    let state = StateStore::open(&cfg.state).await?;
    let lease =
        state.acquire_lease(t.name(), &format!("watermark-set:{}", std::process::id()), cfg.service.lease_ttl).await?;
    let result = async {
        let mut journal = commit::Journal::load(&view.table, cfg.catalog.limits.storage).await?;
        let window = Window { lo: view.watermark.clone(), hi: target_w.clone(), planned_rows: 0, bounded: false };
        let attempt = Attempt { kind: commit::AttemptKind::OperatorMove, ..Attempt::new(measure) };
        let cx = CommitContext { catalog: catalog.clone(), limits: cfg.catalog.limits };
        commit::commit_window(&cx, view, &mut journal, vec![], &window, 0, &attempt).await
    }
    .await;
    state.release_lease(&lease).await.ok();
    Ok(result?)
}

async fn cleanup(cfg: &Config, older_than: &str, dry_run: bool, allow_below_floor: bool) -> anyhow::Result<u8> {
    let older_than =
        iceberg_offload::util::parse_duration(older_than).map_err(|e| anyhow::anyhow!("--older-than: {e}"))?;
    // A window's or a compaction's data files exist before anything records them: the
    // longest either may write, plus its commit's allowance (I10), is the floor.
    let floor = cfg.service.table_timeout.max(cfg.maintenance.timeout) + cfg.catalog.limits.commit_allowance();
    if older_than < floor && !allow_below_floor {
        anyhow::bail!(
            "--older-than {older_than:?} is below the safe floor of {floor:?} (service.table_timeout or maintenance.timeout, plus the commit allowance): a writer still writing could lose its files. Use at least {floor:?}, or add --allow-below-floor when no other process can be writing to these tables"
        );
    }
    let catalog = catalog::build(&cfg.catalog).await?;
    let storage = catalog::storage_properties(&cfg.catalog)?;
    let state = StateStore::open(&cfg.state).await?;
    let holder = iceberg_offload::state::process_holder("cleanup");
    let mut code = exit::OK;
    for t in &cfg.tables {
        // The same lease as the offload: no attempt of ours is writing this table meanwhile.
        let lease = match iceberg_offload::state::acquire(&state, t.name(), &holder, cfg.service.lease_ttl).await {
            Ok(l) => l,
            Err(e) => {
                println!("{}: skipped: {e}", t.target());
                code = exit::LEASE_HELD;
                continue;
            }
        };
        let result = async {
            let table = catalog.load_table(&target::ident(t)).await?;
            // Pending attempts first (I5): those that can never land lose their files, those
            // that still may keep them, protected from the orphan scan.
            let mut journal = Journal::load(&table, cfg.catalog.limits.storage).await?;
            if !dry_run {
                journal.settle(&table).await?;
                iceberg_offload::commit::sweep_dead_metadata(&table);
            }
            let mut protected: Vec<String> = journal.entries().iter().flat_map(|a| a.files()).collect();
            let limit = cfg.catalog.limits.storage;
            protected.extend(iceberg_offload::maintenance::compact::pending_files(&table, limit).await);
            Ok::<_, anyhow::Error>(
                iceberg_offload::maintenance::cleanup_orphans(&table, older_than, dry_run, &protected, &storage)
                    .await?,
            )
        }
        .await;
        state.release_lease(&lease).await.ok();
        match result {
            Ok(r) => {
                println!(
                    "{}: {} files scanned, {} referenced, {} orphans {}",
                    r.table,
                    r.files_scanned,
                    r.files_referenced,
                    r.orphans.len(),
                    if dry_run { "(dry run: kept)" } else { "deleted" }
                );
                for o in &r.orphans {
                    println!("  {o}");
                }
            }
            Err(e) => {
                println!("{}: FAILED: {e:#}", t.target());
                code = exit::ERROR;
            }
        }
    }
    Ok(code)
}

/// A command's lease on a table, or `None` when another writer holds it (said on stdout).
async fn command_lease(
    state: &StateStore,
    t: &TableConfig,
    holder: &str,
    ttl: std::time::Duration,
) -> Option<iceberg_offload::state::Lease> {
    match iceberg_offload::state::acquire(state, t.name(), holder, ttl).await {
        Ok(lease) => Some(lease),
        Err(e) => {
            println!("{}: skipped: {e}", t.name());
            None
        }
    }
}

/// `maintain`: each table's maintenance now, under its lease.
async fn maintain(
    cfg: &Config,
    only: Option<&str>,
    steps: iceberg_offload::maintenance::Steps,
    dry_run: bool,
) -> anyhow::Result<u8> {
    let tables = tables_named(cfg, only)?;
    let svc = services(cfg, Arc::new(Metrics::new())).await?;
    let state = StateStore::open(&cfg.state).await?;
    let holder = iceberg_offload::state::process_holder("maintain");
    let mut code = exit::OK;
    for t in tables {
        let Some(lease) = command_lease(&state, t, &holder, cfg.service.lease_ttl).await else {
            code = exit::LEASE_HELD;
            continue;
        };
        let run = iceberg_offload::maintenance::maintain_table(&svc, t, &cfg.maintenance, steps, dry_run);
        let result = tokio::time::timeout(cfg.maintenance.timeout, run)
            .await
            .unwrap_or(Err(iceberg_offload::error::OffloadError::Timeout(cfg.maintenance.timeout)));
        state.release_lease(&lease).await.ok();
        match result {
            Ok(r) => {
                for line in maintenance_lines(&r, dry_run) {
                    println!("{}: {line}", t.name());
                }
                if r.failed.is_some() {
                    code = exit::ERROR;
                }
            }
            Err(e) => {
                println!("{}: failed: {e}", t.name());
                code = exit::ERROR;
            }
        }
    }
    Ok(code)
}

/// `evict`: each table's eviction now, under its lease.
async fn evict(cfg: &Config, only: Option<&str>, dry_run: bool) -> anyhow::Result<u8> {
    let tables: Vec<_> =
        tables_named(cfg, only)?.into_iter().filter(|t| only.is_some() || t.evict_after.is_some()).collect();
    if tables.is_empty() {
        println!("no table has evict_after set; nothing to evict");
        return Ok(exit::OK);
    }
    let svc = services(cfg, Arc::new(Metrics::new())).await?;
    svc.ch.check_version().await?;
    let state = StateStore::open(&cfg.state).await?;
    let holder = iceberg_offload::state::process_holder("evict");
    let mut code = exit::OK;
    for t in tables {
        let Some(lease) = command_lease(&state, t, &holder, cfg.service.lease_ttl).await else {
            code = exit::LEASE_HELD;
            continue;
        };
        let now_ns = iceberg_offload::util::now_epoch_ns();
        let result = iceberg_offload::evict::evict(&svc, t, now_ns, dry_run).await;
        state.release_lease(&lease).await.ok();
        match result {
            Ok(r) => {
                for line in eviction_lines(&r, dry_run) {
                    println!("{}: {line}", t.name());
                }
            }
            Err(e) => {
                println!("{}: failed: {e}", t.name());
                code = exit::ERROR;
            }
        }
    }
    if dry_run {
        println!("dry run: nothing dropped");
    }
    Ok(code)
}

/// What `evict` prints of a table's run, a line per partition.
fn eviction_lines(r: &iceberg_offload::evict::EvictReport, dry_run: bool) -> Vec<String> {
    use iceberg_offload::evict::Verdict;
    if r.partitions.is_empty() {
        return vec!["no partition in ClickHouse".into()];
    }
    r.partitions
        .iter()
        .map(|p| {
            let newest = iceberg_offload::util::format_epoch_ns(p.newest_ns);
            let what = match (&p.verdict, p.dropped, dry_run) {
                (Verdict::NotDue, ..) => "stays: not due (its newest row is younger than evict_after)".to_string(),
                (Verdict::Blocked(why), ..) => format!("stays: {why}"),
                (Verdict::Evict, true, _) => format!(
                    "evicted: {} dropped; Iceberg holds {} rows of {}",
                    parts(p.parts.len()),
                    p.iceberg_rows.unwrap_or(0),
                    days(&p.days)
                ),
                (Verdict::Evict, false, _) => format!(
                    "would go: Iceberg holds {} rows of {} ({})",
                    p.iceberg_rows.unwrap_or(0),
                    days(&p.days),
                    parts(p.parts.len())
                ),
            };
            format!("partition {} ({} rows, newest {newest}): {what}", p.partition_id, p.rows)
        })
        .collect()
}

fn parts(n: usize) -> String {
    if n == 1 { "1 part".into() } else { format!("{n} parts") }
}

fn days(days: &[chrono::NaiveDate]) -> String {
    match days {
        [one] => one.to_string(),
        [first, .., last] => format!("{first} to {last}"),
        [] => "no day".into(),
    }
}

async fn repair(cfg: &Config, name: &str, dry_run: bool) -> anyhow::Result<u8> {
    let t = tables_named(cfg, Some(name))?.into_iter().next().expect("one table");
    let svc = services(cfg, Arc::new(Metrics::new())).await?;
    svc.ch.check_version().await?;
    let state = StateStore::open(&cfg.state).await?;
    let holder = iceberg_offload::state::process_holder("repair");
    let lease = match iceberg_offload::state::acquire(&state, t.name(), &holder, cfg.service.lease_ttl).await {
        Ok(lease) => lease,
        // Another writer (the daemon in a cycle) has the table: try again after it, as `maintain` says.
        Err(e @ iceberg_offload::error::OffloadError::LeaseHeld { .. }) => {
            println!("{}: skipped: {e}", t.name());
            return Ok(exit::LEASE_HELD);
        }
        Err(e) => return Err(e.into()),
    };
    let result = iceberg_offload::maintenance::repair::repair(&svc, t, dry_run).await;
    state.release_lease(&lease).await.ok();
    let r = result?;
    if r.days.is_empty() {
        println!("{}: no day holds more rows in Iceberg than in ClickHouse; nothing to repair", t.name());
        return Ok(exit::OK);
    }
    for d in &r.days {
        println!(
            "{}: {} ClickHouse {} Iceberg {} (+{})",
            t.name(),
            d.day,
            d.source_rows,
            d.iceberg_rows,
            d.iceberg_rows - d.source_rows
        );
    }
    for why in &r.left {
        println!("{}: left: {why}", t.name());
    }
    let verb = if r.committed { "removed" } else { "would remove" };
    println!("{}: {verb} {} surplus rows from {} data files", t.name(), r.surplus, r.files);
    if dry_run {
        println!("dry run: nothing changed");
    }
    Ok(exit::OK)
}

/// What `maintain` prints of a table's run, a line per step.
fn maintenance_lines(r: &iceberg_offload::maintenance::MaintenanceReport, dry_run: bool) -> Vec<String> {
    let mut lines = vec![];
    if let Some(why) = &r.skipped {
        return vec![format!("skipped: {why}")];
    }
    let would = if dry_run { " (dry run)" } else { "" };
    if let Some(c) = &r.compact {
        lines.push(match &c.skipped {
            Some(why) => format!("compaction skipped: {why}"),
            None if c.files_rewritten == 0 && c.manifests_after == c.manifests_before => {
                format!(
                    "nothing to compact ({} small files in closed partitions, {} manifests)",
                    c.small_files, c.manifests_before
                )
            }
            None if dry_run => format!(
                "{} files ({} bytes) in {} closed partitions would be compacted, {} manifests merged (dry run)",
                c.files_rewritten, c.bytes_rewritten, c.partitions, c.manifests_before
            ),
            None => format!(
                "{} files ({} bytes) in {} closed partitions compacted into {} ({} bytes, {} rows); manifests {} -> {}",
                c.files_rewritten,
                c.bytes_rewritten,
                c.partitions,
                c.files_written,
                c.bytes_written,
                c.rows,
                c.manifests_before,
                c.manifests_after
            ),
        });
    }
    if let Some(f) = &r.failed {
        lines.push(format!("failed: {f}"));
    }
    if let Some(e) = &r.expire {
        lines.push(match &e.skipped {
            Some(why) => format!("skipped: {why}"),
            None if dry_run => {
                format!("{} of {} snapshots would expire{would}", e.snapshots_expired, e.snapshots_before)
            }
            None => format!(
                "{} of {} snapshots expired, {} files and {} metadata files deleted",
                e.snapshots_expired, e.snapshots_before, e.files_deleted, e.metadata_files_deleted
            ),
        });
    }
    if lines.is_empty() {
        lines.push("nothing to do".into());
    }
    lines
}

/// The configured tables, or the one named `only` (an unknown name is an error listing them).
fn tables_named<'a>(cfg: &'a Config, only: Option<&str>) -> anyhow::Result<Vec<&'a TableConfig>> {
    let tables: Vec<&TableConfig> = cfg.tables.iter().filter(|t| only.is_none_or(|n| t.name() == n)).collect();
    if let Some(n) = only
        && tables.is_empty()
    {
        let names: Vec<&str> = cfg.tables.iter().map(|t| t.name()).collect();
        anyhow::bail!("no table named {n:?} in the configuration; tables: {}", names.join(", "));
    }
    Ok(tables)
}

/// `audit`: a full audit of each table now (read-only: no lease needed).
async fn audit(cfg: &Config, only: Option<&str>, json: bool) -> anyhow::Result<u8> {
    use iceberg_offload::audit::{self, AuditStatus, Audits, Scope};
    let tables = tables_named(cfg, only)?;
    let ch = ClickHouse::new(&cfg.clickhouse)?;
    ch.check_version().await?;
    let catalog = catalog::build(&cfg.catalog).await?;
    let state = StateStore::open(&cfg.state).await.ok();
    let audits = Audits::default();
    let (mut all_ok, mut out) = (true, vec![]);
    for t in tables {
        let source = SourceTable::describe(&ch, t).await?;
        let view = TableView::of(catalog.load_table(&target::ident(t)).await.context("loading the target table")?)?;
        let Some(w) = view.watermark.clone() else {
            println!("{}: no watermark yet, nothing to audit", t.name());
            continue;
        };
        let now_ns = iceberg_offload::util::now_epoch_ns() + ch.clock_offset_ns().await?.1;
        let subject = audit::Subject { audits: &audits, name: t.name(), source: &source, ch: &ch, view: &view };
        let (first, last, retained) = subject.plan(now_ns, Scope::Full, 0).await?;
        let results = subject.audit(first, last).await?;
        if let Some(s) = &state {
            s.record_audit(t.name(), &results, retained).await?;
            // Every retained day was audited: a full audit (the daemon learns of it at its next start).
            s.record_full_audit(t.name(), chrono::Utc::now().timestamp_millis()).await?;
        }
        all_ok &= results.iter().all(|r| r.status() == AuditStatus::Ok);
        if json {
            out.extend(results.iter().map(|r| {
                serde_json::json!({"table": t.name(), "day": r.day.to_string(), "source_rows": r.source_rows,
                    "iceberg_rows": r.iceberg_rows, "status": r.status().as_str()})
            }));
        } else {
            let from = first.map(|f| f.to_string()).unwrap_or_else(|| "the first day".into());
            println!(
                "{} ({} → {}), days {from} to {last} (watermark {}):",
                t.name(),
                t.source(),
                t.target(),
                w.display()
            );
            println!("  {:<10}  {:>14}  {:>14}  status", "day", "ClickHouse", "Iceberg");
            for r in results.iter().rev() {
                println!("  {}  {:>14}  {:>14}  {}", r.day, r.source_rows, r.iceberg_rows, r.status().as_str());
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(if all_ok { exit::OK } else { exit::ERROR })
}

async fn watermark_show(cfg: &Config, json: bool) -> anyhow::Result<u8> {
    let ch = ClickHouse::new(&cfg.clickhouse)?;
    if let Err(e) = ch.check_version().await {
        tracing::warn!("ClickHouse: {e}");
    }
    let catalog = catalog::build(&cfg.catalog).await?;
    let state = StateStore::open(&cfg.state).await.ok();
    let mirror = match &state {
        Some(s) => s.watermarks().await.unwrap_or_default(),
        None => vec![],
    };
    let names: Vec<&str> = cfg.tables.iter().map(|t| t.name()).collect();
    let owners = match &state {
        Some(s) => iceberg_offload::replicas::owners(s, &names, cfg.service.member_timeout)
            .await
            .map(|(_, o)| o)
            .unwrap_or_default(),
        None => Default::default(),
    };
    let mut out = vec![];
    for t in &cfg.tables {
        let m = mirror.iter().find(|r| r.table_name == t.name());
        out.push(watermark_record(cfg, &ch, &catalog, t, m, owners.get(t.name())).await?);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_watermark_records(&out);
    }
    Ok(exit::OK)
}

/// One table's line of `watermark show`: Iceberg's watermark (the truth), the state store's
/// mirror of it (`m`), the rows behind and the commits pending.
async fn watermark_record(
    cfg: &Config,
    ch: &ClickHouse,
    catalog: &Arc<dyn iceberg::Catalog>,
    t: &TableConfig,
    m: Option<&iceberg_offload::state::WatermarkRow>,
    owner: Option<&String>,
) -> anyhow::Result<serde_json::Value> {
    let view = match catalog.load_table(&target::ident(t)).await {
        Ok(table) => Some(TableView::of(table).context("reading the Iceberg watermark")?),
        Err(_) => None,
    };
    let wm = view.as_ref().and_then(|v| v.watermark.clone());
    let pending = match &view {
        Some(v) => Journal::load(&v.table, cfg.catalog.limits.storage)
            .await
            .map(|j| j.entries().len().to_string())
            .unwrap_or_else(|e| format!("unknown ({e})")),
        None => "0".to_string(),
    };
    let behind = match SourceTable::describe(ch, t).await {
        Ok(s) => {
            s.rows_after(ch, wm.as_ref()).await.map(|n| n.to_string()).unwrap_or_else(|e| format!("unknown ({e})"))
        }
        Err(e) => format!("unknown ({e})"),
    };
    Ok(serde_json::json!({
        "table": t.name(),
        "target": t.target(),
        "iceberg_watermark": wm.as_ref().map(|w| w.display()),
        "iceberg_snapshot_id": view.as_ref().and_then(|v| v.snapshot_id()),
        "mirror_watermark": m.map(|r| r.last_offload_timestamp.clone()),
        "mirror_status": m.map(|r| r.status.clone()),
        "last_successful_run": m.and_then(|r| r.last_successful_run.clone()),
        "failure_count": m.map(|r| r.failure_count),
        "last_error": m.and_then(|r| r.last_error_message.clone()),
        "rows_behind": behind,
        "pending_commits": pending,
        "owner": owner,
    }))
}

/// `watermark show` without `--json`: each table, then one field a line ("-" for none).
fn print_watermark_records(out: &[serde_json::Value]) {
    for r in out {
        println!("{}", r["table"].as_str().unwrap_or_default());
        for key in [
            "target",
            "iceberg_watermark",
            "iceberg_snapshot_id",
            "mirror_watermark",
            "mirror_status",
            "last_successful_run",
            "failure_count",
            "last_error",
            "rows_behind",
            "pending_commits",
            "owner",
        ] {
            let v = &r[key];
            let text = match v {
                serde_json::Value::Null => "-".to_string(),
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            println!("  {key:<22} {text}");
        }
    }
}
