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
use super::{QueueError, dead_letter, quarantine};
use crate::config::QueueConfig;

/// How long an entry of a dead consumer must have been idle before it is taken over (XCLAIM's
/// min-idle-time): the first taker resets it, so a second one racing it gets nothing.
const TAKEOVER_MIN_IDLE_MS: u64 = 1_000;

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
    /// Whether the reader is serving its stream, for `/readyz`.
    pub health: super::health::StreamHealth,
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_string())
}

/// A consumer name unique per process start and per worker restart, so a restarted worker
/// never inherits a name another process still uses: `host-pid-random`.
pub fn consumer_name() -> String {
    let suffix: u32 = rand::random();
    format!("{}-{}-{suffix:08x}", host_name(), std::process::id())
}

/// The key a live consumer keeps refreshed (`SET … PX queue.claim_idle_ms`, every claim
/// interval): a consumer without it is dead, and its pending entries may be taken at once.
pub fn alive_key(prefix: &str, consumer: &str) -> String {
    format!("{prefix}:alive:{consumer}")
}

/// Whether `other`, a consumer name of the form `host-pid-random`, is a dead predecessor of
/// `me` on this host: the same host and pid but another name (a worker this process restarted),
/// or the same host and a pid no process has any more (a process killed and started again).
fn dead_predecessor(me: &str, other: &str) -> bool {
    let parse = |n: &str| {
        let mut it = n.rsplitn(3, '-');
        let _suffix = it.next()?;
        let pid: u32 = it.next()?.parse().ok()?;
        Some((it.next()?.to_string(), pid))
    };
    let (Some((my_host, my_pid)), Some((host, pid))) = (parse(me), parse(other)) else {
        return false;
    };
    if host != my_host || me == other {
        return false;
    }
    pid == my_pid
        || (std::path::Path::new("/proc/self").exists()
            && !std::path::Path::new(&format!("/proc/{pid}")).exists())
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
    stream: &[u8],
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
        Err(e) => Err(QueueError::redis(format!(
            "XGROUP CREATE {} {group}",
            super::streams::shown(stream)
        ))(e)),
    }
}

impl Reader {
    /// Reads until the receiving side goes away. A Redis or Postgres failure is sent to the
    /// receiver (the apalis worker then fails and the Monitor restarts it with a new reader).
    pub async fn run(self) {
        // The back-off comes before both halves: the heartbeat connects too, and when it
        // failed at once (Redis unreachable) a restarted worker failed again at once, without
        // waiting, over a thousand restarts a second.
        if !self.start_delay.is_zero() {
            tokio::time::sleep(self.start_delay).await;
        }
        let result = tokio::select! {
            r = self.read_loop() => r,
            r = self.heartbeat() => r,
        };
        if let Err(e) = result {
            self.health.failed(&e.to_string());
            let _ = self.tx.send(Err(e)).await;
        }
    }

    /// Keeps this consumer's [`alive_key`] set while the reader runs (on its own connection
    /// task, so a read loop waiting for busy handlers does not look dead).
    async fn heartbeat(&self) -> Result<(), QueueError> {
        let mut conn = self
            .client
            .get_multiplexed_async_connection()
            .await
            .map_err(QueueError::redis("connect for the consumer heartbeat"))?;
        let key = alive_key(&self.prefix, &self.consumer);
        loop {
            let _: () = redis::cmd("SET")
                .arg(&key)
                .arg(super::streams::now_ms())
                .arg("PX")
                .arg(self.cfg.claim_idle_ms)
                .query_async(&mut conn)
                .await
                .map_err(QueueError::redis(format!("SET {key}")))?;
            tokio::time::sleep(self.cfg.claim_interval()).await;
        }
    }

    async fn read_loop(&self) -> Result<(), QueueError> {
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
        ensure_group(&mut conn, self.stream.as_bytes(), &self.cfg.group).await?;
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
                let deadline = Instant::now() + interval;
                let dead = self.take_over_dead(&mut conn, deadline).await?;
                if let Pass::WorkerGone = dead {
                    return Ok(());
                }
                let idle = self.reclaim(&mut conn, deadline).await?;
                next_claim = match (dead, idle) {
                    (Pass::WorkerGone, _) | (_, Pass::WorkerGone) => return Ok(()),
                    // Out of time with entries left: read once, then claim again at once.
                    (Pass::MoreLeft, _) | (_, Pass::MoreLeft) => Instant::now(),
                    // A dead consumer still holds entries too recent to take: soon.
                    (Pass::Soon, _) | (_, Pass::Soon) => {
                        Instant::now() + interval.min(Duration::from_millis(TAKEOVER_MIN_IDLE_MS))
                    }
                    (Pass::Done, Pass::Done) => Instant::now() + interval,
                };
            }
            self.health.serving();
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
    async fn hand_over(
        &self,
        id: String,
        fields: Vec<(Vec<u8>, Vec<u8>)>,
        deliveries: u64,
    ) -> bool {
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

    /// Takes over the pending entries of dead consumers (no [`alive_key`], or a dead
    /// predecessor on this host) without waiting for `claim_idle_ms`, and removes dead
    /// consumers that hold nothing, so restarts do not pile up consumers in the group. Entries
    /// idle less than [`TAKEOVER_MIN_IDLE_MS`] are left for the next pass: two live consumers
    /// taking over the same dead one at once never both get an entry.
    async fn take_over_dead(
        &self,
        conn: &mut MultiplexedConnection,
        deadline: Instant,
    ) -> Result<Pass, QueueError> {
        let consumers: redis::streams::StreamInfoConsumersReply = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(self.stream.as_ref())
            .arg(&self.cfg.group)
            .query_async(conn)
            .await
            .map_err(QueueError::redis(format!(
                "XINFO CONSUMERS {}",
                self.stream
            )))?;
        let others: Vec<_> = consumers
            .consumers
            .into_iter()
            .filter(|c| c.name != self.consumer)
            .collect();
        if others.is_empty() {
            return Ok(Pass::Done);
        }
        let mut pipe = redis::pipe();
        for c in &others {
            pipe.cmd("EXISTS").arg(alive_key(&self.prefix, &c.name));
        }
        let alive: Vec<bool> = pipe
            .query_async(conn)
            .await
            .map_err(QueueError::redis("EXISTS consumer heartbeats"))?;
        let min_idle = TAKEOVER_MIN_IDLE_MS.min(self.cfg.claim_idle_ms);
        let mut outcome = Pass::Done;
        for (c, alive) in others.iter().zip(alive) {
            if alive && !dead_predecessor(&self.consumer, &c.name) {
                continue;
            }
            if c.pending == 0 {
                let _: i64 = redis::cmd("XGROUP")
                    .arg("DELCONSUMER")
                    .arg(self.stream.as_ref())
                    .arg(&self.cfg.group)
                    .arg(&c.name)
                    .query_async(conn)
                    .await
                    .map_err(QueueError::redis(format!(
                        "XGROUP DELCONSUMER {} {}",
                        self.stream, c.name
                    )))?;
                tracing::info!(job_type = %self.job_type, consumer = %c.name, "removed a dead consumer");
                continue;
            }
            let mut start = "-".to_string();
            let mut taken = 0;
            loop {
                let pending: StreamPendingCountReply = redis::cmd("XPENDING")
                    .arg(self.stream.as_ref())
                    .arg(&self.cfg.group)
                    .arg("IDLE")
                    .arg(min_idle)
                    .arg(&start)
                    .arg("+")
                    .arg(self.cfg.read_count)
                    .arg(&c.name)
                    .query_async(conn)
                    .await
                    .map_err(QueueError::redis(format!(
                        "XPENDING {} {}",
                        self.stream, c.name
                    )))?;
                let n = pending.ids.len();
                taken += n;
                let Some(last) = pending.ids.last() else {
                    break;
                };
                start = format!("({}", last.id);
                let items: Vec<(String, usize)> = pending
                    .ids
                    .into_iter()
                    .map(|p| (p.id, p.times_delivered))
                    .collect();
                tracing::info!(job_type = %self.job_type, consumer = %c.name, entries = n, "taking over a dead consumer's entries");
                if !self.take(conn, items, min_idle).await? {
                    return Ok(Pass::WorkerGone);
                }
                if n < self.cfg.read_count {
                    break;
                }
                if Instant::now() >= deadline {
                    return Ok(Pass::MoreLeft);
                }
            }
            if taken < c.pending {
                outcome = Pass::Soon;
            }
        }
        Ok(outcome)
    }

    /// Takes over entries idle longer than `claim_idle_ms` (their consumer died, or their
    /// handler failed with a retryable error), page after page until none is left or
    /// `deadline` passes. Entries delivered `max_deliveries` times go to the dead-letter store
    /// instead.
    async fn reclaim(
        &self,
        conn: &mut MultiplexedConnection,
        deadline: Instant,
    ) -> Result<Pass, QueueError> {
        let mut start = "-".to_string();
        loop {
            let pending: StreamPendingCountReply = redis::cmd("XPENDING")
                .arg(self.stream.as_ref())
                .arg(&self.cfg.group)
                .arg("IDLE")
                .arg(self.cfg.claim_idle_ms)
                .arg(&start)
                .arg("+")
                .arg(self.cfg.read_count)
                .query_async(conn)
                .await
                .map_err(QueueError::redis(format!("XPENDING {}", self.stream)))?;
            let n = pending.ids.len();
            let Some(last) = pending.ids.last() else {
                return Ok(Pass::Done);
            };
            start = format!("({}", last.id);
            let inflight: HashSet<String> = match self.inflight.lock() {
                Ok(set) => set.clone(),
                Err(_) => HashSet::new(),
            };
            let items: Vec<(String, usize)> = pending
                .ids
                .into_iter()
                .filter(|p| !(p.consumer == self.consumer && inflight.contains(&p.id)))
                .map(|p| (p.id, p.times_delivered))
                .collect();
            if !self.take(conn, items, self.cfg.claim_idle_ms).await? {
                return Ok(Pass::WorkerGone);
            }
            if n < self.cfg.read_count {
                return Ok(Pass::Done);
            }
            if Instant::now() >= deadline {
                return Ok(Pass::MoreLeft);
            }
        }
    }

    /// Claims `items` (id, deliveries so far) that are still idle `min_idle_ms`: those at the
    /// delivery limit go to the dead-letter store, the others to the worker. False when the
    /// worker is gone.
    async fn take(
        &self,
        conn: &mut MultiplexedConnection,
        items: Vec<(String, usize)>,
        min_idle_ms: u64,
    ) -> Result<bool, QueueError> {
        let limit = self.cfg.max_deliveries as usize;
        let (exhausted, retry): (Vec<_>, Vec<_>) =
            items.into_iter().partition(|(_, n)| *n >= limit);
        if !exhausted.is_empty() {
            self.dead_letter_exhausted(conn, &exhausted, min_idle_ms)
                .await?;
        }
        if retry.is_empty() {
            return Ok(true);
        }
        let ids: Vec<&str> = retry.iter().map(|(id, _)| id.as_str()).collect();
        let claimed = self.claim(conn, &ids, min_idle_ms).await?;
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
        min_idle_ms: u64,
    ) -> Result<Vec<super::entry::RawEntry>, QueueError> {
        let v: redis::Value = redis::cmd("XCLAIM")
            .arg(self.stream.as_ref())
            .arg(&self.cfg.group)
            .arg(&self.consumer)
            .arg(min_idle_ms)
            .arg(ids)
            .query_async(conn)
            .await
            .map_err(QueueError::redis(format!("XCLAIM {}", self.stream)))?;
        Ok(parse_entries(v))
    }

    /// Stores entries past the delivery limit as dead letters and acknowledges them. An entry
    /// whose dead letter cannot be stored stays pending (claimed again next pass); after
    /// [`quarantine::EXTRA_PASSES`] such passes it is kept in the quarantine hash instead and
    /// acknowledged, so one entry never holds its stream.
    async fn dead_letter_exhausted(
        &self,
        conn: &mut MultiplexedConnection,
        exhausted: &[(String, usize)],
        min_idle_ms: u64,
    ) -> Result<(), QueueError> {
        let ids: Vec<&str> = exhausted.iter().map(|(id, _)| id.as_str()).collect();
        let claimed = self.claim(conn, &ids, min_idle_ms).await?;
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
        let mut done: Vec<&str> = Vec::with_capacity(claimed.len());
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
            match dead_letter::insert(&self.pool, &entry, &reason).await {
                Ok(_) => {
                    tracing::warn!(job_type = %self.job_type, id = %id, %reason, "entry dead-lettered");
                    metrics::counter!("tokenwarden_jobs_processed_total", "job_type" => self.job_type.to_string(), "outcome" => "dead_lettered").increment(1);
                }
                Err(e)
                    if deliveries >= self.cfg.max_deliveries as u64 + quarantine::EXTRA_PASSES =>
                {
                    let why = format!("{reason}; the dead letter could not be stored: {e}");
                    quarantine::put(conn, &self.prefix, &(&entry).into(), &why).await?;
                    tracing::error!(job_type = %self.job_type, id = %id, reason = %why, "entry quarantined in Redis");
                    metrics::counter!("tokenwarden_jobs_processed_total", "job_type" => self.job_type.to_string(), "outcome" => "quarantined").increment(1);
                }
                Err(e) => {
                    tracing::warn!(job_type = %self.job_type, id = %id, deliveries, error = %e, "dead letter not stored; the entry stays pending and is tried again next pass");
                    continue;
                }
            }
            done.push(id.as_str());
        }
        if done.is_empty() {
            return Ok(());
        }
        let _: () = redis::pipe()
            .cmd("XACK")
            .arg(self.stream.as_ref())
            .arg(&self.cfg.group)
            .arg(&done)
            .ignore()
            .cmd("HDEL")
            .arg(&err_key)
            .arg(&done)
            .ignore()
            .query_async(conn)
            .await
            .map_err(QueueError::redis(format!("XACK {}", self.stream)))?;
        Ok(())
    }
}

/// How a claim pass ended.
enum Pass {
    /// Nothing left to take.
    Done,
    /// Its time ran out with entries left: claim again right after one read.
    MoreLeft,
    /// A dead consumer holds entries not yet idle enough to take: claim again in a second.
    Soon,
    /// The worker is gone: stop reading.
    WorkerGone,
}
