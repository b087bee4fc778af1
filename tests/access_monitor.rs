//! The access monitor (grants, revocations, their stream and webhook, the full re-check)
//! against real Postgres (plain and Supabase-shaped), Redis and anvil with the indexer running.

mod common;

use std::time::{Duration, Instant};

use alloy::primitives::{Address, U256};
use common::anvil::Anvil;
use common::indexed::Indexed;
use common::{DbKind, TestEnv, begin_as, wait_until};
use serde_json::json;
use tokenwarden::access::RuleStore;
use tokenwarden::access::monitor::{Monitor, changes_stream};
use tokenwarden::access::recheck::AccessRecheck;
use tokenwarden::access::transitions::{AccessEvent, Cause, EventKind, TransitionStore};
use tokenwarden::queue::JobHandler;
use uuid::Uuid;

const TOKEN: u128 = 1_000_000_000_000_000_000; // 1 whole TT20 (18 decimals)

fn erc20_rule(token: Address, min: &str) -> serde_json::Value {
    json!({"condition": {"erc20": {"chain_id": common::indexed::CHAIN, "token": format!("{token:#x}"), "min": min}}})
}

/// A monitor replica with its own connections and shutdown, posting to `webhook` if given.
struct MonitorReplica {
    monitor: Monitor,
    ctx: tokenwarden::app::AppContext,
}

impl MonitorReplica {
    async fn start(ix: &Indexed, webhook: Option<String>) -> MonitorReplica {
        let mut cfg = (*ix.ctx.cfg).clone();
        if let Some(url) = webhook {
            cfg.access.webhook_url = secrecy::SecretString::from(url);
        }
        let ctx = tokenwarden::app::AppContext::connect(cfg)
            .await
            .expect("monitor connects");
        let monitor = tokenwarden::access::monitor::spawn(&ctx);
        let mut leading = monitor.leading.clone();
        tokio::time::timeout(Duration::from_secs(20), leading.wait_for(|l| *l))
            .await
            .expect("the monitor takes the lease")
            .expect("monitor alive");
        MonitorReplica { monitor, ctx }
    }

    async fn stop(self) {
        self.ctx.shutdown.cancel();
        let _ = self.monitor.task.await;
    }
}

/// Reads the access-change stream in order.
struct StreamReader {
    redis: redis::aio::MultiplexedConnection,
    key: String,
    last: String,
    /// Event ids already returned: publishing is at least once (a leader stopped between the
    /// XADD and marking the row published publishes it again), and consumers dedupe by id.
    seen: std::collections::HashSet<i64>,
}

impl StreamReader {
    async fn new(env: &TestEnv) -> StreamReader {
        StreamReader {
            redis: env.redis().await,
            key: changes_stream(&env.redis_prefix),
            last: "0-0".into(),
            seen: Default::default(),
        }
    }

    /// The next event on the stream not seen before, waiting up to `timeout`.
    async fn next(&mut self, timeout: Duration) -> AccessEvent {
        let deadline = Instant::now() + timeout;
        loop {
            let reply: redis::streams::StreamReadReply = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(1)
                .arg("BLOCK")
                .arg(50)
                .arg("STREAMS")
                .arg(&self.key)
                .arg(&self.last)
                .query_async(&mut self.redis)
                .await
                .expect("XREAD");
            if let Some(entry) = reply.keys.first().and_then(|k| k.ids.first()) {
                self.last = entry.id.clone();
                let body: String = entry.get("event").expect("event field");
                let id: i64 = entry.get("id").expect("id field");
                let event: AccessEvent = serde_json::from_str(&body).expect("event JSON");
                assert_eq!(event.id, id);
                if self.seen.insert(id) {
                    return event;
                }
                continue;
            }
            assert!(
                Instant::now() < deadline,
                "no access change on {} within {timeout:?}",
                self.key
            );
        }
    }

    /// Asserts nothing more is on the stream right now.
    async fn assert_empty(&mut self) {
        let len: i64 = redis::cmd("XLEN")
            .arg(&self.key)
            .query_async(&mut self.redis)
            .await
            .expect("XLEN");
        let read: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(&self.key)
            .arg(format!("({}", self.last))
            .arg("+")
            .query_async(&mut self.redis)
            .await
            .expect("XRANGE");
        assert!(
            read.ids.is_empty(),
            "unexpected entries (stream length {len})"
        );
    }
}

async fn grant_row(env: &TestEnv, user: Uuid) -> Option<(Option<i32>, bool)> {
    sqlx::query_as(
        "SELECT rule_version, revoked_at IS NULL FROM public.access_grants \
         WHERE user_id = $1 AND creator_id = 'creator-1' AND feature = 'CHAT'",
    )
    .bind(user)
    .fetch_optional(&env.pool)
    .await
    .expect("read grant")
}

#[track_caller]
fn assert_event(e: &AccessEvent, user: Uuid, kind: EventKind, reason: &str, cause: Cause) {
    assert_eq!(
        (e.user_id, e.kind, e.reason.as_str(), e.cause),
        (user, kind, reason, cause),
        "{e:?}"
    );
    assert_eq!(
        (e.creator_id.as_str(), e.feature.as_str()),
        ("creator-1", "CHAT")
    );
}

/// A member sells below the threshold: `revoked` within one second of sending the sale;
/// buys back: `granted`; sells again and a reorg removes that sale: `granted` again. The
/// stream and the webhook (which fails once, then accepts) get every change in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_revokes_within_a_second_a_purchase_grants_and_a_reorg_of_the_sale_grants_back() {
    for kind in DbKind::ALL {
        sale_purchase_reorg_on(kind).await;
    }
}

async fn sale_purchase_reorg_on(kind: DbKind) {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let ix = Indexed::start(kind).await;
    let hook = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/access"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&hook)
        .await;
    Mock::given(method("POST"))
        .and(path("/access"))
        .respond_with(ResponseTemplate::new(204))
        .with_priority(2)
        .mount(&hook)
        .await;
    let (w, buyer) = (Address::repeat_byte(0x1c), Address::repeat_byte(0x1d));
    ix.erc20(&[(Address::ZERO, w, 10 * TOKEN)]).await;
    let member = Uuid::new_v4();
    ix.link(member, w).await;
    let monitor = MonitorReplica::start(&ix, Some(format!("{}/access", hook.uri()))).await;
    let mut stream = StreamReader::new(&ix.env).await;

    // Setting the rule grants the member who already holds enough.
    RuleStore::new(ix.env.pool.clone())
        .set("creator-1", "CHAT", &erc20_rule(ix.t20, "5"), "test")
        .await
        .unwrap();
    let e = stream.next(Duration::from_secs(20)).await;
    assert_event(&e, member, EventKind::Granted, "met", Cause::RuleChange);
    assert_eq!(grant_row(&ix.env, member).await, Some((Some(1), true)));

    // The sale: 10 → 4 < 5. Measured from before the transaction is sent, so the lag includes
    // mining, indexing, the announcement, the re-evaluation and the publication.
    let sent = Instant::now();
    ix.anvil
        .send(
            ix.t20,
            Anvil::erc20_batch(&[(w, buyer, U256::from(6 * TOKEN))]),
        )
        .await;
    let sale_block = ix.anvil.head().await;
    let e = stream.next(Duration::from_secs(20)).await;
    let lag = sent.elapsed();
    assert_event(
        &e,
        member,
        EventKind::Revoked,
        "not_met",
        Cause::BalanceChange,
    );
    assert_eq!(
        (e.chain_id, e.block),
        (Some(common::indexed::CHAIN as i64), Some(sale_block as i64))
    );
    println!("{kind:?}: revocation lag (send → event on the stream): {lag:?}");
    assert!(
        lag <= Duration::from_secs(1),
        "revoked {lag:?} after the sale was sent"
    );
    assert_eq!(grant_row(&ix.env, member).await, Some((Some(1), false)));

    // Buying back: 4 + 2 = 6 ≥ 5.
    ix.erc20(&[(Address::ZERO, w, 2 * TOKEN)]).await;
    let e = stream.next(Duration::from_secs(20)).await;
    assert_event(&e, member, EventKind::Granted, "met", Cause::BalanceChange);

    // Sells again (6 → 3), then a reorg replaces the sale's block with an empty one.
    ix.erc20(&[(w, buyer, 3 * TOKEN)]).await;
    let e = stream.next(Duration::from_secs(20)).await;
    assert_event(
        &e,
        member,
        EventKind::Revoked,
        "not_met",
        Cause::BalanceChange,
    );
    ix.anvil.raw("anvil_reorg", json!([1, []])).await;
    ix.anvil.mine(1).await;
    let e = stream.next(Duration::from_secs(20)).await;
    assert_event(&e, member, EventKind::Granted, "met", Cause::Reorg);
    assert_eq!(ix.anvil.balance_of(ix.t20, w).await, U256::from(6 * TOKEN));
    assert_eq!(grant_row(&ix.env, member).await, Some((Some(1), true)));
    stream.assert_empty().await;

    // The webhook got the same five changes in order, after one 503 retried.
    let requests = wait_until(
        Duration::from_secs(20),
        "the webhook receives every change",
        || async {
            let r = hook.received_requests().await?;
            (r.len() >= 6).then_some(r)
        },
    )
    .await;
    let bodies: Vec<serde_json::Value> = requests
        .iter()
        .map(|r| serde_json::from_slice(&r.body).expect("JSON body"))
        .collect();
    assert_eq!(bodies[0], bodies[1], "the failed delivery is retried");
    let kinds: Vec<(&str, &str)> = bodies[1..]
        .iter()
        .map(|b| {
            assert_eq!(b["event"], "access_change");
            assert_eq!(b["change"]["user_id"], member.to_string());
            (
                b["change"]["kind"].as_str().unwrap(),
                b["change"]["cause"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("granted", "rule_change"),
            ("revoked", "balance_change"),
            ("granted", "balance_change"),
            ("revoked", "balance_change"),
            ("granted", "reorg"),
        ]
    );
    let unpublished: i64 =
        sqlx::query_scalar("SELECT count(*) FROM public.access_events WHERE published_at IS NULL")
            .fetch_one(&ix.env.pool)
            .await
            .unwrap();
    assert_eq!(unpublished, 0);
    monitor.stop().await;
}

/// With the monitor stopped, announcements are missed: the full re-check (the handler the
/// scheduler runs daily) catches a sale, a purchase and a deleted rule, and the next leader
/// publishes what it wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_full_recheck_catches_changes_whose_announcements_were_missed() {
    let ix = Indexed::start(DbKind::Plain).await;
    let (w_seller, w_buyer, elsewhere) = (
        Address::repeat_byte(0x2a),
        Address::repeat_byte(0x2b),
        Address::repeat_byte(0x2c),
    );
    ix.erc20(&[(Address::ZERO, w_seller, 10 * TOKEN)]).await;
    let (seller, buyer) = (Uuid::new_v4(), Uuid::new_v4());
    ix.link(seller, w_seller).await;
    ix.link(buyer, w_buyer).await;
    let rules = RuleStore::new(ix.env.pool.clone());
    let monitor = MonitorReplica::start(&ix, None).await;
    let mut stream = StreamReader::new(&ix.env).await;
    rules
        .set("creator-1", "CHAT", &erc20_rule(ix.t20, "5"), "test")
        .await
        .unwrap();
    rules
        .set("creator-1", "AFFILIATE", &erc20_rule(ix.t20, "1"), "test")
        .await
        .unwrap();
    let mut first = [
        stream.next(Duration::from_secs(20)).await,
        stream.next(Duration::from_secs(20)).await,
    ];
    first.sort_by(|a, b| a.feature.cmp(&b.feature));
    assert_eq!(
        first
            .iter()
            .map(|e| (e.user_id, e.feature.as_str(), e.kind))
            .collect::<Vec<_>>(),
        vec![
            (seller, "AFFILIATE", EventKind::Granted),
            (seller, "CHAT", EventKind::Granted)
        ]
    );
    monitor.stop().await;

    // While no monitor runs: the seller sells to the buyer, and AFFILIATE is deleted.
    ix.erc20(&[(w_seller, w_buyer, 6 * TOKEN), (w_seller, elsewhere, TOKEN)])
        .await;
    assert!(
        rules
            .delete("creator-1", "AFFILIATE", "test")
            .await
            .unwrap()
    );
    let store = TransitionStore::new(ix.env.pool.clone());
    assert_eq!(
        store.events_of(seller, 10).await.unwrap().len(),
        2,
        "missed"
    );

    let recheck = AccessRecheck::new(store.clone(), 1);
    assert_eq!(recheck.job_type(), "access_recheck");
    let reply = recheck.handle(json!({})).await.expect("re-check runs");
    assert_eq!(reply, json!({"rules": 2, "granted": 1, "revoked": 2}));
    let seller_events = store.events_of(seller, 10).await.unwrap();
    let mut changes: Vec<(&str, EventKind, &str, Cause)> = seller_events[..2]
        .iter()
        .map(|e| (e.feature.as_str(), e.kind, e.reason.as_str(), e.cause))
        .collect();
    changes.sort_by_key(|c| c.0);
    assert_eq!(
        changes,
        vec![
            ("AFFILIATE", EventKind::Revoked, "no_rule", Cause::Recheck),
            ("CHAT", EventKind::Revoked, "not_met", Cause::Recheck),
        ]
    );
    let buyer_events = store.events_of(buyer, 10).await.unwrap();
    assert_eq!(buyer_events.len(), 1);
    assert_eq!(
        (
            buyer_events[0].feature.as_str(),
            buyer_events[0].kind,
            buyer_events[0].cause
        ),
        ("CHAT", EventKind::Granted, Cause::Recheck)
    );
    // A second run finds nothing to change.
    let again = recheck.handle(json!({})).await.expect("re-check runs");
    assert_eq!(again, json!({"rules": 1, "granted": 0, "revoked": 0}));
    // A bad payload is refused with its reason.
    let err = recheck
        .handle(json!({"all": true}))
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("access_recheck payload"), "{err}");

    // The next leader publishes the re-check's events (the table is the outbox).
    let _monitor = MonitorReplica::start(&ix, None).await;
    let mut published: Vec<(Uuid, String, EventKind)> = Vec::new();
    for _ in 0..3 {
        let e = stream.next(Duration::from_secs(20)).await;
        assert_eq!(e.cause, Cause::Recheck);
        published.push((e.user_id, e.feature, e.kind));
    }
    published.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    let mut want = vec![
        (seller, "AFFILIATE".to_string(), EventKind::Revoked),
        (seller, "CHAT".to_string(), EventKind::Revoked),
        (buyer, "CHAT".to_string(), EventKind::Granted),
    ];
    want.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    assert_eq!(published, want);
    stream.assert_empty().await;
}

/// The default schedule of the full re-check is daily.
#[test]
fn the_full_recheck_is_scheduled_daily_by_default() {
    let cfg = tokenwarden::config::Config::load_with_env(None, Vec::new()).expect("defaults");
    let schedule = cfg
        .maintenance
        .schedules
        .schedule("access_recheck")
        .expect("scheduled by default");
    let ticks: Vec<_> = schedule.upcoming(chrono::Utc).take(2).collect();
    assert_eq!(ticks[1] - ticks[0], chrono::Duration::days(1));
}

/// Users read their own grants and events; service_role reads all; nobody but the worker
/// writes; anon reads nothing.
#[tokio::test]
async fn rls_users_read_only_their_own_grants_and_events() {
    for kind in DbKind::ALL {
        rls_on(TestEnv::on(kind).await).await;
    }
}

async fn rls_on(env: TestEnv) {
    let kind = env.kind;
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    for u in [alice, bob] {
        sqlx::query(
            "INSERT INTO public.access_grants (user_id, creator_id, feature, rule_version) \
             VALUES ($1, 'creator-1', 'CHAT', 1)",
        )
        .bind(u)
        .execute(&env.pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO public.access_events (user_id, creator_id, feature, kind, reason, cause) \
             VALUES ($1, 'creator-1', 'CHAT', 'granted', 'met', 'recheck')",
        )
        .bind(u)
        .execute(&env.pool)
        .await
        .unwrap();
    }
    for table in ["access_grants", "access_events"] {
        let mut tx = begin_as(&env.pool, "authenticated", Some(alice)).await;
        let users: Vec<Uuid> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT user_id FROM public.{table}"
        )))
        .fetch_all(&mut *tx)
        .await
        .unwrap();
        assert_eq!(users, vec![alice], "{kind:?} {table}");
        drop(tx);
        let mut tx = begin_as(&env.pool, "service_role", None).await;
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM public.{table}"
        )))
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        assert_eq!(n, 2, "{kind:?} {table}");
        drop(tx);
        for (role, sql) in [
            ("anon", format!("SELECT count(*) FROM public.{table}")),
            (
                "authenticated",
                format!("DELETE FROM public.{table} WHERE user_id = '{alice}'"),
            ),
            (
                "service_role",
                format!("DELETE FROM public.{table} WHERE user_id = '{alice}'"),
            ),
        ] {
            let mut tx = begin_as(&env.pool, role, Some(alice)).await;
            let err = sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&mut *tx)
                .await
                .expect_err("refused");
            let code = match &err {
                sqlx::Error::Database(d) => d.code().map(|c| c.to_string()),
                _ => None,
            };
            assert_eq!(
                code.as_deref(),
                Some("42501"),
                "{kind:?} {role} {table}: {err}"
            );
        }
    }
    // The transition functions are the worker's: no API role may call them.
    for role in ["anon", "authenticated", "service_role"] {
        let mut tx = begin_as(&env.pool, role, Some(alice)).await;
        let err = sqlx::query(
            "SELECT * FROM public.tw_access_reevaluate(ARRAY[$1::uuid], 'creator-1', 'CHAT', 'recheck', NULL)",
        )
        .bind(alice)
        .execute(&mut *tx)
        .await
        .expect_err("refused");
        assert!(
            err.to_string().contains("permission denied"),
            "{kind:?} {role}: {err}"
        );
    }
}
