#!/usr/bin/env bash
# Access-check benchmark (`make bench-access`): on a fresh database and a fresh anvil, an index
# of holders with proven wallets and creators' rules; prints checks/s through the SQL door
# (verify_access_for, 32 connections) and the queue door (Redis → worker → reply, cold and warm
# cache), p50/p99 at 1,000 checks/s open loop, the revocation lag (block mined → `revoked` on
# {prefix}:access_changes), the worker's RSS, the machine's load, and the seed's design (one
# balanceOf eth_call per check) measured in the same run with the ratios.
# Extra arguments go to the bench binary (`target/release/bench_access --help`), e.g.
#   scripts/bench-access.sh --full --runs 3     # 1,000,000 holders, 10,000 rules
# Bounded: about 2–4 minutes after the build by default; every phase has a deadline.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin tokenwarden --bin bench_access
exec "${CARGO_TARGET_DIR:-target}/release/bench_access" --root . "$@"
