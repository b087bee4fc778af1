//! Each followed chain's head, read every `access.head_poll_secs` and stored in
//! `tw_access_chain_heads`, so the SQL evaluation can tell an index that lags its head by more
//! than `access.stale_after_blocks` (Postgres alone knows only the checkpoint). Every replica
//! writes it; the newest reading wins, which is all staleness needs.

use std::time::Duration;

use sqlx::PgPool;

use crate::app::AppContext;
use crate::chain::rpc::Rpc;

/// Starts one head watcher per configured chain when the chain indexer is enabled.
pub fn spawn(ctx: &AppContext) -> Vec<tokio::task::JoinHandle<()>> {
    if !ctx.cfg.chain.enabled {
        return Vec::new();
    }
    let every = Duration::from_secs(ctx.cfg.access.head_poll_secs);
    ctx.cfg
        .chain
        .chains
        .iter()
        .filter_map(|c| match Rpc::new(c, ctx.shutdown.clone()) {
            Ok(rpc) => Some((c.chain_id, rpc)),
            Err(e) => {
                tracing::error!(chain_id = c.chain_id, error = %e, "no head watcher for this chain");
                None
            }
        })
        .map(|(chain_id, rpc)| {
            let pool = ctx.pool.clone();
            let shutdown = ctx.shutdown.clone();
            tokio::spawn(async move {
                loop {
                    if let Err(e) = observe(&pool, &rpc, chain_id).await {
                        tracing::warn!(chain_id, error = %e, "cannot record the chain head");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(every) => {}
                    }
                }
            })
        })
        .collect()
}

/// Why a head reading was not stored.
#[derive(Debug, thiserror::Error)]
enum HeadError {
    #[error(transparent)]
    Rpc(#[from] crate::chain::rpc::RpcError),
    #[error("store the head: {0}")]
    Db(#[from] sqlx::Error),
}

async fn observe(pool: &PgPool, rpc: &Rpc, chain_id: u64) -> Result<(), HeadError> {
    let head = rpc.head().await?;
    record(pool, chain_id, head).await?;
    Ok(())
}

/// Stores `head` as chain `chain_id`'s head (tests call it to simulate a lagging index).
pub async fn record(pool: &PgPool, chain_id: u64, head: u64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO public.tw_access_chain_heads (chain_id, head, observed_at) VALUES ($1, $2, now()) \
         ON CONFLICT (chain_id) DO UPDATE SET head = EXCLUDED.head, observed_at = EXCLUDED.observed_at",
    )
    .bind(i64::try_from(chain_id).unwrap_or(i64::MAX))
    .bind(i64::try_from(head).unwrap_or(i64::MAX))
    .execute(pool)
    .await?;
    Ok(())
}
