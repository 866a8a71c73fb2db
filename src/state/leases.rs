//! Who holds a table's lease (`host:pid:tag`), and taking it: a lease held by a process of
//! this host that is gone is taken over at once instead of waited out.

use std::time::Duration;

use super::{Lease, StateStore};
use crate::error::OffloadError;

/// A lease holder name for this process (`host:pid:tag`): a crash of it is recognised by the
/// next process on this host, which takes its leases over at once.
pub fn process_holder(tag: &str) -> String {
    format!("{}:{}:{tag}", hostname(), std::process::id())
}

/// Takes the lease, taking over at once one held by a process of this host that is gone.
pub async fn acquire(state: &StateStore, table: &str, holder: &str, ttl: Duration) -> Result<Lease, OffloadError> {
    let (lease, from) = acquire_from(state, table, holder, ttl, holder_is_dead).await?;
    if let Some(dead) = from {
        tracing::warn!(table, "took over the lease of {dead}, a process of this host that is gone");
    }
    Ok(lease)
}

/// Takes the lease, taking it over at once from a holder `gone` says is gone (a dead process
/// of this host, a replica found lost). Also returns whom it was taken from.
pub async fn acquire_from(
    state: &StateStore,
    table: &str,
    holder: &str,
    ttl: Duration,
    gone: impl Fn(&str) -> bool,
) -> Result<(Lease, Option<String>), OffloadError> {
    match state.acquire_lease(table, holder, ttl).await {
        Err(OffloadError::LeaseHeld { holder: dead, .. }) if gone(&dead) => {
            match state.take_over_lease(table, &dead, holder, ttl).await? {
                Some(l) => Ok((l, Some(dead))),
                None => Ok((state.acquire_lease(table, holder, ttl).await?, None)),
            }
        }
        other => other.map(|l| (l, None)),
    }
}

fn hostname() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string();
    if host.is_empty() { "host".into() } else { host }
}

/// A lease holder (`host:pid:nonce`) that is a process of this host which no longer runs:
/// it crashed, and its lease need not be waited out.
pub fn holder_is_dead(holder: &str) -> bool {
    let mut parts = holder.rsplitn(3, ':');
    let (_nonce, pid, host) = (parts.next(), parts.next(), parts.next());
    match (host, pid.and_then(|p| p.parse::<u32>().ok())) {
        (Some(host), Some(pid)) => host == hostname() && !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        _ => false,
    }
}
