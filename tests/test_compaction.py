"""Compaction of closed partitions (issue 12): small files rewritten at the target size in one
`replace` snapshot committed through our own compare-and-swap, every row and value unchanged,
then expiry deletes what only the replaced snapshots referenced. Checked with pyiceberg, the
ClickHouse directory reader (icebergLocal() without a pinned metadata file) and DuckDB against
the source, never with our own reader."""
import json
import subprocess
import time

from harness import (PYTHON, assert_directory_reader_sees_the_catalog, assert_equal_to_source, bronze_table,
                     create_bronze, insert_bronze, now_ms, run, start_rest_catalog, write_config)

FILES = """
import json, collections
import pyiceberg.catalog.{kind} as s
c = {catalog}
t = c.load_table("{table}")
per_partition = collections.defaultdict(list)
for task in t.scan().plan_files():
    f = task.file
    per_partition[str(f.partition)].append([f.file_size_in_bytes, f.record_count])
snap = t.current_snapshot()
print(json.dumps({{
    "partitions": per_partition,
    "operation": snap.summary.operation.value,
    "summary": {{k: v for k, v in snap.summary.additional_properties.items()}},
    "snapshots": len(t.metadata.snapshots),
    "manifests": len(snap.manifests(t.io)),
    "properties": t.metadata.properties,
}}))
"""

DAY_MS = 86_400_000


def sql_catalog(tmp):
    return f'SqlCatalog("offload", uri="sqlite:///{tmp}/catalog.db", warehouse="file://{tmp}/warehouse")'


def files(tmp, table="cold.trades", catalog=None, kind="sql"):
    code = FILES.format(kind=kind, catalog=catalog or sql_catalog(tmp), table=table)
    code = code.replace("c = SqlCatalog", "c = s.SqlCatalog").replace("c = RestCatalog", "c = s.RestCatalog")
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def days_config(gateway, db, tmp, table="trades", rows=5_000, per_commit=10, extra=""):
    """`rows` rows over the last three days and a half, `rows / per_commit` appends."""
    create_bronze(gateway, db, table)
    start = now_ms() - int(3.5 * DAY_MS)
    insert_bronze(gateway, db, table, rows, start, step_ms=int(3.4 * DAY_MS) // rows)
    t = bronze_table(db, table, max_rows_per_commit=per_commit, settle_delay="1s")
    cfg = write_config(tmp / "c.toml", gateway, [t], tmp)
    cfg.write_text(cfg.read_text() + '\n[maintenance]\nmax_snapshot_age = "1s"\nmin_snapshots_to_keep = 3\n'
                   'target_file_size_mb = 1\n' + extra)
    return cfg


def test_compaction_of_500_appends_keeps_every_row_and_leaves_no_file_behind(gateway, db, tmp_path):
    cfg = days_config(gateway, db, tmp_path)
    run(cfg, "once", check=True)
    before = files(tmp_path)
    assert before["snapshots"] == 500, before["snapshots"]
    closed_before = {p: f for p, f in before["partitions"].items() if len(f) > 1}
    assert len(before["partitions"]) >= 4, before["partitions"].keys()

    dry = run(cfg, "maintain", "--dry-run", check=True).stdout
    assert "would be compacted" in dry, dry
    assert files(tmp_path)["snapshots"] == 500, "a dry run changed the table"

    out = run(cfg, "maintain", "--only", "compact", check=True).stdout
    assert "compacted into" in out, out
    after = files(tmp_path)
    assert after["operation"] == "replace", after["operation"]
    # Closed partitions (all but the newest day or two) now hold one file each: together they are
    # far below the 1 MiB target. Rows per partition unchanged.
    single = [p for p, f in after["partitions"].items() if len(f) == 1]
    assert len(single) >= 2, after["partitions"]
    for p, f in after["partitions"].items():
        assert sum(r for _, r in f) == sum(r for _, r in before["partitions"][p]), p
    assert len(after["partitions"]) == len(before["partitions"])
    assert int(after["summary"]["total-records"]) == sum(r for f in after["partitions"].values() for _, r in f)
    assert after["manifests"] < before["manifests"], (before["manifests"], after["manifests"])
    assert after["properties"]["offload.watermark.position"] == before["properties"]["offload.watermark.position"]
    assert_equal_to_source(gateway, tmp_path, db, "trades")
    assert_directory_reader_sees_the_catalog(tmp_path)
    assert closed_before

    # Expiry then deletes the replaced files: nothing on disk outside the live metadata.
    time.sleep(1.1)
    run(cfg, "maintain", "--only", "expire", check=True)
    from test_maintenance import inspect
    state = inspect(tmp_path)
    assert state["snapshots"] == 3, state["snapshots"]
    assert not state["missing"], state["missing"][:5]
    assert not state["unreferenced"], state["unreferenced"][:5]
    assert_equal_to_source(gateway, tmp_path, db, "trades")

    # The offload goes on from the same W: new rows land once.
    insert_bronze(gateway, db, "trades", 50, now_ms() - 2_000, step_ms=10, seq_start=100_000)
    time.sleep(2)
    assert "50 rows" in run(cfg, "once", check=True).stderr
    assert_equal_to_source(gateway, tmp_path, db, "trades")
    # A second run finds nothing more to compact in what it compacted.
    again = run(cfg, "maintain", "--only", "compact", "--dry-run", check=True).stdout
    assert "nothing to compact" in again or " 0 files" not in again, again


def test_compaction_through_the_rest_catalog(gateway, db, tmp_path):
    token = "rest-token-compaction"
    url, proc = start_rest_catalog(tmp_path, token=token)
    env = {"TEST_REST_TOKEN": token}
    try:
        cfg = days_config(gateway, db, tmp_path, rows=600, per_commit=20)
        text = cfg.read_text().replace('type = "sql"', 'type = "rest"').replace(
            f'uri = "sqlite:{tmp_path / "catalog.db"}"', f'uri = "{url}"\ntoken_env = "TEST_REST_TOKEN"')
        assert 'type = "rest"' in text
        cfg.write_text(text)
        run(cfg, "once", check=True, env=env)
        before = files(tmp_path)
        out = run(cfg, "maintain", check=True, env=env).stdout
        assert "compacted into" in out, out
        after = files(tmp_path)
        assert after["operation"] == "replace"
        assert sum(len(f) for f in after["partitions"].values()) < sum(len(f) for f in before["partitions"].values())
        assert_equal_to_source(gateway, tmp_path, db, "trades")
        insert_bronze(gateway, db, "trades", 30, now_ms() - 2_000, step_ms=10, seq_start=100_000)
        time.sleep(2)
        run(cfg, "once", check=True, env=env)
        assert_equal_to_source(gateway, tmp_path, db, "trades")
    finally:
        proc.kill()


RACE_DDL = """CREATE TABLE {db}.{table} (ts DateTime64(3), seq UInt64, symbol String, price Decimal(18, 8),
              arrived DateTime64(3) DEFAULT now64(3))
              ENGINE = MergeTree ORDER BY (arrived, seq)"""


def test_compaction_racing_offload_cycles_never_loses_or_doubles_a_row(gateway, db, tmp_path):
    """100 randomised trials: an offload cycle and a compaction of the same table start together
    (0-400 ms apart), in two processes that do not share a lease (two state stores: another
    host misconfigured, or a compaction run by hand elsewhere). Rows arrive late by event time
    (an arrival cursor), so every cycle writes into closed day partitions that the compaction
    rewrites. Whoever loses the compare-and-swap retries or gives up cleanly; at the end every
    source row is in Iceberg once (three readers) and no file outside the live metadata is left."""
    import random
    from harness import verify
    from test_maintenance import inspect
    rnd = random.Random(12)
    gateway.sql(RACE_DDL.format(db=db, table="arrivals"))
    day = 86_400_000
    today = now_ms() // day * day

    def arrive(n, seq):
        days_ago = rnd.choice((2, 3, 4))
        gateway.sql(f"""INSERT INTO {db}.arrivals (ts, seq, symbol, price, arrived)
            SELECT fromUnixTimestamp64Milli(toInt64({today - days_ago * day + 3_600_000} + number * 60000)),
                   {seq} + number, ['BTC', 'ETH'][number % 2 + 1], toDecimal64(100 + number % 7, 8),
                   now64(3)
            FROM numbers({n})""")
        # Settled (200 ms) before the cycle starts: rows never arrive below W.
        time.sleep(0.3)

    t = {"source": f"{db}.arrivals", "target": "cold.arrivals", "layer": "bronze", "cursor": "arrived",
         "tiebreak": "seq", "settle_delay": "200ms", "partition": ["day(ts)"]}
    offload = write_config(tmp_path / "offload.toml", gateway, [t], tmp_path, state_url=f"sqlite:{tmp_path / 'a.db'}")
    compact = write_config(tmp_path / "compact.toml", gateway, [t], tmp_path, state_url=f"sqlite:{tmp_path / 'b.db'}")
    compact.write_text(compact.read_text() + '\n[maintenance]\ncompact_after = "100ms"\ntarget_file_size_mb = 1\n')
    arrive(20, 0)
    arrive(20, 1_000)
    run(offload, "once", check=True)
    outcomes = {"compacted": 0, "compaction lost": 0, "nothing": 0, "offload refused, retried": 0, "offload failed": 0}
    env = dict(__import__("os").environ, TEST_CH_PASSWORD=__import__("harness").PASSWORD)
    from harness import binary
    for trial in range(100):
        arrive(5, 10_000 + trial * 10)
        delay = rnd.uniform(0, 0.4)
        first, second = (offload, compact) if rnd.random() < 0.5 else (compact, offload)
        procs = []
        for i, cfg in enumerate((first, second)):
            if i == 1:
                time.sleep(delay)
            args = ["once"] if cfg == offload else ["maintain", "--only", "compact"]
            procs.append((cfg, subprocess.Popen([binary(), "--config", str(cfg), *args], env=env,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        for cfg, p in procs:
            out, err = p.communicate(timeout=300)
            if cfg == offload:
                outcomes["offload refused, retried"] += "commit refused" in err
                if p.returncode != 0:
                    outcomes["offload failed"] += 1
                    assert "refused" in err or "conflict" in err.lower(), err[-3000:]
            elif "compacted into" in out:
                outcomes["compacted"] += 1
            elif "failed: compaction" in out:
                outcomes["compaction lost"] += 1
                assert "refused" in out or "changed" in out, out
            else:
                outcomes["nothing"] += 1
                assert p.returncode == 0, (trial, p.returncode, out, err[-3000:])
    print("race outcomes over 100 trials:", outcomes)
    assert outcomes["compacted"] >= 10, outcomes
    time.sleep(1.5)
    run(offload, "once", check=True)
    total = int(gateway.scalar(f"SELECT count() FROM {db}.arrivals"))
    price = gateway.scalar(f"SELECT toString(sum(price)) FROM {db}.arrivals").strip()
    got = verify(tmp_path, "cold.arrivals", key="symbol,seq", sums=("price",))
    for reader in ("pyiceberg", "clickhouse", "duckdb"):
        if reader in got:
            assert got[reader]["count"] == total, (reader, got[reader]["count"], total, outcomes)
            assert got[reader]["distinct_keys"] == total, (reader, got[reader], outcomes)
            assert float(got[reader]["sums"]["price"]) == float(price), (reader, got[reader]["sums"], price)
    state = inspect(tmp_path, "cold.arrivals")
    assert not state["missing"], state["missing"][:5]
    assert not state["unreferenced"], state["unreferenced"][:5]


def test_compaction_killed_at_each_step_leaves_the_table_whole(gateway, db, tmp_path):
    """SIGKILL-like aborts before and after the compaction's commit: the table stays readable with
    every row, and the next run settles what was left (pyiceberg's view of the files)."""
    from harness import fault_binary
    from test_maintenance import inspect
    for i, point in enumerate(("compact_before_commit", "compact_after_commit")):
        tmp = tmp_path / point
        tmp.mkdir()
        table = f"k{i}"
        cfg = days_config(gateway, db, tmp, table=table, rows=200, per_commit=20)
        run(cfg, "once", check=True)
        failed = run(cfg, "maintain", "--only", "compact", exe=fault_binary(),
                     env={"ICEBERG_OFFLOAD_FAULT": f"{point}:abort"})
        assert failed.returncode != 0, (point, failed.stdout + failed.stderr[-2000:])
        assert_equal_to_source(gateway, tmp, db, table)
        assert_directory_reader_sees_the_catalog(tmp, f"cold.{table}")
        landed = files(tmp, f"cold.{table}")["operation"] == "replace"
        assert landed == (point == "compact_after_commit"), (point, landed)
        time.sleep(1.1)
        again = run(cfg, "maintain", check=True)
        state = inspect(tmp, f"cold.{table}")
        assert state["snapshots"] == 3, (point, state["snapshots"], again.stdout)
        assert not state["missing"], (point, state["missing"][:3])
        assert not state["unreferenced"], (point, state["unreferenced"][:5])
        assert files(tmp, f"cold.{table}")["operation"] == "replace", again.stdout
        assert_equal_to_source(gateway, tmp, db, table)


def test_compaction_commit_answered_504_or_dropped_by_the_rest_catalog(gateway, db, tmp_path):
    """A proxy in front of the REST catalog answers 504 or drops the connection and applies the
    compaction late, or never, or answers after the client gave up: the table keeps every row
    once, and whatever the outcome the next runs leave no file outside the live metadata."""
    from catalog_proxy import CatalogProxy
    from test_maintenance import inspect
    for i, (kind, delay) in enumerate((("504_then_apply", 0.5), ("504", None), ("drop_then_apply", 0.5),
                                       ("drop", None), ("slow", 4.0))):
        tmp = tmp_path / kind
        tmp.mkdir()
        url, proc = start_rest_catalog(tmp)
        proxy = CatalogProxy(url)
        try:
            table = f"r{i}"
            cfg = days_config(gateway, db, tmp, table=table, rows=200, per_commit=20)
            text = cfg.read_text().replace('type = "sql"', 'type = "rest"').replace(
                f'uri = "sqlite:{tmp / "catalog.db"}"', f'uri = "{proxy.url}"\ncommit_timeout = "2s"')
            cfg.write_text(text)
            run(cfg, "once", check=True)
            proxy.push(kind, delay)
            out = run(cfg, "maintain", "--only", "compact")
            assert "panicked" not in out.stderr, out.stderr[-3000:]
            proxy.settle()
            assert_equal_to_source(gateway, tmp, db, table)
            insert_bronze(gateway, db, table, 20, now_ms() - 2_000, step_ms=10, seq_start=100_000)
            time.sleep(2)
            run(cfg, "once", check=True)
            time.sleep(1.1)
            run(cfg, "maintain", check=True)
            time.sleep(1.1)
            final = run(cfg, "maintain", check=True)
            state = inspect(tmp, f"cold.{table}")
            assert not state["missing"], (kind, state["missing"][:3])
            assert not state["unreferenced"], (kind, state["unreferenced"][:5], out.stdout, final.stdout)
            assert_equal_to_source(gateway, tmp, db, table)
        finally:
            proxy.close()
            proc.terminate()
            proc.wait(10)
