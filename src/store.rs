//! Connections to the two stores every part of tokenwarden uses: Postgres and Redis.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

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

/// Strips a password from a connection URL so it can be logged or shown in an error.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<unparseable url>".to_string(),
    }
}

/// An endpoint for display where its path, query or user info may hold a secret (RPC
/// providers put the API key in the path, e.g. `…/v2/KEY`): `scheme://host[:port]/…` only.
pub fn redact_endpoint(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => {
            let host = u.host_str().unwrap_or("");
            match u.port() {
                Some(p) => format!("{}://{host}:{p}/…", u.scheme()),
                None => format!("{}://{host}/…", u.scheme()),
            }
        }
        Err(_) => "<unparseable url>".to_string(),
    }
}

/// Opens the Postgres pool. Each connection gets a `statement_timeout` so a stuck query cannot
/// hold row locks forever.
pub async fn connect_postgres(cfg: &DatabaseConfig) -> Result<PgPool, StoreError> {
    PgPoolOptions::new()
        .max_connections(cfg.max_connections)
        .acquire_timeout(Duration::from_secs(cfg.acquire_timeout_secs))
        .connect(&cfg.url)
        .await
        .map_err(|source| StoreError::Postgres {
            url: redact_url(&cfg.url),
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
        url: redact_url(&cfg.url),
        source,
    };
    let client = redis::Client::open(cfg.url.as_str()).map_err(err)?;
    // The default 500 ms response timeout kills long blocking reads (apalis-redis#76);
    // blocking commands (XREADGROUP BLOCK, BLPOP) get their own connections anyway.
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_response_timeout(Some(Duration::from_secs(30)))
        .set_connection_timeout(Some(Duration::from_secs(5)));
    redis::aio::ConnectionManager::new_with_config(client, config)
        .await
        .map_err(err)
}

#[cfg(test)]
mod redact_tests {
    use super::redact_endpoint;

    #[test]
    fn redact_endpoint_keeps_only_scheme_host_and_port() {
        assert_eq!(
            redact_endpoint("https://eth-mainnet.g.alchemy.com/v2/SECRETKEY?x=1"),
            "https://eth-mainnet.g.alchemy.com/…"
        );
        assert_eq!(
            redact_endpoint("wss://user:pass@rpc.example.org:8546/ws/KEY#frag"),
            "wss://rpc.example.org:8546/…"
        );
        assert_eq!(
            redact_endpoint("http://127.0.0.1:8545"),
            "http://127.0.0.1:8545/…"
        );
        assert_eq!(redact_endpoint("not a url KEY"), "<unparseable url>");
        for out in [
            redact_endpoint("https://h/v2/SECRETKEY"),
            redact_endpoint("https://SECRETKEY@h/"),
            redact_endpoint("https://h/?key=SECRETKEY"),
        ] {
            assert!(!out.contains("SECRETKEY"), "{out}");
        }
    }
}
