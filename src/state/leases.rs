//! Who holds a table's lease (`host:pid:tag`), and taking it: a lease held by a process of
//! this host that is gone is taken over at once instead of waited out.
//!
//! The same name is a replica's member id (`replicas`), and the same rule finds a member gone
//! at once: see [`holder_is_gone`].

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
    let (lease, from) = acquire_from(state, table, holder, ttl, |h| holder_is_gone(h, holder)).await?;
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

/// This host's name, as the kernel has it (the pod's name in Kubernetes).
pub fn hostname() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string();
    if host.is_empty() { "host".into() } else { host }
}

/// Whether `holder` (`host:pid:token`) is provably gone, as seen by the process named `me`:
///
/// - a process of this host whose pid no longer runs here (a crash or a kill, on a bare host or
///   under systemd), or
/// - a process of this host with this very process's pid under another name: a container that
///   restarted keeps its pod's host name, and its new process often has the old one's pid
///   (PID 1). Two live processes of one host never share a pid, so the holder is gone.
///
/// A holder of another host, or whose pid now runs some other process here, is not known to be
/// gone: the member timeout and the lease's expiry decide then. This needs host names that are
/// unique among the processes sharing a state store, as pods' and hosts' are.
pub fn holder_is_gone(holder: &str, me: &str) -> bool {
    let mut parts = holder.rsplitn(3, ':');
    let (_token, pid, host) = (parts.next(), parts.next(), parts.next());
    let (Some(host), Some(pid)) = (host, pid.and_then(|p| p.parse::<u32>().ok())) else { return false };
    if holder == me || host != hostname() {
        return false;
    }
    pid == std::process::id() || !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_of_this_host_is_gone_when_its_pid_no_longer_runs_or_is_ours_under_another_name() {
        let me = process_holder("me");
        assert!(!holder_is_gone(&me, &me), "never oneself");
        let restarted = format!("{}:{}:before", hostname(), std::process::id());
        assert!(holder_is_gone(&restarted, &me), "our pid under another token: a container restarted");
        let parent = format!("{}:{}:x", hostname(), std::os::unix::process::parent_id());
        assert!(!holder_is_gone(&parent, &me), "a live process of this host");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let exited = format!("{}:{pid}:x", hostname());
        assert!(holder_is_gone(&exited, &me), "a process that exited");
        assert!(!holder_is_gone(&format!("some-other-host:{pid}:x"), &me), "another host: the timeout decides");
        assert!(!holder_is_gone("not a holder", &me));
    }
}
