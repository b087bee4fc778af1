//! Secrets never print: not in `Debug` of the configuration, not in the worker's logs, not in
//! `/readyz` or `/metrics`, not in connection errors.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::ops::{free_port, get};
use common::{TestEnv, wait_until};
use tokenwarden::config::Config;

const DB_PASSWORD: &str = "DbPassw0rdNeverShown";
const REDIS_PASSWORD: &str = "RedisPassw0rdNeverShown";
const RPC_KEY: &str = "RpcKeyNeverShown";

fn assert_clean(what: &str, text: &str) {
    for secret in [DB_PASSWORD, REDIS_PASSWORD, RPC_KEY] {
        assert!(
            !text.contains(secret),
            "{what} shows a secret ({secret}):\n{text}"
        );
    }
}

#[test]
fn debug_of_the_configuration_shows_no_secret() {
    let cfg = Config::load_with_env(
        None,
        [
            (
                "TOKENWARDEN__DATABASE__URL".to_string(),
                format!("postgres://app:{DB_PASSWORD}@db.example:5432/app"),
            ),
            (
                "TOKENWARDEN__REDIS__URL".to_string(),
                format!("redis://:{REDIS_PASSWORD}@cache.example:6379"),
            ),
        ],
    )
    .expect("valid configuration");
    assert_clean("Debug of Config", &format!("{cfg:?}"));
    assert_clean("Debug of Config (pretty)", &format!("{cfg:#?}"));
    assert!(cfg.database.display_url().contains("db.example"));
    assert_clean("display_url", &cfg.database.display_url());
    assert_clean("display_url", &cfg.redis.display_url());
}

#[test]
fn a_connection_error_names_the_host_but_not_the_password() {
    let port = free_port();
    let out = Command::new(common::tokenwarden_bin())
        .arg("migrate")
        .env(
            "TOKENWARDEN__DATABASE__URL",
            format!("postgres://app:{DB_PASSWORD}@127.0.0.1:{port}/app"),
        )
        .env("TOKENWARDEN__DATABASE__ACQUIRE_TIMEOUT_SECS", "2")
        .stdin(Stdio::null())
        .output()
        .expect("run tokenwarden migrate");
    assert!(!out.status.success(), "migrate against a closed port fails");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    assert_clean("migrate's error", &text);
}

/// A worker whose database URL carries a password and whose chain RPC URL carries an API key
/// runs, answers `/readyz` and `/metrics`, and stops; none of it shows either secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_logs_readyz_and_metrics_show_no_secret() {
    let env = TestEnv::new().await;
    let port = free_port();
    let dead_rpc = free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = common::chain_config_file(
        dir.path(),
        &format!("http://127.0.0.1:{dead_rpc}/v2/{RPC_KEY}"),
    );
    // Local Postgres trusts 127.0.0.1, so the password is carried but not needed.
    let mut url = url::Url::parse(&env.db_url).expect("db url");
    url.set_password(Some(DB_PASSWORD)).expect("password");
    let log = dir.path().join("worker.log");
    let mut cmd = Command::new(common::tokenwarden_bin());
    cmd.args(["--config", &file, "run"]);
    for (k, v) in env.env_vars() {
        cmd.env(k, v);
    }
    cmd.env("TOKENWARDEN__DATABASE__URL", url.as_str())
        .env("TOKENWARDEN__HTTP__ENABLED", "true")
        .env("TOKENWARDEN__HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .env("TOKENWARDEN__TELEMETRY__LEVEL", "debug")
        .env("TOKENWARDEN__QUEUE__SHUTDOWN_GRACE_SECS", "5")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.path().join("out.log")).expect("log file"))
        .stderr(std::fs::File::create(&log).expect("log file"));
    let mut worker = common::Child(cmd.spawn().expect("spawn worker"));
    let ready = wait_until(Duration::from_secs(30), "a readyz answer", || async {
        get(port, "/readyz").await
    })
    .await;
    assert!(ready.1.contains("chain:31337"), "{}", ready.1);
    assert_clean("/readyz", &ready.1);
    let metrics = get(port, "/metrics").await.expect("/metrics answers");
    assert_clean("/metrics", &metrics.1);
    worker.signal("TERM");
    assert!(worker.wait_exit(Duration::from_secs(30)).success());
    let logs = std::fs::read_to_string(&log).expect("read the worker's log");
    assert!(!logs.is_empty(), "the worker logged something");
    assert_clean("the worker's log", &logs);
}
