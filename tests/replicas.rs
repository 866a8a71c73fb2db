//! Replica membership against a real state store (SQLite): what the assignment rests on when
//! replicas disagree, die, or come back. Correctness of the rows never depends on it (I4, I6);
//! these are the branches that decide who runs a table and whether a lease is taken over.

use std::time::Duration;

use iceberg_offload::config::StateConfig;
use iceberg_offload::metrics::Metrics;
use iceberg_offload::replicas::Membership;
use iceberg_offload::state::StateStore;

const TIMEOUT: Duration = Duration::from_millis(600);

async fn store(dir: &tempfile::TempDir) -> StateStore {
    let cfg = StateConfig {
        url: format!("sqlite:{}?mode=rwc", dir.path().join("state.db").display()),
        password: Default::default(),
        timeout: Duration::from_secs(10),
    };
    StateStore::open(&cfg).await.expect("state store")
}

fn gauge(m: &Metrics, name: &str) -> f64 {
    let text = m.render();
    let line = text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(' ')).expect(name);
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn replicas_with_different_tables_run_all_of_theirs_instead_of_dividing() {
    let dir = tempfile::tempdir().unwrap();
    let state = store(&dir).await;
    let m = Metrics::new();
    let a = Membership::new(state.clone(), "h:1:a".into(), TIMEOUT, &["t1", "t2"]);
    let b = Membership::new(state.clone(), "h:2:b".into(), TIMEOUT, &["t2", "t1"]);
    a.heartbeat(&m).await.unwrap();
    b.heartbeat(&m).await.unwrap();
    // The same tables in another order: one fingerprint, two live members.
    assert_eq!(a.refresh(&m).await.unwrap(), Some(vec!["h:1:a".to_string(), "h:2:b".to_string()]));
    assert_eq!(gauge(&m, "offload_replica_tables_mismatch"), 0.0);
    // A third replica with one more table (a configuration rolled out to it only).
    let c = Membership::new(state.clone(), "h:3:c".into(), TIMEOUT, &["t1", "t2", "t3"]);
    c.heartbeat(&m).await.unwrap();
    assert_eq!(a.refresh(&m).await.unwrap(), None, "no division while the tables differ");
    assert_eq!(gauge(&m, "offload_replica_tables_mismatch"), 1.0);
}

#[tokio::test]
async fn a_silent_member_is_lost_once_and_its_lease_taken_only_while_it_stays_silent() {
    let dir = tempfile::tempdir().unwrap();
    let state = store(&dir).await;
    let (ma, mc) = (Metrics::new(), Metrics::new());
    let tables = ["t1", "t2"];
    let a = Membership::new(state.clone(), "h:1:a".into(), TIMEOUT, &tables);
    let b = Membership::new(state.clone(), "h:2:b".into(), TIMEOUT, &tables);
    let c = Membership::new(state.clone(), "h:3:c".into(), TIMEOUT, &tables);
    b.heartbeat(&ma).await.unwrap();
    let ttl = Duration::from_secs(600);
    state.acquire_lease("t1", "h:2:b", ttl).await.unwrap();
    state.acquire_lease("t2", "h:2:b", ttl).await.unwrap();
    // b goes silent; a and c keep heartbeating.
    for _ in 0..4 {
        a.heartbeat(&ma).await.unwrap();
        c.heartbeat(&mc).await.unwrap();
        tokio::time::sleep(TIMEOUT / 3).await;
    }
    assert_eq!(a.refresh(&ma).await.unwrap().unwrap(), vec!["h:1:a".to_string(), "h:3:c".to_string()]);
    c.refresh(&mc).await.unwrap();
    let lost = gauge(&ma, "offload_replica_members_lost_total") + gauge(&mc, "offload_replica_members_lost_total");
    assert_eq!(lost, 1.0, "the loss is counted by exactly one replica");
    assert!(a.is_lost("h:2:b") && c.is_lost("h:2:b"));
    // Still silent: its lease is taken over at once, not after lease_ttl.
    let lease = a.take_over("t1", "h:2:b", "h:1:a", ttl).await.unwrap();
    assert_eq!(lease.map(|l| l.holder), Some("h:1:a".to_string()));
    // b comes back (a long pause, a partition healed): its other lease stays its own, although
    // a's view from the last refresh still says lost.
    b.heartbeat(&ma).await.unwrap();
    assert!(a.is_lost("h:2:b"));
    assert!(a.take_over("t2", "h:2:b", "h:1:a", ttl).await.unwrap().is_none());
    assert!(state.acquire_lease("t2", "h:1:a", ttl).await.is_err(), "t2 is still b's");
}

#[tokio::test]
async fn a_replica_whose_own_heartbeat_is_stale_marks_nobody_lost() {
    let dir = tempfile::tempdir().unwrap();
    let state = store(&dir).await;
    let m = Metrics::new();
    let a = Membership::new(state.clone(), "h:1:a".into(), TIMEOUT, &["t1"]);
    let b = Membership::new(state.clone(), "h:2:b".into(), TIMEOUT, &["t1"]);
    a.heartbeat(&m).await.unwrap();
    b.heartbeat(&m).await.unwrap();
    // Neither heartbeats for longer than the timeout (the state store was unreachable): when a
    // reads the members again before its own next heartbeat, it blames nobody.
    tokio::time::sleep(TIMEOUT * 2).await;
    assert_eq!(a.refresh(&m).await.unwrap().unwrap(), vec!["h:1:a".to_string()]);
    assert!(!a.is_lost("h:2:b"));
    assert_eq!(gauge(&m, "offload_replica_members_lost_total"), 0.0);
    // Its own heartbeat lands again: still nobody is blamed, since the peers' heartbeats land
    // again at their own times after an outage (a false loss would move their tables).
    a.heartbeat(&m).await.unwrap();
    a.refresh(&m).await.unwrap();
    assert!(!a.is_lost("h:2:b"), "blamed before its own heartbeats landed for a whole timeout");
    // Once they have landed for a whole timeout, a peer still silent is lost.
    for _ in 0..4 {
        tokio::time::sleep(TIMEOUT / 3).await;
        a.heartbeat(&m).await.unwrap();
    }
    a.refresh(&m).await.unwrap();
    assert!(a.is_lost("h:2:b"));
}

#[tokio::test]
async fn a_member_judged_gone_that_heartbeats_again_is_left_to_the_timeout() {
    // Two live processes with one host name and one pid (containers of one pod, each with its
    // own PID namespace): the rule would judge the other gone at every look. Once it is seen
    // heartbeating after its removal, it is not judged gone again, nor its leases taken.
    let dir = tempfile::tempdir().unwrap();
    let state = store(&dir).await;
    let m = Metrics::new();
    let host = iceberg_offload::state::hostname();
    let sibling = format!("{host}:{}:sibling", std::process::id());
    let me = format!("{host}:{}:me", std::process::id());
    let tables = ["t1"];
    let other = Membership::new(state.clone(), sibling.clone(), Duration::from_secs(30), &tables);
    let a = Membership::new(state.clone(), me.clone(), Duration::from_secs(30), &tables);
    other.heartbeat(&m).await.unwrap();
    a.heartbeat(&m).await.unwrap();
    assert_eq!(a.refresh(&m).await.unwrap(), Some(vec![me.clone()]), "judged gone once");
    assert!(a.holder_gone(&sibling));
    tokio::time::sleep(Duration::from_millis(5)).await;
    other.heartbeat(&m).await.unwrap();
    assert_eq!(
        a.refresh(&m).await.unwrap(),
        Some(
            vec![me.clone(), sibling.clone()]
                .into_iter()
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
        )
    );
    assert!(!a.holder_gone(&sibling), "its leases are not taken at once any more");
    assert_eq!(gauge(&m, "offload_replica_members_lost_total"), 1.0, "the one false loss, not one per look");
}

#[tokio::test]
async fn leaving_removes_the_member_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let state = store(&dir).await;
    let m = Metrics::new();
    let a = Membership::new(state.clone(), "h:1:a".into(), TIMEOUT, &["t1"]);
    let b = Membership::new(state.clone(), "h:2:b".into(), TIMEOUT, &["t1"]);
    a.heartbeat(&m).await.unwrap();
    b.heartbeat(&m).await.unwrap();
    b.leave().await;
    assert_eq!(a.refresh(&m).await.unwrap().unwrap(), vec!["h:1:a".to_string()]);
    assert!(!a.is_lost("h:2:b"));
    assert_eq!(gauge(&m, "offload_replica_members_lost_total"), 0.0, "a stop is not a loss");
}

#[tokio::test]
async fn a_member_of_this_host_whose_process_is_gone_is_lost_at_once_despite_a_fresh_heartbeat() {
    let dir = tempfile::tempdir().unwrap();
    let state = store(&dir).await;
    let m = Metrics::new();
    let tables = ["t1", "t2"];
    let timeout = Duration::from_secs(30);
    let host = iceberg_offload::state::hostname();
    // The predecessor of a restarted container: this very pid (PID 1 again), another token.
    let before = format!("{host}:{}:before", std::process::id());
    let me = iceberg_offload::state::process_holder("now");
    let old = Membership::new(state.clone(), before.clone(), timeout, &tables);
    old.heartbeat(&m).await.unwrap();
    state.acquire_lease("t1", &before, Duration::from_secs(600)).await.unwrap();
    let new = Membership::new(state.clone(), me.clone(), timeout, &tables);
    new.heartbeat(&m).await.unwrap();
    assert_eq!(new.refresh(&m).await.unwrap(), Some(vec![me.clone()]), "never counted live");
    assert!(new.is_lost(&before));
    assert_eq!(gauge(&m, "offload_replica_members_lost_total"), 1.0, "counted once");
    assert!(state.members().await.unwrap().iter().all(|x| x.id != before), "its row is removed");
    // Its lease is taken over at once, not after the lease's time to live.
    let (lease, from) = iceberg_offload::state::acquire_from(&state, "t1", &me, Duration::from_secs(600), |h| {
        iceberg_offload::state::holder_is_gone(h, &me)
    })
    .await
    .unwrap();
    assert_eq!((lease.holder.as_str(), from.as_deref()), (me.as_str(), Some(before.as_str())));
    // status and watermark show (another process than any member) never name a member whose
    // process exited, even while its row is still there: here one whose pid has exited, beside
    // one whose pid runs (this test's parent).
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let exited = format!("{host}:{}:x", child.id());
    child.wait().unwrap();
    let running = format!("{host}:{}:y", std::os::unix::process::parent_id());
    for id in [&exited, &running] {
        Membership::new(state.clone(), id.clone(), timeout, &tables).heartbeat(&m).await.unwrap();
    }
    let (live, owners) = iceberg_offload::replicas::owners(&state, &tables, timeout).await.unwrap();
    assert!(live.contains(&running) && !live.contains(&exited), "{live:?}");
    assert!(owners.values().all(|o| *o != exited), "{owners:?}");
}
