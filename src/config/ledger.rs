//! `[ledger]`: batching and the bounds the SQL rules enforce.

use serde::Deserialize;

use super::error::ConfigError;

/// `[ledger]` configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerConfig {
    /// Largest number of operations applied in one Postgres transaction.
    pub max_batch: usize,
    /// Largest accepted `metadata` object, in bytes of its jsonb text. This and the two TTLs
    /// are written into `tw_ledger_settings` at start and enforced by SQL for both doors.
    pub metadata_max_bytes: usize,
    /// Hold lifetime when a hold gives none (seconds).
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
