//! The lock-cleanup and pruning jobs, and the payload every maintenance job accepts.
//!
//! The jobs are thin: the work belongs to the areas that own the data (the ledger expires
//! holds, the queue purges dead letters and trims streams, the scheduler prunes its ticks);
//! a job validates its payload, calls them, counts and replies.

use std::time::Duration;

use redis::aio::ConnectionManager;
use serde::Deserialize;
use sqlx::PgPool;

use crate::app::AppContext;
use crate::config::RetentionConfig;
use crate::ledger::anomalies::DetectionFailure;
use crate::ledger::{Ledger, LedgerError};
use crate::queue::{JobError, JobFuture, JobHandler, QueueError, Rejected, dead_letter, streams};

/// Job type of the hold-expiry job.
pub const CLEANUP_LOCKS: &str = "cleanup_locks";
/// Job type of the retention job.
pub const PRUNE: &str = "prune";

/// The payload of every maintenance job: `{request_id?: uuid}` and nothing else.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenancePayload {
    /// Present when the caller waits for the reply: the queue reads it from the raw payload;
    /// declared here only so that it is accepted (and checked to be a uuid).
    #[serde(
        default,
        rename = "request_id",
        deserialize_with = "crate::queue::entry::hyphenated_uuid_opt"
    )]
    _request_id: Option<uuid::Uuid>,
}

/// Validates a maintenance payload, rejecting anything but an optional `request_id`.
pub fn parse_payload(
    job: &str,
    payload: serde_json::Value,
) -> Result<MaintenancePayload, Rejected> {
    // serde accepts a JSON array for a struct (fields by position); the wire format says object.
    if !payload.is_object() {
        return Err(Rejected::new(format!(
            "invalid {job} payload: expected a JSON object, got {payload}"
        )));
    }
    serde_json::from_value(payload)
        .map_err(|e| Rejected::new(format!("invalid {job} payload: {e}")))
}

/// Why a maintenance job failed. Every cause is transient (a store down): the job is retried.
#[derive(Debug, thiserror::Error)]
pub enum MaintenanceError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("anomaly detection incomplete: {}", join(.0))]
    Anomalies(Vec<DetectionFailure>),
    #[error(transparent)]
    Audit(#[from] crate::access::audit::AuditError),
    #[error("deleting old scheduler ticks failed: {0}")]
    Ticks(#[source] sqlx::Error),
    #[error("cannot encode the {job} reply: {source}")]
    Reply {
        job: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

fn join(failures: &[DetectionFailure]) -> String {
    failures
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl From<MaintenanceError> for JobError {
    fn from(e: MaintenanceError) -> Self {
        JobError::Retryable(e.to_string())
    }
}

/// `cleanup_locks`: expires holds past their expiry through the ledger
/// ([`Ledger::cleanup_expired_locks`], which returns the tokens and writes `expire` history
/// rows). Reply: `{released: n}`.
pub struct CleanupLocks {
    ledger: Ledger,
}

impl CleanupLocks {
    pub fn new(ledger: Ledger) -> Self {
        Self { ledger }
    }

    /// Runs the cleanup once and returns how many holds it released.
    pub async fn run(&self) -> Result<u64, MaintenanceError> {
        Ok(self.ledger.cleanup_expired_locks().await?)
    }
}

impl JobHandler for CleanupLocks {
    fn job_type(&self) -> &'static str {
        CLEANUP_LOCKS
    }

    fn handle(&self, payload: serde_json::Value) -> JobFuture {
        let ledger = self.ledger.clone();
        Box::pin(async move {
            parse_payload(CLEANUP_LOCKS, payload)?;
            let released = CleanupLocks { ledger }.run().await?;
            Ok(serde_json::json!({ "released": released }))
        })
    }
}

/// What one prune run removed.
#[derive(Debug, Default, Clone, serde::Serialize, PartialEq, Eq)]
pub struct PruneReport {
    pub dead_letters_deleted: u64,
    pub ticks_deleted: u64,
    /// Job streams that were trimmed (XTRIM called).
    pub streams_trimmed: u64,
    /// Stream entries removed in total.
    pub stream_entries_trimmed: u64,
    /// Access checks past `access.audit.retention_days`.
    pub access_checks_deleted: u64,
}

/// `prune`: deletes dead letters, scheduler ticks and access checks past retention and trims
/// acknowledged, old entries from the job streams. Never touches the ledger history. Reply: [`PruneReport`].
#[derive(Clone)]
pub struct Prune {
    pool: PgPool,
    redis: ConnectionManager,
    prefix: String,
    retention: RetentionConfig,
    audit: crate::config::AuditConfig,
}

impl Prune {
    pub fn new(ctx: &AppContext) -> Self {
        Self {
            pool: ctx.pool.clone(),
            redis: ctx.redis.clone(),
            prefix: ctx.cfg.redis.prefix.clone(),
            retention: ctx.cfg.maintenance.retention.clone(),
            audit: ctx.cfg.access.audit.clone(),
        }
    }

    /// Runs every pruning step once.
    pub async fn run(&self) -> Result<PruneReport, MaintenanceError> {
        let dead_letters_deleted =
            dead_letter::purge_older_than(&self.pool, self.retention.dead_letters_days).await?;
        let ticks_deleted = super::scheduler::prune_ticks(&self.pool, self.retention.ticks_days)
            .await
            .map_err(MaintenanceError::Ticks)?;
        let mut conn = self.redis.clone();
        let trimmed = streams::trim_job_streams(
            &mut conn,
            &self.prefix,
            Duration::from_secs(self.retention.stream_entries_secs),
        )
        .await?;
        let audit = crate::access::audit::prune(&self.pool, &self.audit).await?;
        let report = PruneReport {
            dead_letters_deleted,
            ticks_deleted,
            streams_trimmed: trimmed.streams,
            stream_entries_trimmed: trimmed.entries,
            access_checks_deleted: audit.checks,
        };
        metrics::counter!("tokenwarden_pruned_total", "what" => "dead_letters")
            .increment(report.dead_letters_deleted);
        metrics::counter!("tokenwarden_pruned_total", "what" => "scheduler_ticks")
            .increment(report.ticks_deleted);
        metrics::counter!("tokenwarden_pruned_total", "what" => "stream_entries")
            .increment(report.stream_entries_trimmed);
        metrics::counter!("tokenwarden_pruned_total", "what" => "access_checks")
            .increment(report.access_checks_deleted);
        Ok(report)
    }
}

impl JobHandler for Prune {
    fn job_type(&self) -> &'static str {
        PRUNE
    }

    fn handle(&self, payload: serde_json::Value) -> JobFuture {
        let this = self.clone();
        Box::pin(async move {
            parse_payload(PRUNE, payload)?;
            let report = this.run().await?;
            serde_json::to_value(report)
                .map_err(|source| MaintenanceError::Reply { job: PRUNE, source }.into())
        })
    }
}
