//! `access_recheck`: the full re-check, the backstop for announcements the monitor missed
//! (sent while no replica led, or while it reconnected). Every rule's candidates — current
//! grants, and the proven owners of wallets that hold any token the rule names — are
//! re-evaluated by the same SQL transition as the monitor's. The scheduler runs it
//! (`maintenance.schedules.access_recheck`, daily by default) once across replicas; the leading
//! monitor publishes the events it writes.

use serde::Serialize;

use super::monitor::count_events;
use super::transitions::{Cause, EventKind, TransitionStore};
use crate::queue::{JobError, JobFuture, JobHandler, Rejected};

/// Job type (and schedule key) of the full re-check.
pub const ACCESS_RECHECK: &str = "access_recheck";

/// What one re-check changed.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct RecheckReport {
    pub rules: u64,
    pub granted: u64,
    pub revoked: u64,
}

/// The re-check, as a handler the scheduler calls.
#[derive(Clone)]
pub struct AccessRecheck {
    store: TransitionStore,
    batch: usize,
}

impl AccessRecheck {
    pub fn new(store: TransitionStore, batch: u32) -> Self {
        Self {
            store,
            batch: batch as usize,
        }
    }

    /// Re-checks every rule once.
    pub async fn run(&self) -> Result<RecheckReport, JobError> {
        let mut report = RecheckReport::default();
        let rules = self
            .store
            .rules_to_recheck()
            .await
            .map_err(|e| JobError::Retryable(e.to_string()))?;
        for (creator_id, feature) in rules {
            let events = self
                .store
                .recheck_rule(&creator_id, &feature, Cause::Recheck, self.batch)
                .await
                .map_err(|e| JobError::Retryable(e.to_string()))?;
            count_events(&events);
            report.rules += 1;
            for e in &events {
                match e.kind {
                    EventKind::Granted => report.granted += 1,
                    EventKind::Revoked => report.revoked += 1,
                }
            }
        }
        Ok(report)
    }
}

impl JobHandler for AccessRecheck {
    fn job_type(&self) -> &'static str {
        ACCESS_RECHECK
    }

    fn handle(&self, payload: serde_json::Value) -> JobFuture {
        let this = self.clone();
        Box::pin(async move {
            if !payload.as_object().is_some_and(|o| o.is_empty()) {
                return Err(Rejected::new(format!(
                    "invalid {ACCESS_RECHECK} payload: expected {{}}, got {payload}"
                ))
                .into());
            }
            let report = this.run().await?;
            serde_json::to_value(report).map_err(|e| JobError::Retryable(e.to_string()))
        })
    }
}
