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
    #[error("cannot record the revised checksum of a migration: {0}")]
    Revise(#[source] sqlx::Error),
    #[error("the released checksum of migration {0} is not hex")]
    BadChecksum(i64),
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// A pooled connection idle longer than this is pinged before it is handed out.
pub const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// Opens the Postgres pool.
///
/// sqlx pings every connection it hands out by default: one more round trip to Postgres, and
/// two more wake-ups of each side, before every statement of the hot paths (a check's
/// evaluation and audit INSERT, a ledger batch). A connection back in the pool less than
/// [`PING_IF_IDLE_FOR`] ago was working then; one idle longer (a quiet worker, a Postgres
/// restart in between) is still pinged, the pattern sqlx documents for `before_acquire`
/// (`tests/stores.rs` ends an idle connection's backend and expects the next statement to run). A
/// connection that breaks within that second fails its next statement, as a statement fails
/// when Postgres goes away while it runs; the chaos run's Postgres restarts check that the
/// queue doors recover from both. (sqlx also pings a connection when it comes back to the
/// pool; that one runs in the background and cannot be turned off.)
pub async fn connect_postgres(cfg: &DatabaseConfig) -> Result<PgPool, StoreError> {
    PgPoolOptions::new()
        .max_connections(cfg.max_connections)
        .acquire_timeout(Duration::from_secs(cfg.acquire_timeout_secs))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > PING_IF_IDLE_FOR {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
        .connect(cfg.url.expose_secret())
        .await
        .map_err(|source| StoreError::Postgres {
            url: cfg.display_url(),
            source,
        })
}

/// Migrations whose file changed after a release, with the checksum (SHA-384, as sqlx stores
/// it) of the released text. A database that applied the released text gets the new checksum
/// recorded instead of sqlx's "previously applied but has been modified" error; the change
/// must leave such a database as the new text would (here: the Supabase-compatible role and
/// schema checks of migration 1 create the same objects on plain Postgres).
const REVISED_MIGRATIONS: &[(i64, &str)] = &[(
    20261125000100,
    "4daf6fee7deb2e4a8a465ed6ba058326bef84ba09040b5a1a83a2454d1d009839d54828390840e5bf6d632e23cf61a3a",
)];

/// Applies pending migrations, first recording the new checksum of each revised migration
/// that a database applied in its released form.
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    let table_exists: bool =
        sqlx::query_scalar("SELECT to_regclass('public._sqlx_migrations') IS NOT NULL")
            .fetch_one(pool)
            .await
            .map_err(StoreError::Revise)?;
    if table_exists {
        for (version, released) in REVISED_MIGRATIONS {
            let Some(current) = MIGRATOR.iter().find(|m| m.version == *version) else {
                continue;
            };
            let released = hex::decode(released).map_err(|_| StoreError::BadChecksum(*version))?;
            sqlx::query(
                "UPDATE public._sqlx_migrations SET checksum = $1 WHERE version = $2 AND checksum = $3",
            )
            .bind(current.checksum.as_ref())
            .bind(version)
            .bind(released)
            .execute(pool)
            .await
            .map_err(StoreError::Revise)?;
        }
    }
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
