#!/usr/bin/env bash
# Installs what the demo and the tests need, idempotently: a Python virtualenv with the
# real ClickHouse engine (chdb), pyiceberg and pytest. Safe to run again; fast when done.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/env.sh"
mkdir -p "$ICEBERG_OFFLOAD_CACHE"

if [ ! -x "$ICEBERG_OFFLOAD_VENV/bin/python" ]; then
  python3 -m venv "$ICEBERG_OFFLOAD_VENV"
fi
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
have="$(cat "$ICEBERG_OFFLOAD_VENV/.requirements.sha256" 2>/dev/null || true)"
if [ "$want" != "$have" ]; then
  echo "setup: installing Python test tooling into $ICEBERG_OFFLOAD_VENV" >&2
  "$ICEBERG_OFFLOAD_VENV/bin/pip" install -q --disable-pip-version-check -r "$here/requirements.txt"
  echo "$want" > "$ICEBERG_OFFLOAD_VENV/.requirements.sha256"
fi

# Debian packages the tests run for real: ClickHouse 18.16 (the only one Debian ships: the
# service must refuse it clearly), PostgreSQL 15 (state store and SQL catalog), Prometheus
# with promtool and Alertmanager with amtool (rules, routing and the end-to-end alert flow),
# systemd-analyze (the unit file) and faketime (a host clock that disagrees with ClickHouse's).
missing=()
[ -x /usr/sbin/clickhouse-server ] || missing+=(clickhouse-server)
[ -d /usr/lib/postgresql/15/bin ] || missing+=(postgresql-15)
[ -x /usr/bin/promtool ] || missing+=(prometheus)
[ -x /usr/bin/prometheus-alertmanager ] || missing+=(prometheus-alertmanager)
[ -x /usr/bin/systemd-analyze ] || missing+=(systemd)
[ -x /usr/bin/faketime ] || missing+=(faketime)   # the service's clock set off from ClickHouse's (tests)
[ -x /usr/bin/sqlite3 ] || missing+=(sqlite3)     # the runbooks' state-store queries, run by the tests as written
# Spark as an independent reader (dev/spark_reader.py): JDBC drivers for our SQL catalogs, and
# jarjar to relocate the Jackson that the iceberg-spark-runtime jar from PyPI lacks.
command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
command -v npm >/dev/null || missing+=(npm)   # the Prometheus Operator CRD schemas (deploy/kubernetes/)
[ -f /usr/share/java/sqlite-jdbc.jar ] || missing+=(libxerial-sqlite-jdbc-java)
[ -f /usr/share/java/postgresql.jar ] || missing+=(libpostgresql-jdbc-java)
[ -f /usr/share/java/jarjar.jar ] || missing+=(libjarjar-java)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Iceberg's Spark runtime jar (PyPI snowpark-connect-deps-iceberg) refers to relocated
# dependencies it does not contain (org.apache.iceberg.shaded.*): Jackson 2.18.8 (PyPI
# snowpark-connect-deps-2) and Apache HttpClient >= 5.4 (its REST client; bookworm and trixie
# ship 5.2, which lacks TlsSocketStrategy: the jars come from Debian unstable's packages,
# checked against the archive's SHA256). Built once into one jar, relocated with jarjar.
hc5="$ICEBERG_OFFLOAD_CACHE/spark/httpclient5"
if [ ! -s "$hc5/httpclient5.jar" ]; then
  echo "setup: fetching HttpClient 5 jars from Debian unstable into $hc5" >&2
  "$ICEBERG_OFFLOAD_VENV/bin/python" "$here/debian_jars.py" "$hc5"
fi
shaded="$ICEBERG_OFFLOAD_CACHE/spark/iceberg-shaded-deps-2.jar"
if [ ! -s "$shaded" ]; then
  echo "setup: relocating Jackson and HttpClient 5 for the Spark reader into $shaded" >&2
  work="$(mktemp -d)"
  mkdir -p "$(dirname "$shaded")"
  "$ICEBERG_OFFLOAD_VENV/bin/python" - "$work/merged.jar" "$hc5" <<'PY'
import os, sys, zipfile, snowpark_connect_deps_2 as deps
jars = os.path.join(os.path.dirname(deps.__file__), "jars")
sources = [os.path.join(jars, f"jackson-{part}-2.18.8.jar") for part in ("core", "databind", "annotations")]
sources += [os.path.join(sys.argv[2], f"{name}.jar") for name in ("httpcore5", "httpcore5-h2", "httpclient5")]
with zipfile.ZipFile(sys.argv[1], "w", zipfile.ZIP_DEFLATED) as out:
    seen = set()
    for source in sources:
        with zipfile.ZipFile(source) as z:
            for name in z.namelist():
                if name.endswith(".class") and not name.startswith("META-INF/") and name != "module-info.class" and name not in seen:
                    seen.add(name)
                    out.writestr(name, z.read(name))
PY
  printf '%s\n' 'rule com.fasterxml.jackson.** org.apache.iceberg.shaded.com.fasterxml.jackson.@1' \
    'rule org.apache.hc.** org.apache.iceberg.shaded.org.apache.hc.@1' > "$work/rules.txt"
  java -jar /usr/share/java/jarjar.jar process "$work/rules.txt" "$work/merged.jar" "$shaded.tmp"
  mv "$shaded.tmp" "$shaded"
  rm -rf "$work"
fi

# The Prometheus Operator's CRD schemas (ServiceMonitor, PrometheusRule), from npm, to validate
# deploy/kubernetes/ offline (kubernetes-validate knows the built-in kinds only).
crds="$ICEBERG_OFFLOAD_CACHE/node/prometheus-operator-6.0.0"
if [ ! -f "$crds/node_modules/@kubernetes-models/prometheus-operator/package.json" ]; then
  echo "setup: installing @kubernetes-models/prometheus-operator 6.0.0 (npm)" >&2
  mkdir -p "$crds"
  (cd "$crds" && printf '{"private": true}\n' > package.json && \
    npm install --silent --no-audit --no-fund @kubernetes-models/prometheus-operator@6.0.0 >/dev/null)
fi
