//! Whitelists against real Postgres (plain and Supabase-shaped), Redis, a running worker and
//! anvil: opening (validated like access rules), places granted or refused with the reason and
//! the evidence, once per user, capacity under 1,000 concurrent requests, the freeze, RLS and
//! the doors, and the exported allowlist checked on chain by OpenZeppelin's MerkleProof.

mod common;

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256, U256};
use alloy::sol;
use alloy::sol_types::{SolCall, SolValue};
use chrono::Utc;
use common::anvil::Anvil;
use common::{DbKind, TestEnv, begin_as, blpop, xadd};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokenwarden::access::DenyReason;
use tokenwarden::whitelist::{
    OpenRequest, PlaceRefusal, PlaceStatus, Placement, WhitelistError, WhitelistStore,
};
use uuid::Uuid;

sol! {
    interface TestAllowlist {
        function root() external view returns (bytes32);
        function allowed(bytes32[] proof, address account, uint256 amount) external view returns (bool);
    }
}

/// A complete snapshot (decimals 0, so amounts are whole tokens) holding `holders`.
async fn snapshot(pool: &PgPool, holders: &[(Address, u64)]) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO public.snapshots (id, source, chain, token, status, decimals, block_height, \
         holder_count, completed_at) VALUES ($1, 'index', '31337', $2, 'complete', 0, 42, $3, now())",
    )
    .bind(id)
    .bind(format!("{:#x}", Address::repeat_byte(0xee)))
    .bind(holders.len() as i64)
    .execute(pool)
    .await
    .expect("snapshot row");
    let (addrs, amounts): (Vec<String>, Vec<String>) = holders
        .iter()
        .map(|(a, v)| (format!("{a:#x}"), v.to_string()))
        .unzip();
    sqlx::query(
        "INSERT INTO public.snapshot_holders (snapshot_id, holder, balance) \
         SELECT $1, h, b::numeric FROM unnest($2::text[], $3::text[]) AS x(h, b)",
    )
    .bind(id)
    .bind(&addrs)
    .bind(&amounts)
    .execute(pool)
    .await
    .expect("snapshot holders");
    id
}

/// Proven wallets, as the link job stores them.
async fn link(pool: &PgPool, links: &[(Uuid, Address)]) {
    let (users, addrs): (Vec<Uuid>, Vec<String>) =
        links.iter().map(|(u, a)| (*u, format!("{a:#x}"))).unzip();
    sqlx::query(
        "INSERT INTO public.user_wallets (user_id, address, chains, method) \
         SELECT u, a, ARRAY[31337::bigint], 'eoa' FROM unnest($1::uuid[], $2::text[]) AS x(u, a)",
    )
    .bind(&users)
    .bind(&addrs)
    .execute(pool)
    .await
    .expect("link wallets");
}

fn holds(snapshot: Uuid, min: &str) -> Value {
    json!({"condition": {"snapshot": {"snapshot_id": snapshot, "min": min}}})
}

fn open_request(rule: Value, capacity: Option<u32>) -> OpenRequest {
    OpenRequest {
        creator_id: "creator-1".into(),
        name: format!("drop-{}", Uuid::new_v4()),
        rule,
        opens_at: Utc::now() - chrono::Duration::minutes(1),
        closes_at: Utc::now() + chrono::Duration::hours(1),
        capacity,
        actor: "test".into(),
    }
}

fn wallet(i: u32) -> Address {
    let mut b = [0u8; 20];
    b[0] = 0x77;
    b[16..].copy_from_slice(&i.to_be_bytes());
    Address::from(b)
}

async fn granted_count(pool: &PgPool, list: Uuid) -> (i64, i32) {
    let entries: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM public.whitelist_entries WHERE whitelist_id = $1 AND status = 'granted'",
    )
    .bind(list)
    .fetch_one(pool)
    .await
    .unwrap();
    let counter: i32 = sqlx::query_scalar("SELECT granted FROM public.whitelists WHERE id = $1")
        .bind(list)
        .fetch_one(pool)
        .await
        .unwrap();
    (entries, counter)
}

#[track_caller]
fn refused(p: &Placement) -> PlaceRefusal {
    assert_eq!(p.status, PlaceStatus::Refused, "{p:?}");
    p.reason.expect("a refusal has a reason")
}

#[tokio::test]
async fn opening_refuses_bad_rules_windows_and_capacities_with_what_is_wrong() {
    for kind in DbKind::ALL {
        let env = TestEnv::on(kind).await;
        let store = WhitelistStore::new(env.pool.clone());
        let snap = snapshot(&env.pool, &[(wallet(1), 5)]).await;
        let cases: Vec<(OpenRequest, &str)> = vec![
            (
                open_request(
                    json!({"condition": {"all": [holds(snap, "1")["condition"].clone(), {"any": []}]}}),
                    None,
                ),
                "$.condition.all[1].any: must be a non-empty array",
            ),
            (
                open_request(
                    json!({"condition": {"snapshot": {"snapshot_id": Uuid::new_v4(), "min": "1"}}}),
                    None,
                ),
                "$.condition.snapshot.snapshot_id: snapshot",
            ),
            (
                open_request(
                    json!({"condition": holds(snap, "1")["condition"], "extra": 1}),
                    None,
                ),
                "$.extra: unknown key",
            ),
            (
                OpenRequest {
                    closes_at: Utc::now() - chrono::Duration::hours(2),
                    opens_at: Utc::now() - chrono::Duration::hours(1),
                    ..open_request(holds(snap, "1"), None)
                },
                "opening and a later closing",
            ),
            (
                OpenRequest {
                    closes_at: Utc::now() - chrono::Duration::minutes(30),
                    opens_at: Utc::now() - chrono::Duration::hours(1),
                    ..open_request(holds(snap, "1"), None)
                },
                "already past",
            ),
            (
                open_request(holds(snap, "1"), Some(0)),
                "capacity must be at least 1",
            ),
        ];
        for (req, want) in cases {
            match store.open(&req).await {
                Err(WhitelistError::Invalid(why)) => {
                    assert!(why.contains(want), "{kind:?}: {why:?} should name {want:?}")
                }
                other => panic!("{kind:?}: {want:?}: expected a refusal, got {other:?}"),
            }
        }
        let req = open_request(holds(snap, "1"), Some(3));
        let id = store.open(&req).await.expect("a good list opens");
        assert!(matches!(
            store.open(&req).await,
            Err(WhitelistError::DuplicateName { .. })
        ));
        let list = store.get(id).await.unwrap();
        assert_eq!(
            list.rule,
            json!({"condition": holds(snap, "1")["condition"], "per_wallet": false, "stale_policy": "deny"}),
            "stored with the access rule's defaults"
        );
        assert_eq!((list.capacity, list.granted), (Some(3), 0));
        let none: i64 = sqlx::query_scalar("SELECT count(*) FROM public.whitelists")
            .fetch_one(&env.pool)
            .await
            .unwrap();
        assert_eq!(none, 1, "{kind:?}: refused lists leave nothing behind");
    }
}

#[tokio::test]
async fn places_are_granted_or_refused_with_reason_and_evidence_once_per_user_and_closing_freezes()
{
    for kind in DbKind::ALL {
        let env = TestEnv::on(kind).await;
        let store = WhitelistStore::new(env.pool.clone());
        let (alice, bob, carol, dave, erin) = (
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
        );
        let snap = snapshot(
            &env.pool,
            &[
                (wallet(1), 5),
                (wallet(2), 1),
                (wallet(4), 9),
                (wallet(5), 9),
            ],
        )
        .await;
        link(
            &env.pool,
            &[
                (alice, wallet(1)),
                (bob, wallet(2)),
                (dave, wallet(4)),
                (erin, wallet(5)),
            ],
        )
        .await;
        let id = store
            .open(&open_request(holds(snap, "2"), Some(2)))
            .await
            .unwrap();

        // Alice holds 5 ≥ 2: granted, with the decision's evidence and her wallet.
        let r1 = Uuid::new_v4();
        let a = store.request(id, alice, r1, None).await.unwrap();
        assert_eq!(a.status, PlaceStatus::Granted, "{kind:?}: {a:?}");
        assert_eq!(a.address.as_deref(), Some(&*format!("{:#x}", wallet(1))));
        assert_eq!(a.amount.as_deref(), Some("1"));
        let d = a.decision.clone().expect("a decision");
        assert!(d.allowed);
        assert_eq!(d.evidence[0].amount.as_deref(), Some("5"));
        assert_eq!(d.evidence[0].minimum, "2");
        assert_eq!(d.evidence[0].block, Some(42));
        // Idempotent: asking again (any request id) returns the same place; nothing counts twice.
        let again = store
            .request(id, alice, Uuid::new_v4(), None)
            .await
            .unwrap();
        assert_eq!(again, a, "{kind:?}: the granted place is final");
        assert_eq!(granted_count(&env.pool, id).await, (1, 1));

        // Bob holds 1 < 2: refused not_met, kept with the evidence; the same request id again
        // answers the stored refusal.
        let rb = Uuid::new_v4();
        let b = store.request(id, bob, rb, None).await.unwrap();
        assert_eq!(refused(&b), PlaceRefusal::NotMet);
        let bd = b.decision.clone().expect("evidence kept");
        assert_eq!(
            (
                bd.reason,
                bd.evidence[0].amount.as_deref().unwrap_or_default()
            ),
            (Some(DenyReason::NotMet), "1")
        );
        assert_eq!(store.request(id, bob, rb, None).await.unwrap(), b);
        // Carol has no wallet; Dave names a wallet that is not his.
        assert_eq!(
            refused(
                &store
                    .request(id, carol, Uuid::new_v4(), None)
                    .await
                    .unwrap()
            ),
            PlaceRefusal::NoWallet
        );
        assert_eq!(
            refused(
                &store
                    .request(id, dave, Uuid::new_v4(), Some(wallet(1)))
                    .await
                    .unwrap()
            ),
            PlaceRefusal::NotYourWallet
        );
        // Alice's wallet moves to Bob (a newer proof): it already holds a place.
        sqlx::query("UPDATE public.user_wallets SET user_id = $1 WHERE address = $2")
            .bind(bob)
            .bind(format!("{:#x}", wallet(1)))
            .execute(&env.pool)
            .await
            .unwrap();
        assert_eq!(
            refused(
                &store
                    .request(id, bob, Uuid::new_v4(), Some(wallet(1)))
                    .await
                    .unwrap()
            ),
            PlaceRefusal::AddressTaken
        );
        // Dave takes the last place; Erin finds the list full.
        let dv = store.request(id, dave, Uuid::new_v4(), None).await.unwrap();
        assert_eq!(dv.status, PlaceStatus::Granted);
        let e = store.request(id, erin, Uuid::new_v4(), None).await.unwrap();
        assert_eq!(refused(&e), PlaceRefusal::Full);
        assert!(
            e.decision.expect("evidence").allowed,
            "full, not unqualified"
        );
        let stored: Vec<(String, Option<String>, i32)> = sqlx::query_as(
            "SELECT status, reason, attempts FROM public.whitelist_entries \
             WHERE whitelist_id = $1 AND user_id = $2",
        )
        .bind(id)
        .bind(bob)
        .fetch_all(&env.pool)
        .await
        .unwrap();
        assert_eq!(
            stored,
            vec![("refused".into(), Some("address_taken".into()), 2)],
            "{kind:?}: one row per user, the latest refusal kept with its reason"
        );

        // Closing freezes: no row changes, refusals say closed, granted places stay.
        assert!(store.close(id, "test").await.unwrap());
        assert!(!store.close(id, "test").await.unwrap(), "closed already");
        let before: Vec<(Uuid, String, Option<String>, i32)> = sqlx::query_as(
            "SELECT user_id, status, reason, attempts FROM public.whitelist_entries \
             WHERE whitelist_id = $1 ORDER BY user_id",
        )
        .bind(id)
        .fetch_all(&env.pool)
        .await
        .unwrap();
        for u in [bob, carol, erin, Uuid::new_v4()] {
            assert_eq!(
                refused(&store.request(id, u, Uuid::new_v4(), None).await.unwrap()),
                PlaceRefusal::Closed
            );
        }
        assert_eq!(
            store
                .request(id, alice, Uuid::new_v4(), None)
                .await
                .unwrap()
                .status,
            PlaceStatus::Granted
        );
        let after: Vec<(Uuid, String, Option<String>, i32)> = sqlx::query_as(
            "SELECT user_id, status, reason, attempts FROM public.whitelist_entries \
             WHERE whitelist_id = $1 ORDER BY user_id",
        )
        .bind(id)
        .fetch_all(&env.pool)
        .await
        .unwrap();
        assert_eq!(before, after, "{kind:?}: a closed list is frozen");
        assert_eq!(granted_count(&env.pool, id).await, (2, 2));

        // The window's end freezes a list too, closed or not.
        let ending = store
            .open(&open_request(holds(snap, "2"), None))
            .await
            .unwrap();
        assert_eq!(
            store
                .request(ending, dave, Uuid::new_v4(), None)
                .await
                .unwrap()
                .status,
            PlaceStatus::Granted
        );
        sqlx::query(
            "UPDATE public.whitelists SET opens_at = now() - interval '2 h', closes_at = now() - interval '1 s' WHERE id = $1",
        )
        .bind(ending)
        .execute(&env.pool)
        .await
        .unwrap();
        assert_eq!(
            refused(
                &store
                    .request(ending, erin, Uuid::new_v4(), None)
                    .await
                    .unwrap()
            ),
            PlaceRefusal::Closed
        );
        assert_eq!(granted_count(&env.pool, ending).await, (1, 1));

        // Outside the window: not open yet; unknown list.
        let later = store
            .open(&OpenRequest {
                opens_at: Utc::now() + chrono::Duration::hours(1),
                closes_at: Utc::now() + chrono::Duration::hours(2),
                ..open_request(holds(snap, "2"), None)
            })
            .await
            .unwrap();
        assert_eq!(
            refused(
                &store
                    .request(later, alice, Uuid::new_v4(), None)
                    .await
                    .unwrap()
            ),
            PlaceRefusal::NotOpen
        );
        assert_eq!(
            refused(
                &store
                    .request(Uuid::new_v4(), alice, Uuid::new_v4(), None)
                    .await
                    .unwrap()
            ),
            PlaceRefusal::UnknownWhitelist
        );
        assert_eq!(granted_count(&env.pool, later).await, (0, 0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn capacity_holds_when_1000_users_ask_at_once_for_100_places() {
    for kind in DbKind::ALL {
        let env = TestEnv::on(kind).await;
        let users: Vec<(Uuid, Address)> = (0..1000).map(|i| (Uuid::new_v4(), wallet(i))).collect();
        let snap = snapshot(
            &env.pool,
            &users.iter().map(|(_, a)| (*a, 1)).collect::<Vec<_>>(),
        )
        .await;
        link(&env.pool, &users).await;
        let id = WhitelistStore::new(env.pool.clone())
            .open(&open_request(holds(snap, "1"), Some(100)))
            .await
            .unwrap();
        // 16 sessions race for the places: enough to interleave every step of a request, and
        // few enough to leave the server's 100 connections to the tests running beside this one.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(60))
            .connect(&env.db_url)
            .await
            .expect("pool");
        let store = Arc::new(WhitelistStore::new(pool));
        let start = tokio::sync::Barrier::new(users.len());
        let start = Arc::new(start);
        let t0 = Instant::now();
        let tasks: Vec<_> = users
            .iter()
            .map(|(u, _)| {
                let (store, start, u) = (store.clone(), start.clone(), *u);
                tokio::spawn(async move {
                    start.wait().await;
                    store.request(id, u, Uuid::new_v4(), None).await
                })
            })
            .collect();
        let mut granted = 0;
        let mut full = 0;
        for t in tasks {
            let p = t.await.expect("task").expect("request answered");
            match (p.status, p.reason) {
                (PlaceStatus::Granted, None) => granted += 1,
                (PlaceStatus::Refused, Some(PlaceRefusal::Full)) => full += 1,
                other => panic!("{kind:?}: unexpected {other:?}"),
            }
        }
        let elapsed = t0.elapsed();
        assert_eq!((granted, full), (100, 900), "{kind:?}");
        assert_eq!(granted_count(&env.pool, id).await, (100, 100), "{kind:?}");
        let rows: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM public.whitelist_entries WHERE whitelist_id = $1",
        )
        .bind(id)
        .fetch_one(&env.pool)
        .await
        .unwrap();
        assert_eq!(rows, 1000, "{kind:?}: every request is recorded");
        println!(
            "{kind:?}: 1000 concurrent requests for 100 places in {elapsed:?} ({:.0} requests/s)",
            1000.0 / elapsed.as_secs_f64()
        );

        // One user asking 50 times at once (a retrying client): one place, counted once.
        let (u, a) = (Uuid::new_v4(), wallet(5000));
        let snap = snapshot(&env.pool, &[(a, 1)]).await;
        link(&env.pool, &[(u, a)]).await;
        let id = store
            .open(&open_request(holds(snap, "1"), Some(10)))
            .await
            .unwrap();
        let start = Arc::new(tokio::sync::Barrier::new(50));
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let (store, start) = (store.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    store.request(id, u, Uuid::new_v4(), None).await
                })
            })
            .collect();
        let mut answers = Vec::new();
        for t in tasks {
            answers.push(t.await.expect("task").expect("answered"));
        }
        assert!(
            answers
                .iter()
                .all(|p| p == &answers[0] && p.status == PlaceStatus::Granted)
        );
        assert_eq!(granted_count(&env.pool, id).await, (1, 1), "{kind:?}");
    }
}

fn sqlstate(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(d) => d.code().map(|c| c.to_string()),
        _ => None,
    }
}

#[tokio::test]
async fn users_read_their_own_entries_and_ask_through_their_door_only() {
    for kind in DbKind::ALL {
        let env = TestEnv::on(kind).await;
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let snap = snapshot(&env.pool, &[(wallet(1), 5), (wallet(2), 5)]).await;
        link(&env.pool, &[(alice, wallet(1)), (bob, wallet(2))]).await;
        let id = WhitelistStore::new(env.pool.clone())
            .open(&open_request(holds(snap, "1"), None))
            .await
            .unwrap();

        // The signed-in user's door: auth.uid(), the same reply as the worker's.
        let mut tx = begin_as(&env.pool, "authenticated", Some(alice)).await;
        let reply: Value = sqlx::query_scalar("SELECT public.request_whitelist($1)")
            .bind(id)
            .fetch_one(&mut *tx)
            .await
            .unwrap_or_else(|e| panic!("{kind:?}: request_whitelist: {e}"));
        tx.commit().await.unwrap();
        let p: Placement = serde_json::from_value(reply).unwrap();
        assert_eq!((p.status, p.user_id), (PlaceStatus::Granted, alice));
        WhitelistStore::new(env.pool.clone())
            .request(id, bob, Uuid::new_v4(), None)
            .await
            .unwrap();

        // RLS: Alice reads her entry only; the lists are the service role's.
        let mut tx = begin_as(&env.pool, "authenticated", Some(alice)).await;
        let seen: Vec<Uuid> = sqlx::query_scalar("SELECT user_id FROM public.whitelist_entries")
            .fetch_all(&mut *tx)
            .await
            .unwrap();
        assert_eq!(seen, vec![alice], "{kind:?}");
        let e = sqlx::query("SELECT * FROM public.whitelists")
            .execute(&mut *tx)
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{kind:?}");
        drop(tx);
        let mut tx = begin_as(&env.pool, "authenticated", Some(alice)).await;
        let e = sqlx::query("UPDATE public.whitelist_entries SET status = 'granted'")
            .execute(&mut *tx)
            .await
            .unwrap_err();
        assert_eq!(
            sqlstate(&e).as_deref(),
            Some("42501"),
            "{kind:?}: only the worker writes"
        );
        drop(tx);
        let mut tx = begin_as(&env.pool, "authenticated", Some(alice)).await;
        let e = sqlx::query(
            "SELECT public.whitelist_open('c', 'n', '{}', tstzrange(now(), now() + interval '1 h'), NULL, 'me')",
        )
        .execute(&mut *tx)
        .await
        .unwrap_err();
        assert_eq!(
            sqlstate(&e).as_deref(),
            Some("42501"),
            "{kind:?}: creators' door"
        );
        drop(tx);
        // Not signed in.
        let mut tx = begin_as(&env.pool, "authenticated", None).await;
        let e = sqlx::query("SELECT public.request_whitelist($1)")
            .bind(id)
            .execute(&mut *tx)
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("28000"), "{kind:?}");
        drop(tx);
        let mut tx = begin_as(&env.pool, "anon", None).await;
        let e = sqlx::query("SELECT * FROM public.whitelist_entries")
            .execute(&mut *tx)
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{kind:?}");
        drop(tx);

        // The service role reads everything and opens and closes lists.
        let mut tx = begin_as(&env.pool, "service_role", None).await;
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM public.whitelist_entries")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(n, 2, "{kind:?}");
        let other: Uuid = sqlx::query_scalar(
            "SELECT public.whitelist_open('creator-2', 'n', $1, tstzrange(now(), now() + interval '1 h'), 5, 'dashboard')",
        )
        .bind(holds(snap, "1"))
        .fetch_one(&mut *tx)
        .await
        .unwrap_or_else(|e| panic!("{kind:?}: whitelist_open: {e}"));
        let closed: bool = sqlx::query_scalar("SELECT public.whitelist_close($1, 'dashboard')")
            .bind(other)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert!(closed);
        let e = sqlx::query("SELECT public.request_whitelist($1)")
            .bind(id)
            .execute(&mut *tx)
            .await
            .unwrap_err();
        assert_eq!(
            sqlstate(&e).as_deref(),
            Some("42501"),
            "{kind:?}: the user's door is for users"
        );
    }
}

#[tokio::test]
async fn the_request_job_replies_through_a_running_worker_and_rejects_bad_payloads() {
    use tokenwarden::queue::{JobError, JobHandler};
    use tokenwarden::whitelist::RequestWhitelistHandler;

    let env = TestEnv::new().await;
    let alice = Uuid::new_v4();
    let snap = snapshot(&env.pool, &[(wallet(1), 5)]).await;
    link(&env.pool, &[(alice, wallet(1))]).await;
    let id = WhitelistStore::new(env.pool.clone())
        .open(&open_request(holds(snap, "1"), Some(10)))
        .await
        .unwrap();
    let _worker = env.spawn_worker(&[]);
    let mut redis = env.redis().await;
    let request_id = Uuid::new_v4();
    let payload = json!({"request_id": request_id, "user_id": alice, "whitelist_id": id});
    xadd(
        &mut redis,
        &env.stream("request_whitelist"),
        &[("payload", &payload.to_string())],
    )
    .await;
    let reply = blpop(&mut redis, &env.reply_key(&request_id.to_string())).await;
    assert_eq!(reply["request_id"], json!(request_id));
    assert_eq!(reply["status"], "granted", "{reply}");
    assert_eq!(reply["address"], json!(format!("{:#x}", wallet(1))));
    assert_eq!(reply["decision"]["evidence"][0]["amount"], "5");

    let handler = RequestWhitelistHandler::new(Arc::new(WhitelistStore::new(env.pool.clone())));
    for bad in [
        json!({"request_id": request_id, "user_id": alice}),
        json!({"request_id": request_id, "user_id": alice, "whitelist_id": id, "address": "0x12"}),
        json!({"request_id": request_id, "user_id": "alice", "whitelist_id": id}),
        json!({"request_id": request_id, "user_id": alice, "whitelist_id": id, "extra": 1}),
    ] {
        match handler.handle(bad.clone()).await {
            Err(JobError::Rejected(r)) => assert!(r.contains("request_whitelist"), "{r}"),
            other => panic!("{bad} not rejected: {other:?}"),
        }
    }
}

/// The whole path a creator takes: a list, places, close, `tokenwarden whitelist export`;
/// `@openzeppelin/merkle-tree` (npm, the reference) loads the dump and gives the same root and
/// proofs; a mint contract with the root: every granted address passes with its proof; a
/// changed amount, a refused user's address or an outsider fails.
#[tokio::test]
async fn the_exported_allowlist_passes_on_chain_for_every_place_and_fails_otherwise() {
    let env = TestEnv::new().await;
    let anvil = Anvil::spawn().await;
    let members: Vec<(Uuid, Address)> = (0..7).map(|i| (Uuid::new_v4(), wallet(i))).collect();
    let poor = (Uuid::new_v4(), wallet(100));
    let mut holders: Vec<(Address, u64)> = members.iter().map(|(_, a)| (*a, 3)).collect();
    holders.push((poor.1, 1));
    let snap = snapshot(&env.pool, &holders).await;
    link(&env.pool, &members).await;
    link(&env.pool, &[poor]).await;
    let rule = holds(snap, "2").to_string();
    let closes = (Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let out = env.cli(&[
        "whitelist",
        "open",
        "--creator",
        "creator-1",
        "--name",
        "genesis",
        "--rule",
        &rule,
        "--closes-at",
        &closes,
        "--capacity",
        "50",
    ]);
    assert!(out.ok, "{}", out.text());
    let id = Uuid::from_str(out.stdout.trim()).expect("the CLI prints the id");
    let store = WhitelistStore::new(env.pool.clone());
    for (u, _) in members.iter().chain([&poor]) {
        store.request(id, *u, Uuid::new_v4(), None).await.unwrap();
    }
    let out = env.cli(&[
        "whitelist",
        "export",
        &id.to_string(),
        "--format",
        "allowlist",
    ]);
    assert!(!out.ok, "an open list has no root yet");
    assert!(out.text().contains("still open"), "{}", out.text());
    assert!(env.cli(&["whitelist", "close", &id.to_string()]).ok);

    let csv = env.cli(&["whitelist", "export", &id.to_string(), "--format", "csv"]);
    assert!(csv.ok, "{}", csv.text());
    let lines: Vec<&str> = csv.stdout.lines().collect();
    assert_eq!(lines[0], "address,amount,user_id,granted_at");
    assert_eq!(lines.len(), 1 + members.len(), "{}", csv.stdout);
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("{},1,", wallet(3).to_checksum(None))))
    );

    let out = env.cli(&[
        "whitelist",
        "export",
        &id.to_string(),
        "--format",
        "allowlist",
    ]);
    assert!(out.ok, "{}", out.text());
    let allowlist: Value = serde_json::from_str(&out.stdout).expect("allowlist JSON");
    let out = env.cli(&["whitelist", "export", &id.to_string(), "--format", "tree"]);
    assert!(out.ok, "{}", out.text());
    let dump: Value = serde_json::from_str(&out.stdout).expect("tree JSON");
    assert_eq!(dump["format"], "standard-v1");
    assert_eq!(dump["leafEncoding"], json!(["address", "uint256"]));
    assert_eq!(dump["tree"][0], allowlist["root"], "one root in both forms");
    assert_eq!(dump["values"].as_array().unwrap().len(), members.len());

    // The reference implementation reads the dump (`load` re-hashes and validates every node)
    // and gives every value the proof we give it.
    let js = r#"
        const { StandardMerkleTree } = require("@openzeppelin/merkle-tree");
        const tree = StandardMerkleTree.load(JSON.parse(require("fs").readFileSync(0, "utf8")));
        const out = {};
        for (const [i, [address, amount]] of tree.entries()) out[address] = { amount, proof: tree.getProof(i) };
        console.log(JSON.stringify({ root: tree.root, entries: out }));
    "#;
    let node = {
        use std::io::Write;
        let mut child = std::process::Command::new("node")
            .args(["-e", js])
            .current_dir(common::repo_root())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("node runs (make tools installs @openzeppelin/merkle-tree)");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(out.stdout.as_bytes())
            .unwrap();
        let o = child.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "StandardMerkleTree.load refused the dump: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice::<Value>(&o.stdout).expect("node prints JSON")
    };
    assert_eq!(node["root"], allowlist["root"], "the library's root");
    for e in allowlist["entries"].as_array().unwrap() {
        let theirs = &node["entries"][e["address"].as_str().unwrap()];
        assert_eq!(
            (&theirs["amount"], &theirs["proof"]),
            (&e["amount"], &e["proof"]),
            "the library's proof of {}",
            e["address"]
        );
    }

    let root = B256::from_str(allowlist["root"].as_str().unwrap()).unwrap();
    let contract = anvil.deploy_with("TestAllowlist", &root.abi_encode()).await;
    let call = |proof: Vec<B256>, account: Address, amount: u64| {
        let provider = anvil.provider.clone();
        async move {
            use alloy::providers::Provider;
            let data = TestAllowlist::allowedCall {
                proof,
                account,
                amount: U256::from(amount),
            }
            .abi_encode();
            let tx = alloy::rpc::types::TransactionRequest::default()
                .to(contract)
                .input(alloy::primitives::Bytes::from(data).into());
            let out = provider.call(tx).await.expect("eth_call");
            TestAllowlist::allowedCall::abi_decode_returns(&out).expect("bool")
        }
    };
    let entries = allowlist["entries"].as_array().unwrap();
    assert_eq!(entries.len(), members.len());
    let proof_of = |e: &Value| -> Vec<B256> {
        e["proof"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| B256::from_str(p.as_str().unwrap()).unwrap())
            .collect()
    };
    for e in entries {
        let account = Address::from_str(e["address"].as_str().unwrap()).unwrap();
        assert_eq!(e["amount"], "1");
        assert!(
            call(proof_of(e), account, 1).await,
            "{account} passes with its proof"
        );
        assert!(
            !call(proof_of(e), account, 2).await,
            "{account} with a changed amount fails"
        );
    }
    let someone = proof_of(&entries[0]);
    assert!(
        !call(someone.clone(), poor.1, 1).await,
        "a refused user's wallet fails"
    );
    assert!(
        !call(someone, Address::repeat_byte(0x99), 1).await,
        "an outsider fails"
    );
    assert!(members.iter().all(|(_, a)| {
        entries
            .iter()
            .any(|e| e["address"] == json!(a.to_checksum(None)))
    }));
}
