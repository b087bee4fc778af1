//! Scheduled maintenance (lock cleanup, anomaly detection, pruning), the scheduler that runs each
//! tick once across replicas, and the operations HTTP endpoint (`/healthz`, `/readyz`,
//! `/metrics`).
//!
//! The three maintenance jobs are ordinary [`JobHandler`]s: the queue serves them from their
//! streams (`tokenwarden enqueue cleanup_locks {}`), and the [`scheduler`] calls the very same
//! handlers in-process for each cron tick it claims.

pub mod anomalies;
pub mod cli;
pub mod http;
pub mod jobs;
pub mod metrics;
pub mod scheduler;

use std::str::FromStr;
use std::sync::Arc;

use serde::Deserialize;

use crate::config::ConfigError;
use crate::queue::JobHandler;
use crate::worker::AppContext;

pub use anomalies::{AnomalyRule, Finding, RuleFuture, Severity, WindowCountRule};

/// `[maintenance]` configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceConfig {
    /// Runs the scheduler in `run`. The jobs stay available on their streams either way.
    pub enabled: bool,
    pub schedules: Schedules,
    pub retention: RetentionConfig,
    pub anomalies: AnomaliesConfig,
    pub alerts: AlertsConfig,
    pub readiness: ReadinessConfig,
    /// Seconds between two samples of queue depth, pending entries and dead letters.
    pub metrics_sample_secs: u64,
}

/// Cron expressions (cron crate syntax, seconds first: `sec min hour dom month dow [year]`)
/// per maintenance job. An empty string disables that job's schedule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedules {
    pub cleanup_locks: String,
    pub detect_anomalies: String,
    pub prune: String,
}

impl Schedules {
    /// `(job type, expression)` for every job.
    pub fn entries(&self) -> [(&'static str, &str); 3] {
        [
            (jobs::CLEANUP_LOCKS, self.cleanup_locks.as_str()),
            (anomalies::DETECT_ANOMALIES, self.detect_anomalies.as_str()),
            (jobs::PRUNE, self.prune.as_str()),
        ]
    }

    /// The parsed schedule of `job`, `None` when it is disabled or unknown.
    pub fn schedule(&self, job: &str) -> Option<cron::Schedule> {
        let expr = self
            .entries()
            .into_iter()
            .find(|(j, _)| *j == job)?
            .1
            .trim();
        if expr.is_empty() {
            return None;
        }
        cron::Schedule::from_str(expr).ok()
    }
}

/// How long pruned data is kept. The ledger history is never pruned.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Dead letters older than this are deleted.
    pub dead_letters_days: u32,
    /// Scheduler tick records older than this are deleted.
    pub ticks_days: u32,
    /// Acknowledged stream entries older than this are trimmed from the job streams.
    pub stream_entries_secs: u64,
}

/// Anomaly detection rules.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnomaliesConfig {
    /// How far back each detection run looks for bursts (seconds). Must cover at least one
    /// window plus the time between two runs, or bursts between runs are missed.
    pub lookback_secs: u64,
    /// Ledger request kinds counted as "requests" by the burst rule and by
    /// `detect_high_frequency_requests`.
    pub request_kinds: Vec<String>,
    pub request_burst: BurstRuleConfig,
    pub spend_spike: SpendSpikeConfig,
}

/// A count-in-a-sliding-window rule: more than `threshold` events of one user within
/// `window_secs` is a finding. Reused by other modules' rules (e.g. verification storms).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BurstRuleConfig {
    pub enabled: bool,
    pub window_secs: u64,
    /// A user with at least this many events in one window is flagged.
    pub threshold: u32,
    pub severity: Severity,
}

/// Spend in the current hour compared with the user's own average hourly spend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpendSpikeConfig {
    pub enabled: bool,
    /// Flag when this hour's spend exceeds `factor` × the baseline hourly average.
    pub factor: u32,
    /// Days of history that make the baseline (the current hour excluded).
    pub baseline_days: u32,
    /// Spend below this in the hour is never flagged, whatever the baseline.
    pub min_spend: i64,
    pub severity: Severity,
}

/// Alert webhook for new findings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// Name of the environment variable holding the webhook URL (URLs of chat webhooks carry a
    /// secret, so the URL itself never sits in a file). Unset or empty variable: no alerts.
    pub webhook_url_env: String,
    /// Retries per alert after the first attempt (jittered exponential backoff).
    pub max_retries: u32,
    pub timeout_secs: u64,
    /// Alerts waiting for delivery; when full, new alerts are dropped (and counted) rather
    /// than slowing detection down. Findings stay in `token_anomalies` regardless.
    pub queue_capacity: usize,
}

/// What `/readyz` requires.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadinessConfig {
    /// Each indexed chain's checkpoint may trail the RPC head by at most this many blocks.
    pub max_indexer_lag_blocks: u64,
    /// Timeout of each individual check (ms).
    pub check_timeout_ms: u64,
}

impl MaintenanceConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (job, expr) in self.schedules.entries() {
            let expr = expr.trim();
            if expr.is_empty() {
                continue;
            }
            cron::Schedule::from_str(expr).map_err(|e| {
                ConfigError::invalid(
                    format!("maintenance.schedules.{job}"),
                    format!("not a cron expression (sec min hour dom month dow): {expr:?}: {e}"),
                )
            })?;
        }
        let positive = [
            (
                "maintenance.anomalies.lookback_secs",
                self.anomalies.lookback_secs,
            ),
            (
                "maintenance.anomalies.request_burst.window_secs",
                self.anomalies.request_burst.window_secs,
            ),
            (
                "maintenance.anomalies.request_burst.threshold",
                u64::from(self.anomalies.request_burst.threshold),
            ),
            (
                "maintenance.anomalies.spend_spike.factor",
                u64::from(self.anomalies.spend_spike.factor),
            ),
            (
                "maintenance.anomalies.spend_spike.baseline_days",
                u64::from(self.anomalies.spend_spike.baseline_days),
            ),
            (
                "maintenance.retention.dead_letters_days",
                u64::from(self.retention.dead_letters_days),
            ),
            (
                "maintenance.retention.ticks_days",
                u64::from(self.retention.ticks_days),
            ),
            (
                "maintenance.retention.stream_entries_secs",
                self.retention.stream_entries_secs,
            ),
            ("maintenance.alerts.timeout_secs", self.alerts.timeout_secs),
            (
                "maintenance.alerts.queue_capacity",
                self.alerts.queue_capacity as u64,
            ),
            (
                "maintenance.readiness.check_timeout_ms",
                self.readiness.check_timeout_ms,
            ),
            ("maintenance.metrics_sample_secs", self.metrics_sample_secs),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(ConfigError::invalid(key, "must be at least 1"));
            }
        }
        if self.anomalies.lookback_secs < self.anomalies.request_burst.window_secs {
            return Err(ConfigError::invalid(
                "maintenance.anomalies.lookback_secs",
                "must be at least maintenance.anomalies.request_burst.window_secs",
            ));
        }
        if self.anomalies.spend_spike.min_spend < 0 {
            return Err(ConfigError::invalid(
                "maintenance.anomalies.spend_spike.min_spend",
                "must not be negative",
            ));
        }
        if self.anomalies.request_kinds.is_empty() {
            return Err(ConfigError::invalid(
                "maintenance.anomalies.request_kinds",
                "must list at least one ledger request kind",
            ));
        }
        Ok(())
    }
}

/// The three maintenance job handlers, built once per process and shared by the queue and the
/// scheduler.
#[derive(Clone)]
pub struct MaintenanceJobs {
    pub cleanup_locks: Arc<jobs::CleanupLocks>,
    pub detect_anomalies: Arc<anomalies::DetectAnomalies>,
    pub prune: Arc<jobs::Prune>,
}

impl MaintenanceJobs {
    /// Builds the handlers with the built-in anomaly rules from config and, when its
    /// environment variable is set, the alert webhook. Must run inside the tokio runtime (the
    /// alert sender is a background task).
    pub fn new(ctx: &AppContext) -> Self {
        Self::with_extra_rules(ctx, Vec::new())
    }

    /// Like [`MaintenanceJobs::new`], with more anomaly rules (e.g. the access module's
    /// verification-storm rule) evaluated by the same detection job.
    pub fn with_extra_rules(ctx: &AppContext, extra: Vec<Arc<dyn AnomalyRule>>) -> Self {
        // The rules' zero-valued counters must land in the Prometheus recorder, not the no-op one.
        self::metrics::install();
        let alerter = anomalies::Alerter::from_config(&ctx.cfg.maintenance.alerts);
        let mut rules = anomalies::builtin_rules(&ctx.cfg.maintenance.anomalies);
        rules.extend(extra);
        Self {
            cleanup_locks: Arc::new(jobs::CleanupLocks::new(ctx.pool.clone())),
            detect_anomalies: Arc::new(anomalies::DetectAnomalies::new(
                ctx.pool.clone(),
                rules,
                alerter,
            )),
            prune: Arc::new(jobs::Prune::new(ctx)),
        }
    }

    /// The handlers, for registration with the queue and the scheduler.
    pub fn handlers(&self) -> Vec<Arc<dyn JobHandler>> {
        vec![
            self.cleanup_locks.clone(),
            self.detect_anomalies.clone(),
            self.prune.clone(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn load(pairs: &[(&str, &str)]) -> Result<Config, crate::config::ConfigError> {
        Config::load_with_env(
            None,
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn default_schedules_parse_and_empty_disables() {
        let cfg = load(&[("TOKENWARDEN__MAINTENANCE__SCHEDULES__PRUNE", "")]).expect("valid");
        assert!(
            cfg.maintenance
                .schedules
                .schedule("cleanup_locks")
                .is_some()
        );
        assert!(cfg.maintenance.schedules.schedule("prune").is_none());
    }

    #[test]
    fn bad_cron_names_the_key() {
        let err = load(&[(
            "TOKENWARDEN__MAINTENANCE__SCHEDULES__CLEANUP_LOCKS",
            "every minute",
        )])
        .expect_err("not cron");
        assert!(
            err.to_string()
                .contains("maintenance.schedules.cleanup_locks"),
            "{err}"
        );
    }

    #[test]
    fn severity_is_checked() {
        let err = load(&[(
            "TOKENWARDEN__MAINTENANCE__ANOMALIES__REQUEST_BURST__SEVERITY",
            "panic",
        )])
        .expect_err("unknown severity");
        assert!(err.to_string().contains("severity"), "{err}");
    }
}
