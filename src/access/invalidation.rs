//! Keeps the decision cache honest in every replica: each replica listens to the indexer's
//! balance-change announcements (`{prefix}:balance_changes`, see `chain::notify`) and to rule
//! changes (`NOTIFY tw_access_rules`), and bumps the epochs of the users whose wallets changed
//! and of the rules that changed. Bumps are idempotent across replicas (any one suffices), so
//! every replica listening is redundancy, not a conflict. After a lost connection it
//! reconnects; announcements sent meanwhile are lost, which the cache TTLs bound.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::watch;

use super::cache::{DecisionCache, rule_key};
use super::wallets::WalletStore;
use crate::app::AppContext;

/// The announcement `chain::notify` publishes.
#[derive(Debug, Deserialize)]
struct BalanceChange {
    holders: Vec<String>,
    block: u64,
}

/// `NOTIFY tw_access_rules` payload.
#[derive(Debug, Deserialize)]
struct RuleChanged {
    creator_id: String,
    feature: String,
}

/// The running listeners; `processed` counts the announcements acted on and `balance_block`
/// is the highest block of a balance change acted on (tests wait on them).
pub struct Invalidator {
    pub processed: watch::Receiver<u64>,
    pub balance_block: watch::Receiver<u64>,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Starts the two listeners.
pub fn spawn(ctx: &AppContext, cache: Arc<DecisionCache>) -> Invalidator {
    let (tx, rx) = watch::channel(0u64);
    let tx = Arc::new(tx);
    let (block_tx, block_rx) = watch::channel(0u64);
    let balances = tokio::spawn(listen_balances(
        ctx.clone(),
        cache.clone(),
        tx.clone(),
        block_tx,
    ));
    let rules = tokio::spawn(listen_rules(ctx.clone(), cache, tx));
    Invalidator {
        processed: rx,
        balance_block: block_rx,
        tasks: vec![balances, rules],
    }
}

const RETRY: Duration = Duration::from_secs(1);

async fn listen_balances(
    ctx: AppContext,
    cache: Arc<DecisionCache>,
    done: Arc<watch::Sender<u64>>,
    block: watch::Sender<u64>,
) {
    use secrecy::ExposeSecret;
    let channel = crate::chain::notify::channel(&ctx.cfg.redis.prefix);
    let wallets = WalletStore::new(ctx.pool.clone());
    while !ctx.shutdown.is_cancelled() {
        let client = match redis::Client::open(ctx.cfg.redis.url.expose_secret()) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "balance-change listener: bad Redis URL");
                return;
            }
        };
        let mut pubsub = match client.get_async_pubsub().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "balance-change listener cannot connect; retrying");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        if let Err(e) = pubsub.subscribe(&channel).await {
            tracing::warn!(error = %e, "balance-change listener cannot subscribe; retrying");
            tokio::time::sleep(RETRY).await;
            continue;
        }
        let mut messages = pubsub.on_message();
        loop {
            let msg = tokio::select! {
                _ = ctx.shutdown.cancelled() => return,
                m = messages.next() => m,
            };
            let Some(msg) = msg else { break };
            let Ok(payload) = msg.get_payload::<String>() else {
                continue;
            };
            let Ok(change) = serde_json::from_str::<BalanceChange>(&payload) else {
                tracing::warn!(payload, "unreadable balance-change announcement");
                continue;
            };
            match wallets.users_of(&change.holders).await {
                Ok(users) => {
                    if let Err(e) = cache.evict_users(&users).await {
                        tracing::warn!(error = %e, "cannot evict decisions after a balance change");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot map changed holders to users"),
            }
            block.send_modify(|b| *b = (*b).max(change.block));
            done.send_modify(|n| *n += 1);
        }
        tracing::warn!("balance-change subscription ended; reconnecting");
        tokio::time::sleep(RETRY).await;
    }
}

async fn listen_rules(ctx: AppContext, cache: Arc<DecisionCache>, done: Arc<watch::Sender<u64>>) {
    while !ctx.shutdown.is_cancelled() {
        let mut listener = match sqlx::postgres::PgListener::connect_with(&ctx.pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "rule-change listener cannot connect; retrying");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        if let Err(e) = listener.listen("tw_access_rules").await {
            tracing::warn!(error = %e, "rule-change listener cannot LISTEN; retrying");
            tokio::time::sleep(RETRY).await;
            continue;
        }
        loop {
            let n = tokio::select! {
                _ = ctx.shutdown.cancelled() => return,
                n = listener.recv() => n,
            };
            let n = match n {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "rule-change listener lost its connection");
                    break;
                }
            };
            match serde_json::from_str::<RuleChanged>(n.payload()) {
                Ok(r) => {
                    if let Err(e) = cache.evict_rule(&rule_key(&r.creator_id, &r.feature)).await {
                        tracing::warn!(error = %e, "cannot evict decisions after a rule change");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "unreadable rule-change notification"),
            }
            done.send_modify(|n| *n += 1);
        }
        tokio::time::sleep(RETRY).await;
    }
}
