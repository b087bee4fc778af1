//! The Edge Function client (`jobs/client.ts`) against the real thing: a `tokenwarden run`
//! process, real Redis, real Postgres, and the real Deno runtime (npm package `deno`, installed
//! by `make tools`). The Deno test file checks what the client returns; this test then checks in
//! Postgres that those answers match the durable ledger.

mod common;

use std::time::Duration;

use common::{Child, TestEnv, repo_root, wait_until};
use uuid::Uuid;

const FUNDED_BALANCE: i64 = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deno_client_consumes_grants_and_holds_through_a_running_worker() {
    let env = TestEnv::new().await;
    let user = Uuid::new_v4();
    // Funded through the SQL door, as a billing webhook calling `add_tokens` would.
    sqlx::query("SELECT public.add_tokens($1, $2, 'deno client test', '{}'::jsonb)")
        .bind(user)
        .bind(FUNDED_BALANCE)
        .execute(&env.pool)
        .await
        .expect("add_tokens funds the test user");

    // A SIWE message for `linkWallet`, signed with anvil's dev key 1; the worker needs a chain
    // with that Chain ID and the message's domain in its config (no RPC call is made: an EOA
    // signature is recovered locally).
    let link_user = Uuid::new_v4();
    let nonce = tokenwarden::access::WalletStore::new(env.pool.clone())
        .issue_nonce(link_user)
        .await
        .expect("a nonce for the link user")
        .nonce;
    let signer: alloy::signers::local::PrivateKeySigner =
        "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d"
            .parse()
            .expect("dev key");
    let message = format!(
        "localhost:3000 wants you to sign in with your Ethereum account:\n{}\n\n\
         Link this wallet\n\nURI: http://localhost:3000/wallets\nVersion: 1\nChain ID: 31337\n\
         Nonce: {nonce}\nIssued At: {}",
        signer.address().to_checksum(None),
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    let signature = {
        use alloy::signers::SignerSync;
        let sig = signer
            .sign_message_sync(message.as_bytes())
            .expect("sign the SIWE message");
        format!("0x{}", hex::encode(sig.as_bytes()))
    };
    // A member of creator-deno's CHAT: an indexed balance of 7 whole tokens (rows as the
    // indexer writes them) on a wallet the member has proven.
    let (member, token, member_wallet) = (
        Uuid::new_v4(),
        "0x7e57000000000000000000000000000000000000",
        "0x00000000000000000000000000000000000000aa",
    );
    for sql in [
        "INSERT INTO public.chain_tokens (chain_id, address, standard, decimals, start_block) VALUES (31337, $1, 'erc20', 18, 0)",
        "INSERT INTO public.chain_checkpoints (chain_id, block_number, block_hash, finalized_block) VALUES (31337, 5, '0x01', 0)",
        "INSERT INTO public.token_balances (chain_id, token, holder, balance, updated_block) VALUES (31337, $1, $2, 7000000000000000000, 5)",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(token)
            .bind(member_wallet)
            .execute(&env.pool)
            .await
            .expect("index rows");
    }
    sqlx::query("INSERT INTO public.user_wallets (user_id, address, chains, method) VALUES ($1, $2, '{31337}', 'eoa')")
        .bind(member)
        .bind(member_wallet)
        .execute(&env.pool)
        .await
        .expect("the member's wallet");
    tokenwarden::access::RuleStore::new(env.pool.clone())
        .set(
            "creator-deno",
            "CHAT",
            &serde_json::json!({"condition": {"erc20": {"chain_id": 31337, "token": token, "min": "5"}}}),
            "deno test",
        )
        .await
        .expect("the CHAT rule");
    let whitelist = tokenwarden::whitelist::WhitelistStore::new(env.pool.clone())
        .open(&tokenwarden::whitelist::OpenRequest {
            creator_id: "creator-deno".into(),
            name: "genesis".into(),
            rule: serde_json::json!({"condition": {"erc20": {"chain_id": 31337, "token": token, "min": "5"}}}),
            opens_at: chrono::Utc::now() - chrono::Duration::minutes(1),
            closes_at: chrono::Utc::now() + chrono::Duration::hours(1),
            capacity: Some(10),
            actor: "deno test".into(),
        })
        .await
        .expect("the whitelist");
    let config = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp config");
    std::fs::write(
        config.path(),
        "[access]\nsiwe_domains = [\"localhost:3000\"]\n\n\
         [[chain.chains]]\nchain_id = 31337\nname = \"anvil\"\nrpc_urls = [\"http://127.0.0.1:9\"]\n",
    )
    .expect("write the worker's config");
    let config_path = config.path().to_string_lossy().into_owned();
    let _worker = Child::spawn(&env, &["--config", &config_path, "run"], &[]);
    // The client's reply timeout must not be spent on the worker's start-up: wait until its
    // consumer group exists on the consume stream.
    let stream = format!("{}:jobs:consume_tokens", env.redis_prefix);
    let redis = env.redis().await;
    wait_until(
        Duration::from_secs(60),
        "the worker's consumer group",
        || {
            let stream = stream.clone();
            let mut redis = redis.clone();
            async move {
                let groups: redis::RedisResult<Vec<redis::Value>> = redis::cmd("XINFO")
                    .arg("GROUPS")
                    .arg(&stream)
                    .query_async(&mut redis)
                    .await;
                groups.ok().filter(|g| !g.is_empty()).map(|_| ())
            }
        },
    )
    .await;

    let deno = repo_root().join("node_modules/.bin/deno");
    assert!(
        deno.exists(),
        "{} is missing: run `make tools` (npm ci installs the deno package)",
        deno.display()
    );
    let run = tokio::process::Command::new(&deno)
        .args([
            "test",
            "--allow-net",
            "--allow-env",
            "--allow-read",
            "jobs/client_test.ts",
        ])
        .current_dir(repo_root())
        .env("NO_COLOR", "1")
        .env("TOKENWARDEN_REDIS_URL", &env.redis_url)
        .env("TOKENWARDEN_REDIS_PREFIX", &env.redis_prefix)
        .env("TW_TEST_FUNDED_USER", user.to_string())
        .env("TW_TEST_FUNDED_BALANCE", FUNDED_BALANCE.to_string())
        .env("TW_TEST_LINK_USER", link_user.to_string())
        .env("TW_TEST_LINK_MESSAGE", &message)
        .env("TW_TEST_LINK_SIGNATURE", &signature)
        .env("TW_TEST_LINK_ADDRESS", format!("{:#x}", signer.address()))
        .env("TW_TEST_MEMBER", member.to_string())
        .env("TW_TEST_CREATOR", "creator-deno")
        .env("TW_TEST_TOKEN", token)
        .env("TW_TEST_WHITELIST", whitelist.to_string())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("deno test finishes within 180 s")
        .expect("deno runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "deno test failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    // Guard against a run that found nothing to test.
    assert!(
        stdout.contains("ok | 8 passed") && stdout.contains("| 0 failed"),
        "expected the 8 client tests to pass:\n{stdout}\n{stderr}"
    );

    // What the client reported is what Postgres holds: 120 + 30 consumed (the repeat did not
    // debit again), the conflicting repeat and the insufficient request changed nothing, and
    // the 5-token debit was refunded by a grant.
    let (balance, held): (i64, i64) =
        sqlx::query_as("SELECT balance, held FROM public.credit_accounts WHERE user_id = $1")
            .bind(user)
            .fetch_one(&env.pool)
            .await
            .expect("the funded account exists");
    assert_eq!(balance, FUNDED_BALANCE - 150);
    assert_eq!(held, 0);
    let consumes: Vec<i64> = sqlx::query_scalar(
        "SELECT amount FROM public.token_balance_history
         WHERE user_id = $1 AND kind = 'consume' ORDER BY id",
    )
    .bind(user)
    .fetch_all(&env.pool)
    .await
    .expect("history is readable");
    assert_eq!(consumes, vec![120, 30, 5], "one history row per debit");
    let statuses: Vec<String> = sqlx::query_scalar(
        "SELECT status FROM public.ledger_requests WHERE user_id = $1 ORDER BY status",
    )
    .bind(user)
    .fetch_all(&env.pool)
    .await
    .expect("ledger_requests is readable");
    assert_eq!(
        statuses.iter().filter(|s| *s == "consumed").count(),
        3,
        "three distinct consumed request ids: {statuses:?}"
    );
    assert!(
        statuses.iter().any(|s| s == "insufficient_tokens"),
        "the refused request's outcome is durable too: {statuses:?}"
    );
    // linkWallet linked and unlinkWallet removed: no link is left, and the nonce is used.
    let links: i64 =
        sqlx::query_scalar("SELECT count(*) FROM public.user_wallets WHERE user_id = $1")
            .bind(link_user)
            .fetch_one(&env.pool)
            .await
            .expect("user_wallets is readable");
    assert_eq!(links, 0);
    let used: bool = sqlx::query_scalar(
        "SELECT used_at IS NOT NULL FROM public.access_siwe_nonces WHERE nonce = $1",
    )
    .bind(&nonce)
    .fetch_one(&env.pool)
    .await
    .expect("the nonce is kept");
    assert!(used, "the link used the nonce");
    // requestWhitelist granted the member one place (asked twice), and refused the stranger.
    let entries: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT user_id, status FROM public.whitelist_entries WHERE whitelist_id = $1 ORDER BY status",
    )
    .bind(whitelist)
    .fetch_all(&env.pool)
    .await
    .expect("whitelist_entries is readable");
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert_eq!(entries[0], (member, "granted".to_string()));
    assert_eq!(entries[1].1, "refused");
}
