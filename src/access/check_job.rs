//! The `verify_access` job: `{request_id, user_id, creator_id, feature}` or
//! `{request_id, user_id, chain_id, token, feature}` (the seed's form), with optional
//! `caller_ip` and `user_agent` for the audit → the decision with `request_id` (schema in
//! `jobs/`). Every decision, cached ones included, is recorded in `access_checks` before the
//! reply is sent.

use std::sync::Arc;

use alloy::primitives::Address;
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use super::audit::{AuditEntry, AuditRecorder, Caller, Door};
use super::checks::Question;
use super::service::AccessService;
use crate::queue::job::{JobError, JobFuture, JobHandler};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    #[serde(deserialize_with = "crate::queue::entry::hyphenated_uuid")]
    request_id: Uuid,
    #[serde(deserialize_with = "crate::queue::entry::hyphenated_uuid")]
    user_id: Uuid,
    #[serde(default)]
    creator_id: Option<String>,
    #[serde(default)]
    chain_id: Option<u64>,
    #[serde(default)]
    token: Option<String>,
    feature: String,
    #[serde(default)]
    caller_ip: Option<String>,
    #[serde(default)]
    user_agent: Option<String>,
}

/// A parsed `verify_access` request.
#[derive(Debug, Clone)]
pub struct CheckRequest {
    pub request_id: Uuid,
    pub user_id: Uuid,
    pub question: Question,
    /// The end user's IP and user agent, as the calling server passed them.
    pub caller: Caller,
}

/// Parses a `verify_access` payload: exactly one of `creator_id` and (`chain_id`, `token`).
pub fn parse_check(payload: Value) -> Result<CheckRequest, String> {
    let bad = |why: &str| format!("invalid verify_access payload: {why}");
    let p: Payload = serde_json::from_value(payload).map_err(|e| bad(&e.to_string()))?;
    if p.feature.is_empty() || p.feature.chars().count() > 100 {
        return Err(bad("feature must be 1 to 100 characters"));
    }
    let question = match (p.creator_id, p.chain_id, p.token) {
        (Some(creator_id), None, None) => {
            if creator_id.is_empty() || creator_id.chars().count() > 200 {
                return Err(bad("creator_id must be 1 to 200 characters"));
            }
            Question::Creator {
                creator_id,
                feature: p.feature,
            }
        }
        (None, Some(chain_id), Some(token)) => {
            let address = (token.len() == 42 && token.starts_with("0x"))
                .then(|| token.parse::<Address>().ok())
                .flatten()
                .ok_or_else(|| bad("token must be a 0x-prefixed 20-byte hex address"))?;
            Question::Token {
                chain_id,
                token: address,
                feature: p.feature,
            }
        }
        _ => return Err(bad("give either creator_id, or chain_id and token")),
    };
    let caller =
        Caller::new(p.caller_ip.as_deref(), p.user_agent.as_deref()).map_err(|e| bad(&e))?;
    Ok(CheckRequest {
        request_id: p.request_id,
        user_id: p.user_id,
        question,
        caller,
    })
}

/// Serves `verify_access`.
#[derive(Clone)]
pub struct VerifyAccessHandler {
    service: Arc<AccessService>,
    audit: AuditRecorder,
}

impl VerifyAccessHandler {
    pub fn new(service: Arc<AccessService>, audit: AuditRecorder) -> Self {
        Self { service, audit }
    }
}

impl JobHandler for VerifyAccessHandler {
    fn job_type(&self) -> &'static str {
        "verify_access"
    }

    fn handle(&self, payload: Value) -> JobFuture {
        let service = self.service.clone();
        let audit = self.audit.clone();
        Box::pin(async move {
            let req = parse_check(payload).map_err(JobError::Rejected)?;
            let (decision, cached) = service
                .verify(req.user_id, &req.question)
                .await
                .map_err(|e| JobError::Retryable(e.to_string()))?;
            // Durable before the reply: a failed record is retried with the job, unless
            // Postgres refused the row itself (then no retry can record it). The decision's
            // cache write runs meanwhile; the reply waits for both.
            let entry = AuditEntry::new(&decision, Door::Queue, Some(req.request_id), &req.caller);
            let (recorded, ()) = tokio::join!(audit.record(entry), cached.written());
            recorded.map_err(|e| {
                if e.is_bad_data() {
                    JobError::Rejected(format!("the check cannot be recorded: {e}"))
                } else {
                    JobError::Retryable(e.to_string())
                }
            })?;
            let mut reply = serde_json::to_value(&decision)
                .map_err(|e| JobError::Retryable(format!("cannot encode reply: {e}")))?;
            if let Some(obj) = reply.as_object_mut() {
                obj.insert("request_id".into(), serde_json::json!(req.request_id));
            }
            Ok(reply)
        })
    }
}
