//! The `snapshots` and `snapshot_holders` tables (migration `20261125000500_snapshots.sql`).
//!
//! Life of a snapshot: inserted `pending`; holders are written page by page (COPY); it becomes
//! `complete` in one UPDATE once every page is stored (and only if the stored rows are exactly the
//! crawl's own), or `failed` with the reason, in the same
//! transaction that deletes whatever holder rows it had. Readers and
//! `verify_address_in_snapshot` only trust `complete` snapshots.

use std::fmt::Write as _;

use sqlx::{Connection, PgConnection, PgPool, Row};
use uuid::Uuid;

use super::goldrush::Holder;

/// Where a snapshot's holders came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotSource {
    /// The GoldRush (Covalent) `token_holders_v2` API.
    #[serde(rename = "goldrush")]
    GoldRush,
    /// The worker's own Transfer index (`chain_transfers`).
    Index,
}

impl SnapshotSource {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotSource::GoldRush => "goldrush",
            SnapshotSource::Index => "index",
        }
    }
}

/// A snapshot's state. Only `Complete` snapshots answer address checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotStatus {
    Pending,
    Complete,
    Failed,
}

impl SnapshotStatus {
    fn parse(s: &str) -> Result<Self, sqlx::Error> {
        match s {
            "pending" => Ok(Self::Pending),
            "complete" => Ok(Self::Complete),
            "failed" => Ok(Self::Failed),
            other => Err(sqlx::Error::Decode(
                format!("unknown snapshot status {other:?}").into(),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Complete => "complete",
            Self::Failed => "failed",
        }
    }
}

/// One row of `snapshots`. `total_supply` is a decimal string (numeric(78,0)).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SnapshotRow {
    pub id: Uuid,
    pub request_id: Option<Uuid>,
    pub source: String,
    pub chain: String,
    pub token: String,
    pub block_height: Option<i64>,
    pub decimals: Option<i32>,
    pub holder_count: Option<i64>,
    pub total_supply: Option<String>,
    pub status: SnapshotStatus,
    pub error: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub completed_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// `SELECT <every column> FROM public.snapshots <tail>`, as one static string.
macro_rules! select_snapshot {
    ($tail:literal) => {
        concat!(
            "SELECT id, request_id, source, chain, token, block_height, decimals, holder_count, ",
            "total_supply::text AS total_supply, status, error, created_at, completed_at ",
            "FROM public.snapshots ",
            $tail
        )
    };
}

fn row_to_snapshot(r: sqlx::postgres::PgRow) -> Result<SnapshotRow, sqlx::Error> {
    Ok(SnapshotRow {
        id: r.try_get("id")?,
        request_id: r.try_get("request_id")?,
        source: r.try_get("source")?,
        chain: r.try_get("chain")?,
        token: r.try_get("token")?,
        block_height: r.try_get("block_height")?,
        decimals: r.try_get("decimals")?,
        holder_count: r.try_get("holder_count")?,
        total_supply: r.try_get("total_supply")?,
        status: SnapshotStatus::parse(r.try_get::<&str, _>("status")?)?,
        error: r.try_get("error")?,
        created_at: r.try_get("created_at")?,
        completed_at: r.try_get("completed_at")?,
    })
}

/// Reads one snapshot.
pub async fn get(pool: &PgPool, id: Uuid) -> Result<Option<SnapshotRow>, sqlx::Error> {
    sqlx::query(select_snapshot!("WHERE id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await?
        .map(row_to_snapshot)
        .transpose()
}

/// Reads the snapshot a job request id created, if any.
pub async fn get_by_request(
    pool: &PgPool,
    request_id: Uuid,
) -> Result<Option<SnapshotRow>, sqlx::Error> {
    sqlx::query(select_snapshot!("WHERE request_id = $1"))
        .bind(request_id)
        .fetch_optional(pool)
        .await?
        .map(row_to_snapshot)
        .transpose()
}

/// What a new snapshot is for.
#[derive(Debug, Clone)]
pub struct NewSnapshot<'a> {
    pub request_id: Option<Uuid>,
    pub source: SnapshotSource,
    pub chain: &'a str,
    pub token: &'a str,
    pub block_height: Option<u64>,
}

/// Inserts a `pending` snapshot and returns its id, or `None` when `request_id` already has one
/// (a concurrent or repeated delivery of the same job).
pub async fn insert_pending(
    pool: &PgPool,
    new: &NewSnapshot<'_>,
) -> Result<Option<Uuid>, sqlx::Error> {
    let id = Uuid::now_v7();
    let block = new
        .block_height
        .map(i64::try_from)
        .transpose()
        .map_err(|_| sqlx::Error::Encode("block_height does not fit in bigint".into()))?;
    let inserted: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO public.snapshots (id, request_id, source, chain, token, block_height) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (request_id) DO NOTHING RETURNING id",
    )
    .bind(id)
    .bind(new.request_id)
    .bind(new.source.as_str())
    .bind(new.chain)
    .bind(new.token)
    .bind(block)
    .fetch_optional(pool)
    .await?;
    Ok(inserted)
}

/// Deletes the holder rows of a snapshot that is still `pending` so its crawl can start over (a
/// redelivered job whose first worker died mid-crawl). The caller must hold the snapshot's
/// [`super::claim::CrawlClaim`]. Returns `false` (and deletes nothing) when the snapshot is no
/// longer pending, e.g. it completed between the caller's read and its claim.
pub async fn reset_pending(conn: &mut PgConnection, id: Uuid) -> Result<bool, sqlx::Error> {
    let pending: Option<bool> = sqlx::query_scalar(
        "WITH s AS (SELECT id FROM public.snapshots WHERE id = $1 AND status = 'pending' FOR UPDATE), \
              d AS (DELETE FROM public.snapshot_holders WHERE snapshot_id IN (SELECT id FROM s)) \
         SELECT true FROM s",
    )
    .bind(id)
    .fetch_optional(conn)
    .await?;
    Ok(pending.unwrap_or(false))
}

/// Appends holders with one COPY (text format: every value was validated as lowercase hex or
/// decimal digits, so nothing needs escaping). Returns the rows written.
pub async fn copy_holders(pool: &PgPool, id: Uuid, holders: &[Holder]) -> Result<u64, sqlx::Error> {
    if holders.is_empty() {
        return Ok(0);
    }
    let mut buf = String::with_capacity(holders.len() * 128);
    for h in holders {
        // Writing to a String cannot fail.
        let _ = writeln!(buf, "{id}\t{}\t{}", h.address, h.balance);
    }
    // Page commits need not wait for their own WAL flush: the snapshot only becomes visible
    // through `complete`, a normal (synchronous) commit that flushes the WAL written before it,
    // page rows included. A crash before that leaves a pending snapshot that is restarted.
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL synchronous_commit TO off")
        .execute(&mut *tx)
        .await?;
    let mut copy = tx
        .copy_in_raw("COPY public.snapshot_holders (snapshot_id, holder, balance) FROM STDIN")
        .await?;
    copy.send(buf.into_bytes()).await?;
    let rows = copy.finish().await?;
    tx.commit().await?;
    Ok(rows)
}

/// What a finished crawl learned about the token.
#[derive(Debug, Clone, Default)]
pub struct Completion {
    pub block_height: Option<u64>,
    pub decimals: Option<u32>,
    /// Decimal string.
    pub total_supply: Option<String>,
}

/// What [`complete`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completed {
    /// The snapshot is now `complete` with this many holders.
    Complete(i64),
    /// The snapshot was not pending any more; nothing changed.
    NotPending,
    /// The stored rows are not the rows this crawl wrote (another writer added or deleted some):
    /// nothing changed; the caller fails the snapshot.
    CountMismatch { stored: i64, expected: i64 },
}

/// Marks a pending snapshot complete, but only if the holder rows stored for it are exactly as
/// many as the crawl itself wrote (`expected`): a backstop against a concurrent restart that
/// deleted or added rows behind the crawl's back, which would otherwise publish a partial
/// snapshot as `complete`.
pub async fn complete(
    conn: &mut PgConnection,
    id: Uuid,
    c: &Completion,
    expected: i64,
) -> Result<Completed, sqlx::Error> {
    let block = c
        .block_height
        .map(i64::try_from)
        .transpose()
        .map_err(|_| sqlx::Error::Encode("block_height does not fit in bigint".into()))?;
    let (status, stored, updated): (String, i64, bool) = sqlx::query_as(
        "WITH cnt AS (SELECT count(*) AS n FROM public.snapshot_holders WHERE snapshot_id = $1), \
              upd AS ( \
                UPDATE public.snapshots SET status = 'complete', completed_at = now(), \
                  block_height = coalesce($2, block_height), decimals = $3, \
                  total_supply = $4::numeric, holder_count = $5 \
                WHERE id = $1 AND status = 'pending' AND (SELECT n FROM cnt) = $5 \
                RETURNING id) \
         SELECT s.status, (SELECT n FROM cnt), EXISTS (SELECT 1 FROM upd) \
         FROM public.snapshots s WHERE s.id = $1",
    )
    .bind(id)
    .bind(block)
    .bind(c.decimals.map(|d| d as i32))
    .bind(c.total_supply.as_deref())
    .bind(expected)
    .fetch_one(conn)
    .await?;
    Ok(if updated {
        Completed::Complete(expected)
    } else if status != "pending" {
        Completed::NotPending
    } else {
        Completed::CountMismatch { stored, expected }
    })
}

/// The sum of a snapshot's stored balances (decimal text; 0 when it has no holders).
pub async fn total_supply(
    conn: &mut PgConnection,
    id: Uuid,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT coalesce(sum(balance), 0)::text FROM public.snapshot_holders WHERE snapshot_id = $1",
    )
    .bind(id)
    .fetch_one(conn)
    .await
}

/// Marks a snapshot failed with `reason` and deletes its holder rows, in one transaction.
pub async fn fail(conn: &mut PgConnection, id: Uuid, reason: &str) -> Result<(), sqlx::Error> {
    let mut tx = conn.begin().await?;
    sqlx::query("DELETE FROM public.snapshot_holders WHERE snapshot_id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE public.snapshots SET status = 'failed', error = $2, completed_at = now() \
         WHERE id = $1 AND status = 'pending'",
    )
    .bind(id)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// The `n` largest holders of a snapshot (for `snapshot show`).
pub async fn top_holders(
    pool: &PgPool,
    id: Uuid,
    n: i64,
) -> Result<Vec<(String, String)>, sqlx::Error> {
    // `h.balance`, qualified: an unqualified `balance` in ORDER BY names the text output
    // column, which sorts "9" above "10".
    sqlx::query_as(
        "SELECT h.holder, h.balance::text AS balance FROM public.snapshot_holders h \
         WHERE h.snapshot_id = $1 ORDER BY h.balance DESC, h.holder LIMIT $2",
    )
    .bind(id)
    .bind(n)
    .fetch_all(pool)
    .await
}

/// Why an address check could not answer.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The database refused the question (unknown or incomplete snapshot, bad address or
    /// amount); the message is the function's own.
    #[error("{0}")]
    Refused(String),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
}

/// Runs `verify_address_in_snapshot`, the same function Supabase callers reach through
/// `supabase.rpc`, so the CLI and SQL callers share one rule.
pub async fn verify(
    pool: &PgPool,
    id: Uuid,
    wallet: &str,
    min_amount: &str,
) -> Result<bool, CheckError> {
    let res: Result<bool, sqlx::Error> =
        sqlx::query_scalar("SELECT public.verify_address_in_snapshot($1, $2, $3)")
            .bind(id)
            .bind(wallet)
            .bind(min_amount)
            .fetch_one(pool)
            .await;
    match res {
        Ok(b) => Ok(b),
        Err(sqlx::Error::Database(e))
            if matches!(e.code().as_deref(), Some("P0002" | "55000" | "22023")) =>
        {
            Err(CheckError::Refused(e.message().to_string()))
        }
        Err(e) => Err(CheckError::Db(e)),
    }
}

/// One line of a snapshot diff. Balances are decimal strings; `None` = not a holder.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DiffRow {
    pub holder: String,
    /// `joined`, `left` or `changed`.
    pub change: String,
    pub from_balance: Option<String>,
    pub to_balance: Option<String>,
}

/// Holders that joined, left or changed balance between two complete snapshots.
pub async fn diff(pool: &PgPool, from: Uuid, to: Uuid) -> Result<Vec<DiffRow>, sqlx::Error> {
    let rows: Vec<(String, String, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT coalesce(a.holder, b.holder) AS holder, \
                CASE WHEN a.holder IS NULL THEN 'joined' \
                     WHEN b.holder IS NULL THEN 'left' ELSE 'changed' END AS change, \
                a.balance::text, b.balance::text \
         FROM (SELECT holder, balance FROM public.snapshot_holders WHERE snapshot_id = $1) a \
         FULL OUTER JOIN (SELECT holder, balance FROM public.snapshot_holders WHERE snapshot_id = $2) b \
           ON a.holder = b.holder \
         WHERE a.holder IS NULL OR b.holder IS NULL OR a.balance <> b.balance \
         ORDER BY 2, 1",
    )
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(holder, change, from_balance, to_balance)| DiffRow {
            holder,
            change,
            from_balance,
            to_balance,
        })
        .collect())
}
