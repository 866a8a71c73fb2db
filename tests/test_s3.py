"""A warehouse on S3, the production layout: the service writes through iceberg-rust's
OpenDAL S3 storage to an S3-compatible server (moto's standalone server: no real S3 can run
here), and readers we did not write (pyiceberg, ClickHouse icebergS3()) read it back."""
import os
import subprocess
import sys
import time
import urllib.request

import pytest

import k2data
from harness import (assert_equal_to_source, bronze_table, create_bronze, fault_binary, free_port, insert_bronze,
                     now_ms, run, write_config)

KEY, SECRET = "offload-test-key", "s3-secret-Zq81xT"


@pytest.fixture(scope="module")
def s3():
    port = free_port()
    bindir = os.path.dirname(sys.executable)
    proc = subprocess.Popen([os.path.join(bindir, "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("the S3 server (moto_server) did not start")
            time.sleep(0.2)
    import boto3
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                          region_name="us-east-1")
    yield {"endpoint": endpoint, "client": client}
    proc.terminate()
    proc.wait(10)


def s3_config(tmp_path, gateway, tables, s3, bucket):
    s3["client"].create_bucket(Bucket=bucket)
    cfg = write_config(tmp_path / "c.toml", gateway, tables, tmp_path)
    text = cfg.read_text().replace(f'warehouse = "{tmp_path / "warehouse"}"', f'''warehouse = "s3://{bucket}/lake"

[catalog.properties]
"s3.endpoint" = "{s3['endpoint']}"
"s3.region" = "us-east-1"
"s3.path-style-access" = "true"
"s3.access-key-id" = "{KEY}"

[catalog.properties_env]
"s3.secret-access-key" = "TEST_S3_SECRET"''')
    assert text != cfg.read_text()
    cfg.write_text(text)
    return cfg, {"endpoint": s3["endpoint"], "key": KEY, "secret": SECRET, "warehouse": f"s3://{bucket}/lake"}


def objects(s3, bucket, suffix):
    pages = s3["client"].get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"] for page in pages for o in page.get("Contents", []) if o["Key"].endswith(suffix)}


def test_s3_warehouse_cycles_land_every_row_once_for_independent_readers(gateway, db, tmp_path, s3):
    create_bronze(gateway, db, "trades")
    insert_bronze(gateway, db, "trades", 30_000, now_ms() - 7_200_000, step_ms=100)
    table = bronze_table(db, "trades", max_rows_per_commit=20_000, settle_delay="1s", view=f"{db}.trades_all")
    cfg, s3v = s3_config(tmp_path, gateway, [table], s3, "lake-cycles")
    # The view (I13) reads the bucket with icebergS3 and the credentials of a named collection.
    gateway.sql(f"CREATE NAMED COLLECTION IF NOT EXISTS lake_{db} AS access_key_id = '{KEY}', "
                f"secret_access_key = '{SECRET}'")
    cfg.write_text(cfg.read_text().replace('compression = "lz4"', f'compression = "lz4"\niceberg_s3_collection = "lake_{db}"'))
    env = {"TEST_S3_SECRET": SECRET}
    first = run(cfg, "once", env=env, check=True)
    # New rows after W, settled by the time the next cycle runs.
    k2data.insert_bronze_arriving_now(gateway.sql, db, "trades", 5_000, seq_start=1_000_000)
    time.sleep(1.5)
    second = run(cfg, "once", env=env, check=True)
    got, src = assert_equal_to_source(gateway, tmp_path, db, "trades", s3=s3v)
    assert src["count"] == 35_000
    commits = [s for s in got["pyiceberg"]["snapshots"] if s.get("offload.run-id")]
    assert len(commits) == 3, commits
    assert objects(s3, "lake-cycles", ".parquet"), "data files are in the bucket"
    for out in (first, second):
        assert SECRET not in out.stdout + out.stderr, "the S3 secret must never be printed"
    # The view, read by ClickHouse: the source's rows, its types; no secret in its text.
    views = [line for line in second.stderr.splitlines() if "view" in line]
    assert '"snapshot_id":null' not in gateway.sql(f"SELECT comment FROM system.tables WHERE name = 'trades_all' "
                                                 f"AND database = '{db}'"), views
    stats = "SELECT count(), toString(sum(price)), uniqExact((symbol, sequence_number)) FROM {t}"
    assert gateway.sql(stats.format(t=f"{db}.trades_all")) == gateway.sql(stats.format(t=f"{db}.trades"))
    text = gateway.sql(f"SHOW CREATE TABLE {db}.trades_all")
    assert "icebergS3(lake_" in text and SECRET not in text and KEY not in text, text
    v = run(cfg, "validate", env=env)
    assert f"view {db}.trades_all: ok: ClickHouse reads {s3['endpoint']}/lake-cycles/lake/" in v.stdout, v.stdout
    assert "the view's query runs (35000 rows now)" in v.stdout, v.stdout


def test_s3_lost_commit_leaves_no_object_behind(gateway, db, tmp_path, s3):
    """I5 + I8 on S3: an attempt whose commit the catalog reported but did not persist is pending
    (files kept); the retry commits the window; then the pending attempt can never land and its
    data files, manifests and manifest list are deleted from the bucket."""
    create_bronze(gateway, db, "trades")
    insert_bronze(gateway, db, "trades", 30_000, now_ms() - 7_200_000, step_ms=100)
    cfg, s3v = s3_config(tmp_path, gateway, [bronze_table(db, "trades", max_rows_per_commit=10_000)], s3, "lake-lost")
    out = run(cfg, "once", exe=fault_binary(), env={"TEST_S3_SECRET": SECRET, "ICEBERG_OFFLOAD_FAULT": "commit_lost:error:2"})
    assert out.returncode == 0 and "does not show the commit when read again" in out.stderr, out.stdout + out.stderr[-2000:]
    assert "can never land" in out.stderr, out.stderr[-2000:]
    got, src = assert_equal_to_source(gateway, tmp_path, db, "trades", s3=s3v)
    assert src["count"] == 30_000
    # Every Parquet and Avro object in the bucket is one the table references.
    from pyiceberg.catalog.sql import SqlCatalog
    catalog = SqlCatalog("offload", uri=f"sqlite:///{tmp_path / 'catalog.db'}", warehouse=s3v["warehouse"],
                         **{"s3.endpoint": s3["endpoint"], "s3.access-key-id": KEY, "s3.secret-access-key": SECRET,
                            "s3.region": "us-east-1"})
    table = catalog.load_table("cold.trades")
    referenced = {f.file_path for task in table.scan().plan_files() for f in [task.file]}
    lists = {s.manifest_list for s in table.snapshots()}
    manifests = {m.manifest_path for s in table.snapshots() for m in s.manifests(table.io)}
    key = lambda uri: uri.split("lake-lost/", 1)[1]  # noqa: E731
    assert objects(s3, "lake-lost", ".parquet") == {key(p) for p in referenced}
    assert objects(s3, "lake-lost", ".avro") == {key(p) for p in lists | manifests}


def test_s3_expiry_deletes_the_expired_objects_and_old_metadata(gateway, db, tmp_path, s3):
    """Maintenance on S3 (no listing: paths from the metadata): after expiry, the bucket holds
    exactly the objects the remaining snapshots and the metadata log reference."""
    create_bronze(gateway, db, "trades")
    insert_bronze(gateway, db, "trades", 1_200, now_ms() - 7_200_000, step_ms=1_000)
    table = bronze_table(db, "trades", max_rows_per_commit=10, settle_delay="1s")
    cfg, s3v = s3_config(tmp_path, gateway, [table], s3, "lake-expire")
    cfg.write_text(cfg.read_text() + '\n[maintenance]\nmax_snapshot_age = "1s"\nmin_snapshots_to_keep = 3\n')
    env = {"TEST_S3_SECRET": SECRET}
    run(cfg, "once", env=env, check=True)
    assert len(objects(s3, "lake-expire", ".metadata.json")) <= 101, "old metadata versions deleted after commits"
    time.sleep(1.1)
    out = run(cfg, "maintain", "--only", "expire", env=env, check=True).stdout
    assert "117 of 120 snapshots expired" in out, out
    assert_equal_to_source(gateway, tmp_path, db, "trades", s3=s3v)
    from pyiceberg.catalog.sql import SqlCatalog
    catalog = SqlCatalog("offload", uri=f"sqlite:///{tmp_path / 'catalog.db'}", warehouse=s3v["warehouse"],
                         **{"s3.endpoint": s3["endpoint"], "s3.access-key-id": KEY, "s3.secret-access-key": SECRET,
                            "s3.region": "us-east-1"})
    t = catalog.load_table("cold.trades")
    assert len(t.snapshots()) == 3
    key = lambda uri: uri.split("lake-expire/", 1)[1]  # noqa: E731
    lists = {key(s.manifest_list) for s in t.snapshots()}
    manifests = {key(m.manifest_path) for s in t.snapshots() for m in s.manifests(t.io)}
    data = {key(f.file_path) for task in t.scan().plan_files() for f in [task.file]}
    assert objects(s3, "lake-expire", ".avro") == lists | manifests
    assert objects(s3, "lake-expire", ".parquet") == data
    logged = {key(m.metadata_file) for m in t.metadata.metadata_log} | {key(t.metadata_location)}
    assert objects(s3, "lake-expire", ".metadata.json") == logged


def test_s3_compaction_then_expiry_leaves_exactly_the_live_objects(gateway, db, tmp_path, s3):
    """Compaction on S3 (issue 12): 200 appends over four days become one file per closed day
    partition, every row unchanged for three readers; expiry then deletes the replaced
    objects, so the bucket holds exactly what the remaining snapshots reference."""
    create_bronze(gateway, db, "trades")
    day, hour = 86_400_000, 3_600_000
    # Four whole past days, 01:00 on the first to 23:00 on the last: closed partitions whatever
    # the time of day (rows reaching into today would leave today's small files uncompacted).
    today = now_ms() // day * day
    insert_bronze(gateway, db, "trades", 2_000, today - 4 * day + hour, step_ms=(4 * day - 2 * hour) // 2_000)
    table = bronze_table(db, "trades", max_rows_per_commit=10, settle_delay="1s")
    cfg, s3v = s3_config(tmp_path, gateway, [table], s3, "lake-compact")
    cfg.write_text(cfg.read_text() + '\n[maintenance]\nmax_snapshot_age = "1s"\nmin_snapshots_to_keep = 1\n'
                   'target_file_size_mb = 1\n')
    env = {"TEST_S3_SECRET": SECRET}
    run(cfg, "once", env=env, check=True)
    parquet_before = len(objects(s3, "lake-compact", ".parquet"))
    time.sleep(1.1)
    out = run(cfg, "maintain", env=env, check=True).stdout
    assert "compacted into" in out and "snapshots expired" in out, out
    assert_equal_to_source(gateway, tmp_path, db, "trades", s3=s3v)
    # The snapshot before the compaction stays for readers that planned on it; once another
    # commit follows, expiry lets it go and the replaced objects with it.
    insert_bronze(gateway, db, "trades", 20, now_ms() - 2_000, step_ms=10, seq_start=100_000)
    time.sleep(2)
    run(cfg, "once", env=env, check=True)
    time.sleep(1.1)
    run(cfg, "maintain", "--only", "expire", env=env, check=True)
    assert_equal_to_source(gateway, tmp_path, db, "trades", s3=s3v)
    from pyiceberg.catalog.sql import SqlCatalog
    catalog = SqlCatalog("offload", uri=f"sqlite:///{tmp_path / 'catalog.db'}", warehouse=s3v["warehouse"],
                         **{"s3.endpoint": s3["endpoint"], "s3.access-key-id": KEY, "s3.secret-access-key": SECRET,
                            "s3.region": "us-east-1"})
    t = catalog.load_table("cold.trades")
    key = lambda uri: uri.split("lake-compact/", 1)[1]  # noqa: E731
    live = {key(task.file.file_path) for task in t.scan().plan_files()}
    assert len(live) == 6, live  # a file per closed day (4), and today's 20 new rows (2 windows of 10)
    lists = {key(s.manifest_list) for s in t.snapshots()}
    manifests = {key(m.manifest_path) for s in t.snapshots() for m in s.manifests(t.io)}
    data = {key(e.data_file.file_path) for s in t.snapshots() for m in s.manifests(t.io)
            for e in m.fetch_manifest_entry(t.io, discard_deleted=True)}
    assert objects(s3, "lake-compact", ".avro") == lists | manifests
    assert objects(s3, "lake-compact", ".parquet") == data, (parquet_before, len(data))
    assert len(data) == 6 < parquet_before, (len(data), parquet_before)


def test_s3_orphan_cleanup_lists_the_bucket_and_deletes_only_what_nothing_references(gateway, db, tmp_path, s3):
    """Orphans on S3 (issue 12): objects under the table's location that no snapshot references
    are found by listing the bucket (opendal), kept by a dry run, deleted by a real one; every
    referenced object stays and the readers see every row. A floor below the longest write is
    refused."""
    create_bronze(gateway, db, "trades")
    insert_bronze(gateway, db, "trades", 300, now_ms() - 7_200_000, step_ms=1_000)
    table = bronze_table(db, "trades", max_rows_per_commit=100, settle_delay="1s")
    cfg, s3v = s3_config(tmp_path, gateway, [table], s3, "lake-orphans")
    env = {"TEST_S3_SECRET": SECRET}
    run(cfg, "once", env=env, check=True)
    client = s3["client"]
    before = objects(s3, "lake-orphans", "")
    table_prefix = next(k for k in before if k.endswith(".metadata.json")).split("/metadata/")[0]
    strays = [f"{table_prefix}/data/exchange_timestamp_day=2020-01-01/00000-0-dead.parquet",
              f"{table_prefix}/metadata/0badc0de-0000-7000-8000-000000000000-m0.avro"]
    for key in strays:
        client.put_object(Bucket="lake-orphans", Key=key, Body=b"left by an attempt that died")
    refused = run(cfg, "cleanup", "--older-than", "1s", env=env)
    assert refused.returncode != 0 and "below the safe floor" in refused.stderr, refused.stderr[-2000:]
    dry = run(cfg, "cleanup", "--older-than", "0s", "--allow-below-floor", "--dry-run", env=env, check=True).stdout
    assert "2 orphans (dry run: kept)" in dry, dry
    assert objects(s3, "lake-orphans", "") == before | set(strays)
    out = run(cfg, "cleanup", "--older-than", "0s", "--allow-below-floor", env=env, check=True).stdout
    assert "2 orphans deleted" in out, out
    assert objects(s3, "lake-orphans", "") == before
    assert_equal_to_source(gateway, tmp_path, db, "trades", s3=s3v)
