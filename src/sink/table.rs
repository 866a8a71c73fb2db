//! The target table: created from the source schema and the configured partition spec
//! when missing; checked for compatibility when present.

use std::collections::HashMap;
use std::sync::Arc;

use iceberg::spec::{NestedField, PartitionSpec, PrimitiveType, Schema, Transform, Type, UnboundPartitionSpec};
use iceberg::table::Table;
use iceberg::transaction::{AddColumn, ApplyTransactionAction, Transaction};
use iceberg::{Catalog, NamespaceIdent, TableCreation, TableIdent};

use crate::config::{PartitionField, TableConfig};
use crate::error::{OffloadError, Result};
use crate::source::query::Projection;

/// Table property (Iceberg's): delete metadata files that fall out of the metadata log.
pub const DELETE_AFTER_COMMIT: &str = "write.metadata.delete-after-commit.enabled";

pub fn ident(cfg: &TableConfig) -> TableIdent {
    TableIdent::new(NamespaceIdent::new(cfg.target_namespace.clone()), cfg.target_table.clone())
}

fn transform(f: &PartitionField) -> std::result::Result<Transform, String> {
    f.transform.parse::<Transform>().map_err(|e| format!("partition transform {:?}: {e}", f.transform))
}

/// The schema a new target table gets from the source projection.
pub fn schema_from_projection(projection: &Projection) -> std::result::Result<Schema, iceberg::Error> {
    let fields = projection
        .iter()
        .enumerate()
        .map(|(i, (name, _, ty, nullable))| {
            let id = i as i32 + 1;
            Arc::new(if *nullable {
                NestedField::optional(id, name, ty.clone())
            } else {
                NestedField::required(id, name, ty.clone())
            })
        })
        .collect::<Vec<_>>();
    Schema::builder().with_fields(fields).build()
}

/// Loads the target table, creating it (and its namespace) when missing.
pub async fn ensure(catalog: &Arc<dyn Catalog>, cfg: &TableConfig, projection: &Projection) -> Result<Table> {
    let existing = load_existing(catalog, cfg).await?;
    ensure_from(catalog, cfg, projection, existing).await
}

/// The target table if it exists.
pub async fn load_existing(catalog: &Arc<dyn Catalog>, cfg: &TableConfig) -> Result<Option<Table>> {
    let id = ident(cfg);
    if !catalog.table_exists(&id).await? {
        return Ok(None);
    }
    Ok(Some(catalog.load_table(&id).await?))
}

/// [`ensure`] from what [`load_existing`] found: new source columns added, compatibility
/// checked, or the table created.
pub async fn ensure_from(
    catalog: &Arc<dyn Catalog>,
    cfg: &TableConfig,
    projection: &Projection,
    existing: Option<Table>,
) -> Result<Table> {
    let id = ident(cfg);
    let schema_err = |message: String| OffloadError::Schema { table: cfg.source(), message };
    if let Some(table) = existing {
        let table = add_new_source_columns(catalog, table, cfg, projection).await?;
        check_compatible(&table, cfg, projection).map_err(schema_err)?;
        return Ok(table);
    }
    let ns = id.namespace().clone();
    if !catalog.namespace_exists(&ns).await? {
        match catalog.create_namespace(&ns, HashMap::new()).await {
            Ok(_) => {}
            // Another writer created it meanwhile.
            Err(_) if catalog.namespace_exists(&ns).await? => {}
            Err(e) => return Err(e.into()),
        }
    }
    let schema = schema_from_projection(projection)?;
    let mut spec = UnboundPartitionSpec::builder().with_spec_id(0);
    for f in &cfg.partition {
        let field = schema
            .field_by_name(&f.column)
            .ok_or_else(|| schema_err(format!("partition column {:?} is not offloaded", f.column)))?;
        let t = transform(f).map_err(schema_err)?;
        let name = partition_field_name(f, &t);
        spec = spec.add_partition_field(field.id, name, t).map_err(|e| schema_err(format!("partition spec: {e}")))?;
    }
    let properties = HashMap::from([
        ("write.format.default".to_string(), "parquet".to_string()),
        ("write.parquet.compression-codec".to_string(), "zstd".to_string()),
        ("write.parquet.compression-level".to_string(), "1".to_string()),
        ("offload.source".to_string(), cfg.source()),
        ("offload.cursor".to_string(), cfg.cursor.clone()),
        // Old metadata versions are deleted as they fall out of the log (100 kept): a year of
        // 15-minute commits would otherwise leave 35,000 metadata files behind.
        (DELETE_AFTER_COMMIT.to_string(), "true".to_string()),
        ("write.metadata.previous-versions-max".to_string(), "100".to_string()),
    ]);
    let creation = TableCreation::builder()
        .name(cfg.target_table.clone())
        .schema(schema)
        .partition_spec(spec.build())
        .properties(properties)
        .build();
    match catalog.create_table(&ns, creation).await {
        Ok(t) => Ok(t),
        // Lost a creation race: use the winner's table if it fits.
        Err(_) if catalog.table_exists(&id).await? => {
            let table = catalog.load_table(&id).await?;
            check_compatible(&table, cfg, projection).map_err(schema_err)?;
            Ok(table)
        }
        Err(e) => Err(e.into()),
    }
}

/// Schema evolution: a column that appeared in the source is added to the Iceberg table as
/// an optional column (older rows read it as NULL), in a commit of its own.
async fn add_new_source_columns(
    catalog: &Arc<dyn Catalog>,
    table: Table,
    cfg: &TableConfig,
    projection: &Projection,
) -> Result<Table> {
    let schema = table.metadata().current_schema().clone();
    let missing: Vec<_> = projection.iter().filter(|(name, ..)| schema.field_by_name(name).is_none()).collect();
    if missing.is_empty() {
        return Ok(table);
    }
    let mut action = Transaction::new(&table).update_schema();
    for (name, _, ty, _) in &missing {
        if !matches!(ty, Type::Primitive(_)) {
            return Err(OffloadError::Schema {
                table: cfg.source(),
                message: format!(
                    "column {name:?} is new in the source and has a nested type ({ty}); add it to the Iceberg table {} \
                     yourself or leave it out with tables[].columns",
                    cfg.target()
                ),
            });
        }
        action = action.add_column(AddColumn::optional(name, ty.clone()));
    }
    let tx = action.apply(Transaction::new(&table))?;
    let table = tx.commit(catalog.as_ref()).await?;
    for (name, _, ty, _) in &missing {
        tracing::info!(table = cfg.name(), column = %name, "schema evolution: added optional column {name} ({ty}) to {}", cfg.target());
    }
    Ok(table)
}

fn partition_field_name(f: &PartitionField, t: &Transform) -> String {
    match t {
        Transform::Identity => f.column.clone(),
        Transform::Bucket(n) => format!("{}_bucket_{n}", f.column),
        Transform::Truncate(n) => format!("{}_trunc_{n}", f.column),
        other => format!("{}_{}", f.column, other.to_string().to_lowercase()),
    }
}

/// Whether an existing table can take the source rows. New nullable target columns are
/// fine (they stay NULL); anything else that differs is an error naming the column.
pub fn check_compatible(table: &Table, cfg: &TableConfig, projection: &Projection) -> std::result::Result<(), String> {
    let schema = table.metadata().current_schema();
    let target = cfg.target();
    for (name, _, ty, nullable) in projection {
        let Some(field) = schema.field_by_name(name) else {
            return Err(format!(
                "column {name:?} of the source is missing from the existing Iceberg table {target}; \
                 add it to the table or leave it out with tables[].columns"
            ));
        };
        if !same_type(&field.field_type, ty) {
            let long = Type::Primitive(PrimitiveType::Long);
            let decimal20 = Type::Primitive(PrimitiveType::Decimal { precision: 20, scale: 0 });
            let hint = match (&field.field_type, ty) {
                (have, want) if same_type(have, &long) && same_type(want, &decimal20) => {
                    "; if the source column is UInt64, set uint64 = \"long\" on this table to keep writing it as long"
                }
                (have, want) if same_type(have, &decimal20) && same_type(want, &long) => {
                    "; this table stores UInt64 as decimal(20,0): remove uint64 = \"long\" from this table"
                }
                _ => "",
            };
            return Err(format!(
                "column {name:?}: the existing Iceberg table {target} has type {} but the source maps to {}{hint}",
                field.field_type, ty
            ));
        }
        if field.required && *nullable {
            return Err(format!(
                "column {name:?}: the existing Iceberg table {target} has it required but the source column is Nullable"
            ));
        }
    }
    for field in schema.as_struct().fields() {
        if field.required && !projection.iter().any(|(n, ..)| n == &field.name) {
            return Err(format!(
                "the existing Iceberg table {target} has a required column {:?} that the source does not provide",
                field.name
            ));
        }
    }
    let spec: &PartitionSpec = table.metadata().default_partition_spec();
    let actual: Vec<(String, String)> = spec
        .fields()
        .iter()
        .map(|f| {
            let col = schema.name_by_field_id(f.source_id).unwrap_or("?").to_string();
            (f.transform.to_string().to_lowercase(), col)
        })
        .collect();
    let wanted: Vec<(String, String)> = cfg
        .partition
        .iter()
        .map(|f| (transform(f).map(|t| t.to_string().to_lowercase()).unwrap_or_default(), f.column.clone()))
        .collect();
    if actual != wanted {
        let show = |v: &[(String, String)]| {
            if v.is_empty() {
                "unpartitioned".to_string()
            } else {
                v.iter().map(|(t, c)| format!("{t}({c})")).collect::<Vec<_>>().join(", ")
            }
        };
        return Err(format!(
            "the existing Iceberg table {target} is partitioned by [{}] but the configuration says [{}]",
            show(&actual),
            show(&wanted)
        ));
    }
    Ok(())
}

/// Types equal up to field ids (nested ids differ between the projection and the table).
fn same_type(a: &Type, b: &Type) -> bool {
    match (a, b) {
        (Type::Primitive(x), Type::Primitive(y)) => x == y,
        (Type::List(x), Type::List(y)) => same_type(&x.element_field.field_type, &y.element_field.field_type),
        (Type::Map(x), Type::Map(y)) => {
            same_type(&x.key_field.field_type, &y.key_field.field_type)
                && same_type(&x.value_field.field_type, &y.value_field.field_type)
        }
        (Type::Struct(x), Type::Struct(y)) => {
            x.fields().len() == y.fields().len()
                && x.fields()
                    .iter()
                    .zip(y.fields())
                    .all(|(f, g)| f.name == g.name && same_type(&f.field_type, &g.field_type))
        }
        _ => false,
    }
}
