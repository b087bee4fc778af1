//! Streams of job types nobody serves.
//!
//! Any Redis client can XADD to `{prefix}:jobs:{anything}` (any bytes, not only UTF-8); only the
//! CLI refuses unknown types. Without this sweep such entries would never be read: the caller
//! waits for a reply that never comes and the stream grows. Every [`SWEEP_EVERY`] (and once at
//! start-up) the sweep lists the job streams, and for each whose type is neither registered
//! here nor in the catalogue (another replica may serve a catalogue type this one does not) it
//! reads the entries with the consumer group, stores them as dead letters ("unknown job type
//! …"), answers `rejected` when a request id can be read, and acknowledges them. A crash
//! mid-sweep leaves the entries pending under the sweep's consumer name; the next sweep reads
//! them again (dead letters are unique per stream entry, so nothing is stored twice).
//!
//! The sweep's list of job streams is also what the queue gauges sample
//! ([`JobStreams`]): listing is a SCAN of the whole keyspace, done once per sweep.
//!
//! One stream never stops the sweep: a stream that fails is logged and the next one is swept;
//! an entry whose dead letter cannot be stored stays pending and is tried again next sweep,
//! and after [`quarantine::EXTRA_PASSES`] such sweeps it is quarantined in Redis instead. Each
//! sweep also moves quarantined entries into the dead-letter store once Postgres takes them.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::streams::StreamPendingCountReply;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::QueueError;
use super::dead_letter::{self, Letter};
use super::entry::{Malformed, StreamEntry, parse_read_reply};
use super::quarantine;
use super::reader::ensure_group;
use super::streams::{self, shown};
use crate::app::JobStreams;

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
    pub reply_ttl_secs: u64,
    /// Where the streams of each pass are left for the gauges.
    pub listed: JobStreams,
}

impl Sweep {
    /// Sweeps now, then every [`SWEEP_EVERY`], until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut conn = self.redis.clone();
        match quarantine::index_unindexed(&mut conn, &self.prefix).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                hashes = n,
                "quarantine hashes of an earlier version indexed"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "quarantine hashes not indexed; an earlier version's stay unread")
            }
        }
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

    /// One sweep over every job stream; returns how many entries it dead-lettered (or
    /// quarantined). Fails only when the streams cannot be listed.
    pub async fn sweep_once(&self) -> Result<usize, QueueError> {
        let mut conn = self.redis.clone();
        let listed = streams::job_streams(&mut conn, &self.prefix).await?;
        self.listed.set(listed.clone());
        let unknown: Vec<Vec<u8>> = listed
            .into_iter()
            .filter(|k| {
                streams::job_type_of_bytes(&self.prefix, k)
                    .is_some_and(|t| !self.known.iter().any(|known| known.as_bytes() == t))
            })
            .collect();
        let mut total = 0;
        match quarantine::drain_into_dead_letters(&mut conn, &self.pool, &self.prefix).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                entries = n,
                "quarantined entries moved into the dead-letter store"
            ),
            Err(e) => tracing::warn!(error = %e, "quarantined entries not moved; retrying later"),
        }
        for stream in unknown {
            match self.drain(&mut conn, &stream).await {
                Ok(n) => total += n,
                Err(e) => tracing::warn!(
                    stream = %shown(&stream),
                    error = %e,
                    "stream of an unknown job type not swept; the others are"
                ),
            }
        }
        Ok(total)
    }

    async fn drain(
        &self,
        conn: &mut ConnectionManager,
        stream: &[u8],
    ) -> Result<usize, QueueError> {
        let job_type = streams::job_type_of_bytes(&self.prefix, stream).unwrap_or(stream);
        let reason = format!(
            "unknown job type '{}': known types are {}",
            dead_letter::escape(job_type).0,
            self.known.join(", ")
        );
        let shown_stream = shown(stream).into_owned();
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
                    .map_err(QueueError::redis(format!("XREADGROUP {shown_stream}")))?;
                let entries = parse_read_reply(reply);
                if entries.is_empty() {
                    break;
                }
                let n = entries.len();
                let mut done = Vec::with_capacity(n);
                let mut replies = Vec::new();
                for (id, fields) in entries {
                    let letter = Letter {
                        job_type,
                        stream,
                        entry_id: &id,
                        fields: &fields,
                        deliveries: 1,
                    };
                    if !self.keep(conn, stream, &letter, &reason).await? {
                        continue;
                    }
                    let probe = StreamEntry {
                        job_type: "".into(),
                        stream: "".into(),
                        id: id.clone(),
                        fields,
                        deliveries: 1,
                    };
                    let request_id = match probe.payload() {
                        Ok(p) => p.request_id,
                        Err(Malformed { request_id, .. }) => request_id,
                    };
                    if let Some(rid) = request_id {
                        let json = serde_json::json!({
                            "request_id": rid, "status": "rejected", "reason": reason,
                        });
                        replies.push((rid, json.to_string()));
                    }
                    done.push(id);
                }
                self.answer_and_ack(conn, stream, &replies, &done).await?;
                total += done.len();
                // Pending entries (id 0) were all read once: the rest is for the next sweep.
                if start == "0" || n < READ_COUNT {
                    break;
                }
            }
        }
        Ok(total)
    }

    /// Stores the dead letter; if that fails, the entry stays pending unless it has failed
    /// [`quarantine::EXTRA_PASSES`] sweeps already, then it is quarantined. True when the
    /// entry is kept somewhere and may be acknowledged.
    async fn keep(
        &self,
        conn: &mut ConnectionManager,
        stream: &[u8],
        letter: &Letter<'_>,
        reason: &str,
    ) -> Result<bool, QueueError> {
        let err = match dead_letter::insert_letter(&self.pool, letter, reason).await {
            Ok(_) => return Ok(true),
            Err(e) => e,
        };
        let pending: StreamPendingCountReply = redis::cmd("XPENDING")
            .arg(stream)
            .arg(&self.group)
            .arg(letter.entry_id)
            .arg(letter.entry_id)
            .arg(1)
            .query_async(conn)
            .await
            .map_err(QueueError::redis(format!("XPENDING {}", shown(stream))))?;
        let deliveries = pending.ids.first().map_or(1, |p| p.times_delivered as u64);
        if deliveries <= quarantine::EXTRA_PASSES {
            tracing::warn!(stream = %shown(stream), id = letter.entry_id, deliveries, error = %err, "dead letter not stored; the entry stays pending for the next sweep");
            return Ok(false);
        }
        let why = format!("{reason}; the dead letter could not be stored: {err}");
        let letter = Letter {
            deliveries,
            ..*letter
        };
        quarantine::put(conn, &self.prefix, &letter, &why).await?;
        tracing::error!(stream = %shown(stream), id = letter.entry_id, reason = %why, "entry quarantined in Redis");
        Ok(true)
    }

    /// Pushes the `rejected` replies, then acknowledges: one pipeline whose commands count on
    /// their own (a reply key of the wrong type costs that reply only).
    async fn answer_and_ack(
        &self,
        conn: &mut ConnectionManager,
        stream: &[u8],
        replies: &[(String, String)],
        ids: &[String],
    ) -> Result<(), QueueError> {
        if ids.is_empty() {
            return Ok(());
        }
        let ttl = i64::try_from(self.reply_ttl_secs).unwrap_or(i64::MAX);
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for (rid, json) in replies {
            let key = streams::reply_key(&self.prefix, rid);
            pipe.cmd("LPUSH").arg(&key).arg(json);
            pipe.cmd("EXPIRE").arg(&key).arg(ttl);
        }
        pipe.cmd("XACK").arg(stream).arg(&self.group).arg(ids);
        let mut results: Vec<redis::RedisResult<redis::Value>> = pipe
            .query_async(conn)
            .await
            .map_err(QueueError::redis(format!("XACK {}", shown(stream))))?;
        let ack = results.pop();
        for (i, r) in results.iter().enumerate() {
            if let (Err(e), 0) = (r, i % 2) {
                tracing::warn!(request_id = %replies[i / 2].0, error = %e, "rejected reply not pushed");
            }
        }
        match ack {
            Some(Err(e)) => Err(QueueError::redis(format!("XACK {}", shown(stream)))(e)),
            _ => Ok(()),
        }
    }
}
