//! The queue door's checks: the decision cache in front of the evaluation. A cache failure
//! never denies: the check goes to the index instead. The cache is also the first step of the
//! external verifiers' fallback: a fresh cached decision is answered without asking them.

use std::sync::Arc;

use uuid::Uuid;

use super::cache::{DecisionCache, Lookup, rule_key};
use super::checks::{AccessChecker, CheckError, Question};
use super::decision::{Decision, Source};

/// Checks through the cache.
#[derive(Clone)]
pub struct AccessService {
    checker: AccessChecker,
    cache: Option<Arc<DecisionCache>>,
}

impl AccessService {
    pub fn new(checker: AccessChecker, cache: Option<Arc<DecisionCache>>) -> Self {
        Self { checker, cache }
    }

    /// The decision for `user` on `question`: cached if still valid, else evaluated and cached.
    pub async fn verify(&self, user: Uuid, question: &Question) -> Result<Decision, CheckError> {
        let rule = rule_key(&question.creator_id(), question.feature());
        let mut epochs = None;
        if let Some(cache) = &self.cache {
            match cache.get(user, &rule).await {
                Ok(Lookup::Hit(d)) => {
                    count(Source::Cache);
                    return Ok(*d);
                }
                Ok(Lookup::Miss(e)) => epochs = Some(e),
                Err(e) => {
                    tracing::warn!(error = %e, "decision cache unavailable; reading the index")
                }
            }
        }
        let decision = self.checker.evaluate(user, question).await?;
        count(decision.source);
        // A fallback decision is not cached: the next check asks the verifier again (its
        // breaker makes that cheap while it is down).
        if let (Some(cache), Some(epochs)) = (&self.cache, epochs)
            && decision.source != Source::Fallback
            && let Err(e) = cache.put(user, &rule, epochs, &decision).await
        {
            tracing::warn!(error = %e, "cannot cache a decision");
        }
        Ok(decision)
    }
}

fn count(source: Source) {
    metrics::counter!("tokenwarden_access_checks_total", "source" => source.as_str()).increment(1);
}
