//! The source: ClickHouse over its HTTP interface.
//!
//! - [`client`]: queries, parameters, errors, and the streamed `FORMAT ArrowStream` read;
//! - [`framing`]: the Arrow IPC stream reassembled into whole, aligned messages;
//! - [`types`]: ClickHouse column types, their casts in the SELECT and their Iceberg types;
//! - [`query`]: the SQL of one table's windows, built from validated, quoted identifiers
//!   with every value passed as a query parameter.

pub mod client;
pub mod framing;
pub mod query;
pub mod types;

pub use client::ClickHouse;
