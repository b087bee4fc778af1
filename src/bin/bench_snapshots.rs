//! Snapshot benchmark: a GoldRush crawl of N holders (default 1,000,000 = 1,000 pages of 1,000)
//! served by a local mock that generates `token_holders_v2` pages on the fly, stored end to end
//! in a fresh Postgres database through the same `SnapshotService` the worker uses.
//! Prints holders stored per second and peak RSS (VmHWM) of this process, which includes the
//! mock server.
//!
//! Environment: BENCH_HOLDERS (1000000), BENCH_RPS (client rate limit, 100000: the production
//! default of 4 req/s would make the crawl take 250 s and measure the limiter, not the code),
//! TOKENWARDEN_TEST_DATABASE_URL (admin URL, default postgres://postgres@127.0.0.1:5432/postgres).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use sqlx::postgres::PgPoolOptions;
use tokenwarden::snapshots::goldrush::{ApiKey, GoldRushClient};
use tokenwarden::snapshots::{SnapshotRequest, SnapshotService, SnapshotSource};

const TOKEN: &str = "0x7c58d971a5dabd46bc85e81fdae87b511431452e";
const BLOCK: u64 = 21_000_000;

#[derive(Clone)]
struct Mock {
    holders: u64,
}

/// One page in the real shape (envelope, pagination, every item field), generated on the fly.
async fn holders_page(
    State(m): State<Mock>,
    Path((_chain, token)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> impl IntoResponse {
    let size: u64 = q
        .get("page-size")
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let page: u64 = q
        .get("page-number")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let start = page * size;
    let end = (start + size).min(m.holders);
    let mut body = String::with_capacity(((end.saturating_sub(start)) as usize) * 420 + 512);
    body.push_str(
        r#"{"data":{"updated_at":"2024-04-05T10:09:24.387371090Z","chain_id":1,"chain_name":"eth-mainnet","items":["#,
    );
    for i in start..end {
        if i > start {
            body.push(',');
        }
        // Balances descending, as GoldRush orders them.
        let balance = 1_000_000_000_000_000_000u128 + u128::from(m.holders - i) * 1_000_003;
        let _ = write!(
            body,
            r#"{{"contract_decimals":18,"contract_name":"Bench","contract_ticker_symbol":"BNCH","contract_address":"{token}","supports_erc":["erc20"],"logo_url":"https://logos.covalenthq.com/tokens/1/{token}.png","address":"0x{i:040x}","balance":"{balance}","total_supply":"1000000000000000000000000000","block_height":{BLOCK}}}"#
        );
    }
    let _ = write!(
        body,
        r#"],"pagination":{{"has_more":{},"page_number":{page},"page_size":{size},"total_count":{}}}}},"error":false,"error_message":null,"error_code":null}}"#,
        end < m.holders,
        m.holders
    );
    (
        StatusCode::OK,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
}

fn proc_status_kb(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn replace_db_name(url: &str, db: &str) -> anyhow::Result<String> {
    let mut u = url::Url::parse(url)?;
    u.set_path(&format!("/{db}"));
    Ok(u.to_string())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let holders: u64 = std::env::var("BENCH_HOLDERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let rps: u32 = std::env::var("BENCH_RPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let admin_url = std::env::var("TOKENWARDEN_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string());

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route(
            "/v1/{chain}/tokens/{token}/token_holders_v2/",
            get(holders_page),
        )
        .with_state(Mock { holders });
    tokio::spawn(async move { axum::serve(listener, app).await });

    let db = format!("tw_bench_snapshots_{}", std::process::id());
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&admin_url)
        .await
        .with_context(|| {
            format!(
                "Postgres at {} (start it with `make services`)",
                tokenwarden::redact::redact_url(&admin_url)
            )
        })?;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {db}")))
        .execute(&admin)
        .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .execute(&admin)
        .await?;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&replace_db_name(&admin_url, &db)?)
        .await?;
    tokenwarden::infra::migrate(&pool).await?;

    let mut cfg = tokenwarden::config::Config::load_with_env(None, std::iter::empty())?.snapshots;
    cfg.goldrush_base_url = format!("http://{addr}");
    cfg.goldrush_requests_per_sec = rps;
    let client = GoldRushClient::new(&cfg, ApiKey::new("bench-key"))?;
    let service = SnapshotService::new(pool.clone(), Arc::new(client));
    let req = SnapshotRequest::new(None, SnapshotSource::GoldRush, "eth-mainnet", TOKEN, None)
        .map_err(anyhow::Error::msg)?;

    // Phase 1: fetch and validate every page without storing, to split the cost.
    let fetch_started = Instant::now();
    {
        let chain = tokenwarden::snapshots::chains::resolve("eth-mainnet", None)
            .map_err(anyhow::Error::msg)?;
        let probe = GoldRushClient::new(&cfg, ApiKey::new("bench-key"))?;
        let mut page = 0u32;
        loop {
            let p = probe
                .fetch_page(&chain, TOKEN, Some(BLOCK).filter(|_| page > 0), page)
                .await?;
            if !p.has_more {
                break;
            }
            page += 1;
        }
    }
    let fetch_secs = fetch_started.elapsed().as_secs_f64();

    // Phase 2: the real thing, end to end.
    let rss_before = proc_status_kb("VmRSS:").unwrap_or(0);
    let started = Instant::now();
    let outcome = service.create(&req).await?;
    let elapsed = started.elapsed();
    let peak_kb = proc_status_kb("VmHWM:").unwrap_or(0);
    anyhow::ensure!(
        outcome.holder_count == Some(holders as i64),
        "crawl did not store every holder: {outcome:?}"
    );
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM public.snapshot_holders WHERE snapshot_id = $1")
            .bind(outcome.snapshot_id)
            .fetch_one(&pool)
            .await?;
    pool.close().await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
    )))
    .execute(&admin)
    .await?;

    let secs = elapsed.as_secs_f64();
    let pages = holders.div_ceil(u64::from(cfg.goldrush_page_size));
    println!("snapshot crawl benchmark (GoldRush mock on {addr}, Postgres, one process)");
    println!(
        "  holders stored        {stored} ({pages} pages of {})",
        cfg.goldrush_page_size
    );
    println!("  status                {:?}", outcome.status);
    println!(
        "  client rate limit     {rps} req/s (raised from the production default 4 req/s; set BENCH_RPS)"
    );
    println!("  wall time             {secs:.2} s");
    println!(
        "  throughput            {:.0} holders/s   (target >= 100000)",
        stored as f64 / secs
    );
    println!("  pages/s               {:.1}", pages as f64 / secs);
    println!(
        "  fetch+parse only      {fetch_secs:.2} s ({:.0} holders/s; mock + HTTP + JSON + validation, nothing stored)",
        holders as f64 / fetch_secs
    );
    println!(
        "  RSS before crawl      {:.1} MB",
        rss_before as f64 / 1024.0
    );
    println!(
        "  peak RSS (VmHWM)      {:.1} MB   (target <= 150 MB; includes the in-process mock)",
        peak_kb as f64 / 1024.0
    );
    Ok(())
}
