//! Own-index snapshots: the holders of an indexed token at a block, computed in SQL from the
//! chain indexer's `chain_transfers` (so any block the index covers works, not only the head).
//!
//! - ERC-20: balance = Σ incoming − Σ outgoing per address over transfers up to the block,
//!   excluding the zero address, keeping positive balances. A negative balance means the index
//!   misses transfers (e.g. `start_block` after the token's deployment): the snapshot fails
//!   instead of publishing wrong numbers.
//! - ERC-721: the owner of each token id is the `to_address` of its last transfer up to the
//!   block (burns go to the zero address and drop out); a holder's balance is its token count.
//!
//! Only blocks up to `chain_checkpoints.finalized_block` are served: above it a reorg could
//! still change the answer.

use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::store::{self, Completion};

const ZERO_ADDRESS: &str = "0x0000000000000000000000000000000000000000";

/// Why an own-index snapshot could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error(
        "chain {chain_id} token {token} is not indexed (no chain_tokens row): add it to chain.tokens and let the indexer catch up"
    )]
    NotIndexed { chain_id: i64, token: String },
    #[error("chain {0} has no indexer checkpoint yet: nothing is indexed on it")]
    NoCheckpoint(i64),
    #[error(
        "block {block} is above the index's finalized block {finalized} on chain {chain_id}: wait for the indexer, or ask for a block ≤ {finalized}"
    )]
    AboveFinalized {
        chain_id: i64,
        block: u64,
        finalized: i64,
    },
    #[error(
        "block {block} is before the index's start block {start} for token {token}: the index has no transfers before it"
    )]
    BeforeStart {
        token: String,
        block: u64,
        start: i64,
    },
    #[error("the index is inconsistent for token {token} at block {block}: {reason}")]
    Inconsistent {
        token: String,
        block: u64,
        reason: String,
    },
    #[error("chain {0:?} is not a numeric chain id (own-index snapshots use chain ids, e.g. 1514)")]
    BadChain(String),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
}

/// Parses the chain of an index snapshot: a decimal chain id.
pub fn parse_chain_id(chain: &str) -> Result<i64, IndexError> {
    chain
        .trim()
        .parse::<i64>()
        .ok()
        .filter(|c| *c > 0)
        .ok_or_else(|| IndexError::BadChain(chain.to_string()))
}

/// Computes the holders of `token` on `chain_id` at `block` (default: the finalized block) into
/// pending snapshot `id` and marks it complete, in one transaction. Returns the block used and
/// the holder count.
pub async fn snapshot_into(
    pool: &PgPool,
    id: Uuid,
    chain_id: i64,
    token: &str,
    block: Option<u64>,
) -> Result<(u64, i64), IndexError> {
    let mut tx = pool.begin().await?;
    let tok = sqlx::query(
        "SELECT standard, decimals, start_block FROM public.chain_tokens \
         WHERE chain_id = $1 AND address = $2",
    )
    .bind(chain_id)
    .bind(token)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| IndexError::NotIndexed {
        chain_id,
        token: token.to_string(),
    })?;
    let standard: String = tok.try_get("standard")?;
    let decimals: Option<i32> = tok.try_get("decimals")?;
    let start_block: i64 = tok.try_get("start_block")?;
    let finalized: i64 = sqlx::query_scalar(
        "SELECT finalized_block FROM public.chain_checkpoints WHERE chain_id = $1",
    )
    .bind(chain_id)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(IndexError::NoCheckpoint(chain_id))?;
    let block = match block {
        Some(b) => b,
        None => u64::try_from(finalized).map_err(|_| IndexError::NoCheckpoint(chain_id))?,
    };
    let block_i = i64::try_from(block).map_err(|_| IndexError::AboveFinalized {
        chain_id,
        block,
        finalized,
    })?;
    if block_i > finalized {
        return Err(IndexError::AboveFinalized {
            chain_id,
            block,
            finalized,
        });
    }
    if block_i < start_block {
        return Err(IndexError::BeforeStart {
            token: token.to_string(),
            block,
            start: start_block,
        });
    }

    let (inserted, negatives, example): (i64, i64, Option<String>) = if standard == "erc721" {
        sqlx::query_as(
            "WITH last AS ( \
               SELECT DISTINCT ON (token_id) token_id, to_address AS owner \
               FROM public.chain_transfers \
               WHERE chain_id = $2 AND token = $3 AND block_number <= $4 AND token_id IS NOT NULL \
               ORDER BY token_id, block_number DESC, log_index DESC \
             ), ins AS ( \
               INSERT INTO public.snapshot_holders (snapshot_id, holder, balance) \
               SELECT $1, owner, count(*) FROM last WHERE owner <> $5 GROUP BY owner \
               RETURNING 1 \
             ) SELECT (SELECT count(*) FROM ins), 0::bigint, NULL::text",
        )
        .bind(id)
        .bind(chain_id)
        .bind(token)
        .bind(block_i)
        .bind(ZERO_ADDRESS)
        .fetch_one(&mut *tx)
        .await?
    } else {
        sqlx::query_as(
            "WITH moves AS ( \
               SELECT to_address AS holder, value AS delta FROM public.chain_transfers \
               WHERE chain_id = $2 AND token = $3 AND block_number <= $4 \
               UNION ALL \
               SELECT from_address, -value FROM public.chain_transfers \
               WHERE chain_id = $2 AND token = $3 AND block_number <= $4 \
             ), bal AS ( \
               SELECT holder, sum(delta) AS balance FROM moves WHERE holder <> $5 GROUP BY holder \
             ), ins AS ( \
               INSERT INTO public.snapshot_holders (snapshot_id, holder, balance) \
               SELECT $1, holder, balance FROM bal WHERE balance > 0 \
               RETURNING 1 \
             ) SELECT (SELECT count(*) FROM ins), \
                      (SELECT count(*) FROM bal WHERE balance < 0), \
                      (SELECT min(holder) FROM bal WHERE balance < 0)",
        )
        .bind(id)
        .bind(chain_id)
        .bind(token)
        .bind(block_i)
        .bind(ZERO_ADDRESS)
        .fetch_one(&mut *tx)
        .await?
    };
    if negatives > 0 {
        // Dropping the transaction rolls the inserted rows back.
        return Err(IndexError::Inconsistent {
            token: token.to_string(),
            block,
            reason: format!(
                "{negatives} address(es) would have a negative balance (e.g. {}): transfers before start_block are missing",
                example.unwrap_or_default()
            ),
        });
    }
    let total_supply: Option<String> = sqlx::query_scalar(
        "SELECT coalesce(sum(balance), 0)::text FROM public.snapshot_holders WHERE snapshot_id = $1",
    )
    .bind(id)
    .fetch_one(&mut *tx)
    .await?;
    let completion = Completion {
        block_height: Some(block),
        decimals: match standard.as_str() {
            "erc721" => Some(0),
            _ => decimals.and_then(|d| u32::try_from(d).ok()),
        },
        total_supply,
    };
    let count = match store::complete(&mut tx, id, &completion, inserted).await? {
        store::Completed::Complete(n) => n,
        // Someone else finished it first: the stored outcome stands, this one rolls back.
        store::Completed::NotPending => return Ok((block, inserted)),
        store::Completed::CountMismatch { stored, expected } => {
            return Err(IndexError::Inconsistent {
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
