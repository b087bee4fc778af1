//! `[worker]`, `[http]` and `[telemetry]`: the process itself.

use std::net::SocketAddr;

use serde::Deserialize;

use super::error::ConfigError;

/// The `run` process as a whole.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// On SIGTERM, seconds the scheduler and the operations endpoint get to stop. The queue's
    /// in-flight jobs have their own budget, `queue.shutdown_grace_secs`.
    pub shutdown_grace_secs: u64,
}

impl WorkerConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.shutdown_grace_secs == 0 {
            return Err(ConfigError::invalid(
                "worker.shutdown_grace_secs",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// The operations HTTP endpoint (`/healthz`, `/readyz`, `/metrics`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub enabled: bool,
    pub listen: String,
}

impl HttpConfig {
    /// The parsed listen address.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.listen
            .parse()
            .map_err(|e| ConfigError::invalid("http.listen", format!("{e}: {:?}", self.listen)))
    }
}

/// Log output.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    pub format: LogFormat,
    pub level: String,
}

/// Human-readable lines for a terminal, or one JSON object per line for log collectors.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}
