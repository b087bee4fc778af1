//! Queue transport tests: real Redis streams, real Postgres, the worker in-process (for test
//! handlers) or as a child process (for crash and signal tests).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{TestEnv, wait_until};
use tokenwarden::config::Config;
use tokenwarden::queue::{JobError, JobFuture, JobHandler, JobRegistry};
use tokenwarden::worker::AppContext;

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

async fn xadd(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    fields: &[(&str, &str)],
) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    cmd.query_async(conn).await.expect("XADD")
}

async fn blpop(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> serde_json::Value {
    let (_, v): (String, String) = redis::cmd("BLPOP")
        .arg(key)
        .arg(20)
        .query_async(conn)
        .await
        .expect("reply within 20 s");
    serde_json::from_str(&v).expect("reply is JSON")
}

async fn dead_letter_reasons(env: &TestEnv) -> Vec<(String, String, String)> {
    sqlx::query_as("SELECT job_type, entry_id, reason FROM dead_letters ORDER BY id")
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
