//! Infrastructure every area stands on: connections to Postgres and Redis, the embedded
//! migrations, and logging. Nothing here knows about ledgers, chains or snapshots.

mod connect;
mod telemetry;

pub use connect::{MIGRATOR, StoreError, connect_postgres, connect_redis, migrate};
pub use telemetry::init as init_telemetry;
