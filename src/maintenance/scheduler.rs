//! The maintenance scheduler: runs each cron tick of each job exactly once across any number of
//! `run` replicas.
//!
//! Why not apalis-cron: it makes ticks in every process (two replicas, two runs per tick) and its
//! worker dies with "Tick out of range" when a handler outlasts the interval
//! (`reference/queue-apalis.md` §1.8). Here:
//!
//! - **Once per tick.** Every replica computes the same tick times from the cron expression and
//!   tries `INSERT INTO scheduler_ticks (job, scheduled_at) … ON CONFLICT DO NOTHING`. Only the
//!   replica whose insert created the row runs the tick; it calls the job's handler in-process
//!   (the same [`JobHandler`] the queue serves), so the tick's outcome is in that row.
//! - **Missed ticks run once.** At start, the last recorded tick of each job is read; if ticks
//!   fell due since then (everything was down), only the latest is claimed, with the number it
//!   stands for in `missed_ticks`. A replica that wakes up late folds overdue ticks the same way.
//! - **No overlap, no stall.** Runs are spawned, never awaited by the tick loop. A run holds a
//!   transaction-scoped advisory lock per job for its whole duration; a tick whose run cannot
//!   take the lock (the previous run, on any replica, is still going) is recorded as `skipped`.
//!   Errors and panics end up in the tick row and the log; the loop keeps ticking.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::app::AppContext;
use crate::queue::JobHandler;

/// Upper bound on the ticks walked when folding missed ticks, so a per-second schedule after a
/// month of downtime does not spin for long; beyond it the walk restarts one day before now.
const MAX_TICK_WALK: usize = 200_000;

/// Starts one tick loop per scheduled maintenance job. The returned task ends after
/// `ctx.shutdown` is cancelled and in-flight runs have finished or the grace period ran out.
pub fn spawn(ctx: AppContext, handlers: Vec<Arc<dyn JobHandler>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(ctx, handlers))
}

/// A replica's name in `scheduler_ticks.claimed_by`: host, pid and a random suffix, so two
/// processes never share one.
pub fn replica_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "host".to_string());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &suffix[..8])
}

async fn run(ctx: AppContext, handlers: Vec<Arc<dyn JobHandler>>) {
    let replica: Arc<str> = replica_name().into();
    let mut loops = JoinSet::new();
    let runs = RunTracker::default();
    for handler in handlers {
        let job = handler.job_type();
        let Some(schedule) = ctx.cfg.maintenance.schedules.schedule(job) else {
            tracing::info!(job, "no schedule configured; job runs only when enqueued");
            continue;
        };
        for result in ["succeeded", "failed", "skipped"] {
            metrics::counter!("tokenwarden_scheduler_ticks_total", "job" => job, "result" => result)
                .increment(0);
        }
        tracing::info!(job, schedule = schedule.source(), replica = %replica, "scheduling");
        loops.spawn(tick_loop(
            ctx.pool.clone(),
            ctx.shutdown.clone(),
            schedule,
            handler,
            replica.clone(),
            runs.clone(),
        ));
    }
    while loops.join_next().await.is_some() {}
    runs.drain(
        &ctx.pool,
        &replica,
        Duration::from_secs(ctx.cfg.worker.shutdown_grace_secs),
    )
    .await;
}

/// The runs this replica has in flight, so shutdown can wait for them.
#[derive(Clone, Default)]
struct RunTracker(Arc<tokio::sync::Mutex<JoinSet<()>>>);

impl RunTracker {
    async fn spawn(&self, fut: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut set = self.0.lock().await;
        // Reap finished runs so the set does not grow without bound.
        while set.try_join_next().is_some() {}
        set.spawn(fut);
    }

    async fn drain(&self, pool: &PgPool, replica: &str, grace: Duration) {
        let mut set = self.0.lock().await;
        if set.is_empty() {
            return;
        }
        tracing::info!(
            runs = set.len(),
            ?grace,
            "waiting for scheduled runs in flight"
        );
        let all_done = async { while set.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, all_done).await.is_err() {
            set.abort_all();
            while set.join_next().await.is_some() {}
            let res = sqlx::query(
                "UPDATE public.scheduler_ticks SET status = 'failed', finished_at = now(), \
                 error = 'interrupted by shutdown after the grace period' \
                 WHERE claimed_by = $1 AND status IN ('claimed', 'running')",
            )
            .bind(replica)
            .execute(pool)
            .await;
            match res {
                Ok(r) => tracing::warn!(
                    interrupted = r.rows_affected(),
                    "scheduled runs interrupted by shutdown"
                ),
                Err(e) => tracing::error!(error = %e, "cannot record interrupted runs"),
            }
        }
    }
}

/// The latest tick of `schedule` in `(after, now]` and how many earlier ticks it stands for.
pub fn latest_due(
    schedule: &cron::Schedule,
    after: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Option<(DateTime<Utc>, u32)> {
    let walk = |from: DateTime<Utc>| {
        let mut latest = None;
        let mut count = 0usize;
        for t in schedule.after(&from) {
            if t > now {
                break;
            }
            latest = Some(t);
            count += 1;
            if count >= MAX_TICK_WALK {
                return (latest, count, true);
            }
        }
        (latest, count, false)
    };
    let (latest, count, truncated) = walk(after);
    if truncated {
        let (latest, _, _) = walk(now - chrono::Duration::days(1));
        return latest.map(|t| (t, u32::MAX));
    }
    latest.map(|t| (t, u32::try_from(count - 1).unwrap_or(u32::MAX)))
}

async fn tick_loop(
    pool: PgPool,
    shutdown: CancellationToken,
    schedule: cron::Schedule,
    handler: Arc<dyn JobHandler>,
    replica: Arc<str>,
    runs: RunTracker,
) {
    let job = handler.job_type();
    let started = Utc::now();
    // Catch-up: ticks due since the last recorded one (by any replica) run once, now.
    let mut last = match last_recorded_tick(&pool, job).await {
        Ok(Some(prev)) => prev,
        Ok(None) => started,
        Err(e) => {
            tracing::error!(job, error = %e, "cannot read the last tick; not catching up");
            started
        }
    };
    loop {
        let now = Utc::now();
        if let Some((tick, missed)) = latest_due(&schedule, last, now) {
            match claim(&pool, job, tick, &replica, missed).await {
                Ok(true) => {
                    last = tick;
                    if missed > 0 {
                        tracing::info!(job, %tick, missed, "folding missed ticks into one run");
                        metrics::counter!("tokenwarden_scheduler_missed_ticks_total", "job" => job)
                            .increment(u64::from(missed));
                    }
                    let run = run_tick(pool.clone(), handler.clone(), tick, replica.clone());
                    runs.spawn(run).await;
                }
                Ok(false) => {
                    last = tick;
                    tracing::debug!(job, %tick, "tick claimed by another replica");
                }
                Err(e) => {
                    // Postgres unreachable: keep `last`, retry shortly. Ticks that fall due
                    // meanwhile are folded into one run once the claim succeeds again.
                    tracing::error!(job, %tick, error = %e, "cannot claim tick; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
            continue;
        }
        let Some(next) = schedule.after(&last).next() else {
            tracing::warn!(job, "schedule has no further ticks");
            return;
        };
        let wait = (next - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn last_recorded_tick(
    pool: &PgPool,
    job: &str,
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar("SELECT max(scheduled_at) FROM public.scheduler_ticks WHERE job = $1")
        .bind(job)
        .fetch_one(pool)
        .await
}

/// Inserts the tick row; true when this replica's insert created it (and so owns the tick).
async fn claim(
    pool: &PgPool,
    job: &str,
    tick: DateTime<Utc>,
    replica: &str,
    missed: u32,
) -> Result<bool, sqlx::Error> {
    let missed = i32::try_from(missed).unwrap_or(i32::MAX);
    let res = sqlx::query(
        "INSERT INTO public.scheduler_ticks (job, scheduled_at, claimed_by, missed_ticks) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (job, scheduled_at) DO NOTHING",
    )
    .bind(job)
    .bind(tick)
    .bind(replica)
    .bind(missed)
    .execute(pool)
    .await?;
    Ok(res.rows_affected() == 1)
}

/// Runs one claimed tick under the job's advisory lock and records its outcome.
async fn run_tick(
    pool: PgPool,
    handler: Arc<dyn JobHandler>,
    tick: DateTime<Utc>,
    replica: Arc<str>,
) {
    let job = handler.job_type();
    let outcome = guarded_run(&pool, handler, tick).await;
    let (status, result, error) = match outcome {
        RunOutcome::Succeeded(v) => ("succeeded", Some(v), None),
        RunOutcome::Failed(e) => ("failed", None, Some(e)),
        RunOutcome::Skipped => (
            "skipped",
            None,
            Some("the previous run of this job was still in progress".to_string()),
        ),
    };
    match status {
        "succeeded" => tracing::info!(job, %tick, result = ?result, "scheduled run succeeded"),
        "skipped" => tracing::warn!(job, %tick, "previous run still in progress; tick skipped"),
        _ => tracing::error!(job, %tick, error = ?error, "scheduled run failed"),
    }
    metrics::counter!("tokenwarden_scheduler_ticks_total", "job" => job, "result" => status)
        .increment(1);
    let res = sqlx::query(
        "UPDATE public.scheduler_ticks SET status = $3, result = $4, error = $5, \
         finished_at = now() WHERE job = $1 AND scheduled_at = $2 AND claimed_by = $6",
    )
    .bind(job)
    .bind(tick)
    .bind(status)
    .bind(result)
    .bind(error)
    .bind(&*replica)
    .execute(&pool)
    .await;
    if let Err(e) = res {
        tracing::error!(job, %tick, error = %e, "cannot record the outcome of a scheduled run");
    }
}

/// Deletes ticks claimed more than `days` days ago; returns how many. Each job's latest tick
/// stays: the catch-up after downtime starts from it.
pub async fn prune_ticks(pool: &PgPool, days: u32) -> Result<u64, sqlx::Error> {
    let res = sqlx::query(
        "DELETE FROM public.scheduler_ticks t \
         WHERE t.claimed_at < now() - make_interval(days => $1) \
           AND t.scheduled_at < (SELECT max(l.scheduled_at) FROM public.scheduler_ticks l \
                                  WHERE l.job = t.job)",
    )
    .bind(i32::try_from(days).unwrap_or(i32::MAX))
    .execute(pool)
    .await?;
    Ok(res.rows_affected())
}

enum RunOutcome {
    Succeeded(serde_json::Value),
    Failed(String),
    Skipped,
}

async fn guarded_run(
    pool: &PgPool,
    handler: Arc<dyn JobHandler>,
    tick: DateTime<Utc>,
) -> RunOutcome {
    let job = handler.job_type();
    // A transaction-scoped lock: if this task is aborted mid-run, dropping the transaction
    // rolls it back and frees the lock; a session lock would stay with the pooled connection.
    let mut lock_tx = match pool.begin().await {
        Ok(tx) => tx,
        Err(e) => return RunOutcome::Failed(format!("cannot open the lock transaction: {e}")),
    };
    let locked: Result<bool, _> =
        sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(format!("tokenwarden.maintenance.{job}"))
            .fetch_one(&mut *lock_tx)
            .await;
    match locked {
        Ok(true) => {}
        Ok(false) => return RunOutcome::Skipped,
        Err(e) => return RunOutcome::Failed(format!("cannot take the job lock: {e}")),
    }
    let started = sqlx::query(
        "UPDATE public.scheduler_ticks SET status = 'running', started_at = now() \
         WHERE job = $1 AND scheduled_at = $2",
    )
    .bind(job)
    .bind(tick)
    .execute(pool)
    .await;
    if let Err(e) = started {
        tracing::warn!(job, %tick, error = %e, "cannot mark tick running");
    }
    // Spawned so a panic in the handler surfaces as a JoinError instead of unwinding here.
    let outcome = match tokio::spawn(handler.handle(serde_json::json!({}))).await {
        Ok(Ok(v)) => RunOutcome::Succeeded(v),
        Ok(Err(e)) => RunOutcome::Failed(e.to_string()),
        Err(e) if e.is_panic() => RunOutcome::Failed(format!("handler panicked: {e}")),
        Err(e) => RunOutcome::Failed(format!("handler task ended: {e}")),
    };
    if let Err(e) = lock_tx.commit().await {
        tracing::warn!(job, error = %e, "cannot release the job lock transaction");
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn latest_due_folds_missed_ticks() {
        let every_minute = cron::Schedule::from_str("0 * * * * *").unwrap();
        let (t, missed) = latest_due(
            &every_minute,
            at("2026-01-01T00:00:00Z"),
            at("2026-01-01T00:10:30Z"),
        )
        .unwrap();
        assert_eq!(t, at("2026-01-01T00:10:00Z"));
        assert_eq!(missed, 9);
    }

    #[test]
    fn latest_due_is_none_before_the_next_tick() {
        let every_minute = cron::Schedule::from_str("0 * * * * *").unwrap();
        assert!(
            latest_due(
                &every_minute,
                at("2026-01-01T00:00:00Z"),
                at("2026-01-01T00:00:59Z")
            )
            .is_none()
        );
    }

    #[test]
    fn latest_due_bounds_long_walks() {
        let every_second = cron::Schedule::from_str("* * * * * *").unwrap();
        let (t, missed) = latest_due(
            &every_second,
            at("2025-01-01T00:00:00Z"),
            at("2026-01-01T00:00:00Z"),
        )
        .unwrap();
        assert_eq!(t, at("2026-01-01T00:00:00Z"));
        assert_eq!(missed, u32::MAX);
    }
}
