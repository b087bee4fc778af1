//! One batching task per process between the ledger job handlers and Postgres.
//!
//! Handlers send their validated operation and wait on a oneshot. The task drains whatever has
//! arrived (up to `ledger.max_batch`, with no artificial delay: under low load a batch is one
//! operation and latency stays low, under high load batches fill up by themselves while the
//! previous one commits), calls [`ApplyBatch::apply`] once per batch (one Postgres
//! transaction), and answers every handler. Only then do the handlers resolve, so the queue
//! acknowledges entries after their commit. A database error fails the whole batch: every
//! handler gets it as a retryable error and its entry is redelivered. Except a data error
//! (SQLSTATE class 22, e.g. a value Postgres cannot store): one bad operation must not fail the
//! others, so the batch is re-applied one operation at a time and only the bad one fails, as
//! [`BatchError::bad_data`] (its job is rejected, not retried).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::{LedgerError, LedgerOp, Outcome, RejectedRequest};

/// Why a batch (or one operation) could not be applied. Cloned to every handler of the batch.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{cause}")]
pub struct BatchError {
    /// Postgres refused the operation's data (SQLSTATE class 22): retrying cannot help.
    pub bad_data: bool,
    #[source]
    pub cause: BatchFailure,
}

/// What went wrong, below [`BatchError`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum BatchFailure {
    #[error("ledger batcher has stopped")]
    Stopped,
    #[error("ledger batcher dropped the operation")]
    Dropped,
    #[error("ledger returned {got} outcomes for {expected} operations")]
    OutcomeCount { expected: usize, got: usize },
    #[error(transparent)]
    Ledger(Arc<LedgerError>),
}

impl BatchError {
    /// A failure worth retrying (the data may be fine).
    fn retryable(cause: BatchFailure) -> Self {
        Self {
            bad_data: false,
            cause,
        }
    }
}

/// A ledger error of a batch: `bad_data` when Postgres refused a value (SQLSTATE class 22).
impl From<LedgerError> for BatchError {
    fn from(e: LedgerError) -> Self {
        Self {
            bad_data: e.is_data_error(),
            cause: BatchFailure::Ledger(Arc::new(e)),
        }
    }
}

/// What the batcher needs from the ledger: apply a batch in one transaction, outcomes aligned
/// with the input.
pub trait ApplyBatch: Send + Sync + 'static {
    fn apply_batch<'a>(
        &'a self,
        ops: &'a [LedgerOp],
    ) -> Pin<Box<dyn Future<Output = Result<Vec<Outcome>, BatchError>> + Send + 'a>>;

    /// Records an invalid request's `rejected` outcome (see [`super::Ledger::record_rejected`]).
    fn record_rejected<'a>(
        &'a self,
        r: &'a RejectedRequest,
    ) -> Pin<Box<dyn Future<Output = Result<Outcome, BatchError>> + Send + 'a>>;
}

type Request = (LedgerOp, oneshot::Sender<Result<Outcome, BatchError>>);

/// Submits operations to the batching task. Cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Request>,
    ledger: Arc<dyn ApplyBatch>,
}

impl Batcher {
    /// Starts the batching task over `ledger`. It ends when every [`Batcher`] is dropped.
    pub fn spawn(
        ledger: Arc<dyn ApplyBatch>,
        max_batch: usize,
    ) -> (Batcher, tokio::task::JoinHandle<()>) {
        let max_batch = max_batch.max(1);
        let (tx, rx) = mpsc::channel(max_batch * 4);
        let task = tokio::spawn(run(ledger.clone(), max_batch, rx));
        (Batcher { tx, ledger }, task)
    }

    /// Records an invalid request's `rejected` outcome, outside the batches (rare).
    pub async fn record_rejected(&self, r: &RejectedRequest) -> Result<Outcome, BatchError> {
        self.ledger.record_rejected(r).await
    }

    /// Applies `op` with the next batch; the error is why the batch (or this op) failed.
    pub async fn apply(&self, op: LedgerOp) -> Result<Outcome, BatchError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((op, tx))
            .await
            .map_err(|_| BatchError::retryable(BatchFailure::Stopped))?;
        rx.await
            .map_err(|_| BatchError::retryable(BatchFailure::Dropped))?
    }
}

async fn run(ledger: Arc<dyn ApplyBatch>, max_batch: usize, mut rx: mpsc::Receiver<Request>) {
    let mut buf: Vec<Request> = Vec::with_capacity(max_batch);
    loop {
        buf.clear();
        if rx.recv_many(&mut buf, max_batch).await == 0 {
            return;
        }
        let (ops, replies): (Vec<LedgerOp>, Vec<_>) = buf.drain(..).unzip();
        // `tokenwarden_ledger_batch_size` is recorded by `Ledger::apply`, once per transaction.
        let t0 = std::time::Instant::now();
        let res = ledger.apply_batch(&ops).await;
        tracing::debug!(
            batch = ops.len(),
            elapsed_ms = t0.elapsed().as_secs_f64() * 1000.0,
            "ledger batch applied"
        );
        match res {
            Ok(outcomes) if outcomes.len() == ops.len() => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Ok(outcomes) => {
                let e = BatchError::retryable(BatchFailure::OutcomeCount {
                    expected: ops.len(),
                    got: outcomes.len(),
                });
                tracing::error!("{e}");
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
            Err(e) if e.bad_data && ops.len() > 1 => {
                tracing::warn!(error = %e, batch = ops.len(), "ledger batch refused data; applying its operations one by one");
                metrics::counter!("tokenwarden_ledger_batch_splits_total").increment(1);
                for (op, reply) in ops.iter().zip(replies) {
                    let one = ledger.apply_batch(std::slice::from_ref(op)).await;
                    let _ = reply.send(match one {
                        Ok(mut o) if o.len() == 1 => Ok(o.remove(0)),
                        Ok(o) => Err(BatchError::retryable(BatchFailure::OutcomeCount {
                            expected: 1,
                            got: o.len(),
                        })),
                        Err(e) => Err(e),
                    });
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, batch = ops.len(), "ledger batch failed; its jobs will be redelivered");
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

impl ApplyBatch for super::Ledger {
    fn apply_batch<'a>(
        &'a self,
        ops: &'a [LedgerOp],
    ) -> Pin<Box<dyn Future<Output = Result<Vec<Outcome>, BatchError>> + Send + 'a>> {
        Box::pin(async move { Ok(self.apply(ops).await?) })
    }

    fn record_rejected<'a>(
        &'a self,
        r: &'a RejectedRequest,
    ) -> Pin<Box<dyn Future<Output = Result<Outcome, BatchError>> + Send + 'a>> {
        Box::pin(async move {
            super::Ledger::record_rejected(self, r)
                .await
                .map_err(|e| BatchError::retryable(BatchFailure::Ledger(Arc::new(e))))
        })
    }
}
