//! The access monitor (the seed's TokenBalanceMonitor): turns the indexer's balance-change
//! announcements into grants and revocations, and publishes every change.
//!
//! - **One replica acts.** The monitor holds a Postgres session advisory lock on a dedicated
//!   connection (the same lease mechanism as the chain indexers, its own key) and runs every
//!   transition on that connection, so a replica that lost the lease cannot write. Standbys
//!   retry every 2 s; the lease dies with the leader's connection.
//! - **Announcements.** For each `{prefix}:balance_changes` message it calls
//!   `tw_access_on_balance_change` (SQL): the users owning the named holders are re-evaluated on
//!   every rule that names that token, in one transaction per rule, and each change is an
//!   `access_events` row. An announcement of a reorg undo (`reorg: true`) re-evaluates the same
//!   way, with cause `reorg`: the events of dropped blocks are not trusted, the index is read
//!   again. A rule change (`NOTIFY tw_access_rules`) re-checks that rule's candidates.
//! - **Publishing.** `access_events` is the outbox: the leader puts each unpublished row on the
//!   stream `{prefix}:access_changes` (`XADD MAXLEN ~`), marks it published, then hands it to
//!   the webhook (retried in the background, see [`crate::infra::webhook`]). It looks for
//!   unpublished rows after each change and every [`PUBLISH_POLL`], so events written by the
//!   re-check on another replica, or left by a crash, go out too. Delivery is at least once:
//!   consumers deduplicate by `id`.
//! - **Gaps.** Announcements sent while no replica leads, or while the subscription
//!   reconnects, are lost; the scheduled full re-check (`access_recheck`) is the backstop.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use secrecy::ExposeSecret;
use serde::Deserialize;
use tokio::sync::{Notify, watch};

use super::transitions::{AccessEvent, Cause, EventKind, TransitionStore};
use crate::app::AppContext;
use crate::chain::lease::Lease;
use crate::infra::webhook::{Delivery, Webhook, WebhookPolicy};

/// The monitor's advisory-lock key: a tag of its own in the high bits (the chain leases use
/// `0x7477 << 48 | chain_id`).
pub const LEASE_KEY: i64 = ((0x7461_u64 << 48) | 0x006d_6f6e) as i64;

/// How often the leader looks for unpublished events besides after each change.
pub const PUBLISH_POLL: Duration = Duration::from_secs(1);

/// How often the leader checks that its lease connection is alive.
const LEASE_CHECK: Duration = Duration::from_secs(2);

/// Events read per publishing round.
const PUBLISH_BATCH: i64 = 500;

/// The stream access changes are published on.
pub fn changes_stream(prefix: &str) -> String {
    format!("{prefix}:access_changes")
}

/// The indexer's announcement (`chain::notify`).
#[derive(Debug, Deserialize)]
struct Announcement {
    chain_id: u64,
    token: String,
    holders: Vec<String>,
    #[serde(default)]
    reorg: bool,
}

/// `NOTIFY tw_access_rules` payload.
#[derive(Debug, Deserialize)]
struct RuleChanged {
    creator_id: String,
    feature: String,
}

/// The running monitor. `leading` is true while this replica holds the lease and listens;
/// `processed` counts the announcements and rule changes it acted on (tests wait on both).
pub struct Monitor {
    pub leading: watch::Receiver<bool>,
    pub processed: watch::Receiver<u64>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts the monitor: it waits for the lease, then acts until shutdown.
pub fn spawn(ctx: &AppContext) -> Monitor {
    let (leading_tx, leading) = watch::channel(false);
    let (processed_tx, processed) = watch::channel(0u64);
    let task = tokio::spawn(run(ctx.clone(), leading_tx, processed_tx));
    Monitor {
        leading,
        processed,
        task,
    }
}

fn count_webhook(outcome: Delivery) {
    let counter = match outcome {
        Delivery::Delivered => {
            metrics::counter!("tokenwarden_access_webhook_total", "outcome" => "delivered")
        }
        Delivery::Failed => {
            metrics::counter!("tokenwarden_access_webhook_total", "outcome" => "failed")
        }
        Delivery::Dropped => {
            metrics::counter!("tokenwarden_access_webhook_total", "outcome" => "dropped")
        }
    };
    counter.increment(1);
}

/// Counts written transitions by kind and cause.
pub(crate) fn count_events(events: &[AccessEvent]) {
    for e in events {
        let kind = match e.kind {
            EventKind::Granted => "granted",
            EventKind::Revoked => "revoked",
        };
        metrics::counter!("tokenwarden_access_transitions_total",
            "kind" => kind, "cause" => e.cause.as_str())
        .increment(1);
    }
}

async fn run(ctx: AppContext, leading: watch::Sender<bool>, processed: watch::Sender<u64>) {
    let webhook = ctx.cfg.access.webhook().map(|url| {
        let alerts = &ctx.cfg.maintenance.alerts;
        let policy = WebhookPolicy {
            max_retries: alerts.max_retries,
            timeout: Duration::from_secs(alerts.timeout_secs),
            queue_capacity: alerts.queue_capacity,
        };
        Webhook::start(url, policy, "access webhook", count_webhook)
    });
    let publisher = Arc::new(Publisher {
        store: TransitionStore::new(ctx.pool.clone()),
        redis: ctx.redis.clone(),
        stream: changes_stream(&ctx.cfg.redis.prefix),
        maxlen: ctx.cfg.access.changes_stream_maxlen,
        webhook,
        wake: Notify::new(),
    });
    while !ctx.shutdown.is_cancelled() {
        let Some(lease) = Lease::acquire_key(
            ctx.cfg.database.url.expose_secret(),
            LEASE_KEY,
            "tokenwarden-access-monitor",
            "access monitor",
            &ctx.shutdown,
        )
        .await
        else {
            return;
        };
        metrics::gauge!("tokenwarden_access_monitor_leader").set(1.0);
        lead(&ctx, lease, &publisher, &leading, &processed).await;
        metrics::gauge!("tokenwarden_access_monitor_leader").set(0.0);
        leading.send_replace(false);
        if !ctx.shutdown.is_cancelled() {
            tokio::time::sleep(crate::chain::lease::RETRY).await;
        }
    }
}

/// Acts while the lease holds: returns on shutdown (releasing it), when the lease connection
/// died, or when a listener lost its connection (the caller takes the lease again).
async fn lead(
    ctx: &AppContext,
    mut lease: Lease,
    publisher: &Arc<Publisher>,
    leading: &watch::Sender<bool>,
    processed: &watch::Sender<u64>,
) {
    let store = TransitionStore::new(ctx.pool.clone());
    let batch = ctx.cfg.access.recheck_batch as usize;
    let channel = crate::chain::notify::channel(&ctx.cfg.redis.prefix);
    let client = match redis::Client::open(ctx.cfg.redis.url.expose_secret()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "access monitor: bad Redis URL");
            return;
        }
    };
    let mut pubsub = match client.get_async_pubsub().await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "access monitor cannot connect to Redis; retrying");
            return;
        }
    };
    if let Err(e) = pubsub.subscribe(&channel).await {
        tracing::warn!(error = %e, "access monitor cannot subscribe; retrying");
        return;
    }
    let mut rules = match sqlx::postgres::PgListener::connect_with(&ctx.pool).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "access monitor cannot listen for rule changes; retrying");
            return;
        }
    };
    if let Err(e) = rules.listen("tw_access_rules").await {
        tracing::warn!(error = %e, "access monitor cannot LISTEN tw_access_rules; retrying");
        return;
    }
    let publishing = tokio::spawn(publisher.clone().run(ctx.shutdown.clone()));
    let _stop_publishing = tokio_util::task::AbortOnDropHandle::new(publishing);
    leading.send_replace(true);
    tracing::info!("access monitor leads");
    let mut messages = pubsub.on_message();
    let mut check = tokio::time::interval(LEASE_CHECK);
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => {
                lease.release().await;
                return;
            }
            _ = check.tick() => {
                if !lease.alive().await {
                    tracing::warn!("access monitor lost its lease connection; re-acquiring");
                    return;
                }
            }
            msg = messages.next() => {
                let Some(msg) = msg else {
                    tracing::warn!("access monitor: balance-change subscription ended");
                    return;
                };
                let Ok(payload) = msg.get_payload::<String>() else { continue };
                match serde_json::from_str::<Announcement>(&payload) {
                    Ok(a) => on_announcement(&mut lease, &a, publisher).await,
                    Err(e) => tracing::warn!(error = %e, "access monitor: unreadable announcement"),
                }
                processed.send_modify(|n| *n += 1);
            }
            n = rules.recv() => {
                let n = match n {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!(error = %e, "access monitor: rule-change listener lost its connection");
                        return;
                    }
                };
                match serde_json::from_str::<RuleChanged>(n.payload()) {
                    Ok(r) => match store.recheck_rule(&r.creator_id, &r.feature, Cause::RuleChange, batch).await {
                        Ok(events) => {
                            count_events(&events);
                            if !events.is_empty() {
                                publisher.wake.notify_one();
                            }
                        }
                        Err(e) => tracing::error!(creator_id = r.creator_id, feature = r.feature,
                            error = %e, "access monitor cannot re-check a changed rule (the daily re-check will)"),
                    },
                    Err(e) => tracing::warn!(error = %e, "access monitor: unreadable rule-change notification"),
                }
                processed.send_modify(|n| *n += 1);
            }
        }
    }
}

async fn on_announcement(lease: &mut Lease, a: &Announcement, publisher: &Publisher) {
    if a.holders.is_empty() {
        return;
    }
    let cause = if a.reorg {
        Cause::Reorg
    } else {
        Cause::BalanceChange
    };
    match TransitionStore::on_balance_change(lease.conn(), a.chain_id, &a.token, &a.holders, cause)
        .await
    {
        Ok(events) => {
            count_events(&events);
            if !events.is_empty() {
                publisher.wake.notify_one();
            }
        }
        Err(e) => tracing::error!(
            chain_id = a.chain_id,
            token = a.token,
            error = %e,
            "access monitor cannot act on an announcement (the daily re-check will)"
        ),
    }
}

/// Puts unpublished `access_events` rows on the stream and the webhook.
struct Publisher {
    store: TransitionStore,
    redis: redis::aio::ConnectionManager,
    stream: String,
    maxlen: u64,
    webhook: Option<Webhook>,
    wake: Notify,
}

impl Publisher {
    async fn run(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            while let Ok(n) = self.publish_once().await {
                if n < PUBLISH_BATCH as usize {
                    break;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(PUBLISH_POLL) => {}
            }
        }
    }

    /// One round: returns how many events went out.
    async fn publish_once(&self) -> Result<usize, ()> {
        let events = self.store.unpublished(PUBLISH_BATCH).await.map_err(|e| {
            tracing::warn!(error = %e, "cannot read unpublished access events");
        })?;
        if events.is_empty() {
            return Ok(0);
        }
        let mut conn = self.redis.clone();
        let mut pipe = redis::pipe();
        let mut bodies = Vec::with_capacity(events.len());
        for e in &events {
            let body = serde_json::to_string(e).map_err(|err| {
                tracing::error!(id = e.id, error = %err, "cannot encode an access event");
            })?;
            pipe.cmd("XADD")
                .arg(&self.stream)
                .arg("MAXLEN")
                .arg("~")
                .arg(self.maxlen)
                .arg("*")
                .arg("id")
                .arg(e.id)
                .arg("event")
                .arg(&body)
                .ignore();
            bodies.push(e);
        }
        let sent: Result<(), redis::RedisError> = pipe.query_async(&mut conn).await;
        if let Err(e) = sent {
            tracing::warn!(error = %e, "cannot publish access events; retrying");
            return Err(());
        }
        let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
        if let Err(e) = self.store.mark_published(&ids).await {
            // They will be published again: consumers deduplicate by id.
            tracing::warn!(error = %e, "cannot mark access events published");
            return Err(());
        }
        if let Some(webhook) = &self.webhook {
            for e in bodies {
                webhook.send(serde_json::json!({ "event": "access_change", "change": e }));
            }
        }
        Ok(events.len())
    }
}
