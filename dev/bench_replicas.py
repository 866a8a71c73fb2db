#!/usr/bin/env python3
"""What many tables and several replicas cost: N `run` replicas (release build) share T quiet
tables through one PostgreSQL (state store and SQL catalog in two databases, so that each is
counted on its own); after the first offload and a settling period, K cycles with nothing new
are measured per replica from its metrics, and the state store's and the catalog's round trips
from PostgreSQL's own statistics (pg_stat_database: one transaction per statement, as the
service sends them).

    python dev/bench_replicas.py [--tables 100] [--replicas 1,3] [--cycles 10] [--interval 10]

Prints one row per replica count: the quiet cycle of each replica, its cost per table, and the
round trips per table per cycle."""
import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench import PASSWORD  # noqa: E402
from clickhouse_local import Gateway, free_port  # noqa: E402


def psql(password, db, sql):
    env = dict(os.environ, PGPASSWORD=password)
    return subprocess.run(["psql", "-h", "127.0.0.1", "-U", "offload_test", "-d", db, "-tA", "-c", sql],
                          check=True, capture_output=True, text=True, env=env).stdout.strip()


def transactions(password, db):
    return int(psql(password, "postgres", f"SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = '{db}'"))


def scrape(port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    value = lambda name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # noqa: E731
    return {"cycles": value("offload_cycle_duration_seconds_count"), "seconds": value("offload_cycle_duration_seconds_sum"),
            "owned": value("offload_replica_tables_owned"), "members": value("offload_replica_members"),
            "rss_mb": value("process_resident_memory_bytes") / 2**20}


def config(path, gw, base, state_db, catalog_db, warehouse, tables, interval, port):
    blocks = "\n".join(f"""[[tables]]
source = "bench.t{i:03d}"
target = "cold.t{i:03d}"
cursor = "ts"
tiebreak = "seq"
settle_delay = "1s"
partition = ["day(ts)"]""" for i in range(tables))
    path.write_text(f"""[service]
interval = "{interval}s"
parallelism = 4
metrics_listen = "127.0.0.1:{port}"
audit_recent_days = 0
audit_full_every = "0s"
[clickhouse]
url = "{gw.url}"
password_env = "BENCH_CH_PASSWORD"
[catalog]
uri = "{base}/{catalog_db}"
password_env = "BENCH_PG_PASSWORD"
warehouse = "{warehouse}"
[state]
url = "{base}/{state_db}"
password_env = "BENCH_PG_PASSWORD"
[maintenance]
enabled = false
{blocks}
""")
    return path


def measure(binary, gw, base, password, tables, replicas, cycles, interval, tmp):
    run_id = uuid.uuid4().hex[:8]
    state_db, catalog_db = f"bench_state_{run_id}", f"bench_catalog_{run_id}"
    for db in (state_db, catalog_db):
        psql(password, "postgres", f"CREATE DATABASE {db}")
    warehouse = tmp / f"warehouse-{run_id}"
    env = dict(os.environ, BENCH_CH_PASSWORD=PASSWORD, BENCH_PG_PASSWORD=password)
    ports = [free_port() for _ in range(replicas)]
    cfgs = [config(tmp / f"r{run_id}-{i}.toml", gw, base, state_db, catalog_db, warehouse, tables, interval, port)
            for i, port in enumerate(ports)]
    # The first offload of every table, by one process: what follows is quiet.
    first = subprocess.run([binary, "--config", str(cfgs[0]), "once"], capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    procs = [subprocess.Popen([binary, "--config", str(c), "run"], env=env, stdout=subprocess.DEVNULL,
                              stderr=open(tmp / f"r{run_id}-{i}.log", "w")) for i, c in enumerate(cfgs)]
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                s = [scrape(p) for p in ports]
                if all(x["members"] == replicas and x["cycles"] >= 2 for x in s):
                    break
            except OSError:
                pass
            time.sleep(1)
        else:
            raise RuntimeError("replicas did not settle")
        before = [scrape(p) for p in ports]
        tx0 = (transactions(password, state_db), transactions(password, catalog_db))
        while min(scrape(p)["cycles"] - b["cycles"] for p, b in zip(ports, before)) < cycles:
            time.sleep(1)
        tx1 = (transactions(password, state_db), transactions(password, catalog_db))
        after = [scrape(p) for p in ports]
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(120)
    per = []
    table_runs = 0
    for b, a in zip(before, after):
        n = a["cycles"] - b["cycles"]
        per.append({"cycle_s": (a["seconds"] - b["seconds"]) / n, "owned": a["owned"], "rss_mb": a["rss_mb"]})
        table_runs += n * a["owned"]
    return {
        "replicas": replicas, "tables": tables,
        "cycle_s": max(p["cycle_s"] for p in per),
        "per_table_ms": max(p["cycle_s"] / max(p["owned"], 1) for p in per) * 1000,
        "owned": "/".join(str(int(p["owned"])) for p in per),
        "state_rt": (tx1[0] - tx0[0]) / table_runs,
        "catalog_rt": (tx1[1] - tx0[1]) / table_runs,
        "rss_mb": max(p["rss_mb"] for p in per),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tables", type=int, default=100)
    ap.add_argument("--replicas", default="1,3")
    ap.add_argument("--cycles", type=int, default=10)
    ap.add_argument("--interval", type=int, default=10, help="seconds between cycle boundaries")
    ap.add_argument("--binary", default=str(Path(os.environ["CARGO_TARGET_DIR"]) / "release" / "iceberg-offload"))
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="iceberg-offload-bench-replicas-"))
    pwfile = tmp / "pgpw"
    base = subprocess.run([str(HERE / "postgres.sh"), str(pwfile)], check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    password = pwfile.read_text().strip()
    gw = Gateway(tmp / "clickhouse" / "data")
    try:
        gw.sql("CREATE DATABASE IF NOT EXISTS bench")
        for i in range(a.tables):
            gw.sql(f"CREATE TABLE bench.t{i:03d} (ts DateTime64(3), seq UInt64, symbol String, price Decimal(18, 8)) "
                   "ENGINE = MergeTree ORDER BY (ts, seq)")
            gw.sql(f"INSERT INTO bench.t{i:03d} SELECT now64(3) - INTERVAL 1 HOUR + toIntervalSecond(number), number, "
                   f"'BTC', toDecimal64(100, 8) FROM numbers(100)")
        header = ("| replicas | tables | tables per replica | quiet cycle s (slowest replica) | per table ms "
                  "| state-store round trips per table per cycle | catalog round trips per table per cycle | peak RSS MB |")
        rows = []
        for n in [int(x) for x in a.replicas.split(",")]:
            r = measure(a.binary, gw, base, password, a.tables, n, a.cycles, a.interval, tmp)
            rows.append(f"| {r['replicas']} | {r['tables']} | {r['owned']} | {r['cycle_s']:.2f} | {r['per_table_ms']:.0f} "
                        f"| {r['state_rt']:.1f} | {r['catalog_rt']:.1f} | {r['rss_mb']:.0f} |")
            print(rows[-1], flush=True)
        print("\n" + header + "\n|---:|---:|---|---:|---:|---:|---:|---:|\n" + "\n".join(rows))
    finally:
        gw.stop()


if __name__ == "__main__":
    main()
