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
}

/// One wallet's amount in a leaf.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalletAmount {
    pub address: String,
    /// Base units (ERC-20, snapshot) or NFTs owned (ERC-721), decimal string.
    pub amount: String,
}

/// What one leaf of the rule found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// JSON path of the leaf in the rule, e.g. `$.condition.all[0].erc20`.
    pub path: String,
    /// `erc20`, `erc721`, `snapshot` or `held`.
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
    /// The minimum in the same unit as `amount`.
    pub minimum: String,
    /// Sum over the wallets, or the best wallet's when the rule is per wallet (`held`: the
    /// lowest balance over the window).
    pub amount: String,
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
    pub checked_at: DateTime<Utc>,
}
