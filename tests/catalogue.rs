//! The tracked-token catalogue against real anvil + Postgres: a token added while the chain is
//! indexed gets its own backfill and joins the chain exactly (while head following goes on),
//! pause/resume backfills the gap, removal deletes (or keeps) the rows, a SIGKILL in the middle
//! of a token's backfill and a reorg at its seam lose and duplicate nothing. Every scenario
//! ends by comparing stored balances with `balanceOf` and stored transfers with the chain logs.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use alloy::primitives::{Address, U256};
use alloy::providers::Provider;
use common::anvil::Anvil;
use common::chain::{
    ANVIL_CHAIN_ID, InProcIndexer, anvil_chain, indexer_config, wait_head_indexed,
};
use common::{Child, TestEnv, wait_until};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokenwarden::config::{ChainConfig, Config, TokenConfig, TokenStandard};

const CHAIN_ID: u64 = ANVIL_CHAIN_ID;

fn holder(i: u8) -> Address {
    let mut b = [0u8; 20];
    b[18] = 0x20;
    b[19] = i;
    Address::from(b)
}

/// Valid random ERC-20 moves over a few holders, for any number of tokens.
struct Model {
    rng: StdRng,
    holders: Vec<Address>,
    balances: HashMap<(Address, Address), U256>,
}

impl Model {
    fn new(seed: u64) -> Model {
        Model {
            rng: StdRng::seed_from_u64(seed),
            holders: (1..=6).map(holder).collect(),
            balances: HashMap::new(),
        }
    }

    fn ops(&mut self, token: Address, k: usize) -> Vec<(Address, Address, U256)> {
        let mut ops = Vec::new();
        for _ in 0..k {
            let a = self.holders[self.rng.random_range(0..self.holders.len())];
            let b = self.holders[self.rng.random_range(0..self.holders.len())];
            let bal = self.balances.get(&(token, a)).copied().unwrap_or_default();
            let op = if bal.is_zero() || self.rng.random_bool(0.3) {
                (
                    Address::ZERO,
                    a,
                    U256::from(self.rng.random_range(1u64..1_000_000)),
                )
            } else if self.rng.random_bool(0.1) {
                (a, Address::ZERO, U256::from(1u8))
            } else {
                let m: u128 = bal.try_into().unwrap_or(u128::MAX);
                (a, b, U256::from(self.rng.random_range(1..=m)))
            };
            if op.0 != Address::ZERO {
                *self.balances.entry((token, op.0)).or_default() -= op.2;
            }
            if op.1 != Address::ZERO {
                *self.balances.entry((token, op.1)).or_default() += op.2;
            }
            ops.push(op);
        }
        ops
    }

    async fn tx(&mut self, anvil: &Anvil, token: Address, k: usize) {
        let ops = self.ops(token, k);
        anvil.send(token, Anvil::erc20_batch(&ops)).await;
    }
}

/// The indexer config with `tokens` as ERC-20 tokens from block 0.
fn config_with(env: &TestEnv, chain: ChainConfig, tokens: &[Address]) -> Config {
    let tokens = tokens
        .iter()
        .map(|t| TokenConfig {
            chain_id: CHAIN_ID,
            address: format!("{t:#x}"),
            standard: TokenStandard::Erc20,
            start_block: 0,
        })
        .collect();
    indexer_config(env, chain, tokens)
}

async fn request(env: &TestEnv, token: Address, action: &str, keep_rows: bool) -> String {
    sqlx::query_scalar("SELECT chain_token_request($1, $2, $3, 'erc20', 0, $4)")
        .bind(CHAIN_ID as i64)
        .bind(format!("{token:#x}"))
        .bind(action)
        .bind(keep_rows)
        .fetch_one(&env.pool)
        .await
        .unwrap_or_else(|e| panic!("chain_token_request {action}: {e}"))
}

async fn status(env: &TestEnv, token: Address) -> Option<String> {
    sqlx::query_scalar("SELECT status FROM chain_tokens WHERE chain_id = $1 AND address = $2")
        .bind(CHAIN_ID as i64)
        .bind(format!("{token:#x}"))
        .fetch_optional(&env.pool)
        .await
        .unwrap()
}

async fn wait_status(env: &TestEnv, token: Address, want: &str, timeout: Duration) {
    wait_until(timeout, &format!("token {token:#x} is {want}"), || async {
        (status(env, token).await.as_deref() == Some(want)).then_some(())
    })
    .await;
}

async fn stored_transfers(env: &TestEnv, token: Address) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM chain_transfers WHERE chain_id = $1 AND token = $2")
        .bind(CHAIN_ID as i64)
        .bind(format!("{token:#x}"))
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

async fn chain_logs(anvil: &Anvil, token: Address) -> i64 {
    let filter = alloy::rpc::types::Filter::new()
        .address(token)
        .from_block(0)
        .to_block(anvil.head().await);
    anvil.provider.get_logs(&filter).await.unwrap().len() as i64
}

/// Every stored balance of `token` equals balanceOf, and its transfers are the chain's logs.
async fn assert_exact(env: &TestEnv, anvil: &Anvil, model: &Model, token: Address) {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT holder, balance::text FROM token_balances WHERE chain_id = $1 AND token = $2",
    )
    .bind(CHAIN_ID as i64)
    .bind(format!("{token:#x}"))
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let stored: HashMap<String, U256> = rows
        .into_iter()
        .map(|(h, b)| (h, b.parse().unwrap()))
        .collect();
    for h in &model.holders {
        let chain = anvil.balance_of(token, *h).await;
        let s = stored.get(&format!("{h:#x}")).copied().unwrap_or_default();
        assert_eq!(s, chain, "balance of {h:#x} in token {token:#x}");
    }
    assert_eq!(
        stored_transfers(env, token).await,
        chain_logs(anvil, token).await,
        "stored transfers of {token:#x}"
    );
}

/// Re-reads the model from the chain (after a reorg).
async fn resync(model: &mut Model, anvil: &Anvil, tokens: &[Address]) {
    for t in tokens {
        for h in model.holders.clone() {
            let b = anvil.balance_of(*t, h).await;
            model.balances.insert((*t, h), b);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_added_at_run_time_backfills_and_joins_exactly_then_pauses_resumes_and_is_removed()
{
    let env = TestEnv::new().await;
    let anvil = Anvil::spawn().await;
    let a = anvil.deploy("TestToken20").await;
    let b = anvil.deploy("TestToken20").await;
    let mut model = Model::new(11);
    for _ in 0..20 {
        model.tx(&anvil, a, 6).await;
        model.tx(&anvil, b, 6).await;
    }
    let cfg = config_with(&env, anvil_chain(&anvil.url, serde_json::json!({})), &[a]);
    let indexer = InProcIndexer::start(cfg).await;
    wait_head_indexed(&env, &anvil, Duration::from_secs(60)).await;
    assert_exact(&env, &anvil, &model, a).await;
    assert_eq!(stored_transfers(&env, b).await, 0);

    // Added at run time: its own backfill from block 0, while the head moves on.
    assert_eq!(request(&env, b, "add", false).await, "live");
    for _ in 0..6 {
        model.tx(&anvil, a, 4).await;
        model.tx(&anvil, b, 4).await;
    }
    wait_status(&env, b, "live", Duration::from_secs(60)).await;
    for _ in 0..4 {
        model.tx(&anvil, b, 4).await;
    }
    wait_head_indexed(&env, &anvil, Duration::from_secs(60)).await;
    assert_exact(&env, &anvil, &model, a).await;
    assert_exact(&env, &anvil, &model, b).await;
    let (symbol,): (Option<String>,) =
        sqlx::query_as("SELECT symbol FROM chain_tokens WHERE address = $1")
            .bind(format!("{b:#x}"))
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(symbol.as_deref(), Some("TT20"), "metadata read at run time");

    // Pause: its transfers are not indexed; resume backfills the gap exactly.
    request(&env, a, "pause", false).await;
    wait_status(&env, a, "paused", Duration::from_secs(20)).await;
    let before = stored_transfers(&env, a).await;
    for _ in 0..5 {
        model.tx(&anvil, a, 3).await;
    }
    wait_head_indexed(&env, &anvil, Duration::from_secs(60)).await;
    assert_eq!(
        stored_transfers(&env, a).await,
        before,
        "paused: not indexed"
    );
    request(&env, a, "resume", false).await;
    wait_status(&env, a, "live", Duration::from_secs(60)).await;
    wait_head_indexed(&env, &anvil, Duration::from_secs(60)).await;
    assert_exact(&env, &anvil, &model, a).await;
    assert_exact(&env, &anvil, &model, b).await;

    // Remove keeping the rows, then removing them, then adding it again.
    request(&env, b, "remove", true).await;
    wait_status(&env, b, "removed", Duration::from_secs(20)).await;
    assert!(stored_transfers(&env, b).await > 0, "rows kept");
    model.tx(&anvil, b, 3).await;
    wait_head_indexed(&env, &anvil, Duration::from_secs(60)).await;
    assert_eq!(request(&env, b, "add", false).await, "live");
    wait_status(&env, b, "live", Duration::from_secs(60)).await;
    wait_head_indexed(&env, &anvil, Duration::from_secs(60)).await;
    assert_exact(&env, &anvil, &model, b).await;
    request(&env, b, "remove", false).await;
    wait_status(&env, b, "removed", Duration::from_secs(20)).await;
    let left: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM chain_transfers WHERE token = $1) \
              + (SELECT count(*) FROM token_balances WHERE token = $1)",
    )
    .bind(format!("{b:#x}"))
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(left, 0, "removal deletes every row of the token");
    // An unknown token or action is refused by the SQL door.
    let err = sqlx::query("SELECT chain_token_request($1, $2, 'pause', NULL, NULL, false)")
        .bind(CHAIN_ID as i64)
        .bind(format!("{:#x}", holder(1)))
        .execute(&env.pool)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("is not tracked"), "{err}");
    assert_exact(&env, &anvil, &model, a).await;
    indexer.stop().await;
}

fn write_config(dir: &tempfile::TempDir, rpc: &str, a: Address) -> String {
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
max_block_range = 1

[[chain.tokens]]
chain_id = {CHAIN_ID}
address = "{a:#x}"
standard = "erc20"
"#
    );
    std::fs::write(&path, toml).unwrap();
    path.to_string_lossy().into_owned()
}

async fn indexed_to(env: &TestEnv, token: Address) -> Option<i64> {
    sqlx::query_scalar("SELECT indexed_to FROM chain_tokens WHERE address = $1")
        .bind(format!("{token:#x}"))
        .fetch_optional(&env.pool)
        .await
        .unwrap()
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_in_the_middle_of_a_token_backfill_loses_and_duplicates_nothing() {
    let env = TestEnv::new().await;
    let anvil = Anvil::spawn().await;
    let a = anvil.deploy("TestToken20").await;
    let b = anvil.deploy("TestToken20").await;
    let mut model = Model::new(12);
    model.tx(&anvil, a, 3).await;
    for _ in 0..120 {
        model.tx(&anvil, b, 5).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(&dir, &anvil.url, a);
    let mut worker = Child::spawn(&env, &["--config", &cfg, "run"], &[]);
    wait_head_indexed(&env, &anvil, Duration::from_secs(60)).await;
    // The index command (not SQL) adds it; the running leader picks it up.
    let mut add = Child::spawn(
        &env,
        &[
            "--config",
            &cfg,
            "index",
            "token",
            "add",
            "--chain-id",
            &CHAIN_ID.to_string(),
            "--address",
            &format!("{b:#x}"),
            "--standard",
            "erc20",
        ],
        &[],
    );
    assert!(add.wait_exit(Duration::from_secs(30)).success());
    let mut kills = 0;
    let mut last = None;
    while kills < 4 {
        let seen = last;
        let progressed = wait_until(
            Duration::from_secs(60),
            "token backfill progresses",
            || async {
                let n = indexed_to(&env, b).await;
                (n.is_some() && n != seen).then_some(n)
            },
        )
        .await;
        worker.signal("KILL");
        worker.wait_exit(Duration::from_secs(10));
        kills += 1;
        last = progressed;
        worker = Child::spawn(&env, &["--config", &cfg, "run"], &[]);
    }
    assert!(
        last.unwrap() < anvil.head().await as i64 - 5,
        "the kills landed in the middle of the backfill"
    );
    // status shows the backfill with its percent while it runs, or the token live.
    let out = std::process::Command::new(common::tokenwarden_bin())
        .args(["--config", &cfg, "index", "status"])
        .envs(env.env_vars())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("backfilling") || text.contains("live"),
        "{text}"
    );
    wait_status(&env, b, "live", Duration::from_secs(120)).await;
    model.tx(&anvil, b, 3).await;
    wait_head_indexed(&env, &anvil, Duration::from_secs(60)).await;
    assert_exact(&env, &anvil, &model, a).await;
    assert_exact(&env, &anvil, &model, b).await;
    worker.signal("TERM");
    assert!(worker.wait_exit(Duration::from_secs(15)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reorg_at_the_seam_of_a_token_backfill_is_undone_exactly() {
    let env = TestEnv::new().await;
    let anvil = Anvil::spawn().await;
    let a = anvil.deploy("TestToken20").await;
    let b = anvil.deploy("TestToken20").await;
    let mut model = Model::new(13);
    model.tx(&anvil, a, 3).await;
    let cfg = config_with(
        &env,
        anvil_chain(&anvil.url, serde_json::json!({"max_block_range": 1})),
        &[a],
    );
    for round in 0..3u64 {
        // B's history lies in the reorg window (the last 8 blocks) and below it.
        for _ in 0..10 {
            model.tx(&anvil, b, 3).await;
            model.tx(&anvil, a, 2).await;
        }
        let indexer = InProcIndexer::start(cfg.clone()).await;
        wait_head_indexed(&env, &anvil, Duration::from_secs(60)).await;
        if round == 0 {
            request(&env, b, "add", false).await;
        } else {
            request(&env, b, "resume", false).await;
        }
        // Reorg 3 blocks while B backfills, replacing transfers of both tokens.
        wait_until(Duration::from_secs(30), "B backfills", || async {
            (status(&env, b).await.as_deref() == Some("backfilling")
                || indexed_to(&env, b).await.is_some())
            .then_some(())
        })
        .await;
        let mut pairs = Vec::new();
        for j in 0..3u64 {
            let h = model.holders[j as usize];
            for t in [a, b] {
                let ops = vec![(Address::ZERO, h, U256::from(500 + round * 10 + j))];
                pairs.push(serde_json::json!([
                    {
                        "from": anvil.sender,
                        "to": t,
                        "input": format!("0x{}", hex::encode(Anvil::erc20_batch(&ops))),
                        "gas": "0x3000000",
                    },
                    j
                ]));
            }
        }
        anvil
            .raw("anvil_reorg", serde_json::json!([3, pairs]))
            .await;
        resync(&mut model, &anvil, &[a, b]).await;
        wait_status(&env, b, "live", Duration::from_secs(60)).await;
        wait_head_indexed(&env, &anvil, Duration::from_secs(60)).await;
        assert_exact(&env, &anvil, &model, a).await;
        assert_exact(&env, &anvil, &model, b).await;
        request(&env, b, "pause", false).await;
        wait_status(&env, b, "paused", Duration::from_secs(20)).await;
        indexer.stop().await;
    }
}

/// Where the chain serves the `finalized` block tag (anvil: head − 2 × slots per epoch), the
/// checkpoint's finalized_block follows it when it is above `checkpoint − reorg_depth`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finalized_block_follows_the_chains_finalized_tag() {
    let env = TestEnv::new().await;
    let anvil = Anvil::spawn_with(&["--slots-in-an-epoch", "1"]).await;
    let a = anvil.deploy("TestToken20").await;
    let mut model = Model::new(14);
    for _ in 0..12 {
        model.tx(&anvil, a, 2).await;
    }
    let cfg = config_with(&env, anvil_chain(&anvil.url, serde_json::json!({})), &[a]);
    let indexer = InProcIndexer::start(cfg).await;
    wait_head_indexed(&env, &anvil, Duration::from_secs(60)).await;
    // The tag is read at most every 5 s: new blocks until a commit has read it.
    let (cp, finalized) = wait_until(
        Duration::from_secs(30),
        "finalized_block follows the tag",
        || async {
            anvil.mine(1).await;
            let (cp, finalized): (i64, i64) = sqlx::query_as(
                "SELECT block_number, finalized_block FROM chain_checkpoints WHERE chain_id = $1",
            )
            .bind(CHAIN_ID as i64)
            .fetch_one(&env.pool)
            .await
            .ok()?;
            tokio::time::sleep(Duration::from_millis(200)).await;
            (finalized > cp - 8).then_some((cp, finalized))
        },
    )
    .await;
    assert_eq!(
        finalized,
        cp - 2,
        "the chain's finalized tag, not cp − reorg_depth (8)"
    );
    assert_exact(&env, &anvil, &model, a).await;
    indexer.stop().await;
}

alloy::sol! {
    interface TestVaultFactory {
        function deploy(address ipId, address holder, uint256 amount) external returns (address vault);
    }
}

/// The vaults the factory announced so far, oldest first (the second data word).
async fn vaults(anvil: &Anvil, factory: Address) -> Vec<Address> {
    let filter = alloy::rpc::types::Filter::new()
        .address(factory)
        .from_block(0)
        .to_block(anvil.head().await);
    anvil
        .provider
        .get_logs(&filter)
        .await
        .unwrap()
        .iter()
        .map(|l| Address::from_slice(&l.data().data[44..64]))
        .collect()
}

async fn create_vault(anvil: &Anvil, model: &mut Model, factory: Address, ip: u8) -> Address {
    use alloy::sol_types::SolCall;
    let holder = model.holders[ip as usize % model.holders.len()];
    let amount = U256::from(100_000_000u64);
    let data = TestVaultFactory::deployCall {
        ipId: addr_ip(ip),
        holder,
        amount,
    }
    .abi_encode();
    anvil.send(factory, data).await;
    let vault = *vaults(anvil, factory).await.last().unwrap();
    model.balances.insert((vault, holder), amount);
    vault
}

fn addr_ip(i: u8) -> Address {
    Address::with_last_byte(0xe0 + i)
}

async fn catalogued(env: &TestEnv, token: Address) -> bool {
    status(env, token).await.is_some()
}

/// A Story-shaped factory (`IpRoyaltyVaultDeployed(address ipId, address ipRoyaltyVault)`,
/// both in the data): vaults created before and while the indexer runs are added and indexed
/// exactly from their creation block; one created in a block that a reorg drops disappears with
/// every row it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn factory_created_tokens_are_indexed_and_a_reorged_creation_disappears() {
    let env = TestEnv::new().await;
    let anvil = Anvil::spawn().await;
    let factory = anvil.deploy("TestVaultFactory").await;
    let mut model = Model::new(15);
    let v1 = create_vault(&anvil, &mut model, factory, 1).await;
    for _ in 0..5 {
        model.tx(&anvil, v1, 3).await;
    }
    let mut cfg = config_with(&env, anvil_chain(&anvil.url, serde_json::json!({})), &[]);
    cfg.chain.factories = vec![tokenwarden::config::FactoryConfig {
        chain_id: CHAIN_ID,
        address: format!("{factory:#x}"),
        event: "IpRoyaltyVaultDeployed(address,address)".into(),
        token_arg: "data1".into(),
        standard: TokenStandard::Erc20,
        start_block: 0,
    }];
    cfg.validate().expect("valid config");
    let indexer = InProcIndexer::start(cfg).await;
    wait_status(&env, v1, "live", Duration::from_secs(60)).await;
    wait_head_indexed(&env, &anvil, Duration::from_secs(60)).await;
    assert_exact(&env, &anvil, &model, v1).await;

    // Created while the indexer follows the head, then used at once.
    let v2 = create_vault(&anvil, &mut model, factory, 2).await;
    model.tx(&anvil, v2, 3).await;
    model.tx(&anvil, v1, 3).await;
    wait_status(&env, v2, "live", Duration::from_secs(60)).await;
    model.tx(&anvil, v2, 3).await;
    wait_head_indexed(&env, &anvil, Duration::from_secs(60)).await;
    assert_exact(&env, &anvil, &model, v1).await;
    assert_exact(&env, &anvil, &model, v2).await;
    let (origin, start): (String, i64) =
        sqlx::query_as("SELECT origin, start_block FROM chain_tokens WHERE address = $1")
            .bind(format!("{v2:#x}"))
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(origin, "factory");
    assert!(start > 0);

    // A creation in a block that a reorg then drops: the token and its rows go.
    let v3 = create_vault(&anvil, &mut model, factory, 3).await;
    wait_until(Duration::from_secs(30), "v3 catalogued", || async {
        catalogued(&env, v3).await.then_some(())
    })
    .await;
    wait_head_indexed(&env, &anvil, Duration::from_secs(60)).await;
    anvil.raw("anvil_reorg", serde_json::json!([1, []])).await;
    wait_until(Duration::from_secs(30), "v3 forgotten", || async {
        (!catalogued(&env, v3).await).then_some(())
    })
    .await;
    wait_head_indexed(&env, &anvil, Duration::from_secs(60)).await;
    let left: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM chain_transfers WHERE token = $1) \
              + (SELECT count(*) FROM token_balances WHERE token = $1)",
    )
    .bind(format!("{v3:#x}"))
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(left, 0, "the reorged creation left no rows");
    assert_exact(&env, &anvil, &model, v1).await;
    assert_exact(&env, &anvil, &model, v2).await;
    indexer.stop().await;
}
