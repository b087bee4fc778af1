//! `tokenwarden enqueue …` and `tokenwarden dead-letters …`: put jobs on streams, and inspect
//! and replay what the queue rejected.

use std::time::Duration;

use clap::Subcommand;
use sqlx::PgPool;

use super::registry::KNOWN_JOB_TYPES;
use super::streams::{now_ms, reply_key, stream_key};
use super::{QueueError, dead_letter, entry};
use crate::config::Config;

/// `tokenwarden dead-letters` subcommands.
#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// List dead letters, newest first (one JSON object per line).
    List {
        #[arg(long)]
        job_type: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Put a dead letter back on its stream (same fields) and mark it retried.
    Retry { id: i64 },
    /// Delete dead letters older than the given number of days.
    Purge {
        #[arg(long)]
        older_than_days: u32,
    },
}

/// Why an `enqueue` or `dead-letters` command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("unknown job type `{job_type}`; known job types: {}", KNOWN_JOB_TYPES.join(", "))]
    UnknownJobType { job_type: String },
    #[error("the job payload is not a JSON object: {0}")]
    InvalidJson(#[source] serde_json::Error),
    #[error("the job payload is not a JSON object: got {0}")]
    NotAnObject(serde_json::Value),
    #[error("--wait needs a `request_id` (UUID) in the payload: replies are keyed by it")]
    NoRequestId,
    #[error(
        "no reply for request {request_id} within {wait_ms} ms; the job stays queued and its \
         outcome will be readable in Postgres once a worker processes it"
    )]
    Timeout { request_id: String, wait_ms: u64 },
    #[error("dead letter {0} does not exist")]
    NoSuchDeadLetter(i64),
    #[error("dead letter {id} has unusable stored fields: {reason}")]
    BadDeadLetter { id: i64, reason: &'static str },
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// Runs one `dead-letters` command and prints its result on stdout.
pub async fn run(cmd: DeadLettersCommand, pool: &PgPool, cfg: &Config) -> Result<(), CliError> {
    match cmd {
        DeadLettersCommand::List { job_type, limit } => {
            for dl in dead_letter::list(pool, job_type.as_deref(), limit).await? {
                println!("{}", serde_json::to_string(&dl).unwrap_or_default());
            }
        }
        DeadLettersCommand::Retry { id } => {
            let dl = dead_letter::get(pool, id)
                .await?
                .ok_or(CliError::NoSuchDeadLetter(id))?;
            let (stream, fields) = dead_letter::replayable(&dl)
                .map_err(|reason| CliError::BadDeadLetter { id, reason })?;
            if fields.is_empty() {
                return Err(CliError::BadDeadLetter {
                    id,
                    reason: "no fields (XADD needs at least one)",
                });
            }
            let mut cmd = redis::cmd("XADD");
            cmd.arg(&stream).arg("*");
            for (k, v) in &fields {
                cmd.arg(k).arg(v);
            }
            let mut conn = redis_conn(cfg, Duration::from_secs(10)).await?;
            let new_id: String = cmd
                .query_async(&mut conn)
                .await
                .map_err(QueueError::redis(format!("XADD {}", dl.stream)))?;
            dead_letter::mark_retried(pool, id).await?;
            println!(
                "dead letter {id} re-enqueued on {} as entry {new_id}",
                dl.stream
            );
        }
        DeadLettersCommand::Purge { older_than_days } => {
            let n = dead_letter::purge_older_than(pool, older_than_days).await?;
            println!("{n} dead letters deleted");
        }
    }
    Ok(())
}

/// `tokenwarden enqueue <job-type> <json> [--wait <ms>]`: XADD one job; with `wait`, block up to
/// that many milliseconds for the reply and print it.
pub async fn enqueue(
    cfg: &Config,
    job_type: &str,
    json: &str,
    wait_ms: Option<u64>,
) -> Result<(), CliError> {
    if !KNOWN_JOB_TYPES.contains(&job_type) {
        return Err(CliError::UnknownJobType {
            job_type: job_type.to_string(),
        });
    }
    let payload: serde_json::Value = serde_json::from_str(json).map_err(CliError::InvalidJson)?;
    if !payload.is_object() {
        return Err(CliError::NotAnObject(payload));
    }
    let request_id = entry::request_id_of(&payload);
    if wait_ms.is_some() && request_id.is_none() {
        return Err(CliError::NoRequestId);
    }
    let timeout = Duration::from_millis(wait_ms.unwrap_or(0)) + Duration::from_secs(10);
    let mut conn = redis_conn(cfg, timeout).await?;
    let stream = stream_key(&cfg.redis.prefix, job_type);
    let id: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("payload")
        .arg(payload.to_string())
        .arg("enqueued_at")
        .arg(now_ms())
        .query_async(&mut conn)
        .await
        .map_err(QueueError::redis(format!("XADD {stream}")))?;
    let (Some(wait_ms), Some(request_id)) = (wait_ms, request_id) else {
        println!("{id}");
        return Ok(());
    };
    let key = reply_key(&cfg.redis.prefix, &request_id);
    let secs = (wait_ms as f64 / 1000.0).max(0.001);
    let reply: Option<(String, String)> = redis::cmd("BLPOP")
        .arg(&key)
        .arg(secs)
        .query_async(&mut conn)
        .await
        .map_err(QueueError::redis(format!("BLPOP {key}")))?;
    match reply {
        Some((_, json)) => {
            println!("{json}");
            Ok(())
        }
        None => Err(CliError::Timeout {
            request_id,
            wait_ms,
        }),
    }
}

/// A connection of its own (BLPOP blocks it) with a response timeout above the wait.
async fn redis_conn(
    cfg: &Config,
    timeout: Duration,
) -> Result<redis::aio::MultiplexedConnection, QueueError> {
    let client = redis::Client::open(secrecy::ExposeSecret::expose_secret(&cfg.redis.url))
        .map_err(QueueError::redis("open client"))?;
    let conn_cfg = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(timeout));
    client
        .get_multiplexed_async_connection_with_config(&conn_cfg)
        .await
        .map_err(QueueError::redis(format!(
            "connect to {}",
            cfg.redis.display_url()
        )))
}
