//! The credits ledger: per-user token balances, holds, and an append-only history.
//!
//! The rules live in one place, the SQL function `tw_ledger_apply` (see `migrations/`): the
//! queue path calls it with a whole batch of operations in one transaction, and the
//! synchronous SQL door (`consume_tokens_atomic`, `add_tokens`, the hold functions) calls it with
//! one operation. Both doors therefore give the same outcome for the same request.
//!
//! The bounds (operation_type and reason length, metadata size, hold TTL range and default) are
//! SQL's too: `tw_ledger_apply` reads them from the one-row table `tw_ledger_settings`, which
//! [`Ledger::write_settings`] fills from `[ledger]` when the worker starts. Rust parses the shape
//! of a queue payload only.
//!
//! [`anomalies`] holds the usage-anomaly rules and findings: an open `block` finding gates the
//! ledger (consume and hold answer `rate_limited`).

pub mod anomalies;
pub mod batcher;
pub(crate) mod cli;
pub mod jobs;
mod store;
mod types;

pub use store::{AccountView, HistoryEntry, Ledger, LedgerError, RejectedRequest};
pub use types::*;
