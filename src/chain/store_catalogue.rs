//! [`ChainStore`]'s statements over the tracked-token catalogue (`chain_tokens` status
//! columns, migration `20261201095100_chain_token_catalogue.sql`): the requests of operators
//! (through `public.chain_token_request`), the leader's transitions, and the commit of one
//! step of a token's own backfill. Each write is one transaction that first locks the chain's
//! checkpoint row, so it is ordered with the chain's batch commits and reorg undos.

use alloy::primitives::{Address, B256};
use sqlx::{Connection, PgConnection, PgExecutor};

use super::catalogue::{CatalogueToken, Requested, TokenStatus, Transition};
use super::decode::{addr_hex, hash_hex};
use super::netting::{self, Changes};
use super::store::{
    Batch, ChainStore, ChainStoreError, Checkpoint, address_of, bigint, block_of, copy_transfers,
    corrupt, db, standard_of, transfers_copy,
};
use crate::config::TokenStandard;

/// A catalogue change asked of [`ChainStore::request_token`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRequest {
    Add {
        standard: TokenStandard,
        start_block: u64,
    },
    Pause,
    Resume,
    Remove {
        keep_rows: bool,
    },
}

impl TokenRequest {
    fn action(self) -> &'static str {
        match self {
            TokenRequest::Add { .. } => "add",
            TokenRequest::Pause => "pause",
            TokenRequest::Resume => "resume",
            TokenRequest::Remove { .. } => "remove",
        }
    }
}

type CatalogueRow = (
    String,
    String,
    i64,
    String,
    String,
    bool,
    Option<i64>,
    i64,
    Option<f64>,
    Option<String>,
    Option<String>,
);

impl ChainStore {
    /// Records an operator's request through `public.chain_token_request` (the one door the
    /// CLI, the `index_token` job and `service_role` share); returns the requested state.
    pub async fn request_token(
        &self,
        exec: impl PgExecutor<'_>,
        token: Address,
        request: TokenRequest,
    ) -> Result<String, ChainStoreError> {
        let (standard, start, keep) = match request {
            TokenRequest::Add {
                standard,
                start_block,
            } => (
                Some(standard.as_str()),
                Some(bigint("start block", start_block)?),
                false,
            ),
            TokenRequest::Remove { keep_rows } => (None, None, keep_rows),
            TokenRequest::Pause | TokenRequest::Resume => (None, None, false),
        };
        sqlx::query_scalar("SELECT public.chain_token_request($1, $2, $3, $4, $5, $6)")
            .bind(self.id())
            .bind(addr_hex(&token))
            .bind(request.action())
            .bind(standard)
            .bind(start)
            .bind(keep)
            .fetch_one(exec)
            .await
            .map_err(|source| ChainStoreError::Request {
                token: addr_hex(&token),
                action: request.action(),
                source,
            })
    }

    /// A cheap fingerprint of the catalogue: it changes whenever a row is added, removed or
    /// updated, so the leader re-reads the catalogue only then.
    pub(crate) async fn catalogue_version(
        &self,
        exec: impl PgExecutor<'_>,
    ) -> Result<(Option<String>, i64), ChainStoreError> {
        sqlx::query_as(
            "SELECT max(updated_at)::text, count(*) FROM public.chain_tokens WHERE chain_id = $1",
        )
        .bind(self.id())
        .fetch_one(exec)
        .await
        .map_err(db("read catalogue version"))
    }

    /// Every catalogue row of the chain, removed ones included.
    pub async fn catalogue(
        &self,
        exec: impl PgExecutor<'_>,
    ) -> Result<Vec<CatalogueToken>, ChainStoreError> {
        let rows: Vec<CatalogueRow> = sqlx::query_as(
            "SELECT address, standard, start_block, status, requested, keep_rows, indexed_to, \
                    backfill_logs, extract(epoch FROM pg_catalog.now() - backfill_started_at)::float8, \
                    reason, symbol \
               FROM public.chain_tokens WHERE chain_id = $1 ORDER BY address",
        )
        .bind(self.id())
        .fetch_all(exec)
        .await
        .map_err(db("read token catalogue"))?;
        rows.into_iter()
            .map(|r| {
                Ok(CatalogueToken {
                    address: address_of("token address", &r.0)?,
                    standard: standard_of(&r.1)?,
                    start_block: block_of("start block", r.2)?,
                    status: TokenStatus::parse(&r.3)
                        .ok_or_else(|| corrupt("token status", &r.3, "unknown"))?,
                    requested: Requested::parse(&r.4)
                        .ok_or_else(|| corrupt("requested token state", &r.4, "unknown"))?,
                    keep_rows: r.5,
                    indexed_to: r.6.map(|n| block_of("indexed_to", n)).transpose()?,
                    backfill_logs: u64::try_from(r.7).unwrap_or(0),
                    backfill_secs: r.8,
                    reason: r.9,
                    symbol: r.10,
                })
            })
            .collect()
    }

    /// Locks the checkpoint row (if any) inside `tx` and returns its block.
    async fn lock_chain(&self, conn: &mut PgConnection) -> Result<Option<u64>, ChainStoreError> {
        let n: Option<i64> = sqlx::query_scalar(
            "SELECT block_number FROM public.chain_checkpoints WHERE chain_id = $1 FOR UPDATE",
        )
        .bind(self.id())
        .fetch_optional(&mut *conn)
        .await
        .map_err(db("lock checkpoint"))?;
        n.map(|n| block_of("checkpoint block", n)).transpose()
    }

    /// Applies one [`Transition`] of `token` in one transaction (under the checkpoint lock). A
    /// live token that pauses or is removed with its rows kept remembers the checkpoint as
    /// `indexed_to`; a removal without `keep_rows` deletes every row of the token.
    pub(crate) async fn apply_transition(
        &self,
        conn: &mut PgConnection,
        token: Address,
        transition: Transition,
    ) -> Result<(), ChainStoreError> {
        let t = addr_hex(&token);
        let mut tx = conn.begin().await.map_err(db("begin token transition"))?;
        let cp = self.lock_chain(&mut tx).await?;
        let cp = cp.map(|n| bigint("checkpoint block", n)).transpose()?;
        let sql = match transition {
            Transition::None => return Ok(()),
            Transition::GoLive => {
                "UPDATE public.chain_tokens SET status = 'live', indexed_to = NULL, reason = NULL, \
                 updated_at = pg_catalog.now() WHERE chain_id = $1 AND address = $2 AND $3::int8 IS NOT DISTINCT FROM $3"
            }
            Transition::Backfill => {
                "UPDATE public.chain_tokens SET status = 'backfilling', reason = NULL, backfill_logs = 0, \
                 backfill_started_at = pg_catalog.now(), updated_at = pg_catalog.now() \
                 WHERE chain_id = $1 AND address = $2 AND $3::int8 IS NOT DISTINCT FROM $3"
            }
            Transition::Pause => {
                "UPDATE public.chain_tokens SET status = 'paused', \
                 indexed_to = CASE WHEN status = 'live' THEN $3 ELSE indexed_to END, \
                 updated_at = pg_catalog.now() WHERE chain_id = $1 AND address = $2"
            }
            Transition::Remove { keep_rows: true } => {
                "UPDATE public.chain_tokens SET status = 'removed', \
                 indexed_to = CASE WHEN status = 'live' THEN $3 ELSE indexed_to END, \
                 updated_at = pg_catalog.now() WHERE chain_id = $1 AND address = $2"
            }
            Transition::Remove { keep_rows: false } => {
                for statement in [
                    "DELETE FROM public.chain_transfers WHERE chain_id = $1 AND token = $2",
                    "DELETE FROM public.chain_rejected_logs WHERE chain_id = $1 AND token = $2",
                    "DELETE FROM public.token_balances WHERE chain_id = $1 AND token = $2",
                    "DELETE FROM public.nft_owners WHERE chain_id = $1 AND token = $2",
                    "DELETE FROM public.chain_erc1155_transfers WHERE chain_id = $1 AND token = $2",
                    "DELETE FROM public.chain_erc1155_balances WHERE chain_id = $1 AND token = $2",
                    "DELETE FROM public.chain_erc1155_supply WHERE chain_id = $1 AND token = $2",
                ] {
                    sqlx::query(statement)
                        .bind(self.id())
                        .bind(&t)
                        .execute(&mut *tx)
                        .await
                        .map_err(db("delete a removed token's rows"))?;
                }
                "UPDATE public.chain_tokens SET status = 'removed', indexed_to = NULL, \
                 updated_at = pg_catalog.now() WHERE chain_id = $1 AND address = $2 AND $3::int8 IS NOT DISTINCT FROM $3"
            }
        };
        sqlx::query(sql)
            .bind(self.id())
            .bind(&t)
            .bind(cp)
            .execute(&mut *tx)
            .await
            .map_err(db("apply token transition"))?;
        tx.commit().await.map_err(db("commit token transition"))
    }

    /// Stops `token` with `reason` (its committed data stays as it is).
    pub(crate) async fn stop_token(
        &self,
        exec: impl PgExecutor<'_>,
        token: Address,
        reason: &str,
    ) -> Result<(), ChainStoreError> {
        sqlx::query(
            "UPDATE public.chain_tokens SET status = 'stopped', reason = $3, \
             updated_at = pg_catalog.now() WHERE chain_id = $1 AND address = $2",
        )
        .bind(self.id())
        .bind(addr_hex(&token))
        .bind(reason)
        .execute(exec)
        .await
        .map_err(db("stop token"))?;
        Ok(())
    }

    /// Records metadata read from the chain for a token added at run time.
    pub(crate) async fn set_token_metadata(
        &self,
        exec: impl PgExecutor<'_>,
        token: Address,
        decimals: Option<i32>,
        symbol: Option<&str>,
        name: Option<&str>,
    ) -> Result<(), ChainStoreError> {
        sqlx::query(
            "UPDATE public.chain_tokens SET decimals = $3, symbol = $4, name = $5 \
             WHERE chain_id = $1 AND address = $2",
        )
        .bind(self.id())
        .bind(addr_hex(&token))
        .bind(decimals)
        .bind(symbol)
        .bind(name)
        .execute(exec)
        .await
        .map_err(db("record token metadata"))?;
        Ok(())
    }

    /// Stored block hashes of `from..=to`, oldest first (the reorg window).
    pub(crate) async fn stored_blocks(
        &self,
        exec: impl PgExecutor<'_>,
        from: u64,
        to: u64,
    ) -> Result<Vec<Checkpoint>, ChainStoreError> {
        let rows: Vec<(i64, String)> = sqlx::query_as(
            "SELECT number, hash FROM public.chain_blocks WHERE chain_id = $1 \
             AND number BETWEEN $2 AND $3 ORDER BY number",
        )
        .bind(self.id())
        .bind(bigint("block number", from)?)
        .bind(bigint("block number", to)?)
        .fetch_all(exec)
        .await
        .map_err(db("read stored blocks"))?;
        rows.into_iter()
            .map(|(n, h)| {
                Ok(Checkpoint {
                    number: block_of("stored block", n)?,
                    hash: h
                        .parse::<B256>()
                        .map_err(|e| corrupt("block hash", &h, e))?,
                })
            })
            .collect()
    }

    /// Commits one step of `token`'s own backfill (`batch`: its transfers of
    /// `batch.from_block..=batch.last.number`) in one transaction, and makes the token live
    /// when the step ends at the chain checkpoint. Fails without writing when the checkpoint
    /// is no longer `checkpoint`, the token is no longer backfilling from `batch.from_block`,
    /// or one of `seam` (the stored hashes the step's window logs were fetched by) was
    /// replaced by a reorg undo in the meantime.
    pub(crate) async fn commit_token_batch(
        &self,
        conn: &mut PgConnection,
        token: Address,
        checkpoint: u64,
        seam: &[Checkpoint],
        batch: &Batch,
    ) -> Result<Changes, ChainStoreError> {
        let mut netted = netting::net(&batch.rows, batch.last.number)?;
        let multi = netting::net_multi(&batch.multi, &mut netted.changes)?;
        let copy = transfers_copy(self.id(), &batch.rows)?;
        let t = addr_hex(&token);
        let mut tx = conn
            .begin()
            .await
            .map_err(db("begin token backfill batch"))?;
        let found = self.lock_chain(&mut tx).await?;
        if found != Some(checkpoint) {
            return Err(ChainStoreError::CheckpointMismatch {
                expected: Some(checkpoint),
                found,
            });
        }
        let next: Option<(String, Option<i64>, i64)> = sqlx::query_as(
            "SELECT status, indexed_to, start_block FROM public.chain_tokens \
             WHERE chain_id = $1 AND address = $2 FOR UPDATE",
        )
        .bind(self.id())
        .bind(&t)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db("lock backfilling token"))?;
        let expected_next = match next {
            Some((status, indexed_to, start)) if status == "backfilling" => {
                indexed_to.map_or(start, |n| n + 1)
            }
            _ => return Err(ChainStoreError::TokenMoved { token: t }),
        };
        if expected_next != bigint("block number", batch.from_block)? {
            return Err(ChainStoreError::TokenMoved { token: t });
        }
        if !seam.is_empty() {
            let numbers: Vec<i64> = seam
                .iter()
                .map(|b| bigint("block number", b.number))
                .collect::<Result<_, _>>()?;
            let hashes: Vec<String> = seam.iter().map(|b| hash_hex(&b.hash)).collect();
            let same: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM public.chain_blocks b \
                 JOIN UNNEST($2::int8[], $3::text[]) AS u(n, h) ON b.number = u.n AND b.hash = u.h \
                 WHERE b.chain_id = $1",
            )
            .bind(self.id())
            .bind(&numbers)
            .bind(&hashes)
            .fetch_one(&mut *tx)
            .await
            .map_err(db("check seam block hashes"))?;
            if same != numbers.len() as i64 {
                return Err(ChainStoreError::TokenMoved { token: t });
            }
        }
        if !batch.rows.is_empty() {
            copy_transfers(&mut tx, copy).await?;
            self.apply_deltas(&mut tx, &netted.deltas, batch).await?;
            self.apply_owners(&mut tx, &netted.owners).await?;
        }
        self.apply_multi(&mut tx, &batch.multi, &multi, batch.last.number)
            .await?;
        self.keep_rejected(&mut tx, &batch.rejected).await?;
        let joins = batch.last.number == checkpoint;
        sqlx::query(
            "UPDATE public.chain_tokens SET backfill_logs = backfill_logs + $4, \
                    indexed_to = CASE WHEN $5 THEN NULL ELSE $3 END, \
                    status = CASE WHEN $5 THEN 'live' ELSE status END, \
                    updated_at = pg_catalog.now() \
              WHERE chain_id = $1 AND address = $2",
        )
        .bind(self.id())
        .bind(&t)
        .bind(bigint("block number", batch.last.number)?)
        .bind((batch.rows.len() + batch.multi.len()) as i64)
        .bind(joins)
        .execute(&mut *tx)
        .await
        .map_err(db("advance token backfill"))?;
        tx.commit()
            .await
            .map_err(db("commit token backfill batch"))?;
        Ok(netted.changes)
    }
}
