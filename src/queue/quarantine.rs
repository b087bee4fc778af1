//! The last resort for an entry whose dead letter cannot be stored.
//!
//! A dead letter is written to Postgres before its entry is acknowledged. If that insert keeps
//! failing for an entry already past the delivery limit, the entry would stay pending forever
//! and be claimed again on every pass. After [`EXTRA_PASSES`] more failed passes it is kept in
//! Redis instead, in the hash `{prefix}:quarantine:{job_type}` (field: entry id; value: JSON
//! with the stream, the reason, the delivery count and the exact bytes in base64, bounded as a
//! dead letter is), and acknowledged. Nothing is lost and the stream moves on. Every sweep
//! ([`super::unknown`], 30 s) moves quarantined entries into the dead-letter store once Postgres
//! takes them again; until then an operator reads the hash (`HGETALL`).
//!
//! The set `{prefix}:quarantined` names every quarantine hash holding entries, so the gauge and
//! the sweep find them without a SCAN of the whole keyspace (which holds Redis for every
//! other client while it runs). A hash and its name in the set are written in one MULTI, and
//! a name leaves the set only in the same atomic step that sees its hash empty.

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

/// The set naming every quarantine hash that holds entries.
fn index_key(prefix: &str) -> String {
    format!("{prefix}:quarantined")
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
    let _: () = redis::pipe()
        .atomic()
        .hset(&key, letter.entry_id, value.to_string())
        .ignore()
        .sadd(index_key(prefix), &key)
        .ignore()
        .query_async(conn)
        .await
        .map_err(QueueError::redis(format!(
            "HSET {} {}",
            String::from_utf8_lossy(&key),
            letter.entry_id
        )))?;
    Ok(())
}

/// Every quarantine hash named in the index, as raw key bytes, sorted.
async fn quarantine_keys<C: ConnectionLike>(
    conn: &mut C,
    prefix: &str,
) -> Result<Vec<Vec<u8>>, QueueError> {
    let index = index_key(prefix);
    let mut keys: Vec<Vec<u8>> = redis::cmd("SMEMBERS")
        .arg(&index)
        .query_async(conn)
        .await
        .map_err(QueueError::redis(format!("SMEMBERS {index}")))?;
    keys.sort();
    Ok(keys)
}

/// Names in the index the quarantine hashes an earlier version wrote without one (found with
/// one SCAN, so called once, when the sweep starts). Returns how many it added.
pub async fn index_unindexed<C: ConnectionLike>(
    conn: &mut C,
    prefix: &str,
) -> Result<u64, QueueError> {
    let keys = super::streams::scan_keys(conn, &format!("{prefix}:quarantine:*"), "hash").await?;
    if keys.is_empty() {
        return Ok(0);
    }
    let index = index_key(prefix);
    redis::cmd("SADD")
        .arg(&index)
        .arg(&keys)
        .query_async(conn)
        .await
        .map_err(QueueError::redis(format!("SADD {index}")))
}

/// Takes `key` out of the index when its hash is empty, in one atomic step: a `put` between
/// a check and a removal would otherwise leave a hash with entries that nothing names.
async fn unindex_if_empty<C: ConnectionLike>(
    conn: &mut C,
    prefix: &str,
    key: &[u8],
) -> Result<(), QueueError> {
    let _: i64 = redis::Script::new(
        "if redis.call('EXISTS', KEYS[1]) == 0 then return redis.call('SREM', KEYS[2], KEYS[1]) end return 0",
    )
    .key(key)
    .key(index_key(prefix))
    .invoke_async(conn)
    .await
    .map_err(QueueError::redis("SREM emptied quarantine hash"))?;
    Ok(())
}

/// How many entries the quarantine hashes hold in all (the `tokenwarden_queue_quarantined`
/// gauge): anything above 0 is an entry neither processed nor stored as a dead letter.
pub async fn count<C: ConnectionLike>(conn: &mut C, prefix: &str) -> Result<u64, QueueError> {
    let mut total = 0;
    for key in quarantine_keys(conn, prefix).await? {
        let n: u64 = redis::cmd("HLEN")
            .arg(&key)
            .query_async(conn)
            .await
            .map_err(QueueError::redis(format!(
                "HLEN {}",
                String::from_utf8_lossy(&key)
            )))?;
        total += n;
    }
    Ok(total)
}

/// Moves quarantined entries into the dead-letter store once Postgres takes them again (run by
/// the unknown-type sweep, every 30 s): each stored dead letter is removed from its hash. An
/// entry Postgres still refuses stays where it is. Returns how many were moved.
pub async fn drain_into_dead_letters<C: ConnectionLike>(
    conn: &mut C,
    pool: &sqlx::PgPool,
    prefix: &str,
) -> Result<usize, QueueError> {
    let keys = quarantine_keys(conn, prefix).await?;
    let mut moved = 0;
    for key in keys {
        let entries: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(&key)
            .query_async(conn)
            .await
            .map_err(QueueError::redis(format!(
                "HGETALL {}",
                String::from_utf8_lossy(&key)
            )))?;
        let job_type = key
            .strip_prefix(format!("{prefix}:quarantine:").as_bytes())
            .unwrap_or(&key);
        for (entry_id, json) in entries {
            let Some((stream, fields, reason, deliveries)) = decode(&json) else {
                tracing::warn!(entry_id, "quarantined entry is not readable; left in place");
                continue;
            };
            let letter = Letter {
                job_type,
                stream: &stream,
                entry_id: &entry_id,
                fields: &fields,
                deliveries,
            };
            if let Err(e) = super::dead_letter::insert_letter(pool, &letter, &reason).await {
                tracing::debug!(entry_id, error = %e, "quarantined entry still refused by Postgres");
                continue;
            }
            let _: i64 = redis::cmd("HDEL")
                .arg(&key)
                .arg(&entry_id)
                .query_async(conn)
                .await
                .map_err(QueueError::redis("HDEL quarantined entry"))?;
            moved += 1;
        }
        unindex_if_empty(conn, prefix, &key).await?;
    }
    Ok(moved)
}

type Decoded = (Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>, String, u64);

/// A quarantine value back into stream name, fields, reason and deliveries.
fn decode(json: &str) -> Option<Decoded> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let raw = &v["raw_entry"];
    let stream = b64.decode(raw["stream"].as_str()?).ok()?;
    let mut fields = Vec::new();
    for p in raw["fields"].as_array()? {
        fields.push((
            b64.decode(p[0].as_str()?).ok()?,
            b64.decode(p[1].as_str()?).ok()?,
        ));
    }
    let mut reason = v["reason"].as_str()?.to_string();
    let cut = v["truncated_bytes"].as_u64().unwrap_or(0);
    if cut > 0 {
        reason.push_str(&format!(" ({cut} bytes of the entry were cut)"));
    }
    Some((
        stream,
        fields,
        reason,
        v["deliveries"].as_u64().unwrap_or(0),
    ))
}
