//! The GoldRush (Covalent) `token_holders_v2` client: one page per call, with a client-side rate
//! limit, jittered retries on retryable statuses, `Retry-After`, and strict validation of the
//! envelope (numbers that arrive as strings, fields that arrive as null).

use std::fmt;
use std::time::{Duration, SystemTime};

use alloy::primitives::U256;
use backon::{BackoffBuilder, ExponentialBuilder};
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::chains::GoldRushChain;
use crate::config::SnapshotsConfig;

/// The API key. Its `Debug`/`Display` never show the value, so it cannot leak into logs.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key; an empty key is treated as absent.
    pub fn new(key: impl Into<String>) -> Option<Self> {
        let key = key.into();
        let key = key.trim();
        (!key.is_empty()).then(|| Self(key.to_string()))
    }

    /// Reads the key from the environment variable named by `snapshots.goldrush_api_key_env`.
    pub fn from_env(var: &str) -> Option<Self> {
        std::env::var(var).ok().and_then(Self::new)
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

/// Why a page could not be fetched. `Display` is the reason stored on a failed snapshot.
#[derive(Debug, thiserror::Error)]
pub enum GoldRushError {
    #[error(
        "no GoldRush API key: set the environment variable {0} (its name is config snapshots.goldrush_api_key_env)"
    )]
    MissingKey(String),
    #[error("GoldRush request {url} failed with HTTP {status}{}", describe_api_error(.code, .message))]
    Status {
        url: String,
        status: u16,
        code: Option<String>,
        message: Option<String>,
    },
    #[error("GoldRush request {url} failed: {reason}")]
    Transport { url: String, reason: String },
    #[error("GoldRush request {url} kept failing after {attempts} attempts; last error: {last}")]
    RetriesExhausted {
        url: String,
        attempts: u32,
        last: Box<GoldRushError>,
    },
    #[error(
        "GoldRush asked to retry {url} after {secs} s, more than snapshots.goldrush_max_retry_after_secs ({max} s)"
    )]
    RetryAfterTooLong { url: String, secs: u64, max: u64 },
    #[error("GoldRush answer for {url} is not valid: {reason}")]
    Malformed { url: String, reason: String },
}

fn describe_api_error(code: &Option<String>, message: &Option<String>) -> String {
    match (code, message) {
        (None, None) => String::new(),
        (c, m) => format!(
            " (error_code {}: {})",
            c.as_deref().unwrap_or("none"),
            m.as_deref().unwrap_or("no message")
        ),
    }
}

impl GoldRushError {
    /// Statuses and failures that may succeed later: rate limit, server errors, upstream
    /// timeouts (GoldRush's 507/562) and network timeouts. 400/401/402/403/404 never retry.
    fn is_retryable(&self) -> bool {
        match self {
            GoldRushError::Status { status, .. } => {
                matches!(status, 429 | 500 | 502 | 503 | 504 | 507 | 562)
            }
            GoldRushError::Transport { .. } => true,
            _ => false,
        }
    }
}

/// One holder row of a page, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Lowercase 0x hex.
    pub address: String,
    pub balance: U256,
}

/// One validated page of `token_holders_v2`.
#[derive(Debug, Clone)]
pub struct HolderPage {
    pub page_number: u32,
    pub holders: Vec<Holder>,
    /// Items the API returned, including zero balances that are not stored.
    pub item_count: usize,
    pub has_more: bool,
    pub total_count: Option<u64>,
    /// The `block_height` every item of the page carries (checked to be one value).
    pub block_height: Option<u64>,
    pub decimals: Option<u32>,
    pub total_supply: Option<U256>,
}

/// The GoldRush envelope: `{data, error, error_message, error_code}`; every field may be
/// absent or null (the docs' 401 example has no `data`; `error_code` is a number or a string).
#[derive(Debug, Deserialize)]
struct Envelope {
    #[serde(default)]
    data: Option<HoldersData>,
    #[serde(default)]
    error: Option<bool>,
    #[serde(default)]
    error_message: Option<String>,
    #[serde(default)]
    error_code: Option<NumOrString>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum NumOrString {
    Num(i64),
    Str(String),
}

impl NumOrString {
    fn as_text(&self) -> String {
        match self {
            NumOrString::Num(n) => n.to_string(),
            NumOrString::Str(s) => s.clone(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct HoldersData {
    #[serde(default)]
    items: Option<Vec<RawHolder>>,
    #[serde(default)]
    pagination: Option<RawPagination>,
}

#[derive(Debug, Deserialize)]
struct RawPagination {
    #[serde(default)]
    has_more: Option<bool>,
    #[serde(default)]
    total_count: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct RawHolder {
    #[serde(default)]
    contract_decimals: Option<i64>,
    #[serde(default)]
    contract_address: Option<String>,
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    balance: Option<String>,
    #[serde(default)]
    total_supply: Option<String>,
    #[serde(default)]
    block_height: Option<u64>,
}

/// Parses a base-10 uint256 string strictly: digits only (no sign, no `0x`, no `_`).
pub fn parse_u256_decimal(s: &str) -> Result<U256, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{s:?} is not a base-10 unsigned integer"));
    }
    U256::from_str_radix(s, 10).map_err(|e| format!("{s:?} does not fit in uint256: {e}"))
}

/// Text that is not a 0x address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a 0x-prefixed 20-byte hex address")]
pub struct InvalidAddress(pub String);

/// Validates a 0x address and returns it lowercase.
pub fn normalize_address(s: &str) -> Result<String, InvalidAddress> {
    let ok = s.len() == 42
        && (s.starts_with("0x") || s.starts_with("0X"))
        && s[2..].bytes().all(|b| b.is_ascii_hexdigit());
    if ok {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(InvalidAddress(s.to_string()))
    }
}

/// Spaces requests at least `1 / rate` apart: a token bucket of size one.
///
/// Hand-written rather than `governor`: one client talks to one upstream with one key, so a
/// single "next allowed instant" behind a mutex is the whole algorithm, and it avoids a new
/// dependency tree on a shared build machine.
#[derive(Debug)]
struct RateLimiter {
    interval: Duration,
    next: Mutex<Instant>,
}

impl RateLimiter {
    fn new(per_sec: u32) -> Self {
        Self {
            interval: Duration::from_secs(1) / per_sec.max(1),
            next: Mutex::new(Instant::now()),
        }
    }

    async fn acquire(&self) {
        let wait_until = {
            let mut next = self.next.lock().await;
            let now = Instant::now();
            let slot = (*next).max(now);
            *next = slot + self.interval;
            slot
        };
        tokio::time::sleep_until(wait_until).await;
    }
}

/// The client. Cheap to share behind an `Arc`; the rate limit is per client.
#[derive(Debug)]
pub struct GoldRushClient {
    http: reqwest::Client,
    base: url::Url,
    key: Option<ApiKey>,
    key_env: String,
    limiter: RateLimiter,
    backoff: ExponentialBuilder,
    max_retries: u32,
    max_retry_after: Duration,
    page_size: u32,
}

impl GoldRushClient {
    /// Builds a client with the key read from the environment variable the config names.
    pub fn from_env(cfg: &SnapshotsConfig) -> Result<Self, GoldRushError> {
        Self::new(cfg, ApiKey::from_env(&cfg.goldrush_api_key_env))
    }

    /// Builds a client with an explicit key (tests, embedding). A missing key is reported when
    /// the first request is attempted, so config without a key still starts a worker.
    pub fn new(cfg: &SnapshotsConfig, key: Option<ApiKey>) -> Result<Self, GoldRushError> {
        let base =
            url::Url::parse(&cfg.goldrush_base_url).map_err(|e| GoldRushError::Transport {
                url: cfg.goldrush_base_url.clone(),
                reason: format!("bad base URL: {e}"),
            })?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(cfg.goldrush_timeout_secs))
            .connect_timeout(Duration::from_secs(cfg.goldrush_timeout_secs.min(10)))
            .user_agent(concat!("tokenwarden/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| GoldRushError::Transport {
                url: base.to_string(),
                reason: format!("cannot build HTTP client: {e}"),
            })?;
        let backoff = ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(Duration::from_millis(cfg.goldrush_retry_min_delay_ms))
            .with_max_delay(Duration::from_millis(cfg.goldrush_retry_max_delay_ms))
            .with_max_times(cfg.goldrush_max_retries as usize);
        Ok(Self {
            http,
            base,
            key,
            key_env: cfg.goldrush_api_key_env.clone(),
            limiter: RateLimiter::new(cfg.goldrush_requests_per_sec),
            backoff,
            max_retries: cfg.goldrush_max_retries,
            max_retry_after: Duration::from_secs(cfg.goldrush_max_retry_after_secs),
            page_size: cfg.goldrush_page_size,
        })
    }

    /// The page size sent as `page-size`.
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    fn page_url(
        &self,
        chain: &GoldRushChain,
        token: &str,
        block_height: Option<u64>,
        page: u32,
    ) -> Result<url::Url, GoldRushError> {
        let mut url = self.base.clone();
        let prefix = url.path().trim_end_matches('/').to_string();
        url.set_path(&format!(
            "{prefix}/v1/{}/tokens/{token}/token_holders_v2/",
            chain.path_segment()
        ));
        {
            let mut q = url.query_pairs_mut();
            q.clear();
            if let Some(h) = block_height {
                q.append_pair("block-height", &h.to_string());
            }
            q.append_pair("page-size", &self.page_size.to_string());
            q.append_pair("page-number", &page.to_string());
        }
        Ok(url)
    }

    /// Fetches and validates one page, retrying retryable failures with jittered exponential
    /// backoff (at least `Retry-After` when the server sends one).
    pub async fn fetch_page(
        &self,
        chain: &GoldRushChain,
        token: &str,
        block_height: Option<u64>,
        page: u32,
    ) -> Result<HolderPage, GoldRushError> {
        let url = self.page_url(chain, token, block_height, page)?;
        let key = self
            .key
            .as_ref()
            .ok_or_else(|| GoldRushError::MissingKey(self.key_env.clone()))?;
        let mut delays = self.backoff.build();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            self.limiter.acquire().await;
            let started = std::time::Instant::now();
            let result = self.attempt(&url, key, page, token).await;
            metrics::histogram!("tokenwarden_goldrush_request_seconds")
                .record(started.elapsed().as_secs_f64());
            let (err, retry_after) = match result {
                Ok(p) => {
                    metrics::counter!("tokenwarden_goldrush_requests_total", "outcome" => "ok")
                        .increment(1);
                    return Ok(p);
                }
                Err(e) => e,
            };
            let outcome = match &err {
                GoldRushError::Status { status, .. } => status.to_string(),
                GoldRushError::Transport { .. } => "transport".to_string(),
                _ => "invalid".to_string(),
            };
            metrics::counter!("tokenwarden_goldrush_requests_total", "outcome" => outcome)
                .increment(1);
            if !err.is_retryable() {
                return Err(err);
            }
            let Some(mut delay) = delays.next() else {
                return Err(GoldRushError::RetriesExhausted {
                    url: url.to_string(),
                    attempts,
                    last: Box::new(err),
                });
            };
            if let Some(ra) = retry_after {
                if ra > self.max_retry_after {
                    return Err(GoldRushError::RetryAfterTooLong {
                        url: url.to_string(),
                        secs: ra.as_secs(),
                        max: self.max_retry_after.as_secs(),
                    });
                }
                delay = delay.max(ra);
            }
            metrics::counter!("tokenwarden_goldrush_retries_total").increment(1);
            tracing::warn!(
                %url, attempt = attempts, max_retries = self.max_retries,
                delay_ms = delay.as_millis() as u64, error = %err,
                "GoldRush request failed; retrying"
            );
            tokio::time::sleep(delay).await;
        }
    }

    /// One HTTP attempt. On failure also returns the server's `Retry-After`, if any.
    async fn attempt(
        &self,
        url: &url::Url,
        key: &ApiKey,
        page: u32,
        token: &str,
    ) -> Result<HolderPage, (GoldRushError, Option<Duration>)> {
        let transport = |e: reqwest::Error| {
            (
                GoldRushError::Transport {
                    url: url.to_string(),
                    reason: if e.is_timeout() {
                        format!("timed out: {e}")
                    } else {
                        e.to_string()
                    },
                },
                None,
            )
        };
        let resp = self
            .http
            .get(url.clone())
            .bearer_auth(&key.0)
            .send()
            .await
            .map_err(transport)?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let body = resp.bytes().await.map_err(transport)?;
        if !(200..300).contains(&status) {
            let env: Option<Envelope> = serde_json::from_slice(&body).ok();
            return Err((
                GoldRushError::Status {
                    url: url.to_string(),
                    status,
                    code: env
                        .as_ref()
                        .and_then(|e| e.error_code.as_ref().map(NumOrString::as_text)),
                    message: env.and_then(|e| e.error_message),
                },
                retry_after,
            ));
        }
        parse_page(&body, page, token).map_err(|reason| {
            (
                GoldRushError::Malformed {
                    url: url.to_string(),
                    reason,
                },
                None,
            )
        })
    }
}

pub use crate::infra::retry_after::parse_retry_after;

/// Validates a 2xx body into a [`HolderPage`].
fn parse_page(body: &[u8], page: u32, token: &str) -> Result<HolderPage, String> {
    let env: Envelope = serde_json::from_slice(body)
        .map_err(|e| format!("page {page}: body is not JSON of the expected shape: {e}"))?;
    if env.error == Some(true) {
        return Err(format!(
            "page {page}: envelope says error{}",
            describe_api_error(
                &env.error_code.as_ref().map(NumOrString::as_text),
                &env.error_message
            )
        ));
    }
    let data = env
        .data
        .ok_or_else(|| format!("page {page}: envelope has no `data`"))?;
    let items = data.items.unwrap_or_default();
    let pagination = data.pagination;
    let mut holders = Vec::with_capacity(items.len());
    let mut block_height = None;
    let mut decimals = None;
    let mut total_supply = None;
    for (i, item) in items.iter().enumerate() {
        let at = |what: &str| format!("page {page} item {i}: {what}");
        let address = item
            .address
            .as_deref()
            .ok_or_else(|| at("holder `address` is missing or null"))?;
        let address = normalize_address(address).map_err(|e| at(&format!("address {e}")))?;
        let balance = item
            .balance
            .as_deref()
            .ok_or_else(|| at("`balance` is missing or null"))?;
        let balance = parse_u256_decimal(balance).map_err(|e| at(&format!("balance {e}")))?;
        if let Some(contract) = item.contract_address.as_deref()
            && !contract.eq_ignore_ascii_case(token)
        {
            return Err(at(&format!(
                "contract_address {contract} is not the requested token {token}"
            )));
        }
        match (block_height, item.block_height) {
            (Some(a), Some(b)) if a != b => {
                return Err(at(&format!(
                    "block_height {b} differs from {a} earlier in the page: the page mixes blocks"
                )));
            }
            (None, Some(b)) => block_height = Some(b),
            _ => {}
        }
        if decimals.is_none()
            && let Some(d) = item.contract_decimals
        {
            decimals = Some(
                u32::try_from(d)
                    .ok()
                    .filter(|d| *d <= 77)
                    .ok_or_else(|| at(&format!("contract_decimals {d} is out of range 0..=77")))?,
            );
        }
        if total_supply.is_none()
            && let Some(ts) = item.total_supply.as_deref()
        {
            total_supply =
                Some(parse_u256_decimal(ts).map_err(|e| at(&format!("total_supply {e}")))?);
        }
        if !balance.is_zero() {
            holders.push(Holder { address, balance });
        }
    }
    Ok(HolderPage {
        page_number: page,
        item_count: items.len(),
        holders,
        has_more: pagination
            .as_ref()
            .and_then(|p| p.has_more)
            .unwrap_or(false),
        total_count: pagination.and_then(|p| p.total_count),
        block_height,
        decimals,
        total_supply,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn u256_parsing_is_strict() {
        assert_eq!(parse_u256_decimal("0").unwrap(), U256::ZERO);
        assert!(parse_u256_decimal("").is_err());
        assert!(parse_u256_decimal("-1").is_err());
        assert!(parse_u256_decimal("0x10").is_err());
        assert!(parse_u256_decimal("1_000").is_err());
        assert!(parse_u256_decimal("1.5").is_err());
        let max = U256::MAX.to_string();
        assert_eq!(parse_u256_decimal(&max).unwrap(), U256::MAX);
        assert!(parse_u256_decimal(&format!("{max}0")).is_err());
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        // 2015-10-21 07:28:00 GMT is 1445412480; 120 s later:
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:30:00 GMT", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn fixture_pages_parse() {
        let legacy = include_bytes!(
            "../../tests/fixtures/covalent/token_holders.index_eth_mainnet_2021_excerpt.json"
        );
        let p = parse_page(legacy, 0, "0x0954906da0bf32d5479e25f46056d22f08464cab").unwrap();
        assert_eq!(p.holders.len(), 4);
        assert!(!p.has_more);
        assert_eq!(p.total_count, Some(4171));
        assert_eq!(p.block_height, Some(13_579_721));
        assert_eq!(p.decimals, Some(18));
        let matic = include_bytes!(
            "../../tests/fixtures/covalent/token_holders_v2.matic_mainnet_2024_excerpt.json"
        );
        let p = parse_page(matic, 5, "0x7c58d971a5dabd46bc85e81fdae87b511431452e").unwrap();
        assert_eq!(p.total_count, None);
        assert_eq!(p.decimals, None);
        assert!(p.has_more);
    }
}

/// Bad input, generated: random JSON, the fixture pages with fields dropped, nulled or
/// replaced, and the fixture bytes cut or flipped are parsed into a valid page or refused with
/// a reason naming the page (and the item when one is at fault). Never a panic.
#[cfg(test)]
mod generated {
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::*;
    use crate::chain::rpc::generated::{json_value, mutated};

    /// Cases per property (the report's "cases run").
    const CASES: u32 = 2000;

    const TOKEN: &str = "0x7c58d971a5dabd46bc85e81fdae87b511431452e";
    const FIXTURE: &[u8] = include_bytes!(
        "../../tests/fixtures/covalent/token_holders_v2.matic_mainnet_2024_excerpt.json"
    );

    fn item() -> impl Strategy<Value = Value> {
        let shape = json!({
            "contract_decimals": 18,
            "contract_address": TOKEN,
            "address": "0x0fc5b6b99c46cf6adbad2d3d52f591984925c6df",
            "balance": "2031496567603154511000",
            "total_supply": "500000000000000000000000000",
            "block_height": 55468807,
        });
        prop_oneof![mutated(shape), json_value()]
    }

    fn page() -> impl Strategy<Value = Value> {
        let items = proptest::collection::vec(item(), 0..5).prop_map(Value::Array);
        let pagination = mutated(json!({"has_more": true, "page_number": 5, "total_count": null}));
        (items, pagination, json_value()).prop_flat_map(|(items, pagination, other)| {
            let data = mutated(json!({"items": items, "pagination": pagination}));
            let envelope = data.prop_flat_map(|data| {
                mutated(json!({"data": data, "error": false, "error_message": null, "error_code": null}))
            });
            prop_oneof![4 => envelope, 1 => Just(other)]
        })
    }

    fn check(body: &[u8], page: u32) -> Result<(), TestCaseError> {
        match parse_page(body, page, TOKEN) {
            Ok(p) => {
                prop_assert!(p.holders.len() <= p.item_count);
                for h in &p.holders {
                    prop_assert!(
                        normalize_address(&h.address).as_deref() == Ok(h.address.as_str())
                    );
                    prop_assert!(!h.balance.is_zero());
                }
            }
            Err(reason) => {
                let prefix = format!("page {page}");
                prop_assert!(reason.starts_with(&prefix), "{}", reason);
                prop_assert!(reason.len() > prefix.len() + 2, "{}", reason);
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn any_page_is_parsed_or_refused_with_a_reason(v in page(), page in any::<u32>()) {
            let body = serde_json::to_vec(&v).map_err(|e| TestCaseError::fail(e.to_string()))?;
            check(&body, page)?;
        }

        #[test]
        fn cut_or_flipped_fixture_bytes_are_refused_with_a_reason(
            cut in 0..FIXTURE.len(),
            flips in proptest::collection::vec((0..FIXTURE.len(), any::<u8>()), 0..4),
        ) {
            let mut body = FIXTURE[..cut].to_vec();
            for (at, b) in flips {
                if let Some(x) = body.get_mut(at) {
                    *x = b;
                }
            }
            check(&body, 5)?;
        }
    }
}
