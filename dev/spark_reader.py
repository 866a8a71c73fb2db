"""Spark 3.5 + Iceberg 1.10 (the original pipeline's engine family) as an independent reader
of what lands in Iceberg, offline (shared/research/readers.md).

One JVM per Python process (`Spark.shared()`), started on first use (~6 s on 2 cores); each
read runs in a fresh `SparkSession.newSession()`, so every read gets its own catalog
instance (named as the service's `catalog.name`, which JdbcCatalog needs: it is the
`catalog_name` column of `iceberg_tables`), closed after the read.

Catalogs (`catalog` dicts):
  {"type": "jdbc", "uri": "jdbc:sqlite:/abs/catalog.db", "warehouse": "file:///abs/wh", "name": "offload"}
  {"type": "jdbc", "uri": "jdbc:postgresql://127.0.0.1:5432/db", "user": "u", "password": "p", ...}
  {"type": "rest", "uri": "http://127.0.0.1:8181", "token": "..."}
  {"type": "hadoop", "warehouse": "/abs/warehouse"}          (the original's layout)

The jars: iceberg-spark-runtime/-extensions from PyPI `snowpark-connect-deps-iceberg`, the
relocated Jackson and HttpClient 5 that jar lacks (built by dev/setup.sh into the cache), and
Debian's JDBC drivers. Warehouses on S3 are not readable here (no AWS SDK jars offline).
"""
import datetime as dt
import glob
import os
import site
from pathlib import Path

CACHE = Path(os.environ.get("ICEBERG_OFFLOAD_CACHE", Path.home() / ".cache" / "iceberg-offload"))
SHADED_DEPS = CACHE / "spark" / "iceberg-shaded-deps-2.jar"
JDBC_JARS = ["/usr/share/java/sqlite-jdbc.jar", "/usr/share/java/postgresql.jar"]
JNI = "/usr/lib/x86_64-linux-gnu/jni"


def iceberg_jars():
    for sp in site.getsitepackages():
        jars = sorted(glob.glob(os.path.join(sp, "snowpark_connect_deps_iceberg", "jars", "iceberg-spark-*-3.5_2.12-*.jar")))
        if jars:
            return jars
    raise RuntimeError("iceberg-spark-runtime-3.5_2.12 not found: run dev/setup.sh")


class Spark:
    _shared = None

    @classmethod
    def shared(cls):
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def __init__(self):
        from pyspark.sql import SparkSession

        if not SHADED_DEPS.exists():
            raise RuntimeError(f"{SHADED_DEPS} is missing: run dev/setup.sh")
        jars = iceberg_jars() + [str(SHADED_DEPS)] + [j for j in JDBC_JARS if os.path.exists(j)]
        java_opts = f"-Djava.library.path={JNI} -Duser.timezone=UTC"
        self.spark = (SparkSession.builder.master("local[2]").appName("iceberg-offload-reader")
                      .config("spark.jars", ",".join(jars))
                      .config("spark.driver.extraJavaOptions", java_opts)
                      .config("spark.sql.extensions", "org.apache.iceberg.spark.extensions.IcebergSparkSessionExtensions")
                      .config("spark.sql.session.timeZone", "UTC")
                      .config("spark.ui.enabled", "false")
                      .config("spark.ui.showConsoleProgress", "false")
                      .config("spark.sql.shuffle.partitions", "2")
                      .config("spark.driver.memory", "1g")
                      .getOrCreate())
        self.spark.sparkContext.setLogLevel("ERROR")
        self._n = 0

    def session(self, catalog):
        """A new session with `catalog` registered under its name; returns (session, name)."""
        s = self.spark.newSession()
        name = catalog.get("name", "offload")
        prefix = f"spark.sql.catalog.{name}"
        s.conf.set(prefix, "org.apache.iceberg.spark.SparkCatalog")
        s.conf.set(f"{prefix}.cache-enabled", "false")
        kind = catalog["type"]
        if kind == "jdbc":
            s.conf.set(f"{prefix}.catalog-impl", "org.apache.iceberg.jdbc.JdbcCatalog")
            s.conf.set(f"{prefix}.uri", catalog["uri"])
            s.conf.set(f"{prefix}.warehouse", catalog["warehouse"])
            for k in ("user", "password"):
                if catalog.get(k):
                    s.conf.set(f"{prefix}.jdbc.{k}", catalog[k])
        elif kind == "rest":
            s.conf.set(f"{prefix}.type", "rest")
            s.conf.set(f"{prefix}.uri", catalog["uri"])
            if catalog.get("token"):
                s.conf.set(f"{prefix}.token", catalog["token"])
        elif kind == "hadoop":
            s.conf.set(f"{prefix}.type", "hadoop")
            s.conf.set(f"{prefix}.warehouse", catalog["warehouse"])
        else:
            raise ValueError(f"unknown catalog type {kind}")
        return s, name

    def close_catalog(self, s, name):
        """Closes the catalog's connections (a PostgreSQL database can then be dropped)."""
        try:
            cat = s._jsparkSession.sessionState().catalogManager().catalog(name)
            ice = cat.icebergCatalog()
            if hasattr(ice, "close"):
                ice.close()
        except Exception:  # noqa: BLE001 - best effort: the session is dropped anyway
            pass

    def sql(self, catalog, query):
        """Runs `query` (with `{t}`-free SQL naming `<catalog name>.<ns>.<table>`) and collects."""
        s, name = self.session(catalog)
        try:
            return s.sql(query).collect()
        finally:
            self.close_catalog(s, name)

    def read(self, catalog, table, key="", sums=(), rows=False):
        """count, distinct keys, sums (as strings) and optionally every row, as Spark sees them."""
        s, name = self.session(catalog)
        try:
            ident = f"{name}.{table}"
            keys = [k for k in key.split(",") if k]
            distinct = f", count(DISTINCT {', '.join(f'`{k}`' for k in keys)})" if keys else ", 0"
            sum_sql = "".join(f", CAST(sum(`{c}`) AS STRING)" for c in sums)
            row = s.sql(f"SELECT count(*){distinct}{sum_sql} FROM {ident}").collect()[0]
            out = {"count": int(row[0]), "distinct_keys": int(row[1]),
                   "sums": {c: (v if v is not None else "0") for c, v in zip(sums, list(row)[2:])}}
            df = s.table(ident)
            out["types"] = {f.name: f.dataType.simpleString() for f in df.schema.fields}
            if rows:
                out["rows"] = collect_rows(df)
            return out
        finally:
            self.close_catalog(s, name)


def collect_rows(df):
    """Every row as Python values; timestamps as aware UTC datetimes (read as epoch micros, so
    the Python process's time zone plays no part), binary as bytes."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import BinaryType, TimestampNTZType, TimestampType

    cols, stamps = [], set()
    for f in df.schema.fields:
        if isinstance(f.dataType, (TimestampType, TimestampNTZType)):
            cols.append(F.unix_micros(F.col(f"`{f.name}`").cast("timestamp")).alias(f.name))
            stamps.add(f.name)
        else:
            cols.append(F.col(f"`{f.name}`"))
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    out = []
    for r in df.select(*cols).collect():
        d = r.asDict(recursive=True)
        for name in stamps:
            if d[name] is not None:
                d[name] = epoch + dt.timedelta(microseconds=d[name])
        for f in df.schema.fields:
            if isinstance(f.dataType, BinaryType) and d[f.name] is not None:
                d[f.name] = bytes(d[f.name])
        out.append(d)
    return out
