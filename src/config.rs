//! Configuration: one TOML file (or the embedded defaults), secrets from environment or files.
//!
//! Unknown keys are errors (a typo must not silently fall back to a default), and every
//! error names the table and the field it is about.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::util::{parse_duration, validate_identifier};

/// The configuration used when no `--config` is given: the K2 bronze tables of the
/// guide, a ClickHouse on localhost and an embedded catalog and state store under
/// `./offload-data`.
pub const EMBEDDED_DEFAULTS: &str = include_str!("../deploy/config/default.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    service: RawService,
    clickhouse: RawClickHouse,
    catalog: RawCatalog,
    #[serde(default)]
    state: RawState,
    #[serde(default)]
    maintenance: RawMaintenance,
    #[serde(default)]
    tables: Vec<RawTable>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMaintenance {
    #[serde(default = "d_true")]
    enabled: bool,
    #[serde(default = "d_maintenance_at")]
    at: String,
    #[serde(default = "d_expire_every_commits")]
    expire_every_commits: u64,
    #[serde(default = "d_maintenance_timeout")]
    timeout: String,
    #[serde(default = "d_max_snapshot_age")]
    max_snapshot_age: String,
    #[serde(default = "d_min_snapshots_to_keep")]
    min_snapshots_to_keep: usize,
    #[serde(default = "d_true")]
    compact: bool,
    #[serde(default = "d_target_file_size_mb")]
    target_file_size_mb: u64,
    #[serde(default = "d_compact_after")]
    compact_after: String,
    #[serde(default = "d_compact_max_mb_per_run")]
    compact_max_mb_per_run: u64,
    #[serde(default = "d_manifests_max")]
    manifests_max: usize,
}

impl Default for RawMaintenance {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

fn d_true() -> bool {
    true
}
fn d_maintenance_at() -> String {
    "03:00".into()
}
fn d_expire_every_commits() -> u64 {
    96
}
fn d_maintenance_timeout() -> String {
    "5m".into()
}
fn d_max_snapshot_age() -> String {
    "5d".into()
}
fn d_min_snapshots_to_keep() -> usize {
    1
}
fn d_target_file_size_mb() -> u64 {
    128
}
fn d_compact_after() -> String {
    "1h".into()
}
fn d_compact_max_mb_per_run() -> u64 {
    4096
}
fn d_manifests_max() -> usize {
    100
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    #[serde(default = "d_interval")]
    interval: String,
    #[serde(default = "d_parallelism")]
    parallelism: usize,
    #[serde(default = "d_table_timeout")]
    table_timeout: String,
    #[serde(default = "d_retries")]
    retries: u32,
    #[serde(default = "d_retry_backoff")]
    retry_backoff: String,
    #[serde(default = "d_lease_ttl")]
    lease_ttl: String,
    #[serde(default = "d_listen")]
    metrics_listen: String,
    #[serde(default = "d_audit_recent_days")]
    audit_recent_days: u32,
    #[serde(default = "d_audit_full_every")]
    audit_full_every: String,
    #[serde(default = "d_member_timeout")]
    member_timeout: String,
}

fn d_member_timeout() -> String {
    "30s".into()
}

fn d_audit_recent_days() -> u32 {
    2
}
fn d_audit_full_every() -> String {
    "24h".into()
}

impl Default for RawService {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

fn d_interval() -> String {
    "15m".into()
}
fn d_parallelism() -> usize {
    4
}
fn d_table_timeout() -> String {
    "10m".into()
}
fn d_retries() -> u32 {
    2
}
fn d_retry_backoff() -> String {
    "5s".into()
}
fn d_lease_ttl() -> String {
    "20m".into()
}
fn d_listen() -> String {
    "0.0.0.0:8000".into()
}
fn d_settle() -> String {
    "5m".into()
}
fn d_max_rows() -> u64 {
    1_000_000
}
fn d_max_partitions() -> u32 {
    8
}
fn d_layer() -> String {
    "bronze".into()
}
fn d_columns() -> Vec<String> {
    vec!["*".into()]
}
fn d_ch_user() -> String {
    "default".into()
}
fn d_catalog_name() -> String {
    "offload".into()
}
fn d_catalog_type() -> String {
    "sql".into()
}
fn d_catalog_timeout() -> String {
    "30s".into()
}
fn d_commit_timeout() -> String {
    "60s".into()
}
fn d_storage_timeout() -> String {
    "60s".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClickHouse {
    url: String,
    #[serde(default = "d_ch_user")]
    user: String,
    password_env: Option<String>,
    password_file: Option<String>,
    ca_file: Option<String>,
    #[serde(default)]
    compression: Option<String>,
    #[serde(default)]
    query_timeout: Option<String>,
    #[serde(default)]
    max_clock_skew: Option<String>,
    iceberg_s3_collection: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalog {
    #[serde(rename = "type", default = "d_catalog_type")]
    kind: String,
    #[serde(default = "d_catalog_name")]
    name: String,
    uri: String,
    warehouse: Option<String>,
    password_env: Option<String>,
    password_file: Option<String>,
    token_env: Option<String>,
    credential_env: Option<String>,
    #[serde(default = "d_catalog_timeout")]
    timeout: String,
    #[serde(default = "d_commit_timeout")]
    commit_timeout: String,
    #[serde(default = "d_storage_timeout")]
    storage_timeout: String,
    #[serde(default)]
    properties: BTreeMap<String, String>,
    /// Catalog/storage properties whose values come from environment variables
    /// (e.g. `"s3.secret-access-key" = "AWS_SECRET_ACCESS_KEY"`).
    #[serde(default)]
    properties_env: BTreeMap<String, String>,
    /// The same, values read from files (a Kubernetes Secret mounted as a volume).
    #[serde(default)]
    properties_file: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawState {
    url: Option<String>,
    password_env: Option<String>,
    password_file: Option<String>,
    timeout: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    source: String,
    target: String,
    #[serde(default = "d_layer")]
    layer: String,
    cursor: String,
    tiebreak: Option<String>,
    #[serde(default = "d_settle")]
    settle_delay: String,
    #[serde(default = "d_max_rows")]
    max_rows_per_commit: u64,
    #[serde(default = "d_max_partitions")]
    max_partitions_per_commit: u32,
    #[serde(default)]
    uint64: Uint64As,
    #[serde(default)]
    integer_encoding: IntegerEncoding,
    #[serde(default)]
    partition: Vec<String>,
    #[serde(default = "d_columns")]
    columns: Vec<String>,
    #[serde(default, rename = "final")]
    read_final: ReadFinal,
    closed_after: Option<String>,
    view: Option<String>,
    evict_after: Option<String>,
}

/// Whether a table is read as ClickHouse answers it after merging (`SELECT … FINAL`, I12).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadFinal {
    /// `FINAL` for the merging engines (Summing, Aggregating, Replacing, Collapsing,
    /// VersionedCollapsing, Graphite MergeTree, replicated or not), as `system.tables` says.
    #[default]
    Auto,
    Always,
    Never,
}

/// How ClickHouse `UInt64` columns are stored in Iceberg, which has no unsigned types.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Uint64As {
    /// `decimal(20,0)`: every UInt64 value fits. Parquet stores it as 9-byte fixed-length
    /// values, which cost about a quarter of the encoding CPU of the K2 bronze schema.
    #[default]
    Decimal,
    /// `long`, read with ClickHouse's `accurateCast`: a value above 2^63-1 fails the window
    /// (nothing is committed) instead of wrapping. What the original K2 tables used
    /// (`sequence_number BIGINT`), and about 30 % cheaper to write than `decimal`.
    Long,
}

/// The Parquet encoding of integer-like columns (int, long, date, timestamp, decimal up to
/// 18 digits) once their dictionary gives up (high-cardinality values).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IntegerEncoding {
    /// `DELTA_BINARY_PACKED`: differences between neighbouring values, bit-packed. Timestamps,
    /// sequence numbers and prices arrive in ClickHouse's sort order, so the differences are
    /// small: 10M K2 bronze rows take 67 MB instead of 146 MB, for less CPU. Read by every
    /// current Parquet reader (Spark, Trino, pyarrow, DuckDB, ClickHouse).
    #[default]
    Delta,
    /// `PLAIN`: fixed-width values, for readers that only know Parquet's version-1 encodings.
    Plain,
}

/// Where a secret comes from. The value itself is read only when needed and never logged.
#[derive(Clone, Default)]
pub enum Secret {
    #[default]
    None,
    Env(String),
    File(PathBuf),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Secret::None => write!(f, "none"),
            Secret::Env(name) => write!(f, "env:{name}"),
            Secret::File(path) => write!(f, "file:{}", path.display()),
        }
    }
}

impl Secret {
    fn from_parts(env: Option<String>, file: Option<String>, base: &Path, field: &str) -> Result<Self, ConfigError> {
        match (env, file) {
            (Some(_), Some(_)) => {
                Err(ConfigError::Invalid(format!("{field}: set either password_env or password_file, not both")))
            }
            (Some(e), None) => Ok(Secret::Env(e)),
            (None, Some(f)) => Ok(Secret::File(resolve_path(base, &f))),
            (None, None) => Ok(Secret::None),
        }
    }

    /// Reads the secret. An unset environment variable or unreadable file is an error
    /// that names where the secret was expected, never its value.
    pub fn read(&self, what: &str) -> Result<Option<String>, ConfigError> {
        match self {
            Secret::None => Ok(None),
            Secret::Env(name) => std::env::var(name)
                .map(Some)
                .map_err(|_| ConfigError::Invalid(format!("{what}: environment variable {name} is not set"))),
            Secret::File(path) => std::fs::read_to_string(path)
                .map(|s| Some(s.trim_end_matches(['\n', '\r']).to_string()))
                .map_err(|e| ConfigError::Invalid(format!("{what}: cannot read {}: {e}", path.display()))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub service: ServiceConfig,
    pub clickhouse: ClickHouseConfig,
    pub catalog: CatalogConfig,
    pub state: StateConfig,
    pub maintenance: MaintenanceConfig,
    pub tables: Vec<TableConfig>,
}

/// `[maintenance]`: what `run` does to keep tables small and fast (see `crate::maintenance`).
#[derive(Debug, Clone)]
pub struct MaintenanceConfig {
    pub enabled: bool,
    /// Daily, at this UTC time.
    pub at: chrono::NaiveTime,
    /// Also after this many commits of a table since its last maintenance (0: never).
    pub expire_every_commits: u64,
    pub timeout: Duration,
    /// Defaults of `history.expire.max-snapshot-age-ms` / `min-snapshots-to-keep`; a table's
    /// own properties win.
    pub retention: Retention,
    /// Compaction of closed partitions and manifest merging (`[maintenance] compact`).
    pub compact: bool,
    pub compaction: CompactionPolicy,
}

/// How long snapshots are kept; the table's own properties win over these defaults
/// (`Retention::of`, in `maintenance::expire`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub max_age: Duration,
    pub min_keep: usize,
}

/// `[maintenance]` compaction settings.
#[derive(Debug, Clone, Copy)]
pub struct CompactionPolicy {
    /// `write.target-file-size-bytes` when the table does not set it.
    pub target_size: u64,
    /// A partition is closed once its newest row is this much older than `W`.
    pub after: Duration,
    /// At most this many bytes rewritten per run (the rest next run, oldest first).
    pub max_bytes: u64,
    /// Above this many manifests, every manifest of the default spec is merged.
    pub manifests_max: usize,
}

#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub interval: Duration,
    pub parallelism: usize,
    pub table_timeout: Duration,
    pub retries: u32,
    pub retry_backoff: Duration,
    pub lease_ttl: Duration,
    pub metrics_listen: String,
    /// The audit (I9): the last `audit_recent_days` days up to W every cycle (0: never)...
    pub audit_recent_days: u32,
    /// ...and every retained day once per `audit_full_every` (0s: never).
    pub audit_full_every: Duration,
    /// A `run` replica whose heartbeat is older than this is gone: its tables go to the live
    /// replicas at their next cycle, and its leases are taken over at once.
    pub member_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct ClickHouseConfig {
    pub url: String,
    pub user: String,
    pub password: Secret,
    pub ca_file: Option<PathBuf>,
    /// Arrow IPC compression asked of ClickHouse: `lz4` (default, good over a network) or `none`.
    pub compression: String,
    pub query_timeout: Duration,
    /// How far this host's clock may be from ClickHouse's before a table fails (I1: windows
    /// are cut on ClickHouse's clock; a larger skew means a broken time service somewhere).
    pub max_clock_skew: Duration,
    /// I13: the ClickHouse named collection with which views read a warehouse on S3 (its
    /// credentials stay in ClickHouse, never in a view's text).
    pub iceberg_s3_collection: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum CatalogKind {
    Sql,
    Rest,
}

#[derive(Debug, Clone)]
pub struct CatalogConfig {
    pub kind: CatalogKind,
    pub name: String,
    pub uri: String,
    pub warehouse: Option<String>,
    pub password: Secret,
    pub token: Secret,
    pub credential: Secret,
    pub properties: BTreeMap<String, String>,
    pub properties_env: BTreeMap<String, String>,
    /// Property → file holding its value (trailing newline trimmed).
    pub properties_file: BTreeMap<String, PathBuf>,
    pub limits: CatalogLimits,
}

/// I10: time limits of the calls to the catalog and to object storage.
#[derive(Debug, Clone, Copy)]
pub struct CatalogLimits {
    /// Each catalog call but a commit (load, create, exists, …).
    pub call: Duration,
    /// One commit: manifests written and the catalog's compare-and-swap. A commit that
    /// runs past it has an unknown outcome: the attempt is pending (I5).
    pub commit: Duration,
    /// Each object-storage operation outside the streamed window write (deletes, the
    /// attempt journal, manifest reads).
    pub storage: Duration,
}

impl Default for CatalogLimits {
    fn default() -> Self {
        Self { call: Duration::from_secs(30), commit: Duration::from_secs(60), storage: Duration::from_secs(60) }
    }
}

impl CatalogLimits {
    /// How long a commit already sent when the table's time is up may still take, resolving
    /// its outcome included: the commit, one reload of the table, and the journal and file
    /// operations that follow (README: "Time limits").
    pub fn commit_allowance(&self) -> Duration {
        self.commit + self.call + self.storage * 2
    }
}

#[derive(Debug, Clone)]
pub struct StateConfig {
    pub url: String,
    pub password: Secret,
    /// Each state-store statement (the pool's wait for a connection included).
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct TableConfig {
    pub source_db: String,
    pub source_table: String,
    pub target_namespace: String,
    pub target_table: String,
    pub layer: String,
    pub cursor: String,
    pub tiebreak: Option<String>,
    pub settle_delay: Duration,
    pub max_rows_per_commit: u64,
    /// How many partitions of a time transform of the cursor (`day(cursor)`, …) one window may
    /// span: each open partition costs a Parquet writer's memory.
    pub max_partitions_per_commit: u32,
    /// The Iceberg type of UInt64 columns.
    pub uint64: Uint64As,
    pub integer_encoding: IntegerEncoding,
    pub partition: Vec<PartitionField>,
    /// `None` means all columns.
    pub columns: Option<Vec<String>>,
    /// I12: read the table after merging (`FINAL`).
    pub read_final: ReadFinal,
    /// I12: how long after its cursor value a row's key can still change (an open bar): a row
    /// is taken once cursor + `closed_after` + `settle_delay` has passed.
    pub closed_after: Duration,
    /// I13: the ClickHouse view that serves both tiers as one table (`database.view`).
    pub view: Option<ViewName>,
    /// Hot partitions whose newest row is older than this are dropped once Iceberg provably
    /// holds them (`evict`).
    pub evict_after: Option<Duration>,
}

/// A ClickHouse view's database and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewName {
    pub db: String,
    pub name: String,
}

impl std::fmt::Display for ViewName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.db, self.name)
    }
}

impl TableConfig {
    /// The name operators see in metrics, logs and the state store: the source table name
    /// (e.g. `bronze_trades_binance`), as in the guide.
    pub fn name(&self) -> &str {
        &self.source_table
    }
    pub fn source(&self) -> String {
        format!("{}.{}", self.source_db, self.source_table)
    }
    pub fn target(&self) -> String {
        format!("{}.{}", self.target_namespace, self.target_table)
    }

    /// Whether a window may hold many partitions at once: a partition field that is not a time
    /// transform of the cursor (`day(event_time)` under an arrival cursor, `bucket(64, id)`).
    /// Such windows are read sorted by partition and written one partition at a time.
    pub fn writes_clustered(&self) -> bool {
        self.partition
            .iter()
            .any(|f| !(f.column == self.cursor && matches!(f.transform.as_str(), "year" | "month" | "day" | "hour")))
    }

    /// Where a window starting at `first_ns` (the cursor of its first row) must end so that it
    /// spans at most `max_partitions_per_commit` partitions of the finest time transform of the
    /// cursor in the partition spec: the start of the first partition after them, in ns since
    /// the epoch (UTC, as Iceberg's transforms). `None` when no partition field is a time
    /// transform of the cursor, or the bound is past the representable range.
    pub fn partition_span_end_ns(&self, first_ns: i64) -> Option<i64> {
        use chrono::{DateTime, Datelike, Duration, Months, NaiveDate, Timelike, Utc};
        let finest = self
            .partition
            .iter()
            .filter(|f| f.column == self.cursor)
            .filter_map(|f| match f.transform.as_str() {
                "hour" => Some(0),
                "day" => Some(1),
                "month" => Some(2),
                "year" => Some(3),
                _ => None,
            })
            .min()?;
        let k = self.max_partitions_per_commit;
        let t: DateTime<Utc> = DateTime::from_timestamp_nanos(first_ns);
        let date = t.date_naive();
        let end = match finest {
            0 => date.and_hms_opt(t.hour(), 0, 0)?.and_utc().checked_add_signed(Duration::hours(k.into()))?,
            1 => date.and_hms_opt(0, 0, 0)?.and_utc().checked_add_signed(Duration::days(k.into()))?,
            2 => NaiveDate::from_ymd_opt(date.year(), date.month(), 1)?
                .checked_add_months(Months::new(k))?
                .and_hms_opt(0, 0, 0)?
                .and_utc(),
            _ => NaiveDate::from_ymd_opt(date.year().checked_add(k as i32)?, 1, 1)?.and_hms_opt(0, 0, 0)?.and_utc(),
        };
        end.timestamp_nanos_opt()
    }
}

/// One field of a partition spec, e.g. `day(exchange_timestamp)` or `identity(symbol)`.
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionField {
    pub transform: String,
    pub column: String,
}

impl PartitionField {
    fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let (transform, column) = match t.find('(') {
            Some(open) if t.ends_with(')') => {
                let inner = &t[open + 1..t.len() - 1];
                let name = t[..open].trim().to_ascii_lowercase();
                // bucket[N] / truncate[N] are written bucket(16, col) in Spark SQL; accept that form.
                if let Some((n, col)) = inner.split_once(',') {
                    (format!("{name}[{}]", n.trim()), col.trim().to_string())
                } else {
                    (name, inner.trim().to_string())
                }
            }
            None => ("identity".to_string(), t.to_string()),
            _ => return Err(format!("invalid partition field {text:?}: expected e.g. day(exchange_timestamp)")),
        };
        let transform = match transform.as_str() {
            "days" => "day".to_string(),
            "months" => "month".to_string(),
            "years" => "year".to_string(),
            "hours" => "hour".to_string(),
            _ => transform,
        };
        let known = ["identity", "year", "month", "day", "hour"];
        if !known.contains(&transform.as_str())
            && !transform.starts_with("bucket[")
            && !transform.starts_with("truncate[")
        {
            return Err(format!(
                "invalid partition field {text:?}: unknown transform {transform:?} (identity, year, month, day, hour, bucket(N, col), truncate(N, col))"
            ));
        }
        Ok(PartitionField { transform, column })
    }
}

fn resolve_path(base: &Path, p: &str) -> PathBuf {
    let path = PathBuf::from(p);
    if path.is_absolute() { path } else { base.join(path) }
}

/// Turns `sqlite:relative/path.db` into an absolute SQLite URL relative to `base`.
fn resolve_sqlite_url(base: &Path, url: &str) -> String {
    if let Some(rest) = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")) {
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        let abs = resolve_path(base, path);
        let query = query.map(|q| q.to_string()).unwrap_or_else(|| "mode=rwc".into());
        format!("sqlite://{}?{}", abs.display(), query)
    } else {
        url.to_string()
    }
}

fn resolve_file_url(base: &Path, url: &str) -> String {
    if url.contains("://") { url.to_string() } else { format!("file://{}", resolve_path(base, url).display()) }
}

/// A `config: …` error with the message given.
fn inv(m: String) -> ConfigError {
    ConfigError::Invalid(m)
}

/// Parses the duration `v` of `field`, naming the field if it is invalid.
fn dur(field: &str, v: &str) -> Result<Duration, ConfigError> {
    parse_duration(v).map_err(|e| inv(format!("{field}: {e}")))
}

impl Config {
    /// Loads a config file; relative paths inside it are relative to the file's folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        let base = std::fs::canonicalize(&base).unwrap_or(base);
        Self::parse(&text, &path.display().to_string(), &base)
    }

    /// The embedded defaults; relative paths are relative to the working directory.
    pub fn embedded() -> Result<Self, ConfigError> {
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        Self::parse(EMBEDDED_DEFAULTS, "<embedded defaults>", &cwd)
    }

    pub fn parse(text: &str, origin: &str, base: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        // One section after the other, in this order: the first invalid field is the one reported.
        let service = Self::parse_service(raw.service)?;
        let clickhouse = Self::parse_clickhouse(raw.clickhouse, base)?;
        let catalog = Self::parse_catalog(raw.catalog, base)?;
        let state = Self::parse_state(raw.state, base)?;
        let tables = Self::parse_tables(raw.tables)?;
        let maintenance = Self::parse_maintenance(raw.maintenance)?;
        Ok(Config { service, clickhouse, catalog, state, maintenance, tables })
    }

    /// `[service]`: durations, and the bounds that keep leases and heartbeats consistent.
    fn parse_service(s: RawService) -> Result<ServiceConfig, ConfigError> {
        if s.parallelism == 0 {
            return Err(inv("service.parallelism must be at least 1".into()));
        }
        let service = ServiceConfig {
            interval: dur("service.interval", &s.interval)?,
            parallelism: s.parallelism,
            table_timeout: dur("service.table_timeout", &s.table_timeout)?,
            retries: s.retries,
            retry_backoff: dur("service.retry_backoff", &s.retry_backoff)?,
            lease_ttl: dur("service.lease_ttl", &s.lease_ttl)?,
            metrics_listen: s.metrics_listen,
            audit_recent_days: s.audit_recent_days,
            audit_full_every: dur("service.audit_full_every", &s.audit_full_every)?,
            member_timeout: dur("service.member_timeout", &s.member_timeout)?,
        };
        if service.member_timeout > service.lease_ttl {
            return Err(inv(format!(
                "service.member_timeout ({:?}) must not exceed service.lease_ttl ({:?}): a replica found gone has its leases taken over",
                service.member_timeout, service.lease_ttl
            )));
        }
        if service.member_timeout < Duration::from_secs(3) {
            return Err(inv(
                "service.member_timeout must be at least 3s (replicas heartbeat every second or more)".into()
            ));
        }
        if service.interval < Duration::from_secs(1) {
            return Err(inv("service.interval must be at least 1s".into()));
        }
        Ok(service)
    }

    /// `[clickhouse]`: the URL must parse; relative paths are relative to `base`.
    fn parse_clickhouse(ch: RawClickHouse, base: &Path) -> Result<ClickHouseConfig, ConfigError> {
        url::Url::parse(&ch.url).map_err(|e| inv(format!("clickhouse.url {:?}: {e}", ch.url)))?;
        let compression = ch.compression.unwrap_or_else(|| "lz4".into());
        if !["lz4", "zstd", "none"].contains(&compression.as_str()) {
            return Err(inv(format!("clickhouse.compression {compression:?}: use lz4, zstd or none")));
        }
        Ok(ClickHouseConfig {
            password: Secret::from_parts(ch.password_env, ch.password_file, base, "clickhouse")?,
            url: ch.url,
            user: ch.user,
            ca_file: ch.ca_file.map(|f| resolve_path(base, &f)),
            compression,
            query_timeout: dur("clickhouse.query_timeout", ch.query_timeout.as_deref().unwrap_or("10m"))?,
            max_clock_skew: dur("clickhouse.max_clock_skew", ch.max_clock_skew.as_deref().unwrap_or("15m"))?,
            iceberg_s3_collection: match ch.iceberg_s3_collection {
                Some(c) => {
                    validate_identifier("clickhouse.iceberg_s3_collection", &c).map_err(inv)?;
                    Some(c)
                }
                None => None,
            },
        })
    }

    /// `[catalog]`: its kind (the SQL one needs a warehouse); relative URLs and paths resolve against `base`.
    fn parse_catalog(c: RawCatalog, base: &Path) -> Result<CatalogConfig, ConfigError> {
        let kind = match c.kind.as_str() {
            "sql" => CatalogKind::Sql,
            "rest" => CatalogKind::Rest,
            other => return Err(inv(format!("catalog.type {other:?}: use \"sql\" or \"rest\""))),
        };
        if kind == CatalogKind::Sql && c.warehouse.is_none() {
            return Err(inv("catalog.warehouse is required for the sql catalog".into()));
        }
        Ok(CatalogConfig {
            uri: if kind == CatalogKind::Sql { resolve_sqlite_url(base, &c.uri) } else { c.uri },
            warehouse: c.warehouse.map(|w| resolve_file_url(base, &w)),
            password: Secret::from_parts(c.password_env, c.password_file, base, "catalog")?,
            token: c.token_env.map(Secret::Env).unwrap_or_default(),
            credential: c.credential_env.map(Secret::Env).unwrap_or_default(),
            kind,
            name: c.name,
            properties: c.properties,
            properties_env: c.properties_env,
            properties_file: c.properties_file.into_iter().map(|(k, f)| (k, resolve_path(base, &f))).collect(),
            limits: CatalogLimits {
                call: dur("catalog.timeout", &c.timeout)?,
                commit: dur("catalog.commit_timeout", &c.commit_timeout)?,
                storage: dur("catalog.storage_timeout", &c.storage_timeout)?,
            },
        })
    }

    /// `[state]`: the state store, by default an SQLite file under `offload-data/`.
    fn parse_state(s: RawState, base: &Path) -> Result<StateConfig, ConfigError> {
        Ok(StateConfig {
            url: resolve_sqlite_url(base, s.url.as_deref().unwrap_or("sqlite:offload-data/state.db")),
            password: Secret::from_parts(s.password_env, s.password_file, base, "state")?,
            timeout: dur("state.timeout", s.timeout.as_deref().unwrap_or("10s"))?,
        })
    }

    /// `[[tables]]`: each table checked alone, then no two sharing a target or a source table name.
    fn parse_tables(raw: Vec<RawTable>) -> Result<Vec<TableConfig>, ConfigError> {
        let mut tables = Vec::new();
        let mut targets = HashSet::new();
        let mut names = HashSet::new();
        for (i, t) in raw.into_iter().enumerate() {
            let table = Self::table(i, t)?;
            if !targets.insert(table.target()) {
                return Err(inv(format!(
                    "tables[{i}] ({}): target {} is already the target of another table; two sources cannot share one target",
                    table.source(),
                    table.target()
                )));
            }
            if !names.insert(table.name().to_string()) {
                return Err(inv(format!(
                    "tables[{i}] ({}): another table has the same source table name {:?}; names must be unique",
                    table.source(),
                    table.name()
                )));
            }
            tables.push(table);
        }
        if tables.is_empty() {
            return Err(inv("no [[tables]] configured".into()));
        }
        Self::check_views(&tables)?;
        Ok(tables)
    }

    /// Each view serves one table and replaces nothing else: not another table's view, not a
    /// configured source.
    fn check_views(tables: &[TableConfig]) -> Result<(), ConfigError> {
        let mut views = HashSet::new();
        for (i, t) in tables.iter().enumerate() {
            let Some(v) = &t.view else { continue };
            if !views.insert(v.to_string()) {
                return Err(inv(format!("tables[{i}] ({}): view {v} is already another table's view", t.source())));
            }
            if let Some(other) = tables.iter().find(|o| o.source() == v.to_string()) {
                return Err(inv(format!(
                    "tables[{i}] ({}): view {v} is the source of {}; the view would replace it",
                    t.source(),
                    other.name()
                )));
            }
        }
        Ok(())
    }

    /// `[maintenance]`: the daily time, retention and compaction policy.
    fn parse_maintenance(m: RawMaintenance) -> Result<MaintenanceConfig, ConfigError> {
        Ok(MaintenanceConfig {
            enabled: m.enabled,
            at: chrono::NaiveTime::parse_from_str(&m.at, "%H:%M")
                .map_err(|_| inv(format!("maintenance.at {:?}: expected a UTC time such as \"03:00\"", m.at)))?,
            expire_every_commits: m.expire_every_commits,
            timeout: dur("maintenance.timeout", &m.timeout)?,
            retention: Retention {
                max_age: dur("maintenance.max_snapshot_age", &m.max_snapshot_age)?,
                min_keep: m.min_snapshots_to_keep.max(1),
            },
            compact: m.compact,
            compaction: CompactionPolicy {
                target_size: m.target_file_size_mb.max(1) * 1024 * 1024,
                after: dur("maintenance.compact_after", &m.compact_after)?,
                max_bytes: m.compact_max_mb_per_run.max(1) * 1024 * 1024,
                manifests_max: m.manifests_max.max(2),
            },
        })
    }

    fn table(i: usize, t: RawTable) -> Result<TableConfig, ConfigError> {
        let ctx = format!("tables[{i}] ({})", t.source);
        let inv = |m: String| ConfigError::Invalid(format!("{ctx}: {m}"));
        let (db, table) =
            t.source.split_once('.').ok_or_else(|| inv(format!("source {:?} must be \"database.table\"", t.source)))?;
        let (ns, target) = t
            .target
            .split_once('.')
            .ok_or_else(|| inv(format!("target {:?} must be \"namespace.table\"", t.target)))?;
        validate_identifier("source database", db).map_err(inv)?;
        validate_identifier("source table", table).map_err(inv)?;
        validate_identifier("target namespace", ns).map_err(inv)?;
        validate_identifier("target table", target).map_err(inv)?;
        validate_identifier("cursor", &t.cursor).map_err(inv)?;
        validate_identifier("layer", &t.layer).map_err(inv)?;
        if let Some(tb) = &t.tiebreak {
            validate_identifier("tiebreak", tb).map_err(inv)?;
        }
        if t.max_rows_per_commit == 0 {
            return Err(inv("max_rows_per_commit must be at least 1".into()));
        }
        if t.max_partitions_per_commit == 0 {
            return Err(inv("max_partitions_per_commit must be at least 1".into()));
        }
        let columns = if t.columns.len() == 1 && t.columns[0] == "*" {
            None
        } else {
            for c in &t.columns {
                validate_identifier("column", c).map_err(inv)?;
            }
            for needed in std::iter::once(&t.cursor).chain(t.tiebreak.iter()) {
                if !t.columns.contains(needed) {
                    return Err(inv(format!("columns must include the cursor/tiebreak column {needed:?}")));
                }
            }
            Some(t.columns.clone())
        };
        let partition = t
            .partition
            .iter()
            .map(|p| {
                let f = PartitionField::parse(p).map_err(inv)?;
                validate_identifier("partition column", &f.column).map_err(inv)?;
                Ok(f)
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        Ok(TableConfig {
            source_db: db.into(),
            source_table: table.into(),
            target_namespace: ns.into(),
            target_table: target.into(),
            layer: t.layer,
            cursor: t.cursor,
            tiebreak: t.tiebreak,
            settle_delay: parse_duration(&t.settle_delay).map_err(|e| inv(format!("settle_delay: {e}")))?,
            max_rows_per_commit: t.max_rows_per_commit,
            max_partitions_per_commit: t.max_partitions_per_commit,
            uint64: t.uint64,
            integer_encoding: t.integer_encoding,
            partition,
            columns,
            read_final: t.read_final,
            closed_after: match &t.closed_after {
                None => Duration::ZERO,
                Some(d) => parse_duration(d).map_err(|e| inv(format!("closed_after: {e}")))?,
            },
            view: t.view.as_deref().map(|v| view_name(v, db, table)).transpose().map_err(inv)?,
            evict_after: t.evict_after.as_deref().map(evict_after).transpose().map_err(inv)?,
        })
        .and_then(|table| eviction_fits(table).map_err(inv))
    }
}

/// `evict_after` needs the view and every column.
fn eviction_fits(table: TableConfig) -> Result<TableConfig, String> {
    match (table.evict_after, &table.view, &table.columns) {
        (Some(_), None, _) => Err("evict_after needs a view (tables[].view): eviction proves a partition held by \
             reading Iceberg through it, and readers find the evicted rows there"
            .into()),
        (Some(_), _, Some(_)) => Err("evict_after needs every column offloaded (columns = [\"*\"]): dropping a \
             partition would lose the columns left out"
            .into()),
        _ => Ok(table),
    }
}

/// `evict_after`: an hour at least (partitions are days or more, and proved offloaded first).
fn evict_after(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text).map_err(|e| format!("evict_after: {e}"))?;
    if d < Duration::from_secs(3600) {
        return Err(format!(
            "evict_after {text:?} is under an hour; eviction drops whole partitions of a day or more, after their rows \
             are offloaded and audited: use a margin such as \"2d\""
        ));
    }
    Ok(d)
}

/// `view = "database.view"`: a name of its own (the source's name would replace the table).
fn view_name(text: &str, source_db: &str, source_table: &str) -> Result<ViewName, String> {
    let (db, name) = text.split_once('.').ok_or_else(|| format!("view {text:?} must be \"database.view\""))?;
    validate_identifier("view database", db)?;
    validate_identifier("view", name)?;
    if db == source_db && name == source_table {
        return Err(format!("view {text:?} is the source table itself; give the view a name of its own"));
    }
    Ok(ViewName { db: db.into(), name: name.into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[clickhouse]
url = "http://127.0.0.1:8123"
[catalog]
uri = "sqlite:cat.db"
warehouse = "wh"
[[tables]]
source = "k2.bronze_trades_binance"
target = "cold.bronze_trades_binance"
cursor = "exchange_timestamp"
tiebreak = "sequence_number"
partition = ["day(exchange_timestamp)"]
"#;

    #[test]
    fn embedded_defaults_parse() {
        let c = Config::embedded().unwrap();
        assert_eq!(c.tables.len(), 2);
        assert_eq!(c.service.interval, Duration::from_secs(900));
        assert_eq!(c.service.table_timeout, Duration::from_secs(600));
        assert_eq!(c.tables[0].settle_delay, Duration::from_secs(300));
    }

    #[test]
    fn relative_paths_resolve_against_the_file() {
        let c = Config::parse(MINIMAL, "t.toml", Path::new("/etc/offload")).unwrap();
        assert_eq!(c.catalog.uri, "sqlite:///etc/offload/cat.db?mode=rwc");
        assert_eq!(c.catalog.warehouse.as_deref(), Some("file:///etc/offload/wh"));
        assert_eq!(
            c.tables[0].partition[0],
            PartitionField { transform: "day".into(), column: "exchange_timestamp".into() }
        );
    }

    fn ns(text: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(text).unwrap().timestamp_nanos_opt().unwrap()
    }

    #[test]
    fn a_window_spans_at_most_max_partitions_of_the_cursor() {
        let c = Config::parse(MINIMAL, "t.toml", Path::new("/")).unwrap();
        let mut t = c.tables[0].clone();
        assert_eq!(t.max_partitions_per_commit, 8, "default");
        let first = ns("2026-02-27T23:59:59.999Z");
        // day(cursor): the window ends where the 8th day after the first row's day ends.
        assert_eq!(t.partition_span_end_ns(first), Some(ns("2026-03-07T00:00:00Z")));
        t.max_partitions_per_commit = 1;
        assert_eq!(t.partition_span_end_ns(first), Some(ns("2026-02-28T00:00:00Z")));
        // The finest time transform of the cursor decides.
        t.partition = vec![
            PartitionField { transform: "month".into(), column: "exchange_timestamp".into() },
            PartitionField { transform: "hour".into(), column: "exchange_timestamp".into() },
        ];
        t.max_partitions_per_commit = 3;
        assert_eq!(t.partition_span_end_ns(first), Some(ns("2026-02-28T02:00:00Z")));
        t.partition.pop();
        assert_eq!(t.partition_span_end_ns(first), Some(ns("2026-05-01T00:00:00Z")));
        t.partition = vec![PartitionField { transform: "year".into(), column: "exchange_timestamp".into() }];
        assert_eq!(t.partition_span_end_ns(ns("1969-07-20T20:17:00Z")), Some(ns("1972-01-01T00:00:00Z")));
        // Not a time transform of the cursor: no bound.
        t.partition = vec![
            PartitionField { transform: "identity".into(), column: "symbol".into() },
            PartitionField { transform: "day".into(), column: "event_time".into() },
        ];
        assert_eq!(t.partition_span_end_ns(first), None);
        let err = Config::parse(
            &MINIMAL.replace("partition =", "max_partitions_per_commit = 0\npartition ="),
            "t.toml",
            Path::new("/"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("max_partitions_per_commit"), "{err}");
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let text = MINIMAL.replace("tiebreak =", "tie_break =");
        let err = Config::parse(&text, "t.toml", Path::new("/")).unwrap_err().to_string();
        assert!(err.contains("tie_break"), "{err}");
    }

    #[test]
    fn a_view_needs_a_name_of_its_own() {
        let with = |view: &str| {
            Config::parse(
                &MINIMAL.replace("tiebreak =", &format!("view = {view:?}\ntiebreak =")),
                "t.toml",
                Path::new("/"),
            )
        };
        let ok = with("k2.trades_all").unwrap();
        assert_eq!(ok.tables[0].view.as_ref().unwrap().to_string(), "k2.trades_all");
        let err = with("k2.bronze_trades_binance").unwrap_err().to_string();
        assert!(
            err.contains("tables[0] (k2.bronze_trades_binance)") && err.contains("the source table itself"),
            "{err}"
        );
        let err = with("trades_all").unwrap_err().to_string();
        assert!(err.contains("must be \"database.view\""), "{err}");
        let err = with("k2.all; DROP").unwrap_err().to_string();
        assert!(err.contains("not a valid identifier"), "{err}");
    }

    #[test]
    fn two_tables_one_target_is_refused() {
        let text = format!(
            "{MINIMAL}\n[[tables]]\nsource = \"k2.other\"\ntarget = \"cold.bronze_trades_binance\"\ncursor = \"ts\"\n"
        );
        let err = Config::parse(&text, "t.toml", Path::new("/")).unwrap_err().to_string();
        assert!(err.contains("cold.bronze_trades_binance") && err.contains("tables[1]"), "{err}");
    }

    #[test]
    fn injection_in_identifiers_is_refused() {
        let text = MINIMAL.replace("cursor = \"exchange_timestamp\"", "cursor = \"ts) OR 1=1 --\"");
        let err = Config::parse(&text, "t.toml", Path::new("/")).unwrap_err().to_string();
        assert!(err.contains("cursor") && err.contains("tables[0]"), "{err}");
    }
}
