//! Ledger benchmark, in one run on a fresh database: the seed's design as written (its
//! `consume_tokens_atomic`, created by this bench in schema `seed`: `bench_ledger_seed.sql`), our
//! SQL door (`public.consume_tokens_atomic`), both over 32 connections, and our queue door, the
//! whole path caller → Redis stream → worker process → Postgres (durable commits) → reply list.
//!
//! Run through `make bench-ledger` (scripts/bench-ledger.sh), which builds this and the worker
//! in release mode. Every phase is bounded in time; the run stops by itself.
//!
//! anyhow is used here because this file is a binary's entry point, like `src/main.rs`.

mod support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use sqlx::PgPool;
use tokio::sync::{Mutex, Semaphore};
use uuid::Uuid;

#[derive(Parser, Debug, Clone)]
#[command(about = "Ledger benchmark: the seed's function, our SQL door and our queue door")]
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
    /// Worker processes sharing the streams.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Consume jobs enqueued per throughput phase.
    #[arg(long, default_value_t = 200_000)]
    jobs: usize,
    /// Users in the spread-out phases.
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    /// Connections of the SQL phases (the seed's function and our SQL door).
    #[arg(long, default_value_t = 32)]
    baseline_connections: usize,
    /// Seconds per SQL phase.
    #[arg(long, default_value_t = 8)]
    baseline_secs: u64,
    /// Requests per second of the latency phase (open loop).
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Seconds of the latency phase.
    #[arg(long, default_value_t = 15)]
    latency_secs: u64,
    /// Longest a throughput phase may take before it is reported as incomplete.
    #[arg(long, default_value_t = 60)]
    phase_timeout_secs: u64,
    /// Keep the benchmark database instead of dropping it.
    #[arg(long)]
    keep_db: bool,
    /// Run only the SQL phases: the seed's function and our SQL door (no worker needed).
    #[arg(long)]
    baseline_only: bool,
}

/// Each account starts with this many credits, far more than any phase can spend.
const START_BALANCE: i64 = 1_000_000_000_000;

/// The seed's design as written: schema `seed` with its tables and `consume_tokens_atomic`.
const SEED_DESIGN: &str = include_str!("bench_ledger_seed.sql");

/// Which function the SQL phases call for each debit.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SqlDoor {
    /// The seed's `consume_tokens_atomic` (schema `seed`), the baseline.
    Seed,
    /// tokenwarden's `public.consume_tokens_atomic`.
    Ours,
}

impl SqlDoor {
    fn call(self) -> &'static str {
        match self {
            SqlDoor::Seed => {
                "SELECT (seed.consume_tokens_atomic($1, $2, $3, $4, $5))::jsonb ->> 'status'"
            }
            SqlDoor::Ours => {
                "SELECT (public.consume_tokens_atomic($1, $2, $3, $4, $5))::jsonb ->> 'status'"
            }
        }
    }

    fn name(self) -> &'static str {
        match self {
            SqlDoor::Seed => "seed's consume_tokens_atomic",
            SqlDoor::Ours => "tokenwarden SQL door",
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let bench = Bench::setup(&args).await?;
    let result = bench.run(&args).await;
    bench.teardown(&args).await;
    let report = result?;
    report.print(&args);
    println!(
        "\ntotal bench time: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

struct Bench {
    db_name: String,
    db_url: String,
    pool: PgPool,
    redis_url: String,
    prefix: String,
    hot_user: Uuid,
    users: Vec<Uuid>,
    clk_tck: f64,
}

#[derive(Default)]
struct Report {
    settings: Vec<(String, String)>,
    baseline_hot: Option<Rate>,
    baseline_spread: Option<Rate>,
    sql_hot: Option<Rate>,
    sql_spread: Option<Rate>,
    ours_hot: Option<Rate>,
    ours_spread: Option<Rate>,
    latency: Option<Latency>,
    worker_peak_rss_kib: Vec<u64>,
    cpu: Vec<(String, CpuSplit)>,
}

/// Debits completed over a measured interval.
#[derive(Clone, Copy)]
struct Rate {
    debits: u64,
    secs: f64,
    complete: bool,
    enqueue_secs: Option<f64>,
}

impl Rate {
    fn per_sec(&self) -> f64 {
        self.debits as f64 / self.secs
    }
}

struct Latency {
    sent: u64,
    replied: u64,
    timeouts: u64,
    offered_rate: u64,
    secs: f64,
    /// Microseconds from the scheduled send time to the reply (coordinated omission included).
    hist: Histogram<u64>,
}

/// CPU seconds spent by each component during one phase, and the machine's busy share.
#[derive(Default, Clone)]
struct CpuSplit {
    wall: f64,
    worker: f64,
    postgres: f64,
    postgres_db: f64,
    redis: f64,
    bench: f64,
    machine_busy: f64,
    machine_total: f64,
}

impl Bench {
    async fn setup(args: &Args) -> Result<Bench> {
        let db =
            support::BenchDb::create(&args.admin_url, args.baseline_connections as u32 + 2).await?;
        let clk = Command::new("getconf").arg("CLK_TCK").output()?;
        let clk_tck: f64 = String::from_utf8_lossy(&clk.stdout)
            .trim()
            .parse()
            .unwrap_or(100.0);
        Ok(Bench {
            db_name: db.name,
            db_url: db.url,
            pool: db.pool,
            redis_url: args.redis_url.clone(),
            prefix: format!("twbench:{}", db.id),
            hot_user: Uuid::new_v4(),
            users: (0..args.users).map(|_| Uuid::new_v4()).collect(),
            clk_tck,
        })
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
    }

    async fn redis(&self) -> redis::RedisResult<MultiplexedConnection> {
        let cfg = redis::AsyncConnectionConfig::new()
            .set_response_timeout(None)
            .set_connection_timeout(Some(Duration::from_secs(5)));
        redis::Client::open(self.redis_url.as_str())?
            .get_multiplexed_async_connection_with_config(&cfg)
            .await
    }

    async fn run(&self, args: &Args) -> Result<Report> {
        let mut report = Report::default();
        for setting in [
            "synchronous_commit",
            "fsync",
            "wal_sync_method",
            "server_version",
        ] {
            let v: String = sqlx::query_scalar("SELECT current_setting($1)")
                .bind(setting)
                .fetch_one(&self.pool)
                .await?;
            report.settings.push((format!("postgres {setting}"), v));
        }
        println!(
            "granting {START_BALANCE} credits to 1 + {} users ...",
            self.users.len()
        );
        let t = Instant::now();
        self.grant_all().await?;
        println!("funded in {:.1} s", t.elapsed().as_secs_f64());

        for door in [SqlDoor::Seed, SqlDoor::Ours] {
            println!(
                "{}: one call per debit, {} connections",
                door.name(),
                args.baseline_connections
            );
            for hot in [true, false] {
                let cpu = self.cpu_snapshot(&[]).await;
                let rate = Some(self.sql_phase(args, door, hot).await?);
                let phase = match (door, hot) {
                    (SqlDoor::Seed, true) => "seed function hot user",
                    (SqlDoor::Seed, false) => "seed function 10k users",
                    (SqlDoor::Ours, true) => "SQL door hot user",
                    (SqlDoor::Ours, false) => "SQL door 10k users",
                };
                report
                    .cpu
                    .push((phase.into(), self.cpu_since(&cpu, &[]).await));
                match (door, hot) {
                    (SqlDoor::Seed, true) => report.baseline_hot = rate,
                    (SqlDoor::Seed, false) => report.baseline_spread = rate,
                    (SqlDoor::Ours, true) => report.sql_hot = rate,
                    (SqlDoor::Ours, false) => report.sql_spread = rate,
                }
            }
        }
        if args.baseline_only {
            return Ok(report);
        }

        let mut workers = self.start_workers(args)?;
        let pids: Vec<u32> = workers.iter().map(Child::id).collect();
        let outcome = async {
            self.warm_up(&mut workers).await?;
            let cpu = self.cpu_snapshot(&pids).await;
            report.ours_hot = Some(self.throughput(args, true, &mut workers).await?);
            report.cpu.push((
                "queue door hot user".into(),
                self.cpu_since(&cpu, &pids).await,
            ));
            let cpu = self.cpu_snapshot(&pids).await;
            report.ours_spread = Some(self.throughput(args, false, &mut workers).await?);
            report.cpu.push((
                "queue door 10k users".into(),
                self.cpu_since(&cpu, &pids).await,
            ));
            let cpu = self.cpu_snapshot(&pids).await;
            report.latency = Some(self.latency(args).await?);
            report.cpu.push((
                "queue door latency run".into(),
                self.cpu_since(&cpu, &pids).await,
            ));
            anyhow::Ok(())
        }
        .await;
        report.worker_peak_rss_kib = pids.iter().filter_map(|p| peak_rss_kib(*p)).collect();
        for w in &mut workers {
            let _ = w.kill();
            let _ = w.wait();
        }
        outcome?;
        self.check_ledger(args).await?;
        Ok(report)
    }

    /// Creates the seed's design (schema `seed`) and funds its accounts, and funds every
    /// tokenwarden account through the ledger's batch path (`Ledger::apply`), 1,000 grants per
    /// transaction.
    async fn grant_all(&self) -> Result<()> {
        use tokenwarden::ledger::{Credits, Ledger, LedgerOp, OutcomeStatus, RequestId, UserId};
        let cfg = tokenwarden::config::Config::load_with_env(None, Vec::<(String, String)>::new())?;
        let ledger = Ledger::new(self.pool.clone(), cfg.ledger);
        let amount = Credits::new(START_BALANCE).context("start balance is positive")?;
        let all: Vec<Uuid> = std::iter::once(self.hot_user)
            .chain(self.users.iter().copied())
            .collect();
        sqlx::raw_sql(SEED_DESIGN).execute(&self.pool).await?;
        sqlx::query(
            "INSERT INTO seed.user_tokens (user_id, balance) SELECT u, $2 FROM unnest($1::uuid[]) u",
        )
        .bind(&all)
        .bind(START_BALANCE)
        .execute(&self.pool)
        .await?;
        for chunk in all.chunks(1000) {
            let ops: Vec<LedgerOp> = chunk
                .iter()
                .map(|u| LedgerOp::Grant {
                    request_id: RequestId(Uuid::new_v4()),
                    user_id: UserId(*u),
                    amount,
                    reason: "benchmark funding".into(),
                    metadata: serde_json::json!({}),
                })
                .collect();
            let outcomes = ledger.apply(&ops).await?;
            if let Some(bad) = outcomes.iter().find(|o| o.status != OutcomeStatus::Granted) {
                bail!("funding failed: {bad:?}");
            }
        }
        Ok(())
    }

    /// One SQL phase: each debit is its own `consume_tokens_atomic` call of `door` (own
    /// transaction, row lock on the account, durable commit), from `baseline_connections`
    /// connections.
    async fn sql_phase(&self, args: &Args, door: SqlDoor, hot: bool) -> Result<Rate> {
        let done = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let users = Arc::new(self.users.clone());
        let connections = args.baseline_connections;
        let run_for = Duration::from_secs(args.baseline_secs);
        // Every connection warms up (plans the function) before the clock starts, like a
        // long-running Edge Function pool would be.
        let ready = Arc::new(tokio::sync::Barrier::new(connections + 1));
        let mut tasks: Vec<tokio::task::JoinHandle<sqlx::Result<()>>> = Vec::new();
        for c in 0..connections {
            let pool = self.pool.clone();
            let (done, failed, users, ready) =
                (done.clone(), failed.clone(), users.clone(), ready.clone());
            let hot_user = self.hot_user;
            tasks.push(tokio::spawn(async move {
                let mut conn = pool.acquire().await?;
                for _ in 0..5 {
                    consume_once(&mut conn, door, users[c % users.len()]).await?;
                }
                ready.wait().await;
                let deadline = Instant::now() + run_for;
                let mut i = c;
                while Instant::now() < deadline {
                    let user = if hot {
                        hot_user
                    } else {
                        users[i % users.len()]
                    };
                    i += connections;
                    match consume_once(&mut conn, door, user).await {
                        Ok(true) => done.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
                Ok(())
            }));
        }
        ready.wait().await;
        let start = Instant::now();
        for t in tasks {
            t.await??;
        }
        let secs = start.elapsed().as_secs_f64();
        let failed = failed.load(Ordering::Relaxed);
        if failed > 0 {
            bail!(
                "{}: {failed} calls did not return status consumed",
                door.name()
            );
        }
        Ok(Rate {
            debits: done.load(Ordering::Relaxed),
            secs,
            complete: true,
            enqueue_secs: None,
        })
    }

    fn start_workers(&self, args: &Args) -> Result<Vec<Child>> {
        let bin = match &args.worker_bin {
            Some(b) => b.clone(),
            None => std::env::current_exe()?
                .parent()
                .context("bench binary has a directory")?
                .join("tokenwarden"),
        };
        let log_dir = std::env::temp_dir();
        let mut children = Vec::new();
        for i in 0..args.workers {
            let log = log_dir.join(format!("{}-worker{i}.log", self.db_name));
            let out = std::fs::File::create(&log)?;
            println!(
                "starting worker {i}: {} run (log {})",
                bin.display(),
                log.display()
            );
            let child = Command::new(&bin)
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
                .with_context(|| format!("cannot start worker {}", bin.display()))?;
            children.push(child);
        }
        Ok(children)
    }

    fn stream(&self) -> String {
        format!("{}:jobs:consume_tokens", self.prefix)
    }

    fn payload(&self, request_id: Uuid, user: Uuid) -> String {
        format!(
            r#"{{"request_id":"{request_id}","user_id":"{user}","amount":1,"operation_type":"bench"}}"#
        )
    }

    /// Waits until the worker answers one request, so start-up is not measured.
    async fn warm_up(&self, workers: &mut [Child]) -> Result<()> {
        let mut conn = self.redis().await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let rid = Uuid::new_v4();
        let _: String = conn
            .xadd(
                self.stream(),
                "*",
                &[("payload", self.payload(rid, self.hot_user))],
            )
            .await?;
        loop {
            check_alive(workers)?;
            let reply: Option<(String, String)> = conn
                .blpop(format!("{}:reply:{rid}", self.prefix), 1.0)
                .await?;
            if let Some((_, body)) = reply {
                println!("worker ready: {body}");
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the worker did not answer a warm-up request within 60 s");
            }
        }
    }

    /// Enqueues `jobs` consume jobs as fast as pipelined XADDs go, then waits until the consumer
    /// group has acknowledged every one (acks follow the Postgres commit and the reply push).
    async fn throughput(&self, args: &Args, hot: bool, workers: &mut [Child]) -> Result<Rate> {
        let label = if hot { "hot user" } else { "10k users" };
        println!(
            "queue door {label}: enqueueing {} consume jobs ...",
            args.jobs
        );
        let payloads: Vec<(Uuid, String)> = (0..args.jobs)
            .map(|i| {
                let rid = Uuid::new_v4();
                let user = if hot {
                    self.hot_user
                } else {
                    self.users[i % self.users.len()]
                };
                (rid, self.payload(rid, user))
            })
            .collect();
        let last_rid = payloads.last().map(|p| p.0).context("at least one job")?;
        let before = self.group_acked().await?;
        let start = Instant::now();
        let producers = 2;
        let chunk = payloads.len().div_ceil(producers);
        let payloads = Arc::new(payloads);
        let mut tasks = Vec::new();
        for p in 0..producers {
            let mut conn = self.redis().await?;
            let payloads = payloads.clone();
            let stream = self.stream();
            tasks.push(tokio::spawn(async move {
                let lo = p * chunk;
                let hi = ((p + 1) * chunk).min(payloads.len());
                for part in payloads[lo..hi].chunks(500) {
                    let mut pipe = redis::pipe();
                    let now_ms = chrono::Utc::now().timestamp_millis().to_string();
                    for (_, body) in part {
                        pipe.xadd(
                            &stream,
                            "*",
                            &[("payload", body.as_str()), ("enqueued_at", now_ms.as_str())],
                        )
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
        let enqueue_secs = start.elapsed().as_secs_f64();
        let target = before + args.jobs as u64;
        let deadline = start + Duration::from_secs(args.phase_timeout_secs);
        let mut acked;
        loop {
            acked = self.group_acked().await?;
            if acked >= target || Instant::now() > deadline {
                break;
            }
            check_alive(workers)?;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let secs = start.elapsed().as_secs_f64();
        let complete = acked >= target;
        if complete {
            let mut conn = self.redis().await?;
            let reply: Option<(String, String)> = conn
                .blpop(format!("{}:reply:{last_rid}", self.prefix), 10.0)
                .await?;
            if reply.is_none() {
                bail!("{label}: all entries acknowledged but no reply for the last request");
            }
        } else {
            println!(
                "{label}: NOT complete after {} s; draining",
                args.phase_timeout_secs
            );
            let mut conn = self.redis().await?;
            let _: i64 = redis::cmd("XTRIM")
                .arg(self.stream())
                .arg("MAXLEN")
                .arg(0)
                .query_async(&mut conn)
                .await?;
            let drain_until = Instant::now() + Duration::from_secs(30);
            while self.group_pending().await? > 0 && Instant::now() < drain_until {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(Rate {
            debits: acked.saturating_sub(before).min(args.jobs as u64),
            secs,
            complete,
            enqueue_secs: Some(enqueue_secs),
        })
    }

    /// Entries the consumer group has read and acknowledged: `entries-read - pending`.
    async fn group_acked(&self) -> Result<u64> {
        let info = self.group_info().await?;
        let read = info.get("entries-read").copied().unwrap_or(0);
        let pending = info.get("pending").copied().unwrap_or(0);
        Ok(read.saturating_sub(pending))
    }

    async fn group_pending(&self) -> Result<u64> {
        Ok(self
            .group_info()
            .await?
            .get("pending")
            .copied()
            .unwrap_or(0))
    }

    async fn group_info(&self) -> Result<HashMap<String, u64>> {
        let mut conn = self.redis().await?;
        let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(self.stream())
            .query_async(&mut conn)
            .await?;
        let group = groups
            .into_iter()
            .next()
            .context("the worker created no consumer group")?;
        Ok(group
            .into_iter()
            .filter_map(|(k, v)| match v {
                redis::Value::Int(n) => Some((k, n.max(0) as u64)),
                _ => None,
            })
            .collect())
    }

    /// Open loop: request i is sent at start + i/rate whatever happened before; its latency runs
    /// from that scheduled time to the moment its reply is popped.
    async fn latency(&self, args: &Args) -> Result<Latency> {
        println!(
            "queue door latency: {} req/s for {} s over 10k users ...",
            args.rate, args.latency_secs
        );
        let total = args.rate * args.latency_secs;
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
        let replied = Arc::new(AtomicU64::new(0));
        let timeouts = Arc::new(AtomicU64::new(0));
        let start = tokio::time::Instant::now() + Duration::from_millis(50);
        let interval = Duration::from_nanos(1_000_000_000 / args.rate);
        let mut tasks = Vec::with_capacity(total as usize);
        let mut schedule = support::open_loop_schedule(start, interval, total);
        while let Some((i, at)) = schedule.recv().await {
            let rid = Uuid::new_v4();
            let body = self.payload(rid, self.users[(i as usize * 31) % self.users.len()]);
            let mut sender = sender.clone();
            let (pool, permits, hist, replied, timeouts) = (
                pool.clone(),
                permits.clone(),
                hist.clone(),
                replied.clone(),
                timeouts.clone(),
            );
            let stream = self.stream();
            let reply_key = format!("{}:reply:{rid}", self.prefix);
            tasks.push(tokio::spawn(async move {
                let now_ms = chrono::Utc::now().timestamp_millis().to_string();
                let _: String = sender
                    .xadd(
                        &stream,
                        "*",
                        &[("payload", body.as_str()), ("enqueued_at", now_ms.as_str())],
                    )
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
                        replied.fetch_add(1, Ordering::Relaxed);
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
        let secs = start.elapsed().as_secs_f64();
        let hist = hist
            .lock()
            .map_err(|_| anyhow::anyhow!("histogram lock poisoned"))?
            .clone();
        Ok(Latency {
            sent: total,
            replied: replied.load(Ordering::Relaxed),
            timeouts: timeouts.load(Ordering::Relaxed),
            offered_rate: args.rate,
            secs,
            hist,
        })
    }

    /// Every debit the bench asked for is in the ledger exactly once: the accounts lost exactly
    /// as many credits as `consumed` outcomes were recorded, and no balance went negative.
    async fn check_ledger(&self, _args: &Args) -> Result<()> {
        let (consumed, spent): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM public.ledger_requests WHERE status = 'consumed'),
                    (SELECT coalesce(sum($1 - balance), 0)::bigint FROM public.credit_accounts)",
        )
        .bind(START_BALANCE)
        .fetch_one(&self.pool)
        .await?;
        if consumed != spent {
            bail!("ledger check failed: {consumed} consumed outcomes but {spent} credits spent");
        }
        println!("ledger check: {consumed} consumed outcomes = {spent} credits spent");
        Ok(())
    }

    async fn cpu_snapshot(&self, worker_pids: &[u32]) -> CpuSample {
        CpuSample {
            at: Instant::now(),
            worker: worker_pids.iter().map(|p| proc_ticks(*p)).sum(),
            postgres: postgres_ticks(),
            postgres_db: self.db_backend_ticks().await,
            redis: self.redis_ticks().await,
            bench: proc_ticks(std::process::id()),
            machine: machine_ticks(),
        }
    }

    async fn cpu_since(&self, before: &CpuSample, worker_pids: &[u32]) -> CpuSplit {
        let now = self.cpu_snapshot(worker_pids).await;
        let t = |a: u64, b: u64| (a.saturating_sub(b)) as f64 / self.clk_tck;
        CpuSplit {
            wall: now.at.duration_since(before.at).as_secs_f64(),
            worker: t(now.worker, before.worker),
            postgres: t(now.postgres, before.postgres),
            postgres_db: t(now.postgres_db, before.postgres_db),
            redis: t(now.redis, before.redis),
            bench: t(now.bench, before.bench),
            machine_busy: t(now.machine.0, before.machine.0),
            machine_total: t(now.machine.1, before.machine.1),
        }
    }

    /// CPU ticks of the Postgres backends connected to the benchmark database (the worker's and
    /// the baseline's connections), excluding other databases on the shared server.
    async fn db_backend_ticks(&self) -> u64 {
        let pids: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap_or_default();
        pids.into_iter().map(|p| proc_ticks(p as u32)).sum()
    }

    async fn redis_ticks(&self) -> u64 {
        let Ok(mut conn) = self.redis().await else {
            return 0;
        };
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        info.lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|p| p.trim().parse::<u32>().ok())
            .map(proc_ticks)
            .unwrap_or(0)
    }
}

/// One debit through `door`: its own `consume_tokens_atomic` call, i.e. its own transaction
/// and durable commit. True when the status is `consumed`.
async fn consume_once(
    conn: &mut sqlx::PgConnection,
    door: SqlDoor,
    user: Uuid,
) -> sqlx::Result<bool> {
    let status: Option<String> = sqlx::query_scalar(door.call())
        .bind(Uuid::new_v4())
        .bind(user)
        .bind(1_i64)
        .bind("bench-baseline")
        .bind(serde_json::json!({}))
        .fetch_one(conn)
        .await?;
    Ok(status.as_deref() == Some("consumed"))
}

struct CpuSample {
    at: Instant,
    worker: u64,
    postgres: u64,
    postgres_db: u64,
    redis: u64,
    bench: u64,
    machine: (u64, u64),
}

/// utime + stime of a process, in clock ticks (0 if it is gone).
fn proc_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // The command name may contain spaces; fields after the closing parenthesis are fixed.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

/// CPU ticks of every `postgres` process on the machine (all databases, so other load shows).
fn postgres_ticks() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim() == "postgres")
                .unwrap_or(false)
        })
        .map(proc_ticks)
        .sum()
}

/// (busy, total) ticks of the whole machine from /proc/stat.
fn machine_ticks() -> (u64, u64) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    let Some(cpu) = stat.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// The 1/5/15-minute load averages: the machine is shared, so say how busy it was.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Peak resident set size (VmHWM) of a running process, in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

fn check_alive(workers: &mut [Child]) -> Result<()> {
    for w in workers.iter_mut() {
        if let Some(status) = w.try_wait()? {
            bail!("worker {} exited during the benchmark: {status}", w.id());
        }
    }
    Ok(())
}

impl Report {
    fn print(&self, args: &Args) {
        println!("\n=== tokenwarden ledger benchmark ===");
        for (k, v) in &self.settings {
            println!("{k} = {v}");
        }
        println!("load average at end = {}", load_average());
        println!(
            "machine: {} cores; worker processes: {}; jobs per throughput phase: {}; users: {}",
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            args.workers,
            args.jobs,
            args.users
        );
        let line = |name: &str, r: &Option<Rate>| {
            if let Some(r) = r {
                let enq = r
                    .enqueue_secs
                    .map(|e| format!(", enqueue took {e:.2} s"))
                    .unwrap_or_default();
                let partial = if r.complete {
                    ""
                } else {
                    " (INCOMPLETE: phase timed out)"
                };
                println!(
                    "{name:<46} {:>10.0} debits/s  ({} debits in {:.2} s{enq}){partial}",
                    r.per_sec(),
                    r.debits,
                    r.secs
                );
            }
        };
        let conns = args.baseline_connections;
        println!("\n-- throughput --");
        line(
            &format!("seed's function ({conns} conns) hot user"),
            &self.baseline_hot,
        );
        line(
            &format!("seed's function ({conns} conns) 10k users"),
            &self.baseline_spread,
        );
        line(&format!("SQL door ({conns} conns) hot user"), &self.sql_hot);
        line(
            &format!("SQL door ({conns} conns) 10k users"),
            &self.sql_spread,
        );
        line(
            "queue door (Redis→worker→Postgres) hot user",
            &self.ours_hot,
        );
        line(
            "queue door (Redis→worker→Postgres) 10k users",
            &self.ours_spread,
        );
        let ratio = |a: &Option<Rate>, b: &Option<Rate>| match (a, b) {
            (Some(a), Some(b)) if b.per_sec() > 0.0 => format!("{:.2}x", a.per_sec() / b.per_sec()),
            _ => "n/a".into(),
        };
        println!(
            "ratio SQL door / seed's function:   hot user {}, 10k users {}",
            ratio(&self.sql_hot, &self.baseline_hot),
            ratio(&self.sql_spread, &self.baseline_spread)
        );
        println!(
            "ratio queue door / seed's function: hot user {}, 10k users {}",
            ratio(&self.ours_hot, &self.baseline_hot),
            ratio(&self.ours_spread, &self.baseline_spread)
        );
        if let Some(l) = &self.latency {
            let q = |p: f64| l.hist.value_at_quantile(p) as f64 / 1000.0;
            println!(
                "\n-- enqueue→reply latency, open loop {} req/s, 10k users --",
                l.offered_rate
            );
            println!(
                "sent {} in {:.1} s, replied {}, timeouts {}",
                l.sent, l.secs, l.replied, l.timeouts
            );
            println!(
                "p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms",
                q(0.5),
                q(0.9),
                q(0.99),
                q(0.999),
                l.hist.max() as f64 / 1000.0
            );
        }
        if !self.worker_peak_rss_kib.is_empty() {
            let mib: Vec<String> = self
                .worker_peak_rss_kib
                .iter()
                .map(|k| format!("{:.1} MiB", *k as f64 / 1024.0))
                .collect();
            println!("\nworker peak RSS (VmHWM): {}", mib.join(", "));
        }
        println!(
            "\n-- CPU seconds per phase (where the time goes; pg bench = backends on the bench \
             database, pg all = every postgres process incl. WAL writer and other databases, \
             other = the rest of the machine) --"
        );
        println!(
            "{:<26} {:>7} {:>8} {:>9} {:>9} {:>7} {:>7} {:>7} {:>12}",
            "phase",
            "wall s",
            "worker",
            "pg bench",
            "pg all",
            "redis",
            "bench",
            "other",
            "machine busy"
        );
        for (name, c) in &self.cpu {
            let busy = if c.machine_total > 0.0 {
                100.0 * c.machine_busy / c.machine_total
            } else {
                0.0
            };
            println!(
                "{name:<26} {:>7.2} {:>8.2} {:>9.2} {:>9.2} {:>7.2} {:>7.2} {:>7.2} {:>11.0}%",
                c.wall,
                c.worker,
                c.postgres_db,
                c.postgres,
                c.redis,
                c.bench,
                (c.machine_busy - c.worker - c.postgres - c.redis - c.bench).max(0.0),
                busy
            );
        }
    }
}
