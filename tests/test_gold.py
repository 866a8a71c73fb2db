"""Gold tables (docs/exactly-once.md I12): merging table engines are read as ClickHouse answers
them after merging (`FINAL`), and a row is taken only once its key can no longer change
(`closed_after`). Checked with pyiceberg, ClickHouse icebergLocal() and DuckDB against
`SELECT … FINAL`."""
import time

from harness import run, verify, write_config

OHLCV = """
CREATE TABLE {db}.ohlcv_1m (
    exchange LowCardinality(String), canonical_symbol LowCardinality(String), window_start DateTime64(3),
    open Decimal(18, 8), close Decimal(18, 8), high Decimal(18, 8), low Decimal(18, 8),
    volume Decimal(38, 8), quote_volume Decimal(38, 8), trade_count UInt64
) ENGINE = SummingMergeTree((volume, quote_volume, trade_count))
PARTITION BY (exchange, toYYYYMM(window_start))
ORDER BY (exchange, canonical_symbol, window_start)
"""


def insert_bars(gateway, db, part):
    """One insert block (one part): 40 closed bars (2 exchanges × 4 symbols × the 5 minutes that
    ended 10 to 6 minutes ago) and 8 bars of the current, still open, minute."""
    gateway.sql(f"""
        INSERT INTO {db}.ohlcv_1m
        SELECT ['binance', 'kraken'][number % 2 + 1], ['BTC', 'ETH', 'SOL', 'XRP'][intDiv(number, 2) % 4 + 1],
               if(number < 40, toStartOfMinute(now64(3)) - toIntervalMinute(6 + intDiv(number, 8)), toStartOfMinute(now64(3))),
               100 + {part}, 100 + {part}, 110, 90, {part}, {part} * 100, {part}
        FROM numbers(48)""")


def gold_table(db, name, **over):
    t = {"source": f"{db}.{name}", "target": f"cold.{name}", "layer": "gold", "cursor": "window_start",
         "settle_delay": "5s", "closed_after": "1m", "partition": ["day(window_start)"]}
    t.update(over)
    return t


def test_a_summing_table_with_unmerged_parts_and_open_bars_lands_as_final(gateway, db, tmp_path):
    # The "open" bars are those of the current minute: start early in a minute so that it has not
    # ended by the checks (a loaded machine once crossed the boundary: 48 closed bars, not 40).
    while time.time() % 60 > 20:
        time.sleep(0.5)
    gateway.sql(OHLCV.format(db=db))
    gateway.sql(f"SYSTEM STOP MERGES {db}.ohlcv_1m")
    for part in (1, 2, 3):
        insert_bars(gateway, db, part)
    assert int(gateway.scalar(f"SELECT count() FROM {db}.ohlcv_1m")) == 144, "three unmerged parts"
    cfg = write_config(tmp_path / "c.toml", gateway, [gold_table(db, "ohlcv_1m")], tmp_path)
    p = run(cfg, "once")
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    got = verify(tmp_path, "cold.ohlcv_1m", key="exchange,canonical_symbol,window_start", sums=("volume", "trade_count"))
    final = gateway.sql(f"SELECT count(), sum(volume), sum(trade_count) FROM {db}.ohlcv_1m FINAL "
                        f"WHERE window_start < toStartOfMinute(now64(3))").strip().split("\t")
    assert final[0] == "40"
    for reader in ("pyiceberg", "clickhouse", "duckdb"):
        r = got[reader]
        assert r["count"] == 40 and r["distinct_keys"] == 40, (reader, r)
        assert float(r["sums"]["volume"]) == float(final[1]) == 240.0, (reader, r["sums"], final)
        assert int(float(r["sums"]["trade_count"])) == int(final[2]), (reader, r["sums"], final)
    assert "48 rows" not in p.stdout, "the open bars (current minute) must wait until they close"


def test_a_replacing_table_lands_the_latest_version_and_final_can_be_turned_off(gateway, db, tmp_path):
    gateway.sql(f"""CREATE TABLE {db}.positions (account String, window_start DateTime64(3), qty Int64, version UInt64)
                    ENGINE = ReplacingMergeTree(version) ORDER BY (account, window_start)""")
    gateway.sql(f"SYSTEM STOP MERGES {db}.positions")
    for version in (1, 2):
        gateway.sql(f"""INSERT INTO {db}.positions SELECT concat('acct-', toString(number)),
                        toStartOfHour(now64(3)) - toIntervalHour(1), number * {version}, {version} FROM numbers(50)""")
    tables = [gold_table(db, "positions", closed_after="0s", partition=[]),
              gold_table(db, "positions", target="cold.positions_raw", closed_after="0s", partition=[], final="never")]
    tables[1]["source"] = f"{db}.positions"
    cfg = write_config(tmp_path / "c.toml", gateway, tables[:1], tmp_path)
    run(cfg, "once", check=True)
    got = verify(tmp_path, "cold.positions", key="account", sums=("qty",))
    for reader in ("pyiceberg", "clickhouse", "duckdb"):
        assert got[reader]["count"] == 50 and got[reader]["distinct_keys"] == 50, (reader, got[reader])
        assert int(float(got[reader]["sums"]["qty"])) == 2 * sum(range(50)), "the latest version of every key"
    raw = write_config(tmp_path / "raw.toml", gateway, tables[1:], tmp_path, state_url=f"sqlite:{tmp_path / 'raw.db'}")
    raw.write_text(raw.read_text().replace(f'source = "{db}.positions"', f'source = "{db}.positions"'))
    run(raw, "once", check=True)
    assert verify(tmp_path, "cold.positions_raw", key="account,version", sums=())["pyiceberg"]["count"] == 100, \
        "final = \"never\" reads the parts as they are"
