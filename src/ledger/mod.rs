//! The credits ledger: per-user token balances, holds, and an append-only history.
//!
//! The rules live in one place, the SQL function `tw_ledger_apply` (see `migrations/`): the
//! queue path calls it with a whole batch of operations in one transaction, and the
//! synchronous SQL door (`consume_tokens_atomic`, `add_tokens`, the hold functions) calls it with
//! one operation. Both doors therefore give the same outcome for the same request.
//!
//! [`anomalies`] holds the usage-anomaly rules and findings: an open `block` finding gates the
//! ledger (consume and hold answer `rate_limited`).

pub mod anomalies;
pub mod batcher;
pub mod cli;
pub mod jobs;
mod store;
mod types;

pub use store::{AccountView, HistoryEntry, Ledger, LedgerError, RejectedRequest};
pub use types::*;
