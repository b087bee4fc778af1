#!/usr/bin/env bash
# What one debit through a SQL door costs, piece by piece (issue 12): pgbench drives the seed's
# consume_tokens_atomic, tokenwarden's SQL door and three experimental variants on tokenwarden's
# tables (scripts/bench-ledger-door-variants.sql) over the same connections, one variant after
# the other in each round, and prints debits/s min / median / max and the ratio to the seed's
# function (median of the per-round ratios). A fresh database, dropped at the end.
# Usage: scripts/bench-ledger-door-variants.sh [--rounds N] [--secs N] [--clients N]
# Needs pgbench (Debian: package postgresql-15 or postgresql-client) and a release build of the
# worker (for `tokenwarden migrate`). Synchronous commit stays on, as in `make bench-ledger`.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=3 secs=8 clients=32
while [[ $# -gt 0 ]]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --secs) secs=$2; shift 2 ;;
    --clients) clients=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

command -v pgbench >/dev/null || { echo "pgbench not found: install postgresql-client" >&2; exit 1; }
pg_isready -q -h 127.0.0.1 -p 5432 || { echo "no PostgreSQL on 127.0.0.1:5432: run make services" >&2; exit 1; }
bin="${CARGO_TARGET_DIR:-target}/release/tokenwarden"
# Always build: a stale binary would migrate the database to an older schema without a word.
cargo build --release --locked --bin tokenwarden

db="tw_bench_variants_$$"
work=$(mktemp -d)
psql_admin() { psql -h 127.0.0.1 -U postgres -d postgres -qAt "$@"; }
cleanup() {
  psql_admin -c "drop database if exists $db with (force)" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

psql_admin -c "create database $db"
TOKENWARDEN__DATABASE__URL="postgres://postgres@127.0.0.1:5432/$db" "$bin" migrate >/dev/null
psql -h 127.0.0.1 -U postgres -d "$db" -q -v ON_ERROR_STOP=1 -f src/bin/bench_ledger_seed.sql
psql -h 127.0.0.1 -U postgres -d "$db" -q -v ON_ERROR_STOP=1 -f scripts/bench-ledger-door-variants.sql

# name → the function called with (request id, user, 1, 'chat', '{}')
declare -A fn=(
  [seed]=seed.consume_tokens_atomic
  [door]=public.consume_tokens_atomic
  [flat]=variants.flat
  [seed_shape]=variants.seed_shape
  [floor]=variants.floor
)
order=(seed door flat seed_shape floor)
for w in hot 10k; do
  users=$([[ $w == hot ]] && echo 1 || echo 10000)
  for v in "${order[@]}"; do
    cat >"$work/$v-$w.sql" <<EOF
\set i random(1, $users)
SELECT (${fn[$v]}(gen_random_uuid(), (SELECT u.id FROM variants.users u WHERE u.i = :i), 1, 'chat', '{}'::jsonb))::text;
EOF
  done
done

echo "machine: $(nproc) cores; load average at start: $(cut -d' ' -f1-3 /proc/loadavg); $clients connections, ${secs} s per run, $rounds rounds"
for ((r = 1; r <= rounds; r++)); do
  # Each round starts with another variant, so that no variant always runs on the freshest or
  # the most grown tables; each run starts after a VACUUM and a CHECKPOINT.
  n=${#order[@]}
  rotated=("${order[@]:$(((r - 1) % n))}" "${order[@]:0:$(((r - 1) % n))}")
  for w in hot 10k; do
    for v in "${rotated[@]}"; do
      psql -h 127.0.0.1 -U postgres -d "$db" -qc "VACUUM ANALYZE" -c "CHECKPOINT"
      out=$(pgbench -h 127.0.0.1 -U postgres -n -M prepared -c "$clients" -j 2 -T "$secs" \
              -f "$work/$v-$w.sql" "$db" 2>&1)
      if grep -qE "aborted|failed transactions: [1-9]" <<<"$out"; then
        echo "variant $v ($w) failed; pgbench said:" >&2
        echo "$out" >&2
        exit 1
      fi
      tps=$(awk '/^tps/ {print $3}' <<<"$out")
      echo "$w $v $r $tps" >>"$work/results"
      printf 'round %d  %-4s %-11s %9.0f debits/s\n' "$r" "$w" "$v" "$tps"
    done
  done
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$work/results" "${order[@]}" <<'EOF'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1])]
variants = sys.argv[2:]
tps = {}
for w, v, r, t in rows:
    tps.setdefault((w, v), {})[int(r)] = float(t)
print("\nworkload variant      min / median / max debits/s      vs seed (median of rounds)")
for w in ("hot", "10k"):
    for v in variants:
        xs = tps[(w, v)]
        s = sorted(xs.values())
        ratio = statistics.median(xs[r] / tps[(w, "seed")][r] for r in xs)
        print(f"{w:<8} {v:<11} {s[0]:9.0f} / {statistics.median(s):9.0f} / {s[-1]:9.0f}    {ratio:5.2f}x")
EOF
