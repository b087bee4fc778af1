//! The `request_whitelist` job: `{request_id, user_id, whitelist_id, address?}` → the
//! placement with `request_id` (schema in `jobs/`). A refusal is a reply, not a dead letter:
//! the caller learns the reason.

use std::sync::Arc;

use alloy::primitives::Address;
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use super::store::{WhitelistError, WhitelistStore};
use crate::queue::job::{JobError, JobFuture, JobHandler};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    request_id: Uuid,
    user_id: Uuid,
    whitelist_id: Uuid,
    #[serde(default)]
    address: Option<String>,
}

/// A parsed `request_whitelist` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaceRequest {
    pub request_id: Uuid,
    pub user_id: Uuid,
    pub whitelist_id: Uuid,
    pub address: Option<Address>,
}

/// Parses a `request_whitelist` payload.
pub fn parse_request(payload: Value) -> Result<PlaceRequest, String> {
    let bad = |why: &str| format!("invalid request_whitelist payload: {why}");
    let p: Payload = serde_json::from_value(payload).map_err(|e| bad(&e.to_string()))?;
    let address = p
        .address
        .map(|a| {
            (a.len() == 42 && a.starts_with("0x"))
                .then(|| a.parse::<Address>().ok())
                .flatten()
                .ok_or_else(|| bad("address must be a 0x-prefixed 20-byte hex address"))
        })
        .transpose()?;
    Ok(PlaceRequest {
        request_id: p.request_id,
        user_id: p.user_id,
        whitelist_id: p.whitelist_id,
        address,
    })
}

/// Serves `request_whitelist`.
#[derive(Clone)]
pub struct RequestWhitelistHandler {
    store: Arc<WhitelistStore>,
}

impl RequestWhitelistHandler {
    pub fn new(store: Arc<WhitelistStore>) -> Self {
        Self { store }
    }
}

impl JobHandler for RequestWhitelistHandler {
    fn job_type(&self) -> &'static str {
        "request_whitelist"
    }

    fn handle(&self, payload: Value) -> JobFuture {
        let store = self.store.clone();
        Box::pin(async move {
            let req = parse_request(payload).map_err(JobError::Rejected)?;
            let placement = store
                .request(req.whitelist_id, req.user_id, req.request_id, req.address)
                .await
                .map_err(|e| match e {
                    WhitelistError::Invalid(why) => JobError::Rejected(why),
                    e => JobError::Retryable(e.to_string()),
                })?;
            let mut reply = serde_json::to_value(&placement)
                .map_err(|e| JobError::Retryable(format!("cannot encode reply: {e}")))?;
            if let Some(obj) = reply.as_object_mut() {
                obj.insert("request_id".into(), serde_json::json!(req.request_id));
            }
            Ok(reply)
        })
    }
}
