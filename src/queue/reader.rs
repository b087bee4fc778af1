//! The read side of one job type's stream for one consumer: XREADGROUP on a dedicated
//! connection, reclaiming entries that dead consumers left pending, the delivery limit, and
//! lease renewal for entries this consumer is still working on.
//!
//! Hand-written on plain stream commands (no crate offers a consumer-group reader for redis-rs
//! with reclaim and a delivery limit); apalis drives it through [`super::backend::StreamBackend`].

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::streams::StreamPendingCountReply;
use sqlx::PgPool;
use tokio::sync::mpsc;

use super::entry::{StreamEntry, parse_entries, parse_read_reply};
use super::{QueueError, dead_letter};
use crate::config::QueueConfig;

/// Ids this consumer has handed to handlers and not finished; their leases are renewed so no
/// other consumer reclaims a job that is merely slow.
pub type InFlight = Arc<Mutex<HashSet<String>>>;

/// Everything one reader needs.
pub struct Reader {
    pub client: redis::Client,
    pub pool: PgPool,
    pub cfg: QueueConfig,
    pub prefix: String,
    pub job_type: Arc<str>,
    pub stream: Arc<str>,
    pub consumer: String,
    pub inflight: InFlight,
    pub tx: mpsc::Sender<Result<StreamEntry, QueueError>>,
    /// Waited before connecting: a restarted worker backs off instead of hammering a Redis
    /// that just failed.
    pub start_delay: Duration,
}

/// A consumer name unique per process start and per worker restart, so a restarted worker
/// never inherits a name another process still uses.
pub fn consumer_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_string());
    let suffix: u32 = rand::random();
    format!("{host}-{}-{suffix:08x}", std::process::id())
}

/// Removes `consumer` from the group if nothing is pending on it. Called when a worker stops
/// gracefully (its reader has stopped, so nothing new can be delivered to it); consumers of
/// crashed workers stay listed until removed by hand.
pub async fn remove_consumer_if_idle<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    stream: &str,
    group: &str,
    consumer: &str,
) -> Result<bool, QueueError> {
    let pending: StreamPendingCountReply = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg("-")
        .arg("+")
        .arg(1)
        .arg(consumer)
        .query_async(conn)
        .await
        .map_err(QueueError::redis(format!("XPENDING {stream} {consumer}")))?;
    if !pending.ids.is_empty() {
        return Ok(false);
    }
    let _: i64 = redis::cmd("XGROUP")
        .arg("DELCONSUMER")
        .arg(stream)
        .arg(group)
        .arg(consumer)
        .query_async(conn)
        .await
        .map_err(QueueError::redis(format!(
            "XGROUP DELCONSUMER {stream} {consumer}"
        )))?;
    Ok(true)
}

/// Creates the consumer group (from id 0, so entries added before the first worker started
/// are read) and the stream if missing. BUSYGROUP means it exists already.
pub async fn ensure_group<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    stream: &str,
    group: &str,
) -> Result<(), QueueError> {
    let res: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match res {
        Ok(()) => Ok(()),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(QueueError::redis(format!("XGROUP CREATE {stream} {group}"))(e)),
    }
}

impl Reader {
    /// Reads until the receiving side goes away. A Redis or Postgres failure is sent to the
    /// receiver (the apalis worker then fails and the Monitor restarts it with a new reader).
    pub async fn run(self) {
        if let Err(e) = self.read_loop().await {
            let _ = self.tx.send(Err(e)).await;
        }
    }

    async fn read_loop(&self) -> Result<(), QueueError> {
        if !self.start_delay.is_zero() {
            tokio::time::sleep(self.start_delay).await;
        }
        let conn_cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(
                Duration::from_millis(self.cfg.block_ms) + Duration::from_secs(30),
            ));
        let mut conn = self
            .client
            .get_multiplexed_async_connection_with_config(&conn_cfg)
            .await
            .map_err(QueueError::redis("connect for XREADGROUP"))?;
        ensure_group(&mut conn, &self.stream, &self.cfg.group).await?;
        // Visible in XINFO CONSUMERS before its first entry (Redis creates consumers lazily).
        let _: redis::Value = redis::cmd("XGROUP")
            .arg("CREATECONSUMER")
            .arg(self.stream.as_ref())
            .arg(&self.cfg.group)
            .arg(&self.consumer)
            .query_async(&mut conn)
            .await
            .map_err(QueueError::redis(format!(
                "XGROUP CREATECONSUMER {}",
                self.stream
            )))?;
        tracing::info!(job_type = %self.job_type, consumer = %self.consumer, "stream consumer started");
        let interval = self.cfg.claim_interval();
        let mut next_claim = Instant::now();
        loop {
            if Instant::now() >= next_claim {
                self.renew_leases(&mut conn).await?;
                if !self.reclaim(&mut conn).await? {
                    return Ok(());
                }
                next_claim = Instant::now() + interval;
            }
            let block = next_claim
                .saturating_duration_since(Instant::now())
                .as_millis()
                .clamp(1, u128::from(self.cfg.block_ms.max(1)));
            let reply: redis::Value = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(&self.cfg.group)
                .arg(&self.consumer)
                .arg("COUNT")
                .arg(self.cfg.read_count)
                .arg("BLOCK")
                .arg(block as u64)
                .arg("STREAMS")
                .arg(self.stream.as_ref())
                .arg(">")
                .query_async(&mut conn)
                .await
                .map_err(QueueError::redis(format!("XREADGROUP {}", self.stream)))?;
            for (id, fields) in parse_read_reply(reply) {
                if !self.hand_over(id, fields, 1).await {
                    return Ok(());
                }
            }
        }
    }

    /// Gives one entry to the worker; false when the worker is gone.
    async fn hand_over(&self, id: String, fields: Vec<(String, Vec<u8>)>, deliveries: u64) -> bool {
        if let Ok(mut set) = self.inflight.lock() {
            set.insert(id.clone());
        }
        let entry = StreamEntry {
            job_type: self.job_type.clone(),
            stream: self.stream.clone(),
            id,
            fields,
            deliveries,
        };
        self.tx.send(Ok(entry)).await.is_ok()
    }

    /// Resets the idle time of entries this consumer is still working on (XCLAIM JUSTID keeps
    /// the delivery count), so a slow job is not mistaken for an abandoned one.
    async fn renew_leases(&self, conn: &mut MultiplexedConnection) -> Result<(), QueueError> {
        let ids: Vec<String> = match self.inflight.lock() {
            Ok(set) => set.iter().cloned().collect(),
            Err(_) => return Ok(()),
        };
        for chunk in ids.chunks(1000) {
            let _: redis::Value = redis::cmd("XCLAIM")
                .arg(self.stream.as_ref())
                .arg(&self.cfg.group)
                .arg(&self.consumer)
                .arg(0)
                .arg(chunk)
                .arg("JUSTID")
                .query_async(conn)
                .await
                .map_err(QueueError::redis(format!("XCLAIM JUSTID {}", self.stream)))?;
        }
        Ok(())
    }

    /// Takes over entries idle longer than `claim_idle_ms` (their consumer died, or their
    /// handler failed with a retryable error). Entries delivered `max_deliveries` times go to
    /// the dead-letter store instead. Returns false when the worker is gone.
    async fn reclaim(&self, conn: &mut MultiplexedConnection) -> Result<bool, QueueError> {
        let pending: StreamPendingCountReply = redis::cmd("XPENDING")
            .arg(self.stream.as_ref())
            .arg(&self.cfg.group)
            .arg("IDLE")
            .arg(self.cfg.claim_idle_ms)
            .arg("-")
            .arg("+")
            .arg(self.cfg.read_count)
            .query_async(conn)
            .await
            .map_err(QueueError::redis(format!("XPENDING {}", self.stream)))?;
        if pending.ids.is_empty() {
            return Ok(true);
        }
        let limit = self.cfg.max_deliveries as usize;
        let inflight: HashSet<String> = match self.inflight.lock() {
            Ok(set) => set.clone(),
            Err(_) => HashSet::new(),
        };
        let mut retry = Vec::new();
        let mut exhausted = Vec::new();
        for p in pending.ids {
            if p.consumer == self.consumer && inflight.contains(&p.id) {
                continue;
            }
            if p.times_delivered >= limit {
                exhausted.push((p.id, p.times_delivered));
            } else {
                retry.push((p.id, p.times_delivered));
            }
        }
        if !exhausted.is_empty() {
            self.dead_letter_exhausted(conn, &exhausted).await?;
        }
        if retry.is_empty() {
            return Ok(true);
        }
        let ids: Vec<&str> = retry.iter().map(|(id, _)| id.as_str()).collect();
        let claimed = self.claim(conn, &ids).await?;
        for (id, fields) in claimed {
            let before = retry
                .iter()
                .find(|(r, _)| *r == id)
                .map(|(_, n)| *n as u64)
                .unwrap_or(0);
            tracing::debug!(job_type = %self.job_type, id = %id, deliveries = before + 1, "reclaimed idle entry");
            if !self.hand_over(id, fields, before + 1).await {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// XCLAIM with the idle threshold: only entries still idle are taken, so two consumers
    /// reclaiming at once never both get the same entry.
    async fn claim(
        &self,
        conn: &mut MultiplexedConnection,
        ids: &[&str],
    ) -> Result<Vec<super::entry::RawEntry>, QueueError> {
        let v: redis::Value = redis::cmd("XCLAIM")
            .arg(self.stream.as_ref())
            .arg(&self.cfg.group)
            .arg(&self.consumer)
            .arg(self.cfg.claim_idle_ms)
            .arg(ids)
            .query_async(conn)
            .await
            .map_err(QueueError::redis(format!("XCLAIM {}", self.stream)))?;
        Ok(parse_entries(v))
    }

    async fn dead_letter_exhausted(
        &self,
        conn: &mut MultiplexedConnection,
        exhausted: &[(String, usize)],
    ) -> Result<(), QueueError> {
        let ids: Vec<&str> = exhausted.iter().map(|(id, _)| id.as_str()).collect();
        let claimed = self.claim(conn, &ids).await?;
        if claimed.is_empty() {
            return Ok(());
        }
        let err_key = super::streams::last_error_key(&self.prefix, &self.job_type);
        let claimed_ids: Vec<&str> = claimed.iter().map(|(id, _)| id.as_str()).collect();
        let reasons: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(&err_key)
            .arg(&claimed_ids)
            .query_async(conn)
            .await
            .map_err(QueueError::redis(format!("HMGET {err_key}")))?;
        for ((id, fields), last) in claimed.iter().zip(reasons) {
            let deliveries = exhausted
                .iter()
                .find(|(e, _)| e == id)
                .map(|(_, n)| *n as u64)
                .unwrap_or(self.cfg.max_deliveries as u64);
            let entry = StreamEntry {
                job_type: self.job_type.clone(),
                stream: self.stream.clone(),
                id: id.clone(),
                fields: fields.clone(),
                deliveries,
            };
            let reason = format!(
                "delivery limit reached after {deliveries} deliveries; last error: {}",
                last.as_deref()
                    .unwrap_or("none recorded (the worker stopped while processing it)")
            );
            dead_letter::insert(&self.pool, &entry, &reason).await?;
            tracing::warn!(job_type = %self.job_type, id = %id, %reason, "entry dead-lettered");
            metrics::counter!("tokenwarden_jobs_processed_total", "job_type" => self.job_type.to_string(), "outcome" => "dead_lettered").increment(1);
        }
        let _: () = redis::pipe()
            .cmd("XACK")
            .arg(self.stream.as_ref())
            .arg(&self.cfg.group)
            .arg(&claimed_ids)
            .ignore()
            .cmd("HDEL")
            .arg(&err_key)
            .arg(&claimed_ids)
            .ignore()
            .query_async(conn)
            .await
            .map_err(QueueError::redis(format!("XACK {}", self.stream)))?;
        Ok(())
    }
}
