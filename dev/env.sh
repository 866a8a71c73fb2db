# Sourced by the dev scripts: where the tool caches live (outside the clone, reused).
export ICEBERG_OFFLOAD_CACHE="${ICEBERG_OFFLOAD_CACHE:-$HOME/.cache/iceberg-offload}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ICEBERG_OFFLOAD_CACHE/target}"
export ICEBERG_OFFLOAD_VENV="${ICEBERG_OFFLOAD_VENV:-$ICEBERG_OFFLOAD_CACHE/venv}"
export PATH="$ICEBERG_OFFLOAD_VENV/bin:$HOME/.cargo/bin:$PATH"
