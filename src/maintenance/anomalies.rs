//! The `detect_anomalies` job and the alert webhook.
//!
//! The rules, their findings and what a `block` finding does to the ledger live in
//! [`crate::ledger::anomalies`]; this job runs them (on its schedule, or when enqueued) and
//! hands each new finding to the alert webhook in the background.

use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use sqlx::PgPool;

use super::jobs::{MaintenanceError, parse_payload};
use crate::config::AlertsConfig;
use crate::infra::webhook::{Delivery, Webhook, WebhookPolicy};
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
/// for (or fails because of) the receiver. Delivery and retries: [`crate::infra::webhook`].
#[derive(Clone, Default)]
pub struct Alerter {
    webhook: Option<Webhook>,
}

fn count_alert(outcome: Delivery) {
    let counter = match outcome {
        Delivery::Delivered => {
            metrics::counter!("tokenwarden_anomaly_alerts_total", "outcome" => "delivered")
        }
        Delivery::Failed => {
            metrics::counter!("tokenwarden_anomaly_alerts_total", "outcome" => "failed")
        }
        Delivery::Dropped => {
            metrics::counter!("tokenwarden_anomaly_alerts_total", "outcome" => "dropped")
        }
    };
    counter.increment(1);
}

impl Alerter {
    /// No webhook: findings are only stored and logged.
    pub fn disabled() -> Self {
        Self { webhook: None }
    }

    /// Reads the webhook URL from the environment variable named in config; disabled when it
    /// is unset or empty, or not a valid http(s) URL (logged).
    pub fn from_config(cfg: &AlertsConfig) -> Self {
        let raw = SecretString::from(std::env::var(&cfg.webhook_url_env).unwrap_or_default());
        match crate::config::parse_webhook_url(&raw) {
            Ok(Some(u)) => Self::start(u, cfg),
            Ok(None) => Self::disabled(),
            Err(why) => {
                tracing::error!(
                    var = %cfg.webhook_url_env,
                    "alert webhook URL is {why}; alerts disabled"
                );
                Self::disabled()
            }
        }
    }

    /// Starts the delivery task for `url`. Must run inside the tokio runtime.
    pub fn start(url: url::Url, cfg: &AlertsConfig) -> Self {
        let policy = WebhookPolicy {
            max_retries: cfg.max_retries,
            timeout: Duration::from_secs(cfg.timeout_secs),
            queue_capacity: cfg.queue_capacity,
        };
        Self {
            webhook: Some(Webhook::start(url, policy, "alert webhook", count_alert)),
        }
    }

    /// Queues `row` for delivery; drops it (counted, logged) when the queue is full.
    pub fn send(&self, row: &AnomalyRow) {
        let Some(webhook) = &self.webhook else { return };
        webhook.send(serde_json::json!({ "event": "token_anomaly", "anomaly": row }));
    }
}
