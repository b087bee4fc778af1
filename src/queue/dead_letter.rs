//! The `dead_letters` table: entries the queue acknowledged without processing, with why.

use sqlx::PgPool;

use super::QueueError;
use super::entry::StreamEntry;

/// One stored dead letter.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub job_type: String,
    pub stream: String,
    pub entry_id: String,
    pub fields: serde_json::Value,
    pub reason: String,
    pub deliveries: i32,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub retried_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Stores `entry` with `reason` and returns its dead letter's id. Called before the entry is
/// acknowledged, so a crash in between redelivers the entry instead of losing it; the entry's
/// second dead-lettering then keeps the first row (one row per stream entry).
pub async fn insert(pool: &PgPool, entry: &StreamEntry, reason: &str) -> Result<i64, QueueError> {
    metrics::counter!("tokenwarden_dead_letters_total", "job_type" => entry.job_type.to_string())
        .increment(1);
    sqlx::query_scalar(
        "WITH ins AS (
             INSERT INTO public.dead_letters (job_type, stream, entry_id, fields, reason, deliveries)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (stream, entry_id) DO NOTHING
             RETURNING id)
         SELECT id FROM ins
         UNION ALL
         SELECT d.id FROM public.dead_letters d
          WHERE d.stream = $2 AND d.entry_id = $3 AND NOT EXISTS (SELECT 1 FROM ins)
         LIMIT 1",
    )
    .bind(entry.job_type.as_ref())
    .bind(entry.stream.as_ref())
    .bind(&entry.id)
    .bind(entry.fields_json())
    .bind(reason)
    .bind(i32::try_from(entry.deliveries).unwrap_or(i32::MAX))
    .fetch_one(pool)
    .await
    .map_err(QueueError::pg(format!(
        "insert dead letter for {} entry {}",
        entry.stream, entry.id
    )))
}

/// Newest first, optionally of one job type.
pub async fn list(
    pool: &PgPool,
    job_type: Option<&str>,
    limit: i64,
) -> Result<Vec<DeadLetter>, QueueError> {
    sqlx::query_as(
        "SELECT id, job_type, stream, entry_id, fields, reason, deliveries, created_at, retried_at
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
        "SELECT id, job_type, stream, entry_id, fields, reason, deliveries, created_at, retried_at
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
