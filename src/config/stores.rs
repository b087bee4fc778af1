//! `[database]` and `[redis]`: where the two stores are.
//!
//! Both URLs may carry a password, so they are held as [`SecretString`]: `Debug` prints
//! `[REDACTED]`, and the only way to the text is an explicit `expose_secret()` at the place that
//! opens a connection. Logs and errors use [`DatabaseConfig::display_url`] instead.

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::error::ConfigError;
use crate::redact::redact_url;

/// Postgres connection settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Connection URL. A password belongs in `TOKENWARDEN__DATABASE__URL`, never in a file.
    pub url: SecretString,
    pub max_connections: u32,
    pub acquire_timeout_secs: u64,
}

impl DatabaseConfig {
    /// The URL with its password masked, for logs and error messages.
    pub fn display_url(&self) -> String {
        redact_url(self.url.expose_secret())
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let url = self.url.expose_secret();
        if !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
            return Err(ConfigError::invalid(
                "database.url",
                "must start with postgres:// or postgresql://",
            ));
        }
        if self.max_connections == 0 {
            return Err(ConfigError::invalid(
                "database.max_connections",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Redis connection settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// Connection URL; `redis://:password@host` carries a secret, so it never prints.
    pub url: SecretString,
    /// Prefix of every key tokenwarden touches, so several deployments (or tests) share one Redis.
    pub prefix: String,
}

impl RedisConfig {
    /// The URL with its password masked, for logs and error messages.
    pub fn display_url(&self) -> String {
        redact_url(self.url.expose_secret())
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let url = self.url.expose_secret();
        if !url.starts_with("redis://") && !url.starts_with("rediss://") {
            return Err(ConfigError::invalid(
                "redis.url",
                "must start with redis:// or rediss://",
            ));
        }
        if self.prefix.is_empty() || self.prefix.contains(char::is_whitespace) {
            return Err(ConfigError::invalid(
                "redis.prefix",
                "must be non-empty and contain no whitespace",
            ));
        }
        Ok(())
    }
}
