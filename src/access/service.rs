//! The queue door's checks: the decision cache in front of the evaluation. A cache failure
//! never denies: the check goes to the index instead. The cache is also the first step of the
//! external verifiers' fallback: a fresh cached decision is answered without asking them.
//!
//! Checks that arrive together are served together: one task takes whatever checks are
//! waiting (up to [`MAX_BATCH`], with no waiting of its own, like the audit recorder) and hands
//! them to a batch, of which at most [`BATCHES_IN_FLIGHT`] run at once. A batch reads the cache
//! with one Redis round trip, evaluates its misses with one SQL statement, and stores the fresh
//! decisions with one Redis script call. A quiet worker thus serves each check alone, as
//! before; a busy one pays those round trips once per batch instead of once per check.
//!
//! A fresh decision is answered before its cache write ends, with a [`Cached`] that resolves
//! when it has: the queue door records the check in the audit meanwhile and replies once both
//! are done, so a reply still means the decision is cached, without the two waits adding up.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use super::cache::{DecisionCache, Lookup, Put, rule_key};
use super::checks::{AccessChecker, CheckError, Question};
use super::decision::{Decision, Source};

/// Most checks one batch serves. A batch's misses are one SQL statement: at ~0.1 ms of
/// evaluation each, 256 keep a statement near 25 ms, and the batches in flight keep both cores
/// busy.
const MAX_BATCH: usize = 256;
/// Batches served at once (each holds at most one Postgres connection while it evaluates).
const BATCHES_IN_FLIGHT: usize = 4;

type Answer = oneshot::Sender<Result<(Decision, Cached), Arc<CheckError>>>;

/// Resolves once the decision it came with is in the cache (or its write failed, which is
/// logged): at once for a decision read from the cache or with no cache configured.
pub struct Cached(Option<watch::Receiver<()>>);

impl Cached {
    pub async fn written(self) {
        if let Some(mut rx) = self.0 {
            // The batch never sends: it drops its sender once its cache write is over, and
            // that ends this wait.
            let _ = rx.changed().await;
        }
    }
}

struct Pending {
    user: Uuid,
    question: Question,
    answer: Answer,
}

/// A check failed (shared by the checks of a batch that failed together).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Check(Arc<CheckError>),
    #[error("the access check service has stopped")]
    Stopped,
}

/// Checks through the cache. Cheap to clone; the batching task ends when the last clone is
/// dropped.
#[derive(Clone)]
pub struct AccessService {
    tx: mpsc::Sender<Pending>,
}

impl AccessService {
    /// Starts the batching task (needs a Tokio runtime).
    pub fn new(checker: AccessChecker, cache: Option<Arc<DecisionCache>>) -> Self {
        let (tx, rx) = mpsc::channel(MAX_BATCH * BATCHES_IN_FLIGHT * 4);
        let batcher = Arc::new(Batcher { checker, cache });
        tokio::spawn(super::batches::serve_in_batches(
            rx,
            MAX_BATCH,
            BATCHES_IN_FLIGHT,
            move |batch| {
                let batcher = batcher.clone();
                async move { batcher.serve(batch).await }
            },
        ));
        Self { tx }
    }

    /// The decision for `user` on `question`: cached if still valid, else evaluated and cached
    /// (the write may still be under way: await the [`Cached`]).
    pub async fn verify(
        &self,
        user: Uuid,
        question: &Question,
    ) -> Result<(Decision, Cached), ServiceError> {
        let (answer, rx) = oneshot::channel();
        self.tx
            .send(Pending {
                user,
                question: question.clone(),
                answer,
            })
            .await
            .map_err(|_| ServiceError::Stopped)?;
        rx.await
            .map_err(|_| ServiceError::Stopped)?
            .map_err(ServiceError::Check)
    }
}

struct Batcher {
    checker: AccessChecker,
    cache: Option<Arc<DecisionCache>>,
}

impl Batcher {
    async fn serve(&self, batch: Vec<Pending>) {
        let rules: Vec<String> = batch
            .iter()
            .map(|p| rule_key(&p.question.creator_id(), p.question.feature()))
            .collect();
        let users: Vec<Uuid> = batch.iter().map(|p| p.user).collect();
        let mut epochs = vec![None; batch.len()];
        let mut misses = Vec::with_capacity(batch.len());
        let mut pending: Vec<Option<Pending>> = batch.into_iter().map(Some).collect();
        match &self.cache {
            Some(cache) => {
                let keys: Vec<(Uuid, &str)> = users
                    .iter()
                    .zip(&rules)
                    .map(|(&u, r)| (u, r.as_str()))
                    .collect();
                match cache.get_many(&keys).await {
                    Ok(found) => {
                        for (i, lookup) in found.into_iter().enumerate() {
                            match lookup {
                                Lookup::Hit(d) => {
                                    count(Source::Cache);
                                    if let Some(p) = pending[i].take() {
                                        let _ = p.answer.send(Ok((*d, Cached(None))));
                                    }
                                }
                                Lookup::Miss(e) => {
                                    epochs[i] = Some(e);
                                    misses.push(i);
                                }
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "decision cache unavailable; reading the index");
                        misses.extend(0..pending.len());
                    }
                }
            }
            None => misses.extend(0..pending.len()),
        }
        if misses.is_empty() {
            return;
        }
        let questions: Vec<(Uuid, &Question)> = misses
            .iter()
            .filter_map(|&i| pending[i].as_ref().map(|p| (p.user, &p.question)))
            .collect();
        let decisions = match self.checker.evaluate_many(&questions).await {
            Ok(d) => d,
            Err(e) => {
                let e = Arc::new(e);
                for &i in &misses {
                    if let Some(p) = pending[i].take() {
                        let _ = p.answer.send(Err(e.clone()));
                    }
                }
                return;
            }
        };
        // Answered now, each with a receiver of the cache write below: dropping `written` at
        // the end of the batch tells them it is over.
        let written = self.cache.as_ref().map(|_| watch::channel(()).0);
        for (&i, decision) in misses.iter().zip(&decisions) {
            count(decision.source);
            if let Some(p) = pending[i].take() {
                let cached = Cached(written.as_ref().map(watch::Sender::subscribe));
                let _ = p.answer.send(Ok((decision.clone(), cached)));
            }
        }
        // A fallback decision is not cached: the next check asks the verifier again (its
        // breaker makes that cheap while it is down).
        if let Some(cache) = &self.cache {
            let puts: Vec<Put<'_>> = misses
                .iter()
                .zip(&decisions)
                .filter(|(_, d)| d.source != Source::Fallback)
                .filter_map(|(&i, d)| {
                    Some(Put {
                        user: users[i],
                        rule: &rules[i],
                        epochs: epochs[i]?,
                        decision: d,
                    })
                })
                .collect();
            if let Err(e) = cache.put_many(&puts).await {
                tracing::warn!(error = %e, "cannot cache decisions");
            }
        }
        drop(written);
    }
}

fn count(source: Source) {
    metrics::counter!("tokenwarden_access_checks_total", "source" => source.as_str()).increment(1);
}
