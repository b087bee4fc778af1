//! The gateway to `access_grants` and `access_events`: who currently passes each rule and every
//! change of that. The comparison itself is SQL (`tw_access_transition`, next to the one
//! evaluation): this module only says whom to re-evaluate, and reads and marks the events.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// A database statement of the monitor failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct TransitionError {
    what: &'static str,
    #[source]
    source: sqlx::Error,
}

fn db(what: &'static str) -> impl FnOnce(sqlx::Error) -> TransitionError {
    move |source| TransitionError { what, source }
}

/// What made the monitor re-evaluate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// An announcement of the indexer named the user's wallet.
    BalanceChange,
    /// The indexer undid blocks that touched the user's wallet.
    Reorg,
    /// The scheduled full re-check.
    Recheck,
    /// The rule was set, replaced or deleted.
    RuleChange,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::BalanceChange => "balance_change",
            Cause::Reorg => "reorg",
            Cause::Recheck => "recheck",
            Cause::RuleChange => "rule_change",
        }
    }
}

/// Whether the user started or stopped passing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Granted,
    Revoked,
}

/// One row of `access_events`: what a chat server acts on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct AccessEvent {
    pub id: i64,
    pub user_id: Uuid,
    pub creator_id: String,
    pub feature: String,
    pub kind: EventKind,
    /// `met` when granted; the decision's deny reason (`not_met`, `no_wallet`, `no_rule`) when
    /// revoked.
    pub reason: String,
    pub cause: Cause,
    pub rule_version: Option<i32>,
    pub chain_id: Option<i64>,
    /// The block the amounts were read at (the chain's checkpoint then).
    pub block: Option<i64>,
    pub at: DateTime<Utc>,
}

const EVENT_COLUMNS: &str =
    "id, user_id, creator_id, feature, kind, reason, cause, rule_version, chain_id, block, at";

/// The monitor's statements.
#[derive(Debug, Clone)]
pub struct TransitionStore {
    pool: PgPool,
}

impl TransitionStore {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Re-evaluates the users owning `holders` on every rule that names `token` on `chain_id`,
    /// on `conn` (the monitor's lease connection); returns the events written.
    pub async fn on_balance_change(
        conn: &mut PgConnection,
        chain_id: u64,
        token: &str,
        holders: &[String],
        cause: Cause,
    ) -> Result<Vec<AccessEvent>, TransitionError> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM public.tw_access_on_balance_change($1, $2, $3, $4)"
        )))
        .bind(i64::try_from(chain_id).unwrap_or(i64::MAX))
        .bind(token)
        .bind(holders)
        .bind(cause.as_str())
        .fetch_all(conn)
        .await
        .map_err(db("re-evaluate access after a balance change"))
    }

    /// Re-evaluates every candidate of one rule (current grants and proven holders of its
    /// tokens), `batch` users per transaction; returns the events written.
    pub async fn recheck_rule(
        &self,
        creator_id: &str,
        feature: &str,
        cause: Cause,
        batch: usize,
    ) -> Result<Vec<AccessEvent>, TransitionError> {
        let users: Vec<Uuid> =
            sqlx::query_scalar("SELECT public.tw_access_recheck_candidates($1, $2)")
                .bind(creator_id)
                .bind(feature)
                .fetch_all(&self.pool)
                .await
                .map_err(db("list the candidates of an access rule"))?;
        let mut events = Vec::new();
        for chunk in users.chunks(batch.max(1)) {
            let mut got: Vec<AccessEvent> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {EVENT_COLUMNS} FROM public.tw_access_reevaluate($1, $2, $3, $4, NULL)"
            )))
            .bind(chunk)
            .bind(creator_id)
            .bind(feature)
            .bind(cause.as_str())
            .fetch_all(&self.pool)
            .await
            .map_err(db("re-evaluate the users of an access rule"))?;
            events.append(&mut got);
        }
        Ok(events)
    }

    /// Every (creator, feature) the full re-check covers: the rules, and deleted rules that
    /// still have current grants.
    pub async fn rules_to_recheck(&self) -> Result<Vec<(String, String)>, TransitionError> {
        sqlx::query_as("SELECT creator_id, feature FROM public.tw_access_recheck_rules()")
            .fetch_all(&self.pool)
            .await
            .map_err(db("list the access rules to re-check"))
    }

    /// Events not yet on the stream, oldest first.
    pub async fn unpublished(&self, limit: i64) -> Result<Vec<AccessEvent>, TransitionError> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM public.access_events WHERE published_at IS NULL \
             ORDER BY id LIMIT $1"
        )))
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db("read unpublished access events"))
    }

    /// Records that `ids` are on the stream.
    pub async fn mark_published(&self, ids: &[i64]) -> Result<(), TransitionError> {
        sqlx::query(
            "UPDATE public.access_events SET published_at = pg_catalog.clock_timestamp() \
             WHERE id = ANY($1) AND published_at IS NULL",
        )
        .bind(ids)
        .execute(&self.pool)
        .await
        .map_err(db("mark access events published"))?;
        Ok(())
    }

    /// The user's events, newest first (operators, tests).
    pub async fn events_of(
        &self,
        user: Uuid,
        limit: i64,
    ) -> Result<Vec<AccessEvent>, TransitionError> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM public.access_events WHERE user_id = $1 \
             ORDER BY id DESC LIMIT $2"
        )))
        .bind(user)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db("read a user's access events"))
    }
}
