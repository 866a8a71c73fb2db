//! iceberg-offload: moves rows from ClickHouse hot-tier tables into Apache Iceberg
//! cold-tier tables, exactly once.
//!
//! The layers, each module's place among them and what it owns: `ARCHITECTURE.md` (kept true by
//! `dev/check_layers.py`). In short:
//! - ground: [`config`], [`error`], [`window`], [`report`], [`database`], [`decorate`],
//!   [`fault`], [`util`];
//! - the port every layer emits into: [`events`] and [`metrics`];
//! - I/O: [`source`] (ClickHouse), [`sink`] (Iceberg), [`state`] (the state store);
//! - the exactly-once commit protocol: [`commit`] (`docs/exactly-once.md`);
//! - table operations: [`offload`], [`audit`], [`maintenance`], [`adopt`], [`tiers`], [`evict`], given [`services`];
//! - the service: [`scheduler`], [`replicas`], [`server`], [`status`], [`systemd`].

pub mod adopt;
pub mod audit;
pub mod commit;
pub mod config;
pub mod database;
pub mod decorate;
pub mod error;
pub mod events;
pub mod evict;
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
pub mod tiers;
pub mod util;
pub mod window;
