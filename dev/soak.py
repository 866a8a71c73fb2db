#!/usr/bin/env python3
"""Randomised soak: a multi-table scheduler with trades arriving continuously, killed with
SIGKILL at random moments, over and over; then one clean cycle and the equality check with
readers we did not write. Prints trials, rows, duplicates found, rows missing and unreadable
tables; exits 1 if any is found.

With `--catalog-faults` the catalog is the REST catalog (dev/rest_catalog.py) behind an HTTP
proxy (dev/catalog_proxy.py) that, besides the kills, makes commits fail at random: 504 then
applied later, connection dropped then applied later, 504 or dropped and never applied, and
answers held past the service's commit timeout. Every 100 trials the tables are read by both
readers (a table that cannot be read counts as unreadable).

With `--restart-loop` the service runs as deployed (the default 15-minute interval) and is
restarted at once after each kill, as systemd's `Restart=always` would, a kill every 2-5 s for
`--seconds`: only the start of each process can commit (issue 23: a restart offloads every table
at once). Besides the equality check it prints, per table, the longest gap between commits
(Iceberg snapshots' own timestamps, read by pyiceberg) and fails past `--max-gap`.

Usage: dev/soak.sh [--trials 200] [--seed N] [--tables 2] [--catalog-faults]
       dev/soak.sh --restart-loop [--seconds 300] [--tables 2] [--max-gap 30]
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import k2data  # noqa: E402
from clickhouse_local import PASSWORD, Gateway  # noqa: E402


def config(tmp, url, tables, catalog_url=None, interval="1s"):
    blocks = "\n".join(f"""
[[tables]]
source = "soak.{t}"
target = "cold.{t}"
cursor = "exchange_timestamp"
tiebreak = "sequence_number"
settle_delay = "1s"
max_rows_per_commit = 4000
partition = ["day(exchange_timestamp)"]
""" for t in tables)
    path = tmp / "soak.toml"
    path.write_text(f"""
[service]
interval = "{interval}"
parallelism = {len(tables)}
table_timeout = "30s"
retries = 1
retry_backoff = "100ms"
lease_ttl = "30s"
metrics_listen = "127.0.0.1:0"

[clickhouse]
url = "{url}"
password_env = "SOAK_CH_PASSWORD"

[catalog]
{catalog_block(tmp, catalog_url)}

[state]
url = "sqlite:{tmp / 'state.db'}"
{blocks}""")
    return path


def catalog_block(tmp, catalog_url):
    if catalog_url is None:
        return f'uri = "sqlite:{tmp / "catalog.db"}"\nwarehouse = "{tmp / "warehouse"}"'
    return f'type = "rest"\nuri = "{catalog_url}"\ntimeout = "10s"\ncommit_timeout = "3s"\nstorage_timeout = "10s"'


def start_rest_catalog(tmp):
    """dev/rest_catalog.py on its SQLite store in `tmp`, behind the fault proxy."""
    from catalog_proxy import CatalogProxy
    import socket
    import urllib.request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(HERE / "rest_catalog.py"), "--port", str(port),
                             "--catalog-uri", f"sqlite:///{tmp / 'catalog.db'}", "--warehouse", f"file://{tmp / 'warehouse'}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(150):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/config", timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    return proc, CatalogProxy(f"http://127.0.0.1:{port}")


def push_random_faults(rng, proxy, seen):
    for _ in range(rng.choice([0, 1, 1, 2, 3])):
        kind = rng.choice(["504_then_apply", "drop_then_apply", "504", "drop", "slow"])
        delay = {"504_then_apply": rng.uniform(0, 2.5), "drop_then_apply": rng.uniform(0, 2.5),
                 "slow": rng.uniform(3.2, 4.5)}.get(kind)
        proxy.push(kind, delay)
        seen[kind] = seen.get(kind, 0) + 1


def read_back(tmp, gw, table, commits=None):
    """Both readers against the source up to W: (rows in Iceberg, rows in the source, duplicates,
    missing, mismatch description or None). Raises when the table cannot be read. The commit
    times (ms, the offload's snapshots) are appended to `commits` when given."""
    out = json.loads(subprocess.run(
        [sys.executable, str(HERE / "verify_iceberg.py"), "--catalog-uri", f"sqlite:///{tmp / 'catalog.db'}",
         "--warehouse", f"file://{tmp / 'warehouse'}", "--table", f"cold.{table}", "--key", "symbol,sequence_number",
         "--sum", "price"], check=True, capture_output=True, text=True).stdout)
    if commits is not None:
        commits.extend(s["timestamp_ms"] for s in out["pyiceberg"]["snapshots"] if s.get("offload.run-id"))
    src = k2data.source_stats(gw.scalar, "soak", table, out["pyiceberg"]["properties"]["offload.watermark.position"],
                              sums=("price",))
    missing, mismatch = 0, None
    for reader in ("pyiceberg", "clickhouse"):
        r = out[reader]
        missing_here = src["distinct_keys"] - r["distinct_keys"]
        if r["count"] != src["count"] or missing_here or float(r["sums"]["price"]) != float(src["sums"]["price"]):
            mismatch = f"{table} via {reader}: {r['count']} rows vs {src['count']} in the source"
        missing += max(missing_here, 0)
    return out["pyiceberg"]["count"], src["count"], out["pyiceberg"]["duplicates"], missing, mismatch


def longest_gap(commits_ms, started, ended):
    """(the longest time in seconds without a commit between `started` and `ended`, the commits
    in between)."""
    inside = sorted(c / 1000 for c in commits_ms if started * 1000 <= c <= ended * 1000)
    points = [started, *inside, ended]
    return max(b - a for a, b in zip(points, points[1:])), len(inside)


def main(argv=None):
    ap = argparse.ArgumentParser(description="SIGKILL soak of the scheduler")
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--tables", type=int, default=2)
    ap.add_argument("--binary", default=str(Path(os.environ["CARGO_TARGET_DIR"]) / "debug" / "iceberg-offload"))
    ap.add_argument("--catalog-faults", action="store_true", help="REST catalog behind a proxy that fails commits")
    ap.add_argument("--restart-loop", action="store_true",
                    help="the default 15-minute interval, a kill every 2-5 s and a restart at once, for --seconds")
    ap.add_argument("--seconds", type=float, default=300, help="length of the restart loop")
    ap.add_argument("--max-gap", type=float, default=30, help="longest gap between commits allowed in the restart loop (s)")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="iceberg-offload-soak-"))
    tables = [f"bronze_trades_{i}" for i in range(args.tables)]
    gw = Gateway(tmp / "clickhouse" / "data")
    stop = threading.Event()
    inserted = {t: 0 for t in tables}
    rest, proxy, seen, unreadable = None, None, {}, 0
    try:
        if args.catalog_faults:
            rest, proxy = start_rest_catalog(tmp)
        for t in tables:
            k2data.create_bronze(gw.sql, "soak", t)
            k2data.insert_bronze(gw.sql, "soak", t, 20_000, int(time.time() * 1000) - 3_600_000, step_ms=100)
            inserted[t] = 20_000

        # Catalog-fault trials run longer (faults wait out commit timeouts): fewer rows per
        # insert keep the tables, and the periodic read-backs, the same size as the kill-only soak.
        most = 300 if args.catalog_faults else 3_000

        def trades_keep_coming():
            while not stop.is_set():
                for t in tables:
                    n = rng.randint(min(100, most), most)
                    k2data.insert_bronze_arriving_now(gw.sql, "soak", t, n, seq_start=10_000_000 + inserted[t])
                    inserted[t] += n
                stop.wait(0.3)
        writer = threading.Thread(target=trades_keep_coming, daemon=True)
        writer.start()

        cfg = config(tmp, gw.url, tables, proxy.url if proxy else None, interval="15m" if args.restart_loop else "1s")
        env = dict(os.environ, SOAK_CH_PASSWORD=PASSWORD)
        started = time.time()
        trial = 0
        while (time.time() - started < args.seconds) if args.restart_loop else trial < args.trials:
            trial += 1
            if proxy:
                push_random_faults(rng, proxy, seen)
            proc = subprocess.Popen([args.binary, "--config", str(cfg), "run"], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(2, 5) if args.restart_loop else rng.uniform(0.05, 4.0) if proxy else rng.uniform(0.05, 1.5))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            if trial % 25 == 0:
                if proxy and trial % 100 == 0:
                    proxy.settle()
                    for t in tables:
                        try:
                            _, _, dups, _, _ = read_back(tmp, gw, t)
                            if dups:
                                print(f"soak: {dups} duplicates in {t} after trial {trial}")
                        except subprocess.CalledProcessError as e:
                            unreadable += 1
                            print(f"soak: UNREADABLE {t} after trial {trial}: {e.stderr[-2000:]}")
                print(f"soak: {trial}/{'-' if args.restart_loop else args.trials} kills, {sum(inserted.values()):,} rows inserted"
                      + (f", catalog faults so far: {seen}" if proxy else ""), flush=True)
        loop_ended = time.time()
        stop.set()
        writer.join()
        time.sleep(1.5)  # let the last rows settle
        if proxy:
            proxy.faults.clear()
            proxy.settle()
        # Catch up: the backlog the kills left may take more than one cycle's table_timeout.
        for _ in range(20):
            final = subprocess.run([args.binary, "--config", str(cfg), "once"], env=env, capture_output=True, text=True)
            if final.returncode == 0:
                break
        if final.returncode != 0:
            print(final.stdout, final.stderr[-3000:])
            return 1
        duplicates = missing = total_iceberg = total_source = 0
        gaps = {}
        for t in tables:
            commits = []
            try:
                iceberg_rows, source_rows, dups, missing_rows, mismatch = read_back(tmp, gw, t, commits)
                gaps[t] = longest_gap(commits, started, loop_ended)
            except subprocess.CalledProcessError as e:
                unreadable += 1
                print(f"soak: UNREADABLE {t}: {e.stderr[-2000:]}")
                continue
            if mismatch:
                print(f"soak: MISMATCH {mismatch}")
            duplicates += dups
            missing += missing_rows
            total_iceberg += iceberg_rows
            total_source += source_rows
        elapsed = time.time() - started
        print(f"soak: seed {args.seed}, {trial} SIGKILL trials over {len(tables)} tables in {elapsed:.0f}s; "
              f"{total_source:,} source rows up to the watermarks, {total_iceberg:,} rows in Iceberg; "
              f"duplicates found: {duplicates}; rows missing: {missing}; unreadable tables: {unreadable}"
              + (f"; catalog faults injected: {sum(seen.values())} {seen}" if proxy else ""))
        ok = duplicates == 0 and missing == 0 and unreadable == 0 and total_iceberg == total_source
        if args.restart_loop:
            print("soak: restart loop, longest gap between commits: "
                  + ", ".join(f"{t} {gap:.1f} s ({n} commits)" for t, (gap, n) in gaps.items()))
            ok = ok and len(gaps) == len(tables) and all(gap <= args.max_gap for gap, _ in gaps.values())
        print(f"soak: {trial} passed, {0 if ok else 1} failed")
        return 0 if ok else 1
    finally:
        stop.set()
        gw.stop()
        if proxy:
            proxy.close()
        if rest:
            rest.terminate()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
