//! The sink: Apache Iceberg through iceberg-rust.
//!
//! - [`catalog`]: builds the configured catalog (SQL on SQLite or PostgreSQL, REST);
//! - [`table`]: creates the target table from the source schema, or checks an existing one;
//! - [`writer`]: Arrow batches to Parquet data files, split by partition (vectorised).

pub mod catalog;
pub mod table;
pub mod writer;
