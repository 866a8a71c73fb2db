#!/usr/bin/env bash
# Benchmark (see dev/bench.py): dev/bench.sh [--sizes 10000,100000,1000000,10000000]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/env.sh"
"$here/setup.sh"
cd "$(dirname "$here")"
echo "== building iceberg-offload (release)" >&2
cargo build --locked --release 2>&1 | tail -n 1 >&2
exec python "$here/bench.py" "$@"
