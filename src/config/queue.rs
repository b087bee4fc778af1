//! `[queue]`: the Redis-streams transport.

use serde::Deserialize;

use super::error::ConfigError;

/// `[queue]` configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Consumer group shared by every `run` replica.
    pub group: String,
    /// Entries read per XREADGROUP call.
    pub read_count: usize,
    /// How long one XREADGROUP blocks waiting for new entries (ms).
    pub block_ms: u64,
    /// An entry pending this long is presumed abandoned and redelivered (ms).
    pub claim_idle_ms: u64,
    /// After this many deliveries an entry goes to the dead-letter store.
    pub max_deliveries: u32,
    /// Reply lists expire after this many seconds.
    pub reply_ttl_secs: u64,
    /// Jobs in flight per job type and process.
    pub concurrency: usize,
    /// On SIGTERM, how long in-flight jobs get to finish before the process exits anyway (s).
    pub shutdown_grace_secs: u64,
}

impl QueueConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.group.is_empty() || self.group.contains(char::is_whitespace) {
            return Err(ConfigError::invalid(
                "queue.group",
                "must be non-empty and contain no whitespace",
            ));
        }
        if self.read_count == 0 || self.read_count > 100_000 {
            return Err(ConfigError::invalid(
                "queue.read_count",
                "must be between 1 and 100000",
            ));
        }
        if self.block_ms == 0 {
            return Err(ConfigError::invalid("queue.block_ms", "must be at least 1"));
        }
        if self.claim_idle_ms < 10 {
            return Err(ConfigError::invalid(
                "queue.claim_idle_ms",
                "must be at least 10",
            ));
        }
        if self.max_deliveries == 0 {
            return Err(ConfigError::invalid(
                "queue.max_deliveries",
                "must be at least 1",
            ));
        }
        if self.reply_ttl_secs == 0 {
            return Err(ConfigError::invalid(
                "queue.reply_ttl_secs",
                "must be at least 1",
            ));
        }
        if self.concurrency == 0 {
            return Err(ConfigError::invalid(
                "queue.concurrency",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// How often a reader looks for abandoned entries and renews its own leases.
    pub fn claim_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis((self.claim_idle_ms / 3).clamp(5, 5_000))
    }
}
