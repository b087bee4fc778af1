//! An access decision as every door returns it: the JSON `tw_access_evaluate` builds (one
//! evaluation for the SQL, queue and CLI doors), typed for Rust callers.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Why a check was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DenyReason {
    /// No rule for (creator, feature), and the check named no token for the default.
    NoRule,
    /// The user has proven no wallet.
    NoWallet,
    /// A chain of the rule is stopped by a fault or lags its head, and the rule says deny.
    Stale,
    /// The holdings do not satisfy the rule.
    NotMet,
}

/// Where a decision's evidence came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A decision computed earlier, within its TTL and not invalidated since.
    Cache,
    /// The live chain index.
    Index,
    /// Only snapshots.
    Snapshot,
    /// An external verifier answered (some leaf), now.
    External,
    /// Some external leaf was decided by the fallback: the last successful verification of the
    /// same question (its age in `evidence_age_secs`), or the policy.
    Fallback,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Cache => "cache",
            Source::Index => "index",
            Source::Snapshot => "snapshot",
            Source::External => "external",
            Source::Fallback => "fallback",
        }
    }
}

/// One wallet's amount in a leaf.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalletAmount {
    pub address: String,
    /// Base units (ERC-20, snapshot, external) or NFTs owned (ERC-721), decimal string; none
    /// when the verifier answers yes/no (`tomo`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<String>,
    /// `tomo`: whether this wallet alone holds at least the minimum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub has_tokens: Option<bool>,
}

/// What one leaf of the rule found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// JSON path of the leaf in the rule, e.g. `$.condition.all[0].erc20`.
    pub path: String,
    /// `erc20`, `erc721`, `snapshot`, `held` or `external`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    /// `held`: the first block of the window (its balance at the start of this block counts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_from: Option<u64>,
    /// `external`: the verifier's name (`token` is the leaf's contract).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verifier: Option<String>,
    /// `external`: when the verifier gave the answer this leaf uses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<DateTime<Utc>>,
    /// `external` decided by the fallback: `last_verification` or `policy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// The policy applied (`restrictive` or `permissive`) when `fallback` is `policy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Age in seconds of a `last_verification` fallback's evidence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_secs: Option<u64>,
    /// Why the verifier gave no answer (breaker open, timeout, …), when it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_error: Option<String>,
    /// The minimum in the same unit as `amount`.
    pub minimum: String,
    /// Sum over the wallets, or the best wallet's when the rule is per wallet (`held`: the
    /// lowest balance over the window). None for a yes/no verifier or a policy fallback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<String>,
    pub wallets: Vec<WalletAmount>,
    /// The indexed block (or the snapshot's block) the amounts were read at.
    #[serde(default)]
    pub block: Option<u64>,
    pub source: Source,
    pub passed: bool,
    /// Why the chain's index cannot be trusted now, when it cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale: Option<String>,
}

/// The answer to "may this user use this feature of this creator now?".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub allowed: bool,
    pub reason: Option<DenyReason>,
    pub user_id: Uuid,
    pub creator_id: String,
    pub feature: String,
    /// The rule's version; 0 for the seed's default, `None` without a rule.
    pub rule_version: Option<i32>,
    pub source: Source,
    /// The oldest block any leaf was read at.
    pub as_of_block: Option<u64>,
    /// Whether some leaf read a stale chain index.
    pub stale: bool,
    pub evidence: Vec<Evidence>,
    /// With `source: fallback`: the age in seconds of the oldest recorded verification used
    /// (none when only the policy decided).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence_age_secs: Option<u64>,
    pub checked_at: DateTime<Utc>,
}
