#!/usr/bin/env bash
# Ledger benchmark (`make bench-ledger`): the whole path, caller XADD → Redis stream → worker
# process → Postgres (durable commits) → reply list, against the seed design (one
# consume_tokens_atomic call per debit over 32 connections), in one run on a fresh database.
# Prints debits/s for one hot user and for 10,000 users, the ratios to the baseline, the
# enqueue→reply latency at a steady 1,000 requests/s, the worker's peak RSS and a CPU split.
# Extra arguments go to the bench binary (see `target/release/bench_ledger --help`), e.g.
#   scripts/bench-ledger.sh --workers 2 --jobs 100000
# Bounded: about 1–2 minutes after the build; every phase has a deadline.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin tokenwarden --bin bench_ledger
exec "${CARGO_TARGET_DIR:-target}/release/bench_ledger" "$@"
