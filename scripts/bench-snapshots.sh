#!/usr/bin/env bash
# Snapshot benchmark: a 1,000,000-holder GoldRush crawl (1,000 pages of 1,000) from a local mock,
# stored end to end in Postgres. Prints holders stored per second and peak RSS.
# Env: BENCH_HOLDERS (default 1000000), BENCH_RPS (client rate limit, default 100000),
#      TOKENWARDEN_TEST_DATABASE_URL (admin Postgres URL).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin bench_snapshots
exec "${CARGO_TARGET_DIR:-target}/release/bench_snapshots"
