//! The `detect_anomalies` job and the alert webhook.
//!
//! The rules, their findings and what a `block` finding does to the ledger live in
//! [`crate::ledger::anomalies`]; this job runs them (on its schedule, or when enqueued) and
//! hands each new finding to the alert webhook in the background.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use sqlx::PgPool;
use tokio::sync::mpsc;

use super::jobs::{MaintenanceError, parse_payload};
use crate::config::AlertsConfig;
use crate::ledger::anomalies::{AnomalyRow, AnomalyRule, Detector};
use crate::queue::{JobFuture, JobHandler};

/// Job type of the detection job.
pub const DETECT_ANOMALIES: &str = "detect_anomalies";

/// The `detect_anomalies` job. Reply: `{found: n}` (new findings stored by this run).
#[derive(Clone)]
pub struct DetectAnomalies {
    pool: PgPool,
    detector: Arc<Detector>,
    alerter: Alerter,
}

impl DetectAnomalies {
    pub fn new(pool: PgPool, rules: Vec<Arc<dyn AnomalyRule>>, alerter: Alerter) -> Self {
        Self {
            pool,
            detector: Arc::new(Detector::new(rules)),
            alerter,
        }
    }

    /// Runs every rule once, alerts on the findings that were new and returns them. A rule
    /// or a store that failed fails the run (retried) after the other findings were handled.
    pub async fn run(&self) -> Result<Vec<AnomalyRow>, MaintenanceError> {
        let detection = self.detector.run(&self.pool).await;
        for row in &detection.new {
            self.alerter.send(row);
        }
        if detection.failures.is_empty() {
            Ok(detection.new)
        } else {
            Err(MaintenanceError::Anomalies(detection.failures))
        }
    }
}

impl JobHandler for DetectAnomalies {
    fn job_type(&self) -> &'static str {
        DETECT_ANOMALIES
    }

    fn handle(&self, payload: serde_json::Value) -> JobFuture {
        let this = self.clone();
        Box::pin(async move {
            parse_payload(DETECT_ANOMALIES, payload)?;
            let found = this.run().await?;
            Ok(serde_json::json!({ "found": found.len() }))
        })
    }
}

/// Posts new findings to the alert webhook from a background task, so detection never waits
/// for (or fails because of) the receiver.
#[derive(Clone, Default)]
pub struct Alerter {
    tx: Option<mpsc::Sender<AnomalyRow>>,
}

impl Alerter {
    /// No webhook: findings are only stored and logged.
    pub fn disabled() -> Self {
        Self { tx: None }
    }

    /// Reads the webhook URL from the environment variable named in config; disabled when it
    /// is unset or empty, or not a valid http(s) URL (logged).
    pub fn from_config(cfg: &AlertsConfig) -> Self {
        let raw = std::env::var(&cfg.webhook_url_env).unwrap_or_default();
        if raw.trim().is_empty() {
            return Self::disabled();
        }
        match url::Url::parse(raw.trim()) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => Self::start(u, cfg),
            _ => {
                tracing::error!(
                    var = %cfg.webhook_url_env,
                    "alert webhook URL is not a valid http(s) URL; alerts disabled"
                );
                Self::disabled()
            }
        }
    }

    /// Starts the delivery task for `url`. Must run inside the tokio runtime.
    pub fn start(url: url::Url, cfg: &AlertsConfig) -> Self {
        let (tx, rx) = mpsc::channel(cfg.queue_capacity.max(1));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(cfg.timeout_secs))
            .build()
            .unwrap_or_default();
        tokio::spawn(deliver_loop(client, url, cfg.max_retries, rx));
        Self { tx: Some(tx) }
    }

    /// Queues `row` for delivery; drops it (counted, logged) when the queue is full.
    pub fn send(&self, row: &AnomalyRow) {
        let Some(tx) = &self.tx else { return };
        if let Err(e) = tx.try_send(row.clone()) {
            metrics::counter!("tokenwarden_anomaly_alerts_total", "outcome" => "dropped")
                .increment(1);
            tracing::warn!(id = row.id, error = %e, "alert queue full or closed; alert dropped (finding is stored)");
        }
    }
}

#[derive(Debug)]
struct AlertError {
    retryable: bool,
    retry_after: Option<Duration>,
    msg: String,
}

async fn deliver_loop(
    client: reqwest::Client,
    url: url::Url,
    max_retries: u32,
    mut rx: mpsc::Receiver<AnomalyRow>,
) {
    while let Some(row) = rx.recv().await {
        let body = serde_json::json!({ "event": "token_anomaly", "anomaly": row });
        let attempt = || async {
            let resp = client
                .post(url.clone())
                .json(&body)
                .send()
                .await
                .map_err(|e| AlertError {
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
            Err(AlertError {
                retryable: status.is_server_error() || status.as_u16() == 429,
                retry_after,
                msg: format!("webhook answered {status}"),
            })
        };
        let policy = ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(30))
            .with_max_times(max_retries as usize);
        let res = attempt
            .retry(policy)
            .when(|e: &AlertError| e.retryable)
            .adjust(|e: &AlertError, d| d.map(|d| e.retry_after.unwrap_or(d)))
            .await;
        match res {
            Ok(()) => {
                metrics::counter!("tokenwarden_anomaly_alerts_total", "outcome" => "delivered")
                    .increment(1);
            }
            Err(e) => {
                metrics::counter!("tokenwarden_anomaly_alerts_total", "outcome" => "failed")
                    .increment(1);
                tracing::error!(id = row.id, error = %e.msg, "alert webhook delivery failed");
            }
        }
    }
}
