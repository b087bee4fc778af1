//! The batching loop shared by the access service (checks) and the audit recorder (rows): take
//! whatever is waiting, up to a batch, with no waiting of its own, and serve at most a fixed
//! number of batches at once.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc};

/// Serves what arrives on `rx` in batches of at most `max_batch`, at most `in_flight` at once,
/// until every sender is dropped. A slot is taken before the batch is formed: while every batch
/// is busy, items keep arriving and the next batch takes them all.
pub(super) async fn serve_in_batches<T, F, Fut>(
    mut rx: mpsc::Receiver<T>,
    max_batch: usize,
    in_flight: usize,
    serve: F,
) where
    F: Fn(Vec<T>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(in_flight));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        // Sized by what arrives, not by `max_batch`: a quiet worker's batches are one or two
        // items, and reserving the audit's 2,000 rows (~0.5 MB) for each cost more in the
        // allocator than the batch itself. `recv_many` grows the vector as it fills it.
        let mut batch = Vec::new();
        if rx.recv_many(&mut batch, max_batch).await == 0 {
            return;
        }
        let served = serve(batch);
        tokio::spawn(async move {
            served.await;
            drop(slot);
        });
    }
}
