"""Replacing the original in place (issue 13): a table that Spark created in a Hadoop catalog
with the original's DDL and filled the way the original did (including a window appended
twice after a crash), and the original's `offload_watermarks` row in PostgreSQL, are taken
over with `iceberg-offload adopt`. Checked by Spark (through our catalog over JDBC) and
pyiceberg against the source: no gap and no overlap at the cut-over, only the original's
duplicates doubled, and the audit names them by day."""
import datetime as dt
import json
import subprocess
import time
from decimal import Decimal
from pathlib import Path


import k2data
from test_postgres import postgres, psql  # noqa: F401 - the PostgreSQL fixture and client, shared
from harness import (ROOT, bronze_table, create_bronze, insert_bronze, now_ms, run, spark_read,
                     sqlite_catalog, verify, write_config)

DAY = 86_400_000

# The original's bronze DDL (research k2-original §3), created by Spark in a Hadoop catalog.
ORIGINAL_DDL = """
CREATE TABLE k2.cold.{table} (
  exchange_timestamp TIMESTAMP, sequence_number BIGINT, symbol STRING,
  price DECIMAL(18,8), quantity DECIMAL(18,8), quote_volume DECIMAL(18,8),
  event_time TIMESTAMP, kafka_offset BIGINT, kafka_partition INT, ingestion_timestamp TIMESTAMP)
USING iceberg PARTITIONED BY (days(exchange_timestamp))
TBLPROPERTIES ('format-version'='2', 'write.format.default'='parquet',
               'write.parquet.compression-codec'='zstd', 'write.parquet.compression-level'='3')
"""

WATERMARKS_DDL = """
CREATE TABLE offload_watermarks (
  table_name TEXT PRIMARY KEY, last_offload_timestamp TIMESTAMPTZ NOT NULL,
  last_offload_max_sequence BIGINT NOT NULL, last_offload_row_count BIGINT DEFAULT 0,
  status TEXT NOT NULL DEFAULT 'initialized', last_successful_run TIMESTAMPTZ,
  last_run_duration_seconds INTEGER, failure_count INTEGER DEFAULT 0, last_error_message TEXT,
  created_at TIMESTAMPTZ DEFAULT NOW(), updated_at TIMESTAMPTZ DEFAULT NOW())
"""


def original_database(postgres, name):
    """A fresh database standing for the original's Prefect database."""
    base, password = postgres
    psql(password, "postgres", f"DROP DATABASE IF EXISTS {name}")
    psql(password, "postgres", f"CREATE DATABASE {name}")
    psql(password, name, WATERMARKS_DDL)
    return f"postgresql://offload_test:{password}@127.0.0.1:5432/{name}", password


def hadoop(warehouse):
    return {"type": "hadoop", "warehouse": str(warehouse), "name": "k2"}


def original_offload(gateway, db, table, spark_session, lo_ms, hi_ms):
    """What the original's job did for one window: read `lo < exchange_timestamp <= hi` from
    ClickHouse and append it to the Iceberg table with Spark. Returns (rows, max ts)."""
    from pyspark.sql.types import (DecimalType, IntegerType, LongType, StringType, StructField, StructType,
                                   TimestampType)
    rows = gateway.sql(f"""
        SELECT toUnixTimestamp64Micro(exchange_timestamp), sequence_number, symbol, toString(price), toString(quantity),
               toString(quote_volume), toUnixTimestamp64Micro(event_time), kafka_offset, kafka_partition,
               toUnixTimestamp(ingestion_timestamp)
        FROM {db}.{table}
        WHERE exchange_timestamp > fromUnixTimestamp64Milli(toInt64({lo_ms}), 'UTC')
          AND exchange_timestamp <= fromUnixTimestamp64Milli(toInt64({hi_ms}), 'UTC')
        ORDER BY exchange_timestamp, sequence_number FORMAT JSONCompactEachRow""").strip().splitlines()
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    at = lambda us: epoch + dt.timedelta(microseconds=int(us))  # noqa: E731
    data = []
    for line in rows:
        r = json.loads(line)
        data.append((at(r[0]), int(r[1]), r[2], Decimal(r[3]), Decimal(r[4]), Decimal(r[5]), at(r[6]), int(r[7]),
                     int(r[8]), at(int(r[9]) * 1_000_000)))
    d18 = DecimalType(18, 8)
    schema = StructType([
        StructField("exchange_timestamp", TimestampType()), StructField("sequence_number", LongType()),
        StructField("symbol", StringType()), StructField("price", d18), StructField("quantity", d18),
        StructField("quote_volume", d18), StructField("event_time", TimestampType()),
        StructField("kafka_offset", LongType()), StructField("kafka_partition", IntegerType()),
        StructField("ingestion_timestamp", TimestampType())])
    spark_session.createDataFrame(data, schema).writeTo(f"k2.cold.{table}").append()
    max_us = max(int(json.loads(line)[0]) for line in rows)
    return len(rows), max_us // 1000


def adopt_config(gateway, db, table, tmp_path):
    return write_config(tmp_path / "c.toml", gateway, [
        bronze_table(db, table, settle_delay="1s", uint64="long")], tmp_path)


def test_adopt_a_spark_hadoop_table_and_its_watermark(gateway, db, tmp_path, postgres):
    from spark_reader import Spark
    table = "bronze_trades_binance"
    create_bronze(gateway, db, table)
    day0 = (now_ms() // DAY - 3) * DAY
    # Three days of history, then rows after the cut-over.
    for d in range(3):
        insert_bronze(gateway, db, table, 1000, day0 + d * DAY + 3_600_000, step_ms=60_000, seq_start=d * 1000)
    # A row ClickHouse itself holds twice (the Kafka engine is at-least-once): the source's
    # own duplicate, which every reader must keep and repair must not touch.
    gateway.sql(f"INSERT INTO {db}.{table} SELECT * FROM {db}.{table} WHERE sequence_number = 1500")
    warehouse = tmp_path / "original-warehouse"
    spark = Spark.shared()
    s, _ = spark.session(hadoop(warehouse))
    s.sql("CREATE NAMESPACE IF NOT EXISTS k2.cold")
    s.sql(ORIGINAL_DDL.format(table=table))
    # The original's runs: window 1 = day 0, window 2 = day 1 appended twice (the first run
    # crashed after its append, before its watermark update), window 3 = day 2 up to noon.
    w1 = day0 + DAY - 1
    n1, _ = original_offload(gateway, db, table, s, 0, w1)
    w2 = day0 + 2 * DAY - 1
    n2, _ = original_offload(gateway, db, table, s, w1, w2)
    n2b, _ = original_offload(gateway, db, table, s, w1, w2)
    n3, max3 = original_offload(gateway, db, table, s, w2, day0 + 2 * DAY + DAY // 2)
    assert n1 == 1000 and n2 == n2b == 1001 and n3 > 0
    url, _ = original_database(postgres, f"orig_{db}")
    psql(postgres[1], f"orig_{db}", f"""INSERT INTO offload_watermarks VALUES ('{table}',
        to_timestamp({max3} / 1000.0), 999, {n3}, 'success', now(), 12, 0, NULL, now(), now())""")
    spark_before = spark_read(hadoop(warehouse), f"cold.{table}", sums=("price",))
    assert spark_before["count"] == n1 + n2 + n2b + n3

    cfg = adopt_config(gateway, db, table, tmp_path)
    env = {"ORIGINAL_WATERMARKS_URL": url}
    table_dir = warehouse / "cold" / table
    p = run(cfg, "validate")
    assert p.returncode == 0, p.stdout + p.stderr
    p = run(cfg, "adopt", table, "--from", str(table_dir), env=env)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "dry run" in out and "first window:    rows with exchange_timestamp >" in out, out
    assert url.split("@")[0].split(":")[-1] not in out, "the original's password must never be printed"
    # Nothing registered by the dry run; the service refuses nothing yet (no table).
    assert not (tmp_path / "catalog.db").exists() or "bronze" not in sqlite_tables(tmp_path)

    p = run(cfg, "adopt", table, "--from", str(table_dir), "--apply", env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "adopted: cold.bronze_trades_binance starts after" in p.stdout, p.stdout
    # Again: nothing to do.
    p = run(cfg, "adopt", table, "--from", str(table_dir), "--apply", env=env)
    assert p.returncode == 0 and "nothing to adopt" in p.stdout, p.stdout + p.stderr

    # Rows after the cut-over, then cycles.
    insert_bronze(gateway, db, table, 500, day0 + 2 * DAY + DAY // 2 + 1, step_ms=30_000, seq_start=5000)
    for _ in range(2):
        p = run(cfg, "once")
        assert p.returncode == 0, p.stdout + p.stderr
    shown = run(cfg, "watermark", "show").stdout
    assert table in shown, shown

    # No gap, no overlap: every source row once, except the original's doubled window.
    src_count = int(gateway.sql(f"SELECT count() FROM {db}.{table}").strip())
    src_keys = int(gateway.sql(f"SELECT uniqExact(symbol, sequence_number) FROM {db}.{table}").strip())
    got = verify(tmp_path, f"cold.{table}", sums=("price",))
    for reader in ("pyiceberg", "clickhouse", "duckdb", "spark"):
        r = got[reader]
        assert r["count"] == src_count + n2b, f"{reader}: {r['count']} rows, source {src_count} + {n2b} doubled"
        assert r["distinct_keys"] == src_keys, f"{reader}: {r['distinct_keys']} distinct keys vs {src_keys}"
    assert got["pyiceberg"]["duplicates"] == n2b + 1
    # Our rows went into the original's table: same field ids, the original's codec.
    props = got["pyiceberg"]["properties"]
    assert props["offload.adopted-from"].endswith(".metadata.json") and props["write.parquet.compression-level"] == "3"
    assert got["spark"]["types"]["sequence_number"] == "bigint" and got["spark"]["types"]["price"] == "decimal(18,8)"

    # The audit names the original's duplicates by day.
    p = run(cfg, "audit", "--json")
    assert p.returncode == 1, "the original's duplicates make the audit fail"
    days = {d["day"]: d for d in json.loads(p.stdout)}
    day1 = dt.datetime.fromtimestamp((day0 + DAY) / 1000, dt.timezone.utc).date().isoformat()
    assert days[day1]["iceberg_rows"] - days[day1]["source_rows"] == n2b, days[day1]
    others = [d for k, d in days.items() if k != day1]
    assert others and all(d["iceberg_rows"] == d["source_rows"] and d["status"] == "ok" for d in others), others
    assert days[day1]["status"] == "extra", days[day1]

    # repair: a dry run says what it would remove; then exactly the second copy of the
    # original's doubled window goes, and the source's own duplicate stays twice.
    snapshots = len(got["pyiceberg"]["snapshots"])
    p = run(cfg, "repair", "--table", table, "--dry-run")
    assert p.returncode == 0 and f"would remove {n2b} surplus rows" in p.stdout and "dry run" in p.stdout, p.stdout + p.stderr
    assert len(verify(tmp_path, f"cold.{table}", sums=("price",), clickhouse=False)["pyiceberg"]["snapshots"]) == snapshots
    p = run(cfg, "repair", "--table", table)
    assert p.returncode == 0 and f"removed {n2b} surplus rows" in p.stdout, p.stdout + p.stderr
    src_sum = gateway.sql(f"SELECT toString(sum(price)) FROM {db}.{table}").strip()
    got = verify(tmp_path, f"cold.{table}", sums=("price",))
    for reader in ("pyiceberg", "clickhouse", "duckdb", "spark"):
        r = got[reader]
        assert r["count"] == src_count and r["distinct_keys"] == src_keys, f"{reader} after repair: {r}"
        assert float(r["sums"]["price"]) == float(src_sum), f"{reader} after repair: sum {r['sums']['price']} vs {src_sum}"
    assert got["pyiceberg"]["duplicates"] == 1, "the source's own duplicate stays"
    assert [s["operation"] for s in got["pyiceberg"]["snapshots"]].count("Operation.REPLACE") == 1
    p = run(cfg, "audit")
    assert p.returncode == 0, p.stdout
    p = run(cfg, "repair", "--table", table)
    assert p.returncode == 0 and "nothing to repair" in p.stdout, p.stdout
    # The service goes on appending to the repaired table.
    k2data.insert_bronze_arriving_now(gateway.sql, db, table, 100, seq_start=9000)
    time.sleep(1.5)
    assert run(cfg, "once").returncode == 0
    got = verify(tmp_path, f"cold.{table}", sums=("price",), clickhouse=False)
    assert got["spark"]["count"] == src_count + 100 == got["pyiceberg"]["count"]

    # The original started again by mistake (a Spark append through the Hadoop catalog, a
    # version after the adopted one): the service stops writing and says why.
    original_offload(gateway, db, table, s, day0 + 2 * DAY + DAY // 2, day0 + 2 * DAY + DAY // 2 + 3_600_000)
    p = run(cfg, "once")
    assert p.returncode == 3 and "still running" in p.stdout, p.stdout


def sqlite_tables(tmp_path):
    import sqlite3
    con = sqlite3.connect(tmp_path / "catalog.db")
    try:
        return " ".join(r[0] for r in con.execute("SELECT table_name FROM iceberg_tables"))
    except sqlite3.OperationalError:
        return ""
    finally:
        con.close()


def test_adopt_refuses_what_it_must(gateway, db, tmp_path, postgres):
    """A watermark row left `running` or `failed`, a type the source cannot write, and a table
    written by another engine that was never adopted: each refused with what to do."""
    from spark_reader import Spark
    table = "bronze_trades_kraken"
    create_bronze(gateway, db, table)
    day0 = (now_ms() // DAY - 2) * DAY
    insert_bronze(gateway, db, table, 200, day0, step_ms=60_000)
    warehouse = tmp_path / "original-warehouse"
    s, _ = Spark.shared().session(hadoop(warehouse))
    s.sql("CREATE NAMESPACE IF NOT EXISTS k2.cold")
    s.sql(ORIGINAL_DDL.format(table=table))
    n, max_ms = original_offload(gateway, db, table, s, 0, day0 + DAY)
    url, password = original_database(postgres, f"orig_{db}")
    psql(password, f"orig_{db}", f"""INSERT INTO offload_watermarks (table_name, last_offload_timestamp,
        last_offload_max_sequence, status, updated_at) VALUES ('{table}', to_timestamp({max_ms} / 1000.0), 1, 'running', now())""")
    env = {"ORIGINAL_WATERMARKS_URL": url}
    table_dir = str(warehouse / "cold" / table)

    # uint64 left as decimal(20,0): the original's BIGINT does not fit; the message says what to set.
    cfg = write_config(tmp_path / "c.toml", gateway, [bronze_table(db, table, settle_delay="1s")], tmp_path)
    p = run(cfg, "adopt", table, "--from", table_dir, "--watermark", "2020-01-01T00:00:00Z")
    assert p.returncode == 1 and "sequence_number" in p.stderr and 'uint64 = "long"' in p.stderr, p.stderr

    cfg = adopt_config(gateway, db, table, tmp_path)
    p = run(cfg, "adopt", table, "--from", table_dir, "--apply", env=env)
    assert p.returncode == 1 and "status 'running'" in p.stderr and "--force" in p.stderr, p.stderr
    psql(password, f"orig_{db}", f"UPDATE offload_watermarks SET status = 'failed', failure_count = 2, "
                                 f"last_error_message = 'JDBC timeout' WHERE table_name = '{table}'")
    p = run(cfg, "adopt", table, "--from", table_dir, "--apply", env=env)
    assert p.returncode == 1 and "failed" in p.stderr and "JDBC timeout" in p.stderr, p.stderr
    assert "bronze" not in sqlite_tables(tmp_path)

    # A table another engine wrote, registered without adopt: the offload refuses to start
    # from the first source row.
    from pyiceberg.catalog.sql import SqlCatalog
    cat = SqlCatalog("offload", uri=f"sqlite:///{tmp_path / 'catalog.db'}", warehouse=f"file://{tmp_path / 'warehouse'}")
    cat.create_namespace_if_not_exists("cold")
    latest = sorted((warehouse / "cold" / table / "metadata").glob("v*.metadata.json"), key=lambda f: int(f.name[1:].split(".")[0]))[-1]
    cat.register_table(("cold", table), f"file://{latest}")
    p = run(cfg, "once")
    assert p.returncode == 3 and "did not write" in p.stdout and "iceberg-offload adopt" in p.stdout, p.stdout
    assert spark_read(sqlite_catalog(tmp_path), f"cold.{table}", sums=())["count"] == n, "nothing may be written"

    # The service ran before adopt (a new table, offloaded from the first source row): adopt
    # refuses instead of saying there is nothing to do.
    cat.drop_table(("cold", table))
    assert run(cfg, "once").returncode == 0
    psql(password, f"orig_{db}", f"UPDATE offload_watermarks SET status = 'success' WHERE table_name = '{table}'")
    p = run(cfg, "adopt", table, "--from", table_dir, "--apply", env=env)
    assert p.returncode == 1 and "not registered by `adopt`" in p.stderr, p.stdout + p.stderr
    # The URL itself where the variable's name belongs: refused, and not echoed.
    p = run(cfg, "adopt", table, "--from", table_dir, "--original-url-env", url)
    assert p.returncode == 1 and password not in p.stdout + p.stderr, p.stderr


def test_migration_guide_commands_are_real_and_tested():
    """docs/migration.md: every iceberg-offload command in it exists with the flags it uses,
    and every one of them is run by the end-to-end test above."""
    import re
    from harness import binary
    guide = (ROOT / "docs" / "migration.md").read_text()
    this = Path(__file__).read_text()
    blocks = re.findall(r"```sh\n(.*?)```", guide, re.S)
    commands = [line.strip() for b in blocks for line in b.splitlines() if line.strip().startswith("iceberg-offload ")]
    assert len(commands) >= 8, commands
    for command in commands:
        words = command.split()[1:]
        sub = words[:2] if words[0] == "watermark" else words[:1]
        help_text = subprocess.run([binary(), *sub, "--help"], capture_output=True, text=True)
        assert help_text.returncode == 0, f"{command}: {help_text.stderr}"
        for flag in [w for w in words if w.startswith("--")]:
            assert flag in help_text.stdout, f"{command}: {flag} is not an option of `{' '.join(sub)}`"
        assert f'run(cfg, "{sub[0]}"' in this, f"{command}: not run by the end-to-end test"
