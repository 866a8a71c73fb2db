"""Test harness: the real ClickHouse engine behind our gateway, the real binary, and
independent readers of what lands in Iceberg."""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
PASSWORD = "Test-Pa55word-Never-Logged"


def binary():
    env = os.environ.get("ICEBERG_OFFLOAD_BIN")
    if env:
        return env
    target = os.environ.get("CARGO_TARGET_DIR", str(ROOT / "target"))
    return str(Path(target) / "debug" / "iceberg-offload")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gateway:
    """The chdb-backed ClickHouse HTTP gateway (dev/clickhouse_gateway.py)."""

    def __init__(self, data_dir, password=PASSWORD):
        self.data_dir = Path(data_dir)
        self.password = password
        self.port = free_port()
        pw = self.data_dir.parent / "gateway-password"
        pw.write_text(password)
        self.log = open(self.data_dir.parent / "gateway.log", "ab")
        self.proc = subprocess.Popen(
            [PYTHON, str(ROOT / "dev" / "clickhouse_gateway.py"), "--data", str(self.data_dir),
             "--port", str(self.port), "--password-file", str(pw)],
            stdout=self.log, stderr=self.log)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if self.sql("SELECT 1").strip() == "1":
                    return
            except (OSError, urllib.error.URLError):
                time.sleep(0.2)
        raise RuntimeError("gateway did not start")

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def sql(self, query, params=None):
        qs = {f"param_{k}": v for k, v in (params or {}).items()}
        req = urllib.request.Request(
            self.url + "/?" + urllib.parse.urlencode(qs), data=query.encode(),
            headers={"X-ClickHouse-User": "default", "X-ClickHouse-Key": self.password})
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                return r.read().decode()
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"ClickHouse error: {e.read().decode()}") from None

    def scalar(self, query, params=None):
        return self.sql(query, params).strip()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


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


def create_bronze(gw, db, table):
    gw.sql(f"CREATE DATABASE IF NOT EXISTS {db}")
    gw.sql(BRONZE_DDL.format(db=db, table=table))


def insert_bronze(gw, db, table, n, start_ms, step_ms=1, seq_start=0):
    """n trades from start_ms (Unix ms), step_ms apart, sequence numbers from seq_start."""
    gw.sql(f"""
        INSERT INTO {db}.{table} (exchange_timestamp, sequence_number, symbol, price, quantity, quote_volume,
                                  event_time, kafka_offset, kafka_partition)
        SELECT fromUnixTimestamp64Milli(toInt64({start_ms} + intDiv(number * {step_ms * 1000}, 1000))),
               {seq_start} + number,
               ['BTCUSDT', 'ETHUSDT', 'SOLUSDT', 'XRPUSDT'][number % 4 + 1],
               toDecimal64(20000 + (number % 10007) / 3, 8),
               toDecimal64((number % 97 + 1) / 13, 8),
               toDecimal64((20000 + (number % 10007) / 3) * ((number % 97 + 1) / 13), 8),
               fromUnixTimestamp64Milli(toInt64({start_ms} + intDiv(number * {step_ms * 1000}, 1000) + 5)),
               0, 0
        FROM numbers({n})""")


def now_ms():
    return int(time.time() * 1000)


def write_config(path, gw, tables, tmp, extra_service="", catalog_uri=None, state_url=None):
    tmp = Path(tmp)
    catalog_uri = catalog_uri or f"sqlite:{tmp / 'catalog.db'}"
    state_url = state_url or f"sqlite:{tmp / 'state.db'}"
    blocks = []
    for t in tables:
        lines = [f'{k} = {json.dumps(v)}' for k, v in t.items()]
        blocks.append("[[tables]]\n" + "\n".join(lines))
    text = f"""
[service]
interval = "15m"
parallelism = 2
table_timeout = "5m"
retries = 1
retry_backoff = "100ms"
metrics_listen = "127.0.0.1:0"
{extra_service}

[clickhouse]
url = "{gw.url}"
user = "default"
password_env = "TEST_CH_PASSWORD"
compression = "lz4"

[catalog]
type = "sql"
name = "offload"
uri = "{catalog_uri}"
warehouse = "{tmp / 'warehouse'}"

[state]
url = "{state_url}"

""" + "\n\n".join(blocks) + "\n"
    Path(path).write_text(text)
    return Path(path)


def bronze_table(db, table, **over):
    t = {
        "source": f"{db}.{table}",
        "target": f"cold.{table}",
        "layer": "bronze",
        "cursor": "exchange_timestamp",
        "tiebreak": "sequence_number",
        "settle_delay": "5m",
        "max_rows_per_commit": 1000000,
        "partition": ["day(exchange_timestamp)"],
    }
    t.update(over)
    return t


def run(config, *args, env=None, timeout=900, check=False):
    e = dict(os.environ)
    e["TEST_CH_PASSWORD"] = PASSWORD
    e.update(env or {})
    p = subprocess.run([binary(), "--config", str(config), *args], capture_output=True, text=True, env=e, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def verify(tmp, table, key="symbol,sequence_number", sums=("price", "quantity"), rows=False, clickhouse=True):
    tmp = Path(tmp)
    cmd = [PYTHON, str(ROOT / "dev" / "verify_iceberg.py"), "--catalog-uri", f"sqlite:////{tmp / 'catalog.db'}".replace("/////", "////"),
           "--warehouse", f"file://{tmp / 'warehouse'}", "--table", table, "--key", key]
    for s in sums:
        cmd += ["--sum", s]
    if rows:
        cmd.append("--rows")
    if not clickhouse:
        cmd.append("--no-clickhouse")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise AssertionError(f"verifier failed:\n{p.stderr}")
    return json.loads(p.stdout)


def source_stats(gw, db, table, watermark_position, key="symbol, sequence_number", sums=("price", "quantity"), cursor="exchange_timestamp", tiebreak="sequence_number"):
    """Count, sums and distinct keys of the source rows at or below a watermark position."""
    pos = json.loads(watermark_position)
    at = f"fromUnixTimestamp64Nano(toInt64({pos['cursor_ns']}), 'UTC')"
    if pos.get("tiebreak") is not None:
        pred = f"({cursor} < {at} OR ({cursor} = {at} AND {tiebreak} <= {pos['tiebreak']}))"
    else:
        pred = f"{cursor} <= {at}"
    s = "".join(f", toString(sum({c}))" for c in sums)
    row = gw.scalar(f"SELECT count(), uniqExact(({key})){s} FROM {db}.{table} WHERE {pred}").split("\t")
    return {"count": int(row[0]), "distinct_keys": int(row[1]), "sums": dict(zip(sums, row[2:]))}


def assert_equal_to_source(gw, tmp, db, table, target=None):
    """Invariant check: Iceberg equals the source up to W, seen by both independent readers."""
    target = target or f"cold.{table}"
    got = verify(tmp, target)
    py = got["pyiceberg"]
    wm = py["properties"]["offload.watermark.position"]
    src = source_stats(gw, db, table, wm)
    assert py["duplicates"] == 0, f"duplicates in Iceberg: {py['duplicates']}"
    for reader in ("pyiceberg", "clickhouse"):
        r = got[reader]
        assert r["count"] == src["count"], f"{reader}: {r['count']} rows, source has {src['count']} up to W"
        assert r["distinct_keys"] == src["distinct_keys"], f"{reader}: distinct keys {r['distinct_keys']} vs {src['distinct_keys']}"
        for c, v in src["sums"].items():
            assert float(r["sums"][c]) == float(v) and str(r["sums"][c]).rstrip("0").rstrip(".") == str(v).rstrip("0").rstrip("."), \
                f"{reader}: sum({c}) {r['sums'][c]} vs source {v}"
    return got, src
