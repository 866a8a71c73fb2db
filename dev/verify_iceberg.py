#!/usr/bin/env python3
"""Reads an Iceberg table with readers this project did not write, and prints JSON.

* pyiceberg through the same SQL catalog (count, sums, distinct keys, duplicates);
* ClickHouse's icebergLocal() through chdb, reading the table directory as a directory
  reader does (it picks the highest-numbered metadata file, so a stray one shows up);
  icebergS3() for a warehouse on S3 (`--s3-endpoint`, `--s3-key`, secret in $VERIFY_S3_SECRET);
* DuckDB's iceberg_scan() on the metadata file the catalog holds (local warehouses), with the
  iceberg and avro extensions from PyPI, loaded from their wheels (no network).

Usage: verify_iceberg.py --catalog-uri sqlite:////abs/catalog.db --warehouse file:///abs/wh \
         --table cold.t --key symbol,sequence_number --sum price [--sum quantity] [--rows]
"""
import argparse
import json
import os
import sys


def pyiceberg_read(args):
    from pyiceberg.catalog.sql import SqlCatalog
    import pyarrow.compute as pc

    uri = args.catalog_uri
    if uri.startswith("sqlite://") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + uri[len("sqlite://"):]
    uri = uri.split("?")[0]
    catalog = SqlCatalog(args.catalog_name, uri=uri, warehouse=args.warehouse, **s3_properties(args))
    table = catalog.load_table(args.table)
    arrow = table.scan().to_arrow()
    out = {"count": arrow.num_rows, "location": table.location(), "properties": dict(table.properties),
           "metadata_location": table.metadata_location}
    out["schema"] = {f.name: str(f.field_type) + ("" if f.required else "?") for f in table.schema().fields}
    out["partition_spec"] = [f"{f.transform}({table.schema().find_column_name(f.source_id)})" for f in table.spec().fields]
    out["snapshots"] = [dict(s.summary.additional_properties) | {"operation": str(s.summary.operation), "timestamp_ms": s.timestamp_ms}
                        for s in table.snapshots()]
    out["sums"] = {}
    for col in args.sum:
        s = pc.sum(arrow[col]).as_py() if arrow.num_rows else 0
        out["sums"][col] = str(s) if s is not None else "0"
    if args.key:
        keys = args.key.split(",")
        rows = list(zip(*[arrow[k].to_pylist() for k in keys])) if arrow.num_rows else []
        out["distinct_keys"] = len(set(rows))
        out["duplicates"] = len(rows) - len(set(rows))
    if args.rows:
        out["rows"] = [{k: str(v) for k, v in r.items()} for r in arrow.to_pylist()]
    return out


def s3_properties(args):
    if not args.s3_endpoint:
        return {}
    return {"s3.endpoint": args.s3_endpoint, "s3.access-key-id": args.s3_key, "s3.region": "us-east-1",
            "s3.secret-access-key": os.environ["VERIFY_S3_SECRET"]}


def clickhouse_read(args, location):
    from chdb import session

    if location.startswith("s3://"):
        # Path-style URL on the configured endpoint: http://host:port/bucket/key/
        url = f"{args.s3_endpoint.rstrip('/')}/{location[len('s3://'):].rstrip('/')}/"
        source = f"icebergS3('{url}', '{args.s3_key}', '{os.environ['VERIFY_S3_SECRET']}')"
    else:
        path = local_path(location)
        os.chdir("/")  # icebergLocal() only reads below the working directory
        source = f"icebergLocal('{path}')"
    s = session.Session()
    sums = "".join(f", toString(sum({c}))" for c in args.sum)
    keys = args.key.split(",") if args.key else []
    distinct = f", uniqExact(({', '.join(keys)}))" if keys else ", 0"
    q = f"SELECT count(){distinct}{sums} FROM {source}"
    res = json.loads(s.query(q, "JSONCompact").bytes().decode())
    row = res["data"][0]
    out = {"count": int(row[0]), "distinct_keys": int(row[1]), "sums": {c: str(v) for c, v in zip(args.sum, row[2:])}}
    desc = json.loads(s.query(f"DESCRIBE {source}", "JSON").bytes().decode())
    out["types"] = {r["name"]: r["type"] for r in desc["data"]}
    if args.rows:
        cols = ", ".join(f"toString(`{name}`) AS `{name}`" for name in out["types"])
        data = json.loads(s.query(f"SELECT {cols} FROM {source}", "JSON").bytes().decode())
        out["rows"] = data["data"]
    return out


def local_path(location):
    """`file:///p` (ours) or `file:/p` (Iceberg Java's, e.g. a table Spark created) → `/p`."""
    for prefix in ("file://", "file:"):
        if location.startswith(prefix):
            return location[len(prefix):]
    return location


def duckdb_read(args, metadata_location):
    import glob
    import duckdb
    import duckdb_extension_avro
    import duckdb_extension_iceberg

    con = duckdb.connect()
    for mod in (duckdb_extension_avro, duckdb_extension_iceberg):
        ext = glob.glob(os.path.join(os.path.dirname(mod.__file__), "extensions", "*", "*.duckdb_extension"))[0]
        con.execute(f"LOAD '{ext}'")
    source = f"iceberg_scan('{local_path(metadata_location)}')"
    keys = args.key.split(",") if args.key else []
    distinct = f", count(DISTINCT ({', '.join(keys)}))" if keys else ", 0"
    sums = "".join(f", CAST(sum({c}) AS VARCHAR)" for c in args.sum)
    row = con.execute(f"SELECT count(*){distinct}{sums} FROM {source}").fetchone()
    out = {"count": int(row[0]), "distinct_keys": int(row[1]),
           "sums": {c: (v if v is not None else "0") for c, v in zip(args.sum, row[2:])}}
    if args.rows:
        # Values as DuckDB's Python client gives them, printed as pyiceberg's are (str);
        # timestamps with time zone in UTC.
        # TIMESTAMP WITH TIME ZONE as epoch microseconds (the Python client would need pytz).
        import datetime as dt
        described = con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()
        zoned = {name for name, kind, *_ in described if kind == "TIMESTAMP WITH TIME ZONE"}
        select = ", ".join(f'epoch_us("{n}") AS "{n}"' if n in zoned else f'"{n}"' for n, *_ in described)
        cur = con.execute(f"SELECT {select} FROM {source}")
        names = [d[0] for d in cur.description]
        epoch = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)

        def show(name, x):
            if x is not None and name in zoned:
                return str(epoch + dt.timedelta(microseconds=x))
            if isinstance(x, dict):
                return json.dumps(sorted((str(k), str(v)) for k, v in x.items()))
            return str(x)
        out["rows"] = [{n: show(n, x) for n, x in zip(names, r)} for r in cur.fetchall()]
    return out


def parse(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--catalog-uri", required=True)
    ap.add_argument("--catalog-name", default="offload")
    ap.add_argument("--warehouse", required=True)
    ap.add_argument("--table", required=True, action="append",
                    help="repeatable: with several, the output is {table: result} (one start for many tables)")
    ap.add_argument("--key", default="")
    ap.add_argument("--sum", action="append", default=[])
    ap.add_argument("--rows", action="store_true")
    ap.add_argument("--no-clickhouse", action="store_true")
    ap.add_argument("--no-duckdb", action="store_true")
    ap.add_argument("--s3-endpoint", default="")
    ap.add_argument("--s3-key", default="")
    return ap.parse_args(argv)


def read_tables(args):
    tables = args.table
    results = {}
    for table in tables:
        args.table = table
        out = {"pyiceberg": pyiceberg_read(args)}
        if not args.no_clickhouse:
            out["clickhouse"] = clickhouse_read(args, out["pyiceberg"]["location"])
        if not args.s3_endpoint and not args.no_duckdb:
            out["duckdb"] = duckdb_read(args, out["pyiceberg"]["metadata_location"])
        results[table] = out
    return results[tables[0]] if len(tables) == 1 else results


def serve():
    """`--serve`: one request per line on stdin (`{"argv": [...], "env": {...}}`), one JSON reply
    per line on stdout (`{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}`).

    A test suite reads hundreds of tables; a new interpreter for each spends about 2 s importing
    pyiceberg, pyarrow and DuckDB. Here they are imported once, and each request is read in a
    child forked from this process: every read still starts from nothing (its own ClickHouse
    engine and DuckDB connection, its own changes of directory and environment, no cache kept
    from an earlier read), as a separate process did; the parent itself never reads.
    ClickHouse (chdb) is imported in the child: its import starts a dozen threads, and a fork
    carries none over. pyarrow's and DuckDB's imports start a few (jemalloc's background thread
    among them), which fork safely; a child that hangs anyway ends the caller's wait with its
    time limit, and the caller then kills this server's whole process group."""
    import traceback
    import pyarrow.compute  # noqa: F401  (preloaded for the children)
    import duckdb  # noqa: F401
    import duckdb_extension_avro  # noqa: F401
    import duckdb_extension_iceberg  # noqa: F401
    from pyiceberg.catalog.sql import SqlCatalog  # noqa: F401
    for line in sys.stdin:
        request = json.loads(line)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            os.dup2(2, 1)  # whatever a library prints must not reach the replies on stdout
            os.environ.update(request.get("env", {}))
            try:
                reply = {"ok": True, "result": read_tables(parse(request["argv"]))}
            except BaseException:  # noqa: BLE001 - reported to the caller, whatever it was
                reply = {"ok": False, "error": traceback.format_exc()}
            with os.fdopen(write_end, "w") as out:
                json.dump(reply, out)
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as child:
            text = child.read()
        _, status = os.waitpid(pid, 0)
        if not text:
            text = json.dumps({"ok": False, "error": f"the reader process ended with status {status} and no answer"})
        sys.stdout.write(text + "\n")  # json.dump writes one line: newlines inside strings are escaped
        sys.stdout.flush()


def main():
    if sys.argv[1:] == ["--serve"]:
        serve()
        return
    json.dump(read_tables(parse()), sys.stdout)


if __name__ == "__main__":
    main()
