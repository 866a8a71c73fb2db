"""A restart costs seconds, not an interval (issue 23): the default deployment, one `run` with the
SQLite state store (and again with PostgreSQL's) and a long interval (a day: the boundary never
falls inside the test), SIGKILLed and started again at once (systemd's
`Restart=always`, a container runtime). The new process finds its predecessor gone at once (a
member of this host whose pid no longer runs: `state::holder_is_gone`), so it owns every table,
and its first cycle, at start, offloads the rows that arrived before the restart."""
import os
import re
import signal
import subprocess
import time

import k2data
from harness import PASSWORD, assert_equal_to_source, binary, bronze_table, create_bronze, insert_bronze, now_ms, \
    write_config  # noqa: E501
from test_postgres import postgres  # noqa: F401 - the PostgreSQL fixture, shared

TABLES = [f"trades_{i}" for i in range(6)]


def start(cfg, log, env=None):
    env = dict(os.environ, TEST_CH_PASSWORD=PASSWORD, **(env or {}))
    return subprocess.Popen([binary(), "--config", str(cfg), "run"], env=env, stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"))


def away_from_the_boundary(seconds=180):
    """The services run with a daily interval: a run must not meet its boundary (00:00 UTC), or a
    regular cycle would do what the test expects of a start or a takeover. Waits past it when
    it is less than `seconds` away."""
    left = 86_400 - time.time() % 86_400
    if left < seconds:
        time.sleep(left + 2)


def wait_for_line(log, pattern, proc, timeout=120):
    """The first line of `log` matching `pattern`, waited for while `proc` runs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = log.read_text()
        m = re.search(pattern, text)
        if m:
            return m
        assert proc.poll() is None, f"the service ended:\n{text[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n{log.read_text()[-3000:]}")


def test_a_process_restarted_after_sigkill_runs_every_table_in_its_first_cycle(gateway, db, tmp_path):
    restart_after_sigkill(gateway, db, tmp_path)


def test_the_same_with_the_state_store_on_postgresql(gateway, db, tmp_path, postgres):
    from test_postgres import psql
    base, password = postgres
    name = "offload_" + os.urandom(5).hex()
    psql(password, "postgres", f"CREATE DATABASE {name}")
    restart_after_sigkill(gateway, db, tmp_path, state=(f"{base}/{name}", password), spark=False)


def restart_after_sigkill(gateway, db, tmp_path, state=None, spark=True):
    start_ms = now_ms() - 3_600_000
    for t in TABLES:
        create_bronze(gateway, db, t)
        insert_bronze(gateway, db, t, 1_000, start_ms, step_ms=100)
    cfg = write_config(tmp_path / "c.toml", gateway, [bronze_table(db, t, settle_delay="1s") for t in TABLES], tmp_path,
                       state_url=state[0] if state else None)
    # A daily interval: the next boundary is hours away (the default 15 minutes could fall
    # inside the test one time in a few hundred).
    cfg.write_text(cfg.read_text().replace('interval = "15m"', 'interval = "24h"'))
    away_from_the_boundary()
    env = {}
    if state:
        cfg.write_text(cfg.read_text().replace('[state]\n', '[state]\npassword_env = "TEST_PG_PASSWORD"\n'))
        env["TEST_PG_PASSWORD"] = state[1]
    first = start(cfg, tmp_path / "first.log", env)
    try:
        wait_for_line(tmp_path / "first.log", r"CYCLE COMPLETED: status=success", first)
        # Rows that arrive while the first process waits for its next boundary (15 min away),
        # settled (1 s) before it dies.
        for t in TABLES:
            k2data.insert_bronze_arriving_now(gateway.sql, db, t, 500, seq_start=10_000)
        time.sleep(1.2)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    restarted_at = time.time()
    second = start(cfg, tmp_path / "second.log", env)
    try:
        done = wait_for_line(tmp_path / "second.log", r"CYCLE COMPLETED: status=(\w+) tables ok=(\d+) failed=(\d+) "
                                                       r"skipped=(\d+) rows=(\d+)", second)
        took = time.time() - restarted_at
        # With the predecessor counted live, half the tables would be handed to it (not owned).
        assert done.groups() == ("success", "6", "0", "0", "3000"), done.group(0)
        log = (tmp_path / "second.log").read_text()
        assert f"replica {first_member(tmp_path / 'first.log')} is gone" in log, log[-3000:]
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(60)
    for i, t in enumerate(TABLES):
        got, src = assert_equal_to_source(gateway, tmp_path, db, t, spark=spark and i == 0)
        assert src["count"] == 1_500, f"{t}: the rows that arrived before the restart are offloaded ({src['count']})"
    print(f"restart to every table offloaded: {took:.1f} s")
    assert took < 60, f"the restarted process took {took:.1f} s to offload every table"


def first_member(log):
    """The first process's member id, from its own heartbeat line."""
    m = re.search(r"replica member (\S+) joined", log.read_text())
    assert m, log.read_text()[-2000:]
    return m.group(1)
