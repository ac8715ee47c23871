//! What the executor hands the finisher, so neither imports the other: a delivery's outcome
//! ([`Finished`]), and the channel through which a call's ledger row is committed before the
//! call is made ([`CallStarts`]).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use llmq_shared::envelope::Risk;
use llmq_shared::ids::TaskId;
use llmq_shared::keys::QueueKeys;
use llmq_shared::ledger::{CallOutcome, CallRow, TaskRow, Verdict};
use llmq_shared::queue::Write;
use tokio::sync::{mpsc, oneshot};

/// The outcome of one delivery, ready for the finisher.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub queue: Arc<QueueKeys>,
    /// What Redis records, in the finisher's one script.
    pub write: Write,
    pub calls: Vec<CallRow>,
    /// Set when the task ended: it then has a row in the ledger's tasks, which the ledger
    /// stage makes from the record in `write` and this ([`Finished::task_row`]), so an
    /// outcome waiting for its write holds no copy of its record's fields.
    pub row: Option<RowExtras>,
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
        for call in calls
            .iter_mut()
            .filter(|c| c.outcome == CallOutcome::Started)
        {
            call.outcome = CallOutcome::Abandoned;
        }
        Self {
            queue,
            write,
            calls,
            row: None,
            verdict: None,
            slot: None,
            keep: None,
            parked: false,
        }
    }

    /// The task's row in the ledger's tasks, when it ended; taken, so it is made once.
    pub fn task_row(&mut self) -> Option<TaskRow> {
        let extras = self.row.take()?;
        let record = self.write.finish()?.record.as_ref()?;
        Some(TaskRow {
            batch_id: extras.batch_id,
            enqueued_at: extras.enqueued_at,
            tenant: extras.tenant,
            tags: extras.tags,
            ..TaskRow::of(extras.task_id, record, extras.risk)
        })
    }
}

/// What a task's ledger row holds beyond its record.
#[derive(Debug, Clone, PartialEq)]
pub struct RowExtras {
    /// The task's id, as admission parsed it.
    pub task_id: TaskId,
    pub risk: Option<Risk>,
    /// The batch it came in (the envelope's `batch_id`).
    pub batch_id: Option<String>,
    /// When it was enqueued (the envelope's `enqueued_at`).
    pub enqueued_at: Option<DateTime<Utc>>,
    /// The envelope's `tenant`, and its `tags` as a JSON object.
    pub tenant: Option<String>,
    pub tags: Option<String>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use llmq_shared::ids::EntryId;
    use llmq_shared::outcome::{Status, TaskRecord};
    use llmq_shared::queue::Finish;

    fn finished(task_id: TaskId, row: Option<RowExtras>) -> Finished {
        let mut record = TaskRecord::pending(task_id, "q", Status::Succeeded);
        record.provider = Some("openai".into());
        record.attempts = 2;
        record.finished_at = Some(chrono::Utc::now());
        let write = Write::Task(Finish::done(EntryId::new(1, 0), task_id, record));
        Finished {
            row,
            ..Finished::new(Arc::new(QueueKeys::new("q")), write, Vec::new())
        }
    }

    #[test]
    fn a_task_row_is_made_from_the_record_and_its_extras_once() {
        let id = TaskId::random();
        let extras = RowExtras {
            task_id: id,
            risk: Some(Risk::High),
            batch_id: Some("b1".into()),
            enqueued_at: Some(chrono::Utc::now()),
            tenant: Some("acme".into()),
            tags: Some(r#"{"team":"search"}"#.into()),
        };
        let mut f = finished(id, Some(extras.clone()));
        let row = f.task_row().expect("a task that ended has a row");
        assert_eq!(row.task_id, id.uuid());
        assert_eq!(
            (row.queue.as_str(), row.status.as_str()),
            ("q", "succeeded")
        );
        assert_eq!((row.provider.as_deref(), row.attempts), (Some("openai"), 2));
        assert_eq!(row.risk.as_deref(), Some("high"));
        assert_eq!(row.batch_id, extras.batch_id);
        assert_eq!(row.enqueued_at, extras.enqueued_at);
        assert_eq!((&row.tenant, &row.tags), (&extras.tenant, &extras.tags));
        assert_eq!(f.task_row(), None, "the row is taken");
        // No extras: the task has no row.
        assert_eq!(finished(id, None).task_row(), None);
        // The row's id is the one admission parsed, whatever the record says.
        let row = finished(TaskId::random(), Some(extras)).task_row();
        assert_eq!(row.map(|r| r.task_id), Some(id.uuid()));
    }
}
