//! The chain indexer: follows ERC-20 and ERC-721 `Transfer` logs, keeps exact holder balances
//! and NFT owners in Postgres, survives reorgs, RPC faults and restarts, and announces changes.

pub mod cli;

use serde::Deserialize;

use crate::config::ConfigError;

/// `[chain]` configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainSection {
    pub enabled: bool,
    #[serde(default)]
    pub chains: Vec<ChainConfig>,
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
}

/// One EVM chain to follow.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainConfig {
    pub chain_id: u64,
    pub name: String,
    pub rpc_urls: Vec<String>,
    #[serde(default)]
    pub ws_url: Option<String>,
    #[serde(default)]
    pub confirmations: u64,
    #[serde(default = "default_max_block_range")]
    pub max_block_range: u64,
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    #[serde(default = "default_reorg_depth")]
    pub reorg_depth: u64,
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

/// Token standard, which decides how a `Transfer` log is decoded.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TokenStandard {
    Erc20,
    Erc721,
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
            if c.max_block_range == 0 {
                return Err(ConfigError::invalid(
                    format!("chain.chains[{i}].max_block_range"),
                    "must be at least 1",
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
        }
        Ok(())
    }
}
