//! The last resort for an entry whose dead letter cannot be stored.
//!
//! A dead letter is written to Postgres before its entry is acknowledged. If that insert keeps
//! failing for an entry already past the delivery limit, the entry would stay pending forever
//! and be claimed again on every pass. After [`EXTRA_PASSES`] more failed passes it is kept in
//! Redis instead, in the hash `{prefix}:quarantine:{job_type}` (field: entry id; value: JSON
//! with the stream, the reason, the delivery count and the exact bytes in base64, bounded as a
//! dead letter is), and acknowledged. Nothing is lost and the stream moves on; an operator reads
//! the hash (`HGETALL`) and replays what matters.

use redis::aio::ConnectionLike;

use super::QueueError;
use super::dead_letter::{Kept, Letter, bounded_reason};

/// Claim passes past the delivery limit during which the dead-letter insert is retried before
/// the entry is quarantined.
pub const EXTRA_PASSES: u64 = 3;

/// The hash quarantined entries of `job_type` are kept in.
pub fn quarantine_key(prefix: &str, job_type: &[u8]) -> Vec<u8> {
    let mut k = format!("{prefix}:quarantine:").into_bytes();
    k.extend_from_slice(job_type);
    k
}

/// Keeps `letter` in its job type's quarantine hash with `reason` (the dead letter's reason and
/// why it could not be stored).
pub async fn put<C: ConnectionLike>(
    conn: &mut C,
    prefix: &str,
    letter: &Letter<'_>,
    reason: &str,
) -> Result<(), QueueError> {
    let kept = Kept::of(letter);
    let value = serde_json::json!({
        "job_type": kept.job_type,
        "stream": kept.stream,
        "entry_id": letter.entry_id,
        "deliveries": letter.deliveries,
        "reason": bounded_reason(reason),
        "raw_entry": kept.raw,
        "truncated_bytes": kept.truncated_bytes,
        "quarantined_at_ms": super::streams::now_ms(),
    });
    let key = quarantine_key(prefix, letter.job_type);
    let _: i64 = redis::cmd("HSET")
        .arg(&key)
        .arg(letter.entry_id)
        .arg(value.to_string())
        .query_async(conn)
        .await
        .map_err(QueueError::redis(format!(
            "HSET {} {}",
            String::from_utf8_lossy(&key),
            letter.entry_id
        )))?;
    Ok(())
}
