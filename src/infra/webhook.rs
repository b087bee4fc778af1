//! JSON webhooks delivered from a background task with one retry policy: network errors, 5xx
//! and 429 are retried with jittered exponential backoff (200 ms to 30 s, `max_retries` times),
//! honouring `Retry-After`; any other answer fails at once. The anomaly alerts and the access
//! changes both post through it, so their receivers see the same behaviour.
//!
//! Webhook URLs of chat servers carry a secret: the URL is held as a [`SecretString`] and never
//! appears in a log or an error (reqwest errors are stripped of it).

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::mpsc;

/// How one delivery ended, for the caller's own metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Delivered,
    /// Every attempt failed (or the answer was not retryable).
    Failed,
    /// The queue was full or closed: never attempted.
    Dropped,
}

/// Retry and queue bounds of one webhook.
#[derive(Debug, Clone, Copy)]
pub struct WebhookPolicy {
    pub max_retries: u32,
    pub timeout: Duration,
    /// Bodies waiting for delivery; beyond it new ones are dropped (the caller keeps its data).
    pub queue_capacity: usize,
}

/// Counts one delivery outcome (each user of a webhook has its own metric).
pub type OnOutcome = fn(Delivery);

/// A webhook with its delivery task.
#[derive(Clone)]
pub struct Webhook {
    tx: mpsc::Sender<serde_json::Value>,
    on_outcome: OnOutcome,
    what: &'static str,
}

#[derive(Debug)]
struct PostError {
    retryable: bool,
    retry_after: Option<Duration>,
    msg: String,
}

impl Webhook {
    /// Starts the delivery task posting to `url`. Must run inside the tokio runtime. `what`
    /// names the webhook in logs ("alert webhook").
    pub fn start(
        url: url::Url,
        policy: WebhookPolicy,
        what: &'static str,
        on_outcome: OnOutcome,
    ) -> Self {
        let (tx, rx) = mpsc::channel(policy.queue_capacity.max(1));
        let client = reqwest::Client::builder()
            .timeout(policy.timeout)
            .build()
            .unwrap_or_default();
        tokio::spawn(deliver_loop(client, url, policy, what, on_outcome, rx));
        Self {
            tx,
            on_outcome,
            what,
        }
    }

    /// Queues `body`; drops it (counted, logged) when the queue is full. Never waits.
    pub fn send(&self, body: serde_json::Value) {
        if let Err(e) = self.tx.try_send(body) {
            (self.on_outcome)(Delivery::Dropped);
            tracing::warn!(what = self.what, error = %e, "webhook queue full or closed; body dropped");
        }
    }
}

async fn deliver_loop(
    client: reqwest::Client,
    url: url::Url,
    policy: WebhookPolicy,
    what: &'static str,
    on_outcome: OnOutcome,
    mut rx: mpsc::Receiver<serde_json::Value>,
) {
    let url = SecretString::from(url.to_string());
    while let Some(body) = rx.recv().await {
        let outcome = match post(&client, &url, &body, policy.max_retries).await {
            Ok(()) => Delivery::Delivered,
            Err(e) => {
                tracing::error!(what, error = %e.msg, "webhook delivery failed");
                Delivery::Failed
            }
        };
        on_outcome(outcome);
    }
}

async fn post(
    client: &reqwest::Client,
    url: &SecretString,
    body: &serde_json::Value,
    max_retries: u32,
) -> Result<(), PostError> {
    let attempt = || async {
        let resp = client
            .post(url.expose_secret())
            .json(body)
            .send()
            .await
            .map_err(|e| PostError {
                retryable: true,
                retry_after: None,
                msg: format!("request failed: {}", e.without_url()),
            })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        Err(PostError {
            retryable: status.is_server_error() || status.as_u16() == 429,
            retry_after,
            msg: format!("webhook answered {status}"),
        })
    };
    let backoff = ExponentialBuilder::default()
        .with_jitter()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(30))
        .with_max_times(max_retries as usize);
    attempt
        .retry(backoff)
        .when(|e: &PostError| e.retryable)
        .adjust(|e: &PostError, d| d.map(|d| e.retry_after.unwrap_or(d)))
        .await
}
