//! tokenwarden: one worker process for apps that sell AI features for prepaid tokens and gate
//! features on on-chain holdings.
//!
//! | module | concern |
//! |---|---|
//! | [`config`] | typed configuration from defaults, a file and the environment: every section and default |
//! | [`redact`] | connection strings made safe to log |
//! | [`infra`] | Postgres pool, Redis connection, migrations, logging |
//! | [`app`] | [`app::AppContext`]: configuration, stores and shutdown signal shared by long-running parts |
//! | [`queue`] | the Redis-streams transport behind apalis: streams, groups, acks, redelivery, dead letters, replies |
//! | [`ledger`] | the credits ledger: consume, grant, hold, settle, release, idempotency, batching |
//! | [`chain`] | the ERC-20 / ERC-721 Transfer indexer: backfill, head following, reorgs |
//! | [`snapshots`] | holder snapshots from GoldRush or from the own index; address checks |
//! | [`whitelist`] | whitelists: places granted by an access rule within a window and a capacity, allowlist export |
//! | [`maintenance`] | scheduled jobs (lock cleanup, anomalies, pruning), the scheduler, health and metrics |
//! | [`worker`] | the `run` command: starts everything enabled in config and shuts it down cleanly |
//! | [`cli`] | the operator commands: one dispatch, one Postgres connection, one error type |

//!
//! The modules form layers that only point down (see `docs/architecture.md`, checked by
//! `scripts/layers.py`): foundation (`config`, `redact`) → infrastructure (`infra`, `app`) →
//! transport (`queue`) → domain (`ledger`, `chain`) → derived (`snapshots`, `access`, `whitelist`) → operations
//! (`maintenance`) → composition (`worker`, `cli`).

pub mod access;
pub mod app;
pub mod chain;
pub mod cli;
pub mod config;
pub mod infra;
pub mod ledger;
pub mod maintenance;
pub mod queue;
pub mod redact;
pub mod snapshots;
pub mod whitelist;
pub mod worker;
