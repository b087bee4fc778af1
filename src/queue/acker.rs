//! Batched acknowledgements and reply pushes.
//!
//! Handlers finish one by one, but XACK and LPUSH are cheap only in bulk: one task per process
//! drains every finished entry that has arrived and sends one pipeline (`XACK` per stream with
//! all ids, `LPUSH` + `EXPIRE` per reply). Entries reach this task only after their handler's
//! future resolved, i.e. after its Postgres commit. Each command's result counts on its own: a
//! reply key of the wrong type loses that one reply (logged; the outcome is in Postgres), not
//! the batch. If Redis cannot be reached even after retries, the entries stay pending and are
//! redelivered: their handlers are idempotent by request id, so the caller gets the same
//! outcome again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, oneshot};

use super::streams::{last_error_key, now_ms, processed_key, reply_key};

/// Largest number of finished entries sent in one pipeline.
const MAX_PIPELINE: usize = 4096;

/// A finished entry: acknowledge it and, if it has one, push its reply.
#[derive(Debug)]
pub struct Ack {
    pub job_type: Arc<str>,
    pub stream: Arc<str>,
    pub id: String,
    /// The consumer that processed the entry (for the per-consumer counters).
    pub consumer: Arc<str>,
    /// `(request_id, reply JSON)`.
    pub reply: Option<(String, String)>,
    /// The entry failed before (retryable): drop its recorded last error.
    pub clear_last_error: bool,
    /// Enqueue time (unix ms), for the latency histogram.
    pub enqueued_ms: Option<u64>,
}

enum Msg {
    Ack(Ack),
    Flush(oneshot::Sender<()>),
}

/// Sends finished entries to the acknowledgement task. Cheap to clone.
#[derive(Clone)]
pub struct AckerHandle {
    tx: mpsc::UnboundedSender<Msg>,
}

impl AckerHandle {
    /// Queues `ack`; it is sent with the next pipeline.
    pub fn ack(&self, ack: Ack) {
        if self.tx.send(Msg::Ack(ack)).is_err() {
            tracing::warn!("acknowledgement task has stopped; the entry will be redelivered");
        }
    }

    /// Resolves once every ack queued before this call has been sent to Redis (or given up).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// Starts the acknowledgement task. It ends when every [`AckerHandle`] is dropped.
pub fn spawn(
    redis: ConnectionManager,
    prefix: String,
    group: String,
    reply_ttl_secs: u64,
) -> (AckerHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(run(redis, prefix, group, reply_ttl_secs, rx));
    (AckerHandle { tx }, task)
}

async fn run(
    redis: ConnectionManager,
    prefix: String,
    group: String,
    reply_ttl_secs: u64,
    mut rx: mpsc::UnboundedReceiver<Msg>,
) {
    let ttl = i64::try_from(reply_ttl_secs).unwrap_or(i64::MAX);
    let mut buf = Vec::with_capacity(MAX_PIPELINE);
    loop {
        buf.clear();
        if rx.recv_many(&mut buf, MAX_PIPELINE).await == 0 {
            return;
        }
        let mut acks = Vec::with_capacity(buf.len());
        let mut flushes = Vec::new();
        for msg in buf.drain(..) {
            match msg {
                Msg::Ack(a) => acks.push(a),
                Msg::Flush(tx) => flushes.push(tx),
            }
        }
        if !acks.is_empty() {
            send(&redis, &prefix, &group, ttl, &acks).await;
        }
        for f in flushes {
            let _ = f.send(());
        }
    }
}

/// What one command of the pipeline was for, to report its failure precisely.
enum Sent<'a> {
    Reply(&'a str),
    ReplyExpiry(&'a str),
    Ack(&'a str, usize),
    Counter,
    LastErrors,
}

/// Sends one pipeline. Each command's result is looked at on its own: a key of the wrong type
/// (e.g. a hash at `{prefix}:reply:<id>`) costs that one reply, never the batch. Only a failure
/// of the connection itself retries the pipeline.
async fn send(redis: &ConnectionManager, prefix: &str, group: &str, ttl: i64, acks: &[Ack]) {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    let mut sent: Vec<Sent<'_>> = Vec::new();
    // Replies first: a caller must never find its entry acknowledged but no reply pushed.
    for a in acks {
        if let Some((request_id, json)) = &a.reply {
            let key = reply_key(prefix, request_id);
            pipe.cmd("LPUSH").arg(&key).arg(json);
            sent.push(Sent::Reply(request_id));
            pipe.cmd("EXPIRE").arg(&key).arg(ttl);
            sent.push(Sent::ReplyExpiry(request_id));
        }
    }
    let mut by_stream: HashMap<&str, Vec<&str>> = HashMap::new();
    let mut cleared: HashMap<&str, Vec<&str>> = HashMap::new();
    for a in acks {
        by_stream.entry(&a.stream).or_default().push(&a.id);
        if a.clear_last_error {
            cleared.entry(&a.job_type).or_default().push(&a.id);
        }
    }
    for (stream, ids) in &by_stream {
        pipe.cmd("XACK").arg(*stream).arg(group).arg(ids);
        sent.push(Sent::Ack(stream, ids.len()));
    }
    let mut per_consumer: HashMap<(&str, &str), u64> = HashMap::new();
    for a in acks {
        *per_consumer.entry((&a.job_type, &a.consumer)).or_default() += 1;
    }
    for ((job_type, consumer), n) in &per_consumer {
        pipe.cmd("HINCRBY")
            .arg(processed_key(prefix, job_type))
            .arg(*consumer)
            .arg(*n);
        sent.push(Sent::Counter);
    }
    for (job_type, ids) in &cleared {
        pipe.cmd("HDEL")
            .arg(last_error_key(prefix, job_type))
            .arg(ids);
        sent.push(Sent::LastErrors);
    }
    let pipe = &pipe;
    let result = (|| {
        let mut conn = redis.clone();
        async move {
            pipe.query_async::<Vec<redis::RedisResult<redis::Value>>>(&mut conn)
                .await
        }
    })
    .retry(
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(20))
            .with_max_delay(Duration::from_secs(1))
            .with_max_times(5)
            .with_jitter(),
    )
    .notify(|e, after| tracing::warn!(error = %e, ?after, "ack pipeline not sent; retrying"))
    .await;
    let results = match result {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(
                error = %e,
                entries = acks.len(),
                "could not reach Redis to acknowledge entries; they stay pending and will be redelivered"
            );
            return;
        }
    };
    let mut unacked: Vec<&str> = Vec::new();
    for (what, r) in sent.iter().zip(&results) {
        let Err(e) = r else { continue };
        match what {
            Sent::Reply(rid) => tracing::warn!(
                request_id = rid,
                error = %e,
                "reply not pushed (its outcome stays readable in Postgres); the entry is acknowledged"
            ),
            Sent::ReplyExpiry(rid) => {
                tracing::debug!(request_id = rid, error = %e, "reply expiry not set")
            }
            Sent::Ack(stream, n) => {
                tracing::error!(stream, entries = n, error = %e, "XACK refused; these entries stay pending and will be redelivered");
                unacked.push(stream);
            }
            Sent::Counter => tracing::debug!(error = %e, "processed counter not updated"),
            Sent::LastErrors => tracing::debug!(error = %e, "last errors not cleared"),
        }
    }
    let now = now_ms();
    // One histogram lookup per job type and pipeline, not per entry.
    let mut latency: HashMap<&str, metrics::Histogram> = HashMap::new();
    for a in acks {
        if unacked.contains(&a.stream.as_ref()) {
            continue;
        }
        if let Some(t) = a.enqueued_ms {
            let secs = now.saturating_sub(t) as f64 / 1000.0;
            latency
                .entry(&a.job_type)
                .or_insert_with(|| {
                    metrics::histogram!("tokenwarden_job_latency_seconds", "job_type" => a.job_type.to_string())
                })
                .record(secs);
        }
    }
}
