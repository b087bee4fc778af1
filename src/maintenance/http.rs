//! The operations HTTP endpoint: `/healthz` (the process answers), `/readyz` (its dependencies
//! answer and the indexer keeps up), `/metrics` (Prometheus text format).
//!
//! Listens on `http.listen`. Stays up through the shutdown grace period so the drain can be
//! watched; `/readyz` answers 503 from the moment shutdown starts, so load balancers and
//! orchestrators stop routing to a replica that is leaving.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;

use crate::app::AppContext;
use crate::chain::store::ChainStore;

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone)]
struct OpsState {
    ctx: AppContext,
    metrics: PrometheusHandle,
    http: reqwest::Client,
}

/// Installs the metrics recorder, starts the gauge sampler and, when `http.enabled`, binds
/// `http.listen` and serves until `ctx.shutdown` is cancelled plus the grace period. Binding
/// happens before this returns, so a taken port fails start-up with a clear error.
pub async fn spawn(ctx: AppContext) -> Result<tokio::task::JoinHandle<()>, HttpError> {
    let metrics = super::metrics::install();
    super::metrics::spawn_sampler(ctx.clone(), metrics.clone());
    if !ctx.cfg.http.enabled {
        return Ok(tokio::spawn(async {}));
    }
    let addr = ctx.cfg.http.listen_addr()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })?;
    let timeout = Duration::from_millis(ctx.cfg.maintenance.readiness.check_timeout_ms);
    let state = OpsState {
        http: reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .unwrap_or_default(),
        ctx: ctx.clone(),
        metrics,
    };
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(state);
    tracing::info!(%addr, "operations endpoint listening");
    let grace = Duration::from_secs(ctx.cfg.worker.shutdown_grace_secs);
    let shutdown = ctx.shutdown.clone();
    Ok(tokio::spawn(async move {
        let stop = async move {
            shutdown.cancelled().await;
            // Keep answering (readyz = 503) while the rest of the process drains.
            tokio::time::sleep(grace).await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!(error = %e, "operations endpoint failed");
        }
    }))
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn metrics_text(State(s): State<OpsState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

/// One dependency check in the `/readyz` body.
#[derive(Debug, Serialize)]
struct Check {
    name: String,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

impl Check {
    fn ok(name: impl Into<String>, detail: Option<String>) -> Self {
        Self {
            name: name.into(),
            ok: true,
            detail,
        }
    }
    fn fail(name: impl Into<String>, detail: String) -> Self {
        Self {
            name: name.into(),
            ok: false,
            detail: Some(detail),
        }
    }
}

async fn readyz(State(s): State<OpsState>) -> impl IntoResponse {
    let timeout = Duration::from_millis(s.ctx.cfg.maintenance.readiness.check_timeout_ms);
    let mut checks = Vec::new();
    if s.ctx.shutdown.is_cancelled() {
        checks.push(Check::fail("shutdown", "shutting down".into()));
    }
    checks.push(check_postgres(&s, timeout).await);
    checks.push(check_redis(&s, timeout).await);
    // Self-reports: e.g. a queue stream whose consumer keeps failing is not being served.
    for (name, part) in s.ctx.readiness.snapshot() {
        checks.push(if part.ok {
            Check::ok(name, Some(part.detail))
        } else {
            Check::fail(name, part.detail)
        });
    }
    if s.ctx.cfg.chain.enabled {
        for chain in &s.ctx.cfg.chain.chains {
            checks.push(check_chain(&s, chain, timeout).await);
        }
    }
    let ready = checks.iter().all(|c| c.ok);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(serde_json::json!({ "ready": ready, "checks": checks })),
    )
}

async fn check_postgres(s: &OpsState, timeout: Duration) -> Check {
    let q = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&s.ctx.pool);
    match tokio::time::timeout(timeout, q).await {
        Ok(Ok(_)) => Check::ok("postgres", None),
        Ok(Err(e)) => Check::fail("postgres", e.to_string()),
        Err(_) => Check::fail("postgres", format!("no answer within {timeout:?}")),
    }
}

async fn check_redis(s: &OpsState, timeout: Duration) -> Check {
    let mut conn = s.ctx.redis.clone();
    let ping = async move { redis::cmd("PING").query_async::<String>(&mut conn).await };
    match tokio::time::timeout(timeout, ping).await {
        Ok(Ok(_)) => Check::ok("redis", None),
        Ok(Err(e)) => Check::fail("redis", e.to_string()),
        Err(_) => Check::fail("redis", format!("no answer within {timeout:?}")),
    }
}

/// The chain's head from the first RPC URL that answers `eth_blockNumber`, compared with the
/// indexer checkpoint.
async fn check_chain(s: &OpsState, chain: &crate::config::ChainConfig, timeout: Duration) -> Check {
    let name = format!("chain:{}", chain.chain_id);
    let mut last_err = String::from("no RPC URL configured");
    let mut head = None;
    for url in &chain.rpc_urls {
        match eth_block_number(&s.http, url).await {
            Ok(h) => {
                head = Some(h);
                break;
            }
            Err(e) => last_err = format!("{}: {e}", crate::redact::redact_endpoint(url)),
        }
    }
    let Some(head) = head else {
        return Check::fail(name, format!("RPC unreachable: {last_err}"));
    };
    // A chain without tracked tokens is not indexed (see `chain::spawn_indexers`): RPC only.
    if s.ctx.cfg.chain.tokens_of(chain.chain_id).is_empty() {
        return Check::ok(name, Some(format!("head {head}, no tokens indexed")));
    }
    let store = match ChainStore::new(chain.chain_id) {
        Ok(store) => store,
        Err(e) => return Check::fail(name, e.to_string()),
    };
    let q = store.checkpoint(&s.ctx.pool);
    let checkpoint = match tokio::time::timeout(timeout, q).await {
        Ok(Ok(c)) => c.map(|c| c.number),
        // The store names what failed ("read checkpoint: …").
        Ok(Err(e)) => return Check::fail(name, e.to_string()),
        Err(_) => return Check::fail(name, format!("checkpoint query over {timeout:?}")),
    };
    let max_lag = s.ctx.cfg.maintenance.readiness.max_indexer_lag_blocks;
    let Some(checkpoint) = checkpoint else {
        return Check::fail(name, format!("head {head}, indexer has no checkpoint yet"));
    };
    // The indexer deliberately stays `confirmations` blocks behind the head.
    let target = head.saturating_sub(chain.confirmations);
    let (ok, detail) = assess_lag(target, checkpoint, max_lag);
    if ok {
        Check::ok(name, Some(detail))
    } else {
        Check::fail(name, detail)
    }
}

/// Whether an indexer at `checkpoint` keeps up with `target` (the head minus the chain's
/// confirmations), and the figures for the body.
fn assess_lag(target: u64, checkpoint: u64, max_lag: u64) -> (bool, String) {
    let lag = target.saturating_sub(checkpoint);
    (
        lag <= max_lag,
        format!("target {target}, checkpoint {checkpoint}, lag {lag} (max {max_lag})"),
    )
}

/// Why the readiness probe got no head from one RPC URL. reqwest errors lose their URL
/// (`without_url`): it may carry an API key, and the caller names the endpoint redacted.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("request failed: {0}")]
    Request(#[source] reqwest::Error),
    #[error("HTTP {0}")]
    Status(reqwest::StatusCode),
    #[error("not JSON: {0}")]
    NotJson(#[source] reqwest::Error),
    #[error("no result in reply: {0}")]
    NoResult(serde_json::Value),
    #[error("bad block number {hex:?}: {source}")]
    BadNumber {
        hex: String,
        #[source]
        source: std::num::ParseIntError,
    },
}

/// Plain JSON-RPC `eth_blockNumber` (hand-written: one request with the shared client and
/// timeout, rather than building an alloy provider per probe).
async fn eth_block_number(http: &reqwest::Client, url: &str) -> Result<u64, ProbeError> {
    let resp = http
        .post(url)
        .json(&serde_json::json!({
            "jsonrpc": "2.0", "id": 1, "method": "eth_blockNumber", "params": []
        }))
        .send()
        .await
        .map_err(|e| ProbeError::Request(e.without_url()))?;
    if !resp.status().is_success() {
        return Err(ProbeError::Status(resp.status()));
    }
    let body: serde_json::Value = resp
        .json()
        .await
        .map_err(|e| ProbeError::NotJson(e.without_url()))?;
    let Some(hex) = body.get("result").and_then(|r| r.as_str()) else {
        return Err(ProbeError::NoResult(body));
    };
    u64::from_str_radix(hex.trim_start_matches("0x"), 16).map_err(|source| ProbeError::BadNumber {
        hex: hex.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::assess_lag;

    #[test]
    fn lag_at_the_threshold_is_ready_above_it_is_not() {
        assert!(assess_lag(110, 10, 100).0);
        assert!(!assess_lag(111, 10, 100).0);
        // A checkpoint ahead of a lagging RPC node is no lag.
        assert!(assess_lag(5, 10, 0).0);
        assert!(assess_lag(111, 10, 100).1.contains("lag 101"));
    }
}
