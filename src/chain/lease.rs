//! One indexer per chain across replicas: a Postgres session advisory lock held on a dedicated
//! connection. The process that holds it is the chain's leader; its death closes the connection,
//! which releases the lock, and a standby (retrying every [`RETRY`]) takes over. The same
//! connection carries the leader's balances and checkpoint, so a replica that lost the lock
//! cannot change them (its backfill writers can only leave transfer rows above the checkpoint:
//! `ChainStore::commit_backfill_batch`).
//! Other single-leader work (the access monitor) takes a lease of its own key with
//! [`Lease::acquire_key`].

use std::time::Duration;

use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;

/// How often a standby tries to take the lease.
pub const RETRY: Duration = Duration::from_secs(2);

/// The held lease and its connection.
pub struct Lease {
    conn: PgConnection,
    key: i64,
    /// What the lease is for, in logs ("indexer of chain 1514").
    what: String,
}

/// The advisory-lock key of a chain: a fixed tag in the high bits so it does not collide with
/// other users of advisory locks (the scheduler lease uses its own key).
pub fn lock_key(chain_id: u64) -> i64 {
    ((0x7477_u64 << 48) | (chain_id & 0x0000_FFFF_FFFF_FFFF)) as i64
}

impl Lease {
    /// Waits until this process holds the lease of `chain_id`; `None` on shutdown.
    pub async fn acquire(
        database_url: &str,
        chain_id: u64,
        shutdown: &CancellationToken,
    ) -> Option<Lease> {
        // The application name lets operators (and tests) see which process leads which chain
        // in pg_stat_activity.
        Self::acquire_key(
            database_url,
            lock_key(chain_id),
            &format!("tokenwarden-indexer-{chain_id}"),
            &format!("indexer of chain {chain_id}"),
            shutdown,
        )
        .await
    }

    /// Waits until this process holds the advisory lock `key` on a connection named
    /// `{app_name}-pid{pid}`; `None` on shutdown. `what` names the work in logs.
    pub async fn acquire_key(
        database_url: &str,
        key: i64,
        app_name: &str,
        what: &str,
        shutdown: &CancellationToken,
    ) -> Option<Lease> {
        let mut logged_standby = false;
        loop {
            match Self::try_once(database_url, key, app_name, what).await {
                Ok(Some(lease)) => return Some(lease),
                Ok(None) => {
                    if !logged_standby {
                        tracing::info!(what, "another replica holds this lease; standing by");
                        logged_standby = true;
                    }
                }
                Err(e) => {
                    tracing::warn!(what, error = %e, "cannot try the lease");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(RETRY) => {}
            }
        }
    }

    async fn try_once(
        database_url: &str,
        key: i64,
        app_name: &str,
        what: &str,
    ) -> Result<Option<Lease>, sqlx::Error> {
        let opts: sqlx::postgres::PgConnectOptions = database_url.parse()?;
        let opts = opts.application_name(&format!("{app_name}-pid{}", std::process::id()));
        let mut conn = PgConnection::connect_with(&opts).await?;
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut conn)
            .await?;
        if got {
            tracing::info!(what, "took the lease");
            Ok(Some(Lease {
                conn,
                key,
                what: what.to_string(),
            }))
        } else {
            let _ = conn.close().await;
            Ok(None)
        }
    }

    /// The lease connection, for the leader's writes.
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.conn
    }

    /// Whether the session (and so the lock) is still alive.
    pub async fn alive(&mut self) -> bool {
        self.conn.ping().await.is_ok()
    }

    /// Releases the lock explicitly (on shutdown); dropping the connection would also do it.
    pub async fn release(mut self) {
        let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(self.key)
            .execute(&mut self.conn)
            .await;
        tracing::info!(what = %self.what, "released the lease");
        let _ = self.conn.close().await;
    }
}
