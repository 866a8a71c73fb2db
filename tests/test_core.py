"""End-to-end tests of the core engine (issue 2), on the real ClickHouse engine, read back
by pyiceberg and ClickHouse icebergLocal()."""
import json
import os
import shutil
import subprocess
import time

from harness import (PASSWORD, assert_equal_to_source, binary, bronze_table, create_bronze, insert_bronze,
                     now_ms, run, verify, write_config)


def test_k2_bronze_two_tables_end_to_end(gateway, db, tmp_path):
    """The K2 bronze schema offloads for binance and kraken; both readers equal the source up to W,
    and rows still inside the settle delay stay behind."""
    for t in ("bronze_trades_binance", "bronze_trades_kraken"):
        create_bronze(gateway, db, t)
        insert_bronze(gateway, db, t, 120_000, now_ms() - 3 * 86_400_000, step_ms=2_000)
        insert_bronze(gateway, db, t, 500, now_ms() - 60_000, step_ms=10, seq_start=10_000_000)  # not yet settled
    cfg = write_config(tmp_path / "c.toml", gateway,
                       [bronze_table(db, "bronze_trades_binance"), bronze_table(db, "bronze_trades_kraken")], tmp_path)
    p = run(cfg, "once", check=True)
    assert "CYCLE COMPLETED" in p.stderr and "status=success" in p.stderr
    for t in ("bronze_trades_binance", "bronze_trades_kraken"):
        got, src = assert_equal_to_source(gateway, tmp_path, db, t)
        py = got["pyiceberg"]
        assert src["count"] == 120_000, "the 500 unsettled rows must wait for the next cycle"
        assert py["partition_spec"] == ["day(exchange_timestamp)"]
        assert py["schema"]["exchange_timestamp"] == "timestamptz"
        assert py["schema"]["price"] == "decimal(18, 8)"
        assert py["schema"]["sequence_number"] == "decimal(20, 0)"
        snap = py["snapshots"][-1]
        assert snap["offload.rows"] == "120000" and snap["offload.run-id"]
        assert snap["offload.watermark.position"] == py["properties"]["offload.watermark.position"]
        assert got["clickhouse"]["types"]["price"] == "Nullable(Decimal(18, 8))" or "Decimal(18, 8)" in got["clickhouse"]["types"]["price"]
    # Integer-like columns past their dictionary are DELTA_BINARY_PACKED (the default
    # integer_encoding): both readers above decoded them.
    import pyarrow.parquet as pq
    encodings = {}
    for f in (tmp_path / "warehouse").rglob("*.parquet"):
        md = pq.ParquetFile(f).metadata
        for rg in range(md.num_row_groups):
            for c in range(md.num_columns):
                col = md.row_group(rg).column(c)
                encodings.setdefault(col.path_in_schema, set()).update(col.encodings)
    for column in ("exchange_timestamp", "price", "event_time"):
        assert "DELTA_BINARY_PACKED" in encodings[column], encodings
    assert "DELTA_BINARY_PACKED" not in encodings["symbol"], encodings


def test_cycles_with_inserts_land_every_row_exactly_once(gateway, db, tmp_path):
    create_bronze(gateway, db, "trades")
    cfg = write_config(tmp_path / "c.toml", gateway, [bronze_table(db, "trades", settle_delay="1s")], tmp_path)
    seq = 0
    for cycle in range(4):
        # Rows that arrive between cycles, all newer than the previous watermark.
        insert_bronze(gateway, db, "trades", 5_000, now_ms() - 1_000 - 5_000 * 0, step_ms=0.1, seq_start=seq)
        seq += 5_000
        time.sleep(1.2)
        run(cfg, "once", check=True)
    got, src = assert_equal_to_source(gateway, tmp_path, db, "trades")
    assert src["count"] == 20_000
    assert len([s for s in got["pyiceberg"]["snapshots"] if s.get("offload.run-id")]) == 4
    # A cycle with nothing new commits nothing.
    run(cfg, "once", check=True)
    assert len(verify(tmp_path, "cold.trades", clickhouse=False)["pyiceberg"]["snapshots"]) == 4


def test_backfill_from_empty_is_bounded_in_commits_and_memory(gateway, db, tmp_path):
    create_bronze(gateway, db, "big")
    insert_bronze(gateway, db, "big", 2_000_000, now_ms() - 5 * 86_400_000, step_ms=200)
    cfg = write_config(tmp_path / "c.toml", gateway, [bronze_table(db, "big", max_rows_per_commit=300_000)], tmp_path)
    env = dict(os.environ, TEST_CH_PASSWORD=PASSWORD)
    started = time.time()
    proc = subprocess.Popen([binary(), "--config", str(cfg), "once"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.time() - started
    assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read().decode()[-3000:]
    peak_mb = usage.ru_maxrss / 1024
    print(f"backfill: 2,000,000 rows in {elapsed:.1f}s ({2_000_000 / elapsed:,.0f} rows/s), peak RSS {peak_mb:.0f} MB")
    assert peak_mb < 256, f"peak RSS {peak_mb:.0f} MB"
    got, src = assert_equal_to_source(gateway, tmp_path, db, "big")
    assert src["count"] == 2_000_000
    commits = [s for s in got["pyiceberg"]["snapshots"] if s.get("offload.run-id")]
    assert len(commits) == 7, f"{len(commits)} commits"
    assert max(int(s["offload.rows"]) for s in commits) <= 300_000


def test_backfill_windows_span_at_most_max_partitions_per_commit(gateway, db, tmp_path):
    """Flat memory however far behind: a window keeps one Parquet writer per partition it
    touches, and the source returns a backfill's days interleaved (its sort key starts with
    the symbol). So windows are cut at `max_partitions_per_commit` day partitions."""
    create_bronze(gateway, db, "spread")
    start = now_ms() - 5 * 86_400_000 - 3_600_000
    insert_bronze(gateway, db, "spread", 60_000, start, step_ms=5 * 86_400_000 / 60_000)
    cfg = write_config(tmp_path / "c.toml", gateway, [bronze_table(db, "spread", max_partitions_per_commit=2)], tmp_path)
    out = run(cfg, "once", check=True).stdout
    got, src = assert_equal_to_source(gateway, tmp_path, db, "spread")
    assert src["count"] == 60_000, out
    commits = [s for s in got["pyiceberg"]["snapshots"] if s.get("offload.run-id")]
    partitions = [int(s["changed-partition-count"]) for s in commits]
    last = start + 59_999 * int(5 * 86_400_000 / 60_000 * 1000) // 1000  # as k2data.insert_bronze stamps rows
    days = last // 86_400_000 - start // 86_400_000 + 1  # UTC days touched (6, or 5)
    assert max(partitions) <= 2 and sum(partitions) == days and len(commits) == (days + 1) // 2, (days, partitions)


def test_deleting_the_state_db_resumes_from_the_iceberg_watermark(gateway, db, tmp_path):
    create_bronze(gateway, db, "trades")
    insert_bronze(gateway, db, "trades", 50_000, now_ms() - 7_200_000, step_ms=50)
    cfg = write_config(tmp_path / "c.toml", gateway, [bronze_table(db, "trades", settle_delay="2s")], tmp_path)
    run(cfg, "once", check=True)
    for f in tmp_path.glob("state.db*"):
        f.unlink()
    insert_bronze(gateway, db, "trades", 30_000, now_ms() - 1_000, step_ms=0.01, seq_start=1_000_000)
    time.sleep(2.5)
    p = run(cfg, "once", check=True)
    assert "30000 rows" in p.stdout, p.stdout
    got, src = assert_equal_to_source(gateway, tmp_path, db, "trades")
    assert src["count"] == 80_000


def test_watermark_show_reports_iceberg_and_mirror(gateway, db, tmp_path):
    create_bronze(gateway, db, "trades")
    insert_bronze(gateway, db, "trades", 1_000, now_ms() - 3_600_000, step_ms=1000)
    cfg = write_config(tmp_path / "c.toml", gateway, [bronze_table(db, "trades")], tmp_path)
    run(cfg, "once", check=True)
    insert_bronze(gateway, db, "trades", 70, now_ms() - 1_000, step_ms=1, seq_start=5_000)
    p = run(cfg, "watermark", "show", "--json", check=True)
    rows = json.loads(p.stdout)
    assert rows[0]["table"] == "trades"
    assert rows[0]["iceberg_watermark"] and rows[0]["iceberg_watermark"].startswith(rows[0]["mirror_watermark"][:16].replace(" ", "T"))
    assert rows[0]["rows_behind"] == "70"
    assert rows[0]["mirror_status"] == "success"


def test_bad_config_unknown_table_and_column_fail_clearly_and_commit_nothing(gateway, db, tmp_path):
    create_bronze(gateway, db, "trades")
    insert_bronze(gateway, db, "trades", 100, now_ms() - 3_600_000)
    # Malformed TOML and an unknown key name their place.
    bad = tmp_path / "bad.toml"
    bad.write_text("[clickhouse\nurl = 1\n")
    p = run(bad, "once")
    assert p.returncode == 1 and "bad.toml" in p.stderr
    cfg = write_config(tmp_path / "c.toml", gateway, [bronze_table(db, "trades", settle_dalay="5m")], tmp_path)
    p = run(cfg, "once")
    assert p.returncode == 1 and "settle_dalay" in p.stderr, p.stderr
    # Unknown table and unknown column: the table fails, naming what is wrong; nothing committed.
    cfg = write_config(tmp_path / "c.toml", gateway, [
        bronze_table(db, "nope"),
        bronze_table(db, "trades", cursor="exchange_ts"),
    ], tmp_path)
    p = run(cfg, "once")
    assert p.returncode == 3, p.stdout + p.stderr
    assert f"{db}.nope does not exist" in p.stdout
    assert "cursor column \"exchange_ts\" does not exist" in p.stdout
    assert not (tmp_path / "warehouse" / "cold").exists() or not any((tmp_path / "warehouse" / "cold").iterdir())


def test_secrets_never_reach_output(gateway, db, tmp_path):
    create_bronze(gateway, db, "trades")
    insert_bronze(gateway, db, "trades", 100, now_ms() - 3_600_000)
    cfg = write_config(tmp_path / "c.toml", gateway, [bronze_table(db, "trades")], tmp_path)
    p = run(cfg, "once", env={"TEST_CH_PASSWORD": PASSWORD + "-wrong"})
    assert p.returncode == 3
    assert "Authentication failed" in p.stdout + p.stderr
    assert "process_error" in p.stdout
    assert PASSWORD not in p.stdout + p.stderr + cfg.read_text()


def test_validate_reports_each_dependency(gateway, db, tmp_path):
    create_bronze(gateway, db, "trades")
    cfg = write_config(tmp_path / "c.toml", gateway, [bronze_table(db, "trades")], tmp_path)
    p = run(cfg, "validate")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "clickhouse: ok, version 26." in p.stdout
    assert "catalog: ok" in p.stdout and "state store: ok" in p.stdout
    assert f"table {db}.trades: ok, 10 columns" in p.stdout


def test_late_rows_are_counted_not_hidden(gateway, db, tmp_path):
    """I9: a row arriving below the watermark after its window committed is reported."""
    create_bronze(gateway, db, "trades")
    insert_bronze(gateway, db, "trades", 1_000, now_ms() - 7_200_000, step_ms=100)
    cfg = write_config(tmp_path / "c.toml", gateway, [bronze_table(db, "trades")], tmp_path)
    run(cfg, "once", check=True)
    insert_bronze(gateway, db, "trades", 7, now_ms() - 3_600_000, step_ms=100, seq_start=500_000)
    p = run(cfg, "once", check=True)
    assert "missing_rows=7 " in p.stderr and " 7 late rows: in ClickHouse at or below the watermark" in p.stderr, p.stderr
    assert verify(tmp_path, "cold.trades", clickhouse=False)["pyiceberg"]["count"] == 1_000


def test_schema_drift_between_cycles(gateway, db, tmp_path):
    """A new source column is added to Iceberg (older rows read NULL); a changed type or a
    dropped required column stops the table with an error naming the column, committing nothing."""
    create_bronze(gateway, db, "trades")
    insert_bronze(gateway, db, "trades", 1_000, now_ms() - 7_200_000, step_ms=100)
    cfg = write_config(tmp_path / "c.toml", gateway, [bronze_table(db, "trades", settle_delay="1s")], tmp_path)
    run(cfg, "once", check=True)
    gateway.sql(f"ALTER TABLE {db}.trades ADD COLUMN venue LowCardinality(Nullable(String))")
    gateway.sql(f"INSERT INTO {db}.trades (exchange_timestamp, sequence_number, symbol, price, quantity, quote_volume, "
                f"event_time, kafka_offset, kafka_partition, venue) VALUES "
                f"(fromUnixTimestamp64Milli({now_ms() - 500}), 99, 'BTCUSDT', 1, 1, 1, now64(3), 0, 0, 'binance-spot')")
    time.sleep(1.5)
    p = run(cfg, "once", check=True)
    assert "added optional column venue" in p.stderr
    got = verify(tmp_path, "cold.trades", key="sequence_number", sums=(), rows=True, clickhouse=False)["pyiceberg"]
    assert got["schema"]["venue"] == "string?"
    venues = sorted(r["venue"] for r in got["rows"])
    assert venues == ["None"] * 1_000 + ["binance-spot"]

    gateway.sql(f"ALTER TABLE {db}.trades MODIFY COLUMN quantity Float64")
    p = run(cfg, "once")
    assert p.returncode == 3 and 'column "quantity"' in p.stdout and "double" in p.stdout, p.stdout
    gateway.sql(f"ALTER TABLE {db}.trades MODIFY COLUMN quantity Decimal(18, 8)")
    gateway.sql(f"ALTER TABLE {db}.trades DROP COLUMN kafka_offset")
    p = run(cfg, "once")
    assert p.returncode == 3 and '"kafka_offset"' in p.stdout, p.stdout
    snapshots = verify(tmp_path, "cold.trades", clickhouse=False)["pyiceberg"]["snapshots"]
    assert len([s for s in snapshots if s.get("offload.run-id")]) == 2


def test_incompatible_existing_target_is_refused(gateway, db, tmp_path):
    create_bronze(gateway, db, "trades")
    insert_bronze(gateway, db, "trades", 100, now_ms() - 7_200_000, step_ms=100)
    cfg = write_config(tmp_path / "c.toml", gateway, [bronze_table(db, "trades")], tmp_path)
    run(cfg, "once", check=True)
    cfg = write_config(tmp_path / "c.toml", gateway, [bronze_table(db, "trades", partition=["month(exchange_timestamp)"])], tmp_path)
    p = run(cfg, "once")
    assert p.returncode == 3
    assert "partitioned by [day(exchange_timestamp)] but the configuration says [month(exchange_timestamp)]" in p.stdout, p.stdout


def test_quiet_table_is_healthy_and_json_logs(gateway, db, tmp_path):
    """A table with nothing new is a successful no-op: lag stays near zero, the watermark
    timestamp keeps up; JSON logs carry the cycle markers and per-table fields."""
    import urllib.request
    from harness import free_port
    create_bronze(gateway, db, "quiet")
    insert_bronze(gateway, db, "quiet", 100, now_ms() - 3_600_000)
    port = free_port()
    cfg = write_config(tmp_path / "c.toml", gateway, [bronze_table(db, "quiet")], tmp_path)
    cfg.write_text(cfg.read_text().replace('interval = "15m"', 'interval = "1s"')
                   .replace('metrics_listen = "127.0.0.1:0"', f'metrics_listen = "127.0.0.1:{port}"'))
    log = tmp_path / "offload.log"
    env = dict(os.environ, TEST_CH_PASSWORD=PASSWORD)
    proc = subprocess.Popen([binary(), "--config", str(cfg), "--log-format", "json", "--log-file", str(log), "run"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(6)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    finally:
        proc.terminate()
        proc.wait(20)
    values = {l.split(" ")[0]: float(l.split(" ")[1]) for l in text.splitlines() if l and not l.startswith("#")}
    assert values['offload_runs_total{outcome="noop",table="quiet"}'] >= 3
    assert values['offload_lag_seconds{table="quiet"}'] < 3
    assert time.time() - values['watermark_timestamp_seconds{table="quiet"}'] < 3
    lines = [json.loads(l) for l in log.read_text().splitlines()]
    assert any("CYCLE STARTED" in l["fields"]["message"] for l in lines)
    done = [l["fields"] for l in lines if "✓ Offloaded" in l["fields"]["message"]]
    assert done and {"rows", "duration_seconds", "rows_per_second", "table"} <= set(done[0])
