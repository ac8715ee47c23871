//! The llmq worker: pulls tasks from Redis streams, runs them against LLM providers on
//! apalis, records every call in Postgres and writes results back to Redis.
//!
//! Layout:
//! - `fetcher`: reads as many tasks as there are free slots, reclaims idle ones;
//! - `backend`: the apalis adapter (the only module that imports apalis);
//! - `executor`: one task, as its pipeline of phases: admit, key, slot, step, cache, plan,
//!   park, warm-up, attempt, decide, apply;
//! - `finished`: what the executor hands the finisher (neither imports the other);
//! - `finisher`: writes outcomes in batches, ledger first, then one Lua call;
//! - `claims`: the entries this worker holds, kept claimed from read to written;
//! - `maintenance`: promoting delayed tasks, heartbeats, routing stats.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use llmq_shared::config::Config;
//! use llmq_worker::Settings;
//!
//! let config = Config::load("examples/providers.mock.yaml".as_ref())?;
//! let mut settings = Settings::new("redis://127.0.0.1:6379", config)?;
//! settings.database_url = Some("postgres://127.0.0.1/test".into());
//! let shutdown = llmq_shared::shutdown::on_signal();
//! llmq_worker::run(settings, shutdown).await?;
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use llmq_shared::config::Config;
use llmq_shared::keys::QueueKeys;
use llmq_shared::ledger::Ledger;
use llmq_shared::provider::Provider;
use llmq_shared::provider::clients::Clients;
use llmq_shared::queue::Client;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod backend;
mod cancels;
mod claims;
pub mod executor;
mod fetcher;
mod finished;
pub mod finisher;
mod maintenance;

use claims::Claims;
use executor::Executor;
use fetcher::{Fetcher, Job};
use finished::Finished;
use finisher::{Finisher, Pending};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Redis(#[from] llmq_shared::queue::Error),
    #[error(transparent)]
    Ledger(#[from] llmq_shared::ledger::Error),
    #[error("{0}")]
    Settings(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a worker needs. The flags of `llmq-worker` are this struct, so a flag, its
/// environment variable and its default are written once; [`Settings::new`] gives the same
/// defaults to in-process workers (tests, benchmarks).
#[derive(clap::Args, Clone)]
pub struct Settings {
    /// Redis to read tasks from.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Postgres for the cost ledger (migrate it first with `llmq migrate`). In-process
    /// workers may leave it unset, which turns the ledger off (benchmarks only).
    #[arg(long, env = "DATABASE_URL", required = true)]
    pub database_url: Option<String>,
    /// The provider file, read by the binary from `--config`.
    #[arg(skip)]
    pub config: Config,
    /// A queue to serve; repeat for several.
    #[arg(
        long = "queue",
        env = "LLMQ_QUEUES",
        value_delimiter = ',',
        default_value = "default",
        value_parser = llmq_shared::keys::queue_name
    )]
    pub queues: Vec<String>,
    /// Tasks run at once.
    #[arg(long, env = "LLMQ_CONCURRENCY", default_value_t = 32)]
    pub concurrency: usize,
    /// A task idle this long in a silent worker's hands is taken over by another.
    #[arg(long, env = "LLMQ_VISIBILITY_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub visibility_timeout: Duration,
    /// Deliveries after which a task that keeps killing workers becomes a dead letter.
    #[arg(long, env = "LLMQ_MAX_DELIVERIES", default_value_t = 5)]
    pub max_deliveries: u64,
    /// On SIGTERM, how long running tasks may take before they are handed back.
    #[arg(long, env = "LLMQ_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub grace: Duration,
    /// How long results stay in Redis.
    #[arg(long, env = "LLMQ_RESULT_TTL", default_value = "7d", value_parser = humantime::parse_duration)]
    pub result_ttl: Duration,
    /// Larger tasks become dead letters.
    #[arg(long, env = "LLMQ_MAX_PAYLOAD_BYTES", default_value_t = llmq_shared::envelope::DEFAULT_MAX_PAYLOAD_BYTES)]
    pub max_payload_bytes: usize,
    /// The first retry waits about this long; each further one twice as long.
    #[arg(long, env = "LLMQ_RETRY_BASE", default_value = "1s", value_parser = humantime::parse_duration)]
    pub retry_base: Duration,
    /// The longest a retry waits.
    #[arg(long, env = "LLMQ_RETRY_MAX", default_value = "5m", value_parser = humantime::parse_duration)]
    pub retry_max: Duration,
    /// One attempt, every provider, retry and wait included, ends after this (a retryable
    /// failure); each single call is bounded by the task's own `timeout`.
    #[arg(long, env = "LLMQ_ATTEMPT_TIMEOUT", default_value = "30m", value_parser = humantime::parse_duration)]
    pub attempt_timeout: Duration,
    /// The scheduler's namespace (as `llmq-scheduler` is given it): where a learned
    /// `routing.strategy` reads the routing stats the scheduler writes.
    #[arg(long, env = "LLMQ_SCHEDULER_NAMESPACE")]
    pub scheduler_namespace: Option<String>,
    /// How often the routing stats are read again (a learned `routing.strategy` only).
    #[arg(long, hide = true, default_value = "10s", value_parser = humantime::parse_duration)]
    pub stats_every: Duration,
    /// How often due delayed tasks are looked for, at the most.
    #[arg(long, hide = true, default_value = "250ms", value_parser = humantime::parse_duration)]
    pub promote_every: Duration,
    /// How long one read waits for a task (shutdown ends it at once). A read returns as soon
    /// as a task arrives; a long wait only saves an idle worker's commands.
    #[arg(long, hide = true, default_value = "5s", value_parser = humantime::parse_duration)]
    pub block: Duration,
    /// Names this worker in Redis [default: host-pid-random].
    #[arg(long, env = "LLMQ_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Serve /healthz, /readyz and Prometheus /metrics here, e.g. 0.0.0.0:9464.
    #[arg(long, env = "LLMQ_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Providers to use instead of the ones the provider file would build (tests, benchmarks).
    #[arg(skip)]
    pub provider_overrides: Vec<(String, Arc<dyn Provider>)>,
}

impl Settings {
    /// The flags' defaults (environment variables ignored), with this Redis and provider
    /// file.
    ///
    /// # Errors
    /// Never in practice: the defaults are checked by a unit test.
    pub fn new(redis_url: &str, config: Config) -> Result<Self> {
        let mut s = llmq_shared::process::defaults::<Self>("llmq-worker")
            .map_err(|e| Error::Settings(e.to_string()))?;
        s.redis_url = redis_url.to_owned();
        s.database_url = None;
        s.config = config;
        Ok(s)
    }
}

/// What every running task shares.
pub struct Runtime {
    executor: Executor,
    finisher: mpsc::UnboundedSender<Pending>,
    claims: Arc<Claims>,
    /// Told when a task goes to `delayed`, so the promoter wakes for it.
    fleet: Arc<maintenance::Fleet>,
}

impl Runtime {
    /// Gives an outcome to the finisher: the answer to wait for (whether it was applied), and
    /// whether it puts the task in `delayed`; `None` when there is nothing to write (a parked task) or the finisher is gone.
    fn hand_over(&self, finished: Finished) -> Option<(oneshot::Receiver<bool>, bool)> {
        if finished.parked {
            return None;
        }
        let delays = finished
            .write
            .finish()
            .is_some_and(|f| matches!(f.kind, llmq_shared::queue::FinishKind::Retry { .. }));
        let (done, written) = oneshot::channel();
        self.finisher.send(Pending { finished, done }).ok()?;
        Some((written, delays))
    }

    /// Runs one task and waits until its outcome is written (or the worker gives up on
    /// writing it at the hard stop).
    async fn process(&self, job: Job) {
        let Job {
            queue,
            delivery,
            permit,
            claim,
        } = job;
        let finished = self.executor.run(queue, delivery).await;
        // `finished` must not live across an await: every task in flight would carry its
        // size (see `hand_over`). The finisher also frees its concurrency slot, if any.
        if let Some((written, delays)) = self.hand_over(finished) {
            // Once the task is in `delayed`, the promoter wakes for it.
            if written.await == Ok(true) && delays {
                self.fleet.delayed();
            }
        }
        self.claims.release(claim);
        drop(permit);
    }
}

/// What glibc's malloc is set to for a worker (see [`tune_malloc`]).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MALLOC_TUNABLES: &str = "glibc.malloc.arena_max=1:glibc.malloc.tcache_count=256";
/// Set in the environment of the program [`tune_malloc`] runs again: it runs again once,
/// whatever glibc does with `GLIBC_TUNABLES` (a program with file capabilities or set-user-id
/// runs in glibc's secure mode, which may take the variable out of its environment).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MALLOC_TUNED: &str = "LLMQ_MALLOC_TUNED";

/// Sets glibc's malloc up for a worker: one arena, and a larger cache of freed blocks per
/// thread. Call it first in `main`, before any thread exists.
///
/// One arena: every task in flight is allocated and freed by apalis' one driver, which tokio
/// moves between its worker threads. With an arena per thread, each arena in turn grows to
/// hold a whole wave of tasks and keeps it: `bench=inflight` measured 6.0, 7.4 and 8.8 KiB of
/// resident memory per task in flight after 1, 2 and 4 waves of tasks; with one arena,
/// 5.9 KiB after 4 (docs/benchmarks.md).
///
/// The cache: with one arena, every allocation the thread's cache cannot serve takes the
/// arena's lock, and glibc's default of 7 blocks per size made the threads queue on it
/// (`perf`: a third of `queue_noop`'s process time in malloc and free, futex waits among
/// it). glibc reads its cache size only from `GLIBC_TUNABLES` as a program starts, so this
/// runs the program again, in place (`exec` of its own file, same pid, name and arguments), with
/// `MALLOC_TUNABLES` set, once (`MALLOC_TUNED`). Nothing is done when the environment already sets
/// `GLIBC_TUNABLES` or `MALLOC_ARENA_MAX` (an operator's choice wins; the second run sees its
/// own). With `LD_PRELOAD` set (another allocator, or a tool such as valgrind or heaptrack
/// that would lose the program to an `exec`), or should the `exec` fail, the program goes
/// on with one arena and glibc's cache.
pub fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let set = |v: &str| std::env::var_os(v).is_some();
        if set("GLIBC_TUNABLES") || set("MALLOC_ARENA_MAX") {
            return;
        }
        if !set("LD_PRELOAD") && !set(MALLOC_TUNED) {
            use std::os::unix::process::CommandExt;
            // The binary's own path, not `/proc/self/exe`: the process's name (`ps`,
            // `pgrep`) is the file's it was started from.
            if let Ok(exe) = std::env::current_exe() {
                let mut args = std::env::args_os();
                let arg0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
                // Returns only if the exec failed.
                let _ = std::process::Command::new(&exe)
                    .arg0(arg0)
                    .args(args)
                    .env("GLIBC_TUNABLES", MALLOC_TUNABLES)
                    .env(MALLOC_TUNED, "1")
                    .exec();
            }
        }
        cap_malloc_arenas(1);
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn cap_malloc_arenas(n: i32) {
    // SAFETY: mallopt sets one parameter of glibc's allocator, under the allocator's own
    // lock; M_ARENA_MAX only limits how many arenas are created from now on.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, n);
    }
}

/// Makes the worker's `/proc/<pid>/environ`, `cmdline` and memory unreadable to other
/// processes of its user: the checks and CLI agents it starts run as that user, and would
/// otherwise read `DATABASE_URL` and the API keys from their parent even though their own
/// environment is cleared. Also turns off core dumps, which would hold the same secrets.
pub fn guard_secrets_from_children() {
    #[cfg(target_os = "linux")]
    set_not_dumpable();
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn set_not_dumpable() {
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) changes one flag of this process and touches no
    // memory of ours; its result is checked.
    let done = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if done != 0 {
        tracing::warn!(
            "cannot make the worker non-dumpable: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Runs a worker until `shutdown` is cancelled, then drains: no new reads, running tasks
/// get `grace` to finish, the rest go back to the stream.
///
/// # Errors
/// Redis or Postgres cannot be reached at start, or the database is not migrated.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<()> {
    check(&settings)?;
    let Joined {
        redis,
        ledger,
        queues,
        worker_id,
        run,
    } = join(&settings).await?;
    let clients = clients(&settings)?;

    let stop = shutdown.child_token();
    let readiness = llmq_shared::health::Readiness::default();
    let endpoints = serve_health(&settings, &readiness).await?;
    let hard_stop = CancellationToken::new();
    let done = CancellationToken::new();
    let tasks = TaskTracker::new();
    let (finisher, call_starts) = Finisher {
        redis: redis.clone(),
        ledger,
        consumer: worker_id.clone(),
        run,
        result_ttl: settings.result_ttl,
        hard_stop: hard_stop.clone(),
        readiness: readiness.clone(),
        answer_cache_bytes: settings.config.answer_cache.max_bytes,
    }
    .spawn(&tasks);
    let claims = Arc::new(Claims::new(settings.visibility_timeout));
    let cancels = Arc::new(cancels::Cancels::new(hard_stop.clone()));
    let fleet = Arc::new(maintenance::Fleet::default());
    let read_pause = Arc::new(executor::ReadPause::default());
    let stats = Arc::new(executor::StatsView::default());
    let presence = presence(&settings, &worker_id, &claims);
    let (draining, calls_in_flight) = (Arc::clone(&presence.draining), Arc::clone(&presence.calls));
    let duties = Duties {
        tasks: &tasks,
        redis: &redis,
        queues: &queues,
        worker_id: &worker_id,
        stop: &stop,
        done: &done,
    };
    duties
        .start(&settings, &claims, &cancels, &fleet, &stats, presence)
        .await;
    let (jobs_tx, jobs_rx) = mpsc::unbounded_channel();
    let fetcher = Fetcher {
        redis: redis.clone(),
        queues: queues.clone(),
        consumer: worker_id.clone(),
        slots: Arc::new(Semaphore::new(settings.concurrency)),
        draining,
        max_batch: settings.concurrency.min(1000),
        visibility_timeout: settings.visibility_timeout,
        max_deliveries: settings.max_deliveries,
        result_ttl: settings.result_ttl,
        block: settings.block,
        stop: stop.clone(),
        read_pause: Arc::clone(&read_pause),
        claims: Arc::clone(&claims),
        tenant_weights: weights(&settings.config),
        cancels: Arc::clone(&cancels),
    };
    tasks.spawn(fetcher.run(jobs_tx));
    let limiter = llmq_shared::quota::Limiter::new(redis.clone());
    let runtime = Arc::new(Runtime {
        executor: Executor {
            redis: redis.clone(),
            config: settings.config.clone(),
            clients,
            limiter: limiter.clone(),
            circuits: llmq_shared::circuit::Circuits::new(redis.clone(), &worker_id),
            worker_id: worker_id.as_str().into(),
            max_payload_bytes: settings.max_payload_bytes,
            retry_base: settings.retry_base,
            retry_max: settings.retry_max,
            attempt_timeout: settings.attempt_timeout,
            hard_stop: hard_stop.clone(),
            read_pause,
            call_starts,
            call_metrics: executor::CallMetrics::new(&settings.config),
            stats,
            claims: Arc::clone(&claims),
            cancels: Arc::clone(&cancels),
            batchers: executor::Batchers::default(),
            calls_in_flight,
        },
        finisher,
        claims: Arc::clone(&claims),
        fleet: Arc::clone(&fleet),
    });
    tracing::info!(
        worker = %worker_id,
        queues = ?settings.queues,
        concurrency = settings.concurrency,
        "worker started"
    );
    let name = worker_id.clone();
    let mut apalis = tokio::spawn(async move { backend::run(&name, jobs_rx, runtime).await });
    readiness.set(true);

    drain(
        &mut apalis,
        &stop,
        &hard_stop,
        &claims,
        &readiness,
        settings.grace,
    )
    .await;
    // The tenants' settles gathered since the last were sent (`quota/tenant.rs`).
    if let Err(e) = limiter.send_settles().await {
        tracing::warn!("cannot settle the tenants' last calls: {e}");
    }
    duties.end().await;
    endpoints.cancel();
    tracing::info!(worker = %worker_id, "worker stopped");
    Ok(())
}

/// What the worker's heartbeat says of it: the parts that never change, and the counters
/// read at each beat.
fn presence(settings: &Settings, worker_id: &str, claims: &Arc<Claims>) -> maintenance::Presence {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    maintenance::Presence {
        info: llmq_shared::queue::WorkerInfo {
            id: worker_id.to_owned(),
            host,
            queues: settings.queues.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            concurrency: settings.concurrency as u64,
            started_ms: llmq_shared::queue::now_ms(),
            busy: 0,
            calls: 0,
            draining: false,
        },
        claims: Arc::clone(claims),
        calls: Arc::default(),
        draining: Arc::default(),
    }
}

/// The tenants that get more than one task per turn in a queue's room, and how many.
fn weights(config: &llmq_shared::config::Config) -> Vec<(String, u32)> {
    config.tenants.weights.clone().into_iter().collect()
}

/// The worker's background duties: where they run and when they end.
struct Duties<'a> {
    tasks: &'a TaskTracker,
    redis: &'a Client,
    queues: &'a [Arc<QueueKeys>],
    worker_id: &'a str,
    /// Ends the duties that bring new work (promotion, routing stats) when the drain starts.
    stop: &'a CancellationToken,
    /// Ends the rest once the tasks in flight are done.
    done: &'a CancellationToken,
}

impl Duties<'_> {
    /// Reads the cancel marks (and the routing stats, unless routing is `cheapest`) before
    /// the first task, then keeps them, the fleet's promotion and heartbeat and the claims'
    /// refresh going.
    async fn start(
        &self,
        settings: &Settings,
        claims: &Arc<Claims>,
        cancels: &Arc<cancels::Cancels>,
        fleet: &Arc<maintenance::Fleet>,
        stats: &Arc<executor::StatsView>,
        presence: maintenance::Presence,
    ) {
        let (redis, queues) = (self.redis, self.queues.to_vec());
        // Read before the first task: one cancelled before the worker started never runs.
        cancels.refresh(redis, &queues).await;
        self.tasks.spawn(cancels::refresh(
            redis.clone(),
            queues.clone(),
            Arc::clone(cancels),
            self.done.clone(),
        ));
        self.tasks.spawn(maintenance::promote(
            redis.clone(),
            queues.clone(),
            settings.promote_every,
            Arc::clone(fleet),
            self.stop.clone(),
        ));
        self.tasks.spawn(maintenance::heartbeat(
            redis.clone(),
            self.worker_id.to_owned(),
            queues,
            Arc::clone(fleet),
            presence,
            self.done.clone(),
        ));
        self.tasks.spawn(claims::refresh(
            redis.clone(),
            self.worker_id.to_owned(),
            Arc::clone(claims),
            self.done.clone(),
        ));
        if settings.config.routing.strategy != llmq_shared::config::Strategy::Cheapest {
            // Read before the first task, so it is not routed on the prior when stats exist.
            let keys =
                llmq_shared::keys::SchedulerKeys::new(settings.scheduler_namespace.as_deref());
            maintenance::load_routing_stats(redis, &keys, stats).await;
            self.tasks.spawn(maintenance::routing_stats(
                redis.clone(),
                keys,
                Arc::clone(stats),
                settings.stats_every,
                self.stop.clone(),
            ));
        }
    }

    /// Ends the duties (10 s at most) and takes the worker out of its queues' fleet.
    async fn end(&self) {
        self.done.cancel();
        self.tasks.close();
        if tokio::time::timeout(Duration::from_secs(10), self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("background tasks did not stop within 10s");
        }
        let keys: Vec<QueueKeys> = self.queues.iter().map(|q| QueueKeys::clone(q)).collect();
        if let Err(e) = self.redis.leave(self.worker_id, &keys).await {
            tracing::warn!("could not deregister the worker: {e}");
        }
        if let Err(e) = self.redis.forget_worker(self.worker_id).await {
            tracing::warn!("could not take the worker out of the fleet's registry: {e}");
        }
    }
}

/// The health and metrics endpoints, when the settings name an address: ended by the
/// token returned, last of all.
async fn serve_health(
    settings: &Settings,
    readiness: &llmq_shared::health::Readiness,
) -> Result<CancellationToken> {
    let endpoints = CancellationToken::new();
    if let Some(addr) = settings.metrics_listen {
        llmq_shared::health::serve(addr, readiness.clone(), endpoints.clone())
            .await
            .map_err(|e| Error::Settings(e.to_string()))?;
    }
    Ok(endpoints)
}

/// The providers' clients, with the overrides the settings carry (tests, embedders).
fn clients(settings: &Settings) -> Result<Clients> {
    let mut clients = Clients::new(&settings.config, settings.concurrency)
        .map_err(|e| Error::Settings(format!("cannot build the HTTP clients: {e}")))?;
    for (name, provider) in &settings.provider_overrides {
        clients.replace(name, Arc::clone(provider));
    }
    Ok(clients)
}

/// The settings a worker cannot start with, each as a sentence.
fn check(settings: &Settings) -> Result<()> {
    if settings.concurrency == 0 {
        return Err(Error::Settings("--concurrency must be at least 1".into()));
    }
    if settings.queues.is_empty() {
        return Err(Error::Settings("give at least one --queue".into()));
    }
    if settings.config.providers.is_empty() {
        return Err(Error::Settings(
            "the provider file lists no provider; pass --config with one".into(),
        ));
    }
    Ok(())
}

/// What a worker holds once it has joined its queues.
struct Joined {
    redis: Client,
    ledger: Option<Ledger>,
    queues: Vec<Arc<QueueKeys>>,
    worker_id: String,
    /// This run of the worker, among the queues' intact workers.
    run: String,
}

/// Reaches Redis and the ledger (migrated), makes each queue's group and joins each queue's
/// intact workers.
async fn join(settings: &Settings) -> Result<Joined> {
    let redis = Client::new(&settings.redis_url)?;
    redis.ping().await?;
    let ledger = match &settings.database_url {
        Some(url) => {
            let ledger = Ledger::connect(url, 4).await?;
            ledger.check_migrated().await?;
            Some(ledger)
        }
        None => None,
    };
    let queues: Vec<Arc<QueueKeys>> = settings
        .queues
        .iter()
        .map(|q| Arc::new(QueueKeys::new(q)))
        .collect();
    for q in &queues {
        redis.ensure_group(q).await?;
    }
    let worker_id = settings
        .worker_id
        .clone()
        .unwrap_or_else(|| llmq_shared::process::instance_id("worker"));
    let run = uuid::Uuid::new_v4().simple().to_string();
    for q in &queues {
        redis.join_intact(q, &worker_id, &run).await?;
    }
    Ok(Joined {
        redis,
        ledger,
        queues,
        worker_id,
        run,
    })
}

/// Until the task runner ends: on its own (something broke), or after `stop`, when running
/// tasks get `grace` to finish and are then stopped hard (handed back), 30 s at most more.
async fn drain(
    apalis: &mut tokio::task::JoinHandle<std::result::Result<(), String>>,
    stop: &CancellationToken,
    hard_stop: &CancellationToken,
    claims: &Claims,
    readiness: &llmq_shared::health::Readiness,
    grace: Duration,
) {
    tokio::select! {
        r = &mut *apalis => {
            // apalis only returns on its own when something broke.
            stop.cancel();
            log_apalis(r);
        }
        () = stop.cancelled() => {
            readiness.set(false);
            tracing::info!(running = claims.count(), grace = ?grace, "no longer reading; waiting for running tasks");
            match tokio::time::timeout(grace, &mut *apalis).await {
                Ok(r) => log_apalis(r),
                Err(_) => {
                    tracing::warn!(running = claims.count(), "grace period over; handing running tasks back to the queue");
                    hard_stop.cancel();
                    match tokio::time::timeout(Duration::from_secs(30), &mut *apalis).await {
                        Ok(r) => log_apalis(r),
                        Err(_) => apalis.abort(),
                    }
                }
            }
        }
    }
}

fn log_apalis(r: std::result::Result<std::result::Result<(), String>, tokio::task::JoinError>) {
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!("the task runner failed: {e}"),
        Err(e) => tracing::error!("the task runner stopped abnormally: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_process_settings_take_the_flags_defaults() {
        let s = Settings::new("redis://127.0.0.1:1", Config::default()).unwrap();
        assert_eq!(s.redis_url, "redis://127.0.0.1:1");
        assert_eq!(s.database_url, None);
        assert_eq!(s.queues, ["default"]);
        assert_eq!(s.concurrency, 32);
        assert_eq!(s.visibility_timeout, Duration::from_secs(60));
        assert_eq!(s.result_ttl, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(s.retry_max, Duration::from_secs(300));
        assert_eq!(s.block, Duration::from_secs(5));
    }
}
