//! Fixtures shared by the Rust integration tests: a two-column target table (`ts`, `id`), its
//! catalog on SQLite, and windows written to it.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use arrow_array::{Int64Array, RecordBatch, TimestampMicrosecondArray};
use arrow_schema::{DataType, Field, Schema, TimeUnit};
use iceberg::spec::{DataFile, PrimitiveType, Type};

use iceberg_offload::commit::{Position, TableView, Window};
use iceberg_offload::config::{CatalogConfig, CatalogKind, PartitionField, TableConfig};
use iceberg_offload::sink::{catalog, table as target, writer::WindowWriter};
use iceberg_offload::window::Measure;

/// The table `k2.<name>` offloaded into `cold.<name>`, partitioned by day of `ts`.
pub fn table_config(name: &str) -> TableConfig {
    TableConfig {
        source_db: "k2".into(),
        source_table: name.into(),
        target_namespace: "cold".into(),
        target_table: name.into(),
        layer: "bronze".into(),
        cursor: "ts".into(),
        tiebreak: None,
        settle_delay: Duration::from_secs(0),
        max_rows_per_commit: 1000,
        max_partitions_per_commit: 8,
        uint64: Default::default(),
        integer_encoding: Default::default(),
        partition: vec![PartitionField { transform: "day".into(), column: "ts".into() }],
        columns: None,
        read_final: Default::default(),
        closed_after: Duration::ZERO,
        view: None,
        evict_after: None,
    }
}

pub fn projection() -> Vec<(String, String, Type, bool)> {
    vec![
        ("ts".to_string(), "ts".to_string(), Type::Primitive(PrimitiveType::Timestamptz), false),
        ("id".to_string(), "id".to_string(), Type::Primitive(PrimitiveType::Long), false),
    ]
}

pub fn measure(source: &str) -> Measure {
    Measure {
        source: source.into(),
        cursor: "ts".into(),
        cursor_type: "DateTime64(6)".into(),
        tiebreak: None,
        tiebreak_type: None,
    }
}

/// The catalog described by `kind`, `uri`, `warehouse`, and in it the empty table `name`.
pub async fn catalog_with_table(
    kind: CatalogKind,
    uri: String,
    warehouse: Option<String>,
    name: &str,
) -> (Arc<dyn iceberg::Catalog>, iceberg::TableIdent) {
    let cfg = CatalogConfig {
        kind,
        name: "offload".into(),
        uri,
        warehouse,
        password: Default::default(),
        token: Default::default(),
        credential: Default::default(),
        properties: Default::default(),
        properties_env: Default::default(),
        properties_file: Default::default(),
        limits: Default::default(),
    };
    let cat = catalog::build(&cfg).await.unwrap();
    let tcfg = table_config(name);
    target::ensure(&cat, &tcfg, &projection()).await.unwrap();
    (cat, target::ident(&tcfg))
}

/// A SQLite catalog in `dir` with the empty table `name`.
pub async fn sqlite_catalog(dir: &std::path::Path, name: &str) -> (Arc<dyn iceberg::Catalog>, iceberg::TableIdent) {
    let uri = format!("sqlite://{}/catalog.db?mode=rwc", dir.display());
    let warehouse = Some(format!("file://{}/warehouse", dir.display()));
    catalog_with_table(CatalogKind::Sql, uri, warehouse, name).await
}

/// Parquet files of rows `id` in `ids`, stamped `base_s + id` seconds after the epoch.
pub async fn write(view: &TableView, prefix: &str, ids: std::ops::Range<i64>, base_s: i64) -> Vec<DataFile> {
    let mut w = WindowWriter::new(&view.table, prefix, Default::default(), false).await.unwrap();
    w.write(batch(ids.map(|i| (i, base_s + i)))).await.unwrap();
    w.close().await.unwrap()
}

/// A batch of `(id, ts seconds after the epoch)` rows.
pub fn batch(rows: impl IntoIterator<Item = (i64, i64)>) -> RecordBatch {
    let (ids, secs): (Vec<i64>, Vec<i64>) = rows.into_iter().unzip();
    let schema = Arc::new(Schema::new(vec![
        Field::new("ts", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), false),
        Field::new("id", DataType::Int64, false),
    ]));
    let ts =
        TimestampMicrosecondArray::from(secs.iter().map(|s| s * 1_000_000).collect::<Vec<_>>()).with_timezone("UTC");
    RecordBatch::try_new(schema, vec![Arc::new(ts), Arc::new(Int64Array::from(ids))]).unwrap()
}

/// The window `(none, hi_s seconds]`.
pub fn window(hi_s: i64) -> Window {
    Window { lo: None, hi: Position::at(hi_s * 1_000_000_000), planned_rows: 10, bounded: false }
}
