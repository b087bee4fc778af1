//! The connections to the stores: what every worker pool does with a Postgres connection that
//! went away while it sat idle in the pool.

mod common;

use std::time::Duration;

use common::{DbKind, TestEnv, wait_until};
use tokenwarden::infra::PING_IF_IDLE_FOR;

/// `connect_postgres` skips sqlx's ping before every statement and pings only a connection that
/// has been idle for more than [`PING_IF_IDLE_FOR`]. A connection whose backend ended while it was idle (a
/// Postgres restart, an idle-session timeout, an operator's `pg_terminate_backend`) must then be
/// found dead and replaced before the next statement runs on it, not fail that statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_ended_while_idle_is_replaced_before_the_next_statement() {
    for kind in DbKind::ALL {
        let env = TestEnv::on(kind).await;
        let mut db = env.config().database;
        // One connection, so the next statement is offered the connection whose backend ended.
        db.max_connections = 1;
        let pool = tokenwarden::infra::connect_postgres(&db)
            .await
            .expect("the worker's pool opens");
        let first: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&pool)
            .await
            .expect("first statement");
        let idle_since = tokio::time::Instant::now();

        let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(first)
            .fetch_one(&env.pool)
            .await
            .expect("terminate the pooled connection's backend");
        assert!(ended, "{kind:?}: backend {first} was not terminated");
        wait_until(
            Duration::from_secs(10),
            "the terminated backend to leave pg_stat_activity",
            || async {
                let gone: bool = sqlx::query_scalar(
                    "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)",
                )
                .bind(first)
                .fetch_one(&env.pool)
                .await
                .ok()?;
                gone.then_some(())
            },
        )
        .await;
        // Not a synchronisation: the rule under test is about time, so the connection must
        // really have been idle for longer than the pool's threshold (the margin covers the
        // ping sqlx runs when the connection goes back, after which its idle time starts).
        tokio::time::sleep_until(idle_since + PING_IF_IDLE_FOR + Duration::from_millis(250)).await;

        let next: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&pool)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{kind:?}: the statement after the idle connection's backend ended failed: {e}"
                )
            });
        assert_ne!(next, first, "{kind:?}: a new backend answers");
        pool.close().await;
    }
}
