#!/usr/bin/env python3
"""Randomised soak: a multi-table scheduler with trades arriving continuously, killed with
SIGKILL at random moments, over and over; then one clean cycle and the equality check with
readers we did not write. Prints trials, rows, duplicates found and rows missing; exits 1
if any duplicate or missing row is found.

Usage: dev/soak.sh [--trials 200] [--seed N] [--tables 2]
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import k2data  # noqa: E402
from clickhouse_local import PASSWORD, Gateway  # noqa: E402


def config(tmp, url, tables):
    blocks = "\n".join(f"""
[[tables]]
source = "soak.{t}"
target = "cold.{t}"
cursor = "exchange_timestamp"
tiebreak = "sequence_number"
settle_delay = "1s"
max_rows_per_commit = 4000
partition = ["day(exchange_timestamp)"]
""" for t in tables)
    path = tmp / "soak.toml"
    path.write_text(f"""
[service]
interval = "1s"
parallelism = {len(tables)}
table_timeout = "30s"
retries = 1
retry_backoff = "100ms"
lease_ttl = "30s"
metrics_listen = "127.0.0.1:0"

[clickhouse]
url = "{url}"
password_env = "SOAK_CH_PASSWORD"

[catalog]
uri = "sqlite:{tmp / 'catalog.db'}"
warehouse = "{tmp / 'warehouse'}"

[state]
url = "sqlite:{tmp / 'state.db'}"
{blocks}""")
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description="SIGKILL soak of the scheduler")
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--tables", type=int, default=2)
    ap.add_argument("--binary", default=str(Path(os.environ["CARGO_TARGET_DIR"]) / "debug" / "iceberg-offload"))
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="iceberg-offload-soak-"))
    tables = [f"bronze_trades_{i}" for i in range(args.tables)]
    gw = Gateway(tmp / "clickhouse" / "data")
    stop = threading.Event()
    inserted = {t: 0 for t in tables}
    try:
        for t in tables:
            k2data.create_bronze(gw.sql, "soak", t)
            k2data.insert_bronze(gw.sql, "soak", t, 20_000, int(time.time() * 1000) - 3_600_000, step_ms=100)
            inserted[t] = 20_000

        def trades_keep_coming():
            while not stop.is_set():
                for t in tables:
                    n = rng.randint(100, 3_000)
                    k2data.insert_bronze_arriving_now(gw.sql, "soak", t, n, seq_start=10_000_000 + inserted[t])
                    inserted[t] += n
                stop.wait(0.3)
        writer = threading.Thread(target=trades_keep_coming, daemon=True)
        writer.start()

        cfg = config(tmp, gw.url, tables)
        env = dict(os.environ, SOAK_CH_PASSWORD=PASSWORD)
        started = time.time()
        for trial in range(1, args.trials + 1):
            proc = subprocess.Popen([args.binary, "--config", str(cfg), "run"], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.05, 1.5))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            if trial % 25 == 0:
                print(f"soak: {trial}/{args.trials} kills, {sum(inserted.values()):,} rows inserted", flush=True)
        stop.set()
        writer.join()
        time.sleep(1.5)  # let the last rows settle
        final = subprocess.run([args.binary, "--config", str(cfg), "once"], env=env, capture_output=True, text=True)
        if final.returncode != 0:
            print(final.stdout, final.stderr[-3000:])
            return 1
        duplicates = missing = total_iceberg = total_source = 0
        for t in tables:
            out = json.loads(subprocess.run(
                [sys.executable, str(HERE / "verify_iceberg.py"), "--catalog-uri", f"sqlite:///{tmp / 'catalog.db'}",
                 "--warehouse", f"file://{tmp / 'warehouse'}", "--table", f"cold.{t}", "--key", "symbol,sequence_number",
                 "--sum", "price"], check=True, capture_output=True, text=True).stdout)
            src = k2data.source_stats(gw.scalar, "soak", t, out["pyiceberg"]["properties"]["offload.watermark.position"],
                                      sums=("price",))
            for reader in ("pyiceberg", "clickhouse"):
                r = out[reader]
                if reader == "pyiceberg":
                    duplicates += r["duplicates"]
                missing_here = src["distinct_keys"] - r["distinct_keys"]
                if r["count"] != src["count"] or missing_here or float(r["sums"]["price"]) != float(src["sums"]["price"]):
                    print(f"soak: MISMATCH {t} via {reader}: {r['count']} rows vs {src['count']} in the source")
                missing += max(missing_here, 0)
            total_iceberg += out["pyiceberg"]["count"]
            total_source += src["count"]
        elapsed = time.time() - started
        print(f"soak: seed {args.seed}, {args.trials} SIGKILL trials over {len(tables)} tables in {elapsed:.0f}s; "
              f"{total_source:,} source rows up to the watermarks, {total_iceberg:,} rows in Iceberg; "
              f"duplicates found: {duplicates}; rows missing: {missing}")
        print(f"soak: {args.trials} passed, {0 if duplicates == 0 and missing == 0 else 1} failed")
        return 0 if duplicates == 0 and missing == 0 and total_iceberg == total_source else 1
    finally:
        stop.set()
        gw.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
