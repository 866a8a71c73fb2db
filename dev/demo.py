#!/usr/bin/env python3
"""The main job on embedded defaults, end to end, on this machine.

1. starts the local ClickHouse engine (chdb behind our HTTP gateway) on 127.0.0.1:8123;
2. loads K2-style bronze trades for binance and kraken (the last few days);
3. runs `iceberg-offload once` with the embedded defaults (no config file) a few times,
   with new trades arriving between cycles;
4. prints what landed (`watermark show`) and checks it with readers we did not write:
   pyiceberg through the same catalog and ClickHouse's icebergLocal().

Everything lives under ./offload-data (removed and recreated at each run).
"""
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import k2data  # noqa: E402
from clickhouse_local import Gateway  # noqa: E402

ROOT = HERE.parent
DATA = ROOT / "offload-data"
TABLES = ["bronze_trades_binance", "bronze_trades_kraken"]
ROWS = int(os.environ.get("DEMO_ROWS", "1500000"))


def main():
    binary = Path(os.environ["CARGO_TARGET_DIR"]) / "debug" / "iceberg-offload"
    if DATA.exists():
        shutil.rmtree(DATA)
    DATA.mkdir()
    password = os.environ.get("CLICKHOUSE_PASSWORD") or secrets.token_urlsafe(12)
    env = dict(os.environ, CLICKHOUSE_PASSWORD=password)
    print("== starting the local ClickHouse engine (chdb) on 127.0.0.1:8123", flush=True)
    try:
        gw = Gateway(DATA / "clickhouse" / "data", password=password, port=8123)
    except RuntimeError as e:
        sys.exit(f"demo: {e} (is something else listening on 127.0.0.1:8123?)")
    try:
        now = int(time.time() * 1000)
        print(f"== loading {ROWS:,} K2 bronze trades per table into k2.{{{','.join(TABLES)}}}", flush=True)
        for t in TABLES:
            k2data.create_bronze(gw.sql, "k2", t)
            # Three days of history up to now: the last 5 minutes are still settling.
            k2data.insert_bronze(gw.sql, "k2", t, ROWS, now - 3 * 86_400_000, step_ms=3 * 86_400_000 / ROWS)

        def cycle(n):
            print(f"\n== cycle {n}: iceberg-offload once (embedded defaults)", flush=True)
            p = subprocess.run([str(binary), "once"], cwd=ROOT, env=env, text=True, capture_output=True)
            sys.stdout.write(p.stdout)
            for line in p.stderr.splitlines():
                if any(k in line for k in ("CYCLE", "Offloaded", "committed window", "failed", "WARN", "ERROR")):
                    print("   " + line.split("  ", 1)[-1].strip())
            if p.returncode != 0:
                sys.exit(f"demo: cycle {n} exited with {p.returncode}:\n{p.stderr}")

        cycle(1)
        time.sleep(3)
        seq = 10_000_000
        for t in TABLES:
            wm = watermark_ns(binary, env, t)
            # New trades that settled since cycle 1 (between its watermark and now − 5 min).
            start = wm // 1_000_000 + 1
            end = int(time.time() * 1000) - 5 * 60_000 - 500
            if end > start:
                k2data.insert_bronze(gw.sql, "k2", t, 20_000, start, step_ms=(end - start) / 20_000, seq_start=seq)
        cycle(2)
        cycle(3)

        print("\n== iceberg-offload watermark show", flush=True)
        subprocess.run([str(binary), "watermark", "show"], cwd=ROOT, env=env, check=True)

        print("\n== independent check: pyiceberg and ClickHouse icebergLocal() against the source", flush=True)
        ok = True
        for t in TABLES:
            out = json.loads(subprocess.run(
                [sys.executable, str(HERE / "verify_iceberg.py"),
                 "--catalog-uri", f"sqlite:///{DATA / 'catalog.db'}", "--warehouse", f"file://{DATA / 'warehouse'}",
                 "--table", f"cold.{t}", "--key", "symbol,sequence_number", "--sum", "price", "--sum", "quantity"],
                check=True, capture_output=True, text=True).stdout)
            src = k2data.source_stats(gw.scalar, "k2", t, out["pyiceberg"]["properties"]["offload.watermark.position"])
            total = int(gw.scalar(f"SELECT count() FROM k2.{t}"))
            for reader in ("pyiceberg", "clickhouse"):
                r = out[reader]
                match = (r["count"] == src["count"] and r["distinct_keys"] == src["distinct_keys"]
                         and all(float(r["sums"][c]) == float(v) for c, v in src["sums"].items()))
                ok &= match
                print(f"   cold.{t} via {reader:10}: {r['count']:>9,} rows, {r['distinct_keys']:>9,} distinct keys, "
                      f"sum(price)={float(r['sums']['price']):,.2f}  {'MATCHES' if match else 'DIFFERS FROM'} source up to the watermark")
            dup = out["pyiceberg"]["duplicates"]
            ok &= dup == 0
            print(f"   source k2.{t}: {total:,} rows, {src['count']:,} settled and offloaded, "
                  f"{total - src['count']:,} still inside the 5-minute settle delay; duplicates in Iceberg: {dup}")
        print("\n" + ("OK: every settled row landed exactly once." if ok else "MISMATCH: see above."))
        sys.exit(0 if ok else 1)
    finally:
        gw.stop()


def watermark_ns(binary, env, table):
    out = subprocess.run([str(binary), "watermark", "show", "--json"], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True).stdout
    row = next(r for r in json.loads(out) if r["table"] == table)
    from datetime import datetime
    text = row["iceberg_watermark"].split(" ")[0].replace("Z", "")
    head, _, frac = text.partition(".")
    dt = datetime.fromisoformat(head + "+00:00")
    return int(dt.timestamp()) * 1_000_000_000 + int((frac or "0").ljust(9, "0")[:9])


if __name__ == "__main__":
    main()
