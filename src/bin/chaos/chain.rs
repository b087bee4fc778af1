//! The chain part of `make chaos`: a random ERC-20 / ERC-721 history on anvil (mints, burns,
//! transfers over a dozen holders) while `tokenwarden run` indexes it through the fault proxy,
//! anvil reorgs of depth 1..=10 at random times, and the worker SIGKILLed and restarted. At the
//! end, with the chain quiet and the index at its head, every stored balance and owner must
//! equal `balanceOf` / `ownerOf` at that block, the stored balances must sum to
//! `totalSupply`, and the stored transfers must be the chain's `Transfer` logs, one for one.
//!
//! Like the ledger part it runs its own Postgres and Redis (temp dir, free ports) and its own
//! anvil, so nothing shared is touched.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alloy::primitives::{Address, U256};
use alloy::providers::Provider;
use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use super::proxy::{FaultPlan, FaultProxy};
use super::support::anvil::{AnvilProc, erc20_batch, erc721_batch};
use super::support::{Postgres, RedisServer, RunArgs, load_average, peak_rss_kib, terminate};

const CHAIN_ID: u64 = 31337;
const HOLDERS: u8 = 12;
/// NFT ids the random history uses; reorg replacement blocks mint fresh ids above them.
const NFT_IDS: u64 = 60;
/// The indexer's `reorg_depth`: above the deepest injected reorg (10).
const REORG_DEPTH: u64 = 12;

#[derive(clap::Args, Debug, Clone)]
pub struct ChainArgs {
    /// Chain part: how long the random history runs, in seconds.
    #[arg(long, default_value_t = 120)]
    pub chain_secs: u64,
    /// Chain part: worker SIGKILLs (each restarted after 0.5–2 s).
    #[arg(long, default_value_t = 3)]
    pub chain_kills: usize,
    /// Chain part: anvil reorgs, each of a random depth 1..=`--max-reorg-depth`.
    #[arg(long, default_value_t = 8)]
    pub chain_reorgs: usize,
    /// Chain part: deepest injected reorg (the indexer's reorg_depth is 12).
    #[arg(long, default_value_t = 10)]
    pub max_reorg_depth: u64,
    /// Chain part: share of RPC requests the proxy answers with a fault.
    #[arg(long, default_value_t = 0.05)]
    pub fault_rate: f64,
    /// Chain part: deepest lag of the proxy's lagging node, in blocks (above reorg_depth on
    /// purpose: a node resyncing is that far behind).
    #[arg(long, default_value_t = 20)]
    pub max_lag: u64,
    /// Chain part: longest the whole part may take (history, catch-up and checks).
    #[arg(long, default_value_t = 240)]
    pub chain_max_secs: u64,
}

/// Generates valid random operations; re-read from the chain after each reorg.
struct Model {
    rng: StdRng,
    erc20: Address,
    nft: Address,
    holders: Vec<Address>,
    balances: HashMap<Address, U256>,
    owners: HashMap<U256, Address>,
    /// Every NFT id ever used (the random ones and the reorgs' fresh ones).
    ids: HashSet<U256>,
    ops: OpCounts,
}

#[derive(Default, Debug)]
struct OpCounts {
    transactions: u64,
    reverted: u64,
    erc20_mints: u64,
    erc20_burns: u64,
    erc20_transfers: u64,
    nft_mints: u64,
    nft_burns: u64,
    nft_transfers: u64,
}

fn holder(i: u8) -> Address {
    let mut b = [0u8; 20];
    b[17] = 0xc4;
    b[19] = i;
    Address::from(b)
}

impl Model {
    fn pick(&mut self) -> Address {
        let i = self.rng.random_range(0..self.holders.len());
        self.holders[i]
    }

    fn erc20_ops(&mut self, k: usize) -> Vec<(Address, Address, U256)> {
        let mut ops = Vec::new();
        for _ in 0..k {
            let a = self.pick();
            let b = self.pick();
            let bal = self.balances.get(&a).copied().unwrap_or_default();
            let op = match self.rng.random_range(0..5) {
                0 | 1 => (
                    Address::ZERO,
                    a,
                    U256::from(self.rng.random_range(1u64..1_000_000_000)),
                ),
                2 if !bal.is_zero() => (a, Address::ZERO, self.upto(bal)),
                _ if !bal.is_zero() => (a, b, self.upto(bal)),
                _ => (Address::ZERO, a, U256::from(7u8)),
            };
            if op.0 == Address::ZERO {
                self.ops.erc20_mints += 1;
            } else if op.1 == Address::ZERO {
                self.ops.erc20_burns += 1;
            } else {
                self.ops.erc20_transfers += 1;
            }
            if op.0 != Address::ZERO {
                *self.balances.entry(op.0).or_default() -= op.2;
            }
            if op.1 != Address::ZERO {
                *self.balances.entry(op.1).or_default() += op.2;
            }
            ops.push(op);
        }
        ops
    }

    fn upto(&mut self, max: U256) -> U256 {
        let m: u128 = max.try_into().unwrap_or(u128::MAX);
        U256::from(self.rng.random_range(1..=m))
    }

    fn nft_ops(&mut self, k: usize) -> Vec<(Address, Address, U256)> {
        let mut ops = Vec::new();
        for _ in 0..k {
            let id = U256::from(self.rng.random_range(1..=NFT_IDS));
            let to = self.pick();
            let op = match self.owners.get(&id).copied() {
                None => (Address::ZERO, to, id),
                Some(o) if self.rng.random_bool(0.25) => (o, Address::ZERO, id),
                Some(o) => (o, to, id),
            };
            match (op.0 == Address::ZERO, op.1 == Address::ZERO) {
                (true, _) => self.ops.nft_mints += 1,
                (_, true) => self.ops.nft_burns += 1,
                _ => self.ops.nft_transfers += 1,
            }
            if op.1 == Address::ZERO {
                self.owners.remove(&id);
            } else {
                self.owners.insert(id, op.1);
            }
            self.ids.insert(id);
            ops.push(op);
        }
        ops
    }

    /// One random transaction (one block, automine): ERC-20 or ERC-721, 1..=6 operations.
    async fn random_tx(&mut self, anvil: &AnvilProc) -> Result<()> {
        let k = self.rng.random_range(1..=6);
        let (to, data) = if self.rng.random_bool(0.5) {
            let ops = self.erc20_ops(k);
            (self.erc20, erc20_batch(&ops))
        } else {
            let ops = self.nft_ops(k);
            (self.nft, erc721_batch(&ops))
        };
        let (_, ok) = anvil.send(to, data).await?;
        self.ops.transactions += 1;
        if !ok {
            // The model was off (it cannot be after a resync); read the truth back.
            self.ops.reverted += 1;
            self.resync(anvil).await?;
        }
        Ok(())
    }

    /// Re-reads balances and owners from the chain (after a reorg replaced history).
    async fn resync(&mut self, anvil: &AnvilProc) -> Result<()> {
        let (head, _) = anvil.head().await?;
        for h in self.holders.clone() {
            let b = anvil.balance_of(self.erc20, h, head).await?;
            self.balances.insert(h, b);
        }
        self.owners.clear();
        for id in self.ids.clone() {
            if let Some(o) = anvil.owner_of(self.nft, id, head).await? {
                self.owners.insert(id, o);
            }
        }
        Ok(())
    }

    /// Replaces the last `depth` blocks with blocks of other transfers: mints valid in any
    /// state (and a move of part of what was just minted), fresh NFT ids.
    async fn reorg(&mut self, anvil: &AnvilProc, depth: u64, salt: u64) -> Result<()> {
        let mut pairs = Vec::new();
        for j in 0..depth {
            let h = self.pick();
            let other = self.pick();
            let ops20 = vec![
                (Address::ZERO, h, U256::from(5_000 + salt * 100 + j)),
                (h, other, U256::from(1_000u64)),
            ];
            pairs.push(serde_json::json!([
                anvil.reorg_tx_json(self.erc20, erc20_batch(&ops20)),
                j
            ]));
            let id = U256::from(1_000 + salt * 100 + j);
            self.ids.insert(id);
            let ops721 = vec![(Address::ZERO, h, id), (h, other, id)];
            pairs.push(serde_json::json!([
                anvil.reorg_tx_json(self.nft, erc721_batch(&ops721)),
                j
            ]));
        }
        anvil
            .raw("anvil_reorg", serde_json::json!([depth, pairs]))
            .await?;
        self.resync(anvil).await
    }
}

/// The worker process (`tokenwarden run`), its log appended to `worker.log`.
struct Worker {
    bin: PathBuf,
    config: PathBuf,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    peak_rss_kib: u64,
}

impl Worker {
    fn start(&mut self) -> Result<()> {
        // Never two at once: a running one is killed first (it would outlive the run).
        self.kill9();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .arg("run")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    fn sample_rss(&mut self) {
        if let Some(c) = &self.child
            && let Some(k) = peak_rss_kib(c.id())
        {
            self.peak_rss_kib = self.peak_rss_kib.max(k);
        }
    }

    fn kill9(&mut self) {
        self.sample_rss();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// True when the worker exited without being killed (it is then restarted by the caller).
    fn exited(&mut self) -> bool {
        let gone = matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(Some(_))));
        if gone {
            self.child = None;
        }
        gone
    }

    fn stop(&mut self) {
        self.sample_rss();
        if let Some(mut c) = self.child.take() {
            terminate(&mut [&mut c], Duration::from_secs(20));
        }
    }
}

/// A run that ends early (an error) must not leave a worker behind.
impl Drop for Worker {
    fn drop(&mut self) {
        self.kill9();
    }
}

struct Kill {
    at_block: u64,
    down: Duration,
    /// From the restart until the checkpoint reached the head the chain had at the restart.
    catch_up: Option<Duration>,
}

#[derive(Default)]
pub struct ChainReport {
    ops: OpCounts,
    blocks: u64,
    history_secs: f64,
    faults: Vec<(&'static str, u64)>,
    lag_windows: u64,
    lagged_answers: u64,
    deepest_lag: u64,
    ws: (u64, u64),
    requests: u64,
    reorgs: Vec<u64>,
    /// Reorgs that replaced blocks the index had already committed.
    reorgs_on_indexed: u64,
    undos_logged: usize,
    kills: Vec<Kill>,
    unexpected_exits: u64,
    final_catch_up: Option<Duration>,
    checked_block: u64,
    holders_checked: usize,
    ids_checked: usize,
    transfers: (i64, usize),
    supply: (U256, U256),
    peak_rss_kib: u64,
    faults_rows: Vec<String>,
    pub mismatches: Vec<String>,
}

impl ChainReport {
    pub fn passed(&self) -> bool {
        self.mismatches.is_empty()
    }

    pub fn print(&self, seed: u64, total: Duration) {
        println!("\n=== chain chaos run (seed {seed}) ===");
        println!("load average at end: {}", load_average());
        let o = &self.ops;
        println!(
            "history: {} transactions in {} blocks over {:.0} s ({} reverted); ERC-20: {} mints, {} burns, {} transfers; ERC-721: {} mints, {} burns, {} transfers; {} holders",
            o.transactions,
            self.blocks,
            self.history_secs,
            o.reverted,
            o.erc20_mints,
            o.erc20_burns,
            o.erc20_transfers,
            o.nft_mints,
            o.nft_burns,
            o.nft_transfers,
            HOLDERS
        );
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        println!(
            "RPC faults injected over {} requests: {}; lagging node: {} windows, {} answers, up to {} blocks behind; WebSocket: {} sessions, {} cut",
            self.requests,
            faults.join(", "),
            self.lag_windows,
            self.lagged_answers,
            self.deepest_lag,
            self.ws.0,
            self.ws.1
        );
        println!(
            "reorgs: {} (depths {:?}), {} of them on blocks already indexed; reorg undos in the worker log: {}",
            self.reorgs.len(),
            self.reorgs,
            self.reorgs_on_indexed,
            self.undos_logged
        );
        println!("worker SIGKILLs: {}", self.kills.len());
        for (i, k) in self.kills.iter().enumerate() {
            println!(
                "  kill {} at block {:>5}: down {:>5.0} ms; caught up with the head of its restart {} after the restart",
                i + 1,
                k.at_block,
                k.down.as_secs_f64() * 1000.0,
                k.catch_up
                    .map(|d| format!("{:.0} ms", d.as_secs_f64() * 1000.0))
                    .unwrap_or_else(|| "never".into())
            );
        }
        println!(
            "worker exits by itself (restarted): {}; worker peak RSS {:.1} MiB",
            self.unexpected_exits,
            self.peak_rss_kib as f64 / 1024.0
        );
        println!(
            "caught up with the quiet chain {} after the history ended",
            self.final_catch_up
                .map(|d| format!("{:.1} s", d.as_secs_f64()))
                .unwrap_or_else(|| "never".into())
        );
        println!(
            "checked at block {}: {} ERC-20 holders against balanceOf, {} NFT ids against ownerOf, stored sum {} vs totalSupply {}, {} stored transfers vs {} Transfer logs",
            self.checked_block,
            self.holders_checked,
            self.ids_checked,
            self.supply.0,
            self.supply.1,
            self.transfers.0,
            self.transfers.1
        );
        if !self.faults_rows.is_empty() {
            println!("indexer faults recorded: {:?}", self.faults_rows);
        }
        println!("mismatches {}", self.mismatches.len());
        for m in self.mismatches.iter().take(10) {
            println!("    {m}");
        }
        println!("chain part time {:.1} s", total.as_secs_f64());
        println!(
            "{}",
            if self.passed() {
                "CHAIN CHAOS PASSED"
            } else {
                "CHAIN CHAOS FAILED"
            }
        );
    }
}

/// Runs the chain part in `dir` (its own servers and anvil); stops by itself within
/// `--chain-max-secs`.
pub async fn run(args: &ChainArgs, run: &RunArgs, seed: u64, dir: &Path) -> Result<ChainReport> {
    let started = Instant::now();
    let end = started + Duration::from_secs(args.chain_max_secs);
    let mut pg = Postgres::init(&run.pg_bin_dir, dir, "")?;
    pg.start()?;
    let mut redis = RedisServer::new(dir)?;
    redis.start()?;
    let outcome = async {
        let pool = PgPoolOptions::new()
            .max_connections(3)
            .acquire_timeout(Duration::from_secs(30))
            .connect(&pg.url())
            .await
            .context("connect to the chaos Postgres")?;
        tokenwarden::infra::migrate(&pool).await?;
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let anvil = AnvilProc::spawn(root).await?;
        let erc20 = anvil.deploy("TestToken20").await?;
        let nft = anvil.deploy("TestNft721").await?;
        let proxy = FaultProxy::start(
            &anvil.url,
            FaultPlan {
                rate: args.fault_rate,
                hang: Duration::from_millis(1_500),
                max_lag: args.max_lag,
            },
            seed ^ 0xc4a1,
        )
        .await?;
        let config = dir.join("chain.toml");
        std::fs::write(&config, worker_config(&proxy, erc20, nft))?;
        let mut worker = Worker {
            bin: run.worker_bin()?,
            config,
            env: [
                ("TOKENWARDEN__DATABASE__URL", pg.url()),
                ("TOKENWARDEN__REDIS__URL", redis.url()),
                ("TOKENWARDEN__REDIS__PREFIX", "chainchaos".into()),
                ("TOKENWARDEN__HTTP__ENABLED", "false".into()),
                ("TOKENWARDEN__MAINTENANCE__ENABLED", "false".into()),
                ("TOKENWARDEN__TELEMETRY__LEVEL", "warn".into()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
            log: dir.join("worker.log"),
            child: None,
            peak_rss_kib: 0,
        };
        let mut model = Model {
            rng: StdRng::seed_from_u64(seed),
            erc20,
            nft,
            holders: (1..=HOLDERS).map(holder).collect(),
            balances: HashMap::new(),
            owners: HashMap::new(),
            ids: HashSet::new(),
            ops: OpCounts::default(),
        };
        // Some history before the worker starts, so it begins with a backfill.
        for _ in 0..40 {
            model.random_tx(&anvil).await?;
        }
        let first_block = anvil.head().await?.0;
        worker.start()?;
        println!(
            "chain part: anvil {}, proxy {}, worker started; history for {} s",
            anvil.url, proxy.url, args.chain_secs
        );
        let mut report = ChainReport::default();
        let monitor = Monitor::start(pool.clone());
        history(args, &mut model, &anvil, &mut worker, &monitor, &mut report).await?;
        report.ops = std::mem::take(&mut model.ops);
        report.blocks = anvil.head().await?.0.saturating_sub(first_block);

        // Quiet chain: wait until the index is at anvil's head (same hash), within the budget.
        let quiet = Instant::now();
        let (head, head_hash) = anvil.head().await?;
        let mut caught = false;
        while Instant::now() < end {
            if worker.exited() {
                report.unexpected_exits += 1;
                worker.start()?;
            }
            worker.sample_rss();
            if let Some((n, h)) = checkpoint(&pool).await?
                && n == head
                && h == format!("{head_hash:#x}")
            {
                caught = true;
                break;
            }
            if !fault_rows(&pool).await?.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        report.final_catch_up = caught.then(|| quiet.elapsed());
        monitor.stop();
        worker.stop();
        report.peak_rss_kib = worker.peak_rss_kib;
        report.faults_rows = fault_rows(&pool).await?;
        let c = &proxy.counts;
        report.requests = c.requests.load(Ordering::Relaxed);
        report.faults = vec![
            ("429", c.rate_limited.load(Ordering::Relaxed)),
            ("hang", c.hangs.load(Ordering::Relaxed)),
            ("dropped", c.dropped.load(Ordering::Relaxed)),
            ("truncated", c.truncated.load(Ordering::Relaxed)),
        ];
        report.lag_windows = c.lag_windows.load(Ordering::Relaxed);
        report.lagged_answers = c.lagged_answers.load(Ordering::Relaxed);
        report.deepest_lag = c.deepest_lag.load(Ordering::Relaxed);
        report.ws = (
            c.ws_sessions.load(Ordering::Relaxed),
            c.ws_cut.load(Ordering::Relaxed),
        );
        report.undos_logged = std::fs::read_to_string(dir.join("worker.log"))
            .map(|l| l.matches("reorg: undoing dropped blocks").count())
            .unwrap_or(0);
        if report.undos_logged > report.reorgs.len() {
            report.mismatches.push(format!(
                "{} reorg undos for {} injected reorgs: the indexer undid blocks no reorg dropped",
                report.undos_logged,
                report.reorgs.len()
            ));
        }
        if !caught {
            report.mismatches.push(format!(
                "the index did not reach the quiet chain's head {head} within --chain-max-secs (checkpoint {:?})",
                checkpoint(&pool).await?
            ));
        }
        for f in &report.faults_rows {
            report.mismatches.push(format!("indexer stopped: {f}"));
        }
        check(&pool, &anvil, &model, head, &mut report).await?;
        pool.close().await;
        anyhow::Ok(report)
    }
    .await;
    redis.stop();
    pg.stop();
    outcome
}

fn worker_config(proxy: &FaultProxy, erc20: Address, nft: Address) -> String {
    format!(
        r#"[chain]
enabled = true

[[chain.chains]]
chain_id = {CHAIN_ID}
name = "anvil"
rpc_urls = ["{}"]
ws_url = "{}"
poll_interval_ms = 100
reorg_depth = {REORG_DEPTH}
max_block_range = 50
fetch_concurrency = 2
rpc_timeout_ms = 1000
rpc_max_retries = 8

[[chain.tokens]]
chain_id = {CHAIN_ID}
address = "{erc20:#x}"
standard = "erc20"

[[chain.tokens]]
chain_id = {CHAIN_ID}
address = "{nft:#x}"
standard = "erc721"
"#,
        proxy.url, proxy.ws_url
    )
}

enum Event {
    Reorg(u64),
    Kill,
    Restart,
}

/// The random history with reorgs and kills at random times, for `--chain-secs`.
async fn history(
    args: &ChainArgs,
    model: &mut Model,
    anvil: &AnvilProc,
    worker: &mut Worker,
    monitor: &Monitor,
    report: &mut ChainReport,
) -> Result<()> {
    let start = Instant::now();
    // The catch-up and the checks need their share of --chain-max-secs.
    let span = Duration::from_secs(
        args.chain_secs
            .min(args.chain_max_secs.saturating_sub(30))
            .max(10),
    );
    let mut events: Vec<(Duration, Event)> = Vec::new();
    for _ in 0..args.chain_reorgs {
        let at = span.mul_f64(model.rng.random_range(0.05..0.95));
        let depth = model
            .rng
            .random_range(1..=args.max_reorg_depth.clamp(1, 10));
        events.push((at, Event::Reorg(depth)));
    }
    // One kill in each of `chain_kills` equal slices of 10 %..85 % of the history.
    let kills = args.chain_kills.max(1) as f64;
    for i in 0..args.chain_kills {
        let at = 0.1 + 0.75 * (i as f64 + model.rng.random_range(0.0..1.0)) / kills;
        events.push((span.mul_f64(at), Event::Kill));
    }
    events.sort_by_key(|e| e.0);
    let mut events: std::collections::VecDeque<_> = events.into();
    let mut killed_at: Option<Instant> = None;
    let mut salt = 0;
    while start.elapsed() < span || !events.is_empty() {
        if worker.exited() {
            report.unexpected_exits += 1;
            println!("  the worker exited by itself; restarting it");
            worker.start()?;
        }
        worker.sample_rss();
        let due = events.front().is_some_and(|e| e.0 <= start.elapsed());
        if due && let Some((_, ev)) = events.pop_front() {
            match ev {
                Event::Reorg(depth) => {
                    // Mostly on blocks the index already holds, so the undo path runs: wait
                    // (at most 5 s) for the index to reach the head first.
                    if worker.child.is_some() && model.rng.random_bool(0.8) {
                        let (head, _) = anvil.head().await?;
                        let until = Instant::now() + Duration::from_secs(5);
                        while Instant::now() < until
                            && checkpoint(monitor.pool()).await?.is_none_or(|c| c.0 < head)
                        {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                    salt += 1;
                    let (head, _) = anvil.head().await?;
                    let cp = checkpoint(monitor.pool()).await?.map_or(0, |c| c.0);
                    model.reorg(anvil, depth, salt).await?;
                    report.reorgs.push(depth);
                    if cp + depth > head {
                        report.reorgs_on_indexed += 1;
                    }
                }
                Event::Kill if worker.child.is_none() => {
                    // Still down from the previous kill: this one comes 3 s after the restart.
                    let at = events
                        .iter()
                        .find(|e| matches!(e.1, Event::Restart))
                        .map_or(start.elapsed(), |e| e.0)
                        + Duration::from_secs(3);
                    let pos = events.iter().position(|e| e.0 > at).unwrap_or(events.len());
                    events.insert(pos, (at, Event::Kill));
                }
                Event::Kill => {
                    worker.kill9();
                    killed_at = Some(Instant::now());
                    report.kills.push(Kill {
                        at_block: anvil.head().await?.0,
                        down: Duration::ZERO,
                        catch_up: None,
                    });
                    let down = Duration::from_millis(model.rng.random_range(500..2_000));
                    let at = start.elapsed() + down;
                    let pos = events.iter().position(|e| e.0 > at).unwrap_or(events.len());
                    events.insert(pos, (at, Event::Restart));
                }
                Event::Restart => {
                    worker.start()?;
                    let head = anvil.head().await?.0;
                    if let (Some(k), Some(at)) = (report.kills.last_mut(), killed_at.take()) {
                        k.down = at.elapsed();
                    }
                    monitor.watch_catch_up(report.kills.len() - 1, head);
                }
            }
            continue;
        }
        if start.elapsed() < span {
            model.random_tx(anvil).await?;
            if model.rng.random_bool(0.1) {
                anvil.raw("anvil_mine", serde_json::json!(["0x2"])).await?;
            }
        }
        let pause = model.rng.random_range(20..250);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    report.history_secs = start.elapsed().as_secs_f64();
    for (i, d) in monitor.catch_ups() {
        if let Some(k) = report.kills.get_mut(i) {
            k.catch_up = Some(d);
        }
    }
    Ok(())
}

/// Polls the checkpoint every 50 ms: when it reaches the head a restarted worker had to catch
/// up with. Its polling task stops when the monitor is dropped, also when the run fails early.
struct Monitor {
    pool: PgPool,
    inner: Arc<Mutex<MonitorState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Default)]
struct MonitorState {
    /// (kill index, restart time, head at the restart)
    pending: Vec<(usize, Instant, u64)>,
    done: BTreeMap<usize, Duration>,
}

impl Monitor {
    fn start(pool: PgPool) -> Monitor {
        let inner = Arc::new(Mutex::new(MonitorState::default()));
        let st = inner.clone();
        let p = pool.clone();
        let task = tokio::spawn(async move {
            let pool = p;
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let Ok(Some((cp, _))) = checkpoint(&pool).await else {
                    continue;
                };
                let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
                let mut done = Vec::new();
                s.pending.retain(|(i, at, head)| {
                    if cp >= *head {
                        done.push((*i, at.elapsed()));
                        false
                    } else {
                        true
                    }
                });
                s.done.extend(done);
            }
        });
        Monitor { pool, inner, task }
    }

    fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MonitorState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts timing how long the restarted worker takes to index up to `head`.
    fn watch_catch_up(&self, kill: usize, head: u64) {
        self.lock().pending.push((kill, Instant::now(), head));
    }

    fn catch_ups(&self) -> Vec<(usize, Duration)> {
        self.lock().done.iter().map(|(i, d)| (*i, *d)).collect()
    }

    fn stop(self) {
        self.task.abort();
    }
}

async fn checkpoint(pool: &PgPool) -> Result<Option<(u64, String)>> {
    let row: Option<(i64, String)> = sqlx::query_as(
        "SELECT block_number, block_hash FROM public.chain_checkpoints WHERE chain_id = $1",
    )
    .bind(CHAIN_ID as i64)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(n, h)| (n as u64, h)))
}

async fn fault_rows(pool: &PgPool) -> Result<Vec<String>> {
    Ok(
        sqlx::query_scalar("SELECT reason FROM public.chain_indexer_faults WHERE chain_id = $1")
            .bind(CHAIN_ID as i64)
            .fetch_all(pool)
            .await?,
    )
}

/// Every stored balance and owner against the chain at block `at`.
async fn check(
    pool: &PgPool,
    anvil: &AnvilProc,
    model: &Model,
    at: u64,
    report: &mut ChainReport,
) -> Result<()> {
    report.checked_block = at;
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT holder, balance::text FROM public.token_balances WHERE chain_id = $1 AND token = $2",
    )
    .bind(CHAIN_ID as i64)
    .bind(format!("{:#x}", model.erc20))
    .fetch_all(pool)
    .await?;
    let mut stored: HashMap<Address, U256> = HashMap::new();
    for (h, b) in rows {
        stored.insert(h.parse()?, b.parse()?);
    }
    let mut holders: HashSet<Address> = model.holders.iter().copied().collect();
    holders.extend(stored.keys().copied());
    let mut sum = U256::ZERO;
    for h in &holders {
        let chain = anvil.balance_of(model.erc20, *h, at).await?;
        let s = stored.get(h).copied().unwrap_or_default();
        sum += s;
        if s != chain {
            report
                .mismatches
                .push(format!("balance of {h:#x}: stored {s}, balanceOf {chain}"));
        }
    }
    report.holders_checked = holders.len();
    let supply = anvil.total_supply(model.erc20, at).await?;
    report.supply = (sum, supply);
    if sum != supply {
        report.mismatches.push(format!(
            "stored balances sum to {sum}, totalSupply {supply}"
        ));
    }

    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT token_id::text, owner FROM public.nft_owners WHERE chain_id = $1 AND token = $2",
    )
    .bind(CHAIN_ID as i64)
    .bind(format!("{:#x}", model.nft))
    .fetch_all(pool)
    .await?;
    let mut owners: HashMap<U256, Address> = HashMap::new();
    for (id, o) in rows {
        owners.insert(id.parse()?, o.parse()?);
    }
    let mut ids: HashSet<U256> = model.ids.clone();
    ids.extend(owners.keys().copied());
    for id in &ids {
        let chain = anvil.owner_of(model.nft, *id, at).await?;
        let s = owners.get(id).copied();
        if s != chain {
            report.mismatches.push(format!(
                "owner of NFT {id}: stored {s:?}, ownerOf {chain:?}"
            ));
        }
    }
    report.ids_checked = ids.len();

    let filter = alloy::rpc::types::Filter::new()
        .address(vec![model.erc20, model.nft])
        .from_block(0)
        .to_block(at);
    let logs = anvil.provider.get_logs(&filter).await?.len();
    let transfers: i64 =
        sqlx::query_scalar("SELECT count(*) FROM public.chain_transfers WHERE chain_id = $1")
            .bind(CHAIN_ID as i64)
            .fetch_one(pool)
            .await?;
    report.transfers = (transfers, logs);
    if transfers != logs as i64 {
        report.mismatches.push(format!(
            "{transfers} transfers stored, the chain has {logs} Transfer logs"
        ));
    }
    Ok(())
}
