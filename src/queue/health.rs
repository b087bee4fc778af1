//! Whether each job type's stream is being served, reported to `/readyz`
//! ([`crate::app::Readiness`], part `queue:{job_type}`).
//!
//! A reader reports `serving` once it has finished a claim pass and reads new entries; a reader
//! that fails reports the error, and the job type stays not ready until a restarted reader gets
//! that far again. So a consumer that restart-loops (a key of the wrong type at the stream's
//! name, Redis refusing its group) keeps the process not ready, while a consumer that is merely
//! starting does not make it so.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::app::Readiness;

/// One job type's reporter; cheap to clone, one per reader.
#[derive(Clone)]
pub struct StreamHealth {
    readiness: Readiness,
    part: Arc<str>,
    /// Whether the last report was `serving`: the read loop reports only on a change.
    serving: Arc<AtomicBool>,
}

impl StreamHealth {
    pub fn new(readiness: Readiness, job_type: &str) -> Self {
        Self {
            readiness,
            part: Arc::from(format!("queue:{job_type}")),
            serving: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The reader is past its claim pass and reading new entries.
    pub fn serving(&self) {
        if !self.serving.swap(true, Ordering::Relaxed) {
            self.readiness.report_ok(&self.part, "serving");
        }
    }

    /// The reader failed; the Monitor restarts it.
    pub fn failed(&self, error: &str) {
        self.serving.store(false, Ordering::Relaxed);
        self.readiness.report_failing(
            &self.part,
            format!("consumer failed and is being restarted: {error}"),
        );
    }
}
