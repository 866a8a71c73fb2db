"""PostgreSQL as the state store and as the SQL catalog, on the machine's real server."""
import os
import subprocess
import time
import uuid

import pytest

from harness import ROOT, Readers, spark_enabled, spark_read, bronze_table, create_bronze, insert_bronze, now_ms, run, write_config


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """The machine's PostgreSQL, started, and the test role's (base URL, password). One password
    file for every test process of the run: dev/postgres.sh sets the role's password from it,
    and a module's fresh one would log out the other worker's tests (tests/conftest.py)."""
    from conftest import shared_dir
    pwfile = shared_dir(tmp_path_factory) / "postgres-password"
    base = subprocess.run([str(ROOT / "dev" / "postgres.sh"), str(pwfile)], check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return base, pwfile.read_text().strip()


def psql(password, db, sql):
    env = dict(os.environ, PGPASSWORD=password)
    return subprocess.run(["psql", "-h", "127.0.0.1", "-U", "offload_test", "-d", db, "-tA", "-F", "\t", "-c", sql],
                          check=True, capture_output=True, text=True, env=env).stdout.strip()


def pg_setup(gateway, db, tmp_path, postgres, rows, settle):
    """A fresh PostgreSQL database as catalog and state store, a source table with `rows` trades,
    and the config; returns (config, database name, password)."""
    base, password = postgres
    name = "offload_" + uuid.uuid4().hex[:10]
    psql(password, "postgres", f"CREATE DATABASE {name}")
    create_bronze(gateway, db, "trades")
    insert_bronze(gateway, db, "trades", rows, now_ms() - 7_200_000, step_ms=100)
    cfg = write_config(tmp_path / "c.toml", gateway, [bronze_table(db, "trades", settle_delay=settle)], tmp_path,
                       catalog_uri=f"{base}/{name}", state_url=f"{base}/{name}")
    text = cfg.read_text().replace('[state]\n', '[state]\npassword_env = "TEST_PG_PASSWORD"\n')
    cfg.write_text(text.replace('[catalog]\n', '[catalog]\npassword_env = "TEST_PG_PASSWORD"\n'))
    return cfg, name, password


def pg_verify(password, name, tmp_path, spark=True):
    """pyiceberg through the same PostgreSQL catalog, and ClickHouse icebergLocal()."""
    got = Readers.read(["--catalog-uri", f"postgresql+psycopg2://offload_test:{password}@127.0.0.1:5432/{name}",
                        "--warehouse", f"file://{tmp_path / 'warehouse'}", "--table", "cold.trades",
                        "--key", "symbol,sequence_number", "--sum", "price"])
    if spark and spark_enabled():
        # Spark through the same PostgreSQL catalog (Iceberg Java's JdbcCatalog, Debian's driver).
        catalog = {"type": "jdbc", "uri": f"jdbc:postgresql://127.0.0.1:5432/{name}", "user": "offload_test",
                   "password": password, "warehouse": f"file://{tmp_path / 'warehouse'}", "name": "offload"}
        got["spark"] = spark_read(catalog, "cold.trades", sums=("price",))
    return got


def test_postgres_state_store_and_catalog(gateway, db, tmp_path, postgres):
    cfg, name, password = pg_setup(gateway, db, tmp_path, postgres, 40_000, "2s")
    env = {"TEST_PG_PASSWORD": password}
    p = run(cfg, "once", env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert password not in p.stdout + p.stderr

    # The operators' table, with the guide's columns and types.
    row = psql(password, name, "SELECT table_name, status, last_offload_row_count, failure_count, "
               "pg_typeof(last_offload_timestamp), last_successful_run IS NOT NULL FROM offload_watermarks")
    assert row.split("\t") == ["trades", "success", "40000", "0", "timestamp with time zone", "t"], row
    assert psql(password, name, "SELECT count(*), max(rows_written) FROM offload_runs WHERE status = 'success'") == "1\t40000"

    # pyiceberg through the same PostgreSQL catalog sees what ClickHouse has.
    got = pg_verify(password, name, tmp_path)
    assert got["pyiceberg"]["count"] == 40_000 == got["clickhouse"]["count"]
    if spark_enabled():
        assert got["spark"]["count"] == 40_000 and got["spark"]["distinct_keys"] == 40_000
        assert got["spark"]["sums"]["price"].rstrip("0") == got["pyiceberg"]["sums"]["price"].rstrip("0")
    assert got["pyiceberg"]["duplicates"] == 0

    # A state store that cannot be reached must not stop the offload (Iceberg is the truth).
    insert_bronze(gateway, db, "trades", 10, now_ms() - 1_000, step_ms=10, seq_start=900_000)
    time.sleep(2.5)
    text = cfg.read_text().replace('[state]\npassword_env = "TEST_PG_PASSWORD"\n', '[state]\npassword_env = "TEST_PG_WRONG"\n')
    cfg.write_text(text)
    p = run(cfg, "once", env={"TEST_PG_PASSWORD": password, "TEST_PG_WRONG": "wrong-" + password[:4]})
    assert p.returncode == 0, p.stdout + p.stderr
    assert "state store unavailable" in p.stderr
    assert "10 rows" in p.stdout


def test_postgres_stopped_mid_run_and_restarted(gateway, db, tmp_path, postgres):
    """Catalog and state store on PostgreSQL; PostgreSQL stops while the scheduler runs and
    comes back. The scheduler survives, commits nothing half-done, and catches up."""
    import signal
    from harness import PASSWORD, binary
    cfg, name, password = pg_setup(gateway, db, tmp_path, postgres, 10_000, "1s")
    cfg.write_text(cfg.read_text().replace('interval = "15m"', 'interval = "1s"'))
    env = dict(os.environ, TEST_PG_PASSWORD=password, TEST_CH_PASSWORD=PASSWORD)
    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen([binary(), "--config", str(cfg), "run"], env=env, stdout=subprocess.DEVNULL, stderr=log)
    seq = 1_000_000
    try:
        time.sleep(3)
        subprocess.run(["pg_ctlcluster", "15", "main", "stop", "-m", "fast"], check=True)
        try:
            for _ in range(4):
                insert_bronze(gateway, db, "trades", 500, now_ms() - 900, step_ms=1, seq_start=seq)
                seq += 500
                time.sleep(1)
            assert proc.poll() is None, "the scheduler must survive its catalog and state store going away"
        finally:
            subprocess.run(["pg_ctlcluster", "15", "main", "start"], check=True)
        for _ in range(3):
            insert_bronze(gateway, db, "trades", 500, now_ms() - 900, step_ms=1, seq_start=seq)
            seq += 500
            time.sleep(1)
        # Wait (bounded) until the scheduler has caught up and mirrored a success.
        deadline = time.time() + 90
        while time.time() < deadline:
            time.sleep(2)
            state = psql(password, name, "SELECT status, failure_count, last_offload_timestamp FROM offload_watermarks")
            if state.startswith("success\t0") and pg_verify(password, name, tmp_path)["pyiceberg"]["count"] == 10_000 + (seq - 1_000_000):
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    # While PostgreSQL is down the catalog's pool waits for a connection (up to its acquire
    # timeout; longer outages fail the table as [connection] and the next cycle retries).
    logs = (tmp_path / "run.log").read_text()
    assert logs.count("CYCLE COMPLETED") >= 5, logs[-3000:]
    got = pg_verify(password, name, tmp_path)
    total = 10_000 + (seq - 1_000_000)
    assert got["pyiceberg"]["count"] == total == got["clickhouse"]["count"]
    assert got["pyiceberg"]["duplicates"] == 0
    # Stopped by SIGTERM: the mirror says success, or "interrupted" if a cycle was in flight.
    status, failures = psql(password, name, "SELECT status, failure_count FROM offload_watermarks").split("\t")
    assert status in ("success", "interrupted") and failures == "0", (status, failures)
