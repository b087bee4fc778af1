//! [`ChainStore`]'s ERC-1155 statements over `chain_erc1155_transfers`,
//! `chain_erc1155_balances` and `chain_erc1155_supply` (migration
//! `20261202040000_chain_erc1155.sql`): the batch writes (inside the batch's transaction), the
//! reorg undo (inside the undo's transaction) and the reads (balance of an id, holders of an
//! id, every stored balance for reconciliation). The ERC-1155 rules mirror ERC-20's: balances
//! are netted per batch (one row per (token, id, holder)), rows at 0 are kept, the zero
//! address never has a balance, and a balance that would go below zero rolls the batch back.

use std::fmt::Write as _;

use alloy::primitives::{Address, U256};
use sqlx::{PgConnection, PgExecutor, Row};

use super::decode::{MultiTransferRow, addr_hex, hash_hex};
use super::netting::{self, Changes, MultiNetted};
use super::store::{ChainStore, ChainStoreError, address_of, amount_of, bigint, db};

const COPY_MULTI: &str = "COPY public.chain_erc1155_transfers (chain_id, block_number, \
     block_hash, log_index, position, tx_hash, token, operator, from_address, to_address, \
     token_id, value) FROM STDIN";

/// The zero address as stored.
const ZERO: &str = "0x0000000000000000000000000000000000000000";

/// The text-format COPY payload of ERC-1155 `rows` (columns as in [`COPY_MULTI`]): hex and
/// decimal only, nothing to escape.
pub(super) fn multi_copy(
    chain_id: i64,
    rows: &[MultiTransferRow],
) -> Result<String, ChainStoreError> {
    let mut copy = String::with_capacity(rows.len() * 400);
    for r in rows {
        let log_index = i32::try_from(r.log_index).map_err(|_| ChainStoreError::OutOfRange {
            what: "log index",
            value: r.log_index,
            pg_type: "int",
        })?;
        let position = i32::try_from(r.position).map_err(|_| ChainStoreError::OutOfRange {
            what: "position in TransferBatch",
            value: u64::from(r.position),
            pg_type: "int",
        })?;
        // Writing to a String cannot fail.
        let _ = writeln!(
            copy,
            "{chain_id}\t{}\t{}\t{log_index}\t{position}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            bigint("block number", r.block_number)?,
            hash_hex(&r.block_hash),
            hash_hex(&r.tx_hash),
            addr_hex(&r.token),
            addr_hex(&r.operator),
            addr_hex(&r.from),
            addr_hex(&r.to),
            r.token_id,
            r.value,
        );
    }
    Ok(copy)
}

/// The balance upsert's UNNEST columns: token, id, holder, signed delta.
type MultiColumns = (Vec<String>, Vec<String>, Vec<String>, Vec<String>);

impl ChainStore {
    /// Writes a batch's ERC-1155 transfers (`rows`, netted into `netted`) inside the batch's
    /// transaction: one COPY, one balance upsert that fails on a negative balance (the caller
    /// drops the transaction), one supply upsert. `last_block` is the batch's last block.
    pub(super) async fn apply_multi(
        &self,
        conn: &mut PgConnection,
        rows: &[MultiTransferRow],
        netted: &MultiNetted,
        last_block: u64,
    ) -> Result<(), ChainStoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let payload = multi_copy(self.id(), rows)?;
        let mut copy_in = conn
            .copy_in_raw(COPY_MULTI)
            .await
            .map_err(db("start ERC-1155 transfers copy"))?;
        copy_in
            .send(payload.into_bytes())
            .await
            .map_err(db("copy ERC-1155 transfers"))?;
        copy_in
            .finish()
            .await
            .map_err(db("finish ERC-1155 transfers copy"))?;
        let block = bigint("block number", last_block)?;
        if !netted.deltas.is_empty() {
            let mut c: MultiColumns = Default::default();
            for d in &netted.deltas {
                c.0.push(addr_hex(&d.token));
                c.1.push(d.token_id.to_string());
                c.2.push(addr_hex(&d.holder));
                c.3.push(d.delta.to_string());
            }
            // Data-modifying CTEs always run to completion, so LIMIT only trims the check.
            let negative: Option<(String, String, String)> = sqlx::query_as(
                "WITH up AS ( \
                   INSERT INTO public.chain_erc1155_balances (chain_id, token, token_id, holder, balance, updated_block) \
                   SELECT $1, t, i::numeric, h, d::numeric, $6 \
                     FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[]) AS u(t, i, h, d) \
                   ON CONFLICT (chain_id, token, token_id, holder) DO UPDATE \
                   SET balance = public.chain_erc1155_balances.balance + EXCLUDED.balance, \
                       updated_block = EXCLUDED.updated_block \
                   RETURNING token, token_id, holder, balance) \
                 SELECT token, token_id::text, holder FROM up WHERE balance < 0 LIMIT 1",
            )
            .bind(self.id())
            .bind(&c.0)
            .bind(&c.1)
            .bind(&c.2)
            .bind(&c.3)
            .bind(block)
            .fetch_optional(&mut *conn)
            .await
            .map_err(db("apply ERC-1155 balance deltas"))?;
            if let Some((token, id, holder)) = negative {
                return Err(ChainStoreError::NegativeBalance {
                    block: netting::first_multi_debit_block(rows, &token, &id, &holder)
                        .unwrap_or(last_block),
                    token: format!("{token} id {id}"),
                    holder,
                });
            }
        }
        if !netted.supply.is_empty() {
            let (mut t, mut i, mut d) = (Vec::new(), Vec::new(), Vec::new());
            for s in &netted.supply {
                t.push(addr_hex(&s.token));
                i.push(s.token_id.to_string());
                d.push(s.delta.to_string());
            }
            sqlx::query(
                "INSERT INTO public.chain_erc1155_supply (chain_id, token, token_id, supply, updated_block) \
                 SELECT $1, t, i::numeric, d::numeric, $5 FROM UNNEST($2::text[], $3::text[], $4::text[]) AS u(t, i, d) \
                 ON CONFLICT (chain_id, token, token_id) DO UPDATE \
                 SET supply = public.chain_erc1155_supply.supply + EXCLUDED.supply, \
                     updated_block = EXCLUDED.updated_block",
            )
            .bind(self.id())
            .bind(&t)
            .bind(&i)
            .bind(&d)
            .bind(block)
            .execute(&mut *conn)
            .await
            .map_err(db("apply ERC-1155 supply deltas"))?;
        }
        Ok(())
    }

    /// Inside a reorg undo's transaction: takes the ERC-1155 transfers of `tokens` from block
    /// `fork` on back out of the balances and supplies (stamped `back_to`), records the holders
    /// they touched in `changes`, and deletes them.
    pub(super) async fn undo_multi(
        &self,
        conn: &mut PgConnection,
        tokens: &[String],
        fork: i64,
        back_to: i64,
        changes: &mut Changes,
    ) -> Result<(), ChainStoreError> {
        let rows = sqlx::query(
            "SELECT DISTINCT token, from_address, to_address FROM public.chain_erc1155_transfers \
             WHERE chain_id = $1 AND token = ANY($2) AND block_number >= $3 AND value <> 0",
        )
        .bind(self.id())
        .bind(tokens)
        .bind(fork)
        .fetch_all(&mut *conn)
        .await
        .map_err(db("read dropped ERC-1155 transfers"))?;
        for r in rows {
            let (t, f, to): (String, String, String) = (r.get(0), r.get(1), r.get(2));
            changes.add(
                address_of("token", &t)?,
                address_of("from address", &f)?,
                address_of("to address", &to)?,
            );
        }
        sqlx::query(
            "UPDATE public.chain_erc1155_balances b SET balance = b.balance - d.delta, updated_block = $4 \
             FROM (SELECT token, token_id, holder, sum(delta) AS delta FROM ( \
                     SELECT token, token_id, to_address AS holder, value AS delta \
                       FROM public.chain_erc1155_transfers \
                      WHERE chain_id = $1 AND token = ANY($2) AND block_number >= $3 AND to_address <> $5 \
                     UNION ALL \
                     SELECT token, token_id, from_address, -value FROM public.chain_erc1155_transfers \
                      WHERE chain_id = $1 AND token = ANY($2) AND block_number >= $3 AND from_address <> $5 \
                   ) x GROUP BY token, token_id, holder) d \
             WHERE b.chain_id = $1 AND b.token = d.token AND b.token_id = d.token_id \
               AND b.holder = d.holder AND d.delta <> 0",
        )
        .bind(self.id())
        .bind(tokens)
        .bind(fork)
        .bind(back_to)
        .bind(ZERO)
        .execute(&mut *conn)
        .await
        .map_err(db("undo ERC-1155 balance deltas"))?;
        sqlx::query(
            "UPDATE public.chain_erc1155_supply s SET supply = s.supply - d.delta, updated_block = $4 \
             FROM (SELECT token, token_id, \
                          sum(CASE WHEN from_address = $5 THEN value ELSE -value END) AS delta \
                     FROM public.chain_erc1155_transfers \
                    WHERE chain_id = $1 AND token = ANY($2) AND block_number >= $3 \
                      AND (from_address = $5) <> (to_address = $5) \
                    GROUP BY token, token_id) d \
             WHERE s.chain_id = $1 AND s.token = d.token AND s.token_id = d.token_id AND d.delta <> 0",
        )
        .bind(self.id())
        .bind(tokens)
        .bind(fork)
        .bind(back_to)
        .bind(ZERO)
        .execute(&mut *conn)
        .await
        .map_err(db("undo ERC-1155 supply deltas"))?;
        sqlx::query(
            "DELETE FROM public.chain_erc1155_transfers \
             WHERE chain_id = $1 AND token = ANY($2) AND block_number >= $3",
        )
        .bind(self.id())
        .bind(tokens)
        .bind(fork)
        .execute(&mut *conn)
        .await
        .map_err(db("delete dropped ERC-1155 transfers"))?;
        Ok(())
    }

    /// The stored balance of id `token_id` of ERC-1155 `token` held by `holder` (0 when it has
    /// no row), as of the chain checkpoint.
    pub async fn erc1155_balance(
        &self,
        exec: impl PgExecutor<'_>,
        token: Address,
        token_id: U256,
        holder: Address,
    ) -> Result<U256, ChainStoreError> {
        let b: Option<String> = sqlx::query_scalar(
            "SELECT balance::text FROM public.chain_erc1155_balances \
             WHERE chain_id = $1 AND token = $2 AND token_id = $3::numeric AND holder = $4",
        )
        .bind(self.id())
        .bind(addr_hex(&token))
        .bind(token_id.to_string())
        .bind(addr_hex(&holder))
        .fetch_optional(exec)
        .await
        .map_err(db("read ERC-1155 balance"))?;
        b.map_or(Ok(U256::ZERO), |b| amount_of("ERC-1155 balance", &b))
    }

    /// The holders of id `token_id` of ERC-1155 `token` with a positive balance, highest
    /// first (ties by address).
    pub async fn erc1155_holders(
        &self,
        exec: impl PgExecutor<'_>,
        token: Address,
        token_id: U256,
    ) -> Result<Vec<(Address, U256)>, ChainStoreError> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            // Ordered by the numeric column, not by the text output of the same name.
            "SELECT b.holder, b.balance::text FROM public.chain_erc1155_balances b \
             WHERE b.chain_id = $1 AND b.token = $2 AND b.token_id = $3::numeric AND b.balance > 0 \
             ORDER BY b.balance DESC, b.holder",
        )
        .bind(self.id())
        .bind(addr_hex(&token))
        .bind(token_id.to_string())
        .fetch_all(exec)
        .await
        .map_err(db("read ERC-1155 holders"))?;
        rows.into_iter()
            .map(|(h, b)| {
                Ok((
                    address_of("holder", &h)?,
                    amount_of("ERC-1155 balance", &b)?,
                ))
            })
            .collect()
    }

    /// The stored supply (mints − burns) of id `token_id` of ERC-1155 `token`; 0 when never
    /// minted.
    pub async fn erc1155_supply(
        &self,
        exec: impl PgExecutor<'_>,
        token: Address,
        token_id: U256,
    ) -> Result<U256, ChainStoreError> {
        let s: Option<String> = sqlx::query_scalar(
            "SELECT supply::text FROM public.chain_erc1155_supply \
             WHERE chain_id = $1 AND token = $2 AND token_id = $3::numeric",
        )
        .bind(self.id())
        .bind(addr_hex(&token))
        .bind(token_id.to_string())
        .fetch_optional(exec)
        .await
        .map_err(db("read ERC-1155 supply"))?;
        s.map_or(Ok(U256::ZERO), |s| amount_of("ERC-1155 supply", &s))
    }

    /// Every stored ERC-1155 balance of `token` (zero balances included: rows are kept):
    /// (holder, id, balance), for reconciliation.
    pub(crate) async fn erc1155_balances(
        &self,
        exec: impl PgExecutor<'_>,
        token: Address,
    ) -> Result<Vec<(Address, U256, U256)>, ChainStoreError> {
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT holder, token_id::text, balance::text FROM public.chain_erc1155_balances \
             WHERE chain_id = $1 AND token = $2 ORDER BY token_id, holder",
        )
        .bind(self.id())
        .bind(addr_hex(&token))
        .fetch_all(exec)
        .await
        .map_err(db("read ERC-1155 balances"))?;
        rows.into_iter()
            .map(|(h, i, b)| {
                Ok((
                    address_of("holder", &h)?,
                    amount_of("token id", &i)?,
                    amount_of("ERC-1155 balance", &b)?,
                ))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use alloy::primitives::{Address, B256, U256};

    use super::*;

    #[test]
    fn copy_rows_follow_the_column_list() {
        let row = MultiTransferRow {
            block_number: 7,
            block_hash: B256::with_last_byte(1),
            log_index: 3,
            position: 2,
            tx_hash: B256::with_last_byte(2),
            token: Address::with_last_byte(9),
            operator: Address::with_last_byte(5),
            from: Address::ZERO,
            to: Address::with_last_byte(4),
            token_id: U256::MAX,
            value: U256::from(1000u64),
        };
        let copy = multi_copy(1514, std::slice::from_ref(&row)).unwrap();
        let line: Vec<&str> = copy.trim_end().split('\t').collect();
        assert_eq!(
            line[0..5],
            ["1514", "7", &hash_hex(&row.block_hash), "3", "2"]
        );
        assert_eq!(line[8], ZERO);
        assert_eq!(line[10], U256::MAX.to_string());
        assert_eq!(line[11], "1000");
        assert_eq!(
            COPY_MULTI
                .split(['(', ')'])
                .nth(1)
                .map(|c| c.split(',').count()),
            Some(line.len())
        );
    }
}
