//! Queue transport tests: real Redis streams, real Postgres, the worker in-process (for test
//! handlers) or as a child process (for crash and signal tests).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{TestEnv, blpop, wait_until, xadd};
use tokenwarden::app::AppContext;
use tokenwarden::config::Config;
use tokenwarden::queue::{JobError, JobFuture, JobHandler, JobRegistry};

const T: Duration = Duration::from_secs(30);

fn config(env: &TestEnv, extra: &[(&str, &str)]) -> Config {
    let mut vars = env.env_vars();
    for (k, v) in extra {
        vars.push((k.to_string(), v.to_string()));
    }
    Config::load_with_env(None, vars).expect("test config")
}

/// A worker running in this process with the given handlers.
struct InProcess {
    ctx: AppContext,
    task: tokio::task::JoinHandle<Result<(), tokenwarden::queue::QueueError>>,
}

impl InProcess {
    async fn start(cfg: Config, registry: JobRegistry) -> InProcess {
        let ctx = AppContext::connect(cfg).await.expect("connect");
        let c = ctx.clone();
        let task =
            tokio::spawn(async move { tokenwarden::queue::run_consumers(&c, registry).await });
        InProcess { ctx, task }
    }

    async fn stop(self) {
        self.ctx.shutdown.cancel();
        tokio::time::timeout(T, self.task)
            .await
            .expect("consumers stop in time")
            .expect("join")
            .expect("consumers stop cleanly");
    }
}

/// Echoes the payload back; rejects payloads with `"bad": true`; counts calls.
struct Echo {
    calls: Arc<AtomicUsize>,
}

impl JobHandler for Echo {
    fn job_type(&self) -> &'static str {
        "cleanup_locks"
    }
    fn handle(&self, payload: serde_json::Value) -> JobFuture {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            if payload.get("bad").is_some() {
                return Err(JobError::Rejected("bad is not allowed".into()));
            }
            Ok(serde_json::json!({"echo": payload}))
        })
    }
}

/// Always fails with a retryable error.
struct AlwaysRetry {
    calls: Arc<AtomicUsize>,
}

impl JobHandler for AlwaysRetry {
    fn job_type(&self) -> &'static str {
        "prune"
    }
    fn handle(&self, _payload: serde_json::Value) -> JobFuture {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        Box::pin(async move { Err(JobError::Retryable(format!("database down (attempt {n})"))) })
    }
}

async fn dead_letter_reasons(env: &TestEnv) -> Vec<(String, String, String)> {
    sqlx::query_as(
        "SELECT job_type, entry_id, reason FROM dead_letters
         ORDER BY split_part(entry_id, '-', 1)::bigint, split_part(entry_id, '-', 2)::bigint, id",
    )
    .fetch_all(&env.pool)
    .await
    .expect("dead letters")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_delivers_replies_and_dead_letters_bad_entries() {
    let env = TestEnv::new().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let mut reg = JobRegistry::new();
    reg.register(Echo {
        calls: calls.clone(),
    });
    let w = InProcess::start(config(&env, &[]), reg).await;
    let mut r = env.redis().await;
    let stream = format!("{}:jobs:cleanup_locks", env.redis_prefix);

    let rid = uuid::Uuid::new_v4().to_string();
    xadd(
        &mut r,
        &stream,
        &[("payload", &format!(r#"{{"request_id":"{rid}","x":1}}"#))],
    )
    .await;
    let reply = blpop(&mut r, &format!("{}:reply:{rid}", env.redis_prefix)).await;
    assert_eq!(reply["echo"]["x"], 1);

    // Bad entries: no payload, not JSON, not an object, rejected by the handler.
    let bad_rid = uuid::Uuid::new_v4().to_string();
    xadd(&mut r, &stream, &[("other", "x")]).await;
    xadd(&mut r, &stream, &[("payload", "{not json")]).await;
    xadd(&mut r, &stream, &[("payload", "[1,2,3]")]).await;
    xadd(
        &mut r,
        &stream,
        &[(
            "payload",
            &format!(r#"{{"request_id":"{bad_rid}","bad":true}}"#),
        )],
    )
    .await;
    let reply = blpop(&mut r, &format!("{}:reply:{bad_rid}", env.redis_prefix)).await;
    assert_eq!(reply["status"], "rejected");
    assert_eq!(reply["reason"], "bad is not allowed");

    // The worker keeps going after bad input.
    let rid2 = uuid::Uuid::new_v4().to_string();
    xadd(
        &mut r,
        &stream,
        &[("payload", &format!(r#"{{"request_id":"{rid2}"}}"#))],
    )
    .await;
    blpop(&mut r, &format!("{}:reply:{rid2}", env.redis_prefix)).await;

    let dl = wait_until(T, "4 dead letters", || async {
        let d = dead_letter_reasons(&env).await;
        (d.len() == 4).then_some(d)
    })
    .await;
    assert!(dl[0].2.contains("no `payload` field"), "{dl:?}");
    assert!(dl[1].2.contains("not valid JSON"), "{dl:?}");
    assert!(dl[2].2.contains("JSON object"), "{dl:?}");
    assert_eq!(dl[3].2, "bad is not allowed");

    // Everything acknowledged.
    wait_until(T, "no pending entries", || {
        let mut r = r.clone();
        let stream = stream.clone();
        async move {
            let (n,): (u64,) = {
                let v: redis::Value = redis::cmd("XPENDING")
                    .arg(&stream)
                    .arg("tokenwarden")
                    .query_async(&mut r)
                    .await
                    .unwrap();
                match v {
                    redis::Value::Array(a) => match &a[0] {
                        redis::Value::Int(n) => (*n as u64,),
                        _ => (99,),
                    },
                    _ => (99,),
                }
            };
            (n == 0).then_some(())
        }
    })
    .await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_failures_end_in_a_dead_letter_at_the_delivery_limit() {
    let env = TestEnv::new().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let mut reg = JobRegistry::new();
    reg.register(AlwaysRetry {
        calls: calls.clone(),
    });
    let cfg = config(
        &env,
        &[
            ("TOKENWARDEN__QUEUE__CLAIM_IDLE_MS", "100"),
            ("TOKENWARDEN__QUEUE__BLOCK_MS", "50"),
            ("TOKENWARDEN__QUEUE__MAX_DELIVERIES", "3"),
        ],
    );
    let w = InProcess::start(cfg, reg).await;
    let mut r = env.redis().await;
    let stream = format!("{}:jobs:prune", env.redis_prefix);
    let id = xadd(&mut r, &stream, &[("payload", "{}")]).await;
    let dl = wait_until(T, "dead letter after 3 deliveries", || async {
        let d = dead_letter_reasons(&env).await;
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].1, id);
    assert!(
        dl[0]
            .2
            .contains("delivery limit reached after 3 deliveries"),
        "{dl:?}"
    );
    assert!(dl[0].2.contains("database down (attempt 3)"), "{dl:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_cli_refuses_unknown_job_types_and_times_out_clearly() {
    let env = TestEnv::new().await;
    let out = env.cli(&["enqueue", "consume_tokenz", "{}"]);
    assert!(!out.ok);
    let err = &out.stderr;
    assert!(err.contains("unknown job type `consume_tokenz`"), "{err}");
    assert!(err.contains("consume_tokens, grant_tokens"), "{err}");
    let mut r = env.redis().await;
    let exists: i64 = redis::cmd("EXISTS")
        .arg(format!("{}:jobs:consume_tokenz", env.redis_prefix))
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(exists, 0, "nothing was enqueued");

    // No worker running: --wait gives up after the wait with a clear message.
    let rid = uuid::Uuid::new_v4();
    let out = env.cli(&[
        "enqueue",
        "cleanup_locks",
        &format!(r#"{{"request_id":"{rid}"}}"#),
        "--wait",
        "200",
    ]);
    assert!(!out.ok);
    let err = &out.stderr;
    assert!(
        err.contains(&format!("no reply for request {rid} within 200 ms")),
        "{err}"
    );
    let len: i64 = redis::cmd("XLEN")
        .arg(format!("{}:jobs:cleanup_locks", env.redis_prefix))
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(len, 1, "the job stays queued");
}

// ---------------------------------------------------------------------------------------------
// Ledger jobs through the real worker binary.
// ---------------------------------------------------------------------------------------------

fn consume_payload(rid: uuid::Uuid, user: uuid::Uuid, amount: i64) -> String {
    serde_json::json!({"request_id": rid, "user_id": user, "amount": amount, "operation_type": "chat"})
        .to_string()
}

/// Grants `amount` to `user` through the queue and waits for the reply.
async fn grant(
    env: &TestEnv,
    r: &mut redis::aio::MultiplexedConnection,
    user: uuid::Uuid,
    amount: i64,
) {
    let rid = uuid::Uuid::new_v4();
    let p =
        serde_json::json!({"request_id": rid, "user_id": user, "amount": amount, "reason": "test"});
    xadd(
        r,
        &env.stream("grant_tokens"),
        &[("payload", &p.to_string())],
    )
    .await;
    let rep = blpop(r, &env.reply_key(&rid.to_string())).await;
    assert_eq!(rep["status"], "granted", "{rep}");
}

/// XADDs consume jobs in pipelines of 1,000.
async fn enqueue_consumes(
    env: &TestEnv,
    r: &mut redis::aio::MultiplexedConnection,
    jobs: &[(uuid::Uuid, uuid::Uuid, i64)],
) {
    let s = env.stream("consume_tokens");
    for chunk in jobs.chunks(1000) {
        let mut p = redis::pipe();
        for (rid, user, amount) in chunk {
            p.cmd("XADD")
                .arg(&s)
                .arg("*")
                .arg("payload")
                .arg(consume_payload(*rid, *user, *amount))
                .ignore();
        }
        let _: () = p.query_async(r).await.expect("XADD pipeline");
    }
}

async fn count_requests(env: &TestEnv, kind: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM ledger_requests WHERE kind = $1")
        .bind(kind)
        .fetch_one(&env.pool)
        .await
        .expect("count")
}

/// (pending, lag) of the group on a stream.
/// Waits until `n` consume outcomes are stored and the consume stream's group has nothing
/// pending or undelivered: every job applied and acknowledged.
async fn wait_all_consumed(env: &TestEnv, r: &redis::aio::MultiplexedConnection, n: i64) {
    let s = env.stream("consume_tokens");
    wait_until(
        Duration::from_secs(120),
        "all consume outcomes stored, nothing pending",
        || {
            let mut r = r.clone();
            let s = s.clone();
            async move {
                let done = count_requests(env, "consume").await;
                let (pending, lag) = group_state(&mut r, &s).await;
                (done == n && pending == 0 && lag == 0).then_some(())
            }
        },
    )
    .await;
}

async fn group_state(r: &mut redis::aio::MultiplexedConnection, stream: &str) -> (usize, usize) {
    let info: redis::streams::StreamInfoGroupsReply = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(r)
        .await
        .expect("XINFO GROUPS");
    let g = info.groups.first().expect("group exists");
    (g.pending, g.lag.unwrap_or(usize::MAX))
}

/// Every consume job has exactly one outcome, the history has exactly one debit per consumed
/// request, and the balance is the grant minus what was consumed.
async fn assert_exact(
    env: &TestEnv,
    user: uuid::Uuid,
    granted: i64,
    jobs: &[(uuid::Uuid, uuid::Uuid, i64)],
) {
    let ids: Vec<uuid::Uuid> = jobs.iter().map(|j| j.0).collect();
    let rows: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("SELECT request_id, status FROM ledger_requests WHERE request_id = ANY($1)")
            .bind(&ids)
            .fetch_all(&env.pool)
            .await
            .expect("outcomes");
    assert_eq!(rows.len(), jobs.len(), "every request id has an outcome");
    let consumed: std::collections::HashSet<uuid::Uuid> = rows
        .iter()
        .filter(|(_, s)| s == "consumed")
        .map(|(id, _)| *id)
        .collect();
    let expected_debit: i64 = jobs
        .iter()
        .filter(|j| consumed.contains(&j.0))
        .map(|j| j.2)
        .sum();
    let (debits, debit_sum): (i64, Option<i64>) = sqlx::query_as(
        "SELECT count(*), sum(amount)::bigint FROM token_balance_history WHERE user_id = $1 AND kind = 'consume'",
    )
    .bind(user)
    .fetch_one(&env.pool)
    .await
    .expect("history");
    assert_eq!(
        debits as usize,
        consumed.len(),
        "one history row per consumed request, none twice"
    );
    assert_eq!(debit_sum.unwrap_or(0), expected_debit);
    assert_eq!(
        env.account(user).await.map_or(0, |a| a.0),
        granted - expected_debit,
        "balance = granted - consumed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_end_to_end_with_idempotent_repeat() {
    let env = TestEnv::new().await;
    let _w = common::Child::spawn(&env, &["run"], &[]);
    let mut r = env.redis().await;
    let user = uuid::Uuid::new_v4();
    grant(&env, &mut r, user, 100).await;

    let rid = uuid::Uuid::new_v4();
    let payload = consume_payload(rid, user, 30);
    xadd(
        &mut r,
        &env.stream("consume_tokens"),
        &[("payload", &payload)],
    )
    .await;
    let first = blpop(&mut r, &env.reply_key(&rid.to_string())).await;
    assert_eq!(first["status"], "consumed", "{first}");
    assert_eq!(first["balance"], 70);
    assert_eq!(first["request_id"], rid.to_string());

    // Same request id again: same reply, one debit.
    xadd(
        &mut r,
        &env.stream("consume_tokens"),
        &[("payload", &payload)],
    )
    .await;
    let second = blpop(&mut r, &env.reply_key(&rid.to_string())).await;
    assert_eq!(second, first);
    assert_eq!(env.account(user).await.map_or(0, |a| a.0), 70);
    let (status, after): (String, Option<i64>) =
        sqlx::query_as("SELECT status, balance_after FROM ledger_requests WHERE request_id = $1")
            .bind(rid)
            .fetch_one(&env.pool)
            .await
            .expect("durable outcome");
    assert_eq!((status.as_str(), after), ("consumed", Some(70)));
    let debits: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM token_balance_history WHERE request_id = $1 AND kind = 'consume'",
    )
    .bind(rid)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(debits, 1);

    // The CLI door waits for the reply and prints it.
    let rid2 = uuid::Uuid::new_v4();
    let out = env.cli(&[
        "enqueue",
        "consume_tokens",
        &consume_payload(rid2, user, 5),
        "--wait",
        "10000",
    ]);
    assert!(out.ok, "{}", out.stderr);
    let printed: serde_json::Value =
        serde_json::from_str(&out.stdout).expect("reply JSON on stdout");
    assert_eq!(printed["status"], "consumed");
    assert_eq!(printed["balance"], 65);

    // Hold, settle and release go through the same path.
    let hold = uuid::Uuid::new_v4();
    let p = serde_json::json!({"request_id": hold, "user_id": user, "amount": 20, "operation_type": "image", "ttl_secs": 60});
    xadd(
        &mut r,
        &env.stream("hold_tokens"),
        &[("payload", &p.to_string())],
    )
    .await;
    let rep = blpop(&mut r, &env.reply_key(&hold.to_string())).await;
    assert_eq!(
        (
            rep["status"].as_str(),
            rep["balance"].as_i64(),
            rep["held"].as_i64()
        ),
        (Some("held"), Some(45), Some(20)),
        "{rep}"
    );
    let settle = uuid::Uuid::new_v4();
    let p = serde_json::json!({"request_id": settle, "hold_id": hold, "amount": 12});
    xadd(
        &mut r,
        &env.stream("settle_hold"),
        &[("payload", &p.to_string())],
    )
    .await;
    let rep = blpop(&mut r, &env.reply_key(&settle.to_string())).await;
    assert_eq!(
        (rep["status"].as_str(), rep["balance"].as_i64()),
        (Some("settled"), Some(53)),
        "{rep}"
    );
    let release = uuid::Uuid::new_v4();
    let p = serde_json::json!({"request_id": release, "hold_id": hold});
    xadd(
        &mut r,
        &env.stream("release_hold"),
        &[("payload", &p.to_string())],
    )
    .await;
    let rep = blpop(&mut r, &env.reply_key(&release.to_string())).await;
    assert_eq!(rep["status"], "hold_already_resolved", "{rep}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ledger_input_is_dead_lettered_and_the_worker_keeps_going() {
    let env = TestEnv::new().await;
    let _w = common::Child::spawn(&env, &["run"], &[]);
    let mut r = env.redis().await;
    let user = uuid::Uuid::new_v4();
    grant(&env, &mut r, user, 100).await;
    let s = env.stream("consume_tokens");

    // Entries whose request id cannot be read: dead letter only.
    let unreadable = [
        (vec![("other", "x")], "no `payload` field"),
        (vec![("payload", "{\"request_id\": ")], "not valid JSON"),
        (
            vec![("payload", "\"just a string\"")],
            "must be a JSON object",
        ),
    ];
    for (fields, _) in &unreadable {
        xadd(&mut r, &s, fields).await;
    }
    // Entries with a readable request id: dead letter + rejected reply.
    let big = "x".repeat(5000);
    let cases: Vec<(serde_json::Value, &str)> = vec![
        (
            serde_json::json!({"user_id": user, "amount": 1}),
            "missing field `operation_type`",
        ),
        (
            serde_json::json!({"user_id": user, "amount": 1, "operation_type": "a", "extra": 1}),
            "unknown field `extra`",
        ),
        (
            serde_json::json!({"user_id": user, "amount": "1", "operation_type": "a"}),
            "amount must be an integer",
        ),
        (
            serde_json::json!({"user_id": user, "amount": 0, "operation_type": "a"}),
            "positive",
        ),
        (
            serde_json::json!({"user_id": user, "amount": -5, "operation_type": "a"}),
            "positive",
        ),
        (
            serde_json::json!({"user_id": user, "amount": 1.5, "operation_type": "a"}),
            "amount must be an integer",
        ),
        (
            serde_json::from_str(&format!(
                r#"{{"user_id":"{user}","amount":99999999999999999999,"operation_type":"a"}}"#
            ))
            .unwrap(),
            "amount must be an integer",
        ),
        (
            serde_json::json!({"user_id": "nope", "amount": 1, "operation_type": "a"}),
            "user_id",
        ),
        (
            serde_json::json!({"user_id": user, "amount": 1, "operation_type": "a", "metadata": {"blob": big}}),
            "metadata is",
        ),
        (
            serde_json::json!({"user_id": user, "amount": 1, "operation_type": "a\u{0}b"}),
            "operation_type must not contain NUL (\\u0000)",
        ),
        (
            serde_json::json!({"user_id": user, "amount": 1, "operation_type": "a", "metadata": {"k\u{0}": 1}}),
            "metadata must not contain NUL (\\u0000)",
        ),
        (
            serde_json::json!({"user_id": user, "amount": 1, "operation_type": "a", "metadata": {"k": ["\u{0}"]}}),
            "metadata must not contain NUL (\\u0000)",
        ),
    ];
    let mut rids = Vec::new();
    for (mut p, _) in cases.clone() {
        let rid = uuid::Uuid::new_v4();
        p["request_id"] = serde_json::json!(rid);
        xadd(&mut r, &s, &[("payload", &p.to_string())]).await;
        rids.push(rid);
    }
    for (rid, (_, needle)) in rids.iter().zip(&cases) {
        let rep = blpop(&mut r, &env.reply_key(&rid.to_string())).await;
        assert_eq!(rep["status"], "rejected", "{rep}");
        let reason = rep["reason"].as_str().unwrap_or_default();
        assert!(reason.contains(needle), "expected {needle:?} in {reason:?}");
    }
    // An unknown user is not a crash: insufficient_tokens.
    let stranger = uuid::Uuid::new_v4();
    let rid = uuid::Uuid::new_v4();
    xadd(
        &mut r,
        &s,
        &[("payload", &consume_payload(rid, stranger, 1))],
    )
    .await;
    let rep = blpop(&mut r, &env.reply_key(&rid.to_string())).await;
    assert_eq!(rep["status"], "insufficient_tokens", "{rep}");
    // And the next good job is processed.
    let rid = uuid::Uuid::new_v4();
    xadd(&mut r, &s, &[("payload", &consume_payload(rid, user, 10))]).await;
    let rep = blpop(&mut r, &env.reply_key(&rid.to_string())).await;
    assert_eq!(rep["status"], "consumed", "{rep}");
    assert_eq!(rep["balance"], 90);

    let dl = wait_until(T, "all dead letters", || async {
        let d = dead_letter_reasons(&env).await;
        (d.len() == unreadable.len() + cases.len()).then_some(d)
    })
    .await;
    for (i, (_, needle)) in unreadable.iter().enumerate() {
        assert!(dl[i].2.contains(needle), "{:?} lacks {needle}", dl[i]);
    }
    for (i, (_, needle)) in cases.iter().enumerate() {
        let d = &dl[unreadable.len() + i];
        assert_eq!(d.0, "consume_tokens");
        assert!(d.2.contains(needle), "{d:?} lacks {needle}");
    }
    assert_eq!(
        env.account(user).await.map_or(0, |a| a.0),
        90,
        "no bad entry moved the balance"
    );

    // dead-letters list / retry / purge.
    let out = env.cli(&[
        "dead-letters",
        "list",
        "--job-type",
        "consume_tokens",
        "--limit",
        "100",
    ]);
    assert!(out.ok);
    assert_eq!(out.stdout.lines().count(), dl.len());
    let (first_id,): (i64,) = sqlx::query_as("SELECT min(id) FROM dead_letters")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let out = env.cli(&["dead-letters", "retry", &first_id.to_string()]);
    assert!(out.ok, "{}", out.stderr);
    let retried: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT retried_at FROM dead_letters WHERE id = $1")
            .bind(first_id)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert!(retried.is_some());
    // The retried entry (still without payload) is dead-lettered again.
    wait_until(T, "retried entry dead-lettered again", || async {
        let n = dead_letter_reasons(&env).await.len();
        (n == dl.len() + 1).then_some(())
    })
    .await;
    let out = env.cli(&["dead-letters", "purge", "--older-than-days", "0"]);
    assert!(out.ok);
    assert!(dead_letter_reasons(&env).await.is_empty());
}

/// Invalid input through the queue door is a durable `rejected` outcome of its request id, as
/// through the SQL door: readable in ledger_requests, the same reply on a resend of the same
/// payload, and `request_id_conflict` (nothing applied) when the id comes back with valid fields.
#[tokio::test]
async fn invalid_queue_input_is_a_stored_rejected_outcome_like_the_sql_door() {
    let env = TestEnv::new().await;
    let _w = common::Child::spawn(&env, &["run"], &[]);
    let mut r = env.redis().await;
    let user = uuid::Uuid::new_v4();
    grant(&env, &mut r, user, 100).await;
    let s = env.stream("consume_tokens");

    let rid = uuid::Uuid::new_v4();
    let invalid = consume_payload(rid, user, 0);
    xadd(&mut r, &s, &[("payload", &invalid)]).await;
    let first = blpop(&mut r, &env.reply_key(&rid.to_string())).await;
    assert_eq!(first["status"], "rejected", "{first}");
    assert!(
        first["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("positive"),
        "{first}"
    );

    type Row = (
        String,
        Option<uuid::Uuid>,
        Option<i64>,
        Option<String>,
        String,
        Option<String>,
    );
    let row = |id: uuid::Uuid| {
        let pool = env.pool.clone();
        async move {
            sqlx::query_as::<_, Row>(
                "SELECT kind, user_id, amount, label, status, reason \
                   FROM public.ledger_requests WHERE request_id = $1",
            )
            .bind(id)
            .fetch_optional(&pool)
            .await
            .unwrap()
        }
    };
    let stored = row(rid)
        .await
        .expect("the rejection is stored under its request id");
    assert_eq!(
        (
            stored.0.as_str(),
            stored.1,
            stored.2,
            stored.3.as_deref(),
            stored.4.as_str()
        ),
        ("consume", Some(user), Some(0), Some("chat"), "rejected")
    );
    assert_eq!(
        Some(stored.5.clone().unwrap_or_default()),
        first["reason"].as_str().map(str::to_string)
    );

    // The SQL door stores the same outcome for the same input.
    let sql_rid = uuid::Uuid::new_v4();
    sqlx::query("SELECT public.consume_tokens_atomic($1, $2, 0, 'chat', '{}'::jsonb)")
        .bind(sql_rid)
        .bind(user)
        .execute(&env.pool)
        .await
        .unwrap();
    let via_sql = row(sql_rid).await.expect("SQL door stores its rejection");
    assert_eq!(
        via_sql, stored,
        "both doors record the same rejected outcome"
    );

    // Same invalid payload again: the same rejected reply.
    xadd(&mut r, &s, &[("payload", &invalid)]).await;
    let again = blpop(&mut r, &env.reply_key(&rid.to_string())).await;
    assert_eq!(again, first);

    // Same id, now valid: a conflict, nothing consumed.
    xadd(&mut r, &s, &[("payload", &consume_payload(rid, user, 5))]).await;
    let conflict = blpop(&mut r, &env.reply_key(&rid.to_string())).await;
    assert_eq!(conflict["status"], "request_id_conflict", "{conflict}");
    assert_eq!(env.account(user).await.map_or(0, |a| a.0), 100);
    assert_eq!(row(rid).await, Some(stored));

    // The invalid entries are still dead-lettered.
    wait_until(T, "two dead letters", || async {
        (dead_letter_reasons(&env).await.len() == 2).then_some(())
    })
    .await;
}

/// An entry XADDed to the stream of a job type nobody serves is not left there forever: the
/// worker's sweep dead-letters it, answers `rejected` and acknowledges it.
#[tokio::test]
async fn entries_of_unknown_job_types_are_dead_lettered_and_answered() {
    let env = TestEnv::new().await;
    let mut r = env.redis().await;
    let s = env.stream("no_such_job");
    let rid = uuid::Uuid::new_v4();
    let p = serde_json::json!({"request_id": rid, "x": 1}).to_string();
    xadd(&mut r, &s, &[("payload", &p)]).await;
    xadd(&mut r, &s, &[("other", "x")]).await;
    let _w = common::Child::spawn(&env, &["run"], &[]);

    let rep = blpop(&mut r, &env.reply_key(&rid.to_string())).await;
    assert_eq!(rep["status"], "rejected", "{rep}");
    let reason = rep["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("unknown job type 'no_such_job'") && reason.contains("consume_tokens"),
        "{reason}"
    );
    let dl = wait_until(T, "both entries dead-lettered", || async {
        let d = dead_letter_reasons(&env).await;
        (d.len() == 2).then_some(d)
    })
    .await;
    for (job_type, _, why) in &dl {
        assert_eq!(job_type, "no_such_job");
        assert!(why.contains("unknown job type"), "{why}");
    }
    wait_until(T, "the entries acknowledged", || async {
        let pending: redis::Value = redis::cmd("XPENDING")
            .arg(&s)
            .arg("tokenwarden")
            .query_async(&mut env.redis().await)
            .await
            .ok()?;
        let redis::Value::Array(v) = pending else {
            return None;
        };
        (v.first() == Some(&redis::Value::Int(0))).then_some(())
    })
    .await;
}

/// A crash between the dead-letter insert and the XACK redelivers the entry; dead-lettering it
/// again keeps one row. Only the worker can read the table (not even service_role).
#[tokio::test]
async fn dead_lettering_an_entry_twice_stores_it_once() {
    use tokenwarden::queue::dead_letter;
    use tokenwarden::queue::entry::StreamEntry;
    let env = TestEnv::new().await;
    let entry = StreamEntry {
        job_type: "consume_tokens".into(),
        stream: env.stream("consume_tokens").into(),
        id: "1700000000000-0".into(),
        fields: vec![("payload".into(), b"not json".to_vec())],
        deliveries: 1,
    };
    let first = dead_letter::insert(&env.pool, &entry, "not valid JSON")
        .await
        .unwrap();
    let second = dead_letter::insert(&env.pool, &entry, "not valid JSON")
        .await
        .unwrap();
    assert_eq!(first, second);
    assert_eq!(dead_letter_reasons(&env).await.len(), 1);
    for role in ["anon", "authenticated", "service_role"] {
        let can: bool = sqlx::query_scalar(
            "SELECT has_table_privilege($1, 'public.dead_letters', 'SELECT, INSERT, UPDATE, DELETE')",
        )
        .bind(role)
        .fetch_one(&env.pool)
        .await
        .unwrap();
        assert!(!can, "{role} must not access dead_letters");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_consumptions_for_one_user_end_exact() {
    let env = TestEnv::new().await;
    let _w = common::Child::spawn(&env, &["run"], &[]);
    let mut r = env.redis().await;
    let user = uuid::Uuid::new_v4();
    grant(&env, &mut r, user, 600).await;
    let jobs: Vec<_> = (0..1000)
        .map(|_| (uuid::Uuid::new_v4(), user, 1i64))
        .collect();
    enqueue_consumes(&env, &mut r, &jobs).await;
    wait_until(T, "1,000 outcomes", || async {
        (count_requests(&env, "consume").await == 1000).then_some(())
    })
    .await;
    assert_exact(&env, user, 600, &jobs).await;
    assert_eq!(env.account(user).await.map_or(0, |a| a.0), 0);
    let insufficient: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ledger_requests WHERE kind = 'consume' AND status = 'insufficient_tokens'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(insufficient, 400);
    // Every caller got its reply.
    for (rid, _, _) in jobs.iter().step_by(97) {
        let rep = blpop(&mut r, &env.reply_key(&rid.to_string())).await;
        assert!(
            rep["status"] == "consumed" || rep["status"] == "insufficient_tokens",
            "{rep}"
        );
    }
}

fn random_jobs(user: uuid::Uuid, n: usize) -> Vec<(uuid::Uuid, uuid::Uuid, i64)> {
    (0..n)
        .map(|i| (uuid::Uuid::new_v4(), user, (i % 3) as i64 + 1))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_batch_loses_nothing_and_applies_nothing_twice() {
    let env = TestEnv::new().await;
    let fast = [("TOKENWARDEN__QUEUE__CLAIM_IDLE_MS", "500")];
    let mut w = common::Child::spawn(&env, &["run"], &fast);
    let mut r = env.redis().await;
    let user = uuid::Uuid::new_v4();
    let granted = 1_000_000;
    grant(&env, &mut r, user, granted).await;
    let jobs = random_jobs(user, 20_000);
    enqueue_consumes(&env, &mut r, &jobs).await;
    wait_until(T, "some jobs applied", || async {
        (count_requests(&env, "consume").await >= 2_000).then_some(())
    })
    .await;
    w.signal("KILL");
    w.wait_exit(T);
    let done_at_kill = count_requests(&env, "consume").await;
    assert!(
        done_at_kill < 20_000,
        "killed while jobs were still flowing ({done_at_kill})"
    );

    let _w2 = common::Child::spawn(&env, &["run"], &fast);
    wait_all_consumed(&env, &r, 20_000).await;
    assert_exact(&env, user, granted, &jobs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_worker_processes_share_one_stream() {
    let env = TestEnv::new().await;
    let _a = common::Child::spawn(&env, &["run"], &[]);
    let _b = common::Child::spawn(&env, &["run"], &[]);
    let mut r = env.redis().await;
    let s = env.stream("consume_tokens");
    wait_until(T, "two consumers on the stream", || {
        let mut r = r.clone();
        let s = s.clone();
        async move {
            let v: redis::RedisResult<redis::Value> = redis::cmd("XINFO")
                .arg("CONSUMERS")
                .arg(&s)
                .arg("tokenwarden")
                .query_async(&mut r)
                .await;
            matches!(v, Ok(redis::Value::Array(c)) if c.len() == 2).then_some(())
        }
    })
    .await;
    let user = uuid::Uuid::new_v4();
    let granted = 1_000_000;
    grant(&env, &mut r, user, granted).await;
    let jobs = random_jobs(user, 20_000);
    enqueue_consumes(&env, &mut r, &jobs).await;
    wait_all_consumed(&env, &r, 20_000).await;
    assert_exact(&env, user, granted, &jobs).await;
    let per_consumer: std::collections::HashMap<String, u64> = redis::cmd("HGETALL")
        .arg(format!("{}:processed:consume_tokens", env.redis_prefix))
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(
        per_consumer.len(),
        2,
        "both consumers processed entries: {per_consumer:?}"
    );
    assert!(per_consumer.values().all(|n| *n > 0), "{per_consumer:?}");
    assert_eq!(
        per_consumer.values().sum::<u64>(),
        20_000,
        "{per_consumer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_cleanly_and_a_restart_finishes_the_work() {
    let env = TestEnv::new().await;
    let cfg = [
        ("TOKENWARDEN__QUEUE__CLAIM_IDLE_MS", "500"),
        ("TOKENWARDEN__QUEUE__SHUTDOWN_GRACE_SECS", "10"),
    ];
    let mut w = common::Child::spawn(&env, &["run"], &cfg);
    let mut r = env.redis().await;
    let user = uuid::Uuid::new_v4();
    let granted = 1_000_000;
    grant(&env, &mut r, user, granted).await;
    let jobs = random_jobs(user, 20_000);
    enqueue_consumes(&env, &mut r, &jobs).await;
    wait_until(T, "some jobs applied", || async {
        (count_requests(&env, "consume").await >= 2_000).then_some(())
    })
    .await;
    w.signal("TERM");
    let status = w.wait_exit(Duration::from_secs(12));
    assert!(status.success(), "SIGTERM exits 0, got {status:?}");

    let _w2 = common::Child::spawn(&env, &["run"], &cfg);
    wait_all_consumed(&env, &r, 20_000).await;
    assert_exact(&env, user, granted, &jobs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_backend_is_restarted_by_the_monitor() {
    let env = TestEnv::new().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let mut reg = JobRegistry::new();
    reg.register(Echo {
        calls: calls.clone(),
    });
    let w = InProcess::start(
        config(&env, &[("TOKENWARDEN__QUEUE__BLOCK_MS", "100")]),
        reg,
    )
    .await;
    let mut r = env.redis().await;
    let s = format!("{}:jobs:cleanup_locks", env.redis_prefix);
    let rid = uuid::Uuid::new_v4().to_string();
    xadd(
        &mut r,
        &s,
        &[("payload", &format!(r#"{{"request_id":"{rid}"}}"#))],
    )
    .await;
    blpop(&mut r, &format!("{}:reply:{rid}", env.redis_prefix)).await;

    // Deleting the stream removes the group: the reader fails with NOGROUP, the apalis worker
    // ends with a backend error, and the Monitor restarts it (new consumer, group recreated).
    let _: i64 = redis::cmd("DEL").arg(&s).query_async(&mut r).await.unwrap();
    wait_until(T, "group recreated by the restarted worker", || {
        let mut r = r.clone();
        let s = s.clone();
        async move {
            let v: redis::RedisResult<redis::Value> = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(&s)
                .query_async(&mut r)
                .await;
            matches!(v, Ok(redis::Value::Array(g)) if !g.is_empty()).then_some(())
        }
    })
    .await;
    let rid = uuid::Uuid::new_v4().to_string();
    xadd(
        &mut r,
        &s,
        &[("payload", &format!(r#"{{"request_id":"{rid}"}}"#))],
    )
    .await;
    let rep = blpop(&mut r, &format!("{}:reply:{rid}", env.redis_prefix)).await;
    assert_eq!(rep["echo"]["request_id"], rid.as_str());

    // A stream of a job type nobody registered is left alone.
    let unknown = format!("{}:jobs:no_such_job", env.redis_prefix);
    xadd(&mut r, &unknown, &[("payload", "{}")]).await;
    let rid = uuid::Uuid::new_v4().to_string();
    xadd(
        &mut r,
        &s,
        &[("payload", &format!(r#"{{"request_id":"{rid}"}}"#))],
    )
    .await;
    blpop(&mut r, &format!("{}:reply:{rid}", env.redis_prefix)).await;
    let groups: redis::Value = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(&unknown)
        .query_async(&mut r)
        .await
        .unwrap();
    assert!(
        matches!(groups, redis::Value::Array(ref g) if g.is_empty()),
        "{groups:?}"
    );
    w.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Hostile input (issue 13): what a caller who sends anything Redis accepts can cost.
// ---------------------------------------------------------------------------------------------

/// An entry's fields as bytes, in order.
type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// `(job_type, stream, fields, raw_entry, reason)` of every dead letter, oldest entry first.
type DeadLetterRow = (
    String,
    String,
    serde_json::Value,
    Option<serde_json::Value>,
    String,
);

async fn dead_letter_rows(env: &TestEnv) -> Vec<DeadLetterRow> {
    sqlx::query_as(
        "SELECT job_type, stream, fields, raw_entry, reason FROM dead_letters
         ORDER BY split_part(entry_id, '-', 1)::bigint, split_part(entry_id, '-', 2)::bigint, id",
    )
    .fetch_all(&env.pool)
    .await
    .expect("dead letters")
}

/// The exact fields a dead letter kept: from `raw_entry` (base64) when set, else `fields`.
fn kept_fields(row: &DeadLetterRow) -> Fields {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    match &row.3 {
        Some(raw) => raw["fields"]
            .as_array()
            .expect("raw_entry.fields")
            .iter()
            .map(|p| {
                (
                    b64.decode(p[0].as_str().expect("b64")).expect("name"),
                    b64.decode(p[1].as_str().expect("b64")).expect("value"),
                )
            })
            .collect(),
        None => row
            .2
            .as_object()
            .expect("fields object")
            .iter()
            .map(|(k, v)| {
                (
                    k.as_bytes().to_vec(),
                    v.as_str().expect("text").as_bytes().to_vec(),
                )
            })
            .collect(),
    }
}

/// A NUL (escaped in JSON or raw) or bytes that are not UTF-8, in a payload, a field name or
/// another field: each entry is one dead letter that keeps its exact bytes, nothing stays
/// pending, no consumer restarts (no stale consumers), and the valid entries behind them are
/// served. Before the fix the dead-letter insert failed (22021 / "unsupported Unicode escape
/// sequence"), the entry looped past the delivery limit and restarted its consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_and_non_utf8_entries_are_dead_lettered_exactly_and_never_stop_their_stream() {
    for kind in common::DbKind::ALL {
        let env = TestEnv::on(kind).await;
        let fast = [
            ("TOKENWARDEN__QUEUE__CLAIM_IDLE_MS", "300"),
            ("TOKENWARDEN__QUEUE__MAX_DELIVERIES", "2"),
        ];
        let _w = common::Child::spawn(&env, &["run"], &fast);
        let mut r = env.redis().await;
        let user = uuid::Uuid::new_v4();
        grant(&env, &mut r, user, 1000).await;
        let hostile: Vec<(&str, Fields)> = vec![
            (
                "consume_tokens",
                vec![(
                    b"payload".to_vec(),
                    format!(
                        r#"{{"request_id":"\u0000","user_id":"{user}","amount":1,"operation_type":"x"}}"#
                    )
                    .into_bytes(),
                )],
            ),
            (
                "grant_tokens",
                vec![(b"payload".to_vec(), br#"{"x\u0000":1}"#.to_vec())],
            ),
            (
                "hold_tokens",
                vec![(b"payload".to_vec(), b"{\"a\":\"\x00\"}".to_vec())],
            ),
            ("settle_hold", vec![(b"note".to_vec(), b"a\x00b".to_vec())]),
            (
                "release_hold",
                vec![
                    (b"\xff\xfename".to_vec(), b"\xc3\x28 not utf-8".to_vec()),
                    (b"back\\slash".to_vec(), b"ok".to_vec()),
                ],
            ),
        ];
        for (job_type, fields) in &hostile {
            let f: Vec<(&[u8], &[u8])> = fields
                .iter()
                .map(|(k, v)| (k.as_slice(), v.as_slice()))
                .collect();
            common::xadd_bytes(&mut r, env.stream(job_type).as_bytes(), &f).await;
        }
        // Valid work behind the hostile entries is served.
        let jobs: Vec<_> = (0..200)
            .map(|_| (uuid::Uuid::new_v4(), user, 1i64))
            .collect();
        enqueue_consumes(&env, &mut r, &jobs).await;
        wait_until(
            T,
            "the valid consumes behind the hostile entries",
            || async { (count_requests(&env, "consume").await == 200).then_some(()) },
        )
        .await;
        let all = wait_until(T, "one dead letter per hostile entry", || async {
            let d = dead_letter_rows(&env).await;
            (d.len() == hostile.len()).then_some(d)
        })
        .await;
        // In the order of `hostile` (entries of different streams may share an id).
        let rows: Vec<DeadLetterRow> = hostile
            .iter()
            .map(|(t, _)| {
                all.iter()
                    .find(|d| d.0 == *t)
                    .cloned()
                    .unwrap_or_else(|| panic!("{kind:?}: no dead letter for {t}: {all:?}"))
            })
            .collect();
        for ((job_type, fields), row) in hostile.iter().zip(&rows) {
            assert_eq!(&row.0, job_type, "{kind:?}: {row:?}");
            assert_eq!(
                &kept_fields(row),
                fields,
                "{kind:?}: exact bytes kept: {row:?}"
            );
        }
        // The readable view escapes what Postgres cannot hold, and says so (raw_entry set).
        assert!(rows[2].3.is_some() && rows[3].3.is_some() && rows[4].3.is_some());
        assert_eq!(rows[3].2["note"], "a\\u0000b", "{:?}", rows[3]);
        assert_eq!(
            rows[4].2["\\xff\\xfename"], "\\xc3( not utf-8",
            "{:?}",
            rows[4]
        );
        assert_eq!(rows[4].2["back\\\\slash"], "ok", "{:?}", rows[4]);
        assert!(rows[1].4.contains("unknown field"), "{:?}", rows[1]);
        for (job_type, _) in &hostile {
            let s = env.stream(job_type);
            wait_until(T, "nothing pending", || {
                let mut r = r.clone();
                let s = s.clone();
                async move { (common::pending_count(&mut r, s.as_bytes()).await == 0).then_some(()) }
            })
            .await;
            let names = common::consumers(&mut r, s.as_bytes()).await;
            assert_eq!(
                names.len(),
                1,
                "{kind:?} {job_type}: no restarted consumers: {names:?}"
            );
        }
    }
}

/// When even the dead letter cannot be stored (here a CHECK constraint refuses every row), the
/// entry is retried a bounded number of passes, then kept in the Redis quarantine hash with its
/// reason and exact bytes and acknowledged; the stream keeps serving other entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_whose_dead_letter_cannot_be_stored_is_quarantined_and_the_stream_moves_on() {
    use base64::Engine as _;
    for kind in common::DbKind::ALL {
        let env = TestEnv::on(kind).await;
        sqlx::query(
            "ALTER TABLE public.dead_letters ADD CONSTRAINT refuse_all CHECK (false) NOT VALID",
        )
        .execute(&env.pool)
        .await
        .expect("constraint");
        let calls = Arc::new(AtomicUsize::new(0));
        let mut reg = JobRegistry::new();
        reg.register(Echo {
            calls: calls.clone(),
        });
        let cfg = config(
            &env,
            &[
                ("TOKENWARDEN__QUEUE__CLAIM_IDLE_MS", "150"),
                ("TOKENWARDEN__QUEUE__BLOCK_MS", "50"),
                ("TOKENWARDEN__QUEUE__MAX_DELIVERIES", "2"),
            ],
        );
        let w = InProcess::start(cfg, reg).await;
        let mut r = env.redis().await;
        let s = env.stream("cleanup_locks");
        let bad = r#"{"bad":true}"#;
        let id = xadd(&mut r, &s, &[("payload", bad)]).await;
        let rid = uuid::Uuid::new_v4().to_string();
        xadd(
            &mut r,
            &s,
            &[("payload", &format!(r#"{{"request_id":"{rid}"}}"#))],
        )
        .await;
        let rep = blpop(&mut r, &env.reply_key(&rid)).await;
        assert_eq!(rep["echo"]["request_id"], rid.as_str());
        let key = format!("{}:quarantine:cleanup_locks", env.redis_prefix);
        let kept: String = wait_until(T, "the entry quarantined", || {
            let mut r = r.clone();
            let key = key.clone();
            let id = id.clone();
            async move {
                redis::cmd("HGET")
                    .arg(&key)
                    .arg(&id)
                    .query_async::<Option<String>>(&mut r)
                    .await
                    .ok()
                    .flatten()
            }
        })
        .await;
        let kept: serde_json::Value = serde_json::from_str(&kept).expect("quarantine JSON");
        // What the `tokenwarden_queue_quarantined` gauge shows.
        assert_eq!(
            tokenwarden::queue::quarantine::count(&mut r, &env.redis_prefix)
                .await
                .expect("count quarantined"),
            1,
            "{kind:?}"
        );
        let reason = kept["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("bad is not allowed"), "{kind:?}: {kept}");
        assert!(reason.contains("could not be stored"), "{kind:?}: {kept}");
        let b64 = base64::engine::general_purpose::STANDARD;
        assert_eq!(
            kept["raw_entry"]["fields"][0],
            serde_json::json!([b64.encode("payload"), b64.encode(bad)]),
            "{kind:?}: {kept}"
        );
        wait_until(T, "nothing pending", || {
            let mut r = r.clone();
            let s = s.clone();
            async move { (common::pending_count(&mut r, s.as_bytes()).await == 0).then_some(()) }
        })
        .await;
        // Once Postgres takes dead letters again, the sweep (every 30 s) moves the entry there.
        sqlx::query("ALTER TABLE public.dead_letters DROP CONSTRAINT refuse_all")
            .execute(&env.pool)
            .await
            .expect("drop constraint");
        let rows = wait_until(
            Duration::from_secs(45),
            "the quarantined entry dead-lettered",
            || async {
                let d = dead_letter_rows(&env).await;
                (!d.is_empty()).then_some(d)
            },
        )
        .await;
        assert_eq!(
            kept_fields(&rows[0]),
            vec![(b"payload".to_vec(), bad.as_bytes().to_vec())]
        );
        // The sweep deletes the hash field after the dead letter commits: the gauge's count (the
        // fields of every quarantine hash, this one's included) goes back to 0.
        wait_until(T, "the quarantine count back to 0", || {
            let mut r = r.clone();
            let prefix = env.redis_prefix.clone();
            async move {
                (tokenwarden::queue::quarantine::count(&mut r, &prefix)
                    .await
                    .ok()?
                    == 0)
                    .then_some(())
            }
        })
        .await;
        assert!(
            rows[0].4.contains("could not be stored"),
            "{kind:?}: {:?}",
            rows[0]
        );
        // The emptied hash left the index the gauge reads.
        let named: Vec<String> = redis::cmd("SMEMBERS")
            .arg(format!("{}:quarantined", env.redis_prefix))
            .query_async(&mut r)
            .await
            .expect("quarantine index");
        assert!(named.is_empty(), "{kind:?}: {named:?}");
        w.stop().await;
    }
}

/// A quarantine hash written by an earlier version, which kept no index of them, is found
/// when the worker starts: counted by the gauge and moved into the dead letters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantine_hash_an_earlier_version_left_is_still_drained() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    for kind in common::DbKind::ALL {
        let env = TestEnv::on(kind).await;
        let mut r = env.redis().await;
        let s = env.stream("cleanup_locks");
        let kept = serde_json::json!({
            "job_type": "cleanup_locks", "stream": s, "entry_id": "1-1", "deliveries": 5,
            "reason": "refused by an earlier Postgres",
            "raw_entry": {"stream": b64.encode(&s),
                          "fields": [[b64.encode("payload"), b64.encode("{\"old\":1}")]]},
            "truncated_bytes": 0, "quarantined_at_ms": 1,
        });
        let key = format!("{}:quarantine:cleanup_locks", env.redis_prefix);
        let _: i64 = redis::cmd("HSET")
            .arg(&key)
            .arg("1-1")
            .arg(kept.to_string())
            .query_async(&mut r)
            .await
            .expect("hset");
        let mut reg = JobRegistry::new();
        reg.register(Echo {
            calls: Arc::new(AtomicUsize::new(0)),
        });
        let w = InProcess::start(config(&env, &[]), reg).await;
        let rows = wait_until(T, "the old quarantined entry dead-lettered", || async {
            let d = dead_letter_rows(&env).await;
            (!d.is_empty()).then_some(d)
        })
        .await;
        assert_eq!(
            kept_fields(&rows[0]),
            vec![(b"payload".to_vec(), br#"{"old":1}"#.to_vec())],
            "{kind:?}"
        );
        assert!(
            rows[0].4.contains("refused by an earlier Postgres"),
            "{kind:?}: {:?}",
            rows[0]
        );
        // The drain stores the dead letter first and deletes the hash field after it, so the
        // row can be seen a moment before the field is gone.
        wait_until(T, &format!("{kind:?}: the quarantine hash emptied"), || {
            let (mut r, key) = (r.clone(), key.clone());
            async move {
                let left: i64 = redis::cmd("EXISTS")
                    .arg(&key)
                    .query_async(&mut r)
                    .await
                    .expect("exists");
                (left == 0).then_some(())
            }
        })
        .await;
        w.stop().await;
    }
}

/// The unknown-type sweep is not stopped by a NUL in a field value nor by a stream whose key is
/// not UTF-8 (SCAN used to fail on it), and neither is `prune`, which lists the same streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unknown_type_sweep_and_prune_survive_nul_values_and_binary_key_names() {
    for kind in common::DbKind::ALL {
        let env = TestEnv::on(kind).await;
        let mut r = env.redis().await;
        let binary_stream = [env.stream("").as_bytes(), b"\xff\xfe"].concat();
        common::xadd_bytes(&mut r, &binary_stream, &[(b"payload", b"{}")]).await;
        common::xadd_bytes(&mut r, env.stream("nul").as_bytes(), &[(b"f", b"x\x00y")]).await;
        let rid = uuid::Uuid::new_v4();
        let p = serde_json::json!({"request_id": rid}).to_string();
        xadd(&mut r, &env.stream("no_such_job"), &[("payload", &p)]).await;
        let _w = common::Child::spawn(&env, &["run"], &[]);

        let rep = blpop(&mut r, &env.reply_key(&rid.to_string())).await;
        assert_eq!(rep["status"], "rejected", "{kind:?}: {rep}");
        let rows = wait_until(T, "three dead letters", || async {
            let d = dead_letter_rows(&env).await;
            (d.len() == 3).then_some(d)
        })
        .await;
        let binary = rows
            .iter()
            .find(|d| d.0 == "\\xff\\xfe")
            .unwrap_or_else(|| panic!("{kind:?}: binary-named stream swept: {rows:?}"));
        assert!(
            binary.4.contains("unknown job type '\\xff\\xfe'"),
            "{binary:?}"
        );
        use base64::Engine as _;
        let raw_stream = binary.3.as_ref().expect("raw_entry")["stream"].clone();
        assert_eq!(
            raw_stream,
            base64::engine::general_purpose::STANDARD.encode(&binary_stream)
        );
        let nul = rows
            .iter()
            .find(|d| d.0 == "nul")
            .expect("nul stream swept");
        assert_eq!(kept_fields(nul), vec![(b"f".to_vec(), b"x\x00y".to_vec())]);
        for s in [
            binary_stream.clone(),
            env.stream("nul").into_bytes(),
            env.stream("no_such_job").into_bytes(),
        ] {
            // The sweep acknowledges an entry after its dead letter commits: wait for the ack.
            wait_until(T, "the swept entry acknowledged", || {
                let mut r = r.clone();
                let s = s.clone();
                async move { (common::pending_count(&mut r, &s).await == 0).then_some(()) }
            })
            .await;
        }
        // prune lists the job streams with SCAN too: it answers instead of failing.
        let rid = uuid::Uuid::new_v4();
        let p = serde_json::json!({"request_id": rid}).to_string();
        xadd(&mut r, &env.stream("prune"), &[("payload", &p)]).await;
        let rep = blpop(&mut r, &env.reply_key(&rid.to_string())).await;
        assert!(
            rep.get("status") != Some(&serde_json::json!("rejected")),
            "{kind:?}: {rep}"
        );
        assert!(
            rep.to_string().contains("streams"),
            "{kind:?}: prune reply {rep}"
        );
    }
}

/// A key of the wrong type at one caller's reply list costs that one reply: the other callers
/// of the same ack pipeline get exactly one reply each and every entry is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_type_reply_key_costs_one_reply_not_the_batch() {
    let env = TestEnv::new().await;
    let _w = common::Child::spawn(&env, &["run"], &[]);
    let mut r = env.redis().await;
    let user = uuid::Uuid::new_v4();
    grant(&env, &mut r, user, 1000).await;
    let jobs: Vec<_> = (0..300)
        .map(|_| (uuid::Uuid::new_v4(), user, 1i64))
        .collect();
    let victim = jobs[150].0.to_string();
    let _: i64 = redis::cmd("HSET")
        .arg(env.reply_key(&victim))
        .arg("a")
        .arg("b")
        .query_async(&mut r)
        .await
        .unwrap();
    enqueue_consumes(&env, &mut r, &jobs).await;
    wait_all_consumed(&env, &r, 300).await;
    for (rid, _, _) in &jobs {
        let rid = rid.to_string();
        if rid == victim {
            continue;
        }
        let n: i64 = redis::cmd("LLEN")
            .arg(env.reply_key(&rid))
            .query_async(&mut r)
            .await
            .unwrap();
        assert_eq!(n, 1, "caller {rid} got exactly one reply");
    }
    let status: String =
        sqlx::query_scalar("SELECT status FROM ledger_requests WHERE request_id = $1")
            .bind(jobs[150].0)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(status, "consumed", "the victim's outcome is stored");
}

/// Two `payload` fields are ambiguous: the entry is refused (neither payload applied) and the
/// dead letter keeps both, in order, so `dead-letters retry` replays what was refused. A field
/// name that is not UTF-8 is kept too, and retry puts back the exact bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_payload_fields_are_refused_and_non_utf8_names_are_kept_and_replayed() {
    for kind in common::DbKind::ALL {
        let env = TestEnv::on(kind).await;
        let _w = common::Child::spawn(&env, &["run"], &[]);
        let mut r = env.redis().await;
        let user = uuid::Uuid::new_v4();
        grant(&env, &mut r, user, 100).await;
        let (a, b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let (pa, pb) = (consume_payload(a, user, 1), consume_payload(b, user, 2));
        let s = env.stream("consume_tokens");
        common::xadd_bytes(
            &mut r,
            s.as_bytes(),
            &[(b"payload", pa.as_bytes()), (b"payload", pb.as_bytes())],
        )
        .await;
        let binary_id = common::xadd_bytes(&mut r, s.as_bytes(), &[(b"\xffname", b"v\xfe")]).await;
        let rows = wait_until(T, "two dead letters", || async {
            let d = dead_letter_rows(&env).await;
            (d.len() == 2).then_some(d)
        })
        .await;
        assert!(
            rows[0].4.contains("2 `payload` fields"),
            "{kind:?}: {:?}",
            rows[0]
        );
        assert_eq!(
            kept_fields(&rows[0]),
            vec![
                (b"payload".to_vec(), pa.clone().into_bytes()),
                (b"payload".to_vec(), pb.clone().into_bytes())
            ]
        );
        assert_eq!(rows[0].2["payload"], pa.as_str());
        assert_eq!(rows[0].2["payload#2"], pb.as_str());
        let applied: i64 =
            sqlx::query_scalar("SELECT count(*) FROM ledger_requests WHERE request_id = ANY($1)")
                .bind(vec![a, b])
                .fetch_one(&env.pool)
                .await
                .unwrap();
        assert_eq!(applied, 0, "{kind:?}: neither payload applied");
        assert_eq!(
            kept_fields(&rows[1]),
            vec![(b"\xffname".to_vec(), b"v\xfe".to_vec())]
        );
        let id: i64 = sqlx::query_scalar("SELECT id FROM dead_letters WHERE entry_id = $1")
            .bind(&binary_id)
            .fetch_one(&env.pool)
            .await
            .unwrap();
        let out = env.cli(&["dead-letters", "retry", &id.to_string()]);
        assert!(out.ok, "{}", out.text());
        let last: Vec<(String, Fields)> = redis::cmd("XREVRANGE")
            .arg(&s)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut r)
            .await
            .unwrap();
        assert_eq!(
            last[0].1,
            vec![(b"\xffname".to_vec(), b"v\xfe".to_vec())],
            "{kind:?}: retry replays the exact bytes"
        );
    }
}

/// The worker reads request ids as the schemas write them: a braced, `urn:uuid:` or 32-digit
/// spelling is refused (no outcome stored under the canonical id, no reply to a key the caller
/// does not wait on), and `amount` 2.0 / 1e2, valid integers in JSON Schema, are applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_and_amounts_are_read_as_the_schemas_say() {
    for kind in common::DbKind::ALL {
        let env = TestEnv::on(kind).await;
        let _w = common::Child::spawn(&env, &["run"], &[]);
        let mut r = env.redis().await;
        let user = uuid::Uuid::new_v4();
        grant(&env, &mut r, user, 1000).await;
        let s = env.stream("consume_tokens");
        let odd: Vec<(uuid::Uuid, String)> = (0..3)
            .map(|i| {
                let id = uuid::Uuid::new_v4();
                let spelled = match i {
                    0 => format!("{{{id}}}"),
                    1 => format!("urn:uuid:{id}"),
                    _ => id.simple().to_string(),
                };
                (id, spelled)
            })
            .collect();
        for (_, spelled) in &odd {
            let p = serde_json::json!({"request_id": spelled, "user_id": user, "amount": 1, "operation_type": "x"});
            xadd(&mut r, &s, &[("payload", &p.to_string())]).await;
        }
        let mut rids = Vec::new();
        for amount in ["2.0", "1e2"] {
            let rid = uuid::Uuid::new_v4();
            let p = format!(
                r#"{{"request_id":"{rid}","user_id":"{user}","amount":{amount},"operation_type":"x"}}"#
            );
            xadd(&mut r, &s, &[("payload", &p)]).await;
            rids.push(rid);
        }
        for (rid, want) in rids.iter().zip([998, 898]) {
            let rep = blpop(&mut r, &env.reply_key(&rid.to_string())).await;
            assert_eq!(rep["status"], "consumed", "{kind:?}: {rep}");
            assert_eq!(rep["balance"], want, "{kind:?}: {rep}");
        }
        wait_until(T, "three dead letters", || async {
            (dead_letter_rows(&env).await.len() == 3).then_some(())
        })
        .await;
        let ids: Vec<uuid::Uuid> = odd.iter().map(|o| o.0).collect();
        let stored: i64 =
            sqlx::query_scalar("SELECT count(*) FROM ledger_requests WHERE request_id = ANY($1)")
                .bind(&ids)
                .fetch_one(&env.pool)
                .await
                .unwrap();
        assert_eq!(
            stored, 0,
            "{kind:?}: no outcome under a spelling the caller did not use"
        );
        for (_, spelled) in &odd {
            let n: i64 = redis::cmd("EXISTS")
                .arg(env.reply_key(spelled))
                .query_async(&mut r)
                .await
                .unwrap();
            assert_eq!(n, 0, "{kind:?}: no reply list for {spelled}");
        }
    }
}

/// `/readyz` says not ready while a job type's stream is not served (a key of the wrong type at
/// its name makes its consumer fail and restart), and ready again once it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_not_ready_while_a_stream_is_not_served() {
    let env = TestEnv::new().await;
    let mut r = env.redis().await;
    let s = env.stream("hold_tokens");
    let _: () = redis::cmd("SET")
        .arg(&s)
        .arg("x")
        .query_async(&mut r)
        .await
        .unwrap();
    let port = common::ops::free_port();
    let listen = format!("127.0.0.1:{port}");
    let _w = common::Child::spawn(
        &env,
        &["run"],
        &[
            ("TOKENWARDEN__HTTP__ENABLED", "true"),
            ("TOKENWARDEN__HTTP__LISTEN", &listen),
        ],
    );
    let body = wait_until(T, "readyz 503 naming queue:hold_tokens", || async {
        let (status, body) = common::ops::get(port, "/readyz").await?;
        (status == 503 && body.contains("queue:hold_tokens")).then_some(body)
    })
    .await;
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let check = v["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "queue:hold_tokens"))
        .cloned()
        .expect("check");
    assert_eq!(check["ok"], false, "{v}");
    assert!(
        check["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("WRONGTYPE"),
        "{v}"
    );
    let _: i64 = redis::cmd("DEL").arg(&s).query_async(&mut r).await.unwrap();
    wait_until(T, "readyz 200 once the stream is served", || async {
        let (status, _) = common::ops::get(port, "/readyz").await?;
        (status == 200).then_some(())
    })
    .await;
}

/// Everything a SIGKILLed worker held is served again within `claim_idle_ms` + 5 s of the
/// restart: the restarted process takes over its dead predecessor's entries at once and claim
/// passes loop until nothing is left. The dead consumer is then removed from the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_held_by_a_sigkilled_worker_are_served_within_claim_idle_plus_5s() {
    let env = TestEnv::new().await;
    let claim_idle_ms = 30_000u64;
    let mut w = common::Child::spawn(&env, &["run"], &[]);
    let mut r = env.redis().await;
    let user = uuid::Uuid::new_v4();
    let granted = 1_000_000;
    grant(&env, &mut r, user, granted).await;
    let jobs = random_jobs(user, 20_000);
    enqueue_consumes(&env, &mut r, &jobs).await;
    let s = env.stream("consume_tokens");
    wait_until(T, "jobs applied", || async {
        (count_requests(&env, "consume").await >= 2_000).then_some(())
    })
    .await;
    w.signal("KILL");
    w.wait_exit(T);
    let held: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(&s)
        .arg("tokenwarden")
        .arg("-")
        .arg("+")
        .arg(100_000)
        .query_async(&mut r)
        .await
        .unwrap();
    assert!(!held.is_empty(), "the killed worker held entries");
    let held: std::collections::HashSet<String> = held.into_iter().map(|p| p.0).collect();
    let started = std::time::Instant::now();
    let _w2 = common::Child::spawn(&env, &["run"], &[]);
    let deadline = Duration::from_millis(claim_idle_ms) + Duration::from_secs(5);
    wait_until(deadline, "every held entry served again", || {
        let mut r = r.clone();
        let s = s.clone();
        let held = &held;
        async move {
            let still: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
                .arg(&s)
                .arg("tokenwarden")
                .arg("-")
                .arg("+")
                .arg(100_000)
                .query_async(&mut r)
                .await
                .ok()?;
            (!still.iter().any(|p| held.contains(&p.0))).then_some(())
        }
    })
    .await;
    eprintln!(
        "recovery: {} entries held by the killed worker served again {:?} after the restart",
        held.len(),
        started.elapsed()
    );
    wait_all_consumed(&env, &r, 20_000).await;
    assert_exact(&env, user, granted, &jobs).await;
    wait_until(T, "the dead consumer removed", || {
        let mut r = r.clone();
        let s = s.clone();
        async move { (common::consumers(&mut r, s.as_bytes()).await.len() == 1).then_some(()) }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Bad input, generated: the stream-entry decoder and the dead-letter encoding never panic,
// every refusal has a reason, and a dead letter keeps exactly the bytes it says it keeps.
// ---------------------------------------------------------------------------------------------

mod generated {
    use proptest::prelude::*;
    use tokenwarden::queue::dead_letter::{Kept, Letter, MAX_KEPT_BYTES};
    use tokenwarden::queue::entry::{StreamEntry, parse_entries};

    /// Cases per property (the report's "cases run").
    const CASES: u32 = 2000;

    fn bytes() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..24),
            Just(b"payload".to_vec()),
            Just(b"enqueued_at".to_vec()),
            "[ -~]{0,12}".prop_map(String::into_bytes),
            Just(b"{\"request_id\":\"6f1c2a9e-3b7d-4e2f-9a41-0c5d8e7b1a01\"}".to_vec()),
        ]
    }

    fn redis_value() -> impl Strategy<Value = redis::Value> {
        let leaf = prop_oneof![
            Just(redis::Value::Nil),
            any::<i64>().prop_map(redis::Value::Int),
            bytes().prop_map(redis::Value::BulkString),
            "[ -~]{0,8}".prop_map(redis::Value::SimpleString),
        ];
        leaf.prop_recursive(4, 64, 6, |inner| {
            proptest::collection::vec(inner, 0..6).prop_map(redis::Value::Array)
        })
    }

    fn fields() -> impl Strategy<Value = Vec<(Vec<u8>, Vec<u8>)>> {
        proptest::collection::vec((bytes(), bytes()), 0..6)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() })]

        /// Any reply shape (XREADGROUP / XCLAIM, or garbage) decodes without panicking.
        #[test]
        fn any_redis_reply_decodes_without_panic(v in redis_value()) {
            let _ = parse_entries(v.clone());
            let _ = tokenwarden::queue::entry::parse_read_reply(v);
        }

        /// Any fields: the payload is read or refused with a reason; the dead letter written
        /// down holds no NUL anywhere Postgres would refuse it, its raw form decodes back to
        /// exactly the fields, and an entry with every field text is stored without raw form.
        #[test]
        fn any_entry_is_read_or_refused_with_a_reason_and_kept_exactly(f in fields(), stream in bytes()) {
            let entry = StreamEntry {
                job_type: "t".into(),
                stream: "p:jobs:t".into(),
                id: "1-0".into(),
                fields: f.clone(),
                deliveries: 1,
            };
            if let Err(m) = entry.payload() {
                prop_assert!(!m.reason.trim().is_empty());
            }
            let letter = Letter { job_type: b"t", stream: &stream, entry_id: "1-0", fields: &f, deliveries: 1 };
            let kept = Kept::of(&letter);
            let map = kept.fields.as_object().unwrap();
            prop_assert!(map.iter().all(|(k, v)| !k.contains('\0') && !v.as_str().unwrap().contains('\0')), "{map:?}");
            prop_assert!(!kept.stream.contains('\0') && !kept.job_type.contains('\0'));
            use base64::Engine as _;
            let b64 = base64::engine::general_purpose::STANDARD;
            let back: Vec<(Vec<u8>, Vec<u8>)> = kept.raw["fields"].as_array().unwrap().iter()
                .map(|p| (b64.decode(p[0].as_str().unwrap()).unwrap(), b64.decode(p[1].as_str().unwrap()).unwrap()))
                .collect();
            prop_assert_eq!(&back, &f);
            prop_assert_eq!(&b64.decode(kept.raw["stream"].as_str().unwrap()).unwrap(), &stream);
            let all_text = {
                let mut seen = std::collections::HashSet::new();
                f.iter().all(|(k, v)| seen.insert(k.clone())
                    && std::str::from_utf8(k).is_ok_and(|s| !s.contains('\0'))
                    && std::str::from_utf8(v).is_ok_and(|s| !s.contains('\0')))
            };
            let stream_text = std::str::from_utf8(&stream).is_ok_and(|s| !s.contains('\0'));
            prop_assert_eq!(kept.raw_entry.is_none(), all_text && stream_text);
        }

        /// However big an entry is, its dead letter keeps at most MAX_KEPT_BYTES of it and
        /// counts the rest.
        #[test]
        fn a_dead_letter_is_bounded(len in 0usize..(3 * MAX_KEPT_BYTES), names in 1usize..4) {
            let f: Vec<(Vec<u8>, Vec<u8>)> = (0..names)
                .map(|i| (format!("f{i}").into_bytes(), vec![b'x'; len / names]))
                .collect();
            let total: usize = f.iter().map(|(k, v)| k.len() + v.len()).sum();
            let kept = Kept::of(&Letter { job_type: b"t", stream: b"s", entry_id: "1-0", fields: &f, deliveries: 1 });
            let stored: usize = kept.fields.as_object().unwrap().iter().map(|(k, v)| k.len() + v.as_str().unwrap().len()).sum();
            prop_assert!(stored <= MAX_KEPT_BYTES + 16 * names);
            prop_assert_eq!(kept.truncated_bytes as usize, total.saturating_sub(MAX_KEPT_BYTES));
        }
    }
}
