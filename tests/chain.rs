//! Chain indexer against real anvil + real Postgres + real Redis: seeded random ERC-20 and
//! ERC-721 histories, reorgs at the head and while stopped, a deep reorg, RPC faults, SIGKILL
//! of the worker, and replica failover. Every scenario ends by comparing every stored balance
//! and owner with `balanceOf` / `ownerOf` on the chain.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256, U256};
use alloy::providers::Provider;
use common::anvil::Anvil;
use common::chain::{
    ANVIL_CHAIN_ID, InProcIndexer, anvil_chain, anvil_checkpoint, indexer_config, wait_head_indexed,
};
use common::{Child, TestEnv, wait_until};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use tokenwarden::config::{TokenConfig, TokenStandard};

const CHAIN_ID: u64 = ANVIL_CHAIN_ID;
const NFT_IDS: u64 = 40;

fn holder(i: u8) -> Address {
    let mut b = [0u8; 20];
    b[18] = 0x10;
    b[19] = i;
    Address::from(b)
}

/// Generates valid random operations; re-synced from the chain after reorgs.
struct Model {
    rng: StdRng,
    erc20: Address,
    nft: Address,
    holders: Vec<Address>,
    balances: HashMap<Address, U256>,
    owners: HashMap<U256, Address>,
}

impl Model {
    fn new(seed: u64, erc20: Address, nft: Address) -> Model {
        Model {
            rng: StdRng::seed_from_u64(seed),
            erc20,
            nft,
            holders: (1..=10).map(holder).collect(),
            balances: HashMap::new(),
            owners: HashMap::new(),
        }
    }

    fn pick(&mut self) -> Address {
        let i = self.rng.random_range(0..self.holders.len());
        self.holders[i]
    }

    fn bal(&self, a: &Address) -> U256 {
        self.balances.get(a).copied().unwrap_or_default()
    }

    /// `k` valid ERC-20 operations (mints, burns, transfers, self-transfers, zero-value).
    fn erc20_ops(&mut self, k: usize) -> Vec<(Address, Address, U256)> {
        let mut ops = Vec::new();
        for _ in 0..k {
            let kind = self.rng.random_range(0..6);
            let a = self.pick();
            let b = self.pick();
            let bal_a = self.bal(&a);
            let op = match kind {
                0 | 1 => (
                    Address::ZERO,
                    a,
                    U256::from(self.rng.random_range(1u64..1_000_000_000_000)),
                ),
                2 if !bal_a.is_zero() => (a, Address::ZERO, amount_upto(&mut self.rng, bal_a)),
                3 if !bal_a.is_zero() => (a, a, amount_upto(&mut self.rng, bal_a)),
                4 => (a, b, U256::ZERO),
                _ if !bal_a.is_zero() => (a, b, amount_upto(&mut self.rng, bal_a)),
                _ => (Address::ZERO, a, U256::from(7u8)),
            };
            self.apply20(op);
            ops.push(op);
        }
        ops
    }

    fn apply20(&mut self, (f, t, v): (Address, Address, U256)) {
        if f != Address::ZERO {
            *self.balances.entry(f).or_default() -= v;
        }
        if t != Address::ZERO {
            *self.balances.entry(t).or_default() += v;
        }
    }

    /// `k` valid ERC-721 operations (mints, burns, transfers, self-transfers).
    fn nft_ops(&mut self, k: usize) -> Vec<(Address, Address, U256)> {
        let mut ops = Vec::new();
        for _ in 0..k {
            let id = U256::from(self.rng.random_range(1..=NFT_IDS));
            let to = self.pick();
            let op = match self.owners.get(&id).copied() {
                None => (Address::ZERO, to, id),
                Some(o) => match self.rng.random_range(0..4) {
                    0 => (o, Address::ZERO, id),
                    1 => (o, o, id),
                    _ => (o, to, id),
                },
            };
            if op.1 == Address::ZERO {
                self.owners.remove(&id);
            } else {
                self.owners.insert(id, op.1);
            }
            ops.push(op);
        }
        ops
    }

    /// One random transaction: ERC-20 or ERC-721, 1..max operations.
    async fn random_tx(&mut self, anvil: &Anvil, max: usize) {
        let k = self.rng.random_range(1..=max);
        if self.rng.random_bool(0.5) {
            let ops = self.erc20_ops(k);
            anvil.send(self.erc20, Anvil::erc20_batch(&ops)).await;
        } else {
            let ops = self.nft_ops(k);
            anvil.send(self.nft, Anvil::erc721_batch(&ops)).await;
        }
    }

    /// Re-reads the model from the chain (after a reorg replaced history).
    async fn resync(&mut self, anvil: &Anvil) {
        for h in self.holders.clone() {
            let b = anvil.balance_of(self.erc20, h).await;
            self.balances.insert(h, b);
        }
        self.owners.clear();
        for i in 1..=NFT_IDS + 200 {
            let id = U256::from(i);
            if let Some(o) = anvil.owner_of(self.nft, id).await {
                self.owners.insert(id, o);
            }
        }
    }
}

fn amount_upto(rng: &mut StdRng, max: U256) -> U256 {
    let m: u128 = max.try_into().unwrap_or(u128::MAX);
    U256::from(rng.random_range(1..=m))
}

fn token_configs(erc20: Address, nft: Address) -> Vec<TokenConfig> {
    vec![
        TokenConfig {
            chain_id: CHAIN_ID,
            address: format!("{erc20:#x}"),
            standard: TokenStandard::Erc20,
            start_block: 0,
        },
        TokenConfig {
            chain_id: CHAIN_ID,
            address: format!("{nft:#x}"),
            standard: TokenStandard::Erc721,
            start_block: 0,
        },
    ]
}

/// Every holder's stored balance equals balanceOf (zero balances too), every NFT owner equals
/// ownerOf, and nothing is stored for anyone else.
async fn assert_exact(env: &TestEnv, anvil: &Anvil, model: &Model) {
    let token = format!("{:#x}", model.erc20);
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT holder, balance::text FROM token_balances WHERE chain_id = $1 AND token = $2",
    )
    .bind(CHAIN_ID as i64)
    .bind(&token)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let stored: HashMap<String, U256> = rows
        .into_iter()
        .map(|(h, b)| (h, b.parse().unwrap()))
        .collect();
    for h in &model.holders {
        let chain = anvil.balance_of(model.erc20, *h).await;
        let s = stored.get(&format!("{h:#x}")).copied().unwrap_or_default();
        assert_eq!(s, chain, "ERC-20 balance of {h:#x}");
    }
    for h in stored.keys() {
        assert!(
            model.holders.iter().any(|m| format!("{m:#x}") == *h),
            "unexpected holder {h} stored"
        );
    }
    let nft = format!("{:#x}", model.nft);
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT token_id::text, owner FROM nft_owners WHERE chain_id = $1 AND token = $2",
    )
    .bind(CHAIN_ID as i64)
    .bind(&nft)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let stored: HashMap<U256, String> = rows
        .into_iter()
        .map(|(i, o)| (i.parse().unwrap(), o))
        .collect();
    for i in 1..=NFT_IDS + 200 {
        let id = U256::from(i);
        let chain = anvil
            .owner_of(model.nft, id)
            .await
            .map(|a| format!("{a:#x}"));
        assert_eq!(stored.get(&id).cloned(), chain, "owner of NFT {i}");
    }
}

/// Transfer logs of both tokens on the canonical chain.
async fn chain_log_count(anvil: &Anvil, model: &Model) -> i64 {
    let filter = alloy::rpc::types::Filter::new()
        .address(vec![model.erc20, model.nft])
        .from_block(0)
        .to_block(anvil.head().await);
    anvil.provider.get_logs(&filter).await.unwrap().len() as i64
}

async fn stored_transfer_count(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM chain_transfers WHERE chain_id = $1")
        .bind(CHAIN_ID as i64)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

/// Waits until the index holds anvil's head block, then checks every balance and owner against
/// the chain and that each Transfer log is stored exactly once.
async fn assert_index_matches_chain(env: &TestEnv, anvil: &Anvil, model: &Model, within: Duration) {
    wait_head_indexed(env, anvil, within).await;
    assert_exact(env, anvil, model).await;
    assert_eq!(
        stored_transfer_count(env).await,
        chain_log_count(anvil, model).await
    );
}

async fn setup(seed: u64) -> (TestEnv, Anvil, Model) {
    let env = TestEnv::new().await;
    let anvil = Anvil::spawn().await;
    let erc20 = anvil.deploy("TestToken20").await;
    let nft = anvil.deploy("TestNft721").await;
    (env, anvil, Model::new(seed, erc20, nft))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_histories_backfill_and_head_are_exact() {
    let (env, anvil, mut model) = setup(1).await;
    // History before the indexer starts (backfill), including one transaction with many logs.
    for _ in 0..30 {
        model.random_tx(&anvil, 12).await;
    }
    let ops = model.erc20_ops(80);
    anvil.send(model.erc20, Anvil::erc20_batch(&ops)).await;
    let ops = model.nft_ops(60);
    anvil.send(model.nft, Anvil::erc721_batch(&ops)).await;

    let cfg = indexer_config(
        &env,
        anvil_chain(&anvil.url, serde_json::json!({"ws_url": anvil.ws_url})),
        token_configs(model.erc20, model.nft),
    );
    let indexer = InProcIndexer::start(cfg.clone()).await;
    assert_index_matches_chain(&env, &anvil, &model, Duration::from_secs(60)).await;

    // Token metadata was read from the chain.
    let (decimals, symbol): (Option<i32>, Option<String>) = sqlx::query_as(
        "SELECT decimals, symbol FROM chain_tokens WHERE chain_id = $1 AND address = $2",
    )
    .bind(CHAIN_ID as i64)
    .bind(format!("{:#x}", model.erc20))
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!((decimals, symbol.as_deref()), (Some(18), Some("TT20")));

    // Head following, with the announcement contract checked: a cached holding is deleted
    // and a balance_changes message names the holder.
    let mut redis = env.redis().await;
    let client = redis::Client::open(env.redis_url.as_str()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub
        .subscribe(format!("{}:balance_changes", env.redis_prefix))
        .await
        .unwrap();
    let target = holder(3);
    let key = format!(
        "{}:holding:{CHAIN_ID}:{:#x}:{:#x}",
        env.redis_prefix, model.erc20, target
    );
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("cached")
        .query_async(&mut redis)
        .await
        .unwrap();
    let op = (Address::ZERO, target, U256::from(5u8));
    model.apply20(op);
    anvil.send(model.erc20, Anvil::erc20_batch(&[op])).await;
    let msg = tokio::time::timeout(Duration::from_secs(20), async {
        use futures::StreamExt;
        let mut stream = pubsub.on_message();
        loop {
            let m = stream.next().await.expect("pubsub message");
            let v: serde_json::Value =
                serde_json::from_str(&m.get_payload::<String>().unwrap()).unwrap();
            if v["holders"]
                .as_array()
                .unwrap()
                .iter()
                .any(|h| h == &format!("{target:#x}"))
            {
                return v;
            }
        }
    })
    .await
    .expect("balance_changes message for the holder");
    assert_eq!(msg["chain_id"], CHAIN_ID);
    assert_eq!(msg["token"], format!("{:#x}", model.erc20));
    wait_until(Duration::from_secs(10), "cache key deleted", || {
        let mut r = redis.clone();
        let key = key.clone();
        async move {
            let exists: i64 = redis::cmd("EXISTS")
                .arg(&key)
                .query_async(&mut r)
                .await
                .ok()?;
            (exists == 0).then_some(())
        }
    })
    .await;

    for _round in 0..3 {
        for _ in 0..8 {
            model.random_tx(&anvil, 15).await;
        }
        wait_head_indexed(&env, &anvil, Duration::from_secs(30)).await;
        assert_exact(&env, &anvil, &model).await;
    }
    assert_eq!(
        stored_transfer_count(&env).await,
        chain_log_count(&anvil, &model).await
    );
    indexer.stop().await;

    // Reconciliation agrees, and finds a tampered balance.
    let report =
        tokenwarden::chain::cli::reconcile(&env.pool, &cfg.chain.chains[0], &cfg.chain.tokens)
            .await
            .unwrap();
    assert!(report.checked > 10, "{report:?}");
    assert!(report.mismatches.is_empty(), "{report:?}");
    sqlx::query("UPDATE token_balances SET balance = balance + 1 WHERE holder = $1")
        .bind(format!("{target:#x}"))
        .execute(&env.pool)
        .await
        .unwrap();
    let report =
        tokenwarden::chain::cli::reconcile(&env.pool, &cfg.chain.chains[0], &cfg.chain.tokens)
            .await
            .unwrap();
    assert_eq!(report.mismatches.len(), 1, "{report:?}");
    assert!(!report.multicall, "anvil has no Multicall3 by default");

    // With Multicall3 code at its canonical address, reconciliation goes through it.
    let runtime =
        std::fs::read_to_string(common::repo_root().join("contracts/Multicall3Lite.runtime.bin"))
            .unwrap();
    anvil
        .raw(
            "anvil_setCode",
            serde_json::json!([
                format!("{:#x}", tokenwarden::chain::cli::MULTICALL3),
                format!("0x{}", runtime.trim())
            ]),
        )
        .await;
    let report =
        tokenwarden::chain::cli::reconcile(&env.pool, &cfg.chain.chains[0], &cfg.chain.tokens)
            .await
            .unwrap();
    assert!(report.multicall, "{report:?}");
    assert_eq!(report.mismatches.len(), 1, "{report:?}");
    assert!(
        report.mismatches[0].contains(&format!("{target:#x}")),
        "{report:?}"
    );
}

/// Far behind, a backfill commit writes its transfer rows on other connections than its
/// balances and checkpoint, and they commit first. One that fails between those commits (here:
/// a trigger refuses the balances of the later blocks) leaves transfer rows above the
/// checkpoint; the next pass drops them before writing the range again, so nothing is lost
/// and nothing counted twice. Without the drop the range never commits again (its rows are
/// already there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_commit_failing_after_its_transfers_leaves_nothing_behind() {
    let (env, anvil, mut model) = setup(8).await;
    for _ in 0..40 {
        model.random_tx(&anvil, 10).await;
    }
    let fail_from = anvil.head().await / 2;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE FUNCTION public.tw_test_refuse_balances() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.updated_block >= {fail_from} THEN \
           RAISE EXCEPTION 'test: balances from block {fail_from} on are refused'; END IF; \
         RETURN NEW; END $$; \
         CREATE TRIGGER tw_test_refuse_balances BEFORE INSERT OR UPDATE ON public.token_balances \
         FOR EACH ROW EXECUTE FUNCTION public.tw_test_refuse_balances();"
    )))
    .execute(&env.pool)
    .await
    .unwrap();
    let cfg = indexer_config(
        &env,
        anvil_chain(
            &anvil.url,
            serde_json::json!({"max_block_range": 2, "fetch_concurrency": 1}),
        ),
        token_configs(model.erc20, model.nft),
    );
    let indexer = InProcIndexer::start(cfg).await;
    wait_until(
        Duration::from_secs(60),
        "transfer rows above the checkpoint after a failed commit",
        || async {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM chain_transfers t JOIN chain_checkpoints c USING (chain_id) \
                 WHERE t.chain_id = $1 AND t.block_number > c.block_number",
            )
            .bind(CHAIN_ID as i64)
            .fetch_one(&env.pool)
            .await
            .ok()?;
            (n > 0).then_some(n)
        },
    )
    .await;
    sqlx::raw_sql(
        "DROP TRIGGER tw_test_refuse_balances ON public.token_balances; \
         DROP FUNCTION public.tw_test_refuse_balances();",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    assert_index_matches_chain(&env, &anvil, &model, Duration::from_secs(60)).await;
    indexer.stop().await;
}

fn reorg_tx(anvil: &Anvil, to: Address, data: Vec<u8>) -> serde_json::Value {
    serde_json::json!({
        "from": anvil.sender,
        "to": to,
        "input": format!("0x{}", hex::encode(data)),
        "gas": "0x3000000",
    })
}

/// Replaces the last `depth` blocks with blocks holding different transfers (mints that are
/// valid in any state, so they can be prepared without knowing the fork state).
async fn reorg(anvil: &Anvil, model: &mut Model, depth: u64, salt: u64) {
    let mut pairs = Vec::new();
    for j in 0..depth {
        let h = model.pick();
        let ops20 = vec![
            (Address::ZERO, h, U256::from(1_000 + salt * 10 + j)),
            (h, model.pick(), U256::from(1u8)),
            (h, h, U256::ZERO),
        ];
        pairs.push(serde_json::json!([
            reorg_tx(anvil, model.erc20, Anvil::erc20_batch(&ops20)),
            j
        ]));
        let id = U256::from(NFT_IDS + 1 + salt * 10 + j);
        let ops721 = vec![(Address::ZERO, h, id), (h, model.pick(), id)];
        pairs.push(serde_json::json!([
            reorg_tx(anvil, model.nft, Anvil::erc721_batch(&ops721)),
            j
        ]));
    }
    anvil
        .raw("anvil_reorg", serde_json::json!([depth, pairs]))
        .await;
    model.resync(anvil).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reorgs_of_depth_1_to_5_at_the_head_are_undone_exactly() {
    let (env, anvil, mut model) = setup(2).await;
    for _ in 0..12 {
        model.random_tx(&anvil, 10).await;
    }
    let cfg = indexer_config(
        &env,
        anvil_chain(&anvil.url, serde_json::json!({"reorg_depth": 10})),
        token_configs(model.erc20, model.nft),
    );
    let indexer = InProcIndexer::start(cfg).await;
    wait_head_indexed(&env, &anvil, Duration::from_secs(60)).await;
    assert_exact(&env, &anvil, &model).await;
    for depth in 1..=5u64 {
        for _ in 0..depth + 1 {
            model.random_tx(&anvil, 8).await;
        }
        wait_head_indexed(&env, &anvil, Duration::from_secs(30)).await;
        let before = anvil_checkpoint(&env).await.unwrap();
        reorg(&anvil, &mut model, depth, depth).await;
        wait_head_indexed(&env, &anvil, Duration::from_secs(30)).await;
        let after = anvil_checkpoint(&env).await.unwrap();
        assert_eq!(before.0, after.0, "same height after anvil_reorg");
        assert_ne!(before.1, after.1, "the indexer followed the new branch");
        assert_exact(&env, &anvil, &model).await;
        assert_eq!(
            stored_transfer_count(&env).await,
            chain_log_count(&anvil, &model).await
        );
        // Then the chain goes on.
        model.random_tx(&anvil, 8).await;
        wait_head_indexed(&env, &anvil, Duration::from_secs(30)).await;
        assert_exact(&env, &anvil, &model).await;
    }
    indexer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reorg_while_stopped_is_caught_at_start() {
    let (env, anvil, mut model) = setup(3).await;
    for _ in 0..15 {
        model.random_tx(&anvil, 10).await;
    }
    let cfg = indexer_config(
        &env,
        anvil_chain(&anvil.url, serde_json::json!({"reorg_depth": 10})),
        token_configs(model.erc20, model.nft),
    );
    let indexer = InProcIndexer::start(cfg.clone()).await;
    wait_head_indexed(&env, &anvil, Duration::from_secs(60)).await;
    assert_exact(&env, &anvil, &model).await;
    indexer.stop().await;

    reorg(&anvil, &mut model, 3, 7).await;
    let stale = anvil_checkpoint(&env).await.unwrap();

    let indexer = InProcIndexer::start(cfg).await;
    wait_head_indexed(&env, &anvil, Duration::from_secs(30)).await;
    assert_ne!(anvil_checkpoint(&env).await.unwrap().1, stale.1);
    assert_exact(&env, &anvil, &model).await;
    assert_eq!(
        stored_transfer_count(&env).await,
        chain_log_count(&anvil, &model).await
    );
    indexer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reorg_deeper_than_the_window_stops_the_indexer_without_touching_balances() {
    let (env, anvil, mut model) = setup(4).await;
    for _ in 0..10 {
        model.random_tx(&anvil, 10).await;
    }
    let cfg = indexer_config(
        &env,
        anvil_chain(&anvil.url, serde_json::json!({"reorg_depth": 2})),
        token_configs(model.erc20, model.nft),
    );
    let indexer = InProcIndexer::start(cfg).await;
    wait_head_indexed(&env, &anvil, Duration::from_secs(60)).await;
    let snapshot = |env: &TestEnv| {
        let pool = env.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT coalesce(string_agg(holder || '=' || balance::text, ',' ORDER BY holder), '') FROM token_balances",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let before = snapshot(&env).await;
    let cp_before = anvil_checkpoint(&env).await.unwrap();
    reorg(&anvil, &mut model, 5, 9).await;
    let reason: String = wait_until(
        Duration::from_secs(30),
        "deep reorg recorded as a fault",
        || async {
            sqlx::query_scalar("SELECT reason FROM chain_indexer_faults WHERE chain_id = $1")
                .bind(CHAIN_ID as i64)
                .fetch_optional(&env.pool)
                .await
                .unwrap()
        },
    )
    .await;
    assert!(reason.contains("deeper than reorg_depth"), "{reason}");
    // The task ends by itself; nothing was changed.
    indexer.ended(Duration::from_secs(10)).await;
    assert_eq!(snapshot(&env).await, before);
    assert_eq!(anvil_checkpoint(&env).await.unwrap(), cp_before);
}

/// A JSON-RPC proxy in front of anvil that injects faults on a fixed schedule.
/// What the test RPC proxies below share: serving on a free local port and passing a request
/// through to the node unchanged.
mod rpc_proxy {
    use axum::body::Bytes;
    use axum::response::{IntoResponse, Response};

    /// Serves `app` on a free local port; returns its URL.
    pub async fn serve(app: axum::Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}")
    }

    /// Sends the JSON-RPC `body` to `upstream` and answers with its reply.
    pub async fn forward(client: &reqwest::Client, upstream: &str, body: Bytes) -> Response {
        let resp = client
            .post(upstream)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let bytes = resp.bytes().await.unwrap();
        ([("content-type", "application/json")], bytes).into_response()
    }
}

mod fault_proxy {
    use super::*;
    use axum::body::{Body, Bytes};
    use axum::extract::State;
    use axum::http::{HeaderValue, StatusCode};
    use axum::response::{IntoResponse, Response};

    #[derive(Default)]
    pub struct Counts {
        pub requests: AtomicU64,
        pub rate_limited: AtomicU64,
        pub timeouts: AtomicU64,
        pub dropped: AtomicU64,
        pub too_many_results: AtomicU64,
    }

    struct St {
        upstream: String,
        client: reqwest::Client,
        counts: Arc<Counts>,
    }

    pub async fn start(upstream: String) -> (String, Arc<Counts>) {
        let counts = Arc::new(Counts::default());
        let st = Arc::new(St {
            upstream,
            client: reqwest::Client::new(),
            counts: counts.clone(),
        });
        let app = axum::Router::new()
            .route("/", axum::routing::post(handle))
            .with_state(st);
        (rpc_proxy::serve(app).await, counts)
    }

    fn hex_u64(v: &serde_json::Value) -> Option<u64> {
        u64::from_str_radix(v.as_str()?.trim_start_matches("0x"), 16).ok()
    }

    async fn handle(State(st): State<Arc<St>>, body: Bytes) -> Response {
        let n = st.counts.requests.fetch_add(1, Ordering::SeqCst);
        let req: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        if req["method"] == "eth_getLogs" {
            let p = &req["params"][0];
            if let (Some(a), Some(b)) = (hex_u64(&p["fromBlock"]), hex_u64(&p["toBlock"]))
                && b.saturating_sub(a) >= 5
            {
                st.counts.too_many_results.fetch_add(1, Ordering::SeqCst);
                let err = serde_json::json!({"jsonrpc": "2.0", "id": req["id"],
                    "error": {"code": -32005, "message": "query returned more than 10000 results"}});
                return axum::Json(err).into_response();
            }
        }
        match n % 13 {
            3 => {
                st.counts.rate_limited.fetch_add(1, Ordering::SeqCst);
                let mut r = (StatusCode::TOO_MANY_REQUESTS, "slow down").into_response();
                let after = if n % 39 == 3 { "1" } else { "0" };
                r.headers_mut()
                    .insert("retry-after", HeaderValue::from_static(after));
                return r;
            }
            6 if n % 26 == 6 => {
                st.counts.timeouts.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1500)).await;
            }
            9 => {
                st.counts.dropped.fetch_add(1, Ordering::SeqCst);
                let failing = futures::stream::once(async {
                    Err::<Bytes, std::io::Error>(std::io::Error::other("connection dropped"))
                });
                return Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(Body::from_stream(failing))
                    .unwrap();
            }
            _ => {}
        }
        rpc_proxy::forward(&st.client, &st.upstream, body).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_faults_do_not_change_the_result() {
    let (env, anvil, mut model) = setup(5).await;
    for _ in 0..25 {
        model.random_tx(&anvil, 10).await;
    }
    let (proxy, counts) = fault_proxy::start(anvil.url.clone()).await;
    let cfg = indexer_config(
        &env,
        anvil_chain(
            &proxy,
            serde_json::json!({"reorg_depth": 5, "max_block_range": 2000, "rpc_timeout_ms": 700, "rpc_max_retries": 30}),
        ),
        token_configs(model.erc20, model.nft),
    );
    let indexer = InProcIndexer::start(cfg).await;
    wait_head_indexed(&env, &anvil, Duration::from_secs(90)).await;
    assert_exact(&env, &anvil, &model).await;
    for _ in 0..6 {
        model.random_tx(&anvil, 10).await;
    }
    assert_index_matches_chain(&env, &anvil, &model, Duration::from_secs(60)).await;
    indexer.stop().await;
    for (what, c) in [
        ("429", &counts.rate_limited),
        ("timeout", &counts.timeouts),
        ("dropped connection", &counts.dropped),
        ("-32005 too many results", &counts.too_many_results),
    ] {
        assert!(c.load(Ordering::SeqCst) > 0, "the proxy injected no {what}");
    }
}

fn write_config(dir: &tempfile::TempDir, rpc: &str, model: &Model, extra: &str) -> String {
    let path = dir.path().join("chain.toml");
    let toml = format!(
        r#"
[chain]
enabled = true

[[chain.chains]]
chain_id = {CHAIN_ID}
name = "anvil"
rpc_urls = ["{rpc}"]
poll_interval_ms = 50
reorg_depth = 5
{extra}

[[chain.tokens]]
chain_id = {CHAIN_ID}
address = "{:#x}"
standard = "erc20"

[[chain.tokens]]
chain_id = {CHAIN_ID}
address = "{:#x}"
standard = "erc721"
"#,
        model.erc20, model.nft
    );
    std::fs::write(&path, toml).unwrap();
    path.to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_fetch_and_commit_loses_and_duplicates_nothing() {
    let (env, anvil, mut model) = setup(6).await;
    for _ in 0..150 {
        model.random_tx(&anvil, 25).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        &dir,
        &anvil.url,
        &model,
        "max_block_range = 1\nfetch_concurrency = 2",
    );
    let mut kills = 0;
    let mut last = None;
    while kills < 6 {
        let mut child = Child::spawn(&env, &["--config", &cfg, "run"], &[]);
        let seen = last;
        let cp = wait_until(Duration::from_secs(30), "indexing progresses", || async {
            let cp = anvil_checkpoint(&env).await.map(|c| c.0);
            (cp.is_some() && cp != seen).then_some(cp)
        })
        .await;
        child.signal("KILL");
        child.wait_exit(Duration::from_secs(10));
        kills += 1;
        last = cp;
    }
    assert!(
        last.unwrap() < anvil.head().await,
        "the kills should land while the history is still being indexed"
    );
    let mut worker = Child::spawn(&env, &["--config", &cfg, "run"], &[]);
    assert_index_matches_chain(&env, &anvil, &model, Duration::from_secs(60)).await;
    worker.signal("TERM");
    assert!(
        worker.wait_exit(Duration::from_secs(15)).success(),
        "clean exit on SIGTERM"
    );

    // The operator commands: status, and reconcile exiting non-zero only on a mismatch.
    let mut status = Child::spawn(&env, &["--config", &cfg, "index", "status"], &[]);
    assert!(status.wait_exit(Duration::from_secs(30)).success());
    let mut ok = Child::spawn(&env, &["--config", &cfg, "index", "reconcile"], &[]);
    assert!(
        ok.wait_exit(Duration::from_secs(60)).success(),
        "reconcile of an exact index"
    );
    sqlx::query(
        "UPDATE nft_owners SET owner = '0x00000000000000000000000000000000000000aa' \
         WHERE token_id = (SELECT min(token_id) FROM nft_owners)",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let mut bad = Child::spawn(&env, &["--config", &cfg, "index", "reconcile"], &[]);
    assert!(
        !bad.wait_exit(Duration::from_secs(60)).success(),
        "reconcile must fail on a mismatch"
    );
}

async fn leader_pid(env: &TestEnv) -> Option<u32> {
    let name: Option<String> = sqlx::query_scalar(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database() \
           AND a.application_name LIKE 'tokenwarden-indexer-%'",
    )
    .fetch_optional(&env.pool)
    .await
    .unwrap();
    name?.rsplit("-pid").next()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_replica_takes_over_within_ten_seconds() {
    let (env, anvil, mut model) = setup(7).await;
    for _ in 0..20 {
        model.random_tx(&anvil, 10).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(&dir, &anvil.url, &model, "");
    let mut a = Some(Child::spawn(&env, &["--config", &cfg, "run"], &[]));
    let mut b = Some(Child::spawn(&env, &["--config", &cfg, "run"], &[]));
    wait_head_indexed(&env, &anvil, Duration::from_secs(60)).await;
    assert_exact(&env, &anvil, &model).await;
    let leader = wait_until(Duration::from_secs(10), "a leader holds the lease", || {
        leader_pid(&env)
    })
    .await;
    let a_pid = a.as_ref().unwrap().0.id();
    let b_pid = b.as_ref().unwrap().0.id();
    assert!(
        leader == a_pid || leader == b_pid,
        "leader {leader} is one of the replicas"
    );
    let mut dead = if leader == a_pid {
        a.take().unwrap()
    } else {
        b.take().unwrap()
    };
    dead.signal("KILL");
    dead.wait_exit(Duration::from_secs(10));
    let killed_at = Instant::now();
    for _ in 0..5 {
        model.random_tx(&anvil, 10).await;
    }
    wait_head_indexed(&env, &anvil, Duration::from_secs(10)).await;
    assert!(
        killed_at.elapsed() < Duration::from_secs(10),
        "takeover took {:?}",
        killed_at.elapsed()
    );
    let new_leader = leader_pid(&env).await.expect("new leader");
    assert_ne!(new_leader, leader);
    assert_exact(&env, &anvil, &model).await;
    assert_eq!(
        stored_transfer_count(&env).await,
        chain_log_count(&anvil, &model).await
    );
    let _ = B256::ZERO;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_block_after_the_mint_stops_the_indexer_instead_of_storing_a_negative_balance() {
    let (env, anvil, model) = setup(6).await;
    let mint = [(Address::ZERO, holder(1), U256::from(1000u64))];
    anvil.send(model.erc20, Anvil::erc20_batch(&mint)).await;
    let minted = anvil.head().await;
    let spend = [(holder(1), holder(2), U256::from(400u64))];
    anvil.send(model.erc20, Anvil::erc20_batch(&spend)).await;
    let spent = anvil.head().await;
    assert!(spent > minted);
    let tokens = vec![TokenConfig {
        chain_id: CHAIN_ID,
        address: format!("{:#x}", model.erc20),
        standard: TokenStandard::Erc20,
        start_block: minted + 1,
    }];
    let cfg = indexer_config(&env, anvil_chain(&anvil.url, serde_json::json!({})), tokens);
    let indexer = InProcIndexer::start(cfg).await;
    let (reason, at): (String, i64) = wait_until(
        Duration::from_secs(30),
        "negative balance recorded as a fault",
        || async {
            sqlx::query_as("SELECT reason, at_block FROM chain_indexer_faults WHERE chain_id = $1")
                .bind(CHAIN_ID as i64)
                .fetch_optional(&env.pool)
                .await
                .unwrap()
        },
    )
    .await;
    assert!(
        reason.contains(&format!(
            "balance of {:#x} for token {:#x} would go below zero at block {spent}",
            holder(1),
            model.erc20
        )),
        "{reason}"
    );
    assert!(reason.contains("start_block"), "{reason}");
    assert_eq!(at as u64, spent);
    indexer.ended(Duration::from_secs(10)).await;
    let negative: i64 = sqlx::query_scalar("SELECT count(*) FROM token_balances WHERE balance < 0")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(negative, 0, "no negative balance is stored");
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM chain_transfers WHERE block_number >= $1")
            .bind(spent as i64)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(stored, 0, "the failing batch is rolled back");
    let cp = anvil_checkpoint(&env).await.map(|c| c.0);
    assert!(
        cp.is_none_or(|c| c < spent),
        "checkpoint {cp:?} stays before block {spent}"
    );
}

/// (block hash, log index) of every log `token` emitted on the current chain.
async fn chain_logs_of(anvil: &Anvil, token: Address) -> Vec<(String, i32)> {
    let filter = alloy::rpc::types::Filter::new()
        .address(token)
        .from_block(0)
        .to_block(anvil.head().await);
    let mut v: Vec<(String, i32)> = anvil
        .provider
        .get_logs(&filter)
        .await
        .unwrap()
        .iter()
        .map(|l| {
            (
                format!("{:#x}", l.block_hash.unwrap()),
                l.log_index.unwrap() as i32,
            )
        })
        .collect();
    v.sort();
    v
}

async fn stored_rejected(env: &TestEnv) -> Vec<(String, i32)> {
    sqlx::query_as(
        "SELECT block_hash, log_index FROM chain_rejected_logs WHERE chain_id = $1 ORDER BY 1, 2",
    )
    .bind(CHAIN_ID as i64)
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_transfers_are_kept_with_their_reason_and_undone_by_reorgs() {
    let (env, anvil, mut model) = setup(7).await;
    // The ERC-721 contract configured as an ERC-20: its Transfer logs have 4 topics.
    let mints: Vec<_> = (1..=3u64)
        .map(|i| (Address::ZERO, holder(i as u8), U256::from(i)))
        .collect();
    anvil.send(model.nft, Anvil::erc721_batch(&mints)).await;
    model.random_tx(&anvil, 4).await;
    let tokens = vec![
        TokenConfig {
            chain_id: CHAIN_ID,
            address: format!("{:#x}", model.erc20),
            standard: TokenStandard::Erc20,
            start_block: 0,
        },
        TokenConfig {
            chain_id: CHAIN_ID,
            address: format!("{:#x}", model.nft),
            standard: TokenStandard::Erc20,
            start_block: 0,
        },
    ];
    let cfg = indexer_config(
        &env,
        anvil_chain(&anvil.url, serde_json::json!({"reorg_depth": 10})),
        tokens,
    );
    let indexer = InProcIndexer::start(cfg).await;
    wait_head_indexed(&env, &anvil, Duration::from_secs(60)).await;
    let on_chain = chain_logs_of(&anvil, model.nft).await;
    assert!(on_chain.len() >= 3);
    assert_eq!(
        stored_rejected(&env).await,
        on_chain,
        "backfill keeps every rejected log"
    );
    let (token, topics, data, reason): (String, Vec<String>, String, String) = sqlx::query_as(
        "SELECT token, topics, data, reason FROM chain_rejected_logs ORDER BY block_number, log_index LIMIT 1",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(token, format!("{:#x}", model.nft));
    assert_eq!(topics.len(), 4, "{topics:?}");
    assert_eq!(data, "0x");
    assert!(reason.contains("Erc20 Transfer"), "{reason}");
    let nft_rows: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM token_balances WHERE token = $1) + \
                (SELECT count(*) FROM chain_transfers WHERE token = $1)",
    )
    .bind(format!("{:#x}", model.nft))
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(nft_rows, 0, "a rejected log changes no balance");

    // At the head, then a reorg dropping that block: its rejected logs go with it.
    let more = [(Address::ZERO, holder(4), U256::from(4u64))];
    anvil.send(model.nft, Anvil::erc721_batch(&more)).await;
    wait_head_indexed(&env, &anvil, Duration::from_secs(30)).await;
    let with_head = chain_logs_of(&anvil, model.nft).await;
    assert_eq!(with_head.len(), on_chain.len() + 1);
    assert_eq!(stored_rejected(&env).await, with_head);
    let before = anvil_checkpoint(&env).await.unwrap();
    let h = holder(5);
    let replacement = vec![(Address::ZERO, h, U256::from(77u64))];
    anvil
        .raw(
            "anvil_reorg",
            serde_json::json!([
                1,
                [[
                    reorg_tx(&anvil, model.erc20, Anvil::erc20_batch(&replacement)),
                    0
                ]]
            ]),
        )
        .await;
    wait_until(
        Duration::from_secs(30),
        "indexer follows the reorg",
        || async {
            let cp = anvil_checkpoint(&env).await?;
            (cp.0 == before.0 && cp.1 != before.1).then_some(())
        },
    )
    .await;
    let after = chain_logs_of(&anvil, model.nft).await;
    assert_eq!(after, on_chain, "the reorg dropped the head NFT log");
    assert_eq!(
        stored_rejected(&env).await,
        after,
        "rejected logs of dropped blocks are removed"
    );
    indexer.stop().await;
}

/// A JSON-RPC proxy in front of anvil playing a node that fell behind (a load-balanced
/// provider's lagging backend): while `lag_head` is set, `eth_blockNumber` answers it and
/// `eth_getBlockByNumber` answers `null` for any newer block.
mod lagging_proxy {
    use super::*;
    use axum::body::Bytes;
    use axum::extract::State;
    use axum::response::{IntoResponse, Response};

    #[derive(Default)]
    pub struct Lag {
        /// 0: not lagging.
        pub lag_head: AtomicU64,
        /// `null` answers given for blocks above the lagging head.
        pub nulls: AtomicU64,
    }

    struct St {
        upstream: String,
        client: reqwest::Client,
        lag: Arc<Lag>,
    }

    pub async fn start(upstream: String) -> (String, Arc<Lag>) {
        let lag = Arc::new(Lag::default());
        let st = Arc::new(St {
            upstream,
            client: reqwest::Client::new(),
            lag: lag.clone(),
        });
        let app = axum::Router::new()
            .route("/", axum::routing::post(handle))
            .with_state(st);
        (rpc_proxy::serve(app).await, lag)
    }

    async fn handle(State(st): State<Arc<St>>, body: Bytes) -> Response {
        let req: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let head = st.lag.lag_head.load(Ordering::SeqCst);
        if head > 0 {
            let answer = |result: serde_json::Value| {
                axum::Json(serde_json::json!({"jsonrpc": "2.0", "id": req["id"], "result": result}))
                    .into_response()
            };
            if req["method"] == "eth_blockNumber" {
                return answer(serde_json::json!(format!("{head:#x}")));
            }
            if req["method"] == "eth_getBlockByNumber"
                && let Some(n) = req["params"][0]
                    .as_str()
                    .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
                && n > head
            {
                st.lag.nulls.fetch_add(1, Ordering::SeqCst);
                return answer(serde_json::Value::Null);
            }
        }
        rpc_proxy::forward(&st.client, &st.upstream, body).await
    }
}

/// Found by the chain chaos run: a node that is behind answers `null` for the indexed tip, and
/// the tip check took that for a reorg — it undid canonical blocks, and with a lag deeper than
/// `reorg_depth` stopped the chain's indexer for good ("reorg deeper than reorg_depth").
/// A block the node does not have yet is not a different block: nothing may be undone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_node_is_not_taken_for_a_reorg() {
    let (env, anvil, mut model) = setup(12).await;
    for _ in 0..20 {
        model.random_tx(&anvil, 6).await;
    }
    let (proxy, lag) = lagging_proxy::start(anvil.url.clone()).await;
    let cfg = indexer_config(
        &env,
        anvil_chain(&proxy, serde_json::json!({"reorg_depth": 3})),
        token_configs(model.erc20, model.nft),
    );
    let indexer = InProcIndexer::start(cfg).await;
    wait_head_indexed(&env, &anvil, Duration::from_secs(60)).await;
    let tip = anvil_checkpoint(&env).await.unwrap();

    // The node falls 8 blocks behind (deeper than reorg_depth) while the index is at the tip.
    lag.lag_head.store(tip.0 - 8, Ordering::SeqCst);
    wait_until(
        Duration::from_secs(30),
        "the indexer asks the lagging node for blocks it does not have",
        || async { (lag.nulls.load(Ordering::SeqCst) >= 5).then_some(()) },
    )
    .await;
    let faults: Vec<String> =
        sqlx::query_scalar("SELECT reason FROM chain_indexer_faults WHERE chain_id = $1")
            .bind(CHAIN_ID as i64)
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert!(faults.is_empty(), "the indexer stopped: {faults:?}");
    assert_eq!(
        anvil_checkpoint(&env).await.unwrap(),
        tip,
        "nothing undone while the node lags"
    );

    // The node catches up; the chain goes on and the index follows it exactly.
    lag.lag_head.store(0, Ordering::SeqCst);
    for _ in 0..4 {
        model.random_tx(&anvil, 6).await;
    }
    assert_index_matches_chain(&env, &anvil, &model, Duration::from_secs(30)).await;
    indexer.stop().await;
}

/// Found by the chain chaos run: when the tip was reorged out and the head then moved more
/// than `reorg_depth` ahead before the indexer looked again, the backfill built on the stale
/// checkpoint: the dropped blocks' transfers stayed counted and the new branch's below the
/// checkpoint were never read (wrong balances, then "would go below zero" stopped the chain).
/// The checkpoint must be checked against the chain before a backfill starts from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tip_reorged_out_before_a_backfill_is_undone_first() {
    let (env, anvil, mut model) = setup(13).await;
    for _ in 0..10 {
        model.random_tx(&anvil, 6).await;
    }
    let cfg = indexer_config(
        &env,
        anvil_chain(&anvil.url, serde_json::json!({"reorg_depth": 5})),
        token_configs(model.erc20, model.nft),
    );
    let indexer = InProcIndexer::start(cfg).await;
    wait_head_indexed(&env, &anvil, Duration::from_secs(60)).await;
    assert_exact(&env, &anvil, &model).await;

    // Hold the indexer between two polls: its next catalogue read (every second, on its lease
    // connection) waits for this lock.
    let mut lock = env.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE public.chain_tokens IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    common::wait_for_lock_waiter(
        &env.pool,
        "tokenwarden-indexer-%",
        Duration::from_secs(10),
        "the indexer waits for the lock",
    )
    .await;
    // Meanwhile the indexed tip is reorged out and the chain moves 20 blocks on.
    reorg(&anvil, &mut model, 2, 3).await;
    anvil.mine(20).await;
    lock.rollback().await.unwrap();

    assert_index_matches_chain(&env, &anvil, &model, Duration::from_secs(30)).await;
    indexer.stop().await;
}
