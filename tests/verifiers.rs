//! External verifiers (issue 11): the `external` rule leaf, the `tomo` and `alchemy` profiles
//! served by wiremock in their real formats, retries, timeouts, the circuit breaker and the
//! seed's fallback (cache → last successful verification → policy). Real Postgres (both kinds
//! for the SQL rules) and Redis.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::{DbKind, TestEnv, wait_until};
use secrecy::SecretString;
use serde_json::{Value, json};
use tokenwarden::access::audit::AuditRecorder;
use tokenwarden::access::cache::DecisionCache;
use tokenwarden::access::check_job::VerifyAccessHandler;
use tokenwarden::access::service::AccessService;
use tokenwarden::access::verifiers::{BreakerState, Verifier, Verifiers, register};
use tokenwarden::access::{AccessChecker, Decision, RuleStore, Source};
use tokenwarden::config::{AuditConfig, VerifierConfig};
use tokenwarden::queue::JobHandler;
use uuid::Uuid;
use wiremock::matchers::{body_partial_json, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const KEY: &str = "sk-test-7f3a9c1e5b2d4f60";
const CONTRACT: &str = "0xa0b86991c6218b36c1d19d4a2e9eb0ce3606eb48";

/// Every log line of this test binary, to check the key never appears in one.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || LogWriter(writer.clone()))
            .try_init();
        buf
    })
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_text() -> String {
    String::from_utf8_lossy(&logs().lock().unwrap()).into_owned()
}

/// A verifier's config as `[access.verifiers.<name>]` would give it, fast for tests.
fn verifier_config(server: &MockServer, profile: &str, extra: Value) -> VerifierConfig {
    let mut v = json!({
        "profile": profile,
        "url": format!("{}/{}", server.uri(), if profile == "tomo" { "verify" } else { "v2" }),
        "key_env": "TW_TEST_VERIFIER_KEY",
        "timeout_ms": 400,
        "max_retries": 2,
        "retry_min_delay_ms": 10,
        "retry_max_delay_ms": 40,
        "max_retry_after_secs": 5,
        "breaker_failure_rate": 0.5,
        "breaker_min_calls": 3,
        "breaker_window_secs": 1,
        "breaker_open_secs": 1,
    });
    for (k, val) in extra.as_object().cloned().unwrap_or_default() {
        v[k] = val;
    }
    serde_json::from_value(v).expect("verifier config")
}

/// One user with proven wallets, a rule with one external leaf, and the queue door (audit
/// recorder, optional cache) asking `verifier`.
struct Setup {
    env: TestEnv,
    server: MockServer,
    user: Uuid,
    wallets: Vec<String>,
    verifiers: Arc<Verifiers>,
    handler: VerifyAccessHandler,
    _ctx: Option<tokenwarden::app::AppContext>,
}

impl Setup {
    async fn new(kind: DbKind, profile: &str, extra: Value, wallets: usize, cached: bool) -> Setup {
        logs();
        let env = TestEnv::on(kind).await;
        let server = MockServer::start().await;
        let cfg = verifier_config(&server, profile, extra);
        let mut access = env.config().access.clone();
        access.verifiers.insert(profile.to_string(), cfg.clone());
        register(&env.pool, &access)
            .await
            .expect("register verifiers");
        let user = Uuid::new_v4();
        let mut addrs = Vec::new();
        for i in 0..wallets {
            let a = format!(
                "0x{:040x}",
                0xabc000 + i + (user.as_u128() as usize % 1000) * 16
            );
            sqlx::query(
                "INSERT INTO public.user_wallets (user_id, address, chains, method) \
                 VALUES ($1, $2, ARRAY[1::bigint], 'eoa')",
            )
            .bind(user)
            .bind(&a)
            .execute(&env.pool)
            .await
            .expect("wallet");
            addrs.push(a);
        }
        addrs.sort();
        let rule = json!({"condition": {"any": [
            {"external": {"verifier": profile, "chain_id": 1, "contract": CONTRACT, "min": "150"}}]}});
        RuleStore::new(env.pool.clone())
            .set("creator-x", "WL", &rule, "test")
            .await
            .expect("rule with an external leaf");
        let verifier =
            Verifier::with_key(profile, &cfg, Some(SecretString::from(KEY))).expect("verifier");
        let verifiers = Arc::new(Verifiers::from_verifiers([verifier]));
        let (ctx, cache) = if cached {
            let ctx = env.app_context(&[]).await;
            let cache = Arc::new(DecisionCache::new(
                ctx.redis.clone(),
                &ctx.cfg.redis.prefix,
                &ctx.cfg.access,
            ));
            (Some(ctx), Some(cache))
        } else {
            (None, None)
        };
        let handler = door(&env, verifiers.clone(), cache);
        Setup {
            env,
            server,
            user,
            wallets: addrs,
            verifiers,
            handler,
            _ctx: ctx,
        }
    }

    async fn check(&self) -> Decision {
        check_with(&self.handler, self.user).await
    }

    async fn received(&self) -> usize {
        self.server.received_requests().await.map_or(0, |r| r.len())
    }

    fn breaker(&self, name: &str) -> BreakerState {
        self.verifiers
            .get(name)
            .expect("verifier")
            .breaker()
            .state()
    }
}

fn door(
    env: &TestEnv,
    verifiers: Arc<Verifiers>,
    cache: Option<Arc<DecisionCache>>,
) -> VerifyAccessHandler {
    let (audit, _task) = AuditRecorder::spawn(
        env.pool.clone(),
        &AuditConfig {
            max_batch: 100,
            retention_days: 30,
            prune_batch_rows: 100,
        },
    );
    VerifyAccessHandler::new(
        Arc::new(AccessService::new(
            AccessChecker::new(env.pool.clone()).with_verifiers(verifiers),
            cache,
        )),
        audit,
    )
}

async fn check_with(handler: &VerifyAccessHandler, user: Uuid) -> Decision {
    let reply = handler
        .handle(json!({"request_id": Uuid::new_v4(), "user_id": user,
                       "creator_id": "creator-x", "feature": "WL"}))
        .await
        .expect("a decision");
    serde_json::from_value(reply).expect("decision JSON")
}

fn tomo_ok(has: bool) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({"has_tokens": has}))
}

/// Alchemy's documented answer for one wallet and contract (fixture shape, real balance).
fn alchemy_balance(wallet: &str, balance: u128) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({
        "jsonrpc": "2.0",
        "result": {"address": wallet, "tokenBalances": [
            {"contractAddress": CONTRACT, "tokenBalance": format!("0x{balance:064x}"), "error": null}]},
        "id": 1}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tomo_profile_sends_the_seed_shape_with_the_key_in_a_header_never_in_the_body_or_logs() {
    let s = Setup::new(DbKind::Plain, "tomo", json!({}), 1, false).await;
    Mock::given(method("POST"))
        .and(path("/verify"))
        .and(header("x-api-key", KEY))
        .respond_with(tomo_ok(true))
        .mount(&s.server)
        .await;
    let d = s.check().await;
    assert!(d.allowed, "{d:?}");
    assert_eq!(d.source, Source::External);
    let e = &d.evidence[0];
    assert_eq!(e.kind, "external");
    assert_eq!(e.verifier.as_deref(), Some("tomo"));
    assert_eq!(e.wallets[0].has_tokens, Some(true));
    assert!(e.verified_at.is_some() && e.fallback.is_none());
    let reqs = s.server.received_requests().await.expect("recorded");
    assert_eq!(reqs.len(), 1);
    let body: Value = serde_json::from_slice(&reqs[0].body).expect("JSON body");
    assert_eq!(
        body,
        json!({"wallet_address": s.wallets[0], "contract_address": CONTRACT, "chain_id": 1, "min_amount": 150})
    );
    assert!(!String::from_utf8_lossy(&reqs[0].body).contains(KEY));
    assert!(!reqs[0].url.as_str().contains(KEY));

    // Failures are logged (retries), with the key nowhere: not in logs, not in the audit.
    s.server.reset().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(502).set_body_string(format!("upstream echo {KEY}")))
        .mount(&s.server)
        .await;
    let d = s.check().await;
    assert_eq!(d.source, Source::Fallback, "{d:?}");
    let err = d.evidence[0]
        .external_error
        .clone()
        .expect("why it fell back");
    assert!(err.contains("502"), "{err}");
    let audit: String = sqlx::query_scalar(
        "SELECT string_agg(evidence::text, '') FROM public.access_checks WHERE user_id = $1",
    )
    .bind(s.user)
    .fetch_one(&s.env.pool)
    .await
    .expect("audit");
    assert!(!audit.contains(KEY));
    let text = log_text();
    assert!(
        text.contains("verifier call failed; retrying"),
        "logs were captured"
    );
    assert!(!text.contains(KEY), "the key leaked into a log line");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alchemy_profile_reads_token_balances_and_sums_the_wallets() {
    let s = Setup::new(DbKind::Plain, "alchemy", json!({"chain_id": 1}), 2, false).await;
    for (w, bal) in [(&s.wallets[0], 100u128), (&s.wallets[1], 60)] {
        Mock::given(method("POST"))
            .and(path("/v2"))
            .and(header("authorization", format!("Bearer {KEY}").as_str()))
            .and(body_partial_json(
                json!({"jsonrpc": "2.0", "method": "alchemy_getTokenBalances",
                                          "params": [w, [CONTRACT]]}),
            ))
            .respond_with(alchemy_balance(w, bal))
            .mount(&s.server)
            .await;
    }
    let d = s.check().await;
    assert!(d.allowed, "100 + 60 >= 150: {d:?}");
    assert_eq!(d.source, Source::External);
    assert_eq!(d.evidence[0].amount.as_deref(), Some("160"));
    assert_eq!(d.evidence[0].minimum, "150");
    // Per wallet, neither wallet alone holds 150.
    RuleStore::new(s.env.pool.clone())
        .set(
            "creator-x",
            "WL",
            &json!({"per_wallet": true, "condition": {"external":
            {"verifier": "alchemy", "chain_id": 1, "contract": CONTRACT, "min": "150"}}}),
            "test",
        )
        .await
        .expect("rule");
    let d = s.check().await;
    assert!(
        !d.allowed && d.evidence[0].amount.as_deref() == Some("100"),
        "{d:?}"
    );
    for r in s.server.received_requests().await.expect("recorded") {
        assert!(!String::from_utf8_lossy(&r.body).contains(KEY));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_5xx_and_429_honouring_retry_after_but_not_4xx() {
    let s = Setup::new(
        DbKind::Plain,
        "tomo",
        json!({"breaker_min_calls": 100}),
        1,
        false,
    )
    .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&s.server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "1"))
        .up_to_n_times(1)
        .with_priority(2)
        .mount(&s.server)
        .await;
    Mock::given(method("POST"))
        .respond_with(tomo_ok(true))
        .with_priority(3)
        .mount(&s.server)
        .await;
    let started = Instant::now();
    let d = s.check().await;
    assert!(d.allowed && d.source == Source::External, "{d:?}");
    assert_eq!(s.received().await, 3, "503, 429, then the answer");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 was honoured (the backoff alone is at most 40 ms)"
    );

    // A client error is not retried: one request, then the fallback.
    s.server.reset().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(401))
        .mount(&s.server)
        .await;
    let d = s.check().await;
    assert_eq!(s.received().await, 1);
    assert_eq!(d.source, Source::Fallback);
    assert!(
        d.evidence[0]
            .external_error
            .as_deref()
            .unwrap_or("")
            .contains("401")
    );

    // A Retry-After beyond max_retry_after_secs is not waited for.
    s.server.reset().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "3600"))
        .mount(&s.server)
        .await;
    let started = Instant::now();
    let d = s.check().await;
    assert_eq!(d.source, Source::Fallback);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        d.evidence[0]
            .external_error
            .as_deref()
            .unwrap_or("")
            .contains("3600"),
        "{d:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_are_retried_and_garbage_bodies_are_not_both_fall_back() {
    let s = Setup::new(
        DbKind::Plain,
        "tomo",
        json!({"breaker_min_calls": 100}),
        1,
        false,
    )
    .await;
    Mock::given(method("POST"))
        .respond_with(tomo_ok(true).set_delay(Duration::from_secs(3)))
        .mount(&s.server)
        .await;
    let started = Instant::now();
    let d = s.check().await;
    assert_eq!(d.source, Source::Fallback, "{d:?}");
    assert!(!d.allowed, "restrictive by default, nothing on record");
    assert_eq!(d.evidence[0].fallback.as_deref(), Some("policy"));
    assert!(
        d.evidence[0]
            .external_error
            .as_deref()
            .unwrap_or("")
            .contains("timed out")
    );
    assert_eq!(s.received().await, 3, "first call and two retries");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "every call has its timeout"
    );

    for garbage in [
        ResponseTemplate::new(200).set_body_string("<html>502 Bad Gateway</html>"),
        ResponseTemplate::new(200).set_body_json(json!({"has_tokens": "yes"})),
        ResponseTemplate::new(200).set_body_json(json!({"result": true})),
    ] {
        s.server.reset().await;
        Mock::given(method("POST"))
            .respond_with(garbage)
            .mount(&s.server)
            .await;
        let d = s.check().await;
        assert_eq!(s.received().await, 1, "a malformed answer is not retried");
        assert_eq!(d.source, Source::Fallback);
        let err = d.evidence[0].external_error.clone().unwrap_or_default();
        assert!(err.contains("not its format"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_fails_fast_lets_one_probe_through_and_closes_on_success() {
    // Open for 3 s: long enough that 20 checks on a loaded machine all fall in the open period.
    let s = Setup::new(
        DbKind::Plain,
        "tomo",
        json!({"max_retries": 0, "breaker_open_secs": 3}),
        1,
        false,
    )
    .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&s.server)
        .await;
    // failsafe needs a full window (1 s) of calls before it may open.
    wait_until(Duration::from_secs(15), "the breaker opens", || async {
        s.check().await;
        (s.breaker("tomo") == BreakerState::Open).then_some(())
    })
    .await;
    let before = s.received().await;
    let started = Instant::now();
    for _ in 0..20 {
        let d = s.check().await;
        assert_eq!(d.source, Source::Fallback);
        let err = d.evidence[0].external_error.clone().unwrap_or_default();
        assert!(err.contains("circuit breaker open"), "{err}");
    }
    assert_eq!(
        s.received().await,
        before,
        "no request reaches the verifier while open"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "fail fast: 20 checks in {:?}",
        started.elapsed()
    );
    assert!(log_text().contains("verifier circuit breaker opened"));

    // The verifier recovers; after breaker_open_secs exactly one probe goes through.
    s.server.reset().await;
    Mock::given(method("POST"))
        .respond_with(tomo_ok(true).set_delay(Duration::from_millis(300)))
        .mount(&s.server)
        .await;
    // The open period is the behaviour under test: let it pass (3 s from opening, plus a margin).
    tokio::time::sleep(Duration::from_millis(3300)).await;
    let checks: Vec<_> = (0..8).map(|_| s.check()).collect();
    let decisions = futures::future::join_all(checks).await;
    assert_eq!(s.received().await, 1, "one probe while half-open");
    let external = decisions
        .iter()
        .filter(|d| d.source == Source::External)
        .count();
    assert_eq!(external, 1, "{decisions:?}");
    assert!(
        decisions
            .iter()
            .filter(|d| d.source == Source::Fallback)
            .all(|d| {
                d.evidence[0]
                    .external_error
                    .as_deref()
                    .unwrap_or("")
                    .contains("circuit breaker open")
            })
    );
    assert_eq!(s.breaker("tomo"), BreakerState::Closed);
    let d = s.check().await;
    assert_eq!(d.source, Source::External);
    assert_eq!(s.received().await, 2, "closed: calls go through again");
    assert!(log_text().contains("verifier circuit breaker closed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_is_the_cache_then_the_last_verification_within_its_age_then_the_policy() {
    for kind in DbKind::ALL {
        let s = Setup::new(
            kind,
            "tomo",
            json!({"max_retries": 0, "breaker_min_calls": 1000}),
            1,
            true,
        )
        .await;
        Mock::given(method("POST"))
            .respond_with(tomo_ok(true))
            .up_to_n_times(1)
            .with_priority(1)
            .mount(&s.server)
            .await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(500))
            .with_priority(2)
            .mount(&s.server)
            .await;
        let first = s.check().await;
        assert!(
            first.allowed && first.source == Source::External,
            "{kind:?} {first:?}"
        );

        // 1. A fresh cached decision answers without asking the (now failing) verifier.
        let d = s.check().await;
        assert_eq!((d.source, d.allowed), (Source::Cache, true), "{kind:?}");
        assert_eq!(s.received().await, 1);

        // 2. Without the cache: the last successful verification of the same question.
        let uncached = door(&s.env, s.verifiers.clone(), None);
        let d = check_with(&uncached, s.user).await;
        assert_eq!(
            (d.source, d.allowed),
            (Source::Fallback, true),
            "{kind:?} {d:?}"
        );
        let e = &d.evidence[0];
        assert_eq!(e.fallback.as_deref(), Some("last_verification"));
        assert_eq!(e.verified_at, first.evidence[0].verified_at);
        assert!(d.evidence_age_secs.is_some_and(|a| a < 60), "{d:?}");
        assert!(e.external_error.as_deref().unwrap_or("").contains("500"));
        // The SQL doors, which cannot call out, fall back the same way.
        let sql: Value =
            sqlx::query_scalar("SELECT public.verify_access_for($1, 'creator-x', 'WL')")
                .bind(s.user)
                .fetch_one(&s.env.pool)
                .await
                .expect("sql door");
        assert_eq!(sql["source"], json!("fallback"));
        assert_eq!(sql["evidence"][0]["fallback"], json!("last_verification"));
        assert_eq!(sql["allowed"], json!(true));

        // 3. Evidence older than fallback_max_age (24 h) does not count: the policy decides,
        //    restrictive by default.
        sqlx::query(
            "UPDATE public.access_checks SET checked_at = checked_at - interval '25 hours', \
                    evidence = (SELECT jsonb_agg(CASE WHEN e ? 'verified_at' THEN e || jsonb_build_object( \
                        'verified_at', (e ->> 'verified_at')::timestamptz - interval '25 hours') ELSE e END) \
                                FROM jsonb_array_elements(evidence) e) \
              WHERE user_id = $1",
        )
        .bind(s.user)
        .execute(&s.env.pool)
        .await
        .expect("age the audit");
        let d = check_with(&uncached, s.user).await;
        assert_eq!(
            (d.source, d.allowed),
            (Source::Fallback, false),
            "{kind:?} {d:?}"
        );
        assert_eq!(d.evidence[0].fallback.as_deref(), Some("policy"));
        assert_eq!(d.evidence[0].policy.as_deref(), Some("restrictive"));
        assert_eq!(d.evidence_age_secs, None);

        // 4. Permissive policy (the verifier's setting, written by the worker at start).
        let mut access = s.env.config().access.clone();
        access.verifiers.insert(
            "tomo".into(),
            verifier_config(&s.server, "tomo", json!({"fallback_policy": "permissive"})),
        );
        register(&s.env.pool, &access).await.expect("register");
        let d = check_with(&uncached, s.user).await;
        assert_eq!(
            (d.source, d.allowed),
            (Source::Fallback, true),
            "{kind:?} {d:?}"
        );
        assert_eq!(d.evidence[0].policy.as_deref(), Some("permissive"));
        // A fallback decision is not cached: the verifier is asked again next time.
        let n = s.received().await;
        check_with(&uncached, s.user).await;
        assert_eq!(s.received().await, n + 1);
        let recorded: Vec<String> = sqlx::query_scalar(
            "SELECT source FROM public.access_checks WHERE user_id = $1 ORDER BY id",
        )
        .bind(s.user)
        .fetch_all(&s.env.pool)
        .await
        .expect("audit");
        assert!(
            recorded.contains(&"external".to_string())
                && recorded.contains(&"fallback".to_string())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_leaf_is_validated_when_the_rule_is_set_with_its_path() {
    for kind in DbKind::ALL {
        let env = TestEnv::on(kind).await;
        let server = MockServer::start().await;
        let mut access = env.config().access.clone();
        access
            .verifiers
            .insert("tomo".into(), verifier_config(&server, "tomo", json!({})));
        register(&env.pool, &access).await.expect("register");
        let rules = RuleStore::new(env.pool.clone());
        let leaf = |body: Value| {
            json!({"condition": {"all": [{"external": {
            "verifier": "tomo", "chain_id": 1, "contract": CONTRACT}}, {"external": body}]}})
        };
        for (body, want) in [
            (
                json!({"verifier": "nope", "chain_id": 1, "contract": CONTRACT}),
                "$.condition.all[1].external.verifier: unknown verifier \"nope\" (configured: tomo)",
            ),
            (
                json!({"chain_id": 1, "contract": CONTRACT}),
                "$.condition.all[1].external.verifier: must be",
            ),
            (
                json!({"verifier": "tomo", "chain_id": 0, "contract": CONTRACT}),
                "$.condition.all[1].external.chain_id",
            ),
            (
                json!({"verifier": "tomo", "chain_id": 1, "contract": "0x12"}),
                "$.condition.all[1].external.contract",
            ),
            (
                json!({"verifier": "tomo", "chain_id": 1, "contract": CONTRACT, "min": "0"}),
                "$.condition.all[1].external.min",
            ),
            (
                json!({"verifier": "tomo", "chain_id": 1, "contract": CONTRACT, "min": 5}),
                "$.condition.all[1].external.min",
            ),
            (
                json!({"verifier": "tomo", "chain_id": 1, "contract": CONTRACT, "fallback_policy": "yes"}),
                "$.condition.all[1].external.fallback_policy",
            ),
            (
                json!({"verifier": "tomo", "chain_id": 1, "contract": CONTRACT, "token": CONTRACT}),
                "$.condition.all[1].external.token: unknown key",
            ),
        ] {
            let err = rules
                .set("c", "F", &leaf(body.clone()), "test")
                .await
                .expect_err("refused");
            assert!(err.to_string().contains(want), "{kind:?} {body}: {err}");
        }
        rules
            .set(
                "c",
                "F",
                &leaf(
                    json!({"verifier": "tomo", "chain_id": 8453, "contract": CONTRACT,
                                         "min": "1000000", "fallback_policy": "permissive"}),
                ),
                "test",
            )
            .await
            .expect("a valid external leaf on a chain tokenwarden does not index");
    }
}

/// The bench line: checks per second with an external leaf while the verifier hangs.
/// With the breaker open no check waits on a timeout (`cargo test --test verifiers
/// throughput -- --nocapture` prints the figures).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_while_the_verifier_is_down_the_breaker_keeps_checks_off_timeouts() {
    let s = Setup::new(
        DbKind::Plain,
        "tomo",
        json!({"max_retries": 0, "breaker_open_secs": 600, "timeout_ms": 3000, "breaker_window_secs": 10}),
        1,
        false,
    )
    .await;
    Mock::given(method("POST"))
        .respond_with(tomo_ok(true).set_delay(Duration::from_secs(5)))
        .mount(&s.server)
        .await;
    let opening = Instant::now();
    // Four concurrent checks per round: each waits out the 3 s timeout, so the breaker's
    // minimum of 3 calls falls within its 10 s window after one round.
    wait_until(Duration::from_secs(30), "the breaker opens", || async {
        futures::future::join_all((0..4).map(|_| s.check())).await;
        (s.breaker("tomo") == BreakerState::Open).then_some(())
    })
    .await;
    let opened_after = opening.elapsed();
    let before = s.received().await;
    let (n, concurrency) = (2000usize, 32usize);
    let handler = &s.handler;
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for chunk in (0..n).collect::<Vec<_>>().chunks(concurrency) {
        let rounds = chunk.iter().map(|_| async {
            let t = Instant::now();
            let d = check_with(handler, s.user).await;
            (t.elapsed(), d.source)
        });
        for (took, source) in futures::future::join_all(rounds).await {
            assert_eq!(source, Source::Fallback);
            slowest = slowest.max(took);
        }
    }
    let elapsed = started.elapsed();
    let rate = n as f64 / elapsed.as_secs_f64();
    println!(
        "external leaf, verifier down (5 s hang, timeout 3 s), breaker open: {n} checks in {:.2} s = {rate:.0} checks/s through the queue door (audit included), slowest {:?}; breaker opened after {:?}; without it each check would wait 3 s: at most {:.0} checks/s at {concurrency} in flight",
        elapsed.as_secs_f64(),
        slowest,
        opened_after,
        concurrency as f64 / 3.0,
    );
    assert_eq!(s.received().await, before, "no request while open");
    // A check that waited on the verifier would take the whole 3 s timeout (the mock hangs 5 s).
    assert!(
        slowest < Duration::from_millis(2500),
        "a check waited on a timeout: {slowest:?}"
    );
}
