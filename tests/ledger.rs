//! Credits ledger against a real Postgres: both doors (SQL functions and `Ledger::apply`),
//! idempotency, holds, validation, rate limiting, RLS, concurrency, and a model-based
//! comparison of the two doors with an in-memory model of the rules.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokenwarden::ledger::{Credits, Ledger, LedgerOp, Outcome, OutcomeStatus, RequestId, UserId};
use uuid::Uuid;

use common::{DbKind, TestEnv, begin_as};

fn ledger(env: &TestEnv) -> Ledger {
    Ledger::new(env.pool.clone(), env.config().ledger)
}

fn rid() -> RequestId {
    RequestId(Uuid::new_v4())
}

fn uid() -> UserId {
    UserId(Uuid::new_v4())
}

fn credits(n: i64) -> Credits {
    Credits::new(n).expect("positive test amount")
}

fn grant(request_id: RequestId, user: UserId, amount: i64) -> LedgerOp {
    LedgerOp::Grant {
        request_id,
        user_id: user,
        amount: credits(amount),
        reason: "test grant".into(),
        metadata: json!({}),
    }
}

fn consume(request_id: RequestId, user: UserId, amount: i64) -> LedgerOp {
    LedgerOp::Consume {
        request_id,
        user_id: user,
        amount: credits(amount),
        operation_type: "chat".into(),
        metadata: json!({"model": "test"}),
    }
}

fn hold(request_id: RequestId, user: UserId, amount: i64, ttl_secs: i32) -> LedgerOp {
    LedgerOp::Hold {
        request_id,
        user_id: user,
        amount: credits(amount),
        operation_type: "image".into(),
        ttl_secs: Some(ttl_secs),
        metadata: json!({}),
    }
}

fn settle(request_id: RequestId, hold_id: RequestId, amount: i64) -> LedgerOp {
    LedgerOp::Settle {
        request_id,
        hold_id,
        amount: credits(amount),
        metadata: json!({}),
    }
}

fn release(request_id: RequestId, hold_id: RequestId) -> LedgerOp {
    LedgerOp::Release {
        request_id,
        hold_id,
        metadata: json!({}),
    }
}

async fn apply_one(l: &Ledger, op: LedgerOp) -> Outcome {
    let mut out = l.apply(&[op]).await.expect("ledger apply");
    assert_eq!(out.len(), 1);
    out.remove(0)
}

/// Calls one SQL door function and returns its jsonb answer.
async fn sql(pool: &PgPool, query: &'static str, bind: impl FnOnce(SqlQ<'_>) -> SqlQ<'_>) -> Value {
    let q = sqlx::query_scalar::<_, Value>(query);
    bind(q)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{query} failed: {e}"))
}

type SqlQ<'a> = sqlx::query::QueryScalar<'a, sqlx::Postgres, Value, sqlx::postgres::PgArguments>;

async fn consume_sql(
    pool: &PgPool,
    request_id: Uuid,
    user: Uuid,
    amount: i64,
    operation_type: &str,
    metadata: Value,
) -> Value {
    sql(
        pool,
        "SELECT public.consume_tokens_atomic($1, $2, $3, $4, $5)",
        |q| {
            q.bind(request_id)
                .bind(user)
                .bind(amount)
                .bind(operation_type.to_string())
                .bind(metadata)
        },
    )
    .await
}

async fn add_tokens_sql(pool: &PgPool, user: Uuid, amount: i64, request_id: Option<Uuid>) -> Value {
    sql(
        pool,
        "SELECT public.add_tokens($1, $2, 'top-up', '{}'::jsonb, $3)",
        |q| q.bind(user).bind(amount).bind(request_id),
    )
    .await
}

async fn stored(pool: &PgPool, request_id: Uuid) -> Option<(String, Option<String>)> {
    sqlx::query_as::<_, (String, Option<String>)>(
        "SELECT status, reason FROM public.ledger_requests WHERE request_id = $1",
    )
    .bind(request_id)
    .fetch_optional(pool)
    .await
    .expect("read ledger_requests")
}

async fn history_kinds(pool: &PgPool, user: Uuid) -> Vec<(String, i64, i64, i64)> {
    sqlx::query_as::<_, (String, i64, i64, i64)>(
        "SELECT kind, amount, balance_after, held_after FROM public.token_balance_history \
         WHERE user_id = $1 ORDER BY id",
    )
    .bind(user)
    .fetch_all(pool)
    .await
    .expect("read history")
}

// ---------------------------------------------------------------------------------------------
// Seed test plan
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn consumption_is_deducted_and_recorded_in_history() {
    let env = TestEnv::new().await;
    let l = ledger(&env);
    let user = uid();
    let g = apply_one(&l, grant(rid(), user, 100)).await;
    assert_eq!(g.status, OutcomeStatus::Granted);
    assert_eq!(g.balance, Some(100));

    let r = rid();
    let c = apply_one(&l, consume(r, user, 30)).await;
    assert_eq!(c.status, OutcomeStatus::Consumed);
    assert_eq!(c.balance, Some(70));
    assert_eq!(c.held, Some(0));

    let acct = l.balance(user).await.unwrap().expect("account exists");
    assert_eq!((acct.balance, acct.held), (70, 0));
    assert_eq!(acct.lifetime_granted, 100);
    assert_eq!(acct.lifetime_consumed, 30);

    let h = l.history(user, 10).await.unwrap();
    assert_eq!(h.len(), 2);
    assert_eq!(h[0].kind, "consume");
    assert_eq!(h[0].request_id, r.0);
    assert_eq!(h[0].amount, 30);
    assert_eq!(h[0].balance_after, 70);
    assert_eq!(h[0].operation_type.as_deref(), Some("chat"));
    assert_eq!(h[0].metadata, json!({"model": "test"}));
    assert_eq!(h[1].kind, "grant");

    // The SQL door deducts and records the same way.
    let r2 = Uuid::new_v4();
    let v = consume_sql(&env.pool, r2, user.0, 5, "summary", json!({"k": "v"})).await;
    assert_eq!(v["success"], json!(true));
    assert_eq!(v["status"], json!("consumed"));
    assert_eq!(v["balance"], json!(65));
    let kinds = history_kinds(&env.pool, user.0).await;
    assert_eq!(kinds.last(), Some(&("consume".to_string(), 5, 65, 0)));
    assert_eq!(
        l.outcome(RequestId(r2)).await.unwrap().map(|o| o.status),
        Some(OutcomeStatus::Consumed)
    );
}

#[tokio::test]
async fn same_request_id_twice_debits_once_with_the_same_outcome() {
    let env = TestEnv::new().await;
    let l = ledger(&env);
    let user = uid();
    apply_one(&l, grant(rid(), user, 50)).await;

    // Queue door: twice in separate batches and twice inside one batch.
    let r = rid();
    let first = apply_one(&l, consume(r, user, 10)).await;
    let again = apply_one(&l, consume(r, user, 10)).await;
    assert_eq!(first, again);
    let r2 = rid();
    let same_batch = l
        .apply(&[consume(r2, user, 7), consume(r2, user, 7)])
        .await
        .unwrap();
    assert_eq!(same_batch[0], same_batch[1]);
    assert_eq!(same_batch[0].balance, Some(33));
    assert_eq!(env.account(user.0).await, Some((33, 0)));

    // SQL door: same.
    let r3 = Uuid::new_v4();
    let a = consume_sql(&env.pool, r3, user.0, 3, "chat", json!({})).await;
    let b = consume_sql(&env.pool, r3, user.0, 3, "chat", json!({})).await;
    assert_eq!(a, b);
    assert_eq!(a["balance"], json!(30));
    assert_eq!(env.account(user.0).await, Some((30, 0)));
    let consumes = history_kinds(&env.pool, user.0)
        .await
        .into_iter()
        .filter(|h| h.0 == "consume")
        .count();
    assert_eq!(consumes, 3, "three distinct request ids, three debits");

    // A grant with a request id is idempotent too; without one it is not.
    let g = Uuid::new_v4();
    add_tokens_sql(&env.pool, user.0, 10, Some(g)).await;
    add_tokens_sql(&env.pool, user.0, 10, Some(g)).await;
    assert_eq!(env.account(user.0).await, Some((40, 0)));
    add_tokens_sql(&env.pool, user.0, 10, None).await;
    add_tokens_sql(&env.pool, user.0, 10, None).await;
    assert_eq!(env.account(user.0).await, Some((60, 0)));
}

#[tokio::test]
async fn zero_balance_gives_insufficient_tokens_and_the_failure_is_final() {
    let env = TestEnv::new().await;
    let l = ledger(&env);
    let user = uid();
    apply_one(&l, grant(rid(), user, 5)).await;
    apply_one(&l, consume(rid(), user, 5)).await;

    let r = rid();
    let o = apply_one(&l, consume(r, user, 1)).await;
    assert_eq!(o.status, OutcomeStatus::InsufficientTokens);
    assert_eq!(o.balance, Some(0));
    let v = consume_sql(&env.pool, Uuid::new_v4(), user.0, 1, "chat", json!({})).await;
    assert_eq!(v["success"], json!(false));
    assert_eq!(v["error"], json!("insufficient_tokens"));

    // id_already_failed: after a top-up, the same id still answers insufficient_tokens.
    apply_one(&l, grant(rid(), user, 10)).await;
    let retry = apply_one(&l, consume(r, user, 1)).await;
    assert_eq!(retry, o);
    assert_eq!(env.account(user.0).await, Some((10, 0)));
    assert_eq!(
        stored(&env.pool, r.0).await.map(|s| s.0).as_deref(),
        Some("insufficient_tokens")
    );
    // A new id succeeds.
    let fresh = apply_one(&l, consume(rid(), user, 1)).await;
    assert_eq!(fresh.status, OutcomeStatus::Consumed);
}

#[tokio::test]
async fn unknown_user_consume_is_insufficient_tokens_without_an_account() {
    let env = TestEnv::new().await;
    let l = ledger(&env);
    let user = uid();
    let o = apply_one(&l, consume(rid(), user, 1)).await;
    assert_eq!(o.status, OutcomeStatus::InsufficientTokens);
    assert_eq!(o.balance, Some(0));
    let h = apply_one(&l, hold(rid(), user, 1, 60)).await;
    assert_eq!(h.status, OutcomeStatus::InsufficientTokens);
    let v = consume_sql(&env.pool, Uuid::new_v4(), user.0, 1, "chat", json!({})).await;
    assert_eq!(v["error"], json!("insufficient_tokens"));
    assert_eq!(env.account(user.0).await, None);
    assert!(l.balance(user).await.unwrap().is_none());
}

#[tokio::test]
async fn same_id_with_different_fields_is_a_conflict_and_not_stored() {
    let env = TestEnv::new().await;
    let l = ledger(&env);
    let user = uid();
    apply_one(&l, grant(rid(), user, 100)).await;
    let r = rid();
    let first = apply_one(&l, consume(r, user, 10)).await;
    assert_eq!(first.status, OutcomeStatus::Consumed);

    let other_amount = apply_one(&l, consume(r, user, 11)).await;
    assert_eq!(other_amount.status, OutcomeStatus::RequestIdConflict);
    let other_kind = apply_one(&l, grant(r, user, 10)).await;
    assert_eq!(other_kind.status, OutcomeStatus::RequestIdConflict);
    let v = consume_sql(&env.pool, r.0, user.0, 10, "other-op", json!({})).await;
    assert_eq!(v["error"], json!("request_id_conflict"));
    // Conflict inside one batch, first occurrence new.
    let r2 = rid();
    let batch = l
        .apply(&[consume(r2, user, 1), consume(r2, user, 2)])
        .await
        .unwrap();
    assert_eq!(batch[0].status, OutcomeStatus::Consumed);
    assert_eq!(batch[1].status, OutcomeStatus::RequestIdConflict);

    // The original outcome stands, nothing else moved.
    assert_eq!(l.outcome(r).await.unwrap(), Some(first.clone()));
    assert_eq!(apply_one(&l, consume(r, user, 10)).await, first);
    assert_eq!(env.account(user.0).await, Some((89, 0)));
}

// ---------------------------------------------------------------------------------------------
// Concurrency (seed test plan 3)
// ---------------------------------------------------------------------------------------------

async fn concurrent_sql_consumptions(pool: &PgPool, user: Uuid, n: usize) -> usize {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            consume_sql(&pool, Uuid::new_v4(), user, 1, "chat", json!({})).await
        }));
    }
    let mut consumed = 0;
    for t in tasks {
        let v = t.await.expect("task");
        match v["status"].as_str() {
            Some("consumed") => consumed += 1,
            Some("insufficient_tokens") => {}
            other => panic!("unexpected outcome {other:?}: {v}"),
        }
        assert!(v["balance"].as_i64().expect("balance") >= 0);
    }
    consumed
}

#[tokio::test]
async fn concurrent_consumptions_end_with_the_exact_balance() {
    let env = TestEnv::new().await;
    let l = ledger(&env);

    // SQL door, many connections: 10, then 1,000 (more than the balance allows).
    let user = uid();
    apply_one(&l, grant(rid(), user, 600)).await;
    assert_eq!(concurrent_sql_consumptions(&env.pool, user.0, 10).await, 10);
    assert_eq!(env.account(user.0).await, Some((590, 0)));
    let consumed = concurrent_sql_consumptions(&env.pool, user.0, 1000).await;
    assert_eq!(consumed, 590);
    assert_eq!(env.account(user.0).await, Some((0, 0)));

    // Queue door: 40 concurrent Ledger::apply batches of 25 on one hot user, plus the SQL
    // door at the same time.
    let user2 = uid();
    apply_one(&l, grant(rid(), user2, 1500)).await;
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let l = l.clone();
        tasks.push(tokio::spawn(async move {
            let ops: Vec<LedgerOp> = (0..25).map(|_| consume(rid(), user2, 2)).collect();
            let out = l.apply(&ops).await.expect("apply");
            out.iter()
                .filter(|o| o.status == OutcomeStatus::Consumed)
                .count()
                * 2
        }));
    }
    let sql_side = {
        let pool = env.pool.clone();
        tokio::spawn(async move { concurrent_sql_consumptions(&pool, user2.0, 200).await })
    };
    let mut spent = 0usize;
    for t in tasks {
        spent += t.await.expect("task");
    }
    spent += sql_side.await.expect("sql task");
    let (balance, held) = env.account(user2.0).await.expect("account");
    assert_eq!(held, 0);
    assert_eq!(balance, 1500 - spent as i64);
    assert!(
        balance <= 1,
        "2,200 requested for 1,500: only a remainder < 2 can be left"
    );

    // History agrees with the account, and never went negative.
    for u in [user.0, user2.0] {
        let (n_neg, sum_consumed): (i64, Option<i64>) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE balance_after < 0), \
             sum(amount) FILTER (WHERE kind = 'consume')::bigint \
             FROM public.token_balance_history WHERE user_id = $1",
        )
        .bind(u)
        .fetch_one(&env.pool)
        .await
        .unwrap();
        assert_eq!(n_neg, 0);
        let acct = l.balance(UserId(u)).await.unwrap().unwrap();
        assert_eq!(sum_consumed, Some(acct.lifetime_consumed));
        assert_eq!(acct.lifetime_granted - acct.lifetime_consumed, acct.balance);
    }
}

#[tokio::test]
async fn concurrent_batches_over_many_users_do_not_deadlock() {
    let env = TestEnv::new().await;
    let l = ledger(&env);
    let users: Vec<UserId> = (0..50).map(|_| uid()).collect();
    let grants: Vec<LedgerOp> = users.iter().map(|u| grant(rid(), *u, 100)).collect();
    l.apply(&grants).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let l = l.clone();
        let users = users.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(t);
            // Users in a random order per batch: the function must lock in a fixed order.
            let ops: Vec<LedgerOp> = (0..200)
                .map(|_| consume(rid(), users[rng.random_range(0..users.len())], 1))
                .collect();
            l.apply(&ops).await.expect("apply without deadlock errors")
        }));
    }
    let mut consumed: HashMap<Uuid, i64> = HashMap::new();
    for t in tasks {
        for (o, _) in t.await.unwrap().iter().zip(0..) {
            if o.status == OutcomeStatus::Consumed {
                let u = sqlx::query_scalar::<_, Uuid>(
                    "SELECT user_id FROM public.ledger_requests WHERE request_id = $1",
                )
                .bind(o.request_id.0)
                .fetch_one(&env.pool)
                .await
                .unwrap();
                *consumed.entry(u).or_default() += 1;
            }
        }
    }
    for u in &users {
        let spent = consumed.get(&u.0).copied().unwrap_or(0);
        assert_eq!(env.account(u.0).await, Some((100 - spent, 0)));
    }
}

/// A new user's first grant racing with a consume of the same user: the consume's lock query
/// cannot see the account row the uncommitted grant inserted, so the consume reads an empty
/// account. If the grant commits before the consume batch writes its accounts, the batch must
/// not write its empty view over the granted row (the grant would be lost).
#[tokio::test]
async fn first_grants_racing_with_consumes_are_never_lost() {
    let env = TestEnv::new().await;
    let l = ledger(&env);
    const USERS: usize = 1500;
    const ROUND: usize = 50;
    const GRANT: i64 = 100;
    const SPEND: i64 = 10;
    let users: Vec<UserId> = (0..USERS).map(|_| uid()).collect();
    let mut grant_out: HashMap<Uuid, Value> = HashMap::new();
    let mut consume_out: HashMap<Uuid, OutcomeStatus> = HashMap::new();
    for chunk in users.chunks(ROUND) {
        // The grants: one SQL-door call per user, each its own transaction on its own
        // connection, started together with the consume batch of the same users.
        let grants = futures::future::join_all(chunk.iter().map(|u| {
            let pool = env.pool.clone();
            let u = u.0;
            tokio::spawn(async move { (u, add_tokens_sql(&pool, u, GRANT, None).await) })
        }));
        let ops: Vec<LedgerOp> = chunk.iter().map(|u| consume(rid(), *u, SPEND)).collect();
        let l2 = l.clone();
        let consumes = tokio::spawn(async move {
            let out = l2.apply(&ops).await.expect("consume batch");
            (ops, out)
        });
        let (grants, consumes) = tokio::join!(grants, consumes);
        for g in grants {
            let (u, v) = g.expect("grant task");
            grant_out.insert(u, v);
        }
        let (ops, out) = consumes.expect("consume task");
        for (op, o) in ops.iter().zip(out) {
            let LedgerOp::Consume { user_id, .. } = op else {
                unreachable!()
            };
            consume_out.insert(user_id.0, o.status);
        }
    }
    let rows = sqlx::query_as::<_, (Uuid, i64, i64, i64, i64, i64, i64)>(
        "SELECT c.user_id, c.balance, c.held, c.lifetime_granted, c.lifetime_consumed,                 coalesce(sum(h.amount) FILTER (WHERE h.kind = 'grant'), 0)::bigint,                 coalesce(sum(h.amount) FILTER (WHERE h.kind = 'consume'), 0)::bigint            FROM public.credit_accounts c            LEFT JOIN public.token_balance_history h ON h.user_id = c.user_id           WHERE c.user_id = ANY ($1)           GROUP BY c.user_id, c.balance, c.held, c.lifetime_granted, c.lifetime_consumed",
    )
    .bind(users.iter().map(|u| u.0).collect::<Vec<_>>())
    .fetch_all(&env.pool)
    .await
    .expect("read accounts");
    assert_eq!(rows.len(), USERS, "every granted user has an account");
    let mut consumed = 0;
    let mut lost = Vec::new();
    for (u, balance, held, granted, spent, hist_granted, hist_spent) in rows {
        let g = &grant_out[&u];
        assert_eq!(g["success"], json!(true), "grant of {u}: {g}");
        let c = consume_out[&u];
        if granted != hist_granted || balance != hist_granted - hist_spent {
            lost.push(u);
            continue;
        }
        assert_eq!(hist_granted, GRANT, "{u}: one grant in history");
        assert_eq!(held, 0);
        assert_eq!(spent, hist_spent, "{u}: lifetime_consumed = history");
        match c {
            OutcomeStatus::Consumed => {
                consumed += 1;
                assert_eq!((balance, hist_spent), (GRANT - SPEND, SPEND), "{u}");
            }
            OutcomeStatus::InsufficientTokens => {
                assert_eq!((balance, hist_spent), (GRANT, 0), "{u}");
            }
            other => panic!("consume of {u}: unexpected {other:?}"),
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {USERS} users lost their grant (e.g. {:?})",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    eprintln!("{consumed} of {USERS} consumes ran after their grant");
}

/// NUL cannot be stored in Postgres text: the SQL door refuses it before the function runs
/// (nothing stored), and in the worker's batcher one such op fails alone while the rest of its
/// batch is applied (the queue's parser rejects NUL earlier; this is the second line).
#[tokio::test]
async fn a_nul_label_fails_alone_and_the_rest_of_its_batch_is_applied() {
    use std::sync::Arc;
    use tokenwarden::ledger::batcher::{ApplyBatch, Batcher};
    let env = TestEnv::new().await;
    let l = ledger(&env);
    let user = uid();
    apply_one(&l, grant(rid(), user, 1000)).await;

    let bad_rid = Uuid::new_v4();
    let err = sqlx::query_scalar::<_, Value>(
        "SELECT public.consume_tokens_atomic($1, $2, 1, $3, '{}'::jsonb)",
    )
    .bind(bad_rid)
    .bind(user.0)
    .bind("chat\u{0}x")
    .fetch_one(&env.pool)
    .await
    .expect_err("Postgres text cannot hold NUL");
    let code = err
        .as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.to_string());
    assert_eq!(code.as_deref(), Some("22021"), "{err}");
    assert_eq!(stored(&env.pool, bad_rid).await, None);

    let ledger_arc: Arc<dyn ApplyBatch> = Arc::new(l.clone());
    let (batcher, _task) = Batcher::spawn(ledger_arc, 100);
    let mut ops: Vec<LedgerOp> = (0..20).map(|_| consume(rid(), user, 1)).collect();
    let LedgerOp::Consume { operation_type, .. } = &mut ops[7] else {
        unreachable!()
    };
    *operation_type = "bad\u{0}".into();
    let results = futures::future::join_all(ops.iter().cloned().map(|op| {
        let b = batcher.clone();
        async move { b.apply(op).await }
    }))
    .await;
    for (i, r) in results.iter().enumerate() {
        if i == 7 {
            let e = r.as_ref().expect_err("the NUL op fails");
            assert!(e.bad_data, "{e:?}");
        } else {
            let o = r
                .as_ref()
                .unwrap_or_else(|e| panic!("op {i} failed with the bad one: {e:?}"));
            assert_eq!(o.status, OutcomeStatus::Consumed, "op {i}");
        }
    }
    assert_eq!(env.account(user.0).await, Some((1000 - 19, 0)));
}

// ---------------------------------------------------------------------------------------------
// Holds
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn settling_part_of_a_hold_returns_the_rest() {
    let env = TestEnv::new().await;
    let l = ledger(&env);
    let user = uid();
    apply_one(&l, grant(rid(), user, 100)).await;
    let h = rid();
    let o = apply_one(&l, hold(h, user, 40, 600)).await;
    assert_eq!(o.status, OutcomeStatus::Held);
    assert_eq!((o.balance, o.held), (Some(60), Some(40)));
    // A consume sees only the available balance.
    let c = apply_one(&l, consume(rid(), user, 61)).await;
    assert_eq!(c.status, OutcomeStatus::InsufficientTokens);

    let too_much = apply_one(&l, settle(rid(), h, 41)).await;
    assert_eq!(too_much.status, OutcomeStatus::Rejected);
    assert!(too_much.reason.unwrap().contains("more than"));

    let s = apply_one(&l, settle(rid(), h, 25)).await;
    assert_eq!(s.status, OutcomeStatus::Settled);
    assert_eq!((s.balance, s.held), (Some(75), Some(0)));
    let again = apply_one(&l, settle(rid(), h, 1)).await;
    assert_eq!(again.status, OutcomeStatus::HoldAlreadyResolved);
    let rel = apply_one(&l, release(rid(), h)).await;
    assert_eq!(rel.status, OutcomeStatus::HoldAlreadyResolved);
    let nf = apply_one(&l, settle(rid(), rid(), 1)).await;
    assert_eq!(nf.status, OutcomeStatus::HoldNotFound);

    let acct = l.balance(user).await.unwrap().unwrap();
    assert_eq!(
        (acct.balance, acct.held, acct.lifetime_consumed),
        (75, 0, 25)
    );
    let (status, settled): (String, Option<i64>) = sqlx::query_as(
        "SELECT status, settled_amount FROM public.token_consumption_locks WHERE hold_id = $1",
    )
    .bind(h.0)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!((status.as_str(), settled), ("settled", Some(25)));
    let kinds: Vec<String> = history_kinds(&env.pool, user.0)
        .await
        .into_iter()
        .map(|h| h.0)
        .collect();
    assert_eq!(kinds, ["grant", "hold", "settle"]);
}

#[tokio::test]
async fn releasing_a_hold_returns_everything_through_both_doors() {
    let env = TestEnv::new().await;
    let l = ledger(&env);
    let user = uid();
    apply_one(&l, grant(rid(), user, 100)).await;
    let h = rid();
    apply_one(&l, hold(h, user, 30, 600)).await;
    let o = apply_one(&l, release(rid(), h)).await;
    assert_eq!(o.status, OutcomeStatus::Released);
    assert_eq!((o.balance, o.held), (Some(100), Some(0)));

    // SQL door: hold, settle and release functions.
    let h2 = Uuid::new_v4();
    let v = sql(
        &env.pool,
        "SELECT public.hold_tokens($1, $2, 20, 'video', 600, '{}'::jsonb)",
        |q| q.bind(h2).bind(user.0),
    )
    .await;
    assert_eq!(v["status"], json!("held"));
    assert_eq!(v["hold_id"], json!(h2));
    assert_eq!(
        (v["balance"].as_i64(), v["held"].as_i64()),
        (Some(80), Some(20))
    );
    let v = sql(
        &env.pool,
        "SELECT public.release_hold($1, $2, '{}'::jsonb)",
        |q| q.bind(Uuid::new_v4()).bind(h2),
    )
    .await;
    assert_eq!(v["status"], json!("released"));
    assert_eq!(v["balance"], json!(100));
    let h3 = Uuid::new_v4();
    sql(
        &env.pool,
        "SELECT public.hold_tokens($1, $2, 20, 'video')",
        |q| q.bind(h3).bind(user.0),
    )
    .await;
    let v = sql(&env.pool, "SELECT public.settle_hold($1, $2, 5)", |q| {
        q.bind(Uuid::new_v4()).bind(h3)
    })
    .await;
    assert_eq!(v["status"], json!("settled"));
    assert_eq!(
        (v["balance"].as_i64(), v["held"].as_i64()),
        (Some(95), Some(0))
    );
}

async fn wait_until_expired(pool: &PgPool, hold_id: Uuid) {
    let pool = pool.clone();
    common::wait_until(Duration::from_secs(10), "hold past its expiry", || {
        let pool = pool.clone();
        async move {
            let past: bool = sqlx::query_scalar(
                "SELECT clock_timestamp() > expires_at FROM public.token_consumption_locks \
                 WHERE hold_id = $1",
            )
            .bind(hold_id)
            .fetch_one(&pool)
            .await
            .unwrap();
            past.then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn an_expired_hold_cannot_be_settled() {
    let env = TestEnv::new().await;
    let l = ledger(&env);
    let user = uid();
    apply_one(&l, grant(rid(), user, 100)).await;
    let h = rid();
    apply_one(&l, hold(h, user, 40, 1)).await;
    wait_until_expired(&env.pool, h.0).await;

    let s = apply_one(&l, settle(rid(), h, 10)).await;
    assert_eq!(s.status, OutcomeStatus::HoldExpired);
    assert_eq!((s.balance, s.held), (Some(100), Some(0)));
    // Expired now, for every later attempt.
    let r = apply_one(&l, release(rid(), h)).await;
    assert_eq!(r.status, OutcomeStatus::HoldExpired);
    assert_eq!(l.cleanup_expired_locks().await.unwrap(), 0);
    let kinds: Vec<String> = history_kinds(&env.pool, user.0)
        .await
        .into_iter()
        .map(|h| h.0)
        .collect();
    assert_eq!(kinds, ["grant", "hold", "expire"]);
    assert_eq!(env.account(user.0).await, Some((100, 0)));
}

#[tokio::test]
async fn cleanup_expired_locks_returns_tokens_with_history_rows() {
    let env = TestEnv::new().await;
    let l = ledger(&env);
    let (u1, u2) = (uid(), uid());
    l.apply(&[grant(rid(), u1, 100), grant(rid(), u2, 100)])
        .await
        .unwrap();
    let (h1, h2, h3, keep) = (rid(), rid(), rid(), rid());
    let out = l
        .apply(&[
            hold(h1, u1, 10, 1),
            hold(h2, u1, 20, 1),
            hold(h3, u2, 30, 1),
            hold(keep, u2, 5, 3600),
        ])
        .await
        .unwrap();
    assert!(out.iter().all(|o| o.status == OutcomeStatus::Held));
    assert_eq!(env.account(u1.0).await, Some((70, 30)));
    for h in [h1, h2, h3] {
        wait_until_expired(&env.pool, h.0).await;
    }

    assert_eq!(l.cleanup_expired_locks().await.unwrap(), 3);
    assert_eq!(env.account(u1.0).await, Some((100, 0)));
    assert_eq!(env.account(u2.0).await, Some((95, 5)));
    let hist = history_kinds(&env.pool, u1.0).await;
    let expires: Vec<_> = hist.iter().filter(|h| h.0 == "expire").collect();
    assert_eq!(expires.len(), 2);
    // Running balances are consistent row by row.
    assert_eq!(expires.last().map(|h| (h.2, h.3)), Some((100, 0)));
    assert_eq!(expires[0].2 + expires[1].1, expires[1].2);
    let statuses: Vec<String> =
        sqlx::query_scalar("SELECT status FROM public.token_consumption_locks ORDER BY amount")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(statuses, ["held", "expired", "expired", "expired"]);
    // Swept holds answer hold_expired.
    let s = apply_one(&l, settle(rid(), h1, 1)).await;
    assert_eq!(s.status, OutcomeStatus::HoldExpired);
    // The SQL function gives the count too (nothing left).
    let n: i32 = sqlx::query_scalar("SELECT public.cleanup_expired_locks()")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(n, 0);
}

// ---------------------------------------------------------------------------------------------
// Bad input, rate limiting
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn bad_input_through_the_sql_door_is_rejected_with_a_stored_reason() {
    let env = TestEnv::new().await;
    let l = ledger(&env);
    let user = uid();
    apply_one(&l, grant(rid(), user, 100)).await;
    let big = json!({"blob": "x".repeat(5000)});
    let long_op = "o".repeat(101);
    let cases: Vec<(i64, &str, Value, &str)> = vec![
        (0, "chat", json!({}), "amount must be a positive integer"),
        (-5, "chat", json!({}), "amount must be a positive integer"),
        (1, "", json!({}), "operation_type must be 1 to 100"),
        (1, &long_op, json!({}), "operation_type must be 1 to 100"),
        (1, "chat", big, "metadata is"),
        (1, "chat", json!([1, 2]), "metadata must be a JSON object"),
    ];
    for (amount, op, meta, why) in cases {
        let r = Uuid::new_v4();
        let v = consume_sql(&env.pool, r, user.0, amount, op, meta.clone()).await;
        assert_eq!(v["status"], json!("rejected"), "{amount} {op:?}: {v}");
        assert_eq!(v["success"], json!(false));
        let reason = v["reason"].as_str().unwrap_or_default().to_string();
        assert!(reason.contains(why), "reason {reason:?} should say {why:?}");
        let (status, stored_reason) = stored(&env.pool, r).await.expect("stored");
        assert_eq!(status, "rejected");
        assert_eq!(stored_reason.as_deref(), Some(reason.as_str()));
        // Retrying the same bad request gives the same stored answer.
        assert_eq!(consume_sql(&env.pool, r, user.0, amount, op, meta).await, v);
    }
    // Grants and holds are validated too.
    let v = sql(
        &env.pool,
        "SELECT public.add_tokens($1, 10, '', '{}'::jsonb, $2)",
        |q| q.bind(user.0).bind(Uuid::new_v4()),
    )
    .await;
    assert_eq!(v["status"], json!("rejected"));
    let v = sql(
        &env.pool,
        "SELECT public.hold_tokens($1, $2, 10, 'x', 0)",
        |q| q.bind(Uuid::new_v4()).bind(user.0),
    )
    .await;
    assert_eq!(v["status"], json!("rejected"));
    assert!(v["reason"].as_str().unwrap().contains("ttl_secs"));
    let v = sql(
        &env.pool,
        "SELECT public.consume_tokens_atomic(NULL, $1, 1, 'chat', '{}'::jsonb)",
        |q| q.bind(user.0),
    )
    .await;
    assert_eq!(v["status"], json!("rejected"));
    // Metadata over the configured limit through Ledger::apply.
    let o = apply_one(
        &l,
        LedgerOp::Consume {
            request_id: rid(),
            user_id: user,
            amount: credits(1),
            operation_type: "chat".into(),
            metadata: json!({"blob": "y".repeat(5000)}),
        },
    )
    .await;
    assert_eq!(o.status, OutcomeStatus::Rejected);
    // Nothing was debited.
    assert_eq!(env.account(user.0).await, Some((100, 0)));
}

// ---------------------------------------------------------------------------------------------
// Bounds: owned by SQL (tw_ledger_settings), the same through both doors
// ---------------------------------------------------------------------------------------------

/// `tokenwarden enqueue <job_type> <payload> --wait`: the queue door as a caller sees it.
fn enqueue_and_wait(env: &TestEnv, job_type: &str, payload: &Value) -> Value {
    let out = env.cli(&["enqueue", job_type, &payload.to_string(), "--wait", "60000"]);
    assert!(out.ok, "enqueue {job_type} failed: {}", out.stderr);
    serde_json::from_str(&out.stdout).expect("enqueue --wait prints the JSON reply")
}

/// The lifetime (seconds) and stored ttl_secs of hold `hold_id`.
async fn hold_lifetime(pool: &PgPool, hold_id: Uuid) -> (f64, Option<i32>) {
    sqlx::query_as::<_, (f64, Option<i32>)>(
        "SELECT extract(epoch FROM l.expires_at - l.created_at)::float8, r.ttl_secs \
         FROM public.token_consumption_locks l \
         JOIN public.ledger_requests r ON r.request_id = l.hold_id WHERE l.hold_id = $1",
    )
    .bind(hold_id)
    .fetch_one(pool)
    .await
    .expect("read hold")
}

/// Changing `ledger.metadata_max_bytes`, `ledger.max_hold_ttl_secs` and
/// `ledger.default_hold_ttl_secs` changes them for BOTH doors: a worker started with them
/// (queue door) and `consume_tokens_atomic` / `hold_tokens` (SQL door) reject the same
/// oversized metadata and too-long hold with the same reason, accept the same metadata and hold
/// just within the bounds, and give a hold without ttl_secs the same default lifetime.
#[tokio::test]
async fn both_doors_enforce_the_configured_bounds() {
    let env = TestEnv::new().await;
    let user = Uuid::new_v4();
    add_tokens_sql(&env.pool, user, 1000, None).await;
    let _worker = common::Child::spawn(
        &env,
        &["run"],
        &[
            ("TOKENWARDEN__LEDGER__METADATA_MAX_BYTES", "200"),
            ("TOKENWARDEN__LEDGER__MAX_HOLD_TTL_SECS", "120"),
            ("TOKENWARDEN__LEDGER__DEFAULT_HOLD_TTL_SECS", "60"),
        ],
    );
    // Metadata whose jsonb text (the measure: octet_length(metadata::text)) is 200 and 201
    // bytes. Its compact JSON is one byte shorter, so a door measuring that would disagree.
    let at_limit = json!({"blob": "x".repeat(188)});
    let over_limit = json!({"blob": "x".repeat(189)});
    for (m, bytes) in [(&at_limit, 200), (&over_limit, 201)] {
        let n: i32 = sqlx::query_scalar("SELECT octet_length($1::jsonb::text)")
            .bind(m)
            .fetch_one(&env.pool)
            .await
            .expect("measure metadata");
        assert_eq!(n, bytes);
    }
    let consume_job = |metadata: &Value| {
        json!({"request_id": Uuid::new_v4(), "user_id": user, "amount": 1,
               "operation_type": "chat", "metadata": metadata})
    };

    // The queue door first: its reply also says the worker has written its bounds.
    let queued = enqueue_and_wait(&env, "consume_tokens", &consume_job(&over_limit));
    let direct = consume_sql(
        &env.pool,
        Uuid::new_v4(),
        user,
        1,
        "chat",
        over_limit.clone(),
    )
    .await;
    assert_eq!(queued["status"], json!("rejected"), "{queued}");
    assert_eq!(direct["status"], json!("rejected"), "{direct}");
    assert_eq!(
        queued["reason"],
        json!("metadata is 201 bytes, more than the limit of 200 bytes")
    );
    assert_eq!(queued["reason"], direct["reason"]);

    let queued = enqueue_and_wait(&env, "consume_tokens", &consume_job(&at_limit));
    let direct = consume_sql(&env.pool, Uuid::new_v4(), user, 1, "chat", at_limit.clone()).await;
    assert_eq!(queued["status"], json!("consumed"), "{queued}");
    assert_eq!(direct["status"], json!("consumed"), "{direct}");

    let hold_job = |request_id: Uuid, ttl_secs: Option<i32>| {
        let mut p = json!({"request_id": request_id, "user_id": user, "amount": 1,
                           "operation_type": "image"});
        if let Some(t) = ttl_secs {
            p["ttl_secs"] = json!(t);
        }
        p
    };
    let hold_sql = |request_id: Uuid, ttl_secs: Option<i32>| {
        let pool = env.pool.clone();
        async move {
            sql(
                &pool,
                "SELECT public.hold_tokens($1, $2, 1, 'image', $3)",
                |q| q.bind(request_id).bind(user).bind(ttl_secs),
            )
            .await
        }
    };
    let queued = enqueue_and_wait(&env, "hold_tokens", &hold_job(Uuid::new_v4(), Some(121)));
    let direct = hold_sql(Uuid::new_v4(), Some(121)).await;
    assert_eq!(queued["status"], json!("rejected"), "{queued}");
    assert_eq!(direct["status"], json!("rejected"), "{direct}");
    assert_eq!(
        queued["reason"],
        json!("ttl_secs must be between 1 and 120")
    );
    assert_eq!(queued["reason"], direct["reason"]);

    let (q_hold, s_hold) = (Uuid::new_v4(), Uuid::new_v4());
    let queued = enqueue_and_wait(&env, "hold_tokens", &hold_job(q_hold, Some(120)));
    let direct = hold_sql(s_hold, Some(120)).await;
    assert_eq!(queued["status"], json!("held"), "{queued}");
    assert_eq!(direct["status"], json!("held"), "{direct}");
    assert_eq!(hold_lifetime(&env.pool, q_hold).await, (120.0, Some(120)));
    assert_eq!(hold_lifetime(&env.pool, s_hold).await, (120.0, Some(120)));

    // No ttl_secs: both doors get the configured default, applied (and stored) by SQL.
    let (q_hold, s_hold) = (Uuid::new_v4(), Uuid::new_v4());
    let queued = enqueue_and_wait(&env, "hold_tokens", &hold_job(q_hold, None));
    let direct = sql(
        &env.pool,
        "SELECT public.hold_tokens($1, $2, 1, 'image')",
        |q| q.bind(s_hold).bind(user),
    )
    .await;
    assert_eq!(queued["status"], json!("held"), "{queued}");
    assert_eq!(direct["status"], json!("held"), "{direct}");
    assert_eq!(hold_lifetime(&env.pool, q_hold).await, (60.0, Some(60)));
    assert_eq!(hold_lifetime(&env.pool, s_hold).await, (60.0, Some(60)));
}

/// The length rules of operation_type (1..100 characters) and reason (1..200) are SQL's: the
/// queue door's job handler and the SQL door answer the same, with SQL's reason. (These
/// assertions were the payload parser's before the bounds moved to SQL.)
#[tokio::test]
async fn text_bounds_are_the_same_through_both_doors() {
    use std::sync::Arc;
    use tokenwarden::ledger::batcher::Batcher;
    use tokenwarden::ledger::jobs::{LedgerJob, LedgerJobKind};
    use tokenwarden::queue::{JobError, JobHandler};

    let env = TestEnv::new().await;
    let l = ledger(&env);
    let (batcher, _task) = Batcher::spawn(Arc::new(l.clone()), 10);
    let user = uid();
    apply_one(&l, grant(rid(), user, 100)).await;
    let op_reason = "operation_type must be 1 to 100 characters";
    let grant_reason = "reason must be 1 to 200 characters";
    let cases: Vec<(LedgerJobKind, &str, String, Option<&str>)> = vec![
        (
            LedgerJobKind::Consume,
            "operation_type",
            String::new(),
            Some(op_reason),
        ),
        (
            LedgerJobKind::Consume,
            "operation_type",
            "o".repeat(101),
            Some(op_reason),
        ),
        (
            LedgerJobKind::Consume,
            "operation_type",
            "o".repeat(100),
            None,
        ),
        (
            LedgerJobKind::Hold,
            "operation_type",
            String::new(),
            Some(op_reason),
        ),
        (
            LedgerJobKind::Hold,
            "operation_type",
            "é".repeat(101),
            Some(op_reason),
        ),
        (LedgerJobKind::Hold, "operation_type", "é".repeat(100), None),
        (
            LedgerJobKind::Grant,
            "reason",
            String::new(),
            Some(grant_reason),
        ),
        (
            LedgerJobKind::Grant,
            "reason",
            "r".repeat(201),
            Some(grant_reason),
        ),
        (LedgerJobKind::Grant, "reason", "r".repeat(200), None),
    ];
    for (kind, field, text, rejected) in cases {
        let job = json!({"request_id": Uuid::new_v4(), "user_id": user.0, "amount": 1,
                         field: text});
        let queued = LedgerJob::new(kind, batcher.clone()).handle(job).await;
        let direct = match kind {
            LedgerJobKind::Consume => {
                consume_sql(&env.pool, Uuid::new_v4(), user.0, 1, &text, json!({})).await
            }
            LedgerJobKind::Hold => {
                sql(&env.pool, "SELECT public.hold_tokens($1, $2, 1, $3)", |q| {
                    q.bind(Uuid::new_v4()).bind(user.0).bind(text.clone())
                })
                .await
            }
            _ => {
                sql(
                    &env.pool,
                    "SELECT public.add_tokens($1, 1, $2, '{}'::jsonb, $3)",
                    |q| q.bind(user.0).bind(text.clone()).bind(Uuid::new_v4()),
                )
                .await
            }
        };
        let n = text.chars().count();
        match rejected {
            Some(reason) => {
                assert!(
                    matches!(&queued, Err(JobError::Rejected(r)) if r == reason),
                    "{kind:?} {field} of {n} chars through the queue: {queued:?}"
                );
                assert_eq!(direct["status"], json!("rejected"), "{direct}");
                assert_eq!(direct["reason"], json!(reason));
            }
            None => {
                let queued = queued.unwrap_or_else(|e| panic!("{kind:?} {field} of {n}: {e}"));
                assert!(
                    OutcomeStatus::parse(queued["status"].as_str().unwrap())
                        .is_some_and(OutcomeStatus::is_success),
                    "{queued}"
                );
                assert_eq!(direct["success"], json!(true), "{direct}");
            }
        }
    }
}

#[tokio::test]
async fn an_open_block_anomaly_rate_limits_until_resolved() {
    let env = TestEnv::new().await;
    let l = ledger(&env);
    let user = uid();
    apply_one(&l, grant(rid(), user, 100)).await;
    let h_before = rid();
    apply_one(&l, hold(h_before, user, 10, 600)).await;
    sqlx::query(
        "INSERT INTO public.token_anomalies (user_id, rule, severity, window_start) \
         VALUES ($1, 'burst', 'warn', now()), ($1, 'burst', 'block', now() - interval '1 min')",
    )
    .bind(user.0)
    .execute(&env.pool)
    .await
    .unwrap();

    let r = rid();
    let c = apply_one(&l, consume(r, user, 1)).await;
    assert_eq!(c.status, OutcomeStatus::RateLimited);
    let h = apply_one(&l, hold(rid(), user, 1, 60)).await;
    assert_eq!(h.status, OutcomeStatus::RateLimited);
    let v = consume_sql(&env.pool, Uuid::new_v4(), user.0, 1, "chat", json!({})).await;
    assert_eq!(v["error"], json!("rate_limited"));
    // Grants and settling an existing hold still work.
    assert_eq!(
        apply_one(&l, grant(rid(), user, 5)).await.status,
        OutcomeStatus::Granted
    );
    assert_eq!(
        apply_one(&l, settle(rid(), h_before, 10)).await.status,
        OutcomeStatus::Settled
    );

    sqlx::query("UPDATE public.token_anomalies SET resolved_at = now() WHERE user_id = $1")
        .bind(user.0)
        .execute(&env.pool)
        .await
        .unwrap();
    assert_eq!(
        apply_one(&l, consume(rid(), user, 1)).await.status,
        OutcomeStatus::Consumed
    );
    // The rate-limited id keeps its stored outcome.
    assert_eq!(apply_one(&l, consume(r, user, 1)).await, c);
    assert_eq!(env.account(user.0).await, Some((94, 0)));
}

// ---------------------------------------------------------------------------------------------
// Row Level Security
// ---------------------------------------------------------------------------------------------

/// The ledger tables a signed-in user reads (their own rows). `ledger_requests` is not one of
/// them: it is read by request id from trusted server code, and users read their history.
const USER_TABLES: [&str; 4] = [
    "credit_accounts",
    "token_balance_history",
    "token_consumption_locks",
    "token_anomalies",
];

/// Whether `err` is PostgreSQL's "permission denied" (SQLSTATE 42501).
fn permission_denied(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(e) if e.code().as_deref() == Some("42501"))
}

#[tokio::test]
async fn rls_users_read_only_their_own_rows() {
    for kind in DbKind::ALL {
        rls_users_read_only_their_own_rows_on(TestEnv::on(kind).await).await;
    }
}

async fn rls_users_read_only_their_own_rows_on(env: TestEnv) {
    let l = ledger(&env);
    let (alice, bob) = (uid(), uid());
    for u in [alice, bob] {
        l.apply(&[
            grant(rid(), u, 100),
            consume(rid(), u, 1),
            hold(rid(), u, 2, 600),
        ])
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO public.token_anomalies (user_id, rule, severity, window_start) \
             VALUES ($1, 'burst', 'info', now())",
        )
        .bind(u.0)
        .execute(&env.pool)
        .await
        .unwrap();
    }

    for table in USER_TABLES {
        let mut tx = begin_as(&env.pool, "authenticated", Some(alice.0)).await;
        let users: Vec<Uuid> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT user_id FROM public.{table}"
        )))
        .fetch_all(&mut *tx)
        .await
        .unwrap();
        assert!(!users.is_empty(), "alice sees her rows in {table}");
        assert!(
            users.iter().all(|u| *u == alice.0),
            "alice sees only her rows in {table}"
        );
        tx.rollback().await.unwrap();
    }
    // anon reads no ledger table at all, and nobody but trusted server code reads the request
    // outcomes (a user-read policy there had no index: any user could scan every row).
    let all = USER_TABLES.iter().map(|t| ("anon", *t));
    for (role, table) in all.chain([
        ("anon", "ledger_requests"),
        ("authenticated", "ledger_requests"),
    ]) {
        let mut tx = begin_as(&env.pool, role, Some(alice.0)).await;
        let r = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM public.{table}"
        )))
        .fetch_one(&mut *tx)
        .await;
        match r {
            Err(e) => assert!(permission_denied(&e), "{role} on {table}: {e}"),
            Ok(_) => panic!("{:?}: {role} may read {table}", env.kind),
        }
        tx.rollback().await.unwrap();
    }

    // No writes, not even to one's own rows.
    let mut tx = begin_as(&env.pool, "authenticated", Some(alice.0)).await;
    let upd = sqlx::query("UPDATE public.credit_accounts SET balance = 1000000 WHERE user_id = $1")
        .bind(alice.0)
        .execute(&mut *tx)
        .await;
    assert!(upd.is_err(), "authenticated cannot UPDATE credit_accounts");
    tx.rollback().await.unwrap();
    let mut tx = begin_as(&env.pool, "authenticated", Some(alice.0)).await;
    let ins = sqlx::query(
        "INSERT INTO public.token_balance_history (user_id, request_id, kind, amount, \
         balance_after, held_after) VALUES ($1, $2, 'grant', 5, 5, 0)",
    )
    .bind(alice.0)
    .bind(Uuid::new_v4())
    .execute(&mut *tx)
    .await;
    assert!(ins.is_err(), "authenticated cannot INSERT history");
    tx.rollback().await.unwrap();
    // Nor call the ledger functions.
    let mut tx = begin_as(&env.pool, "authenticated", Some(alice.0)).await;
    let call = sqlx::query("SELECT public.add_tokens($1, 1000, 'free money')")
        .bind(alice.0)
        .execute(&mut *tx)
        .await;
    assert!(call.is_err(), "authenticated cannot EXECUTE add_tokens");
    tx.rollback().await.unwrap();
    // The service role can.
    let mut tx = begin_as(&env.pool, "service_role", None).await;
    let v: Value =
        sqlx::query_scalar("SELECT public.consume_tokens_atomic($1, $2, 1, 'chat', '{}'::jsonb)")
            .bind(Uuid::new_v4())
            .bind(alice.0)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    assert_eq!(v["status"], json!("consumed"));
    tx.commit().await.unwrap();
    assert_eq!(env.account(alice.0).await, Some((96, 2)));
}

// ---------------------------------------------------------------------------------------------
// CLI
// ---------------------------------------------------------------------------------------------

fn credits_cli(env: &TestEnv, args: &[&str]) -> (bool, String) {
    let out = env.cli(&[&["credits"], args].concat());
    (out.ok, out.text())
}

#[tokio::test]
async fn credits_cli_grants_idempotently_and_shows_balance_and_history() {
    let env = TestEnv::new().await;
    let user = Uuid::new_v4().to_string();
    let req = Uuid::new_v4().to_string();
    for _ in 0..2 {
        let (ok, out) = credits_cli(
            &env,
            &[
                "grant",
                &user,
                "40",
                "--reason",
                "welcome",
                "--request-id",
                &req,
            ],
        );
        assert!(ok, "grant failed: {out}");
        assert!(out.contains("granted 40"), "{out}");
    }
    let (ok, out) = credits_cli(&env, &["grant", &user, "0"]);
    assert!(!ok, "a zero grant must fail: {out}");
    assert!(out.contains("positive"), "{out}");

    let (ok, out) = credits_cli(&env, &["balance", &user]);
    assert!(ok, "{out}");
    let balance_line = out
        .lines()
        .find(|l| l.starts_with("balance"))
        .unwrap_or_default()
        .to_string();
    assert!(balance_line.ends_with(" 40"), "one grant applied: {out}");

    let (ok, out) = credits_cli(&env, &["history", &user, "--limit", "5"]);
    assert!(ok, "{out}");
    assert_eq!(
        out.lines().filter(|l| l.contains(" grant ")).count(),
        1,
        "{out}"
    );
    assert!(out.contains(&req), "{out}");

    let (ok, out) = credits_cli(&env, &["balance", &Uuid::new_v4().to_string()]);
    assert!(ok, "{out}");
    assert!(out.contains("no credits account"), "{out}");
}

// ---------------------------------------------------------------------------------------------
// Model-based: both doors agree with an in-memory model of the rules
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum HoldState {
    Held,
    Resolved,
}

#[derive(Default)]
struct Model {
    accounts: HashMap<Uuid, (i64, i64)>,
    holds: HashMap<Uuid, (Uuid, i64, HoldState)>,
    requests: HashMap<Uuid, (LedgerOp, Observed)>,
}

/// What the comparison looks at: status, balance and held (reasons are prose).
type Observed = (OutcomeStatus, Option<i64>, Option<i64>);

impl Model {
    fn apply(&mut self, op: &LedgerOp) -> Observed {
        let id = op.request_id().0;
        if let Some((first, out)) = self.requests.get(&id) {
            return if first == op {
                *out
            } else {
                (OutcomeStatus::RequestIdConflict, None, None)
            };
        }
        let out = self.decide(op);
        self.requests.insert(id, (op.clone(), out));
        out
    }

    fn decide(&mut self, op: &LedgerOp) -> Observed {
        use OutcomeStatus::*;
        match op {
            LedgerOp::Consume {
                user_id, amount, ..
            } => {
                let a = self.accounts.get(&user_id.0).copied().unwrap_or((0, 0));
                if a.0 < amount.get() {
                    return (InsufficientTokens, Some(a.0), Some(a.1));
                }
                let e = self.accounts.entry(user_id.0).or_default();
                e.0 -= amount.get();
                (Consumed, Some(e.0), Some(e.1))
            }
            LedgerOp::Grant {
                user_id, amount, ..
            } => {
                let e = self.accounts.entry(user_id.0).or_default();
                e.0 += amount.get();
                (Granted, Some(e.0), Some(e.1))
            }
            LedgerOp::Hold {
                request_id,
                user_id,
                amount,
                ..
            } => {
                let a = self.accounts.get(&user_id.0).copied().unwrap_or((0, 0));
                if a.0 < amount.get() {
                    return (InsufficientTokens, Some(a.0), Some(a.1));
                }
                let e = self.accounts.entry(user_id.0).or_default();
                e.0 -= amount.get();
                e.1 += amount.get();
                self.holds
                    .insert(request_id.0, (user_id.0, amount.get(), HoldState::Held));
                (Held, Some(e.0), Some(e.1))
            }
            LedgerOp::Settle {
                hold_id, amount, ..
            } => {
                let Some((user, held, state)) = self.holds.get(&hold_id.0).copied() else {
                    return (HoldNotFound, None, None);
                };
                let e = self.accounts.entry(user).or_default();
                if state == HoldState::Resolved {
                    return (HoldAlreadyResolved, Some(e.0), Some(e.1));
                }
                if amount.get() > held {
                    return (Rejected, Some(e.0), Some(e.1));
                }
                e.1 -= held;
                e.0 += held - amount.get();
                let out = (Settled, Some(e.0), Some(e.1));
                self.holds
                    .insert(hold_id.0, (user, held, HoldState::Resolved));
                out
            }
            LedgerOp::Release { hold_id, .. } => {
                let Some((user, held, state)) = self.holds.get(&hold_id.0).copied() else {
                    return (HoldNotFound, None, None);
                };
                let e = self.accounts.entry(user).or_default();
                if state == HoldState::Resolved {
                    return (HoldAlreadyResolved, Some(e.0), Some(e.1));
                }
                e.1 -= held;
                e.0 += held;
                let out = (Released, Some(e.0), Some(e.1));
                self.holds
                    .insert(hold_id.0, (user, held, HoldState::Resolved));
                out
            }
        }
    }
}

/// A seeded random sequence: several users (one never funded), all five kinds, repeats of
/// earlier ids with the same and with different fields, unknown holds, over-settles.
fn random_ops(seed: u64, n: usize) -> (Vec<LedgerOp>, Vec<UserId>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let users: Vec<UserId> = (0..4).map(|_| uid()).collect();
    let funded = &users[..3];
    let mut ops: Vec<LedgerOp> = Vec::with_capacity(n);
    let mut hold_ids: Vec<RequestId> = Vec::new();
    while ops.len() < n {
        let roll = rng.random_range(0..100);
        if roll < 12 && !ops.is_empty() {
            let again = ops[rng.random_range(0..ops.len())].clone();
            ops.push(again);
            continue;
        }
        if roll < 20 && !ops.is_empty() {
            let orig = ops[rng.random_range(0..ops.len())].clone();
            let changed = match orig {
                LedgerOp::Consume {
                    request_id,
                    user_id,
                    amount,
                    operation_type,
                    metadata,
                } => LedgerOp::Consume {
                    request_id,
                    user_id,
                    amount: credits(amount.get() + 1),
                    operation_type,
                    metadata,
                },
                LedgerOp::Grant {
                    request_id,
                    user_id,
                    amount,
                    ..
                } => consume(request_id, user_id, amount.get()),
                LedgerOp::Hold {
                    request_id,
                    user_id,
                    amount,
                    operation_type,
                    ttl_secs,
                    ..
                } => LedgerOp::Hold {
                    request_id,
                    user_id,
                    amount,
                    operation_type,
                    ttl_secs,
                    metadata: json!({"changed": true}),
                },
                LedgerOp::Settle {
                    request_id,
                    hold_id,
                    ..
                } => release(request_id, hold_id),
                LedgerOp::Release {
                    request_id,
                    hold_id,
                    ..
                } => settle(request_id, hold_id, 1),
            };
            ops.push(changed);
            continue;
        }
        let user = if rng.random_bool(0.1) {
            users[3]
        } else {
            funded[rng.random_range(0..funded.len())]
        };
        let op = match rng.random_range(0..100) {
            0..15 => grant(rid(), user, rng.random_range(10..80)),
            15..55 => LedgerOp::Consume {
                request_id: rid(),
                user_id: user,
                amount: credits(rng.random_range(1..30)),
                operation_type: format!("op{}", rng.random_range(0..3)),
                metadata: json!({"n": rng.random_range(0..5)}),
            },
            55..72 => {
                let h = rid();
                hold_ids.push(h);
                hold(h, user, rng.random_range(1..40), 3600)
            }
            72..90 => {
                let h = if hold_ids.is_empty() || rng.random_bool(0.1) {
                    rid()
                } else {
                    hold_ids[rng.random_range(0..hold_ids.len())]
                };
                settle(rid(), h, rng.random_range(1..45))
            }
            _ => {
                let h = if hold_ids.is_empty() || rng.random_bool(0.1) {
                    rid()
                } else {
                    hold_ids[rng.random_range(0..hold_ids.len())]
                };
                release(rid(), h)
            }
        };
        ops.push(op);
    }
    (ops, users)
}

async fn sql_door(pool: &PgPool, op: &LedgerOp) -> Observed {
    let v = match op {
        LedgerOp::Consume {
            request_id,
            user_id,
            amount,
            operation_type,
            metadata,
        } => {
            consume_sql(
                pool,
                request_id.0,
                user_id.0,
                amount.get(),
                operation_type,
                metadata.clone(),
            )
            .await
        }
        LedgerOp::Grant {
            request_id,
            user_id,
            amount,
            reason,
            metadata,
        } => {
            sql(pool, "SELECT public.add_tokens($1, $2, $3, $4, $5)", |q| {
                q.bind(user_id.0)
                    .bind(amount.get())
                    .bind(reason.clone())
                    .bind(metadata.clone())
                    .bind(request_id.0)
            })
            .await
        }
        LedgerOp::Hold {
            request_id,
            user_id,
            amount,
            operation_type,
            ttl_secs,
            metadata,
        } => {
            sql(
                pool,
                "SELECT public.hold_tokens($1, $2, $3, $4, $5, $6)",
                |q| {
                    q.bind(request_id.0)
                        .bind(user_id.0)
                        .bind(amount.get())
                        .bind(operation_type.clone())
                        .bind(*ttl_secs)
                        .bind(metadata.clone())
                },
            )
            .await
        }
        LedgerOp::Settle {
            request_id,
            hold_id,
            amount,
            metadata,
        } => {
            sql(pool, "SELECT public.settle_hold($1, $2, $3, $4)", |q| {
                q.bind(request_id.0)
                    .bind(hold_id.0)
                    .bind(amount.get())
                    .bind(metadata.clone())
            })
            .await
        }
        LedgerOp::Release {
            request_id,
            hold_id,
            metadata,
        } => {
            sql(pool, "SELECT public.release_hold($1, $2, $3)", |q| {
                q.bind(request_id.0).bind(hold_id.0).bind(metadata.clone())
            })
            .await
        }
    };
    let status = v["status"]
        .as_str()
        .and_then(OutcomeStatus::parse)
        .unwrap_or_else(|| panic!("bad status in {v}"));
    assert_eq!(v["success"].as_bool(), Some(status.is_success()));
    (status, v["balance"].as_i64(), v["held"].as_i64())
}

async fn final_balances(env: &TestEnv, users: &[UserId]) -> Vec<(i64, i64)> {
    let mut out = Vec::new();
    for u in users {
        out.push(env.account(u.0).await.unwrap_or((0, 0)));
    }
    out
}

#[tokio::test]
async fn model_based_both_doors_agree_with_the_model() {
    for seed in [7u64, 1234] {
        let (ops, users) = random_ops(seed, 400);
        let mut model = Model::default();
        let expected: Vec<Observed> = ops.iter().map(|op| model.apply(op)).collect();
        let expected_balances: Vec<(i64, i64)> = users
            .iter()
            .map(|u| model.accounts.get(&u.0).copied().unwrap_or((0, 0)))
            .collect();
        // The sequence exercises every interesting outcome.
        for st in [
            OutcomeStatus::Consumed,
            OutcomeStatus::Granted,
            OutcomeStatus::Held,
            OutcomeStatus::Settled,
            OutcomeStatus::Released,
            OutcomeStatus::InsufficientTokens,
            OutcomeStatus::RequestIdConflict,
            OutcomeStatus::HoldNotFound,
            OutcomeStatus::HoldAlreadyResolved,
        ] {
            assert!(
                expected.iter().any(|o| o.0 == st),
                "seed {seed} produces no {st}"
            );
        }

        // (a) one by one through the SQL door, on its own database.
        let env_a = TestEnv::new().await;
        let mut got_a = Vec::new();
        for op in &ops {
            got_a.push(sql_door(&env_a.pool, op).await);
        }
        for (i, (g, e)) in got_a.iter().zip(&expected).enumerate() {
            assert_eq!(g, e, "SQL door, seed {seed}, op {i}: {:?}", ops[i]);
        }
        assert_eq!(final_balances(&env_a, &users).await, expected_balances);

        // (b) random-size batches through Ledger::apply, on another fresh database.
        let env_b = TestEnv::new().await;
        let l = ledger(&env_b);
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
        let mut got_b: Vec<Observed> = Vec::new();
        let mut i = 0;
        while i < ops.len() {
            let size = rng.random_range(1..=60).min(ops.len() - i);
            let out = l.apply(&ops[i..i + size]).await.expect("apply batch");
            assert_eq!(out.len(), size);
            for (o, op) in out.iter().zip(&ops[i..i + size]) {
                assert_eq!(o.request_id, op.request_id());
            }
            got_b.extend(out.iter().map(|o| (o.status, o.balance, o.held)));
            i += size;
        }
        for (i, (g, e)) in got_b.iter().zip(&expected).enumerate() {
            assert_eq!(g, e, "queue door, seed {seed}, op {i}: {:?}", ops[i]);
        }
        assert_eq!(final_balances(&env_b, &users).await, expected_balances);

        // The durable outcome of every id is the model's first decision.
        for op in ops.iter().take(50) {
            let id = op.request_id();
            let durable = l.outcome(id).await.unwrap().expect("stored outcome");
            let (_, first) = &model.requests[&id.0];
            assert_eq!((durable.status, durable.balance, durable.held), *first);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Benchmark (ignored by default): Ledger::apply throughput with batches of 1,000.
//   cargo test --release --test ledger -- --ignored bench_ledger_apply --nocapture
// Prints wall-clock consumptions/s (durable commits) and, for the single-connection runs,
// consumptions per CPU-second of the Postgres backend (less sensitive to a busy machine).
// ---------------------------------------------------------------------------------------------

/// CPU seconds (user + system) used so far by a local process, from /proc/<pid>/stat.
fn process_cpu_secs(pid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime); after the comm they are at 11 and 12.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

async fn bench_run(l: &Ledger, users: &[UserId], total: usize, workers: usize) -> f64 {
    let per_worker = total / workers;
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let l = l.clone();
        let users = users.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(w as u64);
            let mut done = 0;
            while done < per_worker {
                let n = 1000.min(per_worker - done);
                let ops: Vec<LedgerOp> = (0..n)
                    .map(|_| consume(rid(), users[rng.random_range(0..users.len())], 1))
                    .collect();
                let out = l.apply(&ops).await.expect("apply");
                assert!(out.iter().all(|o| o.status == OutcomeStatus::Consumed));
                done += n;
            }
        }));
    }
    for t in tasks {
        t.await.expect("bench worker");
    }
    (per_worker * workers) as f64 / started.elapsed().as_secs_f64()
}

#[tokio::test]
#[ignore = "benchmark: run explicitly"]
async fn bench_ledger_apply() {
    let env = TestEnv::new().await;
    let total: usize = std::env::var("LEDGER_BENCH_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let cfg = env.config().ledger;
    let single = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&env.db_url)
        .await
        .unwrap();
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&single)
        .await
        .unwrap();
    let l1 = Ledger::new(single, cfg.clone());
    let l = ledger(&env);

    let hot = vec![uid()];
    l.apply(&[grant(rid(), hot[0], 1_000_000_000_000)])
        .await
        .unwrap();
    let many: Vec<UserId> = (0..10_000).map(|_| uid()).collect();
    let grants: Vec<LedgerOp> = many
        .iter()
        .map(|u| grant(rid(), *u, 1_000_000_000))
        .collect();
    l.apply(&grants).await.unwrap();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at start: {}", load.trim());

    let mut runs = 0;
    for (name, users) in [("one hot user", &hot), ("10,000 users", &many)] {
        let cpu0 = process_cpu_secs(backend);
        let rate = bench_run(&l1, users, total, 1).await;
        let cpu1 = process_cpu_secs(backend);
        let per_cpu = match (cpu0, cpu1) {
            (Some(a), Some(b)) if b > a => format!("{:.0}", total as f64 / (b - a)),
            _ => "n/a".to_string(),
        };
        println!(
            "Ledger::apply, batches of 1000, {name}, 1 connection: {rate:.0} consumptions/s \
             wall clock; {per_cpu} consumptions per Postgres backend CPU-second"
        );
        runs += 1;
        for workers in [2, 4] {
            let rate = bench_run(&l, users, total, workers).await;
            println!(
                "Ledger::apply, batches of 1000, {name}, {workers} concurrent batches: \
                 {rate:.0} consumptions/s wall clock"
            );
            runs += 1;
        }
    }
    let hot_balance = env.account(hot[0].0).await.unwrap().0;
    assert_eq!(
        hot_balance,
        1_000_000_000_000 - (runs / 2) as i64 * total as i64
    );
}

// ---------------------------------------------------------------------------------------------
// Defects found in review (issue 9 §4), on both kinds of database
// ---------------------------------------------------------------------------------------------

/// `tw_ledger_apply` with parallel arrays given as SQL literals: `amounts` may start at any
/// index. Returns the SQLSTATE of the error, if any.
async fn apply_with_amounts(
    pool: &PgPool,
    user: Uuid,
    rids: &[Uuid],
    amounts: &str,
) -> Option<String> {
    let n = rids.len();
    let q = format!(
        "SELECT status FROM public.tw_ledger_apply($1, $2, $3, '{amounts}'::bigint[], $4, $5, $6, $7)"
    );
    let res = sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(q))
        .bind(rids)
        .bind(vec!["consume".to_string(); n])
        .bind(vec![user; n])
        .bind(vec!["chat".to_string(); n])
        .bind(vec![None::<Uuid>; n])
        .bind(vec![None::<i32>; n])
        .bind(vec![json!({}); n])
        .fetch_all(pool)
        .await;
    match res {
        Ok(_) => None,
        Err(sqlx::Error::Database(db)) => db.code().map(|c| c.to_string()),
        Err(e) => panic!("tw_ledger_apply failed unexpectedly: {e}"),
    }
}

#[tokio::test]
async fn arrays_that_do_not_start_at_one_are_refused() {
    for kind in DbKind::ALL {
        let env = TestEnv::on(kind).await;
        let l = ledger(&env);
        let user = uid();
        apply_one(&l, grant(rid(), user, 5_000)).await;
        // Two operations, amounts indexed 0..1: once charged 1000 and recorded 1.
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let code = apply_with_amounts(&env.pool, user.0, &[a, b], "[0:1]={1,1000}").await;
        assert_eq!(
            code.as_deref(),
            Some("22023"),
            "{kind:?}: two ops, amounts from index 0"
        );
        // One operation (the single-operation path), amounts indexed 0..0.
        let c = Uuid::new_v4();
        let code = apply_with_amounts(&env.pool, user.0, &[c], "[0:0]={7}").await;
        assert_eq!(
            code.as_deref(),
            Some("22023"),
            "{kind:?}: one op, amount at index 0"
        );
        // Two dimensions are refused too.
        let code = apply_with_amounts(&env.pool, user.0, &[a, b], "{{1},{1000}}").await;
        assert_eq!(
            code.as_deref(),
            Some("22023"),
            "{kind:?}: two-dimensional amounts"
        );
        assert_eq!(env.account(user.0).await, Some((5_000, 0)), "{kind:?}");
        for r in [a, b, c] {
            assert_eq!(
                stored(&env.pool, r).await,
                None,
                "{kind:?}: nothing recorded"
            );
        }
    }
}

/// Size in bytes of what `ledger_requests` keeps of one request (label, metadata, reason).
async fn stored_size(pool: &PgPool, request_id: Uuid) -> i64 {
    sqlx::query_scalar::<_, i64>(
        "SELECT (coalesce(octet_length(label), 0) + coalesce(octet_length(metadata::text), 0)
                 + coalesce(octet_length(reason), 0))::bigint
           FROM public.ledger_requests WHERE request_id = $1",
    )
    .bind(request_id)
    .fetch_one(pool)
    .await
    .expect("read stored request")
}

/// Whether `ledger_requests` keeps the digest of a request's fields.
async fn stored_digest(pool: &PgPool, request_id: Uuid) -> bool {
    sqlx::query_scalar::<_, bool>(
        "SELECT fields_sha256 IS NOT NULL FROM public.ledger_requests WHERE request_id = $1",
    )
    .bind(request_id)
    .fetch_one(pool)
    .await
    .expect("read stored digest")
}

#[tokio::test]
async fn rejected_input_is_stored_bounded_and_repeats_still_get_their_answer() {
    for kind in DbKind::ALL {
        let env = TestEnv::on(kind).await;
        let l = ledger(&env);
        let user = uid();
        apply_one(&l, grant(rid(), user, 100)).await;
        let huge_type = "t".repeat(10_000_000);
        let huge_meta = json!({ "blob": "m".repeat(1_000_000) });

        // SQL door, one operation: a 10,000,000-character operation type.
        let r1 = Uuid::new_v4();
        let first = consume_sql(&env.pool, r1, user.0, 1, &huge_type, json!({})).await;
        assert_eq!(first["status"], json!("rejected"), "{kind:?}: {first}");
        // Queue door shape, a batch: 1 MB of metadata next to a valid op.
        let r2 = rid();
        let mut big = consume(r2, user, 1);
        if let LedgerOp::Consume { metadata, .. } = &mut big {
            *metadata = huge_meta.clone();
        }
        let batch = l
            .apply(&[big.clone(), consume(rid(), user, 1)])
            .await
            .unwrap();
        assert_eq!(batch[0].status, OutcomeStatus::Rejected, "{kind:?}");
        assert_eq!(batch[1].status, OutcomeStatus::Consumed, "{kind:?}");
        // A payload the worker could not parse, recorded by tw_ledger_reject.
        let r3 = Uuid::new_v4();
        let reject = |label: String, meta: Value| {
            sqlx::query_scalar::<_, String>(
                "SELECT status FROM public.tw_ledger_reject($1, 'consume', $2, NULL, 1, $3, NULL, $4, 'bad payload')",
            )
            .bind(r3)
            .bind(user.0)
            .bind(label)
            .bind(meta)
            .fetch_one(&env.pool)
        };
        let big_array = json!(["a".repeat(1_000_000)]);
        assert_eq!(
            reject(huge_type.clone(), big_array.clone()).await.unwrap(),
            "rejected"
        );

        for r in [r1, r2.0, r3] {
            let bytes = stored_size(&env.pool, r).await;
            assert!(bytes <= 8_192, "{kind:?}: request {r} keeps {bytes} bytes");
            assert!(
                stored_digest(&env.pool, r).await,
                "{kind:?}: request {r} keeps the digest of its fields"
            );
        }

        // The same oversized fields again: the stored `rejected` outcome, through each door.
        let again = consume_sql(&env.pool, r1, user.0, 1, &huge_type, json!({})).await;
        assert_eq!(again, first, "{kind:?}");
        assert_eq!(apply_one(&l, big.clone()).await, batch[0], "{kind:?}");
        assert_eq!(
            reject(huge_type.clone(), big_array.clone()).await.unwrap(),
            "rejected"
        );
        // Other fields with the same id: a conflict, also when only the cut-off part differs.
        let mut other_type = huge_type.clone();
        other_type.push('u');
        let v = consume_sql(&env.pool, r1, user.0, 1, &other_type, json!({})).await;
        assert_eq!(v["status"], json!("request_id_conflict"), "{kind:?}");
        let mut other = consume(r2, user, 1);
        if let LedgerOp::Consume { metadata, .. } = &mut other {
            *metadata = json!({ "blob": format!("{}n", "m".repeat(999_999)) });
        }
        assert_eq!(
            apply_one(&l, other).await.status,
            OutcomeStatus::RequestIdConflict
        );
        let other_array = json!([format!("{}b", "a".repeat(999_999))]);
        assert_eq!(
            reject(huge_type.clone(), other_array).await.unwrap(),
            "request_id_conflict",
            "{kind:?}"
        );
        assert_eq!(env.account(user.0).await, Some((99, 0)), "{kind:?}");
    }
}

async fn account_count(pool: &PgPool, users: &[Uuid]) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM public.credit_accounts WHERE user_id = ANY ($1)")
        .bind(users)
        .fetch_one(pool)
        .await
        .expect("count accounts")
}

#[tokio::test]
async fn operations_that_fail_leave_no_account_row() {
    for kind in DbKind::ALL {
        let env = TestEnv::on(kind).await;
        let l = ledger(&env);
        let long_reason = "r".repeat(300);

        // A rejected grant, through the SQL door and in a batch next to a good grant.
        let (u1, u2, u3) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let v = sql(&env.pool, "SELECT public.add_tokens($1, 5, $2)", |q| {
            q.bind(u1).bind(long_reason.clone())
        })
        .await;
        assert_eq!(v["status"], json!("rejected"), "{kind:?}");
        let bad = LedgerOp::Grant {
            request_id: rid(),
            user_id: UserId(u2),
            amount: credits(5),
            reason: long_reason.clone(),
            metadata: json!({}),
        };
        let out = l.apply(&[bad, grant(rid(), UserId(u3), 5)]).await.unwrap();
        assert_eq!(out[0].status, OutcomeStatus::Rejected, "{kind:?}");
        assert_eq!(out[1].status, OutcomeStatus::Granted, "{kind:?}");
        assert_eq!(
            account_count(&env.pool, &[u1, u2]).await,
            0,
            "{kind:?}: rejected grants"
        );
        assert_eq!(env.account(u3).await, Some((5, 0)), "{kind:?}");

        // One request id reused for other users: the repeats are conflicts and create nothing,
        // through both doors.
        let r = Uuid::new_v4();
        let first = add_tokens_sql(&env.pool, u3, 7, Some(r)).await;
        assert_eq!(first["status"], json!("granted"), "{kind:?}");
        let (v1, v2) = (Uuid::new_v4(), Uuid::new_v4());
        let again = add_tokens_sql(&env.pool, v1, 7, Some(r)).await;
        assert_eq!(again["status"], json!("request_id_conflict"), "{kind:?}");
        let out = apply_one(&l, grant(RequestId(r), UserId(v2), 7)).await;
        assert_eq!(out.status, OutcomeStatus::RequestIdConflict, "{kind:?}");
        assert_eq!(
            account_count(&env.pool, &[v1, v2]).await,
            0,
            "{kind:?}: conflicts"
        );

        // A race: one new request id, 16 users at once; one wins, the losers leave nothing.
        let r = Uuid::new_v4();
        let users: Vec<Uuid> = (0..16).map(|_| Uuid::new_v4()).collect();
        let mut tasks = Vec::new();
        for (i, u) in users.iter().copied().enumerate() {
            let pool = env.pool.clone();
            let l = ledger(&env);
            tasks.push(tokio::spawn(async move {
                if i % 2 == 0 {
                    add_tokens_sql(&pool, u, 3, Some(r)).await["status"]
                        .as_str()
                        .map(str::to_string)
                } else {
                    let out = l.apply(&[grant(RequestId(r), UserId(u), 3)]).await.unwrap();
                    Some(format!("{:?}", out[0].status))
                }
            }));
        }
        let mut statuses = Vec::new();
        for t in tasks {
            statuses.push(t.await.unwrap().unwrap_or_default());
        }
        let winners = statuses
            .iter()
            .filter(|s| *s == "granted" || *s == "Granted")
            .count();
        assert_eq!(winners, 1, "{kind:?}: {statuses:?}");
        assert_eq!(
            account_count(&env.pool, &users).await,
            1,
            "{kind:?}: race losers"
        );
    }
}

/// Calls `call` (one SQL door statement) while `first` (another) holds its transaction open,
/// waits until the call waits on a lock of that transaction, commits it, and returns both
/// answers.
async fn race_sql_door(pool: &PgPool, first: &str, call: &str) -> (Value, Value) {
    let mut tx = pool.begin().await.expect("begin");
    let v1: Value = sqlx::query_scalar(sqlx::AssertSqlSafe(first.to_string()))
        .fetch_one(&mut *tx)
        .await
        .unwrap_or_else(|e| panic!("{first}: {e}"));
    let p = pool.clone();
    let second = call.to_string();
    let task = tokio::spawn(async move {
        sqlx::query_scalar::<_, Value>(sqlx::AssertSqlSafe(second.clone()))
            .fetch_one(&p)
            .await
            .unwrap_or_else(|e| panic!("{second}: {e}"))
    });
    common::wait_for_lock_waiter(
        pool,
        "%",
        Duration::from_secs(20),
        "the second call waits on a lock",
    )
    .await;
    tx.commit().await.expect("commit");
    let v2 = task.await.expect("second call");
    (v1, v2)
}

/// Two first uses of one request id racing through the SQL door, the second while the first is
/// not committed: it waits for the first's outcome and answers from it. The same fields get
/// the stored outcome and are debited once; other fields (another user) get
/// request_id_conflict and leave their account as it was; a losing grant leaves no account row.
#[tokio::test]
async fn racing_first_uses_of_one_request_id_through_the_sql_door_apply_once() {
    for kind in DbKind::ALL {
        let env = TestEnv::on(kind).await;
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        add_tokens_sql(&env.pool, a, 100, None).await;
        add_tokens_sql(&env.pool, b, 100, None).await;
        let consume = |r: Uuid, u: Uuid| {
            format!("SELECT public.consume_tokens_atomic('{r}', '{u}', 10, 'chat', '{{}}')")
        };
        let grant = |r: Uuid, u: Uuid| {
            format!("SELECT public.add_tokens('{u}', 10, 'top-up', '{{}}', '{r}')")
        };

        // Same fields: the second waits on the account, then replays the stored outcome.
        let r = Uuid::new_v4();
        let (v1, v2) = race_sql_door(&env.pool, &consume(r, a), &consume(r, a)).await;
        assert_eq!(v1["status"], json!("consumed"), "{kind:?}: {v1}");
        assert_eq!(v2, v1, "{kind:?}");
        assert_eq!(env.account(a).await, Some((90, 0)), "{kind:?}");

        // Another user: the second debits its account, then finds the id taken; undone.
        let r = Uuid::new_v4();
        let (v1, v2) = race_sql_door(&env.pool, &consume(r, a), &consume(r, b)).await;
        assert_eq!(v1["status"], json!("consumed"), "{kind:?}: {v1}");
        assert_eq!(v2["status"], json!("request_id_conflict"), "{kind:?}: {v2}");
        assert_eq!(env.account(a).await, Some((80, 0)), "{kind:?}");
        assert_eq!(env.account(b).await, Some((100, 0)), "{kind:?}");
        assert_eq!(
            history_kinds(&env.pool, b).await.len(),
            1,
            "{kind:?}: only b's grant is in its history"
        );

        // A grant to a new user losing the race leaves no account.
        let (n1, n2) = (Uuid::new_v4(), Uuid::new_v4());
        let g = Uuid::new_v4();
        let (v1, v2) = race_sql_door(&env.pool, &grant(g, n1), &grant(g, n2)).await;
        assert_eq!(v1["status"], json!("granted"), "{kind:?}: {v1}");
        assert_eq!(v2["status"], json!("request_id_conflict"), "{kind:?}: {v2}");
        assert_eq!(env.account(n1).await, Some((10, 0)), "{kind:?}");
        assert_eq!(env.account(n2).await, None, "{kind:?}");
    }
}
