//! The gateway of `whitelists` and `whitelist_entries`. The list rules (validation, window,
//! capacity, freeze, idempotency) live in SQL (`tw_whitelist_open`, `tw_whitelist_close`,
//! `tw_whitelist_request`), so the service-role door, the user's door, the job and the CLI
//! apply them alike; this file only calls them and types what they return.

use alloy::primitives::{Address, U256};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::access::Decision;
use crate::chain::decode::addr_hex;

/// Why a whitelist operation failed (a refused place is a [`Placement`], not an error).
#[derive(Debug, thiserror::Error)]
pub enum WhitelistError {
    /// Bad input, named by SQL: a rule with the JSON path of its bad node, a window, a
    /// capacity, an unknown list.
    #[error("{0}")]
    Invalid(String),
    #[error("creator {creator} already has a whitelist named {name:?}")]
    DuplicateName { creator: String, name: String },
    #[error("whitelist {0} does not exist")]
    NotFound(Uuid),
    #[error("{what}: {source}")]
    Db {
        what: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("{what} returned JSON this worker cannot read: {source}")]
    Decode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("whitelist {whitelist}: stored amount {amount:?} is not a uint256")]
    Amount { whitelist: Uuid, amount: String },
}

fn classify(what: &'static str) -> impl FnOnce(sqlx::Error) -> WhitelistError {
    move |source| match &source {
        sqlx::Error::Database(e) if e.code().as_deref() == Some("22023") => {
            WhitelistError::Invalid(e.message().to_string())
        }
        _ => WhitelistError::Db { what, source },
    }
}

/// What a creator gives to open a list.
#[derive(Debug, Clone)]
pub struct OpenRequest {
    pub creator_id: String,
    pub name: String,
    /// An access rule `{condition, per_wallet?, stale_policy?}` (docs/access.md).
    pub rule: Value,
    pub opens_at: DateTime<Utc>,
    pub closes_at: DateTime<Utc>,
    /// `None`: no limit.
    pub capacity: Option<u32>,
    pub actor: String,
}

/// Open (taking requests while inside its window) or closed (frozen).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListStatus {
    Open,
    Closed,
}

/// A stored list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Whitelist {
    pub id: Uuid,
    pub creator_id: String,
    pub name: String,
    pub rule: Value,
    pub opens_at: DateTime<Utc>,
    pub closes_at: DateTime<Utc>,
    pub capacity: Option<i32>,
    pub granted: i32,
    pub status: ListStatus,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub closed_by: Option<String>,
    pub closed_at: Option<DateTime<Utc>>,
}

/// Granted or refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlaceStatus {
    Granted,
    Refused,
}

/// Why a place was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlaceRefusal {
    /// No list with that id (not stored).
    UnknownWhitelist,
    /// Before `opens_at` (not stored).
    NotOpen,
    /// Closed, or past `closes_at`: the list is frozen (not stored).
    Closed,
    /// Every place is taken.
    Full,
    /// The address asked for is not a wallet the user proved.
    NotYourWallet,
    /// That wallet already holds a place on this list through another user.
    AddressTaken,
    /// The rule's decision: no proven wallet.
    NoWallet,
    /// The rule's decision: the holdings do not meet it.
    NotMet,
    /// The rule's decision: a chain of the rule is stale and the rule says deny.
    Stale,
    /// The rule's decision (kept for the decision's full vocabulary).
    NoRule,
}

/// The answer to a place request, as `tw_whitelist_request` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub whitelist_id: Uuid,
    pub user_id: Uuid,
    /// The request whose decision this is (an earlier one when the place was granted before).
    pub decided_by_request: Uuid,
    pub status: PlaceStatus,
    pub reason: Option<PlaceRefusal>,
    /// The wallet holding the place (granted only).
    pub address: Option<String>,
    /// The allowlist amount (granted only), decimal.
    pub amount: Option<String>,
    /// The access decision with its evidence (absent for refusals outside the window).
    pub decision: Option<Decision>,
    pub decided_at: DateTime<Utc>,
}

/// One granted place, for the export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Place {
    pub address: Address,
    pub amount: U256,
    pub user_id: Uuid,
    pub decided_at: DateTime<Utc>,
}

type ListRow = (
    Uuid,
    String,
    String,
    Value,
    DateTime<Utc>,
    DateTime<Utc>,
    Option<i32>,
    i32,
    String,
    String,
    DateTime<Utc>,
    Option<String>,
    Option<DateTime<Utc>>,
);

/// The columns of [`ListRow`], in its order.
macro_rules! list_select {
    ($rest:literal) => {
        concat!(
            "SELECT id, creator_id, name, rule, opens_at, closes_at, capacity, granted, status, \
             created_by, created_at, closed_by, closed_at FROM public.whitelists ",
            $rest
        )
    };
}

fn list_from(r: ListRow) -> Whitelist {
    Whitelist {
        id: r.0,
        creator_id: r.1,
        name: r.2,
        rule: r.3,
        opens_at: r.4,
        closes_at: r.5,
        capacity: r.6,
        granted: r.7,
        status: if r.8 == "closed" {
            ListStatus::Closed
        } else {
            ListStatus::Open
        },
        created_by: r.9,
        created_at: r.10,
        closed_by: r.11,
        closed_at: r.12,
    }
}

/// Reads and changes whitelists.
#[derive(Debug, Clone)]
pub struct WhitelistStore {
    pool: PgPool,
}

impl WhitelistStore {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Opens a list; returns its id.
    pub async fn open(&self, req: &OpenRequest) -> Result<Uuid, WhitelistError> {
        let capacity = req
            .capacity
            .map(|c| {
                i32::try_from(c).map_err(|_| {
                    WhitelistError::Invalid(format!("capacity {c} is more than {}", i32::MAX))
                })
            })
            .transpose()?;
        // Checked before building the range: Postgres refuses a reversed range on its own,
        // with a message that does not say which bound.
        if req.closes_at <= req.opens_at {
            return Err(WhitelistError::Invalid(format!(
                "the window must have an opening and a later closing time (opens_at {}, closes_at {})",
                req.opens_at.to_rfc3339(),
                req.closes_at.to_rfc3339()
            )));
        }
        sqlx::query_scalar(
            "SELECT public.tw_whitelist_open($1, $2, $3, pg_catalog.tstzrange($4, $5, '[)'), $6, $7)",
        )
        .bind(&req.creator_id)
        .bind(&req.name)
        .bind(&req.rule)
        .bind(req.opens_at)
        .bind(req.closes_at)
        .bind(capacity)
        .bind(&req.actor)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(d) if d.code().as_deref() == Some("23505") => {
                WhitelistError::DuplicateName {
                    creator: req.creator_id.clone(),
                    name: req.name.clone(),
                }
            }
            _ => classify("tw_whitelist_open")(e),
        })
    }

    /// Closes a list (freezes it): true when this call closed it, false when it was closed.
    pub async fn close(&self, id: Uuid, actor: &str) -> Result<bool, WhitelistError> {
        sqlx::query_scalar("SELECT public.tw_whitelist_close($1, $2)")
            .bind(id)
            .bind(actor)
            .fetch_one(&self.pool)
            .await
            .map_err(classify("tw_whitelist_close"))
    }

    pub async fn get(&self, id: Uuid) -> Result<Whitelist, WhitelistError> {
        let row: Option<ListRow> = sqlx::query_as(list_select!("WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(classify("read whitelist"))?;
        row.map(list_from).ok_or(WhitelistError::NotFound(id))
    }

    /// Every list, or one creator's, newest first.
    pub async fn list(&self, creator: Option<&str>) -> Result<Vec<Whitelist>, WhitelistError> {
        let rows: Vec<ListRow> = sqlx::query_as(list_select!(
            "WHERE $1::text IS NULL OR creator_id = $1 ORDER BY created_at DESC, id"
        ))
        .bind(creator)
        .fetch_all(&self.pool)
        .await
        .map_err(classify("list whitelists"))?;
        Ok(rows.into_iter().map(list_from).collect())
    }

    /// Asks for a place for `user` (optionally on one of their wallets).
    pub async fn request(
        &self,
        whitelist: Uuid,
        user: Uuid,
        request_id: Uuid,
        address: Option<Address>,
    ) -> Result<Placement, WhitelistError> {
        let v: Value = sqlx::query_scalar("SELECT public.tw_whitelist_request($1, $2, $3, $4)")
            .bind(whitelist)
            .bind(user)
            .bind(request_id)
            .bind(address.map(|a| addr_hex(&a)))
            .fetch_one(&self.pool)
            .await
            .map_err(classify("tw_whitelist_request"))?;
        serde_json::from_value(v).map_err(|source| WhitelistError::Decode {
            what: "tw_whitelist_request",
            source,
        })
    }

    /// The granted places of a list, by address.
    pub async fn places(&self, whitelist: Uuid) -> Result<Vec<Place>, WhitelistError> {
        let rows: Vec<(String, String, Uuid, DateTime<Utc>)> = sqlx::query_as(
            "SELECT address, amount::text, user_id, decided_at FROM public.whitelist_entries \
             WHERE whitelist_id = $1 AND status = 'granted' ORDER BY address",
        )
        .bind(whitelist)
        .fetch_all(&self.pool)
        .await
        .map_err(classify("read whitelist places"))?;
        rows.into_iter()
            .map(|(address, amount, user_id, decided_at)| {
                let bad = || WhitelistError::Amount {
                    whitelist,
                    amount: amount.clone(),
                };
                Ok(Place {
                    address: address.parse().map_err(|_| bad())?,
                    amount: amount.parse().map_err(|_| bad())?,
                    user_id,
                    decided_at,
                })
            })
            .collect()
    }
}
