//! The sink's own parts, against a real SQLite catalog and local warehouse: the clustered writer
//! (one partition open at a time, never a wrong partition) and the audit's day counts (I9).

mod common;

use std::collections::BTreeMap;

use iceberg::Catalog;
use iceberg::spec::DataFile;
use iceberg::transaction::{ApplyTransactionAction, Transaction};
use iceberg_offload::commit::TableView;
use iceberg_offload::sink::days::DayCounter;
use iceberg_offload::sink::writer::WindowWriter;

const DAY: i64 = 86_400;

/// Rows per partition (the day of `ts`), from the files' own partition values and counts.
fn rows_per_partition(files: &[DataFile]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for f in files {
        *out.entry(format!("{:?}", f.partition())).or_default() += f.record_count();
    }
    out
}

#[tokio::test]
async fn the_clustered_writer_keeps_one_partition_open_and_never_mixes_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let (cat, ident) = common::sqlite_catalog(dir.path(), "clustered").await;
    let view = TableView::load(&cat, &ident).await.unwrap();
    let mut w = WindowWriter::new(&view.table, "attempt", Default::default(), true).await.unwrap();
    // Sorted by day except that day 0 comes back at the end (an order that disagrees).
    w.write(common::batch([(1, 10), (2, 20), (3, DAY + 1)])).await.unwrap();
    w.write(common::batch([(4, DAY + 2), (5, 2 * DAY)])).await.unwrap();
    w.write(common::batch([(6, 30)])).await.unwrap();
    assert_eq!(w.reopened_partitions(), 1, "day 0 came back after its file was closed");
    let files = w.close().await.unwrap();
    assert_eq!(files.len(), 4, "days 0, 1, 2, then day 0 again: {files:?}");
    let per = rows_per_partition(&files);
    assert_eq!(per.values().copied().collect::<Vec<_>>(), vec![3, 2, 1], "{per:?}");
    assert_eq!(files.iter().map(|f| f.record_count()).sum::<u64>(), 6);
}

async fn append(cat: &std::sync::Arc<dyn Catalog>, ident: &iceberg::TableIdent, files: Vec<DataFile>) {
    let table = cat.load_table(ident).await.unwrap();
    let tx = Transaction::new(&table);
    let tx = tx.fast_append().add_data_files(files).apply(tx).unwrap();
    tx.commit(cat.as_ref()).await.unwrap();
}

#[tokio::test]
async fn the_audit_counts_rows_per_day_from_bounds_and_reads_only_files_that_span_days() {
    let dir = tempfile::tempdir().unwrap();
    let (cat, ident) = common::sqlite_catalog(dir.path(), "days").await;
    let view = TableView::load(&cat, &ident).await.unwrap();
    // Partitioned by day: one file per day, each counted from its bounds without being read.
    let mut w = WindowWriter::new(&view.table, "a", Default::default(), false).await.unwrap();
    w.write(common::batch([(1, 10), (2, 20), (3, DAY + 5), (4, 3 * DAY)])).await.unwrap();
    append(&cat, &ident, w.close().await.unwrap()).await;
    let counter = DayCounter::default();
    let table = cat.load_table(&ident).await.unwrap();
    let all = counter.count(&table, "ts", None, 10).await.unwrap();
    assert_eq!(all, BTreeMap::from([(0, 2), (1, 1), (3, 1)]));
    // A second window; the first manifest comes from the cache, the new one is read.
    let view = TableView::load(&cat, &ident).await.unwrap();
    let mut w = WindowWriter::new(&view.table, "b", Default::default(), false).await.unwrap();
    w.write(common::batch([(5, 3 * DAY + 1), (6, 4 * DAY)])).await.unwrap();
    append(&cat, &ident, w.close().await.unwrap()).await;
    let table = cat.load_table(&ident).await.unwrap();
    assert_eq!(counter.count(&table, "ts", Some(1), 3).await.unwrap(), BTreeMap::from([(1, 1), (3, 2)]));
    assert_eq!(counter.count(&table, "ts", None, 4).await.unwrap(), BTreeMap::from([(0, 2), (1, 1), (3, 2), (4, 1)]));
    // An unpartitioned table: one file spans days 0 to 2 and is read (its cursor column).
    let mut spanning = common::table_config("spanning");
    spanning.partition.clear();
    iceberg_offload::sink::table::ensure(&cat, &spanning, &common::projection()).await.unwrap();
    let sident = iceberg_offload::sink::table::ident(&spanning);
    let view = TableView::load(&cat, &sident).await.unwrap();
    let mut w = WindowWriter::new(&view.table, "c", Default::default(), false).await.unwrap();
    w.write(common::batch([(1, 10), (2, DAY - 1), (3, DAY), (4, 2 * DAY + 7)])).await.unwrap();
    append(&cat, &sident, w.close().await.unwrap()).await;
    let table = cat.load_table(&sident).await.unwrap();
    let spanning_counter = DayCounter::default();
    assert_eq!(spanning_counter.count(&table, "ts", Some(1), 1).await.unwrap(), BTreeMap::from([(1, 1)]));
    assert_eq!(spanning_counter.count(&table, "ts", None, 5).await.unwrap(), BTreeMap::from([(0, 2), (1, 1), (2, 1)]));
    // Before any snapshot of the table: nothing.
    let (cat2, ident2) = common::sqlite_catalog(dir.path(), "empty").await;
    let empty = cat2.load_table(&ident2).await.unwrap();
    assert!(DayCounter::default().count(&empty, "ts", None, 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_clustered_window_in_no_order_at_all_falls_back_to_one_writer_per_partition() {
    let dir = tempfile::tempdir().unwrap();
    let (cat, ident) = common::sqlite_catalog(dir.path(), "unsorted").await;
    let view = TableView::load(&cat, &ident).await.unwrap();
    let mut w = WindowWriter::new(&view.table, "attempt", Default::default(), true).await.unwrap();
    // 100 rows alternating between two days: 99 changes of partition.
    for i in 0..100 {
        w.write(common::batch([(i, (i % 2) * DAY)])).await.unwrap();
    }
    let files = w.close().await.unwrap();
    assert!(
        files.len() < 25,
        "the order is given up after 16 reopened partitions, not a file per row: {}",
        files.len()
    );
    assert_eq!(rows_per_partition(&files).values().copied().collect::<Vec<_>>(), vec![50, 50]);
}

#[tokio::test]
async fn the_day_counts_are_kept_for_the_next_process_and_an_unreadable_copy_is_counted_again() {
    let dir = tempfile::tempdir().unwrap();
    let (cat, ident) = common::sqlite_catalog(dir.path(), "kept").await;
    let view = TableView::load(&cat, &ident).await.unwrap();
    let mut w = WindowWriter::new(&view.table, "a", Default::default(), false).await.unwrap();
    w.write(common::batch([(1, 10), (2, DAY + 5)])).await.unwrap();
    append(&cat, &ident, w.close().await.unwrap()).await;
    let table = cat.load_table(&ident).await.unwrap();
    let expected = BTreeMap::from([(0, 1), (1, 1)]);
    assert_eq!(DayCounter::default().count(&table, "ts", None, 5).await.unwrap(), expected);
    let kept = format!("{}/offload/audit-days.json", table.metadata().location().trim_start_matches("file://"));
    assert!(std::fs::read_to_string(&kept).unwrap().contains("manifests"), "written for the next process");
    assert_eq!(DayCounter::default().count(&table, "ts", None, 5).await.unwrap(), expected);
    std::fs::write(&kept, b"{not json").unwrap();
    assert_eq!(DayCounter::default().count(&table, "ts", None, 5).await.unwrap(), expected);
}
