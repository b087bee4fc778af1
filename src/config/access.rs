//! `[access]`: access checks, starting with proven wallets (Sign-In with Ethereum).

use secrecy::SecretString;
use serde::Deserialize;

use super::error::ConfigError;

/// `[access]` configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    /// The SIWE `domain`s (RFC 3986 authority, e.g. `app.example.com` or `localhost:3000`) a
    /// message may name. A message for any other domain is refused (`wrong_domain`): it was
    /// signed for another site, which may be phishing for signatures.
    pub siwe_domains: Vec<String>,
    /// Lifetime of a nonce (seconds). Written into `tw_access_settings` at start.
    pub siwe_nonce_ttl_secs: u32,
    /// Unused, unexpired nonces one user may hold at once. Written into `tw_access_settings`.
    pub siwe_max_open_nonces: u32,
    /// Tolerated clock difference between the signer and the worker (seconds), for `Issued At`
    /// in the future and for `Not Before` / `Expiration Time`.
    pub siwe_clock_skew_secs: u32,
    /// A chain whose index is more than this many blocks behind its head makes checks on it
    /// `stale` (the rule's `stale_policy` decides). Written into `tw_access_settings`.
    pub stale_after_blocks: u64,
    /// How often the worker reads each chain's head for that measure (seconds).
    pub head_poll_secs: u64,
    /// How long a decision stays in a replica's memory (seconds; the seed's ~1 minute).
    pub cache_memory_ttl_secs: u64,
    /// How long a decision stays in Redis, shared by the replicas (seconds; the seed's ~10
    /// minutes). Both are backstops: balance changes, rule changes and unlinks evict at once.
    pub cache_redis_ttl_secs: u64,
    /// Decisions one replica keeps in memory at most.
    pub cache_memory_capacity: u64,
    /// Runs the access monitor in `run` (one replica acts at a time, under a Postgres lease):
    /// re-evaluates the users whose holdings an announcement names and records grants and
    /// revocations.
    pub monitor_enabled: bool,
    /// Webhook that receives every access change (JSON POST). Empty: none. Chat webhook URLs
    /// carry a secret: set it with `TOKENWARDEN__ACCESS__WEBHOOK_URL`, never in a file. It is
    /// never logged. Retries follow `maintenance.alerts` (`max_retries`, `timeout_secs`,
    /// `queue_capacity`).
    pub webhook_url: SecretString,
    /// Approximate length the stream `{prefix}:access_changes` is trimmed to (`XADD MAXLEN ~`).
    pub changes_stream_maxlen: u64,
    /// Users re-evaluated per transaction by the full re-check and after a rule change.
    pub recheck_batch: u32,
    /// `[access.audit]`: the record of every check.
    pub audit: AuditConfig,
}

/// `[access.audit]`: every decision is recorded in `access_checks`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Decisions of the `verify_access` job recorded in one INSERT at most. Batches fill by
    /// themselves under load (no waiting): one decision per batch when quiet.
    pub max_batch: usize,
    /// `prune` deletes checks older than this many days.
    pub retention_days: u32,
    /// Rows `prune` deletes per statement, so a large backlog never holds long locks.
    pub prune_batch_rows: u32,
}

impl AccessConfig {
    /// The access-change webhook, `None` when not configured (validated at load).
    pub fn webhook(&self) -> Option<url::Url> {
        super::webhook::parse_webhook_url(&self.webhook_url)
            .ok()
            .flatten()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.siwe_domains.iter().any(|d| d.trim().is_empty()) {
            return Err(ConfigError::invalid(
                "access.siwe_domains",
                "an entry is empty",
            ));
        }
        if self.siwe_nonce_ttl_secs == 0 || self.siwe_nonce_ttl_secs > 86_400 {
            return Err(ConfigError::invalid(
                "access.siwe_nonce_ttl_secs",
                "must be between 1 and 86400",
            ));
        }
        if self.siwe_max_open_nonces == 0 || self.siwe_max_open_nonces > 1000 {
            return Err(ConfigError::invalid(
                "access.siwe_max_open_nonces",
                "must be between 1 and 1000",
            ));
        }
        if self.siwe_clock_skew_secs > 3600 {
            return Err(ConfigError::invalid(
                "access.siwe_clock_skew_secs",
                "must be at most 3600",
            ));
        }
        if self.cache_memory_ttl_secs > self.cache_redis_ttl_secs {
            return Err(ConfigError::invalid(
                "access.cache_memory_ttl_secs",
                "must not exceed access.cache_redis_ttl_secs",
            ));
        }
        if let Err(why) = super::webhook::parse_webhook_url(&self.webhook_url) {
            return Err(ConfigError::invalid("access.webhook_url", why));
        }
        if self.changes_stream_maxlen == 0 {
            return Err(ConfigError::invalid(
                "access.changes_stream_maxlen",
                "must be at least 1",
            ));
        }
        if self.recheck_batch == 0 || self.recheck_batch > 100_000 {
            return Err(ConfigError::invalid(
                "access.recheck_batch",
                "must be between 1 and 100000",
            ));
        }
        if self.audit.max_batch == 0 || self.audit.max_batch > 10_000 {
            return Err(ConfigError::invalid(
                "access.audit.max_batch",
                "must be between 1 and 10000",
            ));
        }
        if self.audit.retention_days == 0 {
            return Err(ConfigError::invalid(
                "access.audit.retention_days",
                "must be at least 1",
            ));
        }
        if self.audit.prune_batch_rows == 0 {
            return Err(ConfigError::invalid(
                "access.audit.prune_batch_rows",
                "must be at least 1",
            ));
        }
        if self.head_poll_secs == 0 {
            return Err(ConfigError::invalid(
                "access.head_poll_secs",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}
