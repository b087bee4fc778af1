//! The `access_rule` job: `{request_id, action: set|delete, creator_id, feature, rule?, actor}`
//! → `{request_id, status: set|deleted|not_found|invalid, version?, error?}` (schema in `jobs/`).

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::rules::{RuleError, RuleStore};
use crate::queue::job::{JobError, JobFuture, JobHandler};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Action {
    Set,
    Delete,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    #[serde(deserialize_with = "crate::queue::entry::hyphenated_uuid")]
    request_id: Uuid,
    action: Action,
    creator_id: String,
    feature: String,
    #[serde(default)]
    rule: Option<Value>,
    actor: String,
}

/// Serves `access_rule`. An invalid rule is a reply (`status: invalid` with the JSON path of
/// the bad node), not a dead letter: the caller learns what to fix.
#[derive(Clone)]
pub struct AccessRuleHandler {
    rules: Arc<RuleStore>,
}

impl AccessRuleHandler {
    pub fn new(rules: Arc<RuleStore>) -> Self {
        Self { rules }
    }
}

impl JobHandler for AccessRuleHandler {
    fn job_type(&self) -> &'static str {
        "access_rule"
    }

    fn handle(&self, payload: Value) -> JobFuture {
        let rules = self.rules.clone();
        Box::pin(async move {
            let p: Payload = serde_json::from_value(payload)
                .map_err(|e| JobError::Rejected(format!("invalid access_rule payload: {e}")))?;
            let id = p.request_id;
            let result = match (p.action, p.rule) {
                (Action::Set, Some(rule)) => rules
                    .set(&p.creator_id, &p.feature, &rule, &p.actor)
                    .await
                    .map(|v| json!({"request_id": id, "status": "set", "version": v})),
                (Action::Set, None) => {
                    return Err(JobError::Rejected(
                        "invalid access_rule payload: action set needs a rule".into(),
                    ));
                }
                (Action::Delete, None) => rules
                    .delete(&p.creator_id, &p.feature, &p.actor)
                    .await
                    .map(|found| {
                        json!({"request_id": id, "status": if found { "deleted" } else { "not_found" }})
                    }),
                (Action::Delete, Some(_)) => {
                    return Err(JobError::Rejected(
                        "invalid access_rule payload: action delete takes no rule".into(),
                    ));
                }
            };
            match result {
                Ok(reply) => Ok(reply),
                Err(RuleError::Invalid(error)) => {
                    Ok(json!({"request_id": id, "status": "invalid", "error": error}))
                }
                Err(e) => Err(JobError::Retryable(e.to_string())),
            }
        })
    }
}
