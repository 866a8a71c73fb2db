#!/usr/bin/env python3
"""How cost grows with the number of partitions a backfill touches: N K2 bronze rows spread
evenly over D days, `day(exchange_timestamp)`, one `once` from empty. The source table has no
TTL here (the K2 one deletes rows after 7 days).

Usage (after `source dev/env.sh`):
    python dev/bench_partitions.py --days 3,30,100,365 --rows 1000000 [--max-partitions 8]
"""
import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import k2data  # noqa: E402
from bench import dir_bytes, measure_once, scaling_table, write_offload_config  # noqa: E402

DDL = k2data.BRONZE_DDL.replace("PARTITION BY toYYYYMMDD(exchange_timestamp)\n", "PARTITION BY toYYYYMM(exchange_timestamp)\n") \
    .replace("TTL toDateTime(exchange_timestamp) + INTERVAL 7 DAY\n", "")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--days", default="3,30,100,365")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--max-partitions", type=int, default=8, help="max_partitions_per_commit")
    ap.add_argument("--binary", default=str(Path(os.environ["CARGO_TARGET_DIR"]) / "release" / "iceberg-offload"))
    a = ap.parse_args(argv)

    def one_case(gw, tmp, days):
        gw.sql("CREATE DATABASE IF NOT EXISTS bench")
        gw.sql(DDL.format(db="bench", table=f"d{days}"))
        now = int(time.time() * 1000) - 3_600_000
        k2data.insert_bronze(gw.sql, "bench", f"d{days}", a.rows, now - days * 86_400_000, step_ms=days * 86_400_000 / a.rows)
        d = tmp / f"d{days}"
        cfg = write_offload_config(tmp / f"d{days}.toml", gw.url, d, [{
            "source": f"bench.d{days}", "target": f"bench.d{days}", "cursor": "exchange_timestamp",
            "tiebreak": "sequence_number", "settle_delay": "0s", "max_rows_per_commit": a.rows,
            "max_partitions_per_commit": a.max_partitions, "partition": ["day(exchange_timestamp)"]}])
        r = measure_once(a.binary, cfg, gw)
        gw.sql(f"DROP TABLE bench.d{days}")
        windows = sum(int(line.split(" rows in ")[1].split()[0]) for line in r["stdout"].splitlines() if " rows in " in line)
        files = len(list((d / "warehouse").rglob("*.parquet")))
        return (f"| {days} | {a.rows:,} | {r['wall']:.2f} | {r['cpu']:.2f} | {r['rss_mb']:.0f} | {windows} | {files} | "
                f"{dir_bytes(d / 'warehouse') / 1e6:.1f} |")

    scaling_table("parts", "| days | rows | wall s | client CPU s | peak RSS MB | commits | files | output MB |",
                  [int(x) for x in a.days.split(",")], one_case)


if __name__ == "__main__":
    main()
