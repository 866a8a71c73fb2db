#!/usr/bin/env python3
"""How cost grows with the number of columns: 1M rows of a table with C columns (a mix of
Int64, Float64, Decimal(18,8), String and DateTime64(3), in that rotation), one window.

Usage (after `source dev/env.sh`): python dev/bench_columns.py --columns 5,10,20,40 --rows 1000000
"""
import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench import dir_bytes, measure_once, scaling_table, write_offload_config  # noqa: E402

KINDS = [
    ("Int64", "toInt64(number * 7919 % 1000003)"),
    ("Float64", "number / 7.0"),
    ("Decimal(18, 8)", "toDecimal64(number % 100003 / 13, 8)"),
    ("String", "concat('sym-', toString(number % 997))"),
    ("DateTime64(3)", "fromUnixTimestamp64Milli(toInt64({start} + number * 10))"),
]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--columns", default="5,10,20,40")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--partition", default="day(ts)", help="partition transform, or '' for an unpartitioned table")
    ap.add_argument("--binary", default=str(Path(os.environ["CARGO_TARGET_DIR"]) / "release" / "iceberg-offload"))
    a = ap.parse_args(argv)
    start = int(time.time() * 1000) - 3 * 86_400_000

    def one_case(gw, tmp, c):
        gw.sql("CREATE DATABASE IF NOT EXISTS wide")
        cols = ["ts DateTime64(3)", "id UInt64"] + [f"c{i} {KINDS[i % len(KINDS)][0]}" for i in range(c - 2)]
        exprs = [f"fromUnixTimestamp64Milli(toInt64({start} + number * 10))", "number"] + \
                [KINDS[i % len(KINDS)][1].format(start=start) for i in range(c - 2)]
        gw.sql(f"CREATE TABLE wide.t{c} ({', '.join(cols)}) ENGINE = MergeTree ORDER BY id")
        gw.sql(f"INSERT INTO wide.t{c} SELECT {', '.join(exprs)} FROM numbers({a.rows})")
        d = tmp / f"t{c}"
        cfg = write_offload_config(tmp / f"t{c}.toml", gw.url, d, [{
            "source": f"wide.t{c}", "target": f"wide.t{c}", "cursor": "ts", "tiebreak": "id",
            "settle_delay": "0s", "max_rows_per_commit": a.rows, "partition": [a.partition] if a.partition else []}])
        r = measure_once(a.binary, cfg, gw)
        gw.sql(f"DROP TABLE wide.t{c}")
        return (f"| {c} | {a.rows:,} | {r['wall']:.2f} | {a.rows / r['wall']:,.0f} | {a.rows * c / r['wall']:,.0f} | "
                f"{r['cpu']:.2f} | {r['rss_mb']:.0f} | {dir_bytes(d / 'warehouse') / 1e6:.1f} |")

    scaling_table("cols", "| columns | rows | wall s | rows/s | cells/s | client CPU s | peak RSS MB | output MB |",
                  [int(x) for x in a.columns.split(",")], one_case)


if __name__ == "__main__":
    main()
