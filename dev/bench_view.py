#!/usr/bin/env python3
"""What the hot+cold view costs (issue 24, I13): the K2 bronze table over several days in
ClickHouse (chdb behind dev/clickhouse_gateway.py), offloaded with a view, then

- one cold day through the view, against the same query on the Iceberg table directly
  (`icebergLocal`, its current snapshot);
- the last hour through the view, against the same query on the source directly.

Each query runs `--runs` times; the median wall time over HTTP is printed with the rows and
bytes ClickHouse read (the JSON format's statistics): a view that prunes reads one day's rows
from Iceberg and nothing more, and for the last hour nothing from Iceberg at all.

    python dev/bench_view.py [--days 6] [--rows-per-day 500000] [--runs 15] [--evict]

`--evict` drops the hot partitions older than two days first (`evict_after = "2d"`), as a
deployment with eviction would have them."""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import k2data  # noqa: E402
from clickhouse_local import PASSWORD, Gateway  # noqa: E402

DAY_MS = 86_400_000
QUERY = ("SELECT count(), toString(sum(quantity)), uniqExact(symbol), toString(max(price)) FROM {src} "
         "WHERE exchange_timestamp >= {lo} AND exchange_timestamp < {hi}")


def timed(gw, sql):
    """(seconds, rows read, bytes read, the answer) of one query over HTTP (the gateway's
    statistics may be 0; the ProfileEvents are the engine's)."""
    req = urllib.request.Request(gw.url + "/", data=(sql + " FORMAT JSONCompact").encode(),
                                 headers={"X-ClickHouse-User": "default", "X-ClickHouse-Key": PASSWORD})
    started = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        body = json.loads(r.read())
    took = time.perf_counter() - started
    stats = body.get("statistics", {})
    return took, stats.get("rows_read"), stats.get("bytes_read"), body["data"]


EVENTS = ("SELECT name, value FROM system.events WHERE name IN ('SelectedRows', 'SelectedBytes') "
          "OR name ILIKE '%Iceberg%' OR name ILIKE '%ParquetRead%' OR name ILIKE '%FileLike%' OR name ILIKE '%ObjectStorage%Read%'")


def events(gw):
    return {name: int(value) for name, value in (line.split("\t") for line in gw.sql(EVENTS).splitlines() if line)}


def measure(gw, sql, runs):
    """(median s, the ProfileEvents one run adds, the answer): the engine's own counters, diffed
    around one run (the gateway runs one query at a time)."""
    timed(gw, sql)  # warm: metadata and file caches, as a dashboard's second query finds them
    before = events(gw)
    answer = timed(gw, sql)[3]
    after = events(gw)
    counted = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    results = [timed(gw, sql)[0] for _ in range(runs)]
    return statistics.median(results), counted, answer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--days", type=int, default=6)
    ap.add_argument("--rows-per-day", type=int, default=500_000)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--evict", action="store_true")
    ap.add_argument("--binary", default=str(Path(os.environ["CARGO_TARGET_DIR"]) / "debug" / "iceberg-offload"))
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="iceberg-offload-bench-view-"))
    gw = Gateway(tmp / "clickhouse" / "data")
    try:
        now = int(time.time() * 1000)
        midnight = now // DAY_MS * DAY_MS
        k2data.create_bronze(gw.sql, "k2", "bronze_trades_binance")
        step = DAY_MS / a.rows_per_day
        k2data.insert_bronze(gw.sql, "k2", "bronze_trades_binance", a.days * a.rows_per_day + int((now - midnight - 600_000) / step),
                             midnight - a.days * DAY_MS, step_ms=step)
        home = gw.user_files / "bench"
        home.mkdir()
        cfg = tmp / "bench.toml"
        cfg.write_text(f"""[clickhouse]
url = "{gw.url}"
password_env = "BENCH_CH_PASSWORD"
[catalog]
uri = "sqlite:{home / 'catalog.db'}"
warehouse = "{home / 'warehouse'}"
[state]
url = "sqlite:{home / 'state.db'}"
[[tables]]
source = "k2.bronze_trades_binance"
target = "cold.bronze_trades_binance"
cursor = "exchange_timestamp"
tiebreak = "sequence_number"
partition = ["day(exchange_timestamp)"]
max_rows_per_commit = 2000000
view = "k2.trades_binance_all"
evict_after = "2d"
""")
        env = dict(os.environ, BENCH_CH_PASSWORD=PASSWORD)
        started = time.time()
        out = subprocess.run([a.binary, "--config", str(cfg), "once"], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        print(f"offloaded {gw.scalar('SELECT count() FROM k2.bronze_trades_binance').strip()} rows in {time.time() - started:.1f} s")
        if a.evict:
            ev = subprocess.run([a.binary, "--config", str(cfg), "evict"], env=env, capture_output=True, text=True)
            print(ev.stdout.strip())
        location = home / "warehouse" / "cold" / "bronze_trades_binance"
        day = midnight - 3 * DAY_MS
        ts = lambda ms: f"fromUnixTimestamp64Milli({ms})"  # noqa: E731
        cases = [
            ("one cold day", QUERY.format(src="k2.trades_binance_all", lo=ts(day), hi=ts(day + DAY_MS)),
             "Iceberg directly (icebergLocal)", QUERY.format(src=f"icebergLocal('{location}')", lo=ts(day), hi=ts(day + DAY_MS))),
            ("the last hour", QUERY.format(src="k2.trades_binance_all", lo=ts(now - 3_600_000), hi=ts(now + 60_000)),
             "the source directly", QUERY.format(src="k2.bronze_trades_binance", lo=ts(now - 3_600_000), hi=ts(now + 60_000))),
        ]
        print("\n| query | through the view: median s | directly: median s | view / direct |")
        print("|---|---:|---:|---:|")
        counters = []
        for name, view_sql, direct_name, direct_sql in cases:
            v = measure(gw, view_sql, a.runs)
            d = measure(gw, direct_sql, a.runs)
            assert v[2] == d[2], f"{name}: the view answered {v[2]}, {direct_name} {d[2]}"
            print(f"| {name} (against {direct_name}) | {v[0]:.3f} | {d[0]:.3f} | {v[0] / d[0]:.2f}× |", flush=True)
            counters.append((name, v[1], d[1]))
        print("\nProfileEvents of one run (view / direct):")
        for name, v, d in counters:
            for k in sorted(set(v) | set(d)):
                print(f"  {name}: {k}: {v.get(k, 0):,} / {d.get(k, 0):,}")
        plan = gw.sql(f"EXPLAIN indexes = 1 {cases[0][1]}")
        print("\nEXPLAIN indexes = 1 of the cold day through the view (excerpt):")
        print("\n".join(line for line in plan.splitlines() if any(k in line for k in ("Iceberg", "Partition", "Parts", "Granules", "Files", "ReadFrom", "Union")))[:3000])
    finally:
        gw.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
