//! The job transport: one Redis stream per job type (`{prefix}:jobs:{type}`), consumer groups,
//! acknowledgement after the Postgres commit, redelivery of entries a dead worker held, a
//! delivery limit and a dead-letter store, and reply lists for callers that wait.
//!
//! Any Redis client enqueues with one `XADD`; the entry fields are documented in `jobs/`.
//!
//! Why our own transport and not apalis-redis: its keys are an undocumented internal format,
//! one undecodable payload ends the worker, and a backlog over ~8,000 due jobs wedges every
//! worker of a queue (`shared/reference/queue-apalis.md`). Redis streams are a documented
//! protocol every client speaks. The stream consumer is an apalis [`Backend`](apalis_core::backend::Backend)
//! ([`backend::StreamBackend`]), so handlers run as apalis workers under an apalis `Monitor`.
//!
//! | module | concern |
//! |---|---|
//! | [`job`] | the handler contract ([`JobHandler`], [`JobError`]) |
//! | [`registry`] | which handler serves which job type |
//! | [`entry`] | one stream entry and how its payload is read |
//! | [`reader`] | XREADGROUP, reclaiming idle entries, the delivery limit, lease renewal |
//! | [`acker`] | batched XACK + reply pushes |
//! | [`dead_letter`] | the `dead_letters` table |
//! | [`backend`] | the apalis backend over the reader and the acker |
//! | [`consumer`] | what happens to one entry, and the Monitor running every job type |
//! | [`cli`] | `tokenwarden enqueue` and `tokenwarden dead-letters` |

pub mod acker;
pub mod backend;
pub mod cli;
pub mod consumer;
pub mod dead_letter;
pub mod entry;
pub mod job;
pub mod reader;
pub mod registry;
pub mod unknown;

pub use consumer::run_consumers;
pub use job::{JobError, JobFuture, JobHandler};
pub use registry::JobRegistry;

/// Every job type of the public catalogue (`jobs/`, WIRE.md). `tokenwarden enqueue` refuses
/// anything else, so a typo does not create a stream nobody consumes.
pub const KNOWN_JOB_TYPES: &[&str] = &[
    "consume_tokens",
    "grant_tokens",
    "hold_tokens",
    "settle_hold",
    "release_hold",
    "snapshot_create",
    "cleanup_locks",
    "detect_anomalies",
    "prune",
    "link_wallet",
    "unlink_wallet",
    "access_rule",
    "verify_access",
];

/// The stream a job type lives on.
pub fn stream_key(prefix: &str, job_type: &str) -> String {
    format!("{prefix}:jobs:{job_type}")
}

/// The list a caller waiting for `request_id` BLPOPs.
pub fn reply_key(prefix: &str, request_id: &str) -> String {
    format!("{prefix}:reply:{request_id}")
}

/// The hash keeping the last retryable error of each pending entry of a stream, so the
/// dead letter written at the delivery limit carries the real reason.
pub fn last_error_key(prefix: &str, job_type: &str) -> String {
    format!("{prefix}:lasterr:{job_type}")
}

/// The hash counting, per consumer name, the entries each consumer finished: shows how the
/// replicas share a stream.
pub fn processed_key(prefix: &str, job_type: &str) -> String {
    format!("{prefix}:processed:{job_type}")
}

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
    #[error("{0}")]
    Other(String),
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
