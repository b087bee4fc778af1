//! External verifiers (the second seed's TomoIntegrationService) behind one generic adapter:
//! `[access.verifiers.<name>]` names a profile (the wire format, [`profile`]), a URL, a key
//! read from the environment (sent in a header, held as a [`SecretString`], never logged or put
//! in a body), a timeout on every call, retries of retryable failures only (backon's jittered
//! exponential backoff, at least `Retry-After`) and a circuit breaker ([`breaker`]).
//!
//! The worker asks the verifiers before it evaluates a rule with external leaves
//! ([`resolve`]); SQL then decides the tree, and decides a leaf the verifier could not answer
//! by the fallback (`tw_access_eval_external`).
//!
//! | module | concern |
//! |---|---|
//! | [`profile`] | `tomo` and `alchemy` request bodies and response parsing |
//! | [`breaker`] | the per-verifier circuit breaker (failsafe) and its metrics |
//! | [`resolve`] | the answers for a check's external leaves, as the JSON SQL takes |

pub mod breaker;
pub mod profile;
pub mod resolve;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use alloy::primitives::U256;
use backon::{BackoffBuilder, ExponentialBuilder};
use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;

pub use breaker::{Breaker, BreakerState};
pub use profile::{Ask, Holding};

use crate::config::{AccessConfig, VerifierConfig};
use crate::infra::retry_after::parse_retry_after;

/// Why a verifier gave no answer. The text never holds the key.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VerifyError {
    #[error("verifier {verifier}: circuit breaker open, not called")]
    BreakerOpen { verifier: String },
    #[error("verifier {verifier}: timed out after {ms} ms")]
    Timeout { verifier: String, ms: u64 },
    #[error("verifier {verifier}: request failed: {reason}")]
    Transport { verifier: String, reason: String },
    #[error("verifier {verifier}: answered HTTP {status}")]
    Status { verifier: String, status: u16 },
    #[error("verifier {verifier}: answered a body that is not its format: {reason}")]
    Malformed { verifier: String, reason: String },
    #[error(
        "verifier {verifier}: asked to retry after {secs} s, more than max_retry_after_secs ({max} s)"
    )]
    RetryAfterTooLong {
        verifier: String,
        secs: u64,
        max: u64,
    },
    #[error("verifier {verifier}: environment variable {env} (key_env) is not set")]
    MissingKey { verifier: String, env: String },
    #[error("verifier {verifier} serves chain {serves}, not chain {asked}")]
    WrongChain {
        verifier: String,
        serves: u64,
        asked: u64,
    },
    #[error("no verifier {0} in access.verifiers")]
    Unknown(String),
}

impl VerifyError {
    /// Retried: the next attempt may succeed.
    fn is_retryable(&self) -> bool {
        match self {
            VerifyError::Timeout { .. } | VerifyError::Transport { .. } => true,
            VerifyError::Status { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }

    /// Counted against the verifier's health by the breaker (a 4xx means it is up).
    fn is_outage(&self) -> bool {
        self.is_retryable() || matches!(self, VerifyError::Malformed { .. })
    }

    fn outcome(&self) -> &'static str {
        match self {
            VerifyError::BreakerOpen { .. } => "rejected",
            VerifyError::Timeout { .. } => "timeout",
            VerifyError::Transport { .. } => "transport",
            VerifyError::Status { status, .. } if *status == 429 => "429",
            VerifyError::Status { status, .. } if *status >= 500 => "5xx",
            VerifyError::Status { .. } => "4xx",
            VerifyError::Malformed { .. } => "malformed",
            _ => "error",
        }
    }
}

/// Building the verifiers failed.
#[derive(Debug, thiserror::Error)]
#[error("verifier {verifier}: cannot build its HTTP client: {reason}")]
pub struct BuildError {
    verifier: String,
    reason: String,
}

/// One configured verifier.
pub struct Verifier {
    name: String,
    cfg: VerifierConfig,
    http: reqwest::Client,
    key: Option<SecretString>,
    breaker: Breaker,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("name", &self.name)
            .field("profile", &self.cfg.profile)
            .field("breaker", &self.breaker)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Builds the verifier; the key is read from `key_env` now (a missing one fails each call,
    /// so a worker without the key still starts and its checks use the fallback).
    pub fn new(name: &str, cfg: &VerifierConfig) -> Result<Self, BuildError> {
        let key = (!cfg.key_env.is_empty())
            .then(|| std::env::var(&cfg.key_env).ok())
            .flatten()
            .map(SecretString::from);
        Self::with_key(name, cfg, key)
    }

    /// Builds the verifier with an explicit key (tests, embedding).
    pub fn with_key(
        name: &str,
        cfg: &VerifierConfig,
        key: Option<SecretString>,
    ) -> Result<Self, BuildError> {
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("tokenwarden/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| BuildError {
                verifier: name.to_string(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            name: name.to_string(),
            cfg: cfg.clone(),
            http,
            key,
            breaker: Breaker::new(name, cfg),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// What the verifier says about one wallet. Every attempt passes the breaker (an open one
    /// fails fast, also between retries); retryable failures are retried with backoff.
    pub async fn ask(&self, ask: &Ask<'_>) -> Result<Holding, VerifyError> {
        if let Some(serves) = self.cfg.chain_id
            && serves != ask.chain_id
        {
            return Err(VerifyError::WrongChain {
                verifier: self.name.clone(),
                serves,
                asked: ask.chain_id,
            });
        }
        if !self.cfg.key_env.is_empty() && self.key.is_none() {
            return Err(VerifyError::MissingKey {
                verifier: self.name.clone(),
                env: self.cfg.key_env.clone(),
            });
        }
        let mut delays = ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(Duration::from_millis(self.cfg.retry_min_delay_ms))
            .with_max_delay(Duration::from_millis(self.cfg.retry_max_delay_ms))
            .with_max_times(self.cfg.max_retries as usize)
            .build();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let Some(permit) = self.breaker.permit() else {
                let e = VerifyError::BreakerOpen {
                    verifier: self.name.clone(),
                };
                self.count(e.outcome());
                return Err(e);
            };
            let started = std::time::Instant::now();
            let result = self.call(ask).await;
            metrics::histogram!("tokenwarden_verifier_request_seconds", "verifier" => self.name.clone())
                .record(started.elapsed().as_secs_f64());
            let (err, retry_after) = match result {
                Ok(h) => {
                    permit.success();
                    self.count("ok");
                    return Ok(h);
                }
                Err(e) => e,
            };
            if err.is_outage() {
                permit.failure();
            } else {
                permit.success();
            }
            self.count(err.outcome());
            if !err.is_retryable() {
                return Err(err);
            }
            let Some(mut delay) = delays.next() else {
                return Err(err);
            };
            if let Some(ra) = retry_after {
                if ra.as_secs() > self.cfg.max_retry_after_secs {
                    return Err(VerifyError::RetryAfterTooLong {
                        verifier: self.name.clone(),
                        secs: ra.as_secs(),
                        max: self.cfg.max_retry_after_secs,
                    });
                }
                delay = delay.max(ra);
            }
            tracing::warn!(verifier = %self.name, attempt, delay_ms = delay.as_millis() as u64,
                error = %err, "verifier call failed; retrying");
            tokio::time::sleep(delay).await;
        }
    }

    fn count(&self, outcome: &'static str) {
        metrics::counter!("tokenwarden_verifier_calls_total",
            "verifier" => self.name.clone(), "outcome" => outcome)
        .increment(1);
    }

    /// One HTTP call; on failure also the server's `Retry-After`.
    async fn call(&self, ask: &Ask<'_>) -> Result<Holding, (VerifyError, Option<Duration>)> {
        let transport = |e: reqwest::Error| {
            let e = e.without_url();
            let err = if e.is_timeout() {
                VerifyError::Timeout {
                    verifier: self.name.clone(),
                    ms: self.cfg.timeout_ms,
                }
            } else {
                VerifyError::Transport {
                    verifier: self.name.clone(),
                    reason: e.to_string(),
                }
            };
            (err, None)
        };
        let mut req = self
            .http
            .post(&self.cfg.url)
            .json(&profile::request_body(self.cfg.profile, ask));
        if let Some(key) = &self.key {
            let header = self.cfg.key_header();
            req = if header.eq_ignore_ascii_case("authorization") {
                req.bearer_auth(key.expose_secret())
            } else {
                req.header(header, key.expose_secret())
            };
        }
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let body = resp.bytes().await.map_err(transport)?;
        if !(200..300).contains(&status) {
            return Err((
                VerifyError::Status {
                    verifier: self.name.clone(),
                    status,
                },
                retry_after,
            ));
        }
        profile::parse_response(self.cfg.profile, ask, &body).map_err(|reason| {
            (
                VerifyError::Malformed {
                    verifier: self.name.clone(),
                    reason,
                },
                None,
            )
        })
    }
}

/// The configured verifiers by name.
#[derive(Debug, Default, Clone)]
pub struct Verifiers {
    by_name: BTreeMap<String, Arc<Verifier>>,
}

impl Verifiers {
    /// Every verifier of `[access.verifiers]`, keys from the environment.
    pub fn from_config(cfg: &AccessConfig) -> Result<Self, BuildError> {
        let mut by_name = BTreeMap::new();
        for (name, v) in &cfg.verifiers {
            by_name.insert(name.clone(), Arc::new(Verifier::new(name, v)?));
        }
        Ok(Self { by_name })
    }

    /// A set of already built verifiers (tests).
    pub fn from_verifiers(list: impl IntoIterator<Item = Verifier>) -> Self {
        Self {
            by_name: list
                .into_iter()
                .map(|v| (v.name.clone(), Arc::new(v)))
                .collect(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Verifier>> {
        self.by_name.get(name)
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// Writing `tw_access_verifiers` failed.
#[derive(Debug, thiserror::Error)]
#[error("write tw_access_verifiers: {0}")]
pub struct RegisterError(#[from] sqlx::Error);

/// Upserts the configured verifiers into `tw_access_verifiers` (rules are validated against
/// it; the fallback reads its max age and policy). A verifier removed from the config stays
/// (other replicas may still have it); its leaves then fall back.
pub async fn register(pool: &PgPool, cfg: &AccessConfig) -> Result<(), RegisterError> {
    for (name, v) in &cfg.verifiers {
        sqlx::query(
            "INSERT INTO public.tw_access_verifiers \
               (name, profile, fallback_max_age_secs, fallback_policy, updated_at) \
             VALUES ($1, $2, $3, $4, now()) \
             ON CONFLICT (name) DO UPDATE SET profile = EXCLUDED.profile, \
               fallback_max_age_secs = EXCLUDED.fallback_max_age_secs, \
               fallback_policy = EXCLUDED.fallback_policy, updated_at = now()",
        )
        .bind(name)
        .bind(v.profile.as_str())
        .bind(i64::try_from(v.fallback_max_age_secs).unwrap_or(i64::MAX))
        .bind(v.fallback_policy.as_str())
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// The minimum of a leaf as sent to a verifier.
pub(crate) fn parse_min(min: Option<&str>) -> Option<U256> {
    match min {
        None => Some(U256::from(1u8)),
        Some(m) => U256::from_str_radix(m, 10).ok(),
    }
}
