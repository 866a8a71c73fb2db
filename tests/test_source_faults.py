"""Exactly-once at the source (docs/exactly-once.md I1, I10, I11): conditions set up outside the
service — a server-side settings profile, a clock that is off, awkward values, configuration
changes — and every row must land once, checked by pyiceberg and ClickHouse icebergLocal()."""
import json
import re
import signal
import subprocess
import threading
import time

import pytest

from harness import (PYTHON, assert_directory_reader_sees_the_catalog, start_once_until_first_window, assert_equal_to_source, bronze_table, create_bronze,
                     insert_bronze, now_ms, run, verify, write_config)


class ServerProfile:
    """Settings the server applies to every query of the session that does not set them itself,
    as a user's settings profile does on a real server (the gateway's one chdb session)."""

    def __init__(self, gateway, **settings):
        self.gateway, self.settings = gateway, settings

    def __enter__(self):
        for k, v in self.settings.items():
            self.gateway.sql(f"SET {k} = {v!r}" if isinstance(v, str) else f"SET {k} = {v}")
        return self

    def __exit__(self, *exc):
        defaults = {"max_result_rows": 0, "result_overflow_mode": "throw", "limit": 0, "offset": 0,
                    "max_rows_to_read": 0, "read_overflow_mode": "throw", "session_timezone": ""}
        for k in self.settings:
            v = defaults[k]
            self.gateway.sql(f"SET {k} = {v!r}" if isinstance(v, str) else f"SET {k} = {v}")


def test_a_profile_that_truncates_results_never_commits_a_partial_window(gateway, db, tmp_path):
    """I1: `max_result_rows` with `result_overflow_mode = 'break'` returns part of a result as if
    it were whole. The service insists on an error: nothing partial is committed, the error
    names the table and what to change, and once the profile is lifted every row lands once."""
    create_bronze(gateway, db, "trades")
    insert_bronze(gateway, db, "trades", 300_000, now_ms() - 7_200_000, step_ms=10)
    cfg = write_config(tmp_path / "c.toml", gateway, [bronze_table(db, "trades", max_rows_per_commit=300_000)], tmp_path)
    with ServerProfile(gateway, max_result_rows=100_000, result_overflow_mode="break"):
        p = run(cfg, "once")
    assert p.returncode == 3, p.stdout + p.stderr[-3000:]
    assert "trades" in p.stdout and "max_rows_per_commit" in p.stdout, p.stdout
    assert "[process_error]" in p.stdout, p.stdout
    got = run(cfg, "watermark", "show", "--json", check=True).stdout
    assert '"iceberg_watermark": null' in got, "nothing may be committed from a truncated read: " + got
    run(cfg, "once", check=True)
    _, src = assert_equal_to_source(gateway, tmp_path, db, "trades")
    assert src["count"] == 300_000
    assert_directory_reader_sees_the_catalog(tmp_path)


def test_a_profile_wide_limit_does_not_shorten_windows(gateway, db, tmp_path):
    """I1: a profile's `limit` setting applies to every SELECT; the service's queries override it."""
    create_bronze(gateway, db, "trades")
    insert_bronze(gateway, db, "trades", 50_000, now_ms() - 7_200_000, step_ms=100)
    cfg = write_config(tmp_path / "c.toml", gateway, [bronze_table(db, "trades", max_rows_per_commit=20_000)], tmp_path)
    with ServerProfile(gateway, limit=1_000):
        run(cfg, "once", check=True)
    _, src = assert_equal_to_source(gateway, tmp_path, db, "trades")
    assert src["count"] == 50_000


def faketime(offset):
    """Runs the service with its clock `offset` (e.g. "+10m") from the real one, as libfaketime
    does to a process (its monotonic clock, used for timers, is left alone)."""
    return {"FAKETIME_DONT_FAKE_MONOTONIC": "1", "LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
            "FAKETIME": offset}


@pytest.mark.parametrize("offset", ["+10m", "-10m"])
def test_a_host_clock_off_by_ten_minutes_skips_nothing(gateway, db, tmp_path, offset):
    """I1, one clock: the settle limit comes from ClickHouse's clock. With the service's clock
    10 minutes ahead, its own clock would take rows that are still arriving; behind, it would
    only lag. Either way every row lands once, and the skew is measured and reported."""
    create_bronze(gateway, db, "trades")
    start = now_ms() - 20 * 60_000
    insert_bronze(gateway, db, "trades", 2_000, start, step_ms=600)  # the last 20 minutes, up to now
    cfg = write_config(tmp_path / "c.toml", gateway, [bronze_table(db, "trades", settle_delay="5m")], tmp_path)
    p = run(cfg, "once", env=faketime(offset))
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    sign = "-" if offset.startswith("+") else "+"
    assert f"ClickHouse's clock is {sign}6" in p.stderr or f"ClickHouse's clock is {sign}5" in p.stderr, p.stderr[-2000:]
    # Rows that arrive now, 1 to 4 minutes old: settled only after W, never below it.
    insert_bronze(gateway, db, "trades", 500, now_ms() - 4 * 60_000, step_ms=360, seq_start=100_000)
    p = run(cfg, "once", env=faketime(offset))
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    got, src = assert_equal_to_source(gateway, tmp_path, db, "trades")
    wm_ms = json.loads(got["pyiceberg"]["properties"]["offload.watermark.position"])["cursor_ns"] // 1_000_000
    assert wm_ms <= now_ms() - 5 * 60_000 + 5_000, "W follows ClickHouse's clock minus the settle delay"
    late = late_rows_in(p.stderr)
    assert late == 0, f"rows skipped below W: {late}"


def test_a_skew_beyond_the_bound_fails_the_table_clearly(gateway, db, tmp_path):
    create_bronze(gateway, db, "trades")
    insert_bronze(gateway, db, "trades", 1_000, now_ms() - 7_200_000, step_ms=100)
    cfg = write_config(tmp_path / "c.toml", gateway, [bronze_table(db, "trades")], tmp_path)
    cfg.write_text(cfg.read_text().replace('compression = "lz4"', 'compression = "lz4"\nmax_clock_skew = "1m"'))
    p = run(cfg, "once", env=faketime("+10m"))
    assert p.returncode == 3, p.stdout + p.stderr[-3000:]
    assert "clickhouse.max_clock_skew" in p.stdout and "NTP" in p.stdout, p.stdout
    assert "[process_error]" in p.stdout


def late_rows_in(log):
    """The audit's count of late rows (I9); the audit runs at the end of every table run."""
    m = re.findall(r"missing_rows=(\d+)", log)
    assert m, "the audit ran"
    return int(m[-1])


def iceberg_count(tmp_path, table, key):
    got = verify(tmp_path, table, key=key, sums=())
    assert got["pyiceberg"]["count"] == got["clickhouse"]["count"], got
    assert got["pyiceberg"]["duplicates"] == 0, got
    return got


@pytest.mark.parametrize("cursor_type,now_expr", [("Date", "today()"), ("DateTime", "now()"),
                                                  ("DateTime64(3)", "now64(3)")])
def test_rows_still_arriving_for_the_current_unit_are_not_taken_early(gateway, db, tmp_path, cursor_type, now_expr):
    """I1, cursor granularity: a value is settled only when the whole unit it stands for has
    passed. Rows stamped with the current day/second keep arriving while cycles run; every row
    lands once and none before its unit is over."""
    gateway.sql(f"CREATE TABLE {db}.events (ts {cursor_type}, id UInt64, v Int64) ENGINE = MergeTree ORDER BY (ts, id)")
    # Settled history: the previous three units.
    unit = {"Date": "toIntervalDay", "DateTime": "toIntervalSecond", "DateTime64(3)": "toIntervalMillisecond"}[cursor_type]
    gateway.sql(f"INSERT INTO {db}.events SELECT {now_expr} - {unit}(1 + number % 3), number, number FROM numbers(300)")
    table = {"source": f"{db}.events", "target": "cold.events", "layer": "gold", "cursor": "ts",
             "settle_delay": "0s", "partition": []}
    cfg = write_config(tmp_path / "c.toml", gateway, [table], tmp_path)
    stop, inserted = threading.Event(), [300]

    def arriving():
        while not stop.is_set():
            gateway.sql(f"INSERT INTO {db}.events SELECT {now_expr}, {inserted[0]} + number, 1 FROM numbers(20)")
            inserted[0] += 20
            time.sleep(0.05)
    t = threading.Thread(target=arriving)
    t.start()
    try:
        for _ in range(3):
            p = run(cfg, "once")
            assert p.returncode == 0, p.stdout + p.stderr[-3000:]
            if cursor_type == "Date":
                got = iceberg_count(tmp_path, "cold.events", "id")
                assert got["pyiceberg"]["count"] == 300, "no row of today may be offloaded before the day is over"
    finally:
        stop.set()
        t.join()
    if cursor_type != "Date":
        time.sleep(1.2)  # the last unit passes
        assert run(cfg, "once").returncode == 0
        got = iceberg_count(tmp_path, "cold.events", "id")
        assert got["pyiceberg"]["count"] == inserted[0], (got["pyiceberg"]["count"], inserted[0])
    else:
        got = iceberg_count(tmp_path, "cold.events", "id")
        assert got["pyiceberg"]["count"] == 300, "only the days that are over"


AWKWARD = {
    "String": ["''", "'a'", "'a\\tb'", "'a\\nb'", "'back\\\\slash'", "'quote\\''", "'dq\"'", "'nul\\0x'", "'ünï'",
               "'a b'", "'\\\\'", "'\\\\t'", "'\\r'", "'{x}'", "'%2F'"],
    "FixedString(4)": ["'a'", "'a\\0b'", "'ab'", "unhex('FF00FF00')", "unhex('00000000')", "'abcd'", "'\\t\\n\\\\\\''",
                       "unhex('80818283')"],
    "UUID": ["toUUID('00000000-0000-0000-0000-000000000000')", "toUUID('ffffffff-ffff-ffff-ffff-ffffffffffff')",
             "toUUID('01234567-89ab-cdef-0123-456789abcdef')", "toUUID('7fffffff-0000-0000-0000-000000000001')"],
    "UInt64": ["0", "1", "9223372036854775807", "9223372036854775808", "18446744073709551615", "4294967296"],
    "Int64": ["-9223372036854775808", "-1", "0", "9223372036854775807", "42"],
    "Decimal(38, 10)": ["toDecimal128('-99999999999999999999999999.9999999999', 10)", "toDecimal128('0', 10)",
                        "toDecimal128('0.0000000001', 10)", "toDecimal128('123.4567890123', 10)",
                        "toDecimal128('99999999999999999999999999.9999999999', 10)"],
}


@pytest.mark.parametrize("tb_type", list(AWKWARD))
def test_windows_cut_between_awkward_tiebreak_values_land_every_row_once(gateway, db, tmp_path, tb_type):
    """I1, any bound round-trips: windows of two rows, all rows sharing two cursor values, so
    every cut falls between two tiebreak values — with TAB, newline, backslash, quotes, NUL,
    bytes that are not UTF-8, FixedString padding, UUID, UInt64 up to 2^64−1, Decimal(38).
    No table gets stuck, every row lands once."""
    gateway.sql(f"CREATE TABLE {db}.awk (ts DateTime64(3), tb {tb_type}, v Int64) ENGINE = MergeTree ORDER BY (ts, tb)")
    values = AWKWARD[tb_type]
    for i, ts in enumerate(["now64(3) - toIntervalHour(2)", "now64(3) - toIntervalHour(1)"]):
        gateway.sql(f"INSERT INTO {db}.awk VALUES " + ", ".join(f"({ts}, {v}, {i * 100 + j})" for j, v in enumerate(values)))
    n = 2 * len(values)
    assert int(gateway.scalar(f"SELECT uniqExact(ts, tb) FROM {db}.awk")) == n
    table = {"source": f"{db}.awk", "target": "cold.awk", "cursor": "ts", "tiebreak": "tb", "settle_delay": "1s",
             "max_rows_per_commit": 2, "partition": []}
    cfg = write_config(tmp_path / "c.toml", gateway, [table], tmp_path)
    p = run(cfg, "once")
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    assert f"{n} rows in {n // 2} windows" in p.stdout, p.stdout
    assert run(cfg, "once").returncode == 0, "the next cycle is not stuck on its watermark"
    got = verify(tmp_path, "cold.awk", key="ts,tb,v", sums=("v",))
    for reader in ("pyiceberg", "clickhouse"):
        assert got[reader]["count"] == n and got[reader]["distinct_keys"] == n, (reader, got[reader])
        assert int(got[reader]["sums"]["v"]) == int(gateway.scalar(f"SELECT sum(v) FROM {db}.awk")), got[reader]


def test_a_changed_tiebreak_cursor_or_source_is_refused_until_the_watermark_is_moved_on_purpose(gateway, db, tmp_path):
    """I11: W is recorded with the source, cursor and tiebreak it was measured on. Removing the
    tiebreak while W is mid-timestamp, changing the cursor or the source: refused, naming the
    field and the way out; `watermark set` moves W on purpose (a dry run first)."""
    create_bronze(gateway, db, "trades")
    insert_bronze(gateway, db, "trades", 400, now_ms() - 7_200_000, step_ms=0.01)  # 100 rows per millisecond
    base = bronze_table(db, "trades", max_rows_per_commit=150)
    cfg = write_config(tmp_path / "c.toml", gateway, [base], tmp_path)
    # Stopped (SIGTERM) after its first window: W ends mid-timestamp, on a tiebreak.
    proc, _ = start_once_until_first_window(cfg)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert_equal_to_source(gateway, tmp_path, db, "trades")
    assert "#" in run(cfg, "watermark", "show", check=True).stdout, "W ends mid-timestamp, on a tiebreak"

    def refused(**change):
        t = dict(base, **change)
        t = {k: v for k, v in t.items() if v is not None}
        c = write_config(tmp_path / "c2.toml", gateway, [t], tmp_path)
        p = run(c, "once")
        assert p.returncode == 3, p.stdout + p.stderr[-2000:]
        assert "watermark set trades" in p.stdout, p.stdout
        return p.stdout, c

    out, _ = refused(tiebreak=None)
    assert "measured on tiebreak sequence_number" in out, out
    out, _ = refused(cursor="event_time")
    assert "measured on cursor exchange_timestamp" in out, out
    gateway.sql(f"CREATE TABLE {db}.trades_v2 AS {db}.trades")
    gateway.sql(f"INSERT INTO {db}.trades_v2 SELECT * FROM {db}.trades")
    out, moved = refused(source=f"{db}.trades_v2")
    assert f"measured on source {db}.trades" in out, out
    # The new source holds the same rows: re-record W for it, a dry run first.
    dry = run(moved, "watermark", "set", "trades_v2", "--to", "current", check=True).stdout
    assert "dry run" in dry and "no source row lies between" in dry, dry
    assert run(moved, "once").returncode == 3, "a dry run changes nothing"
    applied = run(moved, "watermark", "set", "trades_v2", "--to", "current", "--apply", check=True)
    assert "applied: snapshot" in applied.stdout
    assert "moved by an operator" in applied.stderr
    insert_bronze(gateway, db, "trades_v2", 100, now_ms() - 3_600_000, step_ms=10, seq_start=10_000)
    run(moved, "once", check=True)
    _, src = assert_equal_to_source(gateway, tmp_path, db, "trades_v2", target="cold.trades")
    assert src["count"] == 500
    snaps = verify(tmp_path, "cold.trades", sums=())["pyiceberg"]["snapshots"]
    assert any(s.get("offload.watermark-moved") == "true" for s in snaps), "the move is marked in the history"


def test_a_column_added_to_the_source_mid_backfill_has_its_values_from_the_next_window(gateway, db, tmp_path):
    """Schema per window: a column added while a backfill runs is added to the target before
    the next window is read; no committed row has NULL where the source has a value."""
    create_bronze(gateway, db, "trades")
    insert_bronze(gateway, db, "trades", 200_000, now_ms() - 7_200_000, step_ms=10)
    cfg = write_config(tmp_path / "c.toml", gateway, [bronze_table(db, "trades", max_rows_per_commit=10_000)], tmp_path)
    proc, _ = start_once_until_first_window(cfg)
    gateway.sql(f"ALTER TABLE {db}.trades ADD COLUMN venue String DEFAULT 'main'")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err[-3000:]
    got, src = assert_equal_to_source(gateway, tmp_path, db, "trades")
    assert src["count"] == 200_000
    check = f"""
import json, pyarrow.compute as pc
from pyiceberg.catalog.sql import SqlCatalog
c = SqlCatalog("offload", uri="sqlite:///{tmp_path / 'catalog.db'}", warehouse="file://{tmp_path / 'warehouse'}")
t = c.load_table("cold.trades").scan().to_arrow().sort_by([("exchange_timestamp", "ascending"), ("sequence_number", "ascending")])
v = t["venue"].to_pylist()
nulls = [i for i, x in enumerate(v) if x is None]
print(json.dumps({{"nulls": len(nulls), "last_null": max(nulls, default=-1),
                   "first_value": next((i for i, x in enumerate(v) if x is not None), -1),
                   "values": sorted(set(x for x in v if x is not None))}}))
"""
    r = json.loads(subprocess.run([PYTHON, "-c", check], capture_output=True, text=True, check=True).stdout)
    assert r["values"] == ["main"], r
    assert 0 < r["nulls"] < 200_000 and r["last_null"] < r["first_value"], \
        f"only windows committed before the column existed may lack it: {r}"


def test_a_date_cursor_day_ends_at_midnight_in_clickhouses_time_zone(gateway, db, tmp_path):
    """I1, granularity: a `Date` is dated where the rows are dated, in ClickHouse's time zone. On
    a server 12 hours behind UTC, its "today" may already be UTC's yesterday: those rows are still
    arriving and must wait for the server's midnight."""
    with ServerProfile(gateway, session_timezone="Etc/GMT+12"):
        gateway.sql(f"CREATE TABLE {db}.daily (d Date, id UInt64) ENGINE = MergeTree ORDER BY (d, id)")
        gateway.sql(f"INSERT INTO {db}.daily SELECT today() - intDiv(number, 100), number FROM numbers(300)")
        table = {"source": f"{db}.daily", "target": "cold.daily", "layer": "gold", "cursor": "d", "settle_delay": "0s",
                 "partition": []}
        cfg = write_config(tmp_path / "c.toml", gateway, [table], tmp_path)
        p = run(cfg, "once")
        assert p.returncode == 0, p.stdout + p.stderr[-3000:]
        assert "200 rows" in p.stdout, "the server's today (100 rows) waits; its two previous days are taken: " + p.stdout
        got = iceberg_count(tmp_path, "cold.daily", "id")
        assert got["pyiceberg"]["count"] == 200
