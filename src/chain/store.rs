//! The chain tables' gateway: every statement of `src/` over `chain_tokens`, `chain_transfers`,
//! `chain_rejected_logs`, `token_balances`, `nft_owners`, `chain_blocks`, `chain_checkpoints`
//! and `chain_indexer_faults` (migration `20261125000400_chain.sql`) and the ERC-1155 tables
//! (`chain_erc1155_*`, statements in [`super::store_multi`]) is a method of [`ChainStore`], so the tables' shape and their invariants (lowercase hex, uint256 as
//! `numeric(78,0)`, the reorg window) are known in one file. The indexer writes through it, and
//! the index CLI, the readiness probe and own-index snapshots read through it.
//!
//! Every write is one transaction: a batch (transfers, balance deltas, NFT owners, block hashes,
//! checkpoint) or a reorg undo. The indexer's writes run on the lease connection (see
//! [`super::lease`]), so a replica that lost its lease cannot write.

use std::fmt::Write as _;
use std::str::FromStr;

use alloy::primitives::{Address, B256, U256};
use sqlx::{Connection, PgConnection, PgExecutor, Row};
use uuid::Uuid;

use super::decode::{MultiTransferRow, RejectedLog, TransferRow, addr_hex, hash_hex};
use super::factory::CreatedToken;
use super::netting::{self, BalanceDelta, Changes, NettingError, OwnerChange};
use super::rpc::HeaderInfo;
use crate::config::TokenStandard;

/// The zero address as stored: the `from` of a mint, the `to` of a burn.
const ZERO_ADDRESS: &str = "0x0000000000000000000000000000000000000000";

/// A Postgres failure of the index, or data that cannot go in or came out wrong.
#[derive(Debug, thiserror::Error)]
pub enum ChainStoreError {
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
    #[error("{what} {value} does not fit in a Postgres {pg_type}")]
    OutOfRange {
        what: &'static str,
        value: u64,
        pg_type: &'static str,
    },
    #[error(transparent)]
    Netting(#[from] NettingError),
    /// `chain_token_request` refused (bad input, unknown token) or could not run.
    #[error("token request {action} {token}: {source}")]
    Request {
        token: String,
        action: &'static str,
        #[source]
        source: sqlx::Error,
    },
    /// A token backfill step no longer matches the catalogue or the chain (paused, removed,
    /// or a reorg undo replaced a block it was fetched by): nothing was written; the step is
    /// planned again.
    /// A history question about a block the index does not hold yet for this token (after
    /// the chain checkpoint, or after a backfilling token's progress).
    #[error("token {token} is not indexed through block {block} (indexed through {covered:?})")]
    NotIndexed {
        token: String,
        block: u64,
        covered: Option<u64>,
    },
    /// A history question about a token the catalogue does not track.
    #[error("token {token} is not tracked on this chain")]
    NotTracked { token: String },
    /// A question that has no answer for the token's standard (e.g. an own-index snapshot of
    /// an ERC-1155 token, whose balances are per id).
    #[error("token {token} is {standard}: {what} is not available for it")]
    Unsupported {
        token: String,
        standard: &'static str,
        what: &'static str,
    },
    /// Two batches that do not follow each other cannot be merged into one commit.
    #[error("batch ending at block {last} cannot take a batch starting at block {next}")]
    NotContiguous { last: u64, next: u64 },
    #[error("empty block window {from}..={to}")]
    EmptyWindow { from: u64, to: u64 },
    #[error("token {token} moved under its backfill step (paused, removed or reorged); retrying")]
    TokenMoved { token: String },
    #[error("stored {what} {value:?} is corrupt: {reason}")]
    Corrupt {
        what: &'static str,
        value: String,
        reason: String,
    },
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

pub(super) fn db(what: &'static str) -> impl FnOnce(sqlx::Error) -> ChainStoreError {
    move |source| ChainStoreError::Db { what, source }
}

/// `value` as a Postgres `bigint`.
pub(super) fn bigint(what: &'static str, value: u64) -> Result<i64, ChainStoreError> {
    i64::try_from(value).map_err(|_| ChainStoreError::OutOfRange {
        what,
        value,
        pg_type: "bigint",
    })
}

/// A log index as a Postgres `int`.
fn int(what: &'static str, value: u64) -> Result<i32, ChainStoreError> {
    i32::try_from(value).map_err(|_| ChainStoreError::OutOfRange {
        what,
        value,
        pg_type: "int",
    })
}

pub(super) fn corrupt(what: &'static str, value: &str, reason: impl ToString) -> ChainStoreError {
    ChainStoreError::Corrupt {
        what,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

/// A stored `bigint` that is a block number.
pub(super) fn block_of(what: &'static str, n: i64) -> Result<u64, ChainStoreError> {
    u64::try_from(n).map_err(|e| corrupt(what, &n.to_string(), e))
}

fn hash_of(s: &str) -> Result<B256, ChainStoreError> {
    s.parse().map_err(|e| corrupt("block hash", s, e))
}

/// A stored (block number, block hash) pair.
fn block_ref(what: &'static str, (n, h): (i64, String)) -> Result<Checkpoint, ChainStoreError> {
    Ok(Checkpoint {
        number: block_of(what, n)?,
        hash: hash_of(&h)?,
    })
}

pub(super) fn address_of(what: &'static str, s: &str) -> Result<Address, ChainStoreError> {
    s.parse().map_err(|e| corrupt(what, s, e))
}

pub(super) fn amount_of(what: &'static str, s: &str) -> Result<U256, ChainStoreError> {
    U256::from_str(s).map_err(|e| corrupt(what, s, e))
}

/// The committed position of one chain (also a stored block: number and hash).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    pub number: u64,
    pub hash: B256,
}

/// A contiguous range of blocks ready to commit: its transfers (in chain order), the headers
/// to remember, and the new checkpoint (the last header).
#[derive(Debug, Clone)]
pub(crate) struct Batch {
    pub from_block: u64,
    pub rows: Vec<TransferRow>,
    /// The range's ERC-1155 transfers (one per `TransferSingle`, one per id of a
    /// `TransferBatch`), in chain order.
    pub multi: Vec<MultiTransferRow>,
    /// Logs of the range that were rejected, kept with their reason.
    pub rejected: Vec<RejectedLog>,
    /// Tokens factories created in the range: added to the catalogue with the batch.
    pub created: Vec<CreatedToken>,
    pub headers: Vec<HeaderInfo>,
    pub last: HeaderInfo,
}

impl Batch {
    /// Appends `next`, the batch of the blocks right after this one's (backfill merges ranges
    /// fetched apart into one commit). The merged batch remembers both batches' end headers.
    pub(crate) fn append(&mut self, next: Batch) -> Result<(), ChainStoreError> {
        if next.from_block != self.last.number + 1 {
            return Err(ChainStoreError::NotContiguous {
                last: self.last.number,
                next: next.from_block,
            });
        }
        self.rows.extend(next.rows);
        self.multi.extend(next.multi);
        self.rejected.extend(next.rejected);
        self.created.extend(next.created);
        self.headers.extend(next.headers);
        self.last = next.last;
        Ok(())
    }
}

/// What decides a commit's `finalized_block`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Finality {
    /// The chain's `reorg_depth`: blocks deeper than it are final for the index.
    pub reorg_depth: u64,
    /// The chain's `finalized` block tag, where the chain serves it.
    pub chain_finalized: Option<u64>,
}

/// Token metadata read from the chain.
#[derive(Debug, Clone)]
pub(crate) struct TokenMeta {
    pub address: Address,
    pub standard: TokenStandard,
    pub decimals: Option<i32>,
    pub symbol: Option<String>,
    pub name: Option<String>,
    pub start_block: u64,
}

/// What the index knows of a tracked token (its `chain_tokens` row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexedToken {
    pub standard: TokenStandard,
    pub decimals: Option<i32>,
    pub start_block: u64,
}

/// What [`ChainStore::holders_at`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HoldersWritten {
    /// Holder rows inserted.
    pub inserted: i64,
    /// ERC-20 addresses whose computed balance is negative (0 for ERC-721), and the smallest.
    pub negative: i64,
    pub negative_example: Option<String>,
}

/// The text-format COPY payload of `rows` for `chain_transfers` (columns as in
/// [`COPY_TRANSFERS`]). Text COPY is Postgres' fastest bulk path into one table, and every
/// field here is hex or decimal, so nothing needs escaping.
pub(super) fn transfers_copy(
    chain_id: i64,
    rows: &[TransferRow],
) -> Result<String, ChainStoreError> {
    let mut copy = String::with_capacity(rows.len() * 340);
    for r in rows {
        let id = r
            .token_id
            .map_or_else(|| "\\N".to_string(), |i| i.to_string());
        // Writing to a String cannot fail.
        let _ = writeln!(
            copy,
            "{chain_id}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{id}",
            bigint("block number", r.block_number)?,
            hash_hex(&r.block_hash),
            int("log index", r.log_index)?,
            hash_hex(&r.tx_hash),
            addr_hex(&r.token),
            addr_hex(&r.from),
            addr_hex(&r.to),
            r.value,
        );
    }
    Ok(copy)
}

const COPY_TRANSFERS: &str = "COPY public.chain_transfers (chain_id, block_number, block_hash, \
     log_index, tx_hash, token, from_address, to_address, value, token_id) FROM STDIN";

/// Sends the COPY payload of a batch's transfer rows.
pub(super) async fn copy_transfers(
    conn: &mut PgConnection,
    payload: String,
) -> Result<(), ChainStoreError> {
    let mut copy_in = conn
        .copy_in_raw(COPY_TRANSFERS)
        .await
        .map_err(db("start transfers copy"))?;
    copy_in
        .send(payload.into_bytes())
        .await
        .map_err(db("copy transfers"))?;
    copy_in
        .finish()
        .await
        .map_err(db("finish transfers copy"))?;
    Ok(())
}

/// The balance upsert's UNNEST columns: token, holder, signed delta.
type DeltaColumns = (Vec<String>, Vec<String>, Vec<String>);

fn delta_columns(deltas: &[BalanceDelta]) -> DeltaColumns {
    let mut cols: DeltaColumns = (
        Vec::with_capacity(deltas.len()),
        Vec::with_capacity(deltas.len()),
        Vec::with_capacity(deltas.len()),
    );
    for d in deltas {
        cols.0.push(addr_hex(&d.token));
        cols.1.push(addr_hex(&d.holder));
        cols.2.push(d.delta.to_string());
    }
    cols
}

/// The NFT statements' UNNEST columns: owned ids (token, id, owner, block) and burned ids
/// (token, id).
#[derive(Debug, Default, PartialEq, Eq)]
struct OwnerColumns {
    up_token: Vec<String>,
    up_id: Vec<String>,
    up_owner: Vec<String>,
    up_block: Vec<i64>,
    burned_token: Vec<String>,
    burned_id: Vec<String>,
}

fn owner_columns(owners: &[OwnerChange]) -> Result<OwnerColumns, ChainStoreError> {
    let mut c = OwnerColumns::default();
    for o in owners {
        match o.owner {
            None => {
                c.burned_token.push(addr_hex(&o.token));
                c.burned_id.push(o.token_id.to_string());
            }
            Some(owner) => {
                c.up_token.push(addr_hex(&o.token));
                c.up_id.push(o.token_id.to_string());
                c.up_owner.push(addr_hex(&owner));
                c.up_block.push(bigint("block number", o.block)?);
            }
        }
    }
    Ok(c)
}

/// The chain tables of one chain. Cheap to copy; holds no connection: each method takes the
/// connection (or pool) to run on, so the indexer writes on its lease connection and own-index
/// snapshots read inside their own transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainStore {
    /// The chain id as the tables store it.
    id: i64,
}

/// A stored `chain_tokens.standard`.
pub(super) fn standard_of(s: &str) -> Result<TokenStandard, ChainStoreError> {
    match s {
        "erc20" => Ok(TokenStandard::Erc20),
        "erc721" => Ok(TokenStandard::Erc721),
        "erc1155" => Ok(TokenStandard::Erc1155),
        other => Err(corrupt(
            "token standard",
            other,
            "not erc20, erc721 or erc1155",
        )),
    }
}

impl ChainStore {
    /// The chain id as the tables store it.
    pub(super) fn id(&self) -> i64 {
        self.id
    }

    /// The store of `chain_id`; fails when the id does not fit the tables' `bigint`.
    pub fn new(chain_id: u64) -> Result<ChainStore, ChainStoreError> {
        Ok(ChainStore {
            id: bigint("chain id", chain_id)?,
        })
    }

    /// The committed checkpoint, if any.
    pub async fn checkpoint(
        &self,
        exec: impl PgExecutor<'_>,
    ) -> Result<Option<Checkpoint>, ChainStoreError> {
        let row: Option<(i64, String)> = sqlx::query_as(
            "SELECT block_number, block_hash FROM public.chain_checkpoints WHERE chain_id = $1",
        )
        .bind(self.id)
        .fetch_optional(exec)
        .await
        .map_err(db("read checkpoint"))?;
        row.map(|r| block_ref("checkpoint block", r)).transpose()
    }

    /// The highest committed block considered final (`chain_checkpoints.finalized_block`);
    /// `None` before the first commit.
    pub(crate) async fn finalized_block(
        &self,
        exec: impl PgExecutor<'_>,
    ) -> Result<Option<u64>, ChainStoreError> {
        let n: Option<i64> = sqlx::query_scalar(
            "SELECT finalized_block FROM public.chain_checkpoints WHERE chain_id = $1",
        )
        .bind(self.id)
        .fetch_optional(exec)
        .await
        .map_err(db("read finalized block"))?;
        n.map(|n| block_of("finalized block", n)).transpose()
    }

    /// Remembered blocks below `below`, newest first, at most `limit`.
    pub(crate) async fn recent_blocks(
        &self,
        exec: impl PgExecutor<'_>,
        below: u64,
        limit: u64,
    ) -> Result<Vec<Checkpoint>, ChainStoreError> {
        let rows: Vec<(i64, String)> = sqlx::query_as(
            "SELECT number, hash FROM public.chain_blocks WHERE chain_id = $1 AND number < $2 \
             ORDER BY number DESC LIMIT $3",
        )
        .bind(self.id)
        .bind(bigint("block number", below)?)
        .bind(bigint("block count", limit)?)
        .fetch_all(exec)
        .await
        .map_err(db("read recent blocks"))?;
        rows.into_iter()
            .map(|r| block_ref("remembered block", r))
            .collect()
    }

    /// Seeds the catalogue with the configured tokens (metadata from the chain; NULL where the
    /// contract has none). A token new to the catalogue arrives `pending`, so the leader gives
    /// it its own backfill when the chain is already indexed; a known one keeps its state (a
    /// removed one stays removed until it is added again).
    pub(crate) async fn upsert_tokens(
        &self,
        conn: &mut PgConnection,
        tokens: &[TokenMeta],
    ) -> Result<(), ChainStoreError> {
        for t in tokens {
            sqlx::query(
                "INSERT INTO public.chain_tokens (chain_id, address, standard, decimals, symbol, name, start_block, status) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending') \
                 ON CONFLICT (chain_id, address) DO UPDATE SET \
                 decimals = EXCLUDED.decimals, symbol = EXCLUDED.symbol, name = EXCLUDED.name, \
                 standard = CASE WHEN public.chain_tokens.status IN ('live', 'pending') \
                            THEN EXCLUDED.standard ELSE public.chain_tokens.standard END, \
                 start_block = CASE WHEN public.chain_tokens.status IN ('live', 'pending') \
                            THEN EXCLUDED.start_block ELSE public.chain_tokens.start_block END",
            )
            .bind(self.id)
            .bind(addr_hex(&t.address))
            .bind(t.standard.as_str())
            .bind(t.decimals)
            .bind(t.symbol.as_deref())
            .bind(t.name.as_deref())
            .bind(bigint("start block", t.start_block)?)
            .execute(&mut *conn)
            .await
            .map_err(db("record tracked token"))?;
        }
        Ok(())
    }

    /// The `chain_tokens` row of `token`; `None` when it is not indexed.
    pub(crate) async fn indexed_token(
        &self,
        exec: impl PgExecutor<'_>,
        token: Address,
    ) -> Result<Option<IndexedToken>, ChainStoreError> {
        let row: Option<(String, Option<i32>, i64)> = sqlx::query_as(
            "SELECT standard, decimals, start_block FROM public.chain_tokens \
             WHERE chain_id = $1 AND address = $2",
        )
        .bind(self.id)
        .bind(addr_hex(&token))
        .fetch_optional(exec)
        .await
        .map_err(db("read tracked token"))?;
        row.map(|(standard, decimals, start)| {
            let standard = standard_of(&standard)?;
            Ok(IndexedToken {
                standard,
                decimals,
                start_block: block_of("start block", start)?,
            })
        })
        .transpose()
    }

    /// Every stored ERC-20 balance of `token` (zero balances included: rows are kept).
    pub(crate) async fn holder_balances(
        &self,
        exec: impl PgExecutor<'_>,
        token: Address,
    ) -> Result<Vec<(Address, U256)>, ChainStoreError> {
        let sql = "SELECT holder, balance::text FROM public.token_balances \
                   WHERE chain_id = $1 AND token = $2";
        self.holdings(exec, token, sql, "read balances")
            .await?
            .into_iter()
            .map(|(h, b)| Ok((address_of("holder", &h)?, amount_of("balance", &b)?)))
            .collect()
    }

    /// Every stored owner of an ERC-721 `token`: (token id, owner).
    pub(crate) async fn nft_owners(
        &self,
        exec: impl PgExecutor<'_>,
        token: Address,
    ) -> Result<Vec<(U256, Address)>, ChainStoreError> {
        let sql = "SELECT token_id::text, owner FROM public.nft_owners \
                   WHERE chain_id = $1 AND token = $2";
        self.holdings(exec, token, sql, "read NFT owners")
            .await?
            .into_iter()
            .map(|(i, o)| Ok((amount_of("token id", &i)?, address_of("owner", &o)?)))
            .collect()
    }

    /// The two text columns of `sql` (a read of one token's holdings, `$1` chain, `$2` token).
    async fn holdings(
        &self,
        exec: impl PgExecutor<'_>,
        token: Address,
        sql: &'static str,
        what: &'static str,
    ) -> Result<Vec<(String, String)>, ChainStoreError> {
        sqlx::query_as(sql)
            .bind(self.id)
            .bind(addr_hex(&token))
            .fetch_all(exec)
            .await
            .map_err(db(what))
    }

    /// Writes the holders of `token` at `block`, computed from `chain_transfers`, into
    /// snapshot `snapshot_id`'s `snapshot_holders` rows (own-index snapshots).
    ///
    /// This statement also writes a snapshots table, yet it lives here: the chain store owns
    /// every query over chain tables, and this one must stay a single set-based
    /// `INSERT … SELECT` (millions of transfers never travel to the worker). The caller
    /// ([`crate::snapshots::own_index`]) owns the snapshot itself: it runs this inside its
    /// transaction and rolls back when `negative` is not 0.
    ///
    /// - ERC-20: balance = Σ incoming − Σ outgoing per address over transfers up to `block`,
    ///   excluding the zero address, keeping positive balances; negative ones are counted.
    /// - ERC-721: the owner of each id is the `to_address` of its last transfer up to `block`
    ///   (burns go to the zero address and drop out); a holder's balance is its id count.
    pub(crate) async fn holders_at(
        &self,
        conn: &mut PgConnection,
        snapshot_id: Uuid,
        token: Address,
        standard: TokenStandard,
        block: u64,
    ) -> Result<HoldersWritten, ChainStoreError> {
        let sql = match standard {
            TokenStandard::Erc1155 => {
                return Err(ChainStoreError::Unsupported {
                    token: addr_hex(&token),
                    standard: standard.as_str(),
                    what: "a holder snapshot without a token id",
                });
            }
            TokenStandard::Erc721 => {
                "WITH last AS ( \
                   SELECT DISTINCT ON (token_id) token_id, to_address AS owner \
                   FROM public.chain_transfers \
                   WHERE chain_id = $2 AND token = $3 AND block_number <= $4 AND token_id IS NOT NULL \
                   ORDER BY token_id, block_number DESC, log_index DESC \
                 ), ins AS ( \
                   INSERT INTO public.snapshot_holders (snapshot_id, holder, balance) \
                   SELECT $1, owner, count(*) FROM last WHERE owner <> $5 GROUP BY owner \
                   RETURNING 1 \
                 ) SELECT (SELECT count(*) FROM ins), 0::bigint, NULL::text"
            }
            TokenStandard::Erc20 => {
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
                          (SELECT min(holder) FROM bal WHERE balance < 0)"
            }
        };
        let (inserted, negative, negative_example): (i64, i64, Option<String>) =
            sqlx::query_as(sql)
                .bind(snapshot_id)
                .bind(self.id)
                .bind(addr_hex(&token))
                .bind(bigint("block number", block)?)
                .bind(ZERO_ADDRESS)
                .fetch_one(&mut *conn)
                .await
                .map_err(db("compute holders from the index"))?;
        Ok(HoldersWritten {
            inserted,
            negative,
            negative_example,
        })
    }

    /// Commits one batch in one transaction and returns the holders it changed. Fails without
    /// writing anything if the stored checkpoint is not `expected_checkpoint` (the block before
    /// `batch.from_block`).
    ///
    /// Net (pure, [`netting::net`]) → build the COPY payload (pure) → run the statements: the
    /// checkpoint lock, one COPY, one balance upsert, two NFT statements, the block hashes, the
    /// rejected logs, the checkpoint, the prune.
    pub(crate) async fn commit_batch(
        &self,
        conn: &mut PgConnection,
        finality: Finality,
        expected_checkpoint: Option<u64>,
        batch: &Batch,
    ) -> Result<Changes, ChainStoreError> {
        let mut netted = netting::net(&batch.rows, batch.last.number)?;
        let multi = netting::net_multi(&batch.multi, &mut netted.changes)?;
        let copy = transfers_copy(self.id, &batch.rows)?;
        let mut tx = conn.begin().await.map_err(db("begin batch"))?;
        self.lock_checkpoint(&mut tx, expected_checkpoint).await?;
        if !batch.rows.is_empty() {
            copy_transfers(&mut tx, copy).await?;
        }
        self.write_batch_state(&mut tx, finality, batch, &netted, &multi)
            .await?;
        tx.commit().await.map_err(db("commit batch"))?;
        Ok(netted.changes)
    }

    /// Commits one backfill batch (every block of it below the reorg window) on more than one
    /// Postgres backend, and returns the holders it changed. Far behind the head one batch's
    /// commit is the indexer's bottleneck, and most of it is one backend inserting the
    /// transfer rows into `chain_transfers` and its three indexes while the machine's other
    /// cores idle; here each of `writers` inserts a contiguous part of the rows in a
    /// transaction of its own, at the same time as `conn`'s transaction writes the balances,
    /// the block hashes and the checkpoint. The writers commit first, the checkpoint last.
    ///
    /// What a crash (or any failure) between those commits leaves: transfer rows above the
    /// stored checkpoint, which no reader looks at (every history read is bounded by the
    /// checkpoint) and which [`ChainStore::drop_transfers_above`] deletes when a leader starts.
    /// Until then they cannot be counted twice either: writing any of them again fails on
    /// the primary key, which fails the pass and restarts it through that deletion.
    pub(crate) async fn commit_backfill_batch(
        &self,
        conn: &mut PgConnection,
        writers: &mut [PgConnection],
        finality: Finality,
        expected_checkpoint: u64,
        batch: &Batch,
    ) -> Result<Changes, ChainStoreError> {
        let mut netted = netting::net(&batch.rows, batch.last.number)?;
        let multi = netting::net_multi(&batch.multi, &mut netted.changes)?;
        let part = batch.rows.len().div_ceil(writers.len().max(1)).max(1);
        let copies = batch
            .rows
            .chunks(part)
            .map(|rows| transfers_copy(self.id, rows))
            .collect::<Result<Vec<_>, _>>()?;
        let mut tx = conn.begin().await.map_err(db("begin batch"))?;
        self.lock_checkpoint(&mut tx, Some(expected_checkpoint))
            .await?;
        let transfers = futures::future::try_join_all(writers.iter_mut().zip(copies).map(
            |(writer, copy)| async move {
                let mut part = writer.begin().await.map_err(db("begin transfers part"))?;
                copy_transfers(&mut part, copy).await?;
                part.commit().await.map_err(db("commit transfers part"))
            },
        ));
        let state = self.write_batch_state(&mut tx, finality, batch, &netted, &multi);
        let (transfers, state) = tokio::join!(transfers, state);
        transfers?;
        state?;
        tx.commit().await.map_err(db("commit batch"))?;
        Ok(netted.changes)
    }

    /// Deletes the transfer rows above the checkpoint (`None`: nothing is indexed, so nothing
    /// is deleted): those that a [`ChainStore::commit_backfill_batch`] interrupted between its
    /// commits left behind. Every other writer stays at or below the checkpoint (a token's
    /// own backfill stops where it joins it). Returns how many rows it deleted.
    pub(crate) async fn drop_transfers_above(
        &self,
        conn: &mut PgConnection,
        checkpoint: Option<Checkpoint>,
    ) -> Result<u64, ChainStoreError> {
        let Some(cp) = checkpoint else { return Ok(0) };
        let done = sqlx::query(
            "DELETE FROM public.chain_transfers WHERE chain_id = $1 AND block_number > $2",
        )
        .bind(self.id)
        .bind(bigint("checkpoint block", cp.number)?)
        .execute(&mut *conn)
        .await
        .map_err(db("drop transfers above the checkpoint"))?;
        Ok(done.rows_affected())
    }

    /// Everything of a batch but its transfer rows, in the batch's transaction: balances,
    /// NFT owners, ERC-1155 balances, block hashes, rejected logs, factory creations and the
    /// checkpoint.
    async fn write_batch_state(
        &self,
        conn: &mut PgConnection,
        finality: Finality,
        batch: &Batch,
        netted: &netting::Netted,
        multi: &netting::MultiNetted,
    ) -> Result<(), ChainStoreError> {
        if !batch.rows.is_empty() {
            self.apply_deltas(conn, &netted.deltas, batch).await?;
            self.apply_owners(conn, &netted.owners).await?;
        }
        self.apply_multi(conn, &batch.multi, multi, batch.last.number)
            .await?;
        self.remember_blocks(conn, &batch.headers).await?;
        self.keep_rejected(conn, &batch.rejected).await?;
        self.add_created(conn, &batch.created).await?;
        self.advance_checkpoint(conn, &batch.last, finality).await
    }

    /// Locks the checkpoint row for the batch and checks that it is where the indexer thinks.
    async fn lock_checkpoint(
        &self,
        conn: &mut PgConnection,
        expected: Option<u64>,
    ) -> Result<(), ChainStoreError> {
        let found: Option<i64> = sqlx::query_scalar(
            "SELECT block_number FROM public.chain_checkpoints WHERE chain_id = $1 FOR UPDATE",
        )
        .bind(self.id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(db("lock checkpoint"))?;
        let found = found.map(|n| block_of("checkpoint block", n)).transpose()?;
        if found != expected {
            return Err(ChainStoreError::CheckpointMismatch { expected, found });
        }
        Ok(())
    }

    /// Adds the netted deltas to `token_balances`; fails (the caller then drops the
    /// transaction, rolling the batch back) when a balance would go below zero.
    pub(super) async fn apply_deltas(
        &self,
        conn: &mut PgConnection,
        deltas: &[BalanceDelta],
        batch: &Batch,
    ) -> Result<(), ChainStoreError> {
        if deltas.is_empty() {
            return Ok(());
        }
        let (tokens, holders, values) = delta_columns(deltas);
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
        .bind(self.id)
        .bind(&tokens)
        .bind(&holders)
        .bind(&values)
        .bind(bigint("block number", batch.last.number)?)
        .fetch_optional(&mut *conn)
        .await
        .map_err(db("apply balance deltas"))?;
        match negative {
            None => Ok(()),
            Some((token, holder)) => Err(ChainStoreError::NegativeBalance {
                block: netting::first_debit_block(&batch.rows, &token, &holder)
                    .unwrap_or(batch.last.number),
                token,
                holder,
            }),
        }
    }

    /// Moves ERC-721 ids to their final owner of the batch and deletes burned ones.
    pub(super) async fn apply_owners(
        &self,
        conn: &mut PgConnection,
        owners: &[OwnerChange],
    ) -> Result<(), ChainStoreError> {
        if owners.is_empty() {
            return Ok(());
        }
        let c = owner_columns(owners)?;
        sqlx::query(
            "INSERT INTO public.nft_owners (chain_id, token, token_id, owner, updated_block) \
             SELECT $1, t, i::numeric, o, b FROM UNNEST($2::text[], $3::text[], $4::text[], $5::int8[]) AS u(t, i, o, b) \
             ON CONFLICT (chain_id, token, token_id) DO UPDATE \
             SET owner = EXCLUDED.owner, updated_block = EXCLUDED.updated_block",
        )
        .bind(self.id)
        .bind(&c.up_token)
        .bind(&c.up_id)
        .bind(&c.up_owner)
        .bind(&c.up_block)
        .execute(&mut *conn)
        .await
        .map_err(db("upsert NFT owners"))?;
        sqlx::query(
            "DELETE FROM public.nft_owners n USING UNNEST($2::text[], $3::text[]) AS u(t, i) \
             WHERE n.chain_id = $1 AND n.token = u.t AND n.token_id = u.i::numeric",
        )
        .bind(self.id)
        .bind(&c.burned_token)
        .bind(&c.burned_id)
        .execute(&mut *conn)
        .await
        .map_err(db("delete burned NFTs"))?;
        Ok(())
    }

    /// Remembers the batch's block hashes (the reorg window and batch ends).
    async fn remember_blocks(
        &self,
        conn: &mut PgConnection,
        headers: &[HeaderInfo],
    ) -> Result<(), ChainStoreError> {
        let mut numbers = Vec::with_capacity(headers.len());
        let mut hashes = Vec::with_capacity(headers.len());
        let mut parents = Vec::with_capacity(headers.len());
        for h in headers {
            numbers.push(bigint("block number", h.number)?);
            hashes.push(hash_hex(&h.hash));
            parents.push(hash_hex(&h.parent_hash));
        }
        sqlx::query(
            "INSERT INTO public.chain_blocks (chain_id, number, hash, parent_hash) \
             SELECT $1, u.* FROM UNNEST($2::int8[], $3::text[], $4::text[]) AS u \
             ON CONFLICT (chain_id, number) DO UPDATE SET hash = EXCLUDED.hash, parent_hash = EXCLUDED.parent_hash",
        )
        .bind(self.id)
        .bind(&numbers)
        .bind(&hashes)
        .bind(&parents)
        .execute(&mut *conn)
        .await
        .map_err(db("record block hashes"))?;
        Ok(())
    }

    /// Keeps the batch's rejected logs with their reason.
    pub(super) async fn keep_rejected(
        &self,
        conn: &mut PgConnection,
        rejected: &[RejectedLog],
    ) -> Result<(), ChainStoreError> {
        // Rare by nature, so one statement per log keeps the per-row topics array simple.
        for r in rejected {
            let topics: Vec<String> = r.topics.iter().map(hash_hex).collect();
            sqlx::query(
                "INSERT INTO public.chain_rejected_logs (chain_id, block_number, block_hash, log_index, \
                 tx_hash, token, topics, data, reason) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (chain_id, block_hash, log_index) DO UPDATE SET reason = EXCLUDED.reason",
            )
            .bind(self.id)
            .bind(bigint("block number", r.block_number)?)
            .bind(hash_hex(&r.block_hash))
            .bind(int("log index", r.log_index)?)
            .bind(hash_hex(&r.tx_hash))
            .bind(addr_hex(&r.token))
            .bind(&topics)
            .bind(r.data.to_string())
            .bind(&r.reason)
            .execute(&mut *conn)
            .await
            .map_err(db("keep rejected log"))?;
        }
        Ok(())
    }

    /// Adds the tokens factories created to the catalogue (`pending`, from their creation
    /// block, origin `factory`); a token already tracked is left as it is.
    async fn add_created(
        &self,
        conn: &mut PgConnection,
        created: &[CreatedToken],
    ) -> Result<(), ChainStoreError> {
        for c in created {
            sqlx::query(
                "INSERT INTO public.chain_tokens (chain_id, address, standard, start_block, status, origin) \
                 VALUES ($1, $2, $3, $4, 'pending', 'factory') ON CONFLICT (chain_id, address) DO NOTHING",
            )
            .bind(self.id)
            .bind(addr_hex(&c.address))
            .bind(c.standard.as_str())
            .bind(bigint("block number", c.block)?)
            .execute(&mut *conn)
            .await
            .map_err(db("add a factory-created token"))?;
        }
        Ok(())
    }

    /// Moves the checkpoint to `last` and forgets block hashes older than twice the reorg
    /// window (batch ends inside it stay). `finalized_block` is the highest committed block
    /// that is final by the chain's own `finalized` tag or lies deeper than the reorg window
    /// (which the index never undoes by itself).
    async fn advance_checkpoint(
        &self,
        conn: &mut PgConnection,
        last: &HeaderInfo,
        finality: Finality,
    ) -> Result<(), ChainStoreError> {
        let number = bigint("block number", last.number)?;
        let depth = bigint("reorg depth", finality.reorg_depth)?;
        let chain_final = finality
            .chain_finalized
            .map(|n| bigint("finalized block", n))
            .transpose()?;
        sqlx::query(
            "INSERT INTO public.chain_checkpoints (chain_id, block_number, block_hash, finalized_block, updated_at) \
             VALUES ($1, $2, $3, GREATEST($2 - $4, LEAST($2, $5), 0), pg_catalog.now()) \
             ON CONFLICT (chain_id) DO UPDATE SET block_number = EXCLUDED.block_number, \
             block_hash = EXCLUDED.block_hash, finalized_block = EXCLUDED.finalized_block, \
             updated_at = EXCLUDED.updated_at",
        )
        .bind(self.id)
        .bind(number)
        .bind(hash_hex(&last.hash))
        .bind(depth)
        .bind(chain_final)
        .execute(&mut *conn)
        .await
        .map_err(db("advance checkpoint"))?;
        sqlx::query("DELETE FROM public.chain_blocks WHERE chain_id = $1 AND number < $2")
            .bind(self.id)
            .bind(number - 2 * depth - 2)
            .execute(&mut *conn)
            .await
            .map_err(db("prune block hashes"))?;
        Ok(())
    }

    /// Undoes every block from `fork` on, in one transaction: ERC-20 and ERC-1155 balances (and
    /// ERC-1155 supplies) lose the dropped transfers' deltas, each ERC-721 id goes back to the `from` of its earliest dropped
    /// transfer (ids minted in dropped blocks disappear), dropped transfers and block hashes are
    /// deleted and the checkpoint is rewound to `new_checkpoint` (the last block still on the
    /// chain; `None` when nothing indexed survives).
    pub(crate) async fn undo_from(
        &self,
        conn: &mut PgConnection,
        tokens: &[Address],
        fork: u64,
        new_checkpoint: Option<Checkpoint>,
        reorg_depth: u64,
    ) -> Result<Changes, ChainStoreError> {
        let tokens: Vec<String> = tokens.iter().map(addr_hex).collect();
        let fork_i = bigint("fork block", fork)?;
        let back_to = new_checkpoint.map_or(fork.saturating_sub(1), |c| c.number);
        let cp = bigint("block number", back_to)?;
        let mut tx = conn.begin().await.map_err(db("begin reorg undo"))?;

        let mut changes = Changes::at(back_to);
        changes.reorg = true;
        let rows = sqlx::query(
            "SELECT DISTINCT token, from_address, to_address FROM public.chain_transfers \
             WHERE chain_id = $1 AND token = ANY($2) AND block_number >= $3 AND value <> 0",
        )
        .bind(self.id)
        .bind(&tokens)
        .bind(fork_i)
        .fetch_all(&mut *tx)
        .await
        .map_err(db("read dropped transfers"))?;
        for r in rows {
            let (t, f, to): (String, String, String) = (r.get(0), r.get(1), r.get(2));
            changes.add(
                address_of("token", &t)?,
                address_of("from address", &f)?,
                address_of("to address", &to)?,
            );
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
        .bind(self.id)
        .bind(&tokens)
        .bind(fork_i)
        .bind(cp)
        .bind(ZERO_ADDRESS)
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
        .bind(self.id)
        .bind(&tokens)
        .bind(fork_i)
        .bind(cp)
        .bind(ZERO_ADDRESS)
        .execute(&mut *tx)
        .await
        .map_err(db("restore NFT owners"))?;
        self.undo_multi(&mut tx, &tokens, fork_i, cp, &mut changes)
            .await?;

        sqlx::query(
            "DELETE FROM public.chain_transfers WHERE chain_id = $1 AND token = ANY($2) AND block_number >= $3",
        )
        .bind(self.id)
        .bind(&tokens)
        .bind(fork_i)
        .execute(&mut *tx)
        .await
        .map_err(db("delete dropped transfers"))?;
        sqlx::query(
            "DELETE FROM public.chain_rejected_logs WHERE chain_id = $1 AND block_number >= $2",
        )
        .bind(self.id)
        .bind(fork_i)
        .execute(&mut *tx)
        .await
        .map_err(db("delete dropped rejected logs"))?;
        sqlx::query("DELETE FROM public.chain_blocks WHERE chain_id = $1 AND number >= $2")
            .bind(self.id)
            .bind(fork_i)
            .execute(&mut *tx)
            .await
            .map_err(db("delete dropped block hashes"))?;
        // Tokens a factory created in a dropped block were never created.
        sqlx::query(
            "WITH gone AS ( \
               DELETE FROM public.chain_tokens WHERE chain_id = $1 AND origin = 'factory' \
                  AND start_block >= $2 RETURNING address), \
             balances AS ( \
               DELETE FROM public.token_balances b USING gone WHERE b.chain_id = $1 AND b.token = gone.address), \
             multi AS ( \
               DELETE FROM public.chain_erc1155_balances b USING gone WHERE b.chain_id = $1 AND b.token = gone.address), \
             supply AS ( \
               DELETE FROM public.chain_erc1155_supply s USING gone WHERE s.chain_id = $1 AND s.token = gone.address) \
             DELETE FROM public.nft_owners n USING gone WHERE n.chain_id = $1 AND n.token = gone.address",
        )
        .bind(self.id)
        .bind(fork_i)
        .execute(&mut *tx)
        .await
        .map_err(db("forget dropped factory tokens"))?;
        // Tokens that do not move with the chain (own backfill, paused, removed with rows
        // kept) lost their data of the dropped blocks too: their progress rewinds with it.
        sqlx::query(
            "UPDATE public.chain_tokens SET updated_at = pg_catalog.now(), \
                    indexed_to = CASE WHEN $2 - 1 < start_block THEN NULL ELSE $2 - 1 END \
              WHERE chain_id = $1 AND indexed_to >= $2",
        )
        .bind(self.id)
        .bind(fork_i)
        .execute(&mut *tx)
        .await
        .map_err(db("rewind token backfills"))?;
        match new_checkpoint {
            Some(c) => {
                sqlx::query(
                    "UPDATE public.chain_checkpoints SET block_number = $2, block_hash = $3, \
                     finalized_block = LEAST(finalized_block, GREATEST($2 - $4, 0)), \
                     updated_at = pg_catalog.now() WHERE chain_id = $1",
                )
                .bind(self.id)
                .bind(cp)
                .bind(hash_hex(&c.hash))
                .bind(bigint("reorg depth", reorg_depth)?)
                .execute(&mut *tx)
                .await
                .map_err(db("rewind checkpoint"))?;
            }
            None => {
                sqlx::query("DELETE FROM public.chain_checkpoints WHERE chain_id = $1")
                    .bind(self.id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db("reset checkpoint"))?;
            }
        }

        tx.commit().await.map_err(db("commit reorg undo"))?;
        Ok(changes)
    }

    /// The recorded stop of this chain's indexer (see `chain_indexer_faults`), if any.
    pub(crate) async fn fault(
        &self,
        exec: impl PgExecutor<'_>,
    ) -> Result<Option<String>, ChainStoreError> {
        sqlx::query_scalar("SELECT reason FROM public.chain_indexer_faults WHERE chain_id = $1")
            .bind(self.id)
            .fetch_optional(exec)
            .await
            .map_err(db("read indexer fault"))
    }

    /// Records that this chain's indexer stopped and why; every replica then stays off it.
    pub(crate) async fn record_fault(
        &self,
        exec: impl PgExecutor<'_>,
        at_block: u64,
        reason: &str,
    ) -> Result<(), ChainStoreError> {
        sqlx::query(
            "INSERT INTO public.chain_indexer_faults (chain_id, reason, at_block) VALUES ($1, $2, $3) \
             ON CONFLICT (chain_id) DO UPDATE SET reason = EXCLUDED.reason, at_block = EXCLUDED.at_block, \
             detected_at = pg_catalog.now()",
        )
        .bind(self.id)
        .bind(reason)
        .bind(bigint("block number", at_block)?)
        .execute(exec)
        .await
        .map_err(db("record indexer fault"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use alloy::primitives::{Address, B256, U256};

    use super::*;
    use crate::chain::netting::Delta;

    #[test]
    fn the_zero_address_is_the_stored_hex_of_address_zero() {
        assert_eq!(addr_hex(&Address::ZERO), ZERO_ADDRESS);
    }

    #[test]
    fn copy_rows_follow_the_column_list() {
        let row = TransferRow {
            block_number: 7,
            block_hash: B256::with_last_byte(1),
            log_index: 3,
            tx_hash: B256::with_last_byte(2),
            token: Address::with_last_byte(9),
            from: Address::ZERO,
            to: Address::with_last_byte(4),
            value: U256::from(1000u64),
            token_id: None,
        };
        let nft = TransferRow {
            token_id: Some(U256::from(5u64)),
            value: U256::from(1u64),
            ..row.clone()
        };
        let copy = transfers_copy(1514, &[row.clone(), nft]).unwrap();
        let lines: Vec<Vec<&str>> = copy.lines().map(|l| l.split('\t').collect()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[0],
            vec![
                "1514",
                "7",
                hash_hex(&row.block_hash).as_str(),
                "3",
                hash_hex(&row.tx_hash).as_str(),
                addr_hex(&row.token).as_str(),
                ZERO_ADDRESS,
                addr_hex(&row.to).as_str(),
                "1000",
                "\\N",
            ]
        );
        assert_eq!(lines[1][8..], ["1", "5"]);
        assert_eq!(
            COPY_TRANSFERS
                .split(['(', ')'])
                .nth(1)
                .map(|c| c.split(',').count()),
            Some(lines[0].len())
        );
    }

    /// A batch of `from..=to` with one transfer in its first block.
    fn range_batch(from: u64, to: u64) -> Batch {
        let header = |n: u64| HeaderInfo {
            number: n,
            hash: B256::with_last_byte(n as u8),
            parent_hash: B256::with_last_byte(n.wrapping_sub(1) as u8),
        };
        Batch {
            from_block: from,
            rows: vec![TransferRow {
                block_number: from,
                block_hash: header(from).hash,
                log_index: 0,
                tx_hash: B256::ZERO,
                token: Address::with_last_byte(9),
                from: Address::ZERO,
                to: Address::with_last_byte(1),
                value: U256::from(from),
                token_id: None,
            }],
            multi: Vec::new(),
            rejected: Vec::new(),
            created: Vec::new(),
            headers: vec![header(to)],
            last: header(to),
        }
    }

    #[test]
    fn merged_batches_keep_chain_order_and_every_batch_end() {
        let mut b = range_batch(10, 19);
        b.append(range_batch(20, 29)).unwrap();
        b.append(range_batch(30, 30)).unwrap();
        assert_eq!(b.from_block, 10);
        assert_eq!(b.last.number, 30);
        let blocks: Vec<u64> = b.rows.iter().map(|r| r.block_number).collect();
        assert_eq!(blocks, vec![10, 20, 30]);
        let ends: Vec<u64> = b.headers.iter().map(|h| h.number).collect();
        assert_eq!(ends, vec![19, 29, 30]);
        let e = b.append(range_batch(32, 40)).unwrap_err();
        assert!(
            matches!(e, ChainStoreError::NotContiguous { last: 30, next: 32 }),
            "{e}"
        );
        assert_eq!(b.last.number, 30, "a refused batch changes nothing");
    }

    #[test]
    fn values_out_of_postgres_range_are_refused_by_name() {
        let row = TransferRow {
            block_number: u64::MAX,
            block_hash: B256::ZERO,
            log_index: 0,
            tx_hash: B256::ZERO,
            token: Address::ZERO,
            from: Address::ZERO,
            to: Address::ZERO,
            value: U256::ZERO,
            token_id: None,
        };
        let e = transfers_copy(1, &[row]).unwrap_err();
        assert!(
            matches!(
                e,
                ChainStoreError::OutOfRange {
                    what: "block number",
                    pg_type: "bigint",
                    ..
                }
            ),
            "{e}"
        );
        assert!(ChainStore::new(u64::MAX).is_err());
    }

    #[test]
    fn statement_columns_are_hex_and_signed_decimal() {
        let (t, h) = (Address::with_last_byte(9), Address::with_last_byte(1));
        let cols = delta_columns(&[BalanceDelta {
            token: t,
            holder: h,
            delta: Delta::Debit(U256::from(5u64)),
        }]);
        assert_eq!(
            cols,
            (
                vec![addr_hex(&t)],
                vec![addr_hex(&h)],
                vec!["-5".to_string()]
            )
        );
        let owners = owner_columns(&[
            OwnerChange {
                token: t,
                token_id: U256::from(1u64),
                owner: Some(h),
                block: 4,
            },
            OwnerChange {
                token: t,
                token_id: U256::from(2u64),
                owner: None,
                block: 4,
            },
        ])
        .unwrap();
        assert_eq!(
            owners,
            OwnerColumns {
                up_token: vec![addr_hex(&t)],
                up_id: vec!["1".into()],
                up_owner: vec![addr_hex(&h)],
                up_block: vec![4],
                burned_token: vec![addr_hex(&t)],
                burned_id: vec!["2".into()],
            }
        );
    }
}
