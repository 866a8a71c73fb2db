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

use super::{PROP_MEASURE, PROP_POSITION, Position, SUMMARY_SOURCE};
use crate::error::{OffloadError, Result};
use crate::window::Measure;

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
    /// What `W` was measured on (I11), as recorded with it.
    pub measured_on: MeasuredOn,
}

/// What `W` was measured on, as recorded with it (I11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeasuredOn {
    /// No watermark yet.
    Nothing,
    /// Recorded in full (`offload.measure`).
    Recorded(Measure),
    /// Written before `offload.measure` existed: the source and cursor names, and whether
    /// `W` has a tiebreak.
    Legacy { source: Option<String>, cursor: Option<String>, has_tiebreak: bool },
}

impl MeasuredOn {
    /// The first thing in which the configuration (`now`) differs from what `W` was measured
    /// on: (field, recorded, configured).
    pub fn difference(&self, now: &Measure) -> Option<(&'static str, String, String)> {
        match self {
            Self::Nothing => None,
            // A tiebreak added while W has none: W's cursor value is wholly offloaded, so the
            // new order inside a cursor value starts fresh after it.
            Self::Recorded(m) if m.tiebreak.is_none() && now.tiebreak.is_some() => {
                let widened = Measure { tiebreak: None, tiebreak_type: None, ..now.clone() };
                m.difference(&widened)
            }
            Self::Recorded(m) => m.difference(now),
            Self::Legacy { source, cursor, has_tiebreak } => {
                if let Some(s) = source.as_ref().filter(|s| **s != now.source) {
                    return Some(("source", s.clone(), now.source.clone()));
                }
                if let Some(c) = cursor.as_ref().filter(|c| **c != now.cursor) {
                    return Some(("cursor", c.clone(), now.cursor.clone()));
                }
                // A W cut inside a cursor value needs the tiebreak it was cut on.
                (*has_tiebreak && now.tiebreak.is_none()).then(|| ("tiebreak", "a tiebreak".into(), "none".into()))
            }
        }
    }
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
        let measured_on = measured_on(meta, &origin, watermark.as_ref());
        Ok(Self { table, watermark, origin, disagreement, measured_on })
    }

    pub fn snapshot_id(&self) -> Option<i64> {
        self.table.metadata().current_snapshot().map(|s| s.snapshot_id())
    }
}

/// I11: what `W` was measured on, from the snapshot that carries it, or from the table
/// properties when `W` came from there.
fn measured_on(meta: &TableMetadata, origin: &WatermarkOrigin, w: Option<&Position>) -> MeasuredOn {
    let Some(w) = w else { return MeasuredOn::Nothing };
    let (recorded, source) = match origin {
        WatermarkOrigin::Snapshot(id) => {
            let summary = meta.snapshot_by_id(*id).map(|s| &s.summary().additional_properties);
            (summary.and_then(|p| p.get(PROP_MEASURE)).cloned(), summary.and_then(|p| p.get(SUMMARY_SOURCE)).cloned())
        }
        _ => (meta.properties().get(PROP_MEASURE).cloned(), meta.properties().get("offload.source").cloned()),
    };
    match recorded.and_then(|json| serde_json::from_str::<Measure>(&json).ok()) {
        Some(m) => MeasuredOn::Recorded(m),
        None => MeasuredOn::Legacy {
            source: source.or_else(|| meta.properties().get("offload.source").cloned()),
            cursor: meta.properties().get("offload.cursor").cloned(),
            has_tiebreak: w.tiebreak.is_some(),
        },
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
