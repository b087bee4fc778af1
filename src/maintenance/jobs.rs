//! The lock-cleanup and pruning jobs, and the payload every maintenance job accepts.

use redis::aio::ConnectionManager;
use serde::Deserialize;
use sqlx::PgPool;

use crate::app::AppContext;
use crate::config::RetentionConfig;
use crate::queue::{JobError, JobFuture, JobHandler};

/// Job type of the hold-expiry job.
pub const CLEANUP_LOCKS: &str = "cleanup_locks";
/// Job type of the retention job.
pub const PRUNE: &str = "prune";

/// The payload of every maintenance job: `{request_id?: uuid}` and nothing else.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenancePayload {
    /// Present when the caller waits for the reply; the queue uses it, the job does not.
    #[serde(default)]
    pub request_id: Option<uuid::Uuid>,
}

/// Validates a maintenance payload, rejecting anything but an optional `request_id`.
pub fn parse_payload(
    job: &str,
    payload: serde_json::Value,
) -> Result<MaintenancePayload, JobError> {
    // serde accepts a JSON array for a struct (fields by position); the wire format says object.
    if !payload.is_object() {
        return Err(JobError::Rejected(format!(
            "invalid {job} payload: expected a JSON object, got {payload}"
        )));
    }
    serde_json::from_value(payload)
        .map_err(|e| JobError::Rejected(format!("invalid {job} payload: {e}")))
}

/// Maps a database error to a retryable job failure, naming the step.
fn retryable(step: &str) -> impl FnOnce(sqlx::Error) -> JobError + '_ {
    move |e| JobError::Retryable(format!("{step}: {e}"))
}

/// `cleanup_locks`: expires holds past their expiry through the ledger's
/// `cleanup_expired_locks()` (which returns the tokens and writes `expire` history rows).
/// Reply: `{released: n}`.
pub struct CleanupLocks {
    pool: PgPool,
}

impl CleanupLocks {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Runs the cleanup once and returns how many holds it released.
    pub async fn run(&self) -> Result<i64, JobError> {
        let released: i32 = sqlx::query_scalar("SELECT public.cleanup_expired_locks()")
            .fetch_one(&self.pool)
            .await
            .map_err(retryable("cleanup_expired_locks()"))?;
        metrics::counter!("tokenwarden_locks_released_total").increment(released.max(0) as u64);
        Ok(i64::from(released))
    }
}

impl JobHandler for CleanupLocks {
    fn job_type(&self) -> &'static str {
        CLEANUP_LOCKS
    }

    fn handle(&self, payload: serde_json::Value) -> JobFuture {
        let this = Self {
            pool: self.pool.clone(),
        };
        Box::pin(async move {
            parse_payload(CLEANUP_LOCKS, payload)?;
            let released = this.run().await?;
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
}

/// `prune`: deletes dead letters and scheduler ticks past retention and trims acknowledged,
/// old entries from the job streams. Never touches the ledger history. Reply: [`PruneReport`].
#[derive(Clone)]
pub struct Prune {
    pool: PgPool,
    redis: ConnectionManager,
    prefix: String,
    retention: RetentionConfig,
}

impl Prune {
    pub fn new(ctx: &AppContext) -> Self {
        Self {
            pool: ctx.pool.clone(),
            redis: ctx.redis.clone(),
            prefix: ctx.cfg.redis.prefix.clone(),
            retention: ctx.cfg.maintenance.retention.clone(),
        }
    }

    /// Runs every pruning step once.
    pub async fn run(&self) -> Result<PruneReport, JobError> {
        let dead_letters_deleted = sqlx::query(
            "DELETE FROM public.dead_letters \
             WHERE created_at < now() - make_interval(days => $1)",
        )
        .bind(self.retention.dead_letters_days as i32)
        .execute(&self.pool)
        .await
        .map_err(retryable("delete old dead letters"))?
        .rows_affected();
        // Each job's latest tick stays: the scheduler's catch-up after downtime starts from it.
        let ticks_deleted = sqlx::query(
            "DELETE FROM public.scheduler_ticks t \
             WHERE t.claimed_at < now() - make_interval(days => $1) \
               AND t.scheduled_at < (SELECT max(l.scheduled_at) FROM public.scheduler_ticks l \
                                      WHERE l.job = t.job)",
        )
        .bind(self.retention.ticks_days as i32)
        .execute(&self.pool)
        .await
        .map_err(retryable("delete old scheduler ticks"))?
        .rows_affected();
        let mut report = PruneReport {
            dead_letters_deleted,
            ticks_deleted,
            ..PruneReport::default()
        };
        let mut conn = self.redis.clone();
        for stream in job_streams(&mut conn, &self.prefix).await? {
            let cutoff = now_ms().saturating_sub(self.retention.stream_entries_secs * 1000);
            if let Some(removed) = trim_stream(&mut conn, &stream, cutoff).await? {
                report.streams_trimmed += 1;
                report.stream_entries_trimmed += removed;
            }
        }
        metrics::counter!("tokenwarden_pruned_total", "what" => "dead_letters")
            .increment(report.dead_letters_deleted);
        metrics::counter!("tokenwarden_pruned_total", "what" => "scheduler_ticks")
            .increment(report.ticks_deleted);
        metrics::counter!("tokenwarden_pruned_total", "what" => "stream_entries")
            .increment(report.stream_entries_trimmed);
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
                .map_err(|e| JobError::Retryable(format!("cannot encode prune report: {e}")))
        })
    }
}

pub(crate) fn now_ms() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0)
}

fn redis_err(step: String) -> impl FnOnce(redis::RedisError) -> JobError {
    move |e| JobError::Retryable(format!("{step}: {e}"))
}

/// Every job stream under `{prefix}:jobs:` (found with SCAN, so streams of job types this
/// process does not serve are pruned too).
pub(crate) async fn job_streams(
    conn: &mut ConnectionManager,
    prefix: &str,
) -> Result<Vec<String>, JobError> {
    let pattern = format!("{prefix}:jobs:*");
    let mut cursor: u64 = 0;
    let mut out = Vec::new();
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(500)
            .arg("TYPE")
            .arg("stream")
            .query_async(conn)
            .await
            .map_err(redis_err(format!("SCAN {pattern}")))?;
        out.extend(keys);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Parses a stream id `ms-seq` into its parts.
pub(crate) fn parse_stream_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// The id below which every entry of `stream` is acknowledged by every consumer group: the
/// oldest pending entry, else the entry after each group's last-delivered id. `None` when the
/// stream has no group yet (nothing was consumed, nothing may go).
pub(crate) async fn acked_floor(
    conn: &mut ConnectionManager,
    stream: &str,
) -> Result<Option<(u64, u64)>, JobError> {
    let groups: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await
        .map_err(redis_err(format!("XINFO GROUPS {stream}")))?;
    let mut floor: Option<(u64, u64)> = None;
    for g in groups {
        let map = value_map(g);
        let name = map.get("name").cloned().unwrap_or_default();
        let Some(last) = map
            .get("last-delivered-id")
            .and_then(|s| parse_stream_id(s))
        else {
            continue;
        };
        // Entries up to last-delivered are delivered; the first still pending bounds them.
        let summary: redis::Value = redis::cmd("XPENDING")
            .arg(stream)
            .arg(&name)
            .query_async(conn)
            .await
            .map_err(redis_err(format!("XPENDING {stream} {name}")))?;
        let oldest_pending = match summary {
            redis::Value::Array(items) if items.len() >= 2 => match &items[1] {
                redis::Value::BulkString(b) => parse_stream_id(&String::from_utf8_lossy(b)),
                redis::Value::SimpleString(s) => parse_stream_id(s),
                _ => None,
            },
            _ => None,
        };
        let group_floor = oldest_pending.unwrap_or((last.0, last.1.saturating_add(1)));
        floor = Some(match floor {
            Some(f) => f.min(group_floor),
            None => group_floor,
        });
    }
    Ok(floor)
}

/// Reads a RESP2/RESP3 map-or-flat-array reply into string pairs.
pub(crate) fn value_map(v: redis::Value) -> std::collections::HashMap<String, String> {
    let text = |v: &redis::Value| match v {
        redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        redis::Value::SimpleString(s) => Some(s.clone()),
        redis::Value::Int(i) => Some(i.to_string()),
        redis::Value::Nil => Some(String::new()),
        _ => None,
    };
    let mut out = std::collections::HashMap::new();
    match v {
        redis::Value::Array(items) => {
            for pair in items.chunks(2) {
                if let [k, v] = pair
                    && let (Some(k), Some(v)) = (text(k), text(v))
                {
                    out.insert(k, v);
                }
            }
        }
        redis::Value::Map(pairs) => {
            for (k, v) in pairs {
                if let (Some(k), Some(v)) = (text(&k), text(&v)) {
                    out.insert(k, v);
                }
            }
        }
        _ => {}
    }
    out
}

/// Trims entries older than `cutoff_ms` that every group has acknowledged. Returns the number
/// removed, or `None` when the stream has no consumer group yet.
async fn trim_stream(
    conn: &mut ConnectionManager,
    stream: &str,
    cutoff_ms: u64,
) -> Result<Option<u64>, JobError> {
    let Some(floor) = acked_floor(conn, stream).await? else {
        return Ok(None);
    };
    let min_id = floor.min((cutoff_ms, 0));
    // Exact MINID (no `~`): predictable retention; the streams are small enough that the
    // radix-tree node splitting `~` avoids is not worth the imprecision.
    let removed: u64 = redis::cmd("XTRIM")
        .arg(stream)
        .arg("MINID")
        .arg(format!("{}-{}", min_id.0, min_id.1))
        .query_async(conn)
        .await
        .map_err(redis_err(format!("XTRIM {stream}")))?;
    Ok(Some(removed))
}
