//! Maintenance and operations: the scheduler across replicas, the maintenance jobs, anomaly
//! detection and enforcement, the alert webhook, and the operations endpoint. Real Postgres,
//! real Redis, real `tokenwarden run` processes.

mod common;

use std::time::Duration;

use chrono::{DateTime, Utc};
use common::ops::{RedisServer, free_port, get, parse_prometheus, sum};
use common::{Child, TestEnv, wait_until};

const EVERY_SECOND: &str = "* * * * * *";

/// Env for a worker whose only schedule is `cleanup_locks` on `expr`.
fn only_cleanup(expr: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "TOKENWARDEN__MAINTENANCE__SCHEDULES__CLEANUP_LOCKS",
            expr.to_string(),
        ),
        (
            "TOKENWARDEN__MAINTENANCE__SCHEDULES__DETECT_ANOMALIES",
            String::new(),
        ),
        ("TOKENWARDEN__MAINTENANCE__SCHEDULES__PRUNE", String::new()),
        ("TOKENWARDEN__MAINTENANCE__METRICS_SAMPLE_SECS", "1".into()),
        ("TOKENWARDEN__QUEUE__SHUTDOWN_GRACE_SECS", "5".into()),
    ]
}

fn with_http(mut vars: Vec<(&'static str, String)>, port: u16) -> Vec<(&'static str, String)> {
    vars.push(("TOKENWARDEN__HTTP__ENABLED", "true".into()));
    vars.push(("TOKENWARDEN__HTTP__LISTEN", format!("127.0.0.1:{port}")));
    vars
}

fn spawn_run(env: &TestEnv, vars: &[(&'static str, String)]) -> Child {
    let refs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Child::spawn(env, &["run"], &refs)
}

#[derive(Debug, sqlx::FromRow)]
struct Tick {
    scheduled_at: DateTime<Utc>,
    claimed_by: String,
    status: String,
    missed_ticks: i32,
    #[allow(dead_code)] // shown in assertion messages
    error: Option<String>,
}

async fn ticks(env: &TestEnv, job: &str) -> Vec<Tick> {
    sqlx::query_as(
        "SELECT scheduled_at, claimed_by, status, missed_ticks, error FROM scheduler_ticks \
         WHERE job = $1 ORDER BY scheduled_at",
    )
    .bind(job)
    .fetch_all(&env.pool)
    .await
    .expect("read ticks")
}

async fn scrape(port: u16) -> Option<Vec<common::ops::Sample>> {
    let (status, body) = get(port, "/metrics").await?;
    assert_eq!(status, 200, "/metrics status");
    Some(parse_prometheus(&body).0)
}

fn finished(status: &str) -> bool {
    matches!(status, "succeeded" | "failed" | "skipped")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_run_each_tick_exactly_once() {
    let env = TestEnv::new().await;
    let (pa, pb) = (free_port(), free_port());
    let mut a = spawn_run(&env, &with_http(only_cleanup(EVERY_SECOND), pa));
    let mut b = spawn_run(&env, &with_http(only_cleanup(EVERY_SECOND), pb));

    // Ten seconds' worth of ticks, run by whichever replica claimed each.
    wait_until(Duration::from_secs(40), "10 finished ticks", || async {
        let n = ticks(&env, "cleanup_locks")
            .await
            .iter()
            .filter(|t| finished(&t.status))
            .count();
        (n >= 10).then_some(())
    })
    .await;

    // Each replica counts the runs it performed; together they must equal the tick rows,
    // so no tick ran on both replicas.
    let result_sum = |s: &[common::ops::Sample]| {
        ["succeeded", "failed", "skipped"]
            .iter()
            .map(|r| {
                sum(
                    s,
                    "tokenwarden_scheduler_ticks_total",
                    &[("job", "cleanup_locks"), ("result", r)],
                )
            })
            .sum::<f64>()
    };
    let (runs, rows) = wait_until(
        Duration::from_secs(20),
        "per-replica run counters to equal the finished tick rows",
        || async {
            let sa = scrape(pa).await?;
            let sb = scrape(pb).await?;
            let rows = ticks(&env, "cleanup_locks")
                .await
                .iter()
                .filter(|t| finished(&t.status))
                .count();
            let runs = result_sum(&sa) + result_sum(&sb);
            (runs as usize == rows).then_some((runs, rows))
        },
    )
    .await;
    assert!(rows >= 10 && runs >= 10.0);

    a.signal("TERM");
    b.signal("TERM");
    assert!(a.wait_exit(Duration::from_secs(30)).success(), "replica A exits 0");
    assert!(b.wait_exit(Duration::from_secs(30)).success(), "replica B exits 0");

    let all = ticks(&env, "cleanup_locks").await;
    // No gaps: consecutive seconds from the first tick to the last.
    for pair in all.windows(2) {
        assert_eq!(
            (pair[1].scheduled_at - pair[0].scheduled_at).num_milliseconds(),
            1000,
            "gap or irregular tick between {:?} and {:?}",
            pair[0],
            pair[1]
        );
    }
    for t in &all {
        assert!(
            t.status == "succeeded",
            "every tick ran to success: {t:?}"
        );
        assert_eq!(t.missed_ticks, 0, "no folding while running: {t:?}");
    }
    let replicas: std::collections::HashSet<_> = all.iter().map(|t| &t.claimed_by).collect();
    eprintln!(
        "{} ticks claimed by {} replica(s): {replicas:?}",
        all.len(),
        replicas.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticks_missed_while_down_run_once_at_start() {
    let env = TestEnv::new().await;
    // The last recorded run was ten minutes ago; nothing ran since.
    let last: DateTime<Utc> = sqlx::query_scalar(
        "INSERT INTO scheduler_ticks (job, scheduled_at, claimed_by, status, finished_at) \
         VALUES ('cleanup_locks', date_trunc('minute', now()) - interval '10 minutes', \
                 'old-replica', 'succeeded', now() - interval '10 minutes') \
         RETURNING scheduled_at",
    )
    .fetch_one(&env.pool)
    .await
    .expect("seed last tick");
    let started = Utc::now();
    let mut w = spawn_run(&env, &only_cleanup("0 * * * * *"));

    let caught_up = wait_until(Duration::from_secs(30), "the catch-up run", || async {
        ticks(&env, "cleanup_locks")
            .await
            .into_iter()
            .find(|t| t.scheduled_at > last && finished(&t.status))
    })
    .await;
    let between: Vec<Tick> = ticks(&env, "cleanup_locks")
        .await
        .into_iter()
        .filter(|t| t.scheduled_at > last && t.scheduled_at <= started)
        .collect();
    assert_eq!(between.len(), 1, "ten missed ticks run once: {between:?}");
    assert_eq!(between[0].scheduled_at, caught_up.scheduled_at);
    assert!(
        (9..=10).contains(&caught_up.missed_ticks),
        "the run stands for the missed ticks: {caught_up:?}"
    );
    assert_eq!(caught_up.status, "succeeded", "{caught_up:?}");
    w.signal("TERM");
    assert!(w.wait_exit(Duration::from_secs(30)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_ready_and_metrics_over_http() {
    let env = TestEnv::new().await;
    // A stream with one entry that no handler consumes, so the queue gauges sample a depth.
    let mut r = env.redis().await;
    let stream = format!("{}:jobs:unserved_job_type", env.redis_prefix);
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("payload")
        .arg("{}")
        .query_async(&mut r)
        .await
        .expect("xadd");
    let port = free_port();
    let mut w = spawn_run(&env, &with_http(only_cleanup(EVERY_SECOND), port));

    let (status, body) = wait_until(Duration::from_secs(30), "/healthz answers", || async {
        get(port, "/healthz").await
    })
    .await;
    assert_eq!((status, body.trim()), (200, "ok"));

    let (status, body) = get(port, "/readyz").await.expect("/readyz answers");
    assert_eq!(status, 200, "ready with Postgres and Redis up: {body}");
    let ready: serde_json::Value = serde_json::from_str(&body).expect("readyz is JSON");
    assert_eq!(ready["ready"], true);

    let expected = [
        "tokenwarden_scheduler_ticks_total",
        "tokenwarden_anomalies_total",
        "tokenwarden_queue_depth",
        "tokenwarden_queue_pending",
        "tokenwarden_dead_letters",
        "tokenwarden_queue_oldest_age_seconds",
    ];
    let samples = wait_until(
        Duration::from_secs(30),
        "metrics with scheduler runs and queue gauges",
        || async {
            let s = scrape(port).await?;
            let ran = sum(
                &s,
                "tokenwarden_scheduler_ticks_total",
                &[("job", "cleanup_locks"), ("result", "succeeded")],
            );
            let have_all = expected.iter().all(|n| s.iter().any(|x| x.name == *n));
            (ran >= 1.0 && have_all).then_some(s)
        },
    )
    .await;
    assert_eq!(
        sum(
            &samples,
            "tokenwarden_queue_depth",
            &[("job_type", "unserved_job_type")]
        ),
        1.0,
        "depth of the unserved stream"
    );
    for rule in ["request_burst", "spend_spike"] {
        assert!(
            samples
                .iter()
                .any(|s| s.name == "tokenwarden_anomalies_total"
                    && s.labels.get("rule").map(String::as_str) == Some(rule)),
            "anomalies counter exported for {rule}"
        );
    }
    w.signal("TERM");
    assert!(w.wait_exit(Duration::from_secs(30)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_when_redis_is_unreachable() {
    let env = TestEnv::new().await;
    let mut redis = RedisServer::start().await;
    let port = free_port();
    let mut vars = with_http(only_cleanup(""), port);
    vars.push(("TOKENWARDEN__REDIS__URL", redis.url()));
    vars.push(("TOKENWARDEN__MAINTENANCE__READINESS__CHECK_TIMEOUT_MS", "1000".into()));
    let mut w = spawn_run(&env, &vars);

    wait_until(Duration::from_secs(30), "ready while Redis is up", || async {
        let (status, _) = get(port, "/readyz").await?;
        (status == 200).then_some(())
    })
    .await;
    redis.kill();
    let body = wait_until(Duration::from_secs(30), "not ready once Redis is gone", || async {
        let (status, body) = get(port, "/readyz").await?;
        (status == 503).then_some(body)
    })
    .await;
    let v: serde_json::Value = serde_json::from_str(&body).expect("readyz is JSON");
    let checks = v["checks"].as_array().expect("checks");
    let redis_check = checks
        .iter()
        .find(|c| c["name"] == "redis")
        .expect("redis check");
    assert_eq!(redis_check["ok"], false, "{body}");
    let pg_check = checks
        .iter()
        .find(|c| c["name"] == "postgres")
        .expect("postgres check");
    assert_eq!(pg_check["ok"], true, "{body}");
    assert_eq!(get(port, "/healthz").await.map(|r| r.0), Some(200));
    w.signal("TERM");
    assert!(w.wait_exit(Duration::from_secs(30)).success());
}

async fn app_context(env: &TestEnv, extra: &[(&str, &str)]) -> tokenwarden::worker::AppContext {
    let mut vars = env.env_vars();
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let cfg = tokenwarden::config::Config::load_with_env(None, vars).expect("test config");
    tokenwarden::worker::AppContext::connect(cfg)
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_payloads_are_validated() {
    use tokenwarden::queue::{JobError, JobHandler};
    let env = TestEnv::new().await;
    let ctx = app_context(&env, &[]).await;
    let jobs = tokenwarden::maintenance::MaintenanceJobs::new(&ctx);
    for handler in jobs.handlers() {
        for bad in [
            serde_json::json!({"unexpected": 1}),
            serde_json::json!({"request_id": "not-a-uuid"}),
            serde_json::json!([]),
        ] {
            match handler.handle(bad.clone()).await {
                Err(JobError::Rejected(reason)) => {
                    assert!(reason.contains(handler.job_type()), "{reason}")
                }
                other => panic!("{} accepted {bad}: {other:?}", handler.job_type()),
            }
        }
    }
    // With a request id (as `tokenwarden enqueue … --wait` sends) the payload is fine.
    let reply = jobs
        .prune
        .handle(serde_json::json!({"request_id": uuid::Uuid::new_v4()}))
        .await
        .expect("prune with a request id");
    assert_eq!(reply["dead_letters_deleted"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_removes_only_old_and_acknowledged_data() {
    let env = TestEnv::new().await;
    let ctx = app_context(&env, &[]).await;
    for age_days in [40, 1] {
        sqlx::query(
            "INSERT INTO dead_letters (job_type, stream, entry_id, fields, reason, deliveries, created_at) \
             VALUES ('consume_tokens', 's', '1-0', '{}'::jsonb, 'bad', 1, now() - make_interval(days => $1))",
        )
        .bind(age_days)
        .execute(&env.pool)
        .await
        .expect("insert dead letter");
        sqlx::query(
            "INSERT INTO scheduler_ticks (job, scheduled_at, claimed_by, claimed_at, status) \
             VALUES ('prune', now() - make_interval(days => $1), 'r', now() - make_interval(days => $1), 'succeeded')",
        )
        .bind(age_days)
        .execute(&env.pool)
        .await
        .expect("insert tick");
    }
    // A consumed stream: 1000-0 acknowledged, 1001-0 delivered but pending, 1002-0 never
    // delivered, one fresh entry. Only 1000-0 is both old and acknowledged.
    let mut r = env.redis().await;
    let consumed = format!("{}:jobs:consume_tokens", env.redis_prefix);
    let untouched = format!("{}:jobs:grant_tokens", env.redis_prefix);
    for id in ["1000-0", "1001-0", "1002-0", "*"] {
        let _: String = redis::cmd("XADD")
            .arg(&consumed)
            .arg(id)
            .arg("payload")
            .arg("{}")
            .query_async(&mut r)
            .await
            .expect("xadd");
        let _: String = redis::cmd("XADD")
            .arg(&untouched)
            .arg(id)
            .arg("payload")
            .arg("{}")
            .query_async(&mut r)
            .await
            .expect("xadd");
    }
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&consumed)
        .arg("tokenwarden")
        .arg("0")
        .query_async(&mut r)
        .await
        .expect("create group");
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("tokenwarden")
        .arg("c1")
        .arg("COUNT")
        .arg(2)
        .arg("STREAMS")
        .arg(&consumed)
        .arg(">")
        .query_async(&mut r)
        .await
        .expect("read two");
    let _: i64 = redis::cmd("XACK")
        .arg(&consumed)
        .arg("tokenwarden")
        .arg("1000-0")
        .query_async(&mut r)
        .await
        .expect("ack one");

    let jobs = tokenwarden::maintenance::MaintenanceJobs::new(&ctx);
    let report = jobs.prune.run().await.expect("prune");
    assert_eq!(report.dead_letters_deleted, 1, "{report:?}");
    assert_eq!(report.ticks_deleted, 1, "{report:?}");
    assert_eq!(report.stream_entries_trimmed, 1, "{report:?}");
    assert_eq!(report.streams_trimmed, 1, "only the stream with a group: {report:?}");

    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(left, 1);
    let ids = |stream: String| {
        let mut r = r.clone();
        async move {
            let v: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
                .arg(&stream)
                .arg("-")
                .arg("+")
                .query_async(&mut r)
                .await
                .expect("xrange");
            v.into_iter().map(|(id, _)| id).collect::<Vec<_>>()
        }
    };
    let consumed_ids = ids(consumed).await;
    assert_eq!(&consumed_ids[..2], &["1001-0", "1002-0"], "{consumed_ids:?}");
    assert_eq!(consumed_ids.len(), 3);
    assert_eq!(ids(untouched).await.len(), 4, "no group: nothing may go");
    // A second run has nothing left to remove.
    let again = jobs.prune.run().await.expect("prune again");
    assert_eq!(
        (again.dead_letters_deleted, again.ticks_deleted, again.stream_entries_trimmed),
        (0, 0, 0)
    );
}
