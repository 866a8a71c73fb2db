"""Timeouts, broken connections and concurrent writers: classified, nothing half-done is
committed, and the next healthy cycle catches up with no loss and no duplicate."""
import signal
import subprocess
import sys
import time

import pytest

from harness import (PASSWORD, ROOT, assert_equal_to_source, binary, bronze_table, create_bronze, insert_bronze, now_ms,
                     run, verify, write_config)

sys.path.insert(0, str(ROOT / "dev"))
from tcp_proxy import FaultProxy  # noqa: E402


class Via:
    def __init__(self, url):
        self.url = url


@pytest.fixture
def proxy(gateway):
    p = FaultProxy(gateway.port)
    yield p
    p.close()


def committed_snapshots(tmp_path, table):
    got = verify(tmp_path, table, clickhouse=False)
    return [s for s in got["pyiceberg"]["snapshots"] if s.get("offload.run-id")]


def test_hanging_clickhouse_times_out_and_commits_nothing(gateway, db, tmp_path, proxy):
    create_bronze(gateway, db, "trades")
    insert_bronze(gateway, db, "trades", 20_000, now_ms() - 7_200_000, step_ms=100)
    cfg = write_config(tmp_path / "c.toml", Via(proxy.url), [bronze_table(db, "trades")], tmp_path,
                       extra_service='')
    cfg.write_text(cfg.read_text().replace('table_timeout = "5m"', 'table_timeout = "2s"'))
    proxy.mode = "hang"
    started = time.time()
    p = run(cfg, "once")
    took = time.time() - started
    assert p.returncode == 3, p.stdout + p.stderr
    assert "[timeout]" in p.stdout, p.stdout
    assert took < 20, f"the timeout did not cancel the work ({took:.1f}s)"
    assert proxy.matched >= 1
    assert committed_snapshots(tmp_path, "cold.trades") == []
    # The next healthy cycle catches up.
    proxy.mode = "pass"
    run(cfg, "once", check=True)
    _, src = assert_equal_to_source(gateway, tmp_path, db, "trades")
    assert src["count"] == 20_000


def test_connection_cut_mid_stream_never_commits_a_partial_window(gateway, db, tmp_path, proxy):
    create_bronze(gateway, db, "trades")
    insert_bronze(gateway, db, "trades", 200_000, now_ms() - 7_200_000, step_ms=10)
    cfg = write_config(tmp_path / "c.toml", Via(proxy.url), [bronze_table(db, "trades")], tmp_path)
    proxy.mode, proxy.cut_after = "cut", 300_000
    p = run(cfg, "once")
    assert p.returncode == 3, p.stdout + p.stderr
    assert "[connection]" in p.stdout and "will retry" in p.stderr, p.stdout + p.stderr
    assert committed_snapshots(tmp_path, "cold.trades") == []
    data_files = list((tmp_path / "warehouse" / "cold" / "trades" / "data").rglob("*.parquet"))
    assert data_files == [], f"files of failed attempts left behind: {data_files}"
    proxy.mode = "pass"
    run(cfg, "once", check=True)
    _, src = assert_equal_to_source(gateway, tmp_path, db, "trades")
    assert src["count"] == 200_000


def test_refused_connection_is_classified_and_retried(gateway, db, tmp_path, proxy):
    create_bronze(gateway, db, "trades")
    insert_bronze(gateway, db, "trades", 100, now_ms() - 7_200_000, step_ms=100)
    cfg = write_config(tmp_path / "c.toml", Via(proxy.url), [bronze_table(db, "trades")], tmp_path)
    proxy.mode = "refuse"
    p = run(cfg, "once")
    assert p.returncode == 3
    assert "[connection]" in p.stdout and p.stderr.count("✗ Offload failed") == 2, p.stderr  # 1 try + 1 retry


def test_two_schedulers_side_by_side_land_each_row_once(gateway, db, tmp_path):
    create_bronze(gateway, db, "a")
    create_bronze(gateway, db, "b")
    cfg = write_config(tmp_path / "c.toml", gateway, [
        bronze_table(db, "a", settle_delay="1s", max_rows_per_commit=3_000),
        bronze_table(db, "b", settle_delay="1s", max_rows_per_commit=3_000),
    ], tmp_path)
    cfg.write_text(cfg.read_text().replace('interval = "15m"', 'interval = "1s"'))
    env = {"TEST_CH_PASSWORD": PASSWORD}
    import os
    procs = [subprocess.Popen([binary(), "--config", str(cfg), "run"], env=dict(os.environ, **env),
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"sched{i}.log", "w")) for i in range(2)]
    seq = 0
    try:
        deadline = time.time() + 15
        while time.time() < deadline:
            for t in ("a", "b"):
                insert_bronze(gateway, db, t, 1_000, now_ms() - 900, step_ms=0.5, seq_start=seq)
            seq += 1_000
            # A manual run in the middle of it all is equally safe.
            if abs(deadline - time.time() - 7) < 0.3:
                run(cfg, "once")
            time.sleep(0.4)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            assert p.wait(30) == 0
    time.sleep(1.5)
    run(cfg, "once", check=True)
    logs = "".join((tmp_path / f"sched{i}.log").read_text() for i in range(2))
    assert logs.count("CYCLE COMPLETED") >= 10, "each scheduler should have run many cycles"
    for t in ("a", "b"):
        _, src = assert_equal_to_source(gateway, tmp_path, db, t)
        assert src["count"] == seq
    # The lease: attempts on one table never overlap in time across holders (I6).
    import sqlite3
    runs = sqlite3.connect(tmp_path / "state.db").execute(
        "SELECT table_name, holder, started_at_ms, finished_at_ms FROM offload_runs ORDER BY table_name, started_at_ms").fetchall()
    holders = {h for _, h, _, _ in runs}
    assert len(holders) >= 2, "both schedulers (and the manual run) should have run tables"
    for (t1, h1, s1, f1), (t2, h2, s2, f2) in zip(runs, runs[1:]):
        if t1 == t2 and h1 != h2:
            assert s2 >= f1 - 5, f"{t1}: {h1} ran until {f1} but {h2} started at {s2}"


def test_http_500_is_a_process_error_and_the_next_cycle_catches_up(gateway, db, tmp_path, proxy):
    create_bronze(gateway, db, "trades")
    insert_bronze(gateway, db, "trades", 5_000, now_ms() - 7_200_000, step_ms=100)
    cfg = write_config(tmp_path / "c.toml", Via(proxy.url), [bronze_table(db, "trades")], tmp_path)
    proxy.mode = "http500"
    p = run(cfg, "once")
    assert p.returncode == 3, p.stdout + p.stderr
    assert "[process_error]" in p.stdout and "ClickHouse error 999" in p.stdout, p.stdout
    assert committed_snapshots(tmp_path, "cold.trades") == []
    proxy.mode = "pass"
    run(cfg, "once", check=True)
    _, src = assert_equal_to_source(gateway, tmp_path, db, "trades")
    assert src["count"] == 5_000


def test_locked_sqlite_catalog_fails_cleanly_then_recovers(gateway, db, tmp_path):
    import sqlite3
    create_bronze(gateway, db, "trades")
    insert_bronze(gateway, db, "trades", 5_000, now_ms() - 7_200_000, step_ms=100)
    cfg = write_config(tmp_path / "c.toml", gateway, [bronze_table(db, "trades", settle_delay="1s")], tmp_path)
    run(cfg, "once", check=True)  # creates the catalog and the table
    insert_bronze(gateway, db, "trades", 1_000, now_ms() - 900, step_ms=0.5, seq_start=100_000)
    time.sleep(1.2)
    lock = sqlite3.connect(tmp_path / "catalog.db", timeout=1)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        p = run(cfg, "once", timeout=300)
    finally:
        lock.rollback()
        lock.close()
    # Opening the catalog (or committing) meets the lock: a clear error, nothing committed.
    assert p.returncode in (1, 3), p.stdout + p.stderr[-2000:]
    assert "database is locked" in p.stdout + p.stderr
    assert len(committed_snapshots(tmp_path, "cold.trades")) == 1
    p = run(cfg, "once", check=True)
    _, src = assert_equal_to_source(gateway, tmp_path, db, "trades")
    assert src["count"] == 6_000
