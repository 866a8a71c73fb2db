//! I3 — Iceberg's history is the truth: `W` is read from the newest snapshot in the current
//! snapshot's ancestry that carries this service's marker.
//!
//! The table property [`PROP_POSITION`] is written by the same commit and serves only as a
//! fallback, when the ancestry reaches a snapshot that has been expired before it finds a
//! marker. A rollback by an operator therefore moves `W` back with the data, and snapshots
//! written by other engines on top of ours (a Spark compaction, our own maintenance) do not
//! hide it.

use std::sync::Arc;

use iceberg::spec::TableMetadata;
use iceberg::table::Table;
use iceberg::{Catalog, TableIdent};

use super::{PROP_POSITION, Position};
use crate::error::{OffloadError, Result};

/// Where an attempt's `W` came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatermarkOrigin {
    /// The snapshot (in the current ancestry) whose summary carries `W`.
    Snapshot(i64),
    /// The table property: the ancestry was expired before a marked snapshot was reached.
    Property,
    /// No snapshot of the ancestry carries a marker: nothing has been offloaded.
    Nothing,
}

/// The property and the history disagree: reported once per run, and the history wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PropertyDisagrees {
    pub property: Option<Position>,
    pub history: Option<Position>,
}

/// What one attempt read from Iceberg (I3): the table as of one snapshot and its watermark.
#[derive(Debug, Clone)]
pub struct TableView {
    pub table: Table,
    pub watermark: Option<Position>,
    pub origin: WatermarkOrigin,
    /// Set when the table property says something else than the history (after a rollback).
    pub disagreement: Option<PropertyDisagrees>,
}

impl TableView {
    /// I3: load the table and read `W` from its history.
    pub async fn load(catalog: &Arc<dyn Catalog>, ident: &TableIdent) -> Result<Self> {
        let table = catalog.load_table(ident).await?;
        Self::of(table)
    }

    pub fn of(table: Table) -> Result<Self> {
        let name = table.identifier().to_string();
        let meta = table.metadata();
        let property = match meta.properties().get(PROP_POSITION) {
            None => None,
            Some(json) => Some(parse_position(&name, json, "table property")?),
        };
        let (watermark, origin) = match watermark_in_history(&name, meta)? {
            History::Marked(position, snapshot) => (Some(position), WatermarkOrigin::Snapshot(snapshot)),
            History::Unmarked => (None, WatermarkOrigin::Nothing),
            History::Expired => (property.clone(), WatermarkOrigin::Property),
        };
        let disagreement = (origin != WatermarkOrigin::Property && property.is_some() && property != watermark)
            .then(|| PropertyDisagrees { property: property.clone(), history: watermark.clone() });
        Ok(Self { table, watermark, origin, disagreement })
    }

    pub fn snapshot_id(&self) -> Option<i64> {
        self.table.metadata().current_snapshot().map(|s| s.snapshot_id())
    }
}

enum History {
    Marked(Position, i64),
    /// The whole ancestry was read and carries no marker.
    Unmarked,
    /// The ancestry reaches a snapshot no longer in the metadata (expired).
    Expired,
}

/// Walks the current snapshot's ancestry, newest first, to the first snapshot that carries
/// this service's watermark marker.
fn watermark_in_history(table: &str, meta: &TableMetadata) -> Result<History> {
    let mut next = meta.current_snapshot().map(|s| s.snapshot_id());
    // A parent chain cannot be longer than the snapshot list; the bound guards a corrupt one.
    for _ in 0..=meta.snapshots().len() {
        let Some(id) = next else { return Ok(History::Unmarked) };
        let Some(snapshot) = meta.snapshot_by_id(id) else { return Ok(History::Expired) };
        if let Some(json) = snapshot.summary().additional_properties.get(PROP_POSITION) {
            return Ok(History::Marked(parse_position(table, json, "snapshot summary")?, id));
        }
        next = snapshot.parent_snapshot_id();
    }
    Err(OffloadError::Schema {
        table: table.to_string(),
        message: "the snapshot ancestry of the table has a cycle; the metadata is corrupt".into(),
    })
}

fn parse_position(table: &str, json: &str, where_: &str) -> Result<Position> {
    serde_json::from_str(json).map_err(|e| OffloadError::Schema {
        table: table.to_string(),
        message: format!("{where_} {PROP_POSITION} = {json:?} is not a watermark position: {e}"),
    })
}
