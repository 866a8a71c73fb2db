#!/usr/bin/env bash
# The whole test suite: Rust unit and integration tests, then the end-to-end tests that run
# the real binary against the real ClickHouse engine (chdb behind our HTTP gateway), and
# check what lands in Iceberg with pyiceberg and ClickHouse icebergLocal().
#
#   dev/test.sh            the whole suite (what CI runs); prints the 15 slowest tests at the end
#   dev/test.sh --quick    the inner loop, under 5 minutes: fmt, layers, clippy, the Rust tests
#                          and one end-to-end smoke test
#   dev/test.sh [--quick] ARGS…   extra arguments go to pytest (e.g. -k replicas)
set -euo pipefail
QUICK_SMOKE=test_cycles_with_inserts_land_every_row_exactly_once
quick=0
if [ "${1:-}" = "--quick" ]; then
  quick=1
  shift
fi
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
source "$here/env.sh"
"$here/setup.sh"
cd "$root"
echo "== cargo fmt --check" >&2
cargo fmt --check >&2
echo "== layers (ARCHITECTURE.md)" >&2
python "$here/check_layers.py" >&2
if [ "$quick" -eq 0 ]; then
  echo "== cargo build (with test-only fault injection, kept aside; then the real binary)" >&2
  cargo build --locked --features fault-injection 2>&1 | tail -n 3 >&2
  mkdir -p "$CARGO_TARGET_DIR/fault-injection"
  cp "$CARGO_TARGET_DIR/debug/iceberg-offload" "$CARGO_TARGET_DIR/fault-injection/iceberg-offload"
fi
cargo build --locked 2>&1 | tail -n 3 >&2
echo "== cargo clippy (warnings are errors)" >&2
cargo clippy --locked --all-targets -- -D warnings 2>&1 | tail -n 20 >&2
test "${PIPESTATUS[0]}" -eq 0
echo "== cargo test" >&2
cargo test --locked 2>&1 | tee "$ICEBERG_OFFLOAD_CACHE/cargo-test.log" | grep -E "^(test result|running|test .*FAILED|failures)" || true
if grep -qE "^test result: FAILED|error(\[E[0-9]+\])?:" "$ICEBERG_OFFLOAD_CACHE/cargo-test.log"; then
  tail -n 60 "$ICEBERG_OFFLOAD_CACHE/cargo-test.log"
  exit 1
fi
if [ "$quick" -eq 1 ]; then
  echo "== pytest (quick: the layer check and one end-to-end smoke test)" >&2
  exec python -m pytest -q -p no:cacheprovider tests/test_layers.py "tests/test_core.py::$QUICK_SMOKE" "$@"
fi
# Two workers: the suite waits on processes, servers and clocks most of the time (one worker kept
# the 2 cores about 30% busy). A test file runs whole on one worker (its module fixtures are
# built once); the tests that use the machine's PostgreSQL take turns (tests/conftest.py).
workers="${ICEBERG_OFFLOAD_TEST_WORKERS:-2}"
echo "== pytest (end to end, $workers workers)" >&2
python -m pytest -q -p no:cacheprovider -n "$workers" --dist loadfile --durations=15 tests "$@"
