//! Scheduled maintenance (lock cleanup, anomaly detection, pruning), the scheduler that runs each
//! tick once across replicas, and the operations HTTP endpoint (`/healthz`, `/readyz`,
//! `/metrics`).
//!
//! The three maintenance jobs are ordinary [`JobHandler`]s: the queue serves them from their
//! streams (`tokenwarden enqueue cleanup_locks {}`), and the [`scheduler`] calls the very same
//! handlers in-process for each cron tick it claims. They are thin: the work belongs to the
//! area that owns the data (the ledger expires holds and keeps the anomaly rules, the queue
//! purges dead letters, trims streams and reads the gauge figures).

pub mod anomalies;
pub(crate) mod cli;
pub(crate) mod http;
pub(crate) mod jobs;
pub(crate) mod metrics;
pub(crate) mod scheduler;

use std::sync::Arc;

use crate::app::AppContext;
use crate::ledger::Ledger;
use crate::ledger::anomalies::{AnomalyRule, builtin_rules};
use crate::queue::JobHandler;

/// How the maintenance job types (`cleanup_locks`, `detect_anomalies`, `prune`) read their
/// payload; public for the catalogue test that holds it against the schemas.
pub use jobs::parse_payload as parse_maintenance_payload;

/// The three maintenance job handlers, built once per process and shared by the queue and the
/// scheduler.
#[derive(Clone)]
pub struct MaintenanceJobs {
    pub cleanup_locks: Arc<jobs::CleanupLocks>,
    pub detect_anomalies: Arc<anomalies::DetectAnomalies>,
    pub prune: Arc<jobs::Prune>,
}

impl MaintenanceJobs {
    /// Builds the handlers with the built-in anomaly rules from config (the ledger's and the
    /// access audit's `verification_storm`) and, when its
    /// environment variable is set, the alert webhook. Must run inside the tokio runtime (the
    /// alert sender is a background task).
    pub fn new(ctx: &AppContext) -> Self {
        Self::with_extra_rules(
            ctx,
            crate::access::audit::anomaly_rules(&ctx.cfg.maintenance.anomalies),
        )
    }

    /// Like [`MaintenanceJobs::new`], with more anomaly rules (e.g. the access module's
    /// verification-storm rule) evaluated by the same detection job.
    pub fn with_extra_rules(ctx: &AppContext, extra: Vec<Arc<dyn AnomalyRule>>) -> Self {
        // The rules' zero-valued counters must land in the Prometheus recorder, not the no-op one.
        self::metrics::install();
        let alerter = anomalies::Alerter::from_config(&ctx.cfg.maintenance.alerts);
        let mut rules = builtin_rules(&ctx.cfg.maintenance.anomalies);
        rules.extend(extra);
        Self {
            cleanup_locks: Arc::new(jobs::CleanupLocks::new(Ledger::new(
                ctx.pool.clone(),
                ctx.cfg.ledger.clone(),
            ))),
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
