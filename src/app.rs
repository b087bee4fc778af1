//! What every long-running part of the worker shares, in a file every area may import.
//!
//! It lives below the areas (not in the composition root, `worker.rs`) so that the chain
//! indexer, the queue consumers and the maintenance jobs can take it without importing the
//! layer that wires them together.

use std::sync::Arc;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::infra::{StoreError, connect_postgres, connect_redis, migrate};

/// The configuration, the two stores and the shutdown signal of one process.
#[derive(Clone)]
pub struct AppContext {
    pub cfg: Arc<Config>,
    pub pool: PgPool,
    /// A multiplexed Redis connection for non-blocking commands. Blocking reads
    /// (XREADGROUP BLOCK, BLPOP) must open their own connection.
    pub redis: redis::aio::ConnectionManager,
    /// Cancelled when the process should stop taking new work.
    pub shutdown: CancellationToken,
}

impl AppContext {
    /// Connects to Postgres and Redis and applies migrations.
    pub async fn connect(cfg: Config) -> Result<Self, StoreError> {
        let pool = connect_postgres(&cfg.database).await?;
        migrate(&pool).await?;
        let redis = connect_redis(&cfg.redis).await?;
        Ok(Self {
            cfg: Arc::new(cfg),
            pool,
            redis,
            shutdown: CancellationToken::new(),
        })
    }
}
