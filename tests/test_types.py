"""Every ClickHouse type of the mapping round-trips, checked value by value by pyiceberg, by
ClickHouse icebergLocal(), by DuckDB iceberg_scan() and by Spark (Iceberg's Java library)."""
import datetime as dt
import json
from decimal import Decimal

from harness import bronze_table, now_ms, run, spark_enabled, verify, write_config

DDL = """
CREATE TABLE {db}.types (
  ts DateTime64(3), id UInt32,
  i8 Int8, i16 Int16, i32 Int32, i64 Int64,
  u8 UInt8, u16 UInt16, u32 UInt32, u64 UInt64,
  f32 Float32, f64 Float64,
  d Decimal(18, 8), d38 Decimal(38, 10),
  s String, fs FixedString(4), lc LowCardinality(String), ns Nullable(String), ni Nullable(Int32),
  e8 Enum8('buy' = 1, 'sell' = -2), e16 Enum16('a' = 1000, 'b' = 2000),
  u UUID, b Bool, day Date, d32 Date32,
  t DateTime, tz DateTime('Asia/Tokyo'), t0 DateTime64(0), t6 DateTime64(6, 'America/New_York'), t9 DateTime64(9),
  arr Array(String), arr_n Array(Nullable(Int32)), m Map(String, UInt64)
) ENGINE = MergeTree ORDER BY (ts, id)
"""

ROWS = """
INSERT INTO {db}.types VALUES
 ('{t1}', 1, -128, -32768, -2147483648, -9223372036854775808, 0, 0, 0, 0, -1.5, -2.25,
  -12345.12345678, -1234567890123456789012345678.0123456789, 'plain', 'abcd', 'low', NULL, NULL,
  'buy', 'a', '00000000-0000-0000-0000-000000000001', false, '1970-01-01', '1900-01-01',
  '1970-01-01 00:00:00', '2020-01-01 09:00:00', '1969-07-20 20:17:40', '2020-01-01 00:00:00.000001', '1960-01-01 00:00:00.123456789',
  [], [], {{}}),
 ('{t2}', 2, 127, 32767, 2147483647, 9223372036854775807, 255, 65535, 4294967295, 18446744073709551615, 3.5, 1e300,
  99999.99999999, 1234567890123456789012345678.0123456789, 'ünïcødé ✓ \\t tab', 'xy\\0\\0', 'lc2', 'here', 42,
  'sell', 'b', '123e4567-e89b-12d3-a456-426614174000', true, '2149-06-06', '2299-12-31',
  '2106-02-07 06:28:15', '2030-06-30 23:59:59', '2200-01-01 00:00:00', '2262-04-11 00:00:00.999999', '2262-04-11 23:47:16.854775807',
  ['x', 'y,z'], [1, NULL, -3], {{'k1': 1, 'k2': 18446744073709551615}})
"""


def test_every_type_round_trips(gateway, db, tmp_path):
    gateway.sql(DDL.format(db=db))
    t1 = "2026-01-01 00:00:00.001"
    t2 = "2026-01-01 00:00:00.002"
    gateway.sql(ROWS.format(db=db, t1=t1, t2=t2))
    cfg = write_config(tmp_path / "c.toml", gateway, [
        bronze_table(db, "types", target="cold.types", cursor="ts", tiebreak="id", partition=["month(ts)", "e8"])
    ], tmp_path)
    p = run(cfg, "once")
    assert p.returncode == 0, p.stdout + p.stderr
    got = verify(tmp_path, "cold.types", key="id", sums=("id",), rows=True)
    py = got["pyiceberg"]
    assert py["count"] == 2 and got["clickhouse"]["count"] == 2
    schema = py["schema"]
    assert schema["u64"] == "decimal(20, 0)" and schema["i8"] == "int" and schema["u32"] == "long"
    assert schema["fs"] == "fixed[4]" and schema["e8"] == "string" and schema["u"] == "string"
    assert schema["ns"] == "string?" and schema["ni"] == "int?" and schema["lc"] == "string"
    assert schema["t9"] == "timestamptz" and schema["day"] == "date" and schema["b"] == "boolean"
    assert schema["arr"].startswith("list<string") and schema["m"].startswith("map<string, decimal(20, 0)")
    assert py["partition_spec"] == ["month(ts)", "identity(e8)"]

    rows = sorted(py["rows"], key=lambda r: r["id"])
    utc = dt.timezone.utc
    expect = [
        {"i8": -128, "i16": -32768, "i32": -2147483648, "i64": -9223372036854775808, "u8": 0, "u64": Decimal(0),
         "f32": -1.5, "f64": -2.25, "d": Decimal("-12345.12345678"), "d38": Decimal("-1234567890123456789012345678.0123456789"),
         "s": "plain", "fs": b"abcd", "lc": "low", "ns": None, "ni": None, "e8": "buy", "e16": "a",
         "u": "00000000-0000-0000-0000-000000000001", "b": False, "day": dt.date(1970, 1, 1), "d32": dt.date(1900, 1, 1),
         "t": dt.datetime(1970, 1, 1, tzinfo=utc), "tz": dt.datetime(2020, 1, 1, 0, 0, tzinfo=utc),
         "t0": dt.datetime(1969, 7, 20, 20, 17, 40, tzinfo=utc), "t6": dt.datetime(2020, 1, 1, 5, 0, 0, 1, tzinfo=utc),
         "t9": dt.datetime(1960, 1, 1, 0, 0, 0, 123457, tzinfo=utc), "arr": [], "arr_n": [], "m": []},
        {"i8": 127, "u8": 255, "u16": 65535, "u32": 4294967295, "u64": Decimal("18446744073709551615"),
         "f64": 1e300, "d": Decimal("99999.99999999"), "s": "ünïcødé ✓ \t tab", "fs": b"xy\x00\x00", "ns": "here", "ni": 42,
         "e8": "sell", "e16": "b", "u": "123e4567-e89b-12d3-a456-426614174000", "b": True,
         "day": dt.date(2149, 6, 6), "d32": dt.date(2299, 12, 31),
         "t": dt.datetime(2106, 2, 7, 6, 28, 15, tzinfo=utc), "tz": dt.datetime(2030, 6, 30, 14, 59, 59, tzinfo=utc),
         "t0": dt.datetime(2200, 1, 1, tzinfo=utc), "t6": dt.datetime(2262, 4, 11, 4, 0, 0, 999999, tzinfo=utc),
         "t9": dt.datetime(2262, 4, 11, 23, 47, 16, 854775, tzinfo=utc),
         "arr": ["x", "y,z"], "arr_n": [1, None, -3],
         "m": [("k1", Decimal(1)), ("k2", Decimal("18446744073709551615"))]},
    ]
    for row, want in zip(rows, expect):
        for col, value in want.items():
            assert row[col] == str(value), f"pyiceberg row {row['id']} column {col}: {row[col]!r} != {str(value)!r}"

    # DuckDB's iceberg_scan() reads the same values from the catalog's metadata file.
    for row, want in zip(sorted(got["duckdb"]["rows"], key=lambda r: int(r["id"])), expect):
        for col, value in want.items():
            if col == "m":
                value = json.dumps(sorted((str(k), str(v)) for k, v in value))
            assert row[col] == str(value), f"duckdb row {row['id']} column {col}: {row[col]!r} != {str(value)!r}"

    # Spark reads the same values through the same catalog: its own Parquet and Avro readers.
    if spark_enabled():
        sp = got["spark"]
        assert sp["count"] == 2 and sp["types"]["u64"] == "decimal(20,0)" and sp["types"]["fs"] == "binary"
        assert sp["types"]["t9"] == "timestamp" and sp["types"]["m"] == "map<string,decimal(20,0)>"
        for row, want in zip(sorted(sp["rows"], key=lambda r: r["id"]), expect):
            for col, value in want.items():
                have = sorted(row[col].items()) if col == "m" else row[col]
                assert have == value, f"spark row {row['id']} column {col}: {have!r} != {value!r}"

    # ClickHouse reads the Iceberg files on its own: compare with the source, as ClickHouse prints both.
    ch_rows = sorted(got["clickhouse"]["rows"], key=lambda r: int(r["id"]))
    src = gateway.sql(f"""SELECT toString(u64), toString(d38), toString(e8), toString(toDateTime64(tz, 6, 'UTC')),
        toString(toDateTime64(t9, 6, 'UTC')), toString(d32), toString(arr_n), toString(u), toString(f64), s
        FROM {db}.types ORDER BY id FORMAT TabSeparated""").strip().split("\n")
    for ch, line in zip(ch_rows, src):
        vals = line.split("\t")
        assert ch["u64"] == vals[0] and ch["d38"] == vals[1] and ch["e8"] == vals[2]
        assert ch["tz"] == vals[3] and ch["t9"] == vals[4] and ch["d32"] == vals[5]
        assert ch["arr_n"] == vals[6] and ch["u"] == vals[7] and float(ch["f64"]) == float(vals[8])
        assert ch["s"].replace("\t", "\\t") == vals[9]


def test_unsupported_cursor_type_and_column_type_are_clear(gateway, db, tmp_path):
    gateway.sql(f"CREATE TABLE {db}.odd (ts DateTime64(3), n Float64, tup Tuple(a Int8, b String)) ENGINE = MergeTree ORDER BY ts")
    gateway.sql(f"INSERT INTO {db}.odd VALUES (now64(3) - 3600, 1.5, (1, 'x'))")
    cfg = write_config(tmp_path / "c.toml", gateway, [
        bronze_table(db, "odd", target="cold.odd_a", cursor="n", tiebreak=None, partition=[]),
        bronze_table(db, "odd", target="cold.odd_b", cursor="ts", tiebreak=None, partition=[]),
    ], tmp_path)
    text = cfg.read_text().replace('tiebreak = null\n', '')
    # Two tables may read the same source into different targets, but names must differ.
    cfg.write_text(text)
    p = run(cfg, "once")
    assert p.returncode == 1 and "same source table name" in p.stderr
    cfg = write_config(tmp_path / "c.toml", gateway, [
        bronze_table(db, "odd", target="cold.odd_b", cursor="n", partition=[], tiebreak="ts"),
    ], tmp_path)
    p = run(cfg, "once")
    assert p.returncode == 3
    assert 'cursor column "n" has type Float64' in p.stdout, p.stdout
    cfg = write_config(tmp_path / "c.toml", gateway, [
        bronze_table(db, "odd", target="cold.odd_b", cursor="ts", partition=[], tiebreak="n"),
    ], tmp_path)
    p = run(cfg, "once")
    assert 'tiebreak column "n" has type Float64' in p.stdout, p.stdout
    cfg = write_config(tmp_path / "c.toml", gateway, [
        bronze_table(db, "odd", target="cold.odd_b", cursor="ts", partition=[], tiebreak=None),
    ], tmp_path)
    cfg.write_text(cfg.read_text().replace('tiebreak = null\n', ''))
    p = run(cfg, "once")
    assert p.returncode == 3 and 'column "tup": type Tuple(a Int8, b String) is not supported' in p.stdout, p.stdout


def test_uint64_as_long_round_trips_and_refuses_overflow(gateway, db, tmp_path):
    """uint64 = "long" (the original K2 tables' sequence_number BIGINT): values up to 2^63-1
    land as Iceberg long; a larger one fails the window with an error naming the table and the
    columns, and nothing is committed."""
    gateway.sql(f"""CREATE TABLE {db}.u (ts DateTime64(3), seq UInt64, n Nullable(UInt64), a Array(UInt64))
                    ENGINE = MergeTree ORDER BY ts""")
    gateway.sql(f"""INSERT INTO {db}.u VALUES ('2026-01-01 00:00:00.001', 0, NULL, []),
                    ('2026-01-01 00:00:00.002', 9223372036854775807, 5, [1, 9223372036854775807])""")
    table = bronze_table(db, "u", target="cold.u", cursor="ts", tiebreak="seq", partition=["day(ts)"], uint64="long")
    cfg = write_config(tmp_path / "c.toml", gateway, [table], tmp_path)
    p = run(cfg, "once")
    assert p.returncode == 0, p.stdout + p.stderr
    got = verify(tmp_path, "cold.u", key="seq", sums=("seq",), rows=True)
    py, ch = got["pyiceberg"], got["clickhouse"]
    assert py["schema"]["seq"] == "long" and py["schema"]["n"] == "long?" and py["schema"]["a"].startswith("list<long")
    rows = sorted(py["rows"], key=lambda r: int(r["seq"]))
    assert [(r["seq"], r["n"], r["a"]) for r in rows] == [
        ("0", "None", "[]"), ("9223372036854775807", "5", "[1, 9223372036854775807]")], rows
    assert py["count"] == ch["count"] == 2
    assert int(py["sums"]["seq"]) == int(ch["sums"]["seq"]) == 9223372036854775807, (py["sums"], ch["sums"])
    if spark_enabled():
        sp = got["spark"]
        assert sp["types"]["seq"] == "bigint" and sp["types"]["a"] == "array<bigint>"
        assert sorted((r["seq"], r["n"], r["a"]) for r in sp["rows"]) == [(0, None, []), (9223372036854775807, 5, [1, 9223372036854775807])]
    snapshots = py["snapshots"]

    # One value above 2^63-1: the window fails, clearly, and commits nothing.
    gateway.sql(f"INSERT INTO {db}.u VALUES ('2026-02-01 00:00:00.003', 9223372036854775808, NULL, [])")
    p = run(cfg, "once")
    out = p.stdout + p.stderr
    assert p.returncode != 0, out
    assert "does not fit Iceberg long" in out and '"seq"' in out and f"{db}.u" in out, out
    after = verify(tmp_path, "cold.u", key="seq", sums=("seq",), clickhouse=False)["pyiceberg"]
    assert after["count"] == 2 and after["snapshots"] == snapshots

    # The table now stores long: a config that maps UInt64 to decimal says what to set.
    table.pop("uint64")
    cfg = write_config(tmp_path / "c.toml", gateway, [table], tmp_path)
    p = run(cfg, "once")
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "seq" in out and "set uint64 =" in out, out
