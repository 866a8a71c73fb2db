#!/usr/bin/env bash
# The main job on embedded defaults: local ClickHouse engine, K2 bronze trades for binance
# and kraken, a few offload cycles, and an independent check of what landed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/env.sh"
"$here/setup.sh"
cd "$(dirname "$here")"
echo "== building iceberg-offload" >&2
cargo build --locked 2>&1 | tail -n 1 >&2
exec python "$here/demo.py"
