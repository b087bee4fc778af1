//! tokenwarden: one worker process for apps that sell AI features for prepaid tokens and gate
//! features on on-chain holdings.
//!
//! | module | concern |
//! |---|---|
//! | [`config`] | typed configuration from defaults, a file and the environment |
//! | [`store`] | Postgres pool, Redis connection, migrations |
//! | [`queue`] | the Redis-streams transport behind apalis: streams, groups, acks, redelivery, dead letters, replies |
//! | [`ledger`] | the credits ledger: consume, grant, hold, settle, release, idempotency, batching |
//! | [`chain`] | the ERC-20 / ERC-721 Transfer indexer: backfill, head following, reorgs |
//! | [`snapshots`] | holder snapshots from GoldRush or from the own index; address checks |
//! | [`maintenance`] | scheduled jobs (lock cleanup, anomalies, pruning), the scheduler, health and metrics |
//! | [`telemetry`] | logging set-up |
//! | [`worker`] | the `run` command: starts everything enabled in config and shuts it down cleanly |

pub mod chain;
pub mod config;
pub mod ledger;
pub mod maintenance;
pub mod queue;
pub mod snapshots;
pub mod store;
pub mod telemetry;
pub mod worker;
