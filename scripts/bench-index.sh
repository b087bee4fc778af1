#!/usr/bin/env bash
# Indexer benchmark: ≥200,000 Transfer logs on anvil; prints logs/s beside one eth_getLogs over
# the same range, exactness, head lag p50/p99 at one block per second, and the worker's peak RSS.
# Usage: scripts/bench-index.sh [--logs N] [--holders N] [--per-tx N] [--blocks-per-tx N] [--lag-blocks N] [--history-queries N] [--second-logs N] [--probe-ms N] [--backfill-writers N]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin tokenwarden --bin bench-index
exec "${CARGO_TARGET_DIR:-target}/release/bench-index" --root . --tokenwarden "${CARGO_TARGET_DIR:-target}/release/tokenwarden" "$@"
