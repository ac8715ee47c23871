//! The apalis adapter: llmq's own [`Backend`] over the fetcher's channel, and the worker
//! that runs each task through [`Runtime::process`]. This is the only module that knows
//! apalis; everything else is plain llmq code.
//!
//! apalis drives polling, runs tasks concurrently and, when the channel closes, waits for
//! every running task before it returns: that is the graceful half of shutdown.

use std::sync::Arc;
use std::task::{Context, Poll};

use apalis_core::backend::finalize::Ephemeral;
use apalis_core::backend::{Backend, BackendConfig};
use apalis_core::error::BoxDynError;
use apalis_core::task::Task;
use apalis_core::task::builder::TaskBuilder;
use apalis_core::task::task_id::RandomId;
use apalis_core::worker::builder::WorkerBuilder;
use apalis_core::worker::context::WorkerContext;
use tokio::sync::mpsc;
use tower_layer::Identity;

use crate::Runtime;
use crate::fetcher::Job;

/// Tasks read from Redis streams by the [`crate::fetcher::Fetcher`].
pub struct StreamBackend {
    jobs: mpsc::UnboundedReceiver<Job>,
}

/// The channel backend cannot fail; errors surface as task outcomes instead.
#[derive(Debug, thiserror::Error)]
#[error("the task channel failed")]
pub struct BackendError;

impl Backend for StreamBackend {
    type Task = Task<Job>;
    type Error = BackendError;

    fn poll_ready(
        &mut self,
        _: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Result<(), BackendError>> {
        Poll::Ready(Ok(()))
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Option<Result<Task<Job>, BackendError>>> {
        self.jobs.poll_recv(cx).map(|job| match job {
            Some(job) => Some(Ok(TaskBuilder::new(job).build())),
            None => {
                // The fetcher has stopped: tell apalis to drain and finish. A worker that is
                // already stopping says so with an error we do not need.
                let _ = worker.stop();
                None
            }
        })
    }

    fn poll_close(
        &mut self,
        _: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Result<(), BackendError>> {
        Poll::Ready(Ok(()))
    }
}

impl BackendConfig for StreamBackend {
    type Args = Job;
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

async fn handle(runtime: Arc<Runtime>, job: Job) -> Result<(), BoxDynError> {
    runtime.process(job).await;
    Ok(())
}

/// Runs tasks from `jobs` until the channel is closed and every running task is done.
///
/// # Errors
/// apalis reports a worker failure, as text.
pub async fn run(
    name: &str,
    jobs: mpsc::UnboundedReceiver<Job>,
    runtime: Arc<Runtime>,
) -> Result<(), String> {
    // The handler takes the job alone, the runtime captured: apalis then drops the rest of
    // its task (its context, extensions and counters, about 700 bytes) before the job runs
    // and does not box the job's future, where a handler with an extractor (`Data`) keeps
    // all of it, boxed, for the whole of every call in flight.
    //
    // Each task runs outside tokio's cooperative budget. apalis runs every task in flight
    // inside its one driver, a single tokio task, so they all share that task's budget of
    // 128 operations a turn: once a burst of tasks (a round of calls ending, a batch of
    // outcomes written) had spent it, every further timer, channel or oneshot the driver's
    // tasks polled in that turn answered "not yet" and asked to be woken at the runtime's
    // next turn, and `FuturesUnordered` polled up to 32 of them for nothing before it
    // yielded (futures-rs#2053). Without the budget, `bench=inflight`'s worker spends about
    // 40 % less CPU a call (docs/benchmarks.md). The driver still yields: apalis' reads
    // from the fetcher's channel keep the budget, and `FuturesUnordered` yields after 32
    // polls that end nothing. Test: `calls_that_end_at_once_are_polled_only_to_start_and_to_end`.
    let handle = move |job: Job| tokio::task::unconstrained(handle(Arc::clone(&runtime), job));
    WorkerBuilder::new(name)
        .backend(StreamBackend { jobs })
        .build(handle)
        .run()
        .await
        .map_err(|e| e.to_string())
}
