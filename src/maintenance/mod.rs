//! Scheduled maintenance (lock cleanup, anomaly detection, pruning), the scheduler that runs each
//! tick once across replicas, and the operations HTTP endpoint.

pub mod cli;

use serde::Deserialize;

use crate::config::ConfigError;

/// `[maintenance]` configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceConfig {
    pub enabled: bool,
}

impl MaintenanceConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}
