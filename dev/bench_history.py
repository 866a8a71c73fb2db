#!/usr/bin/env python3
"""A table's age against its cost: one table gains one-window commits (one row each, in
batches of `--batch` per `once`, as a day of 15-minute cycles would), with or without
`iceberg-offload maintain` (compaction, then expiry) after each batch. Each batch is one day
of event time: rows of day k arrive now (an arrival cursor) into the day partition of their
event time, so the day before is closed and compaction has what a year of production gives it.
At each checkpoint it prints the mean time of a window's commit over the last batch (from the
service's log), a quiet cycle's wall time (a `once` with nothing new: process start, watermark
from Iceberg, planning), the size of the current metadata.json, the snapshots, the manifests
and data files of the current snapshot, and a reader's scan of one closed day partition
(pyiceberg, planning and reading).

Usage (after `source dev/env.sh`; release build):
    python dev/bench_history.py --commits 3000 --checkpoints 100,1000,3000
    python dev/bench_history.py --commits 3000 --checkpoints 100,1000,3000 --maintain --keep 480
`--keep N`: snapshots kept by maintenance (min_snapshots_to_keep; max_snapshot_age is 1s, so
N plays the role of 5 days at 15 minutes = 480).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench import PASSWORD, write_offload_config  # noqa: E402
from clickhouse_local import Gateway  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--commits", type=int, default=3000)
    ap.add_argument("--checkpoints", default="100,1000,3000")
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--maintain", action="store_true")
    ap.add_argument("--keep", type=int, default=480)
    ap.add_argument("--binary", default=str(Path(os.environ["CARGO_TARGET_DIR"]) / "release" / "iceberg-offload"))
    a = ap.parse_args(argv)
    checkpoints = sorted(int(x) for x in a.checkpoints.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="iceberg-offload-bench-history-"))
    gw = Gateway(tmp / "clickhouse" / "data")
    env = dict(os.environ, BENCH_CH_PASSWORD=PASSWORD)
    try:
        gw.sql("CREATE DATABASE IF NOT EXISTS bench")
        gw.sql("""CREATE TABLE bench.t (ts DateTime64(3), seq UInt64, symbol String, price Decimal(18, 8),
                  arrived DateTime64(3) DEFAULT now64(3)) ENGINE = MergeTree ORDER BY (arrived, seq)""")
        cfg = write_offload_config(tmp / "c.toml", gw.url, tmp / "d", [{
            "source": "bench.t", "target": "bench.t", "cursor": "arrived", "tiebreak": "seq",
            "settle_delay": "0s", "max_rows_per_commit": 1, "partition": ["day(ts)"]}])
        # The audit is left out (its cost is measured at the end, on its own): this measures
        # what the table's age does to the offload itself.
        text = cfg.read_text().replace("[service]\n", "[service]\naudit_recent_days = 0\naudit_full_every = \"0s\"\n", 1)
        cfg.write_text(text + f'\n[maintenance]\nmax_snapshot_age = "1s"\nmin_snapshots_to_keep = {a.keep}\n'
                       'compact_after = "1s"\n')
        first_day = int(time.time() * 1000) // DAY_MS * DAY_MS - (a.commits // a.batch + 2) * DAY_MS
        done, lines = 0, []
        header = ("| commits | maintenance | commit s (mean of last batch) | quiet cycle s | metadata.json KB | snapshots "
                  "| manifests | data files | scan of a closed day s |")
        print(header, flush=True)
        while done < a.commits:
            n = min(a.batch, a.commits - done)
            # Rows of the last moment, after W (a cycle moves W up to its settle limit: its start).
            day = done // a.batch
            time.sleep(0.5)
            gw.sql(f"""INSERT INTO bench.t (ts, seq, symbol, price, arrived)
                SELECT fromUnixTimestamp64Milli(toInt64({first_day + day * DAY_MS} + number * 900000)), {done} + number,
                       ['BTC', 'ETH'][number % 2 + 1], toDecimal64(100 + number % 7, 8),
                       now64(3) - INTERVAL 200 MILLISECOND + toIntervalMillisecond(number)
                FROM numbers({n})""")
            time.sleep(0.3)
            p = subprocess.run([a.binary, "--config", str(cfg), "once"], capture_output=True, text=True, env=env)
            if p.returncode != 0:
                sys.exit(f"once failed at {done} commits:\n{p.stdout}\n{p.stderr[-3000:]}")
            commits = [float(x) for x in re.findall(r"committed window: [^(]*\((\d+\.\d+)s\)", p.stdout + p.stderr)]
            done += n
            if a.maintain:
                m = subprocess.run([a.binary, "--config", str(cfg), "maintain"], capture_output=True, text=True, env=env)
                assert m.returncode == 0, m.stdout + m.stderr[-2000:]
            if checkpoints and done >= checkpoints[0]:
                checkpoints.pop(0)
                t0 = time.time()
                q = subprocess.run([a.binary, "--config", str(cfg), "once"], capture_output=True, text=True, env=env)
                quiet = time.time() - t0
                assert q.returncode == 0, q.stderr[-2000:]
                meta = max((tmp / "d" / "warehouse").rglob("*.metadata.json"), key=lambda f: f.stat().st_mtime)
                snaps = len(json.loads(meta.read_text()).get("snapshots", []))
                r = reader(tmp / "d", first_day + max(day - 1, 0) * DAY_MS)
                line = (f"| {done:,} | {'yes' if a.maintain else 'no'} | {sum(commits) / max(len(commits), 1):.3f} | "
                        f"{quiet:.2f} | {meta.stat().st_size / 1024:,.0f} | {snaps:,} | {r['manifests']:,} | "
                        f"{r['files']:,} | {r['scan']:.2f} |")
                lines.append(line)
                print(line, flush=True)
        print("\n" + header + "\n|---:|---|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(lines))
        t0 = time.time()
        au = subprocess.run([a.binary, "--config", str(cfg), "audit"], capture_output=True, text=True, env=env)
        print(f"\nfull audit in a fresh process after {done:,} commits: {time.time() - t0:.2f} s (exit {au.returncode})")
    finally:
        gw.stop()


DAY_MS = 86_400_000

READER = """
import json, sys, time
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.expressions import And, GreaterThanOrEqual, LessThan
d, day_ms = sys.argv[1], int(sys.argv[2])
t0 = time.time()
t = SqlCatalog("offload", uri=f"sqlite:///{d}/catalog.db", warehouse=f"file://{d}/warehouse").load_table("bench.t")
snap = t.current_snapshot()
manifests = snap.manifests(t.io)
files = int(snap.summary.additional_properties.get("total-data-files", 0))
t1 = time.time()
iso = lambda ms: time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(ms / 1000))
rows = t.scan(row_filter=And(GreaterThanOrEqual("ts", iso(day_ms)), LessThan("ts", iso(day_ms + 86400000)))).to_arrow()
print(json.dumps({"manifests": len(manifests), "files": files, "scan": time.time() - t1, "rows": rows.num_rows}))
"""


def reader(data_dir, day_ms):
    """pyiceberg's view: manifests and data files of the current snapshot, and the time to plan
    and read one closed day partition."""
    p = subprocess.run([sys.executable, "-c", READER, str(data_dir), str(day_ms)], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(p.stderr[-2000:])
    return json.loads(p.stdout)


if __name__ == "__main__":
    main()
