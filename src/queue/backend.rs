//! The apalis backend over a Redis stream: apalis polls [`StreamBackend`] for tasks, runs each
//! through its worker stack (concurrency limit, tracing, lifecycle) and our handler, and asks
//! the backend to close on shutdown.
//!
//! Why not `apalis_core::backend::custom::CustomBackend`: its `poll_close` only closes the push
//! sink; we must stop the reader and flush pending acknowledgements before the worker reports
//! that it stopped. A backend of our own is ~80 lines and keeps those steps explicit.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use apalis_core::backend::finalize::Ephemeral;
use apalis_core::backend::{Backend, BackendConfig};
use apalis_core::layers::Identity;
use apalis_core::task::Task;
use apalis_core::task::builder::TaskBuilder;
use apalis_core::task::task_id::{RandomId, TaskId};
use apalis_core::worker::context::WorkerContext;
use tokio::sync::mpsc;

use super::QueueError;
use super::acker::AckerHandle;
use super::entry::StreamEntry;

type CloseFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Tasks from one job type's stream, for one apalis worker (one consumer name).
pub struct StreamBackend {
    rx: mpsc::Receiver<Result<StreamEntry, QueueError>>,
    reader: tokio::task::JoinHandle<()>,
    acker: AckerHandle,
    /// Runs after the acknowledgements are flushed (removes the consumer from the group).
    on_close: Option<CloseFuture>,
    closing: Option<CloseFuture>,
}

impl StreamBackend {
    /// Wraps a running reader task and the channel it fills. `on_close` runs on a graceful
    /// stop, after the acknowledgements are flushed.
    pub fn new(
        rx: mpsc::Receiver<Result<StreamEntry, QueueError>>,
        reader: tokio::task::JoinHandle<()>,
        acker: AckerHandle,
        on_close: impl Future<Output = ()> + Send + 'static,
    ) -> Self {
        Self {
            rx,
            reader,
            acker,
            on_close: Some(Box::pin(on_close)),
            closing: None,
        }
    }
}

impl Drop for StreamBackend {
    fn drop(&mut self) {
        // A worker that failed is dropped without `poll_close`: its reader must not keep
        // reading entries nobody will process.
        self.reader.abort();
    }
}

impl Backend for StreamBackend {
    type Task = Task<StreamEntry>;
    type Error = QueueError;

    fn poll_ready(
        &mut self,
        _: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Result<(), QueueError>> {
        Poll::Ready(Ok(()))
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Option<Result<Self::Task, QueueError>>> {
        self.rx.poll_recv(cx).map(|item| {
            item.map(|res| {
                res.map(|entry| {
                    let id = TaskId::String(entry.id.clone());
                    TaskBuilder::new(entry).task_id(id).build()
                })
            })
        })
    }

    /// Called once every in-flight handler has finished: stops reading (entries read but not
    /// started stay pending in Redis and are reclaimed by a live consumer after
    /// `queue.claim_idle_ms`) and waits until the acknowledgements of finished entries are sent.
    fn poll_close(
        &mut self,
        cx: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Result<(), QueueError>> {
        if self.closing.is_none() {
            self.reader.abort();
            self.rx.close();
            let acker = self.acker.clone();
            let on_close = self.on_close.take();
            self.closing = Some(Box::pin(async move {
                acker.flush().await;
                if let Some(f) = on_close {
                    f.await;
                }
            }));
        }
        match self.closing.as_mut() {
            Some(f) => f.as_mut().poll(cx).map(Ok),
            None => Poll::Ready(Ok(())),
        }
    }
}

impl BackendConfig for StreamBackend {
    type Args = StreamEntry;
    type Id = RandomId;
    type Kind = Ephemeral;
    type Config = ();
    type Layer = Identity;

    fn config(&self) -> &() {
        &()
    }

    fn middleware(&mut self, _: &mut WorkerContext) -> Identity {
        Identity::new()
    }
}
