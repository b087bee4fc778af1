//! The Postgres side of the index. Every write here is one transaction: a batch (transfers,
//! balance deltas, NFT owners, block hashes, checkpoint) or a reorg undo. Writes run on the
//! lease connection (see [`super::lease`]), so a replica that lost its lease cannot write.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use alloy::primitives::{Address, B256, U256};
use sqlx::{Connection, PgConnection, Row};

use super::decode::{RejectedLog, TransferRow, addr_hex, hash_hex};
use super::rpc::HeaderInfo;

/// The zero address as stored.
pub const ZERO: &str = "0x0000000000000000000000000000000000000000";

/// A Postgres failure of the index, naming what was being done.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{what}: {source}")]
    Db {
        what: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("checkpoint moved under us: expected {expected:?}, found {found:?} (another writer?)")]
    CheckpointMismatch {
        expected: Option<u64>,
        found: Option<u64>,
    },
    #[error("value out of range for Postgres: {0}")]
    Range(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A batch would store a negative ERC-20 balance: the index missed earlier transfers
    /// (typically `start_block` after the token's first transfer). Nothing of the batch is
    /// written, and the chain's indexer stops.
    #[error(
        "balance of {holder} for token {token} would go below zero at block {block}: start_block after the token's first transfer? (the batch was rolled back; this chain's indexer is STOPPED: fix the token's start_block and rebuild the index)"
    )]
    NegativeBalance {
        token: String,
        holder: String,
        block: u64,
    },
}

fn db(what: &'static str) -> impl FnOnce(sqlx::Error) -> SinkError {
    move |source| SinkError::Db { what, source }
}

fn i64_of(n: u64) -> Result<i64, SinkError> {
    i64::try_from(n).map_err(|_| SinkError::Range(format!("{n} does not fit in bigint")))
}

/// The committed position of one chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    pub number: u64,
    pub hash: B256,
}

/// Holders whose balance or NFTs changed, per token, with the block of the change.
#[derive(Debug, Default, Clone)]
pub struct Changes {
    pub block: u64,
    pub holders: BTreeMap<String, BTreeSet<String>>,
}

impl Changes {
    fn add(&mut self, token: &str, from: &str, to: &str) {
        if from == to {
            return;
        }
        let set = self.holders.entry(token.to_string()).or_default();
        for a in [from, to] {
            if a != ZERO {
                set.insert(a.to_string());
            }
        }
    }
}

/// A contiguous range of blocks ready to commit: its transfers (in chain order), the headers
/// to remember, and the new checkpoint (the last header).
#[derive(Debug, Clone)]
pub struct Batch {
    pub from_block: u64,
    pub rows: Vec<TransferRow>,
    /// Logs of the range that were rejected, kept with their reason.
    pub rejected: Vec<RejectedLog>,
    pub headers: Vec<HeaderInfo>,
    pub last: HeaderInfo,
}

fn parse_hash(s: &str) -> Result<B256, SinkError> {
    s.parse()
        .map_err(|e| SinkError::Corrupt(format!("bad block hash {s:?}: {e}")))
}

/// The committed checkpoint of `chain_id`, if any.
pub async fn checkpoint(
    conn: &mut PgConnection,
    chain_id: u64,
) -> Result<Option<Checkpoint>, SinkError> {
    let row: Option<(i64, String)> = sqlx::query_as(
        "SELECT block_number, block_hash FROM public.chain_checkpoints WHERE chain_id = $1",
    )
    .bind(i64_of(chain_id)?)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db("read checkpoint"))?;
    row.map(|(n, h)| {
        Ok(Checkpoint {
            number: n as u64,
            hash: parse_hash(&h)?,
        })
    })
    .transpose()
}

/// The stored hash of block `number`, if remembered.
pub async fn stored_hash(
    conn: &mut PgConnection,
    chain_id: u64,
    number: u64,
) -> Result<Option<B256>, SinkError> {
    let h: Option<String> = sqlx::query_scalar(
        "SELECT hash FROM public.chain_blocks WHERE chain_id = $1 AND number = $2",
    )
    .bind(i64_of(chain_id)?)
    .bind(i64_of(number)?)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db("read block hash"))?;
    h.map(|h| parse_hash(&h)).transpose()
}

/// Remembered blocks below `below`, newest first.
pub async fn recent_blocks(
    conn: &mut PgConnection,
    chain_id: u64,
    below: u64,
    limit: u64,
) -> Result<Vec<(u64, B256)>, SinkError> {
    let rows: Vec<(i64, String)> = sqlx::query_as(
        "SELECT number, hash FROM public.chain_blocks WHERE chain_id = $1 AND number < $2 \
         ORDER BY number DESC LIMIT $3",
    )
    .bind(i64_of(chain_id)?)
    .bind(i64_of(below)?)
    .bind(i64_of(limit)?)
    .fetch_all(&mut *conn)
    .await
    .map_err(db("read recent blocks"))?;
    rows.into_iter()
        .map(|(n, h)| Ok((n as u64, parse_hash(&h)?)))
        .collect()
}

/// Token metadata read from the chain.
#[derive(Debug, Clone)]
pub struct TokenMeta {
    pub address: Address,
    pub standard: crate::config::TokenStandard,
    pub decimals: Option<i32>,
    pub symbol: Option<String>,
    pub name: Option<String>,
    pub start_block: u64,
}

/// Records the tracked tokens (metadata from the chain; NULL where the contract has none).
pub async fn upsert_tokens(
    conn: &mut PgConnection,
    chain_id: u64,
    tokens: &[TokenMeta],
) -> Result<(), SinkError> {
    for t in tokens {
        sqlx::query(
            "INSERT INTO public.chain_tokens (chain_id, address, standard, decimals, symbol, name, start_block) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (chain_id, address) DO UPDATE SET standard = EXCLUDED.standard, \
             decimals = EXCLUDED.decimals, symbol = EXCLUDED.symbol, name = EXCLUDED.name, \
             start_block = EXCLUDED.start_block",
        )
        .bind(i64_of(chain_id)?)
        .bind(addr_hex(&t.address))
        .bind(t.standard.as_str())
        .bind(t.decimals)
        .bind(t.symbol.as_deref())
        .bind(t.name.as_deref())
        .bind(i64_of(t.start_block)?)
        .execute(&mut *conn)
        .await
        .map_err(db("record tracked token"))?;
    }
    Ok(())
}

/// Commits one batch in one transaction and returns the holders it changed. Fails without
/// writing anything if the stored checkpoint is not the block before `batch.from_block`.
pub async fn commit_batch(
    conn: &mut PgConnection,
    chain_id: u64,
    reorg_depth: u64,
    expected_checkpoint: Option<u64>,
    batch: &Batch,
) -> Result<Changes, SinkError> {
    let cid = i64_of(chain_id)?;
    let mut tx = conn.begin().await.map_err(db("begin batch"))?;

    let found: Option<i64> = sqlx::query_scalar(
        "SELECT block_number FROM public.chain_checkpoints WHERE chain_id = $1 FOR UPDATE",
    )
    .bind(cid)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db("lock checkpoint"))?;
    let found = found.map(|n| n as u64);
    if found != expected_checkpoint {
        return Err(SinkError::CheckpointMismatch {
            expected: expected_checkpoint,
            found,
        });
    }

    let n = batch.rows.len();
    let mut changes = Changes {
        block: batch.last.number,
        ..Changes::default()
    };
    if n > 0 {
        // Text-format COPY is Postgres' fastest bulk path into one table, and every field here
        // is hex or decimal, so nothing needs escaping.
        let mut copy = String::with_capacity(n * 340);
        // ERC-20 (credited, debited) per (token, holder), netted here so the upsert gets one
        // row per holder instead of two per transfer.
        let mut deltas: HashMap<(String, String), (U256, U256)> = HashMap::new();
        // ERC-721: final owner per (token, id) in this batch, and the block of that transfer.
        let mut owners: HashMap<(String, U256), (String, u64)> = HashMap::new();
        let overflow = || SinkError::Range("balance delta overflows uint256".to_string());
        for r in &batch.rows {
            let token = addr_hex(&r.token);
            let from = addr_hex(&r.from);
            let to = addr_hex(&r.to);
            let index = i32::try_from(r.log_index)
                .map_err(|_| SinkError::Range(format!("log index {}", r.log_index)))?;
            let id = r
                .token_id
                .map_or_else(|| "\\N".to_string(), |i| i.to_string());
            // Writing to a String cannot fail.
            let _ = writeln!(
                copy,
                "{cid}\t{}\t{}\t{index}\t{}\t{token}\t{from}\t{to}\t{}\t{id}",
                i64_of(r.block_number)?,
                hash_hex(&r.block_hash),
                hash_hex(&r.tx_hash),
                r.value,
            );
            if !r.value.is_zero() {
                changes.add(&token, &from, &to);
            }
            match r.token_id {
                None => {
                    if !r.value.is_zero() && from != to {
                        if from != ZERO {
                            let d = deltas.entry((token.clone(), from)).or_default();
                            d.1 = d.1.checked_add(r.value).ok_or_else(overflow)?;
                        }
                        if to != ZERO {
                            let d = deltas.entry((token, to)).or_default();
                            d.0 = d.0.checked_add(r.value).ok_or_else(overflow)?;
                        }
                    }
                }
                Some(id) => {
                    owners.insert((token, id), (to, r.block_number));
                }
            }
        }
        let mut copy_in = tx
            .copy_in_raw(
                "COPY public.chain_transfers (chain_id, block_number, block_hash, log_index, \
                 tx_hash, token, from_address, to_address, value, token_id) FROM STDIN",
            )
            .await
            .map_err(db("start transfers copy"))?;
        copy_in
            .send(copy.into_bytes())
            .await
            .map_err(db("copy transfers"))?;
        copy_in
            .finish()
            .await
            .map_err(db("finish transfers copy"))?;

        let (mut d_tok, mut d_holder, mut d_val) = (vec![], vec![], vec![]);
        for ((token, holder), (plus, minus)) in deltas {
            if plus == minus {
                continue;
            }
            d_val.push(if plus > minus {
                (plus - minus).to_string()
            } else {
                format!("-{}", minus - plus)
            });
            d_tok.push(token);
            d_holder.push(holder);
        }
        if !d_tok.is_empty() {
            // Data-modifying CTEs always run to completion, so LIMIT only trims the check.
            let negative: Option<(String, String)> = sqlx::query_as(
                "WITH up AS ( \
                   INSERT INTO public.token_balances (chain_id, token, holder, balance, updated_block) \
                   SELECT $1, t, h, d::numeric, $5 FROM UNNEST($2::text[], $3::text[], $4::text[]) AS u(t, h, d) \
                   ON CONFLICT (chain_id, token, holder) DO UPDATE \
                   SET balance = public.token_balances.balance + EXCLUDED.balance, \
                       updated_block = EXCLUDED.updated_block \
                   RETURNING token, holder, balance) \
                 SELECT token, holder FROM up WHERE balance < 0 LIMIT 1",
            )
            .bind(cid)
            .bind(&d_tok)
            .bind(&d_holder)
            .bind(&d_val)
            .bind(i64_of(batch.last.number)?)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db("apply balance deltas"))?;
            if let Some((token, holder)) = negative {
                // The block of the holder's first outgoing transfer in the batch: where the
                // missing history shows. Dropping `tx` rolls the whole batch back.
                let block = batch
                    .rows
                    .iter()
                    .find(|r| {
                        r.token_id.is_none()
                            && addr_hex(&r.token) == token
                            && addr_hex(&r.from) == holder
                    })
                    .map_or(batch.last.number, |r| r.block_number);
                return Err(SinkError::NegativeBalance {
                    token,
                    holder,
                    block,
                });
            }
        }

        if !owners.is_empty() {
            let (mut up_t, mut up_i, mut up_o, mut up_b) = (vec![], vec![], vec![], vec![]);
            let (mut del_t, mut del_i) = (vec![], vec![]);
            for ((token, id), (owner, block)) in owners {
                if owner == ZERO {
                    del_t.push(token);
                    del_i.push(id.to_string());
                } else {
                    up_t.push(token);
                    up_i.push(id.to_string());
                    up_o.push(owner);
                    up_b.push(i64_of(block)?);
                }
            }
            sqlx::query(
                "INSERT INTO public.nft_owners (chain_id, token, token_id, owner, updated_block) \
                 SELECT $1, t, i::numeric, o, b FROM UNNEST($2::text[], $3::text[], $4::text[], $5::int8[]) AS u(t, i, o, b) \
                 ON CONFLICT (chain_id, token, token_id) DO UPDATE \
                 SET owner = EXCLUDED.owner, updated_block = EXCLUDED.updated_block",
            )
            .bind(cid)
            .bind(&up_t)
            .bind(&up_i)
            .bind(&up_o)
            .bind(&up_b)
            .execute(&mut *tx)
            .await
            .map_err(db("upsert NFT owners"))?;
            sqlx::query(
                "DELETE FROM public.nft_owners n USING UNNEST($2::text[], $3::text[]) AS u(t, i) \
                 WHERE n.chain_id = $1 AND n.token = u.t AND n.token_id = u.i::numeric",
            )
            .bind(cid)
            .bind(&del_t)
            .bind(&del_i)
            .execute(&mut *tx)
            .await
            .map_err(db("delete burned NFTs"))?;
        }
    }

    let mut b_num = Vec::with_capacity(batch.headers.len());
    let mut b_hash = Vec::with_capacity(batch.headers.len());
    let mut b_parent = Vec::with_capacity(batch.headers.len());
    for h in &batch.headers {
        b_num.push(i64_of(h.number)?);
        b_hash.push(hash_hex(&h.hash));
        b_parent.push(hash_hex(&h.parent_hash));
    }
    sqlx::query(
        "INSERT INTO public.chain_blocks (chain_id, number, hash, parent_hash) \
         SELECT $1, u.* FROM UNNEST($2::int8[], $3::text[], $4::text[]) AS u \
         ON CONFLICT (chain_id, number) DO UPDATE SET hash = EXCLUDED.hash, parent_hash = EXCLUDED.parent_hash",
    )
    .bind(cid)
    .bind(&b_num)
    .bind(&b_hash)
    .bind(&b_parent)
    .execute(&mut *tx)
    .await
    .map_err(db("record block hashes"))?;

    // Rare by nature, so one statement per log keeps the per-row topics array simple.
    for r in &batch.rejected {
        let topics: Vec<String> = r.topics.iter().map(hash_hex).collect();
        sqlx::query(
            "INSERT INTO public.chain_rejected_logs (chain_id, block_number, block_hash, log_index, \
             tx_hash, token, topics, data, reason) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (chain_id, block_hash, log_index) DO UPDATE SET reason = EXCLUDED.reason",
        )
        .bind(cid)
        .bind(i64_of(r.block_number)?)
        .bind(hash_hex(&r.block_hash))
        .bind(
            i32::try_from(r.log_index)
                .map_err(|_| SinkError::Range(format!("log index {}", r.log_index)))?,
        )
        .bind(hash_hex(&r.tx_hash))
        .bind(addr_hex(&r.token))
        .bind(&topics)
        .bind(r.data.to_string())
        .bind(&r.reason)
        .execute(&mut *tx)
        .await
        .map_err(db("keep rejected log"))?;
    }

    let last = i64_of(batch.last.number)?;
    let depth = i64_of(reorg_depth)?;
    sqlx::query(
        "INSERT INTO public.chain_checkpoints (chain_id, block_number, block_hash, finalized_block, updated_at) \
         VALUES ($1, $2, $3, GREATEST($2 - $4, 0), pg_catalog.now()) \
         ON CONFLICT (chain_id) DO UPDATE SET block_number = EXCLUDED.block_number, \
         block_hash = EXCLUDED.block_hash, finalized_block = EXCLUDED.finalized_block, \
         updated_at = EXCLUDED.updated_at",
    )
    .bind(cid)
    .bind(last)
    .bind(hash_hex(&batch.last.hash))
    .bind(depth)
    .execute(&mut *tx)
    .await
    .map_err(db("advance checkpoint"))?;

    // Keep twice the reorg window of block hashes (plus batch ends inside it).
    sqlx::query("DELETE FROM public.chain_blocks WHERE chain_id = $1 AND number < $2")
        .bind(cid)
        .bind(last - 2 * depth - 2)
        .execute(&mut *tx)
        .await
        .map_err(db("prune block hashes"))?;

    tx.commit().await.map_err(db("commit batch"))?;
    Ok(changes)
}

/// Undoes every block from `fork` on, in one transaction: ERC-20 balances lose the dropped
/// transfers' deltas, each ERC-721 id goes back to the `from` of its earliest dropped transfer
/// (ids minted in dropped blocks disappear), dropped transfers and block hashes are deleted and
/// the checkpoint is rewound to `new_checkpoint` (the last block still on the chain; `None`
/// when nothing indexed survives).
pub async fn undo_from(
    conn: &mut PgConnection,
    chain_id: u64,
    tokens: &[String],
    fork: u64,
    new_checkpoint: Option<Checkpoint>,
    reorg_depth: u64,
) -> Result<Changes, SinkError> {
    let cid = i64_of(chain_id)?;
    let fork_i = i64_of(fork)?;
    let cp = i64_of(new_checkpoint.map_or(fork.saturating_sub(1), |c| c.number))?;
    let mut tx = conn.begin().await.map_err(db("begin reorg undo"))?;

    let mut changes = Changes {
        block: new_checkpoint.map_or(fork.saturating_sub(1), |c| c.number),
        ..Changes::default()
    };
    let rows = sqlx::query(
        "SELECT DISTINCT token, from_address, to_address FROM public.chain_transfers \
         WHERE chain_id = $1 AND token = ANY($2) AND block_number >= $3 AND value <> 0",
    )
    .bind(cid)
    .bind(tokens)
    .bind(fork_i)
    .fetch_all(&mut *tx)
    .await
    .map_err(db("read dropped transfers"))?;
    for r in rows {
        let (t, f, to): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        changes.add(&t, &f, &to);
    }

    sqlx::query(
        "UPDATE public.token_balances b SET balance = b.balance - d.delta, updated_block = $4 \
         FROM (SELECT token, holder, sum(delta) AS delta FROM ( \
                 SELECT token, to_address AS holder, value AS delta FROM public.chain_transfers \
                  WHERE chain_id = $1 AND token = ANY($2) AND block_number >= $3 \
                    AND token_id IS NULL AND to_address <> $5 \
                 UNION ALL \
                 SELECT token, from_address, -value FROM public.chain_transfers \
                  WHERE chain_id = $1 AND token = ANY($2) AND block_number >= $3 \
                    AND token_id IS NULL AND from_address <> $5 \
               ) x GROUP BY token, holder) d \
         WHERE b.chain_id = $1 AND b.token = d.token AND b.holder = d.holder AND d.delta <> 0",
    )
    .bind(cid)
    .bind(tokens)
    .bind(fork_i)
    .bind(cp)
    .bind(ZERO)
    .execute(&mut *tx)
    .await
    .map_err(db("undo balance deltas"))?;

    sqlx::query(
        "WITH first AS ( \
           SELECT DISTINCT ON (token, token_id) token, token_id, from_address \
             FROM public.chain_transfers \
            WHERE chain_id = $1 AND token = ANY($2) AND block_number >= $3 AND token_id IS NOT NULL \
            ORDER BY token, token_id, block_number, log_index), \
         minted AS ( \
           DELETE FROM public.nft_owners n USING first f \
            WHERE n.chain_id = $1 AND n.token = f.token AND n.token_id = f.token_id \
              AND f.from_address = $5) \
         INSERT INTO public.nft_owners (chain_id, token, token_id, owner, updated_block) \
         SELECT $1, token, token_id, from_address, $4 FROM first WHERE from_address <> $5 \
         ON CONFLICT (chain_id, token, token_id) DO UPDATE \
         SET owner = EXCLUDED.owner, updated_block = EXCLUDED.updated_block",
    )
    .bind(cid)
    .bind(tokens)
    .bind(fork_i)
    .bind(cp)
    .bind(ZERO)
    .execute(&mut *tx)
    .await
    .map_err(db("restore NFT owners"))?;

    sqlx::query(
        "DELETE FROM public.chain_transfers WHERE chain_id = $1 AND token = ANY($2) AND block_number >= $3",
    )
    .bind(cid)
    .bind(tokens)
    .bind(fork_i)
    .execute(&mut *tx)
    .await
    .map_err(db("delete dropped transfers"))?;
    sqlx::query(
        "DELETE FROM public.chain_rejected_logs WHERE chain_id = $1 AND block_number >= $2",
    )
    .bind(cid)
    .bind(fork_i)
    .execute(&mut *tx)
    .await
    .map_err(db("delete dropped rejected logs"))?;
    sqlx::query("DELETE FROM public.chain_blocks WHERE chain_id = $1 AND number >= $2")
        .bind(cid)
        .bind(fork_i)
        .execute(&mut *tx)
        .await
        .map_err(db("delete dropped block hashes"))?;
    match new_checkpoint {
        Some(c) => {
            sqlx::query(
                "UPDATE public.chain_checkpoints SET block_number = $2, block_hash = $3, \
                 finalized_block = LEAST(finalized_block, GREATEST($2 - $4, 0)), \
                 updated_at = pg_catalog.now() WHERE chain_id = $1",
            )
            .bind(cid)
            .bind(cp)
            .bind(hash_hex(&c.hash))
            .bind(i64_of(reorg_depth)?)
            .execute(&mut *tx)
            .await
            .map_err(db("rewind checkpoint"))?;
        }
        None => {
            sqlx::query("DELETE FROM public.chain_checkpoints WHERE chain_id = $1")
                .bind(cid)
                .execute(&mut *tx)
                .await
                .map_err(db("reset checkpoint"))?;
        }
    }

    tx.commit().await.map_err(db("commit reorg undo"))?;
    Ok(changes)
}

/// A recorded stop of a chain's indexer (see `chain_indexer_faults`).
pub async fn fault(conn: &mut PgConnection, chain_id: u64) -> Result<Option<String>, SinkError> {
    sqlx::query_scalar("SELECT reason FROM public.chain_indexer_faults WHERE chain_id = $1")
        .bind(i64_of(chain_id)?)
        .fetch_optional(&mut *conn)
        .await
        .map_err(db("read indexer fault"))
}

/// Records that a chain's indexer stopped and why; every replica then stays off that chain.
pub async fn record_fault(
    conn: &mut PgConnection,
    chain_id: u64,
    at_block: u64,
    reason: &str,
) -> Result<(), SinkError> {
    sqlx::query(
        "INSERT INTO public.chain_indexer_faults (chain_id, reason, at_block) VALUES ($1, $2, $3) \
         ON CONFLICT (chain_id) DO UPDATE SET reason = EXCLUDED.reason, at_block = EXCLUDED.at_block, \
         detected_at = pg_catalog.now()",
    )
    .bind(i64_of(chain_id)?)
    .bind(reason)
    .bind(i64_of(at_block)?)
    .execute(&mut *conn)
    .await
    .map_err(db("record indexer fault"))?;
    Ok(())
}
