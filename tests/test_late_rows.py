"""Late rows (docs/exactly-once.md I9): counted exactly per day of the cursor, within what the
source's TTL still holds, surplus rows reported as such; and captured, not lost, with an
arrival-time cursor. Set up from outside the service: a TTL that deletes rows in ClickHouse,
rows inserted below W, duplicates appended by pyiceberg. Checked with pyiceberg, ClickHouse
icebergLocal() and DuckDB."""
import json
import sqlite3
import time

import subprocess

from harness import PYTHON, run, verify, write_config

DAY_MS = 86_400_000
PER_DAY = 1000


def day_start_ms(days_ago):
    today = int(time.time() * 1000) // DAY_MS * DAY_MS
    return today - days_ago * DAY_MS


def insert_day(gateway, db, table, days_ago, n, seq_start, arrival=None):
    """n rows spread over the day `days_ago` (UTC), 1 h after its start onwards."""
    start = day_start_ms(days_ago) + 3_600_000
    ingestion = "now()" if arrival is None else arrival
    gateway.sql(f"""
        INSERT INTO {db}.{table} (ts, seq, symbol, price, ingestion_timestamp)
        SELECT fromUnixTimestamp64Milli(toInt64({start} + number * 60000)), {seq_start} + number,
               ['BTC', 'ETH'][number % 2 + 1], toDecimal64(100 + number % 7, 8), {ingestion}
        FROM numbers({n})""")


DDL = """CREATE TABLE {db}.{table} (ts DateTime64(3), seq UInt64, symbol String, price Decimal(18, 8),
         ingestion_timestamp DateTime DEFAULT now())
         ENGINE = MergeTree PARTITION BY toYYYYMMDD(ts) ORDER BY (ts, seq)"""


def audit(cfg, table):
    p = run(cfg, "audit", table, "--json")
    assert p.returncode in (0, 1) and p.stdout.strip(), p.stdout + p.stderr[-3000:]
    return p.returncode, {r["day"]: r for r in json.loads(p.stdout)}


def day_name(days_ago):
    return time.strftime("%Y-%m-%d", time.gmtime(day_start_ms(days_ago) / 1000))


def test_late_rows_after_the_ttl_removed_older_rows_are_counted_exactly_per_day(gateway, db, tmp_path):
    gateway.sql(DDL.format(db=db, table="trades"))
    for i, days_ago in enumerate(range(10, 0, -1)):
        insert_day(gateway, db, "trades", days_ago, PER_DAY, i * PER_DAY)
    t = {"source": f"{db}.trades", "target": "cold.trades", "layer": "bronze", "cursor": "ts", "tiebreak": "seq",
         "settle_delay": "5m", "partition": ["day(ts)"]}
    cfg = write_config(tmp_path / "c.toml", gateway, [t], tmp_path)
    run(cfg, "once", check=True)
    # The TTL arrives and deletes the oldest days in the source (7 days kept).
    gateway.sql(f"ALTER TABLE {db}.trades MODIFY TTL toDateTime(ts) + INTERVAL 7 DAY")
    gateway.sql(f"OPTIMIZE TABLE {db}.trades FINAL")
    assert int(gateway.scalar(f"SELECT count() FROM {db}.trades")) < 10 * PER_DAY, "the TTL removed rows"
    # 100 late rows three days ago (below W), and 5 duplicates of two days ago in Iceberg.
    insert_day(gateway, db, "trades", 3, 100, 1_000_000)
    dup = f"""
import pyiceberg.catalog.sql as s, pyarrow.compute as pc
c = s.SqlCatalog("offload", uri="sqlite:///{tmp_path / 'catalog.db'}", warehouse="file://{tmp_path / 'warehouse'}")
t = c.load_table("cold.trades")
rows = t.scan(row_filter="seq >= {8 * PER_DAY} and seq < {8 * PER_DAY + 5}").to_arrow()
assert rows.num_rows == 5, rows.num_rows
t.append(rows)
"""
    subprocess.run([PYTHON, "-c", dup], check=True, capture_output=True, text=True)

    code, days = audit(cfg, "trades")
    assert code == 1, "a missing or extra day fails the audit"
    # Days the TTL may have touched (7 days back), and one day of margin, are not audited.
    assert min(days) == day_name(5), sorted(days)
    assert days[day_name(3)] == {"table": "trades", "day": day_name(3), "source_rows": PER_DAY + 100,
                                 "iceberg_rows": PER_DAY, "status": "missing"}
    assert days[day_name(2)]["status"] == "extra" and days[day_name(2)]["iceberg_rows"] == PER_DAY + 5
    for d in (5, 4, 1):
        assert days[day_name(d)]["status"] == "ok" and days[day_name(d)]["source_rows"] == PER_DAY, days[day_name(d)]
    # The old net count said 0 here: 100 late rows minus the rows the TTL deleted. A later
    # `once` audits the recent days only (the full audit ran at the first, recorded in the state
    # store); its totals are every retained day's latest verdict.
    p = run(cfg, "once", check=True)
    log = p.stdout + p.stderr
    assert "missing_rows=100" in log and "extra_rows=5" in log, log[-3000:]
    assert 'scope="recent"' in log and 'scope="full"' not in log, log[-3000:]
    with sqlite3.connect(tmp_path / "state.db") as s:
        stored = {d: (src, ice, st) for d, src, ice, st in
                  s.execute("SELECT day, source_rows, iceberg_rows, status FROM offload_audit WHERE table_name = 'trades'")}
    assert stored[day_name(3)] == (PER_DAY + 100, PER_DAY, "missing")
    assert stored[day_name(2)] == (PER_DAY, PER_DAY + 5, "extra")
    # An independent reader agrees with the audit's Iceberg side.
    got = verify(tmp_path, "cold.trades", key="symbol,seq", sums=("price",))
    assert got["pyiceberg"]["count"] == 10 * PER_DAY + 5
    # The daemon exports the same verdicts (and maintains the table after its offload).
    metrics = scrape_run(cfg, tmp_path, 'offload_maintenance_runs_total{result="success",table="trades"}')
    assert metrics['offload_late_rows{table="trades"}'] == 100
    assert metrics['offload_audit_extra_rows{table="trades"}'] == 5
    assert [metrics[f'offload_audit_days{{status="{s}",table="trades"}}'] for s in ("ok", "missing", "extra")] == [3, 1, 1]
    assert metrics['offload_audit_last_timestamp_seconds{scope="recent",table="trades"}'] > time.time() - 60


def scrape_run(cfg, tmp_path, wait_for):
    """Starts `run` (1 s cycles) and returns its metrics once `wait_for` is exported."""
    import os
    import urllib.request
    from harness import PASSWORD, binary, free_port
    port = free_port()
    cfg.write_text(cfg.read_text().replace('interval = "15m"', 'interval = "1s"')
                   .replace('metrics_listen = "127.0.0.1:0"', f'metrics_listen = "127.0.0.1:{port}"'))
    proc = subprocess.Popen([binary(), "--config", str(cfg), "run"], env=dict(os.environ, TEST_CH_PASSWORD=PASSWORD),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            time.sleep(0.5)
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
            except OSError:
                continue
            values = {l.rsplit(" ", 1)[0]: float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l and not l.startswith("#")}
            if values.get(wait_for, 0) >= 1:
                return values
        raise AssertionError(f"{wait_for} never exported")
    finally:
        proc.terminate()
        proc.wait(20)


def test_with_an_arrival_cursor_late_rows_land_once_in_their_event_time_partition(gateway, db, tmp_path):
    gateway.sql(DDL.format(db=db, table="arrivals"))
    for i, days_ago in enumerate((3, 2, 1)):
        insert_day(gateway, db, "arrivals", days_ago, PER_DAY, i * PER_DAY, arrival="now() - 60")
    t = {"source": f"{db}.arrivals", "target": "cold.arrivals", "layer": "bronze", "cursor": "ingestion_timestamp",
         "tiebreak": "seq", "settle_delay": "1s", "partition": ["day(ts)"]}
    cfg = write_config(tmp_path / "c.toml", gateway, [t], tmp_path)
    run(cfg, "once", check=True)
    # Trades of three days ago arrive now: late by event time, new by arrival.
    # ClickHouse stamps them at insert (the column's DEFAULT now()), after W by construction.
    insert_day(gateway, db, "arrivals", 3, 50, 10_000)
    time.sleep(2.5)  # settle_delay 1s of a DateTime cursor: the second must have passed too
    p = run(cfg, "once", check=True)
    assert "50 rows" in p.stdout + p.stderr, (p.stdout + p.stderr)[-2000:]
    got = verify(tmp_path, "cold.arrivals", key="symbol,seq", sums=("price",))
    total = gateway.scalar(f"SELECT toString(sum(price)) FROM {db}.arrivals").strip()
    for reader in ("pyiceberg", "clickhouse", "duckdb"):
        r = got[reader]
        assert r["count"] == 3 * PER_DAY + 50 and r["distinct_keys"] == 3 * PER_DAY + 50, (reader, r)
        assert float(r["sums"]["price"]) == float(total), (reader, r["sums"], total)
    # The late rows sit in their own day's partition, in one new file (written clustered).
    q = f"""
import pyiceberg.catalog.sql as s
c = s.SqlCatalog("offload", uri="sqlite:///{tmp_path / 'catalog.db'}", warehouse="file://{tmp_path / 'warehouse'}")
t = c.load_table("cold.arrivals")
late = t.scan(row_filter="seq >= 10000").to_arrow()
days = {{v.date() for v in late.column("ts").to_pylist()}}
new_files = [f for f in t.inspect.entries().to_pylist() if f["snapshot_id"] == t.current_snapshot().snapshot_id]
print(late.num_rows, len(days), len(new_files))
"""
    out = subprocess.run([PYTHON, "-c", q], check=True, capture_output=True, text=True).stdout.split()
    assert out == ["50", "1", "1"], "50 late rows, all of one event day, in one new data file"
    # Their partition holds them: the day's count in Iceberg equals the source's.
    in_day = gateway.scalar(f"SELECT count() FROM {db}.arrivals WHERE toDate(ts, 'UTC') = '{day_name(3)}'").strip()
    assert in_day == str(PER_DAY + 50)
    code, days = audit(cfg, "arrivals")
    assert code == 0 and all(d["status"] == "ok" for d in days.values()), days


def test_rows_skipped_on_purpose_by_watermark_set_are_not_reported_missing(gateway, db, tmp_path):
    gateway.sql(DDL.format(db=db, table="skipped"))
    insert_day(gateway, db, "skipped", 3, PER_DAY, 0)
    insert_day(gateway, db, "skipped", 1, PER_DAY, 100_000)
    t = {"source": f"{db}.skipped", "target": "cold.skipped", "layer": "bronze", "cursor": "ts", "tiebreak": "seq",
         "settle_delay": "48h", "partition": ["day(ts)"]}
    cfg = write_config(tmp_path / "c.toml", gateway, [t], tmp_path)
    run(cfg, "once", check=True)  # W = now - 48h: before yesterday, whatever the hour
    # The operator skips yesterday up to 10:00 (e.g. replayed elsewhere); the rest is offloaded.
    cfg.write_text(cfg.read_text().replace('"48h"', '"5m"'))
    ten = time.strftime("%Y-%m-%dT10:00:00Z", time.gmtime(day_start_ms(1) / 1000))
    run(cfg, "watermark", "set", "skipped", "--to", ten, "--apply", check=True)
    run(cfg, "once", check=True)
    skipped = int(gateway.scalar(f"SELECT count() FROM {db}.skipped WHERE ts <= '{ten[:10]} 10:00:00' "
                                 f"AND ts >= '{ten[:10]} 00:00:00'").strip())
    assert 0 < skipped < PER_DAY
    got = verify(tmp_path, "cold.skipped", key="symbol,seq", sums=("price",))
    assert got["pyiceberg"]["count"] == 2 * PER_DAY - skipped
    # The skipped range is kept in the table's properties (snapshots expire).
    props = f"""
import pyiceberg.catalog.sql as s
c = s.SqlCatalog("offload", uri="sqlite:///{tmp_path / 'catalog.db'}", warehouse="file://{tmp_path / 'warehouse'}")
print(c.load_table("cold.skipped").metadata.properties.get("offload.watermark-moves"))
"""
    moves = json.loads(subprocess.run([PYTHON, "-c", props], check=True, capture_output=True, text=True).stdout)
    assert len(moves) == 1 and moves[0]["hi"]["cursor_ns"] // 10**9 == day_start_ms(1) // 1000 + 36_000, moves
    code, days = audit(cfg, "skipped")
    assert code == 0, days
    assert days[day_name(1)] == {"table": "skipped", "day": day_name(1), "source_rows": PER_DAY - skipped,
                                 "iceberg_rows": PER_DAY - skipped, "status": "ok"}
