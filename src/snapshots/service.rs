//! One entry point for taking a snapshot, shared by the `snapshot_create` job and the CLI:
//! validate the request, record a pending snapshot, run the source, record the outcome.
//!
//! Every request that reaches this point leaves a durable row: `complete`, or `failed` with the
//! reason (including requests refused before any HTTP call, such as a Story chain on GoldRush).
//! Only database failures and a busy snapshot are returned as errors (the job is then retried).
//!
//! One crawler per snapshot: the crawl runs under a [`CrawlClaim`] (session advisory lock) on
//! both the fresh-insert and the restart path. A repeated request that finds the snapshot pending
//! restarts it from scratch only if it can take the claim (the first crawler is gone); while a
//! live crawler holds it, the request touches nothing and returns [`SnapshotError::Busy`], which
//! the job turns into a retryable error so the queue redelivers it later and then gets the
//! stored outcome.

use std::sync::Arc;
use std::time::Instant;

use sqlx::PgPool;
use uuid::Uuid;

use super::chains::{self, ChainError};
use super::claim::CrawlClaim;
use super::crawl::{self, CrawlError};
use super::goldrush::{GoldRushClient, GoldRushError, InvalidAddress, normalize_address};
use super::own_index::{self, OwnIndexError};
pub use super::store::SnapshotSource;
use super::store::{self, Completed, NewSnapshot, SnapshotRow, SnapshotStatus};
use crate::config::SnapshotsConfig;

/// Why a snapshot request is not valid, whatever its source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequest {
    #[error("chain {0:?} must be 1..=100 characters")]
    Chain(String),
    #[error("block_height does not fit in a signed 64-bit integer")]
    BlockHeight(u64),
    #[error("token {0}")]
    Token(#[from] InvalidAddress),
}

/// A validated snapshot request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRequest {
    /// The job's request id (idempotency key); `None` from the CLI.
    pub request_id: Option<Uuid>,
    pub source: SnapshotSource,
    /// GoldRush chain name or decimal chain id.
    pub chain: String,
    /// Lowercase 0x address.
    pub token: String,
    pub block_height: Option<u64>,
}

impl SnapshotRequest {
    /// Checks the chain text and the token address; returns the normalized request.
    pub fn new(
        request_id: Option<Uuid>,
        source: SnapshotSource,
        chain: &str,
        token: &str,
        block_height: Option<u64>,
    ) -> Result<Self, InvalidRequest> {
        let chain = chain.trim();
        if chain.is_empty() || chain.len() > 100 {
            return Err(InvalidRequest::Chain(chain.to_string()));
        }
        if let Some(b) = block_height.filter(|b| *b > i64::MAX as u64) {
            return Err(InvalidRequest::BlockHeight(b));
        }
        let token = normalize_address(token.trim())?;
        Ok(Self {
            request_id,
            source,
            chain: chain.to_string(),
            token,
            block_height,
        })
    }
}

/// The final answer for a request (the `snapshot_create` reply, minus the request id).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotOutcome {
    pub snapshot_id: Uuid,
    pub status: SnapshotStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holder_count: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_height: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl SnapshotOutcome {
    fn from_row(row: &SnapshotRow) -> Self {
        Self {
            snapshot_id: row.id,
            status: row.status,
            holder_count: row.holder_count,
            block_height: row.block_height,
            error: row.error.clone(),
        }
    }
}

/// Why a request could not be carried to an outcome.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Postgres is unreachable or failed: retry later.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// The request id already names a snapshot of something else.
    #[error(
        "request_id {request_id} already created snapshot {snapshot_id} for a different source, chain, token or block"
    )]
    RequestIdConflict { request_id: Uuid, snapshot_id: Uuid },
    /// The snapshot is still pending after it was run (it was taken over concurrently).
    #[error("snapshot {0} is still pending")]
    StillPending(Uuid),
    /// A repeated request (same request id) arrived while another worker is still crawling the
    /// snapshot: nothing was touched; retry later to get the outcome.
    #[error(
        "snapshot {0} is being crawled by another worker (same request_id still in progress); retry later"
    )]
    Busy(Uuid),
}

/// Takes snapshots. Share one per process (it holds the GoldRush client and its rate limit).
#[derive(Debug, Clone)]
pub struct SnapshotService {
    pool: PgPool,
    goldrush: Arc<GoldRushClient>,
}

impl SnapshotService {
    /// Builds the service with the GoldRush key read from the environment variable the config
    /// names (a missing key fails GoldRush snapshots with a clear reason, not start-up).
    pub fn from_config(pool: PgPool, cfg: &SnapshotsConfig) -> Result<Self, GoldRushError> {
        Ok(Self::new(pool, Arc::new(GoldRushClient::from_env(cfg)?)))
    }

    pub fn new(pool: PgPool, goldrush: Arc<GoldRushClient>) -> Self {
        Self { pool, goldrush }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Runs `req` to its final outcome (idempotent per request id).
    pub async fn create(&self, req: &SnapshotRequest) -> Result<SnapshotOutcome, SnapshotError> {
        let new = NewSnapshot {
            request_id: req.request_id,
            source: req.source,
            chain: &req.chain,
            token: &req.token,
            block_height: req.block_height,
        };
        let (id, mut claim) = match store::insert_pending(&self.pool, &new).await? {
            Some(id) => match CrawlClaim::try_claim(&self.pool, id).await? {
                Some(claim) => (id, claim),
                // A repeated request claimed our brand-new row first: it crawls, we step back.
                None => return Err(self.busy(id)),
            },
            None => {
                // request_id already used: the same request again, or a conflict.
                let request_id = req.request_id.unwrap_or_default();
                let row = store::get_by_request(&self.pool, request_id)
                    .await?
                    .ok_or(SnapshotError::StillPending(Uuid::nil()))?;
                let same = row.source == req.source.as_str()
                    && row.chain == req.chain
                    && row.token == req.token
                    && (req.block_height.is_none()
                        || row.block_height == req.block_height.map(|b| b as i64));
                if !same {
                    return Err(SnapshotError::RequestIdConflict {
                        request_id,
                        snapshot_id: row.id,
                    });
                }
                if row.status != SnapshotStatus::Pending {
                    return Ok(SnapshotOutcome::from_row(&row));
                }
                // Pending: either a live crawler is still on it (its claim is held: leave its
                // rows alone) or its crawler died (the claim was released with its session).
                let Some(mut claim) = CrawlClaim::try_claim(&self.pool, row.id).await? else {
                    return Err(self.busy(row.id));
                };
                if !store::reset_pending(claim.conn(), row.id).await? {
                    // It finished between our read and our claim: its outcome stands.
                    claim.release().await;
                    let row = store::get(&self.pool, row.id)
                        .await?
                        .ok_or(SnapshotError::StillPending(row.id))?;
                    return Ok(SnapshotOutcome::from_row(&row));
                }
                tracing::info!(snapshot_id = %row.id, %request_id, "restarting a pending snapshot whose crawler is gone (job redelivered)");
                (row.id, claim)
            }
        };
        let started = Instant::now();
        let ran = self.run_claimed(&mut claim, id, req).await;
        claim.release().await;
        ran?;
        let row = store::get(&self.pool, id)
            .await?
            .ok_or(SnapshotError::StillPending(id))?;
        if row.status == SnapshotStatus::Pending {
            return Err(SnapshotError::StillPending(id));
        }
        metrics::counter!("tokenwarden_snapshots_total", "source" => req.source.as_str(), "status" => row.status.as_str())
            .increment(1);
        metrics::histogram!("tokenwarden_snapshot_seconds", "source" => req.source.as_str())
            .record(started.elapsed().as_secs_f64());
        tracing::info!(snapshot_id = %id, status = row.status.as_str(), holders = ?row.holder_count, block = ?row.block_height, "snapshot finished");
        Ok(SnapshotOutcome::from_row(&row))
    }

    /// Runs the source and records its failure, if any, while holding the snapshot's claim.
    async fn run_claimed(
        &self,
        claim: &mut CrawlClaim,
        id: Uuid,
        req: &SnapshotRequest,
    ) -> Result<(), SnapshotError> {
        let result = match req.source {
            SnapshotSource::GoldRush => self.run_goldrush(claim, id, req).await,
            SnapshotSource::Index => self.run_index(id, req).await,
        };
        match result {
            Ok(()) => Ok(()),
            Err(Failure::Refused(reason)) => {
                tracing::warn!(snapshot_id = %id, source = req.source.as_str(), chain = %req.chain, token = %req.token, %reason, "snapshot failed");
                store::fail(claim.conn(), id, &reason.to_string()).await?;
                Ok(())
            }
            Err(Failure::Db(e)) => {
                // A job keeps its snapshot pending so the redelivery restarts it; a one-off
                // (CLI) request has no redelivery, so it records the failure if it still can.
                if req.request_id.is_none() {
                    let _ = store::fail(claim.conn(), id, &format!("database error: {e}")).await;
                }
                Err(SnapshotError::Db(e))
            }
        }
    }

    /// A repeated request found the snapshot claimed by a live crawler.
    fn busy(&self, id: Uuid) -> SnapshotError {
        metrics::counter!("tokenwarden_snapshot_claim_busy_total").increment(1);
        tracing::info!(snapshot_id = %id, "snapshot is being crawled by another worker; not touching it");
        SnapshotError::Busy(id)
    }

    async fn run_goldrush(
        &self,
        claim: &mut CrawlClaim,
        id: Uuid,
        req: &SnapshotRequest,
    ) -> Result<(), Failure> {
        let chain = chains::resolve(&req.chain, req.block_height).map_err(Refusal::Chain)?;
        let summary = crawl::crawl_into(
            &self.goldrush,
            &self.pool,
            id,
            &chain,
            &req.token,
            req.block_height,
        )
        .await
        .map_err(|e| match e {
            CrawlError::Db(e) => Failure::Db(e),
            other => Refusal::Crawl(other).into(),
        })?;
        let expected = i64::try_from(summary.holders_stored)
            .map_err(|_| Refusal::HolderCount(summary.holders_stored))?;
        // On the claim's connection: if its session (and so the lock) is gone, this fails and
        // the job is retried instead of completing without the claim.
        match store::complete(claim.conn(), id, &summary.completion, expected)
            .await
            .map_err(Failure::Db)?
        {
            Completed::Complete(_) | Completed::NotPending => Ok(()),
            Completed::CountMismatch { stored, expected } => {
                Err(Refusal::CountMismatch { stored, expected }.into())
            }
        }
    }

    async fn run_index(&self, id: Uuid, req: &SnapshotRequest) -> Result<(), Failure> {
        let chain_id = own_index::parse_chain_id(&req.chain).map_err(Refusal::OwnIndex)?;
        match own_index::snapshot_into(&self.pool, id, chain_id, &req.token, req.block_height).await
        {
            Ok(_) => Ok(()),
            Err(e) => Err(match e.into_db() {
                Ok(db) => Failure::Db(db),
                Err(other) => Refusal::OwnIndex(other).into(),
            }),
        }
    }
}

/// How a run ended when it did not complete.
enum Failure {
    /// The snapshot fails; the reason is stored as its `error`.
    Refused(Refusal),
    /// Postgres failed; the snapshot stays pending and the job is retried.
    Db(sqlx::Error),
}

/// Why a snapshot failed for good (stored with it, so retrying the request gives the same).
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error(transparent)]
    Chain(ChainError),
    #[error(transparent)]
    Crawl(CrawlError),
    #[error(transparent)]
    OwnIndex(OwnIndexError),
    #[error("holder count {0} does not fit in bigint")]
    HolderCount(u64),
    #[error(
        "holder count check failed: {stored} rows are stored for the snapshot but this crawl \
         stored {expected} (another writer added or deleted rows during the crawl); not marking \
         it complete"
    )]
    CountMismatch { stored: i64, expected: i64 },
}

impl From<Refusal> for Failure {
    fn from(r: Refusal) -> Self {
        Failure::Refused(r)
    }
}
