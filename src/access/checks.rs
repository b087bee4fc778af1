//! Access checks (the seed's TokenVerificationService): the Rust door to `tw_access_evaluate`,
//! the one evaluation the SQL doors use too, so every door gives the same decision.

use std::sync::Arc;

use alloy::primitives::Address;
use sqlx::PgPool;
use uuid::Uuid;

use super::decision::Decision;
use super::verifiers::Verifiers;
use super::verifiers::resolve::{ExternalQuestion, answers};
use crate::chain::decode::addr_hex;

/// A check could not be answered (a denial is a [`Decision`], not an error).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("{what}: {source}")]
    Db {
        what: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("tw_access_evaluate returned a decision this worker cannot read: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("tw_access_evaluate_many returned fewer rows than it was asked questions")]
    Missing,
}

fn db(what: &'static str) -> impl FnOnce(sqlx::Error) -> CheckError {
    move |source| CheckError::Db { what, source }
}

/// What is asked: a creator's feature, or the seed's form (a token's feature, with the default
/// "hold at least 1" when no rule is set for creator `"<chain_id>:<token>"`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Question {
    Creator {
        creator_id: String,
        feature: String,
    },
    Token {
        chain_id: u64,
        token: Address,
        feature: String,
    },
}

impl Question {
    /// The creator id the rule is stored under.
    pub fn creator_id(&self) -> String {
        match self {
            Question::Creator { creator_id, .. } => creator_id.clone(),
            Question::Token {
                chain_id, token, ..
            } => format!("{chain_id}:{}", addr_hex(token)),
        }
    }

    pub fn feature(&self) -> &str {
        match self {
            Question::Creator { feature, .. } | Question::Token { feature, .. } => feature,
        }
    }
}

/// Answers access questions from the index and snapshots, and (with verifiers) asks the
/// external verifiers a rule names.
#[derive(Debug, Clone)]
pub struct AccessChecker {
    pool: PgPool,
    verifiers: Option<Arc<Verifiers>>,
}

impl AccessChecker {
    /// A checker that asks no verifier: external leaves are decided by the fallback.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            verifiers: None,
        }
    }

    /// Asks these verifiers for the rules' external leaves.
    pub fn with_verifiers(mut self, verifiers: Arc<Verifiers>) -> Self {
        self.verifiers = (!verifiers.is_empty()).then_some(verifiers);
        self
    }

    /// The decision for `user` on `question`, read now. A rule with external leaves has them
    /// asked first (two statements instead of one); SQL decides the tree with the answers.
    pub async fn evaluate(&self, user: Uuid, question: &Question) -> Result<Decision, CheckError> {
        if let Some(verifiers) = &self.verifiers {
            let questions: Vec<ExternalQuestion> = sqlx::query_as(
                "SELECT leaf_path, leaf, wallets FROM public.tw_access_external_questions($1, $2, $3)",
            )
            .bind(user)
            .bind(question.creator_id())
            .bind(question.feature())
            .fetch_all(&self.pool)
            .await
            .map_err(db("list the external leaves of an access rule"))?;
            if !questions.is_empty() {
                let external = answers(verifiers, &questions).await;
                return self.evaluate_resolved(user, question, external).await;
            }
        }
        let v: serde_json::Value = match question {
            Question::Creator {
                creator_id,
                feature,
            } => sqlx::query_scalar("SELECT public.tw_access_evaluate($1, $2, $3)")
                .bind(user)
                .bind(creator_id)
                .bind(feature)
                .fetch_one(&self.pool)
                .await
                .map_err(db("evaluate an access rule"))?,
            Question::Token {
                chain_id,
                token,
                feature,
            } => sqlx::query_scalar("SELECT public.tw_access_evaluate_token($1, $2, $3, $4)")
                .bind(user)
                .bind(i64::try_from(*chain_id).unwrap_or(i64::MAX))
                .bind(addr_hex(token))
                .bind(feature)
                .fetch_one(&self.pool)
                .await
                .map_err(db("evaluate a token access rule"))?,
        };
        Ok(serde_json::from_value(v)?)
    }

    async fn evaluate_resolved(
        &self,
        user: Uuid,
        question: &Question,
        external: serde_json::Value,
    ) -> Result<Decision, CheckError> {
        let default = match question {
            Question::Creator { .. } => None,
            Question::Token {
                chain_id, token, ..
            } => Some((
                i64::try_from(*chain_id).unwrap_or(i64::MAX),
                addr_hex(token),
            )),
        };
        let v: serde_json::Value = sqlx::query_scalar(
            "SELECT public.tw_access_evaluate_resolved($1, $2, $3, \
               CASE WHEN $4::bigint IS NULL THEN NULL \
                    ELSE public.tw_access_default_condition($4, $5) END, $6)",
        )
        .bind(user)
        .bind(question.creator_id())
        .bind(question.feature())
        .bind(default.as_ref().map(|d| d.0))
        .bind(default.as_ref().map(|d| d.1.clone()))
        .bind(external)
        .fetch_one(&self.pool)
        .await
        .map_err(db("evaluate an access rule with the verifiers' answers"))?;
        Ok(serde_json::from_value(v)?)
    }

    /// Many questions in one statement (the queue door's cold checks of a batch): one round
    /// trip and one plan instead of one per check, in the order given. With verifiers, a
    /// question whose rule has an external leaf comes back unevaluated and is asked on its own
    /// ([`evaluate`](Self::evaluate): the verifiers first, then the tree with their answers).
    pub async fn evaluate_many(
        &self,
        checks: &[(Uuid, &Question)],
    ) -> Result<Vec<Decision>, CheckError> {
        if checks.is_empty() {
            return Ok(Vec::new());
        }
        let mut users = Vec::with_capacity(checks.len());
        let mut creators = Vec::with_capacity(checks.len());
        let mut features = Vec::with_capacity(checks.len());
        let mut chains: Vec<Option<i64>> = Vec::with_capacity(checks.len());
        let mut tokens: Vec<Option<String>> = Vec::with_capacity(checks.len());
        for (user, question) in checks {
            users.push(*user);
            creators.push(question.creator_id());
            features.push(question.feature().to_string());
            match question {
                Question::Creator { .. } => {
                    chains.push(None);
                    tokens.push(None);
                }
                Question::Token {
                    chain_id, token, ..
                } => {
                    chains.push(Some(i64::try_from(*chain_id).unwrap_or(i64::MAX)));
                    tokens.push(Some(addr_hex(token)));
                }
            }
        }
        let rows: Vec<Option<serde_json::Value>> = sqlx::query_scalar(
            "SELECT decision FROM public.tw_access_evaluate_many($1, $2, $3, $4, $5, $6) \
             ORDER BY ord",
        )
        .bind(&users)
        .bind(&creators)
        .bind(&features)
        .bind(&chains)
        .bind(&tokens)
        .bind(self.verifiers.is_some())
        .fetch_all(&self.pool)
        .await
        .map_err(db("evaluate access rules for a batch of checks"))?;
        if rows.len() != checks.len() {
            return Err(CheckError::Missing);
        }
        // The questions left for the verifiers are asked concurrently, like separate checks.
        let asked = futures::future::join_all(
            checks
                .iter()
                .zip(&rows)
                .filter(|(_, row)| row.is_none())
                .map(|((user, question), _)| self.evaluate(*user, question)),
        )
        .await;
        let mut asked = asked.into_iter();
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            out.push(match row {
                Some(v) => serde_json::from_value(v)?,
                None => asked.next().ok_or(CheckError::Missing)??,
            });
        }
        Ok(out)
    }

    /// Many users against one creator's feature in one statement (the seed's batch).
    pub async fn evaluate_batch(
        &self,
        users: &[Uuid],
        creator_id: &str,
        feature: &str,
    ) -> Result<Vec<Decision>, CheckError> {
        let rows: Vec<serde_json::Value> = sqlx::query_scalar(
            "SELECT public.tw_access_evaluate(u, $2, $3) \
             FROM unnest($1::uuid[]) WITH ORDINALITY AS x(u, i) ORDER BY i",
        )
        .bind(users)
        .bind(creator_id)
        .bind(feature)
        .fetch_all(&self.pool)
        .await
        .map_err(db("evaluate an access rule for a batch"))?;
        rows.into_iter()
            .map(|v| serde_json::from_value(v).map_err(CheckError::from))
            .collect()
    }
}
