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
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
