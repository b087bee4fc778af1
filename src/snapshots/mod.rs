//! Holder snapshots: "who held token T at block N", from the GoldRush (Covalent)
//! `token_holders_v2` API or from the own index, and address checks against them.
//!
//! | module | concern |
//! |---|---|
//! | [`chains`] | which chains GoldRush serves (Story: no; history: Foundational chains only) |
//! | [`goldrush`] | the HTTP client: rate limit, retries, `Retry-After`, envelope validation |
//! | [`store`] | the `snapshots` / `snapshot_holders` tables: pending → complete/failed, COPY per page |
//! | [`claim`] | one crawler per snapshot: a session advisory lock held for the whole crawl |
//! | [`crawl`] | a GoldRush crawl streamed page by page into Postgres |
//! | [`own_index`] | own-index snapshots: holders computed from the chain indexer's tables (through [`crate::chain::store`]) |
//! | [`service`] | one entry point for jobs and the CLI: validate a request, run it, record the outcome |
//! | [`job`] | the `snapshot_create` job handler |
//! | [`cli`] | `tokenwarden snapshot create|show|check|diff` |

pub mod chains;
pub mod claim;
pub(crate) mod cli;
pub(crate) mod crawl;
pub mod goldrush;
pub(crate) mod job;
pub(crate) mod own_index;
pub(crate) mod service;
pub mod store;

pub use job::{SnapshotCreateHandler, parse_payload as parse_snapshot_payload};
pub use service::{
    InvalidRequest, SnapshotError, SnapshotOutcome, SnapshotRequest, SnapshotService,
    SnapshotSource,
};
