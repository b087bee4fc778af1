//! Access-check benchmark (`make bench-access`), in one run on a fresh database and a fresh
//! anvil: an index of `--holders` ERC-20 holders (1,000,000 with `--full`) and `--rules`
//! creators' rules (10,000), `--users` users with proven wallets; then
//!
//! - the seed's design as the baseline: one `balanceOf` `eth_call` to the chain (anvil) per
//!   check, from the same number of connections as the SQL door;
//! - the SQL door `verify_access_for` over 32 connections (and, in the same run, the bare
//!   evaluation and the door with a durable record, to show what recording costs);
//! - the queue door, caller → Redis → `tokenwarden run` → reply, cold (every pair asked once)
//!   and warm (a set of pairs asked again, answered from the cache);
//! - the queue door's latency at 1,000 checks/s, open loop, warm and cold;
//! - the revocation lag: a member sells below the rule's threshold on anvil, timed from the
//!   mined block to the `revoked` entry on `{prefix}:access_changes` (and back for `granted`);
//! - the worker's peak RSS and the machine's load.
//!
//! `--runs N` repeats the measured phases and prints min / median / max. Every phase is bounded.
//!
//! anyhow is used here because this file is a binary's entry point, like `src/main.rs`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use alloy::network::TransactionBuilder;
use alloy::primitives::{Address, Bytes, U160, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::TransactionRequest;
use alloy::sol;
use alloy::sol_types::SolCall;
use anyhow::{Context, Result, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use sqlx::PgPool;
use tokio::sync::{Mutex, Semaphore};
use uuid::Uuid;

use support::{load_average, peak_rss_kib, redis_conn};

mod support;

sol! {
    interface TestToken20 {
        function batch(address[] from, address[] to, uint256[] value) external;
    }
}

#[derive(Parser, Debug, Clone)]
#[command(
    about = "Access-check benchmark: SQL door, queue door, revocation lag, balanceOf baseline"
)]
struct Args {
    /// Admin Postgres URL; a fresh database `tw_bench_*` is created next to it and dropped after.
    #[arg(
        long,
        env = "TOKENWARDEN_BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    admin_url: String,
    #[arg(
        long,
        env = "TOKENWARDEN_BENCH_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    redis_url: String,
    /// The `tokenwarden` binary to run as the worker (default: next to this binary).
    #[arg(long)]
    worker_bin: Option<PathBuf>,
    /// Repository root (anvil in node_modules, contracts/).
    #[arg(long, default_value = ".")]
    root: PathBuf,
    /// The full scale of issue 10: 1,000,000 holders, 10,000 rules, longer phases.
    #[arg(long)]
    full: bool,
    /// Holders in the index (ERC-20 balances of one token); default 200,000, 1,000,000 with --full.
    #[arg(long)]
    holders: Option<u64>,
    /// Creators' rules (one erc20 leaf each, thresholds 1..100 whole tokens).
    #[arg(long, default_value_t = 10_000)]
    rules: u64,
    /// Users with a proven wallet (each one holder of the index).
    #[arg(long, default_value_t = 100_000)]
    users: u64,
    /// Connections of the SQL phases and of the balanceOf baseline.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Seconds per SQL / baseline phase (default 6, 15 with --full).
    #[arg(long)]
    sql_secs: Option<u64>,
    /// Checks per cold queue phase, each a distinct (user, rule) pair (default 50,000; 100,000 with --full).
    #[arg(long)]
    cold_jobs: Option<u64>,
    /// Checks per warm queue phase (default 100,000; 300,000 with --full).
    #[arg(long)]
    warm_jobs: Option<u64>,
    /// Distinct (user, rule) pairs the warm phases cycle over (asked once before the clock starts).
    #[arg(long, default_value_t = 10_000)]
    warm_pairs: u64,
    /// Checks per second of the latency phases (open loop).
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Seconds of each latency phase (default 10, 30 with --full).
    #[arg(long)]
    latency_secs: Option<u64>,
    /// Sales (and buy-backs) of the revocation phase (default 30, 100 with --full).
    #[arg(long)]
    sales: Option<u64>,
    /// Repetitions of the measured phases (figures as min / median / max).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// The hosted provider the seed's design would call, modelled as a throughput limit in
    /// compute units per second. Default 500: Alchemy's Free tier ("a Free tier customer with a
    /// 500 CU/s limit", https://www.alchemy.com/docs/reference/throughput). 0: no model row.
    #[arg(long, default_value_t = 500)]
    provider_cups: u64,
    /// Compute units one `eth_call` costs at that provider. Default 26: Alchemy's `eth_call`
    /// (https://www.alchemy.com/docs/reference/compute-unit-costs).
    #[arg(long, default_value_t = 26)]
    provider_call_cu: u64,
    /// Longest a queue phase may take before it is reported as incomplete.
    #[arg(long, default_value_t = 300)]
    phase_timeout_secs: u64,
    /// Keep the benchmark database instead of dropping it.
    #[arg(long)]
    keep_db: bool,
    /// Write each answered check of the latency phases to `DIR/latency-<phase>-<start>.csv`:
    /// its scheduled send time (Unix seconds) and its latency (µs), to line the slow ones up
    /// with a scheduler recording (docs/benchmarks.md shows how).
    #[arg(long, value_name = "DIR")]
    latency_log: Option<PathBuf>,
}

impl Args {
    fn holders(&self) -> u64 {
        self.holders
            .unwrap_or(if self.full { 1_000_000 } else { 200_000 })
    }
    fn sql_secs(&self) -> u64 {
        self.sql_secs.unwrap_or(if self.full { 15 } else { 6 })
    }
    fn cold_jobs(&self) -> u64 {
        self.cold_jobs
            .unwrap_or(if self.full { 100_000 } else { 50_000 })
    }
    fn warm_jobs(&self) -> u64 {
        self.warm_jobs
            .unwrap_or(if self.full { 300_000 } else { 100_000 })
    }
    fn latency_secs(&self) -> u64 {
        self.latency_secs.unwrap_or(if self.full { 30 } else { 10 })
    }
    fn sales(&self) -> u64 {
        self.sales.unwrap_or(if self.full { 100 } else { 30 })
    }
}

/// The chain id of the synthetic index (not a chain the worker follows: its rows are loaded
/// directly, its checkpoint is written once, so it is never stale).
const INDEX_CHAIN: i64 = 990_001;
/// The synthetic index's token.
const INDEX_TOKEN: &str = "0x00000000000000000000000000000000000b1600";
/// anvil's chain id.
const ANVIL_CHAIN: i64 = 31_337;
/// Members of the revocation phase; the rule asks 100 whole tokens, members hold 200 and sell 150.
const MEMBERS: u64 = 5;
const WHOLE: u128 = 1_000_000_000_000_000_000;

/// A child process killed when dropped.
struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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

struct Bench {
    db_name: String,
    db_url: String,
    pool: PgPool,
    redis_url: String,
    prefix: String,
    users: Vec<Uuid>,
    creators: Vec<String>,
    rpc_url: String,
    ws_url: String,
    provider: DynProvider,
    deployer: Address,
    token: Address,
    deploy_block: u64,
    worker_bin: Option<PathBuf>,
    /// An HTTP verifier that accepts connections and never answers (issue 11's outage).
    verifier_url: String,
    _anvil: Killed,
}

/// Figures of one run, by name (a name's values over the runs give min / median / max).
#[derive(Default)]
struct Figures(BTreeMap<String, Vec<f64>>);

impl Figures {
    fn add(&mut self, name: &str, v: f64) {
        self.0.entry(name.to_string()).or_default().push(v);
    }
    fn get(&self, name: &str) -> Vec<f64> {
        self.0.get(name).cloned().unwrap_or_default()
    }
}

/// Writes one latency phase's log (`--latency-log`): a row per answered check, its scheduled
/// send time in Unix seconds and its latency in µs, in send order. The file is named for the
/// phase and its start, so repeated runs (`--runs`) do not overwrite each other.
fn write_latency_log(
    dir: &std::path::Path,
    label: &str,
    start: std::time::SystemTime,
    interval: Duration,
    answered: &[(u64, u64)],
) -> Result<()> {
    use std::fmt::Write as _;
    let start = start
        .duration_since(std::time::UNIX_EPOCH)
        .context("the clock is before 1970")?;
    let mut rows = answered.to_vec();
    rows.sort_unstable();
    let mut text = String::from("sent_unix_s,latency_us\n");
    for (i, us) in rows {
        let sent = start + interval * u32::try_from(i).context("too many checks to log")?;
        let _ = writeln!(text, "{:.6},{us}", sent.as_secs_f64());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join(format!("latency-{label}-{}.csv", start.as_secs()));
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    println!("latency log: {}", path.display());
    Ok(())
}

fn min_med_max(v: &[f64]) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    Some((s[0], s[s.len() / 2], s[s.len() - 1]))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    println!(
        "load average at start: {} ({} cores)",
        load_average(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    let bench = Bench::setup(&args).await?;
    let mut figures = Figures::default();
    let result = bench.run(&args, &mut figures).await;
    bench.teardown(&args).await;
    result?;
    print_summary(&args, &figures);
    println!(
        "\ntotal bench time: {:.1} s, load average at end: {}",
        started.elapsed().as_secs_f64(),
        load_average()
    );
    Ok(())
}

impl Bench {
    async fn setup(args: &Args) -> Result<Bench> {
        // anvil, and the token of the revocation phase and of the baseline.
        let port = support::free_port()?;
        let anvil = Killed(
            Command::new(anvil_bin(&args.root))
                .args([
                    "--port",
                    &port.to_string(),
                    "--host",
                    "127.0.0.1",
                    "--silent",
                ])
                .stdout(Stdio::null())
                .spawn()
                .context("start anvil (make tools)")?,
        );
        let rpc_url = format!("http://127.0.0.1:{port}");
        let provider = ProviderBuilder::new()
            .connect_http(rpc_url.parse()?)
            .erased();
        let t = Instant::now();
        while provider.get_block_number().await.is_err() {
            if t.elapsed() > Duration::from_secs(30) {
                bail!("anvil did not start within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let deployer = provider.get_accounts().await?[0];
        let code = std::fs::read_to_string(args.root.join("contracts/TestToken20.bin"))?;
        let deploy = TransactionRequest::default()
            .from(deployer)
            .with_deploy_code(Bytes::from(hex::decode(code.trim())?));
        let receipt = provider
            .send_transaction(deploy)
            .await?
            .get_receipt()
            .await?;
        let token = receipt.contract_address.context("no contract address")?;
        let deploy_block = receipt.block_number.context("no block number")?;

        // The verifier of the "verifier down" phase: it accepts connections and never answers,
        // so every call ends in its timeout until the breaker opens.
        let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let verifier_url = format!("http://{}/verify", hang.local_addr()?);
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = hang.accept().await {
                held.push(sock);
            }
        });

        // A fresh database.
        let db = support::BenchDb::create(&args.admin_url, args.connections as u32 + 4).await?;
        let mut bench = Bench {
            db_name: db.name,
            db_url: db.url,
            pool: db.pool,
            redis_url: args.redis_url.clone(),
            prefix: format!("twbench:{}", db.id),
            users: Vec::new(),
            creators: Vec::new(),
            rpc_url,
            ws_url: format!("ws://127.0.0.1:{port}"),
            provider,
            deployer,
            token,
            deploy_block,
            worker_bin: args.worker_bin.clone(),
            verifier_url,
            _anvil: anvil,
        };
        bench.load_index(args).await?;
        Ok(bench)
    }

    /// The synthetic index, loaded set-wise in the database (the indexer's own tables, rows the
    /// indexer would write): holders with 1..200 whole tokens, proven wallets, rules through
    /// the rule door (validated like any rule).
    async fn load_index(&mut self, args: &Args) -> Result<()> {
        let holders = args.holders();
        let users = args.users.min(holders);
        let t = Instant::now();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO public.chain_tokens (chain_id, address, standard, decimals, symbol, origin)
             VALUES ($1, $2, 'erc20', 18, 'BIDX', 'request')",
        )
        .bind(INDEX_CHAIN)
        .bind(INDEX_TOKEN)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO public.chain_checkpoints (chain_id, block_number, block_hash, finalized_block)
             VALUES ($1, 1000, '0x' || repeat('ab', 32), 936)",
        )
        .bind(INDEX_CHAIN)
        .execute(&mut *tx)
        .await?;
        // Holder i: address 0x…(0x100000 + i), balance 1..200 whole tokens.
        sqlx::query(
            "INSERT INTO public.token_balances (chain_id, token, holder, balance, updated_block)
             SELECT $1, $2, '0x' || lpad(to_hex(1048576 + i), 40, '0'),
                    ((i * 7919) % 200 + 1)::numeric * 1000000000000000000, 1000
             FROM generate_series(0, $3 - 1) AS i",
        )
        .bind(INDEX_CHAIN)
        .bind(INDEX_TOKEN)
        .bind(holders as i64)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO public.user_wallets (user_id, address, chains, method)
             SELECT md5('bench-user-' || i)::uuid, '0x' || lpad(to_hex(1048576 + i), 40, '0'),
                    ARRAY[$1::bigint], 'eoa'
             FROM generate_series(0, $2 - 1) AS i",
        )
        .bind(INDEX_CHAIN)
        .bind(users as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let loaded = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let set: i64 = sqlx::query_scalar(
            "SELECT count(public.access_set_rule('creator-' || i, 'CHAT',
                 jsonb_build_object('condition', jsonb_build_object('erc20', jsonb_build_object(
                     'chain_id', $1::bigint, 'token', $2::text, 'min', ((i % 100) + 1)::text))),
                 'bench'))
             FROM generate_series(0, $3 - 1) AS i",
        )
        .bind(INDEX_CHAIN)
        .bind(INDEX_TOKEN)
        .bind(args.rules as i64)
        .fetch_one(&self.pool)
        .await?;
        let rules_secs = t.elapsed().as_secs_f64();
        // What autovacuum does to a freshly loaded index in a running database (visibility map,
        // hint bits, statistics); this machine's Postgres runs with autovacuum off.
        sqlx::query("VACUUM (ANALYZE)").execute(&self.pool).await?;
        // The load leaves ~130 MB of dirty page cache, which the kernel writes back 30 s later
        // (vm.dirty_expire_centisecs) in one burst that stalls the WAL's fdatasync ~60 ms, in
        // the middle of whichever phase runs then. A checkpoint writes it now, before any
        // phase is timed. It needs superuser or pg_checkpoint: without, the run goes on, warned.
        if let Err(e) = sqlx::query("CHECKPOINT").execute(&self.pool).await {
            println!(
                "warning: CHECKPOINT after the load failed ({e}); a writeback burst may land in a timed phase"
            );
        }
        self.users = sqlx::query_scalar(
            "SELECT md5('bench-user-' || i)::uuid FROM generate_series(0, $1 - 1) AS i ORDER BY i",
        )
        .bind(users as i64)
        .fetch_all(&self.pool)
        .await?;
        self.creators = (0..args.rules).map(|i| format!("creator-{i}")).collect();
        println!(
            "index: {holders} holders and {users} proven wallets loaded in {loaded:.1} s; {set} rules set through access_set_rule in {rules_secs:.1} s; load average {}",
            load_average()
        );
        Ok(())
    }

    async fn teardown(&self, args: &Args) {
        let redis = self.redis().await.ok();
        self.pool.close().await;
        support::drop_bench_state(
            redis,
            &self.prefix,
            &args.admin_url,
            &self.db_name,
            args.keep_db,
        )
        .await;
        // The worker's config and log; kept with the database.
        if !args.keep_db {
            let _ = std::fs::remove_dir_all(self.worker_dir());
        }
    }

    async fn redis(&self) -> redis::RedisResult<MultiplexedConnection> {
        redis_conn(&self.redis_url).await
    }

    /// Where the worker's config and log go (one per bench database).
    fn worker_dir(&self) -> std::path::PathBuf {
        std::env::temp_dir().join(&self.db_name)
    }

    async fn run(&self, args: &Args, figures: &mut Figures) -> Result<()> {
        for setting in ["synchronous_commit", "fsync", "server_version"] {
            let v: String = sqlx::query_scalar("SELECT current_setting($1)")
                .bind(setting)
                .fetch_one(&self.pool)
                .await?;
            println!("postgres {setting} = {v}");
        }
        let worker = self.start_worker()?;
        let mut worker = Killed(worker);
        self.warm_up(&mut worker.0).await?;
        self.setup_members().await?;
        for run in 1..=args.runs {
            println!("\n=== run {run} of {} ===", args.runs);
            self.one_run(args, figures, &mut worker.0).await?;
        }
        if let Some(kib) = peak_rss_kib(worker.0.id()) {
            figures.add("worker peak RSS MiB", kib as f64 / 1024.0);
        }
        Ok(())
    }

    async fn one_run(&self, args: &Args, f: &mut Figures, worker: &mut Child) -> Result<()> {
        let secs = args.sql_secs();
        let c = args.connections;
        let anvil = self.baseline(c, secs, None).await?;
        f.add("baseline balanceOf eth_call, raw anvil /s", anvil);
        // The baseline the ratios use: the seed's design against a hosted provider's throughput
        // limit when one is modelled, else raw anvil.
        let base = if args.provider_cups > 0 {
            let per_call =
                Duration::from_secs_f64(args.provider_call_cu as f64 / args.provider_cups as f64);
            let modelled = self.baseline(c, secs, Some(per_call)).await?;
            f.add("baseline balanceOf eth_call, provider model /s", modelled);
            modelled
        } else {
            anvil
        };
        let eval = self
            .sql_phase(
                "bare evaluation tw_access_evaluate (no record)",
                "SELECT public.tw_access_evaluate($1, $2, 'CHAT')::text",
                c,
                secs,
            )
            .await?;
        f.add("SQL evaluation only /s", eval);
        let door = self
            .sql_phase(
                "SQL door verify_access_for",
                "SELECT public.verify_access_for($1, $2, 'CHAT')::text",
                c,
                secs,
            )
            .await?;
        f.add("SQL door verify_access_for /s", door);
        // A transaction id assigned before the check: the record keeps the durable commit
        // (what every call paid before the record could skip its flush).
        let durable = self
            .sql_phase(
                "SQL door, durable record (xid assigned first)",
                "SELECT txid_current(), public.verify_access_for($1, $2, 'CHAT')::text",
                c,
                secs,
            )
            .await?;
        f.add("SQL door durable record /s", durable);
        let two = self
            .sql_phase(
                "SQL door verify_access_for, 2 connections",
                "SELECT public.verify_access_for($1, $2, 'CHAT')::text",
                2,
                secs,
            )
            .await?;
        f.add("SQL door 2 connections /s", two);
        let two_durable = self
            .sql_phase(
                "SQL door durable record, 2 connections",
                "SELECT txid_current(), public.verify_access_for($1, $2, 'CHAT')::text",
                2,
                secs,
            )
            .await?;
        f.add("SQL door durable record 2 connections /s", two_durable);

        let cold = self.queue_cold(args, worker).await?;
        f.add("queue door cold /s", cold.0);
        f.add("queue door cold cache share %", cold.1);
        let warm = self.queue_warm(args, worker).await?;
        f.add("queue door warm /s", warm.0);
        f.add("queue door warm cache share %", warm.1);
        let down = self.external_down(args, worker).await?;
        f.add("queue door external leaf, verifier down /s", down);
        f.add("ratio queue warm / baseline", warm.0 / base);
        f.add("ratio queue cold / baseline", cold.0 / base);
        f.add("ratio SQL door / baseline", door / base);
        f.add("ratio queue warm / raw anvil", warm.0 / anvil);
        f.add("ratio queue cold / raw anvil", cold.0 / anvil);

        let pairs = self.warm_set(args);
        let lat = self
            .latency("warm", args, |i| pairs[i as usize % pairs.len()].clone())
            .await?;
        f.add("latency warm p50 ms", lat.0);
        f.add("latency warm p99 ms", lat.1);
        let offset = 7_000_000u64;
        let lat = self
            .latency("cold", args, |i| self.cold_pair(offset + i))
            .await?;
        f.add("latency cold p50 ms", lat.0);
        f.add("latency cold p99 ms", lat.1);

        let (revoke, grant) = self.revocations(args).await?;
        f.add("revocation lag p50 ms", revoke.0);
        f.add("revocation lag p99 ms", revoke.1);
        f.add("revocation lag max ms", revoke.2);
        f.add("grant lag p50 ms", grant.0);
        f.add("grant lag p99 ms", grant.1);
        if let Some(kib) = support::rss_kib(worker.id()) {
            f.add("worker RSS after the run MiB", kib as f64 / 1024.0);
        }
        f.add(
            "load average (1 min) at the end of the run",
            load_average()
                .split_whitespace()
                .next()
                .and_then(|l| l.parse().ok())
                .unwrap_or(0.0),
        );
        Ok(())
    }

    /// The seed's design: every check is one `balanceOf` `eth_call` to the chain (its
    /// TokenVerificationService asks the RPC node, no index), from `connections` callers.
    ///
    /// With `spacing`, the calls pass a hosted provider's throughput limit first, modelled as
    /// strict refill: call k may start no earlier than k × `spacing` after the phase starts
    /// (`spacing` = compute units per call ÷ compute units per second), shared by all callers.
    /// The provider's burst allowance (Alchemy: 10 s of throughput) is taken as spent, i.e. the
    /// steady state of a service that checks all day; its network round trip is not added
    /// (no published figure to model it from), so the model errs in the seed's favour.
    async fn baseline(
        &self,
        connections: usize,
        secs: u64,
        spacing: Option<Duration>,
    ) -> Result<f64> {
        let limiter = Arc::new(Mutex::new(None::<tokio::time::Instant>));
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(connections)
            .build()?;
        let done = Arc::new(AtomicU64::new(0));
        let ready = Arc::new(tokio::sync::Barrier::new(connections + 1));
        let mut tasks = Vec::new();
        for c in 0..connections {
            let (http, done, ready, limiter) =
                (http.clone(), done.clone(), ready.clone(), limiter.clone());
            let url = self.rpc_url.clone();
            let token = format!("{:#x}", self.token);
            tasks.push(tokio::spawn(async move {
                let call = |i: u64| {
                    let holder = format!("{:064x}", 0x10_0000u64 + i);
                    serde_json::json!({"jsonrpc": "2.0", "id": i, "method": "eth_call",
                        "params": [{"to": token, "data": format!("0x70a08231{holder}")}, "latest"]})
                };
                let mut i = c as u64;
                for _ in 0..3 {
                    http.post(&url).json(&call(i)).send().await?.bytes().await?;
                }
                ready.wait().await;
                let deadline = Instant::now() + Duration::from_secs(secs);
                while Instant::now() < deadline {
                    if let Some(spacing) = spacing {
                        let slot = {
                            let mut next = limiter.lock().await;
                            let now = tokio::time::Instant::now();
                            let slot = next.map_or(now, |n| n.max(now));
                            *next = Some(slot + spacing);
                            slot
                        };
                        if slot.into_std() >= deadline {
                            break;
                        }
                        tokio::time::sleep_until(slot).await;
                    }
                    let body: serde_json::Value =
                        http.post(&url).json(&call(i)).send().await?.json().await?;
                    if body.get("result").is_none() {
                        anyhow::bail!("eth_call failed: {body}");
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    i += connections as u64;
                }
                Ok(())
            }));
        }
        ready.wait().await;
        let start = Instant::now();
        for t in tasks {
            t.await??;
        }
        let rate = done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
        let label = match spacing {
            None => "baseline: balanceOf eth_call per check (raw anvil)".to_string(),
            Some(s) => format!(
                "baseline: same, provider limit ({:.1} calls/s)",
                1.0 / s.as_secs_f64()
            ),
        };
        println!(
            "{label:<52} {rate:>9.1} checks/s ({connections} connections, {secs} s; load {})",
            load_average()
        );
        Ok(rate)
    }

    /// `query` ($1 user, $2 creator) in its own transaction per call from `connections`
    /// connections for `secs`, over random (user, rule) pairs.
    async fn sql_phase(
        &self,
        label: &str,
        query: &'static str,
        connections: usize,
        secs: u64,
    ) -> Result<f64> {
        let done = Arc::new(AtomicU64::new(0));
        let ready = Arc::new(tokio::sync::Barrier::new(connections + 1));
        let users = Arc::new(self.users.clone());
        let creators = Arc::new(self.creators.clone());
        let mut tasks: Vec<tokio::task::JoinHandle<Result<()>>> = Vec::new();
        for c in 0..connections {
            let (pool, done, ready, users, creators) = (
                self.pool.clone(),
                done.clone(),
                ready.clone(),
                users.clone(),
                creators.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut conn = pool.acquire().await?;
                let mut i = c as u64 * 1_000_003;
                let next = |i: &mut u64| {
                    *i = i
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let u = users[(*i >> 33) as usize % users.len()];
                    let r = creators[(*i >> 17) as usize % creators.len()].clone();
                    (u, r)
                };
                for _ in 0..5 {
                    let (u, r) = next(&mut i);
                    sqlx::query(query)
                        .bind(u)
                        .bind(r)
                        .execute(&mut *conn)
                        .await?;
                }
                ready.wait().await;
                let deadline = Instant::now() + Duration::from_secs(secs);
                while Instant::now() < deadline {
                    let (u, r) = next(&mut i);
                    sqlx::query(query)
                        .bind(u)
                        .bind(r)
                        .execute(&mut *conn)
                        .await?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }));
        }
        ready.wait().await;
        let start = Instant::now();
        for t in tasks {
            t.await??;
        }
        let rate = done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
        println!(
            "{label:<52} {rate:>9.0} checks/s ({connections} connections, {secs} s; load {})",
            load_average()
        );
        Ok(rate)
    }

    fn start_worker(&self) -> Result<Child> {
        let bin = match &self.worker_bin {
            Some(b) => b.clone(),
            None => std::env::current_exe()?
                .parent()
                .context("bench binary has a directory")?
                .join("tokenwarden"),
        };
        let dir = self.worker_dir();
        std::fs::create_dir_all(&dir)?;
        let cfg = dir.join("bench.toml");
        std::fs::write(
            &cfg,
            format!(
                r#"[chain]
enabled = true
[[chain.chains]]
chain_id = {ANVIL_CHAIN}
name = "anvil"
rpc_urls = ["{}"]
ws_url = "{}"
[[chain.tokens]]
chain_id = {ANVIL_CHAIN}
address = "{:#x}"
standard = "erc20"
start_block = {}
[access.verifiers.down]
profile = "tomo"
url = "{}"
timeout_ms = 1000
max_retries = 0
"#,
                self.rpc_url, self.ws_url, self.token, self.deploy_block, self.verifier_url
            ),
        )?;
        let log = dir.join("worker.log");
        println!("starting {} run (log {})", bin.display(), log.display());
        let out = std::fs::File::create(&log)?;
        Command::new(&bin)
            .arg("--config")
            .arg(&cfg)
            .arg("run")
            .env("TOKENWARDEN__DATABASE__URL", &self.db_url)
            .env("TOKENWARDEN__REDIS__URL", &self.redis_url)
            .env("TOKENWARDEN__REDIS__PREFIX", &self.prefix)
            .env("TOKENWARDEN__HTTP__ENABLED", "false")
            .env("TOKENWARDEN__MAINTENANCE__ENABLED", "false")
            .env("TOKENWARDEN__TELEMETRY__LEVEL", "warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start worker {}", bin.display()))
    }

    fn stream(&self) -> String {
        format!("{}:jobs:verify_access", self.prefix)
    }

    fn payload(request_id: Uuid, user: Uuid, creator: &str) -> String {
        format!(
            r#"{{"request_id":"{request_id}","user_id":"{user}","creator_id":"{creator}","feature":"CHAT"}}"#
        )
    }

    /// Pair i of the cold sequence: distinct for i < lcm(users, rules).
    fn cold_pair(&self, i: u64) -> (Uuid, String) {
        (
            self.users[i as usize % self.users.len()],
            self.creators[(i as usize / 3 + i as usize) % self.creators.len()].clone(),
        )
    }

    fn warm_set(&self, args: &Args) -> Vec<(Uuid, String)> {
        (0..args.warm_pairs)
            .map(|j| {
                (
                    self.users[(j as usize * 7 + 1) % self.users.len()],
                    self.creators[j as usize % self.creators.len()].clone(),
                )
            })
            .collect()
    }

    /// One check answered: the worker has started, migrated and reads its streams.
    async fn warm_up(&self, worker: &mut Child) -> Result<()> {
        let mut conn = self.redis().await?;
        let deadline = Instant::now() + Duration::from_secs(90);
        let (u, c) = self.cold_pair(999_999_999);
        loop {
            let rid = Uuid::new_v4();
            let _: String = conn
                .xadd(
                    self.stream(),
                    "*",
                    &[("payload", Self::payload(rid, u, &c))],
                )
                .await?;
            let reply: Option<(String, String)> = conn
                .blpop(format!("{}:reply:{rid}", self.prefix), 2.0)
                .await?;
            if let Some((_, body)) = reply {
                println!(
                    "worker ready: {}",
                    body.chars().take(200).collect::<String>()
                );
                return Ok(());
            }
            if let Some(status) = worker.try_wait()? {
                bail!("the worker exited during start-up: {status}");
            }
            if Instant::now() > deadline {
                bail!("the worker did not answer a check within 90 s");
            }
        }
    }

    /// Enqueues the checks as fast as pipelined XADDs go, then waits until the consumer group
    /// has acknowledged every one (the ack follows the audit commit and the reply). Returns
    /// checks/s and the share answered from the cache (from access_checks).
    async fn queue_phase(
        &self,
        label: &str,
        pairs: &[(Uuid, String)],
        timeout: Duration,
        worker: &mut Child,
        quiet: bool,
    ) -> Result<(f64, f64)> {
        let payloads: Vec<(Uuid, String)> = pairs
            .iter()
            .map(|(u, c)| {
                let rid = Uuid::new_v4();
                (rid, Self::payload(rid, *u, c))
            })
            .collect();
        let last_rid = payloads.last().map(|p| p.0).context("at least one check")?;
        let first_id: i64 =
            sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM public.access_checks")
                .fetch_one(&self.pool)
                .await?;
        let before = self.group_acked().await?;
        let start = Instant::now();
        let producers = 2;
        let chunk = payloads.len().div_ceil(producers);
        let payloads = Arc::new(payloads);
        let mut tasks = Vec::new();
        for p in 0..producers {
            let mut conn = self.redis().await?;
            let (payloads, stream) = (payloads.clone(), self.stream());
            tasks.push(tokio::spawn(async move {
                let hi = ((p + 1) * chunk).min(payloads.len());
                for part in payloads[(p * chunk).min(hi)..hi].chunks(500) {
                    let mut pipe = redis::pipe();
                    for (_, body) in part {
                        pipe.xadd(&stream, "*", &[("payload", body.as_str())])
                            .ignore();
                    }
                    let () = pipe.query_async(&mut conn).await?;
                }
                redis::RedisResult::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        let target = before + pairs.len() as u64;
        let deadline = start + timeout;
        let mut acked;
        loop {
            acked = self.group_acked().await?;
            if acked >= target || Instant::now() > deadline {
                break;
            }
            if let Some(status) = worker.try_wait()? {
                bail!("{label}: the worker exited: {status}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let secs = start.elapsed().as_secs_f64();
        if acked < target {
            bail!(
                "{label}: only {} of {} checks acknowledged after {} s",
                acked - before,
                pairs.len(),
                timeout.as_secs()
            );
        }
        let mut conn = self.redis().await?;
        let reply: Option<(String, String)> = conn
            .blpop(format!("{}:reply:{last_rid}", self.prefix), 10.0)
            .await?;
        let body = reply
            .with_context(|| format!("{label}: all acknowledged but no reply for the last check"))?
            .1;
        let decision: serde_json::Value = serde_json::from_str(&body)?;
        if decision.get("allowed").is_none() {
            bail!("{label}: the last reply is not a decision: {body}");
        }
        let (recorded, cached): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE source = 'cache')
             FROM public.access_checks WHERE id > $1 AND door = 'queue'",
        )
        .bind(first_id)
        .fetch_one(&self.pool)
        .await?;
        if recorded < pairs.len() as i64 {
            bail!(
                "{label}: {} checks answered but {recorded} recorded",
                pairs.len()
            );
        }
        let rate = pairs.len() as f64 / secs;
        let share = 100.0 * cached as f64 / recorded.max(1) as f64;
        if !quiet {
            println!(
                "{label:<52} {rate:>9.0} checks/s ({} checks in {secs:.2} s, {share:.1} % from the cache, {recorded} recorded; load {})",
                pairs.len(),
                load_average()
            );
        }
        Ok((rate, share))
    }

    async fn queue_cold(&self, args: &Args, worker: &mut Child) -> Result<(f64, f64)> {
        // A fresh range of the cold sequence per run (the offset moves with the audit's size).
        let offset: i64 = sqlx::query_scalar("SELECT count(*) FROM public.access_checks")
            .fetch_one(&self.pool)
            .await?;
        let pairs: Vec<(Uuid, String)> = (0..args.cold_jobs())
            .map(|i| self.cold_pair(1_000_000 + offset as u64 * 3 + i))
            .collect();
        self.queue_phase(
            "queue door, cold (each pair once)",
            &pairs,
            Duration::from_secs(args.phase_timeout_secs),
            worker,
            false,
        )
        .await
    }

    async fn queue_warm(&self, args: &Args, worker: &mut Child) -> Result<(f64, f64)> {
        let set = self.warm_set(args);
        // Asked once before the clock starts: the decisions are then in the cache.
        self.queue_phase(
            "warm-up",
            &set,
            Duration::from_secs(args.phase_timeout_secs),
            worker,
            true,
        )
        .await?;
        let pairs: Vec<(Uuid, String)> = (0..args.warm_jobs() as usize)
            .map(|i| set[i % set.len()].clone())
            .collect();
        self.queue_phase(
            &format!("queue door, warm ({} pairs again)", set.len()),
            &pairs,
            Duration::from_secs(args.phase_timeout_secs),
            worker,
            false,
        )
        .await
    }

    /// Issue 11's line: checks of a rule with one `external` leaf while its verifier hangs. Once
    /// the breaker is open every check falls back at once (restrictive policy: denied), so the
    /// rate must stay near the cold rate instead of `in flight / timeout`.
    async fn external_down(&self, args: &Args, worker: &mut Child) -> Result<f64> {
        let rule = serde_json::json!({"condition": {"external": {
            "verifier": "down", "chain_id": 8453,
            "contract": "0x833589fcd6edb6e08f4c7c32d4f71b54bda02913"}}});
        sqlx::query("SELECT public.access_set_rule('creator-external', 'CHAT', $1, 'bench')")
            .bind(&rule)
            .execute(&self.pool)
            .await?;
        let pairs = |n: usize, from: usize| -> Vec<(Uuid, String)> {
            (0..n)
                .map(|i| {
                    let u = self.users[(from + i) % self.users.len()];
                    (u, "creator-external".to_string())
                })
                .collect()
        };
        // Until the breaker opens, checks wait out the 1 s timeout: not timed. Open means a
        // round of 64 checks answered in well under one timeout.
        let timeout = Duration::from_secs(args.phase_timeout_secs);
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut round = 0;
        loop {
            let t = Instant::now();
            self.queue_phase(
                "breaker opening",
                &pairs(64, round * 64),
                timeout,
                worker,
                true,
            )
            .await?;
            if t.elapsed() < Duration::from_millis(500) {
                break;
            }
            if Instant::now() > deadline {
                bail!("the verifier's breaker did not open within 120 s");
            }
            round += 1;
        }
        let n = (args.cold_jobs() as usize).min(20_000);
        let (rate, _) = self
            .queue_phase(
                "queue door, external leaf, verifier down (breaker open)",
                &pairs(n, 100_000),
                timeout,
                worker,
                false,
            )
            .await?;
        Ok(rate)
    }

    /// Entries the consumer group has read and acknowledged: `entries-read - pending`.
    async fn group_acked(&self) -> Result<u64> {
        let mut conn = self.redis().await?;
        let groups: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(self.stream())
            .query_async(&mut conn)
            .await?;
        let group = groups
            .into_iter()
            .next()
            .context("the worker created no consumer group")?;
        let get = |k: &str| match group.get(k) {
            Some(redis::Value::Int(n)) => (*n).max(0) as u64,
            _ => 0,
        };
        Ok(get("entries-read").saturating_sub(get("pending")))
    }

    /// Open loop at `args.rate` checks/s: check i is sent at start + i/rate whatever happened
    /// before; its latency runs from that scheduled time to the popped reply. Returns p50, p99 (ms).
    async fn latency(
        &self,
        label: &str,
        args: &Args,
        pair: impl Fn(u64) -> (Uuid, String),
    ) -> Result<(f64, f64)> {
        let total = args.rate * args.latency_secs();
        let waiters = 256;
        let mut conns = Vec::with_capacity(waiters);
        for _ in 0..waiters {
            conns.push(self.redis().await?);
        }
        let pool = Arc::new(Mutex::new(conns));
        let permits = Arc::new(Semaphore::new(waiters));
        let sender = self.redis().await?;
        let hist = Arc::new(std::sync::Mutex::new(Histogram::<u64>::new_with_bounds(
            1, 60_000_000, 3,
        )?));
        let timeouts = Arc::new(AtomicU64::new(0));
        // (check index, latency µs) of each answered check, when asked for.
        let log = args
            .latency_log
            .as_ref()
            .map(|_| Arc::new(std::sync::Mutex::new(Vec::with_capacity(total as usize))));
        let start = tokio::time::Instant::now() + Duration::from_millis(50);
        let start_unix = std::time::SystemTime::now() + Duration::from_millis(50);
        let interval = Duration::from_nanos(1_000_000_000 / args.rate);
        let mut tasks = Vec::with_capacity(total as usize);
        let mut schedule = support::open_loop_schedule(start, interval, total);
        while let Some((i, at)) = schedule.recv().await {
            let rid = Uuid::new_v4();
            let (u, c) = pair(i);
            let body = Self::payload(rid, u, &c);
            let mut sender = sender.clone();
            let (pool, permits, hist, timeouts, log) = (
                pool.clone(),
                permits.clone(),
                hist.clone(),
                timeouts.clone(),
                log.clone(),
            );
            let stream = self.stream();
            let reply_key = format!("{}:reply:{rid}", self.prefix);
            tasks.push(tokio::spawn(async move {
                let _: String = sender
                    .xadd(&stream, "*", &[("payload", body.as_str())])
                    .await?;
                let _permit = permits.acquire().await.map_err(|_| {
                    redis::RedisError::from((redis::ErrorKind::Client, "waiter pool closed"))
                })?;
                let mut conn = pool.lock().await.pop().ok_or_else(|| {
                    redis::RedisError::from((redis::ErrorKind::Client, "no free waiter connection"))
                })?;
                let reply: redis::RedisResult<Option<(String, String)>> =
                    conn.blpop(&reply_key, 10.0).await;
                pool.lock().await.push(conn);
                match reply? {
                    Some(_) => {
                        let us = at.elapsed().as_micros() as u64;
                        if let Ok(mut h) = hist.lock() {
                            let _ = h.record(us.max(1));
                        }
                        if let Some(Ok(mut log)) = log.as_ref().map(|l| l.lock()) {
                            log.push((i, us));
                        }
                    }
                    None => {
                        timeouts.fetch_add(1, Ordering::Relaxed);
                    }
                }
                redis::RedisResult::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        let hist = hist
            .lock()
            .map_err(|_| anyhow::anyhow!("histogram lock poisoned"))?
            .clone();
        if let (Some(dir), Some(log)) = (&args.latency_log, log) {
            let log = log
                .lock()
                .map_err(|_| anyhow::anyhow!("latency log lock poisoned"))?;
            write_latency_log(dir, label, start_unix, interval, &log)?;
        }
        let q = |p: f64| hist.value_at_quantile(p) as f64 / 1000.0;
        println!(
            "latency {label} at {} checks/s open loop: {} sent, {} answered, {} timeouts; p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms (load {})",
            args.rate,
            total,
            hist.len(),
            timeouts.load(Ordering::Relaxed),
            q(0.5),
            q(0.9),
            q(0.99),
            hist.max() as f64 / 1000.0,
            load_average()
        );
        Ok((q(0.5), q(0.99)))
    }

    fn member(k: u64) -> Address {
        Address::from(U160::from(0xbe_ef00_0000u64 + k))
    }

    fn member_user(k: u64) -> Uuid {
        Uuid::from_u128(0xbe_ef00_0000_u128 + k as u128)
    }

    fn sink() -> Address {
        Address::from(U160::from(0x51_4b00_0000u64))
    }

    fn batch_tx(
        &self,
        from: Vec<Address>,
        to: Vec<Address>,
        value: Vec<U256>,
    ) -> TransactionRequest {
        let data = TestToken20::batchCall { from, to, value }.abi_encode();
        TransactionRequest::default()
            .from(self.deployer)
            .to(self.token)
            .input(Bytes::from(data).into())
    }

    async fn send_batch(
        &self,
        from: Vec<Address>,
        to: Vec<Address>,
        value: Vec<U256>,
    ) -> Result<()> {
        let tx = self.batch_tx(from, to, value);
        let receipt = self
            .provider
            .send_transaction(tx)
            .await?
            .get_receipt()
            .await?;
        if !receipt.status() {
            bail!("token batch reverted");
        }
        Ok(())
    }

    /// Sends the batch while automine is off, mines its block with `evm_mine` and returns when
    /// that block exists (the lag's clock starts there), with the transaction's hash.
    async fn mine_batch(
        &self,
        from: Vec<Address>,
        to: Vec<Address>,
        value: Vec<U256>,
    ) -> Result<(Instant, alloy::primitives::TxHash)> {
        let tx = self.batch_tx(from, to, value);
        let hash = *self.provider.send_transaction(tx).await?.tx_hash();
        let _: serde_json::Value = self
            .provider
            .raw_request("evm_mine".into(), serde_json::json!([]))
            .await?;
        Ok((Instant::now(), hash))
    }

    async fn check_receipt(&self, hash: alloy::primitives::TxHash) -> Result<()> {
        let receipt = self
            .provider
            .get_transaction_receipt(hash)
            .await?
            .context("a mined batch has a receipt")?;
        if !receipt.status() {
            bail!("token batch reverted");
        }
        Ok(())
    }

    /// The revocation phase's members: proven wallets on anvil, a rule asking 100 tokens of the
    /// anvil token, 200 tokens each; waits until every member is granted.
    async fn setup_members(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let known: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT FROM public.chain_tokens WHERE chain_id = $1 AND address = $2)
                    AND EXISTS (SELECT FROM public.chain_checkpoints WHERE chain_id = $1)",
            )
            .bind(ANVIL_CHAIN)
            .bind(format!("{:#x}", self.token))
            .fetch_one(&self.pool)
            .await?;
            if known {
                break;
            }
            if Instant::now() > deadline {
                bail!("the worker did not index the anvil token within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for k in 0..MEMBERS {
            sqlx::query(
                "INSERT INTO public.user_wallets (user_id, address, chains, method) VALUES ($1, $2, ARRAY[$3::bigint], 'eoa')",
            )
            .bind(Self::member_user(k))
            .bind(format!("{:#x}", Self::member(k)))
            .bind(ANVIL_CHAIN)
            .execute(&self.pool)
            .await?;
        }
        sqlx::query("SELECT public.access_set_rule('rev-creator', 'CHAT', $1, 'bench')")
            .bind(serde_json::json!({"condition": {"erc20": {
                "chain_id": ANVIL_CHAIN, "token": format!("{:#x}", self.token), "min": "100"}}}))
            .execute(&self.pool)
            .await?;
        let members: Vec<Address> = (0..MEMBERS).map(Self::member).collect();
        self.send_batch(
            vec![Address::ZERO; members.len()],
            members.clone(),
            vec![U256::from(200 * WHOLE); members.len()],
        )
        .await?;
        // The sink starts with nothing; members sell to it and buy back from it.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let granted: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM public.access_grants
                 WHERE creator_id = 'rev-creator' AND revoked_at IS NULL",
            )
            .fetch_one(&self.pool)
            .await?;
            if granted == MEMBERS as i64 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{granted} of {MEMBERS} members granted within 30 s of their mint");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the access change `kind` of `user` on `{prefix}:access_changes` after `from`.
    async fn wait_change(
        &self,
        conn: &mut MultiplexedConnection,
        from: &mut String,
        user: Uuid,
        kind: &str,
    ) -> Result<()> {
        let key = format!("{}:access_changes", self.prefix);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREAD")
                .arg("BLOCK")
                .arg(500)
                .arg("STREAMS")
                .arg(&key)
                .arg(from.as_str())
                .query_async(conn)
                .await?;
            for k in reply.map(|r| r.keys).unwrap_or_default() {
                for entry in k.ids {
                    *from = entry.id.clone();
                    let event: Option<String> = entry.get("event");
                    let event: serde_json::Value =
                        serde_json::from_str(event.as_deref().unwrap_or("null"))?;
                    if event["user_id"] == serde_json::json!(user.to_string())
                        && event["kind"] == serde_json::json!(kind)
                    {
                        return Ok(());
                    }
                }
            }
        }
        bail!("no {kind} event for {user} within 15 s")
    }

    /// `sales` times: a member sells 150 of 200 tokens (below the rule's 100), timed from the
    /// mined block to the `revoked` entry; then buys them back, timed to `granted`.
    /// Returns (p50, p99, max) of the revocation lag and (p50, p99, max) of the grant lag, in ms.
    async fn revocations(&self, args: &Args) -> Result<((f64, f64, f64), (f64, f64, f64))> {
        let mut conn = self.redis().await?;
        let mut revoke = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let mut grant = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let amount = U256::from(150 * WHOLE);
        // Blocks are mined on demand in this phase, so the clock starts at the block itself.
        let _: serde_json::Value = self
            .provider
            .raw_request("evm_setAutomine".into(), serde_json::json!([false]))
            .await?;
        for s in 0..args.sales() {
            let k = s % MEMBERS;
            let (member, user) = (Self::member(k), Self::member_user(k));
            let mut from = "$".to_string();
            let last: Vec<(String, Vec<(String, String)>)> = conn
                .xrevrange_count(format!("{}:access_changes", self.prefix), "+", "-", 1)
                .await?;
            if let Some((id, _)) = last.first() {
                from = id.clone();
            }
            let (mined, hash) = self
                .mine_batch(vec![member], vec![Self::sink()], vec![amount])
                .await?;
            self.wait_change(&mut conn, &mut from, user, "revoked")
                .await?;
            revoke.record(mined.elapsed().as_micros() as u64)?;
            self.check_receipt(hash).await?;
            let (mined, hash) = self
                .mine_batch(vec![Self::sink()], vec![member], vec![amount])
                .await?;
            self.wait_change(&mut conn, &mut from, user, "granted")
                .await?;
            grant.record(mined.elapsed().as_micros() as u64)?;
            self.check_receipt(hash).await?;
        }
        let _: serde_json::Value = self
            .provider
            .raw_request("evm_setAutomine".into(), serde_json::json!([true]))
            .await?;
        let q = |h: &Histogram<u64>| {
            (
                h.value_at_quantile(0.5) as f64 / 1000.0,
                h.value_at_quantile(0.99) as f64 / 1000.0,
                h.max() as f64 / 1000.0,
            )
        };
        let (r, g) = (q(&revoke), q(&grant));
        println!(
            "revocation lag (block mined → revoked on access_changes), {} sales: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; buy-back → granted: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (load {})",
            args.sales(),
            r.0,
            r.1,
            r.2,
            g.0,
            g.1,
            g.2,
            load_average()
        );
        Ok((r, g))
    }
}

fn print_summary(args: &Args, f: &Figures) {
    println!(
        "\n=== tokenwarden access benchmark: {} holders, {} rules, {} users with a wallet, {} run(s), min / median / max ===",
        args.holders(),
        args.rules,
        args.users.min(args.holders()),
        args.runs
    );
    for (name, values) in &f.0 {
        if let Some((lo, med, hi)) = min_med_max(values) {
            println!("{name:<48} {lo:>10.1} / {med:>10.1} / {hi:>10.1}");
        }
    }
    let med = |name: &str| min_med_max(&f.get(name)).map(|m| m.1);
    let verdict = |name: &str, ok: bool, what: String| {
        println!(
            "target {name:<40} {what:<28} {}",
            if ok { "met" } else { "NOT MET" }
        );
    };
    println!("\n-- targets of issue 10 (medians) --");
    if let Some(v) = med("queue door warm /s") {
        verdict(
            "queue door warm ≥ 20,000/s",
            v >= 20_000.0,
            format!("{v:.0}/s"),
        );
    }
    if let Some(v) = med("queue door cold /s") {
        verdict(
            "queue door cold ≥ 5,000/s",
            v >= 5_000.0,
            format!("{v:.0}/s"),
        );
    }
    if let (Some(w), Some(c)) = (med("latency warm p99 ms"), med("latency cold p99 ms")) {
        verdict(
            "p99 ≤ 5 ms at 1,000 checks/s",
            w <= 5.0 && c <= 5.0,
            format!("warm {w:.2} ms, cold {c:.2} ms"),
        );
    }
    if let Some(v) = med("revocation lag p99 ms") {
        verdict("revocation p99 ≤ 1 s", v <= 1000.0, format!("{v:.0} ms"));
    }
    if let (Some(w), Some(c)) = (
        med("ratio queue warm / baseline"),
        med("ratio queue cold / baseline"),
    ) {
        verdict(
            if args.provider_cups > 0 {
                "≥ 20× the balanceOf baseline (provider)"
            } else {
                "≥ 20× the balanceOf baseline (anvil)"
            },
            w >= 20.0 && c >= 20.0,
            format!("warm {w:.1}×, cold {c:.1}×"),
        );
    }
    if let (Some(w), Some(c)) = (
        med("ratio queue warm / raw anvil"),
        med("ratio queue cold / raw anvil"),
    ) {
        println!("(against raw anvil on localhost, no provider: warm {w:.2}×, cold {c:.2}×)");
    }
}
