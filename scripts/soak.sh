#!/usr/bin/env bash
# Soak run (`make soak`): 1,000 consume_tokens requests/s open loop through the queue door over
# 10,000 users against one `tokenwarden run` with its scheduler live, for 10 minutes by default.
# Every 10 s: p50/p99/max latency, worker RSS, Postgres connections, Redis memory, stream
# lengths, pending entries, dead letters, checkpoints and autovacuum runs. Writes docs/soak.csv
# and docs/soak.png; exits non-zero when a target is missed (p99 <= 20 ms in every window, RSS
# growth <= 10 % after the first minute, no timeout).
#
# Own Postgres and redis-server in a temp dir (like `make chaos`); release build.
#
#   scripts/soak.sh                        10 minutes
#   scripts/soak.sh --duration 24h         endurance
#   scripts/soak.sh --duration 3m --rate 500 --out-dir /tmp/soak
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin tokenwarden --bin soak
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$pg_bin" ] || ! command -v redis-server >/dev/null 2>&1; then
    scripts/services.sh
    pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
fi
exec "${CARGO_TARGET_DIR:-target}/release/soak" --pg-bin-dir "$pg_bin" "$@"
