//! Pulls tasks from Redis, never more than the worker has free slots for.
//!
//! Each read asks for exactly as many tasks as there are free permits (`XREADGROUP ...
//! COUNT n`), and every task carries its permit until it is written, so tasks wait in Redis,
//! not in memory. Entries idle past the visibility timeout are taken over first.

use std::sync::Arc;
use std::time::{Duration, Instant};

use llmq_shared::ids::EntryId;
use llmq_shared::keys::QueueKeys;
use llmq_shared::queue::{Client, Conn, Delivery, Error as QueueError, PAUSE_NOTICE, Takeover};
use llmq_shared::retry::RetryPolicy;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

/// How failed reads are retried: 250 ms doubling to 5 s while Redis is away.
const READ_RETRY: RetryPolicy =
    RetryPolicy::new(Duration::from_millis(250), Duration::from_secs(5));

/// How often a worker looks whether a paused queue was resumed.
const PAUSE_POLL: Duration = Duration::from_millis(500);

/// What this worker knows of its queues' pause flags, and since when.
struct Pauses {
    paused: Vec<bool>,
    checked: Option<Instant>,
}

impl Pauses {
    /// Reads every queue's flag when what is known may be stale: never read, a queue
    /// paused (to notice its resume), or older than [`PAUSE_NOTICE`] with tasks to hand on.
    async fn refresh(
        &mut self,
        redis: &Client,
        queues: &[Arc<QueueKeys>],
        handing_on: bool,
    ) -> Result<(), llmq_shared::queue::Error> {
        let due = match self.checked {
            None => true,
            Some(t) if self.paused.contains(&true) => t.elapsed() >= PAUSE_POLL,
            Some(t) => handing_on && t.elapsed() >= PAUSE_NOTICE,
        };
        if due {
            for (flag, q) in self.paused.iter_mut().zip(queues) {
                *flag = redis.is_paused(q).await?;
            }
            self.checked = Some(Instant::now());
        }
        Ok(())
    }

    fn all(&self) -> bool {
        self.paused.iter().all(|p| *p)
    }
}

/// Ends a blocking read under way with `CLIENT UNBLOCK` of its connection `id`, again every
/// 50 ms until it returns (the read may not have reached Redis yet when first asked), and
/// returns what it read; without an id, waits for it to time out.
async fn end_read<F, T>(redis: &Client, id: Option<i64>, read: &mut std::pin::Pin<&mut F>) -> T
where
    F: std::future::Future<Output = T>,
{
    let Some(id) = id else {
        return read.await;
    };
    loop {
        if let Err(e) = redis.unblock(id).await {
            tracing::debug!("cannot end the blocking read early: {e}");
        }
        tokio::select! {
            biased;
            r = &mut *read => return r,
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

/// A task read from a queue, holding one of the worker's concurrency slots.
pub struct Job {
    pub queue: Arc<QueueKeys>,
    /// Boxed: a job is moved through apalis into every task's state, so keep it small.
    pub delivery: Box<Delivery>,
    pub permit: OwnedSemaphorePermit,
    /// What releases the worker's claim on the entry once its outcome is written.
    pub claim: EntryId,
}

/// The read loop's settings.
pub struct Fetcher {
    pub redis: Client,
    pub queues: Vec<Arc<QueueKeys>>,
    pub consumer: String,
    pub slots: Arc<Semaphore>,
    /// Set while the worker is asked to drain: it reads nothing, and gives back what a read
    /// under way brings.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    pub max_batch: usize,
    pub visibility_timeout: Duration,
    pub max_deliveries: u64,
    /// How long a poison task's dead record is kept.
    pub result_ttl: Duration,
    /// How long one read waits for a task before checking for shutdown.
    pub block: Duration,
    pub stop: CancellationToken,
    pub read_pause: Arc<crate::executor::ReadPause>,
    /// Where each entry read or taken over is held from the moment Redis handed it over.
    pub claims: Arc<crate::claims::Claims>,
    /// Tenants that get more than one task per turn in a room (`tenants.weights`).
    pub tenant_weights: Vec<(String, u32)>,
    /// The cancel marks, refreshed before tasks are handed on when stale.
    pub cancels: Arc<crate::cancels::Cancels>,
}

impl Fetcher {
    /// Counts takeovers in `llmq_takeovers_total` by queue and by whether the worker they
    /// were taken from was still alive: one that was is warned of by name, for it kept no
    /// claim although it had its heartbeat (a hung or starved process).
    fn count_takeovers(&self, q: &QueueKeys, takeovers: &[Takeover]) {
        if takeovers.is_empty() {
            return;
        }
        let alive = takeovers.iter().filter(|t| t.from_alive).count();
        let silent = takeovers.len() - alive;
        if silent > 0 {
            tracing::info!(
                queue = q.name(),
                count = silent,
                "took over tasks idle past the visibility timeout from workers that stopped beating"
            );
            metrics::counter!("llmq_takeovers_total", "queue" => q.name().to_owned(), "from" => "silent")
                .increment(silent as u64);
        }
        for t in takeovers.iter().filter(|t| t.from_alive) {
            tracing::warn!(
                queue = q.name(),
                entry = %t.entry_id,
                from = %t.from,
                to = %self.consumer,
                deliveries = t.deliveries,
                "took over a task from a worker whose heartbeat is fresh: it held the claim past the visibility timeout without refreshing it (hung, starved, or the timeout is shorter than its pauses)"
            );
        }
        if alive > 0 {
            metrics::counter!("llmq_takeovers_total", "queue" => q.name().to_owned(), "from" => "alive")
                .increment(alive as u64);
        }
    }

    /// Reads until `stop`; the channel closes when it returns.
    pub async fn run(self, jobs: mpsc::UnboundedSender<Job>) {
        let mut r = Reading::new(self.queues.len(), self.visibility_timeout);
        loop {
            match self.may_read(&mut r).await {
                Some(true) => {}
                Some(false) => continue,
                None => return,
            }
            let Some(permits) = self.permits().await else {
                return;
            };
            let mut got = Got::new();
            let result = self.read(&mut r, permits.len(), &mut got).await;
            let failed = result.is_err();
            if let Err(e) = result {
                r.conn = None;
                r.conn_id = None;
                r.failures += 1;
                tracing::error!("reading tasks failed (Redis away?); retrying: {e}");
            } else {
                r.failures = 0;
            }
            let idle = got.is_empty();
            if !self.hand_over(got, permits, &jobs) {
                return;
            }
            if idle && (failed || self.queues.len() > 1) {
                let pause = if failed {
                    READ_RETRY.delay(r.failures, None)
                } else {
                    Duration::from_millis(20)
                };
                if !self.sleep(pause).await {
                    return;
                }
            }
        }
    }

    /// Sleeps `pause`, or until `stop`: `false` then.
    async fn sleep(&self, pause: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(pause) => true,
            () = self.stop.cancelled() => false,
        }
    }

    /// Waits out a read pause (no capable provider can be called now) and the queues'
    /// pauses: `Some(true)` to read now, `Some(false)` to look again, `None` at `stop`.
    async fn may_read(&self, r: &mut Reading) -> Option<bool> {
        let pause = self.read_pause.remaining();
        if !pause.is_zero() {
            tracing::debug!(?pause, "no capable provider can be called now; not reading");
            if !self.sleep(pause).await {
                return None;
            }
        }
        // A paused queue is not read; with every queue paused, wait for a resume.
        if let Err(e) = r.pauses.refresh(&self.redis, &self.queues, false).await {
            tracing::error!("cannot read whether the queues are paused (Redis away?): {e}");
            r.pauses.checked = None;
            r.failures += 1;
            return self
                .sleep(READ_RETRY.delay(r.failures, None))
                .await
                .then_some(false);
        }
        if r.pauses.all() || self.drained() {
            return self.sleep(PAUSE_POLL).await.then_some(false);
        }
        Some(true)
    }

    fn drained(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A free slot, waited for, and as many more as are free now (up to `max_batch`);
    /// `None` at `stop`.
    async fn permits(&self) -> Option<Vec<OwnedSemaphorePermit>> {
        let first = tokio::select! {
            p = Arc::clone(&self.slots).acquire_owned() => p.ok()?,
            () = self.stop.cancelled() => return None,
        };
        let mut permits = vec![first];
        while permits.len() < self.max_batch {
            match Arc::clone(&self.slots).try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        Some(permits)
    }

    /// Reads up to `want` entries into `got`: those idle past the visibility timeout first
    /// (when a takeover is due), then each queue's.
    async fn read(&self, r: &mut Reading, want: usize, got: &mut Got) -> Result<(), QueueError> {
        if r.last_reclaim
            .is_none_or(|t| t.elapsed() >= r.reclaim_every)
        {
            r.last_reclaim = Some(Instant::now());
            self.reclaim(r, want, got).await?;
        }
        if got.len() < want {
            self.read_queues(r, want, got).await?;
        }
        if !got.is_empty() {
            self.give_back_paused(r, got).await?;
            // An idle worker probed no marks: it meets these with fresh ones.
            self.cancels
                .refresh_if_stale(&self.redis, &self.queues)
                .await;
        }
        Ok(())
    }

    /// Takes over entries idle past the visibility timeout, from every queue not paused.
    async fn reclaim(&self, r: &Reading, want: usize, got: &mut Got) -> Result<(), QueueError> {
        for (q, _) in self
            .queues
            .iter()
            .zip(&r.pauses.paused)
            .filter(|(_, p)| !**p)
        {
            let room = want - got.len();
            if room == 0 {
                break;
            }
            let sent = Instant::now();
            let taken = self
                .redis
                .reclaim(
                    q,
                    &self.consumer,
                    self.visibility_timeout,
                    room,
                    self.max_deliveries,
                    self.result_ttl,
                )
                .await?;
            self.count_takeovers(q, &taken.takeovers);
            got.extend(taken.tasks.into_iter().map(|d| (Arc::clone(q), d, sent)));
        }
        Ok(())
    }

    /// Reads each queue not paused, in turn. One queue: block on it, until the next
    /// takeover is due at most. Several: poll each in turn without blocking, so a quiet
    /// queue never holds slots another queue could use.
    async fn read_queues(
        &self,
        r: &mut Reading,
        want: usize,
        got: &mut Got,
    ) -> Result<(), QueueError> {
        let mut c = match r.conn.take() {
            Some(c) => c,
            None => {
                let mut c = self.redis.reading_conn(self.block).await?;
                r.conn_id = Client::client_id(&mut c).await.ok();
                c
            }
        };
        let to_reclaim = (r.last_reclaim).map_or(Duration::ZERO, |t| {
            r.reclaim_every.saturating_sub(t.elapsed())
        });
        // Entries just taken over are not held back by a blocking read.
        let block = (self.queues.len() == 1 && got.is_empty())
            .then(|| self.block.min(to_reclaim).max(Duration::from_millis(1)));
        for i in 0..self.queues.len() {
            let at = (r.turn + i) % self.queues.len();
            if r.pauses.paused[at] {
                continue;
            }
            let room = want - got.len();
            if room == 0 {
                break;
            }
            // A failed read drops the connection (it is not put back).
            self.read_queue(&mut c, r, at, room, block, got).await?;
        }
        r.turn = r.turn.wrapping_add(1);
        r.conn = Some(c);
        Ok(())
    }

    /// Reads up to `room` entries of queue `at`. A queue whose room has tasks is read with
    /// them in their turn; only when nothing at all is there does the reader block.
    async fn read_queue(
        &self,
        c: &mut Conn,
        r: &mut Reading,
        at: usize,
        room: usize,
        block: Option<Duration>,
        got: &mut Got,
    ) -> Result<(), QueueError> {
        let q = &self.queues[at];
        let mut read = Vec::new();
        let room_pause = self.read_pause.room_remaining();
        let held = |r: &Reading| {
            r.held[at].map_or(Duration::ZERO, |t| {
                t.saturating_duration_since(Instant::now())
            })
        };
        if r.feeding[at] && room_pause.is_zero() && held(r).is_zero() {
            // No more of the room's tasks than this worker may hold.
            let room = room.min(self.read_pause.room_allowance());
            let (more, held_until);
            (read, more, held_until) = self
                .redis
                .read_room(c, q, &self.consumer, room, &self.tenant_weights)
                .await?;
            // Every tenant left in the room is held at its limits: feed again when the
            // first hold ends (a task that comes meanwhile leaves a beacon).
            r.feeding[at] = more || held_until.is_some();
            r.held[at] = held_until.map(|ms| {
                let left = ms - chrono::Utc::now().timestamp_millis();
                Instant::now() + Duration::from_millis(u64::try_from(left).unwrap_or(0))
            });
        }
        if read.is_empty() {
            // While the room's tasks must wait, block no longer than that.
            let wait = room_pause.max(held(r));
            let block = block.map(|b| {
                if r.feeding[at] && !wait.is_zero() {
                    b.min(wait)
                } else {
                    b
                }
            });
            let plain = self.redis.read(c, q, &self.consumer, room, block);
            tokio::pin!(plain);
            read = tokio::select! {
                biased;
                r = &mut plain => r,
                // Shutdown ends a long blocking read at once: what it read before is handed
                // over as always, and nothing after.
                () = self.stop.cancelled(), if block.is_some() => {
                    end_read(&self.redis, r.conn_id, &mut plain).await
                }
            }?;
        }
        // The room's beacon says it has tasks: drop it, and feed from it.
        if !self.redis.drop_beacons(q, &mut read).await?.is_empty() {
            r.feeding[at] = true;
            // A task came since every tenant left was held: it may be another tenant's.
            r.held[at] = None;
        }
        // A blocking read's entries were handed over when it returned.
        let now = Instant::now();
        got.extend(read.into_iter().map(|d| (Arc::clone(q), d, now)));
        Ok(())
    }

    /// A blocking read may have waited past a pause or a drain: hands on nothing read from
    /// a queue paused since (or from any, draining), and gives it back to the stream.
    async fn give_back_paused(&self, r: &mut Reading, got: &mut Got) -> Result<(), QueueError> {
        r.pauses.refresh(&self.redis, &self.queues, true).await?;
        let drained = self.drained();
        if !drained && !r.pauses.paused.contains(&true) {
            return Ok(());
        }
        let (back, keep): (Vec<_>, Vec<_>) = got.drain(..).partition(|(q, ..)| {
            drained
                || self
                    .queues
                    .iter()
                    .position(|k| Arc::ptr_eq(k, q))
                    .is_some_and(|i| r.pauses.paused[i])
        });
        *got = keep;
        for (q, d, _) in &back {
            self.redis.unread(q, &self.consumer, &[d.entry_id]).await?;
        }
        Ok(())
    }

    /// Hands each entry read to the workers with its permit, its claim held from when Redis
    /// handed it over; `false` once nobody takes jobs any more.
    fn hand_over(
        &self,
        got: Got,
        permits: Vec<OwnedSemaphorePermit>,
        jobs: &mpsc::UnboundedSender<Job>,
    ) -> bool {
        for ((queue, delivery, at), permit) in got.into_iter().zip(permits) {
            let claim = self.claims.hold(&queue, delivery.entry_id, at);
            if delivery.from_room {
                self.read_pause.room_read();
            }
            let job = Job {
                queue,
                delivery: Box::new(delivery),
                permit,
                claim,
            };
            if jobs.send(job).is_err() {
                return false;
            }
        }
        true
    }
}

/// Each entry read, with when Redis handed it over: its claim counts from then.
type Got = Vec<(Arc<QueueKeys>, Delivery, Instant)>;

/// What the read loop keeps from one read to the next.
struct Reading {
    reclaim_every: Duration,
    last_reclaim: Option<Instant>,
    /// The connection reads block on, and its id (for `CLIENT UNBLOCK`).
    conn: Option<Conn>,
    conn_id: Option<i64>,
    /// Which queue is read first, turn by turn.
    turn: usize,
    /// Failed reads in a row.
    failures: u32,
    /// Per queue: its room had tasks when last read, so read it with them.
    feeding: Vec<bool>,
    /// Per queue, until when every tenant left in its room is held at its limits.
    held: Vec<Option<Instant>>,
    pauses: Pauses,
}

impl Reading {
    fn new(queues: usize, visibility_timeout: Duration) -> Self {
        Self {
            reclaim_every: (visibility_timeout / 2)
                .clamp(Duration::from_millis(200), Duration::from_secs(30)),
            last_reclaim: None,
            conn: None,
            conn_id: None,
            turn: 0,
            failures: 0,
            feeding: vec![false; queues],
            held: vec![None; queues],
            pauses: Pauses {
                paused: vec![false; queues],
                checked: None,
            },
        }
    }
}
