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

/// CPU time (user + system) the process has used, from /proc (clock ticks of 1/100 s).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').expect("stat has a command name") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    ticks as f64 / 100.0
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
    // Both replicas take part. Who wins a tick is a race between two INSERTs at the same
    // second boundary, so a replica may lose several in a row; a fixed tick count would make
    // the check flaky. Wait instead, with a deadline of 60 more ticks: losing every one of
    // them means that replica is not competing (not claiming, or always late), a real defect.
    wait_until(
        Duration::from_secs(60),
        "both replicas to claim at least one tick",
        || async {
            let by: std::collections::HashSet<String> = ticks(&env, "cleanup_locks")
                .await
                .into_iter()
                .map(|t| t.claimed_by)
                .collect();
            (by.len() == 2).then_some(())
        },
    )
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
            let (ra, rb) = (result_sum(&sa), result_sum(&sb));
            (ra + rb == rows as f64).then_some(((ra, rb), rows))
        },
    )
    .await;
    assert!(
        runs.0 >= 1.0 && runs.1 >= 1.0,
        "each replica's own counter shows runs: {runs:?}"
    );
    let runs = runs.0 + runs.1;
    assert!(rows >= 10 && runs >= 10.0);

    a.signal("TERM");
    b.signal("TERM");
    assert!(
        a.wait_exit(Duration::from_secs(30)).success(),
        "replica A exits 0"
    );
    assert!(
        b.wait_exit(Duration::from_secs(30)).success(),
        "replica B exits 0"
    );

    let all = ticks(&env, "cleanup_locks").await;
    // No unaccounted gaps: consecutive seconds from the first tick to the last. A replica that
    // was starved of CPU for over a second folds the overdue ticks into one run and says so in
    // `missed_ticks`; anything else is a lost tick.
    assert_every_second_accounted(&all);
    let folded: i32 = all.iter().map(|t| t.missed_ticks).sum();
    assert!(
        folded <= 2,
        "folding is for starvation, not routine: {folded} folded ticks in {all:?}"
    );
    for t in &all {
        assert!(
            t.status == "succeeded" || t.status == "skipped",
            "every tick ran (a fold may overlap a run and be skipped): {t:?}"
        );
    }
    let replicas: std::collections::HashSet<_> = all.iter().map(|t| &t.claimed_by).collect();
    assert_eq!(replicas.len(), 2, "both replicas claimed ticks: {all:?}");
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
    // A stream with one entry that no handler consumes, so the queue gauges sample a depth
    // (XLEN: the queue's unknown-type sweep dead-letters and acknowledges the entry, which
    // stays in the stream until pruned).
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

    // Work for the other modules' metrics: one consumption (with `enqueued_at`, for the
    // latency histogram) and one malformed entry (a dead letter).
    let user = uuid::Uuid::new_v4();
    env.grant(user, 10).await;
    let consume_stream = format!("{}:jobs:consume_tokens", env.redis_prefix);
    let payload = serde_json::json!({
        "request_id": uuid::Uuid::new_v4(), "user_id": user, "amount": 3,
        "operation_type": "ai_call"
    });
    for (p, at) in [
        (
            payload.to_string(),
            Utc::now().timestamp_millis().to_string(),
        ),
        (
            "not json".to_string(),
            Utc::now().timestamp_millis().to_string(),
        ),
    ] {
        let _: String = redis::cmd("XADD")
            .arg(&consume_stream)
            .arg("*")
            .arg("payload")
            .arg(p)
            .arg("enqueued_at")
            .arg(at)
            .query_async(&mut r)
            .await
            .expect("xadd consume");
    }
    let expected = [
        "tokenwarden_jobs_processed_total",
        "tokenwarden_job_latency_seconds_bucket",
        "tokenwarden_ledger_batch_size_bucket",
        "tokenwarden_dead_letters_total",
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
            // The malformed consume and the unserved stream's entry.
            let dead = sum(&s, "tokenwarden_dead_letters", &[]);
            (ran >= 1.0 && have_all && dead == 2.0).then_some(s)
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
    assert_eq!(
        sum(
            &samples,
            "tokenwarden_jobs_processed_total",
            &[("job_type", "consume_tokens"), ("outcome", "ok")]
        ),
        1.0
    );
    assert_eq!(env.account(user).await.expect("account"), (7, 0));
    let (_, types) = parse_prometheus(&get(port, "/metrics").await.expect("scrape").1);
    for (name, kind) in [
        ("tokenwarden_job_latency_seconds", "histogram"),
        ("tokenwarden_ledger_batch_size", "histogram"),
        ("tokenwarden_scheduler_ticks_total", "counter"),
        ("tokenwarden_queue_depth", "gauge"),
    ] {
        assert_eq!(types.get(name).map(String::as_str), Some(kind), "{name}");
    }
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
    vars.push((
        "TOKENWARDEN__MAINTENANCE__READINESS__CHECK_TIMEOUT_MS",
        "1000".into(),
    ));
    let mut w = spawn_run(&env, &vars);

    wait_until(
        Duration::from_secs(30),
        "ready while Redis is up",
        || async {
            let (status, _) = get(port, "/readyz").await?;
            (status == 200).then_some(())
        },
    )
    .await;
    redis.kill();
    let body = wait_until(
        Duration::from_secs(30),
        "not ready once Redis is gone",
        || async {
            let (status, body) = get(port, "/readyz").await?;
            (status == 503).then_some(body)
        },
    )
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
    // With Redis gone the queue consumers fail and are restarted with a back-off: the worker
    // waits instead of spinning (it once restarted them over a thousand times a second).
    let before = cpu_secs(w.0.id());
    // A measuring window, not a wait for a condition.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let used = cpu_secs(w.0.id()) - before;
    assert!(
        used < 1.5,
        "the worker used {used:.2} CPU-seconds in 4 s while Redis was unreachable"
    );
    w.signal("TERM");
    assert!(w.wait_exit(Duration::from_secs(30)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_payloads_are_validated() {
    use tokenwarden::queue::{JobError, JobHandler};
    let env = TestEnv::new().await;
    let ctx = env.app_context(&[]).await;
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
    let ctx = env.app_context(&[]).await;
    for age_days in [40, 1] {
        sqlx::query(
            "INSERT INTO dead_letters (job_type, stream, entry_id, fields, reason, deliveries, created_at) \
             VALUES ('consume_tokens', 's', '1-' || $1::text, '{}'::jsonb, 'bad', 1, now() - make_interval(days => $1))",
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
    // A job's only (latest) tick is kept however old: catch-up after downtime starts from it.
    sqlx::query(
        "INSERT INTO scheduler_ticks (job, scheduled_at, claimed_by, claimed_at, status) \
         VALUES ('detect_anomalies', now() - interval '40 days', 'r', now() - interval '40 days', 'succeeded')",
    )
    .execute(&env.pool)
    .await
    .expect("insert lone tick");
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

    // Ledger history, however old, is never pruned.
    let user = uuid::Uuid::new_v4();
    env.grant(user, 10).await;
    sqlx::query("UPDATE token_balance_history SET created_at = now() - interval '400 days'")
        .execute(&env.pool)
        .await
        .expect("age history");

    let jobs = tokenwarden::maintenance::MaintenanceJobs::new(&ctx);
    let report = jobs.prune.run().await.expect("prune");
    let history: i64 = sqlx::query_scalar("SELECT count(*) FROM token_balance_history")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(history, 1, "ledger history kept");
    assert_eq!(report.dead_letters_deleted, 1, "{report:?}");
    assert_eq!(report.ticks_deleted, 1, "{report:?}");
    assert_eq!(report.stream_entries_trimmed, 1, "{report:?}");
    assert_eq!(
        report.streams_trimmed, 1,
        "only the stream with a group: {report:?}"
    );

    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(left, 1);
    let ticks_left: i64 = sqlx::query_scalar("SELECT count(*) FROM scheduler_ticks")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(
        ticks_left, 2,
        "the recent prune tick and the lone detect_anomalies tick"
    );
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
    assert_eq!(
        &consumed_ids[..2],
        &["1001-0", "1002-0"],
        "{consumed_ids:?}"
    );
    assert_eq!(consumed_ids.len(), 3);
    assert_eq!(ids(untouched).await.len(), 4, "no group: nothing may go");
    // A second run has nothing left to remove.
    let again = jobs.prune.run().await.expect("prune again");
    assert_eq!(
        (
            again.dead_letters_deleted,
            again.ticks_deleted,
            again.stream_entries_trimmed
        ),
        (0, 0, 0)
    );
}

async fn anomaly_rows(
    env: &TestEnv,
    user: uuid::Uuid,
) -> Vec<(i64, String, String, serde_json::Value)> {
    sqlx::query_as(
        "SELECT id, rule, severity, details FROM token_anomalies WHERE user_id = $1 ORDER BY id",
    )
    .bind(user)
    .fetch_all(&env.pool)
    .await
    .expect("anomalies")
}

/// The seed's test 4: 100 requests in one minute are detected once, blocked with enforcement
/// on, and unblocked by `tokenwarden anomalies resolve`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_100_consumptions_is_one_anomaly_and_blocks_until_resolved() {
    let env = TestEnv::new().await;
    let ctx = env
        .app_context(&[(
            "TOKENWARDEN__MAINTENANCE__ANOMALIES__REQUEST_BURST__SEVERITY",
            "block",
        )])
        .await;
    let jobs = tokenwarden::maintenance::MaintenanceJobs::new(&ctx);
    let (abuser, normal) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    env.grant(abuser, 1_000).await;
    env.grant(normal, 1_000).await;
    for _ in 0..100 {
        assert_eq!(env.consume(abuser, 1).await, "consumed");
    }
    // 98 now and one more below: the control user stays under 100 in any minute.
    for _ in 0..98 {
        assert_eq!(env.consume(normal, 1).await, "consumed");
    }

    // The seed's SQL function agrees.
    let (hit, n): (bool, i64) = sqlx::query_as(
        "SELECT * FROM detect_high_frequency_requests($1, interval '1 minute', 100)",
    )
    .bind(abuser)
    .fetch_one(&env.pool)
    .await
    .expect("detect_high_frequency_requests");
    assert!(hit && n == 100, "{hit} {n}");
    let (hit, n): (bool, i64) = sqlx::query_as(
        "SELECT * FROM detect_high_frequency_requests($1, interval '1 minute', 100)",
    )
    .bind(normal)
    .fetch_one(&env.pool)
    .await
    .expect("detect_high_frequency_requests");
    assert!(!hit && n == 98, "{hit} {n}");

    use tokenwarden::queue::JobHandler;
    let first = jobs
        .detect_anomalies
        .handle(serde_json::json!({}))
        .await
        .expect("detect");
    assert_eq!(first["found"], 1, "{first}");
    let second = jobs
        .detect_anomalies
        .handle(serde_json::json!({}))
        .await
        .expect("detect again");
    assert_eq!(second["found"], 0, "{second}");
    let rows = anomaly_rows(&env, abuser).await;
    assert_eq!(rows.len(), 1, "one row for one burst: {rows:?}");
    let (id, rule, severity, details) = rows[0].clone();
    assert_eq!(
        (rule.as_str(), severity.as_str()),
        ("request_burst", "block")
    );
    assert_eq!(details["count"], 100, "{details}");
    assert!(
        anomaly_rows(&env, normal).await.is_empty(),
        "98 is under the threshold"
    );

    // Enforcement: the ledger refuses the next consumption (and holds) while it is open.
    assert_eq!(env.consume(abuser, 1).await, "rate_limited");
    assert_eq!(env.consume(normal, 1).await, "consumed");
    assert_eq!(
        env.account(abuser).await.expect("account"),
        (900, 0),
        "nothing taken while blocked"
    );

    let (ok, listed) = env.cli(&["anomalies", "list"]).status_and_stdout();
    assert!(ok, "anomalies list");
    let listed: Vec<serde_json::Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["id"], id);
    assert_eq!(listed[0]["user_id"], abuser.to_string());

    let (ok, _) = env
        .cli(&["anomalies", "resolve", &id.to_string()])
        .status_and_stdout();
    assert!(ok, "anomalies resolve");
    let (ok, _) = env
        .cli(&["anomalies", "resolve", &id.to_string()])
        .status_and_stdout();
    assert!(!ok, "resolving twice is an error");
    let (ok, _) = env
        .cli(&["anomalies", "resolve", "999999"])
        .status_and_stdout();
    assert!(!ok, "resolving an unknown id is an error");
    let (ok, open) = env.cli(&["anomalies", "list"]).status_and_stdout();
    assert!(ok && open.trim().is_empty(), "no open anomalies: {open}");
    let (ok, all) = env.cli(&["anomalies", "list", "--all"]).status_and_stdout();
    assert!(ok && all.lines().count() == 1, "{all}");

    assert_eq!(env.consume(abuser, 1).await, "consumed");
    // The resolved burst is not flagged again by later runs.
    let third = jobs
        .detect_anomalies
        .handle(serde_json::json!({}))
        .await
        .expect("detect after resolve");
    assert_eq!(third["found"], 0, "{third}");
    assert_eq!(env.consume(abuser, 1).await, "consumed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_spike_against_own_baseline() {
    let env = TestEnv::new().await;
    let ctx = env
        .app_context(&[
            (
                "TOKENWARDEN__MAINTENANCE__ANOMALIES__SPEND_SPIKE__MIN_SPEND",
                "50",
            ),
            (
                "TOKENWARDEN__MAINTENANCE__ANOMALIES__SPEND_SPIKE__FACTOR",
                "10",
            ),
            (
                "TOKENWARDEN__MAINTENANCE__ANOMALIES__SPEND_SPIKE__BASELINE_DAYS",
                "1",
            ),
        ])
        .await;
    let jobs = tokenwarden::maintenance::MaintenanceJobs::new(&ctx);
    let (steady, spiky) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    for u in [steady, spiky] {
        env.grant(u, 100_000).await;
        // Baseline: 24 credits spent yesterday in each of 24 hours = 24 per hour on average.
        for _ in 0..24 {
            assert_eq!(env.consume(u, 24).await, "consumed");
        }
    }
    sqlx::query(
        "UPDATE token_balance_history SET created_at = date_trunc('hour', now()) - interval '12 hours' \
         WHERE kind = 'consume'",
    )
    .execute(&env.pool)
    .await
    .expect("age the baseline");
    // This hour: steady spends 200 (< 10 x 24), spiky spends 300 (> 240).
    assert_eq!(env.consume(steady, 200).await, "consumed");
    assert_eq!(env.consume(spiky, 300).await, "consumed");
    let found = jobs.detect_anomalies.run().await.expect("detect");
    let spikes: Vec<_> = found.iter().filter(|r| r.rule == "spend_spike").collect();
    assert_eq!(spikes.len(), 1, "{found:?}");
    assert_eq!(spikes[0].user_id, spiky);
    assert_eq!(spikes[0].severity, "warn");
    assert_eq!(spikes[0].details["hour_spend"], 300);
    assert_eq!(spikes[0].details["baseline_spend"], 576);
    // warn does not block.
    assert_eq!(env.consume(spiky, 1).await, "consumed");
    assert!(jobs.detect_anomalies.run().await.expect("again").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_webhook_receives_each_new_finding_with_retries() {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let env = TestEnv::new().await;
    let ctx = env
        .app_context(&[(
            "TOKENWARDEN__MAINTENANCE__ANOMALIES__REQUEST_BURST__THRESHOLD",
            "5",
        )])
        .await;
    let hook = MockServer::start().await;
    // The receiver fails once, then accepts: the alert is retried.
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&hook)
        .await;
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(ResponseTemplate::new(204))
        .with_priority(2)
        .mount(&hook)
        .await;
    let url = url::Url::parse(&format!("{}/hook", hook.uri())).unwrap();
    let alerter =
        tokenwarden::maintenance::anomalies::Alerter::start(url, &ctx.cfg.maintenance.alerts);
    let detector = tokenwarden::maintenance::anomalies::DetectAnomalies::new(
        env.pool.clone(),
        tokenwarden::ledger::anomalies::builtin_rules(&ctx.cfg.maintenance.anomalies),
        alerter,
    );
    let user = uuid::Uuid::new_v4();
    env.grant(user, 100).await;
    for _ in 0..5 {
        assert_eq!(env.consume(user, 1).await, "consumed");
    }
    let found = detector.run().await.expect("detect");
    assert_eq!(found.len(), 1);
    assert!(detector.run().await.expect("detect again").is_empty());

    let requests = wait_until(
        Duration::from_secs(20),
        "alert delivered after a retry",
        || async {
            let r = hook.received_requests().await?;
            (r.len() >= 2).then_some(r)
        },
    )
    .await;
    assert_eq!(
        requests.len(),
        2,
        "one failure, one success, nothing for the repeat run"
    );
    for req in &requests {
        let body: serde_json::Value = serde_json::from_slice(&req.body).expect("JSON body");
        assert_eq!(body["event"], "token_anomaly");
        assert_eq!(body["anomaly"]["rule"], "request_burst");
        assert_eq!(body["anomaly"]["user_id"], user.to_string());
        assert_eq!(body["anomaly"]["id"], found[0].id);
        assert_eq!(body["anomaly"]["details"]["count"], 5);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_holds_are_released_by_the_cleanup_job() {
    let env = TestEnv::new().await;
    let user = uuid::Uuid::new_v4();
    env.grant(user, 100).await;
    let (expiring, lasting) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    for (hold, amount, ttl) in [(expiring, 40_i64, 1_i32), (lasting, 10, 600)] {
        let r: serde_json::Value =
            sqlx::query_scalar("SELECT hold_tokens($1, $2, $3, 'ai_call', $4, '{}'::jsonb)")
                .bind(hold)
                .bind(user)
                .bind(amount)
                .bind(ttl)
                .fetch_one(&env.pool)
                .await
                .expect("hold_tokens");
        assert_eq!(r["status"], "held", "{r}");
    }
    assert_eq!(env.account(user).await.expect("account"), (50, 50));
    wait_until(
        Duration::from_secs(10),
        "the short hold to expire",
        || async {
            let due: bool = sqlx::query_scalar(
                "SELECT expires_at <= now() FROM token_consumption_locks WHERE hold_id = $1",
            )
            .bind(expiring)
            .fetch_one(&env.pool)
            .await
            .ok()?;
            due.then_some(())
        },
    )
    .await;

    // Through the queue, as an operator would: `tokenwarden enqueue cleanup_locks … --wait`.
    let mut w = spawn_run(&env, &only_cleanup(""));
    let request_id = uuid::Uuid::new_v4().to_string();
    let payload = serde_json::json!({ "request_id": request_id }).to_string();
    let (ok, reply) = env
        .cli(&["enqueue", "cleanup_locks", &payload, "--wait", "20000"])
        .status_and_stdout();
    assert!(ok, "enqueue cleanup_locks: {reply}");
    let reply: serde_json::Value = serde_json::from_str(reply.trim()).expect("JSON reply");
    assert_eq!(reply["released"], 1, "{reply}");

    assert_eq!(
        env.account(user).await.expect("account"),
        (90, 10),
        "40 back, 10 still held"
    );
    let (status, resolved): (String, bool) = sqlx::query_as(
        "SELECT status, resolved_at IS NOT NULL FROM token_consumption_locks WHERE hold_id = $1",
    )
    .bind(expiring)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!((status.as_str(), resolved), ("expired", true));
    let history: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT kind, amount, balance_after, held_after FROM token_balance_history \
         WHERE user_id = $1 AND kind = 'expire'",
    )
    .bind(user)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(history, vec![("expire".to_string(), 40, 90, 10)]);
    let lasting_status: String =
        sqlx::query_scalar("SELECT status FROM token_consumption_locks WHERE hold_id = $1")
            .bind(lasting)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(lasting_status, "held");

    // Nothing left to release.
    let ctx = env.app_context(&[]).await;
    let jobs = tokenwarden::maintenance::MaintenanceJobs::new(&ctx);
    assert_eq!(jobs.cleanup_locks.run().await.expect("cleanup"), 0);
    w.signal("TERM");
    assert!(w.wait_exit(Duration::from_secs(30)).success());
}

/// The apalis-cron failure modes: a handler slower than its interval neither overlaps itself
/// nor stops the schedule; later ticks are recorded as skipped and the loop keeps going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_run_neither_overlaps_nor_stalls_the_scheduler() {
    let env = TestEnv::new().await;
    // Hold an exclusive lock on the table cleanup_expired_locks() reads: each run blocks on it.
    let mut blocker = env.pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE token_consumption_locks IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .expect("lock table");
    let mut w = spawn_run(&env, &only_cleanup(EVERY_SECOND));

    let slow = wait_until(
        Duration::from_secs(40),
        "one run stuck and three later ticks skipped",
        || async {
            let all = ticks(&env, "cleanup_locks").await;
            let running: Vec<&Tick> = all.iter().filter(|t| t.status == "running").collect();
            assert!(running.len() <= 1, "runs overlap: {all:?}");
            let stuck = running.first()?;
            let skipped_after = all
                .iter()
                .filter(|t| t.scheduled_at > stuck.scheduled_at && t.status == "skipped")
                .count();
            (skipped_after >= 3).then_some(stuck.scheduled_at)
        },
    )
    .await;
    assert!(w.0.try_wait().expect("try_wait").is_none(), "worker alive");

    blocker.rollback().await.expect("release the table");
    wait_until(
        Duration::from_secs(30),
        "the slow run to finish and a later tick to run again",
        || async {
            let all = ticks(&env, "cleanup_locks").await;
            let slow_done = all
                .iter()
                .any(|t| t.scheduled_at == slow && t.status == "succeeded");
            let later_ran = all
                .iter()
                .any(|t| t.scheduled_at > slow && t.status == "succeeded");
            (slow_done && later_ran).then_some(())
        },
    )
    .await;
    let all = ticks(&env, "cleanup_locks").await;
    assert_every_second_accounted(&all);
    w.signal("TERM");
    assert!(w.wait_exit(Duration::from_secs(30)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_when_a_chain_rpc_is_unreachable() {
    let env = TestEnv::new().await;
    let port = free_port();
    let dead_rpc = free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = common::chain_config_file(dir.path(), &format!("http://127.0.0.1:{dead_rpc}"));
    let vars = with_http(only_cleanup(""), port);
    let refs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut w = Child::spawn(&env, &["--config", &file, "run"], &refs);
    let body = wait_until(Duration::from_secs(30), "a readyz answer", || async {
        get(port, "/readyz").await
    })
    .await;
    assert_eq!(body.0, 503, "{}", body.1);
    let v: serde_json::Value = serde_json::from_str(&body.1).expect("JSON");
    let chain = v["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["name"] == "chain:31337")
        .cloned()
        .expect("a check per configured chain");
    assert_eq!(chain["ok"], false);
    assert!(
        chain["detail"]
            .as_str()
            .unwrap_or("")
            .contains("RPC unreachable"),
        "{chain}"
    );
    w.signal("TERM");
    assert!(w.wait_exit(Duration::from_secs(30)).success());
}

/// Every second between the first and the last tick row is either a row or counted in the
/// next row's `missed_ticks`.
fn assert_every_second_accounted(all: &[Tick]) {
    for pair in all.windows(2) {
        let gap = (pair[1].scheduled_at - pair[0].scheduled_at).num_milliseconds();
        assert!(
            gap % 1000 == 0 && gap >= 1000 && gap / 1000 - 1 <= i64::from(pair[1].missed_ticks),
            "unaccounted gap between {:?} and {:?}",
            pair[0],
            pair[1]
        );
    }
}

/// End to end: the scheduler in a `run` process detects a burst and the webhook named by the
/// environment receives it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_detection_posts_to_the_webhook_from_the_environment() {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let env = TestEnv::new().await;
    let hook = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/alerts"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&hook)
        .await;
    let user = uuid::Uuid::new_v4();
    env.grant(user, 100).await;
    for _ in 0..5 {
        assert_eq!(env.consume(user, 1).await, "consumed");
    }
    let url = format!("{}/alerts", hook.uri());
    let mut vars = only_cleanup("");
    vars.retain(|(k, _)| *k != "TOKENWARDEN__MAINTENANCE__SCHEDULES__DETECT_ANOMALIES");
    vars.push((
        "TOKENWARDEN__MAINTENANCE__SCHEDULES__DETECT_ANOMALIES",
        EVERY_SECOND.into(),
    ));
    vars.push((
        "TOKENWARDEN__MAINTENANCE__ANOMALIES__REQUEST_BURST__THRESHOLD",
        "5".into(),
    ));
    vars.push(("TOKENWARDEN_ALERT_WEBHOOK_URL", url));
    let mut w = spawn_run(&env, &vars);
    let body = wait_until(Duration::from_secs(30), "the webhook call", || async {
        let reqs = hook.received_requests().await?;
        let first = reqs.first()?;
        serde_json::from_slice::<serde_json::Value>(&first.body).ok()
    })
    .await;
    assert_eq!(body["anomaly"]["user_id"], user.to_string());
    assert_eq!(body["anomaly"]["severity"], "warn");
    // Later ticks find nothing new: one finding, one call.
    wait_until(Duration::from_secs(30), "three more detection runs", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM scheduler_ticks WHERE job = 'detect_anomalies' AND status = 'succeeded'",
        )
        .fetch_one(&env.pool)
        .await
        .ok()?;
        (n >= 4).then_some(())
    })
    .await;
    assert_eq!(hook.received_requests().await.map(|r| r.len()), Some(1));
    assert_eq!(anomaly_rows(&env, user).await.len(), 1);
    w.signal("TERM");
    assert!(w.wait_exit(Duration::from_secs(30)).success());
}

/// The API roles see no scheduler data, and may run the seed's detection function only as
/// service_role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_objects_are_closed_to_api_roles() {
    let env = TestEnv::new().await;
    let mut tx = env.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL ROLE authenticated")
        .execute(&mut *tx)
        .await
        .unwrap();
    let denied = sqlx::query("SELECT count(*) FROM scheduler_ticks")
        .execute(&mut *tx)
        .await;
    assert!(denied.is_err(), "authenticated cannot read scheduler_ticks");
    tx.rollback().await.unwrap();
    let mut tx = env.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL ROLE authenticated")
        .execute(&mut *tx)
        .await
        .unwrap();
    let denied = sqlx::query(
        "SELECT * FROM detect_high_frequency_requests(gen_random_uuid(), interval '1 minute', 1)",
    )
    .execute(&mut *tx)
    .await;
    assert!(
        denied.is_err(),
        "authenticated cannot call the detection function"
    );
    tx.rollback().await.unwrap();
    let mut tx = env.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL ROLE service_role")
        .execute(&mut *tx)
        .await
        .unwrap();
    let (hit, n): (bool, i64) = sqlx::query_as(
        "SELECT * FROM detect_high_frequency_requests(gen_random_uuid(), interval '1 minute', 1)",
    )
    .fetch_one(&mut *tx)
    .await
    .expect("service_role may call it");
    assert!(!hit && n == 0);
    let bad = sqlx::query(
        "SELECT * FROM detect_high_frequency_requests(gen_random_uuid(), interval '0', 1)",
    )
    .execute(&mut *tx)
    .await;
    assert!(bad.is_err(), "a zero window is refused");
}

/// With a real chain (anvil) and a running indexer, readiness reports the indexer's lag and
/// passes once it has caught up; a configured chain without tokens is checked for RPC only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reports_indexer_lag_against_a_real_chain() {
    let env = TestEnv::new().await;
    let anvil = common::anvil::Anvil::spawn().await;
    let idle = common::anvil::Anvil::spawn().await;
    anvil.mine(30).await;
    let port = free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("chain.toml");
    std::fs::write(
        &file,
        format!(
            "[chain]\nenabled = true\n\n\
             [[chain.chains]]\nchain_id = 31337\nname = \"anvil\"\nrpc_urls = [\"{}\"]\n\
             confirmations = 2\nreorg_depth = 4\npoll_interval_ms = 200\n\n\
             [[chain.chains]]\nchain_id = 31338\nname = \"idle\"\nrpc_urls = [\"{}\"]\n\n\
             [[chain.tokens]]\nchain_id = 31337\n\
             address = \"0x00000000000000000000000000000000000000aa\"\nstandard = \"erc20\"\n",
            anvil.url, idle.url
        ),
    )
    .expect("write config");
    let mut vars = with_http(only_cleanup(""), port);
    vars.push((
        "TOKENWARDEN__MAINTENANCE__READINESS__MAX_INDEXER_LAG_BLOCKS",
        "3".into(),
    ));
    let refs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let file = file.to_string_lossy().into_owned();
    let mut w = Child::spawn(&env, &["--config", &file, "run"], &refs);
    let body = wait_until(
        Duration::from_secs(60),
        "ready once the indexer caught up",
        || async {
            let (status, body) = get(port, "/readyz").await?;
            (status == 200).then_some(body)
        },
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let check = |name: &str| {
        v["checks"]
            .as_array()
            .expect("checks")
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no check {name} in {v}"))
    };
    let indexed = check("chain:31337");
    let detail = indexed["detail"].as_str().unwrap_or("");
    assert!(
        detail.contains("checkpoint") && detail.contains("lag"),
        "{indexed}"
    );
    let checkpoint: i64 =
        sqlx::query_scalar("SELECT block_number FROM chain_checkpoints WHERE chain_id = 31337")
            .fetch_one(&env.pool)
            .await
            .expect("the indexer wrote a checkpoint");
    assert!(checkpoint >= 30 - 2 - 3, "checkpoint {checkpoint}");
    let idle_check = check("chain:31338");
    assert!(
        idle_check["detail"]
            .as_str()
            .unwrap_or("")
            .contains("no tokens indexed"),
        "{idle_check}"
    );
    w.signal("TERM");
    assert!(w.wait_exit(Duration::from_secs(30)).success());
}
