"""Eviction of hot partitions (issue 24, I13): a ClickHouse partition is dropped only once Iceberg
provably holds every row of it, and the view keeps returning those rows, from Iceberg.
ClickHouse reads the view and the source; pyiceberg reads the cold side."""
import re
import signal
import subprocess
import time

from harness import PASSWORD, binary, bronze_table, create_bronze, insert_bronze, now_ms, run, verify, view_home, write_config

DAY_MS = 86_400_000


def partitions(gw, db, t):
    return gw.sql(f"SELECT DISTINCT partition_id FROM system.parts WHERE database = '{db}' AND table = '{t}' "
                  "AND active ORDER BY partition_id").split()


def view_stats(gw, table, bound_ms):
    return gw.sql(f"SELECT count(), toString(sum(price)), uniqExact((symbol, sequence_number)) FROM {table} "
                  f"WHERE exchange_timestamp <= fromUnixTimestamp64Milli({bound_ms})").strip()


def setup(gateway, db, tmp_path, tables, **over):
    midnight = now_ms() // DAY_MS * DAY_MS
    for t in tables:
        create_bronze(gateway, db, t)
        # One trade a minute over the five whole days before today, and some of today.
        insert_bronze(gateway, db, t, 5 * 1440 + 60, midnight - 5 * DAY_MS, step_ms=60_000)
    home = view_home(gateway, tmp_path)
    cfg = write_config(tmp_path / "c.toml", gateway,
                       [bronze_table(db, t, view=f"{db}.{t}_all", evict_after="2d", **over) for t in tables], home)
    return cfg, home, midnight


def day_id(ms):
    return time.strftime("%Y%m%d", time.gmtime(ms / 1000))


def test_eviction_drops_only_what_iceberg_provably_holds_and_the_view_still_returns_it(gateway, db, tmp_path):
    cfg, home, midnight = setup(gateway, db, tmp_path, ["trades"])
    run(cfg, "once", check=True)
    old = [day_id(midnight - k * DAY_MS) for k in (5, 4, 3)]  # newest row older than 2 days
    recent = [day_id(midnight - k * DAY_MS) for k in (2, 1, 0)]
    assert partitions(gateway, db, "trades") == old + recent
    # A late row into day -3, below W after its window committed: the audit of that day is not ok.
    gateway.sql(f"INSERT INTO {db}.trades (exchange_timestamp, sequence_number, symbol, price, quantity, quote_volume, "
                f"event_time, kafka_offset, kafka_partition) SELECT fromUnixTimestamp64Milli({midnight - 3 * DAY_MS + 1234}), "
                "999999999, 'LATE', 1, 1, 1, now64(3), 0, 0")
    bound = midnight
    before = view_stats(gateway, f"{db}.trades_all", bound)
    # The view serves every row but the late one (I9: below W, never offloaded; the audit counts it).
    assert before == view_stats(gateway, f"(SELECT * FROM {db}.trades WHERE symbol != 'LATE')", bound)

    dry = run(cfg, "evict", "--dry-run", check=True).stdout
    print(dry)
    for d in old[:2]:
        assert re.search(rf"partition {d} \(1440 rows, newest [^)]*\): would go: Iceberg holds 1440 rows of", dry), d
    assert re.search(rf"partition {old[2]} \(1441 rows.*stays: Iceberg does not hold the same rows over its cursor "
                     rf"range: 1441 rows in ClickHouse, 1440 in Iceberg", dry), dry
    for d in recent:
        assert re.search(rf"partition {d} .*stays: not due", dry), d
    assert "dry run: nothing dropped" in dry
    assert partitions(gateway, db, "trades") == old + recent, "a dry run dropped something"

    out = run(cfg, "evict", check=True).stdout
    print(out)
    assert len(re.findall(r"evicted: 1 part dropped; Iceberg holds 1440 rows", out)) == 2, out
    assert partitions(gateway, db, "trades") == old[2:] + recent
    # The view still returns every row, the evicted ones from Iceberg; the source lost exactly them.
    assert view_stats(gateway, f"{db}.trades_all", bound) == before
    hot = int(gateway.scalar(f"SELECT count() FROM {db}.trades WHERE exchange_timestamp <= fromUnixTimestamp64Milli({bound})"))
    assert hot == int(before.split("\t")[0]) + 1 - 2 * 1440  # the late row is still in ClickHouse
    got = verify(home, "cold.trades", clickhouse=False)["pyiceberg"]
    assert got["count"] == 5 * 1440 + 60 and got["duplicates"] == 0, got["count"]  # every row but the late one
    # `status` shows what stands between a stalled offload and a loss: the TTL, the oldest hot row.
    status = run(cfg, "status").stdout
    oldest = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime((midnight - 3 * DAY_MS) / 1000))
    assert re.search(rf"hot tier: TTL 7d  oldest row {oldest}\.\d+Z  view splits at \d{{4}}-", status), status
    # Once more: nothing else is due and provable.
    again = run(cfg, "evict", check=True).stdout
    assert "evicted" not in again, again


def test_eviction_refuses_a_partition_key_that_is_not_a_day_of_the_cursor(gateway, db, tmp_path):
    gateway.sql(f"CREATE TABLE {db}.by_symbol (exchange_timestamp DateTime64(3), sequence_number UInt64, symbol String, "
                "price Decimal(18, 8), quantity Decimal(18, 8), quote_volume Decimal(18, 8), event_time DateTime64(3), "
                "kafka_offset UInt64, kafka_partition UInt16, ingestion_timestamp DateTime DEFAULT now()) "
                "ENGINE = MergeTree PARTITION BY symbol ORDER BY (symbol, exchange_timestamp, sequence_number)")
    insert_bronze(gateway, db, "by_symbol", 1000, now_ms() - 5 * DAY_MS, step_ms=60_000)
    home = view_home(gateway, tmp_path)
    cfg = write_config(tmp_path / "c.toml", gateway,
                       [bronze_table(db, "by_symbol", evict_after="2d", view=f"{db}.by_symbol_all")], home)
    run(cfg, "once", check=True)
    p = run(cfg, "evict")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "by_symbol" in p.stdout and "the table's key is symbol" in p.stdout and "toYYYYMMDD(exchange_timestamp)" in p.stdout, p.stdout
    assert len(partitions(gateway, db, "by_symbol")) == 4, "nothing dropped"


def test_run_evicts_hourly_and_reports_it(gateway, db, tmp_path):
    """`run` evicts under the table's lease after the table's run: the drop is logged with its
    row counts in both tiers and counted in the metrics."""
    cfg, home, midnight = setup(gateway, db, tmp_path, ["trades"])
    log = tmp_path / "run.log"
    proc = subprocess.Popen([binary(), "--config", str(cfg), "run"], env={"TEST_CH_PASSWORD": PASSWORD, "PATH": "/usr/bin:/bin"},
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(re.findall("evicted partition", log.read_text())) < 3:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        text = log.read_text()
        evicted = re.findall(r"evicted partition (\d+) of trades: 1440 rows dropped from ClickHouse; Iceberg holds 1440 rows", text)
        assert sorted(evicted) == [day_id(midnight - k * DAY_MS) for k in (5, 4, 3)], text[-3000:]
        assert partitions(gateway, db, "trades") == [day_id(midnight - k * DAY_MS) for k in (2, 1, 0)]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def test_a_late_correction_that_keeps_the_count_blocks_the_eviction(gateway, db, tmp_path):
    """A row corrected after its window committed (deleted and inserted again with another price,
    below W): the day's count is unchanged, its content is not. Eviction compares the content
    (the sum of row hashes over every column, read by ClickHouse from both tiers) and keeps the
    partition; an equal count alone would have dropped the only copy of the correction."""
    cfg, home, midnight = setup(gateway, db, tmp_path, ["trades"])
    run(cfg, "once", check=True)
    day = midnight - 4 * DAY_MS
    gateway.sql(f"ALTER TABLE {db}.trades DELETE WHERE sequence_number = 100 SETTINGS mutations_sync = 2")
    gateway.sql(f"INSERT INTO {db}.trades (exchange_timestamp, sequence_number, symbol, price, quantity, quote_volume, "
                f"event_time, kafka_offset, kafka_partition) SELECT fromUnixTimestamp64Milli({midnight - 5 * DAY_MS + 100 * 60_000}), "
                "100, 'BTCUSDT', 1, 1, 1, now64(3), 0, 0")
    out = run(cfg, "evict", "--dry-run", check=True).stdout
    assert re.search(rf"partition {day_id(midnight - 5 * DAY_MS)} \(1440 rows.*stays: Iceberg does not hold the same rows "
                     r"over its cursor range: 1440 rows in ClickHouse, 1440 in Iceberg \(same count, different content", out), out
    assert re.search(rf"partition {day_id(day)} \(1440 rows.*would go", out), out


def test_rows_above_w_keep_their_partition(gateway, db, tmp_path):
    """An operator moves W back into day -4 (`watermark set --apply`): the rows of days -4 and -3
    are above W again, so their partitions stay, whatever the view pins; day -5 still goes."""
    cfg, home, midnight = setup(gateway, db, tmp_path, ["trades"])
    run(cfg, "once", check=True)
    noon = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime((midnight - 4 * DAY_MS + DAY_MS // 2) / 1000))
    run(cfg, "watermark", "set", "trades", "--to", noon, "--apply", check=True)
    out = run(cfg, "evict", "--dry-run", check=True).stdout
    assert re.search(rf"partition {day_id(midnight - 5 * DAY_MS)} \(1440 rows.*would go", out), out
    assert re.search(rf"partition {day_id(midnight - 4 * DAY_MS)} \(1440 rows.*stays: 719 of its 1440 rows are above W", out), out
    assert re.search(rf"partition {day_id(midnight - 3 * DAY_MS)} \(1440 rows.*stays: 1440 of its 1440 rows are above W", out), out
