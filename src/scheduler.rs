//! The scheduler: cycles aligned to wall-clock boundaries (UTC), tables in parallel up to
//! a limit, a per-table timeout that really cancels, retries with backoff for transient
//! errors, a lease per table, and a shutdown that never leaves half a commit.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use futures::future::join_all;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, TableConfig};
use crate::error::OffloadError;
use crate::events;
use crate::maintenance;
use crate::offload::{Services, TableOutcome, offload_table};
use crate::replicas::{self, Membership};
use crate::state::{Lease, RunRecord, StateStore, acquire_from, holder_is_gone, process_holder};

pub use crate::report::CycleStatus;

impl CycleStatus {
    fn of(tables: &[(String, TableResult)]) -> Self {
        let count = |f: fn(&TableResult) -> bool| tables.iter().filter(|(_, r)| f(r)).count();
        let failed = count(|r| matches!(r, TableResult::Failed(_)));
        let succeeded = count(|r| matches!(r, TableResult::Done(_)));
        if count(|r| matches!(r, TableResult::Interrupted)) > 0 {
            Self::Interrupted
        } else if failed == 0 {
            Self::Success
        } else if succeeded > 0 {
            Self::Partial
        } else {
            Self::Failed
        }
    }
}

#[derive(Debug)]
pub enum TableResult {
    Done(TableOutcome),
    Failed(OffloadError),
    /// Another writer holds the table's lease: not a failure of this process.
    Skipped(String),
    /// A shutdown stopped the table before it finished; nothing half-done was committed and
    /// the next start resumes from the Iceberg watermark.
    Interrupted,
    /// Another live replica owns the table this cycle: not this process's work.
    NotOwned,
}

#[derive(Debug)]
pub struct CycleReport {
    pub cycle_id: String,
    pub status: CycleStatus,
    pub duration: Duration,
    pub tables: Vec<(String, TableResult)>,
}

impl CycleReport {
    pub fn rows(&self) -> u64 {
        self.tables.iter().map(|(_, r)| if let TableResult::Done(o) = r { o.rows } else { 0 }).sum()
    }
}

pub struct Scheduler {
    pub config: Config,
    pub services: Services,
    /// Identifies this process as a lease holder.
    pub holder: String,
    pub shutdown: CancellationToken,
    /// Unix seconds of the last loop tick, for liveness (`/healthz`).
    pub heartbeat: Arc<AtomicI64>,
    /// Dependencies reachable at the last cycle (`/readyz`).
    pub ready: Arc<AtomicBool>,
    /// Whether tables are maintained after their offload when due (`run`; `once` does not).
    pub maintain: bool,
    /// The replicas sharing the tables (`run` with a state store); `None`: every table is ours.
    pub membership: Option<Arc<Membership>>,
    /// The tables this replica owned at its last cycle (`None` before the first).
    owned: std::sync::Mutex<Option<HashSet<String>>>,
}

impl Scheduler {
    pub fn new(config: Config, services: Services) -> Self {
        Self {
            // `host:pid:token`, a new token at every start: a restarted process with its old pid
            // (PID 1 in a container) is told apart from its predecessor (`holder_is_gone`).
            holder: process_holder(&uuid::Uuid::new_v4().to_string()[..8]),
            config,
            services,
            shutdown: CancellationToken::new(),
            heartbeat: Arc::new(AtomicI64::new(chrono::Utc::now().timestamp())),
            ready: Arc::new(AtomicBool::new(true)),
            maintain: false,
            membership: None,
            owned: std::sync::Mutex::new(None),
        }
    }

    /// Shares the tables with the other `run` processes of the same state store.
    pub fn with_replicas(mut self) -> Self {
        if let Some(state) = &self.services.state {
            let timeout = self.config.service.member_timeout;
            let tables: Vec<&str> = self.config.tables.iter().map(|t| t.name()).collect();
            self.membership = Some(Arc::new(Membership::new(state.clone(), self.holder.clone(), timeout, &tables)));
        }
        self
    }

    /// Maintains tables after their offload when due (`[maintenance]`).
    pub fn with_maintenance(mut self) -> Self {
        self.maintain = self.config.maintenance.enabled;
        self
    }

    pub fn with_ready(mut self, ready: Arc<AtomicBool>) -> Self {
        self.ready = ready;
        self
    }

    fn beat(&self) {
        beat(&self.heartbeat);
    }

    /// The longest one table may take in a cycle, retries included: its `table_timeout`, plus
    /// the allowance for resolving a commit already sent when the time was up (I10).
    fn table_budget(&self) -> Duration {
        self.config.service.table_timeout + self.config.catalog.limits.commit_allowance()
    }

    /// The longest a healthy cycle can take: every table's budget and its state-store calls
    /// around it (lease, status, run history: each within `state.timeout`), in waves of
    /// `parallelism`, plus a margin. Past it the loop counts as stuck.
    fn cycle_budget(&self) -> Duration {
        let waves = self.config.tables.len().div_ceil(self.config.service.parallelism) as u32;
        let state_calls = self.config.state.timeout * (8 + self.config.service.retries);
        let maintenance = if self.maintain { self.config.maintenance.timeout } else { Duration::ZERO };
        (self.table_budget() + maintenance + state_calls) * waves + Duration::from_secs(60)
    }

    /// One cycle over every configured table (those this replica owns).
    pub async fn run_cycle(&self) -> CycleReport {
        self.cycle(None).await
    }

    /// A cycle over the tables this replica owns now, or over `only` (tables it just gained).
    async fn cycle(&self, only: Option<HashSet<String>>) -> CycleReport {
        self.beat();
        let cycle_id = uuid::Uuid::now_v7().to_string();
        let started = Instant::now();
        let tables = only.as_ref().map_or(self.config.tables.len(), HashSet::len);
        let off_schedule = only.is_some();
        events::CycleStarted { cycle_id: &cycle_id, tables, off_schedule }.emit(&self.services.metrics);
        // Keep ticking while the cycle runs, but only within its budget: a cycle stuck past it
        // stops the heartbeat, so /healthz and systemd's watchdog see it.
        let ticker = {
            let heartbeat = self.heartbeat.clone();
            let budget = self.cycle_budget();
            tokio::spawn(async move {
                let until = Instant::now() + budget;
                while Instant::now() < until {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    beat(&heartbeat);
                }
            })
        };
        let owned = match only {
            Some(tables) => Some(tables),
            None => self.ownership().await,
        };
        let limit = Arc::new(Semaphore::new(self.config.service.parallelism));
        let jobs = self.config.tables.iter().map(|t| {
            let limit = limit.clone();
            let cycle_id = cycle_id.clone();
            let ours = owned.as_ref().is_none_or(|o| o.contains(t.name()));
            async move {
                if !ours {
                    return (t.name().to_string(), TableResult::NotOwned);
                }
                let _permit = limit.acquire().await.expect("semaphore open");
                (t.name().to_string(), self.run_table(t, &cycle_id).await)
            }
        });
        let tables = join_all(jobs).await;
        ticker.abort();
        let status = CycleStatus::of(&tables);
        let failed = tables.iter().filter(|(_, r)| matches!(r, TableResult::Failed(_))).count();
        let skipped =
            tables.iter().filter(|(_, r)| matches!(r, TableResult::Skipped(_) | TableResult::Interrupted)).count();
        let succeeded = tables.iter().filter(|(_, r)| matches!(r, TableResult::Done(_))).count();
        let unreachable = report_unreachable(&tables);
        self.ready.store(!unreachable, Ordering::Relaxed);
        let report = CycleReport { cycle_id, status, duration: started.elapsed(), tables };
        events::CycleCompleted {
            cycle_id: &report.cycle_id,
            status,
            duration: report.duration,
            succeeded,
            failed,
            skipped,
            rows: report.rows(),
            off_schedule,
        }
        .emit(&self.services.metrics);
        self.beat();
        report
    }

    /// The tables this replica runs this cycle: those the balanced assignment over the live
    /// members gives it. `None` (every table) without replicas, or when the state store cannot
    /// say who is live: then leases and I4 keep it correct, as with a single process.
    async fn ownership(&self) -> Option<HashSet<String>> {
        let m = self.membership.as_ref()?;
        let metrics = &self.services.metrics;
        let names: Vec<&str> = self.config.tables.iter().map(|t| t.name()).collect();
        let (members, mine): (usize, HashSet<String>) = match m.refresh(metrics).await {
            Ok(Some(live)) => {
                let owners = replicas::assign(&names, &live);
                (live.len(), owners.iter().filter(|(_, o)| **o == m.id).map(|(t, _)| t.to_string()).collect())
            }
            // Configured with different tables: each replica runs all of its own (leases decide).
            Ok(None) => (0, names.iter().map(|t| t.to_string()).collect()),
            Err(e) => {
                // What the replicas last agreed on stands; before any agreement, every table.
                let previous = self.owned.lock().expect("not poisoned").clone();
                tracing::warn!("cannot read the replica membership: {e}; this cycle keeps the last ownership");
                return previous;
            }
        };
        let (gained, lost) = {
            let mut previous = self.owned.lock().expect("not poisoned");
            // Before the first cycle every table's series exist (from start): as if all were ours.
            let had = |t: &str| previous.as_ref().is_none_or(|p| p.contains(t));
            let gained: Vec<&str> = names.iter().copied().filter(|t| mine.contains(*t) && !had(t)).collect();
            let lost: Vec<&str> = names.iter().copied().filter(|t| !mine.contains(*t) && had(t)).collect();
            *previous = Some(mine.clone());
            (gained, lost)
        };
        let tables: Vec<(&str, bool)> = names.iter().map(|t| (*t, mine.contains(*t))).collect();
        events::ReplicaOwnership { members, tables: &tables, gained: &gained, lost: &lost }.emit(metrics);
        let gained: Vec<&TableConfig> = self.config.tables.iter().filter(|t| gained.contains(&t.name())).collect();
        self.recall(&gained).await;
        Some(mine)
    }

    /// Creates the tables' series and recalls their last success from the state store, so that
    /// their lag is right from the first scrape (at start, and when a table comes to this replica).
    pub async fn recall(&self, tables: &[&TableConfig]) {
        let metrics = &self.services.metrics;
        for t in tables {
            metrics.init_table(t.name(), &t.layer);
        }
        let Some(state) = &self.services.state else { return };
        for t in tables {
            let unix = |ms: Option<i64>| ms.map(|ms| ms as f64 / 1000.0);
            // Only where this process maintains: with maintenance off, no alert on its age.
            let maintained = match self.maintain {
                true => state.last_maintenance_success(t.name()).await.ok().flatten(),
                false => None,
            };
            // A table that comes to this replica (or a restart) is not maintained again at once.
            if let Some(at) = maintained.and_then(chrono::DateTime::from_timestamp_millis) {
                self.services.maintenance.done(t.name(), at);
            }
            events::HistoryRecalled {
                table: t.name(),
                full_audit_unix: unix(state.last_full_audit(t.name()).await.ok().flatten()),
                maintenance_unix: unix(maintained),
            }
            .emit(metrics);
        }
        for row in state.watermarks().await.unwrap_or_default() {
            let last = row.last_successful_run.as_deref().and_then(crate::status::parse_time);
            if let (Some(at), true) = (last, tables.iter().any(|t| t.name() == row.table_name)) {
                events::LastSuccessRecalled {
                    table: &row.table_name,
                    unix_seconds: at.timestamp_millis() as f64 / 1000.0,
                }
                .emit(metrics);
            }
        }
    }

    /// One table within a cycle: lease, attempts within the table's time, state mirror.
    async fn run_table(&self, t: &TableConfig, cycle_id: &str) -> TableResult {
        let started = Instant::now();
        let ttl = self.config.service.lease_ttl;
        let lease = match LeaseGuard::take(&self.services, t, &self.holder, ttl, self.membership.as_deref()).await {
            Ok(lease) => lease,
            Err(reason) => {
                events::TableSkipped { table: t.name(), reason: &reason }.emit(&self.services.metrics);
                return TableResult::Skipped(reason);
            }
        };
        let result = self.attempts(t, cycle_id).await;
        let result = self.finish(t, result, started.elapsed()).await;
        // Only under a lease: with the state store down, every replica would maintain at once.
        if let TableResult::Done(outcome) = &result
            && self.maintain
            && lease.held_or_unneeded(&self.services)
        {
            // Under the same lease; a shutdown abandons it (an expiry is safe to cut short).
            tokio::select! {
                _ = maintenance::run_if_due(&self.services, t, &self.config.maintenance, outcome.windows as u64) => {}
                _ = self.shutdown.cancelled() => {}
            }
        }
        if matches!(result, TableResult::Done(_)) && self.maintain && lease.held_or_unneeded(&self.services) {
            // Under the same lease; a shutdown abandons it between two parts (each was proved).
            tokio::select! {
                _ = crate::evict::run_if_due(&self.services, t) => {}
                _ = self.shutdown.cancelled() => {}
            }
        }
        lease.release().await;
        result
    }

    /// Attempts of one table until it succeeds, fails for good, or its time is up. The time is
    /// `table_timeout` for all attempts together: after it no window starts and no commit is
    /// sent; a commit already sent gets the allowance of [`Self::table_budget`] to resolve.
    async fn attempts(&self, t: &TableConfig, cycle_id: &str) -> Result<TableOutcome, OffloadError> {
        let svc_cfg = &self.config.service;
        let deadline = tokio::time::Instant::now() + svc_cfg.table_timeout;
        let hard_stop = tokio::time::Instant::now() + self.table_budget();
        // What this cycle committed for the table, over all its attempts.
        let mut done = TableOutcome::default();
        for attempt in 1.. {
            let attempt_started = Instant::now();
            let cancel = self.shutdown.child_token();
            let timer = {
                let cancel = cancel.clone();
                tokio::spawn(async move {
                    tokio::time::sleep_until(deadline).await;
                    cancel.cancel();
                })
            };
            let mut this_attempt = TableOutcome::default();
            let run = tokio::time::timeout_at(hard_stop, offload_table(&self.services, t, &cancel, &mut this_attempt))
                .await
                .unwrap_or(Err(OffloadError::Timeout(svc_cfg.table_timeout)));
            timer.abort();
            // The token is cancelled by the timer or by a shutdown; without a shutdown it was the
            // timer (asking the timer task whether it finished races with its last poll).
            let run = match run {
                Err(OffloadError::Cancelled) if !self.shutdown.is_cancelled() => {
                    Err(OffloadError::Timeout(svc_cfg.table_timeout))
                }
                other => other,
            };
            self.record_run(cycle_id, t, &this_attempt, run.as_ref().err(), attempt_started.elapsed()).await;
            done.absorb(this_attempt);
            let e = match run {
                Ok(()) => return Ok(done),
                Err(OffloadError::Cancelled) => return Err(OffloadError::Cancelled),
                Err(e) => e,
            };
            let backoff = svc_cfg.retry_backoff * 2u32.pow(attempt - 1);
            let in_time = tokio::time::Instant::now() + backoff < deadline;
            let retry = e.is_transient() && attempt <= svc_cfg.retries && in_time && !self.shutdown.is_cancelled();
            events::TableFailed {
                table: t.name(),
                class: e.class(),
                kind: e.kind(),
                message: &e.to_string(),
                attempt,
                will_retry: retry,
                duration: attempt_started.elapsed(),
            }
            .emit(&self.services.metrics);
            if !retry {
                return Err(e);
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.shutdown.cancelled() => return Err(OffloadError::Cancelled),
            }
        }
        unreachable!("the attempts loop returns")
    }

    /// Reports the table's result: metrics, log line and the state-store mirror.
    async fn finish(&self, t: &TableConfig, result: Result<TableOutcome, OffloadError>, took: Duration) -> TableResult {
        let svc = &self.services;
        match result {
            Ok(outcome) => {
                events::TableOffloaded {
                    table: t.name(),
                    layer: &t.layer,
                    rows: outcome.rows,
                    windows: outcome.windows,
                    duration: took,
                    snapshot_id: outcome.snapshot_id,
                    watermark: outcome.watermark.clone(),
                    rows_behind: outcome.rows_behind,
                    ttl_headroom_seconds: outcome.ttl_headroom_seconds,
                    late_rows: outcome.late_rows,
                    watermark_ns: outcome.watermark_ns,
                }
                .emit(&svc.metrics);
                if let Some(state) = &svc.state {
                    let r = state.record_table_success(t.name(), took.as_secs_f64(), outcome.windows > 0).await;
                    if let Err(e) = r {
                        tracing::warn!(table = t.name(), "state store not updated (Iceberg stays authoritative): {e}");
                    }
                }
                TableResult::Done(outcome)
            }
            Err(OffloadError::Cancelled) => {
                events::TableInterrupted { table: t.name() }.emit(&svc.metrics);
                if let Some(state) = &svc.state {
                    let _ = state.set_status(t.name(), "interrupted").await;
                }
                TableResult::Interrupted
            }
            Err(e) => {
                if let Some(state) = &svc.state {
                    let _ = state.record_failure(t.name(), &e.to_string(), took.as_secs_f64()).await;
                }
                TableResult::Failed(e)
            }
        }
    }

    async fn record_run(
        &self,
        cycle_id: &str,
        t: &TableConfig,
        outcome: &TableOutcome,
        error: Option<&OffloadError>,
        took: Duration,
    ) {
        let Some(state) = &self.services.state else { return };
        let finished_at_ms = chrono::Utc::now().timestamp_millis();
        let mut r = RunRecord {
            run_id: uuid::Uuid::now_v7().to_string(),
            cycle_id: cycle_id.into(),
            table_name: t.name().into(),
            target_table: t.target(),
            duration_seconds: took.as_secs_f64(),
            holder: self.holder.clone(),
            started_at_ms: finished_at_ms - took.as_millis() as i64,
            finished_at_ms,
            ..Default::default()
        };
        // A failed attempt may have committed windows before it failed: they are recorded too.
        r.rows = outcome.rows as i64;
        r.snapshot_id = outcome.snapshot_id;
        if let Some((lo, hi)) = &outcome.last_window {
            r.window_lo = lo.clone();
            r.window_hi = Some(hi.clone());
        }
        match error {
            None => r.status = if outcome.windows == 0 { "no_data".into() } else { "success".into() },
            Some(OffloadError::Cancelled) => r.status = "interrupted".into(),
            Some(e) => {
                r.status = "failed".into();
                r.error_type = Some(e.class().as_str().into());
                r.error_kind = Some(e.kind().into());
                r.error_message = Some(e.to_string());
            }
        }
        if let Err(e) = state.record_run(&r).await {
            tracing::warn!(table = t.name(), "run history not recorded: {e}");
        }
    }

    /// The daemon: one cycle at start, then one at each interval boundary (UTC).
    /// A cycle that overruns skips the boundaries it missed, so cycles never overlap.
    pub async fn run_forever(&self) {
        // Heartbeats go on until the last cycle has finished (a commit in flight at SIGTERM
        // completes first), then stop before the member row is deleted: a heartbeat still in
        // flight on another connection would otherwise bring the row back after the leave.
        let stop = CancellationToken::new();
        if self.membership.is_some() {
            // The heartbeat's age counts from start: one that never lands is seen growing.
            self.services.metrics.member_heartbeat(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
        }
        let heartbeats = self.membership.clone().map(|m| {
            let (metrics, tick, stop) = (self.services.metrics.clone(), self.heartbeat.clone(), stop.clone());
            tokio::spawn(async move { heartbeat_while_ticking(&m, &metrics, &tick, &stop).await })
        });
        self.cycles_until_shutdown().await;
        stop.cancel();
        if let Some(h) = heartbeats {
            let _ = h.await;
        }
        if let Some(m) = &self.membership {
            m.leave().await;
        }
    }

    /// Between boundaries, at every heartbeat: the tables this replica gained since it last
    /// looked (a replica lost, leaving or joining) run at once, in a cycle of their own, each
    /// under its lease; the tables it kept wait for the aligned boundary. One loop runs the
    /// cycles, so two cycles of this process never overlap.
    async fn run_gained_tables(&self) {
        if self.shutdown.is_cancelled() {
            return;
        }
        let Some(before) = self.owned.lock().expect("not poisoned").clone() else { return };
        let Some(now) = self.ownership().await else { return };
        let gained: Vec<&str> =
            self.config.tables.iter().map(|t| t.name()).filter(|t| now.contains(*t) && !before.contains(*t)).collect();
        if gained.is_empty() || self.shutdown.is_cancelled() {
            return;
        }
        events::OffScheduleCycle { gained: &gained }.emit(&self.services.metrics);
        let only = gained.iter().map(|t| t.to_string()).collect();
        self.cycle(Some(only)).await;
    }

    async fn cycles_until_shutdown(&self) {
        loop {
            if self.shutdown.is_cancelled() {
                break;
            }
            self.run_cycle().await;
            if self.shutdown.is_cancelled() {
                break;
            }
            let next = next_boundary(chrono::Utc::now(), self.config.service.interval);
            tracing::info!("next cycle at {}", next.to_rfc3339());
            let mut looked = Instant::now();
            loop {
                let now = chrono::Utc::now();
                if now >= next {
                    break;
                }
                self.beat();
                if let Some(m) = &self.membership
                    && looked.elapsed() >= m.heartbeat_every()
                {
                    looked = Instant::now();
                    self.run_gained_tables().await;
                    continue;
                }
                let tick = self.membership.as_ref().map_or(Duration::from_secs(5), |m| m.heartbeat_every());
                let wait = (next - now).to_std().unwrap_or_default().min(tick.min(Duration::from_secs(5)));
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = self.shutdown.cancelled() => return,
                }
            }
        }
    }
}

/// I6: the table's lease for the time of its run, renewed in the background and released at
/// the end. Correctness never depends on it (I4 does), so a state store that cannot be
/// reached does not stop the offload.
struct LeaseGuard {
    state: Option<StateStore>,
    lease: Option<Lease>,
    renew: Option<tokio::task::JoinHandle<()>>,
}

impl LeaseGuard {
    /// Whether this process may act alone on the table: it holds the lease, or there is no
    /// state store to hold one in (a single process by configuration).
    fn held_or_unneeded(&self, svc: &Services) -> bool {
        self.lease.is_some() || svc.state.is_none()
    }

    /// Takes the lease, or says why the table must be skipped (another live holder has it).
    async fn take(
        svc: &Services,
        t: &TableConfig,
        holder: &str,
        ttl: Duration,
        membership: Option<&Membership>,
    ) -> Result<Self, String> {
        let Some(state) = svc.state.clone() else { return Ok(Self { state: None, lease: None, renew: None }) };
        if let Err(e) = state.ensure_table(t.name(), &t.target()).await {
            tracing::warn!(table = t.name(), "state store unavailable, continuing without lease and mirror: {e}");
            return Ok(Self { state: None, lease: None, renew: None });
        }
        let gone = |h: &str| membership.map_or_else(|| holder_is_gone(h, holder), |m| m.holder_gone(h));
        let lease = match acquire_from(&state, t.name(), holder, ttl, gone).await {
            Ok((l, from)) => {
                if let Some(from) = from {
                    events::LeaseTakenOver { table: t.name(), from: &from }.emit(&svc.metrics);
                }
                Some(l)
            }
            // A replica found gone: taken over at once if it is still silent now.
            Err(e @ OffloadError::LeaseHeld { .. }) => {
                let OffloadError::LeaseHeld { holder: ref from, .. } = e else { unreachable!() };
                match membership.filter(|m| m.is_lost(from)) {
                    Some(m) => match m.take_over(t.name(), from, holder, ttl).await {
                        Ok(Some(l)) => {
                            events::LeaseTakenOver { table: t.name(), from }.emit(&svc.metrics);
                            Some(l)
                        }
                        _ => return Err(e.to_string()),
                    },
                    None => return Err(e.to_string()),
                }
            }
            Err(e) => {
                tracing::warn!(
                    table = t.name(),
                    "cannot take the lease (state store): {e}; continuing, commits stay fenced"
                );
                None
            }
        };
        let _ = state.set_status(t.name(), "running").await;
        let renew = lease.clone().map(|l| {
            let state = state.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(ttl / 3).await;
                    match state.renew_lease(&l, ttl).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::warn!(table = %l.table_name, "lease lost; commits stay fenced (I4)");
                            break;
                        }
                        Err(e) => tracing::warn!(table = %l.table_name, "lease renewal failed: {e}"),
                    }
                }
            })
        });
        Ok(Self { state: Some(state), lease, renew })
    }

    async fn release(self) {
        if let Some(r) = self.renew {
            r.abort();
        }
        if let (Some(state), Some(l)) = (&self.state, &self.lease) {
            let _ = state.release_lease(l).await;
        }
    }
}

/// Writes this replica's heartbeat while its scheduler loop ticks: a replica stuck past its
/// cycle budget stops ticking, stops heartbeating, and its tables go to the others.
async fn heartbeat_while_ticking(
    m: &Membership,
    metrics: &crate::metrics::Metrics,
    tick: &AtomicI64,
    stop: &CancellationToken,
) {
    let every = m.heartbeat_every();
    while !stop.is_cancelled() {
        let since_tick = chrono::Utc::now().timestamp() - tick.load(Ordering::Relaxed);
        // The loop ticks at least every 5 s while it is healthy.
        if since_tick <= 15
            && let Err(e) = m.heartbeat(metrics).await
        {
            tracing::warn!("replica heartbeat not written: {e}");
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => {}
        }
    }
}

fn beat(heartbeat: &AtomicI64) {
    heartbeat.store(chrono::Utc::now().timestamp(), Ordering::Relaxed);
    crate::systemd::watchdog();
}

/// Whether a dependency could not be reached in this cycle.
fn report_unreachable(tables: &[(String, TableResult)]) -> bool {
    tables.iter().any(|(_, r)| matches!(r, TableResult::Failed(e) if e.class() == crate::error::ErrorClass::Connection))
}

/// The next multiple of `interval` since the Unix epoch, strictly after `now`.
pub fn next_boundary(now: chrono::DateTime<chrono::Utc>, interval: Duration) -> chrono::DateTime<chrono::Utc> {
    let step = interval.as_millis().max(1) as i64;
    let ms = now.timestamp_millis();
    let next = (ms.div_euclid(step) + 1) * step;
    chrono::DateTime::from_timestamp_millis(next).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries_align_to_quarter_hours() {
        let t = chrono::DateTime::parse_from_rfc3339("2026-11-23T10:07:30Z").unwrap().with_timezone(&chrono::Utc);
        assert_eq!(next_boundary(t, Duration::from_secs(900)).to_rfc3339(), "2026-11-23T10:15:00+00:00");
        let t = chrono::DateTime::parse_from_rfc3339("2026-11-23T10:15:00Z").unwrap().with_timezone(&chrono::Utc);
        assert_eq!(next_boundary(t, Duration::from_secs(900)).to_rfc3339(), "2026-11-23T10:30:00+00:00");
    }
}
