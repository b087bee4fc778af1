//! Balances at any block, from the stored transfers: what access rules ask ("held at least N at
//! block B", "held at least N since block B") and holder lists at a past block. Every answer is
//! one statement over the two history indexes of `chain_transfers` (migration
//! `20261201095200_chain_history.sql`: `(chain_id, token, to_address, block_number) INCLUDE
//! (value)` and the same on `from_address`), so a holder's history is two index-only range
//! scans, never a scan of the token.
//!
//! A question about a block the index does not cover yet (after the chain checkpoint, or after
//! a backfilling token's progress) or about a token the catalogue does not track is an error,
//! never a zero: "we don't know" must not read as "holds nothing". ERC-721 answers count ids
//! (each transfer has value 1).

use alloy::primitives::{Address, U256};
use sqlx::PgExecutor;

use super::decode::addr_hex;
use super::store::{ChainStore, ChainStoreError, address_of, amount_of, bigint, block_of, db};

/// The coverage columns every history statement has first: the token's status and
/// progress, and the chain checkpoint ($1 chain, $2 token).
macro_rules! coverage {
    () => {
        "(SELECT status FROM public.chain_tokens WHERE chain_id = $1 AND address = $2), \
         (SELECT indexed_to FROM public.chain_tokens WHERE chain_id = $1 AND address = $2), \
         (SELECT block_number FROM public.chain_checkpoints WHERE chain_id = $1)"
    };
}

/// `balance_at`: Σ in − Σ out up to $4 ($3 holder).
const BALANCE_AT: &str = concat!(
    "SELECT ",
    coverage!(),
    ", (coalesce((SELECT sum(value) FROM public.chain_transfers \
          WHERE chain_id = $1 AND token = $2 AND to_address = $3 AND block_number <= $4), 0) \
      - coalesce((SELECT sum(value) FROM public.chain_transfers \
          WHERE chain_id = $1 AND token = $2 AND from_address = $3 AND block_number <= $4), 0))::text"
);

/// `min_balance_between`: the balance at the end of $4 - 1, plus the lowest running sum of the
/// holder's moves in $4..=$5 (self-transfers move nothing), in chain order.
const MIN_BALANCE: &str = concat!(
    "WITH base AS ( \
       SELECT coalesce((SELECT sum(value) FROM public.chain_transfers \
                 WHERE chain_id = $1 AND token = $2 AND to_address = $3 AND block_number < $4), 0) \
            - coalesce((SELECT sum(value) FROM public.chain_transfers \
                 WHERE chain_id = $1 AND token = $2 AND from_address = $3 AND block_number < $4), 0) AS b \
     ), moves AS ( \
       SELECT block_number, log_index, value AS d FROM public.chain_transfers \
        WHERE chain_id = $1 AND token = $2 AND to_address = $3 AND from_address <> $3 \
          AND block_number BETWEEN $4 AND $5 \
       UNION ALL \
       SELECT block_number, log_index, -value FROM public.chain_transfers \
        WHERE chain_id = $1 AND token = $2 AND from_address = $3 AND to_address <> $3 \
          AND block_number BETWEEN $4 AND $5 \
     ), running AS ( \
       SELECT sum(d) OVER (ORDER BY block_number, log_index ROWS UNBOUNDED PRECEDING) AS r FROM moves \
     ) SELECT ",
    coverage!(),
    ", ((SELECT b FROM base) + LEAST(0, coalesce((SELECT min(r) FROM running), 0)))::text"
);

/// A `holders_at_block` row: the coverage columns, then holder and balance (NULL when none).
type HolderRow = (
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<String>,
);

/// What [`check_coverage`] reads.
type Coverage = (Option<String>, Option<i64>, Option<i64>);

/// The last block the index holds for `token`: the chain checkpoint for a live token (or one
/// removed with its rows kept: its `indexed_to`), a backfilling or paused token's progress.
fn covered_through(
    token: Address,
    (status, indexed_to, checkpoint): &Coverage,
) -> Result<Option<u64>, ChainStoreError> {
    let Some(status) = status else {
        return Err(ChainStoreError::NotTracked {
            token: addr_hex(&token),
        });
    };
    let last = match status.as_str() {
        "live" => *checkpoint,
        "pending" => None,
        _ => *indexed_to,
    };
    last.map(|n| block_of("covered block", n)).transpose()
}

/// Fails unless the index holds `token` through `block`.
fn check_coverage(token: Address, block: u64, c: &Coverage) -> Result<(), ChainStoreError> {
    let covered = covered_through(token, c)?;
    if covered.is_none_or(|n| n < block) {
        return Err(ChainStoreError::NotIndexed {
            token: addr_hex(&token),
            block,
            covered,
        });
    }
    Ok(())
}

impl ChainStore {
    /// ERC-20 balance of `holder` at the end of block `block`, from the stored transfers.
    pub async fn balance_at(
        &self,
        exec: impl PgExecutor<'_>,
        token: Address,
        holder: Address,
        block: u64,
    ) -> Result<U256, ChainStoreError> {
        let (status, indexed_to, cp, balance): (Option<String>, Option<i64>, Option<i64>, String) =
            sqlx::query_as(BALANCE_AT)
                .bind(self.id())
                .bind(addr_hex(&token))
                .bind(addr_hex(&holder))
                .bind(bigint("block number", block)?)
                .fetch_one(exec)
                .await
                .map_err(db("read balance at a block"))?;
        check_coverage(token, block, &(status, indexed_to, cp))?;
        if holder == Address::ZERO {
            return Ok(U256::ZERO);
        }
        amount_of("balance", &balance)
    }

    /// The lowest ERC-20 balance of `holder` over blocks `from..=to` (its balance at the end of
    /// `from - 1` and after each transfer in the window): the "held at least N since" rule.
    pub async fn min_balance_between(
        &self,
        exec: impl PgExecutor<'_>,
        token: Address,
        holder: Address,
        from: u64,
        to: u64,
    ) -> Result<U256, ChainStoreError> {
        if from > to {
            return Err(ChainStoreError::EmptyWindow { from, to });
        }
        let (status, indexed_to, cp, balance): (Option<String>, Option<i64>, Option<i64>, String) =
            sqlx::query_as(MIN_BALANCE)
                .bind(self.id())
                .bind(addr_hex(&token))
                .bind(addr_hex(&holder))
                .bind(bigint("block number", from)?)
                .bind(bigint("block number", to)?)
                .fetch_one(exec)
                .await
                .map_err(db("read minimum balance over blocks"))?;
        check_coverage(token, to, &(status, indexed_to, cp))?;
        if holder == Address::ZERO {
            return Ok(U256::ZERO);
        }
        amount_of("balance", &balance)
    }

    /// Every holder of `token` with a positive balance at the end of block `block` (ERC-721:
    /// its number of ids), highest first, from the stored transfers.
    pub async fn holders_at_block(
        &self,
        exec: impl PgExecutor<'_>,
        token: Address,
        block: u64,
    ) -> Result<Vec<(Address, U256)>, ChainStoreError> {
        let rows: Vec<HolderRow> = sqlx::query_as(concat!(
            "WITH moves AS ( \
                   SELECT to_address AS holder, value AS d FROM public.chain_transfers \
                    WHERE chain_id = $1 AND token = $2 AND block_number <= $3 \
                   UNION ALL \
                   SELECT from_address, -value FROM public.chain_transfers \
                    WHERE chain_id = $1 AND token = $2 AND block_number <= $3 \
                 ), bal AS ( \
                   SELECT holder, sum(d) AS balance FROM moves WHERE holder <> $4 GROUP BY holder \
                 ) SELECT ",
            coverage!(),
            ", b.holder, b.balance::text FROM (SELECT 1) one \
                 LEFT JOIN bal b ON b.balance > 0 ORDER BY b.balance DESC NULLS LAST, b.holder"
        ))
        .bind(self.id())
        .bind(addr_hex(&token))
        .bind(bigint("block number", block)?)
        .bind(addr_hex(&Address::ZERO))
        .fetch_all(exec)
        .await
        .map_err(db("read holders at a block"))?;
        let Some(first) = rows.first() else {
            return Ok(Vec::new());
        };
        check_coverage(token, block, &(first.0.clone(), first.1, first.2))?;
        rows.into_iter()
            .filter_map(|r| r.3.zip(r.4))
            .map(|(h, b)| Ok((address_of("holder", &h)?, amount_of("balance", &b)?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_is_the_checkpoint_when_live_and_the_progress_otherwise() {
        let t = Address::with_last_byte(1);
        let live = (Some("live".to_string()), None, Some(100));
        assert!(check_coverage(t, 100, &live).is_ok());
        let e = check_coverage(t, 101, &live).unwrap_err();
        assert!(
            matches!(
                e,
                ChainStoreError::NotIndexed {
                    block: 101,
                    covered: Some(100),
                    ..
                }
            ),
            "{e}"
        );
        let backfilling = (Some("backfilling".to_string()), Some(40), Some(100));
        assert!(check_coverage(t, 40, &backfilling).is_ok());
        assert!(check_coverage(t, 41, &backfilling).is_err());
        let pending = (Some("pending".to_string()), None, Some(100));
        assert!(check_coverage(t, 0, &pending).is_err());
        assert!(matches!(
            check_coverage(t, 0, &(None, None, Some(100))),
            Err(ChainStoreError::NotTracked { .. })
        ));
    }
}
