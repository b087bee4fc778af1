//! Indexer benchmark (`make bench-index`): on a fresh anvil, generates a history of Transfer
//! logs, times one `eth_getLogs` over it (the chain's own speed), runs `tokenwarden run` until
//! its checkpoint is the head and every balance reconciles exactly, then measures head lag
//! (block mined → balances committed) at one block per second. Prints the figures.

use std::error::Error;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use alloy::network::TransactionBuilder;
use alloy::primitives::{Address, Bytes, U160, U256};
use alloy::providers::{Provider, ProviderBuilder};
use alloy::rpc::types::TransactionRequest;
use alloy::sol;
use alloy::sol_types::SolCall;
use futures::StreamExt;

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

#[tokio::main]
async fn main() -> Res<()> {
    let root = PathBuf::from(arg("root", "."));
    let a = Args {
        logs: arg("logs", "220000").parse()?,
        holders: arg("holders", "20000").parse()?,
        per_tx: arg("per-tx", "1000").parse()?,
        blocks_per_tx: arg("blocks-per-tx", "10").parse()?,
        lag_blocks: arg("lag-blocks", "60").parse()?,
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
    let code = std::fs::read_to_string(a.root.join("contracts/TestToken20.bin"))?;
    let deploy = TransactionRequest::default()
        .from(sender)
        .with_deploy_code(Bytes::from(hex::decode(code.trim())?));
    let receipt = provider
        .send_transaction(deploy)
        .await?
        .get_receipt()
        .await?;
    let token = receipt.contract_address.ok_or("no contract address")?;
    let deploy_block = receipt.block_number.ok_or("no block number")?;
    let base = U160::from(0x10_0000u64);
    let mut nonce = provider.get_transaction_count(sender).await?;
    let gen_started = Instant::now();
    let spam = |start: u64, n: u64, nonce: u64| {
        let data = TestToken20::spamCall {
            base,
            holders: U256::from(a.holders),
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
    };
    // One transaction (automined into its own block) per `per_tx` transfers, then empty
    // blocks so the history spans `blocks_per_tx` blocks per transaction. Transactions are sent
    // one at a time: a deep anvil tx pool makes anvil itself slow and memory-hungry.
    let mut start = 0;
    while start < a.logs {
        let n = a.per_tx.min(a.logs - start);
        let hash = *provider
            .send_transaction(spam(start, n, nonce))
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
        nonce += 1;
        start += n;
    }
    let head = provider.get_block_number().await?;
    println!(
        "history: {} Transfer logs, {} holders, blocks {}..={} ({} blocks), generated in {:.1}s",
        a.logs,
        a.holders,
        deploy_block,
        head,
        head - deploy_block + 1,
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
    let cfg_path = dir.join("bench.toml");
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
[[chain.tokens]]
chain_id = 31337
address = "{token:#x}"
standard = "erc20"
start_block = {deploy_block}
"#
        ),
    )?;
    let log_path = dir.join("worker.log");
    let t0 = Instant::now();
    let worker = Killed(
        std::process::Command::new(&a.tokenwarden)
            .arg("--config")
            .arg(&cfg_path)
            .arg("run")
            .env("TOKENWARDEN__DATABASE__URL", &db_url)
            .env("TOKENWARDEN__REDIS__URL", &a.redis)
            .env("TOKENWARDEN__REDIS__PREFIX", &prefix)
            .env("TOKENWARDEN__HTTP__ENABLED", "false")
            .stderr(std::fs::File::create(&log_path)?)
            .spawn()?,
    );
    let pid = worker.0.id();
    let index = tokenwarden::chain::store::ChainStore::new(31337)?;
    loop {
        // Errors (the worker has not migrated yet) count as "not there yet".
        let cp = index.checkpoint(&pool).await.ok().flatten();
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

    // 4. Head lag at one block per second.
    let client = redis::Client::open(a.redis.as_str())?;
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub
        .subscribe(format!("{prefix}:balance_changes"))
        .await?;
    let mut messages = pubsub.on_message();
    let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut start = a.logs.max(a.holders);
    for _ in 0..a.lag_blocks {
        tick.tick().await;
        let t_send = Instant::now();
        let r = provider
            .send_transaction(spam(start, 20, nonce))
            .await?
            .get_receipt()
            .await?;
        nonce += 1;
        start += 20;
        let block = r.block_number.ok_or("no block number")?;
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), messages.next())
                .await?
                .ok_or("pubsub closed")?;
            let v: serde_json::Value = serde_json::from_str(&m.get_payload::<String>()?)?;
            if v["block"].as_u64().is_some_and(|b| b >= block) {
                break;
            }
        }
        hist.record(t_send.elapsed().as_micros() as u64)?;
    }
    let hwm_end = vm_hwm_kb(pid).unwrap_or(0);
    println!(
        "head lag (tx sent → block mined → balances committed and announced), {} blocks at 1/s: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        hist.len(),
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        hist.max() as f64 / 1000.0
    );
    println!(
        "peak RSS (VmHWM) of the worker: {:.1} MB after backfill, {:.1} MB at the end",
        hwm_backfill as f64 / 1024.0,
        hwm_end as f64 / 1024.0
    );
    drop(worker);
    pool.close().await;
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"
    )))
    .execute(&admin)
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    let _: Address = Address::ZERO;
    Ok(())
}
