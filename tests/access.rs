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
use sqlx::PgPool;
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
    tokenwarden::access::jobs::register(
        &mut jobs,
        std::sync::Arc::new(linker(&env, &anvil.url)),
        None,
    );
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
    tokenwarden::access::settings::write_settings(&env.pool, &cfg)
        .await
        .unwrap();
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

// ---------------------------------------------------------------------------------------------
// Rules and checks
// ---------------------------------------------------------------------------------------------

use alloy::primitives::U256;
use tokenwarden::access::{AccessChecker, Decision, DenyReason, Question, RuleError, RuleStore};

const CHAIN: u64 = ANVIL_CHAIN;

/// A token row as the indexer writes it at start, for SQL tests without an indexer.
async fn follow_token(pool: &PgPool, token: Address, standard: &str, decimals: Option<i32>) {
    sqlx::query(
        "INSERT INTO public.chain_tokens (chain_id, address, standard, decimals, start_block) \
         VALUES ($1, $2, $3, $4, 0)",
    )
    .bind(CHAIN as i64)
    .bind(format!("{token:#x}"))
    .bind(standard)
    .bind(decimals)
    .execute(pool)
    .await
    .expect("chain_tokens row");
}

fn erc20(token: Address, min: &str) -> serde_json::Value {
    json!({"erc20": {"chain_id": CHAIN, "token": format!("{token:#x}"), "min": min}})
}

#[tokio::test]
async fn rules_are_validated_when_set_with_the_path_of_the_bad_node_and_every_change_is_recorded() {
    for kind in DbKind::ALL {
        rules_are_validated_on(TestEnv::on(kind).await).await;
    }
}

async fn rules_are_validated_on(env: TestEnv) {
    let kind = env.kind;
    let (t20, t721, other) = (
        Address::repeat_byte(0x20),
        Address::repeat_byte(0x72),
        Address::repeat_byte(0x99),
    );
    follow_token(&env.pool, t20, "erc20", Some(6)).await;
    follow_token(&env.pool, t721, "erc721", None).await;
    let pending = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO public.snapshots (id, source, chain, token, status) VALUES ($1, 'index', $2, $3, 'pending')",
    )
    .bind(pending)
    .bind(CHAIN.to_string())
    .bind(format!("{t20:#x}"))
    .execute(&env.pool)
    .await
    .unwrap();
    let rules = RuleStore::new(env.pool.clone());
    let bad: Vec<(serde_json::Value, &str)> = vec![
        (json!([]), "$: a rule must be an object"),
        (
            json!({"condition": erc20(t20, "1"), "mode": "x"}),
            "$.mode: unknown key",
        ),
        (
            json!({"condition": {"all": []}}),
            "$.condition.all: must be a non-empty array",
        ),
        (
            json!({"condition": {"any": [erc20(t20, "1"), {"erc20": {"chain_id": 1, "token": format!("{t20:#x}"), "min": "1"}}]}}),
            "$.condition.any[1].erc20.chain_id: chain 1 is not a chain tokenwarden indexes",
        ),
        (
            json!({"condition": {"all": [erc20(other, "1")]}}),
            "$.condition.all[0].erc20.token: token 0x9999999999999999999999999999999999999999 is not indexed on chain 31337",
        ),
        (
            json!({"condition": erc20(t721, "1")}),
            "$.condition.erc20.token: token is erc721, not erc20",
        ),
        (
            json!({"condition": erc20(t20, "0")}),
            "$.condition.erc20.min: must be greater than zero",
        ),
        (
            json!({"condition": erc20(t20, "0.0000001")}),
            "$.condition.erc20.min: min_amount \"0.0000001\" has 7 fractional digits but the token has only 6 decimals",
        ),
        (
            json!({"condition": {"at_least": {"k": 3, "of": [erc20(t20, "1"), erc20(t20, "2")]}}}),
            "$.condition.at_least.k: must be an integer from 1 to the number of conditions (2)",
        ),
        (
            json!({"condition": {"erc721": {"chain_id": CHAIN, "token": format!("{t721:#x}"), "min_count": 1, "token_id": "1"}}}),
            "$.condition.erc721: give exactly one of min_count and token_id",
        ),
        (
            json!({"condition": {"snapshot": {"snapshot_id": pending, "min": "1"}}}),
            "is pending, not complete",
        ),
        (
            json!({"condition": {"snapshot": {"snapshot_id": Uuid::new_v4(), "min": "1"}}}),
            "does not exist",
        ),
        (
            json!({"condition": {"held": {"chain_id": CHAIN, "token": format!("{t20:#x}"), "min": "1", "for_secs": 0}}}),
            "$.condition.held.for_secs: must be a whole number of seconds from 1 to 31622400",
        ),
        (
            json!({"condition": {"held": {"chain_id": CHAIN, "token": format!("{t20:#x}"), "min": "1", "since_block": -1}}}),
            "$.condition.held.since_block: must be a block number",
        ),
        (
            json!({"condition": {"held": {"chain_id": CHAIN, "token": format!("{t20:#x}"), "min": "1", "since_block": 1, "for_secs": 60}}}),
            "$.condition.held: give exactly one of since_block and for_secs",
        ),
        (
            json!({"condition": {"held": {"chain_id": CHAIN, "token": format!("{t721:#x}"), "min": "1", "since_block": 1}}}),
            "$.condition.held.token: token is erc721, not erc20",
        ),
        (
            json!({"condition": {"nope": 1}}),
            "$.condition.nope: unknown condition",
        ),
        (
            json!({"condition": erc20(t20, "1"), "stale_policy": "maybe"}),
            "$.stale_policy",
        ),
    ];
    for (rule, expected) in bad {
        match rules.set("creator-1", "CHAT", &rule, "test").await {
            Err(RuleError::Invalid(msg)) => {
                assert!(
                    msg.contains(expected),
                    "{kind:?}: {rule} → {msg:?}, expected {expected:?}"
                )
            }
            other => panic!("{kind:?}: {rule} was not refused: {other:?}"),
        }
    }
    assert!(
        rules.list(None).await.unwrap().is_empty(),
        "{kind:?}: nothing stored"
    );

    // Set, replace, delete: versions, the change log, and the announcement (NOTIFY).
    let mut listener = sqlx::postgres::PgListener::connect_with(&env.pool)
        .await
        .unwrap();
    listener.listen("tw_access_rules").await.unwrap();
    let v1 = json!({"condition": erc20(t20, "100")});
    let v2 = json!({"condition": {"any": [erc20(t20, "50"), {"erc721": {"chain_id": CHAIN, "token": format!("{t721:#x}"), "token_id": "7"}}]}, "per_wallet": true});
    assert_eq!(
        rules
            .set("creator-1", "CHAT", &v1, "alice@ops")
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        rules
            .set("creator-1", "CHAT", &v2, "bob@ops")
            .await
            .unwrap(),
        2
    );
    let listed = rules.list(Some("creator-1")).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].version, 2);
    assert_eq!(listed[0].rule["per_wallet"], json!(true));
    assert_eq!(
        listed[0].rule["stale_policy"],
        json!("deny"),
        "{kind:?}: the default is filled in"
    );
    assert!(
        rules
            .delete("creator-1", "CHAT", "carol@ops")
            .await
            .unwrap()
    );
    assert!(
        !rules
            .delete("creator-1", "CHAT", "carol@ops")
            .await
            .unwrap()
    );
    let history = rules.history("creator-1", "CHAT").await.unwrap();
    let who: Vec<&str> = history.iter().map(|c| c.changed_by.as_str()).collect();
    assert_eq!(who, ["alice@ops", "bob@ops", "carol@ops"], "{kind:?}");
    assert_eq!(history[0].old_rule, None);
    assert_eq!(
        history[1].old_rule.as_ref().map(|r| &r["condition"]),
        Some(&v1["condition"])
    );
    assert_eq!(history[2].new_rule, None);
    assert_eq!(history[2].old_version, Some(2));
    for expected in [json!(1), json!(2), serde_json::Value::Null] {
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), listener.recv())
            .await
            .expect("a notification")
            .unwrap();
        let payload: serde_json::Value = serde_json::from_str(n.payload()).unwrap();
        assert_eq!(payload["creator_id"], "creator-1");
        assert_eq!(payload["version"], expected, "{kind:?}");
    }

    // The service door: service_role sets and reads rules; users and anon do neither.
    let mut tx = begin_as(&env.pool, "service_role", None).await;
    let v: i32 =
        sqlx::query_scalar("SELECT public.access_set_rule('creator-2', 'CHAT', $1, 'edge-fn')")
            .bind(&v1)
            .fetch_one(&mut *tx)
            .await
            .unwrap_or_else(|e| panic!("{kind:?}: service_role sets a rule: {e}"));
    assert_eq!(v, 1);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM public.access_rule_changes")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(n, 4, "{kind:?}");
    let err =
        sqlx::query("SELECT public.access_set_rule('creator-2', 'CHAT', '[]'::jsonb, 'edge-fn')")
            .execute(&mut *tx)
            .await
            .expect_err("invalid");
    assert_eq!(sqlstate(&err).as_deref(), Some("22023"), "{kind:?}: {err}");
    drop(tx);
    for role in ["anon", "authenticated"] {
        let mut tx = begin_as(&env.pool, role, Some(Uuid::new_v4())).await;
        let err =
            sqlx::query("SELECT public.access_set_rule('creator-2', 'CHAT', '{}'::jsonb, 'x')")
                .execute(&mut *tx)
                .await
                .expect_err("not for users");
        assert_eq!(
            sqlstate(&err).as_deref(),
            Some("42501"),
            "{kind:?} {role}: {err}"
        );
        drop(tx);
        let mut tx = begin_as(&env.pool, role, Some(Uuid::new_v4())).await;
        let err = sqlx::query("SELECT * FROM public.access_rules")
            .execute(&mut *tx)
            .await
            .expect_err("rules are the service's");
        assert_eq!(
            sqlstate(&err).as_deref(),
            Some("42501"),
            "{kind:?} {role}: {err}"
        );
    }
}

use common::indexed::Indexed;

const TOKEN: u128 = 1_000_000_000_000_000_000; // 1 whole TT20 (18 decimals)

fn creator(feature: &str) -> Question {
    Question::Creator {
        creator_id: "creator-1".into(),
        feature: feature.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rule_kind_matches_anvil_truth() {
    let ix = Indexed::start(DbKind::Plain).await;
    let z = Address::ZERO;
    let (w1, w2, w3) = (
        Address::repeat_byte(0x01),
        Address::repeat_byte(0x02),
        Address::repeat_byte(0x03),
    );
    ix.erc20(&[(z, w1, 60 * TOKEN), (z, w2, 50 * TOKEN), (z, w3, 5 * TOKEN)])
        .await;
    ix.erc721(&[(z, w1, 7), (z, w2, 8), (z, w2, 9)]).await;
    let (alice, bob, nobody) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    ix.link(alice, w1).await;
    ix.link(alice, w2).await;
    ix.link(bob, w3).await;
    let rules = RuleStore::new(ix.env.pool.clone());
    let checker = AccessChecker::new(ix.env.pool.clone());
    let check = |user: Uuid, q: Question| {
        let checker = checker.clone();
        async move { checker.evaluate(user, &q).await.expect("decision") }
    };
    let set = |feature: &'static str, rule: serde_json::Value| {
        let rules = rules.clone();
        async move {
            rules
                .set("creator-1", feature, &rule, "test")
                .await
                .expect("set")
        }
    };

    // ERC-20, whole tokens, summed over alice's wallets: 60 + 50 = 110 >= 100.
    set("CHAT", json!({"condition": erc20(ix.t20, "100")})).await;
    let d = check(alice, creator("CHAT")).await;
    assert!(d.allowed, "{d:?}");
    assert_eq!(d.source, tokenwarden::access::Source::Index);
    let e = &d.evidence[0];
    let truth = ix.anvil.balance_of(ix.t20, w1).await + ix.anvil.balance_of(ix.t20, w2).await;
    assert_eq!(
        e.amount,
        Some(truth.to_string()),
        "the evidence is the chain's balance"
    );
    assert_eq!(e.minimum, (100 * TOKEN).to_string());
    assert_eq!(e.wallets.len(), 2);
    assert!(e.block.is_some() && d.as_of_block == e.block);
    assert_eq!(d.rule_version, Some(1));
    // Per wallet: no single wallet holds 100.
    set(
        "CHAT",
        json!({"condition": erc20(ix.t20, "100"), "per_wallet": true}),
    )
    .await;
    let d = check(alice, creator("CHAT")).await;
    assert_eq!((d.allowed, d.reason), (false, Some(DenyReason::NotMet)));
    assert_eq!(d.rule_version, Some(2));
    // Decimals: 5 whole tokens for bob, not 5.000000000000000001.
    set("DISCOUNT", json!({"condition": erc20(ix.t20, "5")})).await;
    assert!(check(bob, creator("DISCOUNT")).await.allowed);
    set(
        "DISCOUNT",
        json!({"condition": erc20(ix.t20, "5.000000000000000001")}),
    )
    .await;
    assert!(!check(bob, creator("DISCOUNT")).await.allowed);

    // ERC-721: count and a token id, against ownerOf.
    assert_eq!(ix.anvil.owner_of(ix.t721, U256::from(9)).await, Some(w2));
    let nft = |extra: serde_json::Value| {
        let mut leaf = json!({"chain_id": CHAIN, "token": format!("{:#x}", ix.t721)});
        leaf.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        json!({"erc721": leaf})
    };
    set("NFT", json!({"condition": nft(json!({"min_count": 3}))})).await;
    assert!(
        check(alice, creator("NFT")).await.allowed,
        "7, 8, 9 over two wallets"
    );
    set(
        "NFT",
        json!({"condition": nft(json!({"min_count": 3})), "per_wallet": true}),
    )
    .await;
    assert!(!check(alice, creator("NFT")).await.allowed);
    set("NFT", json!({"condition": nft(json!({"token_id": "9"}))})).await;
    assert!(check(alice, creator("NFT")).await.allowed);
    assert!(!check(bob, creator("NFT")).await.allowed);

    // at_least 2 of 3, any, all.
    set(
        "AFFILIATE",
        json!({"condition": {"at_least": {"k": 2, "of": [
        erc20(ix.t20, "1"), nft(json!({"token_id": "7"})), nft(json!({"min_count": 10}))]}}}),
    )
    .await;
    let d = check(alice, creator("AFFILIATE")).await;
    assert!(d.allowed);
    assert_eq!(d.evidence.len(), 3);
    assert_eq!(d.evidence[2].path, "$.condition.at_least.of[2].erc721");
    assert!(!d.evidence[2].passed);
    assert!(
        !check(bob, creator("AFFILIATE")).await.allowed,
        "bob meets 1 of 3"
    );

    // A snapshot leaf: taken from the index, then the balances move; the snapshot does not.
    ix.anvil.mine(3).await;
    ix.synced().await;
    let head = {
        use alloy::providers::Provider;
        ix.anvil.provider.get_block_number().await.unwrap()
    };
    let service = tokenwarden::snapshots::SnapshotService::from_config(
        ix.env.pool.clone(),
        &ix.env.config().snapshots,
    )
    .unwrap();
    let snap = service
        .create(
            &tokenwarden::snapshots::SnapshotRequest::new(
                None,
                tokenwarden::snapshots::SnapshotSource::Index,
                &CHAIN.to_string(),
                &format!("{:#x}", ix.t20),
                Some(head - 2),
            )
            .unwrap(),
        )
        .await
        .expect("snapshot");
    ix.erc20(&[(w3, z, 5 * TOKEN)]).await;
    set(
        "WHITELIST",
        json!({"condition": {"snapshot": {"snapshot_id": snap.snapshot_id, "min": "5"}}}),
    )
    .await;
    let d = check(bob, creator("WHITELIST")).await;
    assert!(d.allowed, "bob held 5 at the snapshot: {d:?}");
    assert_eq!(d.source, tokenwarden::access::Source::Snapshot);
    assert_eq!(d.as_of_block, Some(head - 2));
    set("CHAT2", json!({"condition": erc20(ix.t20, "5")})).await;
    assert!(
        !check(bob, creator("CHAT2")).await.allowed,
        "but holds 0 now"
    );

    // No wallet, no rule, the seed's default (hold >= 1 of the token named in the check).
    assert_eq!(
        check(nobody, creator("CHAT")).await.reason,
        Some(DenyReason::NoWallet)
    );
    assert_eq!(
        check(alice, creator("UNKNOWN")).await.reason,
        Some(DenyReason::NoRule)
    );
    let seed = |user| {
        check(
            user,
            Question::Token {
                chain_id: CHAIN,
                token: ix.t20,
                feature: "CHAT".into(),
            },
        )
    };
    let d = seed(alice).await;
    assert!(d.allowed);
    assert_eq!(d.rule_version, Some(0), "the default, not a stored rule");
    assert_eq!(d.evidence[0].minimum, TOKEN.to_string());
    assert!(!seed(bob).await.allowed, "bob burned his");

    // Stale: a lagging head, then a fault; deny by default, evaluate when the rule says so.
    let cp: i64 =
        sqlx::query_scalar("SELECT block_number FROM public.chain_checkpoints WHERE chain_id = $1")
            .bind(CHAIN as i64)
            .fetch_one(&ix.env.pool)
            .await
            .unwrap();
    tokenwarden::access::heads::record(&ix.env.pool, CHAIN, cp as u64 + 1000)
        .await
        .unwrap();
    set("CHAT", json!({"condition": erc20(ix.t20, "100")})).await;
    let d = check(alice, creator("CHAT")).await;
    assert_eq!(
        (d.allowed, d.reason, d.stale),
        (false, Some(DenyReason::Stale), true)
    );
    assert!(
        d.evidence[0]
            .stale
            .as_deref()
            .unwrap_or("")
            .contains("blocks behind"),
        "{d:?}"
    );
    set(
        "CHAT",
        json!({"condition": erc20(ix.t20, "100"), "stale_policy": "evaluate"}),
    )
    .await;
    let d = check(alice, creator("CHAT")).await;
    assert_eq!((d.allowed, d.stale), (true, true));
    tokenwarden::access::heads::record(&ix.env.pool, CHAIN, cp as u64)
        .await
        .unwrap();
    assert!(!check(alice, creator("CHAT")).await.stale);

    // Batch: many users, one rule, in order.
    let batch = checker
        .evaluate_batch(&[alice, bob, nobody], "creator-1", "CHAT")
        .await
        .unwrap();
    let got: Vec<(bool, Option<DenyReason>)> = batch
        .iter()
        .map(|d: &Decision| (d.allowed, d.reason))
        .collect();
    assert_eq!(
        got,
        [
            (true, None),
            (false, Some(DenyReason::NotMet)),
            (false, Some(DenyReason::NoWallet))
        ]
    );

    // The queue door's batch (many questions, one statement) gives each question the decision
    // it gets alone: every leaf kind above, both forms, no rule, no wallet, the default.
    let token_form = Question::Token {
        chain_id: CHAIN,
        token: ix.t20,
        feature: "CHAT".into(),
    };
    let mut asked = Vec::new();
    for user in [alice, bob, nobody] {
        for feature in [
            "CHAT",
            "DISCOUNT",
            "NFT",
            "AFFILIATE",
            "WHITELIST",
            "CHAT2",
            "UNKNOWN",
        ] {
            asked.push((user, creator(feature)));
        }
        asked.push((user, token_form.clone()));
    }
    let pairs: Vec<(Uuid, &Question)> = asked.iter().map(|(u, q)| (*u, q)).collect();
    let many = checker.evaluate_many(&pairs).await.expect("batch");
    assert_eq!(many.len(), asked.len());
    for ((user, q), got) in asked.iter().zip(many) {
        let alone = check(*user, q.clone()).await;
        assert_eq!(
            Decision {
                checked_at: alone.checked_at,
                ..got
            },
            alone,
            "{q:?} for {user}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sql_doors_give_the_same_decision_to_the_right_callers_only() {
    for kind in DbKind::ALL {
        let ix = Indexed::start(kind).await;
        let z = Address::ZERO;
        let w = Address::repeat_byte(0x0a);
        ix.erc20(&[(z, w, 10 * TOKEN)]).await;
        let alice = Uuid::new_v4();
        ix.link(alice, w).await;
        RuleStore::new(ix.env.pool.clone())
            .set(
                "creator-1",
                "CHAT",
                &json!({"condition": erc20(ix.t20, "10")}),
                "test",
            )
            .await
            .unwrap();
        let rust = AccessChecker::new(ix.env.pool.clone())
            .evaluate(alice, &creator("CHAT"))
            .await
            .unwrap();
        assert!(rust.allowed);
        let strip = |mut v: serde_json::Value| {
            v.as_object_mut().unwrap().remove("checked_at");
            v
        };
        let rust_json = strip(serde_json::to_value(&rust).unwrap());

        let mut tx = begin_as(&ix.env.pool, "authenticated", Some(alice)).await;
        let own: serde_json::Value =
            sqlx::query_scalar("SELECT public.verify_access('creator-1', 'CHAT')")
                .fetch_one(&mut *tx)
                .await
                .unwrap_or_else(|e| panic!("{kind:?}: verify_access: {e}"));
        let own: Decision = serde_json::from_value(own).unwrap();
        assert_eq!(
            strip(serde_json::to_value(&own).unwrap()),
            rust_json,
            "{kind:?}: same decision"
        );
        let seed: serde_json::Value =
            sqlx::query_scalar("SELECT public.verify_token_access($1, $2, 'CHAT')")
                .bind(CHAIN as i64)
                .bind(format!("{:#x}", ix.t20))
                .fetch_one(&mut *tx)
                .await
                .unwrap();
        assert_eq!(seed["allowed"], json!(true), "{kind:?}");
        drop(tx);
        // A user cannot ask about someone else, nor use the batch.
        for f in [
            "SELECT public.verify_access_for(gen_random_uuid(), 'creator-1', 'CHAT')",
            "SELECT * FROM public.verify_access_batch(ARRAY[gen_random_uuid()], 'creator-1', 'CHAT')",
            "SELECT public.verify_token_access_for(gen_random_uuid(), 1, '0x', 'CHAT')",
        ] {
            let mut tx = begin_as(&ix.env.pool, "authenticated", Some(alice)).await;
            let err = sqlx::query(sqlx::AssertSqlSafe(f))
                .execute(&mut *tx)
                .await
                .expect_err("denied");
            assert_eq!(
                sqlstate(&err).as_deref(),
                Some("42501"),
                "{kind:?} {f}: {err}"
            );
        }
        let mut tx = begin_as(&ix.env.pool, "anon", None).await;
        let err = sqlx::query("SELECT public.verify_access('creator-1', 'CHAT')")
            .execute(&mut *tx)
            .await
            .expect_err("anon may not");
        assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{kind:?}: {err}");
        drop(tx);
        let mut tx = begin_as(&ix.env.pool, "authenticated", None).await;
        let err = sqlx::query("SELECT public.verify_access('creator-1', 'CHAT')")
            .execute(&mut *tx)
            .await
            .expect_err("not signed in");
        assert_eq!(sqlstate(&err).as_deref(), Some("28000"), "{kind:?}: {err}");
        drop(tx);
        // Trusted server code asks about anyone, singly or in a batch.
        let mut tx = begin_as(&ix.env.pool, "service_role", None).await;
        let theirs: serde_json::Value =
            sqlx::query_scalar("SELECT public.verify_access_for($1, 'creator-1', 'CHAT')")
                .bind(alice)
                .fetch_one(&mut *tx)
                .await
                .unwrap();
        assert_eq!(strip(theirs), rust_json, "{kind:?}");
        let batch: Vec<(Uuid, serde_json::Value)> = sqlx::query_as(
            "SELECT user_id, decision FROM public.verify_access_batch($1, 'creator-1', 'CHAT')",
        )
        .bind(vec![Uuid::new_v4(), alice])
        .fetch_all(&mut *tx)
        .await
        .unwrap();
        assert_eq!(batch[1].0, alice);
        assert_eq!(batch[0].1["reason"], json!("no_wallet"));
        assert_eq!(batch[1].1["allowed"], json!(true), "{kind:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rule_and_check_jobs_reply_and_refuse_bad_input_with_its_reason() {
    use tokenwarden::access::rule_job::AccessRuleHandler;
    use tokenwarden::queue::{JobError, JobHandler};

    let ix = Indexed::start(DbKind::Plain).await;
    let w = Address::repeat_byte(0x0b);
    ix.erc20(&[(Address::ZERO, w, 3 * TOKEN)]).await;
    let user = Uuid::new_v4();
    ix.link(user, w).await;
    let rule_job = AccessRuleHandler::new(std::sync::Arc::new(RuleStore::new(ix.env.pool.clone())));
    let check_job = VerifyAccessHandler::new(
        std::sync::Arc::new(tokenwarden::access::service::AccessService::new(
            AccessChecker::new(ix.env.pool.clone()),
            None,
        )),
        AuditRecorder::spawn(ix.env.pool.clone(), &audit_config(10)).0,
    );
    let id = Uuid::new_v4();
    let reply = rule_job
        .handle(json!({"request_id": id, "action": "set", "creator_id": "c", "feature": "CHAT",
                       "rule": {"condition": {"all": [erc20(ix.t20, "3"), {"any": []}]}}, "actor": "job"}))
        .await
        .expect("an invalid rule is a reply");
    assert_eq!(reply["status"], "invalid");
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("$.condition.all[1].any"),
        "{reply}"
    );
    let reply = rule_job
        .handle(
            json!({"request_id": id, "action": "set", "creator_id": "c", "feature": "CHAT",
                       "rule": {"condition": erc20(ix.t20, "3")}, "actor": "job"}),
        )
        .await
        .unwrap();
    assert_eq!(
        (reply["status"].clone(), reply["version"].clone()),
        (json!("set"), json!(1))
    );
    let reply = check_job
        .handle(json!({"request_id": id, "user_id": user, "creator_id": "c", "feature": "CHAT"}))
        .await
        .unwrap();
    assert_eq!(
        (reply["allowed"].clone(), reply["request_id"].clone()),
        (json!(true), json!(id))
    );
    assert_eq!(
        reply["evidence"][0]["amount"],
        json!((3 * TOKEN).to_string())
    );
    let reply = check_job
        .handle(json!({"request_id": id, "user_id": user, "chain_id": CHAIN, "token": format!("{:#x}", ix.t20), "feature": "CHAT"}))
        .await
        .unwrap();
    assert_eq!(reply["allowed"], json!(true), "the seed's form");
    for bad in [
        json!({"request_id": id, "user_id": user, "feature": "CHAT"}),
        json!({"request_id": id, "user_id": user, "creator_id": "c", "chain_id": 1, "token": "0x", "feature": "CHAT"}),
        json!({"request_id": id, "user_id": user, "chain_id": 1, "token": "0x12", "feature": "CHAT"}),
        json!({"request_id": id, "user_id": "bob", "creator_id": "c", "feature": "CHAT"}),
    ] {
        match check_job.handle(bad.clone()).await {
            Err(JobError::Rejected(r)) => assert!(r.contains("verify_access"), "{r}"),
            other => panic!("{bad} not rejected: {other:?}"),
        }
    }
    let reply = rule_job
        .handle(json!({"request_id": id, "action": "delete", "creator_id": "c", "feature": "CHAT", "actor": "job"}))
        .await
        .unwrap();
    assert_eq!(reply["status"], "deleted");
    match rule_job
        .handle(json!({"request_id": id, "action": "delete", "creator_id": "c", "feature": "CHAT", "actor": "job", "rule": {}}))
        .await
    {
        Err(JobError::Rejected(r)) => assert!(r.contains("takes no rule"), "{r}"),
        other => panic!("not rejected: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Cache
// ---------------------------------------------------------------------------------------------

use tokenwarden::access::Source;
use tokenwarden::access::cache::{DecisionCache, Lookup, rule_key};
use tokenwarden::access::service::AccessService;

async fn head(ix: &Indexed) -> u64 {
    use alloy::providers::Provider;
    ix.anvil.provider.get_block_number().await.expect("head")
}

/// One worker replica's check path: its own connections, memory cache and listeners.
struct Replica {
    service: AccessService,
    cache: std::sync::Arc<DecisionCache>,
    processed: tokio::sync::watch::Receiver<u64>,
    balance_block: tokio::sync::watch::Receiver<u64>,
    _ctx: tokenwarden::app::AppContext,
}

impl Replica {
    async fn start(ix: &Indexed) -> Replica {
        let ctx = tokenwarden::app::AppContext::connect((*ix.ctx.cfg).clone())
            .await
            .expect("replica connects");
        let cache = std::sync::Arc::new(DecisionCache::new(
            ctx.redis.clone(),
            &ctx.cfg.redis.prefix,
            &ctx.cfg.access,
        ));
        let inv = tokenwarden::access::invalidation::spawn(&ctx, cache.clone());
        Replica {
            service: AccessService::new(AccessChecker::new(ctx.pool.clone()), Some(cache.clone())),
            cache,
            processed: inv.processed,
            balance_block: inv.balance_block,
            _ctx: ctx,
        }
    }

    /// A check as the queue door makes it: the decision, once it is cached.
    async fn check(&self, user: Uuid) -> Decision {
        let (decision, cached) = self
            .service
            .verify(user, &creator("CHAT"))
            .await
            .expect("decision");
        cached.written().await;
        decision
    }

    fn processed(&self) -> u64 {
        *self.processed.borrow()
    }

    /// Waits until this replica acted on a balance change of block `block` or later.
    async fn acted_on_block(&self, block: u64) {
        let mut rx = self.balance_block.clone();
        tokio::time::timeout(
            std::time::Duration::from_secs(20),
            rx.wait_for(|b| *b >= block),
        )
        .await
        .expect("the replica acts on the announcement")
        .expect("listener alive");
    }

    async fn processed_more_than(&self, n: u64) {
        let mut rx = self.processed.clone();
        tokio::time::timeout(std::time::Duration::from_secs(20), rx.wait_for(|v| *v > n))
            .await
            .expect("the replica processes the announcement")
            .expect("listener alive");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_replica_answers_allowed_from_a_cache_after_a_transfer_the_worker_was_told_about() {
    let ix = Indexed::start(DbKind::Plain).await;
    let (w, elsewhere) = (Address::repeat_byte(0x0c), Address::repeat_byte(0x0d));
    let kept = Address::repeat_byte(0x0e);
    ix.erc20(&[
        (Address::ZERO, w, 10 * TOKEN),
        (Address::ZERO, kept, 10 * TOKEN),
    ])
    .await;
    let (member, keeper) = (Uuid::new_v4(), Uuid::new_v4());
    ix.link(member, w).await;
    ix.link(keeper, kept).await;
    RuleStore::new(ix.env.pool.clone())
        .set(
            "creator-1",
            "CHAT",
            &json!({"condition": erc20(ix.t20, "5")}),
            "test",
        )
        .await
        .unwrap();
    let (a, b) = (Replica::start(&ix).await, Replica::start(&ix).await);
    // Both listeners are subscribed once each has processed one (empty) announcement.
    let redis = ix.env.redis().await;
    common::wait_until(
        std::time::Duration::from_secs(20),
        "both replicas listen",
        || {
            let mut redis = redis.clone();
            let (pa, pb) = (a.processed(), b.processed());
            let channel = format!("{}:balance_changes", ix.env.redis_prefix);
            async move {
                let _: i64 = redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(r#"{"chain_id":0,"token":"0x","holders":[],"block":0}"#)
                    .query_async(&mut redis)
                    .await
                    .unwrap();
                (pa > 0 && pb > 0).then_some(())
            }
        },
    )
    .await;

    let first = a.check(member).await;
    assert_eq!((first.allowed, first.source), (true, Source::Index));
    let again = a.check(member).await;
    assert_eq!(
        (again.allowed, again.source),
        (true, Source::Cache),
        "memory hit"
    );
    let other = b.check(member).await;
    assert_eq!(
        (other.allowed, other.source),
        (true, Source::Cache),
        "shared through Redis"
    );
    assert_eq!(other.evidence, first.evidence);
    assert!(b.check(keeper).await.allowed);
    assert_eq!(b.check(keeper).await.source, Source::Cache);

    // The member sends everything away. From the moment replica A acted on the announcement,
    // neither replica answers from a cache — B included, whose own listener may lag.
    let seen = a.processed();
    ix.anvil
        .send(
            ix.t20,
            Anvil::erc20_batch(&[(w, elsewhere, U256::from(10 * TOKEN))]),
        )
        .await;
    a.processed_more_than(seen).await;
    let after_b = b.check(member).await;
    assert_eq!(
        (after_b.allowed, after_b.source, after_b.reason),
        (false, Source::Index, Some(DenyReason::NotMet)),
        "{after_b:?}"
    );
    // Checks that arrive together share one Redis read of their epochs: each still sees its
    // own. The member is never allowed (from a cache or not); the keeper, whose wallet did not
    // change, is still answered from the cache in the same batches.
    let b_ref = &b;
    let together = futures::future::join_all((0..40).map(|i| {
        let user = if i % 2 == 0 { member } else { keeper };
        async move { (user, b_ref.check(user).await) }
    }))
    .await;
    for (user, d) in together {
        if user == member {
            assert!(!d.allowed, "{d:?}");
        } else {
            assert_eq!((d.allowed, d.source), (true, Source::Cache), "{d:?}");
        }
    }
    // Once B's own listener has acted too (its bump may come after the check above and drop
    // that entry), the next denial it computes is the one both replicas read from the cache.
    b.acted_on_block(head(&ix).await).await;
    let again_b = b.check(member).await;
    assert!(!again_b.allowed, "{again_b:?}");
    let after_a = a.check(member).await;
    assert!(!after_a.allowed, "{after_a:?}");
    assert_eq!(
        after_a.source,
        Source::Cache,
        "the denial is cached in turn"
    );

    // A rule change evicts that rule's decisions everywhere.
    let seen = b.processed();
    RuleStore::new(ix.env.pool.clone())
        .set(
            "creator-1",
            "CHAT",
            &json!({"condition": erc20(ix.t20, "0.5"), "stale_policy": "deny"}),
            "test",
        )
        .await
        .unwrap();
    b.processed_more_than(seen).await;
    let d = a.check(member).await;
    assert_eq!((d.source, d.rule_version), (Source::Index, Some(2)));

    // An unlink (through the job) evicts the user's decisions.
    ix.erc20(&[(Address::ZERO, w, TOKEN)]).await;
    a.acted_on_block(head(&ix).await).await;
    let mut jobs = tokenwarden::queue::JobRegistry::new();
    tokenwarden::access::jobs::register(
        &mut jobs,
        std::sync::Arc::new(linker(&ix.env, &ix.anvil.url)),
        Some(a.cache.clone()),
    );
    assert!(b.check(member).await.allowed);
    assert_eq!(b.check(member).await.source, Source::Cache);
    jobs.get("unlink_wallet")
        .unwrap()
        .handle(
            json!({"request_id": Uuid::new_v4(), "user_id": member, "address": format!("{w:#x}")}),
        )
        .await
        .unwrap();
    let d = b.check(member).await;
    assert_eq!(
        (d.allowed, d.reason, d.source),
        (false, Some(DenyReason::NoWallet), Source::Index)
    );
    drop(redis);
}

#[tokio::test]
async fn a_decision_computed_before_an_eviction_is_not_stored_after_it() {
    let env = TestEnv::new().await;
    let cfg = env.config();
    let ctx = tokenwarden::app::AppContext::connect(cfg).await.unwrap();
    let cache = DecisionCache::new(ctx.redis.clone(), &ctx.cfg.redis.prefix, &ctx.cfg.access);
    let user = Uuid::new_v4();
    let rule = rule_key("creator-1", "CHAT");
    let Lookup::Miss(epochs) = cache.get(user, &rule).await.unwrap() else {
        panic!("empty cache hit");
    };
    let decision: Decision = serde_json::from_value(json!({
        "allowed": true, "reason": null, "user_id": user, "creator_id": "creator-1", "feature": "CHAT",
        "rule_version": 1, "source": "index", "as_of_block": 1, "stale": false, "evidence": [],
        "checked_at": "2026-12-01T00:00:00Z"}))
    .unwrap();
    // The balance changes (and is announced) while the decision is being computed.
    cache.evict_users(&[user]).await.unwrap();
    cache.put(user, &rule, epochs, &decision).await.unwrap();
    assert!(
        matches!(cache.get(user, &rule).await.unwrap(), Lookup::Miss(_)),
        "not stored"
    );
    // Computed after the eviction: stored, then dropped by a rule change.
    let Lookup::Miss(epochs) = cache.get(user, &rule).await.unwrap() else {
        panic!()
    };
    cache.put(user, &rule, epochs, &decision).await.unwrap();
    match cache.get(user, &rule).await.unwrap() {
        Lookup::Hit(d) => assert_eq!(d.source, Source::Cache),
        Lookup::Miss(_) => panic!("stored"),
    }
    cache.evict_rule(&rule).await.unwrap();
    assert!(matches!(
        cache.get(user, &rule).await.unwrap(),
        Lookup::Miss(_)
    ));
}

#[tokio::test]
async fn the_memory_cache_stays_within_its_size_cap() {
    let env = TestEnv::new().await;
    let mut cfg = env.config();
    cfg.access.cache_memory_max_mib = 1;
    let ctx = tokenwarden::app::AppContext::connect(cfg).await.unwrap();
    let cache = DecisionCache::new(ctx.redis.clone(), &ctx.cfg.redis.prefix, &ctx.cfg.access);
    let rule = rule_key("creator-1", "CHAT");
    // 2,000 decisions with one erc20 leaf each (~1.5 KB weighed): about 3 MiB offered.
    for _ in 0..2_000 {
        let user = Uuid::new_v4();
        let decision: Decision = serde_json::from_value(json!({
            "allowed": true, "reason": null, "user_id": user, "creator_id": "creator-1",
            "feature": "CHAT", "rule_version": 1, "source": "index", "as_of_block": 1000,
            "stale": false, "checked_at": "2026-12-01T00:00:00Z",
            "evidence": [{"path": "$.condition.erc20", "kind": "erc20", "chain_id": 990001,
                "token": "0x00000000000000000000000000000000000b1600",
                "minimum": "8000000000000000000", "amount": "196000000000000000000",
                "wallets": [{"address": "0x0000000000000000000000000000000000100005",
                             "amount": "196000000000000000000"}],
                "block": 1000, "source": "index", "passed": true}]}))
        .unwrap();
        let Lookup::Miss(epochs) = cache.get(user, &rule).await.unwrap() else {
            panic!("a new user is a miss");
        };
        cache.put(user, &rule, epochs, &decision).await.unwrap();
    }
    let held = cache.memory_bytes().await;
    // Weighed in bytes (not counted in entries) and full up to about the cap.
    assert!(held > 512 * 1024, "{held} bytes held");
    assert!(held <= 1024 * 1024, "{held} bytes held, cap 1 MiB");
}

// ---------------------------------------------------------------------------------------------
// Audit (the seed's VerificationAuditService) and the storm rule
// ---------------------------------------------------------------------------------------------

use tokenwarden::access::audit::AuditRecorder;
use tokenwarden::access::check_job::VerifyAccessHandler;

/// One `access_checks` row as a test reads it.
#[derive(Debug, sqlx::FromRow)]
struct AuditRow {
    door: String,
    source: String,
    allowed: bool,
    reason: Option<String>,
    rule_version: Option<i32>,
    request_id: Option<Uuid>,
    caller_ip: Option<String>,
    user_agent: Option<String>,
    evidence: serde_json::Value,
}

async fn audit_rows(pool: &PgPool, user: Uuid) -> Vec<AuditRow> {
    sqlx::query_as(
        "SELECT door, source, allowed, reason, rule_version, request_id, host(caller_ip) AS caller_ip, \
                user_agent, evidence \
           FROM public.access_checks WHERE user_id = $1 ORDER BY id",
    )
    .bind(user)
    .fetch_all(pool)
    .await
    .expect("read the audit")
}

fn audit_config(max_batch: usize) -> tokenwarden::config::AuditConfig {
    tokenwarden::config::AuditConfig {
        max_batch,
        retention_days: 30,
        prune_batch_rows: 10,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_queue_decision_is_recorded_in_batches_before_its_reply_cached_ones_too() {
    let env = TestEnv::new().await;
    let ctx = env.app_context(&[]).await;
    let cache = std::sync::Arc::new(DecisionCache::new(
        ctx.redis.clone(),
        &ctx.cfg.redis.prefix,
        &ctx.cfg.access,
    ));
    let (audit, _task) = AuditRecorder::spawn(env.pool.clone(), &audit_config(500));
    let job = VerifyAccessHandler::new(
        std::sync::Arc::new(AccessService::new(
            AccessChecker::new(env.pool.clone()),
            Some(cache),
        )),
        audit,
    );
    use tokenwarden::queue::{JobError, JobHandler};
    let user = Uuid::new_v4();
    let id = Uuid::new_v4();
    let reply = job
        .handle(json!({"request_id": id, "user_id": user, "creator_id": "nobody", "feature": "CHAT",
                       "caller_ip": "203.0.113.7", "user_agent": format!("app/1.0\n{}", "x".repeat(600))}))
        .await
        .expect("decision");
    assert_eq!(reply["reason"], json!("no_rule"));
    // The reply exists only once the record is committed: read it now, no waiting.
    let rows = audit_rows(&env.pool, user).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let r = &rows[0];
    assert_eq!(
        (
            r.door.as_str(),
            r.source.as_str(),
            r.allowed,
            r.reason.as_deref()
        ),
        ("queue", "index", false, Some("no_rule"))
    );
    assert_eq!(r.request_id, Some(id));
    assert_eq!(r.rule_version, None);
    assert_eq!(r.caller_ip.as_deref(), Some("203.0.113.7"));
    let ua = r.user_agent.as_deref().unwrap();
    assert!(
        ua.starts_with("app/1.0x") && ua.chars().count() == 512,
        "{ua}"
    );
    assert_eq!(r.evidence, json!([]));
    // The same question again is answered from the cache, and recorded as such.
    let again = Uuid::new_v4();
    let reply = job
        .handle(json!({"request_id": again, "user_id": user, "creator_id": "nobody", "feature": "CHAT"}))
        .await
        .expect("decision");
    assert_eq!(reply["source"], json!("cache"));
    let rows = audit_rows(&env.pool, user).await;
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (
            rows[1].source.as_str(),
            rows[1].request_id,
            rows[1].caller_ip.as_deref()
        ),
        ("cache", Some(again), None)
    );
    // A bad caller IP is refused with its reason and nothing is recorded for it.
    match job
        .handle(
            json!({"request_id": Uuid::new_v4(), "user_id": user, "creator_id": "nobody",
                       "feature": "CHAT", "caller_ip": "999.1.1.1"}),
        )
        .await
    {
        Err(JobError::Rejected(r)) => assert!(r.contains("caller_ip"), "{r}"),
        other => panic!("not rejected: {other:?}"),
    }
    assert_eq!(audit_rows(&env.pool, user).await.len(), 2);
    // Many checks at once: every one recorded, in fewer INSERTs (transactions) than checks.
    let crowd: Vec<Uuid> = (0..60).map(|_| Uuid::new_v4()).collect();
    let replies = futures::future::join_all(crowd.iter().map(|u| {
        job.handle(json!({"request_id": Uuid::new_v4(), "user_id": u, "creator_id": "c2", "feature": "CHAT"}))
    }))
    .await;
    assert!(replies.iter().all(|r| r.is_ok()));
    let (rows, transactions): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT xmin::text) FROM public.access_checks WHERE user_id = ANY($1)",
    )
    .bind(&crowd)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(rows, 60);
    assert!(
        transactions < 60,
        "batched: {transactions} transactions for 60 checks"
    );
}

/// A queue reply means the decision is in the shared cache: another replica asked right after
/// the reply answers from it. Redis holds every write for a second while the first check runs
/// (`CLIENT PAUSE … WRITE`, on a Redis of this test's own; reads go on), so a reply that did not
/// wait for its cache write would come back while that write is still held, and the second
/// replica, on its own connection, would miss it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_reply_comes_after_its_decision_is_in_the_shared_cache() {
    use tokenwarden::queue::JobHandler;
    let redis = common::ops::RedisServer::start().await;
    let env = TestEnv::new().await;
    let url = redis.url();
    let replica = || async {
        let ctx = env
            .app_context(&[("TOKENWARDEN__REDIS__URL", url.as_str())])
            .await;
        let cache = std::sync::Arc::new(DecisionCache::new(
            ctx.redis.clone(),
            &ctx.cfg.redis.prefix,
            &ctx.cfg.access,
        ));
        let service = AccessService::new(AccessChecker::new(env.pool.clone()), Some(cache));
        (ctx, service)
    };
    let (_ctx_a, service_a) = replica().await;
    let (_ctx_b, service_b) = replica().await;
    let (audit, _task) = AuditRecorder::spawn(env.pool.clone(), &audit_config(500));
    let job = VerifyAccessHandler::new(std::sync::Arc::new(service_a), audit);

    let user = Uuid::new_v4();
    let question = Question::Creator {
        creator_id: "nobody".into(),
        feature: "CHAT".into(),
    };
    let mut admin = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1_000)
        .arg("WRITE")
        .query_async(&mut admin)
        .await
        .unwrap();
    let reply = job
        .handle(json!({"request_id": Uuid::new_v4(), "user_id": user,
                       "creator_id": "nobody", "feature": "CHAT"}))
        .await
        .expect("decision");
    assert_eq!(reply["source"], json!("index"), "{reply}");
    let (other, _) = service_b.verify(user, &question).await.expect("decision");
    assert_eq!(
        other.source,
        Source::Cache,
        "the other replica, asked right after the reply: {other:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sql_doors_record_their_decisions_and_users_read_only_their_own_checks() {
    for kind in DbKind::ALL {
        let env = TestEnv::on(kind).await;
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        // A signed-in user through PostgREST (which sets request.headers).
        let mut tx = begin_as(&env.pool, "authenticated", Some(alice)).await;
        sqlx::query("SELECT set_config('request.headers', $1, true)")
            .bind(json!({"x-forwarded-for": "198.51.100.4, 10.0.0.1", "user-agent": "supabase-js/2\u{1}"}).to_string())
            .execute(&mut *tx)
            .await
            .unwrap();
        let d: serde_json::Value = sqlx::query_scalar("SELECT public.verify_access('c', 'CHAT')")
            .fetch_one(&mut *tx)
            .await
            .unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        assert_eq!(d["reason"], json!("no_rule"));
        tx.commit().await.unwrap();
        // Trusted server code, singly and in a batch (one insert for the batch).
        let mut tx = begin_as(&env.pool, "service_role", None).await;
        sqlx::query("SELECT public.verify_access_for($1, 'c', 'CHAT')")
            .bind(bob)
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::query("SELECT * FROM public.verify_access_batch($1, 'c', 'CHAT')")
            .bind(vec![alice, bob, bob])
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let a = audit_rows(&env.pool, alice).await;
        let b = audit_rows(&env.pool, bob).await;
        assert_eq!((a.len(), b.len()), (2, 3), "{kind:?}");
        assert!(
            a.iter()
                .chain(&b)
                .all(|r| r.door == "sql" && r.reason.as_deref() == Some("no_rule"))
        );
        assert_eq!(a[0].caller_ip.as_deref(), Some("198.51.100.4"), "{kind:?}");
        assert_eq!(
            a[0].user_agent.as_deref(),
            Some("supabase-js/2"),
            "{kind:?}"
        );
        assert_eq!(
            (a[1].caller_ip.as_deref(), a[1].user_agent.as_deref()),
            (None, None)
        );

        // RLS: alice reads her own checks only; service_role reads all; anon nothing; no API
        // role writes.
        let mut tx = begin_as(&env.pool, "authenticated", Some(alice)).await;
        let users: Vec<Uuid> =
            sqlx::query_scalar("SELECT DISTINCT user_id FROM public.access_checks")
                .fetch_all(&mut *tx)
                .await
                .unwrap();
        assert_eq!(users, vec![alice], "{kind:?}");
        let err = sqlx::query(
            "INSERT INTO public.access_checks (decided_at, user_id, creator_id, feature, allowed, source, door, stale, evidence) \
             VALUES (now(), $1, 'c', 'CHAT', true, 'index', 'sql', false, '[]')",
        )
        .bind(alice)
        .execute(&mut *tx)
        .await
        .expect_err("users do not write their audit");
        assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{kind:?}: {err}");
        drop(tx);
        let mut tx = begin_as(&env.pool, "service_role", None).await;
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM public.access_checks")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(n, 5, "{kind:?}");
        let err = sqlx::query("DELETE FROM public.access_checks")
            .execute(&mut *tx)
            .await
            .expect_err("service_role does not rewrite the audit");
        assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{kind:?}: {err}");
        drop(tx);
        let mut tx = begin_as(&env.pool, "anon", None).await;
        let err = sqlx::query("SELECT count(*) FROM public.access_checks")
            .execute(&mut *tx)
            .await
            .expect_err("anon reads no checks");
        assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{kind:?}: {err}");
    }
}

/// The SQL doors' record skips its own WAL flush only when it is the transaction's only write:
/// a check alone commits with `synchronous_commit = off`; a transaction that wrote before the
/// check, or writes another table after it, commits with the caller's setting (the commit-time
/// guard, fired here early with `SET CONSTRAINTS ALL IMMEDIATE` so the test can read it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sql_door_check_alone_commits_without_a_flush_and_other_writes_stay_durable() {
    async fn setting(tx: &mut sqlx::PgConnection) -> String {
        sqlx::query_scalar("SELECT current_setting('synchronous_commit')")
            .fetch_one(tx)
            .await
            .unwrap()
    }
    async fn fire_guard(tx: &mut sqlx::PgConnection) {
        sqlx::query("SET CONSTRAINTS ALL IMMEDIATE")
            .execute(tx)
            .await
            .unwrap();
    }
    for kind in DbKind::ALL {
        let env = TestEnv::on(kind).await;
        let user = Uuid::new_v4();
        let check = "SELECT public.verify_access_for($1, 'c', 'CHAT')";

        // A check alone (PostgREST's one call per transaction): asynchronous commit.
        let mut tx = begin_as(&env.pool, "service_role", None).await;
        assert_eq!(setting(&mut tx).await, "on", "{kind:?}");
        sqlx::query(check)
            .bind(user)
            .execute(&mut *tx)
            .await
            .unwrap();
        assert_eq!(setting(&mut tx).await, "off", "{kind:?}: the check alone");
        fire_guard(&mut tx).await;
        assert_eq!(
            setting(&mut tx).await,
            "off",
            "{kind:?}: nothing else written"
        );
        tx.commit().await.unwrap();

        // A batch alone too; the rows are there after the commit.
        let mut tx = begin_as(&env.pool, "service_role", None).await;
        sqlx::query("SELECT * FROM public.verify_access_batch($1, 'c', 'CHAT')")
            .bind(vec![user, user])
            .execute(&mut *tx)
            .await
            .unwrap();
        assert_eq!(setting(&mut tx).await, "off", "{kind:?}: the batch alone");
        tx.commit().await.unwrap();
        assert_eq!(audit_rows(&env.pool, user).await.len(), 3, "{kind:?}");

        // A write after the check: the guard gives the transaction its durable commit back.
        let mut tx = env.pool.begin().await.unwrap();
        sqlx::query(check)
            .bind(user)
            .execute(&mut *tx)
            .await
            .unwrap();
        assert_eq!(setting(&mut tx).await, "off", "{kind:?}");
        sqlx::query("INSERT INTO public.tw_access_chain_heads (chain_id, head) VALUES (424242, 1)")
            .execute(&mut *tx)
            .await
            .unwrap();
        fire_guard(&mut tx).await;
        assert_eq!(
            setting(&mut tx).await,
            "on",
            "{kind:?}: a write after the check commits durably"
        );
        tx.rollback().await.unwrap();

        // A write before the check: the record leaves the setting alone.
        let mut tx = env.pool.begin().await.unwrap();
        sqlx::query("INSERT INTO public.tw_access_chain_heads (chain_id, head) VALUES (424242, 1)")
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::query(check)
            .bind(user)
            .execute(&mut *tx)
            .await
            .unwrap();
        assert_eq!(
            setting(&mut tx).await,
            "on",
            "{kind:?}: a write before the check commits durably"
        );
        tx.rollback().await.unwrap();

        // Writes of an earlier transaction on the same connection (still counted by the
        // statistics until their flush, at most once a second) do not make a check alone durable.
        let mut conn = env.pool.acquire().await.unwrap();
        sqlx::query(
            "INSERT INTO public.tw_access_chain_heads (chain_id, head) VALUES (434343, 1) \
             ON CONFLICT (chain_id) DO UPDATE SET head = excluded.head + 1",
        )
        .execute(&mut *conn)
        .await
        .unwrap();
        let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
        sqlx::query(check)
            .bind(user)
            .execute(&mut *tx)
            .await
            .unwrap();
        fire_guard(&mut tx).await;
        assert_eq!(
            setting(&mut tx).await,
            "off",
            "{kind:?}: an earlier transaction's writes are not this one's"
        );
        tx.commit().await.unwrap();
        drop(conn);

        // A caller who chose `remote_apply` gets exactly that back.
        let mut tx = env.pool.begin().await.unwrap();
        sqlx::query("SET LOCAL synchronous_commit = remote_apply")
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::query(check)
            .bind(user)
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::query("INSERT INTO public.tw_access_chain_heads (chain_id, head) VALUES (424242, 1)")
            .execute(&mut *tx)
            .await
            .unwrap();
        fire_guard(&mut tx).await;
        assert_eq!(setting(&mut tx).await, "remote_apply", "{kind:?}");
        tx.rollback().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_20_checks_in_5_minutes_is_a_verification_storm_and_20_is_not() {
    for kind in DbKind::ALL {
        let env = TestEnv::on(kind).await;
        let ctx = env.app_context(&[]).await;
        let jobs = tokenwarden::maintenance::MaintenanceJobs::new(&ctx);
        let (stormy, busy) = (Uuid::new_v4(), Uuid::new_v4());
        for (user, n) in [(stormy, 21), (busy, 20)] {
            for _ in 0..n {
                sqlx::query("SELECT public.verify_access_for($1, 'c', 'CHAT')")
                    .bind(user)
                    .execute(&env.pool)
                    .await
                    .unwrap();
            }
        }
        let found = jobs.detect_anomalies.run().await.expect("detect");
        let storms: Vec<_> = found
            .iter()
            .filter(|r| r.rule == "verification_storm")
            .collect();
        assert_eq!(storms.len(), 1, "{kind:?}: {found:?}");
        assert_eq!(storms[0].user_id, stormy);
        assert_eq!(storms[0].details["count"], 21);
        assert_eq!(storms[0].details["window_secs"], 300.0);
        assert_eq!(storms[0].severity, "warn");
        // One storm is one finding, however often detection runs.
        assert!(jobs.detect_anomalies.run().await.expect("again").is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_deletes_checks_past_retention_in_bounded_batches() {
    let env = TestEnv::new().await;
    let ctx = env
        .app_context(&[
            ("TOKENWARDEN__ACCESS__AUDIT__RETENTION_DAYS", "30"),
            ("TOKENWARDEN__ACCESS__AUDIT__PRUNE_BATCH_ROWS", "10"),
        ])
        .await;
    let user = Uuid::new_v4();
    for _ in 0..28 {
        sqlx::query("SELECT public.verify_access_for($1, 'c', 'CHAT')")
            .bind(user)
            .execute(&env.pool)
            .await
            .unwrap();
    }
    // 25 checks are 31 days old, 3 are 29 days old.
    sqlx::query(
        "UPDATE public.access_checks SET checked_at = now() - CASE WHEN id <= (SELECT min(id) + 24 FROM public.access_checks) \
                THEN interval '31 days' ELSE interval '29 days' END",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let jobs = tokenwarden::maintenance::MaintenanceJobs::new(&ctx);
    let report = jobs.prune.run().await.expect("prune");
    assert_eq!(report.access_checks_deleted, 25, "{report:?}");
    let left: Vec<bool> = sqlx::query_scalar(
        "SELECT checked_at > now() - interval '30 days' FROM public.access_checks",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(left, vec![true, true, true]);
    assert_eq!(jobs.prune.run().await.unwrap().access_checks_deleted, 0);
}

#[tokio::test]
async fn the_cli_check_is_recorded_too() {
    let env = TestEnv::new().await;
    let user = Uuid::new_v4();
    let out = env.cli(&[
        "access",
        "check",
        &user.to_string(),
        "--creator",
        "c",
        "--feature",
        "CHAT",
    ]);
    let (ok, stdout) = out.status_and_stdout();
    assert!(ok, "{stdout}");
    let rows = audit_rows(&env.pool, user).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (rows[0].door.as_str(), rows[0].reason.as_deref()),
        ("cli", Some("no_rule"))
    );
}

// ---------------------------------------------------------------------------------------------
// The held leaf
// ---------------------------------------------------------------------------------------------

fn held(token: Address, min: &str, window: serde_json::Value) -> serde_json::Value {
    let mut leaf = json!({"chain_id": CHAIN, "token": format!("{token:#x}"), "min": min});
    leaf.as_object_mut()
        .unwrap()
        .extend(window.as_object().unwrap().clone());
    json!({"held": leaf})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_leaves_match_anvil_truth_over_their_window_and_read_indexes() {
    let ix = Indexed::start(DbKind::Plain).await;
    let z = Address::ZERO;
    let (a1, a2, bob_w, carol_w, sink) = (
        Address::repeat_byte(0x21),
        Address::repeat_byte(0x22),
        Address::repeat_byte(0x23),
        Address::repeat_byte(0x24),
        Address::repeat_byte(0x25),
    );
    ix.erc20(&[
        (z, a1, 10 * TOKEN),
        (z, bob_w, 10 * TOKEN),
        (z, carol_w, 10 * TOKEN),
    ])
    .await;
    let since = head(&ix).await + 1;
    // Bob dips to 4 and buys back; alice moves everything between her own two wallets.
    ix.erc20(&[(bob_w, sink, 6 * TOKEN)]).await;
    let bob_low = ix.anvil.balance_of(ix.t20, bob_w).await;
    assert_eq!(bob_low, U256::from(4 * TOKEN));
    ix.erc20(&[(sink, bob_w, 6 * TOKEN)]).await;
    ix.erc20(&[(a1, a2, 10 * TOKEN)]).await;
    assert_eq!(
        ix.anvil.balance_of(ix.t20, bob_w).await,
        U256::from(10 * TOKEN)
    );
    assert_eq!(
        ix.anvil.balance_of(ix.t20, carol_w).await,
        U256::from(10 * TOKEN)
    );
    let (alice, bob, carol) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    ix.link(alice, a1).await;
    ix.link(alice, a2).await;
    ix.link(bob, bob_w).await;
    ix.link(carol, carol_w).await;
    let rules = RuleStore::new(ix.env.pool.clone());
    let checker = AccessChecker::new(ix.env.pool.clone());
    let set = |rule: serde_json::Value| {
        let rules = rules.clone();
        async move {
            rules
                .set("creator-1", "HELD", &rule, "test")
                .await
                .expect("held rules are accepted")
        }
    };
    let check = |user: Uuid| {
        let checker = checker.clone();
        async move {
            checker
                .evaluate(user, &creator("HELD"))
                .await
                .expect("decision")
        }
    };

    set(json!({"condition": held(ix.t20, "5", json!({"since_block": since}))})).await;
    let d = check(carol).await;
    assert!(d.allowed, "carol held 10 throughout: {d:?}");
    let e = &d.evidence[0];
    assert_eq!((e.kind.as_str(), e.window_from), ("held", Some(since)));
    assert_eq!(e.amount, Some((10 * TOKEN).to_string()));
    assert_eq!(e.minimum, (5 * TOKEN).to_string());
    let d = check(bob).await;
    assert_eq!(
        (d.allowed, d.reason),
        (false, Some(DenyReason::NotMet)),
        "bob dipped: {d:?}"
    );
    assert_eq!(
        d.evidence[0].amount,
        Some(bob_low.to_string()),
        "the lowest balance anvil showed"
    );
    let d = check(alice).await;
    assert!(d.allowed, "alice's wallets together never dipped: {d:?}");
    assert_eq!(d.evidence[0].amount, Some((10 * TOKEN).to_string()));
    assert_eq!(d.evidence[0].wallets.len(), 2);
    // Per wallet, neither of alice's wallets held 5 throughout.
    set(json!({"condition": held(ix.t20, "5", json!({"since_block": since})), "per_wallet": true}))
        .await;
    let d = check(alice).await;
    assert_eq!(
        (d.allowed, d.reason),
        (false, Some(DenyReason::NotMet)),
        "{d:?}"
    );
    assert!(check(carol).await.allowed);
    // Since before the mint: nobody held anything then.
    set(json!({"condition": held(ix.t20, "5", json!({"since_block": 0}))})).await;
    let d = check(carol).await;
    assert!(
        !d.allowed && d.evidence[0].amount.as_deref() == Some("0"),
        "{d:?}"
    );
    // A block the index has not reached: we don't know yet, which is stale, not "held".
    set(json!({"condition": held(ix.t20, "5", json!({"since_block": head(&ix).await + 1000}))}))
        .await;
    let d = check(carol).await;
    assert_eq!(
        (d.allowed, d.reason, d.stale),
        (false, Some(DenyReason::Stale), true),
        "{d:?}"
    );

    // Durations: the window starts after the head read `for_secs` ago (the head clock).
    sqlx::query(
        "INSERT INTO public.tw_access_block_clock (chain_id, observed_at, head) \
         VALUES ($1, now() - interval '2 hours', $2)",
    )
    .bind(CHAIN as i64)
    .bind(since as i64 - 1)
    .execute(&ix.env.pool)
    .await
    .unwrap();
    set(json!({"condition": held(ix.t20, "5", json!({"for_secs": 3600}))})).await;
    let d = check(carol).await;
    assert!(d.allowed, "{d:?}");
    assert_eq!(d.evidence[0].window_from, Some(since));
    assert!(!check(bob).await.allowed);
    // No head reading is that old: the window's start is unknown, so stale.
    set(json!({"condition": held(ix.t20, "5", json!({"for_secs": 30_000_000}))})).await;
    let d = check(carol).await;
    assert_eq!(
        (d.allowed, d.reason),
        (false, Some(DenyReason::Stale)),
        "{d:?}"
    );
    assert!(
        d.evidence[0]
            .stale
            .as_deref()
            .unwrap()
            .contains("seconds old"),
        "{d:?}"
    );
    // The head watcher's readings feed the clock (one sample per 30 s at most).
    tokenwarden::access::heads::record(&ix.env.pool, CHAIN, 5)
        .await
        .unwrap();
    tokenwarden::access::heads::record(&ix.env.pool, CHAIN, 6)
        .await
        .unwrap();
    let samples: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM public.tw_access_block_clock WHERE observed_at > now() - interval '1 minute'",
    )
    .fetch_one(&ix.env.pool)
    .await
    .unwrap();
    assert_eq!(samples, 1);

    // The window's reads are index range scans on a table of many holders: the planner's own
    // choice on 200,000 other transfers (no plan forced), for the deployed function's SQL.
    let other = "0x00000000000000000000000000000000000000ff";
    sqlx::query(
        "INSERT INTO public.chain_transfers (chain_id, block_number, block_hash, log_index, tx_hash, token, \
           from_address, to_address, value) \
         SELECT $1, 1000000 + g / 100, 'h' || (g / 100), g % 100, 't' || g, $2, \
                '0x' || lpad(to_hex(g % 2000), 40, '0'), '0x' || lpad(to_hex((g + 1) % 2000), 40, '0'), 1 \
           FROM generate_series(1, 200000) g",
    )
    .bind(CHAIN as i64)
    .bind(other)
    .execute(&ix.env.pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE public.chain_transfers")
        .execute(&ix.env.pool)
        .await
        .unwrap();
    let body: String =
        sqlx::query_scalar("SELECT prosrc FROM pg_proc WHERE proname = 'tw_access_min_held'")
            .fetch_one(&ix.env.pool)
            .await
            .unwrap();
    let body = ["p_chain", "p_token", "p_wallets", "p_from", "p_to"]
        .iter()
        .enumerate()
        .fold(body, |b, (i, name)| b.replace(name, &format!("${}", i + 1)));
    let mut conn = ix.env.pool.acquire().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "PREPARE held_window(bigint, text, text[], bigint, bigint) AS {}",
        body.trim().trim_end_matches(';')
    )))
    .execute(&mut *conn)
    .await
    .unwrap();
    let wallets = [format!("0x{:040x}", 7), format!("0x{:040x}", 8)];
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN EXECUTE held_window({CHAIN}, '{other}', ARRAY['{}','{}'], 1000500, 1002000)",
        wallets[0], wallets[1]
    )))
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    let plan = plan.join("\n");
    assert!(!plan.contains("Seq Scan"), "{plan}");
    assert!(
        plan.contains("chain_transfers_to_history")
            && plan.contains("chain_transfers_from_history"),
        "{plan}"
    );
    // p99 of one window read over that table (printed for docs/benchmarks.md).
    let mut times = Vec::new();
    for i in 0..300u64 {
        let w = vec![format!("0x{:040x}", i % 2000)];
        let t0 = std::time::Instant::now();
        let _: Option<String> = sqlx::query_scalar(
            "SELECT public.tw_access_min_held($1, $2, $3, 1000500, 1002000)::text",
        )
        .bind(CHAIN as i64)
        .bind(other)
        .bind(&w)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        times.push(t0.elapsed());
    }
    times.sort();
    println!(
        "held window read over 200,000 transfers: p50 {:?}, p99 {:?}",
        times[150], times[296]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_postgres_refuses_fails_alone_and_its_batch_is_recorded() {
    use tokenwarden::access::audit::{AuditEntry, Caller, Door};
    let env = TestEnv::new().await;
    let (audit, _task) = AuditRecorder::spawn(env.pool.clone(), &audit_config(500));
    let user = Uuid::new_v4();
    let decision = |creator: String| Decision {
        allowed: false,
        reason: Some(DenyReason::NoRule),
        user_id: user,
        creator_id: creator,
        feature: "CHAT".into(),
        rule_version: None,
        source: Source::Index,
        as_of_block: None,
        stale: false,
        evidence: Vec::new(),
        evidence_age_secs: None,
        checked_at: chrono::Utc::now(),
    };
    // 201 characters: more than access_checks.creator_id holds.
    let results = futures::future::join_all(
        ["ok-1".to_string(), "x".repeat(201), "ok-2".to_string()]
            .into_iter()
            .map(|c| {
                let audit = audit.clone();
                let entry = AuditEntry::new(&decision(c), Door::Queue, None, &Caller::default());
                async move { audit.record(entry).await }
            }),
    )
    .await;
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    let err = results[1].as_ref().expect_err("refused");
    assert!(err.is_bad_data(), "{err}");
    let creators: Vec<String> = sqlx::query_scalar(
        "SELECT creator_id FROM public.access_checks WHERE user_id = $1 ORDER BY creator_id",
    )
    .bind(user)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(creators, vec!["ok-1", "ok-2"]);
}
