//! Ledger chaos run (`make chaos`): callers that behave like the Edge Function client drive
//! the ledger jobs through two worker replicas while replicas are SIGKILLed, Redis is killed
//! and restarted from its AOF and Postgres is restarted with a fast shutdown; at the end the
//! stored state is compared with an in-memory model of the ledger rules.
//!
//! The run starts its OWN Postgres (initdb into a temp dir, `pg_ctl` on a free port) and its
//! OWN `redis-server` (free port, `--appendonly yes`), so it kills and restarts only those and
//! never the machine's shared servers. Every phase has a deadline; the run stops by itself
//! (`--max-secs`, 600 by default) and prints its figures.
//!
//! Producers own disjoint sets of users and wait for each reply before the next request, so
//! every user's operations arrive in one known order: the model replays each producer's log
//! to get the outcome every request id must have.
//!
//! The chain part (`--part chain`, [`chain`]) runs after it: a random token history on anvil,
//! indexed through a fault proxy while anvil reorgs and the worker is SIGKILLed, checked
//! against `balanceOf` / `ownerOf`. `--part all` (the default) runs both.
//!
//! anyhow is used here because this file is a binary's entry point, like `src/main.rs`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redis::aio::MultiplexedConnection;
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use support::{Postgres, RedisServer, load_average, peak_rss_kib, redis_conn};
use uuid::Uuid;

#[path = "chaos/chain.rs"]
mod chain;
#[path = "chaos/proxy.rs"]
mod proxy;
mod support;

/// Which parts of the chaos run to run.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Ledger,
    Chain,
    All,
}

#[derive(Parser, Debug, Clone)]
#[command(about = "Ledger chaos run: faults injected, outcomes checked against a model")]
struct Args {
    /// Requests the producers send in all (repeats and malformed entries included).
    #[arg(long, default_value_t = 100_000)]
    ops: usize,
    /// Users, split evenly over the producers.
    #[arg(long, default_value_t = 1_000)]
    users: usize,
    /// Producers; each waits for its reply before sending the next request.
    #[arg(long, default_value_t = 8)]
    producers: usize,
    /// `tokenwarden run` replicas.
    #[arg(long, default_value_t = 2)]
    replicas: usize,
    /// Replica SIGKILLs (each restarted after 0.5–3 s).
    #[arg(long, default_value_t = 5)]
    kills: usize,
    /// Redis SIGKILLs, restarted from the AOF.
    #[arg(long, default_value_t = 1)]
    redis_restarts: usize,
    /// Redis SIGKILLs restarted with its data deleted: what a restart without persistence
    /// does (entries not yet processed are gone; callers time out and retry).
    #[arg(long, default_value_t = 1)]
    redis_wipes: usize,
    /// Postgres restarts with `pg_ctl stop -m fast`.
    #[arg(long, default_value_t = 1)]
    postgres_restarts: usize,
    /// How long a producer waits for a reply before it retries with the same request id.
    #[arg(long, default_value_t = 2_000)]
    reply_timeout_ms: u64,
    /// The workers' `queue.claim_idle_ms` (how soon a dead consumer's entries are taken over).
    #[arg(long, default_value_t = 10_000)]
    claim_idle_ms: u64,
    /// Longest the whole run may take; past it the run stops and reports what it saw.
    #[arg(long, default_value_t = 600)]
    max_secs: u64,
    /// Seed of every random choice (operations and fault times); random when absent.
    #[arg(long)]
    seed: Option<u64>,
    /// The ledger part, the chain part, or both (ledger first). With `all`, the ledger part's
    /// budget is `--max-secs` minus `--chain-max-secs`.
    #[arg(long, value_enum, default_value_t = Part::All)]
    part: Part,
    #[command(flatten)]
    chain: chain::ChainArgs,
    #[command(flatten)]
    run: support::RunArgs,
}

const LEDGER_STREAMS: [&str; 5] = [
    "consume_tokens",
    "grant_tokens",
    "hold_tokens",
    "settle_hold",
    "release_hold",
];
const PREFIX: &str = "chaos";
/// Longest one request may go unanswered (retries included) before it is counted lost.
const REQUEST_GIVE_UP: Duration = Duration::from_secs(120);

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = Args::parse();
    let seed = args.seed.unwrap_or_else(rand::random);
    let mut code = 0;
    if args.part != Part::Chain {
        if args.part == Part::All {
            args.max_secs = args
                .max_secs
                .saturating_sub(args.chain.chain_max_secs)
                .max(60);
        }
        code = ledger_part(&args, seed).await?;
    }
    if args.part != Part::Ledger {
        code = code.max(chain_part(&args, seed).await?);
    }
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

/// The chain part in its own temp dir; returns the exit code (0 passed, 1 failed, 2 aborted).
async fn chain_part(args: &Args, seed: u64) -> Result<i32> {
    let started = Instant::now();
    let dir = std::env::temp_dir().join(format!(
        "tw-chaos-chain-{}",
        &Uuid::new_v4().simple().to_string()[..8]
    ));
    std::fs::create_dir_all(&dir)?;
    println!("\nchain chaos run: seed {seed}, temp dir {}", dir.display());
    let result = chain::run(&args.chain, &args.run, seed, &dir).await;
    let passed = result.as_ref().is_ok_and(|r| r.passed());
    if args.run.keep || !passed {
        println!("kept {} (data and worker log)", dir.display());
    }
    match result {
        Ok(r) => r.print(seed, started.elapsed()),
        Err(e) => {
            println!(
                "\nchain chaos run aborted after {:.0} s: {e:#}",
                started.elapsed().as_secs_f64()
            );
            return Ok(2);
        }
    }
    if !args.run.keep && passed {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(if passed { 0 } else { 1 })
}

/// The ledger part; returns the exit code (0 passed, 1 failed, 2 aborted).
async fn ledger_part(args: &Args, seed: u64) -> Result<i32> {
    if args.users < args.producers || args.producers == 0 || args.replicas == 0 {
        bail!("need at least one producer, one replica and one user per producer");
    }
    let started = Instant::now();
    let dir = std::env::temp_dir().join(format!(
        "tw-chaos-{}",
        &Uuid::new_v4().simple().to_string()[..8]
    ));
    std::fs::create_dir_all(&dir)?;
    println!("chaos run: seed {seed}, temp dir {}", dir.display());
    let result = run(args, seed, &dir, started).await;
    if args.run.keep || result.as_ref().map(|r| !r.passed()).unwrap_or(true) {
        println!("kept {} (data and logs)", dir.display());
    }
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            println!(
                "\nchaos run aborted after {:.0} s: {e:#}",
                started.elapsed().as_secs_f64()
            );
            return Ok(2);
        }
    };
    report.print(args, seed, started.elapsed());
    if !args.run.keep && report.passed() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(if report.passed() { 0 } else { 1 })
}

async fn run(args: &Args, seed: u64, dir: &Path, started: Instant) -> Result<Report> {
    let end = started + Duration::from_secs(args.max_secs);
    // The producers stop a minute before the end, so the drain and the checks fit.
    let deadline = end - Duration::from_secs(60).min(Duration::from_secs(args.max_secs / 4));
    let mut pg = Postgres::init(&args.run.pg_bin_dir, dir, "")?;
    pg.start()?;
    let mut redis_srv = RedisServer::new(dir)?;
    redis_srv.start()?;
    let outcome = async {
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(30))
            .connect(&pg.url())
            .await
            .context("connect to the chaos Postgres")?;
        tokenwarden::infra::migrate(&pool).await?;
        let workers = Arc::new(Workers::new(args, dir, &pg.url(), &redis_srv.url())?);
        for i in 0..args.replicas {
            workers.start(i)?;
        }
        wait_ready(&redis_srv.url(), &workers, deadline).await?;
        println!(
            "{} replicas answering; {} producers, {} operations",
            args.replicas, args.producers, args.ops
        );

        let shared = Arc::new(Shared {
            done: AtomicU64::new(0),
            faults_done: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            redis_errors: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
        });
        let supervisor = {
            let (workers, shared) = (workers.clone(), shared.clone());
            tokio::spawn(async move { workers.supervise(&shared).await })
        };
        let users: Vec<Uuid> = (0..args.users).map(|_| Uuid::new_v4()).collect();
        let per = args.users / args.producers;
        let mut tasks = Vec::new();
        for p in 0..args.producers {
            let mine = users[p * per..(p + 1) * per].to_vec();
            let ops = args.ops / args.producers + usize::from(p < args.ops % args.producers);
            let producer = Producer {
                redis_url: redis_srv.url(),
                users: mine,
                ops,
                reply_timeout: Duration::from_millis(args.reply_timeout_ms),
                rng: StdRng::seed_from_u64(seed.wrapping_add(p as u64 + 1)),
                shared: shared.clone(),
                deadline,
            };
            tasks.push(tokio::spawn(producer.run()));
        }

        let faults = inject_faults(
            args,
            seed,
            &shared,
            &workers,
            &mut pg,
            &mut redis_srv,
            deadline,
        )
        .await;
        shared.faults_done.store(true, Ordering::SeqCst);
        let mut logs = Vec::new();
        for t in tasks {
            logs.push(t.await.context("producer task")?);
        }
        let ops_secs = started.elapsed().as_secs_f64();
        let faults = faults?;
        println!("all producers done after {ops_secs:.1} s; waiting for nothing pending ...");
        let drained = drain(&redis_srv.url(), end).await;
        shared.stop.store(true, Ordering::SeqCst);
        let unexpected_exits = supervisor.await.unwrap_or(0);
        let peak_rss = workers.stop_all();
        let wipes: Vec<Instant> = faults
            .iter()
            .filter(|f| f.kind == FaultKind::RedisWipe)
            .map(|f| f.at)
            .collect();
        let mut report = check(&pool, &logs, drained?, &wipes).await?;
        report.faults_planned =
            args.kills + args.redis_restarts + args.redis_wipes + args.postgres_restarts;
        report.ops_planned = args.ops;
        report.faults = recovery(faults, &logs);
        report.redis_errors = shared.redis_errors.load(Ordering::Relaxed);
        report.timeouts = shared.timeouts.load(Ordering::Relaxed);
        report.unexpected_exits = unexpected_exits;
        report.ops_secs = ops_secs;
        report.peak_rss_kib = peak_rss;
        pool.close().await;
        anyhow::Ok(report)
    }
    .await;
    redis_srv.stop();
    pg.stop();
    outcome
}

// ---------------------------------------------------------------------------------------------
// Worker replicas

struct Replica {
    child: Option<Child>,
    /// Set while the fault injector has killed it on purpose (the supervisor leaves it alone).
    killed: bool,
    peak_rss_kib: u64,
}

struct Workers {
    bin: PathBuf,
    dir: PathBuf,
    env: Vec<(String, String)>,
    replicas: Mutex<Vec<Replica>>,
}

impl Workers {
    fn new(args: &Args, dir: &Path, pg_url: &str, redis_url: &str) -> Result<Workers> {
        let bin = args.run.worker_bin()?;
        let env = [
            ("TOKENWARDEN__DATABASE__URL", pg_url.to_string()),
            ("TOKENWARDEN__REDIS__URL", redis_url.to_string()),
            ("TOKENWARDEN__REDIS__PREFIX", PREFIX.to_string()),
            ("TOKENWARDEN__HTTP__ENABLED", "false".into()),
            ("TOKENWARDEN__MAINTENANCE__ENABLED", "false".into()),
            (
                "TOKENWARDEN__QUEUE__CLAIM_IDLE_MS",
                args.claim_idle_ms.to_string(),
            ),
            ("TOKENWARDEN__TELEMETRY__LEVEL", "warn".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let replicas = (0..args.replicas)
            .map(|_| Replica {
                child: None,
                killed: false,
                peak_rss_kib: 0,
            })
            .collect();
        Ok(Workers {
            bin,
            dir: dir.to_path_buf(),
            env,
            replicas: Mutex::new(replicas),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Replica>> {
        self.replicas.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn start(&self, i: usize) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("worker{i}.log")))?;
        let child = Command::new(&self.bin)
            .arg("run")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        let mut r = self.lock();
        r[i].child = Some(child);
        r[i].killed = false;
        Ok(())
    }

    fn kill9(&self, i: usize) {
        let mut r = self.lock();
        r[i].killed = true;
        if let Some(mut c) = r[i].child.take() {
            if let Some(k) = peak_rss_kib(c.id()) {
                r[i].peak_rss_kib = r[i].peak_rss_kib.max(k);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn any_alive(&self) -> bool {
        self.lock().iter().any(|r| r.child.is_some())
    }

    /// Like an orchestrator: a replica that exits by itself (not killed by the injector) is
    /// restarted after a second. Returns how many such exits it saw.
    async fn supervise(&self, shared: &Shared) -> u64 {
        let mut exits = 0;
        while !shared.stop.load(Ordering::SeqCst) {
            let mut restart = Vec::new();
            {
                let mut r = self.lock();
                for (i, rep) in r.iter_mut().enumerate() {
                    if let Some(c) = rep.child.as_mut() {
                        if let Some(k) = peak_rss_kib(c.id()) {
                            rep.peak_rss_kib = rep.peak_rss_kib.max(k);
                        }
                        if let Ok(Some(status)) = c.try_wait() {
                            println!("  replica {i} exited by itself ({status}); restarting it");
                            exits += 1;
                            rep.child = None;
                            restart.push(i);
                        }
                    }
                }
            }
            if !restart.is_empty() {
                tokio::time::sleep(Duration::from_secs(1)).await;
                for i in restart {
                    if let Err(e) = self.start(i) {
                        println!("  replica {i} could not be restarted: {e:#}");
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        exits
    }

    /// SIGTERM every replica, SIGKILL after 30 s; returns the peak RSS seen per replica.
    fn stop_all(&self) -> Vec<u64> {
        let mut r = self.lock();
        for rep in r.iter_mut() {
            if let Some(k) = rep.child.as_ref().and_then(|c| peak_rss_kib(c.id())) {
                rep.peak_rss_kib = rep.peak_rss_kib.max(k);
            }
        }
        let mut children: Vec<Child> = r.iter_mut().filter_map(|rep| rep.child.take()).collect();
        let mut running: Vec<&mut Child> = children.iter_mut().collect();
        support::terminate(&mut running, Duration::from_secs(30));
        r.iter().map(|rep| rep.peak_rss_kib).collect()
    }
}

async fn wait_ready(redis_url: &str, workers: &Workers, deadline: Instant) -> Result<()> {
    let mut conn = redis_conn(redis_url).await?;
    let rid = Uuid::new_v4();
    let payload = json!({"request_id": rid, "user_id": Uuid::new_v4(), "amount": 1, "reason": "chaos warm-up"});
    let _: String = redis::cmd("XADD")
        .arg(format!("{PREFIX}:jobs:grant_tokens"))
        .arg("*")
        .arg("payload")
        .arg(payload.to_string())
        .query_async(&mut conn)
        .await?;
    let until = (Instant::now() + Duration::from_secs(120)).min(deadline);
    while Instant::now() < until {
        if !workers.any_alive() {
            bail!("no replica is running (see worker*.log in the temp dir)");
        }
        let reply: Option<(String, String)> = redis::cmd("BLPOP")
            .arg(format!("{PREFIX}:reply:{rid}"))
            .arg(1.0)
            .query_async(&mut conn)
            .await?;
        if reply.is_some() {
            return Ok(());
        }
    }
    bail!("the replicas did not answer a warm-up grant within 120 s")
}

// ---------------------------------------------------------------------------------------------
// Producers

struct Shared {
    done: AtomicU64,
    /// Set by the fault injector once every fault was injected and settled.
    faults_done: AtomicBool,
    stop: AtomicBool,
    redis_errors: AtomicU64,
    timeouts: AtomicU64,
}

/// One operation as the producer meant it (the model's input).
#[derive(Clone, Debug)]
enum Op {
    Grant { user: Uuid, amount: i64 },
    Consume { user: Uuid, amount: i64 },
    Hold { user: Uuid, amount: i64 },
    Settle { hold: Uuid, amount: i64 },
    Release { hold: Uuid },
}

impl Op {
    fn job_type(&self) -> &'static str {
        match self {
            Op::Grant { .. } => "grant_tokens",
            Op::Consume { .. } => "consume_tokens",
            Op::Hold { .. } => "hold_tokens",
            Op::Settle { .. } => "settle_hold",
            Op::Release { .. } => "release_hold",
        }
    }

    /// The payload, with `variant` in the metadata (a different variant = different fields).
    fn payload(&self, rid: Uuid, variant: u32) -> Value {
        let meta = json!({"chaos": variant});
        match self {
            Op::Grant { user, amount } => {
                json!({"request_id": rid, "user_id": user, "amount": amount, "reason": "chaos grant", "metadata": meta})
            }
            Op::Consume { user, amount } => {
                json!({"request_id": rid, "user_id": user, "amount": amount, "operation_type": "chaos", "metadata": meta})
            }
            Op::Hold { user, amount } => {
                json!({"request_id": rid, "user_id": user, "amount": amount, "operation_type": "chaos", "ttl_secs": 3600, "metadata": meta})
            }
            Op::Settle { hold, amount } => {
                json!({"request_id": rid, "hold_id": hold, "amount": amount, "metadata": meta})
            }
            Op::Release { hold } => json!({"request_id": rid, "hold_id": hold, "metadata": meta}),
        }
    }
}

/// Entries the worker must refuse, each kept as a dead letter with its reason.
#[derive(Clone, Copy, Debug)]
enum Malformed {
    NotJson,
    NoPayload,
    UnknownField,
    NegativeAmount,
    AmountIsText,
}

impl Malformed {
    const ALL: [Malformed; 5] = [
        Malformed::NotJson,
        Malformed::NoPayload,
        Malformed::UnknownField,
        Malformed::NegativeAmount,
        Malformed::AmountIsText,
    ];

    /// (job type, entry fields, whether a request id is readable so a reply is due).
    fn entry(self, rid: Uuid, user: Uuid) -> (&'static str, Vec<(String, String)>, bool) {
        let p = |v: Value| vec![("payload".to_string(), v.to_string())];
        match self {
            Malformed::NotJson => (
                "consume_tokens",
                vec![(
                    "payload".into(),
                    format!("{{\"request_id\":\"{rid}\",\"user_id\":"),
                )],
                false,
            ),
            Malformed::NoPayload => (
                "grant_tokens",
                vec![("data".into(), format!("{{\"request_id\":\"{rid}\"}}"))],
                false,
            ),
            Malformed::UnknownField => (
                "consume_tokens",
                p(
                    json!({"request_id": rid, "user_id": user, "amount": 1, "operation_type": "chaos", "surprise": true}),
                ),
                true,
            ),
            Malformed::NegativeAmount => (
                "hold_tokens",
                p(
                    json!({"request_id": rid, "user_id": user, "amount": -5, "operation_type": "chaos"}),
                ),
                true,
            ),
            Malformed::AmountIsText => (
                "grant_tokens",
                p(json!({"request_id": rid, "user_id": user, "amount": "10", "reason": "chaos"})),
                true,
            ),
        }
    }
}

#[derive(Clone, Debug)]
enum Sent {
    /// A request id's first use.
    New { rid: Uuid, op: Op },
    /// An earlier request id again: same fields, or (`changed`) different ones.
    Repeat { rid: Uuid, op: Op, changed: bool },
    Malformed {
        rid: Uuid,
        chaos_id: Uuid,
        kind: Malformed,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Reply {
    status: String,
    balance: Option<i64>,
    held: Option<i64>,
}

impl Reply {
    fn parse(body: &str) -> Option<Reply> {
        let v: Value = serde_json::from_str(body).ok()?;
        Some(Reply {
            status: v.get("status")?.as_str()?.to_string(),
            balance: v.get("balance").and_then(Value::as_i64),
            held: v.get("held").and_then(Value::as_i64),
        })
    }
}

struct Record {
    sent: Sent,
    /// When its last XADD was sent.
    sent_at: Instant,
    /// The reply received (None: none was due, or the producer gave up).
    reply: Option<Reply>,
    attempts: u32,
    gave_up: bool,
}

struct ProducerLog {
    records: Vec<Record>,
    /// When each reply arrived (for the recovery times).
    reply_times: Vec<Instant>,
}

struct Producer {
    redis_url: String,
    users: Vec<Uuid>,
    ops: usize,
    reply_timeout: Duration,
    rng: StdRng,
    shared: Arc<Shared>,
    deadline: Instant,
}

impl Producer {
    async fn run(mut self) -> ProducerLog {
        let mut log = ProducerLog {
            records: Vec::with_capacity(self.ops),
            reply_times: Vec::new(),
        };
        let mut conn: Option<MultiplexedConnection> = None;
        let mut holds: Vec<Uuid> = Vec::new();
        let mut originals: Vec<usize> = Vec::new();
        // At least `ops` requests, and on until every fault was injected (and settled).
        for i in 0.. {
            if Instant::now() > self.deadline
                || (i >= self.ops && self.shared.faults_done.load(Ordering::SeqCst))
            {
                break;
            }
            let sent = self.next(&log, &mut holds, &originals);
            if matches!(sent, Sent::New { .. }) {
                originals.push(log.records.len());
            }
            let (job_type, fields, wants_reply, rid) = match &sent {
                Sent::New { rid, op } => (
                    op.job_type(),
                    vec![("payload".into(), op.payload(*rid, 0).to_string())],
                    true,
                    *rid,
                ),
                Sent::Repeat { rid, op, changed } => (
                    op.job_type(),
                    vec![(
                        "payload".into(),
                        op.payload(*rid, u32::from(*changed)).to_string(),
                    )],
                    true,
                    *rid,
                ),
                Sent::Malformed {
                    rid,
                    chaos_id,
                    kind,
                } => {
                    let user = self.users[self.rng.random_range(0..self.users.len())];
                    let (jt, mut f, wants) = kind.entry(*rid, user);
                    f.push(("chaos_id".into(), chaos_id.to_string()));
                    (jt, f, wants, *rid)
                }
            };
            let (reply, attempts, gave_up) = self
                .request(
                    &mut conn,
                    job_type,
                    &fields,
                    wants_reply,
                    rid,
                    &mut log.reply_times,
                )
                .await;
            log.records.push(Record {
                sent,
                sent_at: Instant::now(),
                reply,
                attempts,
                gave_up,
            });
            self.shared.done.fetch_add(1, Ordering::Relaxed);
        }
        log
    }

    fn next(&mut self, log: &ProducerLog, holds: &mut Vec<Uuid>, originals: &[usize]) -> Sent {
        let roll: f64 = self.rng.random();
        if roll < 0.01 {
            let kind = Malformed::ALL[self.rng.random_range(0..Malformed::ALL.len())];
            return Sent::Malformed {
                rid: Uuid::new_v4(),
                chaos_id: Uuid::new_v4(),
                kind,
            };
        }
        if roll < 0.11 && !originals.is_empty() {
            let i = originals[self.rng.random_range(0..originals.len())];
            if let Sent::New { rid, op } = &log.records[i].sent {
                return Sent::Repeat {
                    rid: *rid,
                    op: op.clone(),
                    changed: self.rng.random_bool(0.3),
                };
            }
        }
        let user = self.users[self.rng.random_range(0..self.users.len())];
        let pick: f64 = self.rng.random();
        let op = if pick < 0.22 {
            Op::Grant {
                user,
                amount: self.rng.random_range(50..500),
            }
        } else if pick < 0.55 {
            Op::Consume {
                user,
                amount: self.rng.random_range(1..120),
            }
        } else if pick < 0.75 {
            let rid = Uuid::new_v4();
            holds.push(rid);
            return Sent::New {
                rid,
                op: Op::Hold {
                    user,
                    amount: self.rng.random_range(1..150),
                },
            };
        } else if pick < 0.9 && !holds.is_empty() {
            let hold = self.pick_hold(holds);
            // Mostly at most what a hold of up to 150 reserves; sometimes more (rejected).
            Op::Settle {
                hold,
                amount: self.rng.random_range(1..170),
            }
        } else if !holds.is_empty() {
            Op::Release {
                hold: self.pick_hold(holds),
            }
        } else {
            Op::Grant { user, amount: 100 }
        };
        Sent::New {
            rid: Uuid::new_v4(),
            op,
        }
    }

    /// A recent hold mostly (so most settles find it open), an unknown id sometimes.
    fn pick_hold(&mut self, holds: &[Uuid]) -> Uuid {
        if self.rng.random_bool(0.03) {
            return Uuid::new_v4();
        }
        let back = self.rng.random_range(0..holds.len().min(8));
        holds[holds.len() - 1 - back]
    }

    /// Like the Edge Function client: XADD, BLPOP the reply; on a timeout or a Redis error,
    /// send the same request id again. Returns (reply, attempts, gave up).
    async fn request(
        &mut self,
        conn: &mut Option<MultiplexedConnection>,
        job_type: &str,
        fields: &[(String, String)],
        wants_reply: bool,
        rid: Uuid,
        reply_times: &mut Vec<Instant>,
    ) -> (Option<Reply>, u32, bool) {
        let give_up = (Instant::now() + REQUEST_GIVE_UP).min(self.deadline);
        let stream = format!("{PREFIX}:jobs:{job_type}");
        let reply_key = format!("{PREFIX}:reply:{rid}");
        let mut attempts = 0;
        while Instant::now() < give_up {
            attempts += 1;
            let c = match conn {
                Some(c) => c,
                None => match redis_conn(&self.redis_url).await {
                    Ok(c) => conn.insert(c),
                    Err(_) => {
                        self.shared.redis_errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let mut xadd = redis::cmd("XADD");
            xadd.arg(&stream).arg("*");
            for (k, v) in fields {
                xadd.arg(k).arg(v);
            }
            xadd.arg("enqueued_at")
                .arg(chrono::Utc::now().timestamp_millis());
            let added: redis::RedisResult<String> =
                tokio::time::timeout(self.reply_timeout, xadd.query_async(c))
                    .await
                    .unwrap_or_else(|_| {
                        Err(redis::RedisError::from((
                            redis::ErrorKind::Io,
                            "XADD timed out",
                        )))
                    });
            if added.is_err() {
                self.shared.redis_errors.fetch_add(1, Ordering::Relaxed);
                *conn = None;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            if !wants_reply {
                return (None, attempts, false);
            }
            let secs = self.reply_timeout.as_secs_f64();
            let popped: redis::RedisResult<Option<(String, String)>> = tokio::time::timeout(
                self.reply_timeout + Duration::from_secs(1),
                redis::cmd("BLPOP").arg(&reply_key).arg(secs).query_async(c),
            )
            .await
            .unwrap_or_else(|_| {
                Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "BLPOP timed out",
                )))
            });
            match popped {
                Ok(Some((_, body))) => {
                    reply_times.push(Instant::now());
                    return (Reply::parse(&body), attempts, false);
                }
                Ok(None) => {
                    self.shared.timeouts.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    self.shared.redis_errors.fetch_add(1, Ordering::Relaxed);
                    *conn = None;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        (None, attempts, true)
    }
}

// ---------------------------------------------------------------------------------------------
// Faults

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FaultKind {
    KillReplica(usize),
    RedisRestart,
    RedisWipe,
    PostgresRestart,
}

struct Fault {
    kind: FaultKind,
    at: Instant,
    /// How long the component was down (kill → restarted).
    down: Duration,
    /// Completed operations when it was injected.
    at_op: u64,
}

/// Injects the faults at random points of the run (by completed operations, between 10 % and
/// 80 % of `--ops`), one at a time: each component is back, and 2 s have passed, before the
/// next fault. The producers keep sending past `--ops` until the last fault has settled.
async fn inject_faults(
    args: &Args,
    seed: u64,
    shared: &Shared,
    workers: &Workers,
    pg: &mut Postgres,
    redis_srv: &mut RedisServer,
    deadline: Instant,
) -> Result<Vec<Fault>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut kinds: Vec<FaultKind> = Vec::new();
    for _ in 0..args.kills {
        kinds.push(FaultKind::KillReplica(rng.random_range(0..args.replicas)));
    }
    kinds.extend(std::iter::repeat_n(
        FaultKind::RedisRestart,
        args.redis_restarts,
    ));
    kinds.extend(std::iter::repeat_n(FaultKind::RedisWipe, args.redis_wipes));
    kinds.extend(std::iter::repeat_n(
        FaultKind::PostgresRestart,
        args.postgres_restarts,
    ));
    let total = args.ops as f64;
    let mut points: Vec<u64> = (0..kinds.len())
        .map(|_| (total * rng.random_range(0.1..0.8)) as u64)
        .collect();
    points.sort_unstable();
    // Shuffle which fault comes when.
    for i in (1..kinds.len()).rev() {
        kinds.swap(i, rng.random_range(0..=i));
    }
    let mut faults = Vec::new();
    for (kind, point) in kinds.into_iter().zip(points) {
        while shared.done.load(Ordering::Relaxed) < point {
            if Instant::now() > deadline {
                return Ok(faults);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let at = Instant::now();
        let at_op = shared.done.load(Ordering::Relaxed);
        let pause = Duration::from_millis(rng.random_range(500..3000));
        match kind {
            FaultKind::KillReplica(i) => {
                workers.kill9(i);
                tokio::time::sleep(pause).await;
                workers.start(i)?;
            }
            FaultKind::RedisRestart => {
                redis_srv.kill9();
                tokio::time::sleep(pause).await;
                redis_srv.start()?;
            }
            FaultKind::RedisWipe => {
                redis_srv.kill9();
                redis_srv.wipe()?;
                tokio::time::sleep(pause).await;
                redis_srv.start()?;
            }
            FaultKind::PostgresRestart => {
                pg.stop_fast()?;
                tokio::time::sleep(pause).await;
                pg.start()?;
            }
        }
        let down = at.elapsed();
        println!(
            "  fault at op {at_op}: {kind:?}, back after {:.2} s",
            down.as_secs_f64()
        );
        faults.push(Fault {
            kind,
            at,
            down,
            at_op,
        });
        // Let the system settle before the next fault.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    Ok(faults)
}

struct Recovered {
    kind: FaultKind,
    at_op: u64,
    down: Duration,
    /// From the component being back (restarted) to the first reply any producer received.
    first_reply: Option<Duration>,
    /// Until every producer still sending had received a reply again: from the kill for a
    /// replica (the worst caller's gap: a request held by the killed replica waits for its
    /// retry), from the return for Redis and Postgres.
    all_producers: Option<Duration>,
}

fn recovery(faults: Vec<Fault>, logs: &[ProducerLog]) -> Vec<Recovered> {
    faults
        .into_iter()
        .map(|f| {
            let back = f.at + f.down;
            let first_reply = logs
                .iter()
                .filter_map(|l| l.reply_times.iter().find(|t| **t > back))
                .min()
                .map(|t| t.duration_since(back));
            // A killed replica's peer keeps serving: measure callers' gap from the kill. A
            // restarted Redis or Postgres serves nobody while down: measure from its return.
            let from = match f.kind {
                FaultKind::KillReplica(_) => f.at,
                _ => back,
            };
            // Producers that still sent requests after the fault (the others had finished).
            let firsts: Vec<Instant> = logs
                .iter()
                .filter_map(|l| l.reply_times.iter().find(|t| **t > from).copied())
                .collect();
            let all_producers = firsts.iter().max().map(|t| t.duration_since(from));
            Recovered {
                kind: f.kind,
                at_op: f.at_op,
                down: f.down,
                first_reply,
                all_producers,
            }
        })
        .collect()
}

/// Waits until every ledger stream has nothing pending and nothing undelivered.
async fn drain(redis_url: &str, deadline: Instant) -> Result<Drained> {
    let started = Instant::now();
    loop {
        let mut pending = 0;
        let mut lag = 0;
        if let Ok(mut conn) = redis_conn(redis_url).await {
            for s in LEDGER_STREAMS {
                let groups: redis::RedisResult<Vec<HashMap<String, redis::Value>>> =
                    redis::cmd("XINFO")
                        .arg("GROUPS")
                        .arg(format!("{PREFIX}:jobs:{s}"))
                        .query_async(&mut conn)
                        .await;
                for g in groups.unwrap_or_default() {
                    let n = |k: &str| match g.get(k) {
                        Some(redis::Value::Int(n)) => *n as u64,
                        _ => 0,
                    };
                    pending += n("pending");
                    lag += n("lag");
                }
            }
            if pending == 0 && lag == 0 {
                return Ok(Drained {
                    pending,
                    lag,
                    secs: started.elapsed().as_secs_f64(),
                });
            }
        }
        if Instant::now() > deadline {
            return Ok(Drained {
                pending,
                lag,
                secs: started.elapsed().as_secs_f64(),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

struct Drained {
    pending: u64,
    lag: u64,
    secs: f64,
}

// ---------------------------------------------------------------------------------------------
// The model and the checks

#[derive(Default, Clone, Copy)]
struct Account {
    exists: bool,
    balance: i64,
    held: i64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum HoldState {
    Open,
    Resolved,
}

/// (kind, amount, balance_after, held_after) of one history row.
type HistoryRow = (String, i64, i64, i64);

#[derive(Default)]
struct Model {
    accounts: HashMap<Uuid, Account>,
    holds: HashMap<Uuid, (Uuid, i64, HoldState)>,
    outcomes: HashMap<Uuid, Reply>,
    history: HashMap<Uuid, Vec<HistoryRow>>,
}

impl Model {
    /// The ledger rules of docs/ledger.md, one operation at a time.
    fn apply(&mut self, rid: Uuid, op: &Op) -> Reply {
        let reply = |status: &str, a: Option<Account>| Reply {
            status: status.into(),
            balance: a.map(|a| a.balance),
            held: a.map(|a| a.held),
        };
        match *op {
            Op::Grant { user, amount } => {
                let a = self.accounts.entry(user).or_default();
                a.exists = true;
                a.balance += amount;
                let a = *a;
                self.row(user, "grant", amount, a);
                reply("granted", Some(a))
            }
            Op::Consume { user, amount } | Op::Hold { user, amount } => {
                let hold = matches!(op, Op::Hold { .. });
                let a = self.accounts.get(&user).copied().unwrap_or_default();
                if a.balance < amount {
                    return reply("insufficient_tokens", Some(a));
                }
                let acc = self.accounts.entry(user).or_default();
                acc.balance -= amount;
                if hold {
                    acc.held += amount;
                }
                let a = *acc;
                if hold {
                    self.holds.insert(rid, (user, amount, HoldState::Open));
                    self.row(user, "hold", amount, a);
                    reply("held", Some(a))
                } else {
                    self.row(user, "consume", amount, a);
                    reply("consumed", Some(a))
                }
            }
            Op::Settle { hold, .. } | Op::Release { hold } => {
                let Some(&(user, held_amount, state)) = self.holds.get(&hold) else {
                    return reply("hold_not_found", None);
                };
                let a = self.accounts.get(&user).copied().unwrap_or_default();
                if state == HoldState::Resolved {
                    return reply("hold_already_resolved", Some(a));
                }
                let settle = match *op {
                    Op::Settle { amount, .. } => Some(amount),
                    _ => None,
                };
                if let Some(amount) = settle
                    && amount > held_amount
                {
                    return reply("rejected", Some(a));
                }
                let acc = self.accounts.entry(user).or_default();
                acc.held -= held_amount;
                acc.balance += held_amount - settle.unwrap_or(0);
                let a = *acc;
                self.holds
                    .insert(hold, (user, held_amount, HoldState::Resolved));
                match settle {
                    Some(amount) => {
                        self.row(user, "settle", amount, a);
                        reply("settled", Some(a))
                    }
                    None => {
                        self.row(user, "release", held_amount, a);
                        reply("released", Some(a))
                    }
                }
            }
        }
    }

    fn row(&mut self, user: Uuid, kind: &str, amount: i64, a: Account) {
        self.history
            .entry(user)
            .or_default()
            .push((kind.into(), amount, a.balance, a.held));
    }
}

#[derive(Default)]
struct Report {
    operations: usize,
    new_ids: usize,
    repeats_same: usize,
    repeats_changed: usize,
    malformed: usize,
    /// Malformed entries with no reply due that a Redis wipe took before the worker read them
    /// (the documented loss of a Redis without persistence).
    lost_to_wipe: usize,
    faults: Vec<Recovered>,
    faults_planned: usize,
    ops_planned: usize,
    redis_errors: u64,
    timeouts: u64,
    retried_requests: usize,
    unexpected_exits: u64,
    ops_secs: f64,
    drain: Option<Drained>,
    peak_rss_kib: Vec<u64>,
    /// Request ids sent whose outcome is not stored, or requests never answered.
    lost: Vec<String>,
    /// Request ids applied more than once (history rows beyond the model's).
    doubled: Vec<String>,
    /// Replies, stored outcomes, balances or history that differ from the model.
    mismatches: Vec<String>,
    /// Replies popped for a repeated id that answered another attempt of the same id (the
    /// stored outcome for a changed repeat, a conflict for a later same-fields repeat).
    stale_replies: usize,
    dead_letters: u64,
    dead_letters_valid: u64,
    statuses: BTreeMap<String, u64>,
}

impl Report {
    fn passed(&self) -> bool {
        self.lost.is_empty()
            && self.faults.len() == self.faults_planned
            && self.doubled.is_empty()
            && self.mismatches.is_empty()
            && self
                .drain
                .as_ref()
                .is_some_and(|d| d.pending == 0 && d.lag == 0)
    }

    fn print(&self, args: &Args, seed: u64, total: Duration) {
        println!("\n=== tokenwarden ledger chaos run ===");
        println!(
            "seed {seed}; {} producers, {} replicas, {} users; reply timeout {} ms, claim_idle_ms {}",
            args.producers, args.replicas, args.users, args.reply_timeout_ms, args.claim_idle_ms
        );
        println!("load average at end: {}", load_average());
        println!(
            "operations: {} in {:.1} s ({:.0}/s): {} new ids, {} repeats with the same fields, {} with different fields, {} malformed",
            self.operations,
            self.ops_secs,
            self.operations as f64 / self.ops_secs.max(0.001),
            self.new_ids,
            self.repeats_same,
            self.repeats_changed,
            self.malformed
        );
        println!("stored outcomes by status: {:?}", self.statuses);
        println!(
            "caller view: {} reply timeouts, {} Redis errors, {} requests sent more than once",
            self.timeouts, self.redis_errors, self.retried_requests
        );
        if self.operations < self.ops_planned {
            println!(
                "stopped at --max-secs after {} of {} operations",
                self.operations, self.ops_planned
            );
        }
        println!(
            "faults injected: {} of {} planned",
            self.faults.len(),
            self.faults_planned
        );
        let ms = |d: Option<Duration>| {
            d.map(|d| format!("{:.0} ms", d.as_secs_f64() * 1000.0))
                .unwrap_or_else(|| "never".into())
        };
        for f in &self.faults {
            println!(
                "  {:<22} at op {:>7}: down {:>6.0} ms; first reply {:>8} after it was back; every producer answered {:>8} after {}",
                format!("{:?}", f.kind),
                f.at_op,
                f.down.as_secs_f64() * 1000.0,
                ms(f.first_reply),
                ms(f.all_producers),
                if matches!(f.kind, FaultKind::KillReplica(_)) {
                    "the kill"
                } else {
                    "it was back"
                }
            );
        }
        println!(
            "replicas that exited by themselves (restarted): {}",
            self.unexpected_exits
        );
        if let Some(d) = &self.drain {
            println!(
                "drain after the last reply: {:.1} s; pending {}, undelivered {}",
                d.secs, d.pending, d.lag
            );
        }
        println!(
            "dead letters: {} ({} of valid requests, after max_deliveries)",
            self.dead_letters, self.dead_letters_valid
        );
        println!(
            "fire-and-forget malformed entries a Redis wipe took before they were read: {}",
            self.lost_to_wipe
        );
        println!(
            "stale replies (left in a reply list by another attempt of a repeated id): {}",
            self.stale_replies
        );
        if !self.peak_rss_kib.is_empty() {
            let mib: Vec<String> = self
                .peak_rss_kib
                .iter()
                .map(|k| format!("{:.1} MiB", *k as f64 / 1024.0))
                .collect();
            println!("worker peak RSS per replica: {}", mib.join(", "));
        }
        let show = |name: &str, v: &[String]| {
            println!("{name} {}", v.len());
            for line in v.iter().take(10) {
                println!("    {line}");
            }
        };
        show("lost", &self.lost);
        show("doubled", &self.doubled);
        show("mismatches", &self.mismatches);
        println!("total time {:.1} s", total.as_secs_f64());
        println!(
            "{}",
            if self.passed() {
                "CHAOS PASSED"
            } else {
                "CHAOS FAILED"
            }
        );
    }
}

async fn check(
    pool: &PgPool,
    logs: &[ProducerLog],
    drained: Drained,
    wipes: &[Instant],
) -> Result<Report> {
    let mut report = Report {
        drain: Some(drained),
        ..Report::default()
    };
    let stored: Vec<(Uuid, String, Option<i64>, Option<i64>)> = sqlx::query_as(
        "SELECT request_id, status, balance_after, held_after FROM public.ledger_requests",
    )
    .fetch_all(pool)
    .await?;
    let stored: HashMap<Uuid, Reply> = stored
        .into_iter()
        .map(|(rid, status, balance, held)| {
            (
                rid,
                Reply {
                    status,
                    balance,
                    held,
                },
            )
        })
        .collect();
    for r in stored.values() {
        *report.statuses.entry(r.status.clone()).or_default() += 1;
    }

    let mut model = Model::default();
    let mut malformed_ids: Vec<(Uuid, Uuid, Malformed, Instant)> = Vec::new();
    // Ids that had a changed repeat: their reply lists may hold conflict replies.
    let mut conflicted: std::collections::HashSet<Uuid> = std::collections::HashSet::new();
    for log in logs {
        for rec in &log.records {
            report.operations += 1;
            if rec.attempts > 1 {
                report.retried_requests += 1;
            }
            match &rec.sent {
                Sent::New { rid, op } => {
                    report.new_ids += 1;
                    let expected = model.apply(*rid, op);
                    model.outcomes.insert(*rid, expected.clone());
                    check_reply(&mut report, rid, rec, &expected, stored.get(rid), false);
                }
                Sent::Repeat { rid, changed, .. } => {
                    let conflicted_before = conflicted.contains(rid);
                    if *changed {
                        conflicted.insert(*rid);
                        report.repeats_changed += 1;
                    } else {
                        report.repeats_same += 1;
                    }
                    let original = model.outcomes.get(rid).cloned();
                    let expected = if *changed {
                        Reply {
                            status: "request_id_conflict".into(),
                            balance: None,
                            held: None,
                        }
                    } else {
                        original.clone().unwrap_or(Reply {
                            status: "?".into(),
                            balance: None,
                            held: None,
                        })
                    };
                    check_reply(
                        &mut report,
                        rid,
                        rec,
                        &expected,
                        stored.get(rid),
                        *changed || conflicted_before,
                    );
                }
                Sent::Malformed {
                    rid,
                    chaos_id,
                    kind,
                } => {
                    report.malformed += 1;
                    malformed_ids.push((*rid, *chaos_id, *kind, rec.sent_at));
                    let (_, _, wants) = kind.entry(*rid, Uuid::nil());
                    if wants {
                        let expected = Reply {
                            status: "rejected".into(),
                            balance: None,
                            held: None,
                        };
                        if rec.gave_up {
                            report
                                .lost
                                .push(format!("{rid}: malformed {kind:?}: no reply"));
                        } else if rec.reply.as_ref().map(|r| r.status.as_str()) != Some("rejected")
                        {
                            report
                                .mismatches
                                .push(format!("{rid}: malformed {kind:?}: reply {:?}", rec.reply));
                        }
                        match stored.get(rid) {
                            Some(s) if s.status == expected.status => {}
                            other => report.mismatches.push(format!(
                                "{rid}: malformed {kind:?}: stored {other:?}, want rejected"
                            )),
                        }
                    }
                }
            }
        }
    }
    // Stored outcomes equal the model's (every id once: the primary key makes it at most once).
    for (rid, want) in &model.outcomes {
        match stored.get(rid) {
            None => report
                .lost
                .push(format!("{rid}: no stored outcome (model: {want:?})")),
            Some(got) if got != want => report
                .mismatches
                .push(format!("{rid}: stored {got:?}, model {want:?}")),
            Some(_) => {}
        }
    }
    let known: usize = model.outcomes.len()
        + malformed_ids
            .iter()
            .filter(|(rid, _, k, _)| k.entry(*rid, Uuid::nil()).2)
            .count();
    // The warm-up grant is the one stored outcome no producer sent.
    if stored.len() != known + 1 {
        report.mismatches.push(format!(
            "{} stored outcomes, {} request ids sent (+1 warm-up)",
            stored.len(),
            known
        ));
    }

    // Balances and held.
    let accounts: Vec<(Uuid, i64, i64)> =
        sqlx::query_as("SELECT user_id, balance, held FROM public.credit_accounts")
            .fetch_all(pool)
            .await?;
    let accounts: HashMap<Uuid, (i64, i64)> =
        accounts.into_iter().map(|(u, b, h)| (u, (b, h))).collect();
    for (user, a) in &model.accounts {
        if !a.exists {
            continue;
        }
        match accounts.get(user) {
            Some(&(b, h)) if (b, h) == (a.balance, a.held) => {}
            other => report.mismatches.push(format!(
                "account {user}: stored {other:?}, model ({}, {})",
                a.balance, a.held
            )),
        }
    }
    let model_accounts = model.accounts.values().filter(|a| a.exists).count();
    if accounts.len() != model_accounts + 1 {
        report.mismatches.push(format!(
            "{} accounts stored, model {} (+1 warm-up)",
            accounts.len(),
            model_accounts
        ));
    }

    // History rows, per user in order.
    let rows: Vec<(Uuid, Uuid, String, i64, i64, i64)> = sqlx::query_as(
        "SELECT user_id, request_id, kind, amount, balance_after, held_after
           FROM public.token_balance_history ORDER BY id",
    )
    .fetch_all(pool)
    .await?;
    let mut per_rid: HashMap<Uuid, u32> = HashMap::new();
    let mut got_history: HashMap<Uuid, Vec<HistoryRow>> = HashMap::new();
    for (user, rid, kind, amount, b, h) in rows {
        *per_rid.entry(rid).or_default() += 1;
        got_history
            .entry(user)
            .or_default()
            .push((kind, amount, b, h));
    }
    for (rid, n) in &per_rid {
        if *n > 1 {
            report.doubled.push(format!("{rid}: {n} history rows"));
        }
    }
    for (user, want) in &model.history {
        let got = got_history.get(user).cloned().unwrap_or_default();
        if &got != want {
            let at = got
                .iter()
                .zip(want)
                .position(|(g, w)| g != w)
                .unwrap_or(got.len().min(want.len()));
            report.mismatches.push(format!(
                "history of {user}: {} rows stored, model {}; first difference at row {at}: stored {:?}, model {:?}",
                got.len(),
                want.len(),
                got.get(at),
                want.get(at)
            ));
        }
    }

    // Every malformed entry is a dead letter with its reason.
    let dls: Vec<(Value, String)> =
        sqlx::query_as("SELECT fields, reason FROM public.dead_letters")
            .fetch_all(pool)
            .await?;
    report.dead_letters = dls.len() as u64;
    let mut by_chaos_id: HashMap<String, Vec<String>> = HashMap::new();
    for (fields, reason) in &dls {
        match chaos_id_of(fields) {
            Some(id) => by_chaos_id.entry(id).or_default().push(reason.clone()),
            None => report.dead_letters_valid += 1,
        }
    }
    for (rid, chaos_id, kind, sent_at) in &malformed_ids {
        let wiped = wipes
            .iter()
            .any(|w| *sent_at <= *w && w.duration_since(*sent_at) < Duration::from_secs(30));
        match by_chaos_id.get(&chaos_id.to_string()) {
            Some(reasons) if reasons.iter().all(|r| !r.trim().is_empty()) => {}
            Some(_) => report.mismatches.push(format!(
                "{rid}: malformed {kind:?}: dead letter without a reason"
            )),
            None if wiped && !kind.entry(*rid, Uuid::nil()).2 => report.lost_to_wipe += 1,
            None => report.lost.push(format!(
                "{rid}: malformed {kind:?} (chaos_id {chaos_id}): no dead letter"
            )),
        }
    }
    Ok(report)
}

/// The `chaos_id` field of a dead letter's stored fields (an object of field → value, or a
/// list of pairs).
fn chaos_id_of(fields: &Value) -> Option<String> {
    if let Some(v) = fields.get("chaos_id") {
        return v.as_str().map(str::to_string);
    }
    fields.as_array()?.iter().find_map(|pair| {
        let pair = pair.as_array()?;
        (pair.first()?.as_str()? == "chaos_id")
            .then(|| pair.get(1)?.as_str().map(str::to_string))?
    })
}

/// A reply a producer received is the stored outcome (or a conflict, for a repeat with
/// different fields), and the stored outcome is the model's. Reply lists are per request id,
/// so once an id was repeated with different fields (`conflict_possible`), a later pop may
/// return a reply left from another attempt: the stored outcome or a conflict are then both
/// legitimate; the one that does not answer this attempt is counted as stale.
fn check_reply(
    report: &mut Report,
    rid: &Uuid,
    rec: &Record,
    expected: &Reply,
    stored: Option<&Reply>,
    conflict_possible: bool,
) {
    let what = match &rec.sent {
        Sent::New { op, .. } => format!("new {op:?}"),
        Sent::Repeat { op, changed, .. } => format!("repeat (changed: {changed}) {op:?}"),
        Sent::Malformed { kind, .. } => format!("malformed {kind:?}"),
    };
    if rec.gave_up {
        report.lost.push(format!(
            "{rid} {what}: no reply after {} attempts",
            rec.attempts
        ));
        return;
    }
    let Some(got) = &rec.reply else {
        report
            .mismatches
            .push(format!("{rid} {what}: unreadable reply"));
        return;
    };
    if conflict_possible {
        if got == expected {
            return;
        }
        if got.status == "request_id_conflict" || Some(got) == stored {
            report.stale_replies += 1;
            return;
        }
        report
            .mismatches
            .push(format!("{rid} {what}: answered {got:?}, stored {stored:?}"));
        return;
    }
    if Some(got) != stored {
        report.mismatches.push(format!(
            "{rid} {what} ({} attempts): reply {got:?} but stored {stored:?}",
            rec.attempts
        ));
    } else if got != expected {
        report
            .mismatches
            .push(format!("{rid} {what}: reply {got:?}, model {expected:?}"));
    }
}
