//! The five ledger job types on the queue: payload parsing (WIRE.md, schemas in `jobs/`), and
//! the [`JobHandler`]s that hand parsed operations to the [`Batcher`].
//!
//! Parsing checks the shape only: `deny_unknown_fields`, UUIDs, amounts that are integers in
//! 1..=i64::MAX (zero, negative, fractional and overflowing values are rejected), strings,
//! `ttl_secs` a Postgres integer, `metadata` a JSON object, and no NUL (which Postgres cannot
//! store). A shape error is a [`Rejected`] with a reason naming the field. The bounds
//! (operation_type and reason length, metadata size, hold TTL range and default) belong to the
//! SQL rules, which read them from `tw_ledger_settings` for both doors: an operation that breaks
//! one comes back as a `rejected` outcome with SQL's reason, and is rejected the same way (dead
//! letter and `rejected` reply).

use serde::Deserialize;
use uuid::Uuid;

use super::batcher::{BatchError, Batcher};
use super::{Credits, LedgerOp, OutcomeStatus, RejectedRequest, RequestId, UserId};
use crate::queue::entry::{hyphenated_uuid, is_hyphenated_uuid, parse_hyphenated_uuid};
use crate::queue::{JobError, JobFuture, JobHandler, JobRegistry, RawJob, Rejected};

/// Which ledger operation a job type carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedgerJobKind {
    Consume,
    Grant,
    Hold,
    Settle,
    Release,
}

impl LedgerJobKind {
    pub const ALL: [LedgerJobKind; 5] = [
        LedgerJobKind::Consume,
        LedgerJobKind::Grant,
        LedgerJobKind::Hold,
        LedgerJobKind::Settle,
        LedgerJobKind::Release,
    ];

    /// The operation kind as `tw_ledger_apply` and `ledger_requests.kind` name it.
    pub fn op_kind(self) -> &'static str {
        match self {
            LedgerJobKind::Consume => "consume",
            LedgerJobKind::Grant => "grant",
            LedgerJobKind::Hold => "hold",
            LedgerJobKind::Settle => "settle",
            LedgerJobKind::Release => "release",
        }
    }

    /// The job type (stream suffix).
    pub fn job_type(self) -> &'static str {
        match self {
            LedgerJobKind::Consume => "consume_tokens",
            LedgerJobKind::Grant => "grant_tokens",
            LedgerJobKind::Hold => "hold_tokens",
            LedgerJobKind::Settle => "settle_hold",
            LedgerJobKind::Release => "release_hold",
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsumePayload {
    request_id: WrittenId,
    #[serde(deserialize_with = "hyphenated_uuid")]
    user_id: Uuid,
    amount: Credits,
    operation_type: String,
    #[serde(default)]
    metadata: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantPayload {
    request_id: WrittenId,
    #[serde(deserialize_with = "hyphenated_uuid")]
    user_id: Uuid,
    amount: Credits,
    reason: String,
    #[serde(default)]
    metadata: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HoldPayload {
    request_id: WrittenId,
    #[serde(deserialize_with = "hyphenated_uuid")]
    user_id: Uuid,
    amount: Credits,
    operation_type: String,
    #[serde(default)]
    ttl_secs: Option<i32>,
    #[serde(default)]
    metadata: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SettlePayload {
    request_id: WrittenId,
    #[serde(deserialize_with = "hyphenated_uuid")]
    hold_id: Uuid,
    amount: Credits,
    #[serde(default)]
    metadata: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleasePayload {
    request_id: WrittenId,
    #[serde(deserialize_with = "hyphenated_uuid")]
    hold_id: Uuid,
    #[serde(default)]
    metadata: Option<serde_json::Value>,
}

/// A payload's `request_id`: the UUID, and the text as written, which keys the reply list
/// (see [`crate::queue::entry::request_id_of`]). Refused exactly as [`hyphenated_uuid`] refuses.
struct WrittenId {
    text: String,
    uuid: Uuid,
}

impl<'de> Deserialize<'de> for WrittenId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let uuid = parse_hyphenated_uuid(&text).map_err(serde::de::Error::custom)?;
        Ok(WrittenId { text, uuid })
    }
}

impl ConsumePayload {
    fn into_op(self) -> Result<(String, LedgerOp), Rejected> {
        let op = LedgerOp::Consume {
            request_id: RequestId(self.request_id.uuid),
            user_id: UserId(self.user_id),
            amount: self.amount,
            operation_type: text("operation_type", self.operation_type)?,
            metadata: metadata(self.metadata)?,
        };
        Ok((self.request_id.text, op))
    }
}

impl GrantPayload {
    fn into_op(self) -> Result<(String, LedgerOp), Rejected> {
        let op = LedgerOp::Grant {
            request_id: RequestId(self.request_id.uuid),
            user_id: UserId(self.user_id),
            amount: self.amount,
            reason: text("reason", self.reason)?,
            metadata: metadata(self.metadata)?,
        };
        Ok((self.request_id.text, op))
    }
}

impl HoldPayload {
    fn into_op(self) -> Result<(String, LedgerOp), Rejected> {
        let op = LedgerOp::Hold {
            request_id: RequestId(self.request_id.uuid),
            user_id: UserId(self.user_id),
            amount: self.amount,
            operation_type: text("operation_type", self.operation_type)?,
            ttl_secs: self.ttl_secs,
            metadata: metadata(self.metadata)?,
        };
        Ok((self.request_id.text, op))
    }
}

impl SettlePayload {
    fn into_op(self) -> Result<(String, LedgerOp), Rejected> {
        let op = LedgerOp::Settle {
            request_id: RequestId(self.request_id.uuid),
            hold_id: RequestId(self.hold_id),
            amount: self.amount,
            metadata: metadata(self.metadata)?,
        };
        Ok((self.request_id.text, op))
    }
}

impl ReleasePayload {
    fn into_op(self) -> Result<(String, LedgerOp), Rejected> {
        let op = LedgerOp::Release {
            request_id: RequestId(self.request_id.uuid),
            hold_id: RequestId(self.hold_id),
            metadata: metadata(self.metadata)?,
        };
        Ok((self.request_id.text, op))
    }
}

/// Parses one ledger job payload (its shape; the bounds are SQL's). The error carries the rejection
/// reason.
pub fn parse(kind: LedgerJobKind, payload: serde_json::Value) -> Result<LedgerOp, Rejected> {
    let job = kind.job_type();
    let bad = |e: serde_path_to_error::Error<serde_json::Error>| {
        let path = e.path().to_string();
        Rejected::new(if path == "." {
            format!("invalid {job} payload: {}", e.inner())
        } else {
            format!("invalid {job} payload: {path}: {}", e.inner())
        })
    };
    check_amount(&payload)?;
    let (_, op) = match kind {
        LedgerJobKind::Consume => serde_path_to_error::deserialize::<_, ConsumePayload>(payload)
            .map_err(bad)?
            .into_op()?,
        LedgerJobKind::Grant => serde_path_to_error::deserialize::<_, GrantPayload>(payload)
            .map_err(bad)?
            .into_op()?,
        LedgerJobKind::Hold => serde_path_to_error::deserialize::<_, HoldPayload>(payload)
            .map_err(bad)?
            .into_op()?,
        LedgerJobKind::Settle => serde_path_to_error::deserialize::<_, SettlePayload>(payload)
            .map_err(bad)?
            .into_op()?,
        LedgerJobKind::Release => serde_path_to_error::deserialize::<_, ReleasePayload>(payload)
            .map_err(bad)?
            .into_op()?,
    };
    Ok(op)
}

/// The queue's hot path: the payload bytes decoded straight into the typed payload, no
/// intermediate `serde_json::Value`. Returns the request id as written and the operation, or
/// `None` whenever this decode fails for any reason, even one [`parse`] would accept (`2.0`
/// as an amount, a repeated key, a payload that is not an object): the general path then
/// decides, with its refusal reasons. When it returns `Some`, [`parse`] of the same payload
/// gives the same operation (same struct, same checks; tests/jobs_catalogue.rs holds every
/// example, counter-example and 13,000 random payloads to that).
pub fn parse_raw(kind: LedgerJobKind, raw: &[u8]) -> Option<(String, LedgerOp)> {
    let parsed = match kind {
        LedgerJobKind::Consume => serde_json::from_slice::<ConsumePayload>(raw)
            .ok()?
            .into_op(),
        LedgerJobKind::Grant => serde_json::from_slice::<GrantPayload>(raw).ok()?.into_op(),
        LedgerJobKind::Hold => serde_json::from_slice::<HoldPayload>(raw).ok()?.into_op(),
        LedgerJobKind::Settle => serde_json::from_slice::<SettlePayload>(raw).ok()?.into_op(),
        LedgerJobKind::Release => serde_json::from_slice::<ReleasePayload>(raw)
            .ok()?
            .into_op(),
    };
    parsed.ok()
}

/// serde's own message for an overflowing or fractional amount ("invalid type: floating point
/// `1e+20`, expected i64") does not name the field; this one does.
fn check_amount(payload: &serde_json::Value) -> Result<(), Rejected> {
    match payload.get("amount") {
        None => Ok(()),
        Some(serde_json::Value::Number(n)) if n.as_i64().is_some() || n.as_u64().is_some() => {
            match n.as_i64() {
                Some(v) if v > 0 => Ok(()),
                Some(v) => Err(Rejected::new(format!(
                    "amount must be a positive integer, got {v}"
                ))),
                None => Err(Rejected::new(format!(
                    "amount must be an integer between 1 and {}, got {n}",
                    i64::MAX
                ))),
            }
        }
        Some(other) => Err(Rejected::new(format!(
            "amount must be an integer between 1 and {}, got {other}",
            i64::MAX
        ))),
    }
}

/// Postgres text cannot hold NUL: one such op would fail its whole batch. Its length is a rule
/// of SQL's.
fn text(field: &str, v: String) -> Result<String, Rejected> {
    if v.contains('\0') {
        return Err(Rejected::new(format!(
            "{field} must not contain NUL (\\u0000)"
        )));
    }
    Ok(v)
}

/// A JSON object (absent and `null` mean `{}`) without NUL. Its size is a rule of SQL's.
fn metadata(v: Option<serde_json::Value>) -> Result<serde_json::Value, Rejected> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(serde_json::Value::Object(Default::default())),
        Some(m @ serde_json::Value::Object(_)) => {
            if has_nul(&m) {
                return Err(Rejected::new(
                    "metadata must not contain NUL (\\u0000) in keys or string values",
                ));
            }
            Ok(m)
        }
        Some(_) => Err(Rejected::new("metadata must be a JSON object")),
    }
}

/// Postgres jsonb cannot hold NUL in a key or a string value.
fn has_nul(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(a) => a.iter().any(has_nul),
        serde_json::Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// What can be read of a payload that failed [`parse`] but whose request id is a UUID, for
/// `tw_ledger_reject` to record its `rejected` outcome in the columns the SQL door fills (the
/// id's kind, its user or hold, amount, label, ttl and metadata, each when it has the right
/// type; NUL, which Postgres cannot store, makes a text or metadata unreadable). `None` when
/// the request id is not a UUID: then only the dead letter keeps the entry.
pub fn rejected_request(
    kind: LedgerJobKind,
    payload: &serde_json::Value,
    reason: &str,
) -> Option<RejectedRequest> {
    let uuid = |f: &str| {
        let s = payload.get(f)?.as_str().filter(|s| is_hyphenated_uuid(s))?;
        s.parse::<Uuid>().ok()
    };
    let request_id = uuid("request_id")?;
    let string = |f: &str| {
        payload
            .get(f)?
            .as_str()
            .filter(|s| !s.contains('\0'))
            .map(str::to_string)
    };
    let (user_id, hold_id) = match kind {
        LedgerJobKind::Consume | LedgerJobKind::Grant | LedgerJobKind::Hold => {
            (uuid("user_id"), None)
        }
        LedgerJobKind::Settle | LedgerJobKind::Release => (None, uuid("hold_id")),
    };
    let label = match kind {
        LedgerJobKind::Consume | LedgerJobKind::Hold => string("operation_type"),
        LedgerJobKind::Grant => string("reason"),
        LedgerJobKind::Settle | LedgerJobKind::Release => None,
    };
    let amount = match kind {
        LedgerJobKind::Release => None,
        _ => payload.get("amount").and_then(serde_json::Value::as_i64),
    };
    let ttl_secs = match kind {
        LedgerJobKind::Hold => match payload.get("ttl_secs") {
            None | Some(serde_json::Value::Null) => None,
            Some(t) => t.as_i64().and_then(|t| i32::try_from(t).ok()),
        },
        _ => None,
    };
    let metadata = match payload.get("metadata") {
        None | Some(serde_json::Value::Null) => Some(serde_json::json!({})),
        Some(m) if !has_nul(m) => Some(m.clone()),
        Some(_) => None,
    };
    Some(RejectedRequest {
        request_id,
        kind: kind.op_kind(),
        user_id,
        hold_id,
        amount,
        label,
        ttl_secs,
        metadata,
        reason: reason.replace('\0', "\\u0000"),
    })
}

/// Serves one ledger job type: parse, then apply through the batcher.
pub struct LedgerJob {
    kind: LedgerJobKind,
    batcher: Batcher,
}

impl LedgerJob {
    pub fn new(kind: LedgerJobKind, batcher: Batcher) -> Self {
        Self { kind, batcher }
    }
}

impl JobHandler for LedgerJob {
    fn job_type(&self) -> &'static str {
        self.kind.job_type()
    }

    fn handle(&self, payload: serde_json::Value) -> JobFuture {
        let kind = self.kind;
        let op = parse(kind, payload.clone());
        let batcher = self.batcher.clone();
        Box::pin(async move {
            let op = match op {
                Ok(op) => op,
                Err(Rejected { reason }) => {
                    // Like the SQL door: the rejection is the request id's durable outcome.
                    let Some(r) = rejected_request(kind, &payload, &reason) else {
                        return Err(JobError::Rejected(reason));
                    };
                    let outcome = batcher.record_rejected(&r).await.map_err(retryable)?;
                    return match outcome.status {
                        // Dead letter + `rejected` reply with the stored reason.
                        OutcomeStatus::Rejected => {
                            Err(JobError::Rejected(outcome.reason.unwrap_or(reason)))
                        }
                        // The id is another request's: answer as the SQL door does.
                        _ => encode(&outcome),
                    };
                }
            };
            let outcome = apply(&batcher, op).await?;
            encode(&outcome)
        })
    }

    fn handle_raw(&self, payload: &[u8]) -> Option<RawJob> {
        let (request_id, op) = parse_raw(self.kind, payload)?;
        let batcher = self.batcher.clone();
        Some(RawJob {
            request_id: Some(request_id),
            reply: Box::pin(async move { reply_text(&apply(&batcher, op).await?) }),
        })
    }
}

/// Applies `op` with the next batch. Input that broke a bound is rejected like input of the
/// wrong shape: dead letter and `rejected` reply, with SQL's reason.
async fn apply(batcher: &Batcher, op: LedgerOp) -> Result<super::Outcome, JobError> {
    let outcome = batcher.apply(op).await.map_err(|e| {
        if e.bad_data {
            JobError::Rejected(format!("the ledger refused this job's data: {e}"))
        } else {
            retryable(e)
        }
    })?;
    if outcome.is_rejected_input() {
        let reason = outcome
            .reason
            .unwrap_or_else(|| "rejected by the ledger".into());
        return Err(JobError::Rejected(reason));
    }
    Ok(outcome)
}

/// A batch that failed for a reason a retry may not meet again (database down, batcher gone).
fn retryable(e: BatchError) -> JobError {
    JobError::Retryable(e.to_string())
}

/// The reply: the outcome as the SQL door returns it.
fn encode(outcome: &super::Outcome) -> Result<serde_json::Value, JobError> {
    serde_json::to_value(outcome)
        .map_err(|e| JobError::Retryable(format!("cannot encode outcome: {e}")))
}

/// The reply of the hot path, written straight to text: byte for byte what [`encode`] gives
/// once written (a `serde_json::Value` object writes its keys sorted, so the fields here are
/// in that order), without building the `Value`.
pub fn reply_text(outcome: &super::Outcome) -> Result<String, JobError> {
    #[derive(serde::Serialize)]
    struct Sorted<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        balance: Option<i64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        held: Option<i64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
        request_id: RequestId,
        status: OutcomeStatus,
    }
    let sorted = Sorted {
        balance: outcome.balance,
        held: outcome.held,
        reason: outcome.reason.as_deref(),
        request_id: outcome.request_id,
        status: outcome.status,
    };
    serde_json::to_string(&sorted)
        .map_err(|e| JobError::Retryable(format!("cannot encode outcome: {e}")))
}

/// Registers the five ledger job types, all sharing `batcher`.
pub fn register(jobs: &mut JobRegistry, batcher: &Batcher) {
    for kind in LedgerJobKind::ALL {
        jobs.register(LedgerJob::new(kind, batcher.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn consume(extra: serde_json::Value) -> Result<LedgerOp, String> {
        let mut p = json!({
            "request_id": Uuid::new_v4(), "user_id": Uuid::new_v4(),
            "amount": 5, "operation_type": "chat"
        });
        for (k, v) in extra.as_object().unwrap() {
            p[k] = v.clone();
        }
        parse(LedgerJobKind::Consume, p).map_err(|e| e.reason)
    }

    /// The hot path's reply is byte for byte the general path's.
    #[test]
    fn reply_text_is_the_encoded_outcome_written() {
        for status in OutcomeStatus::ALL {
            for balance in [None, Some(-1), Some(i64::MAX)] {
                for held in [None, Some(0)] {
                    for reason in [None, Some("a \"quoted\" \u{e9} \\ reason\n")] {
                        let o = crate::ledger::Outcome {
                            request_id: RequestId(Uuid::new_v4()),
                            status,
                            balance,
                            held,
                            reason: reason.map(str::to_string),
                        };
                        assert_eq!(reply_text(&o).unwrap(), encode(&o).unwrap().to_string());
                    }
                }
            }
        }
    }

    /// The hot path decodes what the general path accepts into the same operation, keeps the
    /// request id as written, and leaves everything else to the general path.
    #[test]
    fn parse_raw_agrees_with_parse() {
        let id = "6F1C2A9E-3B7D-4E2F-9A41-0C5D8E7B1A01";
        let user = Uuid::new_v4();
        let ok = format!(
            r#"{{"request_id":"{id}","user_id":"{user}","amount":5,"operation_type":"chat","metadata":{{"k":[1,"x"]}}}}"#
        );
        let (rid, op) = parse_raw(LedgerJobKind::Consume, ok.as_bytes()).unwrap();
        assert_eq!(rid, id);
        let value: serde_json::Value = serde_json::from_str(&ok).unwrap();
        assert_eq!(op, parse(LedgerJobKind::Consume, value).unwrap());
        for raw in [
            ok.replace("\"amount\":5", "\"amount\":5.0"),
            ok.replace("\"amount\":5", "\"amount\":0"),
            ok.replace("\"chat\"", "\"a\\u0000b\""),
            ok.replace(&format!("\"{id}\""), "\"req-1\""),
            ok.replace("\"amount\":5", "\"amount\":5,\"amount\":6"),
            ok.replace("{\"request_id\"", "{\"surprise\":1,\"request_id\""),
            "[1]".to_string(),
            "{nope".to_string(),
        ] {
            assert!(
                parse_raw(LedgerJobKind::Consume, raw.as_bytes()).is_none(),
                "{raw}"
            );
        }
    }

    #[test]
    fn valid_consume_parses() {
        let op = consume(json!({"metadata": {"model": "x"}})).unwrap();
        assert!(matches!(op, LedgerOp::Consume { amount, .. } if amount.get() == 5));
    }

    #[test]
    fn bad_amounts_are_rejected() {
        for (amount, needle) in [
            (json!(0), "positive"),
            (json!(-3), "positive"),
            (json!(1.5), "amount"),
            (json!("5"), "amount"),
            (json!(9223372036854775808u64), "amount"),
            (json!(1e30), "amount"),
        ] {
            let err = consume(json!({ "amount": amount })).unwrap_err();
            assert!(
                err.contains(needle) || err.contains("i64"),
                "{amount}: {err}"
            );
        }
    }

    #[test]
    fn unknown_and_missing_fields_are_rejected() {
        let err = consume(json!({"surprise": 1})).unwrap_err();
        assert!(err.contains("unknown field `surprise`"), "{err}");
        let err = parse(
            LedgerJobKind::Consume,
            json!({"request_id": Uuid::new_v4()}),
        )
        .unwrap_err()
        .reason;
        assert!(err.contains("missing field"), "{err}");
    }

    /// The bounds (metadata size, operation_type length, ttl_secs range) are SQL's: their
    /// assertions live in tests/ledger.rs (`both_doors_enforce_the_configured_bounds`,
    /// `text_bounds_are_the_same_through_both_doors`). Parsing leaves them to SQL.
    #[test]
    fn shape_errors_are_rejected() {
        let err = consume(json!({"metadata": [1]})).unwrap_err();
        assert!(err.contains("metadata must be a JSON object"), "{err}");
        let err = consume(json!({"user_id": "not-a-uuid"})).unwrap_err();
        assert!(err.contains("UUID") || err.contains("uuid"), "{err}");
        for (extra, needle) in [
            (
                json!({"operation_type": "a\u{0}b"}),
                "operation_type must not contain NUL",
            ),
            (
                json!({"metadata": {"k\u{0}": 1}}),
                "metadata must not contain NUL",
            ),
            (
                json!({"metadata": {"k": ["x", {"y": "\u{0}"}]}}),
                "metadata must not contain NUL",
            ),
        ] {
            let err = consume(extra.clone()).unwrap_err();
            assert!(
                err.contains(needle) && err.contains("\\u0000"),
                "{extra}: {err}"
            );
        }
        let grant = json!({"request_id": Uuid::new_v4(), "user_id": Uuid::new_v4(),
            "amount": 1, "reason": "\u{0}"});
        let err = parse(LedgerJobKind::Grant, grant).unwrap_err().reason;
        assert!(err.contains("reason must not contain NUL"), "{err}");
        let hold = json!({"request_id": Uuid::new_v4(), "user_id": Uuid::new_v4(),
            "amount": 1, "operation_type": "x", "ttl_secs": 3_000_000_000u64});
        let err = parse(LedgerJobKind::Hold, hold).unwrap_err().reason;
        assert!(err.contains("ttl_secs"), "{err}");
    }

    /// What SQL bounds, parsing passes on as it is: an absent ttl_secs stays absent (SQL applies
    /// the default), an out-of-range one and an oversized text reach SQL to be rejected there.
    #[test]
    fn bounds_are_left_to_sql() {
        let op =
            consume(json!({"operation_type": "", "metadata": {"k": "x".repeat(10_000)}})).unwrap();
        assert!(
            matches!(op, LedgerOp::Consume { ref operation_type, .. } if operation_type.is_empty())
        );
        let hold = |extra: serde_json::Value| {
            let mut p = json!({"request_id": Uuid::new_v4(), "user_id": Uuid::new_v4(),
                "amount": 1, "operation_type": "x"});
            for (k, v) in extra.as_object().unwrap() {
                p[k] = v.clone();
            }
            parse(LedgerJobKind::Hold, p).unwrap()
        };
        assert!(matches!(
            hold(json!({})),
            LedgerOp::Hold { ttl_secs: None, .. }
        ));
        assert!(matches!(
            hold(json!({"ttl_secs": null})),
            LedgerOp::Hold { ttl_secs: None, .. }
        ));
        assert!(matches!(
            hold(json!({"ttl_secs": 0})),
            LedgerOp::Hold {
                ttl_secs: Some(0),
                ..
            }
        ));
    }
}
