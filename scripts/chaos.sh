#!/usr/bin/env bash
# Chaos run (`make chaos`), two parts, each with its own servers in a temp dir:
#
# Ledger: 8 producers behaving like the Edge Function client drive the ledger jobs through two
# `tokenwarden run` replicas while replicas are SIGKILLed (5x), Redis is SIGKILLed and restarted
# from its AOF (1x) and with its data deleted (1x), and Postgres is restarted with a fast
# shutdown (1x); then every outcome, balance, hold and history row is compared with an
# in-memory model of the ledger rules.
#
# Chain: a random ERC-20/ERC-721 history on anvil indexed by `tokenwarden run` through a fault
# proxy (429 + Retry-After, hangs, dropped connections, truncated bodies, a lagging node, cut
# WebSockets), with anvil reorgs of depth 1-10 and 3 worker SIGKILLs; then every stored
# balance and owner is compared with balanceOf / ownerOf (and totalSupply) at the head.
#
# Prints the figures; exits non-zero on any lost, doubled or mismatched result.
#
# It starts its OWN Postgres (initdb in a temp dir, free port), its OWN redis-server (free
# port, AOF on) and its OWN anvil: the machine's shared servers are never touched.
#
#   scripts/chaos.sh                      release build, both parts, at most 10 minutes
#   scripts/chaos.sh --part chain --seed 7  options: target/release/chaos --help
#   scripts/chaos.sh --debug --ops 5000   debug build (what CI runs after `make test`)
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
if [ "${1:-}" = "--debug" ]; then profile=debug; shift; fi
if [ "$profile" = release ]; then
    cargo build --release --locked --bin tokenwarden --bin chaos
else
    cargo build --locked --bin tokenwarden --bin chaos
fi

# initdb/pg_ctl and redis-server come with the packages scripts/services.sh installs.
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$pg_bin" ] || ! command -v redis-server >/dev/null 2>&1; then
    scripts/services.sh
    pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
fi
exec "${CARGO_TARGET_DIR:-target}/$profile/chaos" --pg-bin-dir "$pg_bin" "$@"
