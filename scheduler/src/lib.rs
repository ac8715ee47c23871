//! The llmq scheduler: one active instance records closed quota windows, archives dead
//! letters to Postgres before trimming them from Redis, and enqueues recurring tasks.
//!
//! Layout: `lease` (the lease and the fence every write carries), then one module per duty:
//! `windows`, `dead_letters`, `recurring`, `approvals`, `chains`, `promote`, `gauges`,
//! `routing_stats`, `batches`, `ledger_partitions`, `ledger_rollups`. Queue
//! writes go through the queue's own fenced functions.
//!
//! Any number of instances run; the one holding the lease in Redis acts, the others poll
//! every tick and take over within the lease's length after it dies (see `lease.rs` for
//! the fencing that keeps a paused old holder from acting). Workers promote due delayed
//! tasks and reclaim idle ones themselves, so no task waits for the scheduler to be up.
//!
//! Duties, each run by the holder and recorded in `llmq:scheduler:duties`
//! ([`llmq_shared::archive::scheduler_status`] reads it for `llmq status`):
//!
//! - `quota_windows`: quota counters are per-window keys that expire by themselves, so a new
//!   day (00:00 UTC) or month (the 1st) starts with an empty key and nothing needs resetting.
//!   What would be lost is the closed window's usage: this duty writes it to `quota_history`
//!   on the first run of the next day, while the key still exists.
//! - `dead_letters`: dead letters older than `keep_in_redis`, or beyond `max_in_redis`
//!   (oldest first), are inserted into `dead_letters_archive`, committed, and only then
//!   deleted from the dead stream; archived rows older than `keep_archived` are deleted.
//! - `recurring`: each recurring task's due ticks are enqueued exactly once.
//! - `approvals`: chain steps awaiting approval past their deadline get their `on_timeout`.
//! - `chains`: chains whose keys expired leave the queue's chains index.
//! - `routing_stats`: with a learned `routing.strategy`, each model's observed success per
//!   task type and risk, read from the ledger into Redis for every worker.
//! - `batches`: tasks that can wait (`deadline`) go to providers' batch APIs: sends them,
//!   asks about open batches, and settles each task with its answer or a normal call.
//! - `ledger_partitions`: the ledger's monthly partitions are made three months ahead, and
//!   with `ledger.retention` the months past it are dropped whole (the rollups stay).
//! - `ledger_rollups`: the ledger's rows written since the last roll are summed into its
//!   rollups (every report rolls too before it reads).
//!
//! There is no duty for results or the ready streams: results carry their own TTL (the
//! worker's `--result-ttl`) and workers delete acked entries at once, so the only stream
//! that grows is the dead stream, which `dead_letters` trims by age and count.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use llmq_shared::config::Config;
//! use tokio_util::sync::CancellationToken;
//!
//! let config = Config::load("providers.yaml".as_ref())?;
//! let settings = llmq_scheduler::Settings::new(
//!     "redis://127.0.0.1:6379",
//!     "postgres://postgres@127.0.0.1:5432/llmq",
//!     config,
//! )?;
//! llmq_scheduler::run(settings, CancellationToken::new()).await?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use llmq_shared::archive::DutyRun;
use llmq_shared::config::{Config, Retention};
use llmq_shared::ledger::Ledger;
use llmq_shared::queue::Client;

mod approvals;
mod batches;
mod chains;
mod dead_letters;
mod gauges;
mod lease;
mod ledger_partitions;
mod ledger_rollups;
mod promote;
mod recurring;
mod routing_stats;
mod windows;

pub use recurring::{CATCH_UP, MARKER_TTL, MAX_TICKS_PER_PASS};

use lease::{Lease, Mark};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Redis(#[from] llmq_shared::queue::Error),
    #[error(transparent)]
    Ledger(#[from] llmq_shared::ledger::Error),
    #[error("Postgres failed: {0}")]
    Postgres(#[from] sqlx::Error),
    /// Another instance holds the lease (or took it over while this one was paused), so
    /// this one's write was refused and nothing was written.
    #[error("this scheduler no longer holds the lease; another instance took over")]
    NotLeader,
    #[error("{0}")]
    Settings(String),
}

impl From<redis::RedisError> for Error {
    fn from(e: redis::RedisError) -> Self {
        Error::Redis(llmq_shared::queue::Error::Redis(e))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The time as the scheduler sees it; tests drive it.
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// The real time.
#[must_use]
pub fn system_clock() -> Clock {
    Arc::new(Utc::now)
}

/// Everything a scheduler instance needs. The flags of `llmq-scheduler` are this struct, so
/// a flag, its environment variable and its default are written once; [`Settings::new`]
/// gives the same defaults to in-process schedulers (tests).
#[derive(clap::Args, Clone)]
pub struct Settings {
    /// Redis the workers use.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Postgres for the archive and quota history (migrate it first with `llmq migrate`).
    #[arg(long, env = "DATABASE_URL", required = true)]
    pub database_url: String,
    /// The provider file (its providers' quotas and its `scheduler` section), read by the
    /// binary from `--config`.
    #[arg(skip)]
    pub config: Config,
    /// Names this instance in the lease [default: host-pid-random].
    #[arg(long, env = "LLMQ_SCHEDULER_ID")]
    pub id: Option<String>,
    /// How often standbys look for a free lease and the holder for due work.
    #[arg(long, env = "LLMQ_SCHEDULER_TICK", default_value = "1s", value_parser = humantime::parse_duration)]
    pub tick: Duration,
    /// How often closed quota windows are looked for.
    #[arg(long, env = "LLMQ_QUOTA_EVERY", default_value = "1m", value_parser = humantime::parse_duration)]
    pub quota_every: Duration,
    /// How often dead letters are archived and trimmed.
    #[arg(long, env = "LLMQ_DEAD_LETTERS_EVERY", default_value = "1m", value_parser = humantime::parse_duration)]
    pub dead_letters_every: Duration,
    /// How often expired chains are dropped from the queues' chains index.
    #[arg(long, env = "LLMQ_CHAINS_EVERY", default_value = "1m", value_parser = humantime::parse_duration)]
    pub chains_every: Duration,
    /// How often the routing stats are read again from the ledger (a learned
    /// `routing.strategy` only).
    #[arg(long, env = "LLMQ_ROUTING_STATS_EVERY", default_value = "1m", value_parser = humantime::parse_duration)]
    pub routing_stats_every: Duration,
    /// How often open provider batches are asked about, and waiting tasks looked at for a
    /// batch to send.
    #[arg(long, env = "LLMQ_BATCHES_EVERY", default_value = "10s", value_parser = humantime::parse_duration)]
    pub batches_every: Duration,
    /// A batch taken but not recorded as sent this long after is looked up at its provider
    /// by its label and followed, or sent again: its sender died (sending takes at most two
    /// requests of two minutes each).
    #[arg(long, hide = true, default_value = "5m", value_parser = humantime::parse_duration)]
    pub batch_resend_after: Duration,
    /// A queue whose dead letters to archive; repeat for several [default: every queue a
    /// worker has served].
    #[arg(long = "queue", env = "LLMQ_QUEUES", value_delimiter = ',', value_parser = llmq_shared::keys::queue_name)]
    pub queues: Vec<String>,
    /// Serve /healthz, /readyz and Prometheus /metrics here, e.g. 0.0.0.0:9465.
    #[arg(long, env = "LLMQ_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Keeps this scheduler's lease and records apart from another deployment's on the same
    /// Redis and database (`llmq:scheduler:<namespace>:*`); give `llmq status` the same.
    #[arg(long, env = "LLMQ_SCHEDULER_NAMESPACE")]
    pub namespace: Option<String>,
    /// The time as the scheduler sees it; tests drive it.
    #[arg(skip = system_clock())]
    pub clock: Clock,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("redis_url", &self.redis_url)
            .field("id", &self.id)
            .field("tick", &self.tick)
            .field("quota_every", &self.quota_every)
            .field("dead_letters_every", &self.dead_letters_every)
            .field("chains_every", &self.chains_every)
            .field("routing_stats_every", &self.routing_stats_every)
            .field("batches_every", &self.batches_every)
            .field("batch_resend_after", &self.batch_resend_after)
            .field("queues", &self.queues)
            .field("metrics_listen", &self.metrics_listen)
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// The flags' defaults (environment variables ignored), with this Redis, Postgres and
    /// provider file.
    ///
    /// # Errors
    /// Never in practice: the defaults are checked by a unit test.
    pub fn new(redis_url: &str, database_url: &str, config: Config) -> Result<Self> {
        let mut s = llmq_shared::process::defaults::<Self>("llmq-scheduler")
            .map_err(|e| Error::Settings(e.to_string()))?;
        s.redis_url = redis_url.to_owned();
        s.database_url = database_url.to_owned();
        s.config = config;
        Ok(s)
    }
}

/// A scheduler duty: the unit recorded in `llmq:scheduler:duties`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Duty {
    QuotaWindows,
    DeadLetters,
    Recurring,
    Approvals,
    Chains,
    Gauges,
    Promote,
    RoutingStats,
    Batches,
    LedgerPartitions,
    LedgerRollups,
}

impl Duty {
    pub const ALL: [Duty; 11] = [
        Duty::QuotaWindows,
        Duty::DeadLetters,
        Duty::Recurring,
        Duty::Approvals,
        Duty::Chains,
        Duty::Gauges,
        Duty::Promote,
        Duty::RoutingStats,
        Duty::Batches,
        Duty::LedgerPartitions,
        Duty::LedgerRollups,
    ];

    /// Its field in the duties hash.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Duty::QuotaWindows => "quota_windows",
            Duty::DeadLetters => "dead_letters",
            Duty::Recurring => "recurring",
            Duty::Approvals => "approvals",
            Duty::Chains => "chains",
            Duty::Gauges => "gauges",
            Duty::Promote => "promote",
            Duty::RoutingStats => "routing_stats",
            Duty::Batches => "batches",
            Duty::LedgerPartitions => "ledger_partitions",
            Duty::LedgerRollups => "ledger_rollups",
        }
    }
}

/// One scheduler instance: its lease and its duties. [`run`] drives it; tests call its
/// duties and steps one by one.
pub struct Scheduler {
    redis: Client,
    pool: PgPool,
    config: Config,
    recurring: Vec<llmq_shared::config::Recurring>,
    lease: Lease,
    clock: Clock,
    retention: Retention,
    queues: Vec<String>,
    tick: Duration,
    quota_every: Duration,
    dead_letters_every: Duration,
    chains_every: Duration,
    routing_stats_every: Duration,
    batches_every: Duration,
    batch_resend_after: Duration,
    /// The batch API of each provider with a `batch:` section.
    batch_clients: std::collections::HashMap<String, llmq_shared::provider::batch::BatchClient>,
    /// Where the `chains` duty reads each queue's index next.
    chain_cursors: chains::Cursors,
    /// The day whose previous day's windows this holder has recorded.
    windows_closed: Option<NaiveDate>,
    /// When each duty is due next; empty right after taking the lease.
    next_run: HashMap<Duty, Instant>,
    /// Queues and (provider, quota) pairs whose gauges this instance set, to zero them
    /// when it loses the lease.
    gauged_queues: Vec<String>,
    gauged_quotas: Vec<(String, String)>,
    /// The provider/model pairs whose circuit gauge this instance published.
    gauged_circuits: Vec<(String, Vec<String>)>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("id", &self.lease.id())
            .field("fence", &self.lease.fence())
            .finish_non_exhaustive()
    }
}

impl Scheduler {
    /// Checks the settings, then connects to Redis and Postgres. Takes no lease yet. (The
    /// provider file, recurring tasks included, was validated when it was parsed.)
    ///
    /// # Errors
    /// A bad setting, Redis or Postgres cannot be reached, or the database is not migrated.
    pub async fn connect(settings: Settings) -> Result<Self> {
        if settings.tick.is_zero() {
            return Err(Error::Settings("--tick must be longer than 0".into()));
        }
        let recurring = settings.config.scheduler.recurring.clone();
        let redis = Client::new(&settings.redis_url)?;
        redis.ping().await?;
        let ledger = Ledger::connect(&settings.database_url, 4).await?;
        ledger.check_migrated().await?;
        let scheduler = &settings.config.scheduler;
        Ok(Self {
            lease: Lease::new(
                settings
                    .id
                    .clone()
                    .unwrap_or_else(|| llmq_shared::process::instance_id("scheduler")),
                scheduler.lease,
                llmq_shared::keys::SchedulerKeys::new(settings.namespace.as_deref()),
            ),
            retention: scheduler.dead_letters,
            redis,
            pool: ledger.pool().clone(),
            recurring,
            clock: settings.clock,
            queues: settings.queues,
            tick: settings.tick,
            quota_every: settings.quota_every,
            dead_letters_every: settings.dead_letters_every,
            chains_every: settings.chains_every,
            routing_stats_every: settings.routing_stats_every,
            batches_every: settings.batches_every,
            batch_resend_after: settings.batch_resend_after,
            batch_clients: batches::clients(&settings.config),
            chain_cursors: chains::Cursors::new(),
            config: settings.config,
            windows_closed: None,
            next_run: HashMap::new(),
            gauged_queues: Vec::new(),
            gauged_quotas: Vec::new(),
            gauged_circuits: Vec::new(),
        })
    }

    /// This instance's id, as the lease holds it.
    #[must_use]
    pub fn id(&self) -> &str {
        self.lease.id()
    }

    /// The fencing token of our last takeover, while we believe we hold the lease.
    #[must_use]
    pub fn fence(&self) -> Option<i64> {
        self.lease.fence()
    }

    /// Whether we hold the lease, as far as we know (taken, and extended in time).
    #[must_use]
    pub fn holds_lease(&self) -> bool {
        self.lease.holds()
    }

    fn now(&self) -> DateTime<Utc> {
        (self.clock)()
    }

    /// How long [`run`] waits between ticks: the tick, or a third of the lease if shorter, so
    /// the lease is extended in time.
    #[must_use]
    pub fn pause(&self) -> Duration {
        self.tick
            .min(self.config.scheduler.lease / 3)
            .max(Duration::from_millis(10))
    }

    fn period(&self, duty: Duty) -> Duration {
        match duty {
            Duty::QuotaWindows => self.quota_every,
            Duty::DeadLetters => self.dead_letters_every,
            Duty::Chains => self.chains_every,
            Duty::RoutingStats => self.routing_stats_every,
            Duty::Batches => self.batches_every,
            Duty::Recurring | Duty::Approvals | Duty::Promote => self.pause(),
            Duty::Gauges => gauges::EVERY,
            Duty::LedgerPartitions => ledger_partitions::EVERY,
            Duty::LedgerRollups => ledger_rollups::EVERY,
        }
    }

    /// The queues given with `--queue`, or else every queue a worker has served.
    async fn served_queues(&self) -> Result<Vec<String>> {
        if self.queues.is_empty() {
            Ok(self.redis.known_queues().await?)
        } else {
            Ok(self.queues.clone())
        }
    }

    /// Takes the lease if it is free, and tells Postgres the new fencing token. Returns
    /// whether we hold it.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn acquire(&mut self) -> Result<bool> {
        if self.lease.holds() {
            return Ok(true);
        }
        if !self.lease.acquire(&self.redis).await? {
            return Ok(false);
        }
        tracing::info!(
            id = self.id(),
            fence = self.fence(),
            "took the scheduler lease"
        );
        self.next_run.clear();
        self.windows_closed = None;
        // Our token into every queue we serve, before any duty: a holder paused past its
        // lease can no longer write to them.
        match self.served_queues().await {
            Ok(queues) => match self.lease.claim(&self.redis, &queues).await {
                Ok(()) => {}
                Err(Error::NotLeader) => {
                    self.lease.drop_lease();
                    return Ok(false);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot claim the queues yet; each is claimed by its first write")
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the queues to claim yet; each is claimed by its first write")
            }
        }
        match self.lease.sync(&self.redis, &self.pool).await {
            Ok(()) => {}
            Err(Error::NotLeader) => {
                self.lease.drop_lease();
                return Ok(false);
            }
            // Retried before the first Postgres write.
            Err(e) => {
                tracing::warn!(error = %e, "cannot record the new fencing token in Postgres yet")
            }
        }
        Ok(true)
    }

    /// Gives the lease up if we hold it, so a standby takes over at its next tick.
    ///
    /// # Errors
    /// Redis fails (the lease then expires by itself).
    pub async fn release(&mut self) -> Result<()> {
        if self.lease.fence().is_some() {
            tracing::info!(id = self.id(), "releasing the scheduler lease");
        }
        self.lease.release(&self.redis).await
    }

    async fn keep_lease(&mut self) -> Result<()> {
        if self.lease.holds() {
            if self.lease.needs_renewal() && !self.lease.renew(&self.redis).await? {
                tracing::warn!(id = self.id(), "lost the scheduler lease; standing by");
            }
            return Ok(());
        }
        if self.lease.fence().is_some() {
            tracing::warn!(
                id = self.id(),
                "could not extend the scheduler lease in time; standing by"
            );
            self.lease.drop_lease();
        }
        self.acquire().await?;
        Ok(())
    }

    /// One tick: keep or take the lease, then, as the holder, run every duty that is due.
    /// Stops between duties once `shutdown` is cancelled. Returns whether we hold the lease.
    pub async fn tick(&mut self, shutdown: &CancellationToken) -> bool {
        if let Err(e) = self.keep_lease().await {
            tracing::warn!(error = %e, "cannot reach the scheduler lease");
        }
        if !self.lease.holds() {
            self.zero_gauges();
            return false;
        }
        for duty in Duty::ALL {
            if shutdown.is_cancelled() {
                break;
            }
            let now = Instant::now();
            if self.next_run.get(&duty).is_some_and(|at| now < *at) {
                continue;
            }
            self.next_run.insert(duty, now + self.period(duty));
            if let Err(Error::NotLeader) = self.run_duty(duty).await {
                tracing::warn!(
                    id = self.id(),
                    duty = duty.name(),
                    "a write was refused: another scheduler holds the lease; standing by"
                );
                self.lease.drop_lease();
                return false;
            }
        }
        self.lease.holds()
    }

    /// Runs one duty now and records how it went in the duties hash. Returns what it did.
    ///
    /// # Errors
    /// The duty failed; [`Error::NotLeader`] when a write was refused because another
    /// instance holds the lease (then nothing is recorded).
    pub async fn run_duty(&mut self, duty: Duty) -> Result<String> {
        let at = self.now();
        let outcome = match duty {
            Duty::QuotaWindows => self.close_quota_windows().await,
            Duty::DeadLetters => self.archive_dead_letters().await,
            Duty::Recurring => self.enqueue_recurring().await,
            Duty::Approvals => self.expire_approvals().await,
            Duty::Chains => self.trim_chains().await,
            Duty::Gauges => self.publish_gauges().await,
            Duty::Promote => self.promote_due().await,
            Duty::RoutingStats => self.refresh_routing_stats().await,
            Duty::Batches => self.run_batches().await,
            Duty::LedgerPartitions => self.keep_ledger_partitions().await,
            Duty::LedgerRollups => self.roll_ledger().await,
        };
        let (ok, detail) = match &outcome {
            Ok(detail) => {
                tracing::debug!(duty = duty.name(), detail, "duty done");
                (true, detail.clone())
            }
            Err(Error::NotLeader) => return outcome,
            Err(e) => {
                tracing::warn!(duty = duty.name(), error = %e, "duty failed; retried next period");
                (false, e.to_string())
            }
        };
        metrics::counter!("llmq_scheduler_duty_runs_total", "duty" => duty.name(), "ok" => if ok { "true" } else { "false" })
            .increment(1);
        let run = DutyRun {
            at,
            ok,
            detail,
            holder: self.id().to_owned(),
            every_ms: u64::try_from(self.period(duty).as_millis()).unwrap_or(u64::MAX),
        };
        let json = serde_json::to_string(&run).unwrap_or_default();
        match self
            .lease
            .mark(&self.redis, duty.name(), &json, Mark::Always)
            .await
        {
            Ok(_) => {}
            Err(Error::NotLeader) => return Err(Error::NotLeader),
            Err(e) => {
                tracing::warn!(duty = duty.name(), error = %e, "cannot record the duty's run")
            }
        }
        outcome
    }
}

/// Runs a scheduler instance until `shutdown` is cancelled: stands by, takes the lease when
/// it is free, runs the duties while it holds it. On shutdown it finishes the duty at hand
/// and releases the lease, so a standby takes over at once.
///
/// # Errors
/// The settings or the provider file's scheduler section are invalid, or Redis or Postgres
/// cannot be reached at startup. Later failures are logged, recorded and retried.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<()> {
    let metrics_listen = settings.metrics_listen;
    let mut scheduler = Scheduler::connect(settings).await?;
    let endpoints = CancellationToken::new();
    if let Some(addr) = metrics_listen {
        // A standby is as ready as the holder: either can act within a lease. Readiness must
        // not mean "holds the lease", or a standby would never be ready and rollouts stall.
        let ready = llmq_shared::health::Readiness::default();
        ready.set(true);
        llmq_shared::health::serve(addr, ready, endpoints.clone())
            .await
            .map_err(|e| Error::Settings(e.to_string()))?;
    }
    tracing::info!(
        id = scheduler.id(),
        "scheduler started; waiting for the lease"
    );
    let pause = scheduler.pause();
    while !shutdown.is_cancelled() {
        scheduler.tick(&shutdown).await;
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(pause) => {}
        }
    }
    if let Err(e) = scheduler.release().await {
        tracing::warn!(error = %e, "cannot release the scheduler lease; it expires by itself");
    }
    endpoints.cancel();
    tracing::info!(id = scheduler.id(), "scheduler stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_process_settings_take_the_flags_defaults() {
        let s = Settings::new("redis://r", "postgres://p", Config::default()).unwrap();
        assert_eq!(
            (s.redis_url.as_str(), s.database_url.as_str()),
            ("redis://r", "postgres://p")
        );
        assert_eq!(s.tick, Duration::from_secs(1));
        assert_eq!(s.quota_every, Duration::from_secs(60));
        assert_eq!(s.dead_letters_every, Duration::from_secs(60));
        assert!(s.queues.is_empty() && s.id.is_none() && s.metrics_listen.is_none());
    }
}
