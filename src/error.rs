//! Typed errors of one table's offload, and their classification for metrics and retries.

use std::fmt;

/// The guide's `error_type` label of `offload_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The per-table timeout fired; the work was cancelled before it could commit.
    Timeout,
    /// A dependency (ClickHouse, catalog, state store) could not be reached.
    Connection,
    /// A dependency answered with an error, or the data was not what we expected.
    ProcessError,
    /// A panic or an internal invariant broke.
    Crash,
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 4] = [Self::Timeout, Self::Connection, Self::ProcessError, Self::Crash];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Connection => "connection",
            Self::ProcessError => "process_error",
            Self::Crash => "crash",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the outcome of a commit is not known (I5). The attempt is *pending*: its files are
/// kept, and it is resolved later from the table's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PendingCause {
    /// The commit ran past `catalog.commit_timeout` after it was sent.
    Timeout,
    /// The connection to the catalog broke while the commit was under way.
    Connection,
    /// The catalog answered with an error that does not say whether it applied the commit
    /// (REST 500/502/504, a response that cannot be parsed, …).
    ServerError,
    /// The catalog reported success, but reading it again does not show the commit (a lost
    /// SQL COMMIT, a lagging replica, a caching proxy).
    Unconfirmed,
    /// The process died while the commit was under way (found in the journal at start).
    Interrupted,
}

impl PendingCause {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Connection => "connection",
            Self::ServerError => "server_error",
            Self::Unconfirmed => "unconfirmed",
            Self::Interrupted => "interrupted",
        }
    }
}

impl fmt::Display for PendingCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Timeout => "the commit timed out",
            Self::Connection => "the connection to the catalog broke during the commit",
            Self::ServerError => "the catalog answered with an error that leaves the commit state unknown",
            Self::Unconfirmed => "the catalog reported success but does not show the commit when read again",
            Self::Interrupted => "the process died during the commit",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OffloadError {
    #[error("timed out after {0:?}; the window was abandoned before its commit")]
    Timeout(std::time::Duration),
    #[error("cancelled (shutdown); the window was abandoned before its commit")]
    Cancelled,
    #[error("cannot reach ClickHouse at {url}: {message}")]
    ClickHouseUnreachable { url: String, message: String },
    #[error("ClickHouse error {code}: {message}")]
    ClickHouse { code: u32, message: String },
    #[error("ClickHouse stream broke: {0}")]
    ClickHouseStream(String),
    #[error("{0}")]
    UnsupportedServer(String),
    /// Bad input: the configuration and the source or target disagree. Not retried.
    #[error("table {table}: {message}")]
    Schema { table: String, message: String },
    /// A definite refusal (I4): the catalog's compare-and-swap or requirement check refused
    /// the commit. Nothing was appended; the attempt's files are deleted.
    #[error("table {table}: commit refused because the table changed since it was read (another writer?): {source}")]
    CommitConflict {
        table: String,
        #[source]
        source: Box<iceberg::Error>,
    },
    /// I5: the commit may or may not have landed. Its files are kept and recorded in the
    /// table's attempt journal until the table's history says which.
    #[error(
        "table {table}: the outcome of commit {run_id} is unknown ({cause}); its files are kept and it will be resolved from the table's history before anything is deleted"
    )]
    CommitPending {
        table: String,
        run_id: String,
        cause: PendingCause,
        #[source]
        source: Option<Box<iceberg::Error>>,
    },
    /// I11: the configuration changed what the watermark is measured on.
    #[error(
        "table {table}: its watermark was measured on {field} {recorded}, the configuration now says {configured}; continuing would skip or repeat rows. Put the configuration back, offload into a new target, or move the watermark on purpose: `iceberg-offload watermark set {name} --to current` (re-records it for the new configuration; add --to <position> to move it too) shows what would change, and --apply does it"
    )]
    WatermarkMeasuredOnOther { table: String, name: String, field: &'static str, recorded: String, configured: String },
    /// I1: this host's clock and ClickHouse's disagree by more than `clickhouse.max_clock_skew`.
    #[error(
        "table {table}: ClickHouse's clock is {skew_seconds:+.1} s from this host's, more than clickhouse.max_clock_skew ({max:?}) allows; windows are cut on ClickHouse's clock, but a skew this large means a broken time service: fix NTP on one of them, or raise the bound"
    )]
    ClockSkew { table: String, skew_seconds: f64, max: std::time::Duration },
    /// I1: ClickHouse answered with fewer rows than the window holds. Nothing was committed.
    #[error(
        "table {table}: the window read {read} rows where {planned} were planned, so ClickHouse returned an incomplete result (a limit of the user's profile that does not fail the query, a replica or part that lost rows between planning and reading?); nothing was committed. If the server limits results, set tables[].max_rows_per_commit below that limit or lift it for this user"
    )]
    IncompleteWindow { table: String, planned: u64, read: u64 },
    #[error("Iceberg catalog unreachable: {0}")]
    CatalogUnreachable(String),
    #[error("Iceberg: {0}")]
    Iceberg(#[source] iceberg::Error),
    /// The catalog answered 401/403: credentials missing, wrong or without the right grants.
    #[error(
        "the Iceberg catalog refused our credentials ({0}); check catalog.token_env / credential_env (REST) or the catalog password, and the grants on the namespace"
    )]
    CatalogAuth(String),
    #[error("state store: {0}")]
    State(String),
    #[error("state store unreachable: {0}")]
    StateUnreachable(String),
    #[error("lease for table {table} is held by {holder} until {until}")]
    LeaseHeld { table: String, holder: String, until: String },
    /// The audit cannot count a table (delete files of another engine, a cursor type).
    #[error("audit: {0}")]
    Audit(String),
    #[error("internal error: {0}")]
    Crash(String),
}

impl OffloadError {
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Timeout(_) | Self::Cancelled => ErrorClass::Timeout,
            Self::CommitPending { cause: PendingCause::Timeout, .. } => ErrorClass::Timeout,
            Self::CommitPending { cause: PendingCause::Connection, .. } => ErrorClass::Connection,
            Self::ClickHouseUnreachable { .. }
            | Self::ClickHouseStream(_)
            | Self::CatalogUnreachable(_)
            | Self::StateUnreachable(_) => ErrorClass::Connection,
            Self::Iceberg(e) if catalog_timed_out(e) => ErrorClass::Timeout,
            Self::Iceberg(e) if is_connection_error(e) => ErrorClass::Connection,
            Self::Crash(_) => ErrorClass::Crash,
            _ => ErrorClass::ProcessError,
        }
    }

    /// Whether a retry within the same cycle can help.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::ClickHouseUnreachable { .. }
            | Self::ClickHouseStream(_)
            | Self::CatalogUnreachable(_)
            | Self::StateUnreachable(_)
            | Self::CommitConflict { .. }
            | Self::CommitPending { .. } => true,
            // Server-side errors that are about load, not about the query.
            Self::ClickHouse { code, .. } => matches!(code, 159 | 160 | 164 | 202 | 209 | 210 | 241 | 394 | 1002),
            Self::Iceberg(e) => e.retryable() || is_connection_error(e) || catalog_timed_out(e),
            _ => false,
        }
    }

    /// A short machine-friendly name of the variant, stored in the run history.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Timeout(_) => "timeout",
            Self::Cancelled => "cancelled",
            Self::ClickHouseUnreachable { .. } => "clickhouse_unreachable",
            Self::ClickHouse { .. } => "clickhouse_error",
            Self::ClickHouseStream(_) => "clickhouse_stream",
            Self::UnsupportedServer(_) => "unsupported_server",
            Self::Schema { .. } => "schema",
            Self::CommitConflict { .. } => "commit_conflict",
            Self::CommitPending { .. } => "commit_pending",
            Self::IncompleteWindow { .. } => "incomplete_window",
            Self::ClockSkew { .. } => "clock_skew",
            Self::WatermarkMeasuredOnOther { .. } => "watermark_measured_on_other",
            Self::CatalogUnreachable(_) => "catalog_unreachable",
            Self::Iceberg(_) => "iceberg",
            Self::CatalogAuth(_) => "catalog_auth",
            Self::State(_) => "state",
            Self::StateUnreachable(_) => "state_unreachable",
            Self::LeaseHeld { .. } => "lease_held",
            Self::Audit(_) => "audit",
            Self::Crash(_) => "crash",
        }
    }
}

impl From<iceberg::Error> for OffloadError {
    fn from(e: iceberg::Error) -> Self {
        let text = format!("{e}");
        for status in ["401 Unauthorized", "403 Forbidden"] {
            if text.contains(status) {
                return OffloadError::CatalogAuth(format!("HTTP {status}"));
            }
        }
        OffloadError::Iceberg(e)
    }
}

/// The causes of an error, outermost first (the error itself included).
pub fn causes<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |e| e.source())
}

/// The first cause of type `T` in the chain, classified by type, never by message text.
pub fn cause_of<'a, T: std::error::Error + 'static>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a T> {
    causes(e).find_map(|c| c.downcast_ref::<T>())
}

/// A catalog call that ran past its limit (`sink::catalog::TimeLimited`).
pub fn catalog_timed_out(e: &iceberg::Error) -> bool {
    cause_of::<CallTimedOut>(e).is_some()
}

/// Whether the error comes from a connection that could not be made or broke: the HTTP
/// client's or the SQL driver's own error types, or an I/O error, anywhere in the chain.
pub fn is_connection_error(e: &iceberg::Error) -> bool {
    causes(e).any(|c| {
        if let Some(r) = c.downcast_ref::<reqwest::Error>() {
            return r.is_connect() || r.is_request() || r.is_timeout();
        }
        if let Some(s) = c.downcast_ref::<sqlx::Error>() {
            return matches!(s, sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed);
        }
        c.downcast_ref::<std::io::Error>().is_some()
    })
}

impl From<sqlx::Error> for OffloadError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
                OffloadError::StateUnreachable(e.to_string())
            }
            other => OffloadError::State(other.to_string()),
        }
    }
}

pub type Result<T, E = OffloadError> = std::result::Result<T, E>;

/// A catalog call that ran past its time limit (I10). It is the source of the
/// `iceberg::Error` the call returns, so the commit protocol can tell a timeout (outcome
/// unknown, I5) from a refusal by its type.
#[derive(Debug, thiserror::Error)]
#[error("the catalog did not answer {call} within {after:?}")]
pub struct CallTimedOut {
    pub call: &'static str,
    pub after: std::time::Duration,
}
