//! The Prometheus recorder behind every `metrics::…!` call, and the sampler that records the
//! queue's figures (read by [`crate::queue::figures`]) as gauges.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::app::AppContext;
use crate::queue::figures::QueueFigures;

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
    describe_gauge!(
        "tokenwarden_queue_quarantined",
        "Entries in the Redis quarantine hashes: past the delivery limit, dead letter refused by Postgres"
    );
}

/// Starts the periodic sampler of the queue gauges (see `record_queue_figures`) and the
/// recorder's upkeep. Ends when `ctx.shutdown` is cancelled.
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

/// Takes one sample of every gauge. The queue reads the figures (failures are logged there and
/// only leave their gauge unset); this only records them.
pub async fn sample(ctx: &AppContext) {
    let mut conn = ctx.redis.clone();
    let figures = crate::queue::figures::sample(
        &mut conn,
        &ctx.pool,
        &ctx.cfg.redis.prefix,
        &ctx.cfg.queue.group,
        &ctx.job_streams.get(),
    )
    .await;
    record_queue_figures(&figures);
}

/// Sets the queue gauges from one sample: per job type depth, pending, lag and oldest
/// unacknowledged age, the open dead letters and the quarantined entries.
fn record_queue_figures(figures: &QueueFigures) {
    for s in &figures.streams {
        let job = s.job_type.clone();
        metrics::gauge!("tokenwarden_queue_depth", "job_type" => job.clone()).set(s.depth as f64);
        if let Some(pending) = s.pending {
            metrics::gauge!("tokenwarden_queue_pending", "job_type" => job.clone())
                .set(pending as f64);
        }
        if let Some(lag) = s.lag {
            metrics::gauge!("tokenwarden_queue_lag", "job_type" => job.clone()).set(lag as f64);
        }
        metrics::gauge!("tokenwarden_queue_oldest_age_seconds", "job_type" => job)
            .set(s.oldest_unacked_age.as_secs_f64());
    }
    if let Some(n) = figures.open_dead_letters {
        metrics::gauge!("tokenwarden_dead_letters").set(n as f64);
    }
    if let Some(n) = figures.quarantined {
        metrics::gauge!("tokenwarden_queue_quarantined").set(n as f64);
    }
}
