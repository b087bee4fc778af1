//! JSON-RPC access to one chain: alloy HTTP providers with a per-call timeout, error
//! classification and jittered retries.
//!
//! alloy's `RetryBackoffLayer` is deliberately not used: its default policy retries `-32005`,
//! which Infura also uses for "query returned more than 10000 results", so an oversized
//! `eth_getLogs` would be retried unchanged instead of being split. Here every failure is first
//! classified ([`RpcError`]); only rate limits, timeouts, dropped connections and server errors
//! are retried (with backon's jittered exponential schedule, or the server's `Retry-After`),
//! and range-limit errors go straight back to the caller, which splits the range.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use alloy::eips::BlockNumberOrTag;
use alloy::primitives::{Address, B256, Bytes};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::{BlockId, Filter, Log, TransactionRequest};
use alloy::transports::{RpcError as AlloyRpcError, TransportError, TransportErrorKind};
use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

use crate::config::ChainConfig;
use crate::redact::{redact_endpoint, scrub_endpoints};

/// A classified RPC failure. The class decides what the caller does: split the range, wait and
/// retry, or give up.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RpcError {
    /// The provider refused the block range or result size; `suggested` is the block count it
    /// named, if any.
    #[error("{method}: provider range limit (suggested range {suggested:?}): {message}")]
    RangeLimit {
        method: &'static str,
        suggested: Option<u64>,
        message: String,
    },
    /// Rate limit, dropped connection or server error: worth retrying later.
    #[error("{method}: retryable {kind} failure: {message}")]
    Retryable {
        method: &'static str,
        kind: &'static str,
        retry_after: Option<Duration>,
        message: String,
    },
    /// No answer within the per-call timeout.
    #[error("{method}: no answer within {after:?}")]
    Timeout {
        method: &'static str,
        after: Duration,
    },
    /// The node answered with an error that retrying will not fix.
    #[error("{method}: rejected: {message}")]
    Rejected {
        method: &'static str,
        message: String,
    },
    /// The answer is not what the protocol promises (missing fields, inconsistent data).
    #[error("{method}: invalid reply: {message}")]
    InvalidReply {
        method: &'static str,
        message: String,
    },
    /// The indexer is shutting down.
    #[error("cancelled")]
    Cancelled,
}

impl RpcError {
    /// The `kind` label of `tokenwarden_rpc_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            RpcError::RangeLimit { .. } => "range_limit",
            RpcError::Retryable { kind, .. } => kind,
            RpcError::Timeout { .. } => "timeout",
            RpcError::Rejected { .. } => "rejected",
            RpcError::InvalidReply { .. } => "invalid_reply",
            RpcError::Cancelled => "cancelled",
        }
    }

    fn is_retryable(&self) -> bool {
        matches!(
            self,
            RpcError::Retryable { .. } | RpcError::Timeout { .. } | RpcError::InvalidReply { .. }
        )
    }

    /// The same error with every occurrence of a configured endpoint URL replaced by its
    /// [`redact_endpoint`] form (see [`scrub_endpoints`]).
    pub fn scrubbed(self, urls: &[String]) -> RpcError {
        let s = |m: String| scrub_endpoints(&m, urls);
        match self {
            RpcError::RangeLimit {
                method,
                suggested,
                message,
            } => RpcError::RangeLimit {
                method,
                suggested,
                message: s(message),
            },
            RpcError::Retryable {
                method,
                kind,
                retry_after,
                message,
            } => RpcError::Retryable {
                method,
                kind,
                retry_after,
                message: s(message),
            },
            RpcError::Rejected { method, message } => RpcError::Rejected {
                method,
                message: s(message),
            },
            RpcError::InvalidReply { method, message } => RpcError::InvalidReply {
                method,
                message: s(message),
            },
            other => other,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            RpcError::Retryable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// A block header as far as the indexer needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderInfo {
    pub number: u64,
    pub hash: B256,
    pub parent_hash: B256,
}

/// The RPC endpoints of one chain. Cheap to clone.
#[derive(Clone)]
pub struct Rpc {
    inner: Arc<RpcInner>,
}

struct RpcInner {
    chain_id: u64,
    providers: Vec<DynProvider>,
    current: AtomicUsize,
    timeout: Duration,
    max_retries: u32,
    cancel: CancellationToken,
    /// The configured URLs (and their parsed spellings), scrubbed from every error message.
    secrets: Vec<String>,
}

/// Longest wait between two attempts, whatever a server's `Retry-After` says.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl Rpc {
    /// Builds HTTP providers for every configured URL.
    pub fn new(cfg: &ChainConfig, cancel: CancellationToken) -> Result<Rpc, RpcError> {
        let mut providers = Vec::with_capacity(cfg.rpc_urls.len());
        for u in &cfg.rpc_urls {
            let url = url::Url::parse(u).map_err(|e| RpcError::Rejected {
                method: "connect",
                message: format!("{}: {e}", redact_endpoint(u)),
            })?;
            providers.push(ProviderBuilder::new().connect_http(url).erased());
        }
        let secrets = cfg
            .rpc_urls
            .iter()
            .chain(cfg.ws_url.iter())
            .cloned()
            .collect();
        Ok(Rpc {
            inner: Arc::new(RpcInner {
                chain_id: cfg.chain_id,
                providers,
                current: AtomicUsize::new(0),
                timeout: Duration::from_millis(cfg.rpc_timeout_ms),
                max_retries: cfg.rpc_max_retries,
                cancel,
                secrets,
            }),
        })
    }

    /// An `Rpc` answering from `asserter`'s queue, without retries (the generated tests feed
    /// it random replies through alloy's real decoding).
    #[cfg(test)]
    pub(crate) fn mocked(asserter: alloy::transports::mock::Asserter) -> Rpc {
        Rpc {
            inner: Arc::new(RpcInner {
                chain_id: 1,
                providers: vec![
                    ProviderBuilder::new()
                        .connect_mocked_client(asserter)
                        .erased(),
                ],
                current: AtomicUsize::new(0),
                timeout: Duration::from_secs(5),
                max_retries: 0,
                cancel: CancellationToken::new(),
                secrets: Vec::new(),
            }),
        }
    }

    fn provider(&self) -> &DynProvider {
        let i = self.inner.current.load(Ordering::Relaxed) % self.inner.providers.len();
        &self.inner.providers[i]
    }

    /// Moves to the next endpoint after a failure (sequential failover).
    fn rotate(&self) {
        if self.inner.providers.len() > 1 {
            self.inner.current.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a failure in `tokenwarden_rpc_errors_total` and switches endpoint.
    pub fn record_error(&self, e: &RpcError) {
        metrics::counter!("tokenwarden_rpc_errors_total",
            "chain_id" => self.inner.chain_id.to_string(), "kind" => e.kind())
        .increment(1);
        if e.is_retryable() {
            self.rotate();
        }
    }

    /// A fresh jittered exponential schedule (100 ms doubling to [`MAX_BACKOFF`]).
    pub fn backoff() -> impl Iterator<Item = Duration> {
        ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(MAX_BACKOFF)
            .without_max_times()
            .build()
    }

    /// Sleeps `d` (capped) unless the indexer is cancelled first.
    pub async fn pause(&self, d: Duration) -> Result<(), RpcError> {
        tokio::select! {
            _ = self.inner.cancel.cancelled() => Err(RpcError::Cancelled),
            _ = tokio::time::sleep(d.min(MAX_BACKOFF)) => Ok(()),
        }
    }

    /// Waits before the next attempt after `e`: the server's `Retry-After` if it gave one,
    /// else the next step of `schedule`.
    pub async fn wait_after(
        &self,
        e: &RpcError,
        schedule: &mut impl Iterator<Item = Duration>,
    ) -> Result<(), RpcError> {
        let d = e
            .retry_after()
            .or_else(|| schedule.next())
            .unwrap_or(MAX_BACKOFF);
        self.pause(d).await
    }

    /// One attempt with the per-call timeout, classified. Every attempt is one request a
    /// paid RPC bills: counted in `tokenwarden_rpc_requests_total` by method.
    async fn once<T, F>(&self, method: &'static str, fut: F) -> Result<T, RpcError>
    where
        F: Future<Output = Result<T, TransportError>>,
    {
        metrics::counter!("tokenwarden_rpc_requests_total",
            "chain_id" => self.inner.chain_id.to_string(), "method" => method)
        .increment(1);
        tokio::select! {
            _ = self.inner.cancel.cancelled() => Err(RpcError::Cancelled),
            r = tokio::time::timeout(self.inner.timeout, fut) => match r {
                Err(_) => Err(RpcError::Timeout { method, after: self.inner.timeout }),
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(classify(method, &e).scrubbed(&self.inner.secrets)),
            }
        }
    }

    /// Retries retryable failures up to `rpc_max_retries` times.
    async fn retrying<T, F, Fut>(&self, method: &'static str, mut call: F) -> Result<T, RpcError>
    where
        F: FnMut(DynProvider) -> Fut,
        Fut: Future<Output = Result<T, TransportError>>,
    {
        let mut schedule = Self::backoff();
        let mut attempt = 0u32;
        loop {
            match self.once(method, call(self.provider().clone())).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    self.record_error(&e);
                    if !e.is_retryable() || attempt >= self.inner.max_retries {
                        return Err(e);
                    }
                    attempt += 1;
                    tracing::debug!(chain_id = self.inner.chain_id, error = %e, attempt, "retrying RPC call");
                    self.wait_after(&e, &mut schedule).await?;
                }
            }
        }
    }

    /// The chain's latest block number.
    pub async fn head(&self) -> Result<u64, RpcError> {
        self.retrying(
            "eth_blockNumber",
            |p| async move { p.get_block_number().await },
        )
        .await
    }

    /// The header of block `number`, or `None` if the chain does not have it (yet).
    pub async fn header(&self, number: u64) -> Result<Option<HeaderInfo>, RpcError> {
        let block = self
            .retrying("eth_getBlockByNumber", |p| async move {
                p.get_block_by_number(BlockNumberOrTag::Number(number))
                    .await
            })
            .await?;
        let Some(b) = block else { return Ok(None) };
        if b.header.number != number {
            return Err(RpcError::InvalidReply {
                method: "eth_getBlockByNumber",
                message: format!("asked for block {number}, got {}", b.header.number),
            });
        }
        Ok(Some(HeaderInfo {
            number,
            hash: b.header.hash,
            parent_hash: b.header.parent_hash,
        }))
    }

    /// The chain's `finalized` block (one attempt); `None` when the chain does not serve the
    /// tag (pre-merge chains, some L2s and dev nodes answer an error or nothing).
    pub async fn finalized(&self) -> Result<Option<u64>, RpcError> {
        let p = self.provider().clone();
        let block = self
            .once("eth_getBlockByNumber", async move {
                p.get_block_by_number(BlockNumberOrTag::Finalized).await
            })
            .await?;
        Ok(block.map(|b| b.header.number))
    }

    /// One `eth_getLogs` attempt (no retry: the caller adapts the range to the failure).
    pub async fn logs_once(&self, filter: &Filter) -> Result<Vec<Log>, RpcError> {
        let p = self.provider().clone();
        self.once("eth_getLogs", async move { p.get_logs(filter).await })
            .await
    }

    /// `eth_getLogs` for one block by hash (EIP-234), with retries.
    pub async fn logs_retrying(&self, filter: &Filter) -> Result<Vec<Log>, RpcError> {
        self.retrying("eth_getLogs", |p| {
            let f = filter.clone();
            async move { p.get_logs(&f).await }
        })
        .await
    }

    /// `eth_call` at `block`, with retries. A revert is `Rejected`.
    pub async fn call(&self, to: Address, data: Bytes, block: BlockId) -> Result<Bytes, RpcError> {
        self.retrying("eth_call", |p| {
            let tx = TransactionRequest::default()
                .to(to)
                .input(data.clone().into());
            async move { p.call(tx).block(block).await }
        })
        .await
    }

    /// Deployed code at `address` at `block`.
    pub async fn code(&self, address: Address, block: BlockId) -> Result<Bytes, RpcError> {
        self.retrying("eth_getCode", |p| async move {
            p.get_code_at(address).block_id(block).await
        })
        .await
    }
}

/// Sorts an alloy transport error into an [`RpcError`] class.
fn classify(method: &'static str, e: &TransportError) -> RpcError {
    let retryable = |kind, retry_after, message: String| RpcError::Retryable {
        method,
        kind,
        retry_after,
        message,
    };
    match e {
        AlloyRpcError::ErrorResp(p) => {
            let message = p.message.to_string();
            if let Some(suggested) = range_limit(&message) {
                return RpcError::RangeLimit {
                    method,
                    suggested,
                    message,
                };
            }
            let lower = message.to_ascii_lowercase();
            if matches!(p.code, 429 | -32005 | -32016 | -32007 | -32012)
                || [
                    "rate limit",
                    "rate exceeded",
                    "too many requests",
                    "throttl",
                    "quota",
                ]
                .iter()
                .any(|k| lower.contains(k))
            {
                return retryable("rate_limited", None, message);
            }
            if [
                "header not found",
                "timeout",
                "timed out",
                "unable to complete request",
                "internal",
                "no backend",
                "unavailable",
            ]
            .iter()
            .any(|k| lower.contains(k))
            {
                return retryable("server", None, message);
            }
            RpcError::Rejected {
                method,
                message: format!("code {}: {message}", p.code),
            }
        }
        AlloyRpcError::Transport(kind) => {
            let (status, body, retry_after) = match kind {
                TransportErrorKind::HttpError(h) => (Some(h.status), h.body.clone(), None),
                TransportErrorKind::HttpErrorWithRetryAfter { error, retry_after } => {
                    (Some(error.status), error.body.clone(), Some(*retry_after))
                }
                other => return retryable("connection", None, other.to_string()),
            };
            if let Some(suggested) = range_limit(&body) {
                return RpcError::RangeLimit {
                    method,
                    suggested,
                    message: body,
                };
            }
            let message = format!("HTTP {}: {}", status.unwrap_or(0), truncate(&body));
            match status {
                Some(429) => retryable("rate_limited", retry_after, message),
                Some(s) if s >= 500 || s == 408 => retryable("server", retry_after, message),
                Some(413) => RpcError::RangeLimit {
                    method,
                    suggested: None,
                    message,
                },
                _ => RpcError::Rejected { method, message },
            }
        }
        AlloyRpcError::NullResp => retryable("server", None, "null response".into()),
        AlloyRpcError::DeserError { err, text } => {
            if let Some(suggested) = range_limit(text) {
                return RpcError::RangeLimit {
                    method,
                    suggested,
                    message: text.clone(),
                };
            }
            RpcError::InvalidReply {
                method,
                message: format!("{err}: {}", truncate(text)),
            }
        }
        other => RpcError::Rejected {
            method,
            message: other.to_string(),
        },
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(300).collect()
}

/// Recognises the `eth_getLogs` limit messages of public providers (Ponder's
/// `getLogsRetryHelper` catalogue). `Some(Some(n))`: the provider named a workable block
/// count; `Some(None)`: too much, no hint (halve); `None`: not a range-limit message.
pub fn range_limit(message: &str) -> Option<Option<u64>> {
    let m = message.to_ascii_lowercase();
    // Messages naming an explicit range: [0xa, 0xb], "range a-b".
    for needle in [
        "this block range should work: [",
        "try with this block range [",
        "retry with the range ",
    ] {
        if let Some(pos) = m.find(needle) {
            let rest = &m[pos + needle.len()..];
            let nums: Vec<u64> = rest
                .split(|c: char| c == ',' || c == '-' || c == ']' || c.is_whitespace())
                .filter(|s| !s.is_empty())
                .take(2)
                .filter_map(parse_num)
                .collect();
            if let [a, b] = nums[..]
                && b >= a
            {
                return Some(Some(b - a + 1));
            }
            return Some(None);
        }
    }
    // Messages naming a maximum block count.
    for needle in [
        "up to a ",
        "limited to a ",
        "limited to ",
        "maximum is set to ",
        "max range: ",
        "requested blocks is ",
        "limit the query to at most ",
        "maximum block range: ",
        "exceed max block range: ",
        "exceeds max block range ",
        "block range is too wide (maximum ",
        "blocks distance: ",
        "maximum allowed is ",
        "max block range = ",
        "max is ",
        "block range greater than ",
        "block range exceeds ",
        "query must be smaller than size ",
        "ranges over ",
    ] {
        if let Some(pos) = m.find(needle) {
            let word = m[pos + needle.len()..]
                .split(|c: char| c.is_whitespace() || c == ')' || c == '.')
                .next()
                .unwrap_or("");
            if let Some(n) = parse_num(word).filter(|n| *n > 0) {
                return Some(Some(n));
            }
        }
    }
    // Messages that only say "too much".
    const TOO_MUCH: [&str; 16] = [
        "more than 10000 results",
        "query returned more than",
        "exceeds limit of",
        "exceeds max results",
        "logs returned",
        "response size should not",
        "response too large",
        "response is too big",
        "block range too large",
        "block range is too wide",
        "block range limit exceeded",
        "range is too large",
        "exceeded max allowed",
        "range threshold exceeded",
        "too many blocks",
        "block range is larger than",
    ];
    if TOO_MUCH.iter().any(|k| m.contains(k)) {
        return Some(None);
    }
    None
}

/// Parses "1000", "1,000", "10k" or "0x3e8"; `None` for anything else or beyond u64.
fn parse_num(s: &str) -> Option<u64> {
    let s = s.trim().trim_end_matches([',', '.', ':', ';']);
    if let Some(hex) = s.strip_prefix("0x") {
        return u64::from_str_radix(hex, 16).ok();
    }
    let cleaned: String = s.chars().filter(|c| *c != ',').collect();
    if let Some(k) = cleaned.strip_suffix('k') {
        // A count too large for u64 names no workable range.
        return k.parse::<u64>().ok().and_then(|n| n.checked_mul(1000));
    }
    cleaned.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::range_limit;

    #[test]
    fn provider_limit_messages() {
        assert_eq!(
            range_limit(
                "You can make eth_getLogs requests with up to a 500 block range. Based on your parameters, this block range should work: [0x3d7773, 0x3d7966]"
            ),
            Some(Some(0x3d7966 - 0x3d7773 + 1))
        );
        assert_eq!(
            range_limit(
                "query returned more than 10000 results. Try with this block range [0x10, 0x1f]."
            ),
            Some(Some(16))
        );
        assert_eq!(
            range_limit("query returned more than 10000 results"),
            Some(None)
        );
        assert_eq!(
            range_limit("query exceeds max results 20000, retry with the range 6000000-6000509"),
            Some(Some(510))
        );
        assert_eq!(
            range_limit("eth_getLogs is limited to a 1000 blocks range"),
            Some(Some(1000))
        );
        assert_eq!(
            range_limit("eth_getLogs range is too large, max is 10k blocks"),
            Some(Some(10_000))
        );
        assert_eq!(
            range_limit("maximum block range: 50000"),
            Some(Some(50_000))
        );
        assert_eq!(
            range_limit("block range too large (2000), maximum allowed is 1000 blocks"),
            Some(Some(1000))
        );
        assert_eq!(
            range_limit("logs matched by query exceeds limit of 10000"),
            Some(None)
        );
        // Found by the generated tests: "k" times a count near u64::MAX overflowed (a panic).
        assert_eq!(range_limit("max is 18500000000000000k blocks"), None);
        assert_eq!(range_limit("execution reverted"), None);
        assert_eq!(range_limit("header not found"), None);
    }
}

/// Bad input, generated: random JSON answers to `eth_blockNumber`, `eth_getBlockByNumber` and
/// `eth_getLogs` (random values, and the real reply shapes with fields missing, null or of the
/// wrong type), random JSON-RPC error payloads and random provider messages are decoded or
/// refused with a reason naming the method. Never a panic.
#[cfg(test)]
pub(crate) mod generated {
    use std::collections::HashMap;

    use alloy::rpc::json_rpc::ErrorPayload;
    use alloy::transports::mock::Asserter;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::*;
    use crate::chain::decode::{TRANSFER_TOPIC, decode};
    use crate::config::TokenStandard;

    /// Cases per property (the report's "cases run").
    const CASES: u32 = 1000;

    /// Any JSON value, nested a few levels (shared with the GoldRush page properties).
    pub(crate) fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(|f| json!(f)),
            "\\PC{0,12}".prop_map(Value::String),
            "0x[0-9a-fA-F]{0,70}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map("[a-zA-Z_]{0,12}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// `shape` with each field kept, dropped, nulled or replaced by random JSON.
    pub(crate) fn mutated(shape: Value) -> impl Strategy<Value = Value> {
        let Value::Object(fields) = shape else {
            return Just(shape).boxed();
        };
        let per_field: Vec<_> = fields
            .into_iter()
            .map(|(k, v)| {
                (
                    Just(k),
                    prop_oneof![
                        6 => Just(Some(v)),
                        1 => Just(None),
                        1 => Just(Some(Value::Null)),
                        2 => json_value().prop_map(Some),
                    ],
                )
            })
            .collect();
        per_field
            .prop_map(|fs| {
                Value::Object(fs.into_iter().filter_map(|(k, v)| Some((k, v?))).collect())
            })
            .boxed()
    }

    fn hex(n: u64) -> Value {
        Value::String(format!("{n:#x}"))
    }

    fn word(b: u8) -> Value {
        Value::String(format!("0x{}", format!("{b:02x}").repeat(32)))
    }

    /// A real `eth_getLogs` entry (ERC-20 Transfer of token 0x..01).
    fn log_shape(n: u64) -> Value {
        json!({
            "address": format!("0x{}01", "00".repeat(19)),
            "topics": [format!("{TRANSFER_TOPIC:#x}"), word(1), word(2)],
            "data": word(0),
            "blockNumber": hex(n),
            "blockHash": word(7),
            "transactionHash": word(8),
            "transactionIndex": "0x0",
            "logIndex": hex(n % 7),
            "removed": false,
        })
    }

    /// A real `eth_getBlockByNumber` header (no transactions).
    fn block_shape(n: u64) -> Value {
        let z = word(0);
        json!({
            "number": hex(n), "hash": word(1), "parentHash": word(2), "sha3Uncles": z,
            "miner": format!("0x{}", "00".repeat(20)), "stateRoot": z, "transactionsRoot": z,
            "receiptsRoot": z, "logsBloom": format!("0x{}", "00".repeat(256)),
            "difficulty": "0x0", "gasLimit": "0x1c9c380", "gasUsed": "0x0",
            "timestamp": "0x6553f100", "extraData": "0x", "mixHash": z, "nonce": "0x0000000000000000",
            "baseFeePerGas": "0x7", "uncles": [], "transactions": [], "size": "0x220",
        })
    }

    fn reply() -> impl Strategy<Value = Value> {
        prop_oneof![
            json_value(),
            any::<u64>().prop_map(hex),
            (0u64..1000).prop_flat_map(|n| mutated(block_shape(n))),
            proptest::collection::vec((0u64..1000).prop_flat_map(|n| mutated(log_shape(n))), 0..4)
                .prop_map(Value::Array),
        ]
    }

    /// An error reply: a JSON-RPC error payload with any code and message (provider range
    /// limits and rate limits among them).
    fn failure() -> impl Strategy<Value = ErrorPayload> {
        let message = prop_oneof![
            "\\PC{0,40}",
            "(max is|limited to|maximum block range: |this block range should work: \\[) ?[0-9a-fxk,]{0,24}\\]?",
            "(retry with the range |try with this block range \\[)[0-9a-fx, -]{0,30}",
        ];
        (any::<i64>(), message, proptest::option::of(json_value())).prop_map(
            |(code, message, data)| ErrorPayload {
                code,
                message: message.into(),
                data: data.and_then(|d| serde_json::value::to_raw_value(&d).ok()),
            },
        )
    }

    fn refused_with_a_reason(e: &RpcError, method: &str) -> Result<(), TestCaseError> {
        let text = e.to_string();
        prop_assert!(text.starts_with(method), "{}", text);
        prop_assert!(text.len() > method.len() + 2, "{}", text);
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() })]

        /// Random success bodies for the three calls the indexer makes.
        #[test]
        fn any_reply_is_decoded_or_refused_with_a_reason(head in reply(), block in reply(), logs in reply(), n in 0u64..1000) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().map_err(|e| TestCaseError::fail(e.to_string()))?;
            let asserter = Asserter::new();
            let rpc = Rpc::mocked(asserter.clone());
            rt.block_on(async {
                asserter.push_success(&head);
                if let Err(e) = rpc.head().await {
                    refused_with_a_reason(&e, "eth_blockNumber")?;
                }
                asserter.push_success(&block);
                match rpc.header(n).await {
                    Ok(Some(h)) => prop_assert_eq!(h.number, n),
                    Ok(None) => prop_assert!(block.is_null()),
                    Err(e) => refused_with_a_reason(&e, "eth_getBlockByNumber")?,
                }
                asserter.push_success(&logs);
                match rpc.logs_once(&Filter::new()).await {
                    Ok(got) => {
                        let tokens = HashMap::from([(Address::with_last_byte(1), TokenStandard::Erc20)]);
                        for log in &got {
                            if let Err(e) = decode(log, &tokens) {
                                prop_assert!(!e.to_string().trim().is_empty());
                            }
                        }
                    }
                    Err(e) => refused_with_a_reason(&e, "eth_getLogs")?,
                }
                Ok(())
            })?;
        }

        /// Random error payloads are classified, each with the method and the provider's words.
        #[test]
        fn any_error_reply_is_classified_with_a_reason(err in failure()) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().map_err(|e| TestCaseError::fail(e.to_string()))?;
            let asserter = Asserter::new();
            let rpc = Rpc::mocked(asserter.clone());
            asserter.push_failure(err.clone());
            let e = rt.block_on(rpc.logs_once(&Filter::new())).err();
            let e = e.ok_or_else(|| TestCaseError::fail("an error reply was accepted"))?;
            refused_with_a_reason(&e, "eth_getLogs")?;
            prop_assert!(e.to_string().contains(err.message.as_ref()) || matches!(e, RpcError::RangeLimit { .. }), "{}", e);
        }

        /// Any provider message: a range-limit reading or none, never a panic (the named block
        /// counts overflow u64 in "99999999999999999k").
        #[test]
        fn any_message_reads_as_a_range_limit_or_not(m in "\\PC{0,60}", k in "(max is |limited to |up to a )[0-9]{1,24}k?") {
            let _ = range_limit(&m);
            let _ = range_limit(&k);
        }
    }
}
