//! `Transfer` logs → transfer rows. ERC-20 and ERC-721 share topic0 but differ in shape (3
//! topics and a 32-byte value vs 4 topics and no data), so the token's configured standard
//! decides the decoder; a log that does not have its token's shape is rejected with a reason,
//! never guessed.

use std::collections::HashMap;

use alloy::primitives::{Address, B256, U256};
use alloy::rpc::types::Log;
use alloy::sol;
use alloy::sol_types::SolEvent;

use crate::config::TokenStandard;

sol! {
    /// ERC-20 `Transfer` (3 topics).
    interface IERC20 {
        event Transfer(address indexed from, address indexed to, uint256 value);
        function balanceOf(address owner) external view returns (uint256);
        function decimals() external view returns (uint8);
        function symbol() external view returns (string);
        function name() external view returns (string);
    }
    /// ERC-721 `Transfer` (4 topics).
    interface IERC721 {
        event Transfer(address indexed from, address indexed to, uint256 indexed tokenId);
        function ownerOf(uint256 tokenId) external view returns (address);
    }
}

/// keccak256("Transfer(address,address,uint256)").
pub const TRANSFER_TOPIC: B256 = IERC20::Transfer::SIGNATURE_HASH;

/// One decoded `Transfer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferRow {
    pub block_number: u64,
    pub block_hash: B256,
    pub log_index: u64,
    pub tx_hash: B256,
    pub token: Address,
    pub from: Address,
    pub to: Address,
    /// ERC-20 amount; 1 for ERC-721.
    pub value: U256,
    /// ERC-721 token id.
    pub token_id: Option<U256>,
}

/// A log that was rejected, as kept in `chain_rejected_logs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedLog {
    pub block_number: u64,
    pub block_hash: B256,
    pub log_index: u64,
    pub tx_hash: B256,
    pub token: Address,
    pub topics: Vec<B256>,
    pub data: alloy::primitives::Bytes,
    pub reason: String,
}

impl RejectedLog {
    /// The row to keep for `log` rejected with `e`; `None` when the log lacks the fields that
    /// identify it (the reply is then invalid, not the log) or was marked removed.
    pub fn of(log: &Log, e: &DecodeError) -> Option<RejectedLog> {
        if matches!(e, DecodeError::Removed(_) | DecodeError::Missing(_)) {
            return None;
        }
        Some(RejectedLog {
            block_number: log.block_number?,
            block_hash: log.block_hash?,
            log_index: log.log_index?,
            tx_hash: log.transaction_hash?,
            token: log.address(),
            topics: log.topics().to_vec(),
            data: log.data().data.clone(),
            reason: e.to_string(),
        })
    }
}

/// Why a log was not turned into a row.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DecodeError {
    #[error("log is missing {0}")]
    Missing(&'static str),
    #[error("log from {0} is not a tracked token")]
    Untracked(Address),
    #[error(
        "log of {token} at block {block} index {index} does not match {standard:?} Transfer: {reason}"
    )]
    Shape {
        token: Address,
        block: u64,
        index: u64,
        standard: TokenStandard,
        reason: String,
    },
    #[error("log at block {0} was marked removed")]
    Removed(u64),
}

/// Decodes one RPC log for a token of the given standards map.
pub fn decode(
    log: &Log,
    tokens: &HashMap<Address, TokenStandard>,
) -> Result<Option<TransferRow>, DecodeError> {
    let block_number = log
        .block_number
        .ok_or(DecodeError::Missing("blockNumber"))?;
    if log.removed {
        return Err(DecodeError::Removed(block_number));
    }
    let block_hash = log.block_hash.ok_or(DecodeError::Missing("blockHash"))?;
    let log_index = log.log_index.ok_or(DecodeError::Missing("logIndex"))?;
    let tx_hash = log
        .transaction_hash
        .ok_or(DecodeError::Missing("transactionHash"))?;
    let token = log.address();
    let standard = *tokens.get(&token).ok_or(DecodeError::Untracked(token))?;
    if log.topics().first() != Some(&TRANSFER_TOPIC) {
        return Ok(None);
    }
    let shape = |reason: String| DecodeError::Shape {
        token,
        block: block_number,
        index: log_index,
        standard,
        reason,
    };
    let (from, to, value, token_id) = match standard {
        TokenStandard::Erc20 => {
            let t =
                IERC20::Transfer::decode_log_data(log.data()).map_err(|e| shape(e.to_string()))?;
            (t.from, t.to, t.value, None)
        }
        TokenStandard::Erc721 => {
            let t =
                IERC721::Transfer::decode_log_data(log.data()).map_err(|e| shape(e.to_string()))?;
            (t.from, t.to, U256::from(1u8), Some(t.tokenId))
        }
    };
    Ok(Some(TransferRow {
        block_number,
        block_hash,
        log_index,
        tx_hash,
        token,
        from,
        to,
        value,
        token_id,
    }))
}

/// Lowercase 0x hex, the form every chain table stores.
pub fn addr_hex(a: &Address) -> String {
    format!("{a:#x}")
}

/// Lowercase 0x hex of a 32-byte hash.
pub fn hash_hex(h: &B256) -> String {
    format!("{h:#x}")
}
