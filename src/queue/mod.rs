//! The job transport: one Redis stream per job type (`{prefix}:jobs:{type}`), consumer groups,
//! acknowledgement after the Postgres commit, redelivery of entries a dead worker held, a
//! delivery limit and a dead-letter store, and reply lists for callers that wait.
//!
//! Any Redis client enqueues with one `XADD`; the entry fields are documented in `jobs/`.

pub mod cli;
pub mod job;

pub use job::{JobError, JobFuture, JobHandler};

use serde::Deserialize;

use crate::config::ConfigError;

/// `[queue]` configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    pub group: String,
    pub read_count: usize,
    pub block_ms: u64,
    pub claim_idle_ms: u64,
    pub max_deliveries: u32,
    pub reply_ttl_secs: u64,
    pub concurrency: usize,
}

impl QueueConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.group.is_empty() {
            return Err(ConfigError::invalid("queue.group", "must not be empty"));
        }
        if self.read_count == 0 {
            return Err(ConfigError::invalid(
                "queue.read_count",
                "must be at least 1",
            ));
        }
        if self.max_deliveries == 0 {
            return Err(ConfigError::invalid(
                "queue.max_deliveries",
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
}
