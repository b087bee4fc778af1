//! What every long-running part of the worker shares, in a file every area may import.
//!
//! It lives below the areas (not in the composition root, `worker.rs`) so that the chain
//! indexer, the queue consumers and the maintenance jobs can take it without importing the
//! layer that wires them together.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::infra::{StoreError, connect_postgres, connect_redis, migrate};

/// The configuration, the two stores and the shutdown signal of one process.
#[derive(Clone)]
pub struct AppContext {
    pub cfg: Arc<Config>,
    pub pool: PgPool,
    /// A multiplexed Redis connection for non-blocking commands. Blocking reads
    /// (XREADGROUP BLOCK, BLPOP) must open their own connection.
    pub redis: redis::aio::ConnectionManager,
    /// Cancelled when the process should stop taking new work.
    pub shutdown: CancellationToken,
    /// What long-running parts report about themselves, for `/readyz`.
    pub readiness: Readiness,
    /// The job streams the queue listed last, for the gauges.
    pub job_streams: JobStreams,
}

/// The job streams (`{prefix}:jobs:*` keys) the queue's unknown-type sweep found on its last
/// pass. Listing them is a SCAN of the whole Redis keyspace, which holds Redis a little on
/// every call; the sweep lists them every 30 s anyway, so the gauge sampler (every
/// `maintenance.metrics_sample_secs`) reads this list instead of scanning again.
#[derive(Clone, Default)]
pub struct JobStreams(Arc<Mutex<Vec<Vec<u8>>>>);

impl JobStreams {
    /// Replaces the list with the keys of a new pass.
    pub fn set(&self, keys: Vec<Vec<u8>>) {
        if let Ok(mut k) = self.0.lock() {
            *k = keys;
        }
    }

    /// The keys of the last pass (empty before the first).
    pub fn get(&self) -> Vec<Vec<u8>> {
        self.0.lock().map(|k| k.clone()).unwrap_or_default()
    }
}

/// Self-reports of long-running parts (e.g. one per queue stream), read by `/readyz`. A part
/// that never reported is not listed; one that reported a failure stays not ready until it
/// reports being fine again.
#[derive(Clone, Default)]
pub struct Readiness {
    parts: Arc<Mutex<BTreeMap<String, PartState>>>,
}

/// One part's last self-report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartState {
    pub ok: bool,
    pub detail: String,
}

impl Readiness {
    /// Records that `part` works; `detail` says how.
    pub fn report_ok(&self, part: &str, detail: impl Into<String>) {
        self.set(part, true, detail.into());
    }

    /// Records that `part` does not work, and why.
    pub fn report_failing(&self, part: &str, detail: impl Into<String>) {
        self.set(part, false, detail.into());
    }

    fn set(&self, part: &str, ok: bool, detail: String) {
        if let Ok(mut parts) = self.parts.lock() {
            parts.insert(part.to_string(), PartState { ok, detail });
        }
    }

    /// Every part's last report, by name.
    pub fn snapshot(&self) -> Vec<(String, PartState)> {
        match self.parts.lock() {
            Ok(parts) => parts.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Err(_) => Vec::new(),
        }
    }
}

impl AppContext {
    /// Connects to Postgres and Redis and applies migrations.
    pub async fn connect(cfg: Config) -> Result<Self, StoreError> {
        let pool = connect_postgres(&cfg.database).await?;
        migrate(&pool).await?;
        let redis = connect_redis(&cfg.redis).await?;
        Ok(Self {
            cfg: Arc::new(cfg),
            pool,
            redis,
            shutdown: CancellationToken::new(),
            readiness: Readiness::default(),
            job_streams: JobStreams::default(),
        })
    }
}
