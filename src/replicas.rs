//! Replicas that share the tables: every `run` process heartbeats in the state store, and the
//! live ones divide the configured tables by a balanced rendezvous hash that each computes
//! alone and all compute alike.
//!
//! Correctness never depends on any of this: a table runs under its lease (I6) and every
//! commit is fenced on the snapshot it read (I4), so two replicas that disagree for a moment
//! about who owns a table cannot both land a window. Membership spreads the work, and bounds
//! how long a dead replica's tables wait: `service.member_timeout` plus one interval, instead of
//! `service.lease_ttl`.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::events;
use crate::metrics::Metrics;
use crate::state::{StateStore, holder_is_gone};

/// This process as a member of the replicas sharing one state store.
pub struct Membership {
    state: StateStore,
    /// The same string as the scheduler's lease holder, so that a lease can be traced to its
    /// member.
    pub id: String,
    host: String,
    timeout: Duration,
    /// Members found lost (heartbeat older than the timeout) at the last refresh.
    lost: Mutex<HashSet<String>>,
    /// Fingerprint of the configured tables: replicas configured with different tables would
    /// each hand some table to a replica that does not have it.
    tables_hash: String,
    joined: std::sync::atomic::AtomicBool,
    /// Since when this member's heartbeats have landed with no gap longer than the timeout, and
    /// when the last one did: after a state-store outage the peers' heartbeats land again at
    /// their own times, so none is marked lost before ours have landed for a whole timeout.
    landing: Mutex<Option<(Instant, Instant)>>,
    /// Members of this host that `holder_is_gone` judged gone and that heartbeated again: two
    /// live processes share a host name and a pid (separate PID namespaces); the rule is not
    /// applied to them again.
    alive_despite_rule: Mutex<HashSet<String>>,
    /// Members this one removed as gone, with their last heartbeat then (to see one come back).
    removed_as_gone: Mutex<HashMap<String, i64>>,
    /// When this member last forgot the rows of long-gone members.
    forgot: Mutex<Option<Instant>>,
}

const FORGET_EVERY: Duration = Duration::from_secs(3600);

impl Membership {
    pub fn new(state: StateStore, id: String, timeout: Duration, tables: &[&str]) -> Self {
        let host = id.split(':').next().unwrap_or("host").to_string();
        let mut sorted = tables.to_vec();
        sorted.sort_unstable();
        let tables_hash = format!("{:016x}", score("tables", &sorted.join("\n")));
        Self {
            state,
            id,
            host,
            timeout,
            lost: Mutex::new(HashSet::new()),
            tables_hash,
            joined: Default::default(),
            landing: Mutex::new(None),
            alive_despite_rule: Mutex::new(HashSet::new()),
            removed_as_gone: Mutex::new(HashMap::new()),
            forgot: Mutex::new(None),
        }
    }

    /// How often a member heartbeats: six heartbeats fit in the timeout, so one slow write
    /// never makes a live member look gone.
    pub fn heartbeat_every(&self) -> Duration {
        (self.timeout / 6).max(Duration::from_millis(500))
    }

    pub async fn heartbeat(&self, metrics: &Metrics) -> Result<()> {
        self.state.heartbeat_member(&self.id, &self.host, &self.tables_hash).await?;
        let now = Instant::now();
        let mut landing = self.landing.lock().expect("not poisoned");
        *landing = match *landing {
            Some((since, last)) if now - last <= self.timeout => Some((since, now)),
            _ => Some((now, now)),
        };
        drop(landing);
        let first = !self.joined.swap(true, std::sync::atomic::Ordering::Relaxed);
        events::ReplicaHeartbeat { member: &self.id, first, every: self.heartbeat_every(), timeout: self.timeout }
            .emit(metrics);
        Ok(())
    }

    /// The live members now (this one included), sorted, or `None` when they are not
    /// configured with the same tables (then every replica runs all its tables: the leases
    /// decide). A member whose process is gone from this host (`holder_is_gone`: a crashed or
    /// restarted predecessor) is lost at once and its row removed; one silent for longer than
    /// the timeout is marked lost. Either is counted once by
    /// the replica that marks it; nobody is marked lost while this replica's own heartbeat is
    /// stale (then the state store, not the others, was the trouble).
    pub async fn refresh(&self, metrics: &Metrics) -> Result<Option<Vec<String>>> {
        let timeout_ms = self.timeout.as_millis() as i64;
        let members = self.state.members().await?;
        let own_fresh =
            members.iter().any(|m| m.id == self.id && m.heartbeat_age_ms() <= timeout_ms) && self.landing_steadily();
        let mut live = vec![];
        let mut lost = HashSet::new();
        let mut mismatched = false;
        for m in members {
            if self.gone(&m) {
                // Its process no longer runs (this host's crashed or restarted process): lost at
                // once, whatever its last heartbeat says, and forgotten.
                if self.state.remove_member(&m.id).await? {
                    events::ReplicaLost { member: &m.id, why: events::LostBecause::ProcessGone }.emit(metrics);
                    self.removed_as_gone.lock().expect("not poisoned").insert(m.id.clone(), m.heartbeat_at_ms);
                }
                lost.insert(m.id);
                continue;
            }
            if m.heartbeat_age_ms() <= timeout_ms {
                mismatched |= m.tables_hash != self.tables_hash;
                live.push(m.id);
                continue;
            }
            if !own_fresh {
                continue;
            }
            if m.lost_at_ms.is_none() && self.state.mark_member_lost(&m.id, timeout_ms).await? {
                events::ReplicaLost {
                    member: &m.id,
                    why: events::LostBecause::Silent(Duration::from_millis(m.heartbeat_age_ms() as u64)),
                }
                .emit(metrics);
            }
            lost.insert(m.id);
        }
        // Rows of members silent for a day are history: every lease they held expired long ago.
        // Hourly is ample, and keeps the look at every heartbeat to one read.
        if self.forgot.lock().expect("not poisoned").is_none_or(|at| at.elapsed() >= FORGET_EVERY) {
            self.state.forget_members(86_400_000).await.ok();
            *self.forgot.lock().expect("not poisoned") = Some(Instant::now());
        }
        if !live.contains(&self.id) {
            // Our own heartbeat has not landed yet (first cycle) or failed: we still run.
            live.push(self.id.clone());
            live.sort();
        }
        *self.lost.lock().expect("not poisoned") = lost;
        events::ReplicaTablesMismatch { mismatched }.emit(metrics);
        Ok(if mismatched { None } else { Some(live) })
    }

    /// Whether this member's heartbeats have landed, with no gap longer than the timeout, for
    /// at least a whole timeout: only then may it find others silent.
    fn landing_steadily(&self) -> bool {
        self.landing
            .lock()
            .expect("not poisoned")
            .is_some_and(|(since, last)| since.elapsed() >= self.timeout && last.elapsed() <= self.timeout)
    }

    /// `holder_is_gone` for a member, unless that member has already come back after this one
    /// removed it as gone: then two live processes share its host name and pid (containers of
    /// one pod with their own PID namespaces), which the rule cannot tell apart; said once,
    /// loudly, and left to the timeout from then on.
    fn gone(&self, m: &crate::state::Member) -> bool {
        if self.alive_despite_rule.lock().expect("not poisoned").contains(&m.id) {
            return false;
        }
        let came_back =
            self.removed_as_gone.lock().expect("not poisoned").get(&m.id).is_some_and(|at| m.heartbeat_at_ms > *at);
        if came_back {
            tracing::error!(member = %m.id, "replica {} was judged gone (a process of this host whose pid is gone or is ours) but heartbeats again: two live processes share its host name; give each replica its own host name. Its loss is now left to service.member_timeout", m.id);
            self.alive_despite_rule.lock().expect("not poisoned").insert(m.id.clone());
            return false;
        }
        holder_is_gone(&m.id, &self.id)
    }

    /// Whether `holder` may have its leases taken over at once as gone (see [`Self::gone`]).
    pub fn holder_gone(&self, holder: &str) -> bool {
        !self.alive_despite_rule.lock().expect("not poisoned").contains(holder) && holder_is_gone(holder, &self.id)
    }

    /// Takes over `table`'s lease from `holder` if it is a member silent now.
    pub async fn take_over(
        &self,
        table: &str,
        holder: &str,
        me: &str,
        ttl: Duration,
    ) -> Result<Option<crate::state::Lease>> {
        let timeout_ms = self.timeout.as_millis() as i64;
        self.state.take_over_lease_of_silent_member(table, holder, me, ttl, timeout_ms).await
    }

    /// Whether a lease holder is a member found lost at the last refresh: its leases are taken
    /// over at once.
    pub fn is_lost(&self, holder: &str) -> bool {
        self.lost.lock().expect("not poisoned").contains(holder)
    }

    /// Leaves the membership (SIGTERM): the other replicas take this one's tables at their next
    /// cycle instead of after the timeout.
    pub async fn leave(&self) {
        if let Err(e) = self.state.remove_member(&self.id).await.map(|_| ()) {
            tracing::warn!("could not leave the replica membership (peers take over after the timeout): {e}");
        }
    }
}

/// The live replicas and the owner of each table, as the replicas compute them now (for
/// `status` and `watermark show`; reads only). A member whose process is gone from this host
/// is not live, whatever its last heartbeat says (`holder_is_gone`).
pub async fn owners(
    state: &StateStore,
    tables: &[&str],
    timeout: Duration,
) -> Result<(Vec<String>, HashMap<String, String>)> {
    let timeout_ms = timeout.as_millis() as i64;
    let live: Vec<String> = state
        .members()
        .await?
        .into_iter()
        .filter(|m| m.heartbeat_age_ms() <= timeout_ms && !holder_is_gone(&m.id, ""))
        .map(|m| m.id)
        .collect();
    let owners = assign(tables, &live).into_iter().map(|(t, o)| (t.to_string(), o)).collect();
    Ok((live, owners))
}

/// Which member owns each table: rendezvous hashing with bounded loads. Tables are taken in
/// name order; each goes to the member that ranks it highest among those below the load cap,
/// ⌈tables / members⌉. Deterministic in (tables, members), so every replica that sees the same
/// members computes the same owners; a member joining or leaving moves few tables.
pub fn assign<'a>(tables: &[&'a str], members: &[String]) -> HashMap<&'a str, String> {
    let mut owners = HashMap::new();
    if members.is_empty() {
        return owners;
    }
    let cap = tables.len().div_ceil(members.len());
    let mut load = vec![0usize; members.len()];
    let mut sorted: Vec<&str> = tables.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    for table in sorted {
        let mut ranked: Vec<usize> = (0..members.len()).collect();
        ranked.sort_by_key(|&i| std::cmp::Reverse((score(&members[i], table), i)));
        let chosen = ranked.into_iter().find(|&i| load[i] < cap).expect("the cap leaves room");
        load[chosen] += 1;
        owners.insert(table, members[chosen].clone());
    }
    owners
}

/// A stable 64-bit score of (member, table): FNV-1a then a SplitMix64 finaliser. Stable across
/// builds and platforms, unlike std's hasher, so replicas of different versions agree.
fn score(member: &str, table: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in member.bytes().chain([0xff]).chain(table.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("bronze_trades_{i:03}")).collect()
    }

    fn members(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn every_table_has_one_owner_and_loads_are_balanced() {
        let names = tables(30);
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let m = members(&["pod-a:1:x1", "pod-b:1:y2", "pod-c:1:z3"]);
        let owners = assign(&refs, &m);
        assert_eq!(owners.len(), 30);
        for id in &m {
            assert_eq!(owners.values().filter(|o| *o == id).count(), 10, "{id}");
        }
        let names = tables(100);
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let owners = assign(&refs, &m);
        let loads: Vec<usize> = m.iter().map(|id| owners.values().filter(|o| *o == id).count()).collect();
        // Bounded loads: nobody above ⌈100/3⌉ = 34, so nobody below 100 − 2 × 34 = 32.
        assert!(loads.iter().all(|&l| (32..=34).contains(&l)) && loads.iter().sum::<usize>() == 100, "{loads:?}");
    }

    #[test]
    fn the_assignment_does_not_depend_on_the_order_seen() {
        let names = tables(40);
        let mut refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let m = members(&["a:1:1", "b:2:2", "c:3:3", "d:4:4"]);
        let one = assign(&refs, &m);
        refs.reverse();
        assert_eq!(one, assign(&refs, &m));
    }

    #[test]
    fn a_member_leaving_moves_mostly_its_own_tables() {
        let names = tables(60);
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let before = assign(&refs, &members(&["a:1:1", "b:2:2", "c:3:3"]));
        let after = assign(&refs, &members(&["a:1:1", "b:2:2"]));
        let moved_from_survivors = refs.iter().filter(|t| before[*t] != "c:3:3" && before[*t] != after[*t]).count();
        // c's 20 tables must move; of the survivors' 40, few do (capacity shifts only).
        assert!(moved_from_survivors <= 10, "{moved_from_survivors} of the survivors' tables moved");
        assert!(after.values().all(|o| o != "c:3:3"));
    }

    #[test]
    fn one_member_owns_everything_and_none_owns_nothing() {
        let names = tables(5);
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        assert!(assign(&refs, &members(&["solo:1:1"])).values().all(|o| o == "solo:1:1"));
        assert!(assign(&refs, &[]).is_empty());
    }
}
