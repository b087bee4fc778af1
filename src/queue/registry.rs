//! Which handler serves which job type, and the catalogue of job types that exist.
//!
//! The worker builds one [`JobRegistry`] at start-up, one `register` line per handler (see
//! `worker::job_registry`), and starts one stream consumer per registered job type. A stream
//! whose job type has no handler is simply not consumed.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::JobHandler;

/// Every job type of the public catalogue (`jobs/`, WIRE.md). `tokenwarden enqueue` refuses
/// anything else, so a typo does not create a stream nobody consumes.
pub const KNOWN_JOB_TYPES: &[&str] = &[
    "consume_tokens",
    "grant_tokens",
    "hold_tokens",
    "settle_hold",
    "release_hold",
    "snapshot_create",
    "index_token",
    "cleanup_locks",
    "detect_anomalies",
    "prune",
    "link_wallet",
    "unlink_wallet",
    "access_rule",
    "verify_access",
    "request_whitelist",
];

/// The handlers this process serves, by job type.
#[derive(Clone, Default)]
pub struct JobRegistry {
    handlers: BTreeMap<&'static str, Arc<dyn JobHandler>>,
}

impl JobRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `handler` for its [`JobHandler::job_type`]. Registering the same job type twice is
    /// a wiring mistake: the later handler wins and a warning says so.
    pub fn register(&mut self, handler: impl JobHandler) -> &mut Self {
        self.register_arc(Arc::new(handler))
    }

    /// Like [`JobRegistry::register`], for a handler that is already shared.
    pub fn register_arc(&mut self, handler: Arc<dyn JobHandler>) -> &mut Self {
        let job_type = handler.job_type();
        if self.handlers.insert(job_type, handler).is_some() {
            tracing::warn!(
                job_type,
                "job type registered twice; the later handler wins"
            );
        }
        self
    }

    /// Registered job types, sorted.
    pub fn job_types(&self) -> Vec<&'static str> {
        self.handlers.keys().copied().collect()
    }

    /// The handler of `job_type`, if registered.
    pub fn get(&self, job_type: &str) -> Option<Arc<dyn JobHandler>> {
        self.handlers.get(job_type).cloned()
    }

    pub fn is_empty(&self) -> bool {
        self.handlers.is_empty()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&'static str, Arc<dyn JobHandler>)> + '_ {
        self.handlers.iter().map(|(k, v)| (*k, v.clone()))
    }
}

impl std::fmt::Debug for JobRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobRegistry")
            .field("job_types", &self.job_types())
            .finish()
    }
}
