//! Indexer benchmark (`make bench-index`): on a fresh anvil, generates a history of Transfer
//! logs, times one `eth_getLogs` over it (the chain's own speed), runs `tokenwarden run` until
//! its checkpoint is the head and every balance reconciles exactly, then measures head lag
//! (block mined → balances committed) at one block per second and the latency of balance-at-block
//! queries (`balance_at`, `min_balance_between`) over the history. Prints the figures.

use std::collections::BTreeMap;
use std::error::Error;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use alloy::network::TransactionBuilder;
use alloy::primitives::{Address, Bytes, U160, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::TransactionRequest;
use alloy::sol;
use alloy::sol_types::SolCall;
use futures::StreamExt;
use rand::{Rng, SeedableRng};

mod support;

sol! {
    interface TestToken20 {
        function spam(uint160 base, uint256 holders, uint256 start, uint256 n) external;
    }
}

type Res<T> = Result<T, Box<dyn Error + Send + Sync>>;

struct Args {
    logs: u64,
    holders: u64,
    per_tx: u64,
    blocks_per_tx: u64,
    lag_blocks: u64,
    history_queries: u64,
    second_logs: u64,
    probe_ms: u64,
    /// `backfill_writers` of the worker's chain; unset: the worker's default (and a config
    /// that a worker from before the setting also reads).
    backfill_writers: Option<u64>,
    root: PathBuf,
    tokenwarden: PathBuf,
    db_admin: String,
    redis: String,
}

fn arg(name: &str, default: &str) -> String {
    let flag = format!("--{name}");
    let argv: Vec<String> = std::env::args().collect();
    argv.iter()
        .position(|a| *a == flag)
        .and_then(|i| argv.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn vm_hwm_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The platform anvil binary (the `.bin/anvil` Node launcher would outlive a kill).
fn anvil_bin(root: &std::path::Path) -> PathBuf {
    if let Ok(entries) = std::fs::read_dir(root.join("node_modules/@foundry-rs")) {
        for e in entries.flatten() {
            let bin = e.path().join("bin/anvil");
            if e.file_name().to_string_lossy().starts_with("anvil-") && bin.exists() {
                return bin;
            }
        }
    }
    root.join("node_modules/.bin/anvil")
}

struct Killed(std::process::Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `spam` transaction of `token`: `n` transfers from transfer number `start` on.
fn spam(
    token: Address,
    sender: Address,
    holders: u64,
    start: u64,
    n: u64,
    nonce: u64,
) -> TransactionRequest {
    let data = TestToken20::spamCall {
        base: U160::from(HOLDER_BASE),
        holders: U256::from(holders),
        start: U256::from(start),
        n: U256::from(n),
    }
    .abi_encode();
    TransactionRequest::default()
        .from(sender)
        .to(token)
        .nonce(nonce)
        .gas_limit(800_000_000)
        .input(Bytes::from(data).into())
}

/// The first holder's address; holder `k` is `HOLDER_BASE + k`.
const HOLDER_BASE: u64 = 0x10_0000;

/// Deploys a `TestToken20`: its address and deployment block.
async fn deploy_token(
    provider: &DynProvider,
    root: &std::path::Path,
    sender: Address,
    nonce: &mut u64,
) -> Res<(Address, u64)> {
    let code = std::fs::read_to_string(root.join("contracts/TestToken20.bin"))?;
    let deploy = TransactionRequest::default()
        .from(sender)
        .nonce(*nonce)
        .with_deploy_code(Bytes::from(hex::decode(code.trim())?));
    let receipt = provider
        .send_transaction(deploy)
        .await?
        .get_receipt()
        .await?;
    *nonce += 1;
    let token = receipt.contract_address.ok_or("no contract address")?;
    Ok((token, receipt.block_number.ok_or("no block number")?))
}

/// `logs` transfers of `token`: one transaction (automined into its own block) per `per_tx`
/// transfers, then empty blocks so the history spans `blocks_per_tx` blocks per transaction.
/// Transactions are sent one at a time: a deep anvil tx pool makes anvil itself slow and
/// memory-hungry.
async fn generate(
    provider: &DynProvider,
    sender: Address,
    token: Address,
    a: &Args,
    logs: u64,
    nonce: &mut u64,
) -> Res<()> {
    let mut start = 0;
    while start < logs {
        let n = a.per_tx.min(logs - start);
        let hash = *provider
            .send_transaction(spam(token, sender, a.holders, start, n, *nonce))
            .await?
            .tx_hash();
        let receipt = loop {
            if let Some(r) = provider.get_transaction_receipt(hash).await? {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        if !receipt.status() {
            return Err(format!("history transaction at {start} reverted").into());
        }
        if a.blocks_per_tx > 1 {
            provider
                .raw_request::<_, serde_json::Value>(
                    "anvil_mine".into(),
                    serde_json::json!([format!("{:#x}", a.blocks_per_tx - 1)]),
                )
                .await?;
        }
        *nonce += 1;
        start += n;
    }
    Ok(())
}

/// `tokenwarden_rpc_requests_total` of the worker's `/metrics`, summed by method.
async fn rpc_requests(http: &reqwest::Client, metrics_url: &str) -> Res<BTreeMap<String, u64>> {
    let text = http.get(metrics_url).send().await?.text().await?;
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("tokenwarden_rpc_requests_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let method = labels
            .split(',')
            .find_map(|l| l.strip_prefix("method=\"").map(|m| m.trim_end_matches('"')))
            .unwrap_or("?");
        *out.entry(method.to_string()).or_insert(0) += value.trim().parse::<f64>()? as u64;
    }
    Ok(out)
}

/// The requests of `after` not already in `before`, by method, and their total.
fn requests_between(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> (BTreeMap<String, u64>, u64) {
    let d: BTreeMap<String, u64> = after
        .iter()
        .map(|(m, n)| (m.clone(), n - before.get(m).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect();
    let total = d.values().sum();
    (d, total)
}

/// "method n (x per 10,000 logs), …" for `logs` logs.
fn per_10k(d: &BTreeMap<String, u64>, total: u64, logs: u64) -> String {
    let per = |n: u64| n as f64 * 10_000.0 / logs.max(1) as f64;
    let parts: Vec<String> = d
        .iter()
        .map(|(m, n)| format!("{m} {n} ({:.1})", per(*n)))
        .collect();
    format!(
        "{total} requests = {:.1} per 10,000 logs [{}]",
        per(total),
        parts.join(", ")
    )
}

/// Head-lag probes: each one is a transaction of 20 transfers of `token` to holders not used
/// before, timed from sending until the `balance_changes` announcement of its block (or a
/// later one) for that token.
struct Prober<'a, S> {
    provider: &'a DynProvider,
    messages: S,
    token: Address,
    sender: Address,
    holders: u64,
    /// First holder index of the next probe's transfers.
    start: u64,
    nonce: u64,
}

impl<S: futures::Stream<Item = redis::Msg> + Unpin> Prober<'_, S> {
    async fn lag(&mut self) -> Res<Duration> {
        let t_send = Instant::now();
        let r = self
            .provider
            .send_transaction(spam(
                self.token,
                self.sender,
                self.holders,
                self.start,
                20,
                self.nonce,
            ))
            .await?
            .get_receipt()
            .await?;
        self.nonce += 1;
        self.start += 20;
        let block = r.block_number.ok_or("no block number")?;
        let want = format!("{:#x}", self.token);
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), self.messages.next())
                .await?
                .ok_or("pubsub closed")?;
            let v: serde_json::Value = serde_json::from_str(&m.get_payload::<String>()?)?;
            if v["token"].as_str() == Some(want.as_str())
                && v["block"].as_u64().is_some_and(|b| b >= block)
            {
                return Ok(t_send.elapsed());
            }
        }
    }
}

fn ms(h: &hdrhistogram::Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

#[tokio::main]
async fn main() -> Res<()> {
    let root = PathBuf::from(arg("root", "."));
    let a = Args {
        logs: arg("logs", "220000").parse()?,
        holders: arg("holders", "20000").parse()?,
        per_tx: arg("per-tx", "1000").parse()?,
        blocks_per_tx: arg("blocks-per-tx", "10").parse()?,
        lag_blocks: arg("lag-blocks", "60").parse()?,
        history_queries: arg("history-queries", "2000").parse()?,
        second_logs: arg("second-logs", "100000").parse()?,
        probe_ms: arg("probe-ms", "250").parse()?,
        backfill_writers: match arg("backfill-writers", "").as_str() {
            "" => None,
            n => Some(n.parse()?),
        },
        tokenwarden: PathBuf::from(arg("tokenwarden", "target/release/tokenwarden")),
        db_admin: arg("db", "postgres://postgres@127.0.0.1:5432/postgres"),
        redis: arg("redis", "redis://127.0.0.1:6379"),
        root,
    };

    // 1. anvil and the history.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let _anvil = Killed(
        std::process::Command::new(anvil_bin(&a.root))
            .args([
                "--port",
                &port.to_string(),
                "--host",
                "127.0.0.1",
                "--silent",
            ])
            .args(["--gas-limit", "1000000000"])
            // anvil writes old states to ~/.foundry/anvil/tmp once it holds many blocks, about
            // 12 GB for this history, and a killed anvil never removes them (three runs filled
            // the disk). The bench reads state at the head only: keep none on disk.
            .args(["--max-persisted-states", "0"])
            .stdout(std::process::Stdio::null())
            .spawn()?,
    );
    let url = format!("http://127.0.0.1:{port}");
    let provider = ProviderBuilder::new().connect_http(url.parse()?).erased();
    let started = Instant::now();
    while provider.get_block_number().await.is_err() {
        if started.elapsed() > Duration::from_secs(30) {
            return Err("anvil did not start".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sender = provider.get_accounts().await?[0];
    let mut nonce = provider.get_transaction_count(sender).await?;
    let gen_started = Instant::now();
    // The second token (added at run time, phase 5) is deployed and given its history first,
    // so the first token's range holds none of its blocks.
    let second = if a.second_logs > 0 {
        let (t, b) = deploy_token(&provider, &a.root, sender, &mut nonce).await?;
        generate(&provider, sender, t, &a, a.second_logs, &mut nonce).await?;
        Some((t, b))
    } else {
        None
    };
    let (token, deploy_block) = deploy_token(&provider, &a.root, sender, &mut nonce).await?;
    generate(&provider, sender, token, &a, a.logs, &mut nonce).await?;
    let head = provider.get_block_number().await?;
    println!(
        "history: {} Transfer logs, {} holders, blocks {}..={} ({} blocks){}, generated in {:.1}s",
        a.logs,
        a.holders,
        deploy_block,
        head,
        head - deploy_block + 1,
        second.map_or(String::new(), |(_, b)| format!(
            "; second token: {} logs from block {b}",
            a.second_logs
        )),
        gen_started.elapsed().as_secs_f64()
    );

    // 2. The chain's own speed: one eth_getLogs over the whole range.
    let body = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "eth_getLogs", "params": [{
        "address": format!("{token:#x}"), "fromBlock": format!("{deploy_block:#x}"), "toBlock": format!("{head:#x}")}]});
    let http = reqwest::Client::new();
    let t = Instant::now();
    let bytes = http.post(&url).json(&body).send().await?.bytes().await?;
    let getlogs_secs = t.elapsed().as_secs_f64();
    let v: serde_json::Value = serde_json::from_slice(&bytes)?;
    let n_logs = v["result"].as_array().map_or(0, |r| r.len()) as u64;
    if n_logs != a.logs {
        return Err(format!("eth_getLogs returned {n_logs} logs, expected {}", a.logs).into());
    }
    println!(
        "chain: one eth_getLogs over the range: {getlogs_secs:.2}s ({:.0} logs/s, {} MB of JSON)",
        n_logs as f64 / getlogs_secs,
        bytes.len() / 1_000_000
    );
    drop(bytes);
    drop(v);

    // 3. A fresh database and the worker.
    let db_name = format!(
        "tw_bench_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let admin = sqlx::PgPool::connect(&a.db_admin).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db_name}")))
        .execute(&admin)
        .await?;
    let mut db_url = url::Url::parse(&a.db_admin)?;
    db_url.set_path(&format!("/{db_name}"));
    let db_url = db_url.to_string();
    let pool = sqlx::PgPool::connect(&db_url).await?;
    let prefix = format!("twbench:{db_name}");
    let dir = std::env::temp_dir().join(&db_name);
    std::fs::create_dir_all(&dir)?;
    // From here on the database, the Redis prefix and the temp dir exist: a run that fails
    // half-way removes them too (the worker, `Killed`, is stopped when the block ends).
    let outcome = async {
        let cfg_path = dir.join("bench.toml");
        let writers = a
            .backfill_writers
            .map_or(String::new(), |n| format!("backfill_writers = {n}\n"));
        std::fs::write(
            &cfg_path,
            format!(
                r#"[chain]
enabled = true
[[chain.chains]]
chain_id = 31337
name = "anvil"
rpc_urls = ["{url}"]
ws_url = "ws://127.0.0.1:{port}"
poll_interval_ms = 1000
reorg_depth = 64
max_block_range = 2000
{writers}[[chain.tokens]]
chain_id = 31337
address = "{token:#x}"
standard = "erc20"
start_block = {deploy_block}
"#
            ),
        )?;
        let log_path = dir.join("worker.log");
        let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let worker_cmd = |args: &[&str]| {
            let mut c = std::process::Command::new(&a.tokenwarden);
            c.arg("--config")
                .arg(&cfg_path)
                .args(args)
                .env("TOKENWARDEN__DATABASE__URL", &db_url)
                .env("TOKENWARDEN__REDIS__URL", &a.redis)
                .env("TOKENWARDEN__REDIS__PREFIX", &prefix)
                .env("TOKENWARDEN__HTTP__ENABLED", "true")
                .env(
                    "TOKENWARDEN__HTTP__LISTEN",
                    format!("127.0.0.1:{metrics_port}"),
                );
            c
        };
        // Migrations run once per deployment, not per backfill: applied (and timed) first.
        let t_migrate = Instant::now();
        let status = worker_cmd(&["migrate"])
            .stderr(std::fs::File::create(dir.join("migrate.log"))?)
            .status()?;
        if !status.success() {
            return Err(format!("tokenwarden migrate failed: {status}").into());
        }
        println!(
            "migrations on the fresh database (untimed below): {:.2}s",
            t_migrate.elapsed().as_secs_f64()
        );
        let t0 = Instant::now();
        let worker = Killed(
            worker_cmd(&["run"])
                .stderr(std::fs::File::create(&log_path)?)
                .spawn()?,
        );
        let pid = worker.0.id();
        let index = tokenwarden::chain::store::ChainStore::new(31337)?;
        loop {
            let cp = index.checkpoint(&pool).await?;
            if cp.map(|c| c.number) == Some(head) {
                break;
            }
            if t0.elapsed() > Duration::from_secs(600) {
                return Err(format!("no sync after 600 s; see {}", log_path.display()).into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let index_secs = t0.elapsed().as_secs_f64();
        let hwm_backfill = vm_hwm_kb(pid).unwrap_or(0);
        let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
        let after_backfill = rpc_requests(&http, &metrics_url).await?;

        let chain: tokenwarden::config::ChainConfig = serde_json::from_value(serde_json::json!({
            "chain_id": 31337, "name": "anvil", "rpc_urls": [url]}))?;
        let tokens = vec![tokenwarden::config::TokenConfig {
            chain_id: 31337,
            address: format!("{token:#x}"),
            standard: tokenwarden::config::TokenStandard::Erc20,
            start_block: deploy_block,
        }];
        let report = tokenwarden::chain::cli::reconcile(&pool, &chain, &tokens).await?;
        println!(
            "indexer: start → exact balances at head: {index_secs:.2}s = {:.0} logs/s ({:.2}x the chain's one-call speed); reconciled {} holders at block {:?}: {} mismatches",
            a.logs as f64 / index_secs,
            getlogs_secs / index_secs,
            report.checked,
            report.block,
            report.mismatches.len()
        );
        if !report.mismatches.is_empty() || report.checked as u64 != a.holders {
            return Err(format!(
                "balances are not exact: {:?}",
                &report.mismatches[..report.mismatches.len().min(5)]
            )
            .into());
        }
        let (d, total) = requests_between(&BTreeMap::new(), &after_backfill);
        println!("RPC, start → head: {}", per_10k(&d, total, a.logs));

        // 4. Head lag at one block per second.
        let client = redis::Client::open(a.redis.as_str())?;
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub
            .subscribe(format!("{prefix}:balance_changes"))
            .await?;
        let mut prober = Prober {
            provider: &provider,
            messages: pubsub.on_message(),
            token,
            sender,
            holders: a.holders,
            start: a.logs.max(a.holders),
            nonce,
        };
        let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let before_head = rpc_requests(&http, &metrics_url).await?;
        for _ in 0..a.lag_blocks {
            tick.tick().await;
            let lag = prober.lag().await?;
            hist.record(lag.as_micros() as u64)?;
        }
        let (d, total) = requests_between(&before_head, &rpc_requests(&http, &metrics_url).await?);
        println!(
            "head lag (tx sent → block mined → balances committed and announced), {} blocks at 1/s: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; RPC {total} requests = {:.1} per block {d:?}",
            hist.len(),
            ms(&hist, 0.5),
            ms(&hist, 0.99),
            hist.max() as f64 / 1000.0,
            total as f64 / a.lag_blocks.max(1) as f64,
        );

        // 5. A second token added at run time while the first is live: head lag of the first
        // token during the second's own backfill against the same probes just before.
        if let Some((token2, block2)) = second {
            let mut tick = tokio::time::interval(Duration::from_millis(a.probe_ms));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut before = hdrhistogram::Histogram::<u64>::new(3)?;
            for _ in 0..40 {
                tick.tick().await;
                let lag = prober.lag().await?;
                before.record(lag.as_micros() as u64)?;
            }
            let before_add = rpc_requests(&http, &metrics_url).await?;
            let t_add = Instant::now();
            let out = worker_cmd(&[
                "index",
                "token",
                "add",
                "--chain-id",
                "31337",
                "--address",
                &format!("{token2:#x}"),
                "--standard",
                "erc20",
                "--start-block",
                &block2.to_string(),
            ])
            .env("TOKENWARDEN__HTTP__ENABLED", "false")
            .output()?;
            if !out.status.success() {
                return Err(format!(
                    "index token add failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
                .into());
            }
            let mut during = hdrhistogram::Histogram::<u64>::new(3)?;
            let live = loop {
                let status: Option<String> = sqlx::query_scalar(
                    "SELECT status FROM public.chain_tokens WHERE chain_id = 31337 AND address = $1",
                )
                .bind(format!("{token2:#x}"))
                .fetch_optional(&pool)
                .await?;
                if status.as_deref() == Some("live") {
                    break t_add.elapsed();
                }
                if t_add.elapsed() > Duration::from_secs(600) {
                    return Err("the second token did not go live within 600 s".into());
                }
                tick.tick().await;
                let lag = prober.lag().await?;
                during.record(lag.as_micros() as u64)?;
            };
            let (d, total) = requests_between(&before_add, &rpc_requests(&http, &metrics_url).await?);
            let tokens2 = vec![tokenwarden::config::TokenConfig {
                chain_id: 31337,
                address: format!("{token2:#x}"),
                standard: tokenwarden::config::TokenStandard::Erc20,
                start_block: block2,
            }];
            let report2 = tokenwarden::chain::cli::reconcile(&pool, &chain, &tokens2).await?;
            println!(
                "second token added at run time: {} logs backfilled and live {:.2}s after `index token add` ({:.0} logs/s), reconciled {} holders: {} mismatches; RPC meanwhile (head probes included): {}",
                a.second_logs,
                live.as_secs_f64(),
                a.second_logs as f64 / live.as_secs_f64(),
                report2.checked,
                report2.mismatches.len(),
                per_10k(&d, total, a.second_logs)
            );
            println!(
                "head lag of the first token, a probe every {} ms: before the add ({} probes) p50 {:.1} ms, p99 {:.1} ms; during the second token's backfill ({} probes) p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                a.probe_ms,
                before.len(),
                ms(&before, 0.5),
                ms(&before, 0.99),
                during.len(),
                ms(&during, 0.5),
                ms(&during, 0.99),
                during.max() as f64 / 1000.0
            );
            if !report2.mismatches.is_empty() || report2.checked as u64 != a.holders.min(a.second_logs)
            {
                return Err("the second token's balances are not exact".into());
            }
        }
        let hwm_end = vm_hwm_kb(pid).unwrap_or(0);

        // 6. Balance at any block (access checks): random holders at random blocks of the history.
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let head_now = index.checkpoint(&pool).await?.map_or(head, |c| c.number);
        let holder_of = |k: u64| Address::from(U160::from(HOLDER_BASE + k));
        let mut at = hdrhistogram::Histogram::<u64>::new(3)?;
        let mut since = hdrhistogram::Histogram::<u64>::new(3)?;
        for _ in 0..a.history_queries {
            let h = holder_of(rng.random_range(0..a.holders));
            let b = rng.random_range(deploy_block..=head_now);
            let t = Instant::now();
            index.balance_at(&pool, token, h, b).await?;
            at.record(t.elapsed().as_micros() as u64)?;
            let from = rng.random_range(deploy_block..=b);
            let t = Instant::now();
            index.min_balance_between(&pool, token, h, from, b).await?;
            since.record(t.elapsed().as_micros() as u64)?;
        }
        println!(
            "balance at a block, {} random (holder, block): balance_at p50 {:.2} ms, p99 {:.2} ms; min_balance_between p50 {:.2} ms, p99 {:.2} ms",
            at.len(),
            ms(&at, 0.5),
            ms(&at, 0.99),
            ms(&since, 0.5),
            ms(&since, 0.99)
        );
        println!(
            "peak RSS (VmHWM) of the worker: {:.1} MB after backfill, {:.1} MB at the end",
            hwm_backfill as f64 / 1024.0,
            hwm_end as f64 / 1024.0
        );
        drop(worker);
        Ok::<(), Box<dyn Error + Send + Sync>>(())
    }
    .await;
    if let Err(e) = &outcome {
        println!(
            "bench failed: {e}; see {}",
            dir.join("worker.log").display()
        );
    }
    pool.close().await;
    admin.close().await;
    // The worker's streams and keys under the prefix go with the database.
    support::drop_bench_state(
        support::redis_conn(&a.redis).await.ok(),
        &prefix,
        &a.db_admin,
        &db_name,
        false,
    )
    .await;
    if outcome.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    outcome
}
