//! The handler side of the job contract: what a job type must provide to be served by the queue.

use std::future::Future;
use std::pin::Pin;

use super::QueueError;

/// The future a handler returns: the reply sent to the caller, or why the job failed.
pub type JobFuture = Pin<Box<dyn Future<Output = Result<serde_json::Value, JobError>> + Send>>;

/// The future of [`JobHandler::handle_raw`]: the reply already written as JSON text.
pub type RawJobFuture = Pin<Box<dyn Future<Output = Result<String, JobError>> + Send>>;

/// A job its handler decoded straight from the payload bytes ([`JobHandler::handle_raw`]).
pub struct RawJob {
    /// The payload's `request_id` exactly as written (the reply list's key), when it has one.
    pub request_id: Option<String>,
    /// The work; resolves to the reply text.
    pub reply: RawJobFuture,
}

/// How a job failed, which decides what the queue does with its stream entry.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The payload is not acceptable (bad JSON shape, bad values). The entry is acknowledged,
    /// kept in the dead-letter store with this reason, and the caller gets a `rejected` reply.
    /// Retrying would give the same answer.
    #[error("rejected: {0}")]
    Rejected(String),
    /// A transient failure (database or network down). The entry is left pending and
    /// redelivered later, up to the delivery limit.
    #[error("retryable: {0}")]
    Retryable(String),
}

/// A payload no retry can make acceptable, with the reason the caller's `rejected` reply and
/// the dead letter carry. Every handler's validation returns it; `?` turns it into
/// [`JobError::Rejected`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Rejected {
    pub reason: String,
}

impl Rejected {
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }
}

impl From<Rejected> for JobError {
    fn from(r: Rejected) -> Self {
        JobError::Rejected(r.reason)
    }
}

/// Redis or Postgres failing under a handler is transient: the entry is redelivered.
impl From<QueueError> for JobError {
    fn from(e: QueueError) -> Self {
        JobError::Retryable(e.to_string())
    }
}

/// One job type's handler. The queue calls [`JobHandler::handle`] with the entry's parsed
/// `payload` object and acknowledges the entry only after the returned future resolves, so
/// everything the handler committed before resolving is durable before the ack.
pub trait JobHandler: Send + Sync + 'static {
    /// The stream suffix: the job lives on `{prefix}:jobs:{job_type}`.
    fn job_type(&self) -> &'static str;
    /// Validates `payload` and does the work. The returned JSON is the reply; if the payload
    /// carried a `request_id`, the queue pushes it to that request's reply list.
    fn handle(&self, payload: serde_json::Value) -> JobFuture;

    /// The hot path of a high-volume job type: decode the raw `payload` bytes straight into the
    /// handler's typed payload (no intermediate `serde_json::Value`, no copy) and return the
    /// reply as text. `None` whenever that decode is not certain to give what
    /// [`JobHandler::handle`] gives: the queue then takes the general path, which alone words
    /// the refusal reasons. So `Some` only for payloads `handle` accepts, with the same
    /// request id, the same work and a reply equal to `handle`'s reply written as text.
    /// The default has no hot path.
    fn handle_raw(&self, _payload: &[u8]) -> Option<RawJob> {
        None
    }
}
