//! What the executor hands the finisher, so neither imports the other: a delivery's outcome
//! ([`Finished`]), and the channel through which a call's ledger row is committed before the
//! call is made ([`CallStarts`]).

use std::sync::Arc;

use llmq_shared::keys::QueueKeys;
use llmq_shared::ledger::{CallRow, STARTED, TaskRow, Verdict};
use llmq_shared::queue::Write;
use tokio::sync::{mpsc, oneshot};

/// The outcome of one delivery, ready for the finisher.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub queue: Arc<QueueKeys>,
    /// What Redis records, in the finisher's one script.
    pub write: Write,
    pub calls: Vec<CallRow>,
    pub task: Option<TaskRow>,
    /// A review's or check's verdict on the task whose output it judged.
    pub verdict: Option<Verdict>,
    /// The concurrency key whose slot this delivery holds, to free once its outcome is
    /// written.
    pub slot: Option<String>,
    /// The answer to keep in the answer cache once the outcome is written.
    pub keep: Option<Box<llmq_shared::queue::Keep>>,
    /// Nothing to write: the task was parked to wait for a slot of its concurrency key (or
    /// the entry was no longer ours).
    pub parked: bool,
}

impl Finished {
    /// `write`, with the calls it made.
    #[must_use]
    pub fn new(queue: Arc<QueueKeys>, write: Write, mut calls: Vec<CallRow>) -> Self {
        // A call still running when its attempt ended (a timeout, the hard stop) was given up
        // on: the provider may bill it, its usage is unknown.
        for call in calls.iter_mut().filter(|c| c.outcome == STARTED) {
            call.outcome = "abandoned".into();
        }
        Self {
            queue,
            write,
            calls,
            task: None,
            verdict: None,
            slot: None,
            keep: None,
            parked: false,
        }
    }
}

/// A call's row to commit before the call is made, and who waits for it.
pub(crate) type Start = (CallRow, oneshot::Sender<bool>);

/// Records each provider call in the ledger, outcome `started`, before it is made, so a worker
/// that dies during a call still leaves a row for a call the provider may bill. The finisher
/// commits the rows in batches, like outcomes.
#[derive(Debug, Clone)]
pub struct CallStarts(pub(crate) mpsc::UnboundedSender<Start>);

impl CallStarts {
    /// Waits until `row` is committed: `true`, or `false` when it could not be before the
    /// hard stop (the call must then not be made).
    pub async fn record(&self, row: CallRow) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.0.send((row, tx)).is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }
}
