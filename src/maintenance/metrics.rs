//! The Prometheus recorder behind every `metrics::…!` call, and the sampler that turns queue and
//! dead-letter state into gauges.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::jobs::{acked_floor, job_streams, now_ms, parse_stream_id};
use crate::app::AppContext;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Latency buckets (seconds) for every `*_seconds` histogram: 1 ms to 60 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Buckets for batch-size histograms (`*_batch_size`).
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];

/// Installs the global recorder on first call and returns its handle; later calls return the
/// same handle. If another recorder was installed first (a library test harness), the handle
/// renders this recorder's (empty) registry and a warning is logged.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_batch_size".into()), BATCH_BUCKETS)
                });
            let builder = match builder {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, "histogram buckets rejected; using summaries");
                    PrometheusBuilder::new()
                }
            };
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if let Err(e) = metrics::set_global_recorder(recorder) {
                tracing::warn!(error = %e, "a metrics recorder was already installed");
            }
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!(
        "tokenwarden_scheduler_ticks_total",
        "Scheduled maintenance ticks run by this replica, by job and result"
    );
    describe_counter!(
        "tokenwarden_scheduler_missed_ticks_total",
        "Ticks that fell due while no replica ran and were folded into one run"
    );
    describe_counter!(
        "tokenwarden_anomalies_total",
        "New usage anomalies stored, by rule and severity"
    );
    describe_counter!(
        "tokenwarden_anomaly_alerts_total",
        "Alert webhook deliveries by outcome"
    );
    describe_counter!(
        "tokenwarden_locks_released_total",
        "Expired holds released by the cleanup job"
    );
    describe_counter!(
        "tokenwarden_pruned_total",
        "Rows or entries pruned, by kind"
    );
    describe_gauge!(
        "tokenwarden_queue_depth",
        "Entries in a job stream (XLEN), by job type"
    );
    describe_gauge!(
        "tokenwarden_queue_oldest_age_seconds",
        "Age of the oldest entry not yet acknowledged, by job type"
    );
    describe_gauge!(
        "tokenwarden_dead_letters",
        "Dead letters not yet retried (Postgres dead_letters)"
    );
}

/// Starts the periodic sampler (queue depth and oldest unacknowledged entry age per stream, dead letters; the queue itself records pending and lag)
/// and the recorder's upkeep. Ends when `ctx.shutdown` is cancelled.
pub fn spawn_sampler(ctx: AppContext, handle: PrometheusHandle) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let every = Duration::from_secs(ctx.cfg.maintenance.metrics_sample_secs);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ctx.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            sample(&ctx).await;
            handle.run_upkeep();
        }
    })
}

/// Takes one sample of every gauge. Errors are logged; a missing table (module not deployed)
/// only leaves its gauge unset.
pub async fn sample(ctx: &AppContext) {
    let mut conn = ctx.redis.clone();
    match job_streams(&mut conn, &ctx.cfg.redis.prefix).await {
        Ok(streams) => {
            let strip = format!("{}:jobs:", ctx.cfg.redis.prefix);
            for stream in streams {
                let job = stream.strip_prefix(&strip).unwrap_or(&stream).to_string();
                if let Err(e) = sample_stream(&mut conn, &stream, &job).await {
                    tracing::debug!(stream, error = %e, "cannot sample stream");
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot list job streams for metrics"),
    }
    let dead: Result<i64, _> =
        sqlx::query_scalar("SELECT count(*) FROM public.dead_letters WHERE retried_at IS NULL")
            .fetch_one(&ctx.pool)
            .await;
    match dead {
        Ok(n) => metrics::gauge!("tokenwarden_dead_letters").set(n as f64),
        Err(e) => tracing::debug!(error = %e, "cannot count dead letters"),
    }
}

async fn sample_stream(
    conn: &mut redis::aio::ConnectionManager,
    stream: &str,
    job: &str,
) -> Result<(), String> {
    let len: u64 = redis::cmd("XLEN")
        .arg(stream)
        .query_async(conn)
        .await
        .map_err(|e| e.to_string())?;
    metrics::gauge!("tokenwarden_queue_depth", "job_type" => job.to_string()).set(len as f64);
    // The oldest entry not acknowledged by every group: the first at or after the floor.
    let oldest_ms = match acked_floor(conn, stream).await.map_err(|e| e.to_string())? {
        Some((ms, seq)) => first_id_from(conn, stream, &format!("{ms}-{seq}")).await?,
        None => first_id_from(conn, stream, "-").await?,
    };
    let age = oldest_ms
        .map(|ms| now_ms().saturating_sub(ms) as f64 / 1000.0)
        .unwrap_or(0.0);
    metrics::gauge!("tokenwarden_queue_oldest_age_seconds", "job_type" => job.to_string()).set(age);
    Ok(())
}

async fn first_id_from(
    conn: &mut redis::aio::ConnectionManager,
    stream: &str,
    start: &str,
) -> Result<Option<u64>, String> {
    let entries: Vec<redis::Value> = redis::cmd("XRANGE")
        .arg(stream)
        .arg(start)
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query_async(conn)
        .await
        .map_err(|e| e.to_string())?;
    let id = match entries.first() {
        Some(redis::Value::Array(parts)) => match parts.first() {
            Some(redis::Value::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            Some(redis::Value::SimpleString(s)) => Some(s.clone()),
            _ => None,
        },
        _ => None,
    };
    Ok(id.and_then(|id| parse_stream_id(&id)).map(|(ms, _)| ms))
}
