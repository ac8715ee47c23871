//! Every open request's wait for its task, in one loop: one `MGET` of the open tasks'
//! results a round, however many requests wait, so Redis's work follows the rounds, not the
//! requests, and a request hears of its task within a round (a millisecond while few wait,
//! longer as more do).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use llmq_shared::ids::TaskId;
use llmq_shared::keys::QueueKeys;
use llmq_shared::outcome::TaskRecord;
use llmq_shared::queue::Client;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

/// The requests waiting, by task id.
type Open = HashMap<TaskId, Vec<oneshot::Sender<TaskRecord>>>;

pub struct Waiter {
    open: Mutex<Open>,
    /// Told when the first request of an empty round comes.
    wake: Notify,
}

impl Waiter {
    /// A waiter whose loop reads `keys`' results until `stop`.
    pub fn start(redis: Client, keys: QueueKeys, stop: CancellationToken) -> Arc<Self> {
        let waiter = Arc::new(Self {
            open: Mutex::new(HashMap::new()),
            wake: Notify::new(),
        });
        tokio::spawn(Arc::clone(&waiter).run(redis, keys, stop));
        waiter
    }

    /// Task `id`'s final record, when it has one; dropping the receiver stops the wait.
    pub fn wait(&self, id: TaskId) -> oneshot::Receiver<TaskRecord> {
        let (tx, rx) = oneshot::channel();
        self.lock().entry(id).or_default().push(tx);
        self.wake.notify_one();
        rx
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn run(self: Arc<Self>, redis: Client, keys: QueueKeys, stop: CancellationToken) {
        while !stop.is_cancelled() {
            // Requests that went away (their caller, or their wait, ended) wait no more.
            let ids: Vec<TaskId> = {
                let mut open = self.lock();
                open.retain(|_, txs| {
                    txs.retain(|tx| !tx.is_closed());
                    !txs.is_empty()
                });
                open.keys().copied().collect()
            };
            if ids.is_empty() {
                tokio::select! {
                    () = self.wake.notified() => {}
                    () = stop.cancelled() => return,
                }
                continue;
            }
            for chunk in ids.chunks(1000) {
                match redis.results(&keys, chunk).await {
                    Ok(records) => {
                        let mut open = self.lock();
                        for r in records
                            .into_iter()
                            .flatten()
                            .filter(|r| r.status.is_final())
                        {
                            for tx in open.remove(&r.task_id).unwrap_or_default() {
                                let _ = tx.send(r.clone());
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!("cannot read the results of open requests: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            // A millisecond a round, and 2 µs more for each request waiting: 2,000 waiting
            // are read every 4 ms.
            let pause = Duration::from_micros((2 * ids.len() as u64).max(1_000));
            tokio::time::sleep(pause).await;
        }
    }
}
