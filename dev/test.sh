#!/usr/bin/env bash
# The whole test suite: Rust unit and integration tests, then the end-to-end tests that run
# the real binary against the real ClickHouse engine (chdb behind our HTTP gateway), and
# check what lands in Iceberg with pyiceberg and ClickHouse icebergLocal().
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
source "$here/env.sh"
"$here/setup.sh"
cd "$root"
echo "== cargo build (with test-only fault injection, kept aside; then the real binary)" >&2
cargo build --locked --features fault-injection 2>&1 | tail -n 3 >&2
mkdir -p "$CARGO_TARGET_DIR/fault-injection"
cp "$CARGO_TARGET_DIR/debug/iceberg-offload" "$CARGO_TARGET_DIR/fault-injection/iceberg-offload"
cargo build --locked 2>&1 | tail -n 3 >&2
echo "== cargo fmt --check" >&2
cargo fmt --check >&2
echo "== cargo clippy (warnings are errors)" >&2
cargo clippy --locked --all-targets -- -D warnings 2>&1 | tail -n 20 >&2
test "${PIPESTATUS[0]}" -eq 0
echo "== cargo test" >&2
cargo test --locked 2>&1 | tee "$ICEBERG_OFFLOAD_CACHE/cargo-test.log" | grep -E "^(test result|running|test .*FAILED|failures)" || true
if grep -qE "^test result: FAILED|error(\[E[0-9]+\])?:" "$ICEBERG_OFFLOAD_CACHE/cargo-test.log"; then
  tail -n 60 "$ICEBERG_OFFLOAD_CACHE/cargo-test.log"
  exit 1
fi
echo "== pytest (end to end)" >&2
python -m pytest -q -p no:cacheprovider tests "$@"
