"""Test harness: the real ClickHouse engine behind our gateway, the real binary, and
independent readers of what lands in Iceberg."""
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "dev"))
import k2data  # noqa: E402
from clickhouse_local import PASSWORD, PYTHON, Gateway, free_port  # noqa: E402,F401


def binary():
    env = os.environ.get("ICEBERG_OFFLOAD_BIN")
    if env:
        return env
    target = os.environ.get("CARGO_TARGET_DIR", str(ROOT / "target"))
    return str(Path(target) / "debug" / "iceberg-offload")


def fault_binary():
    """The binary built with the test-only `fault-injection` feature (dev/test.sh)."""
    target = os.environ.get("CARGO_TARGET_DIR", str(ROOT / "target"))
    return str(Path(target) / "fault-injection" / "iceberg-offload")


def create_bronze(gw, db, table):
    k2data.create_bronze(gw.sql, db, table)


def insert_bronze(gw, db, table, n, start_ms, step_ms=1, seq_start=0):
    k2data.insert_bronze(gw.sql, db, table, n, start_ms, step_ms, seq_start)


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


def view_home(gateway, tmp_path):
    """A folder for a test's catalog and warehouse under ClickHouse's user_files_path, where a
    view's icebergLocal may read it."""
    home = gateway.user_files / tmp_path.name
    home.mkdir(exist_ok=True)
    return home


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


def run(config, *args, env=None, timeout=900, check=False, exe=None):
    e = dict(os.environ)
    e["TEST_CH_PASSWORD"] = PASSWORD
    e.update(env or {})
    p = subprocess.run([exe or binary(), "--config", str(config), *args], capture_output=True, text=True, env=e, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def spark_enabled():
    """Spark reads in every verification unless ICEBERG_OFFLOAD_SPARK=0 (a developer's quick
    run; CI never sets it)."""
    return os.environ.get("ICEBERG_OFFLOAD_SPARK", "1") != "0"


def sqlite_catalog(tmp, name="offload"):
    """The Spark catalog (dev/spark_reader.py) for the SQLite catalog write_config sets up."""
    tmp = Path(tmp)
    return {"type": "jdbc", "uri": f"jdbc:sqlite:{tmp / 'catalog.db'}", "warehouse": f"file://{tmp / 'warehouse'}", "name": name}


def spark_read(catalog, table, key="symbol,sequence_number", sums=("price", "quantity"), rows=False):
    from spark_reader import Spark
    return Spark.shared().read(catalog, table, key=key, sums=sums, rows=rows)


class Readers:
    """dev/verify_iceberg.py --serve, started once per test process: the readers we did not write
    (pyiceberg, ClickHouse, DuckDB), each read in a fresh child process forked from it (see its
    `serve`), without paying an interpreter's start and imports at every read."""
    _proc = None
    _lock = threading.Lock()

    @classmethod
    def read(cls, argv, env=None, timeout=600):
        with cls._lock:
            if cls._proc is None or cls._proc.poll() is not None:
                cls._proc = subprocess.Popen([PYTHON, str(ROOT / "dev" / "verify_iceberg.py"), "--serve"],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                             start_new_session=True)
            proc = cls._proc
            proc.stdin.write(json.dumps({"argv": [str(a) for a in argv], "env": env or {}}) + "\n")
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], timeout)
            line = proc.stdout.readline() if ready else ""
            if not line:
                os.killpg(proc.pid, signal.SIGKILL)  # the server and a reader child that hangs
                cls._proc = None
                raise AssertionError(f"the Iceberg readers gave no answer within {timeout} s")
        reply = json.loads(line)
        if not reply["ok"]:
            raise AssertionError(f"verifier failed:\n{reply['error']}")
        return reply["result"]


def verify(tmp, table, key="symbol,sequence_number", sums=("price", "quantity"), rows=False, clickhouse=True, s3=None,
           spark_catalog=None, spark=True):
    """`s3`: {"endpoint", "key", "secret", "warehouse"} for a warehouse on S3 (Spark cannot read
    S3 here: no AWS SDK jars offline). `spark_catalog`: how Spark reaches the table when it is
    not the SQLite catalog in `tmp` (a REST catalog, PostgreSQL)."""
    tmp = Path(tmp)
    warehouse = s3["warehouse"] if s3 else f"file://{tmp / 'warehouse'}"
    argv = ["--catalog-uri", f"sqlite:////{tmp / 'catalog.db'}".replace("/////", "////"),
            "--warehouse", warehouse, "--table", table, "--key", key]
    env = {}
    if s3:
        argv += ["--s3-endpoint", s3["endpoint"], "--s3-key", s3["key"]]
        env["VERIFY_S3_SECRET"] = s3["secret"]
    for s in sums:
        argv += ["--sum", s]
    if rows:
        argv.append("--rows")
    if not clickhouse:
        argv.append("--no-clickhouse")
    got = Readers.read(argv, env)
    if spark and spark_enabled() and not s3:
        got["spark"] = spark_read(spark_catalog or sqlite_catalog(tmp), table, key=key, sums=sums, rows=rows)
    return got


def source_stats(gw, db, table, watermark_position, **kw):
    return k2data.source_stats(gw.scalar, db, table, watermark_position, **kw)


def assert_equal_to_source(gw, tmp, db, table, target=None, s3=None, spark_catalog=None, spark=True):
    """Invariant check: Iceberg equals the source up to W, seen by four readers we did not
    write: pyiceberg (the catalog), ClickHouse icebergLocal() (the table's folder, no pinned
    metadata file), DuckDB iceberg_scan() (the catalog's current metadata file) and Spark
    (Iceberg's Java library, through the same catalog). `spark=False` inside randomised loops
    of many trials (Spark then checks the end state: about 2 s a read on 2 cores)."""
    target = target or f"cold.{table}"
    got = verify(tmp, target, s3=s3, spark_catalog=spark_catalog, spark=spark)
    py = got["pyiceberg"]
    wm = py["properties"]["offload.watermark.position"]
    src = source_stats(gw, db, table, wm)
    assert py["duplicates"] == 0, f"duplicates in Iceberg: {py['duplicates']}"
    for reader in [r for r in ("pyiceberg", "clickhouse", "duckdb", "spark") if r in got]:
        r = got[reader]
        assert r["count"] == src["count"], f"{reader}: {r['count']} rows, source has {src['count']} up to W"
        assert r["distinct_keys"] == src["distinct_keys"], f"{reader}: distinct keys {r['distinct_keys']} vs {src['distinct_keys']}"
        for c, v in src["sums"].items():
            assert float(r["sums"][c]) == float(v) and str(r["sums"][c]).rstrip("0").rstrip(".") == str(v).rstrip("0").rstrip("."), \
                f"{reader}: sum({c}) {r['sums'][c]} vs source {v}"
    return got, src


def catalog_metadata_location(tmp, table, catalog="offload"):
    """The metadata file the SQLite catalog holds as current for `table` (namespace.name)."""
    import sqlite3
    ns, name = table.rsplit(".", 1)
    con = sqlite3.connect(Path(tmp) / "catalog.db")
    try:
        row = con.execute("SELECT metadata_location FROM iceberg_tables WHERE catalog_name = ? AND table_namespace = ? "
                          "AND table_name = ?", (catalog, ns, name)).fetchone()
    finally:
        con.close()
    return row[0] if row else None


def metadata_files_ahead(location):
    """`*.metadata.json` files numbered above the catalog's current one, in its folder: what a
    directory reader (icebergLocal() without a pinned file) would take as the table (I8)."""
    path = Path(location[len("file://"):] if location.startswith("file://") else location)
    current = int(path.name.split("-")[0])
    return sorted(p.name for p in path.parent.glob("*.metadata.json") if int(p.name.split("-")[0]) > current)


def assert_directory_reader_sees_the_catalog(tmp, table="cold.trades"):
    location = catalog_metadata_location(tmp, table)
    assert location, f"{table} is not in the catalog"
    ahead = metadata_files_ahead(location)
    assert not ahead, f"metadata files above the catalog's current version would be read by directory readers: {ahead}"


def start_rest_catalog(tmp, token=""):
    """dev/rest_catalog.py (the REST spec in front of pyiceberg's SQL catalog) on `tmp`'s
    catalog.db and warehouse; returns (url, process) once it answers."""
    import urllib.error
    import urllib.request
    tmp = Path(tmp)
    port = free_port()
    cmd = [PYTHON, str(ROOT / "dev" / "rest_catalog.py"), "--port", str(port), "--catalog-uri",
           f"sqlite:///{tmp / 'catalog.db'}", "--warehouse", f"file://{tmp / 'warehouse'}"]
    if token:
        cmd += ["--token", token]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/v1/config", timeout=1)
            break
        except urllib.error.HTTPError:
            break  # answering (401 without the token)
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("the REST catalog server did not start")
            time.sleep(0.2)
    return url, proc


def start_once_until_first_window(config):
    """Starts `once` and returns (process, stderr lines so far) when its first window is committed."""
    env = dict(os.environ, TEST_CH_PASSWORD=PASSWORD)
    proc = subprocess.Popen([binary(), "--config", str(config), "once"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    while True:
        line = proc.stderr.readline()
        lines.append(line)
        assert line, "the service ended before its first window:\n" + "".join(lines)[-3000:]
        if "committed window" in line:
            return proc, lines
