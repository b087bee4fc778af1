//! The credits ledger: per-user token balances, holds, and an append-only history.
//!
//! The rules live in one place, the SQL function `tw_ledger_apply` (see `migrations/`): the
//! queue path calls it with a whole batch of operations in one transaction, and the
//! synchronous SQL door (`consume_tokens_atomic`, `add_tokens`, the hold functions) calls it with
//! one operation. Both doors therefore give the same outcome for the same request.

pub mod batcher;
pub mod cli;
pub mod jobs;
mod store;
mod types;

pub use store::{AccountView, HistoryEntry, Ledger, LedgerError, RejectedRequest};
pub use types::*;

use serde::Deserialize;

use crate::config::ConfigError;

/// `[ledger]` configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerConfig {
    /// Largest number of operations applied in one Postgres transaction.
    pub max_batch: usize,
    /// Largest accepted `metadata` object, in bytes of JSON.
    pub metadata_max_bytes: usize,
    /// Hold lifetime when a hold job gives none (seconds).
    pub default_hold_ttl_secs: u32,
    /// Longest hold lifetime a caller may ask for (seconds).
    pub max_hold_ttl_secs: u32,
}

impl LedgerConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_batch == 0 || self.max_batch > 10_000 {
            return Err(ConfigError::invalid(
                "ledger.max_batch",
                "must be between 1 and 10000",
            ));
        }
        if self.metadata_max_bytes == 0 {
            return Err(ConfigError::invalid(
                "ledger.metadata_max_bytes",
                "must be at least 1",
            ));
        }
        if self.default_hold_ttl_secs == 0 || self.default_hold_ttl_secs > self.max_hold_ttl_secs {
            return Err(ConfigError::invalid(
                "ledger.default_hold_ttl_secs",
                "must be between 1 and ledger.max_hold_ttl_secs",
            ));
        }
        Ok(())
    }
}
