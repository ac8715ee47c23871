//! The claims this worker holds on stream entries, kept alive from the moment an entry is
//! read or taken over until its outcome is written.
//!
//! Redis counts an entry's idle time from its claim (the read, the takeover or the last
//! refresh), and another worker takes it over once that passes the visibility timeout. So the
//! clock here is the claim's, not the run's: an entry read and not yet started (a busy
//! machine, a slow quota script, a slot to wait for) is refreshed like one mid-call.
//!
//! - Every [`Claims::every`] (a quarter of the visibility timeout) the refresher resets the
//!   idle time of every entry last confirmed that long ago, so an entry is never idle in
//!   Redis for much more than half the timeout while this worker is alive.
//! - A refresh that finds an entry no longer held marks it lost; a refresh that fails (Redis
//!   away) leaves its claims unconfirmed. Before a call starts, [`Claims::standing`] says
//!   whether its claim is surely still held: a call is never made on a claim that may have
//!   passed to another worker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llmq_shared::ids::EntryId;
use llmq_shared::keys::QueueKeys;
use llmq_shared::queue::Client;
use tokio_util::sync::CancellationToken;

/// One held entry.
struct Claim {
    queue: Arc<QueueKeys>,
    /// When Redis last counted the claim as fresh, at the latest (taken before the command
    /// that read, took over or refreshed it was answered).
    confirmed: Instant,
    /// A refresh found another worker holding it.
    lost: bool,
}

/// Whether a call may start on an entry now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Surely still this worker's.
    Held,
    /// Not confirmed for a while (Redis away): it may still be ours; wait for a refresh.
    Unconfirmed,
    /// Another worker holds it, or may: its claim was not refreshed within the timeout.
    Lost,
}

/// Entries this worker holds, by entry id.
pub struct Claims {
    visibility_timeout: Duration,
    held: Mutex<HashMap<EntryId, Claim>>,
}

impl Claims {
    #[must_use]
    pub fn new(visibility_timeout: Duration) -> Self {
        Self {
            visibility_timeout,
            held: Mutex::default(),
        }
    }

    /// How often claims are refreshed, and how old a claim gets before it is.
    #[must_use]
    pub fn every(&self) -> Duration {
        (self.visibility_timeout / 4).max(Duration::from_millis(10))
    }

    /// Holds `entry_id` from `at`, when Redis handed it to this worker (read or taken over),
    /// and returns the key to release it by.
    #[must_use = "a claim never released stays in the map for as long as the worker lives"]
    pub fn hold(&self, queue: &Arc<QueueKeys>, id: EntryId, at: Instant) -> EntryId {
        if let Ok(mut m) = self.held.lock() {
            m.insert(
                id,
                Claim {
                    queue: Arc::clone(queue),
                    confirmed: at,
                    lost: false,
                },
            );
        }
        id
    }

    /// The entry's outcome is written (or it was handed back): nothing to keep alive.
    pub fn release(&self, id: EntryId) {
        if let Ok(mut m) = self.held.lock() {
            m.remove(&id);
        }
    }

    /// How many entries are held.
    #[must_use]
    pub fn count(&self) -> usize {
        self.held.lock().map_or(0, |m| m.len())
    }

    /// Entries whose claim was last confirmed [`Claims::every`] or longer before `now`, by
    /// queue: the ones to refresh.
    fn due(&self, now: Instant) -> Vec<(Arc<QueueKeys>, Vec<EntryId>)> {
        let Ok(m) = self.held.lock() else {
            return Vec::new();
        };
        let every = self.every();
        let mut by_queue: HashMap<Arc<QueueKeys>, Vec<EntryId>> = HashMap::new();
        for (id, c) in m.iter() {
            if !c.lost && now.saturating_duration_since(c.confirmed) >= every {
                by_queue.entry(Arc::clone(&c.queue)).or_default().push(*id);
            }
        }
        by_queue.into_iter().collect()
    }

    /// A refresh sent at `at` for `ids` answered that `lost` (as Redis wrote them) are no
    /// longer held: the rest are confirmed from `at`. Linear in both: a refresh of thousands
    /// of claims that finds them all lost holds the map's lock once over each list.
    fn refreshed(&self, ids: &[EntryId], lost: &[EntryId], at: Instant) {
        let Ok(mut m) = self.held.lock() else {
            return;
        };
        for id in ids {
            if let Some(c) = m.get_mut(id) {
                c.confirmed = c.confirmed.max(at);
            }
        }
        // A lost claim is never confirmed again: its standing reads `lost` first.
        for id in lost {
            if let Some(c) = m.get_mut(id) {
                c.lost = true;
            }
        }
    }

    /// Whether a call may start on `entry_id` at `now`. An entry not held here (a caller
    /// outside the worker's read loop) is left to the finisher's fencing.
    #[must_use]
    pub fn standing(&self, entry_id: EntryId, now: Instant) -> Standing {
        let Ok(m) = self.held.lock() else {
            return Standing::Held;
        };
        let Some(c) = m.get(&entry_id) else {
            return Standing::Held;
        };
        let age = now.saturating_duration_since(c.confirmed);
        if c.lost || age >= self.visibility_timeout {
            Standing::Lost
        } else if age < self.visibility_timeout * 3 / 4 {
            Standing::Held
        } else {
            Standing::Unconfirmed
        }
    }

    /// Waits until a call may start on `entry_id`: `true` at once while its claim is held,
    /// after the next refresh when it is unconfirmed, `false` once it may be another
    /// worker's.
    pub async fn may_call(&self, entry_id: EntryId) -> bool {
        loop {
            match self.standing(entry_id, Instant::now()) {
                Standing::Held => return true,
                Standing::Lost => return false,
                Standing::Unconfirmed => {
                    tokio::time::sleep(self.every() / 4).await;
                }
            }
        }
    }

    /// Refreshes what is due, once: sends each queue's due entries and records the answer.
    async fn refresh_due(&self, redis: &Client, consumer: &str) {
        let sent = Instant::now();
        for (q, ids) in self.due(sent) {
            match redis.refresh(&q, consumer, &ids).await {
                Ok(lost) => {
                    if !lost.is_empty() {
                        tracing::debug!(
                            queue = q.name(),
                            entries = lost.len(),
                            "entries no longer held (finished, or taken over)"
                        );
                    }
                    self.refreshed(&ids, &lost, sent);
                }
                Err(e) => tracing::warn!(queue = q.name(), "refreshing claims failed: {e}"),
            }
        }
    }
}

/// Keeps this worker's claims alive until `stop`: every [`Claims::every`], the claims that
/// old are refreshed in Redis.
pub async fn refresh(
    redis: Client,
    consumer: String,
    claims: Arc<Claims>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(claims.every());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        claims.refresh_due(&redis, &consumer).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model of one stream's pending list, on a virtual clock in ms: who holds each entry
    /// and since when Redis counts it idle.
    #[derive(Default)]
    struct Pel {
        entries: HashMap<String, (usize, u64)>,
    }

    /// One simulated worker: the real [`Claims`], driven on the virtual clock.
    struct Sim {
        claims: Claims,
        alive: bool,
        next_tick: u64,
        /// Entries read, with when the run starts and when it finishes (virtual ms).
        running: Vec<(String, u64, u64)>,
    }

    const VT: u64 = 3_000;

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    /// Random interleavings of reads, takeovers, slow starts, refreshes (late by up to a
    /// tenth of the timeout, and answered with a latency), kills and finishes. Whatever
    /// the order, no live worker that keeps refreshing ever has an entry taken from it, so
    /// no outcome of a live worker is discarded; and no call starts on a claim that was
    /// taken.
    #[test]
    fn a_live_refreshing_worker_never_loses_an_entry() {
        let base = Instant::now();
        for seed in 1..=300u64 {
            let mut rng = seeded(seed);
            let queue = Arc::new(QueueKeys::new("prop"));
            let mut pel = Pel::default();
            let mut sims: Vec<Sim> = (0..3)
                .map(|_| Sim {
                    claims: Claims::new(Duration::from_millis(VT)),
                    alive: true,
                    next_tick: 0,
                    running: Vec::new(),
                })
                .collect();
            let mut next_entry = 0u64;
            let mut discarded_from_live = 0;
            let mut finished = 0;
            let mut now = 0u64;
            while now < 60_000 {
                now += 1 + rng.below(50) as u64;
                let w = rng.below(sims.len());
                match rng.below(100) {
                    // Read a new entry; its run starts after a slow start of up to 2 s.
                    0..=29 if sims[w].alive => {
                        next_entry += 1;
                        let id = format!("{next_entry}-0");
                        pel.entries.insert(id.clone(), (w, now));
                        let _ = sims[w].claims.hold(&queue, entry(&id), at(base, now));
                        let start = now + rng.below(2_000) as u64;
                        let end = start + rng.below(8_000) as u64;
                        sims[w].running.push((id, start, end));
                    }
                    // Take over what is idle past the timeout.
                    30..=39 if sims[w].alive => {
                        let idle: Vec<String> = pel
                            .entries
                            .iter()
                            .filter(|(_, (_, since))| now.saturating_sub(*since) >= VT)
                            .map(|(id, _)| id.clone())
                            .collect();
                        for id in idle {
                            let (from, _) = pel.entries[&id];
                            if from != w && sims[from].alive {
                                discarded_from_live += 1;
                            }
                            pel.entries.insert(id.clone(), (w, now));
                            let _ = sims[w].claims.hold(&queue, entry(&id), at(base, now));
                            sims[w]
                                .running
                                .push((id, now, now + rng.below(3_000) as u64));
                        }
                    }
                    // Kill a worker (and start a new one in its place).
                    40 if sims.iter().filter(|s| s.alive).count() > 1 => {
                        sims[w].alive = false;
                        sims.push(Sim {
                            claims: Claims::new(Duration::from_millis(VT)),
                            alive: true,
                            next_tick: now,
                            running: Vec::new(),
                        });
                    }
                    _ => {}
                }
                for (i, s) in sims.iter_mut().enumerate() {
                    if !s.alive {
                        continue;
                    }
                    // The refresher, late by up to a tenth of the timeout; Redis applies
                    // the refresh up to 50 ms after it was sent.
                    if now >= s.next_tick {
                        let sent = now;
                        let applied = now + rng.below(50) as u64;
                        for (_, ids) in s.claims.due(at(base, sent)) {
                            let mut lost = Vec::new();
                            for id in &ids {
                                match pel.entries.get_mut(&id.to_string()) {
                                    Some((holder, since)) if *holder == i => *since = applied,
                                    _ => lost.push(*id),
                                }
                            }
                            s.claims.refreshed(&ids, &lost, at(base, sent));
                        }
                        s.next_tick = now
                            + s.claims.every().as_millis() as u64
                            + rng.below((VT / 10) as usize) as u64;
                    }
                    // Calls start only on held claims; finishes are fenced on the holder.
                    let claims = &s.claims;
                    s.running.retain(|(id, start, end)| {
                        if now >= *start && now < start + 60 {
                            let standing = claims.standing(entry(id), at(base, now));
                            if standing == Standing::Held {
                                assert_eq!(
                                    pel.entries.get(id).map(|e| e.0),
                                    Some(i),
                                    "seed {seed}: a call started on a claim another worker holds"
                                );
                            }
                        }
                        if now < *end {
                            return true;
                        }
                        if pel.entries.get(id).map(|e| e.0) == Some(i) {
                            pel.entries.remove(id);
                            finished += 1;
                        }
                        claims.release(EntryId::parse(id).expect("an entry id"));
                        false
                    });
                }
            }
            assert_eq!(
                discarded_from_live, 0,
                "seed {seed}: a live, refreshing worker had entries taken from it"
            );
            assert!(finished > 0, "seed {seed}: nothing finished");
        }
    }

    /// The harness's xorshift, here so the unit test needs no test crate.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n as u64) as usize
        }
    }
    fn entry(id: &str) -> EntryId {
        EntryId::parse(id).expect("an entry id")
    }

    fn seeded(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    #[test]
    fn a_claim_is_held_then_unconfirmed_then_lost_without_refreshes() {
        let claims = Claims::new(Duration::from_secs(4));
        let q = Arc::new(QueueKeys::new("q"));
        let t0 = Instant::now();
        let _ = claims.hold(&q, entry("1-0"), t0);
        let s = |ms| claims.standing(entry("1-0"), t0 + Duration::from_millis(ms));
        assert_eq!(s(0), Standing::Held);
        assert_eq!(s(2_999), Standing::Held);
        assert_eq!(s(3_000), Standing::Unconfirmed);
        assert_eq!(s(4_000), Standing::Lost);
        assert!(claims.due(t0 + Duration::from_millis(999)).is_empty());
        assert_eq!(claims.due(t0 + Duration::from_secs(1)).len(), 1);
        let one = [entry("1-0")];
        claims.refreshed(&one, &[], t0 + Duration::from_secs(3));
        assert_eq!(s(4_000), Standing::Held, "a refresh confirms it again");
        claims.refreshed(&one, &one, t0 + Duration::from_secs(4));
        assert_eq!(s(4_000), Standing::Lost, "taken by another worker");
        assert!(
            claims.due(t0 + Duration::from_secs(9)).is_empty(),
            "a lost claim is not refreshed"
        );
        assert_eq!(
            claims.standing(entry("9-0"), t0),
            Standing::Held,
            "not ours to judge"
        );
    }
}
