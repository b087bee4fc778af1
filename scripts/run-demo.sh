#!/usr/bin/env bash
# `make run`: the whole stack on local defaults, shown working.
# Postgres/Redis are started by `make services` before this runs; this script starts anvil (unless
# one answers on :8545), deploys a demo ERC-20, migrates, starts the worker with the chain indexer,
# enqueues demo jobs, prints their outcomes, the balances and the indexed holders, then keeps the
# worker in the foreground until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .tw
BIN=target/debug/tokenwarden
ANVIL_URL=${ANVIL_URL:-http://127.0.0.1:8545}
export TOKENWARDEN__DATABASE__URL=${TOKENWARDEN__DATABASE__URL:-postgres://postgres@127.0.0.1:5432/tokenwarden}
PSQL=(psql -h 127.0.0.1 -U postgres -X -q)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "building tokenwarden"
cargo build --locked --bin tokenwarden

say "database"
"${PSQL[@]}" -d postgres -tAc "select 1 from pg_database where datname = 'tokenwarden'" | grep -q 1 \
    || "${PSQL[@]}" -d postgres -c "create database tokenwarden"
$BIN migrate

say "anvil"
chain_up() { curl -sf -X POST -H 'content-type: application/json' \
    --data '{"jsonrpc":"2.0","id":1,"method":"eth_chainId","params":[]}' "$ANVIL_URL" >/dev/null 2>&1; }
if chain_up; then
    echo "using the chain already answering at $ANVIL_URL"
else
    # The native binary, not the node shim in .bin: killing the shim would orphan anvil.
    anvil_bin=$(ls node_modules/@foundry-rs/anvil-*/bin/anvil 2>/dev/null | head -1)
    "${anvil_bin:-node_modules/.bin/anvil}" --port 8545 --block-time 1 --silent > .tw/anvil.log 2>&1 &
    pids+=($!)
    for _ in $(seq 1 100); do chain_up && break; sleep 0.1; done
    chain_up || { echo "anvil did not start; see .tw/anvil.log"; exit 1; }
    echo "started anvil at $ANVIL_URL (1 block per second)"
fi
token_json=$(ANVIL_URL=$ANVIL_URL node scripts/demo-chain.mjs)
token=$(node -e "console.log(JSON.parse(process.argv[1]).address)" "$token_json")
echo "demo ERC-20 deployed at $token with 20 holders"

cat > .tw/demo.toml <<TOML
# Written by scripts/run-demo.sh: the local anvil chain and its demo token.
[chain]
enabled = true

[[chain.chains]]
chain_id = 31337
name = "anvil"
rpc_urls = ["$ANVIL_URL"]
confirmations = 0
poll_interval_ms = 500

[[chain.tokens]]
chain_id = 31337
address = "$token"
standard = "erc20"
start_block = 0
TOML

say "worker"
$BIN --config .tw/demo.toml run > .tw/worker.log 2>&1 &
worker=$!
pids+=($worker)
for _ in $(seq 1 200); do
    curl -sf http://127.0.0.1:9464/readyz >/dev/null 2>&1 && break
    kill -0 $worker 2>/dev/null || { echo "worker exited; see .tw/worker.log"; tail -20 .tw/worker.log; exit 1; }
    sleep 0.1
done
echo "worker running (logs: .tw/worker.log, metrics: http://127.0.0.1:9464/metrics)"

uuid() { cat /proc/sys/kernel/random/uuid; }
user=$(uuid)
say "credits for demo user $user"
$BIN credits grant "$user" 100 --reason "demo top-up"
req=$(uuid)
echo "-- consume 30 tokens (request $req)"
$BIN enqueue consume_tokens "{\"request_id\":\"$req\",\"user_id\":\"$user\",\"amount\":30,\"operation_type\":\"meal-analyzer\"}" --wait 5000
echo "-- the same request again: same outcome, no second debit"
$BIN enqueue consume_tokens "{\"request_id\":\"$req\",\"user_id\":\"$user\",\"amount\":30,\"operation_type\":\"meal-analyzer\"}" --wait 5000
echo "-- consume 1000 tokens: more than the balance"
$BIN enqueue consume_tokens "{\"request_id\":\"$(uuid)\",\"user_id\":\"$user\",\"amount\":1000,\"operation_type\":\"image-generator\"}" --wait 5000
echo "-- a malformed job (negative amount): rejected and kept as a dead letter"
$BIN enqueue consume_tokens "{\"request_id\":\"$(uuid)\",\"user_id\":\"$user\",\"amount\":-5,\"operation_type\":\"x\"}" --wait 5000 || true
echo "-- balance and history"
$BIN credits balance "$user"
$BIN credits history "$user" --limit 5

say "chain index"
for _ in $(seq 1 100); do
    n=$("${PSQL[@]}" -d tokenwarden -tAc "select count(*) from token_balances where token = '$token' and balance > 0" 2>/dev/null || echo 0)
    [ "${n:-0}" -ge 20 ] && break
    sleep 0.2
done
$BIN --config .tw/demo.toml index status
echo "-- top holders of the demo token"
"${PSQL[@]}" -d tokenwarden -c "select holder, balance, updated_block from token_balances where token = '$token' order by balance desc, holder limit 5"

say "running: Ctrl-C stops the worker (and the anvil this script started)"
wait $worker
