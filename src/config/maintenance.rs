//! `[maintenance]`: schedules, retention, anomaly rules, alerts, readiness.

use std::str::FromStr;

use serde::Deserialize;

use super::error::ConfigError;

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
    /// The access monitor's full re-check (daily by default).
    pub access_recheck: String,
}

impl Schedules {
    /// `(job type, expression)` for every job.
    pub fn entries(&self) -> [(&'static str, &str); 4] {
        [
            ("cleanup_locks", self.cleanup_locks.as_str()),
            ("detect_anomalies", self.detect_anomalies.as_str()),
            ("prune", self.prune.as_str()),
            ("access_recheck", self.access_recheck.as_str()),
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
    /// Rule `verification_storm`: access checks of one user (every door, cached answers
    /// included, from `access_checks`) within `window_secs`; the seed's "more than 20 in 5
    /// minutes" is `threshold = 21`, `window_secs = 300`.
    pub verification_storm: BurstRuleConfig,
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
                "maintenance.anomalies.verification_storm.window_secs",
                self.anomalies.verification_storm.window_secs,
            ),
            (
                "maintenance.anomalies.verification_storm.threshold",
                u64::from(self.anomalies.verification_storm.threshold),
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
        if self.anomalies.lookback_secs < self.anomalies.verification_storm.window_secs {
            return Err(ConfigError::invalid(
                "maintenance.anomalies.lookback_secs",
                "must be at least maintenance.anomalies.verification_storm.window_secs",
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

/// How an open finding affects the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Recorded only.
    Info,
    /// Recorded and meant for an operator's attention (alerts, dashboards).
    Warn,
    /// Recorded, and the ledger refuses the user's consumption with `rate_limited` until resolved.
    Block,
}

impl Severity {
    /// The value stored in `token_anomalies.severity`.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warn => "warn",
            Severity::Block => "block",
        }
    }
}
