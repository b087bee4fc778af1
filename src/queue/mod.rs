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
//! | [`registry`] | which handler serves which job type, and the catalogue of job types |
//! | [`error`] | [`QueueError`]: which Redis or Postgres step failed |
//! | [`streams`] | key names, listing job streams, stream ids, the acknowledged floor and trimming |
//! | [`entry`] | one stream entry and how its payload is read |
//! | [`reader`] | XREADGROUP, reclaiming idle entries, the delivery limit, lease renewal |
//! | [`acker`] | batched XACK + reply pushes |
//! | [`dead_letter`] | the `dead_letters` table |
//! | [`figures`] | the figures behind the queue gauges (depth, pending, lag, oldest age, dead letters) |
//! | [`quarantine`] | where an entry goes when even its dead letter cannot be stored |
//! | [`health`] | whether each stream is served, for `/readyz` |
//! | [`backend`] | the apalis backend over the reader and the acker |
//! | [`consumer`] | what happens to one entry, and the Monitor running every job type |
//! | [`unknown`] | the sweep that dead-letters entries of job types nobody serves |
//! | [`cli`] | `tokenwarden enqueue` and `tokenwarden dead-letters` |

pub(crate) mod acker;
pub(crate) mod backend;
pub(crate) mod cli;
pub(crate) mod consumer;
pub mod dead_letter;
pub mod entry;
pub(crate) mod error;
pub(crate) mod figures;
pub(crate) mod health;
pub mod job;
pub mod quarantine;
pub(crate) mod reader;
pub(crate) mod registry;
pub(crate) mod streams;
pub(crate) mod unknown;

pub use consumer::run_consumers;
pub use error::QueueError;
pub use job::{JobError, JobFuture, JobHandler, RawJob, RawJobFuture, Rejected};
pub use registry::{JobRegistry, KNOWN_JOB_TYPES};
pub use streams::{last_error_key, processed_key, reply_key, stream_key};
