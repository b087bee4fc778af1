//! Shared test harness: real Postgres, real Redis, real anvil.
//!
//! Each test gets its own database (created from scratch and migrated) and its own Redis key
//! prefix, so tests run in parallel without seeing each other. A missing service fails the test
//! with a message saying what to start; nothing is skipped.
#![allow(dead_code)]

pub mod anvil;
pub mod chain;
pub mod indexed;
pub mod ops;
pub mod supabase;

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokenwarden::config::Config;

/// Admin connection used to create per-test databases.
pub fn admin_url() -> String {
    std::env::var("TOKENWARDEN_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// A one-connection pool on the admin database. Parallel tests can momentarily use every
/// connection the server allows (SQLSTATE 53300, "too many clients"): that is waited out with a
/// deadline; an unreachable server fails at once with what to start.
async fn admin_pool() -> PgPool {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&admin_url())
            .await;
        match r {
            Ok(pool) => return pool,
            Err(sqlx::Error::Database(e))
                if e.code().as_deref() == Some("53300") && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!(
                "PostgreSQL is not reachable at {} ({e}). Start it with `make services` \
                 or set TOKENWARDEN_TEST_DATABASE_URL.",
                admin_url()
            ),
        }
    }
}

/// Redis used by tests.
pub fn redis_url() -> String {
    std::env::var("TOKENWARDEN_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
}

/// The repository root (where Cargo.toml is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Path of the built `tokenwarden` binary, for tests that run worker processes.
pub fn tokenwarden_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tokenwarden"))
}

/// The two kinds of database users deploy to. Every SQL, RLS and privilege test runs on both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbKind {
    /// A plain PostgreSQL database; migrations run as a superuser.
    Plain,
    /// A database shaped like a Supabase project ([`supabase`]); migrations run as its
    /// non-superuser owner, into a `public` schema whose default privileges grant everything
    /// to the API roles.
    Supabase,
}

impl DbKind {
    pub const ALL: [DbKind; 2] = [DbKind::Plain, DbKind::Supabase];
}

/// One test's isolated environment: a fresh migrated database and a unique Redis prefix.
pub struct TestEnv {
    pub kind: DbKind,
    pub db_name: String,
    pub db_url: String,
    pub pool: PgPool,
    pub redis_url: String,
    pub redis_prefix: String,
}

impl TestEnv {
    /// Creates and migrates a fresh plain database; panics with instructions if a service is down.
    pub async fn new() -> TestEnv {
        Self::on(DbKind::Plain).await
    }

    /// Like [`TestEnv::new`], on the given kind of database. `db_url` and `pool` connect as the
    /// migration owner (the superuser on a plain database, `supabase::OWNER` on a
    /// Supabase-shaped one): what `tokenwarden run` would use.
    pub async fn on(kind: DbKind) -> TestEnv {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let db_name = format!("tw_test_{}", &id[..16]);
        let admin = admin_pool().await;
        supabase::ensure_roles(&admin).await;
        let create = match kind {
            DbKind::Plain => format!("CREATE DATABASE {db_name}"),
            DbKind::Supabase => supabase::create_database_sql(&db_name),
        };
        sqlx::query(sqlx::AssertSqlSafe(create))
            .execute(&admin)
            .await
            .expect("create test database");
        admin.close().await;
        let superuser_url = replace_db_name(&admin_url(), &db_name);
        let db_url = match kind {
            DbKind::Plain => superuser_url.clone(),
            DbKind::Supabase => {
                let su = PgPoolOptions::new()
                    .max_connections(1)
                    .connect(&superuser_url)
                    .await
                    .expect("connect to the new database as superuser");
                supabase::prepare_database(&su, &db_name).await;
                su.close().await;
                replace_user(&superuser_url, supabase::OWNER)
            }
        };
        let pool = PgPoolOptions::new()
            .max_connections(20)
            .acquire_timeout(Duration::from_secs(30))
            .connect(&db_url)
            .await
            .expect("connect to test database");
        tokenwarden::infra::migrate(&pool)
            .await
            .expect("migrations apply to a fresh database");

        let redis_url = redis_url();
        let client = redis::Client::open(redis_url.as_str()).expect("redis url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "Redis is not reachable at {redis_url} ({e}). Start it with `make services` \
                     or set TOKENWARDEN_TEST_REDIS_URL."
                )
            });
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .expect("redis PING");
        TestEnv {
            kind,
            db_name,
            db_url,
            pool,
            redis_url,
            redis_prefix: format!("twtest:{}", &id[..16]),
        }
    }

    /// A pool on this test's database logged in as `role` (a login role such as
    /// `supabase::MEMBERS`' members).
    pub async fn pool_as(&self, role: &str) -> PgPool {
        PgPoolOptions::new()
            .max_connections(2)
            .connect(&replace_user(&self.db_url, role))
            .await
            .unwrap_or_else(|e| panic!("connect as {role}: {e}"))
    }

    /// A configuration pointing at this test's database and Redis prefix.
    pub fn config(&self) -> Config {
        Config::load_with_env(None, self.env_vars()).expect("test config is valid")
    }

    /// Environment variables that point a child `tokenwarden` process at this test's stores.
    pub fn env_vars(&self) -> Vec<(String, String)> {
        vec![
            ("TOKENWARDEN__DATABASE__URL".into(), self.db_url.clone()),
            ("TOKENWARDEN__REDIS__URL".into(), self.redis_url.clone()),
            (
                "TOKENWARDEN__REDIS__PREFIX".into(),
                self.redis_prefix.clone(),
            ),
            ("TOKENWARDEN__HTTP__ENABLED".into(), "false".into()),
        ]
    }

    /// A fresh multiplexed Redis connection without a response timeout: tests BLPOP replies,
    /// and redis-rs's default 500 ms response timeout would fail them on a loaded machine.
    /// Every wait in a test has its own deadline instead.
    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        let cfg = redis::AsyncConnectionConfig::new().set_response_timeout(None);
        redis::Client::open(self.redis_url.as_str())
            .expect("redis url")
            .get_multiplexed_async_connection_with_config(&cfg)
            .await
            .expect("redis connection")
    }
}

/// What a `tokenwarden` CLI command printed and whether it succeeded.
#[derive(Debug)]
pub struct CliOutput {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    /// Both streams, for assertions on a message wherever the command printed it.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    /// Whether it succeeded, and what it printed on stdout (its answer; logs go to stderr).
    pub fn status_and_stdout(self) -> (bool, String) {
        (self.ok, self.stdout)
    }
}

/// Actions a test takes on its environment: one implementation each, shared by every test file.
impl TestEnv {
    /// Runs `tokenwarden <args>` against this environment to completion.
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        let out = std::process::Command::new(tokenwarden_bin())
            .args(args)
            .envs(self.env_vars())
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run tokenwarden");
        CliOutput {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Starts a `tokenwarden run` worker process with extra environment variables.
    pub fn spawn_worker(&self, extra_env: &[(&str, &str)]) -> Child {
        Child::spawn(self, &["run"], extra_env)
    }

    /// An in-process [`AppContext`](tokenwarden::app::AppContext) with extra configuration
    /// variables (`TOKENWARDEN__…`).
    pub async fn app_context(&self, extra: &[(&str, &str)]) -> tokenwarden::app::AppContext {
        let mut vars = self.env_vars();
        vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let cfg = Config::load_with_env(None, vars).expect("test config");
        tokenwarden::app::AppContext::connect(cfg)
            .await
            .expect("connect")
    }

    /// Grants `amount` to `user` through the SQL door (a fresh request id); panics unless granted.
    pub async fn grant(&self, user: uuid::Uuid, amount: i64) {
        let r: serde_json::Value =
            sqlx::query_scalar("SELECT public.add_tokens($1, $2, 'test grant', '{}'::jsonb, $3)")
                .bind(user)
                .bind(amount)
                .bind(uuid::Uuid::new_v4())
                .fetch_one(&self.pool)
                .await
                .expect("add_tokens");
        assert_eq!(r["success"], true, "{r}");
    }

    /// One consumption through the SQL door (a fresh request id); returns its status.
    pub async fn consume(&self, user: uuid::Uuid, amount: i64) -> String {
        let r: serde_json::Value = sqlx::query_scalar(
            "SELECT public.consume_tokens_atomic($1, $2, $3, 'ai_call', '{}'::jsonb)",
        )
        .bind(uuid::Uuid::new_v4())
        .bind(user)
        .bind(amount)
        .fetch_one(&self.pool)
        .await
        .expect("consume_tokens_atomic");
        r["status"].as_str().expect("status").to_string()
    }

    /// `(balance, held)` of `user`'s account; `None` when the user has none.
    pub async fn account(&self, user: uuid::Uuid) -> Option<(i64, i64)> {
        sqlx::query_as("SELECT balance, held FROM public.credit_accounts WHERE user_id = $1")
            .bind(user)
            .fetch_optional(&self.pool)
            .await
            .expect("read account")
    }

    /// The stream of `job_type` under this test's prefix.
    pub fn stream(&self, job_type: &str) -> String {
        format!("{}:jobs:{job_type}", self.redis_prefix)
    }

    /// The reply list of `request_id` under this test's prefix.
    pub fn reply_key(&self, request_id: &str) -> String {
        format!("{}:reply:{request_id}", self.redis_prefix)
    }
}

/// Writes `dir/chain.toml`: chain indexing on, one chain 31337 named "down" served by
/// `rpc_url` (nothing need answer there), no token; returns its path for `--config`.
pub fn chain_config_file(dir: &std::path::Path, rpc_url: &str) -> String {
    let file = dir.join("chain.toml");
    std::fs::write(
        &file,
        format!(
            "[chain]\nenabled = true\n\n[[chain.chains]]\nchain_id = 31337\nname = \"down\"\n\
             rpc_urls = [\"{rpc_url}\"]\n"
        ),
    )
    .expect("write config");
    file.to_string_lossy().into_owned()
}

/// XADDs one entry with `fields` to `stream`; returns its id.
pub async fn xadd(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    fields: &[(&str, &str)],
) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    cmd.query_async(conn).await.expect("XADD")
}

/// XADDs one entry whose stream name, field names and values are any bytes (hostile input);
/// returns its id.
pub async fn xadd_bytes(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &[u8],
    fields: &[(&[u8], &[u8])],
) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    cmd.query_async(conn).await.expect("XADD")
}

/// Entries of the consumer group `tokenwarden` on `stream` that are delivered and not
/// acknowledged (0 when the stream or group does not exist).
pub async fn pending_count(conn: &mut redis::aio::MultiplexedConnection, stream: &[u8]) -> i64 {
    let v: redis::RedisResult<redis::Value> = redis::cmd("XPENDING")
        .arg(stream)
        .arg("tokenwarden")
        .query_async(conn)
        .await;
    match v {
        Ok(redis::Value::Array(a)) => match a.first() {
            Some(redis::Value::Int(n)) => *n,
            _ => 0,
        },
        _ => 0,
    }
}

/// The consumer names of group `tokenwarden` on `stream`.
pub async fn consumers(conn: &mut redis::aio::MultiplexedConnection, stream: &[u8]) -> Vec<String> {
    let info: redis::RedisResult<redis::streams::StreamInfoConsumersReply> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(stream)
        .arg("tokenwarden")
        .query_async(conn)
        .await;
    info.map(|i| i.consumers.into_iter().map(|c| c.name).collect())
        .unwrap_or_default()
}

/// BLPOPs the reply at `key` (60 s: the first reply also waits for a freshly spawned worker to
/// start, which takes seconds on a loaded 2-core machine) and parses it.
pub async fn blpop(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> serde_json::Value {
    let (_, v): (String, String) = redis::cmd("BLPOP")
        .arg(key)
        .arg(60)
        .query_async(conn)
        .await
        .expect("reply within 60 s");
    serde_json::from_str(&v).expect("reply is JSON")
}

impl Drop for TestEnv {
    /// Drops this test's database and deletes its Redis prefix (`{prefix}:*`), so repeated runs
    /// fill neither the disk nor Redis. Runs on its own thread and runtime because the test's
    /// runtime may already be shutting down; `WITH (FORCE)` ends the pool's and any child
    /// worker's connections. A failure here only leaves the database for `make
    /// clean-test-dbs` (run by `make test`) or the keys behind, so it is not a test failure.
    fn drop(&mut self) {
        let db = self.db_name.clone();
        let redis_url = self.redis_url.clone();
        let prefix = self.redis_prefix.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(admin) = PgPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect(&admin_url())
                    .await
                else {
                    return;
                };
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
                )))
                .execute(&admin)
                .await;
                admin.close().await;
                delete_prefix(&redis_url, &prefix).await;
            });
        })
        .join();
    }
}

/// Deletes every key under `{prefix}:` (SCAN, then DEL in chunks); best effort.
async fn delete_prefix(redis_url: &str, prefix: &str) {
    let Ok(client) = redis::Client::open(redis_url) else {
        return;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let mut cursor: u64 = 0;
    loop {
        let Ok((next, keys)): redis::RedisResult<(u64, Vec<Vec<u8>>)> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
        else {
            return;
        };
        if !keys.is_empty() {
            let _: redis::RedisResult<i64> =
                redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

/// A transaction acting as API role `role` (`SET LOCAL ROLE`), signed in as `sub` when given
/// (the JWT claims PostgREST would set, read by `auth.uid()`).
pub async fn begin_as(
    pool: &PgPool,
    role: &str,
    sub: Option<uuid::Uuid>,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = pool.begin().await.unwrap();
    if let Some(sub) = sub {
        let claims = serde_json::json!({"sub": sub, "role": role}).to_string();
        sqlx::query("SELECT set_config('request.jwt.claims', $1, true)")
            .bind(claims)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    sqlx::query(sqlx::AssertSqlSafe(format!("SET LOCAL ROLE {role}")))
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}

/// Replaces the user name in a Postgres URL (trust authentication: no password).
pub fn replace_user(url: &str, user: &str) -> String {
    let mut u = url::Url::parse(url).expect("valid postgres url");
    u.set_username(user).expect("postgres url takes a user");
    u.to_string()
}

/// Replaces the database name in a Postgres URL.
pub fn replace_db_name(url: &str, db: &str) -> String {
    let mut u = url::Url::parse(url).expect("valid postgres url");
    u.set_path(&format!("/{db}"));
    u.to_string()
}

/// Polls `cond` until it returns `Some`, or panics after `timeout` with `what` in the message.
/// Tests wait on conditions, never on fixed sleeps.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until a session of this test's database whose `application_name` is LIKE `app`
/// waits on a lock (`pg_stat_activity.wait_event_type = 'Lock'`): how a test knows that the
/// call it raced against an open transaction is blocked by it.
pub async fn wait_for_lock_waiter(pool: &sqlx::PgPool, app: &str, timeout: Duration, what: &str) {
    wait_until(timeout, what, || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name LIKE $1 AND wait_event_type = 'Lock'",
        )
        .bind(app)
        .fetch_one(pool)
        .await
        .ok()
        .filter(|n| *n > 0)
    })
    .await;
}

/// A `tokenwarden` child process that is killed when dropped.
pub struct Child(pub std::process::Child);

impl Child {
    /// Starts `tokenwarden <args>` with the test environment.
    pub fn spawn(env: &TestEnv, args: &[&str], extra_env: &[(&str, &str)]) -> Child {
        let mut cmd = std::process::Command::new(tokenwarden_bin());
        cmd.args(args);
        for (k, v) in env.env_vars() {
            cmd.env(k, v);
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        cmd.stdin(std::process::Stdio::null());
        Child(cmd.spawn().expect("spawn tokenwarden"))
    }

    /// Sends a signal (e.g. "KILL", "TERM") to the process.
    pub fn signal(&self, sig: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.0.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Waits for exit with a deadline; panics if the process is still running after it.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                panic!("process did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
