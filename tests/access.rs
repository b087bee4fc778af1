//! Access checks against real Postgres (plain and Supabase-shaped) and a real anvil: proven
//! wallets (Sign-In with Ethereum, EIP-4361), their nonce door and their RLS.

mod common;

use std::str::FromStr;

use alloy::primitives::Address;
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use common::anvil::Anvil;
use common::{DbKind, TestEnv, begin_as};
use serde_json::json;
use tokenwarden::access::{LinkOutcome, LinkRefusal, LinkRequest, WalletLinker, WalletStore};
use tokenwarden::config::{ChainConfig, Config};
use uuid::Uuid;

/// anvil's dev accounts 0 and 1 (public, well-known keys).
const KEY_0: &str = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
const KEY_1: &str = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";
const DOMAIN: &str = "localhost:3000";
const ANVIL_CHAIN: u64 = 31337;

fn signer(key: &str) -> PrivateKeySigner {
    PrivateKeySigner::from_str(key).expect("dev key")
}

fn sign(key: &str, message: &str) -> String {
    let sig = signer(key)
        .sign_message_sync(message.as_bytes())
        .expect("sign");
    format!("0x{}", hex::encode(sig.as_bytes()))
}

/// An EIP-4361 message; `extra` appends optional fields (each starting with `\n`).
fn siwe_message(domain: &str, address: Address, chain: u64, nonce: &str, extra: &str) -> String {
    let issued = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    format!(
        "{domain} wants you to sign in with your Ethereum account:\n\
         {}\n\n\
         Link this wallet to your tokenwarden account\n\n\
         URI: http://{domain}/wallets\n\
         Version: 1\n\
         Chain ID: {chain}\n\
         Nonce: {nonce}\n\
         Issued At: {issued}{extra}",
        address.to_checksum(None)
    )
}

fn chain_config(rpc: &str) -> ChainConfig {
    serde_json::from_value(json!({
        "chain_id": ANVIL_CHAIN,
        "name": "anvil",
        "rpc_urls": [rpc],
        "rpc_timeout_ms": 2000,
        "rpc_max_retries": 1,
    }))
    .expect("chain config")
}

fn config(env: &TestEnv, rpc: &str) -> Config {
    let mut cfg = env.config();
    cfg.chain.chains = vec![chain_config(rpc)];
    cfg.access.siwe_domains = vec![DOMAIN.to_string()];
    cfg.validate().expect("valid config");
    cfg
}

fn linker(env: &TestEnv, rpc: &str) -> WalletLinker {
    WalletLinker::from_config(
        WalletStore::new(env.pool.clone()),
        &config(env, rpc),
        tokio_util::sync::CancellationToken::new(),
    )
    .expect("linker")
}

fn request(user: Uuid, message: String, signature: String) -> LinkRequest {
    LinkRequest {
        request_id: Uuid::new_v4(),
        user_id: user,
        message,
        signature,
    }
}

async fn nonce(env: &TestEnv, user: Uuid) -> String {
    WalletStore::new(env.pool.clone())
        .issue_nonce(user)
        .await
        .expect("nonce")
        .nonce
}

#[track_caller]
fn refused(outcome: &LinkOutcome) -> LinkRefusal {
    match outcome {
        LinkOutcome::Refused(r) => r.reason,
        LinkOutcome::Linked { link, .. } => panic!("expected a refusal, got a link {link:?}"),
    }
}

#[track_caller]
fn linked(outcome: &LinkOutcome) -> (String, String, Vec<i64>) {
    match outcome {
        LinkOutcome::Linked { link, .. } => (
            link.address.clone(),
            link.method.clone(),
            link.chains.clone(),
        ),
        LinkOutcome::Refused(r) => panic!("expected a link, got a refusal: {r}"),
    }
}

#[tokio::test]
async fn an_eoa_links_once_per_nonce_and_every_hostile_message_is_refused_with_its_reason() {
    let env = TestEnv::new().await;
    let anvil = Anvil::spawn().await;
    let l = linker(&env, &anvil.url);
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let wallet = signer(KEY_1).address();

    // Hostile and broken messages first: none of them uses the nonce.
    let n = nonce(&env, alice).await;
    let cases: Vec<(LinkRefusal, String, String)> = vec![
        (
            LinkRefusal::MalformedMessage,
            "please let me in".to_string(),
            sign(KEY_1, "please let me in"),
        ),
        {
            let m = siwe_message("evil.example.com", wallet, ANVIL_CHAIN, &n, "");
            (LinkRefusal::WrongDomain, m.clone(), sign(KEY_1, &m))
        },
        {
            let m = siwe_message(DOMAIN, wallet, 1, &n, "");
            (LinkRefusal::WrongChain, m.clone(), sign(KEY_1, &m))
        },
        {
            let m = siwe_message(
                DOMAIN,
                wallet,
                ANVIL_CHAIN,
                &n,
                "\nExpiration Time: 2020-01-01T00:00:00Z",
            );
            (LinkRefusal::Expired, m.clone(), sign(KEY_1, &m))
        },
        {
            let m = siwe_message(
                DOMAIN,
                wallet,
                ANVIL_CHAIN,
                &n,
                "\nNot Before: 2999-01-01T00:00:00Z",
            );
            (LinkRefusal::NotYetValid, m.clone(), sign(KEY_1, &m))
        },
        {
            let m = siwe_message(DOMAIN, wallet, ANVIL_CHAIN, &n, "");
            // Signed by account 0 for account 1's address.
            (LinkRefusal::WrongSigner, m.clone(), sign(KEY_0, &m))
        },
        {
            let m = siwe_message(DOMAIN, wallet, ANVIL_CHAIN, &n, "");
            (LinkRefusal::MalformedSignature, m, "0xnothex".to_string())
        },
        {
            let m = siwe_message(DOMAIN, wallet, ANVIL_CHAIN, &n, "");
            (LinkRefusal::MalformedSignature, m, "0x1234".to_string())
        },
        {
            let m = siwe_message(
                DOMAIN,
                wallet,
                ANVIL_CHAIN,
                "00000000000000000000000000000000",
                "",
            );
            (LinkRefusal::UnknownNonce, m.clone(), sign(KEY_1, &m))
        },
        {
            // Alice's nonce in a request for Bob.
            let m = siwe_message(DOMAIN, wallet, ANVIL_CHAIN, &n, "");
            (LinkRefusal::UnknownNonce, m.clone(), sign(KEY_1, &m))
        },
    ];
    let last = cases.len() - 1;
    for (i, (reason, message, signature)) in cases.into_iter().enumerate() {
        let user = if i == last { bob } else { alice };
        let out = l
            .link(&request(user, message.clone(), signature))
            .await
            .unwrap_or_else(|e| panic!("case {i} ({reason:?}) errored: {e}"));
        assert_eq!(refused(&out), reason, "case {i}: {message}");
    }
    assert!(
        WalletStore::new(env.pool.clone())
            .links(alice)
            .await
            .unwrap()
            .is_empty()
    );

    // The right signature with the same nonce links: the refusals did not use it.
    let m = siwe_message(DOMAIN, wallet, ANVIL_CHAIN, &n, "");
    let req = request(alice, m.clone(), sign(KEY_1, &m));
    let (address, method, chains) = linked(&l.link(&req).await.unwrap());
    assert_eq!(address, format!("{wallet:#x}"));
    assert_eq!(method, "eoa");
    assert_eq!(chains, vec![ANVIL_CHAIN as i64]);
    // The same request again (a redelivery) answers with the same link ...
    let (again, _, _) = linked(&l.link(&req).await.unwrap());
    assert_eq!(again, address);
    // ... another request with the used nonce is refused.
    let replay = request(alice, m.clone(), sign(KEY_1, &m));
    assert_eq!(
        refused(&l.link(&replay).await.unwrap()),
        LinkRefusal::NonceUsed
    );

    // An expired nonce.
    let n2 = nonce(&env, alice).await;
    sqlx::query("UPDATE public.access_siwe_nonces SET expires_at = now() - interval '1 second' WHERE nonce = $1")
        .bind(&n2)
        .execute(&env.pool)
        .await
        .unwrap();
    let m2 = siwe_message(DOMAIN, wallet, ANVIL_CHAIN, &n2, "");
    assert_eq!(
        refused(
            &l.link(&request(alice, m2.clone(), sign(KEY_1, &m2)))
                .await
                .unwrap()
        ),
        LinkRefusal::NonceExpired
    );

    // Bob proves the same wallet: the link moves to him.
    let n3 = nonce(&env, bob).await;
    let m3 = siwe_message(DOMAIN, wallet, ANVIL_CHAIN, &n3, "");
    match l
        .link(&request(bob, m3.clone(), sign(KEY_1, &m3)))
        .await
        .unwrap()
    {
        LinkOutcome::Linked { moved_from, .. } => assert_eq!(moved_from, Some(alice)),
        LinkOutcome::Refused(r) => panic!("bob's proof refused: {r}"),
    }
    let store = WalletStore::new(env.pool.clone());
    assert!(store.links(alice).await.unwrap().is_empty());
    assert_eq!(store.links(bob).await.unwrap().len(), 1);

    // Unlink.
    assert!(l.unlink(bob, wallet).await.unwrap());
    assert!(!l.unlink(bob, wallet).await.unwrap());
    assert!(store.links(bob).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_contract_wallet_links_through_erc1271_on_the_chain() {
    let env = TestEnv::new().await;
    let anvil = Anvil::spawn().await;
    // Deployed by account 0, which becomes its owner.
    let wallet = anvil.deploy("TestWallet1271").await;
    let l = linker(&env, &anvil.url);
    let user = Uuid::new_v4();

    let n = nonce(&env, user).await;
    let m = siwe_message(DOMAIN, wallet, ANVIL_CHAIN, &n, "");
    // Signed by a key that is not the wallet's owner: the contract says no.
    let out = l
        .link(&request(user, m.clone(), sign(KEY_1, &m)))
        .await
        .unwrap();
    assert_eq!(refused(&out), LinkRefusal::WrongSigner);
    // A signature the contract cannot even read: it says no too (no magic value).
    let out = l
        .link(&request(user, m.clone(), "0x1234".into()))
        .await
        .unwrap();
    assert_eq!(refused(&out), LinkRefusal::WrongSigner);
    // The owner's signature: the contract returns 0x1626ba7e.
    let out = l
        .link(&request(user, m.clone(), sign(KEY_0, &m)))
        .await
        .unwrap();
    let (address, method, chains) = linked(&out);
    assert_eq!(address, format!("{wallet:#x}"));
    assert_eq!(method, "erc1271");
    assert_eq!(chains, vec![ANVIL_CHAIN as i64]);
}

#[tokio::test]
async fn the_link_job_replies_with_the_outcome_and_rejects_a_bad_payload() {
    use tokenwarden::queue::{JobError, JobRegistry};

    let env = TestEnv::new().await;
    let anvil = Anvil::spawn().await;
    let mut jobs = JobRegistry::new();
    tokenwarden::access::jobs::register(&mut jobs, std::sync::Arc::new(linker(&env, &anvil.url)));
    let link = jobs.get("link_wallet").expect("link_wallet registered");
    let unlink = jobs.get("unlink_wallet").expect("unlink_wallet registered");
    let user = Uuid::new_v4();
    let wallet = signer(KEY_1).address();
    let n = nonce(&env, user).await;
    let m = siwe_message(DOMAIN, wallet, ANVIL_CHAIN, &n, "");
    let request_id = Uuid::new_v4();
    let reply = link
        .handle(json!({"request_id": request_id, "user_id": user, "message": m, "signature": sign(KEY_0, &m)}))
        .await
        .expect("a refusal is a reply");
    assert_eq!(reply["status"], "refused");
    assert_eq!(reply["reason"], "wrong_signer");
    assert_eq!(reply["request_id"], json!(request_id));
    let reply = link
        .handle(json!({"request_id": request_id, "user_id": user, "message": m, "signature": sign(KEY_1, &m)}))
        .await
        .expect("linked");
    assert_eq!(reply["status"], "linked");
    assert_eq!(reply["method"], "eoa");
    assert_eq!(reply["address"], format!("{wallet:#x}"));
    assert_eq!(reply["moved_from_user"], serde_json::Value::Null);
    match link
        .handle(json!({"request_id": request_id, "user_id": user}))
        .await
    {
        Err(JobError::Rejected(reason)) => assert!(reason.contains("link_wallet"), "{reason}"),
        other => panic!("a payload without message is rejected, got {other:?}"),
    }
    let reply = unlink
        .handle(json!({"request_id": Uuid::new_v4(), "user_id": user, "address": format!("{wallet:#x}")}))
        .await
        .expect("unlinked");
    assert_eq!(reply["status"], "unlinked");
    match unlink
        .handle(json!({"request_id": Uuid::new_v4(), "user_id": user, "address": "0x12"}))
        .await
    {
        Err(JobError::Rejected(reason)) => assert!(reason.contains("address"), "{reason}"),
        other => panic!("a bad address is rejected, got {other:?}"),
    }
}

/// Whether `err` is PostgreSQL's "permission denied" (SQLSTATE 42501).
fn sqlstate(err: &sqlx::Error) -> Option<String> {
    match err {
        sqlx::Error::Database(e) => e.code().map(|c| c.to_string()),
        _ => None,
    }
}

#[tokio::test]
async fn the_nonce_door_serves_the_signed_in_user_only() {
    for kind in DbKind::ALL {
        the_nonce_door_serves_the_signed_in_user_only_on(TestEnv::on(kind).await).await;
    }
}

async fn the_nonce_door_serves_the_signed_in_user_only_on(env: TestEnv) {
    let kind = env.kind;
    let alice = Uuid::new_v4();
    let mut tx = begin_as(&env.pool, "authenticated", Some(alice)).await;
    let (nonce, expires): (String, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT nonce, expires_at FROM public.access_wallet_nonce()")
            .fetch_one(&mut *tx)
            .await
            .unwrap_or_else(|e| panic!("{kind:?}: authenticated gets a nonce: {e}"));
    tx.commit().await.unwrap();
    assert_eq!(nonce.len(), 32, "{kind:?}");
    let ttl = expires - chrono::Utc::now();
    assert!(
        ttl.num_seconds() > 200 && ttl.num_seconds() <= 300,
        "{kind:?}: ttl {ttl}"
    );
    let owner: Uuid =
        sqlx::query_scalar("SELECT user_id FROM public.access_siwe_nonces WHERE nonce = $1")
            .bind(&nonce)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(owner, alice, "{kind:?}: the nonce is auth.uid()'s");

    // Not signed in: refused, not a nonce for NULL.
    let mut tx = begin_as(&env.pool, "authenticated", None).await;
    let err = sqlx::query("SELECT * FROM public.access_wallet_nonce()")
        .execute(&mut *tx)
        .await
        .expect_err("no auth.uid()");
    assert_eq!(sqlstate(&err).as_deref(), Some("28000"), "{kind:?}: {err}");
    drop(tx);

    // anon and service_role may not call it (a service has no auth.uid()).
    for role in ["anon", "service_role"] {
        let mut tx = begin_as(&env.pool, role, Some(alice)).await;
        let err = sqlx::query("SELECT * FROM public.access_wallet_nonce()")
            .execute(&mut *tx)
            .await
            .expect_err("not executable");
        assert_eq!(
            sqlstate(&err).as_deref(),
            Some("42501"),
            "{kind:?} {role}: {err}"
        );
    }
    // Nobody but the owner reads or issues nonces directly.
    for role in ["anon", "authenticated", "service_role"] {
        let mut tx = begin_as(&env.pool, role, Some(alice)).await;
        let err = sqlx::query("SELECT * FROM public.access_siwe_nonces")
            .execute(&mut *tx)
            .await
            .expect_err("nonces are internal");
        assert_eq!(
            sqlstate(&err).as_deref(),
            Some("42501"),
            "{kind:?} {role}: {err}"
        );
        drop(tx);
        let mut tx = begin_as(&env.pool, role, Some(alice)).await;
        let err = sqlx::query("SELECT * FROM public.tw_access_issue_nonce($1)")
            .bind(alice)
            .execute(&mut *tx)
            .await
            .expect_err("the internal issuer is the owner's");
        assert_eq!(
            sqlstate(&err).as_deref(),
            Some("42501"),
            "{kind:?} {role}: {err}"
        );
    }

    // The open-nonce bound (access.siwe_max_open_nonces, written by the worker at start).
    let mut cfg = env.config().access;
    cfg.siwe_max_open_nonces = 3;
    let store = WalletStore::new(env.pool.clone());
    store.write_settings(&cfg).await.unwrap();
    for _ in 0..2 {
        store.issue_nonce(alice).await.expect("below the bound");
    }
    let mut tx = begin_as(&env.pool, "authenticated", Some(alice)).await;
    let err = sqlx::query("SELECT * FROM public.access_wallet_nonce()")
        .execute(&mut *tx)
        .await
        .expect_err("a fourth open nonce");
    assert_eq!(sqlstate(&err).as_deref(), Some("54000"), "{kind:?}: {err}");
}

#[tokio::test]
async fn rls_users_read_only_their_own_wallet_links() {
    for kind in DbKind::ALL {
        rls_users_read_only_their_own_wallet_links_on(TestEnv::on(kind).await).await;
    }
}

async fn rls_users_read_only_their_own_wallet_links_on(env: TestEnv) {
    let kind = env.kind;
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    for (user, byte) in [(alice, 0xa1u8), (bob, 0xb0u8)] {
        sqlx::query(
            "INSERT INTO public.user_wallets (user_id, address, chains, method) VALUES ($1, $2, ARRAY[1514::bigint], 'eoa')",
        )
        .bind(user)
        .bind(format!("{:#x}", Address::repeat_byte(byte)))
        .execute(&env.pool)
        .await
        .unwrap();
    }
    let mut tx = begin_as(&env.pool, "authenticated", Some(alice)).await;
    let seen: Vec<Uuid> = sqlx::query_scalar("SELECT user_id FROM public.user_wallets")
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    assert_eq!(seen, vec![alice], "{kind:?}: alice sees her link only");
    for write in [
        "INSERT INTO public.user_wallets (user_id, address, chains, method) VALUES (gen_random_uuid(), '0x0000000000000000000000000000000000000001', ARRAY[1::bigint], 'eoa')",
        "DELETE FROM public.user_wallets",
        "UPDATE public.user_wallets SET method = 'erc1271'",
        "TRUNCATE public.user_wallets",
    ] {
        let mut tx = begin_as(&env.pool, "authenticated", Some(alice)).await;
        let err = sqlx::query(sqlx::AssertSqlSafe(write))
            .execute(&mut *tx)
            .await
            .expect_err("users write no links");
        assert_eq!(
            sqlstate(&err).as_deref(),
            Some("42501"),
            "{kind:?} {write}: {err}"
        );
    }
    let mut tx = begin_as(&env.pool, "anon", None).await;
    let err = sqlx::query("SELECT * FROM public.user_wallets")
        .execute(&mut *tx)
        .await
        .expect_err("anon reads no links");
    assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{kind:?}: {err}");
    let mut tx = begin_as(&env.pool, "service_role", None).await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM public.user_wallets")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(n, 2, "{kind:?}: trusted server code reads every link");
}
