//! The HTTP endpoint: `/metrics` (Prometheus text format), `/healthz` (the scheduler
//! loop is ticking) and `/readyz` (configuration loaded, dependencies reachable).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::Metrics;

#[derive(Clone)]
pub struct ServerState {
    pub metrics: Arc<Metrics>,
    pub heartbeat: Arc<AtomicI64>,
    pub ready: Arc<AtomicBool>,
    /// Seconds without a tick after which the loop counts as stuck.
    pub stale_after: i64,
}

pub fn router(state: ServerState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(s): State<ServerState>) -> impl IntoResponse {
    ([("content-type", "text/plain; version=0.0.4; charset=utf-8")], s.metrics.render())
}

async fn healthz(State(s): State<ServerState>) -> impl IntoResponse {
    let age = chrono::Utc::now().timestamp() - s.heartbeat.load(Ordering::Relaxed);
    if age <= s.stale_after {
        (StatusCode::OK, format!("ok: scheduler ticked {age}s ago\n"))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("stuck: scheduler last ticked {age}s ago\n"))
    }
}

async fn readyz(State(s): State<ServerState>) -> impl IntoResponse {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: dependencies unreachable at the last check\n")
    }
}

pub async fn serve(listen: &str, state: ServerState) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen} (service.metrics_listen): {e}"))?;
    tracing::info!("metrics on http://{}/metrics", listener.local_addr()?);
    axum::serve(listener, router(state)).await?;
    Ok(())
}
