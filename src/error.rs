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
    #[error("table {table}: commit refused because the table changed since it was read (another writer?): {message}")]
    CommitConflict { table: String, message: String },
    /// The catalog said the commit was done, but re-reading it shows the table without our
    /// snapshot (iceberg-catalog-sql ignores a failed SQL COMMIT). Nothing was appended.
    #[error(
        "table {table}: the catalog reported the commit as done but does not hold it (a lost SQL COMMIT?); nothing was appended and the window will be retried"
    )]
    CommitNotPersisted { table: String },
    #[error("Iceberg catalog unreachable: {0}")]
    CatalogUnreachable(String),
    #[error("Iceberg: {0}")]
    Iceberg(iceberg::Error),
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
    #[error("internal error: {0}")]
    Crash(String),
}

impl OffloadError {
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Timeout(_) | Self::Cancelled => ErrorClass::Timeout,
            Self::ClickHouseUnreachable { .. }
            | Self::ClickHouseStream(_)
            | Self::CatalogUnreachable(_)
            | Self::StateUnreachable(_) => ErrorClass::Connection,
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
            | Self::CommitNotPersisted { .. } => true,
            // Server-side errors that are about load, not about the query.
            Self::ClickHouse { code, .. } => matches!(code, 159 | 160 | 164 | 202 | 209 | 210 | 241 | 394 | 1002),
            Self::Iceberg(e) => e.retryable() || is_connection_error(e),
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
            Self::CommitNotPersisted { .. } => "commit_not_persisted",
            Self::CatalogUnreachable(_) => "catalog_unreachable",
            Self::Iceberg(_) => "iceberg",
            Self::CatalogAuth(_) => "catalog_auth",
            Self::State(_) => "state",
            Self::StateUnreachable(_) => "state_unreachable",
            Self::LeaseHeld { .. } => "lease_held",
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

fn is_connection_error(e: &iceberg::Error) -> bool {
    let text = format!("{e:#}").to_ascii_lowercase();
    text.contains("connection refused") || text.contains("error trying to connect") || text.contains("pool timed out")
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
