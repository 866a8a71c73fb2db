//! The offload of one table: window after window until caught up, each window read from
//! ClickHouse as a stream, written as Parquet, and committed through [`crate::commit`].

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use iceberg::Catalog;
use tokio_util::sync::CancellationToken;

use crate::commit::{self, Attempt, TableView};
use crate::config::TableConfig;
use crate::error::{OffloadError, Result};
use crate::events;
use crate::fault;
use crate::metrics::Metrics;
use crate::sink::{table as target, writer::WindowWriter};
use crate::source::ClickHouse;
use crate::source::query::SourceTable;
use crate::state::StateStore;
use crate::util::now_epoch_ns;

/// The services one table's offload uses.
#[derive(Clone)]
pub struct Services {
    pub ch: ClickHouse,
    pub catalog: Arc<dyn Catalog>,
    pub state: Option<StateStore>,
    pub metrics: Arc<Metrics>,
}

#[derive(Debug, Clone, Default)]
pub struct TableOutcome {
    pub rows: u64,
    pub windows: usize,
    pub snapshot_id: Option<i64>,
    pub watermark: Option<String>,
    pub last_window: Option<(Option<String>, String)>,
    pub rows_behind: Option<u64>,
    pub ttl_headroom_seconds: Option<f64>,
    pub late_rows: Option<i64>,
    /// The watermark's cursor, ns since the epoch.
    pub watermark_ns: Option<i64>,
}

/// How many batches may wait between the ClickHouse reader and the Parquet writer:
/// enough to overlap reading with writing, few enough to keep memory flat.
const PIPELINE_DEPTH: usize = 4;

impl TableOutcome {
    /// Adds a later attempt of the same cycle (a retry) to the work done so far.
    pub fn absorb(&mut self, later: TableOutcome) {
        self.rows += later.rows;
        self.windows += later.windows;
        fn newer<T>(slot: &mut Option<T>, later: Option<T>) {
            if later.is_some() {
                *slot = later;
            }
        }
        newer(&mut self.snapshot_id, later.snapshot_id);
        newer(&mut self.watermark, later.watermark);
        newer(&mut self.last_window, later.last_window);
        newer(&mut self.rows_behind, later.rows_behind);
        newer(&mut self.ttl_headroom_seconds, later.ttl_headroom_seconds);
        newer(&mut self.late_rows, later.late_rows);
        newer(&mut self.watermark_ns, later.watermark_ns);
    }
}

/// Offloads every settled row of one table, in bounded windows, recording in `outcome` what
/// this attempt committed, even when it fails later (the committed windows stay committed).
/// `cancel` fires on timeout or shutdown; no commit starts after it fired.
pub async fn offload_table(
    svc: &Services,
    cfg: &TableConfig,
    cancel: &CancellationToken,
    outcome: &mut TableOutcome,
) -> Result<()> {
    let source = until_cancelled(cancel, SourceTable::describe(&svc.ch, cfg)).await?;
    let projection = source.projection()?;
    let ident = target::ident(cfg);
    until_cancelled(cancel, target::ensure(&svc.catalog, cfg, &projection)).await?;
    // The watermark as of the last view or commit.
    let mut position: Option<crate::commit::Position>;
    loop {
        if cancel.is_cancelled() {
            return Err(OffloadError::Cancelled);
        }
        // I3: every window starts from the watermark in Iceberg.
        let view = until_cancelled(cancel, TableView::load(&svc.catalog, &ident)).await?;
        position = view.watermark.clone();
        target::check_compatible(&view.table, cfg, &projection)
            .map_err(|message| OffloadError::Schema { table: cfg.source(), message })?;
        if outcome.windows == 0 {
            commit::sweep_stray_metadata(&view.table).await;
            if let Ok(Some(late)) = until_cancelled(cancel, commit::late_rows(&source, &svc.ch, &view)).await {
                if late > 0 {
                    events::LateRows { table: cfg.name(), rows: late }.emit(&svc.metrics);
                }
                outcome.late_rows = Some(late.max(0));
            }
            if source.cursor_is_nullable()
                && let Ok(n) = until_cancelled(cancel, source.null_cursor_rows(&svc.ch)).await
                && n > 0
            {
                events::NullCursorRows { table: cfg.name(), cursor: &cfg.cursor, rows: n }.emit(&svc.metrics);
            }
        }
        // I1: the window is fixed here, before anything is read.
        let planned = commit::plan_window(&source, &svc.ch, view.watermark.as_ref(), now_epoch_ns());
        let Some(window) = until_cancelled(cancel, planned).await? else {
            if outcome.windows == 0 {
                outcome.watermark = view.watermark.as_ref().map(|w| w.display());
                outcome.snapshot_id = view.snapshot_id();
            }
            break;
        };
        let started = Instant::now();
        let attempt = Attempt { run_id: uuid::Uuid::now_v7().to_string(), source: cfg.source() };
        let (sql, params) = source.select(&projection, window.lo.as_ref(), &window.hi);
        let mut writer = WindowWriter::new(&view.table, &attempt.run_id, cfg.integer_encoding).await?;
        let read = read_into(svc, &sql, &params, projection.len(), &mut writer, cancel).await;
        let read_seconds = started.elapsed().as_secs_f64();
        let rows = writer.rows;
        let files = writer.close().await?;
        tracing::debug!(
            table = cfg.name(),
            read_seconds,
            close_seconds = started.elapsed().as_secs_f64() - read_seconds,
            "window read and written"
        );
        let read = read.map_err(|e| source.explain_read_error(e)).and_then(|()| fault::hit("after_files_written"));
        if let Err(e) = read {
            // I8: an attempt that will not commit removes what it wrote.
            let paths: Vec<String> = files.iter().map(|f| f.file_path().to_string()).collect();
            commit::delete_files(&view.table, &paths).await;
            return Err(e);
        }
        if rows != window.planned_rows {
            tracing::warn!(
                table = cfg.name(),
                planned = window.planned_rows,
                read = rows,
                "the window changed between planning and reading (rows inserted below the settle limit?)"
            );
        }
        if cancel.is_cancelled() {
            let paths: Vec<String> = files.iter().map(|f| f.file_path().to_string()).collect();
            commit::delete_files(&view.table, &paths).await;
            return Err(OffloadError::Cancelled);
        }
        if let Err(e) = fault::hit("before_commit") {
            let paths: Vec<String> = files.iter().map(|f| f.file_path().to_string()).collect();
            commit::delete_files(&view.table, &paths).await;
            return Err(e);
        }
        let file_count = files.len();
        let bytes: u64 = files.iter().map(|f| f.file_size_in_bytes()).sum();
        let committed = match commit::commit_window(&svc.catalog, &view, files, &window, rows, &attempt).await {
            Ok(c) => c,
            Err(e) => {
                let conflict = matches!(e, OffloadError::CommitConflict { .. });
                events::CommitFailed { table: cfg.name(), conflict, reason: &e.to_string() }.emit(&svc.metrics);
                return Err(e);
            }
        };
        let watermark = window.hi.display();
        events::WindowCommitted {
            table: cfg.name(),
            layer: &cfg.layer,
            rows,
            files: file_count,
            bytes,
            snapshot_id: committed.snapshot_id,
            watermark: &watermark,
            watermark_data_seconds: window.hi.cursor_ns as f64 / 1e9,
            duration: started.elapsed(),
            resolved_after_error: committed.resolved_after_error,
        }
        .emit(&svc.metrics);
        outcome.rows += rows;
        outcome.windows += 1;
        outcome.snapshot_id = Some(committed.snapshot_id);
        outcome.watermark = Some(watermark);
        outcome.last_window = Some((window.lo.as_ref().map(|p| p.display()), window.hi.display()));
        position = Some(window.hi.clone());
        fault::hit("after_commit")?;
        // I7: the mirror follows the truth; its failure costs nothing but a log line.
        if let Some(state) = &svc.state {
            let wm = crate::util::format_epoch_ns(window.hi.cursor_ns);
            if let Err(e) = state
                .record_window_committed(
                    cfg.name(),
                    &wm,
                    window.hi.tiebreak.as_deref(),
                    rows as i64,
                    started.elapsed().as_secs_f64(),
                    Some(committed.snapshot_id),
                )
                .await
            {
                tracing::warn!(
                    table = cfg.name(),
                    "state store not updated after commit (Iceberg stays authoritative): {e}"
                );
            }
        }
        if !window.bounded {
            break;
        }
    }
    // Where the table stands: rows still waiting, and how long until the source TTL could
    // delete the oldest of them. Best effort: these only feed metrics.
    let wm = position.as_ref();
    outcome.watermark_ns = wm.map(|w| w.cursor_ns);
    let best_effort = |what: &str, e: OffloadError| tracing::warn!(table = cfg.name(), "cannot measure {what}: {e}");
    outcome.rows_behind =
        until_cancelled(cancel, source.rows_after(&svc.ch, wm)).await.map_err(|e| best_effort("rows behind", e)).ok();
    outcome.ttl_headroom_seconds = until_cancelled(cancel, source.ttl_headroom_seconds(&svc.ch, wm))
        .await
        .map_err(|e| best_effort("TTL headroom", e))
        .ok()
        .flatten();
    Ok(())
}

/// Streams the window from ClickHouse into the writer. Reading runs in its own task so
/// that decoding overlaps with Parquet encoding; the channel bounds what is in flight.
async fn read_into(
    svc: &Services,
    sql: &str,
    params: &[(String, String)],
    columns: usize,
    writer: &mut WindowWriter,
    cancel: &CancellationToken,
) -> Result<()> {
    let stream = until_cancelled(cancel, svc.ch.query_arrow(sql, params, block_rows(columns))).await?;
    fault::hit("after_read_start")?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(PIPELINE_DEPTH);
    let reader = tokio::spawn(async move {
        let mut stream = Box::pin(stream);
        while let Some(item) = stream.next().await {
            let failed = item.is_err();
            if tx.send(item).await.is_err() || failed {
                break;
            }
        }
    });
    let result = async {
        loop {
            let item = tokio::select! {
                _ = cancel.cancelled() => return Err(OffloadError::Cancelled),
                item = rx.recv() => item,
            };
            match item {
                None => return Ok(()),
                Some(batch) => {
                    writer.write(batch?).await?;
                    fault::hit("mid_stream")?;
                }
            }
        }
    }
    .await;
    reader.abort();
    result
}

/// Rows per batch asked of ClickHouse: its default 65,536 for up to 10 columns, fewer for wider
/// tables, so the batches in flight (`PIPELINE_DEPTH`) take about the same memory at any width.
fn block_rows(columns: usize) -> usize {
    (65_536 * 10 / columns.max(10)).max(8_192)
}

/// Runs a step that may be abandoned: the per-table timeout or a shutdown cancels it.
/// The commit is never run through this: once started, it completes (I5 resolves it).
async fn until_cancelled<T>(
    cancel: &CancellationToken,
    step: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(OffloadError::Cancelled),
        r = step => r,
    }
}
