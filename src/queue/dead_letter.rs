//! The `dead_letters` table: entries the queue acknowledged without processing, with why.
//!
//! A dead letter must be storable whatever the entry holds: Redis accepts any bytes in a
//! field name, a value or a key, while Postgres text and jsonb refuse NUL and bytes that are
//! not UTF-8. [`Kept`] is how an entry is written down: `fields` is the readable view (field
//! name → text); an entry that view cannot hold exactly also gets `raw_entry` (stream name and
//! fields in base64, in entry order), which `dead-letters retry` replays byte for byte. A dead
//! letter is bounded: fields beyond [`MAX_KEPT_BYTES`] are cut and `truncated_bytes` says how
//! much; the reason is cut at [`MAX_REASON_CHARS`].

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use sqlx::PgPool;

use super::QueueError;
use super::entry::StreamEntry;

/// Field bytes (names and values) one dead letter keeps; the rest is counted, not stored.
pub const MAX_KEPT_BYTES: usize = 256 * 1024;

/// Characters of the reason one dead letter keeps.
pub const MAX_REASON_CHARS: usize = 2048;

/// One stored dead letter.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub job_type: String,
    pub stream: String,
    pub entry_id: String,
    pub fields: serde_json::Value,
    /// The exact bytes (`{"stream": b64, "fields": [[b64 name, b64 value], ...]}`) when
    /// `fields` is not exact; `None` when it is.
    pub raw_entry: Option<serde_json::Value>,
    /// Bytes of the entry's fields not kept (0: the dead letter is complete).
    pub truncated_bytes: i64,
    pub reason: String,
    pub deliveries: i32,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub retried_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// What is known of an entry to dead-letter: everything as Redis gave it.
#[derive(Debug, Clone, Copy)]
pub struct Letter<'a> {
    pub job_type: &'a [u8],
    pub stream: &'a [u8],
    pub entry_id: &'a str,
    pub fields: &'a [(Vec<u8>, Vec<u8>)],
    pub deliveries: u64,
}

impl<'a> From<&'a StreamEntry> for Letter<'a> {
    fn from(e: &'a StreamEntry) -> Self {
        Letter {
            job_type: e.job_type.as_bytes(),
            stream: e.stream.as_bytes(),
            entry_id: &e.id,
            fields: &e.fields,
            deliveries: e.deliveries,
        }
    }
}

/// An entry written down so Postgres can store it.
#[derive(Debug, Clone, PartialEq)]
pub struct Kept {
    pub job_type: String,
    pub stream: String,
    /// Field name → text. Exact when `raw_entry` is `None`; else escaped: NUL as `\u0000`,
    /// bytes that are not UTF-8 as `\xNN`, a backslash as `\\`, and a name seen before
    /// gets `#2`, `#3`… appended.
    pub fields: serde_json::Value,
    pub raw_entry: Option<serde_json::Value>,
    /// The exact bytes kept, always (what `raw_entry` holds when it is set).
    pub raw: serde_json::Value,
    pub truncated_bytes: u64,
}

impl Kept {
    /// Writes `letter` down (see [`Kept`]).
    pub fn of(letter: &Letter<'_>) -> Kept {
        let mut budget = MAX_KEPT_BYTES;
        let mut truncated = 0u64;
        let mut cut = |b: &[u8]| -> Vec<u8> {
            let n = b.len().min(budget);
            budget -= n;
            truncated += (b.len() - n) as u64;
            b[..n].to_vec()
        };
        let kept: Vec<(Vec<u8>, Vec<u8>)> = letter
            .fields
            .iter()
            .map(|(k, v)| (cut(k), cut(v)))
            .collect();
        let (job_type, _) = escape(letter.job_type);
        let (stream, _) = escape(letter.stream);
        let mut names = std::collections::HashSet::new();
        let exact = truncated == 0
            && is_text(letter.stream)
            && kept
                .iter()
                .all(|(k, v)| names.insert(k.as_slice()) && is_text(k) && is_text(v));
        let mut map = serde_json::Map::new();
        for (k, v) in &kept {
            let (mut name, value) = if exact {
                (escape(k).0, escape(v).0)
            } else {
                (escape_all(k), escape_all(v))
            };
            if map.contains_key(&name) {
                let base = name.clone();
                let mut n = 2;
                while map.contains_key(&name) {
                    name = format!("{base}#{n}");
                    n += 1;
                }
            }
            map.insert(name, serde_json::Value::String(value));
        }
        let raw = serde_json::json!({
            "stream": B64.encode(letter.stream),
            "fields": kept
                .iter()
                .map(|(k, v)| serde_json::json!([B64.encode(k), B64.encode(v)]))
                .collect::<Vec<_>>(),
        });
        Kept {
            job_type,
            stream,
            fields: serde_json::Value::Object(map),
            raw_entry: (!exact).then(|| raw.clone()),
            raw,
            truncated_bytes: truncated,
        }
    }
}

/// Whether Postgres text holds `bytes` as they are: UTF-8 without NUL.
fn is_text(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_ok_and(|s| !s.contains('\0'))
}

/// `bytes` as text Postgres can store, and whether that text is exactly the bytes (then it is
/// unchanged; else it is [`escape_all`]).
pub fn escape(bytes: &[u8]) -> (String, bool) {
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.contains('\0') => (s.to_string(), true),
        _ => (escape_all(bytes), false),
    }
}

/// `bytes` escaped: NUL as `\u0000`, each byte that is not UTF-8 as `\xNN`, a backslash as
/// `\\`; everything else as it is.
pub fn escape_all(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() + 8);
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\0' => out.push_str("\\u0000"),
                '\\' => out.push_str("\\\\"),
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// `reason` as Postgres text: NUL escaped, at most [`MAX_REASON_CHARS`] characters.
pub fn bounded_reason(reason: &str) -> String {
    let r = reason.replace('\0', "\\u0000");
    if r.chars().count() <= MAX_REASON_CHARS {
        return r;
    }
    let mut cut: String = r.chars().take(MAX_REASON_CHARS).collect();
    cut.push_str("… (cut)");
    cut
}

/// A dead letter's stream name and fields, as bytes to XADD again.
pub type Replay = (Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>);

/// The exact bytes of a dead letter: its stream name and fields, from `raw_entry` when there
/// is one, else from `fields`. `Err` names what is unusable.
pub fn replayable(dl: &DeadLetter) -> Result<Replay, &'static str> {
    if dl.truncated_bytes > 0 {
        return Err("its fields were cut to keep it bounded; the entry is incomplete");
    }
    let Some(raw) = &dl.raw_entry else {
        let serde_json::Value::Object(fields) = &dl.fields else {
            return Err("fields is not a JSON object");
        };
        let fields = fields
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    serde_json::Value::String(s) => s.clone().into_bytes(),
                    other => other.to_string().into_bytes(),
                };
                (k.clone().into_bytes(), v)
            })
            .collect();
        return Ok((dl.stream.clone().into_bytes(), fields));
    };
    let decode = |v: &serde_json::Value| v.as_str().and_then(|s| B64.decode(s).ok());
    let stream = decode(&raw["stream"]).ok_or("raw_entry.stream is not base64")?;
    let pairs = raw["fields"]
        .as_array()
        .ok_or("raw_entry.fields is not an array")?;
    let mut fields = Vec::with_capacity(pairs.len());
    for p in pairs {
        match (decode(&p[0]), decode(&p[1])) {
            (Some(k), Some(v)) => fields.push((k, v)),
            _ => return Err("raw_entry.fields holds a pair that is not base64"),
        }
    }
    Ok((stream, fields))
}

/// Stores `entry` with `reason` and returns its dead letter's id. Called before the entry is
/// acknowledged, so a crash in between redelivers the entry instead of losing it; the entry's
/// second dead-lettering then keeps the first row (one row per stream entry).
pub async fn insert(pool: &PgPool, entry: &StreamEntry, reason: &str) -> Result<i64, QueueError> {
    insert_letter(pool, &Letter::from(entry), reason).await
}

/// [`insert`] for an entry known only by its bytes (a stream whose name is not UTF-8).
pub async fn insert_letter(
    pool: &PgPool,
    letter: &Letter<'_>,
    reason: &str,
) -> Result<i64, QueueError> {
    let kept = Kept::of(letter);
    metrics::counter!("tokenwarden_dead_letters_total", "job_type" => kept.job_type.clone())
        .increment(1);
    sqlx::query_scalar(
        "WITH ins AS (
             INSERT INTO public.dead_letters
                    (job_type, stream, entry_id, fields, raw_entry, truncated_bytes, reason, deliveries)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (stream, entry_id) DO NOTHING
             RETURNING id)
         SELECT id FROM ins
         UNION ALL
         SELECT d.id FROM public.dead_letters d
          WHERE d.stream = $2 AND d.entry_id = $3 AND NOT EXISTS (SELECT 1 FROM ins)
         LIMIT 1",
    )
    .bind(&kept.job_type)
    .bind(&kept.stream)
    .bind(letter.entry_id)
    .bind(&kept.fields)
    .bind(&kept.raw_entry)
    .bind(i64::try_from(kept.truncated_bytes).unwrap_or(i64::MAX))
    .bind(bounded_reason(reason))
    .bind(i32::try_from(letter.deliveries).unwrap_or(i32::MAX))
    .fetch_one(pool)
    .await
    .map_err(QueueError::pg(format!(
        "insert dead letter for {} entry {}",
        kept.stream, letter.entry_id
    )))
}

/// Newest first, optionally of one job type.
pub async fn list(
    pool: &PgPool,
    job_type: Option<&str>,
    limit: i64,
) -> Result<Vec<DeadLetter>, QueueError> {
    sqlx::query_as(
        "SELECT id, job_type, stream, entry_id, fields, raw_entry, truncated_bytes, reason,
                deliveries, created_at, retried_at
         FROM public.dead_letters
         WHERE $1::text IS NULL OR job_type = $1
         ORDER BY id DESC LIMIT $2",
    )
    .bind(job_type)
    .bind(limit)
    .fetch_all(pool)
    .await
    .map_err(QueueError::pg("list dead letters"))
}

/// One dead letter by id.
pub async fn get(pool: &PgPool, id: i64) -> Result<Option<DeadLetter>, QueueError> {
    sqlx::query_as(
        "SELECT id, job_type, stream, entry_id, fields, raw_entry, truncated_bytes, reason,
                deliveries, created_at, retried_at
         FROM public.dead_letters WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
    .map_err(QueueError::pg(format!("read dead letter {id}")))
}

/// Records that dead letter `id` was put back on its stream.
pub async fn mark_retried(pool: &PgPool, id: i64) -> Result<(), QueueError> {
    sqlx::query("UPDATE public.dead_letters SET retried_at = now() WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await
        .map_err(QueueError::pg(format!("mark dead letter {id} retried")))?;
    Ok(())
}

/// Deletes dead letters created more than `days` days ago; returns how many.
pub async fn purge_older_than(pool: &PgPool, days: u32) -> Result<u64, QueueError> {
    let res = sqlx::query(
        "DELETE FROM public.dead_letters WHERE created_at < now() - make_interval(days => $1)",
    )
    .bind(i32::try_from(days).unwrap_or(i32::MAX))
    .execute(pool)
    .await
    .map_err(QueueError::pg("purge dead letters"))?;
    Ok(res.rows_affected())
}

/// Dead letters not yet put back on their stream.
pub async fn count_open(pool: &PgPool) -> Result<i64, QueueError> {
    sqlx::query_scalar("SELECT count(*) FROM public.dead_letters WHERE retried_at IS NULL")
        .fetch_one(pool)
        .await
        .map_err(QueueError::pg("count open dead letters"))
}
