//! Access rules (the seed's AccessControlManager): one per (creator, feature), validated,
//! versioned, recorded and announced by SQL (`tw_access_set_rule`, `tw_access_delete_rule`),
//! so the `service_role` door, the job and the CLI change rules alike.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;

/// Why a rule change failed.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    /// The rule (or an argument) is not acceptable; the message names the JSON path of the bad
    /// node, e.g. `$.condition.all[1].erc20.token: token 0x… is not indexed on chain 1514`.
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Db {
        what: &'static str,
        #[source]
        source: sqlx::Error,
    },
}

fn classify(what: &'static str) -> impl FnOnce(sqlx::Error) -> RuleError {
    move |source| match &source {
        sqlx::Error::Database(e) if e.code().as_deref() == Some("22023") => {
            RuleError::Invalid(e.message().to_string())
        }
        _ => RuleError::Db { what, source },
    }
}

/// A stored rule.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredRule {
    pub creator_id: String,
    pub feature: String,
    /// `{condition, per_wallet, stale_policy}`.
    pub rule: Value,
    pub version: i32,
    pub updated_by: String,
    pub updated_at: DateTime<Utc>,
}

/// One recorded change.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleChange {
    pub id: i64,
    pub old_rule: Option<Value>,
    pub new_rule: Option<Value>,
    pub old_version: Option<i32>,
    pub new_version: Option<i32>,
    pub changed_by: String,
    pub changed_at: DateTime<Utc>,
}

type RuleRow = (String, String, Value, i32, String, DateTime<Utc>);
type ChangeRow = (
    i64,
    Option<Value>,
    Option<Value>,
    Option<i32>,
    Option<i32>,
    String,
    DateTime<Utc>,
);

/// Reads and changes rules.
#[derive(Debug, Clone)]
pub struct RuleStore {
    pool: PgPool,
}

impl RuleStore {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Sets or replaces the rule of (creator, feature); returns its new version.
    pub async fn set(
        &self,
        creator: &str,
        feature: &str,
        rule: &Value,
        actor: &str,
    ) -> Result<i32, RuleError> {
        sqlx::query_scalar("SELECT public.tw_access_set_rule($1, $2, $3, $4)")
            .bind(creator)
            .bind(feature)
            .bind(rule)
            .bind(actor)
            .fetch_one(&self.pool)
            .await
            .map_err(classify("set an access rule"))
    }

    /// Deletes the rule of (creator, feature); `false` if there was none.
    pub async fn delete(
        &self,
        creator: &str,
        feature: &str,
        actor: &str,
    ) -> Result<bool, RuleError> {
        sqlx::query_scalar("SELECT public.tw_access_delete_rule($1, $2, $3)")
            .bind(creator)
            .bind(feature)
            .bind(actor)
            .fetch_one(&self.pool)
            .await
            .map_err(classify("delete an access rule"))
    }

    /// The rules of `creator` (every rule when `None`), by creator and feature.
    pub async fn list(&self, creator: Option<&str>) -> Result<Vec<StoredRule>, RuleError> {
        let rows: Vec<RuleRow> = sqlx::query_as(
            "SELECT creator_id, feature, rule, version, updated_by, updated_at \
             FROM public.access_rules WHERE $1::text IS NULL OR creator_id = $1 \
             ORDER BY creator_id, feature",
        )
        .bind(creator)
        .fetch_all(&self.pool)
        .await
        .map_err(classify("list access rules"))?;
        Ok(rows
            .into_iter()
            .map(
                |(creator_id, feature, rule, version, updated_by, updated_at)| StoredRule {
                    creator_id,
                    feature,
                    rule,
                    version,
                    updated_by,
                    updated_at,
                },
            )
            .collect())
    }

    /// Every change of the rule of (creator, feature), oldest first.
    pub async fn history(
        &self,
        creator: &str,
        feature: &str,
    ) -> Result<Vec<RuleChange>, RuleError> {
        let rows: Vec<ChangeRow> = sqlx::query_as(
            "SELECT id, old_rule, new_rule, old_version, new_version, changed_by, changed_at \
             FROM public.access_rule_changes WHERE creator_id = $1 AND feature = $2 ORDER BY id",
        )
        .bind(creator)
        .bind(feature)
        .fetch_all(&self.pool)
        .await
        .map_err(classify("read access rule changes"))?;
        Ok(rows
            .into_iter()
            .map(
                |(id, old_rule, new_rule, old_version, new_version, changed_by, changed_at)| {
                    RuleChange {
                        id,
                        old_rule,
                        new_rule,
                        old_version,
                        new_version,
                        changed_by,
                        changed_at,
                    }
                },
            )
            .collect())
    }
}
