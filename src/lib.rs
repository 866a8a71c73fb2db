//! iceberg-offload: moves rows from ClickHouse hot-tier tables into Apache Iceberg
//! cold-tier tables, exactly once.
//!
//! Layout (one place per part of the architecture):
//! - [`config`]: the TOML file and the embedded defaults;
//! - [`source`]: ClickHouse over HTTP, streamed as Arrow;
//! - [`sink`]: Iceberg catalog, table management and Parquet writing;
//! - [`window`]: positions, cursor units, the settle limit and the SQL bounds of a window;
//! - [`commit`]: the exactly-once commit protocol (`docs/exactly-once.md`);
//! - [`offload`]: the offload of one table, window by window;
//! - [`scheduler`]: cycles, parallelism, timeouts, retries, signals;
//! - [`state`]: the operators' state store (a mirror of Iceberg, never the truth);
//! - [`maintenance`]: orphan-file cleanup;
//! - [`metrics`] and [`events`]: every number and log line of one event from one place;
//! - [`adopt`]: taking over a table and the watermark of the original pipeline;
//! - [`server`]: the HTTP endpoint; [`status`]: the 30-second health check.

pub mod adopt;
pub mod audit;
pub mod commit;
pub mod config;
pub mod database;
pub mod decorate;
pub mod error;
pub mod events;
pub mod fault;
pub mod maintenance;
pub mod metrics;
pub mod offload;
pub mod replicas;
pub mod report;
pub mod scheduler;
pub mod server;
pub mod services;
pub mod sink;
pub mod source;
pub mod state;
pub mod status;
pub mod systemd;
pub mod util;
pub mod window;
