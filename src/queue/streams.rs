//! The stream layout and every stream operation more than one part of the worker needs: the
//! keys of a job type's stream and its side keys, listing the job streams, stream ids, and how
//! far every consumer group has acknowledged a stream (the floor pruning trims below and the
//! oldest-entry gauge starts from).
//!
//! Job streams are found with SCAN, not from the registry: streams of job types this process
//! does not serve (another replica's, or nobody's) are swept, pruned and measured too. A SCAN
//! pass visits every key of the Redis database, so only the unknown-type sweep (every 30 s)
//! and pruning list the streams; the gauges reuse the sweep's last list.

use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::streams::{StreamInfoGroup, StreamInfoGroupsReply, StreamPendingReply};

use super::QueueError;

/// The head every job stream key starts with.
fn jobs_head(prefix: &str) -> String {
    format!("{prefix}:jobs:")
}

/// The stream a job type lives on.
pub fn stream_key(prefix: &str, job_type: &str) -> String {
    format!("{}{job_type}", jobs_head(prefix))
}

/// The job type of a job stream key (`None` for a key outside `{prefix}:jobs:`). Bytes: a
/// caller may XADD to a key that is not UTF-8.
pub fn job_type_of_bytes<'a>(prefix: &str, stream: &'a [u8]) -> Option<&'a [u8]> {
    stream.strip_prefix(jobs_head(prefix).as_bytes())
}

/// A key as text for logs and errors (bytes that are not UTF-8 replaced).
pub fn shown(key: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(key)
}

/// The list a caller waiting for `request_id` BLPOPs.
pub fn reply_key(prefix: &str, request_id: &str) -> String {
    format!("{prefix}:reply:{request_id}")
}

/// The hash keeping the last retryable error of each pending entry of a stream, so the
/// dead letter written at the delivery limit carries the real reason.
pub fn last_error_key(prefix: &str, job_type: &str) -> String {
    format!("{prefix}:lasterr:{job_type}")
}

/// The hash counting, per consumer name, the entries each consumer finished: shows how the
/// replicas share a stream.
pub fn processed_key(prefix: &str, job_type: &str) -> String {
    format!("{prefix}:processed:{job_type}")
}

/// Every job stream under `{prefix}:jobs:`, sorted, each once. Keys are bytes: a key name that
/// is not UTF-8 is listed too, not an error. One pass over the whole keyspace (see
/// [`scan_keys`]): the unknown-type sweep and pruning call it, the gauges read what the sweep
/// found last ([`crate::app::JobStreams`]).
pub async fn job_streams<C: ConnectionLike>(
    conn: &mut C,
    prefix: &str,
) -> Result<Vec<Vec<u8>>, QueueError> {
    scan_keys(conn, &format!("{}*", jobs_head(prefix)), "stream").await
}

/// Keys SCAN looks at per call. SCAN walks the whole keyspace whatever MATCH says, and the
/// keyspace is mostly the access cache's decisions and reply lists (hundreds of thousands of
/// keys under load). Redis runs one command at a time, so each call holds every other client
/// for as long as it takes: ~1 µs per key visited. 1,000 per call held Redis 1–35 ms per call
/// on the 2-core machine and set the access checks' p99 (docs/benchmarks.md); 100 holds it
/// ~0.1 ms.
const SCAN_COUNT: u64 = 100;

/// Every key matching `pattern` whose type is `key_type`, sorted, each once (SCAN may return a
/// key twice). Costs one pass over the whole keyspace: for periodic work, not per request.
pub async fn scan_keys<C: ConnectionLike>(
    conn: &mut C,
    pattern: &str,
    key_type: &str,
) -> Result<Vec<Vec<u8>>, QueueError> {
    let mut cursor: u64 = 0;
    let mut out = Vec::new();
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .arg("TYPE")
            .arg(key_type)
            .query_async(conn)
            .await
            .map_err(QueueError::redis(format!("SCAN {pattern}")))?;
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

/// A stream entry id, `<ms>-<seq>`; ordered as Redis orders entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct StreamId {
    /// Unix time in milliseconds of the XADD (or the id the caller chose).
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    /// Parses a full id `ms-seq`.
    pub fn parse(id: &str) -> Option<Self> {
        let (ms, seq) = id.split_once('-')?;
        Some(Self {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }

    /// The smallest id a stream can hold at or after `ms`.
    pub fn at_ms(ms: u64) -> Self {
        Self { ms, seq: 0 }
    }

    /// The id right after this one.
    fn successor(self) -> Self {
        Self {
            ms: self.ms,
            seq: self.seq.saturating_add(1),
        }
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// The millisecond part of a stream id (`ms-seq`, or a bare `ms`).
pub fn id_ms(id: &str) -> Option<u64> {
    id.split('-').next().and_then(|ms| ms.parse().ok())
}

/// Unix time in milliseconds: the clock of stream ids and of the `enqueued_at` field.
pub fn now_ms() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0)
}

/// How long ago `ms` (unix milliseconds) was; zero for a time in the future.
pub fn age_of(ms: u64) -> Duration {
    Duration::from_millis(now_ms().saturating_sub(ms))
}

/// The consumer groups of `stream` (XINFO GROUPS): pending count, last delivered id, lag.
pub async fn groups<C: ConnectionLike>(
    conn: &mut C,
    stream: &[u8],
) -> Result<Vec<StreamInfoGroup>, QueueError> {
    let reply: StreamInfoGroupsReply = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await
        .map_err(QueueError::redis(format!("XINFO GROUPS {}", shown(stream))))?;
    Ok(reply.groups)
}

/// The id below which every entry of `stream` is acknowledged by every consumer group: per
/// group its oldest pending entry, else the entry after its last-delivered id; the lowest of
/// those. `None` when the stream has no group yet (nothing was consumed, nothing may go).
pub async fn acked_floor<C: ConnectionLike>(
    conn: &mut C,
    stream: &[u8],
) -> Result<Option<StreamId>, QueueError> {
    let mut floor: Option<StreamId> = None;
    for g in groups(conn, stream).await? {
        let Some(last) = StreamId::parse(&g.last_delivered_id) else {
            continue;
        };
        // Entries up to last-delivered are delivered; the first still pending bounds them.
        let summary: StreamPendingReply = redis::cmd("XPENDING")
            .arg(stream)
            .arg(&g.name)
            .query_async(conn)
            .await
            .map_err(QueueError::redis(format!(
                "XPENDING {} {}",
                shown(stream),
                g.name
            )))?;
        let oldest_pending = match summary {
            StreamPendingReply::Data(d) => StreamId::parse(&d.start_id),
            _ => None,
        };
        let group_floor = oldest_pending.unwrap_or(last.successor());
        floor = Some(floor.map_or(group_floor, |f| f.min(group_floor)));
    }
    Ok(floor)
}

/// Trims the entries of `stream` older than `cutoff_ms` that every group has acknowledged.
/// Returns the number removed, or `None` when the stream has no consumer group yet.
async fn trim_acked_before<C: ConnectionLike>(
    conn: &mut C,
    stream: &[u8],
    cutoff_ms: u64,
) -> Result<Option<u64>, QueueError> {
    let Some(floor) = acked_floor(conn, stream).await? else {
        return Ok(None);
    };
    let min_id = floor.min(StreamId::at_ms(cutoff_ms));
    // Exact MINID (no `~`): predictable retention; the streams are small enough that the
    // radix-tree node splitting `~` avoids is not worth the imprecision.
    let removed: u64 = redis::cmd("XTRIM")
        .arg(stream)
        .arg("MINID")
        .arg(min_id.to_string())
        .query_async(conn)
        .await
        .map_err(QueueError::redis(format!("XTRIM {}", shown(stream))))?;
    Ok(Some(removed))
}

/// What [`trim_job_streams`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Trimmed {
    /// Job streams XTRIM was called on (those with a consumer group).
    pub streams: u64,
    /// Entries removed in total.
    pub entries: u64,
}

/// Trims, on every job stream, the entries older than `retention` that every group has
/// acknowledged. Streams without a group keep everything. A stream that cannot be trimmed is
/// logged and skipped: one odd key must not stop the others being pruned.
pub async fn trim_job_streams<C: ConnectionLike>(
    conn: &mut C,
    prefix: &str,
    retention: Duration,
) -> Result<Trimmed, QueueError> {
    let cutoff_ms =
        now_ms().saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
    let mut out = Trimmed::default();
    for stream in job_streams(conn, prefix).await? {
        match trim_acked_before(conn, &stream, cutoff_ms).await {
            Ok(Some(removed)) => {
                out.streams += 1;
                out.entries += removed;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(stream = %shown(&stream), error = %e, "stream not trimmed; the others are")
            }
        }
    }
    Ok(out)
}

/// Entries in `stream` (XLEN), acknowledged ones included until they are trimmed.
pub async fn length<C: ConnectionLike>(conn: &mut C, stream: &[u8]) -> Result<u64, QueueError> {
    redis::cmd("XLEN")
        .arg(stream)
        .query_async(conn)
        .await
        .map_err(QueueError::redis(format!("XLEN {}", shown(stream))))
}

/// The id of the first entry of `stream` at or after `start` (`-` for the first entry).
pub async fn first_id_from<C: ConnectionLike>(
    conn: &mut C,
    stream: &[u8],
    start: &str,
) -> Result<Option<StreamId>, QueueError> {
    let entries: Vec<(String, redis::Value)> = redis::cmd("XRANGE")
        .arg(stream)
        .arg(start)
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query_async(conn)
        .await
        .map_err(QueueError::redis(format!(
            "XRANGE {} {start}",
            shown(stream)
        )))?;
    Ok(entries.first().and_then(|(id, _)| StreamId::parse(id)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_job_types_round_trip() {
        let key = stream_key("tw", "prune");
        assert_eq!(key, "tw:jobs:prune");
        assert_eq!(job_type_of_bytes("tw", key.as_bytes()), Some(&b"prune"[..]));
        assert_eq!(job_type_of_bytes("tw", b"tw:reply:x"), None);
        assert_eq!(job_type_of_bytes("other", key.as_bytes()), None);
    }

    #[test]
    fn stream_ids_parse_and_order_as_redis_does() {
        let a = StreamId::parse("1700000000000-9").expect("id");
        let b = StreamId::parse("1700000000001-0").expect("id");
        assert!(a < b);
        assert!(a.successor() < b);
        assert_eq!(a.successor().to_string(), "1700000000000-10");
        assert_eq!(StreamId::parse("1700000000000"), None);
        assert_eq!(StreamId::parse("x-1"), None);
        assert_eq!(id_ms("1700000000000-3"), Some(1_700_000_000_000));
        assert_eq!(id_ms("1700000000000"), Some(1_700_000_000_000));
    }
}
