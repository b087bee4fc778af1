# tokenwarden: `make run` starts everything on local defaults; `make test` runs every test.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: run test services tools ops-tools build lint fmt check-fmt clean-test-dbs bench-ledger bench-ledger-variants bench-index bench-snapshots bench-access chaos soak docs docs-check

## Start Postgres and Redis if none is running (installing them if missing).
services:
	@scripts/services.sh

## Install anvil, solc and deno from npm into node_modules.
tools:
	@scripts/node-tools.sh

## Install promtool (Debian package prometheus), which tests/deploy.rs runs on deploy/.
ops-tools:
	@scripts/ops-tools.sh

build:
	$(CARGO) build --release --locked

## Start the whole stack on local defaults and show it working.
run: services tools
	@scripts/run-demo.sh

## Run every test against real Postgres, Redis and anvil.
test: services tools ops-tools clean-test-dbs
	$(CARGO) test --locked --all-targets --no-fail-fast -- --test-threads=$${TEST_THREADS:-8}

## Drop databases left behind by earlier test runs: only those nobody is connected to, so a
## test run of another engineer on the same server keeps its databases (no FORCE; a database
## that gains a session in between makes its DROP fail, which is ignored).
clean-test-dbs:
	@psql -h 127.0.0.1 -U postgres -d postgres -Atc "select d.datname from pg_database d where d.datname like 'tw\_test\_%' and not exists (select 1 from pg_stat_activity a where a.datname = d.datname)" \
	  | while read -r db; do PGOPTIONS="--client-min-messages=warning" psql -h 127.0.0.1 -U postgres -d postgres -qc "drop database if exists \"$$db\"" >/dev/null 2>&1 || true; done

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --locked -- -D warnings

fmt:
	$(CARGO) fmt --all

## Ledger benchmark: whole path (Redis → worker → Postgres), with the seed design as baseline.
bench-ledger: services tools
	@scripts/bench-ledger.sh

## What one SQL-door debit costs piece by piece: the seed's function, our door and experimental
## variants (scripts/bench-ledger-door-variants.sql) under pgbench, ratios to the seed's function.
bench-ledger-variants: services
	@scripts/bench-ledger-door-variants.sh $(BENCH_ARGS)

## Indexer benchmark: 200k+ Transfer logs on anvil, logs/s vs one eth_getLogs, RSS, head lag.
bench-index: services tools
	@scripts/bench-index.sh

## Access-check benchmark: SQL and queue doors on a 1M-holder index, revocation lag, balanceOf baseline.
bench-access: services tools
	@scripts/bench-access.sh $(BENCH_ARGS)

## Snapshot benchmark: 1,000,000-holder GoldRush crawl from the local mock.
bench-snapshots: services tools
	@scripts/bench-snapshots.sh

## Chaos run, ledger part (replicas SIGKILLed, Redis and Postgres restarted, outcomes checked
## against a model) then chain part (fault proxy, anvil reorgs, worker SIGKILLs, index checked
## against balanceOf/ownerOf); own Postgres, Redis and anvil; at most 10 minutes.
## CHAOS_ARGS="--part chain --seed 7".
chaos: services tools
	@scripts/chaos.sh $(CHAOS_ARGS)

## Soak run: 1,000 req/s through the queue door for 10 minutes (SOAK_ARGS="--duration 24h"),
## sampled every 10 s into docs/soak.csv and docs/soak.png.
soak: services
	@scripts/soak.sh $(SOAK_ARGS)

## Regenerate the generated tables in docs/ (configuration keys, metrics).
docs:
	@python3 scripts/gen-config-doc.py
	@python3 scripts/gen-metrics-doc.py

## Fail if a generated table in docs/ is stale (not part of `make test`; tests/docs.rs covers CI).
docs-check:
	@python3 scripts/gen-config-doc.py --check
	@python3 scripts/gen-metrics-doc.py --check
