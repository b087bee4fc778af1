//! The exclusive right to crawl one snapshot: a Postgres session advisory lock keyed by the
//! snapshot id, held on a connection of its own for the whole crawl.
//!
//! Why a session advisory lock rather than a lease column: it needs no clock, no renewal and no
//! expiry tuning, and Postgres drops it the moment the holder's session ends. A worker that dies
//! mid-crawl (crash, OOM, SIGKILL, lost network) closes its socket, the server ends the session
//! and a later redelivery of the same request can claim the snapshot and restart it. A live
//! crawler keeps its claim however long the crawl takes.
//!
//! The claim connection is checked out of the pool (it counts against `max_connections`) and is
//! closed, never returned, when the claim ends: a pooled session that still held the lock would
//! block every later restart of that snapshot.

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};
use uuid::Uuid;

/// The advisory-lock key of a snapshot: the two halves of its id folded into one bigint.
fn lock_key(id: Uuid) -> i64 {
    let v = id.as_u128();
    ((v >> 64) as u64 ^ v as u64) as i64
}

/// Held while one worker crawls a snapshot. Dropping it closes its connection, which releases
/// the lock; [`CrawlClaim::release`] does so explicitly.
#[derive(Debug)]
pub struct CrawlClaim {
    conn: PoolConnection<Postgres>,
    id: Uuid,
}

impl CrawlClaim {
    /// Claims snapshot `id` without waiting. `None` when another session holds it (a live
    /// crawler: the caller must leave the snapshot's rows alone).
    pub async fn try_claim(pool: &PgPool, id: Uuid) -> Result<Option<Self>, sqlx::Error> {
        let mut conn = pool.acquire().await?;
        // Whatever happens next, this connection never goes back to the pool.
        conn.close_on_drop();
        let got: bool = sqlx::query_scalar("SELECT pg_catalog.pg_try_advisory_lock($1)")
            .bind(lock_key(id))
            .fetch_one(&mut *conn)
            .await?;
        if got {
            Ok(Some(Self { conn, id }))
        } else {
            let _ = conn.close().await;
            Ok(None)
        }
    }

    /// The claim's own connection. Writes that decide the snapshot's status (complete, fail)
    /// run on it: if the session (and so the lock) was lost, they fail instead of acting
    /// without the claim.
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.conn
    }

    /// Releases the lock and closes the connection.
    pub async fn release(mut self) {
        let unlocked: Result<bool, sqlx::Error> =
            sqlx::query_scalar("SELECT pg_catalog.pg_advisory_unlock($1)")
                .bind(lock_key(self.id))
                .fetch_one(&mut *self.conn)
                .await;
        if let Err(e) = unlocked {
            // Closing the session below releases it anyway.
            tracing::debug!(snapshot_id = %self.id, error = %e, "advisory unlock failed");
        }
        let _ = self.conn.close().await;
    }
}
