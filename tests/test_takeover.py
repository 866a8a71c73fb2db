"""Tables a replica gains run at once, not at the next boundary (issue 23): three `run` replicas
on one SQLite state store with a daily interval (the boundary never falls inside the test), two
of them on host names of their own (own UTS namespaces, `unshare -u`, so that their death is
found by the member timeout, as for replicas on other machines). When one leaves (SIGTERM) or
dies (SIGKILL, five times, alternately), the survivors run its tables within seconds in
off-schedule cycles, while the tables they kept wait for the boundary; then it comes back and
takes its share again."""
import os
import re
import signal
import subprocess
import time

import k2data
from harness import PASSWORD, assert_equal_to_source, binary, bronze_table, create_bronze, insert_bronze, now_ms, \
    write_config
from test_restart import away_from_the_boundary, wait_for_line

TABLES = [f"trades_{i}" for i in range(6)]
MEMBER_TIMEOUT_S = 3
OFF_SCHEDULE = r"off-schedule cycle: running at once the (\d+) tables this replica gained \(([^)]*)\)"


def start(cfg, log, host=None):
    env = dict(os.environ, TEST_CH_PASSWORD=PASSWORD)
    cmd = [binary(), "--config", str(cfg), "run"]
    if host:
        cmd = ["unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh", *cmd]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))


def nth_line(log, pattern, n, proc, timeout):
    """The n-th (1-based) match of `pattern` in `log`, waited for while `proc` runs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list(re.finditer(pattern, log.read_text()))
        if len(found) >= n:
            return found[n - 1]
        assert proc.poll() is None, f"the service ended:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} lines matching {pattern!r} within {timeout} s:\n{log.read_text()[-3000:]}")


def count(log, pattern):
    return len(re.findall(pattern, log.read_text()))


def iceberg_count(gateway, tmp_path, db, t):
    got, _ = assert_equal_to_source(gateway, tmp_path, db, t, spark=False)
    return got["pyiceberg"]["count"]


OWNERSHIP = r"this one owns \d+ of \d+ tables \(gained: ([^;]*); handed over: ([^)]*)\)"


def owned(log):
    """The tables a replica owns, replayed from its ownership lines (a replica starts owning
    every table and logs what changes)."""
    tables = set(TABLES)
    for m in re.finditer(OWNERSHIP, log.read_text()):
        gained, handed = m.group(1), m.group(2)
        tables |= set() if gained == "none" else set(gained.split(", "))
        tables -= set() if handed == "none" else set(handed.split(", "))
    return tables


def settled(logs, procs, timeout=60):
    """Waits until the replicas' ownerships split the tables with nothing twice; returns them."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        shares = {name: owned(log) for name, log in logs.items()}
        if sorted(t for share in shares.values() for t in share) == sorted(TABLES) and all(shares.values()):
            return shares
        for name in logs:
            assert procs[name].poll() is None, f"{name} ended:\n{logs[name].read_text()[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"ownership did not settle: { {n: owned(log) for n, log in logs.items()} }")


def taken_over(logs, procs, survivors, offs, completed, lost, timeout=MEMBER_TIMEOUT_S + 30):
    """Waits until the survivors' off-schedule cycles since the loss cover the `lost` tables and
    have completed: (when, the tables they ran)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = {n: list(re.finditer(OFF_SCHEDULE, logs[n].read_text()))[offs[n]:] for n in survivors}
        gained = {t for ms in found.values() for m in ms for t in m.group(2).split(", ")}
        done = all(count(logs[n], r"CYCLE COMPLETED") >= completed[n] + len(found[n]) for n in survivors)
        if lost <= gained and done:
            return time.time(), gained
        for n in survivors:
            assert procs[n].poll() is None, f"{n} ended:\n{logs[n].read_text()[-3000:]}"
        time.sleep(0.05)
    raise AssertionError(f"the survivors did not run {sorted(lost)} within {timeout} s")


def test_a_replica_that_leaves_or_dies_has_its_tables_run_at_once_by_the_others(gateway, db, tmp_path):
    for t in TABLES:
        create_bronze(gateway, db, t)
        insert_bronze(gateway, db, t, 600, now_ms() - 3_600_000, step_ms=100)
    cfg = write_config(tmp_path / "c.toml", gateway, [bronze_table(db, t, settle_delay="1s") for t in TABLES], tmp_path,
                       extra_service=f'member_timeout = "{MEMBER_TIMEOUT_S}s"')
    cfg.write_text(cfg.read_text().replace('interval = "15m"', 'interval = "24h"'))
    away_from_the_boundary(seconds=300)
    hosts = {"a": None, "b": "replica-b", "c": "replica-c"}
    logs = {name: tmp_path / f"{name}.log" for name in hosts}
    procs = {}
    seq = 100_000
    takeovers = []
    try:
        for name, host in hosts.items():
            procs[name] = start(cfg, logs[name], host=host)
            wait_for_line(logs[name], r"CYCLE COMPLETED: status=success", procs[name])
        for round_ in range(6):
            shares = settled(logs, procs)
            victim = "bc"[round_ % 2]
            survivors = [n for n in hosts if n != victim]
            # Rows arrive for every table, settled before the victim goes.
            for t in TABLES:
                k2data.insert_bronze_arriving_now(gateway.sql, db, t, 100, seq_start=seq)
            seq += 100
            time.sleep(1.2)
            before = {t: iceberg_count(gateway, tmp_path, db, t) for t in TABLES}
            offs = {n: count(logs[n], OFF_SCHEDULE) for n in survivors}
            completed = {n: count(logs[n], r"CYCLE COMPLETED") for n in survivors}
            gone = time.time()
            procs[victim].send_signal(signal.SIGTERM if round_ == 0 else signal.SIGKILL)
            procs[victim].wait(60)
            took, gained = taken_over(logs, procs, survivors, offs, completed, shares[victim])
            took -= gone
            takeovers.append(took)
            assert shares[victim] <= gained, (round_, victim, gained, shares)
            settled({n: logs[n] for n in survivors}, procs)
            _, gained = taken_over(logs, procs, survivors, offs, completed, shares[victim])
            # The tables run off-schedule hold every row that arrived before the victim went (a
            # survivor's backlog with them: a table kept by a survivor may move to the other);
            # the tables the survivors kept wait for the boundary (hours away).
            for t in TABLES:
                want = int(gateway.scalar(f"SELECT count() FROM {db}.{t}")) if t in gained else before[t]
                assert iceberg_count(gateway, tmp_path, db, t) == want, (round_, t, t in gained)
            print(f"round {round_} ({'SIGTERM' if round_ == 0 else 'SIGKILL'} of {victim}): its {len(shares[victim])} "
                  f"tables run by {' and '.join(survivors)} {took:.1f} s after it went "
                  f"({len(gained - shares[victim])} more moved between them)")
            bound = 10 if round_ == 0 else MEMBER_TIMEOUT_S + 30
            assert took < bound, f"round {round_}: {victim}'s tables moved after {took:.1f} s"
            # It comes back (a restarted pod keeps its host name) and takes its share again.
            logs[victim].write_text("")
            procs[victim] = start(cfg, logs[victim], host=hosts[victim])
            wait_for_line(logs[victim], r"CYCLE COMPLETED: status=success", procs[victim])
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()
    print("takeover times (s):", [round(t, 1) for t in takeovers])
    assert len(takeovers) == 6
