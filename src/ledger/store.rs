//! The Rust door to the ledger: batches of operations go to `tw_ledger_apply` in one
//! transaction per chunk; reads go straight to the tables. The bounds the rules enforce are
//! SQL's, in `tw_ledger_settings`; [`Ledger::write_settings`] puts the `[ledger]` values there.

use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use super::{LedgerOp, Outcome, OutcomeStatus, RequestId, UserId};
use crate::config::LedgerConfig;

/// Why a ledger call failed. Business outcomes (insufficient tokens, conflicts, …) are NOT
/// errors: they are [`Outcome`]s. An error means the database could not give an answer.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("applying a batch of {ops} ledger operations failed: {source}")]
    Apply {
        ops: usize,
        #[source]
        source: sqlx::Error,
    },
    #[error("tw_ledger_apply returned {got} outcomes for {expected} operations")]
    OutcomeCount { expected: usize, got: usize },
    #[error(
        "tw_ledger_apply returned the outcome of request {got} at position {position}, expected request {expected}"
    )]
    OutcomeOrder {
        position: usize,
        expected: Uuid,
        got: Uuid,
    },
    #[error("unknown ledger status {status:?} for request {request_id}")]
    UnknownStatus { request_id: Uuid, status: String },
    #[error(
        "writing the [ledger] bounds (metadata_max_bytes {metadata_max_bytes}, max_hold_ttl_secs {max_hold_ttl_secs}, default_hold_ttl_secs {default_hold_ttl_secs}) into tw_ledger_settings failed: {source}"
    )]
    Settings {
        metadata_max_bytes: i32,
        max_hold_ttl_secs: i32,
        default_hold_ttl_secs: i32,
        #[source]
        source: sqlx::Error,
    },
    #[error("reading {what} failed: {source}")]
    Read {
        what: String,
        #[source]
        source: sqlx::Error,
    },
}

/// A user's account as shown to operators and callers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct AccountView {
    pub user_id: Uuid,
    /// Available balance (held tokens not included).
    pub balance: i64,
    /// Tokens reserved by open holds.
    pub held: i64,
    pub lifetime_granted: i64,
    pub lifetime_consumed: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One row of `token_balance_history`.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct HistoryEntry {
    pub id: i64,
    pub user_id: Uuid,
    pub request_id: Uuid,
    pub hold_id: Option<Uuid>,
    /// grant, consume, hold, settle, release, expire (refund is reserved).
    pub kind: String,
    pub amount: i64,
    pub balance_after: i64,
    pub held_after: i64,
    pub operation_type: Option<String>,
    pub metadata: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

/// Handle on the ledger tables and functions. Cheap to clone (the pool is shared).
#[derive(Debug, Clone)]
pub struct Ledger {
    pool: PgPool,
    cfg: LedgerConfig,
}

/// The parallel arrays `tw_ledger_apply` takes.
#[derive(Default)]
struct Columns {
    request_ids: Vec<Uuid>,
    kinds: Vec<&'static str>,
    user_ids: Vec<Option<Uuid>>,
    amounts: Vec<Option<i64>>,
    labels: Vec<Option<String>>,
    hold_ids: Vec<Option<Uuid>>,
    ttl_secs: Vec<Option<i32>>,
    metadata: Vec<serde_json::Value>,
}

impl Columns {
    fn from_ops(ops: &[LedgerOp]) -> Self {
        let mut c = Columns::default();
        for op in ops {
            let (user, amount, label, hold, ttl, meta) = match op {
                LedgerOp::Consume {
                    user_id,
                    amount,
                    operation_type,
                    metadata,
                    ..
                } => (
                    Some(user_id.0),
                    Some(amount.get()),
                    Some(operation_type.clone()),
                    None,
                    None,
                    metadata,
                ),
                LedgerOp::Grant {
                    user_id,
                    amount,
                    reason,
                    metadata,
                    ..
                } => (
                    Some(user_id.0),
                    Some(amount.get()),
                    Some(reason.clone()),
                    None,
                    None,
                    metadata,
                ),
                LedgerOp::Hold {
                    user_id,
                    amount,
                    operation_type,
                    ttl_secs,
                    metadata,
                    ..
                } => (
                    Some(user_id.0),
                    Some(amount.get()),
                    Some(operation_type.clone()),
                    None,
                    *ttl_secs,
                    metadata,
                ),
                LedgerOp::Settle {
                    hold_id,
                    amount,
                    metadata,
                    ..
                } => (
                    None,
                    Some(amount.get()),
                    None,
                    Some(hold_id.0),
                    None,
                    metadata,
                ),
                LedgerOp::Release {
                    hold_id, metadata, ..
                } => (None, None, None, Some(hold_id.0), None, metadata),
            };
            c.request_ids.push(op.request_id().0);
            c.kinds.push(op.kind());
            c.user_ids.push(user);
            c.amounts.push(amount);
            c.labels.push(label);
            c.hold_ids.push(hold);
            c.ttl_secs.push(ttl);
            c.metadata.push(meta.clone());
        }
        c
    }
}

impl LedgerError {
    /// Postgres refused a value of the batch (SQLSTATE class 22, e.g. NUL in text): the same
    /// batch can never succeed, but its other operations may on their own.
    pub fn is_data_error(&self) -> bool {
        match self {
            LedgerError::Apply {
                source: sqlx::Error::Database(db),
                ..
            } => db.code().is_some_and(|c| c.starts_with("22")),
            _ => false,
        }
    }
}

/// A failure worth retrying the whole chunk for: serialization failure, deadlock, or two
/// concurrent first uses of one request id (unique violation on the outcome insert; the retry
/// finds the stored outcome).
fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => matches!(
            db.code().as_deref(),
            Some("40001") | Some("40P01") | Some("23505")
        ),
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) => true,
        _ => false,
    }
}

fn row_to_outcome(
    request_id: Uuid,
    status: String,
    balance: Option<i64>,
    held: Option<i64>,
    reason: Option<String>,
) -> Result<Outcome, LedgerError> {
    let status =
        OutcomeStatus::parse(&status).ok_or(LedgerError::UnknownStatus { request_id, status })?;
    Ok(Outcome {
        request_id: RequestId(request_id),
        status,
        balance,
        held,
        reason,
    })
}

type OutcomeRow = (Uuid, String, Option<i64>, Option<i64>, Option<String>);

/// A queue payload that failed parsing but carries a readable request id: what of it could be
/// read, recorded as a `rejected` outcome so the queue door answers like the SQL door (the
/// outcome is readable by request id; a resend with other fields is a conflict).
#[derive(Debug, Clone)]
pub struct RejectedRequest {
    pub request_id: Uuid,
    /// consume, grant, hold, settle or release.
    pub kind: &'static str,
    pub user_id: Option<Uuid>,
    pub hold_id: Option<Uuid>,
    pub amount: Option<i64>,
    pub label: Option<String>,
    pub ttl_secs: Option<i32>,
    pub metadata: Option<serde_json::Value>,
    pub reason: String,
}

impl Ledger {
    pub fn new(pool: PgPool, cfg: LedgerConfig) -> Self {
        Ledger { pool, cfg }
    }

    /// Writes this ledger's `[ledger]` bounds into `tw_ledger_settings`, the one row both doors
    /// read, so SQL enforces the configured values whichever door a request takes. The worker
    /// calls it when it starts; the row is shared, so the last worker started decides.
    /// Values beyond a Postgres integer are capped at `i32::MAX`, which no request reaches.
    pub async fn write_settings(&self) -> Result<(), LedgerError> {
        let metadata_max_bytes = i32::try_from(self.cfg.metadata_max_bytes).unwrap_or(i32::MAX);
        let max_hold_ttl_secs = i32::try_from(self.cfg.max_hold_ttl_secs).unwrap_or(i32::MAX);
        let default_hold_ttl_secs =
            i32::try_from(self.cfg.default_hold_ttl_secs).unwrap_or(i32::MAX);
        sqlx::query(
            "UPDATE public.tw_ledger_settings \
                SET metadata_max_bytes = $1, max_hold_ttl_secs = $2, \
                    default_hold_ttl_secs = $3, updated_at = pg_catalog.now() \
              WHERE id = 1",
        )
        .bind(metadata_max_bytes)
        .bind(max_hold_ttl_secs)
        .bind(default_hold_ttl_secs)
        .execute(&self.pool)
        .await
        .map_err(|source| LedgerError::Settings {
            metadata_max_bytes,
            max_hold_ttl_secs,
            default_hold_ttl_secs,
            source,
        })?;
        Ok(())
    }

    /// Records `r` as a `rejected` outcome unless its request id is already used
    /// (`tw_ledger_reject`). Returns the outcome a caller gets, as `tw_ledger_apply` would
    /// answer a resend: the stored outcome when the stored fields are these, else
    /// `request_id_conflict` (not stored).
    pub async fn record_rejected(&self, r: &RejectedRequest) -> Result<Outcome, LedgerError> {
        let (rid, status, balance, held, reason) = sqlx::query_as::<_, OutcomeRow>(
            "SELECT request_id, status, balance, held, reason \
             FROM public.tw_ledger_reject($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(r.request_id)
        .bind(r.kind)
        .bind(r.user_id)
        .bind(r.hold_id)
        .bind(r.amount)
        .bind(r.label.as_deref())
        .bind(r.ttl_secs)
        .bind(r.metadata.as_ref())
        .bind(&r.reason)
        .fetch_one(&self.pool)
        .await
        .map_err(|source| LedgerError::Read {
            what: format!("recording rejected request {}", r.request_id),
            source,
        })?;
        row_to_outcome(rid, status, balance, held, reason)
    }

    /// The configuration this ledger batches with and writes into `tw_ledger_settings`.
    pub fn config(&self) -> &LedgerConfig {
        &self.cfg
    }

    /// Applies `ops` in order and returns one outcome per op, aligned with the input. Ops are
    /// sent in chunks of at most `ledger.max_batch`, each chunk one transaction (one call of
    /// `tw_ledger_apply`); a chunk that hits a deadlock or serialization failure is retried
    /// whole, which is safe because nothing of it was committed. If a later chunk fails, the
    /// earlier chunks stay committed: re-applying the same ops returns their stored outcomes.
    pub async fn apply(&self, ops: &[LedgerOp]) -> Result<Vec<Outcome>, LedgerError> {
        let mut out = Vec::with_capacity(ops.len());
        for chunk in ops.chunks(self.cfg.max_batch.max(1)) {
            out.extend(self.apply_chunk(chunk).await?);
        }
        Ok(out)
    }

    async fn apply_chunk(&self, ops: &[LedgerOp]) -> Result<Vec<Outcome>, LedgerError> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let cols = Columns::from_ops(ops);
        let started = Instant::now();
        let call = || async {
            sqlx::query_as::<_, OutcomeRow>(
                "SELECT request_id, status, balance, held, reason \
                 FROM public.tw_ledger_apply($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(&cols.request_ids)
            .bind(&cols.kinds)
            .bind(&cols.user_ids)
            .bind(&cols.amounts)
            .bind(&cols.labels)
            .bind(&cols.hold_ids)
            .bind(&cols.ttl_secs)
            .bind(&cols.metadata)
            .fetch_all(&self.pool)
            .await
        };
        let rows = call
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(5))
                    .with_max_delay(Duration::from_millis(500))
                    .with_max_times(8)
                    .with_jitter(),
            )
            .when(is_transient)
            .notify(|e, after| {
                tracing::warn!(error = %e, retry_in = ?after, ops = ops.len(), "ledger batch retried");
                metrics::counter!("tokenwarden_ledger_batch_retries_total").increment(1);
            })
            .await
            .map_err(|source| LedgerError::Apply {
                ops: ops.len(),
                source,
            })?;
        metrics::histogram!("tokenwarden_ledger_batch_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!("tokenwarden_ledger_batch_size").record(ops.len() as f64);

        if rows.len() != ops.len() {
            return Err(LedgerError::OutcomeCount {
                expected: ops.len(),
                got: rows.len(),
            });
        }
        let mut out = Vec::with_capacity(rows.len());
        // `tokenwarden_ledger_outcomes_total` is counted per (kind, status) and added once per
        // chunk: a labelled counter lookup per operation costs more than the count.
        let mut counted: Vec<((&'static str, OutcomeStatus), u64)> = Vec::new();
        for (position, ((rid, status, balance, held, reason), op)) in
            rows.into_iter().zip(ops).enumerate()
        {
            let expected = op.request_id().0;
            if rid != expected {
                return Err(LedgerError::OutcomeOrder {
                    position,
                    expected,
                    got: rid,
                });
            }
            let outcome = row_to_outcome(rid, status, balance, held, reason)?;
            let key = (op.kind(), outcome.status);
            match counted.iter_mut().find(|(k, _)| *k == key) {
                Some((_, n)) => *n += 1,
                None => counted.push((key, 1)),
            }
            out.push(outcome);
        }
        for ((kind, status), n) in counted {
            metrics::counter!("tokenwarden_ledger_outcomes_total", "kind" => kind, "status" => status.as_str())
                .increment(n);
        }
        Ok(out)
    }

    /// The user's account, or `None` if they never received credits.
    pub async fn balance(&self, user: UserId) -> Result<Option<AccountView>, LedgerError> {
        sqlx::query_as::<_, AccountView>(
            "SELECT user_id, balance, held, lifetime_granted, lifetime_consumed, created_at, \
             updated_at FROM public.credit_accounts WHERE user_id = $1",
        )
        .bind(user.0)
        .fetch_optional(&self.pool)
        .await
        .map_err(|source| LedgerError::Read {
            what: format!("account of user {}", user.0),
            source,
        })
    }

    /// The user's most recent balance changes, newest first.
    pub async fn history(
        &self,
        user: UserId,
        limit: i64,
    ) -> Result<Vec<HistoryEntry>, LedgerError> {
        sqlx::query_as::<_, HistoryEntry>(
            "SELECT id, user_id, request_id, hold_id, kind, amount, balance_after, held_after, \
             operation_type, metadata, created_at FROM public.token_balance_history \
             WHERE user_id = $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(user.0)
        .bind(limit.max(0))
        .fetch_all(&self.pool)
        .await
        .map_err(|source| LedgerError::Read {
            what: format!("history of user {}", user.0),
            source,
        })
    }

    /// The durable outcome of a request id, as first decided; `None` if the id was never seen.
    pub async fn outcome(&self, request_id: RequestId) -> Result<Option<Outcome>, LedgerError> {
        let row = sqlx::query_as::<_, OutcomeRow>(
            "SELECT request_id, status, balance_after, held_after, reason \
             FROM public.ledger_requests WHERE request_id = $1",
        )
        .bind(request_id.0)
        .fetch_optional(&self.pool)
        .await
        .map_err(|source| LedgerError::Read {
            what: format!("outcome of request {}", request_id.0),
            source,
        })?;
        row.map(|(rid, status, balance, held, reason)| {
            row_to_outcome(rid, status, balance, held, reason)
        })
        .transpose()
    }

    /// Expires every open hold past its expiry (tokens return, one 'expire' history row each);
    /// returns how many it expired.
    pub async fn cleanup_expired_locks(&self) -> Result<u64, LedgerError> {
        let call = || async {
            sqlx::query_scalar::<_, i32>("SELECT public.cleanup_expired_locks()")
                .fetch_one(&self.pool)
                .await
        };
        let n = call
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(5))
                    .with_max_times(5)
                    .with_jitter(),
            )
            .when(is_transient)
            .await
            .map_err(|source| LedgerError::Read {
                what: "cleanup_expired_locks()".to_string(),
                source,
            })?;
        let n = n.max(0) as u64;
        // Two documented names for one count (the ledger's and the maintenance section's of
        // the README); both are kept, and counted here only.
        metrics::counter!("tokenwarden_ledger_holds_expired_total").increment(n);
        metrics::counter!("tokenwarden_locks_released_total").increment(n);
        Ok(n)
    }
}
