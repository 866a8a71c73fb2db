//! The sink: Apache Iceberg through iceberg-rust.
//!
//! - [`catalog`]: builds the configured catalog (SQL on SQLite or PostgreSQL, REST);
//! - [`table`]: creates the target table from the source schema, or checks an existing one;
//! - [`storage`]: the file systems tables live on (local, S3, bare local paths);
//! - [`days`]: the table's rows per day of the cursor, for the audit;
//! - [`writer`]: Arrow batches to Parquet data files, split by partition (vectorised).

pub mod catalog;
pub mod days;
pub mod storage;
pub mod table;
pub mod writer;
