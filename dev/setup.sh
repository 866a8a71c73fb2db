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
