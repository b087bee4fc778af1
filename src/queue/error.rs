//! Why the transport failed: Redis or Postgres unreachable, or the apalis monitor stopped.

/// Why the transport failed (Redis or Postgres unreachable, or a reply Redis did not expect).
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("redis {what} failed: {source}")]
    Redis {
        what: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("postgres {what} failed: {source}")]
    Postgres {
        what: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("queue monitor stopped: {0}")]
    Monitor(#[source] apalis_core::monitor::MonitorError),
}

impl QueueError {
    pub(crate) fn redis(what: impl Into<String>) -> impl FnOnce(redis::RedisError) -> Self {
        let what = what.into();
        move |source| QueueError::Redis { what, source }
    }
    pub(crate) fn pg(what: impl Into<String>) -> impl FnOnce(sqlx::Error) -> Self {
        let what = what.into();
        move |source| QueueError::Postgres { what, source }
    }
}
