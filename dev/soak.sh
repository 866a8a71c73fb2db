#!/usr/bin/env bash
# Randomised SIGKILL soak (see dev/soak.py): dev/soak.sh --trials 200
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/env.sh"
"$here/setup.sh"
cd "$(dirname "$here")"
cargo build --locked 2>&1 | tail -n 1 >&2
exec python "$here/soak.py" "$@"
