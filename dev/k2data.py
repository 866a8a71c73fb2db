"""K2-style bronze trades in ClickHouse: the schema of the original pipeline and a
generator of realistic-looking rows. Shared by the demo, the tests and the benchmarks."""
import json

BRONZE_DDL = """
CREATE TABLE {db}.{table} (
    exchange_timestamp DateTime64(3),
    sequence_number UInt64,
    symbol String,
    price Decimal(18, 8),
    quantity Decimal(18, 8),
    quote_volume Decimal(18, 8),
    event_time DateTime64(3),
    kafka_offset UInt64,
    kafka_partition UInt16,
    ingestion_timestamp DateTime DEFAULT now()
) ENGINE = MergeTree()
PARTITION BY toYYYYMMDD(exchange_timestamp)
ORDER BY (symbol, exchange_timestamp, sequence_number)
TTL toDateTime(exchange_timestamp) + INTERVAL 7 DAY
SETTINGS index_granularity = 8192
"""


def create_bronze(sql, db, table):
    """`sql` runs one statement on ClickHouse."""
    sql(f"CREATE DATABASE IF NOT EXISTS {db}")
    sql(BRONZE_DDL.format(db=db, table=table))


def insert_bronze(sql, db, table, n, start_ms, step_ms=1.0, seq_start=0):
    """n trades from start_ms (Unix ms), step_ms apart, sequence numbers from seq_start."""
    step_us = int(step_ms * 1000)
    sql(f"""
        INSERT INTO {db}.{table} (exchange_timestamp, sequence_number, symbol, price, quantity, quote_volume,
                                  event_time, kafka_offset, kafka_partition)
        SELECT fromUnixTimestamp64Milli(toInt64({int(start_ms)} + intDiv(number * {step_us}, 1000))),
               {seq_start} + number,
               ['BTCUSDT', 'ETHUSDT', 'SOLUSDT', 'XRPUSDT'][number % 4 + 1],
               toDecimal64(20000 + (number % 10007) / 3, 8),
               toDecimal64((number % 97 + 1) / 13, 8),
               toDecimal64((20000 + (number % 10007) / 3) * ((number % 97 + 1) / 13), 8),
               fromUnixTimestamp64Milli(toInt64({int(start_ms)} + intDiv(number * {step_us}, 1000) + 5)),
               0, 0
        FROM numbers({n})""")


def insert_bronze_arriving_now(sql, db, table, n, seq_start, spread_ms=200):
    """n trades stamped by ClickHouse itself as it inserts them (the last `spread_ms` before
    now): they arrive on time, as a live feed's rows do, whatever queues before the insert."""
    step_us = max(1, int(spread_ms * 1000 / max(n, 1)))
    sql(f"""
        INSERT INTO {db}.{table} (exchange_timestamp, sequence_number, symbol, price, quantity, quote_volume,
                                  event_time, kafka_offset, kafka_partition)
        SELECT now64(3) - toIntervalMicrosecond({spread_ms * 1000} - number * {step_us}),
               {seq_start} + number,
               ['BTCUSDT', 'ETHUSDT', 'SOLUSDT', 'XRPUSDT'][number % 4 + 1],
               toDecimal64(20000 + (number % 10007) / 3, 8),
               toDecimal64((number % 97 + 1) / 13, 8),
               toDecimal64((20000 + (number % 10007) / 3) * ((number % 97 + 1) / 13), 8),
               now64(3), 0, 0
        FROM numbers({n})""")


def source_stats(scalar, db, table, watermark_position, key="symbol, sequence_number", sums=("price", "quantity"),
                 cursor="exchange_timestamp", tiebreak="sequence_number"):
    """Count, sums and distinct keys of the source rows at or below a watermark position.
    `scalar` runs a query and returns its TabSeparated text."""
    pos = json.loads(watermark_position)
    at = f"fromUnixTimestamp64Nano(toInt64({pos['cursor_ns']}), 'UTC')"
    if pos.get("tiebreak") is not None:
        pred = f"({cursor} < {at} OR ({cursor} = {at} AND {tiebreak} <= {pos['tiebreak']}))"
    else:
        pred = f"{cursor} <= {at}"
    s = "".join(f", toString(sum({c}))" for c in sums)
    row = scalar(f"SELECT count(), uniqExact(({key})){s} FROM {db}.{table} WHERE {pred}").strip().split("\t")
    return {"count": int(row[0]), "distinct_keys": int(row[1]), "sums": dict(zip(sums, row[2:]))}
