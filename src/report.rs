//! What operations report, as plain values: the audit's verdicts, what maintenance did, how a
//! pending commit attempt was decided, how a cycle ended. They live here, below everything,
//! so that the state store (which records them), the events port (which logs and counts them)
//! and the CLI (which prints them) can take them without importing the operations that fill
//! them in.

use chrono::NaiveDate;

/// One day's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditStatus {
    Ok,
    Missing,
    Extra,
}

impl AuditStatus {
    pub const ALL: [AuditStatus; 3] = [AuditStatus::Ok, AuditStatus::Missing, AuditStatus::Extra];

    pub fn as_str(self) -> &'static str {
        match self {
            AuditStatus::Ok => "ok",
            AuditStatus::Missing => "missing",
            AuditStatus::Extra => "extra",
        }
    }
}

/// Source against Iceberg for one day of the cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DayAudit {
    pub day: NaiveDate,
    pub source_rows: u64,
    pub iceberg_rows: u64,
}

impl DayAudit {
    pub fn status(&self) -> AuditStatus {
        match self.source_rows.cmp(&self.iceberg_rows) {
            std::cmp::Ordering::Equal => AuditStatus::Ok,
            std::cmp::Ordering::Greater => AuditStatus::Missing,
            std::cmp::Ordering::Less => AuditStatus::Extra,
        }
    }
}

/// Which days an audit covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The last `audit_recent_days` days up to `W`.
    Recent,
    /// Every day the source still holds.
    Full,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Recent => "recent",
            Scope::Full => "full",
        }
    }
}

/// The days held after an audit, summed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditTotals {
    pub days: [u64; 3],
    pub missing_rows: u64,
    pub extra_rows: u64,
}

/// What one maintenance run of a table did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct MaintenanceReport {
    pub table: String,
    pub compact: Option<CompactReport>,
    pub expire: Option<ExpireReport>,
    /// Why the run was left out (pending commits).
    pub skipped: Option<String>,
    /// A step that failed while the others ran (compaction lost a race, say).
    pub failed: Option<String>,
    /// Size of the current metadata.json after the run (what every commit reads and rewrites).
    pub metadata_bytes: Option<u64>,
}

impl MaintenanceReport {
    /// Why the run did nothing (pending commits), from the run or its expiry step.
    pub fn skip_reason(&self) -> Option<&String> {
        self.skipped.as_ref().or(self.expire.as_ref().and_then(|e| e.skipped.as_ref()))
    }
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct CompactReport {
    pub partitions: usize,
    pub files_rewritten: usize,
    pub bytes_rewritten: u64,
    pub files_written: usize,
    pub bytes_written: u64,
    pub rows: u64,
    pub manifests_before: usize,
    pub manifests_after: usize,
    /// Data files of the default spec in closed partitions smaller than ¾ of the target,
    /// before this run (what the small-files alert watches).
    pub small_files: usize,
    pub skipped: Option<String>,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ExpireReport {
    pub snapshots_before: usize,
    pub snapshots_expired: usize,
    pub files_deleted: usize,
    pub metadata_files_deleted: usize,
    /// Why nothing was expired although the retention allows it.
    pub skipped: Option<String>,
}

/// What the table's metadata says about a pending attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// Its run id is in this snapshot: it landed.
    Committed(i64),
    /// The table moved past the snapshot it required, along an unbroken history that does
    /// not contain it: it never can land now.
    Impossible,
    /// The table moved on, but its history back to the snapshot the attempt required is not
    /// complete (expired snapshots): whether it landed cannot be proven. Its files are left to
    /// `iceberg-offload cleanup`, which deletes only files that no snapshot references.
    Undecidable,
    /// The table is still at the snapshot it required: it may still land.
    Pending,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CycleStatus {
    Success,
    Partial,
    Failed,
    /// A shutdown (SIGTERM/SIGINT) cut the cycle short: neither a success nor a failure.
    Interrupted,
}

impl CycleStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Partial => "partial",
            Self::Failed => "failed",
            Self::Interrupted => "interrupted",
        }
    }
}
