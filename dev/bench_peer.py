#!/usr/bin/env python3
"""The Python peer of the benchmark: the same job written the way a user would — the window
fetched as Arrow over ClickHouse's HTTP interface (ArrowStream, read with pyarrow) and
appended with pyiceberg (pyiceberg-core for partition transforms), same SQL catalog type,
same partition spec (day), same compression (zstd level 1)."""
import argparse
import urllib.parse
import urllib.request

import pyarrow as pa
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.transforms import DayTransform


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--sql", required=True)
    ap.add_argument("--catalog", required=True)
    ap.add_argument("--warehouse", required=True)
    ap.add_argument("--table", required=True)
    a = ap.parse_args()
    req = urllib.request.Request(a.url + "/?" + urllib.parse.urlencode({"output_format_arrow_compression_method": "lz4_frame"}),
                                 data=(a.sql + " FORMAT ArrowStream").encode(),
                                 headers={"X-ClickHouse-User": "default", "X-ClickHouse-Key": a.password})
    with urllib.request.urlopen(req) as r:
        data = pa.ipc.open_stream(r).read_all()
    catalog = SqlCatalog("peer", uri=a.catalog, warehouse=a.warehouse)
    ns = a.table.split(".")[0]
    catalog.create_namespace_if_not_exists(ns)
    table = catalog.create_table(a.table, schema=data.schema,
                                 properties={"write.parquet.compression-codec": "zstd", "write.parquet.compression-level": "1"})
    source_id = table.schema().find_field("exchange_timestamp").field_id
    with table.update_spec() as spec:
        spec.add_field("exchange_timestamp", DayTransform(), "exchange_timestamp_day")
    table = catalog.load_table(a.table)
    assert source_id and table.spec().fields
    table.append(data)
    print(len(data))


if __name__ == "__main__":
    main()
