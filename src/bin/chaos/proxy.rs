//! The chain chaos run's fault proxy: a JSON-RPC endpoint on 127.0.0.1 between the worker and
//! anvil that injects, at random, what real providers do: 429 with `Retry-After`, requests that
//! hang past the client's timeout, connections closed without a reply, bodies cut short, and a
//! lagging node (a window during which the head is older: `eth_blockNumber`,
//! `eth_getBlockByNumber("latest")` answer the old head and newer blocks are `null`).
//! WebSocket upgrades (`newHeads`) are passed through to anvil and some sessions are cut.
//!
//! Hand-written over TCP on purpose: the faults live below HTTP (a body shorter than its
//! `Content-Length`, a socket closed mid-exchange, an upgrade passed through byte for byte),
//! which axum and reqwest hide. Only what alloy's HTTP client sends is understood: HTTP/1.1
//! requests with a `Content-Length` body, kept alive.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy injected, by kind.
#[derive(Default)]
pub struct Counts {
    pub requests: AtomicU64,
    pub rate_limited: AtomicU64,
    pub hangs: AtomicU64,
    pub dropped: AtomicU64,
    pub truncated: AtomicU64,
    pub lag_windows: AtomicU64,
    pub lagged_answers: AtomicU64,
    pub deepest_lag: AtomicU64,
    pub ws_sessions: AtomicU64,
    pub ws_cut: AtomicU64,
}

/// How often and how hard the proxy misbehaves.
#[derive(Clone, Copy, Debug)]
pub struct FaultPlan {
    /// Share of HTTP requests that get a fault (429, hang, drop or truncation).
    pub rate: f64,
    /// How long a hang lasts before the socket is closed (longer than the client's timeout).
    pub hang: Duration,
    /// Deepest lag of the lagging node, in blocks.
    pub max_lag: u64,
}

struct Lag {
    head: u64,
    until: Instant,
}

struct State {
    upstream: String,
    upstream_addr: SocketAddr,
    client: reqwest::Client,
    rng: Mutex<StdRng>,
    plan: FaultPlan,
    lag: Mutex<Option<Lag>>,
    counts: Arc<Counts>,
}

/// A running proxy; its tasks end when the process does.
pub struct FaultProxy {
    pub url: String,
    pub ws_url: String,
    pub counts: Arc<Counts>,
}

enum Fault {
    RateLimit(u64),
    Hang,
    Drop,
    /// Cut the body; `true`: the header still announces the full length.
    Truncate(bool),
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to anvil at `upstream` (http://host:port).
    pub async fn start(upstream: &str, plan: FaultPlan, seed: u64) -> Result<FaultProxy> {
        let upstream_addr: SocketAddr = upstream.trim_start_matches("http://").parse()?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let counts = Arc::new(Counts::default());
        let state = Arc::new(State {
            upstream: upstream.to_string(),
            upstream_addr,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            plan,
            lag: Mutex::new(None),
            counts: counts.clone(),
        });
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let st = st.clone();
                tokio::spawn(async move { serve(st, sock).await });
            }
        });
        let st = state.clone();
        tokio::spawn(async move { lag_windows(st).await });
        Ok(FaultProxy {
            url: format!("http://{addr}"),
            ws_url: format!("ws://{addr}"),
            counts,
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Every 3–10 s, a 1–4 s window in which the node lags 1..=max_lag blocks behind anvil.
async fn lag_windows(st: Arc<State>) {
    loop {
        let (pause, len, depth) = {
            let mut r = lock(&st.rng);
            (
                r.random_range(3_000..10_000),
                r.random_range(1_000..4_000),
                r.random_range(1..=st.plan.max_lag.max(1)),
            )
        };
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let Ok(head) = upstream_head(&st).await else {
            continue;
        };
        let lagged = head.saturating_sub(depth);
        st.counts.lag_windows.fetch_add(1, Ordering::Relaxed);
        st.counts
            .deepest_lag
            .fetch_max(head - lagged, Ordering::Relaxed);
        *lock(&st.lag) = Some(Lag {
            head: lagged,
            until: Instant::now() + Duration::from_millis(len),
        });
    }
}

async fn upstream_head(st: &State) -> Result<u64> {
    let v: Value = st
        .client
        .post(&st.upstream)
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "eth_blockNumber", "params": []}))
        .send()
        .await?
        .json()
        .await?;
    hex_u64(&v["result"]).ok_or_else(|| anyhow::anyhow!("eth_blockNumber answered {v}"))
}

fn hex_u64(v: &Value) -> Option<u64> {
    u64::from_str_radix(v.as_str()?.trim_start_matches("0x"), 16).ok()
}

/// One client connection: HTTP/1.1 requests in a loop, or a WebSocket passed through.
async fn serve(st: Arc<State>, mut sock: TcpStream) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let Some(head_end) = read_head(&mut sock, &mut buf).await else {
            return;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        if head.contains("upgrade: websocket") {
            websocket(&st, sock, buf).await;
            return;
        }
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        while buf.len() < head_end + len {
            let mut chunk = [0u8; 16 * 1024];
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf[head_end..head_end + len].to_vec();
        buf.drain(..head_end + len);
        st.counts.requests.fetch_add(1, Ordering::Relaxed);
        if !answer(&st, &mut sock, &body).await {
            return;
        }
    }
}

/// Reads until the end of an HTTP head; returns its length (with the blank line).
async fn read_head(sock: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(i + 4);
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let mut chunk = [0u8; 16 * 1024];
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn pick_fault(st: &State) -> Option<Fault> {
    let mut r = lock(&st.rng);
    if !r.random_bool(st.plan.rate) {
        return None;
    }
    let roll: f64 = r.random();
    Some(if roll < 0.35 {
        Fault::RateLimit(r.random_range(0..=1))
    } else if roll < 0.5 {
        Fault::Hang
    } else if roll < 0.75 {
        Fault::Drop
    } else {
        Fault::Truncate(r.random_bool(0.5))
    })
}

/// Answers one request; false when the connection must be closed.
async fn answer(st: &State, sock: &mut TcpStream, body: &[u8]) -> bool {
    match pick_fault(st) {
        Some(Fault::RateLimit(after)) => {
            st.counts.rate_limited.fetch_add(1, Ordering::Relaxed);
            let head = format!("retry-after: {after}\r\n");
            return write_response(sock, 429, &head, b"rate limited", None).await;
        }
        Some(Fault::Hang) => {
            st.counts.hangs.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(st.plan.hang).await;
            return false;
        }
        Some(Fault::Drop) => {
            st.counts.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        Some(Fault::Truncate(full_length)) => {
            let Some(reply) = forward(st, body).await else {
                return false;
            };
            st.counts.truncated.fetch_add(1, Ordering::Relaxed);
            let cut = reply.len() / 2;
            if full_length {
                // The header promises the whole body; the socket closes half-way.
                let _ = write_response(sock, 200, "", &reply[..cut], Some(reply.len())).await;
                return false;
            }
            return write_response(sock, 200, "", &reply[..cut], None).await;
        }
        None => {}
    }
    let reply = match lagged(st, body) {
        Lagged::Answer(v) => {
            st.counts.lagged_answers.fetch_add(1, Ordering::Relaxed);
            v.to_string().into_bytes()
        }
        Lagged::Rewritten(b) => {
            st.counts.lagged_answers.fetch_add(1, Ordering::Relaxed);
            match forward(st, &b).await {
                Some(r) => r,
                None => return false,
            }
        }
        Lagged::No => match forward(st, body).await {
            Some(r) => r,
            None => return false,
        },
    };
    write_response(sock, 200, "", &reply, None).await
}

enum Lagged {
    No,
    /// The lagging node answers by itself.
    Answer(Value),
    /// The request, rewritten to the lagging node's head.
    Rewritten(Vec<u8>),
}

/// What a node `lag` blocks behind answers: its own head for `eth_blockNumber` and
/// `eth_getBlockByNumber("latest")`, `null` for a block it does not have yet.
fn lagged(st: &State, body: &[u8]) -> Lagged {
    let head = {
        let mut lag = lock(&st.lag);
        match lag.as_ref() {
            Some(l) if l.until > Instant::now() => l.head,
            Some(_) => {
                *lag = None;
                return Lagged::No;
            }
            None => return Lagged::No,
        }
    };
    let Ok(mut req) = serde_json::from_slice::<Value>(body) else {
        return Lagged::No;
    };
    let id = req["id"].clone();
    match req["method"].as_str() {
        Some("eth_blockNumber") => {
            Lagged::Answer(json!({"jsonrpc": "2.0", "id": id, "result": format!("{head:#x}")}))
        }
        Some("eth_getBlockByNumber") => match req["params"][0].as_str() {
            Some("latest") => {
                req["params"][0] = json!(format!("{head:#x}"));
                Lagged::Rewritten(req.to_string().into_bytes())
            }
            Some(n) if hex_u64(&json!(n)).is_some_and(|n| n > head) => {
                Lagged::Answer(json!({"jsonrpc": "2.0", "id": id, "result": null}))
            }
            _ => Lagged::No,
        },
        _ => Lagged::No,
    }
}

async fn forward(st: &State, body: &[u8]) -> Option<Vec<u8>> {
    let resp = st
        .client
        .post(&st.upstream)
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .await
        .ok()?;
    resp.bytes().await.ok().map(|b| b.to_vec())
}

async fn write_response(
    sock: &mut TcpStream,
    status: u16,
    extra_headers: &str,
    body: &[u8],
    announced_len: Option<usize>,
) -> bool {
    let reason = if status == 200 {
        "OK"
    } else {
        "Too Many Requests"
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra_headers}\r\n",
        announced_len.unwrap_or(body.len())
    );
    sock.write_all(head.as_bytes()).await.is_ok()
        && sock.write_all(body).await.is_ok()
        && sock.flush().await.is_ok()
}

/// Passes a WebSocket session through to anvil byte for byte; about half the sessions are cut
/// after 2–15 s (the subscriber must reconnect and lose no block).
async fn websocket(st: &State, mut client: TcpStream, head: Vec<u8>) {
    st.counts.ws_sessions.fetch_add(1, Ordering::Relaxed);
    let Ok(mut upstream) = TcpStream::connect(st.upstream_addr).await else {
        return;
    };
    if upstream.write_all(&head).await.is_err() {
        return;
    }
    let life = {
        let mut r = lock(&st.rng);
        r.random_bool(0.5)
            .then(|| Duration::from_millis(r.random_range(2_000..15_000)))
    };
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    match life {
        Some(life) => {
            if tokio::time::timeout(life, copy).await.is_err() {
                st.counts.ws_cut.fetch_add(1, Ordering::Relaxed);
            }
        }
        None => {
            let _ = copy.await;
        }
    }
}
