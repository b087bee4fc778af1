//! One batching task per process between the ledger job handlers and Postgres.
//!
//! Handlers send their validated operation and wait on a oneshot. The task drains whatever has
//! arrived (up to `ledger.max_batch`, with no artificial delay: under low load a batch is one
//! operation and latency stays low, under high load batches fill up by themselves while the
//! previous one commits), calls [`ApplyBatch::apply`] once per batch (one Postgres
//! transaction), and answers every handler. Only then do the handlers resolve, so the queue
//! acknowledges entries after their commit. A database error fails the whole batch: every
//! handler gets it as a retryable error and its entry is redelivered.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::{LedgerOp, Outcome};

/// What the batcher needs from the ledger: apply a batch in one transaction, outcomes aligned
/// with the input.
pub trait ApplyBatch: Send + Sync + 'static {
    fn apply_batch<'a>(
        &'a self,
        ops: &'a [LedgerOp],
    ) -> Pin<Box<dyn Future<Output = Result<Vec<Outcome>, String>> + Send + 'a>>;
}

type Request = (LedgerOp, oneshot::Sender<Result<Outcome, String>>);

/// Submits operations to the batching task. Cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Request>,
}

impl Batcher {
    /// Starts the batching task over `ledger`. It ends when every [`Batcher`] is dropped.
    pub fn spawn(
        ledger: Arc<dyn ApplyBatch>,
        max_batch: usize,
    ) -> (Batcher, tokio::task::JoinHandle<()>) {
        let max_batch = max_batch.max(1);
        let (tx, rx) = mpsc::channel(max_batch * 4);
        let task = tokio::spawn(run(ledger, max_batch, rx));
        (Batcher { tx }, task)
    }

    /// Applies `op` with the next batch; the error is why the batch failed (retryable).
    pub async fn apply(&self, op: LedgerOp) -> Result<Outcome, String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((op, tx))
            .await
            .map_err(|_| "ledger batcher has stopped".to_string())?;
        rx.await
            .map_err(|_| "ledger batcher dropped the operation".to_string())?
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
                let msg = format!(
                    "ledger returned {} outcomes for {} operations",
                    outcomes.len(),
                    ops.len()
                );
                tracing::error!("{msg}");
                for reply in replies {
                    let _ = reply.send(Err(msg.clone()));
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
    ) -> Pin<Box<dyn Future<Output = Result<Vec<Outcome>, String>> + Send + 'a>> {
        Box::pin(async move { self.apply(ops).await.map_err(|e| e.to_string()) })
    }
}
