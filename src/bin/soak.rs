//! Soak run (`make soak`): a steady open-loop load of `consume_tokens` requests through the
//! queue door (1,000 requests/s over 10,000 users by default) against one `tokenwarden run`
//! with its scheduler and its chain indexer live, for `--duration` (10 minutes by default;
//! `--duration 24h`). The indexer follows an ERC-20 on its own anvil while a transaction of 20
//! transfers is mined every second; each window records the indexer's lag behind the head, and
//! at the end every holder's indexed balance must equal `balanceOf` (`--no-chain` leaves it out).
//! Every 10 s it records p50/p99/max of the enqueue→reply latency of the requests scheduled in
//! that window, replies and timeouts, the worker's RSS, Postgres connections, Redis memory,
//! stream lengths, dead letters, and the checkpoints and autovacuum runs Postgres logged; it
//! writes them as CSV and draws a PNG chart, then checks the targets: p99 ≤ 20 ms in every
//! window, worker RSS growth ≤ 10 % after the first minute, no timeout.
//!
//! Like `make chaos` it starts its OWN Postgres (with `log_checkpoints` and
//! `log_autovacuum_min_duration = 0`) and its OWN redis-server, so the figures are not mixed
//! with other work on the machine's servers (the machine's load is printed with them).
//!
//! anyhow is used here because this file is a binary's entry point, like `src/main.rs`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use redis::aio::MultiplexedConnection;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::{Mutex, Semaphore};
use uuid::Uuid;

use alloy::primitives::{Address, U256};
use alloy::providers::Provider;
use support::anvil::{AnvilProc, erc20_batch};
use support::chart::{self, Panel, Series};
use support::{Postgres, RedisServer, load_average, redis_conn, rss_kib, scan_keys};

mod support;

#[derive(Parser, Debug, Clone)]
#[command(about = "Soak run: steady load through the queue door, sampled every 10 s")]
struct Args {
    /// How long the load runs: seconds, or with a unit (`90s`, `10m`, `24h`).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    duration: Duration,
    /// Requests per second (open loop: each is sent at its scheduled time).
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Users the requests are spread over.
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    /// Seconds per sample window.
    #[arg(long, default_value_t = 10)]
    window_secs: u64,
    /// Where the CSV and the PNG chart are written (`soak.csv`, `soak.png`).
    #[arg(long, default_value = "docs")]
    out_dir: PathBuf,
    /// Leave the chain indexer out (no anvil, no transfers).
    #[arg(long)]
    no_chain: bool,
    #[command(flatten)]
    run: support::RunArgs,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.trim().split_at(
        s.trim()
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(s.trim().len()),
    );
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 600, 90s, 10m or 24h"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("`{s}`: unit must be s, m or h")),
    };
    if secs == 0 {
        return Err("the duration must be positive".into());
    }
    Ok(Duration::from_secs(secs))
}

const PREFIX: &str = "soak";
const STREAM: &str = "soak:jobs:consume_tokens";
/// Far more credits per user than any run can spend.
const START_BALANCE: i64 = 1_000_000_000_000;
const P99_TARGET_MS: f64 = 20.0;
const RSS_GROWTH_TARGET: f64 = 0.10;

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = std::env::temp_dir().join(format!(
        "tw-soak-{}",
        &Uuid::new_v4().simple().to_string()[..8]
    ));
    std::fs::create_dir_all(&dir)?;
    println!(
        "soak run: {} req/s for {} s over {} users; temp dir {}",
        args.rate,
        args.duration.as_secs(),
        args.users,
        dir.display()
    );
    let mut pg = Postgres::init(
        &args.run.pg_bin_dir,
        &dir,
        "log_checkpoints = on\nlog_autovacuum_min_duration = 0\nlog_min_messages = log\nlog_line_prefix = '%m '\nlog_timezone = 'UTC'",
    )?;
    pg.start()?;
    let mut redis_srv = RedisServer::new(&dir)?;
    redis_srv.start()?;
    let result = soak(&args, &dir, &pg, &redis_srv).await;
    redis_srv.stop();
    pg.stop();
    let report =
        result.with_context(|| format!("soak run failed; logs kept in {}", dir.display()))?;
    let passed = report.print(&args);
    if args.run.keep {
        println!("kept {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if !passed {
        std::process::exit(1);
    }
    Ok(())
}

/// One sample window.
#[derive(Default, Clone)]
struct Window {
    t_secs: u64,
    sent: u64,
    replied: u64,
    timeouts: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    rss_mib: f64,
    pg_connections: i64,
    redis_mib: f64,
    stream_len: u64,
    pending: u64,
    dead_letters: i64,
    checkpoints: u64,
    autovacuums: u64,
    /// Blocks the indexer's checkpoint is behind anvil's head at the window's end (-1: no chain).
    chain_lag_blocks: i64,
}

struct Report {
    windows: Vec<Window>,
    csv: PathBuf,
    png: PathBuf,
    started_utc: chrono::DateTime<chrono::Utc>,
    load_start: String,
    chain: Option<ChainResult>,
}

async fn soak(args: &Args, dir: &Path, pg: &Postgres, redis_srv: &RedisServer) -> Result<Report> {
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(30))
        .connect(&pg.url())
        .await
        .context("connect to the soak Postgres")?;
    tokenwarden::infra::migrate(&pool).await?;
    let users: Vec<Uuid> = (0..args.users).map(|_| Uuid::new_v4()).collect();
    fund(&pool, &users).await?;
    let chain = if args.no_chain {
        None
    } else {
        Some(Arc::new(SoakChain::start(dir).await?))
    };
    let mut worker = start_worker(args, dir, pg, redis_srv, chain.as_deref())?;
    let traffic = chain.clone().map(SoakChain::spawn_traffic);
    let outcome = load(
        args,
        &pool,
        redis_srv,
        &users,
        &mut worker,
        pg.log_path(),
        chain.clone(),
    )
    .await;
    let chain_result = match (chain, traffic) {
        (Some(chain), Some((stop, task))) => {
            stop.cancel();
            let transfers = task.await.context("transfer task")?;
            Some(chain.check(&pool, transfers).await)
        }
        _ => None,
    };
    tokio::task::block_in_place(|| support::terminate(&mut [&mut worker], Duration::from_secs(30)));
    pool.close().await;
    let mut report = outcome?;
    report.chain = chain_result.transpose()?;
    Ok(report)
}

/// anvil's chain id.
const CHAIN_ID: u64 = 31337;
/// Holders the soak's transfers go to; the transfers of one transaction: 20 per second.
const HOLDERS: u8 = 50;
const TRANSFERS_PER_TX: u8 = 20;
/// Most blocks the indexer may be behind the head at a window's end.
const CHAIN_LAG_TARGET: i64 = 5;

/// The soak's chain: its own anvil with an ERC-20 the worker indexes.
struct SoakChain {
    anvil: AnvilProc,
    token: Address,
    config: PathBuf,
}

/// What the chain part found at the end.
struct ChainResult {
    transfers: u64,
    head: u64,
    caught_up_secs: f64,
    holders_checked: usize,
    mismatches: Vec<String>,
}

impl SoakChain {
    async fn start(dir: &Path) -> Result<SoakChain> {
        // The soak binary runs from a checkout (like `make chaos`): contracts/ and anvil
        // (node_modules, `make tools`) are found from the source tree.
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let anvil = AnvilProc::spawn(root).await?;
        let token = anvil.deploy("TestToken20").await?;
        let config = dir.join("chain.toml");
        std::fs::write(
            &config,
            format!(
                r#"[chain]
enabled = true

[[chain.chains]]
chain_id = {CHAIN_ID}
name = "anvil"
rpc_urls = ["{}"]
ws_url = "{}"

[[chain.tokens]]
chain_id = {CHAIN_ID}
address = "{token:#x}"
standard = "erc20"
"#,
                anvil.url, anvil.ws_url
            ),
        )?;
        Ok(SoakChain {
            anvil,
            token,
            config,
        })
    }

    fn holder(i: u8) -> Address {
        Address::repeat_byte(i + 1)
    }

    /// Mines one transaction of 20 transfers (mints and moves among the holders) per second
    /// until cancelled; returns the transfers sent.
    fn spawn_traffic(
        self: Arc<Self>,
    ) -> (
        tokio_util::sync::CancellationToken,
        tokio::task::JoinHandle<u64>,
    ) {
        let stop = tokio_util::sync::CancellationToken::new();
        let cancelled = stop.clone();
        let task = tokio::spawn(async move {
            let mut sent = 0u64;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            for k in 0u64.. {
                tokio::select! {
                    _ = cancelled.cancelled() => break,
                    _ = tick.tick() => {}
                }
                // The first transactions mint to every holder (so no later move lacks funds),
                // then each moves a few units between holders.
                let mints = u64::from(HOLDERS).div_ceil(u64::from(TRANSFERS_PER_TX));
                let ops: Vec<(Address, Address, U256)> = (0..TRANSFERS_PER_TX)
                    .map(|j| {
                        if k < mints {
                            let to = (k * u64::from(TRANSFERS_PER_TX) + u64::from(j))
                                % u64::from(HOLDERS);
                            (
                                Address::ZERO,
                                Self::holder(to as u8),
                                U256::from(1_000_000u64),
                            )
                        } else {
                            let to =
                                Self::holder(((k * 7 + u64::from(j)) % u64::from(HOLDERS)) as u8);
                            let from =
                                Self::holder(((k + u64::from(j)) % u64::from(HOLDERS)) as u8);
                            (from, to, U256::from(1 + (k % 7)))
                        }
                    })
                    .collect();
                match self.anvil.send(self.token, erc20_batch(&ops)).await {
                    Ok((_, true)) => sent += u64::from(TRANSFERS_PER_TX),
                    Ok((hash, false)) => eprintln!("soak transfer {hash} reverted"),
                    Err(e) => eprintln!("soak transfer not sent: {e:#}"),
                }
            }
            sent
        });
        (stop, task)
    }

    /// Blocks the indexer's checkpoint is behind the head.
    async fn lag(&self, pool: &sqlx::PgPool) -> Result<(i64, u64)> {
        let head = self.anvil.provider.get_block_number().await?;
        let cp: Option<i64> = sqlx::query_scalar(
            "SELECT block_number FROM public.chain_checkpoints WHERE chain_id = $1",
        )
        .bind(CHAIN_ID as i64)
        .fetch_optional(pool)
        .await?;
        Ok((head as i64 - cp.unwrap_or(-1), head))
    }

    /// Waits for the indexer to reach the quiet head, then compares every holder's indexed
    /// balance with `balanceOf` at that block.
    async fn check(&self, pool: &sqlx::PgPool, transfers: u64) -> Result<ChainResult> {
        let t0 = Instant::now();
        let head = loop {
            let (lag, head) = self.lag(pool).await?;
            if lag == 0 {
                break head;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!(
                    "the indexer did not reach the head {head} within 60 s after the load ({lag} blocks behind)"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let caught_up_secs = t0.elapsed().as_secs_f64();
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT holder, balance::text FROM public.token_balances WHERE chain_id = $1 AND token = $2",
        )
        .bind(CHAIN_ID as i64)
        .bind(format!("{:#x}", self.token))
        .fetch_all(pool)
        .await?;
        let mut stored = std::collections::HashMap::new();
        for (h, b) in rows {
            stored.insert(h.parse::<Address>()?, b.parse::<U256>()?);
        }
        let mut mismatches = Vec::new();
        for i in 0..HOLDERS {
            let h = Self::holder(i);
            let chain = self.anvil.balance_of(self.token, h, head).await?;
            let s = stored.get(&h).copied().unwrap_or_default();
            if s != chain {
                mismatches.push(format!("balance of {h:#x}: indexed {s}, balanceOf {chain}"));
            }
        }
        Ok(ChainResult {
            transfers,
            head,
            caught_up_secs,
            holders_checked: usize::from(HOLDERS),
            mismatches,
        })
    }
}

/// Grants every user START_BALANCE through the ledger's batch path.
async fn fund(pool: &sqlx::PgPool, users: &[Uuid]) -> Result<()> {
    use tokenwarden::ledger::{Credits, Ledger, LedgerOp, OutcomeStatus, RequestId, UserId};
    let cfg = tokenwarden::config::Config::load_with_env(None, Vec::<(String, String)>::new())?;
    let amount = Credits::new(START_BALANCE).context("the start balance is positive")?;
    let ops: Vec<LedgerOp> = users
        .iter()
        .map(|u| LedgerOp::Grant {
            request_id: RequestId(Uuid::new_v4()),
            user_id: UserId(*u),
            amount,
            reason: "soak funding".into(),
            metadata: serde_json::json!({}),
        })
        .collect();
    let outcomes = Ledger::new(pool.clone(), cfg.ledger).apply(&ops).await?;
    if let Some(bad) = outcomes.iter().find(|o| o.status != OutcomeStatus::Granted) {
        bail!("funding failed: {bad:?}");
    }
    Ok(())
}

fn start_worker(
    args: &Args,
    dir: &Path,
    pg: &Postgres,
    redis_srv: &RedisServer,
    chain: Option<&SoakChain>,
) -> Result<Child> {
    let bin = args.run.worker_bin()?;
    let log = std::fs::File::create(dir.join("worker.log"))?;
    let port = support::free_port()?;
    let mut cmd = Command::new(&bin);
    if let Some(chain) = chain {
        cmd.arg("--config").arg(&chain.config);
    }
    cmd.arg("run")
        .env("TOKENWARDEN__DATABASE__URL", pg.url())
        .env("TOKENWARDEN__REDIS__URL", redis_srv.url())
        .env("TOKENWARDEN__REDIS__PREFIX", PREFIX)
        .env("TOKENWARDEN__HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .env("TOKENWARDEN__TELEMETRY__LEVEL", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))
}

fn payload(rid: Uuid, user: Uuid) -> String {
    format!(r#"{{"request_id":"{rid}","user_id":"{user}","amount":1,"operation_type":"soak"}}"#)
}

async fn warm_up(conn: &mut MultiplexedConnection, user: Uuid, worker: &mut Child) -> Result<()> {
    let rid = Uuid::new_v4();
    let _: String = redis::cmd("XADD")
        .arg(STREAM)
        .arg("*")
        .arg("payload")
        .arg(payload(rid, user))
        .query_async(conn)
        .await?;
    let until = Instant::now() + Duration::from_secs(120);
    while Instant::now() < until {
        if let Some(status) = worker.try_wait()? {
            bail!("the worker exited at start: {status} (see worker.log in the temp dir)");
        }
        let reply: Option<(String, String)> = redis::cmd("BLPOP")
            .arg(format!("{PREFIX}:reply:{rid}"))
            .arg(1.0)
            .query_async(conn)
            .await?;
        if reply.is_some() {
            return Ok(());
        }
    }
    bail!("the worker did not answer within 120 s")
}

struct WindowStats {
    hist: Histogram<u64>,
    sent: u64,
    replied: u64,
    timeouts: u64,
}

async fn load(
    args: &Args,
    pool: &sqlx::PgPool,
    redis_srv: &RedisServer,
    users: &[Uuid],
    worker: &mut Child,
    pg_log: &Path,
    chain: Option<Arc<SoakChain>>,
) -> Result<Report> {
    let mut conn = redis_conn(&redis_srv.url()).await?;
    warm_up(&mut conn, users[0], worker).await?;
    let load_start = load_average();
    let n_windows = args.duration.as_secs().div_ceil(args.window_secs) as usize;
    let stats: Arc<Vec<std::sync::Mutex<WindowStats>>> = Arc::new(
        (0..n_windows)
            .map(|_| {
                Histogram::new_with_bounds(1, 60_000_000, 3).map(|hist| {
                    std::sync::Mutex::new(WindowStats {
                        hist,
                        sent: 0,
                        replied: 0,
                        timeouts: 0,
                    })
                })
            })
            .collect::<Result<_, _>>()?,
    );
    let waiters = 256;
    let mut conns = Vec::with_capacity(waiters);
    for _ in 0..waiters {
        conns.push(redis_conn(&redis_srv.url()).await?);
    }
    let pool_conns = Arc::new(Mutex::new(conns));
    let permits = Arc::new(Semaphore::new(waiters));
    let errors = Arc::new(AtomicU64::new(0));
    let started_utc = chrono::Utc::now();
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let window = Duration::from_secs(args.window_secs);

    // Resource samples at the end of every window, taken by their own task.
    let sampler = {
        let (pool, url, pid) = (pool.clone(), redis_srv.url(), worker.id());
        let n = n_windows;
        tokio::spawn(async move {
            let mut samples = Vec::with_capacity(n);
            for k in 1..=n {
                tokio::time::sleep_until(start + window * k as u32).await;
                let mut w = sample(&pool, &url, pid).await;
                w.chain_lag_blocks = match &chain {
                    Some(c) => c.lag(&pool).await.map(|l| l.0).unwrap_or(-1),
                    None => -1,
                };
                samples.push(w);
            }
            samples
        })
    };

    let total = args.rate * args.duration.as_secs();
    let interval = Duration::from_nanos(1_000_000_000 / args.rate);
    let mut tasks = Vec::new();
    let mut schedule = support::open_loop_schedule(start, interval, total);
    while let Some((i, at)) = schedule.recv().await {
        let w = ((at - start).as_secs() / args.window_secs) as usize;
        let w = w.min(n_windows - 1);
        let rid = Uuid::new_v4();
        let body = payload(rid, users[(i as usize * 7919) % users.len()]);
        let mut sender = conn.clone();
        let (pool_conns, permits, stats, errors) = (
            pool_conns.clone(),
            permits.clone(),
            stats.clone(),
            errors.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let now_ms = chrono::Utc::now().timestamp_millis().to_string();
            if let Ok(mut s) = stats[w].lock() {
                s.sent += 1;
            }
            let sent: redis::RedisResult<String> = redis::cmd("XADD")
                .arg(STREAM)
                .arg("*")
                .arg("payload")
                .arg(&body)
                .arg("enqueued_at")
                .arg(&now_ms)
                .query_async(&mut sender)
                .await;
            if sent.is_err() {
                errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let Ok(_permit) = permits.acquire().await else {
                return;
            };
            let Some(mut c) = pool_conns.lock().await.pop() else {
                return;
            };
            let reply: redis::RedisResult<Option<(String, String)>> = redis::cmd("BLPOP")
                .arg(format!("{PREFIX}:reply:{rid}"))
                .arg(10.0)
                .query_async(&mut c)
                .await;
            pool_conns.lock().await.push(c);
            if let Ok(mut s) = stats[w].lock() {
                match reply {
                    Ok(Some(_)) => {
                        let _ = s.hist.record((at.elapsed().as_micros() as u64).max(1));
                        s.replied += 1;
                    }
                    Ok(None) => s.timeouts += 1,
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
        // Keep the task list short: drop finished ones now and then.
        if tasks.len() > 20_000 {
            tasks.retain(|t| !t.is_finished());
        }
        if i % 1000 == 0 && worker.try_wait()?.is_some() {
            bail!("the worker exited during the soak run (see worker.log in the temp dir)");
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let samples = sampler.await.context("sampler task")?;
    let events = pg_log_events(pg_log, started_utc, args.window_secs);
    let mut windows = Vec::with_capacity(n_windows);
    for (k, s) in stats.iter().enumerate() {
        let s = s
            .lock()
            .map_err(|_| anyhow::anyhow!("window stats poisoned"))?;
        let q = |p: f64| s.hist.value_at_quantile(p) as f64 / 1000.0;
        let mut w = samples.get(k).cloned().unwrap_or_default();
        w.t_secs = (k as u64 + 1) * args.window_secs;
        w.sent = s.sent;
        w.replied = s.replied;
        w.timeouts = s.timeouts;
        w.p50_ms = q(0.5);
        w.p99_ms = q(0.99);
        w.max_ms = s.hist.max() as f64 / 1000.0;
        w.checkpoints = events.get(k).map(|e| e.0).unwrap_or(0);
        w.autovacuums = events.get(k).map(|e| e.1).unwrap_or(0);
        windows.push(w);
    }
    let errors = errors.load(Ordering::Relaxed);
    if errors > 0 {
        println!("Redis errors while sending or waiting: {errors}");
    }
    std::fs::create_dir_all(&args.out_dir)?;
    let csv = args.out_dir.join("soak.csv");
    let png = args.out_dir.join("soak.png");
    write_csv(&csv, &windows)?;
    draw(&png, &windows, args)?;
    Ok(Report {
        windows,
        csv,
        png,
        started_utc,
        load_start,
        chain: None,
    })
}

async fn sample(pool: &sqlx::PgPool, redis_url: &str, worker_pid: u32) -> Window {
    let mut w = Window {
        rss_mib: rss_kib(worker_pid).unwrap_or(0) as f64 / 1024.0,
        ..Window::default()
    };
    w.pg_connections = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'",
    )
    .fetch_one(pool)
    .await
    .unwrap_or(-1);
    w.dead_letters = sqlx::query_scalar("SELECT count(*) FROM public.dead_letters")
        .fetch_one(pool)
        .await
        .unwrap_or(-1);
    if let Ok(mut c) = redis_conn(redis_url).await {
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut c)
            .await
            .unwrap_or_default();
        w.redis_mib = info
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1048576.0;
        let keys = scan_keys(&mut c, &format!("{PREFIX}:jobs:*")).await;
        for k in keys {
            let len: u64 = redis::cmd("XLEN")
                .arg(&k)
                .query_async(&mut c)
                .await
                .unwrap_or(0);
            w.stream_len += len;
            let p: redis::RedisResult<redis::Value> = redis::cmd("XPENDING")
                .arg(&k)
                .arg("tokenwarden")
                .query_async(&mut c)
                .await;
            if let Ok(redis::Value::Array(v)) = p
                && let Some(redis::Value::Int(n)) = v.first()
            {
                w.pending += *n as u64;
            }
        }
    }
    w
}

/// (checkpoints, autovacuum runs) Postgres logged in each window since `start`.
fn pg_log_events(
    log: &Path,
    start: chrono::DateTime<chrono::Utc>,
    window_secs: u64,
) -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for line in text.lines() {
        let checkpoint = line.contains("checkpoint complete");
        let vacuum = line.contains("automatic vacuum") || line.contains("automatic analyze");
        if !checkpoint && !vacuum {
            continue;
        }
        let Some(ts) = line.get(..23) else { continue };
        let Ok(t) = chrono::NaiveDateTime::parse_from_str(ts, "%Y-%m-%d %H:%M:%S%.3f") else {
            continue;
        };
        let secs = (t.and_utc() - start).num_milliseconds();
        if secs < 0 {
            continue;
        }
        let k = (secs as u64 / 1000 / window_secs) as usize;
        if out.len() <= k {
            out.resize(k + 1, (0, 0));
        }
        if checkpoint {
            out[k].0 += 1;
        } else {
            out[k].1 += 1;
        }
    }
    out
}

/// The columns of a window: (CSV name, short name for the printed table, value as text).
const COLUMNS: [(&str, &str); 16] = [
    ("t_secs", "t s"),
    ("sent", "sent"),
    ("replied", "replied"),
    ("timeouts", "tmo"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("max_ms", "max ms"),
    ("worker_rss_mib", "rss MiB"),
    ("pg_connections", "pgc"),
    ("redis_used_mib", "redisMiB"),
    ("stream_entries", "entries"),
    ("pending", "pending"),
    ("dead_letters", "dlq"),
    ("checkpoints", "ckpt"),
    ("autovacuums", "vac"),
    ("chain_lag_blocks", "lag"),
];

impl Window {
    /// The values in COLUMNS order.
    fn cells(&self) -> [String; 16] {
        [
            self.t_secs.to_string(),
            self.sent.to_string(),
            self.replied.to_string(),
            self.timeouts.to_string(),
            format!("{:.2}", self.p50_ms),
            format!("{:.2}", self.p99_ms),
            format!("{:.2}", self.max_ms),
            format!("{:.1}", self.rss_mib),
            self.pg_connections.to_string(),
            format!("{:.1}", self.redis_mib),
            self.stream_len.to_string(),
            self.pending.to_string(),
            self.dead_letters.to_string(),
            self.checkpoints.to_string(),
            self.autovacuums.to_string(),
            self.chain_lag_blocks.to_string(),
        ]
    }
}

fn write_csv(path: &Path, windows: &[Window]) -> Result<()> {
    let mut s = COLUMNS.map(|c| c.0).join(",") + "\n";
    for w in windows {
        s.push_str(&w.cells().join(","));
        s.push('\n');
    }
    std::fs::write(path, s).with_context(|| format!("write {}", path.display()))
}

fn draw(path: &Path, windows: &[Window], args: &Args) -> Result<()> {
    let pts = |f: &dyn Fn(&Window) -> f64| {
        windows
            .iter()
            .map(|w| (w.t_secs as f64 / 60.0, f(w)))
            .collect::<Vec<_>>()
    };
    let panels = vec![
        Panel {
            title: "LATENCY MS".into(),
            series: vec![
                Series {
                    label: "P50".into(),
                    color: chart::BLUE,
                    points: pts(&|w| w.p50_ms),
                },
                Series {
                    label: "P99".into(),
                    color: chart::ORANGE,
                    points: pts(&|w| w.p99_ms),
                },
            ],
            target: Some((P99_TARGET_MS, "TARGET P99 20 MS".into())),
        },
        Panel {
            title: "WORKER RSS MIB".into(),
            series: vec![Series {
                label: "RSS".into(),
                color: chart::GREEN,
                points: pts(&|w| w.rss_mib),
            }],
            target: None,
        },
        Panel {
            title: "REDIS MIB".into(),
            series: vec![Series {
                label: "USED MEMORY".into(),
                color: chart::PURPLE,
                points: pts(&|w| w.redis_mib),
            }],
            target: None,
        },
        Panel {
            title: "STREAM ENTRIES".into(),
            series: vec![Series {
                label: "XLEN (ACKED KEPT UNTIL PRUNE)".into(),
                color: chart::BLUE,
                points: pts(&|w| w.stream_len as f64),
            }],
            target: None,
        },
        Panel {
            title: "PG CONNECTIONS, DEAD LETTERS, PENDING".into(),
            series: vec![
                Series {
                    label: "PG CONN".into(),
                    color: chart::GREEN,
                    points: pts(&|w| w.pg_connections as f64),
                },
                Series {
                    label: "DEAD LETTERS".into(),
                    color: chart::RED,
                    points: pts(&|w| w.dead_letters as f64),
                },
                Series {
                    label: "PENDING".into(),
                    color: chart::ORANGE,
                    points: pts(&|w| w.pending as f64),
                },
            ],
            target: None,
        },
    ];
    let title = format!(
        "TOKENWARDEN SOAK: {} REQ/S, {} USERS, {} S WINDOWS",
        args.rate, args.users, args.window_secs
    );
    chart::render(path, &title, &panels)
}

impl Report {
    /// Prints the figures and the targets; true when every target is met.
    fn print(&self, args: &Args) -> bool {
        println!("\n=== tokenwarden soak run ===");
        println!(
            "started {} UTC; load average at start {}, at end {}",
            self.started_utc.format("%Y-%m-%d %H:%M"),
            self.load_start,
            load_average()
        );
        let row = |cells: &[String]| {
            let widths = [6, 6, 7, 5, 8, 8, 8, 8, 5, 8, 9, 7, 5, 4, 4, 4];
            let line: Vec<String> = cells
                .iter()
                .zip(widths)
                .map(|(c, w)| format!("{c:>w$}"))
                .collect();
            println!("{}", line.join(" "));
        };
        row(&COLUMNS.map(|c| c.1.to_string()));
        for w in &self.windows {
            row(&w.cells());
        }
        let over: Vec<u64> = self
            .windows
            .iter()
            .filter(|w| w.p99_ms > P99_TARGET_MS)
            .map(|w| w.t_secs)
            .collect();
        let timeouts: u64 = self.windows.iter().map(|w| w.timeouts).sum();
        let lost: u64 = self
            .windows
            .iter()
            .map(|w| w.sent.saturating_sub(w.replied + w.timeouts))
            .sum();
        let after_minute = self
            .windows
            .iter()
            .find(|w| w.t_secs >= 60)
            .map(|w| w.rss_mib);
        let end = self.windows.last().map(|w| w.rss_mib);
        let growth = match (after_minute, end) {
            (Some(a), Some(e)) if a > 0.0 => Some(e / a - 1.0),
            _ => None,
        };
        let worst = self.windows.iter().map(|w| w.p99_ms).fold(0.0, f64::max);
        println!("wrote {} and {}", self.csv.display(), self.png.display());
        println!(
            "p99 <= {P99_TARGET_MS} ms in every window: {} (worst window p99 {worst:.2} ms{})",
            if over.is_empty() { "MET" } else { "NOT MET" },
            if over.is_empty() {
                String::new()
            } else {
                format!("; over in windows ending at {over:?} s")
            }
        );
        match growth {
            Some(g) => println!(
                "worker RSS growth after the first minute <= {:.0} %: {} ({:.1} MiB at 60 s → {:.1} MiB at the end, {:+.1} %)",
                RSS_GROWTH_TARGET * 100.0,
                if g <= RSS_GROWTH_TARGET {
                    "MET"
                } else {
                    "NOT MET"
                },
                after_minute.unwrap_or(0.0),
                end.unwrap_or(0.0),
                g * 100.0
            ),
            None => println!("worker RSS growth: not measured (run shorter than a minute)"),
        }
        println!(
            "timeouts {timeouts}, unanswered {lost}; offered {} req/s for {} s",
            args.rate,
            args.duration.as_secs()
        );
        let chain_ok = match &self.chain {
            None => {
                println!("chain indexer: not part of this run (--no-chain)");
                true
            }
            Some(c) => {
                let worst_lag = self
                    .windows
                    .iter()
                    .map(|w| w.chain_lag_blocks)
                    .max()
                    .unwrap_or(-1);
                let lag_ok = (0..=CHAIN_LAG_TARGET).contains(&worst_lag);
                println!(
                    "chain indexer live: {} transfers mined (1 tx of {TRANSFERS_PER_TX}/s); lag <= {CHAIN_LAG_TARGET} blocks at every window end: {} (worst {worst_lag}); at the quiet head {} after {:.1} s: {} holders checked, {} mismatches with balanceOf",
                    c.transfers,
                    if lag_ok { "MET" } else { "NOT MET" },
                    c.head,
                    c.caught_up_secs,
                    c.holders_checked,
                    c.mismatches.len()
                );
                for m in &c.mismatches {
                    println!("  {m}");
                }
                lag_ok && c.mismatches.is_empty()
            }
        };
        chain_ok
            && over.is_empty()
            && growth.is_none_or(|g| g <= RSS_GROWTH_TARGET)
            && timeouts == 0
            && lost == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_unit() {
        assert_eq!(parse_duration("600"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("m").is_err());
    }
}
