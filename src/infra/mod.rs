//! Infrastructure every area stands on: connections to Postgres and Redis, the embedded
//! migrations, logging, and webhook delivery with its retry policy. Nothing here knows about ledgers, chains or snapshots.

mod connect;
pub mod retry_after;
mod telemetry;
pub mod webhook;

pub use connect::{
    MIGRATOR, PING_IF_IDLE_FOR, StoreError, connect_postgres, connect_redis, migrate,
};
pub use telemetry::init as init_telemetry;
