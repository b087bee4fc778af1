//! `[access]`: access checks, starting with proven wallets (Sign-In with Ethereum).

use std::collections::BTreeMap;

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
    /// Memory one replica's decision cache may take (MiB, estimated from each decision's size:
    /// about twice its JSON). The least used decisions are dropped beyond it.
    pub cache_memory_max_mib: u64,
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
    /// `[access.verifiers.<name>]`: the HTTP verifiers an `external` rule leaf may name.
    #[serde(default)]
    pub verifiers: BTreeMap<String, VerifierConfig>,
}

/// The request and response shape a verifier speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerifierProfile {
    /// The second seed's TomoIntegrationService: POST `{wallet_address, contract_address,
    /// chain_id, min_amount}` → `{has_tokens}`.
    Tomo,
    /// Alchemy's `alchemy_getTokenBalances` JSON-RPC (ERC-20 balances of one wallet).
    Alchemy,
}

impl VerifierProfile {
    pub fn as_str(self) -> &'static str {
        match self {
            VerifierProfile::Tomo => "tomo",
            VerifierProfile::Alchemy => "alchemy",
        }
    }
}

/// What a leaf gets when its verifier cannot answer and no recent verification is on record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FallbackPolicy {
    /// The leaf fails (the seed's default).
    #[default]
    Restrictive,
    /// The leaf passes (`TOKEN_VERIFICATION_FALLBACK_POLICY = PERMISSIVE`).
    Permissive,
}

impl FallbackPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            FallbackPolicy::Restrictive => "restrictive",
            FallbackPolicy::Permissive => "permissive",
        }
    }
}

/// `[access.verifiers.<name>]`: one external verifier, its retries, breaker and fallback.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifierConfig {
    pub profile: VerifierProfile,
    /// Endpoint (`tomo`: the `/verify` URL; `alchemy`: `https://<network>.g.alchemy.com/v2`).
    pub url: String,
    /// `alchemy`: the chain its URL serves; a leaf on another chain is not asked (fallback).
    #[serde(default)]
    pub chain_id: Option<u64>,
    /// Timeout of one HTTP call (ms), connection included.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Name of the environment variable holding the API key (empty: no key). The key is sent
    /// in `key_header`, never in a body or a URL, and never logged.
    #[serde(default)]
    pub key_env: String,
    /// Header carrying the key; `authorization` gets `Bearer <key>`. Default: `x-api-key`
    /// (tomo), `authorization` (alchemy).
    #[serde(default)]
    pub key_header: Option<String>,
    /// Retries of a retryable failure (network error, timeout, 5xx, 429) after the first call.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// Jittered exponential backoff between retries (ms), at least `Retry-After`.
    #[serde(default = "default_retry_min_delay_ms")]
    pub retry_min_delay_ms: u64,
    #[serde(default = "default_retry_max_delay_ms")]
    pub retry_max_delay_ms: u64,
    /// A `Retry-After` longer than this is not waited for: the call fails (fallback).
    #[serde(default = "default_max_retry_after_secs")]
    pub max_retry_after_secs: u64,
    /// The breaker opens when the failure rate over `breaker_window_secs` exceeds this (0–1),
    /// once `breaker_min_calls` calls were made in the window.
    #[serde(default = "default_failure_rate")]
    pub breaker_failure_rate: f64,
    #[serde(default = "default_min_calls")]
    pub breaker_min_calls: u32,
    #[serde(default = "default_window_secs")]
    pub breaker_window_secs: u64,
    /// How long an open breaker fails fast before letting one probe through (half-open).
    #[serde(default = "default_open_secs")]
    pub breaker_open_secs: u64,
    /// The last successful verification of the same question counts for this long (seconds).
    #[serde(default = "default_fallback_max_age_secs")]
    pub fallback_max_age_secs: u64,
    #[serde(default)]
    pub fallback_policy: FallbackPolicy,
}

fn default_timeout_ms() -> u64 {
    2000
}
fn default_max_retries() -> u32 {
    2
}
fn default_retry_min_delay_ms() -> u64 {
    100
}
fn default_retry_max_delay_ms() -> u64 {
    2000
}
fn default_max_retry_after_secs() -> u64 {
    10
}
fn default_failure_rate() -> f64 {
    0.5
}
fn default_min_calls() -> u32 {
    10
}
fn default_window_secs() -> u64 {
    30
}
fn default_open_secs() -> u64 {
    30
}
fn default_fallback_max_age_secs() -> u64 {
    86_400
}

impl VerifierConfig {
    /// The header the key goes in.
    pub fn key_header(&self) -> &str {
        match (&self.key_header, self.profile) {
            (Some(h), _) => h,
            (None, VerifierProfile::Tomo) => "x-api-key",
            (None, VerifierProfile::Alchemy) => "authorization",
        }
    }

    fn validate(&self, name: &str) -> Result<(), ConfigError> {
        let key = |k: &str| format!("access.verifiers.{name}.{k}");
        let valid_name = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !valid_name {
            return Err(ConfigError::invalid(
                format!("access.verifiers.{name}"),
                "a verifier name is 1 to 64 of a-z, 0-9, _ and -",
            ));
        }
        match url::Url::parse(&self.url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            _ => return Err(ConfigError::invalid(key("url"), "must be an http(s) URL")),
        }
        if self.timeout_ms == 0 || self.timeout_ms > 60_000 {
            return Err(ConfigError::invalid(
                key("timeout_ms"),
                "must be between 1 and 60000",
            ));
        }
        if reqwest::header::HeaderName::from_bytes(self.key_header().as_bytes()).is_err() {
            return Err(ConfigError::invalid(
                key("key_header"),
                "not a valid header name",
            ));
        }
        if self.retry_min_delay_ms > self.retry_max_delay_ms {
            return Err(ConfigError::invalid(
                key("retry_min_delay_ms"),
                "must not exceed retry_max_delay_ms",
            ));
        }
        if !(self.breaker_failure_rate > 0.0 && self.breaker_failure_rate <= 1.0) {
            return Err(ConfigError::invalid(
                key("breaker_failure_rate"),
                "must be in (0, 1]",
            ));
        }
        if self.breaker_window_secs == 0 || self.breaker_open_secs == 0 {
            return Err(ConfigError::invalid(
                key("breaker_window_secs"),
                "breaker_window_secs and breaker_open_secs must be at least 1",
            ));
        }
        if self.fallback_max_age_secs == 0 || self.fallback_max_age_secs > 366 * 86_400 {
            return Err(ConfigError::invalid(
                key("fallback_max_age_secs"),
                "must be between 1 and 31622400 (366 days)",
            ));
        }
        Ok(())
    }
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
        if self.cache_memory_ttl_secs > 0 && self.cache_memory_max_mib == 0 {
            return Err(ConfigError::invalid(
                "access.cache_memory_max_mib",
                "must be at least 1 while access.cache_memory_ttl_secs is not 0",
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
        for (name, v) in &self.verifiers {
            v.validate(name)?;
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
