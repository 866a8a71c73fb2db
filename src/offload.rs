//! The offload of one table: window after window until caught up, each window read from
//! ClickHouse as a stream, written as Parquet, and committed through [`crate::commit`].

use std::time::Instant;

use futures::StreamExt;
use iceberg::TableIdent;
use iceberg::spec::DataFile;
use iceberg::table::Table;
use tokio_util::sync::CancellationToken;

use crate::audit;
use crate::commit::{self, Attempt, AttemptFiles, Journal, Position, TableView, Window, sweep_dead_metadata};
use crate::config::TableConfig;
use crate::error::{OffloadError, Result};
use crate::events;
use crate::fault;
use crate::sink::{table as target, writer::WindowWriter};
use crate::source::query::{Projection, SourceTable};
use crate::tiers::HybridView;
use crate::util::now_epoch_ns;

pub use crate::services::{AuditSettings, Services};

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
    /// Commit attempts of the table whose outcome is still unknown (I5).
    pub pending_commits: Option<usize>,
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
        newer(&mut self.pending_commits, later.pending_commits);
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
    let mut run = TableRun::start(svc, cfg, cancel, outcome).await?;
    let result: Result<()> = async {
        while run.next_window(outcome).await? {}
        Ok(())
    }
    .await;
    outcome.pending_commits = Some(run.journal.entries().len());
    events::PendingCommits {
        table: cfg.name(),
        count: run.journal.entries().len(),
        oldest_started_ms: run.journal.entries().iter().map(|a| a.started_at_ms).min(),
    }
    .emit(&svc.metrics);
    result?;
    run.measure(outcome).await;
    run.audit(outcome).await;
    Ok(())
}

/// One table's run within a cycle: what stays the same from window to window.
struct TableRun<'a> {
    svc: &'a Services,
    cfg: &'a TableConfig,
    cancel: &'a CancellationToken,
    source: SourceTable,
    projection: Projection,
    ident: TableIdent,
    journal: Journal,
    /// The view read at the start, used by the first window.
    first_view: Option<TableView>,
    /// The watermark as of the last view or commit.
    position: Option<Position>,
    /// ClickHouse's clock minus this host's (I1: windows are cut on the source's clock).
    clock_offset_ns: i64,
    /// `ORDER BY` of a window whose rows spread over many partitions (clustered writing).
    partition_order: Option<String>,
}

/// A table that holds snapshots none of which carries our watermark was written by another
/// engine: offloading into it would start from the first source row and double what it holds.
fn refuse_foreign_table(view: &TableView, cfg: &TableConfig) -> Result<()> {
    let adopted = view.table.metadata().properties().contains_key(commit::SUMMARY_ADOPTED_FROM);
    if view.origin != commit::WatermarkOrigin::Nothing || (view.snapshot_id().is_none() && !adopted) {
        return Ok(());
    }
    let message = if adopted {
        format!(
            "the Iceberg table {} was registered by `adopt`, which stopped before recording its watermark; run `iceberg-offload adopt {} --from <the same directory> --apply` again to finish",
            cfg.target(),
            cfg.name()
        )
    } else {
        format!(
            "the Iceberg table {} holds snapshots that this service did not write and no watermark of this service, so the first window would start at the first source row and repeat what the table holds. Take it over with `iceberg-offload adopt {} --from <its directory in the original's warehouse>` (docs/migration.md)",
            cfg.target(),
            cfg.name()
        )
    };
    Err(OffloadError::Schema { table: cfg.source(), message })
}

/// An adopted table whose original pipeline wrote a version after the one adopted: two
/// writers, each invisible to the other's catalog. Nothing is written until it is stopped.
async fn refuse_original_still_writing(view: &TableView, cfg: &TableConfig) -> Result<()> {
    let Some(from) = view.table.metadata().properties().get(commit::SUMMARY_ADOPTED_FROM) else { return Ok(()) };
    let Some(next) = crate::adopt::next_hadoop_version(from) else { return Ok(()) };
    if view.table.file_io().exists(&next).await.unwrap_or(false) {
        return Err(OffloadError::Schema {
            table: cfg.source(),
            message: format!(
                "the original pipeline wrote {next} after {} was adopted from {from}: it is still running. Stop it (docs/migration.md, step 1); its rows since then are not in this table",
                cfg.target()
            ),
        });
    }
    Ok(())
}

impl<'a> TableRun<'a> {
    /// Describes the source, makes sure the target exists, and resolves what earlier runs left
    /// unresolved before anything new is written: pending commits (I5), lost metadata files
    /// (I8), the operators' mirror (I7).
    async fn start(
        svc: &'a Services,
        cfg: &'a TableConfig,
        cancel: &'a CancellationToken,
        outcome: &mut TableOutcome,
    ) -> Result<Self> {
        let source = until_cancelled(cancel, SourceTable::describe(&svc.ch, cfg)).await?;
        let projection = source.projection()?;
        let clock_offset_ns = until_cancelled(cancel, measure_clock(svc, cfg)).await?;
        let ident = target::ident(cfg);
        // I11 before anything changes the target: W means something only on the source,
        // cursor and tiebreak it was measured on.
        let existing = until_cancelled(cancel, target::load_existing(&svc.catalog, cfg)).await?;
        if let Some(table) = &existing {
            check_measured_on(&TableView::of(table.clone())?, &source, cfg)?;
        }
        let table = until_cancelled(cancel, target::ensure_from(&svc.catalog, cfg, &projection, existing)).await?;
        let view = TableView::of(table)?;
        refuse_foreign_table(&view, cfg)?;
        until_cancelled(cancel, refuse_original_still_writing(&view, cfg)).await?;
        let journal = until_cancelled(cancel, Journal::load(&view.table, svc.limits.storage)).await?;
        let partition_order = until_cancelled(cancel, partition_order(svc, cfg, &source, &projection)).await?;
        let mut run = Self {
            svc,
            cfg,
            cancel,
            source,
            projection,
            ident,
            journal,
            position: view.watermark.clone(),
            first_view: None,
            clock_offset_ns,
            partition_order,
        };
        run.settle_journal(&view.table).await;
        sweep_dead_metadata(&view.table);
        if let Some(d) = &view.disagreement {
            events::WatermarkPropertyDisagrees {
                table: cfg.name(),
                property: d.property.as_ref(),
                history: d.history.as_ref(),
            }
            .emit(&svc.metrics);
        }
        run.reconcile_mirror(&view).await;
        run.pin_view(&view.table, view.snapshot_id(), view.watermark.as_ref(), events::ViewCause::Stale).await;
        run.check_source().await;
        outcome.watermark = view.watermark.as_ref().map(|w| w.display());
        outcome.snapshot_id = view.snapshot_id();
        run.first_view = Some(view);
        Ok(run)
    }

    /// I5: resolves the journal's attempts against the table; attempts found committed count
    /// their rows now.
    async fn settle_journal(&mut self, table: &Table) {
        match self.journal.settle(table).await {
            Ok(settled) => {
                for s in settled {
                    events::PendingResolved {
                        table: self.cfg.name(),
                        layer: &self.cfg.layer,
                        run_id: &s.attempt.run_id,
                        resolution: s.resolution,
                        rows: s.attempt.rows,
                    }
                    .emit(&self.svc.metrics);
                }
            }
            Err(e) => tracing::warn!(table = self.cfg.name(), "cannot settle the attempt journal: {e}"),
        }
    }

    /// I7: the mirror is corrected from Iceberg at the start of each run, never moved backwards
    /// by a writer whose view is older than the one that last wrote it.
    async fn reconcile_mirror(&self, view: &TableView) {
        let Some(state) = &self.svc.state else { return };
        let snapshot = match view.origin {
            commit::WatermarkOrigin::Snapshot(id) => Some(id),
            _ => view.snapshot_id(),
        };
        let sequence = view.table.metadata().last_sequence_number();
        let w = view.watermark.as_ref();
        let meta = view.table.metadata();
        let in_table = |id: i64| meta.snapshot_by_id(id).is_some();
        match state.reconcile_watermark(self.cfg.name(), w, snapshot, sequence, &in_table).await {
            Ok(Some(before)) => events::MirrorCorrected {
                table: self.cfg.name(),
                before: &before,
                after: &w.map(|w| w.display()).unwrap_or_else(|| "none".into()),
            }
            .emit(&self.svc.metrics),
            Ok(None) => {}
            Err(e) => tracing::warn!(table = self.cfg.name(), "cannot reconcile the state-store mirror: {e}"),
        }
    }

    /// Rows that can never be offloaded (NULL cursor): reported, best effort. A cursor made
    /// non-`Nullable` has none (the gauge returns to 0).
    async fn check_source(&self) {
        let (svc, cfg) = (self.svc, self.cfg);
        let rows = if self.source.cursor_is_nullable() {
            match until_cancelled(self.cancel, self.source.null_cursor_rows(&svc.ch)).await {
                Ok(n) => n,
                Err(_) => return,
            }
        } else {
            0
        };
        events::NullCursorRows { table: cfg.name(), cursor: &cfg.cursor, rows }.emit(&svc.metrics);
    }

    /// Plans, reads, writes and commits the next window. Returns whether more settled rows
    /// may be waiting (the window was bounded).
    async fn next_window(&mut self, outcome: &mut TableOutcome) -> Result<bool> {
        if self.cancel.is_cancelled() {
            return Err(OffloadError::Cancelled);
        }
        // I3: every window starts from the watermark in Iceberg's history.
        let view = match self.first_view.take() {
            Some(v) => v,
            None => until_cancelled(self.cancel, TableView::load(&self.svc.catalog, &self.ident)).await?,
        };
        self.position = view.watermark.clone();
        // I11 at every window: another writer may have moved W, or the source changed types.
        check_measured_on(&view, &self.source, self.cfg)?;
        target::check_compatible(&view.table, self.cfg, &self.projection)
            .map_err(|message| OffloadError::Schema { table: self.cfg.source(), message })?;
        // I1: the window is fixed here, before anything is read.
        let source_now = now_epoch_ns() + self.clock_offset_ns;
        let planned = commit::plan_window(&self.source, &self.svc.ch, view.watermark.as_ref(), source_now);
        let Some(window) = until_cancelled(self.cancel, planned).await? else { return Ok(false) };
        let started = Instant::now();
        let attempt = Attempt::new(self.source.measure());
        let (files, rows) = self.write_window(&view, &window, &attempt).await?;
        // A column added to the source while the window was read is not in it: read the window
        // again with it, so that no committed row has NULL where the source has a value.
        let changed = until_cancelled(self.cancel, self.refresh_source()).await;
        if !matches!(changed, Ok(false)) {
            let paths: Vec<String> = files.iter().map(|f| f.file_path().to_string()).collect();
            AttemptFiles { table: &view.table, run_id: &attempt.run_id, paths: &paths, limit: self.svc.limits.storage }
                .discard()
                .await;
            return changed;
        }
        let file_count = files.len();
        let bytes: u64 = files.iter().map(|f| f.file_size_in_bytes()).sum();
        let cx = self.svc.commit_context();
        let committed = match commit::commit_window(&cx, &view, &mut self.journal, files, &window, rows, &attempt).await
        {
            Ok(c) => c,
            Err(e) => {
                events::CommitFailed { table: self.cfg.name(), error: &e }.emit(&self.svc.metrics);
                return Err(e);
            }
        };
        let watermark = window.hi.display();
        events::WindowCommitted {
            table: self.cfg.name(),
            layer: &self.cfg.layer,
            rows,
            files: file_count,
            bytes,
            snapshot_id: committed.snapshot_id,
            watermark: &watermark,
            watermark_data_seconds: window.hi.cursor_ns as f64 / 1e9,
            duration: started.elapsed(),
            resolved_after_error: committed.resolved_after_error,
        }
        .emit(&self.svc.metrics);
        outcome.rows += rows;
        outcome.windows += 1;
        outcome.snapshot_id = Some(committed.snapshot_id);
        outcome.watermark = Some(watermark);
        outcome.last_window = Some((window.lo.as_ref().map(|p| p.display()), window.hi.display()));
        self.position = Some(window.hi.clone());
        commit::delete_dropped_metadata(&view.table, &committed.table, self.svc.limits.storage).await;
        // Earlier attempts fenced on the snapshot this commit replaced can never land now.
        if !self.journal.entries().is_empty() {
            self.settle_journal(&committed.table).await;
        }
        fault::hit("after_commit")?;
        self.mirror_window(&window, rows, started, &committed.table, committed.snapshot_id).await;
        self.pin_view(&committed.table, Some(committed.snapshot_id), Some(&window.hi), events::ViewCause::Commit).await;
        Ok(window.bounded)
    }

    /// I13: the table's hot+cold view pinned on `snapshot_id` and the `w` it carries.
    async fn pin_view(&self, table: &Table, snapshot_id: Option<i64>, w: Option<&Position>, cause: events::ViewCause) {
        let Some(view) = HybridView::of(self.cfg, &self.source) else { return };
        let _ =
            until_cancelled(self.cancel, async { Ok(view.pin(self.svc, table, snapshot_id, w, cause).await) }).await;
    }

    /// Describes the source again; when its columns changed, takes the new projection and adds
    /// new columns to the target (schema evolution) before the next window is read.
    async fn refresh_source(&mut self) -> Result<bool> {
        let now = SourceTable::describe(&self.svc.ch, self.cfg).await?;
        let same = now.columns.len() == self.source.columns.len()
            && now.columns.iter().zip(&self.source.columns).all(|(a, b)| a.name == b.name && a.ch_type == b.ch_type);
        if same {
            return Ok(false);
        }
        let projection = now.projection()?;
        target::ensure(&self.svc.catalog, self.cfg, &projection).await?;
        events::SourceColumnsChanged { table: self.cfg.name() }.emit(&self.svc.metrics);
        self.source = now;
        self.projection = projection;
        Ok(true)
    }

    /// Reads the window from ClickHouse into Parquet files. A window that will not be
    /// committed removes what it wrote (I8).
    async fn write_window(&self, view: &TableView, window: &Window, attempt: &Attempt) -> Result<(Vec<DataFile>, u64)> {
        let started = Instant::now();
        let order = self.partition_order.as_deref();
        let (sql, params) = self.source.select(&self.projection, window.lo.as_ref(), &window.hi, order);
        let mut writer =
            WindowWriter::new(&view.table, &attempt.run_id, self.cfg.integer_encoding, order.is_some()).await?;
        let read = read_into(self.svc, &sql, &params, self.projection.len(), &mut writer, self.cancel).await;
        let read_seconds = started.elapsed().as_secs_f64();
        let rows = writer.rows;
        if writer.reopened_partitions() > 0 {
            tracing::info!(
                table = self.cfg.name(),
                reopened = writer.reopened_partitions(),
                "partitions came back after their file was closed: ClickHouse's order differs from Iceberg's transform (more files, same rows; past 16 the window was written with every partition open)"
            );
        }
        let files = until_cancelled(self.cancel, writer.close()).await?;
        tracing::debug!(
            table = self.cfg.name(),
            read_seconds,
            close_seconds = started.elapsed().as_secs_f64() - read_seconds,
            "window read and written"
        );
        let checked = read
            .map_err(|e| self.source.explain_read_error(e))
            .and_then(|()| fault::hit("after_files_written"))
            .and_then(|()| if self.cancel.is_cancelled() { Err(OffloadError::Cancelled) } else { Ok(()) })
            .and_then(|()| fault::hit("before_commit"));
        if let Err(e) = checked {
            let paths: Vec<String> = files.iter().map(|f| f.file_path().to_string()).collect();
            AttemptFiles { table: &view.table, run_id: &attempt.run_id, paths: &paths, limit: self.svc.limits.storage }
                .discard()
                .await;
            return Err(e);
        }
        // I1, complete reads: the rows read are the rows planned. Fewer means ClickHouse
        // returned part of the window (a server profile, a row policy, a lagging replica):
        // committing it would move W past rows never read.
        if rows < window.planned_rows {
            let paths: Vec<String> = files.iter().map(|f| f.file_path().to_string()).collect();
            AttemptFiles { table: &view.table, run_id: &attempt.run_id, paths: &paths, limit: self.svc.limits.storage }
                .discard()
                .await;
            return Err(OffloadError::IncompleteWindow {
                table: self.cfg.source(),
                planned: window.planned_rows,
                read: rows,
            });
        }
        if rows > window.planned_rows {
            events::WindowGrew { table: self.cfg.name(), planned: window.planned_rows, read: rows }
                .emit(&self.svc.metrics);
        }
        Ok((files, rows))
    }

    /// I7: the mirror follows the truth; its failure costs nothing but a log line.
    async fn mirror_window(&self, window: &Window, rows: u64, started: Instant, table: &Table, snapshot_id: i64) {
        let Some(state) = &self.svc.state else { return };
        let recorded = state
            .record_window_committed(
                self.cfg.name(),
                &window.hi,
                rows as i64,
                started.elapsed().as_secs_f64(),
                Some(snapshot_id),
                table.metadata().last_sequence_number(),
            )
            .await;
        if let Err(e) = recorded {
            tracing::warn!(
                table = self.cfg.name(),
                "state store not updated after commit (Iceberg stays authoritative): {e}"
            );
        }
    }

    /// Where the table stands: rows still waiting, and how long until the source TTL could
    /// delete the oldest of them. Best effort: these only feed metrics.
    async fn measure(&self, outcome: &mut TableOutcome) {
        let (svc, cfg, cancel) = (self.svc, self.cfg, self.cancel);
        let wm = self.position.as_ref();
        outcome.watermark_ns = wm.map(|w| w.cursor_ns);
        let best_effort =
            |what: &str, e: OffloadError| tracing::warn!(table = cfg.name(), "cannot measure {what}: {e}");
        outcome.rows_behind = until_cancelled(cancel, self.source.rows_after(&svc.ch, wm))
            .await
            .map_err(|e| best_effort("rows behind", e))
            .ok();
        outcome.ttl_headroom_seconds = until_cancelled(cancel, self.source.ttl_headroom_seconds(&svc.ch, wm))
            .await
            .map_err(|e| best_effort("TTL headroom", e))
            .ok()
            .flatten();
    }
}

impl TableRun<'_> {
    /// I9: the audit due this cycle (recent days, or every retained day), against the table
    /// as it is now. Best effort: a failure is a warning and leaves the metrics as they were.
    async fn audit(&self, outcome: &mut TableOutcome) {
        let (svc, cfg) = (self.svc, self.cfg);
        // A process started by cron (`once`) learns from the state store when the last full
        // audit ran, so that it runs daily, not at every start.
        if !svc.audits.knows(cfg.name())
            && let Some(state) = &svc.state
            && let Ok(Some(ms)) = state.last_full_audit(cfg.name()).await
        {
            let age_ms = (now_epoch_ns() / 1_000_000).saturating_sub(ms).max(0) as u64;
            svc.audits.remember_full(cfg.name(), std::time::Duration::from_millis(age_ms));
        }
        let Some(scope) = svc.audits.due(cfg.name(), svc.audit.recent_days, svc.audit.full_every) else { return };
        let run = async {
            let view = TableView::load(&svc.catalog, &self.ident).await?;
            if view.watermark.is_none() {
                return Ok(None);
            }
            let now_ns = now_epoch_ns() + self.clock_offset_ns;
            let subject = audit::Subject {
                audits: &svc.audits,
                name: cfg.name(),
                source: &self.source,
                ch: &svc.ch,
                view: &view,
            };
            let (first, last, retained) = subject.plan(now_ns, scope, svc.audit.recent_days).await?;
            let results = subject.audit(first, last).await?;
            Ok(Some((results, retained)))
        };
        match until_cancelled(self.cancel, run).await {
            Ok(Some((results, retained))) => {
                // Days out of the retention now are dropped from what the metrics sum.
                let mut totals = svc.audits.record(cfg.name(), scope, retained, &results);
                if let Some(state) = &svc.state {
                    // The state store holds every day's latest verdict, whichever run made it.
                    let stored = async {
                        state.record_audit(cfg.name(), &results, retained).await?;
                        if scope == audit::Scope::Full {
                            state.record_full_audit(cfg.name(), now_epoch_ns() / 1_000_000).await?;
                        }
                        state.audit_totals(cfg.name(), retained).await
                    };
                    match stored.await {
                        Ok(t) => totals = t,
                        Err(e) => {
                            tracing::warn!(table = cfg.name(), "audit results not written to the state store: {e}")
                        }
                    }
                }
                events::Audited { table: cfg.name(), scope, results: &results, totals: &totals }.emit(&svc.metrics);
                outcome.late_rows = Some(totals.missing_rows as i64);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(table = cfg.name(), scope = scope.as_str(), "audit failed: {e}"),
        }
    }
}

/// I11: refuses a view whose `W` was measured on another source, cursor or tiebreak than the
/// table is read with now.
fn check_measured_on(view: &TableView, source: &SourceTable, cfg: &TableConfig) -> Result<()> {
    match view.measured_on.difference(&source.measure()) {
        None => Ok(()),
        Some((field, recorded, configured)) => Err(OffloadError::WatermarkMeasuredOnOther {
            table: cfg.source(),
            name: cfg.name().to_string(),
            field,
            recorded,
            configured,
        }),
    }
}

/// How windows of a table with many partitions per window are sorted: by partition, if
/// ClickHouse can compute it; otherwise unsorted, written by a writer per partition (more memory).
async fn partition_order(
    svc: &Services,
    cfg: &TableConfig,
    source: &SourceTable,
    projection: &Projection,
) -> Result<Option<String>> {
    let Some(order) = source.partition_order(projection) else { return Ok(None) };
    match source.accepts_order(&svc.ch, &order).await {
        Ok(()) => Ok(Some(order)),
        Err(e) if e.is_transient() => Err(e),
        Err(e) => {
            tracing::warn!(
                table = cfg.name(),
                "ClickHouse cannot sort windows by partition ({order}): {e}; windows are written with one file per partition open at once"
            );
            Ok(None)
        }
    }
}

/// ClickHouse's clock against this host's: exported, and a table fails when they are further
/// apart than `clickhouse.max_clock_skew`.
async fn measure_clock(svc: &Services, cfg: &TableConfig) -> Result<i64> {
    let (skew, offset) = svc.ch.clock_offset_ns().await?;
    let skew_seconds = skew as f64 / 1e9;
    events::ClockSkew { seconds: skew_seconds }.emit(&svc.metrics);
    let max = svc.max_clock_skew;
    if skew.unsigned_abs() as u128 > max.as_nanos() {
        return Err(OffloadError::ClockSkew { table: cfg.source(), skew_seconds, max });
    }
    Ok(offset)
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
/// The commit is never run through this: once sent, it completes within its own time limit
/// and I5 resolves it.
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
