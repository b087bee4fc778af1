//! Connections to the two stores every part of tokenwarden uses: Postgres and Redis.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use secrecy::ExposeSecret;

use crate::config::{DatabaseConfig, RedisConfig};

/// The embedded sqlx migrations (`migrations/`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A store could not be reached or prepared.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot connect to Postgres at {url}: {source}")]
    Postgres {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot connect to Redis at {url}: {source}")]
    Redis {
        url: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Opens the Postgres pool. Each connection gets a `statement_timeout` so a stuck query cannot
/// hold row locks forever.
pub async fn connect_postgres(cfg: &DatabaseConfig) -> Result<PgPool, StoreError> {
    PgPoolOptions::new()
        .max_connections(cfg.max_connections)
        .acquire_timeout(Duration::from_secs(cfg.acquire_timeout_secs))
        .connect(cfg.url.expose_secret())
        .await
        .map_err(|source| StoreError::Postgres {
            url: cfg.display_url(),
            source,
        })
}

/// Applies pending migrations.
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Opens a Redis connection manager: one multiplexed connection that reconnects by itself.
pub async fn connect_redis(cfg: &RedisConfig) -> Result<redis::aio::ConnectionManager, StoreError> {
    let err = |source| StoreError::Redis {
        url: cfg.display_url(),
        source,
    };
    let client = redis::Client::open(cfg.url.expose_secret()).map_err(err)?;
    // The default 500 ms response timeout kills long blocking reads (apalis-redis#76);
    // blocking commands (XREADGROUP BLOCK, BLPOP) get their own connections anyway.
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_response_timeout(Some(Duration::from_secs(30)))
        .set_connection_timeout(Some(Duration::from_secs(5)));
    redis::aio::ConnectionManager::new_with_config(client, config)
        .await
        .map_err(err)
}
