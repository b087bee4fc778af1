//! One entry point for taking a snapshot, shared by the `snapshot_create` job and the CLI:
//! validate the request, record a pending snapshot, run the source, record the outcome.
//!
//! Every request that reaches this point leaves a durable row: `complete`, or `failed` with the
//! reason (including requests refused before any HTTP call, such as a Story chain on GoldRush).
//! Only database failures are returned as errors (the job is then retried; a redelivered job
//! restarts its pending snapshot from scratch).

use std::sync::Arc;
use std::time::Instant;

use sqlx::PgPool;
use uuid::Uuid;

use super::SnapshotsConfig;
use super::chains;
use super::crawl::{self, CrawlError};
use super::goldrush::{GoldRushClient, GoldRushError, normalize_address};
use super::index::{self, IndexError};
pub use super::store::SnapshotSource;
use super::store::{self, NewSnapshot, SnapshotRow, SnapshotStatus};

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
    ) -> Result<Self, String> {
        let chain = chain.trim();
        if chain.is_empty() || chain.len() > 100 {
            return Err(format!("chain {chain:?} must be 1..=100 characters"));
        }
        if block_height.is_some_and(|b| b > i64::MAX as u64) {
            return Err("block_height does not fit in a signed 64-bit integer".to_string());
        }
        let token = normalize_address(token.trim()).map_err(|e| format!("token {e}"))?;
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
        let id = match store::insert_pending(&self.pool, &new).await? {
            Some(id) => id,
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
                tracing::info!(snapshot_id = %row.id, %request_id, "restarting a pending snapshot (job redelivered)");
                store::reset_pending(&self.pool, row.id).await?;
                row.id
            }
        };
        let started = Instant::now();
        let result = match req.source {
            SnapshotSource::GoldRush => self.run_goldrush(id, req).await,
            SnapshotSource::Index => self.run_index(id, req).await,
        };
        match result {
            Ok(()) => {}
            Err(Failure::Reason(reason)) => {
                tracing::warn!(snapshot_id = %id, source = req.source.as_str(), chain = %req.chain, token = %req.token, %reason, "snapshot failed");
                store::fail(&self.pool, id, &reason).await?;
            }
            Err(Failure::Db(e)) => {
                // A job keeps its snapshot pending so the redelivery restarts it; a one-off
                // (CLI) request has no redelivery, so it records the failure if it still can.
                if req.request_id.is_none() {
                    let _ = store::fail(&self.pool, id, &format!("database error: {e}")).await;
                }
                return Err(SnapshotError::Db(e));
            }
        }
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

    async fn run_goldrush(&self, id: Uuid, req: &SnapshotRequest) -> Result<(), Failure> {
        let chain = chains::resolve(&req.chain, req.block_height)
            .map_err(|e| Failure::Reason(e.to_string()))?;
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
            other => Failure::Reason(other.to_string()),
        })?;
        let mut conn = self.pool.acquire().await.map_err(Failure::Db)?;
        store::complete(&mut conn, id, &summary.completion)
            .await
            .map_err(Failure::Db)?;
        Ok(())
    }

    async fn run_index(&self, id: Uuid, req: &SnapshotRequest) -> Result<(), Failure> {
        let chain_id =
            index::parse_chain_id(&req.chain).map_err(|e| Failure::Reason(e.to_string()))?;
        match index::snapshot_into(&self.pool, id, chain_id, &req.token, req.block_height).await {
            Ok(_) => Ok(()),
            Err(IndexError::Db(e)) => Err(Failure::Db(e)),
            Err(other) => Err(Failure::Reason(other.to_string())),
        }
    }
}

/// How a run ended when it did not complete.
enum Failure {
    /// The snapshot fails with this reason.
    Reason(String),
    /// Postgres failed; the snapshot stays pending and the job is retried.
    Db(sqlx::Error),
}
