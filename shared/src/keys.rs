//! Every Redis key llmq uses, in one place.
//!
//! All keys of one queue share the hash tag `{<queue>}`, so every multi-key script runs on
//! Redis Cluster. `docs/wire-format.md` documents this layout; it is the public API for
//! producers in other languages, so a change here is a breaking change.

use crate::ids::TaskId;

/// The consumer group every worker reads the ready stream with.
pub const GROUP: &str = "workers";

/// The stream field that holds the JSON envelope.
pub const TASK_FIELD: &str = "task";

/// The stream field that holds a chain spec.
pub const CHAIN_FIELD: &str = "chain";

/// The stream field that marks an entry as having had its turn in the room (fed from it, or
/// run once already): the worker runs it even when it has a `priority` or `tenant`.
pub const ROOM_FIELD: &str = "room";

/// The set of queue names workers have served, for `llmq status`.
pub const QUEUES: &str = "llmq:queues";

/// Every worker process of the fleet, whatever its queues: a sorted set of worker ids scored
/// by last heartbeat (ms). Its keys share the hash tag `{workers}` (one slot of a Cluster).
pub const WORKERS: &str = "llmq:{workers}";

/// What worker `id` says of itself at each heartbeat (`queue::WorkerInfo`): a JSON string
/// that lapses an hour after its last beat.
#[must_use]
pub fn worker_info(id: &str) -> String {
    format!("{WORKERS}:{id}")
}

/// Set while worker `id` is asked to drain (`llmq worker drain`): who asked and when, as
/// JSON. The worker takes nothing new while it exists and finishes what it holds.
#[must_use]
pub fn worker_drain(id: &str) -> String {
    format!("{WORKERS}:{id}:drain")
}

/// The longest queue name llmq takes, in bytes: every key of the queue carries it.
pub const QUEUE_NAME_MAX: usize = 200;

/// `name`, if it can name a queue; if not, a sentence saying why, with the fix. A brace
/// would end the queue's hash tag early (its keys could then land in other slots of a
/// Cluster, or meet another queue's), and a control character would reach logs and pages.
/// Every way in asks this (the CLIs' `--queue`, as their value parser; the web page; the
/// scheduler's file), as the Python and Node clients ask the same.
///
/// # Errors
/// The name is empty, longer than [`QUEUE_NAME_MAX`] bytes, or holds a brace or a control
/// character.
pub fn queue_name(name: &str) -> Result<String, String> {
    let why = if name.trim().is_empty() {
        "it is empty".to_owned()
    } else if name.len() > QUEUE_NAME_MAX {
        format!("it is longer than {QUEUE_NAME_MAX} bytes")
    } else if name.contains(['{', '}']) {
        "a brace would end its keys' hash tag early".to_owned()
    } else if name.chars().any(char::is_control) {
        "it holds a control character".to_owned()
    } else {
        return Ok(name.to_owned());
    };
    Err(format!(
        "\"{}\" cannot name a queue: {why}; keep to letters, digits, -, _ and . (such as default)",
        name.chars().take(60).collect::<String>().escape_debug()
    ))
}

/// Key names of one queue.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QueueKeys {
    /// Shared with every ledger row the queue's calls write.
    name: std::sync::Arc<str>,
    prefix: String,
}

impl QueueKeys {
    /// The keys of queue `name`.
    #[must_use]
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            prefix: format!("llmq:{{{name}}}"),
        }
    }

    /// The queue's name, without the hash tag.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The queue's name, to keep without copying it (a ledger row's `queue`).
    #[must_use]
    pub fn shared_name(&self) -> std::sync::Arc<str> {
        std::sync::Arc::clone(&self.name)
    }

    /// Ready tasks: a stream read by the group [`GROUP`].
    #[must_use]
    pub fn stream(&self) -> String {
        format!("{}:stream", self.prefix)
    }

    /// Tasks waiting for `run_at` or a retry backoff: a sorted set scored by due time in ms.
    #[must_use]
    pub fn delayed(&self) -> String {
        format!("{}:delayed", self.prefix)
    }

    /// Dead letters: a stream.
    #[must_use]
    pub fn dead(&self) -> String {
        format!("{}:dead", self.prefix)
    }

    // The keys of concurrency slots (`held:<key>`, `parked:<key>`, `parked`) are named by
    // the slot scripts themselves (queue/lua/slots.lua), from this prefix; so are the answer
    // cache's accounting (`answers:*`, queue/answer_store.lua).

    /// What the answer cache keeps as `name` (`queue::answer_name`, `queue::warm_name`): a
    /// string with a TTL.
    #[must_use]
    pub fn kept(&self, name: &str) -> String {
        format!("{}:{name}", self.prefix)
    }

    /// How many copies of keyed tasks were answered with the first's answer: a counter.
    /// (The keys themselves, `idem:<hash>`, are named by `crate::idempotency`.)
    #[must_use]
    pub fn duplicates(&self) -> String {
        format!("{}:duplicates", self.prefix)
    }

    /// The stored outcome of one task: a JSON string with a TTL.
    #[must_use]
    pub fn result(&self, task_id: TaskId) -> String {
        format!("{}:result:{task_id}", self.prefix)
    }

    /// A task's live answer: a stream of its text as it arrives (`"stream": true`).
    #[must_use]
    pub fn out(&self, task_id: TaskId) -> String {
        format!("{}:out:{task_id}", self.prefix)
    }

    /// A chain: a hash of its spec, graph, state and counters.
    #[must_use]
    pub fn chain(&self, chain_id: &str) -> String {
        format!("{}:chain:{chain_id}", self.prefix)
    }

    /// A chain's steps: a hash of step name to its state (JSON).
    #[must_use]
    pub fn chain_steps(&self, chain_id: &str) -> String {
        format!("{}:chain:{chain_id}:steps", self.prefix)
    }

    /// A chain's step tasks: a hash of step name to the envelope its run enqueues.
    #[must_use]
    pub fn chain_tasks(&self, chain_id: &str) -> String {
        format!("{}:chain:{chain_id}:tasks", self.prefix)
    }

    /// The parents step `step` still waits for: a set of step names. Every wait set of a
    /// chain starts with [`QueueKeys::chain_wait_prefix`].
    #[must_use]
    pub fn chain_wait(&self, chain_id: &str, step: &str) -> String {
        format!("{}{step}", self.chain_wait_prefix(chain_id))
    }

    /// What every wait set of a chain starts with (the chain scripts add the step's name).
    #[must_use]
    pub fn chain_wait_prefix(&self, chain_id: &str) -> String {
        format!("{}:chain:{chain_id}:wait:", self.prefix)
    }

    /// Chain steps awaiting approval: a sorted set of `<chain id>\t<step>` by deadline (ms).
    #[must_use]
    pub fn approvals(&self) -> String {
        format!("{}:approvals", self.prefix)
    }

    /// Every chain of the queue: a sorted set of chain ids by submission time (ms).
    #[must_use]
    pub fn chains(&self) -> String {
        format!("{}:chains", self.prefix)
    }

    /// Live workers of this queue: a sorted set of worker ids scored by last heartbeat (ms).
    #[must_use]
    pub fn workers(&self) -> String {
        format!("{}:workers", self.prefix)
    }

    /// The consumers none of whose entries a takeover (by another, or by the consumer
    /// itself) has claimed since their process joined: a hash of consumer to its process's
    /// run token.
    /// Such a consumer's finish needs no per-entry check that it still holds its entries
    /// (`finish.lua`); a takeover removes the holder (`reclaim.lua`).
    #[must_use]
    pub fn intact(&self) -> String {
        format!("{}:intact", self.prefix)
    }

    /// The room: ready tasks with a `priority` or `tenant`, waiting to be fed to the stream in
    /// their turn (`queue/lua/room.lua`). This key is a sorted set of the priorities that
    /// have tasks, each scored by itself; `room:<p>` is the ring of tenants with tasks at
    /// priority `p` (a list, its head served next) and `room:<p>:<tenant>` that tenant's
    /// tasks (a list of envelopes, oldest first). A tenant's keys exist only while it has
    /// work.
    #[must_use]
    pub fn room(&self) -> String {
        format!("{}:room", self.prefix)
    }

    /// As many one-byte elements as tasks wait in the room: a list whose length KEDA's
    /// `redis` scaler reads (it reads only a list's length), beside the stream's trigger.
    #[must_use]
    pub fn room_backlog(&self) -> String {
        format!("{}:room:backlog", self.prefix)
    }

    /// How many tasks wait in the room at each priority: a hash of priority to count.
    #[must_use]
    pub fn room_counts(&self) -> String {
        format!("{}:room:n", self.prefix)
    }

    /// Set while the queue is paused (`llmq queue pause`): who paused it and when, as JSON.
    /// Workers take none of its tasks while it exists.
    #[must_use]
    pub fn paused(&self) -> String {
        format!("{}:paused", self.prefix)
    }

    /// Cancel marks: a sorted set of marks (`task:<id>`, `queued:<id>`, `batch:<id>`,
    /// `tenant:<name>`) scored by when each was set (ms). Workers end the work a mark names
    /// where they meet it, and never run it (`queue/cancel.rs`).
    #[must_use]
    pub fn cancels(&self) -> String {
        format!("{}:cancels", self.prefix)
    }

    /// The scheduler's fencing token as this queue last saw it (see `queue/lua/fence.lua`):
    /// fenced writes to the queue check it here, in the queue's own slot.
    #[must_use]
    pub fn fence(&self) -> String {
        format!("{}:fence", self.prefix)
    }

    /// Marks one tick (`tick_ms`) of recurring task `name` as enqueued to this queue.
    #[must_use]
    pub fn tick(&self, name: &str, tick_ms: i64) -> String {
        format!("{}:recurring:{name}:{tick_ms}", self.prefix)
    }

    /// A task that went to a provider batch: a hash of its state (`waiting`, `sent`,
    /// `answered`, `fallback`), its envelope and request while it waits, and the answer.
    #[must_use]
    pub fn batch_task(&self, task_id: TaskId) -> String {
        format!("{}:batch:task:{task_id}", self.prefix)
    }

    /// What every [`Self::batch_task`] key starts with, for the scripts that name them.
    #[must_use]
    pub fn batch_task_prefix(&self) -> String {
        format!("{}:batch:task:", self.prefix)
    }

    /// The tasks waiting to be sent in a batch to one `provider/model`: a sorted set of
    /// task ids by when they began to wait (ms).
    #[must_use]
    pub fn batch_waiting(&self, group: &str) -> String {
        format!("{}:batch:waiting:{group}", self.prefix)
    }

    /// The `provider/model` groups with waiting tasks: a set.
    #[must_use]
    pub fn batch_groups(&self) -> String {
        format!("{}:batch:groups", self.prefix)
    }

    /// One batch llmq made: a hash of its provider, model, the provider's id for it, its
    /// task ids in request order and its state.
    #[must_use]
    pub fn batch(&self, batch_id: &str) -> String {
        format!("{}:batch:b:{batch_id}", self.prefix)
    }

    /// Open batches: a sorted set of batch ids by when they were made (ms).
    #[must_use]
    pub fn batches_open(&self) -> String {
        format!("{}:batch:open", self.prefix)
    }

    /// Set, with a short TTL, while a scheduler sends this queue's batches: workers send
    /// tasks to a batch only then, so none waits for a batcher that is not there.
    #[must_use]
    pub fn batcher(&self) -> String {
        format!("{}:batch:batcher", self.prefix)
    }
}

/// The scheduler's keys (not per queue: one scheduler serves every queue). A namespace keeps
/// the schedulers of two deployments sharing one Redis (or two test suites) apart; the
/// default has none: `llmq:scheduler:*`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SchedulerKeys {
    namespace: String,
    prefix: String,
}

impl Default for SchedulerKeys {
    fn default() -> Self {
        Self::new(None)
    }
}

impl SchedulerKeys {
    #[must_use]
    pub fn new(namespace: Option<&str>) -> Self {
        let namespace = namespace.unwrap_or_default().to_owned();
        // One hash tag for all of them: the lease scripts touch several at once, which a
        // Redis Cluster allows only within one slot.
        let prefix = if namespace.is_empty() {
            "llmq:{scheduler}".to_owned()
        } else {
            format!("llmq:{{scheduler:{namespace}}}")
        };
        Self { namespace, prefix }
    }

    /// The namespace, `""` for the default one; it also names the scheduler's fencing row in
    /// Postgres.
    #[must_use]
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Who holds the lease: a string (the holder's id) with a TTL.
    #[must_use]
    pub fn lease(&self) -> String {
        format!("{}:lease", self.prefix)
    }

    /// The lease as schedulers before the `{scheduler}` hash tag named it: while one of them
    /// still holds it, a newer scheduler does not take the lease (a rolling upgrade).
    #[must_use]
    pub fn untagged_lease(&self) -> String {
        if self.namespace.is_empty() {
            "llmq:scheduler:lease".to_owned()
        } else {
            format!("llmq:scheduler:{}:lease", self.namespace)
        }
    }

    /// A counter bumped on every takeover; the holder's fencing token.
    #[must_use]
    pub fn fence(&self) -> String {
        format!("{}:fence", self.prefix)
    }

    /// Each duty's last run: a hash of duty name to JSON.
    #[must_use]
    pub fn duties(&self) -> String {
        format!("{}:duties", self.prefix)
    }

    /// What learned routing reads: the routing stats the scheduler's `routing_stats` duty
    /// wrote from the ledger, a JSON array of rows (`routing::StatRow`).
    #[must_use]
    pub fn routing_stats(&self) -> String {
        format!("{}:routing_stats", self.prefix)
    }
}

/// A tenant's limits' keys (`quota/tenant_reserve.lua`), under a hash tag of their own, so
/// one script reaches them all on a Redis Cluster. The tenant's name is kept as it is: the
/// suffixes hold no `}`, so two tenants never share a key.
#[derive(Debug, Clone)]
pub struct TenantKeys {
    prefix: String,
}

impl TenantKeys {
    #[must_use]
    pub fn new(tenant: &str) -> Self {
        Self {
            prefix: format!("llmq:{{t:{tenant}}}"),
        }
    }

    /// Micro-dollars reserved and spent on one UTC day (`YYYYMMDD`): a counter.
    #[must_use]
    pub fn spend_on(&self, day: &str) -> String {
        format!("{}:usd:d:{day}", self.prefix)
    }

    /// Micro-dollars reserved and spent in one UTC month (`YYYYMM`): a counter.
    #[must_use]
    pub fn spend_in(&self, month: &str) -> String {
        format!("{}:usd:m:{month}", self.prefix)
    }

    /// The pace of `rpm`: when the tenant's next call is due (ms, a float).
    #[must_use]
    pub fn requests_pace(&self) -> String {
        format!("{}:rpm:pace", self.prefix)
    }

    /// The pace of `tpm`, as [`TenantKeys::requests_pace`], by estimated tokens.
    #[must_use]
    pub fn tokens_pace(&self) -> String {
        format!("{}:tpm:pace", self.prefix)
    }

    /// Calls in flight: reservation ids by when they lapse (ms), should their worker die.
    #[must_use]
    pub fn in_flight(&self) -> String {
        format!("{}:inflight", self.prefix)
    }

    /// Budget thresholds already announced: a hash of `kind:window:percent`.
    #[must_use]
    pub fn alerts(&self) -> String {
        format!("{}:alerts", self.prefix)
    }
}

/// Key names of one provider's shared state: quotas, rate limits, failures and cooldown.
/// They share the hash tag `{p:<provider>}`, so the quota scripts run on Redis Cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProviderKeys {
    prefix: String,
}

impl ProviderKeys {
    #[must_use]
    pub fn new(provider: &str) -> Self {
        Self {
            prefix: format!("llmq:{{p:{provider}}}"),
        }
    }

    /// Requests made on one UTC day (`YYYYMMDD`): a counter.
    #[must_use]
    pub fn requests_on(&self, day: &str) -> String {
        format!("{}:rpd:{day}", self.prefix)
    }

    /// Micro-dollars spent in one UTC month (`YYYYMM`): a counter.
    #[must_use]
    pub fn spend_in(&self, month: &str) -> String {
        format!("{}:usd:{month}", self.prefix)
    }

    /// Requests in the sliding rate window: a sorted set of reservation ids by time (ms).
    #[must_use]
    pub fn requests_window(&self) -> String {
        format!("{}:rpm", self.prefix)
    }

    /// Tokens in the sliding rate window: a sorted set of `id:tokens` by time (ms).
    #[must_use]
    pub fn tokens_window(&self) -> String {
        format!("{}:tpm", self.prefix)
    }

    /// The requests of priority `p` in the window, for a priority with a reserved share
    /// (`quota/reserve.lua` names it the same way from [`ProviderKeys::requests_window`]).
    #[must_use]
    pub fn requests_window_of(&self, p: usize) -> String {
        format!("{}:{p}", self.requests_window())
    }

    /// The tokens of priority `p` in the window, as [`ProviderKeys::requests_window_of`].
    #[must_use]
    pub fn tokens_window_of(&self, p: usize) -> String {
        format!("{}:{p}", self.tokens_window())
    }

    /// The sum of the tokens in [`ProviderKeys::tokens_window`], kept beside it so a check
    /// does not add up the whole window.
    #[must_use]
    pub fn tokens_sum(&self) -> String {
        format!("{}:tpm-sum", self.prefix)
    }

    /// The pace of `rpm` (`quota/reserve.lua`): when the next call is due if calls went out
    /// at the limit's steady rate (ms, a float).
    #[must_use]
    pub fn requests_pace(&self) -> String {
        format!("{}:rpm:pace", self.prefix)
    }

    /// The pace of `tpm`, as [`ProviderKeys::requests_pace`], by estimated tokens.
    #[must_use]
    pub fn tokens_pace(&self) -> String {
        format!("{}:tpm:pace", self.prefix)
    }

    /// The tokens a call uses, as the token pace charges them: the mean of the calls
    /// reconciled (reconcile.lua).
    #[must_use]
    pub fn tokens_mean(&self) -> String {
        format!("{}:tpm:mean", self.prefix)
    }

    /// Pace time that calls using less than their charge gave back while others already
    /// held their slots (ms, reconcile.lua): the next grants may start that far behind the
    /// pace, so the time is not lost.
    #[must_use]
    pub fn tokens_slack(&self) -> String {
        format!("{}:tpm:slack", self.prefix)
    }

    /// Who waits for the provider's next slots: task ids by priority and when each first
    /// asked (`quota/reserve.lua`).
    #[must_use]
    pub fn line(&self) -> String {
        format!("{}:line", self.prefix)
    }

    /// When each task in [`ProviderKeys::line`] must be back, or lose its place.
    #[must_use]
    pub fn line_back(&self) -> String {
        format!("{}:line:back", self.prefix)
    }

    /// Usage thresholds already announced: a hash of `kind:window:percent`.
    #[must_use]
    pub fn alerts(&self) -> String {
        format!("{}:alerts", self.prefix)
    }

    /// While set, `<until ms>|<reason>`: the provider asked (Retry-After, or its reset
    /// headers on a 429) that nobody call `model` until then; expires when that passes.
    #[must_use]
    pub fn hold(&self, model: &str) -> String {
        format!("{}:model:{model}:hold", self.prefix)
    }

    /// The circuit of the whole provider (`model` = `None`) or of one of its models.
    #[must_use]
    pub fn circuit(&self, model: Option<&str>) -> CircuitKeys {
        let base = match model {
            None => format!("{}:circuit", self.prefix),
            Some(m) => format!("{}:model:{m}:circuit", self.prefix),
        };
        CircuitKeys {
            open: format!("{base}:open"),
            tripped: format!("{base}:tripped"),
            probe: format!("{base}:probe"),
            failures: format!("{base}:failures"),
        }
    }
}

/// Key names of one circuit breaker (a provider's or a model's); see `circuit`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CircuitKeys {
    /// `<since ms>|<reason>` while the circuit is open; expires when the cooldown ends.
    pub open: String,
    /// Set from the moment the circuit opens until a call succeeds: once `open` has expired,
    /// its presence means half-open (one probe call decides).
    pub tripped: String,
    /// The worker making the probe call, with a lease.
    pub probe: String,
    /// Failures in a row while closed: a counter.
    pub failures: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names_that_would_escape_their_hash_tag_are_refused() {
        for good in [
            "default",
            "reviews-2",
            "a.b_c",
            "x:y",
            &"q".repeat(QUEUE_NAME_MAX),
        ] {
            assert_eq!(queue_name(good).as_deref(), Ok(good), "{good}");
        }
        for bad in [
            "",
            " ",
            "a}b",
            "{a}",
            "a{",
            "a\nb",
            "a\u{7}",
            &"q".repeat(QUEUE_NAME_MAX + 1),
        ] {
            let why = queue_name(bad).unwrap_err();
            assert!(why.contains("cannot name a queue"), "{why}");
            assert!(!why.contains('\n'), "the sentence stays on one line: {why}");
        }
    }

    #[test]
    fn every_key_of_a_queue_shares_one_hash_tag() {
        let keys = QueueKeys::new("default");
        for key in [
            keys.stream(),
            keys.delayed(),
            keys.dead(),
            keys.result(TaskId::random()),
            keys.workers(),
            keys.intact(),
            keys.room(),
            keys.room_counts(),
            keys.room_backlog(),
        ] {
            assert!(key.starts_with("llmq:{default}:"), "{key}");
        }
        assert_eq!(keys.stream(), "llmq:{default}:stream");
    }
}
