//! `[snapshots]`: the GoldRush client.

use serde::Deserialize;

use super::error::ConfigError;

/// `[snapshots]` configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotsConfig {
    pub goldrush_base_url: String,
    /// Name of the environment variable that holds the API key (the key itself never sits in a file).
    pub goldrush_api_key_env: String,
    /// Client-side rate limit: requests started per second (GoldRush's free and Vibe plans allow 4).
    pub goldrush_requests_per_sec: u32,
    pub goldrush_timeout_secs: u64,
    /// Retries after the first attempt, on 429/5xx/507/562 and timeouts only.
    pub goldrush_max_retries: u32,
    /// First backoff delay (jittered, doubling up to the max).
    pub goldrush_retry_min_delay_ms: u64,
    pub goldrush_retry_max_delay_ms: u64,
    /// A `Retry-After` longer than this fails the crawl instead of parking the job.
    pub goldrush_max_retry_after_secs: u64,
    /// `page-size`: GoldRush accepts only 100 and 1000.
    pub goldrush_page_size: u32,
}

impl SnapshotsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if url::Url::parse(&self.goldrush_base_url).is_err() {
            return Err(ConfigError::invalid(
                "snapshots.goldrush_base_url",
                format!("not a URL: {:?}", self.goldrush_base_url),
            ));
        }
        if self.goldrush_api_key_env.trim().is_empty() {
            return Err(ConfigError::invalid(
                "snapshots.goldrush_api_key_env",
                "must name an environment variable",
            ));
        }
        if self.goldrush_requests_per_sec == 0 {
            return Err(ConfigError::invalid(
                "snapshots.goldrush_requests_per_sec",
                "must be at least 1",
            ));
        }
        if self.goldrush_timeout_secs == 0 {
            return Err(ConfigError::invalid(
                "snapshots.goldrush_timeout_secs",
                "must be at least 1",
            ));
        }
        if self.goldrush_retry_min_delay_ms > self.goldrush_retry_max_delay_ms {
            return Err(ConfigError::invalid(
                "snapshots.goldrush_retry_min_delay_ms",
                "must not exceed snapshots.goldrush_retry_max_delay_ms",
            ));
        }
        if !matches!(self.goldrush_page_size, 100 | 1000) {
            return Err(ConfigError::invalid(
                "snapshots.goldrush_page_size",
                format!(
                    "GoldRush accepts only 100 or 1000, got {}",
                    self.goldrush_page_size
                ),
            ));
        }
        Ok(())
    }
}
