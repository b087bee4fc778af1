//! Holder snapshots: "who held token T at block N", from the GoldRush (Covalent)
//! `token_holders_v2` API or from the own index, and address checks against them.

pub mod cli;

use serde::Deserialize;

use crate::config::ConfigError;

/// `[snapshots]` configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotsConfig {
    pub goldrush_base_url: String,
    /// Name of the environment variable that holds the API key (the key itself never sits in a file).
    pub goldrush_api_key_env: String,
    pub goldrush_requests_per_sec: u32,
    pub goldrush_timeout_secs: u64,
    pub goldrush_max_retries: u32,
}

impl SnapshotsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if url::Url::parse(&self.goldrush_base_url).is_err() {
            return Err(ConfigError::invalid(
                "snapshots.goldrush_base_url",
                format!("not a URL: {:?}", self.goldrush_base_url),
            ));
        }
        if self.goldrush_requests_per_sec == 0 {
            return Err(ConfigError::invalid(
                "snapshots.goldrush_requests_per_sec",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}
