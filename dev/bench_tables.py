#!/usr/bin/env python3
"""How a cycle's cost grows with the number of tables: K tables of R rows each, one cycle
that offloads them, then one cycle with nothing new (the steady-state cost of a quiet table).

Usage: dev/bench.sh --tables 1,10,50   (or python dev/bench_tables.py --tables 1,10,50 --rows 10000)
"""
import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import k2data  # noqa: E402
from bench import measure_once, scaling_table, write_offload_config  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tables", default="1,10,50")
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--binary", default=str(Path(os.environ["CARGO_TARGET_DIR"]) / "release" / "iceberg-offload"))
    a = ap.parse_args(argv)

    def one_case(gw, tmp, k):
        db = f"scale{k}"
        tables = []
        for i in range(k):
            k2data.create_bronze(gw.sql, db, f"t{i}")
            k2data.insert_bronze(gw.sql, db, f"t{i}", a.rows, int(time.time() * 1000) - 3_600_000, step_ms=100)
            tables.append({"source": f"{db}.t{i}", "target": f"{db}.t{i}", "cursor": "exchange_timestamp",
                           "tiebreak": "sequence_number", "partition": ["day(exchange_timestamp)"]})
        cfg = write_offload_config(tmp / f"{db}.toml", gw.url, tmp / db, tables, service="parallelism = 4")
        first = measure_once(a.binary, cfg, gw)
        quiet = measure_once(a.binary, cfg, gw)
        return (f"| {k} | {a.rows:,} | {first['wall']:.2f} | {k * a.rows / first['wall']:,.0f} | {quiet['wall']:.2f} | "
                f"{quiet['wall'] * 1000 / k:.0f} | {max(first['rss_mb'], quiet['rss_mb']):.0f} |")

    scaling_table("tables", "| tables | rows each | first cycle s | rows/s | quiet cycle s | quiet cost per table ms | peak RSS MB |",
                  [int(x) for x in a.tables.split(",")], one_case)


if __name__ == "__main__":
    main()
