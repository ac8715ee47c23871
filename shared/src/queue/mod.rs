//! The Redis contract: every operation on a queue's keys, one file per operation with its
//! Lua beside it. Nothing outside this module writes a queue key.
//!
//! Every state change that touches more than one key is one Lua script, so a task is always
//! in exactly one place: the stream, the group's pending list, `delayed`, `dead`, or finished
//! with a result. Key names come from [`crate::keys`].
//!
//! Layout:
//! - `enqueue`: the consumer group, enqueueing, and the scheduler's fenced recurring ticks;
//! - `delivery`: reading, taking over idle entries (poison tasks included), claim refresh;
//! - `finish`: every outcome of a batch ([`Write`]: tasks, chain steps and what their chains
//!   do next, submitted chains) in one script, and promoting due delayed tasks;
//! - `chain`: a chain's reads, and what a person or the scheduler does to one (cancel, retry,
//!   approve, trim); its state types live in [`crate::chain`];
//! - `slots`: concurrency-key slots, taken, parked for and freed;
//! - `answers`: the answer cache's answers and single flights (slots of their own);
//! - `batch`: tasks that wait for a provider batch, the batches, and their answers;
//! - `dead_letter`: listing, finding, replaying, purging and (fenced) trimming dead letters;
//! - `pause`: pausing and resuming a queue, and handing back what a worker read meanwhile;
//! - `inspect`: counts, task lookup, results, worker heartbeats;
//! - `reply`: reading Redis replies, in one place;
//! - `conn`: one Redis or a Redis Cluster, behind one connection type;
//! - `lua/`: fragments several scripts share, joined in with `concat!`.

use std::time::Duration;

use tokio::sync::OnceCell;

use crate::ids::{EntryId, TaskId};
use crate::outcome::{ErrorClass, TaskRecord};

mod answers;
mod batch;
mod browse;
mod cancel;
mod chain;
mod conn;
mod dead_letter;
mod delivery;
mod enqueue;
mod finish;
mod idem;
mod inspect;
mod out;
mod pause;
mod reply;
mod slots;
mod workers;

pub use answers::{Answer, Keep, NOT_KEPT, answer_name, flight_key, warm_name};
pub use batch::{
    BatchAnswer, BatchPark, BatchRecord, BatchState, BatchTask, FALLBACK_MARGIN, Group, LATCH_TTL,
    Settle, Taken,
};
pub use browse::LiveTask;
pub use cancel::{CANCEL_NOTICE, Cancelled, MARK_LIFE, Marks, Named, Target, why};
pub use chain::{ChainsPage, Refused, StepContext};
pub use conn::Conn;
pub use dead_letter::{Replayed, replayed_task};
pub use enqueue::{PROGRESS_TTL, Progress, Tick};
pub use finish::Write;
pub use idem::{KeyEnd, Keyed, holder};
pub use inspect::{Found, TenantBacklog};
pub use out::{OUT_TTL, OutEntry};
pub use pause::{PAUSE_NOTICE, Paused};
pub use slots::Slot;
pub use workers::{HeldTask, SeenWorker, WorkerInfo};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach Redis ({0}); {fix}", fix = connect_fix(.0))]
    Connect(String),
    #[error("Redis answered with an error: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("Redis answered in an unexpected shape: {0}")]
    Protocol(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What to do about a connection that failed with `why`.
fn connect_fix(why: &str) -> &'static str {
    if why.contains("no sentinel named") {
        "check the sentinels' host:port list and the master's name in REDIS_URL (redis+sentinel://host:port,host:port/MASTER_NAME)"
    } else if why.contains("is not in cluster mode") {
        "use redis://host:port for a single Redis"
    } else if why.contains("bad REDIS_URL") {
        "write it as redis://host:port, rediss://host:port, redis+cluster://host:port,host:port or redis+sentinel://host:port,host:port/MASTER_NAME"
    } else if why.contains("certificate") {
        "trust the CA that signed Redis's certificate with SSL_CERT_FILE=/path/to/ca.pem, or check the host name in REDIS_URL"
    } else {
        "start Redis or set REDIS_URL to where it runs"
    }
}

/// A task as read from the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub entry_id: EntryId,
    /// The `task` field; `None` when the entry has no such field.
    pub payload: Option<Vec<u8>>,
    /// The `chain` field, for an entry that submits a chain.
    pub chain: Option<Vec<u8>>,
    /// How many times the group has handed this entry out, this time included.
    pub deliveries: u64,
    /// The entry has had its turn in the room ([`crate::keys::ROOM_FIELD`]): run it as it
    /// is, whatever its class.
    pub from_room: bool,
}

impl Delivery {
    /// A beacon of the room (`queue/lua/room.lua`): no task, only word that the room has
    /// tasks. Dropped by the reader, who then feeds itself from the room.
    #[must_use]
    pub fn is_beacon(&self) -> bool {
        self.from_room && self.payload.is_none() && self.chain.is_none()
    }
}

/// What a takeover claimed: the tasks to run (poison ones already finished as dead
/// letters), and whom every entry it claimed was taken from.
#[derive(Debug, Default)]
pub struct Reclaimed {
    pub tasks: Vec<Delivery>,
    pub takeovers: Vec<Takeover>,
}

/// One entry taken over after its claim lapsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Takeover {
    pub entry_id: EntryId,
    /// The worker that held it.
    pub from: String,
    /// That worker was seen alive (a heartbeat, or a refresh of its other claims) well after
    /// it last kept this claim: alive, yet it let this claim lapse, which should not happen.
    pub from_alive: bool,
    /// How many times the entry has been delivered, this time included.
    pub deliveries: u64,
}

/// What to do with a task that a worker is done with.
#[derive(Debug, Clone, PartialEq)]
pub enum FinishKind {
    /// Store the record; the task is finished.
    Done,
    /// Put the envelope in `delayed` until `due_ms` (a retry, a rate-limit wait or a `run_at`).
    Retry { due_ms: i64 },
    /// Move the envelope to the dead letters.
    Dead { error: String, class: ErrorClass },
    /// Give the task back to the stream untouched (shutdown).
    Release,
    /// Put the envelope in the queue's room to wait for its turn, at `priority` for
    /// `tenant` (`""` for none), where `place` says.
    Room {
        priority: u8,
        tenant: String,
        place: Place,
    },
}

/// Where a task goes in its tenant's list in the room (`lua/room.lua`'s `room_push`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Behind the tenant's tasks: a new task.
    Behind,
    /// Before them: a task back from a wait (a retry, a rate limit), which keeps its place.
    Front,
    /// Before them, and the tenant's turn given back: a task the room fed that its provider
    /// could not take yet, which lost no turn by being read.
    Turn,
    /// As `Turn`, and the tenant held at its limits until this instant (ms): the room feeds
    /// none of its tasks before then, and the other tenants' in their turn.
    Hold(i64),
}

impl FinishKind {
    /// The kind and its two arguments, as `lua/settle.lua` reads them.
    pub(super) fn args(&self) -> (&'static str, String, String) {
        match self {
            FinishKind::Done => ("ok", String::new(), String::new()),
            FinishKind::Retry { due_ms } => ("retry", due_ms.to_string(), String::new()),
            FinishKind::Dead { error, class } => ("dead", error.clone(), class.to_string()),
            FinishKind::Release => ("release", String::new(), String::new()),
            FinishKind::Room {
                priority,
                tenant,
                place,
            } => match place {
                Place::Hold(until_ms) => (
                    "room_hold",
                    format!("{priority}:{until_ms}"),
                    tenant.clone(),
                ),
                _ => (
                    match place {
                        Place::Behind => "room",
                        Place::Front => "room_front",
                        _ => "room_turn",
                    },
                    priority.to_string(),
                    tenant.clone(),
                ),
            },
        }
    }
}

/// A task's own outcome, in a [`Write`].
#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    pub entry_id: EntryId,
    pub task_id: TaskId,
    pub kind: FinishKind,
    /// The record to store at `result:<task_id>`, if any.
    pub record: Option<TaskRecord>,
    /// The envelope (or raw payload) to carry to `delayed`, `dead` or the stream.
    pub envelope: String,
    /// A task holding an idempotency key that ended: what becomes of the key.
    pub key_end: Option<Box<KeyEnd>>,
    /// The batch of a task that ended (the envelope's `batch_id`): the finish counts toward
    /// the batch's progress, which `llmq batch --wait` reads.
    pub batch_id: Option<String>,
}

impl Finish {
    /// The task answered: store `record`.
    #[must_use]
    pub fn done(entry_id: EntryId, task_id: TaskId, record: TaskRecord) -> Self {
        Self {
            entry_id,
            task_id,
            kind: FinishKind::Done,
            record: Some(record),
            envelope: String::new(),
            key_end: None,
            batch_id: None,
        }
    }

    /// Wait in `delayed` until `due_ms`, carrying `envelope`; store `record` if given.
    #[must_use]
    pub fn retry(
        entry_id: EntryId,
        task_id: TaskId,
        due_ms: i64,
        record: Option<TaskRecord>,
        envelope: String,
    ) -> Self {
        Self {
            entry_id,
            task_id,
            kind: FinishKind::Retry { due_ms },
            record,
            envelope,
            key_end: None,
            batch_id: None,
        }
    }

    /// Move `envelope` to the dead letters with `error`, and store `record`.
    #[must_use]
    pub fn dead(
        entry_id: EntryId,
        task_id: TaskId,
        error: String,
        class: ErrorClass,
        record: TaskRecord,
        envelope: String,
    ) -> Self {
        Self {
            entry_id,
            task_id,
            kind: FinishKind::Dead { error, class },
            record: Some(record),
            envelope,
            key_end: None,
            batch_id: None,
        }
    }

    /// Ends idempotency key `name`, which this task's run `holder` holds, if the task ended: remembered
    /// for `window` when it succeeded, else freed. A task that goes on (a retry, a wait, a
    /// hand-back) keeps holding it.
    pub fn end_key(&mut self, name: String, holder: String, window: Duration) {
        let window = match (&self.kind, self.record.as_ref().map(|r| r.status)) {
            (FinishKind::Done, Some(crate::outcome::Status::Succeeded)) => Some(window),
            (FinishKind::Done | FinishKind::Dead { .. }, _) => None,
            _ => return,
        };
        self.key_end = Some(Box::new(KeyEnd {
            name,
            holder,
            window,
        }));
    }

    /// Ack the entry, writing nothing: another entry of the same task holds its outcome.
    #[must_use]
    pub fn ack(entry_id: EntryId, task_id: TaskId) -> Self {
        Self {
            entry_id,
            task_id,
            kind: FinishKind::Done,
            record: None,
            envelope: String::new(),
            key_end: None,
            batch_id: None,
        }
    }

    /// Hand `envelope` back to the stream untouched (shutdown).
    #[must_use]
    pub fn release(entry_id: EntryId, task_id: TaskId, envelope: String) -> Self {
        Self {
            entry_id,
            task_id,
            kind: FinishKind::Release,
            record: None,
            envelope,
            key_end: None,
            batch_id: None,
        }
    }

    /// Put `envelope` in the queue's room to wait for its turn (see [`FinishKind::Room`]).
    #[must_use]
    pub fn room(
        entry_id: EntryId,
        task_id: TaskId,
        (priority, tenant): (u8, &str),
        place: Place,
        envelope: String,
    ) -> Self {
        Self {
            entry_id,
            task_id,
            kind: FinishKind::Room {
                priority,
                tenant: tenant.to_owned(),
                place,
            },
            record: None,
            envelope,
            key_end: None,
            batch_id: None,
        }
    }
}

/// The scheduler's proof that it holds the lease: its id and fencing token. Fenced writes to
/// a queue check the token against the queue's copy of it in the same script that writes
/// (`lua/fence.lua`), so a holder paused past its lease cannot act once its successor has
/// claimed the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence<'a> {
    pub holder: &'a str,
    pub token: i64,
}

/// A fenced script answers this when the lease is not (or no longer) the caller's.
pub const NOT_HOLDER: i64 = -1;

/// Per-queue counts for `llmq status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QueueCounts {
    pub queue: String,
    /// Tasks waiting to run: in the stream and in the room.
    pub ready: u64,
    /// Of `ready`, those waiting in the room, per priority that has any (most urgent
    /// first); the rest wait in the stream, served before them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ready_by_priority: Vec<(u8, u64)>,
    pub in_flight: u64,
    pub delayed: u64,
    pub dead: u64,
    pub workers: u64,
    /// Paused with `llmq queue pause`: workers take none of its tasks.
    pub paused: bool,
    /// Copies of keyed tasks answered with the first's answer, ever (`idempotency_key`).
    pub duplicates: u64,
}

/// A dead letter as `llmq dlq` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DeadLetter {
    /// The entry id in the dead stream.
    pub id: String,
    pub task_id: TaskId,
    pub queue: String,
    pub error: String,
    pub class: String,
    pub attempts: u64,
    pub failed_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The envelope as it was when the task died (or the raw payload if it was not JSON).
    pub task: String,
}

/// A worker is live while its heartbeat is younger than this.
pub const WORKER_LIVENESS: Duration = Duration::from_secs(15);

/// A Redis client speaking the llmq contract.
///
/// Commands share one multiplexed, self-reconnecting connection: Redis answers them in
/// order on one socket, so concurrent callers pipeline for free. Blocking reads get a
/// connection of their own ([`Client::blocking_conn`]).
#[derive(Clone)]
pub struct Client {
    backend: conn::Backend,
    shared: std::sync::Arc<OnceCell<Conn>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

/// How long a command may take before the connection is considered broken. Scripts that
/// finish a large batch on a loaded server can take a while; a hung server must not hang
/// a worker forever.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

impl Client {
    /// A client for `url` (`redis://host:port/db`). Connects lazily.
    ///
    /// # Errors
    /// The URL cannot be parsed.
    pub fn new(url: &str) -> Result<Self> {
        crate::tls::install_crypto_provider();
        Ok(Self {
            backend: conn::Backend::parse(url)?,
            shared: std::sync::Arc::new(OnceCell::new()),
        })
    }

    /// The shared connection.
    ///
    /// # Errors
    /// Redis cannot be reached.
    pub async fn conn(&self) -> Result<Conn> {
        // Boxed: connecting is a large future, and unboxed it would size every command's
        // (5 KB each, moved and kept by every caller) for what happens once.
        self.shared
            .get_or_try_init(|| Box::pin(self.backend.connect(Some(RESPONSE_TIMEOUT))))
            .await
            .cloned()
    }

    /// A connection of its own for blocking reads, which would stall everyone else's
    /// commands on the shared one.
    ///
    /// # Errors
    /// Redis cannot be reached.
    pub async fn blocking_conn(&self) -> Result<Conn> {
        self.backend.connect(None).await
    }

    /// A connection of its own for blocking reads of at most `block` each: a read that gets
    /// no answer within `block` and the usual response timeout fails (a connection that died
    /// without a word), so no read waits for ever.
    ///
    /// # Errors
    /// Redis cannot be reached.
    pub async fn reading_conn(&self, block: Duration) -> Result<Conn> {
        self.backend.connect(Some(block + RESPONSE_TIMEOUT)).await
    }

    /// Checks that Redis answers.
    ///
    /// # Errors
    /// Redis cannot be reached.
    pub async fn ping(&self) -> Result<()> {
        let mut c = self.conn().await?;
        redis::cmd("PING").query_async::<()>(&mut c).await?;
        Ok(())
    }
}

/// Milliseconds since the Unix epoch.
#[must_use]
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connecting stays boxed: inline, it made every Redis command's future 5 KB, and every
    /// task in flight carried that (issue 32). A size, not a speed: the same on every run.
    #[test]
    fn a_command_does_not_carry_the_connect() {
        let client = Client::new("redis://127.0.0.1:6379").unwrap();
        let conn = client.conn();
        assert!(
            std::mem::size_of_val(&conn) <= 512,
            "Client::conn's future is {} bytes",
            std::mem::size_of_val(&conn)
        );
    }
}
