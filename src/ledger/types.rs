//! Ledger vocabulary shared by the queue handlers, the CLI and the tests.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A caller-chosen id that makes an operation idempotent: the first time it is seen decides the
/// outcome, and every repeat returns that outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestId(pub Uuid);

/// The id of a credits account holder (Supabase `auth.users.id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserId(pub Uuid);

/// A strictly positive number of credits. Zero and negative amounts are unrepresentable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Credits(i64);

impl Credits {
    /// Accepts 1..=i64::MAX.
    pub fn new(v: i64) -> Option<Self> {
        (v > 0).then_some(Self(v))
    }
    pub fn get(self) -> i64 {
        self.0
    }
}

impl<'de> Deserialize<'de> for Credits {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = i64::deserialize(d)?;
        Credits::new(v).ok_or_else(|| {
            serde::de::Error::custom(format!("amount must be a positive integer, got {v}"))
        })
    }
}

/// One ledger operation, as validated from a job payload or a CLI call.
#[derive(Debug, Clone, PartialEq)]
pub enum LedgerOp {
    /// Debit `amount` now.
    Consume {
        request_id: RequestId,
        user_id: UserId,
        amount: Credits,
        operation_type: String,
        metadata: serde_json::Value,
    },
    /// Credit `amount`.
    Grant {
        request_id: RequestId,
        user_id: UserId,
        amount: Credits,
        reason: String,
        metadata: serde_json::Value,
    },
    /// Reserve `amount` until it is settled, released, or expires after `ttl_secs`.
    /// The hold is identified by this operation's request id. `ttl_secs: None` takes the
    /// ledger's default; SQL applies it and checks the range (see `tw_ledger_settings`).
    Hold {
        request_id: RequestId,
        user_id: UserId,
        amount: Credits,
        operation_type: String,
        ttl_secs: Option<i32>,
        metadata: serde_json::Value,
    },
    /// Debit the actual `amount` (≤ held) of hold `hold_id`; the rest returns to the balance.
    Settle {
        request_id: RequestId,
        hold_id: RequestId,
        amount: Credits,
        metadata: serde_json::Value,
    },
    /// Return the whole held amount of hold `hold_id`.
    Release {
        request_id: RequestId,
        hold_id: RequestId,
        metadata: serde_json::Value,
    },
}

impl LedgerOp {
    pub fn request_id(&self) -> RequestId {
        match self {
            LedgerOp::Consume { request_id, .. }
            | LedgerOp::Grant { request_id, .. }
            | LedgerOp::Hold { request_id, .. }
            | LedgerOp::Settle { request_id, .. }
            | LedgerOp::Release { request_id, .. } => *request_id,
        }
    }
}

/// The final status of a request id. The strings are the public wire values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeStatus {
    Consumed,
    Granted,
    Held,
    Settled,
    Released,
    InsufficientTokens,
    RequestIdConflict,
    HoldExpired,
    HoldNotFound,
    HoldAlreadyResolved,
    RateLimited,
    Rejected,
}

/// The answer to one request: what happened, and the balance after it where one applies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub request_id: RequestId,
    pub status: OutcomeStatus,
    /// Available balance after the operation (not counting held tokens).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balance: Option<i64>,
    /// Tokens held by open holds after the operation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held: Option<i64>,
    /// Why a request was rejected or failed, for humans.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Outcome {
    /// A `rejected` outcome without an account state: the request's own fields broke a rule of
    /// the ledger (a bound, a required field), so resending it can never succeed. The other
    /// `rejected` outcomes (a settle over the held amount, a grant that would overflow) depend
    /// on the account and come with its balance.
    pub fn is_rejected_input(&self) -> bool {
        self.status == OutcomeStatus::Rejected && self.balance.is_none() && self.held.is_none()
    }
}

impl OutcomeStatus {
    /// Every status, for exhaustive checks.
    pub const ALL: [OutcomeStatus; 12] = [
        OutcomeStatus::Consumed,
        OutcomeStatus::Granted,
        OutcomeStatus::Held,
        OutcomeStatus::Settled,
        OutcomeStatus::Released,
        OutcomeStatus::InsufficientTokens,
        OutcomeStatus::RequestIdConflict,
        OutcomeStatus::HoldExpired,
        OutcomeStatus::HoldNotFound,
        OutcomeStatus::HoldAlreadyResolved,
        OutcomeStatus::RateLimited,
        OutcomeStatus::Rejected,
    ];

    /// The public wire value (same strings as the SQL functions return).
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeStatus::Consumed => "consumed",
            OutcomeStatus::Granted => "granted",
            OutcomeStatus::Held => "held",
            OutcomeStatus::Settled => "settled",
            OutcomeStatus::Released => "released",
            OutcomeStatus::InsufficientTokens => "insufficient_tokens",
            OutcomeStatus::RequestIdConflict => "request_id_conflict",
            OutcomeStatus::HoldExpired => "hold_expired",
            OutcomeStatus::HoldNotFound => "hold_not_found",
            OutcomeStatus::HoldAlreadyResolved => "hold_already_resolved",
            OutcomeStatus::RateLimited => "rate_limited",
            OutcomeStatus::Rejected => "rejected",
        }
    }

    /// Parses a wire value; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether the operation took effect (tokens moved).
    pub fn is_success(self) -> bool {
        matches!(
            self,
            OutcomeStatus::Consumed
                | OutcomeStatus::Granted
                | OutcomeStatus::Held
                | OutcomeStatus::Settled
                | OutcomeStatus::Released
        )
    }
}

impl std::fmt::Display for OutcomeStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl LedgerOp {
    /// The `kind` string used by `tw_ledger_apply` and `ledger_requests.kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            LedgerOp::Consume { .. } => "consume",
            LedgerOp::Grant { .. } => "grant",
            LedgerOp::Hold { .. } => "hold",
            LedgerOp::Settle { .. } => "settle",
            LedgerOp::Release { .. } => "release",
        }
    }
}
