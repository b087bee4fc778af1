//! Streams of job types nobody serves.
//!
//! Any Redis client can XADD to `{prefix}:jobs:{anything}`; only the CLI refuses unknown types.
//! Without this sweep such entries would never be read: the caller waits for a reply that never
//! comes and the stream grows. Every [`SWEEP_EVERY`] (and once at start-up) the sweep lists the
//! job streams, and for each whose type is neither registered here nor in the catalogue
//! (another replica may serve a catalogue type this one does not) it reads the entries with the
//! consumer group, stores them as dead letters ("unknown job type …"), answers `rejected` when a
//! request id can be read, and acknowledges them. A crash mid-sweep leaves the entries pending
//! under the sweep's consumer name; the next sweep reads them again (dead letters are unique per
//! stream entry, so nothing is stored twice).

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::QueueError;
use super::acker::{Ack, AckerHandle};
use super::dead_letter;
use super::entry::{StreamEntry, parse_read_reply};
use super::reader::ensure_group;
use super::streams;

/// How often the job streams are listed.
pub const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// The consumer name the sweep reads with (shared by replicas: what one leaves pending, any
/// other reads again).
const SWEEP_CONSUMER: &str = "tokenwarden-unknown-type-sweep";

const READ_COUNT: usize = 100;

/// What the sweep needs.
pub struct Sweep {
    pub redis: ConnectionManager,
    pub pool: PgPool,
    pub prefix: String,
    pub group: String,
    /// The registered job types and the catalogue's (`KNOWN_JOB_TYPES`).
    pub known: Vec<&'static str>,
    pub acker: AckerHandle,
}

impl Sweep {
    /// Sweeps now, then every [`SWEEP_EVERY`], until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            match self.sweep_once().await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(entries = n, "dead-lettered entries of unknown job types"),
                Err(e) => {
                    tracing::warn!(error = %e, "unknown job type sweep failed; retrying later")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(SWEEP_EVERY) => {}
            }
        }
    }

    /// One sweep over every job stream; returns how many entries it dead-lettered.
    pub async fn sweep_once(&self) -> Result<usize, QueueError> {
        let mut conn = self.redis.clone();
        let unknown: Vec<String> = streams::job_streams(&mut conn, &self.prefix)
            .await?
            .into_iter()
            .filter(|k| {
                streams::job_type_of(&self.prefix, k).is_some_and(|t| !self.known.contains(&t))
            })
            .collect();
        let mut total = 0;
        for stream in unknown {
            total += self.drain(&mut conn, &stream).await?;
        }
        Ok(total)
    }

    async fn drain(&self, conn: &mut ConnectionManager, stream: &str) -> Result<usize, QueueError> {
        let job_type: Arc<str> =
            Arc::from(streams::job_type_of(&self.prefix, stream).unwrap_or(stream));
        let stream_arc: Arc<str> = Arc::from(stream);
        let reason = format!(
            "unknown job type '{job_type}': known types are {}",
            self.known.join(", ")
        );
        ensure_group(conn, stream, &self.group).await?;
        let mut total = 0;
        // First what an earlier sweep left pending, then new entries.
        for start in ["0", ">"] {
            loop {
                let reply: redis::Value = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(&self.group)
                    .arg(SWEEP_CONSUMER)
                    .arg("COUNT")
                    .arg(READ_COUNT)
                    .arg("STREAMS")
                    .arg(stream)
                    .arg(start)
                    .query_async(conn)
                    .await
                    .map_err(QueueError::redis(format!("XREADGROUP {stream}")))?;
                let entries = parse_read_reply(reply);
                if entries.is_empty() {
                    break;
                }
                let n = entries.len();
                for (id, fields) in entries {
                    let entry = StreamEntry {
                        job_type: job_type.clone(),
                        stream: stream_arc.clone(),
                        id,
                        fields,
                        deliveries: 1,
                    };
                    dead_letter::insert(&self.pool, &entry, &reason).await?;
                    let request_id = match entry.payload() {
                        Ok(p) => p.request_id,
                        Err(m) => m.request_id,
                    };
                    let reply = request_id.map(|rid| {
                        let json = serde_json::json!({
                            "request_id": rid, "status": "rejected", "reason": reason,
                        });
                        (rid, json.to_string())
                    });
                    self.acker.ack(Ack {
                        job_type: job_type.clone(),
                        stream: stream_arc.clone(),
                        id: entry.id.clone(),
                        consumer: Arc::from(SWEEP_CONSUMER),
                        reply,
                        clear_last_error: false,
                        enqueued_ms: entry.enqueued_ms(),
                    });
                }
                total += n;
                // Pending entries (id 0) stay pending until the acker's XACK: read them once.
                if start == "0" || n < READ_COUNT {
                    break;
                }
            }
        }
        self.acker.flush().await;
        Ok(total)
    }
}
