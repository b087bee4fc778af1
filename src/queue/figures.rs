//! The figures behind the queue gauges, read in one place: per job stream its length, the
//! group's pending entries and lag, the age of the oldest entry not acknowledged by every group,
//! and the dead letters not yet retried. The operations sampler records them; nothing here
//! touches a metric.

use std::time::Duration;

use redis::aio::ConnectionLike;
use sqlx::PgPool;

use super::{QueueError, dead_letter, quarantine, streams};

/// One job stream's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamFigures {
    pub job_type: String,
    /// XLEN: entries in the stream, acknowledged ones included until pruned.
    pub depth: u64,
    /// Entries delivered to this process's group and not acknowledged (`None`: no such group).
    pub pending: Option<u64>,
    /// Entries not yet delivered to the group (`None`: no group, or Redis cannot tell).
    pub lag: Option<u64>,
    /// Age of the oldest entry some group has not acknowledged; zero when there is none.
    pub oldest_unacked_age: Duration,
}

/// One sample of every queue figure.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueFigures {
    /// Per job stream; a stream that could not be read is left out (and logged).
    pub streams: Vec<StreamFigures>,
    /// Dead letters not yet retried; `None` when the table could not be read (logged).
    pub open_dead_letters: Option<i64>,
    /// Entries in the quarantine hashes (`{prefix}:quarantine:*`); `None` when Redis could
    /// not be read (logged).
    pub quarantined: Option<u64>,
}

/// Reads every figure once, for the job streams `listed` (the unknown-type sweep's last list:
/// listing them again here would be one more SCAN of the whole keyspace per sample). `group`
/// is this process's consumer group (`queue.group`). Failures are logged and only leave their
/// figure out: a sample is best effort.
pub async fn sample<C: ConnectionLike>(
    conn: &mut C,
    pool: &PgPool,
    prefix: &str,
    group: &str,
    listed: &[Vec<u8>],
) -> QueueFigures {
    let mut out = QueueFigures::default();
    for stream in listed {
        let job_type = streams::job_type_of_bytes(prefix, stream).unwrap_or(stream);
        let job_type = streams::shown(job_type).into_owned();
        match stream_figures(conn, stream, &job_type, group).await {
            Ok(f) => out.streams.push(f),
            Err(e) => {
                tracing::debug!(stream = %streams::shown(stream), error = %e, "cannot sample stream")
            }
        }
    }
    match dead_letter::count_open(pool).await {
        Ok(n) => out.open_dead_letters = Some(n),
        Err(e) => tracing::debug!(error = %e, "cannot count dead letters"),
    }
    match quarantine::count(conn, prefix).await {
        Ok(n) => out.quarantined = Some(n),
        Err(e) => tracing::debug!(error = %e, "cannot count quarantined entries"),
    }
    out
}

async fn stream_figures<C: ConnectionLike>(
    conn: &mut C,
    stream: &[u8],
    job_type: &str,
    group: &str,
) -> Result<StreamFigures, QueueError> {
    let depth = streams::length(conn, stream).await?;
    let ours = streams::groups(conn, stream)
        .await?
        .into_iter()
        .find(|g| g.name == group);
    // The oldest entry not acknowledged by every group: the first at or after the floor.
    let start = match streams::acked_floor(conn, stream).await? {
        Some(floor) => floor.to_string(),
        None => "-".to_string(),
    };
    let oldest = streams::first_id_from(conn, stream, &start).await?;
    Ok(StreamFigures {
        job_type: job_type.to_string(),
        depth,
        pending: ours.as_ref().map(|g| g.pending as u64),
        lag: ours.and_then(|g| g.lag).map(|l| l as u64),
        oldest_unacked_age: oldest.map_or(Duration::ZERO, |id| streams::age_of(id.ms)),
    })
}
