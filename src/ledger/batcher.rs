//! One batching task per process between the ledger job handlers and Postgres.
//!
//! Handlers send their validated operation and wait on a oneshot. The task drains whatever has
//! arrived (up to `ledger.max_batch`, with no artificial delay: under low load a batch is one
//! operation and latency stays low, under high load batches fill up by themselves while the
//! previous one commits), calls [`ApplyBatch::apply`] once per batch (one Postgres
//! transaction), and answers every handler. Two batches may commit at once when they share no
//! user, request id or hold (see [`run`]): per-account order stays the arrival order. Only then do the handlers resolve, so the queue
//! acknowledges entries after their commit. A database error fails the whole batch: every
//! handler gets it as a retryable error and its entry is redelivered. Except a data error
//! (SQLSTATE class 22, e.g. a value Postgres cannot store): one bad operation must not fail the
//! others, so the batch is re-applied one operation at a time and only the bad one fails, as
//! [`BatchError::bad_data`] (its job is rejected, not retried).

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

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

/// Batches committing at once. Two let the next batch be sent while the previous one waits for
/// its commit (WAL flush), which is most of a small batch's time; more would only add
/// Postgres backends competing for the same cores.
const MAX_IN_FLIGHT: usize = 2;

/// What a batch in flight holds: the users and request ids it touches, or everything when it
/// settles or releases a hold (the hold's user is known only to SQL).
#[derive(Default)]
struct Footprint {
    users: HashSet<Uuid>,
    request_ids: HashSet<Uuid>,
    everything: bool,
}

impl Footprint {
    fn add(&mut self, op: &LedgerOp) {
        self.request_ids.insert(op.request_id().0);
        match op {
            LedgerOp::Consume { user_id, .. }
            | LedgerOp::Grant { user_id, .. }
            | LedgerOp::Hold { user_id, .. } => {
                self.users.insert(user_id.0);
            }
            LedgerOp::Settle { .. } | LedgerOp::Release { .. } => self.everything = true,
        }
    }

    /// Whether `op` may commit at the same time as this batch without changing any outcome:
    /// another user, another request id, and no hold settled or released on either side.
    fn independent_of(&self, op: &LedgerOp) -> bool {
        if self.everything || self.request_ids.contains(&op.request_id().0) {
            return false;
        }
        match op {
            LedgerOp::Consume { user_id, .. }
            | LedgerOp::Grant { user_id, .. }
            | LedgerOp::Hold { user_id, .. } => !self.users.contains(&user_id.0),
            LedgerOp::Settle { .. } | LedgerOp::Release { .. } => false,
        }
    }
}

/// Takes the next batch off the front of `pending`: up to `max_batch` operations, and while
/// another batch is in flight only the leading operations independent of every batch in
/// flight (stopping at the first that is not, so nothing overtakes an earlier operation).
fn next_batch(
    pending: &mut VecDeque<Request>,
    in_flight: &[(u64, Footprint)],
    max_batch: usize,
) -> (Vec<Request>, Footprint) {
    let mut batch = Vec::new();
    let mut footprint = Footprint::default();
    while batch.len() < max_batch {
        let Some((op, _)) = pending.front() else {
            break;
        };
        if !in_flight.iter().all(|(_, f)| f.independent_of(op)) {
            break;
        }
        footprint.add(op);
        if let Some(req) = pending.pop_front() {
            batch.push(req);
        }
    }
    (batch, footprint)
}

/// The batching loop. Operations are taken in arrival order; a batch starts as soon as a slot
/// is free (at most [`MAX_IN_FLIGHT`]), and a second batch holds only operations that share no
/// user, request id or hold with the batch still committing, so each account sees its
/// operations applied in arrival order, as with one batch at a time.
async fn run(ledger: Arc<dyn ApplyBatch>, max_batch: usize, mut rx: mpsc::Receiver<Request>) {
    let mut pending: VecDeque<Request> = VecDeque::with_capacity(max_batch);
    let mut buf: Vec<Request> = Vec::with_capacity(max_batch);
    let mut in_flight: Vec<(u64, Footprint)> = Vec::with_capacity(MAX_IN_FLIGHT);
    let mut running = FuturesUnordered::new();
    let mut next_id = 0u64;
    let mut closed = false;
    loop {
        while in_flight.len() < MAX_IN_FLIGHT && !pending.is_empty() {
            let (batch, footprint) = next_batch(&mut pending, &in_flight, max_batch);
            if batch.is_empty() {
                break;
            }
            let id = next_id;
            next_id += 1;
            in_flight.push((id, footprint));
            let ledger = ledger.clone();
            running.push(async move {
                apply_and_answer(ledger.as_ref(), batch).await;
                id
            });
        }
        if closed && running.is_empty() {
            return;
        }
        let room = max_batch.saturating_sub(pending.len());
        tokio::select! {
            Some(done) = running.next(), if !running.is_empty() => {
                in_flight.retain(|(id, _)| *id != done);
            }
            n = rx.recv_many(&mut buf, room), if !closed && room > 0 => {
                if n == 0 {
                    closed = true;
                }
                pending.extend(buf.drain(..));
            }
        }
    }
}

/// Applies one batch in one transaction and answers each of its operations.
async fn apply_and_answer(ledger: &dyn ApplyBatch, batch: Vec<Request>) {
    let (ops, replies): (Vec<LedgerOp>, Vec<_>) = batch.into_iter().unzip();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Credits, RequestId, UserId};

    fn consume(user: Uuid) -> LedgerOp {
        LedgerOp::Consume {
            request_id: RequestId(Uuid::new_v4()),
            user_id: UserId(user),
            amount: Credits::new(1).unwrap(),
            operation_type: "t".into(),
            metadata: serde_json::json!({}),
        }
    }

    fn settle() -> LedgerOp {
        LedgerOp::Settle {
            request_id: RequestId(Uuid::new_v4()),
            hold_id: RequestId(Uuid::new_v4()),
            amount: Credits::new(1).unwrap(),
            metadata: serde_json::json!({}),
        }
    }

    fn queue(ops: Vec<LedgerOp>) -> VecDeque<Request> {
        ops.into_iter()
            .map(|op| (op, oneshot::channel().0))
            .collect()
    }

    fn flight(ops: &[LedgerOp]) -> Vec<(u64, Footprint)> {
        let mut f = Footprint::default();
        ops.iter().for_each(|op| f.add(op));
        vec![(0, f)]
    }

    /// A second batch holds only the leading operations that share nothing with the batch in
    /// flight, so no operation of an account overtakes an earlier one.
    #[test]
    fn a_second_batch_takes_only_the_independent_prefix() {
        let (u1, u2, u3) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let ops = vec![consume(u2), consume(u3), consume(u1), consume(u2)];
        let mut pending = queue(ops.clone());
        let (batch, _) = next_batch(&mut pending, &flight(&[consume(u1)]), 100);
        assert_eq!(
            batch.len(),
            2,
            "stops at the first operation of the busy user"
        );
        assert_eq!(batch[0].0, ops[0]);
        assert_eq!(batch[1].0, ops[1]);
        assert_eq!(pending.len(), 2);

        // The same request id is not independent either (a redelivered job).
        let again = ops[2].clone();
        let mut pending = queue(vec![again.clone()]);
        let busy = flight(&[LedgerOp::Consume {
            request_id: again.request_id(),
            user_id: UserId(Uuid::new_v4()),
            amount: Credits::new(1).unwrap(),
            operation_type: "t".into(),
            metadata: serde_json::json!({}),
        }]);
        assert!(next_batch(&mut pending, &busy, 100).0.is_empty());

        // Settling or releasing a hold (its user is SQL's to know) waits, and makes others wait.
        let mut pending = queue(vec![settle(), consume(u3)]);
        assert!(
            next_batch(&mut pending, &flight(&[consume(u1)]), 100)
                .0
                .is_empty()
        );
        let mut pending = queue(vec![consume(u3)]);
        assert!(
            next_batch(&mut pending, &flight(&[settle()]), 100)
                .0
                .is_empty()
        );

        // Nothing in flight: everything up to max_batch, whoever it touches.
        let mut pending = queue(vec![settle(), consume(u1), consume(u1)]);
        assert_eq!(next_batch(&mut pending, &[], 2).0.len(), 2);
    }

    /// Applies every batch after a pause, recording which operations were committing at once.
    struct Slow {
        log: std::sync::Mutex<Vec<(usize, Vec<RequestId>)>>,
        running: std::sync::atomic::AtomicUsize,
    }

    impl ApplyBatch for Slow {
        fn apply_batch<'a>(
            &'a self,
            ops: &'a [LedgerOp],
        ) -> Pin<Box<dyn Future<Output = Result<Vec<Outcome>, BatchError>> + Send + 'a>> {
            Box::pin(async move {
                use std::sync::atomic::Ordering;
                let at_once = self.running.fetch_add(1, Ordering::SeqCst) + 1;
                self.log
                    .lock()
                    .unwrap()
                    .push((at_once, ops.iter().map(LedgerOp::request_id).collect()));
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                self.running.fetch_sub(1, Ordering::SeqCst);
                Ok(ops
                    .iter()
                    .map(|op| Outcome {
                        request_id: op.request_id(),
                        status: super::super::OutcomeStatus::Consumed,
                        balance: Some(0),
                        held: Some(0),
                        reason: None,
                    })
                    .collect())
            })
        }

        fn record_rejected<'a>(
            &'a self,
            _: &'a RejectedRequest,
        ) -> Pin<Box<dyn Future<Output = Result<Outcome, BatchError>> + Send + 'a>> {
            Box::pin(async { Err(BatchError::retryable(BatchFailure::Stopped)) })
        }
    }

    /// Two users' operations commit two batches at a time; one user's never do, and each
    /// user's operations are applied in the order they arrived.
    #[tokio::test]
    async fn batches_overlap_only_across_users_and_keep_each_users_order() {
        let slow = Arc::new(Slow {
            log: Default::default(),
            running: Default::default(),
        });
        let (batcher, _task) = Batcher::spawn(slow.clone(), 3);
        let (u1, u2) = (Uuid::new_v4(), Uuid::new_v4());
        let ops: Vec<LedgerOp> = (0..12)
            .map(|i| consume(if (i / 3) % 2 == 0 { u1 } else { u2 }))
            .collect();
        let answers = futures::future::join_all(ops.iter().cloned().map(|op| {
            let b = batcher.clone();
            async move { b.apply(op).await }
        }))
        .await;
        assert!(answers.iter().all(Result::is_ok));
        let log = slow.log.lock().unwrap().clone();
        let applied: Vec<RequestId> = log.iter().flat_map(|(_, ids)| ids.clone()).collect();
        assert_eq!(applied.len(), ops.len());
        for user in [u1, u2] {
            let arrived: Vec<RequestId> = ops
                .iter()
                .filter(|op| matches!(op, LedgerOp::Consume { user_id, .. } if user_id.0 == user))
                .map(LedgerOp::request_id)
                .collect();
            let order: Vec<RequestId> = applied
                .iter()
                .copied()
                .filter(|id| arrived.contains(id))
                .collect();
            assert_eq!(order, arrived, "one user's operations in arrival order");
        }
        assert!(
            log.iter().all(|(at_once, _)| *at_once <= MAX_IN_FLIGHT),
            "{log:?}"
        );
        assert!(
            log.iter().any(|(at_once, _)| *at_once == 2),
            "two users' batches overlap: {log:?}"
        );
        let user_of = |id: &RequestId| {
            ops.iter()
                .find(|op| op.request_id() == *id)
                .map(|op| matches!(op, LedgerOp::Consume { user_id, .. } if user_id.0 == u1))
        };
        for (at_once, ids) in &log {
            if *at_once == 2 {
                let users: HashSet<_> = ids.iter().map(user_of).collect();
                assert_eq!(
                    users.len(),
                    1,
                    "a second batch holds one side only: {log:?}"
                );
            }
        }
    }
}
