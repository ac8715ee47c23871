//! Circuit breakers, shared by every worker through Redis: one per provider and one per
//! model, so that an outage is ridden out by waiting instead of by failing tasks.
//!
//! - **Closed**: calls go through. Failures in a row are counted; a success resets them.
//! - **Open**: after `cooldown.after_failures` failures in a row, nobody calls for
//!   `cooldown.for`. Tasks that have nowhere else to go wait in `delayed` until then.
//! - **Half-open**: when the cooldown ends, one worker takes a probe lease and makes one
//!   call; the others keep waiting. Its success closes the circuit; its failure opens it again.
//!
//! Which circuit an error counts against is [`crate::provider::Error::scope`]: connection and
//! authentication failures say the provider is out, server errors and timeouts say one model
//! is; 400, 404, 422, rate limits and quotas say nothing about health.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use redis::Script;

use crate::config::Cooldown;
use crate::keys::{CircuitKeys, ProviderKeys};
use crate::provider::Scope;
use crate::queue::{Client, Result};

/// How stale a cached "closed" may be: the hot path asks Redis at most this often per model.
pub const FRESHNESS: Duration = Duration::from_millis(250);

/// How long a probe call holds its lease; a probe slower than this lets another worker probe.
pub const PROBE_LEASE: Duration = Duration::from_secs(15);

/// The longest a task waits on another worker's probe before it looks again.
pub const PROBE_WAIT: Duration = Duration::from_secs(1);

/// How long a tripped circuit remembers it tripped when nobody calls at all.
const TRIPPED_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Whether a call may be made now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Call. `probe` is set when this call decides whether a tripped circuit closes: its
    /// outcome must be reported with [`Circuits::succeeded`] or [`Circuits::failed`].
    Call { probe: bool },
    /// Do not call until `until`.
    Wait(Open),
}

/// An open circuit, or one being probed by another worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    pub provider: String,
    /// `None` when the whole provider is out.
    pub model: Option<String>,
    /// Why it opened, e.g. "5 failures in a row; the last: mock/x: cannot connect: ...".
    pub reason: String,
    /// When it opened, when known.
    pub since: Option<DateTime<Utc>>,
    /// When a call may be tried again.
    pub until: DateTime<Utc>,
    /// True while another worker's probe call decides.
    pub probing: bool,
}

impl Open {
    /// The scope as `provider` or `provider/model`.
    #[must_use]
    pub fn scope(&self) -> String {
        match &self.model {
            None => self.provider.clone(),
            Some(m) => format!("{}/{m}", self.provider),
        }
    }

    /// The state as a sentence, e.g. for a task's route or a dead letter.
    #[must_use]
    pub fn describe(&self) -> String {
        let what = if self.probing {
            "is being probed after a cooldown"
        } else {
            "is cooling down"
        };
        let since = self
            .since
            .map(|s| format!(" since {}", s.format("%H:%M:%S UTC")))
            .unwrap_or_default();
        format!(
            "{} {what}{since} until {} ({})",
            self.scope(),
            self.until.format("%H:%M:%S UTC"),
            self.reason
        )
    }
}

/// What this process last learned of one provider/model pair.
#[derive(Debug, Clone, Copy)]
struct Cached {
    at: Instant,
    /// A failure counter is running (here or in another worker): a success resets it.
    dirty: bool,
}

/// Pairs recently seen closed, by provider, then model: looked up by `&str` on every call,
/// so the hot path allocates nothing.
#[derive(Debug, Default)]
struct Closed(HashMap<String, HashMap<String, Cached>>);

impl Closed {
    fn get(&self, provider: &str, model: &str) -> Option<&Cached> {
        self.0.get(provider)?.get(model)
    }

    fn get_mut(&mut self, provider: &str, model: &str) -> Option<&mut Cached> {
        self.0.get_mut(provider)?.get_mut(model)
    }

    fn insert(&mut self, provider: &str, model: &str, cached: Cached) {
        let models = self.0.entry(provider.to_owned()).or_default();
        models.insert(model.to_owned(), cached);
    }

    /// Makes the pair's entry stale, if there is one: the next call asks Redis again, and
    /// a success still finds the pair clean (so it does not reset circuits it never saw).
    fn expire(&mut self, provider: &str, model: &str) {
        if let Some(c) = self.get_mut(provider, model) {
            match Instant::now().checked_sub(FRESHNESS) {
                Some(stale) => c.at = stale,
                None => self.forget(provider, Some(model)),
            }
        }
    }

    /// Forgets the provider's pairs, or only the one model's.
    fn forget(&mut self, provider: &str, model: Option<&str>) {
        if let Some(models) = self.0.get_mut(provider) {
            match model {
                Some(m) => drop(models.remove(m)),
                None => models.clear(),
            }
        }
    }
}

/// The circuit breakers of every provider and model.
#[derive(Clone)]
pub struct Circuits {
    redis: Client,
    check: Arc<Script>,
    fail: Arc<Script>,
    /// Pairs recently seen closed, so the hot path does not ask Redis per call.
    closed: Arc<Mutex<Closed>>,
    /// What this process last read of each pair's hold, and when: calls made at once share
    /// one read (see [`HOLD_FRESHNESS`]).
    holds: Arc<Mutex<Holds>>,
    who: String,
}

/// How old a read of a pair's hold may be for a call: the calls of a busy worker share one
/// `GET` per pair per this long, instead of one each (a wait another worker was asked for
/// reaches this one within [`HOLD_STALE`], plus a round trip).
pub const HOLD_FRESHNESS: Duration = Duration::from_millis(5);

/// How old a read of a pair's hold may be for a call while the next read is under way: a
/// busy worker's calls go on with it rather than wait a round trip for the next.
pub const HOLD_STALE: Duration = Duration::from_millis(25);

/// One pair's last read hold: when that read started and ended, what it said, and since
/// when a call is reading it again (a read whose call was dropped midway counts for a second
/// at most).
#[derive(Default)]
struct HoldRead {
    at: Option<Instant>,
    done: Option<Instant>,
    hold: Option<Hold>,
    reading: Option<Instant>,
}

/// The last read, and the word that a read ended. A call takes a recent read as it is (see
/// [`Circuits::held`]); one that finds it too old reads again, or, when another call is
/// reading already, waits for that read to end and takes its answer: calls never wait for
/// one another one by one, and a worker reads once however many calls found it old at once.
#[derive(Default)]
struct HoldState {
    last: Mutex<HoldRead>,
    read: tokio::sync::Notify,
}

type HoldSlot = Arc<HoldState>;

/// What a look at a pair's last read hold says to a call.
enum Look {
    /// What stands (a read may have been started in the background).
    Known(Option<Hold>),
    /// Too old, and nobody is reading: this call reads.
    Read,
    /// Too old, and another call is reading: wait for its answer.
    Wait,
    /// The lock is poisoned: read without it.
    Broken,
}

/// Per provider, then model: looked up by `&str`, so the hot path allocates nothing.
#[derive(Default)]
struct Holds(HashMap<String, HashMap<String, HoldSlot>>);

impl Holds {
    fn slot(&mut self, provider: &str, model: &str) -> HoldSlot {
        if let Some(s) = self.0.get(provider).and_then(|m| m.get(model)) {
            return Arc::clone(s);
        }
        let slot = HoldSlot::default();
        self.0
            .entry(provider.to_owned())
            .or_default()
            .insert(model.to_owned(), Arc::clone(&slot));
        slot
    }
}

impl Circuits {
    #[must_use]
    pub fn new(redis: Client, who: &str) -> Self {
        Self {
            redis,
            check: Arc::new(Script::new(include_str!("circuit/check.lua"))),
            fail: Arc::new(Script::new(include_str!("circuit/fail.lua"))),
            closed: Arc::default(),
            holds: Arc::default(),
            who: who.to_owned(),
        }
    }

    /// Whether a call to `provider`/`model` may be made without asking Redis: this process
    /// saw the pair closed within [`FRESHNESS`]. No wait and no allocation. When what it saw
    /// has gone stale, this caller is the one to ask ([`Circuits::ask`]) and gets `false`;
    /// the others go on as before for the one round trip that takes (otherwise every task
    /// arriving in that round trip asked too: hundreds of scripts a second at a few thousand
    /// tasks a second).
    #[must_use]
    pub fn admitted(&self, provider: &str, model: &str) -> bool {
        let Ok(mut cache) = self.closed.lock() else {
            return false;
        };
        let Some(c) = cache.get_mut(provider, model) else {
            return false;
        };
        if c.at.elapsed() < FRESHNESS {
            return true;
        }
        c.at = Instant::now();
        false
    }

    /// Whether a call to `provider`/`model` may be made now.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn admit(&self, provider: &str, model: &str) -> Result<Admission> {
        if self.admitted(provider, model) {
            return Ok(Admission::Call { probe: false });
        }
        self.ask(provider, model).await
    }

    /// Asks Redis whether a call to `provider`/`model` may be made now, for a caller that
    /// was not [`Circuits::admitted`].
    ///
    /// # Errors
    /// Redis fails.
    pub async fn ask(&self, provider: &str, model: &str) -> Result<Admission> {
        let keys = ProviderKeys::new(provider);
        let (p, m) = (keys.circuit(None), keys.circuit(Some(model)));
        let mut invocation = self.check.prepare_invoke();
        for k in [&p, &m] {
            invocation
                .key(&k.open)
                .key(&k.tripped)
                .key(&k.probe)
                .key(&k.failures);
        }
        invocation
            .arg(PROBE_LEASE.as_millis() as u64)
            .arg(&self.who);
        let asked: Result<Vec<redis::Value>> = async {
            let mut c = self.redis.conn().await?;
            Ok(invocation.invoke_async(&mut c).await?)
        }
        .await;
        let reply = match asked {
            Ok(reply) => reply,
            Err(e) => {
                // Nobody knows better now: the next call asks again.
                if let Ok(mut cache) = self.closed.lock() {
                    cache.expire(provider, model);
                }
                return Err(e);
            }
        };
        let text = |i: usize| match reply.get(i) {
            Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(redis::Value::SimpleString(s)) => s.clone(),
            Some(redis::Value::Int(n)) => n.to_string(),
            _ => String::new(),
        };
        let int = |i: usize| text(i).parse::<i64>().unwrap_or(0);
        if text(0) == "ok" {
            let probe = int(4) != 0;
            if !probe && let Ok(mut cache) = self.closed.lock() {
                cache.insert(
                    provider,
                    model,
                    Cached {
                        at: Instant::now(),
                        dirty: int(5) != 0,
                    },
                );
            }
            if probe && let Ok(mut cache) = self.closed.lock() {
                cache.expire(provider, model);
            }
            return Ok(Admission::Call { probe });
        }
        if let Ok(mut cache) = self.closed.lock() {
            cache.expire(provider, model);
        }
        let probing = text(4) == "probing";
        let wait_ms = int(2).max(0);
        let wait = if probing {
            Duration::from_millis(wait_ms as u64).min(PROBE_WAIT)
        } else {
            Duration::from_millis(wait_ms as u64)
        };
        let (since, reason) = split_open(&text(3), probing);
        Ok(Admission::Wait(Open {
            provider: provider.to_owned(),
            model: (text(1) == "model").then(|| model.to_owned()),
            reason,
            since,
            until: Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default(),
            probing,
        }))
    }

    /// Counts a failed call against the circuit `scope` says. Returns true when this
    /// failure opened it.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn failed(
        &self,
        provider: &str,
        model: &str,
        scope: Scope,
        error: &str,
        cooldown: &Cooldown,
    ) -> Result<bool> {
        let keys = ProviderKeys::new(provider);
        let k = match scope {
            Scope::Provider => keys.circuit(None),
            Scope::Model => keys.circuit(Some(model)),
        };
        if let Ok(mut cache) = self.closed.lock() {
            // Look again next time, and reset the counter on the next success.
            cache.forget(provider, (scope == Scope::Model).then_some(model));
        }
        let mut c = self.redis.conn().await?;
        let opened: i64 = self
            .fail
            .key(&k.open)
            .key(&k.tripped)
            .key(&k.probe)
            .key(&k.failures)
            .arg(cooldown.after_failures)
            .arg(cooldown.duration.as_millis() as u64)
            .arg(crate::provider::excerpt(error, 300))
            .arg(Utc::now().timestamp_millis())
            .arg(TRIPPED_TTL.as_millis() as u64)
            .invoke_async(&mut c)
            .await?;
        Ok(opened == 1)
    }

    /// Whether this process saw the pair closed and no failure since: a success then has
    /// nothing to reset (see [`Circuits::succeeded`]).
    #[must_use]
    pub fn known_closed(&self, provider: &str, model: &str) -> bool {
        self.closed
            .lock()
            .is_ok_and(|cache| cache.get(provider, model).is_some_and(|c| !c.dirty))
    }

    /// A call answered: the provider and the model are healthy. Resets their failure
    /// counters and closes them if they had tripped. Free when nothing needs resetting.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn succeeded(&self, provider: &str, model: &str, probe: bool) -> Result<()> {
        if self.known_closed(provider, model) && !probe {
            return Ok(());
        }
        let keys = ProviderKeys::new(provider);
        let (p, m) = (keys.circuit(None), keys.circuit(Some(model)));
        let mut c = self.redis.conn().await?;
        redis::cmd("DEL")
            .arg(&all(&p)[..])
            .arg(&all(&m)[..])
            .query_async::<()>(&mut c)
            .await?;
        if let Ok(mut cache) = self.closed.lock() {
            cache.insert(
                provider,
                model,
                Cached {
                    at: Instant::now(),
                    dirty: false,
                },
            );
        }
        Ok(())
    }

    /// Every open (or probing) circuit among these providers and their models, for
    /// `llmq status`.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn open(&self, providers: &[(String, Vec<String>)]) -> Result<Vec<Open>> {
        let mut scopes: Vec<(&str, Option<&str>)> = Vec::new();
        for (p, models) in providers {
            scopes.push((p, None));
            scopes.extend(models.iter().map(|m| (p.as_str(), Some(m.as_str()))));
        }
        let mut c = self.redis.conn().await?;
        let replies: Vec<(Option<String>, i64, Option<String>)> = {
            // One pipeline per provider: each stays in its provider's slot (Redis Cluster).
            let mut flat: Vec<redis::Value> = Vec::new();
            for (p, models) in providers {
                let mut pipe = redis::pipe();
                for m in std::iter::once(None).chain(models.iter().map(|m| Some(m.as_str()))) {
                    let k = ProviderKeys::new(p).circuit(m);
                    pipe.get(&k.open).pttl(&k.open).get(&k.tripped);
                }
                let part: Vec<redis::Value> = pipe.query_async(&mut c).await?;
                flat.extend(part);
            }
            flat.chunks(3)
                .map(|ch| {
                    let s = |v: &redis::Value| match v {
                        redis::Value::BulkString(b) => {
                            Some(String::from_utf8_lossy(b).into_owned())
                        }
                        _ => None,
                    };
                    let n = match ch.get(1) {
                        Some(redis::Value::Int(n)) => *n,
                        _ => 0,
                    };
                    (ch.first().and_then(s), n, ch.get(2).and_then(s))
                })
                .collect()
        };
        let now = Utc::now();
        let mut out = Vec::new();
        for ((p, m), (open, pttl, tripped)) in scopes.iter().zip(replies) {
            let base = |reason: String, since, until, probing| Open {
                provider: (*p).to_owned(),
                model: m.map(str::to_owned),
                reason,
                since,
                until,
                probing,
            };
            if let Some(text) = open {
                let (since, reason) = split_open(&text, false);
                let until = now + chrono::Duration::milliseconds(pttl.max(0));
                out.push(base(reason, since, until, false));
            } else if let Some(reason) = tripped {
                // Half-open: the next call (a probe) decides.
                out.push(base(reason, None, now, true));
            }
        }
        Ok(out)
    }
}

/// A wait a provider asked for, which every worker honours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub until: DateTime<Utc>,
    /// The answer that asked for it.
    pub reason: String,
}

impl Hold {
    /// The time left from now.
    #[must_use]
    pub fn remaining(&self) -> Duration {
        (self.until - Utc::now()).to_std().unwrap_or_default()
    }
}

/// Sets a hold unless a longer one stands. KEYS: 1 hold; ARGV: 1 wait (ms), 2 the text.
static HOLD: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(
        r"
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[1])
end
return 0
",
    )
});

impl Circuits {
    /// A provider answered `model`'s call with a wait (Retry-After, or its reset headers on
    /// a 429): nobody in the fleet calls that model until it passes. A Retry-After speaks
    /// to the API key, not to one worker. Only lengthens a hold already set.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn hold(&self, provider: &str, model: &str, wait: Duration, why: &str) -> Result<()> {
        let ms = wait.as_millis().max(1) as u64;
        let until = Utc::now().timestamp_millis() + ms as i64;
        let reason = crate::provider::excerpt(why, 300);
        let text = format!("{until}|{reason}");
        let mut c = self.redis.conn().await?;
        let _: i64 = HOLD
            .key(ProviderKeys::new(provider).hold(model))
            .arg(ms)
            .arg(text)
            .invoke_async(&mut c)
            .await?;
        // This worker's own calls see it at once.
        let slot = self.holds.lock().ok().map(|mut h| h.slot(provider, model));
        if let (Some(until), Some(slot)) = (DateTime::from_timestamp_millis(until), slot)
            && let Ok(mut s) = slot.last.lock()
            && s.hold.as_ref().is_none_or(|h| h.until < until)
        {
            s.hold = Some(Hold { until, reason });
        }
        Ok(())
    }

    /// The wait the provider asked of `model`'s callers, if one stands, as read from Redis
    /// at most [`HOLD_FRESHNESS`] ago, or [`HOLD_STALE`] ago while a newer read is under way:
    /// a hold set by another worker a moment ago stops this call too. A busy worker's calls
    /// never wait for that read: the first call that finds the last one older than
    /// [`HOLD_FRESHNESS`] starts the next in the background and goes on with the last
    /// answer. Only a call after a quiet spell (the last read older than [`HOLD_STALE`])
    /// waits for a read, and calls that arrive during it share it.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn held(&self, provider: &str, model: &str) -> Result<Option<Hold>> {
        let Some(slot) = self.holds.lock().ok().map(|mut h| h.slot(provider, model)) else {
            return Box::pin(self.read_hold(provider, model)).await;
        };
        let since = Instant::now();
        match self.look(&slot, provider, model, since) {
            Look::Known(hold) => Ok(hold),
            // Boxed: a call's state stays the size of the look, not of a wait or a read.
            look => Box::pin(self.held_slowly(look, slot, provider, model, since)).await,
        }
    }

    /// What the last read of `slot` says to a call that arrived at `since`; when it says
    /// to refresh, the next read is already under way in the background.
    fn look(&self, slot: &Arc<HoldState>, provider: &str, model: &str, since: Instant) -> Look {
        let Ok(mut s) = slot.last.lock() else {
            return Look::Broken;
        };
        let age = s.at.map(|at| at.elapsed());
        let reading = s
            .reading
            .is_some_and(|r| r.elapsed() < Duration::from_secs(1));
        let known = |s: &HoldRead| {
            let now = Utc::now();
            s.hold.clone().filter(|h| h.until > now)
        };
        if age.is_some_and(|a| a < HOLD_FRESHNESS) || s.done.is_some_and(|d| d >= since) {
            // The hot path: nothing awaited, nothing allocated.
            return Look::Known(known(&s));
        }
        if age.is_some_and(|a| a < HOLD_STALE) {
            if !reading {
                s.reading = Some(Instant::now());
                let (this, slot) = (self.clone(), Arc::clone(slot));
                let (provider, model) = (provider.to_owned(), model.to_owned());
                tokio::spawn(async move {
                    if let Err(e) = this.read_into(&slot, &provider, &model).await {
                        tracing::debug!(provider, model, "reading the hold failed: {e}");
                    }
                });
            }
            return Look::Known(known(&s));
        }
        if reading {
            Look::Wait
        } else {
            s.reading = Some(Instant::now());
            Look::Read
        }
    }

    /// [`Circuits::held`] when `look`, the call's first, found the last read too old to go
    /// on with: reads it (the look made this call the reader), or waits for the read another
    /// call started.
    async fn held_slowly(
        &self,
        mut look: Look,
        slot: Arc<HoldState>,
        provider: &str,
        model: &str,
        since: Instant,
    ) -> Result<Option<Hold>> {
        loop {
            match look {
                Look::Known(hold) => return Ok(hold),
                // Boxed: the calls that wait hold only the wait, not a read's state.
                Look::Broken => return Box::pin(self.read_hold(provider, model)).await,
                Look::Read => return Box::pin(self.read_into(&slot, provider, model)).await,
                Look::Wait => {}
            }
            let ended = slot.read.notified();
            tokio::pin!(ended);
            // Registered before the second look: a read's end cannot be missed.
            ended.as_mut().enable();
            look = self.look(&slot, provider, model, since);
            if matches!(look, Look::Wait) {
                let _ = tokio::time::timeout(Duration::from_secs(1), ended).await;
                look = self.look(&slot, provider, model, since);
            }
        }
    }

    /// Reads the pair's hold into `slot` (a longer hold this worker set meanwhile stands),
    /// wakes the calls waiting for it and returns what now stands.
    async fn read_into(
        &self,
        slot: &HoldState,
        provider: &str,
        model: &str,
    ) -> Result<Option<Hold>> {
        let read_at = Instant::now();
        let read = self.read_hold(provider, model).await;
        let answer = slot.last.lock().ok().map(|mut s| {
            s.reading = None;
            let now = Utc::now();
            if let Ok(hold) = &read {
                s.at = Some(read_at);
                s.done = Some(Instant::now());
                let kept = s.hold.as_ref().filter(|h| h.until > now);
                if kept.is_none_or(|k| hold.as_ref().is_some_and(|n| n.until >= k.until)) {
                    s.hold.clone_from(hold);
                }
            }
            s.hold.clone().filter(|h| h.until > now)
        });
        slot.read.notify_waiters();
        match (read, answer) {
            (Ok(_), Some(kept)) => Ok(kept),
            (read, _) => read,
        }
    }

    /// Reads the pair's hold from Redis.
    async fn read_hold(&self, provider: &str, model: &str) -> Result<Option<Hold>> {
        let mut c = self.redis.conn().await?;
        let text: Option<String> = redis::cmd("GET")
            .arg(ProviderKeys::new(provider).hold(model))
            .query_async(&mut c)
            .await?;
        Ok(text.and_then(|t| {
            let (until, reason) = t.split_once('|')?;
            let until = DateTime::from_timestamp_millis(until.parse().ok()?)?;
            (until > Utc::now()).then(|| Hold {
                until,
                reason: reason.to_owned(),
            })
        }))
    }
}

/// Every key of a circuit, for a reset.
fn all(k: &CircuitKeys) -> [&str; 4] {
    [&k.open, &k.tripped, &k.probe, &k.failures]
}

/// Reads `<since ms>|<reason>` (an open circuit) or a bare reason (a tripped one).
fn split_open(text: &str, bare: bool) -> (Option<DateTime<Utc>>, String) {
    if !bare
        && let Some((ms, reason)) = text.split_once('|')
        && let Ok(ms) = ms.parse::<i64>()
    {
        return (DateTime::from_timestamp_millis(ms), reason.to_owned());
    }
    (None, text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_text_is_read_back() {
        let (since, reason) = split_open("1767225600000|5 failures in a row", false);
        assert_eq!(
            since.map(|s| s.to_rfc3339()),
            Some("2026-01-01T00:00:00+00:00".into())
        );
        assert_eq!(reason, "5 failures in a row");
        assert_eq!(split_open("a|b", true), (None, "a|b".into()));
    }

    #[test]
    fn an_open_circuit_reads_as_a_sentence() {
        let at = DateTime::from_timestamp_millis(1_767_225_600_000).unwrap();
        let open = Open {
            provider: "openai".into(),
            model: Some("gpt-4o".into()),
            reason: "5 failures in a row; the last: HTTP 500".into(),
            since: Some(at),
            until: at + chrono::Duration::seconds(60),
            probing: false,
        };
        assert_eq!(
            open.describe(),
            "openai/gpt-4o is cooling down since 00:00:00 UTC until 00:01:00 UTC (5 failures in a row; the last: HTTP 500)"
        );
    }
}
