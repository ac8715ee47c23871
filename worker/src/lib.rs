//! The llmq worker: pulls tasks from Redis streams, runs them against LLM providers on
//! apalis, records every call in Postgres and writes results back to Redis.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use llmq_shared::config::Config;
//! use llmq_worker::Settings;
//!
//! let config = Config::load("examples/providers.mock.yaml".as_ref())?;
//! let mut settings = Settings::new("redis://127.0.0.1:6379", config);
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
pub mod executor;
mod fetcher;
pub mod finisher;
mod maintenance;

use executor::Executor;
use fetcher::{Fetcher, Job};
use finisher::{Finisher, Pending};
use maintenance::InFlight;

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

/// Everything a worker needs; [`Settings::new`] fills in the defaults.
pub struct Settings {
    pub redis_url: String,
    /// Postgres for the ledger. `None` turns the ledger off (benchmarks only).
    pub database_url: Option<String>,
    pub config: Config,
    pub queues: Vec<String>,
    /// Tasks run at once.
    pub concurrency: usize,
    /// A task idle this long in another worker's hands is taken over.
    pub visibility_timeout: Duration,
    /// Deliveries after which a task is a poison task and goes to the dead letters.
    pub max_deliveries: u64,
    /// On shutdown, how long running tasks may take to finish before they are handed back.
    pub grace: Duration,
    pub result_ttl: Duration,
    pub max_payload_bytes: usize,
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// One attempt, every provider, retry and wait included, ends after this.
    pub attempt_timeout: Duration,
    /// How often due delayed tasks are looked for, at the most.
    pub promote_every: Duration,
    /// How long one read waits for a task.
    pub block: Duration,
    /// Names this worker in Redis; defaults to host, pid and a random suffix.
    pub worker_id: Option<String>,
    /// Where to serve `/healthz`, `/readyz` and `/metrics`; `None`: not at all.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Providers to use instead of the ones the provider file would build (tests, benchmarks).
    pub provider_overrides: Vec<(String, Arc<dyn Provider>)>,
}

impl Settings {
    #[must_use]
    pub fn new(redis_url: &str, config: Config) -> Self {
        Self {
            redis_url: redis_url.to_owned(),
            database_url: None,
            config,
            queues: vec!["default".into()],
            concurrency: 32,
            visibility_timeout: Duration::from_secs(60),
            max_deliveries: 5,
            grace: Duration::from_secs(30),
            result_ttl: Duration::from_secs(7 * 24 * 3600),
            max_payload_bytes: llmq_shared::envelope::DEFAULT_MAX_PAYLOAD_BYTES,
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            attempt_timeout: Duration::from_secs(30 * 60),
            promote_every: Duration::from_millis(250),
            block: Duration::from_millis(500),
            worker_id: None,
            metrics_listen: None,
            provider_overrides: Vec::new(),
        }
    }
}

/// What every running task shares.
pub struct Runtime {
    executor: Executor,
    finisher: mpsc::UnboundedSender<Pending>,
    inflight: Arc<InFlight>,
}

impl Runtime {
    /// Runs one task and waits until its outcome is written (or the worker gives up on
    /// writing it at the hard stop).
    async fn process(&self, job: Job) {
        let Job {
            queue,
            delivery,
            permit,
        } = job;
        let entry_id = delivery.entry_id.clone();
        self.inflight.insert(&entry_id, &queue);
        let finished = self.executor.run(queue, delivery).await;
        let (done, written) = oneshot::channel();
        if self.finisher.send(Pending { finished, done }).is_ok() {
            let _ = written.await;
        }
        self.inflight.remove(&entry_id);
        drop(permit);
    }
}

/// Runs a worker until `shutdown` is cancelled, then drains: no new reads, running tasks
/// get `grace` to finish, the rest go back to the stream.
///
/// # Errors
/// Redis or Postgres cannot be reached at start, or the database is not migrated.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<()> {
    if settings.concurrency == 0 {
        return Err(Error::Settings("--concurrency must be at least 1".into()));
    }
    if settings.queues.is_empty() {
        return Err(Error::Settings("give at least one --queue".into()));
    }
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
    let worker_id = settings.worker_id.clone().unwrap_or_else(default_worker_id);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(settings.concurrency)
        .build()
        .map_err(|e| Error::Settings(format!("cannot build the HTTP client: {e}")))?;
    let mut clients = Clients::new(&settings.config, &http);
    for (name, provider) in &settings.provider_overrides {
        clients.replace(name, Arc::clone(provider));
    }

    let stop = shutdown.child_token();
    let readiness = llmq_shared::health::Readiness::default();
    let endpoints = CancellationToken::new();
    if let Some(addr) = settings.metrics_listen {
        let bound = llmq_shared::health::serve(addr, readiness.clone(), endpoints.clone())
            .await
            .map_err(|e| {
                Error::Settings(format!(
                    "cannot serve metrics on {addr}: {e}; pass --metrics-listen with a free port"
                ))
            })?;
        tracing::info!("serving /healthz, /readyz and /metrics on http://{bound}");
    }
    let hard_stop = CancellationToken::new();
    let done = CancellationToken::new();
    let tasks = TaskTracker::new();
    let finisher = Finisher {
        redis: redis.clone(),
        ledger,
        consumer: worker_id.clone(),
        result_ttl: settings.result_ttl,
        hard_stop: hard_stop.clone(),
    }
    .spawn(&tasks);
    let inflight = Arc::new(InFlight::default());
    tasks.spawn(maintenance::promote(
        redis.clone(),
        queues.clone(),
        settings.promote_every,
        stop.clone(),
    ));
    tasks.spawn(maintenance::gauges(
        redis.clone(),
        queues.clone(),
        settings.config.clone(),
        done.clone(),
    ));
    tasks.spawn(maintenance::heartbeat(
        redis.clone(),
        worker_id.clone(),
        queues.clone(),
        done.clone(),
    ));
    tasks.spawn(maintenance::refresh(
        redis.clone(),
        worker_id.clone(),
        Arc::clone(&inflight),
        settings.visibility_timeout,
        done.clone(),
    ));
    let read_pause = Arc::new(executor::ReadPause::default());
    let (jobs_tx, jobs_rx) = mpsc::unbounded_channel();
    tasks.spawn(
        Fetcher {
            redis: redis.clone(),
            queues: queues.clone(),
            consumer: worker_id.clone(),
            slots: Arc::new(Semaphore::new(settings.concurrency)),
            max_batch: settings.concurrency.min(1000),
            visibility_timeout: settings.visibility_timeout,
            max_deliveries: settings.max_deliveries,
            result_ttl: settings.result_ttl,
            block: settings.block,
            stop: stop.clone(),
            read_pause: Arc::clone(&read_pause),
        }
        .run(jobs_tx),
    );
    let runtime = Arc::new(Runtime {
        executor: Executor {
            config: settings.config.clone(),
            clients,
            limiter: llmq_shared::quota::Limiter::new(redis.clone()),
            circuits: llmq_shared::circuit::Circuits::new(redis.clone(), &worker_id),
            worker_id: worker_id.clone(),
            max_payload_bytes: settings.max_payload_bytes,
            retry_base: settings.retry_base,
            retry_max: settings.retry_max,
            attempt_timeout: settings.attempt_timeout,
            hard_stop: hard_stop.clone(),
            read_pause,
        },
        finisher,
        inflight: Arc::clone(&inflight),
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

    tokio::select! {
        r = &mut apalis => {
            // apalis only returns on its own when something broke.
            stop.cancel();
            log_apalis(r);
        }
        () = stop.cancelled() => {
            readiness.set(false);
            tracing::info!(running = inflight.count(), grace = ?settings.grace, "no longer reading; waiting for running tasks");
            match tokio::time::timeout(settings.grace, &mut apalis).await {
                Ok(r) => log_apalis(r),
                Err(_) => {
                    tracing::warn!(running = inflight.count(), "grace period over; handing running tasks back to the queue");
                    hard_stop.cancel();
                    match tokio::time::timeout(Duration::from_secs(30), &mut apalis).await {
                        Ok(r) => log_apalis(r),
                        Err(_) => apalis.abort(),
                    }
                }
            }
        }
    }
    done.cancel();
    tasks.close();
    if tokio::time::timeout(Duration::from_secs(10), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("background tasks did not stop within 10s");
    }
    let keys: Vec<QueueKeys> = queues.iter().map(|q| QueueKeys::clone(q)).collect();
    if let Err(e) = redis.leave(&worker_id, &keys).await {
        tracing::warn!("could not deregister the worker: {e}");
    }
    endpoints.cancel();
    tracing::info!(worker = %worker_id, "worker stopped");
    Ok(())
}

fn log_apalis(r: std::result::Result<std::result::Result<(), String>, tokio::task::JoinError>) {
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!("the task runner failed: {e}"),
        Err(e) => tracing::error!("the task runner stopped abnormally: {e}"),
    }
}

fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &suffix[..6])
}
