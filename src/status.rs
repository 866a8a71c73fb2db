//! `iceberg-offload status`: the guide's 30-second health check as one command.
//!
//! 1. scheduler reachable (`/healthz`), 2. last cycle status and age, 3. metrics exporting,
//! 4. per table: Iceberg watermark, lag, last error, 5. alerts firing (with `--prometheus`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use iceberg::Catalog;
use serde::Serialize;
use serde_json::Value;

use crate::config::{Config, TableConfig};
use crate::sink::{catalog, table as target};
use crate::state::StateStore;

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct TableHealth {
    pub table: String,
    pub iceberg_watermark: Option<String>,
    pub status: Option<String>,
    pub last_successful_run: Option<String>,
    pub lag_minutes: Option<f64>,
    pub failure_count: i64,
    pub last_error: Option<String>,
    /// The live replica that owns the table (`None`: no `run` process is live).
    pub owner: Option<String>,
    /// The hot tier as ClickHouse holds it: its TTL, its oldest row; and the watermark the
    /// table's view splits at (I13). `None` where it cannot be read.
    pub hot: Option<HotTier>,
}

#[derive(Debug, Serialize)]
pub struct HotTier {
    /// The TTL's interval (`7d`), or its expression when not a constant; `None`: no TTL.
    pub ttl: Option<String>,
    pub oldest_row: Option<String>,
    pub view_watermark: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub healthy: bool,
    pub checks: Vec<Check>,
    pub tables: Vec<TableHealth>,
    pub firing_alerts: Vec<String>,
}

/// Lag above which a table counts as unhealthy (the guide's critical threshold).
const LAG_CRITICAL_MINUTES: f64 = 30.0;

/// The daemon's endpoint from `service.metrics_listen`: an address that listens everywhere
/// (`0.0.0.0`, `[::]`) is reached on this host's loopback.
pub fn local_url(listen: &str) -> String {
    match listen.parse::<std::net::SocketAddr>() {
        Ok(addr) if addr.ip().is_unspecified() => format!("http://localhost:{}", addr.port()),
        Ok(std::net::SocketAddr::V6(addr)) => format!("http://[{}]:{}", addr.ip(), addr.port()),
        Ok(addr) => format!("http://{addr}"),
        // A host name (`metrics.internal:8000`).
        Err(_) => format!("http://{listen}"),
    }
}

pub async fn run(cfg: &Config, scheduler_url: &str, prometheus: Option<&str>) -> Report {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("http client");
    let base = scheduler_url.trim_end_matches('/');
    let mut checks = vec![];

    // 1. Scheduler reachable and ticking.
    checks.push(scheduler_check(&http, base).await);

    // 2 + 3. Metrics exporting, and the last cycle from them.
    checks.extend(metrics_checks(&http, base).await);

    // 4. Per table, from Iceberg (truth) and the state store (last run, errors).
    let tables = table_checks(cfg, &mut checks).await;

    // 5. Alerts firing.
    let mut firing = vec![];
    if let Some(prom) = prometheus {
        let (check, alerts) = alerts_check(&http, prom).await;
        checks.push(check);
        firing = alerts;
    }

    let tables_ok =
        tables.iter().all(|t| t.lag_minutes.is_some_and(|l| l <= LAG_CRITICAL_MINUTES) && t.failure_count < 3);
    let healthy = checks.iter().all(|c| c.ok) && tables_ok;
    Report { healthy, checks, tables, firing_alerts: firing }
}

/// Check 1: the scheduler answers `/healthz` (its body is the detail).
async fn scheduler_check(http: &reqwest::Client, base: &str) -> Check {
    match http.get(format!("{base}/healthz")).send().await {
        Ok(r) => {
            let ok = r.status().is_success();
            Check { name: "scheduler".into(), ok, detail: r.text().await.unwrap_or_default().trim().to_string() }
        }
        Err(e) => Check { name: "scheduler".into(), ok: false, detail: format!("not reachable at {base}: {e}") },
    }
}

/// Checks 2 and 3: the offload metrics are exported, and then the last cycle as they tell it.
async fn metrics_checks(http: &reqwest::Client, base: &str) -> Vec<Check> {
    let metrics = match http.get(format!("{base}/metrics")).send().await {
        Ok(r) if r.status().is_success() => r.text().await.ok(),
        _ => None,
    };
    match &metrics {
        Some(text) if text.contains("offload_rows_total") => vec![
            Check { name: "metrics".into(), ok: true, detail: "offload_rows_total exported".into() },
            last_cycle(text),
        ],
        _ => vec![Check { name: "metrics".into(), ok: false, detail: format!("no offload metrics at {base}/metrics") }],
    }
}

/// Check 4: each table's health; a state store, replica table or catalog that cannot be read
/// adds a failed check to `checks` and leaves the columns it would fill empty.
async fn table_checks(cfg: &Config, checks: &mut Vec<Check>) -> Vec<TableHealth> {
    let mut tables = vec![];
    let state = StateStore::open(&cfg.state).await;
    let mirror = match &state {
        Ok(s) => s.watermarks().await.unwrap_or_default(),
        Err(e) => {
            checks.push(Check { name: "state store".into(), ok: false, detail: format!("{e:#}") });
            vec![]
        }
    };
    let names: Vec<&str> = cfg.tables.iter().map(|t| t.name()).collect();
    let owners = match &state {
        Ok(s) => replica_owners(s, &names, cfg.service.member_timeout, checks).await,
        Err(_) => Default::default(),
    };
    let cat = catalog::build(&cfg.catalog).await;
    if let Err(e) = &cat {
        checks.push(Check { name: "catalog".into(), ok: false, detail: format!("{e:#}") });
    }
    let now = chrono::Utc::now();
    let ch = crate::source::ClickHouse::new(&cfg.clickhouse).ok();
    for t in &cfg.tables {
        let wm = iceberg_watermark(&cat, t).await;
        let m = mirror.iter().find(|r| r.table_name == t.name());
        let last = m.and_then(|r| r.last_successful_run.clone());
        let lag = last.as_deref().and_then(parse_time).map(|t| (now - t).num_milliseconds() as f64 / 60_000.0);
        tables.push(TableHealth {
            table: t.name().to_string(),
            iceberg_watermark: wm,
            status: m.map(|r| r.status.clone()),
            last_successful_run: last,
            lag_minutes: lag,
            failure_count: m.map(|r| r.failure_count).unwrap_or(0),
            last_error: m.and_then(|r| r.last_error_message.clone()),
            owner: owners.get(t.name()).cloned(),
            hot: match &ch {
                Some(ch) => hot_tier(ch, t).await,
                None => None,
            },
        });
    }
    tables
}

/// The live replicas (pushed to `checks` as the "replicas" check) and the owner of each table.
async fn replica_owners(
    state: &StateStore,
    names: &[&str],
    member_timeout: Duration,
    checks: &mut Vec<Check>,
) -> HashMap<String, String> {
    match crate::replicas::owners(state, names, member_timeout).await {
        Ok((live, owners)) => {
            checks.push(Check {
                name: "replicas".into(),
                ok: !live.is_empty(),
                detail: if live.is_empty() {
                    "no live `run` process".into()
                } else {
                    format!("{} live: {}", live.len(), live.join(", "))
                },
            });
            owners
        }
        Err(e) => {
            checks.push(Check { name: "replicas".into(), ok: false, detail: format!("{e}") });
            Default::default()
        }
    }
}

/// The hot tier's TTL and oldest row, and the view's watermark: what stands between a stalled
/// offload and a loss (the TTL deletes whether or not Iceberg holds the rows).
async fn hot_tier(ch: &crate::source::ClickHouse, t: &TableConfig) -> Option<HotTier> {
    let source = crate::source::query::SourceTable::describe(ch, t).await.ok()?;
    let ttl = source.ttl.as_ref().map(|expr| match source.retention() {
        Some(d) if d.as_secs() % 86_400 == 0 => format!("{}d", d.as_secs() / 86_400),
        Some(d) => format!("{}s", d.as_secs()),
        None => expr.clone(),
    });
    let oldest_row = source.oldest_ns(ch).await.ok().flatten().map(crate::util::format_epoch_ns);
    let view_watermark = match &t.view {
        Some(name) => crate::tiers::read_pinned(ch, name)
            .await
            .ok()
            .flatten()
            .map(|p| p.split().map(|w| w.display()).unwrap_or_else(|| "none (hot tier only)".into())),
        None => None,
    };
    Some(HotTier { ttl, oldest_row, view_watermark })
}

/// The table's watermark as Iceberg holds it (`None` if the catalog or the table cannot be read).
async fn iceberg_watermark(cat: &anyhow::Result<Arc<dyn Catalog>>, t: &TableConfig) -> Option<String> {
    match cat {
        Ok(c) => match c.load_table(&target::ident(t)).await {
            Ok(table) => crate::commit::TableView::of(table).ok().and_then(|v| v.watermark).map(|w| w.display()),
            Err(_) => None,
        },
        Err(_) => None,
    }
}

/// Check 5: the IcebergOffload alerts firing in Prometheus, and the check they make (failed if
/// one is critical or Prometheus cannot be reached).
async fn alerts_check(http: &reqwest::Client, prom: &str) -> (Check, Vec<String>) {
    let mut firing = vec![];
    match http.get(format!("{}/api/v1/alerts", prom.trim_end_matches('/'))).send().await {
        Ok(r) => {
            let body: Value = r.json().await.unwrap_or(Value::Null);
            for a in body["data"]["alerts"].as_array().into_iter().flatten() {
                let name = a["labels"]["alertname"].as_str().unwrap_or_default();
                if a["state"] == "firing" && name.starts_with("IcebergOffload") {
                    let table = a["labels"]["table"].as_str().map(|t| format!("{{table={t}}}")).unwrap_or_default();
                    let severity = a["labels"]["severity"].as_str().unwrap_or("?");
                    firing.push(format!("{name}{table} ({severity})"));
                }
            }
            let check = Check {
                name: "alerts".into(),
                ok: !firing.iter().any(|a| a.ends_with("(critical)")),
                detail: if firing.is_empty() { "none firing".into() } else { firing.join(", ") },
            };
            (check, firing)
        }
        Err(e) => (
            Check { name: "alerts".into(), ok: false, detail: format!("Prometheus not reachable at {prom}: {e}") },
            firing,
        ),
    }
}

fn last_cycle(metrics: &str) -> Check {
    let value = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let success = value("offload_last_success_timestamp");
    let failure = value("offload_last_failure_timestamp");
    let now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
    if success == 0.0 && failure == 0.0 {
        return Check { name: "last cycle".into(), ok: true, detail: "no cycle finished yet".into() };
    }
    let (ok, at) = if success >= failure { (true, success) } else { (false, failure) };
    Check {
        name: "last cycle".into(),
        ok,
        detail: format!("{} {:.0} s ago", if ok { "success" } else { "failed or partial" }, now - at),
    }
}

/// A timestamp as the state store returns it (RFC 3339 on SQLite, `timestamptz::text` on PostgreSQL).
pub fn parse_time(text: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(text)
        .or_else(|_| chrono::DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z"))
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

pub fn print(report: &Report) {
    println!("iceberg-offload: {}", if report.healthy { "HEALTHY" } else { "UNHEALTHY" });
    for c in &report.checks {
        println!("  [{}] {:<12} {}", if c.ok { "ok" } else { "!!" }, c.name, c.detail);
    }
    for t in &report.tables {
        let lag = t.lag_minutes.map(|l| format!("{l:.1} min")).unwrap_or_else(|| "never offloaded".into());
        let bad = !t.lag_minutes.is_some_and(|l| l <= LAG_CRITICAL_MINUTES) || t.failure_count >= 3;
        println!(
            "  [{}] table {:<28} watermark {}  lag {}  status {}  failures {}  owner {}{}",
            if bad { "!!" } else { "ok" },
            t.table,
            t.iceberg_watermark.as_deref().unwrap_or("-"),
            lag,
            t.status.as_deref().unwrap_or("-"),
            t.failure_count,
            t.owner.as_deref().unwrap_or("-"),
            t.last_error.as_deref().map(|e| format!("  last error: {e}")).unwrap_or_default()
        );
        if let Some(h) = &t.hot {
            println!(
                "       hot tier: TTL {}  oldest row {}{}",
                h.ttl.as_deref().unwrap_or("none"),
                h.oldest_row.as_deref().unwrap_or("-"),
                h.view_watermark.as_deref().map(|w| format!("  view splits at {w}")).unwrap_or_default()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn local_url_of_metrics_listen() {
        assert_eq!(super::local_url("0.0.0.0:8000"), "http://localhost:8000");
        assert_eq!(super::local_url("[::]:9100"), "http://localhost:9100");
        assert_eq!(super::local_url("10.0.0.5:8000"), "http://10.0.0.5:8000");
        assert_eq!(super::local_url("127.0.0.1:41234"), "http://127.0.0.1:41234");
        assert_eq!(super::local_url("[::1]:8000"), "http://[::1]:8000");
        assert_eq!(super::local_url("[0:0:0:0:0:0:0:0]:8000"), "http://localhost:8000");
        assert_eq!(super::local_url("metrics.internal:8000"), "http://metrics.internal:8000");
    }
}
