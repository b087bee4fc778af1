//! The `snapshot_create` job: `{request_id, source, chain, token, block_height?}` →
//! `{request_id, status, snapshot_id?, holder_count?, block_height?, error?}` (WIRE.md).

use std::sync::Arc;

use serde::Deserialize;
use uuid::Uuid;

use super::service::{SnapshotError, SnapshotRequest, SnapshotService, SnapshotSource};
use crate::queue::job::{JobError, JobFuture, JobHandler, Rejected};

/// The job's payload, exactly as `jobs/snapshot_create.schema.json` describes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    #[serde(deserialize_with = "crate::queue::entry::hyphenated_uuid")]
    request_id: Uuid,
    source: SnapshotSource,
    chain: ChainArg,
    token: String,
    #[serde(default)]
    block_height: Option<u64>,
}

/// `chain` may be a GoldRush name or a numeric chain id, as a string or an integer.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ChainArg {
    Id(u64),
    Name(String),
}

/// Parses and validates a `snapshot_create` payload.
pub fn parse_payload(payload: serde_json::Value) -> Result<SnapshotRequest, Rejected> {
    let invalid =
        |e: &dyn std::fmt::Display| Rejected::new(format!("invalid snapshot_create payload: {e}"));
    let p: Payload = serde_json::from_value(payload).map_err(|e| invalid(&e))?;
    let chain = match p.chain {
        ChainArg::Id(id) => id.to_string(),
        ChainArg::Name(name) => name,
    };
    SnapshotRequest::new(
        Some(p.request_id),
        p.source,
        &chain,
        &p.token,
        p.block_height,
    )
    .map_err(|e| invalid(&e))
}

/// Serves `snapshot_create`. Register one with the queue; it shares the service's GoldRush
/// client (and so its rate limit) across all jobs of the process.
#[derive(Debug, Clone)]
pub struct SnapshotCreateHandler {
    service: Arc<SnapshotService>,
}

impl SnapshotCreateHandler {
    pub fn new(service: Arc<SnapshotService>) -> Self {
        Self { service }
    }
}

impl JobHandler for SnapshotCreateHandler {
    fn job_type(&self) -> &'static str {
        "snapshot_create"
    }

    fn handle(&self, payload: serde_json::Value) -> JobFuture {
        let service = self.service.clone();
        Box::pin(async move {
            let req = parse_payload(payload)?;
            let request_id = req.request_id.unwrap_or_default();
            match service.create(&req).await {
                Ok(outcome) => {
                    let mut reply = serde_json::to_value(&outcome)
                        .map_err(|e| JobError::Retryable(format!("cannot encode reply: {e}")))?;
                    if let Some(obj) = reply.as_object_mut() {
                        obj.insert("request_id".into(), serde_json::json!(request_id));
                    }
                    Ok(reply)
                }
                Err(e @ SnapshotError::RequestIdConflict { .. }) => {
                    Err(JobError::Rejected(e.to_string()))
                }
                Err(e) => Err(JobError::Retryable(e.to_string())),
            }
        })
    }
}
