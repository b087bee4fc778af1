//! Own-index snapshots: the holders of an indexed token at a block, computed from the chain
//! indexer's `chain_transfers` (so any block the index covers works, not only the head).
//!
//! The computation is one set-based statement that the chain store owns
//! ([`ChainStore::holders_at`] says how balances and owners are derived); this module decides
//! which block may be served and records the snapshot. A negative balance means the index
//! misses transfers (e.g. `start_block` after the token's deployment): the snapshot fails
//! instead of publishing wrong numbers.
//!
//! Only blocks up to `chain_checkpoints.finalized_block` are served: above it a reorg could
//! still change the answer.

use alloy::primitives::Address;
use sqlx::PgPool;
use uuid::Uuid;

use super::store::{self, Completion};
use crate::chain::store::{ChainStore, ChainStoreError};
use crate::config::TokenStandard;

/// Why an own-index snapshot could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum OwnIndexError {
    #[error(
        "chain {chain_id} token {token} is not indexed (no chain_tokens row): add it to chain.tokens and let the indexer catch up"
    )]
    NotIndexed { chain_id: u64, token: String },
    #[error("chain {0} has no indexer checkpoint yet: nothing is indexed on it")]
    NoCheckpoint(u64),
    #[error(
        "block {block} is above the index's finalized block {finalized} on chain {chain_id}: wait for the indexer, or ask for a block ≤ {finalized}"
    )]
    AboveFinalized {
        chain_id: u64,
        block: u64,
        finalized: u64,
    },
    #[error(
        "block {block} is before the index's start block {start} for token {token}: the index has no transfers before it"
    )]
    BeforeStart {
        token: String,
        block: u64,
        start: u64,
    },
    #[error("the index is inconsistent for token {token} at block {block}: {reason}")]
    Inconsistent {
        token: String,
        block: u64,
        reason: String,
    },
    #[error("chain {0:?} is not a numeric chain id (own-index snapshots use chain ids, e.g. 1514)")]
    BadChain(String),
    #[error("token {token:?} is not a 0x-prefixed 20-byte hex address: {reason}")]
    BadToken { token: String, reason: String },
    #[error(transparent)]
    Index(#[from] ChainStoreError),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
}

impl OwnIndexError {
    /// The Postgres failure behind this error, if it is one (the snapshot is then retried
    /// rather than failed).
    pub(crate) fn into_db(self) -> Result<sqlx::Error, OwnIndexError> {
        match self {
            OwnIndexError::Db(e) | OwnIndexError::Index(ChainStoreError::Db { source: e, .. }) => {
                Ok(e)
            }
            other => Err(other),
        }
    }
}

/// Parses the chain of an index snapshot: a decimal chain id that fits the chain tables.
pub fn parse_chain_id(chain: &str) -> Result<u64, OwnIndexError> {
    chain
        .trim()
        .parse::<i64>()
        .ok()
        .filter(|c| *c > 0)
        .and_then(|c| u64::try_from(c).ok())
        .ok_or_else(|| OwnIndexError::BadChain(chain.to_string()))
}

/// Computes the holders of `token` on `chain_id` at `block` (default: the finalized block) into
/// pending snapshot `id` and marks it complete, in one transaction. Returns the block used and
/// the holder count. The chain tables are read (and the holders computed) through
/// [`ChainStore`]; the snapshot rows are this module's.
pub async fn snapshot_into(
    pool: &PgPool,
    id: Uuid,
    chain_id: u64,
    token: &str,
    block: Option<u64>,
) -> Result<(u64, i64), OwnIndexError> {
    let index = ChainStore::new(chain_id)?;
    let address: Address = token.parse().map_err(|e| OwnIndexError::BadToken {
        token: token.to_string(),
        reason: format!("{e}"),
    })?;
    let mut tx = pool.begin().await?;
    let tok = index
        .indexed_token(&mut *tx, address)
        .await?
        .ok_or_else(|| OwnIndexError::NotIndexed {
            chain_id,
            token: token.to_string(),
        })?;
    let finalized = index
        .finalized_block(&mut *tx)
        .await?
        .ok_or(OwnIndexError::NoCheckpoint(chain_id))?;
    let block = block.unwrap_or(finalized);
    if block > finalized {
        return Err(OwnIndexError::AboveFinalized {
            chain_id,
            block,
            finalized,
        });
    }
    if block < tok.start_block {
        return Err(OwnIndexError::BeforeStart {
            token: token.to_string(),
            block,
            start: tok.start_block,
        });
    }

    let written = index
        .holders_at(&mut tx, id, address, tok.standard, block)
        .await?;
    let inserted = written.inserted;
    if written.negative > 0 {
        // Dropping the transaction rolls the inserted rows back.
        return Err(OwnIndexError::Inconsistent {
            token: token.to_string(),
            block,
            reason: format!(
                "{} address(es) would have a negative balance (e.g. {}): transfers before start_block are missing",
                written.negative,
                written.negative_example.unwrap_or_default()
            ),
        });
    }
    let total_supply = store::total_supply(&mut tx, id).await?;
    let completion = Completion {
        block_height: Some(block),
        decimals: match tok.standard {
            // ERC-1155 never gets here: holders_at refuses a snapshot without a token id.
            TokenStandard::Erc721 | TokenStandard::Erc1155 => Some(0),
            TokenStandard::Erc20 => tok.decimals.and_then(|d| u32::try_from(d).ok()),
        },
        total_supply,
    };
    let count = match store::complete(&mut tx, id, &completion, inserted).await? {
        store::Completed::Complete(n) => n,
        // Someone else finished it first: the stored outcome stands, this one rolls back.
        store::Completed::NotPending => return Ok((block, inserted)),
        store::Completed::CountMismatch { stored, expected } => {
            return Err(OwnIndexError::Inconsistent {
                token: token.to_string(),
                block,
                reason: format!(
                    "{stored} holder rows are stored for the snapshot but this computation wrote {expected}: another writer touched its rows"
                ),
            });
        }
    };
    tx.commit().await?;
    metrics::counter!("tokenwarden_snapshot_holders_stored_total", "source" => "index")
        .increment(u64::try_from(inserted).unwrap_or(0));
    Ok((block, count))
}
