//! What the chaos and soak binaries share: their own throw-away Postgres and Redis servers, and
//! readings of processes and the machine. Kept out of the library: only these run-time tools
//! start servers. Each binary uses a part of this module, hence `allow(dead_code)`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use redis::aio::MultiplexedConnection;

pub mod anvil;
pub mod chart;

/// Options every run-time tool takes: which worker binary, where Postgres's tools are, and
/// whether to keep the temp dir.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// The `tokenwarden` binary (default: next to this binary).
    #[arg(long)]
    pub worker_bin: Option<PathBuf>,
    /// Directory of initdb / pg_ctl / postgres.
    #[arg(long, default_value = "/usr/lib/postgresql/15/bin")]
    pub pg_bin_dir: PathBuf,
    /// Keep the temp directory (data, logs) instead of deleting it.
    #[arg(long)]
    pub keep: bool,
}

impl RunArgs {
    pub fn worker_bin(&self) -> Result<PathBuf> {
        match &self.worker_bin {
            Some(b) => Ok(b.clone()),
            None => Ok(std::env::current_exe()?
                .parent()
                .context("the binary has a directory")?
                .join("tokenwarden")),
        }
    }
}

/// Where the server writes its log (the soak run reads checkpoints and autovacuum runs from it).
impl Postgres {
    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

// Own Postgres and Redis

/// A throw-away Postgres cluster in the run's temp dir, on a free port (run as the `postgres`
/// user when this process is root: initdb refuses root).
pub struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    as_postgres: bool,
    log: PathBuf,
}

impl Postgres {
    /// `extra` is appended to the server configuration (one `key = value` per line).
    pub fn init(bin: &Path, dir: &Path, extra: &str) -> Result<Postgres> {
        let data = dir.join("pg");
        std::fs::create_dir_all(&data)?;
        let as_postgres = is_root();
        if as_postgres {
            run_cmd(Command::new("chown").arg("-R").arg("postgres").arg(dir))?;
        }
        let pg = Postgres {
            bin: bin.to_path_buf(),
            data,
            port: free_port()?,
            as_postgres,
            log: dir.join("postgres.log"),
        };
        let mut initdb = pg.cmd("initdb");
        initdb.arg("-D").arg(&pg.data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        run_cmd(&mut initdb).context("initdb")?;
        let conf = format!(
            "port = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nfsync = on\nsynchronous_commit = on\nmax_connections = 100\nlog_min_messages = warning\n{extra}\n",
            pg.port,
            dir.display()
        );
        let path = pg.data.join("postgresql.auto.conf");
        std::fs::write(&path, conf)?;
        if as_postgres {
            run_cmd(Command::new("chown").arg("postgres").arg(&path))?;
        }
        Ok(pg)
    }

    fn cmd(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn start(&mut self) -> Result<()> {
        let mut c = self.cmd("pg_ctl");
        c.arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", "60", "start"]);
        run_cmd(&mut c).context("pg_ctl start")
    }

    /// Fast shutdown: open transactions are rolled back, connections cut.
    pub fn stop_fast(&mut self) -> Result<()> {
        let mut c = self.cmd("pg_ctl");
        c.arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w", "-t", "60", "stop"]);
        run_cmd(&mut c).context("pg_ctl stop -m fast")
    }

    pub fn stop(&mut self) {
        let mut c = self.cmd("pg_ctl");
        c.arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"]);
        let _ = c.stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
}

/// A `redis-server` child process with AOF on, on a free port, data in the run's temp dir.
pub struct RedisServer {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    pub fn new(dir: &Path) -> Result<RedisServer> {
        let dir = dir.join("redis");
        std::fs::create_dir_all(&dir)?;
        Ok(RedisServer {
            dir,
            port: free_port()?,
            child: None,
        })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn start(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("redis.log"))?;
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start redis-server (apt-get install redis-server)")?;
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            if let Ok(client) = redis::Client::open(self.url())
                && let Ok(mut c) = client.get_connection()
                && redis::cmd("PING").query::<String>(&mut c).is_ok()
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "redis-server on port {} did not answer within 30 s",
            self.port
        )
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Deletes the AOF (and any RDB): the next start is empty, as after a restart of a Redis
    /// without persistence.
    pub fn wipe(&self) -> Result<()> {
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if path.is_dir() && name == "appendonlydir" {
                std::fs::remove_dir_all(&path)?;
            } else if name.ends_with(".aof") || name.ends_with(".rdb") {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(())
    }

    pub fn stop(&mut self) {
        self.kill9();
    }
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub fn run_cmd(c: &mut Command) -> Result<()> {
    let out = c.output().with_context(|| format!("cannot run {c:?}"))?;
    if !out.status.success() {
        bail!(
            "{c:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Stops workers the way an orchestrator does: SIGTERM to each, then waits for them until
/// `grace` has passed and SIGKILLs whichever is left. It blocks its thread (polling every
/// 50 ms) so that it can run in `Drop` too; async callers run it with
/// `tokio::task::block_in_place` or accept the pause at their end.
pub fn terminate(children: &mut [&mut Child], grace: Duration) {
    for c in children.iter() {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
    }
    let until = Instant::now() + grace;
    for c in children.iter_mut() {
        while Instant::now() < until && matches!(c.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Peak resident set size (VmHWM) of a running process, in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmHWM:")
}

/// Current resident set size (VmRSS) of a running process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmRSS:")
}

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

pub async fn redis_conn(url: &str) -> redis::RedisResult<MultiplexedConnection> {
    let cfg = redis::AsyncConnectionConfig::new()
        .set_response_timeout(None)
        .set_connection_timeout(Some(Duration::from_secs(2)));
    redis::Client::open(url)?
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
}

/// The machine's load averages over 1, 5 and 15 minutes, as `/proc/loadavg` gives them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Every key matching `pattern` (best effort: what was found before an error). SCAN, 500 keys
/// a call, not KEYS: the Redis is shared, and KEYS holds every other client while it walks the
/// whole keyspace (0.7 s after a bench_access run).
pub async fn scan_keys(conn: &mut MultiplexedConnection, pattern: &str) -> Vec<String> {
    let mut cursor: u64 = 0;
    let mut out = Vec::new();
    loop {
        let Ok((next, keys)): redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(500)
            .query_async(conn)
            .await
        else {
            break;
        };
        out.extend(keys);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    out.sort();
    out.dedup();
    out
}

/// A bench's clean-up, shared by the benches that create a `tw_bench_*` database and a Redis
/// prefix: deletes `{prefix}:*` and, unless `keep_db`, drops the database. Best effort: a bench
/// that failed half-way still removes what it can.
pub async fn drop_bench_state(
    redis: Option<MultiplexedConnection>,
    prefix: &str,
    admin_url: &str,
    db_name: &str,
    keep_db: bool,
) {
    if let Some(mut conn) = redis {
        let keys = scan_keys(&mut conn, &format!("{prefix}:*")).await;
        for chunk in keys.chunks(1000) {
            let _: redis::RedisResult<()> = redis::AsyncCommands::del(&mut conn, chunk).await;
        }
    }
    if keep_db {
        println!("kept database {db_name}");
        return;
    }
    if let Ok(admin) = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(admin_url)
        .await
    {
        // db_name is generated by the bench from hex digits, so it is safe to splice.
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"
        )))
        .execute(&admin)
        .await;
    }
}

/// The open-loop schedule of a latency phase: `total` ticks, the i-th due at
/// `start + i × interval`, each delivered with its due time by a dedicated thread that sleeps
/// until it. Why not `tokio::time::sleep_until` in the sender: Tokio's timer has a granularity of
/// 1 ms, so such a sender fires up to 1 ms late, and since latency is measured from the due time
/// (a stalled system must not hide its queue by slowing the sender down), that lateness would
/// count as the system's. `std::thread::sleep` wakes within tens of microseconds here.
pub fn open_loop_schedule(
    start: tokio::time::Instant,
    interval: Duration,
    total: u64,
) -> tokio::sync::mpsc::UnboundedReceiver<(u64, tokio::time::Instant)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let start = start.into_std();
    std::thread::spawn(move || {
        for i in 0..total {
            let due = start + interval * i as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if tx.send((i, tokio::time::Instant::from_std(due))).is_err() {
                return;
            }
        }
    });
    rx
}

/// A bench's fresh database `tw_bench_<12 hex digits>` next to `admin_url`, migrated, with a
/// pool of `max_connections`; `id` (the same 12 digits) also names the bench's Redis prefix.
/// Removed by [`drop_bench_state`].
pub struct BenchDb {
    pub id: String,
    pub name: String,
    pub url: String,
    pub pool: sqlx::PgPool,
}

impl BenchDb {
    pub async fn create(admin_url: &str, max_connections: u32) -> Result<BenchDb> {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let name = format!("tw_bench_{id}");
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(admin_url)
            .await
            .with_context(|| {
                format!(
                    "Postgres not reachable at {} (start it with `make services`)",
                    tokenwarden::redact::redact_url(admin_url)
                )
            })?;
        // The name is made here of hex digits, so it is safe to splice.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await?;
        admin.close().await;
        let mut url = url::Url::parse(admin_url)?;
        url.set_path(&format!("/{name}"));
        let url = url.to_string();
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(30))
            .connect(&url)
            .await?;
        tokenwarden::infra::migrate(&pool).await?;
        Ok(BenchDb {
            id,
            name,
            url,
            pool,
        })
    }
}
