//! ERC-1155 indexing against real anvil + real Postgres + real Redis, with the hand-written
//! `contracts/TestMulti1155.sol`: seeded random histories of `TransferSingle` and
//! `TransferBatch` (mints, batch mints with repeated ids, transfers, batch transfers, burns,
//! self and zero-value transfers, a malformed batch) indexed by backfill and at the head, a
//! reorg that drops a `TransferBatch`, `index reconcile` against `balanceOfBatch`, SIGKILL of
//! the worker mid-indexing, a token added at run time, and the `erc1155` access-rule leaf (both
//! database kinds). Every scenario ends by comparing every (holder, id) balance and
//! every id's supply with the chain.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::Provider;
use alloy::sol_types::{SolCall, SolEvent};
use common::anvil::{Anvil, TestMulti1155};
use common::chain::{
    ANVIL_CHAIN_ID, InProcIndexer, anvil_chain, anvil_checkpoint, indexer_config, wait_head_indexed,
};
use common::{Child, DbKind, TestEnv, begin_as, wait_until};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokenwarden::chain::store::ChainStore;
use tokenwarden::config::{TokenConfig, TokenStandard};

const IDS: u64 = 6;

fn holder(i: u8) -> Address {
    let mut b = [0u8; 20];
    b[17] = 0x11;
    b[19] = i;
    Address::from(b)
}

/// Generates valid random ERC-1155 transactions, reading the balances it needs from the chain
/// (so it stays valid after a reorg replaced history).
struct Multi {
    rng: StdRng,
    token: Address,
    holders: Vec<Address>,
}

impl Multi {
    fn new(seed: u64, token: Address) -> Multi {
        Multi {
            rng: StdRng::seed_from_u64(seed),
            token,
            holders: (1..=8).map(holder).collect(),
        }
    }

    fn pick(&mut self) -> Address {
        let i = self.rng.random_range(0..self.holders.len());
        self.holders[i]
    }

    fn id(&mut self) -> U256 {
        U256::from(self.rng.random_range(1..=IDS))
    }

    /// Every (holder, id) pair the history can touch.
    fn pairs(&self) -> Vec<(Address, U256)> {
        self.holders
            .iter()
            .flat_map(|h| (1..=IDS).map(move |i| (*h, U256::from(i))))
            .collect()
    }

    /// One random transaction; returns its hash.
    async fn random_tx(&mut self, anvil: &Anvil) -> B256 {
        let from = self.pick();
        let mut to = self.pick();
        let ids: Vec<U256> = (1..=IDS).map(U256::from).collect();
        let held = anvil
            .balance_of_batch(
                self.token,
                &ids.iter().map(|i| (from, *i)).collect::<Vec<_>>(),
            )
            .await;
        let owned: Vec<(U256, U256)> = ids
            .iter()
            .zip(&held)
            .filter(|(_, b)| !b.is_zero())
            .map(|(i, b)| (*i, *b))
            .collect();
        let kind = self.rng.random_range(0..10);
        if self.rng.random_bool(0.1) {
            to = from; // a self transfer moves nothing
        }
        let data = match kind {
            _ if owned.is_empty() || kind < 2 => TestMulti1155::mintCall {
                to: from,
                id: self.id(),
                value: U256::from(self.rng.random_range(1u64..1_000_000)),
            }
            .abi_encode(),
            2 | 3 => {
                // Repeated ids in one batch are legal and must add up.
                let k = self.rng.random_range(1..=5);
                let ids: Vec<U256> = (0..k).map(|_| self.id()).collect();
                let values = (0..k)
                    .map(|_| U256::from(self.rng.random_range(0u64..1_000_000)))
                    .collect();
                TestMulti1155::mintBatchCall { to, ids, values }.abi_encode()
            }
            4 | 5 => {
                let (id, bal) = owned[self.rng.random_range(0..owned.len())];
                let value = self.upto(bal);
                TestMulti1155::safeTransferFromCall {
                    from,
                    to,
                    id,
                    value,
                    data: Bytes::new(),
                }
                .abi_encode()
            }
            6 | 7 => {
                let (ids, values) = self.some_of(&owned);
                TestMulti1155::safeBatchTransferFromCall {
                    from,
                    to,
                    ids,
                    values,
                    data: Bytes::new(),
                }
                .abi_encode()
            }
            8 => {
                let (id, bal) = owned[self.rng.random_range(0..owned.len())];
                let value = self.upto(bal);
                TestMulti1155::burnCall { from, id, value }.abi_encode()
            }
            _ => {
                let (ids, values) = self.some_of(&owned);
                TestMulti1155::burnBatchCall { from, ids, values }.abi_encode()
            }
        };
        anvil.send(self.token, data).await
    }

    /// 0..=bal, sometimes zero, sometimes all of it.
    fn upto(&mut self, bal: U256) -> U256 {
        let b: u64 = bal.try_into().unwrap_or(u64::MAX);
        match self.rng.random_range(0..6) {
            0 => U256::ZERO,
            1 => bal,
            _ => U256::from(self.rng.random_range(0..=b)),
        }
    }

    /// A random non-empty subset of the owned ids, distinct, each with an amount it holds.
    fn some_of(&mut self, owned: &[(U256, U256)]) -> (Vec<U256>, Vec<U256>) {
        let mut ids = Vec::new();
        let mut values = Vec::new();
        for (id, bal) in owned {
            if ids.is_empty() || self.rng.random_bool(0.6) {
                ids.push(*id);
                values.push(self.upto(*bal));
            }
        }
        (ids, values)
    }
}

fn token_config(token: Address) -> TokenConfig {
    TokenConfig {
        chain_id: ANVIL_CHAIN_ID,
        address: format!("{token:#x}"),
        standard: TokenStandard::Erc1155,
        start_block: 0,
    }
}

/// Every stored (holder, id) balance equals `balanceOfBatch` (zero balances too), nothing is
/// stored for anyone else, each id's stored supply equals `totalSupply(id)`, the store's read
/// API agrees, and the stored transfers are exactly the chain's (one per TransferSingle, one
/// per id of a well-formed TransferBatch).
async fn assert_exact(env: &TestEnv, anvil: &Anvil, m: &Multi) {
    let token = format!("{:#x}", m.token);
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT holder, token_id::text, balance::text FROM chain_erc1155_balances \
         WHERE chain_id = $1 AND token = $2",
    )
    .bind(ANVIL_CHAIN_ID as i64)
    .bind(&token)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let stored: HashMap<(Address, U256), U256> = rows
        .into_iter()
        .map(|(h, i, b)| ((h.parse().unwrap(), i.parse().unwrap()), b.parse().unwrap()))
        .collect();
    let pairs = m.pairs();
    let chain = anvil.balance_of_batch(m.token, &pairs).await;
    for (p, c) in pairs.iter().zip(&chain) {
        let s = stored.get(p).copied().unwrap_or_default();
        assert_eq!(s, *c, "balance of {:#x} for id {}", p.0, p.1);
    }
    for p in stored.keys() {
        assert!(pairs.contains(p), "unexpected row {p:?} stored");
    }
    let store = ChainStore::new(ANVIL_CHAIN_ID).unwrap();
    for i in 1..=IDS {
        let id = U256::from(i);
        assert_eq!(
            store.erc1155_supply(&env.pool, m.token, id).await.unwrap(),
            anvil.supply_of(m.token, id).await,
            "supply of id {i}"
        );
        let mut want: Vec<(Address, U256)> = pairs
            .iter()
            .zip(&chain)
            .filter(|((_, pid), b)| *pid == id && !b.is_zero())
            .map(|((h, _), b)| (*h, *b))
            .collect();
        want.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        assert_eq!(
            store.erc1155_holders(&env.pool, m.token, id).await.unwrap(),
            want,
            "holders of id {i}"
        );
    }
    let (h, id) = pairs[3];
    assert_eq!(
        store
            .erc1155_balance(&env.pool, m.token, id, h)
            .await
            .unwrap(),
        chain[3]
    );
    assert_eq!(
        stored_transfers(env, m.token).await,
        chain_transfers(anvil, m.token).await
    );
}

/// The transfers the chain's logs carry: one per TransferSingle, one per id of a TransferBatch
/// whose arrays agree (a malformed one carries none).
async fn chain_transfers(anvil: &Anvil, token: Address) -> i64 {
    let filter = alloy::rpc::types::Filter::new()
        .address(token)
        .from_block(0)
        .to_block(anvil.head().await);
    let mut n = 0;
    for log in anvil.provider.get_logs(&filter).await.unwrap() {
        if let Ok(b) = TestMulti1155::TransferBatch::decode_log_data(log.data()) {
            if b.ids.len() == b.values.len() {
                n += b.ids.len() as i64;
            }
        } else if TestMulti1155::TransferSingle::decode_log_data(log.data()).is_ok() {
            n += 1;
        }
    }
    n
}

async fn stored_transfers(env: &TestEnv, token: Address) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM chain_erc1155_transfers WHERE chain_id = $1 AND token = $2",
    )
    .bind(ANVIL_CHAIN_ID as i64)
    .bind(format!("{token:#x}"))
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

async fn rows_of_tx(env: &TestEnv, tx: B256) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM chain_erc1155_transfers WHERE tx_hash = $1")
        .bind(format!("{tx:#x}"))
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_erc1155_histories_backfill_head_reorg_and_reconcile_are_exact() {
    let env = TestEnv::new().await;
    let anvil = Anvil::spawn().await;
    let token = anvil.deploy("TestMulti1155").await;
    let mut m = Multi::new(11, token);
    // History before the indexer starts (backfill), with a malformed TransferBatch in it.
    for _ in 0..40 {
        m.random_tx(&anvil).await;
    }
    let bad = anvil
        .send(
            token,
            TestMulti1155::emitMalformedCall {
                from: Address::ZERO,
                to: holder(1),
                ids: vec![U256::from(1u8), U256::from(2u8), U256::from(3u8)],
                values: vec![U256::from(5u8), U256::from(5u8)],
            }
            .abi_encode(),
        )
        .await;
    for _ in 0..10 {
        m.random_tx(&anvil).await;
    }
    let chain = anvil_chain(&anvil.url, serde_json::json!({"reorg_depth": 6}));
    let cfg = indexer_config(&env, chain.clone(), vec![token_config(token)]);
    let indexer = InProcIndexer::start(cfg).await;
    wait_head_indexed(&env, &anvil, Duration::from_secs(60)).await;
    assert_exact(&env, &anvil, &m).await;

    // The malformed batch is kept with its reason and changed nothing.
    let reasons: Vec<String> =
        sqlx::query_scalar("SELECT reason FROM chain_rejected_logs WHERE tx_hash = $1")
            .bind(format!("{bad:#x}"))
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(
        reasons[0].contains("TransferBatch has 3 ids but 2 values"),
        "{reasons:?}"
    );
    assert_eq!(rows_of_tx(&env, bad).await, 0);

    // Head following.
    for _ in 0..15 {
        m.random_tx(&anvil).await;
    }
    wait_head_indexed(&env, &anvil, Duration::from_secs(30)).await;
    assert_exact(&env, &anvil, &m).await;

    // A reorg that drops a TransferBatch: the batch's transfers leave the balances, the
    // supplies and the transfer table, and the replacement blocks' transfers come in.
    let h = holder(2);
    anvil
        .send(
            token,
            TestMulti1155::mintBatchCall {
                to: h,
                ids: vec![U256::from(1u8), U256::from(2u8), U256::from(1u8)],
                values: vec![U256::from(50u8), U256::from(60u8), U256::from(70u8)],
            }
            .abi_encode(),
        )
        .await;
    let dropped = anvil
        .send(
            token,
            TestMulti1155::safeBatchTransferFromCall {
                from: h,
                to: holder(3),
                ids: vec![U256::from(1u8), U256::from(2u8)],
                values: vec![U256::from(100u8), U256::from(60u8)],
                data: Bytes::new(),
            }
            .abi_encode(),
        )
        .await;
    wait_head_indexed(&env, &anvil, Duration::from_secs(30)).await;
    assert_eq!(rows_of_tx(&env, dropped).await, 2);
    let before = anvil_checkpoint(&env).await.unwrap();
    let replacement = [
        (
            TestMulti1155::mintBatchCall {
                to: holder(4),
                ids: vec![U256::from(3u8), U256::from(4u8)],
                values: vec![U256::from(9u8), U256::from(10u8)],
            }
            .abi_encode(),
            0,
        ),
        (
            TestMulti1155::mintCall {
                to: holder(5),
                id: U256::from(5u8),
                value: U256::from(11u8),
            }
            .abi_encode(),
            1,
        ),
    ];
    let pairs: Vec<_> = replacement
        .into_iter()
        .map(|(data, block)| serde_json::json!([anvil.reorg_tx_json(token, data), block]))
        .collect();
    anvil
        .raw("anvil_reorg", serde_json::json!([2, pairs]))
        .await;
    wait_head_indexed(&env, &anvil, Duration::from_secs(30)).await;
    let after = anvil_checkpoint(&env).await.unwrap();
    assert_eq!(before.0, after.0, "same height after anvil_reorg");
    assert_ne!(before.1, after.1, "the indexer followed the new branch");
    assert_eq!(
        rows_of_tx(&env, dropped).await,
        0,
        "the dropped batch is gone"
    );
    assert_exact(&env, &anvil, &m).await;
    // And the chain goes on.
    for _ in 0..5 {
        m.random_tx(&anvil).await;
    }
    wait_head_indexed(&env, &anvil, Duration::from_secs(30)).await;
    assert_exact(&env, &anvil, &m).await;
    indexer.stop().await;

    // `index reconcile` asks balanceOfBatch for every stored (holder, id) and agrees...
    let tokens = [token_config(token)];
    let report = tokenwarden::chain::cli::reconcile(&env.pool, &chain, &tokens)
        .await
        .unwrap();
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM chain_erc1155_balances")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert!(report.mismatches.is_empty(), "{:?}", report.mismatches);
    assert_eq!(report.checked as i64, stored);
    assert!(
        stored > 10,
        "a history worth reconciling: {stored} balances"
    );
    // ...and names the one balance that differs.
    let target = holder(3);
    sqlx::query(
        "UPDATE chain_erc1155_balances SET balance = balance + 1 \
         WHERE holder = $1 AND token_id = (SELECT min(token_id) FROM chain_erc1155_balances WHERE holder = $1)",
    )
    .bind(format!("{target:#x}"))
    .execute(&env.pool)
    .await
    .unwrap();
    let report = tokenwarden::chain::cli::reconcile(&env.pool, &chain, &tokens)
        .await
        .unwrap();
    assert_eq!(report.mismatches.len(), 1, "{:?}", report.mismatches);
    assert!(
        report.mismatches[0].contains(&format!("{target:#x}")),
        "{:?}",
        report.mismatches
    );
}

/// A config file for anvil's chain tracking `tokens` (address, standard).
fn write_config(dir: &tempfile::TempDir, rpc: &str, tokens: &[(Address, &str)]) -> String {
    let path = dir.path().join("chain.toml");
    let mut toml = format!(
        r#"
[chain]
enabled = true

[[chain.chains]]
chain_id = {ANVIL_CHAIN_ID}
name = "anvil"
rpc_urls = ["{rpc}"]
poll_interval_ms = 50
reorg_depth = 5
max_block_range = 1
fetch_concurrency = 2
"#
    );
    for (address, standard) in tokens {
        toml.push_str(&format!(
            "\n[[chain.tokens]]\nchain_id = {ANVIL_CHAIN_ID}\naddress = \"{address:#x}\"\nstandard = \"{standard}\"\n"
        ));
    }
    std::fs::write(&path, toml).unwrap();
    path.to_string_lossy().into_owned()
}

async fn token_status(env: &TestEnv, token: Address) -> Option<String> {
    sqlx::query_scalar("SELECT status FROM chain_tokens WHERE address = $1")
        .bind(format!("{token:#x}"))
        .fetch_optional(&env.pool)
        .await
        .unwrap()
}

async fn wait_token_status(env: &TestEnv, token: Address, want: &str) {
    wait_until(
        Duration::from_secs(60),
        &format!("token {token:#x} is {want}"),
        || async { (token_status(env, token).await.as_deref() == Some(want)).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erc1155_token_added_at_run_time_backfills_exactly_and_its_removal_deletes_its_rows() {
    let env = TestEnv::new().await;
    let anvil = Anvil::spawn().await;
    let erc20 = anvil.deploy("TestToken20").await;
    let token = anvil.deploy("TestMulti1155").await;
    let mut m = Multi::new(13, token);
    for i in 0..30u64 {
        m.random_tx(&anvil).await;
        let mint = [(Address::ZERO, holder(1), U256::from(i + 1))];
        anvil.send(erc20, Anvil::erc20_batch(&mint)).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = write_config(&dir, &anvil.url, &[(erc20, "erc20")]);
    let chain = anvil_chain(&anvil.url, serde_json::json!({"reorg_depth": 5}));
    let erc20_config = TokenConfig {
        standard: TokenStandard::Erc20,
        ..token_config(erc20)
    };
    let indexer = InProcIndexer::start(indexer_config(&env, chain, vec![erc20_config])).await;
    wait_head_indexed(&env, &anvil, Duration::from_secs(60)).await;
    assert_eq!(stored_transfers(&env, token).await, 0);

    let address = format!("{token:#x}");
    let add = |standard: &str| {
        env.cli(&[
            "--config",
            &file,
            "index",
            "token",
            "add",
            "--chain-id",
            "31337",
            "--address",
            &address,
            "--standard",
            standard,
            "--start-block",
            "0",
        ])
    };
    let bad = add("erc1156");
    assert!(!bad.ok, "an unknown standard is refused");
    assert!(bad.stderr.contains("erc1155"), "{}", bad.stderr);
    let added = add("erc1155");
    assert!(added.ok, "{}", added.stderr);
    // Its own backfill runs while the chain moves on, then it joins the chain.
    for _ in 0..8 {
        m.random_tx(&anvil).await;
    }
    wait_token_status(&env, token, "live").await;
    for _ in 0..5 {
        m.random_tx(&anvil).await;
    }
    wait_head_indexed(&env, &anvil, Duration::from_secs(30)).await;
    assert_exact(&env, &anvil, &m).await;

    // An own-index snapshot has no token id: refused with the reason, kept as a failed snapshot.
    let snap = env.cli(&[
        "--config", &file, "snapshot", "create", "--source", "index", "--chain", "31337",
        "--token", &address,
    ]);
    assert!(!snap.ok, "{}", snap.stdout);
    let said = format!("{}{}", snap.stdout, snap.stderr);
    assert!(
        said.contains("is erc1155: a holder snapshot without a token id is not available"),
        "{said}"
    );

    let removed = env.cli(&[
        "--config",
        &file,
        "index",
        "token",
        "remove",
        "--chain-id",
        "31337",
        "--address",
        &address,
    ]);
    assert!(removed.ok, "{}", removed.stderr);
    wait_token_status(&env, token, "removed").await;
    for table in [
        "chain_erc1155_transfers",
        "chain_erc1155_balances",
        "chain_erc1155_supply",
    ] {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {table} WHERE token = $1"
        )))
        .bind(&address)
        .fetch_one(&env.pool)
        .await
        .unwrap();
        assert_eq!(n, 0, "{table} rows of the removed token");
    }
    indexer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_worker_mid_erc1155_indexing_loses_and_duplicates_nothing() {
    let env = TestEnv::new().await;
    let anvil = Anvil::spawn().await;
    let token = anvil.deploy("TestMulti1155").await;
    let mut m = Multi::new(12, token);
    for _ in 0..120 {
        m.random_tx(&anvil).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(&dir, &anvil.url, &[(token, "erc1155")]);
    let mut last = None;
    for _ in 0..5 {
        let mut child = Child::spawn(&env, &["--config", &cfg, "run"], &[]);
        let seen = last;
        let cp = wait_until(Duration::from_secs(30), "indexing progresses", || async {
            let cp = anvil_checkpoint(&env).await.map(|c| c.0);
            (cp.is_some() && cp != seen).then_some(cp)
        })
        .await;
        child.signal("KILL");
        child.wait_exit(Duration::from_secs(10));
        last = cp;
    }
    assert!(
        last.unwrap() < anvil.head().await,
        "the kills should land while the history is still being indexed"
    );
    let mut worker = Child::spawn(&env, &["--config", &cfg, "run"], &[]);
    wait_head_indexed(&env, &anvil, Duration::from_secs(90)).await;
    assert_exact(&env, &anvil, &m).await;
    worker.signal("TERM");
    assert!(
        worker.wait_exit(Duration::from_secs(15)).success(),
        "clean exit on SIGTERM"
    );
    let mut ok = Child::spawn(&env, &["--config", &cfg, "index", "reconcile"], &[]);
    assert!(
        ok.wait_exit(Duration::from_secs(60)).success(),
        "reconcile of an exact ERC-1155 index"
    );
}

/// `access_set_rule` as `service_role`: the version, or the refusal's message.
async fn set_rule(env: &TestEnv, feature: &str, rule: serde_json::Value) -> Result<i32, String> {
    let mut tx = begin_as(&env.pool, "service_role", None).await;
    let r =
        sqlx::query_scalar::<_, i32>("SELECT public.access_set_rule('creator-1', $1, $2, 'test')")
            .bind(feature)
            .bind(rule)
            .fetch_one(&mut *tx)
            .await;
    match r {
        Ok(v) => {
            tx.commit().await.unwrap();
            Ok(v)
        }
        Err(e) => Err(e.to_string()),
    }
}

/// `verify_access_for` as `service_role`.
async fn decide(env: &TestEnv, user: uuid::Uuid, feature: &str) -> serde_json::Value {
    let mut tx = begin_as(&env.pool, "service_role", None).await;
    sqlx::query_scalar("SELECT public.verify_access_for($1, 'creator-1', $2)")
        .bind(user)
        .bind(feature)
        .fetch_one(&mut *tx)
        .await
        .unwrap()
}

async fn link(env: &TestEnv, user: uuid::Uuid, wallet: Address) {
    sqlx::query(
        "INSERT INTO public.user_wallets (user_id, address, chains, method) \
         VALUES ($1, $2, ARRAY[$3::bigint], 'eoa')",
    )
    .bind(user)
    .bind(format!("{wallet:#x}"))
    .bind(ANVIL_CHAIN_ID as i64)
    .execute(&env.pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erc1155_access_leaf_is_validated_and_decided_from_the_indexed_balance_of_its_id() {
    for kind in DbKind::ALL {
        erc1155_leaf_on(TestEnv::on(kind).await).await;
    }
}

async fn erc1155_leaf_on(env: TestEnv) {
    let kind = env.kind;
    let anvil = Anvil::spawn().await;
    let token = anvil.deploy("TestMulti1155").await;
    let erc20 = anvil.deploy("TestToken20").await;
    let (w1, w2, w3) = (holder(1), holder(2), holder(3));
    let id = |n: u8| U256::from(n);
    for (to, ids, values) in [
        (w1, vec![id(7), id(8)], vec![id(3), id(10)]),
        (w2, vec![id(7)], vec![id(2)]),
        (w3, vec![id(8)], vec![id(9)]),
    ] {
        let call = TestMulti1155::mintBatchCall { to, ids, values };
        anvil.send(token, call.abi_encode()).await;
    }
    let chain = anvil_chain(&anvil.url, serde_json::json!({"reorg_depth": 2}));
    let tokens = vec![
        token_config(token),
        TokenConfig {
            standard: TokenStandard::Erc20,
            ..token_config(erc20)
        },
    ];
    let indexer = InProcIndexer::start(indexer_config(&env, chain, tokens)).await;
    wait_head_indexed(&env, &anvil, Duration::from_secs(60)).await;
    let (alice, bob) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    link(&env, alice, w1).await;
    link(&env, alice, w2).await;
    link(&env, bob, w3).await;

    let leaf = |t: Address, extra: serde_json::Value| {
        let mut body = serde_json::json!({"chain_id": ANVIL_CHAIN_ID, "token": format!("{t:#x}")});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::json!({"condition": {"erc1155": body}})
    };
    // Validation names the bad node.
    for (rule, want) in [
        (
            leaf(token, serde_json::json!({"min": "1"})),
            "$.condition.erc1155.token_id: must be a token id",
        ),
        (
            leaf(token, serde_json::json!({"token_id": "7", "min": "0"})),
            "$.condition.erc1155.min: must be a positive whole number",
        ),
        (
            leaf(token, serde_json::json!({"token_id": "7", "min": "1.5"})),
            "$.condition.erc1155.min: must be a positive whole number",
        ),
        (
            leaf(
                token,
                serde_json::json!({"token_id": "7", "min": "1", "min_count": 1}),
            ),
            "$.condition.erc1155.min_count: unknown key",
        ),
        (
            leaf(erc20, serde_json::json!({"token_id": "7", "min": "1"})),
            "$.condition.erc1155.token: token is erc20, not erc1155",
        ),
        (
            serde_json::json!({"condition": {"erc721": {"chain_id": ANVIL_CHAIN_ID,
                "token": format!("{token:#x}"), "min_count": 1}}}),
            "$.condition.erc721.token: token is erc1155, not erc721",
        ),
    ] {
        let err = set_rule(&env, "BAD", rule).await.expect_err("refused");
        assert!(err.contains(want), "{kind:?}: {err} (wanted {want})");
    }

    // Alice holds 3 + 2 of id 7 over two wallets; bob none.
    set_rule(
        &env,
        "VIP",
        leaf(token, serde_json::json!({"token_id": "7", "min": "5"})),
    )
    .await
    .unwrap();
    let d = decide(&env, alice, "VIP").await;
    assert_eq!(d["allowed"], true, "{kind:?}: {d}");
    let e = &d["evidence"][0];
    assert_eq!(
        (
            e["kind"].as_str(),
            e["token_id"].as_str(),
            e["amount"].as_str(),
            e["minimum"].as_str()
        ),
        (Some("erc1155"), Some("7"), Some("5"), Some("5")),
        "{kind:?}: {d}"
    );
    let d = decide(&env, bob, "VIP").await;
    assert_eq!(
        (d["allowed"].as_bool(), d["reason"].as_str()),
        (Some(false), Some("not_met"))
    );
    // Per wallet: no single wallet of alice holds 5 of id 7.
    let mut per = leaf(token, serde_json::json!({"token_id": "7", "min": "5"}));
    per["per_wallet"] = true.into();
    set_rule(&env, "VIP", per).await.unwrap();
    assert_eq!(decide(&env, alice, "VIP").await["allowed"], false);
    // Another id: bob's 9 of id 8 pass a minimum of 9, alice's 10 too.
    set_rule(
        &env,
        "ID8",
        leaf(token, serde_json::json!({"token_id": "8", "min": "9"})),
    )
    .await
    .unwrap();
    assert_eq!(decide(&env, bob, "ID8").await["allowed"], true);
    assert_eq!(decide(&env, alice, "ID8").await["allowed"], true);

    // The decision follows the index: bob sends 1 of id 8 to alice, then fails the rule.
    let send = TestMulti1155::safeTransferFromCall {
        from: w3,
        to: w1,
        id: id(8),
        value: id(1),
        data: Bytes::new(),
    };
    anvil.send(token, send.abi_encode()).await;
    wait_head_indexed(&env, &anvil, Duration::from_secs(30)).await;
    let d = decide(&env, bob, "ID8").await;
    assert_eq!(d["allowed"], false, "{kind:?}: {d}");
    assert_eq!(d["evidence"][0]["amount"], "8");
    // No default condition for an ERC-1155 token: verify_token_access needs a rule.
    let mut tx = begin_as(&env.pool, "service_role", None).await;
    let d: serde_json::Value =
        sqlx::query_scalar("SELECT public.verify_token_access_for($1, $2, $3, 'ANY')")
            .bind(alice)
            .bind(ANVIL_CHAIN_ID as i64)
            .bind(format!("{token:#x}"))
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    assert_eq!(d["reason"], "no_rule", "{kind:?}: {d}");
    drop(tx);
    indexer.stop().await;
}
