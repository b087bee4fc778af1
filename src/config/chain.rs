//! `[chain]`: the chains to follow and the tokens to index.

use serde::Deserialize;

use super::error::ConfigError;

/// `[chain]` configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainSection {
    pub enabled: bool,
    #[serde(default)]
    pub chains: Vec<ChainConfig>,
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
    #[serde(default)]
    pub factories: Vec<FactoryConfig>,
}

/// A factory contract whose creation event announces new tokens: each one is added to the
/// catalogue from its creation block.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FactoryConfig {
    pub chain_id: u64,
    pub address: String,
    /// The creation event's canonical signature, e.g.
    /// `IpRoyaltyVaultDeployed(address,address)` (topic0 is its keccak256).
    pub event: String,
    /// Where the new token's address is: `topic1`..`topic3` (an indexed argument) or `dataN`
    /// (the N-th 32-byte word of the data, from 0).
    pub token_arg: String,
    /// The created tokens' standard.
    pub standard: TokenStandard,
    /// The factory's deployment block: a chain without a checkpoint starts no later.
    #[serde(default)]
    pub start_block: u64,
}

/// Where a factory event carries the created token's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenArg {
    /// Indexed argument: topic 1..=3.
    Topic(usize),
    /// The N-th 32-byte word of the data.
    Data(usize),
}

impl FactoryConfig {
    /// `token_arg` parsed; `None` when it is not `topic1..3` or `dataN`.
    pub fn token_arg(&self) -> Option<TokenArg> {
        if let Some(n) = self.token_arg.strip_prefix("topic") {
            return n
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=3).contains(n))
                .map(TokenArg::Topic);
        }
        self.token_arg
            .strip_prefix("data")
            .and_then(|n| n.parse::<usize>().ok())
            .map(TokenArg::Data)
    }
}

/// Most `backfill_writers` a chain may ask for: beyond the machine's cores more writers only
/// contend, and each holds a Postgres connection.
const MAX_BACKFILL_WRITERS: usize = 8;

/// One EVM chain to follow.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainConfig {
    pub chain_id: u64,
    pub name: String,
    /// HTTP(S) JSON-RPC endpoints, tried in order; the next one is used after a failure.
    pub rpc_urls: Vec<String>,
    /// Optional WebSocket endpoint: new heads wake the indexer instead of polling.
    #[serde(default)]
    pub ws_url: Option<String>,
    /// Blocks behind the head that are left alone (0 = index the head itself).
    #[serde(default)]
    pub confirmations: u64,
    /// Largest block range asked of one `eth_getLogs`.
    #[serde(default = "default_max_block_range")]
    pub max_block_range: u64,
    /// Head polling interval when no WebSocket is configured.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// Deepest reorg undone automatically; deeper ones stop this chain's indexer.
    #[serde(default = "default_reorg_depth")]
    pub reorg_depth: u64,
    /// Per-request RPC timeout.
    #[serde(default = "default_rpc_timeout_ms")]
    pub rpc_timeout_ms: u64,
    /// `eth_getLogs` requests in flight during backfill.
    #[serde(default = "default_fetch_concurrency")]
    pub fetch_concurrency: usize,
    /// The backfill range adapts so that one `eth_getLogs` returns about this many logs.
    #[serde(default = "default_target_logs")]
    pub target_logs_per_request: u64,
    /// Extra Postgres connections that write a backfill commit's transfer rows beside the
    /// leader's lease connection (0: the backfill commits on the lease connection alone). Each
    /// takes one Postgres connection while the chain backfills.
    #[serde(default = "default_backfill_writers")]
    pub backfill_writers: usize,
    /// Retries of one retryable RPC failure (429, timeout, dropped connection) before the
    /// indexer restarts its loop from the committed checkpoint.
    #[serde(default = "default_rpc_max_retries")]
    pub rpc_max_retries: u32,
}

fn default_max_block_range() -> u64 {
    2000
}
fn default_poll_interval_ms() -> u64 {
    1000
}
fn default_reorg_depth() -> u64 {
    64
}
fn default_rpc_timeout_ms() -> u64 {
    10_000
}
fn default_fetch_concurrency() -> usize {
    4
}
fn default_backfill_writers() -> usize {
    2
}
fn default_target_logs() -> u64 {
    10_000
}
fn default_rpc_max_retries() -> u32 {
    10
}

/// Token standard, which decides which logs are read and how they are decoded: ERC-20 and
/// ERC-721 `Transfer`, ERC-1155 `TransferSingle` / `TransferBatch`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TokenStandard {
    Erc20,
    Erc721,
    Erc1155,
}

impl TokenStandard {
    /// The value stored in `chain_tokens.standard`.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenStandard::Erc20 => "erc20",
            TokenStandard::Erc721 => "erc721",
            TokenStandard::Erc1155 => "erc1155",
        }
    }
}

/// One tracked token contract.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub chain_id: u64,
    pub address: String,
    pub standard: TokenStandard,
    #[serde(default)]
    pub start_block: u64,
}

impl ChainSection {
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (i, c) in self.chains.iter().enumerate() {
            if c.rpc_urls.is_empty() {
                return Err(ConfigError::invalid(
                    format!("chain.chains[{i}].rpc_urls"),
                    "at least one RPC URL is required",
                ));
            }
            for u in &c.rpc_urls {
                if url::Url::parse(u).is_err() {
                    return Err(ConfigError::invalid(
                        format!("chain.chains[{i}].rpc_urls"),
                        format!("not a URL: {}", crate::redact::redact_endpoint(u)),
                    ));
                }
            }
            if c.max_block_range == 0 {
                return Err(ConfigError::invalid(
                    format!("chain.chains[{i}].max_block_range"),
                    "must be at least 1",
                ));
            }
            if c.reorg_depth == 0 {
                return Err(ConfigError::invalid(
                    format!("chain.chains[{i}].reorg_depth"),
                    "must be at least 1",
                ));
            }
            if c.fetch_concurrency == 0 || c.target_logs_per_request == 0 || c.rpc_timeout_ms == 0 {
                return Err(ConfigError::invalid(
                    format!("chain.chains[{i}]"),
                    "fetch_concurrency, target_logs_per_request and rpc_timeout_ms must be > 0",
                ));
            }
            if c.backfill_writers > MAX_BACKFILL_WRITERS {
                return Err(ConfigError::invalid(
                    format!("chain.chains[{i}].backfill_writers"),
                    format!("at most {MAX_BACKFILL_WRITERS} (each is a Postgres connection)"),
                ));
            }
            if self.chains[..i].iter().any(|o| o.chain_id == c.chain_id) {
                return Err(ConfigError::invalid(
                    format!("chain.chains[{i}].chain_id"),
                    format!("chain {} is configured twice", c.chain_id),
                ));
            }
            if i64::try_from(c.chain_id).is_err() {
                return Err(ConfigError::invalid(
                    format!("chain.chains[{i}].chain_id"),
                    "does not fit in a Postgres bigint",
                ));
            }
        }
        for (i, t) in self.tokens.iter().enumerate() {
            if !self.chains.iter().any(|c| c.chain_id == t.chain_id) {
                return Err(ConfigError::invalid(
                    format!("chain.tokens[{i}].chain_id"),
                    format!("chain {} is not configured in chain.chains", t.chain_id),
                ));
            }
            let hex = t.address.strip_prefix("0x").unwrap_or("");
            if hex.len() != 40 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(ConfigError::invalid(
                    format!("chain.tokens[{i}].address"),
                    format!("not a 0x-prefixed 20-byte hex address: {:?}", t.address),
                ));
            }
            if self.tokens[..i]
                .iter()
                .any(|o| o.chain_id == t.chain_id && o.address.eq_ignore_ascii_case(&t.address))
            {
                return Err(ConfigError::invalid(
                    format!("chain.tokens[{i}].address"),
                    format!("token {} is configured twice", t.address),
                ));
            }
        }
        for (i, f) in self.factories.iter().enumerate() {
            if !self.chains.iter().any(|c| c.chain_id == f.chain_id) {
                return Err(ConfigError::invalid(
                    format!("chain.factories[{i}].chain_id"),
                    format!("chain {} is not configured in chain.chains", f.chain_id),
                ));
            }
            let hex = f.address.strip_prefix("0x").unwrap_or("");
            if hex.len() != 40 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(ConfigError::invalid(
                    format!("chain.factories[{i}].address"),
                    format!("not a 0x-prefixed 20-byte hex address: {:?}", f.address),
                ));
            }
            let shaped = f.event.split_once('(').is_some_and(|(name, rest)| {
                !name.is_empty() && rest.ends_with(')') && !f.event.contains(char::is_whitespace)
            });
            if !shaped {
                return Err(ConfigError::invalid(
                    format!("chain.factories[{i}].event"),
                    format!(
                        "not a canonical event signature like Name(address,address): {:?}",
                        f.event
                    ),
                ));
            }
            if f.token_arg().is_none() {
                return Err(ConfigError::invalid(
                    format!("chain.factories[{i}].token_arg"),
                    format!("not topic1..topic3 or dataN: {:?}", f.token_arg),
                ));
            }
        }
        Ok(())
    }

    /// The factories watched on `chain_id`.
    pub fn factories_of(&self, chain_id: u64) -> Vec<FactoryConfig> {
        self.factories
            .iter()
            .filter(|f| f.chain_id == chain_id)
            .cloned()
            .collect()
    }

    /// The tokens tracked on `chain_id`.
    pub fn tokens_of(&self, chain_id: u64) -> Vec<TokenConfig> {
        self.tokens
            .iter()
            .filter(|t| t.chain_id == chain_id)
            .cloned()
            .collect()
    }
}
