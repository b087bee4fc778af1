//! What happens to one stream entry, and the apalis Monitor that runs one worker per job type.
//!
//! Per entry: read the payload (missing / not JSON / not an object → dead letter + `rejected`
//! reply), call the job type's [`JobHandler`], then
//! - `Ok(reply)` → acknowledge and push the reply (batched, after the handler's commit);
//! - `Rejected(reason)` → dead letter with the reason, acknowledge, `rejected` reply;
//! - `Retryable(reason)` → remember the reason and leave the entry pending: it is reclaimed
//!   after `queue.claim_idle_ms` and redelivered, up to `queue.max_deliveries`, then
//!   dead-lettered with that last reason.
//!
//! apalis pieces used: the worker model (`WorkerBuilder` with `.concurrency(n)`, `Data` for
//! shared state), and the `Monitor` (`should_restart`, unique worker
//! names per restart, `shutdown_timeout` as the grace period). Not used: apalis's `.retry()`
//! layer, because an in-process retry is lost if the process dies and holds a concurrency slot
//! while it sleeps; retries here are durable redeliveries from the stream's pending list, counted
//! by Redis (`XPENDING` delivery counts) against `queue.max_deliveries`. Acknowledgement is ours
//! (after the handler's future, batched), not apalis's `TaskPersistLayer`, which needs a
//! `Persistence` backend built around apalis's own task ids and metadata.
//!
//! A handler that panics is treated as retryable (the panic message is the reason), so a
//! poison entry ends in the dead-letter store instead of looping or killing the worker.

use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::WorkerBuilderExt;
use apalis_core::monitor::Monitor;
use apalis_core::task::data::Data;
use apalis_core::worker::builder::WorkerBuilder;
use futures::FutureExt;
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use tokio::sync::mpsc;

use super::acker::{self, Ack, AckerHandle};
use super::backend::StreamBackend;
use super::entry::StreamEntry;
use super::reader::{self, InFlight, Reader};
use super::{JobError, JobHandler, JobRegistry, QueueError, dead_letter};
use crate::app::AppContext;
use crate::config::QueueConfig;

/// Why an entry was not acknowledged; it stays pending and will be redelivered.
#[derive(Debug, thiserror::Error)]
#[error("{job_type} entry {id} left pending for redelivery: {reason}")]
pub struct EntryNotDone {
    job_type: String,
    id: String,
    reason: String,
}

/// What one apalis worker instance shares with its tasks.
struct Dispatch {
    handler: Arc<dyn JobHandler>,
    pool: PgPool,
    redis: ConnectionManager,
    acker: AckerHandle,
    prefix: String,
    consumer: Arc<str>,
    inflight: InFlight,
    /// `tokenwarden_jobs_processed_total{outcome="ok"}` of this job type, looked up once
    /// instead of per job.
    processed_ok: metrics::Counter,
}

/// Runs a handler's future; a panic becomes a retryable error carrying the panic message.
async fn caught<T>(
    job: impl std::future::Future<Output = Result<T, JobError>>,
) -> Result<T, JobError> {
    std::panic::AssertUnwindSafe(job)
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(JobError::Retryable(format!("handler panicked: {msg}")))
        })
}

/// The apalis task function: one entry, start to acknowledgement.
async fn process(entry: StreamEntry, dispatch: Data<Arc<Dispatch>>) -> Result<(), EntryNotDone> {
    let result = dispatch.process(&entry).await;
    if let Ok(mut set) = dispatch.inflight.lock() {
        set.remove(&entry.id);
    }
    result
}

impl Dispatch {
    async fn process(&self, entry: &StreamEntry) -> Result<(), EntryNotDone> {
        // Hot path: the handler decodes the payload bytes itself and writes its reply as text.
        if let Some(job) = entry
            .single_payload()
            .and_then(|raw| self.handler.handle_raw(raw))
        {
            let outcome = caught(job.reply).await;
            return self.finish(entry, job.request_id, outcome).await;
        }
        let payload = match entry.payload() {
            Ok(p) => p,
            Err(m) => return self.reject(entry, m.reason, m.request_id).await,
        };
        let request_id = payload.request_id.clone();
        let outcome = caught(self.handler.handle(payload.value))
            .await
            .map(|reply| reply.to_string());
        self.finish(entry, request_id, outcome).await
    }

    /// Acknowledges with the reply, dead-letters, or leaves the entry for redelivery.
    async fn finish(
        &self,
        entry: &StreamEntry,
        request_id: Option<String>,
        outcome: Result<String, JobError>,
    ) -> Result<(), EntryNotDone> {
        match outcome {
            Ok(reply) => {
                self.ack(entry, request_id.map(|rid| (rid, reply)));
                self.processed_ok.increment(1);
                Ok(())
            }
            Err(JobError::Rejected(reason)) => self.reject(entry, reason, request_id).await,
            Err(JobError::Retryable(reason)) => self.retry_later(entry, reason).await,
        }
    }

    /// Dead letter, then acknowledge with a `rejected` reply. If the dead letter cannot be
    /// stored, the entry is not acknowledged (nothing is dropped).
    async fn reject(
        &self,
        entry: &StreamEntry,
        reason: String,
        request_id: Option<String>,
    ) -> Result<(), EntryNotDone> {
        if let Err(e) = dead_letter::insert(&self.pool, entry, &reason).await {
            return self
                .retry_later(
                    entry,
                    format!("{reason} (and the dead letter could not be stored: {e})"),
                )
                .await;
        }
        tracing::info!(job_type = %entry.job_type, id = %entry.id, %reason, "entry rejected");
        metrics::counter!("tokenwarden_jobs_processed_total", "job_type" => entry.job_type.to_string(), "outcome" => "rejected").increment(1);
        metrics::counter!("tokenwarden_jobs_failed_total", "job_type" => entry.job_type.to_string(), "kind" => "rejected").increment(1);
        let reply = request_id.map(|rid| {
            let json =
                serde_json::json!({"request_id": rid, "status": "rejected", "reason": reason});
            (rid, json.to_string())
        });
        self.ack(entry, reply);
        Ok(())
    }

    async fn retry_later(&self, entry: &StreamEntry, reason: String) -> Result<(), EntryNotDone> {
        metrics::counter!("tokenwarden_jobs_failed_total", "job_type" => entry.job_type.to_string(), "kind" => "retryable").increment(1);
        tracing::warn!(job_type = %entry.job_type, id = %entry.id, deliveries = entry.deliveries, %reason, "job failed; it will be redelivered");
        let key = super::streams::last_error_key(&self.prefix, &entry.job_type);
        let mut conn = self.redis.clone();
        let res: redis::RedisResult<()> = redis::cmd("HSET")
            .arg(&key)
            .arg(&entry.id)
            .arg(&reason)
            .query_async(&mut conn)
            .await;
        if let Err(e) = res {
            tracing::warn!(error = %e, "could not record the last error of a failed entry");
        }
        Err(EntryNotDone {
            job_type: entry.job_type.to_string(),
            id: entry.id.clone(),
            reason,
        })
    }

    fn ack(&self, entry: &StreamEntry, reply: Option<(String, String)>) {
        self.acker.ack(Ack {
            job_type: entry.job_type.clone(),
            stream: entry.stream.clone(),
            id: entry.id.clone(),
            consumer: self.consumer.clone(),
            reply,
            clear_last_error: entry.deliveries > 1,
            enqueued_ms: entry.enqueued_ms(),
        });
    }
}

/// What every worker factory needs; cloned into each `Monitor::register` closure.
#[derive(Clone)]
struct Shared {
    cfg: QueueConfig,
    prefix: String,
    client: redis::Client,
    pool: PgPool,
    redis: ConnectionManager,
    acker: AckerHandle,
}

/// Runs one apalis worker per registered job type until `ctx.shutdown` is cancelled, then
/// lets in-flight jobs finish (up to `queue.shutdown_grace_secs`), flushes acknowledgements
/// and returns. Workers whose backend fails (Redis down, NOGROUP after a stream was deleted)
/// are restarted by the Monitor with a fresh consumer name and a back-off.
pub async fn run_consumers(ctx: &AppContext, registry: JobRegistry) -> Result<(), QueueError> {
    let cfg = &ctx.cfg;
    let client = redis::Client::open(secrecy::ExposeSecret::expose_secret(&cfg.redis.url))
        .map_err(QueueError::redis("open client"))?;
    let (acker, acker_task) = acker::spawn(
        ctx.redis.clone(),
        cfg.redis.prefix.clone(),
        cfg.queue.group.clone(),
        cfg.queue.reply_ttl_secs,
    );
    let shared = Shared {
        cfg: cfg.queue.clone(),
        prefix: cfg.redis.prefix.clone(),
        client,
        pool: ctx.pool.clone(),
        redis: ctx.redis.clone(),
        acker: acker.clone(),
    };
    let sweep = super::unknown::Sweep {
        redis: ctx.redis.clone(),
        pool: ctx.pool.clone(),
        prefix: cfg.redis.prefix.clone(),
        group: cfg.queue.group.clone(),
        // The catalogue too: a replica configured without some handlers must not dead-letter
        // jobs another replica serves.
        known: {
            let mut k = registry.job_types();
            for t in super::registry::KNOWN_JOB_TYPES {
                if !k.contains(t) {
                    k.push(t);
                }
            }
            k
        },
        reply_ttl_secs: cfg.queue.reply_ttl_secs,
        listed: ctx.job_streams.clone(),
    };
    let sweep_task = tokio::spawn(sweep.run(ctx.shutdown.clone()));
    // Ends with the consumers (also on the early return below).
    let sweep_guard = AbortOnDrop(sweep_task);
    if registry.is_empty() {
        tracing::warn!("no job handlers registered; no stream is consumed");
        ctx.shutdown.cancelled().await;
        return Ok(());
    }
    let mut monitor = Monitor::new();
    for (job_type, handler) in registry.iter() {
        tracing::info!(job_type, "registering queue worker");
        let shared = shared.clone();
        let health = super::health::StreamHealth::new(ctx.readiness.clone(), job_type);
        monitor = monitor.register(move |restarts| {
            let consumer = reader::consumer_name();
            let inflight = InFlight::default();
            let (tx, rx) = mpsc::channel(shared.cfg.read_count.max(1));
            let start_delay = if restarts == 0 {
                Duration::ZERO
            } else {
                Duration::from_millis((100u64 << restarts.min(6)).min(5_000))
            };
            let reader = Reader {
                client: shared.client.clone(),
                pool: shared.pool.clone(),
                cfg: shared.cfg.clone(),
                prefix: shared.prefix.clone(),
                job_type: Arc::from(job_type),
                stream: Arc::from(super::streams::stream_key(&shared.prefix, job_type)),
                consumer: consumer.clone(),
                inflight: inflight.clone(),
                tx,
                start_delay,
                health: health.clone(),
            };
            let reader_task = tokio::spawn(reader.run());
            let dispatch = Arc::new(Dispatch {
                handler: handler.clone(),
                pool: shared.pool.clone(),
                redis: shared.redis.clone(),
                acker: shared.acker.clone(),
                prefix: shared.prefix.clone(),
                consumer: Arc::from(consumer.as_str()),
                inflight,
                processed_ok: metrics::counter!("tokenwarden_jobs_processed_total", "job_type" => job_type, "outcome" => "ok"),
            });
            let on_close = {
                let mut redis = shared.redis.clone();
                let stream = super::streams::stream_key(&shared.prefix, job_type);
                let group = shared.cfg.group.clone();
                let consumer = consumer.clone();
                let alive = reader::alive_key(&shared.prefix, &consumer);
                async move {
                    let gone: redis::RedisResult<i64> =
                        redis::cmd("DEL").arg(&alive).query_async(&mut redis).await;
                    if let Err(e) = gone {
                        tracing::debug!(error = %e, "could not remove the consumer heartbeat");
                    }
                    match reader::remove_consumer_if_idle(&mut redis, &stream, &group, &consumer).await {
                        Ok(removed) => tracing::info!(job_type, %consumer, removed, "stream consumer stopped"),
                        Err(e) => tracing::warn!(job_type, %consumer, error = %e, "could not remove stopped consumer"),
                    }
                }
            };
            WorkerBuilder::new(format!("{job_type}@{consumer}"))
                .backend(StreamBackend::new(rx, reader_task, shared.acker.clone(), on_close))
                .data(dispatch)
                .concurrency(shared.cfg.concurrency)
                .build(process)
        });
    }
    let shutdown = ctx.shutdown.clone();
    let result = monitor
        .should_restart(|worker, err| {
            if worker.is_shutting_down() {
                return false;
            }
            tracing::error!(worker = worker.name(), restarts = worker.restarts(), error = %err, "queue worker failed; restarting it");
            true
        })
        .shutdown_timeout(Duration::from_secs(cfg.queue.shutdown_grace_secs))
        .run_with_signal(async move {
            shutdown.cancelled().await;
            tracing::info!("queue consumers stopping: no new reads, finishing in-flight jobs");
            Ok(())
        })
        .await;
    drop(sweep_guard);
    acker.flush().await;
    drop(acker);
    drop(shared);
    acker_task.abort();
    match result {
        Ok(()) => Ok(()),
        Err(e) if ctx.shutdown.is_cancelled() => {
            tracing::info!(error = %e, "queue monitor stopped during shutdown");
            Ok(())
        }
        Err(e) => Err(QueueError::Monitor(e)),
    }
}

/// Aborts a background task when the scope that owns it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
