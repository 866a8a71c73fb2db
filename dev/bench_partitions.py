#!/usr/bin/env python3
"""How cost grows with the number of partitions a backfill touches: N K2 bronze rows spread
evenly over D days, `day(exchange_timestamp)`, one `once` from empty. The source table has no
TTL here (the K2 one deletes rows after 7 days).

Usage (after `source dev/env.sh`):
    python dev/bench_partitions.py --days 3,30,100,365 --rows 1000000 [--max-partitions 8]
    python dev/bench_partitions.py --layout arrival --days 365 --rows 10000000
    python dev/bench_partitions.py --layout bucket --days 1 --rows 10000000

Layouts: `cursor` (the default): cursor and partition on exchange_timestamp, windows cut at
`max_partitions_per_commit` days. `arrival`: cursor ingestion_timestamp (every row arrived in
the last hour), partition `day(exchange_timestamp)`, event times shuffled over the days: each
window holds rows of every day (clustered writing). `bucket`: cursor exchange_timestamp,
partition `bucket(64, sequence_number)` (clustered writing).
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
    ap.add_argument("--layout", choices=["cursor", "arrival", "bucket"], default="cursor")
    ap.add_argument("--binary", default=str(Path(os.environ["CARGO_TARGET_DIR"]) / "release" / "iceberg-offload"))
    a = ap.parse_args(argv)

    def one_case(gw, tmp, days):
        gw.sql("CREATE DATABASE IF NOT EXISTS bench")
        gw.sql(DDL.format(db="bench", table=f"d{days}"))
        now = int(time.time() * 1000) - 3_600_000
        start = now - days * 86_400_000
        if a.layout == "arrival":
            # Event times shuffled over the days (a multiplicative permutation of the row
            # numbers), arrival times in the last hour: every window spans every day.
            gw.sql(f"""INSERT INTO bench.d{days} (exchange_timestamp, sequence_number, symbol, price, quantity,
                quote_volume, event_time, kafka_offset, kafka_partition, ingestion_timestamp)
                SELECT fromUnixTimestamp64Milli(toInt64({start} + intDiv(((number * 7919) % {a.rows}) * {days * 86_400_000}, {a.rows}))),
                       number, ['BTCUSDT', 'ETHUSDT', 'SOLUSDT', 'XRPUSDT'][number % 4 + 1],
                       toDecimal64(20000 + (number % 10007) / 3, 8), toDecimal64((number % 97 + 1) / 13, 8),
                       toDecimal64((20000 + (number % 10007) / 3) * ((number % 97 + 1) / 13), 8),
                       fromUnixTimestamp64Milli(toInt64({start})), 0, 0,
                       toDateTime(intDiv({now}, 1000) - 3600 + intDiv(number * 3600, {a.rows}))
                FROM numbers({a.rows})""")
        else:
            k2data.insert_bronze(gw.sql, "bench", f"d{days}", a.rows, start, step_ms=days * 86_400_000 / a.rows)
        d = tmp / f"d{days}"
        table = {"source": f"bench.d{days}", "target": f"bench.d{days}", "cursor": "exchange_timestamp",
                 "tiebreak": "sequence_number", "settle_delay": "0s", "max_rows_per_commit": a.rows,
                 "max_partitions_per_commit": a.max_partitions, "partition": ["day(exchange_timestamp)"]}
        if a.layout == "arrival":
            table["cursor"] = "ingestion_timestamp"
        elif a.layout == "bucket":
            table["partition"] = ["bucket(64, sequence_number)"]
        cfg = write_offload_config(tmp / f"d{days}.toml", gw.url, d, [table])
        r = measure_once(a.binary, cfg, gw)
        gw.sql(f"DROP TABLE bench.d{days}")
        windows = sum(int(line.split(" rows in ")[1].split()[0]) for line in r["stdout"].splitlines() if " rows in " in line)
        files = len(list((d / "warehouse").rglob("*.parquet")))
        return (f"| {days} | {a.rows:,} | {r['wall']:.2f} | {r['cpu']:.2f} | {r['rss_mb']:.0f} | {windows} | {files} | "
                f"{dir_bytes(d / 'warehouse') / 1e6:.1f} |")

    scaling_table(f"parts-{a.layout}", "| days | rows | wall s | client CPU s | peak RSS MB | commits | files | output MB |",
                  [int(x) for x in a.days.split(",")], one_case)


if __name__ == "__main__":
    main()
