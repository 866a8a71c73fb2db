#!/usr/bin/env python3
"""Benchmark: this service against the source ceiling and a Python peer, on the same data.

For each size N it loads N K2 bronze trades into the local ClickHouse engine, then measures
side by side:
- ceiling: the service's own SELECT streamed as ArrowStream over HTTP to nowhere (curl);
- iceberg-offload: `once` into a fresh Iceberg table (embedded SQL catalog, local warehouse);
- python peer: pyarrow + pyiceberg append (dev/bench_peer.py), same catalog type, spec, codec.
It prints and writes a Markdown table and a PNG chart: rows/s, CPU seconds (client; and the
ClickHouse engine's CPU, which is what the hot tier pays), peak RSS, output bytes, ratios.

Usage: dev/bench.sh [--sizes 10000,100000,1000000,10000000] [--out docs/bench] [--uint64 long|decimal]
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import k2data  # noqa: E402
from clickhouse_local import PASSWORD, Gateway  # noqa: E402

# The SELECT the service sends for the K2 bronze schema (see src/source/types.rs), by how
# UInt64 columns are stored: `long` (uint64 = "long", the original K2 tables' BIGINT) or
# `decimal` (decimal(20,0), the service's default).
UINT64_EXPR = {"long": "accurateCast(`{c}`, 'Int64')", "decimal": "toDecimal128(`{c}`, 0)"}


def select_sql(table, uint64):
    u = lambda c: UINT64_EXPR[uint64].replace("{c}", c)  # noqa: E731
    return f"""SELECT toDateTime64(`exchange_timestamp`, 6, 'UTC') AS `exchange_timestamp`,
 {u('sequence_number')} AS `sequence_number`, `symbol`, `price`, `quantity`, `quote_volume`,
 toDateTime64(`event_time`, 6, 'UTC') AS `event_time`, {u('kafka_offset')} AS `kafka_offset`,
 toInt32(`kafka_partition`) AS `kafka_partition`, toDateTime64(`ingestion_timestamp`, 6, 'UTC') AS `ingestion_timestamp`
 FROM bench.{table}"""


def write_offload_config(path, url, data_dir, tables, service=""):
    """A config for the benchmarks: the local engine, an embedded catalog and state store under
    `data_dir`, and `tables` (dicts of [[tables]] keys)."""
    blocks = "\n".join("[[tables]]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in t.items()) for t in tables)
    Path(path).write_text(f"""[service]
metrics_listen = "127.0.0.1:0"
{service}
[clickhouse]
url = "{url}"
password_env = "BENCH_CH_PASSWORD"
compression = "lz4"
[catalog]
uri = "sqlite:{data_dir}/catalog.db"
warehouse = "{data_dir}/warehouse"
[state]
url = "sqlite:{data_dir}/state.db"
{blocks}
""")
    return Path(path)


def proc_cpu(pid):
    """CPU seconds (user + system) used so far by a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(cmd, gateway_pid, env=None):
    """Runs a command; returns wall seconds, its CPU seconds, its peak RSS (MB), the engine's CPU seconds."""
    engine_before = proc_cpu(gateway_pid)
    started = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - started
    out, err = p.stdout.read(), p.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[0]} failed: {err.decode()[-2000:]}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024,
            "engine_cpu": proc_cpu(gateway_pid) - engine_before, "stdout": out.decode()}


def dir_bytes(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*.parquet"))


def measure_once(binary, cfg, gw):
    """`iceberg-offload once` on a benchmark config, measured."""
    return measure([binary, "--config", str(cfg), "once"], gw.proc.pid, env=dict(os.environ, BENCH_CH_PASSWORD=PASSWORD))


def scaling_table(name, header, cases, one_case):
    """The scaffolding of the scaling benchmarks: a fresh ClickHouse engine in a temporary
    folder, `one_case(gw, tmp, case)` -> one Markdown row per case, printed as it comes and
    as a whole table at the end; everything removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix=f"iceberg-offload-bench-{name}-"))
    gw = Gateway(tmp / "clickhouse" / "data")
    lines = [header, "|" + "|".join("---:" for _ in header.strip("|").split("|")) + "|"]
    try:
        for case in cases:
            lines.append(one_case(gw, tmp, case))
            print(lines[-1], flush=True)
    finally:
        gw.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000,10000000")
    ap.add_argument("--out", default=str(HERE.parent / "docs" / "bench"))
    ap.add_argument("--uint64", choices=sorted(UINT64_EXPR), default="long",
                    help="Iceberg type of the UInt64 columns (sequence_number, kafka_offset): long as in the "
                         "original K2 tables, or decimal(20,0), the service's default")
    ap.add_argument("--binary", default=str(Path(os.environ["CARGO_TARGET_DIR"]) / "release" / "iceberg-offload"))
    a = ap.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",")]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="iceberg-offload-bench-"))
    gw = Gateway(tmp / "clickhouse" / "data")
    results = []
    try:
        gw.sql("CREATE DATABASE bench")
        for n in sizes:
            table = f"trades_{n}"
            k2data.create_bronze(gw.sql, "bench", table)
            # Spread over the last 5 days (inside the TTL), 1 ms apart at most.
            span_ms = 5 * 86_400_000
            k2data.insert_bronze(gw.sql, "bench", table, n, int(time.time() * 1000) - span_ms - 600_000,
                                 step_ms=span_ms / n)
            gw.sql(f"OPTIMIZE TABLE bench.{table} FINAL")
            sql = select_sql(table, a.uint64)
            row = {"rows": n}

            # Ceiling: the same stream to nowhere.
            ceiling = measure(["curl", "-sS", "--fail", "-o", "/dev/null", "-H", "X-ClickHouse-User: default",
                               "-H", f"X-ClickHouse-Key: {PASSWORD}", "--data-binary", sql + " FORMAT ArrowStream",
                               gw.url + "/?output_format_arrow_compression_method=lz4_frame"], gw.proc.pid)
            row["ceiling"] = ceiling

            # This service.
            wh = tmp / f"ours_{n}"
            cfg = tmp / f"ours_{n}.toml"
            write_offload_config(cfg, gw.url, wh, [{
                "source": f"bench.{table}", "target": f"bench.ours_{n}", "cursor": "exchange_timestamp",
                "tiebreak": "sequence_number", "settle_delay": "0s", "max_rows_per_commit": max(n, 1), "uint64": a.uint64,
                "partition": ["day(exchange_timestamp)"]}])
            ours = measure([a.binary, "--config", str(cfg), "once"], gw.proc.pid,
                           env=dict(os.environ, BENCH_CH_PASSWORD=PASSWORD))
            ours["bytes"] = dir_bytes(wh / "warehouse")
            row["ours"] = ours

            # Python peer.
            pw = tmp / f"peer_{n}"
            pw.mkdir()
            peer = measure([sys.executable, str(HERE / "bench_peer.py"), "--url", gw.url, "--password", PASSWORD,
                            "--sql", sql, "--catalog", f"sqlite:///{pw}/catalog.db", "--warehouse", f"file://{pw}/warehouse",
                            "--table", f"bench.peer_{n}"], gw.proc.pid)
            peer["bytes"] = dir_bytes(pw / "warehouse")
            row["peer"] = peer
            results.append(row)
            print(line(row), flush=True)
            gw.sql(f"DROP TABLE bench.{table}")
            shutil.rmtree(wh, ignore_errors=True)
            shutil.rmtree(pw, ignore_errors=True)
    finally:
        gw.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    stored = 'long (uint64 = "long")' if a.uint64 == "long" else "decimal(20,0) (the default)"
    md = f"UInt64 columns (sequence_number, kafka_offset) stored as Iceberg {stored}.\n\n" + markdown(results)
    (out / "results.md").write_text(md)
    print(md)
    chart(results, out / "throughput.png")
    return 0


def rate(r, n):
    return n / r["wall"] if r["wall"] > 0 else 0


def line(row):
    n = row["rows"]
    return (f"bench: {n:>10,} rows | ceiling {rate(row['ceiling'], n):>11,.0f} rows/s | ours {rate(row['ours'], n):>11,.0f} rows/s "
            f"({row['ours']['rss_mb']:.0f} MB) | peer {rate(row['peer'], n):>11,.0f} rows/s ({row['peer']['rss_mb']:.0f} MB)")


def markdown(results):
    head = ("| rows | engine | wall s | rows/s | client CPU s | ClickHouse CPU s | peak RSS MB | output MB | ours/peer | ours/ceiling |\n"
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for row in results:
        n = row["rows"]
        for name in ("ceiling", "ours", "peer"):
            r = row[name]
            label = {"ceiling": "source ceiling (ArrowStream to /dev/null)", "ours": "iceberg-offload", "peer": "Python peer (pyarrow + pyiceberg)"}[name]
            ratios = ("", "")
            if name == "ours":
                ratios = (f"{rate(r, n) / rate(row['peer'], n):.2f}×", f"{rate(r, n) / rate(row['ceiling'], n):.0%}")
            out_mb = f"{r['bytes'] / 1e6:.1f}" if "bytes" in r else "–"
            lines.append(f"| {n:,} | {label} | {r['wall']:.2f} | {rate(r, n):,.0f} | {r['cpu']:.2f} | {r['engine_cpu']:.2f} | "
                         f"{r['rss_mb']:.0f} | {out_mb} | {ratios[0]} | {ratios[1]} |")
    return head + "\n".join(lines) + "\n"


def chart(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sizes = [r["rows"] for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, label in (("ceiling", "source ceiling"), ("ours", "iceberg-offload"), ("peer", "Python peer")):
        ax1.plot(sizes, [rate(r[name], r["rows"]) for r in results], marker="o", label=label)
        ax2.plot(sizes, [r[name]["rss_mb"] for r in results], marker="o", label=label)
    for ax, title, unit in ((ax1, "Throughput", "rows/s"), (ax2, "Peak RSS", "MB")):
        ax.set_xscale("log")
        ax.set_xlabel("rows per window")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
