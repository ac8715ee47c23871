//! What the end-to-end suites share: a queue of their own, the shared test database, the mock
//! server, in-process workers and worker processes.
//!
//! Test support: a failed setup step panics with its reason, as a test would.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use llmq_shared::chain::ChainState;
use llmq_shared::config::Config;
use llmq_shared::envelope::Envelope;
use llmq_shared::ids::TaskId;
use llmq_shared::keys::QueueKeys;
use llmq_shared::ledger::Ledger;
use llmq_shared::outcome::TaskRecord;
use llmq_shared::queue::Client;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

use crate::mock::{MockOptions, MockServer};

/// Redis for tests: `REDIS_URL`, or the local default.
#[must_use]
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The Postgres server for tests (without a database name): `LLMQ_TEST_PG`, or the local
/// default with trust auth.
#[must_use]
pub fn pg_server() -> String {
    std::env::var("LLMQ_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// The test database every suite shares. Suites never share a queue, and every ledger row
/// carries its queue, so each test reads only its own rows.
#[must_use]
pub fn database_url() -> String {
    format!("{}/llmq_test", pg_server())
}

static DATABASE: OnceCell<()> = OnceCell::const_new();

/// Creates and migrates the test database once per test binary.
///
/// # Errors
/// Postgres cannot be reached or the migration fails.
pub async fn ensure_database() -> anyhow::Result<()> {
    DATABASE
        .get_or_try_init(|| async {
            create_database("llmq_test").await?;
            Ledger::connect(&database_url(), 2).await?.migrate().await?;
            anyhow::Ok(())
        })
        .await?;
    Ok(())
}

/// Creates database `name` if it does not exist.
///
/// # Errors
/// Postgres cannot be reached.
pub async fn create_database(name: &str) -> anyhow::Result<()> {
    use sqlx::Connection;
    let mut admin = sqlx::PgConnection::connect(&format!("{}/postgres", pg_server())).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        // Two test binaries may race to create it; the loser sees "already exists".
        let created = sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await;
        match created {
            Err(e) if !e.to_string().contains("already exists") => return Err(e.into()),
            _ => {}
        }
    }
    Ok(())
}

/// The Python of a virtualenv a `deps.sh` makes: at `$<var>`, else `~/.cache/llmq/<dir>`
/// (under `$XDG_CACHE_HOME` when set). `None` when it is not there.
#[must_use]
pub fn venv_python(var: &str, dir: &str) -> Option<PathBuf> {
    let venv = std::env::var_os(var).map_or_else(
        || {
            let cache = std::env::var_os("XDG_CACHE_HOME").map_or_else(
                || PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache"),
                PathBuf::from,
            );
            cache.join("llmq").join(dir)
        },
        PathBuf::from,
    );
    Some(venv.join("bin/python")).filter(|p| p.exists())
}

/// The provider file the suites use, pointing at `mock_url`.
#[must_use]
pub fn mock_config(mock_url: &str) -> Config {
    let text = include_str!("../../examples/providers.mock.yaml");
    let url = mock_url.to_owned();
    Config::parse("providers.mock.yaml", text, &move |name| {
        (name == "LLMQ_MOCK_URL").then(|| url.clone())
    })
    .unwrap()
}

/// One test's world: its own queue, the shared database, a mock server.
pub struct TestEnv {
    pub queue: String,
    pub keys: QueueKeys,
    pub redis: Client,
    pub ledger: Ledger,
    pub mock: MockServer,
}

impl TestEnv {
    /// # Errors
    /// Redis, Postgres or the mock server cannot be started or reached.
    pub async fn new() -> anyhow::Result<Self> {
        ensure_database().await?;
        let queue = format!("t-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        let keys = QueueKeys::new(&queue);
        let redis = Client::new(&redis_url())?;
        redis.ping().await?;
        let ledger = Ledger::connect(&database_url(), 2).await?;
        let mock = MockServer::start(MockOptions::default()).await?;
        Ok(Self {
            queue,
            keys,
            redis,
            ledger,
            mock,
        })
    }

    /// A migrated ledger database of this test's own, so breaking it breaks no other test:
    /// its URL and a handle.
    pub async fn own_ledger(&self) -> (String, Ledger) {
        let name = format!("llmq_test_{}", self.queue.replace('-', "_"));
        create_database(&name).await.unwrap();
        let url = format!("{}/{name}", pg_server());
        let ledger = Ledger::connect(&url, 1).await.unwrap();
        ledger.migrate().await.unwrap();
        (url, ledger)
    }

    /// A ledger database of this test's own (`suffix` tells it from the test's others),
    /// migrated only up to the migrations named before `version`: a ledger an older release
    /// wrote, for testing what `llmq migrate` does to it. Its URL and a handle.
    pub async fn ledger_before(&self, suffix: &str, version: &str) -> (String, Ledger) {
        let name = format!("llmq_test_{}_{suffix}", self.queue.replace('-', "_"));
        create_database(&name).await.unwrap();
        let url = format!("{}/{name}", pg_server());
        let ledger = Ledger::connect(&url, 2).await.unwrap();
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        for f in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations")).unwrap() {
            let path = f.unwrap().path();
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            if file.as_str() < version {
                std::fs::copy(&path, dir.join(&file)).unwrap();
            }
        }
        let before = sqlx::migrate::Migrator::new(dir.as_path()).await.unwrap();
        assert!(before.iter().count() < llmq_shared::ledger::MIGRATOR.iter().count());
        before.run(ledger.pool()).await.unwrap();
        (url, ledger)
    }

    /// Archives this queue's dead letters to Postgres as the scheduler does, by a scheduler
    /// whose clock is 30 days ahead (so every letter is old enough); returns how many.
    pub async fn archive_dead_letters(&self) -> usize {
        let mut settings =
            llmq_scheduler::Settings::new(&redis_url(), &database_url(), self.settings().config)
                .unwrap();
        settings.id = Some(format!("{}-archiver", self.queue));
        settings.queues = vec![self.queue.clone()];
        settings.namespace = Some(self.queue.clone());
        let later = chrono::Utc::now() + chrono::Duration::days(30);
        settings.clock = std::sync::Arc::new(move || later);
        let mut scheduler = llmq_scheduler::Scheduler::connect(settings).await.unwrap();
        assert!(scheduler.acquire().await.unwrap());
        let archived = scheduler.archive_step(&self.keys, 500).await.unwrap().len();
        scheduler.release().await.unwrap();
        archived
    }

    /// Worker settings tuned for tests: short backoffs and timeouts.
    #[must_use]
    pub fn settings(&self) -> llmq_worker::Settings {
        let mut s =
            llmq_worker::Settings::new(&redis_url(), mock_config(&self.mock.url())).unwrap();
        s.database_url = Some(database_url());
        s.queues = vec![self.queue.clone()];
        s.concurrency = 8;
        s.retry_base = Duration::from_millis(50);
        s.retry_max = Duration::from_millis(500);
        s.visibility_timeout = Duration::from_secs(2);
        s.promote_every = Duration::from_millis(50);
        s.block = Duration::from_millis(200);
        s.grace = Duration::from_secs(10);
        s
    }

    /// Starts an in-process worker with [`TestEnv::settings`].
    pub fn worker(&self) -> WorkerHandle {
        WorkerHandle::start(self.settings())
    }

    /// Runs `llmq` in-process with `args` (after the program name). Returns the exit code
    /// and what it printed.
    pub async fn cli(&self, args: &[&str]) -> (u8, String) {
        use clap::Parser;
        let mut full = vec!["llmq", "--redis-url"];
        let url = redis_url();
        full.push(&url);
        full.extend_from_slice(args);
        let cli = llmq::cli::Cli::try_parse_from(full)
            .unwrap_or_else(|e| panic!("bad test arguments: {e}"));
        let mut out = Vec::new();
        let code = llmq::run(cli, &mut out).await;
        (code, String::from_utf8_lossy(&out).into_owned())
    }

    /// A dead letter as a worker writes one (a `mock-fast` task that ran out of attempts),
    /// whose task runs fine when replayed: its dead-entry id and its task id.
    pub async fn replayable_dead_letter(&self, prompt: &str) -> (String, String) {
        let mut e = Envelope::new(prompt);
        e.model = Some("mock-fast".into());
        let task_id = e.id.expect("Envelope::new names its task").to_string();
        let mut c = self.redis.conn().await.unwrap();
        let id: String = redis::cmd("XADD")
            .arg(self.keys.dead())
            .arg("*")
            .arg("task")
            .arg(e.to_json())
            .arg("error")
            .arg("the provider was down")
            .arg("class")
            .arg("retryable")
            .arg("attempts")
            .arg("5")
            .arg("failed_at")
            .arg(chrono::Utc::now().timestamp_millis())
            .arg("entry_id")
            .arg("0-1")
            .query_async(&mut c)
            .await
            .unwrap();
        (id, task_id)
    }

    /// How many entries the queue's stream holds (ready and in flight).
    pub async fn stream_len(&self) -> u64 {
        let mut c = self.redis.conn().await.unwrap();
        redis::cmd("XLEN")
            .arg(self.keys.stream())
            .query_async(&mut c)
            .await
            .unwrap()
    }

    /// Sends a raw payload with one XADD, as a producer in another language would.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn xadd(&self, field: &str, payload: &[u8]) -> anyhow::Result<String> {
        let mut c = self.redis.conn().await?;
        let id: String = redis::cmd("XADD")
            .arg(self.keys.stream())
            .arg("*")
            .arg(field)
            .arg(payload)
            .query_async(&mut c)
            .await?;
        Ok(id)
    }

    /// The `task` fields of the stream's entries from `from` to `to` (`-` and `+` for all),
    /// parsed; entries without one are left out.
    ///
    /// # Errors
    /// Redis fails, or a `task` field is not JSON.
    pub async fn stream_tasks(
        &self,
        from: &str,
        to: &str,
    ) -> anyhow::Result<Vec<serde_json::Value>> {
        let mut c = self.redis.conn().await?;
        let entries: Vec<(String, std::collections::HashMap<String, String>)> =
            redis::cmd("XRANGE")
                .arg(self.keys.stream())
                .arg(from)
                .arg(to)
                .query_async(&mut c)
                .await?;
        entries
            .iter()
            .filter_map(|(_, fields)| fields.get("task"))
            .map(|task| Ok(serde_json::from_str(task)?))
            .collect()
    }

    /// Runs `llmq batch --input <input> --queue <this queue>` with `extra` flags.
    pub async fn batch(&self, input: &std::path::Path, extra: &[&str]) -> (u8, String) {
        let input = input.to_string_lossy();
        let mut args = vec!["batch", "--input", &input, "--queue", &self.queue];
        args.extend_from_slice(extra);
        self.cli(&args).await
    }

    /// Waits until task `id` has a final record.
    ///
    /// # Errors
    /// It does not finish within `within`.
    pub async fn wait_final(
        &self,
        id: impl std::fmt::Display,
        within: Duration,
    ) -> anyhow::Result<TaskRecord> {
        let id: TaskId = id.to_string().parse()?;
        let records = llmq::wait_for(&self.redis, &self.keys, &[id], Some(within), |_| {}).await?;
        records
            .into_iter()
            .next()
            .flatten()
            .ok_or_else(|| anyhow::anyhow!("task {id} did not finish within {within:?}"))
    }

    /// Waits until chain `id` exists and no longer runs; panics after `within`.
    pub async fn chain_ended(&self, id: &str, within: Duration) -> ChainState {
        let started = Instant::now();
        loop {
            let c = self.redis.chain(&self.keys, id).await.unwrap();
            if let Some(c) = c.as_ref().filter(|c| c.state != "running") {
                return c.clone();
            }
            assert!(
                started.elapsed() < within,
                "chain {id} did not finish: {c:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The output of step `step` of chain `c` (empty when it has none).
    pub async fn step_output(&self, c: &ChainState, step: &str) -> String {
        self.redis
            .task(&self.keys, c.steps[step].task_id.expect("a step's task"))
            .await
            .unwrap()
            .and_then(|r| r.output)
            .unwrap_or_default()
    }

    /// Waits until `check` holds, polling every 20 ms.
    ///
    /// # Errors
    /// It does not hold within `within`.
    pub async fn eventually<F, Fut>(
        &self,
        what: &str,
        within: Duration,
        mut check: F,
    ) -> anyhow::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let started = Instant::now();
        while started.elapsed() < within {
            if check().await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::bail!("{what} did not happen within {within:?}")
    }

    /// (entry id, consumer) of every entry of the queue a worker holds.
    /// What `consumer` takes over of tasks idle for a millisecond (after waiting 5 ms for
    /// them to be), up to `count`, as a worker with `max_deliveries` of 3 would: a task
    /// delivered a fourth time is poison.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn take_over(
        &self,
        consumer: &str,
        count: usize,
    ) -> anyhow::Result<llmq_shared::queue::Reclaimed> {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let ttl = Duration::from_secs(60);
        Ok(self
            .redis
            .reclaim(
                &self.keys,
                consumer,
                Duration::from_millis(1),
                count,
                3,
                ttl,
            )
            .await?)
    }

    ///
    /// # Errors
    /// Redis fails.
    pub async fn pending(&self) -> anyhow::Result<Vec<(String, String)>> {
        self.redis.ensure_group(&self.keys).await?;
        let mut c = self.redis.conn().await?;
        let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(self.keys.stream())
            .arg(llmq_shared::keys::GROUP)
            .arg("-")
            .arg("+")
            .arg(1000)
            .query_async(&mut c)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(id, consumer, _, _)| (id, consumer))
            .collect())
    }

    /// Waits until a dead letter of the queue has an error containing `says`.
    ///
    /// # Errors
    /// It does not happen `within`.
    pub async fn dead_letter_saying(&self, says: &str, within: Duration) -> anyhow::Result<()> {
        self.eventually(
            &format!("a dead letter saying `{says}`"),
            within,
            || async {
                self.redis
                    .dead_letters(&self.keys, 10)
                    .await
                    .is_ok_and(|letters| letters.iter().any(|d| d.error.contains(says)))
            },
        )
        .await
    }

    /// Ledger rows of this test's queue: (task id, run, attempt, call no, provider, model, cost).
    ///
    /// # Errors
    /// Postgres fails.
    pub async fn calls(
        &self,
    ) -> anyhow::Result<Vec<(uuid::Uuid, i32, i32, i32, String, String, f64)>> {
        Ok(sqlx::query_as(
            "SELECT task_id, run, attempt, call_no, provider, model, cost_usd::float8
             FROM provider_calls WHERE queue = $1 ORDER BY called_at, attempt",
        )
        .bind(&self.queue)
        .fetch_all(self.ledger.pool())
        .await?)
    }
}

/// An in-process worker, stopped like SIGTERM would stop it.
pub struct WorkerHandle {
    pub token: CancellationToken,
    join: tokio::task::JoinHandle<llmq_worker::Result<()>>,
}

impl WorkerHandle {
    #[must_use]
    pub fn start(settings: llmq_worker::Settings) -> Self {
        let token = CancellationToken::new();
        let join = tokio::spawn(llmq_worker::run(settings, token.clone()));
        Self { token, join }
    }

    /// Cancels the worker and waits for its graceful stop.
    ///
    /// # Errors
    /// The worker failed.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.token.cancel();
        self.join.await??;
        Ok(())
    }
}

/// A loopback port where nothing listens, for a server a test starts later or for an address
/// that must stay silent: below the kernel's ephemeral range, which `bind(0)` (every test's
/// own servers, and llmq-mock's) never hands out, and a different one for each call in this
/// process (a counter from a random start). A port from `bind(0)` that a test released was
/// once taken by another test's mock server during an outage test's 15 s of silence.
///
/// # Panics
/// No port below the ephemeral range can be bound.
#[must_use]
pub fn free_port() -> u16 {
    const LOWEST: u16 = 10_000;
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    static START: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let ephemeral = ephemeral_start().max(LOWEST + 1_000);
    let span = u32::from(ephemeral - LOWEST);
    let start = *START.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        (std::process::id() ^ nanos) % span
    });
    for _ in 0..span {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = LOWEST + u16::try_from((start + n) % span).expect("below the span");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port below {ephemeral}");
}

/// The lowest port of the kernel's ephemeral range, which `bind(0)` and outgoing connections
/// take from.
#[must_use]
pub fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768)
}

/// The workspace's built binaries (`make test` builds them before the suites run).
#[must_use]
pub fn binary(name: &str) -> PathBuf {
    let mut dir = std::env::current_exe().unwrap_or_default();
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing; build the binaries first with `cargo build --workspace --bins` (make test does)",
        path.display()
    );
    path
}

/// A worker process for crash and signal tests.
pub struct WorkerProcess {
    pub child: Child,
}

impl WorkerProcess {
    /// Starts `llmq-worker` on `env`'s queue with extra flags.
    ///
    /// # Errors
    /// The binary cannot be started.
    pub fn spawn(env: &TestEnv, extra: &[&str]) -> anyhow::Result<Self> {
        Self::spawn_with(
            env,
            include_str!("../../examples/providers.mock.yaml"),
            extra,
        )
    }

    /// Starts `llmq-worker` with the provider file `config_text`.
    ///
    /// # Errors
    /// The file cannot be written or the binary started.
    pub fn spawn_with(env: &TestEnv, config_text: &str, extra: &[&str]) -> anyhow::Result<Self> {
        Self::spawn_with_vars(env, config_text, extra, &[])
    }

    /// Starts `llmq-worker` with the provider file `config_text` and these environment
    /// variables besides the usual ones.
    ///
    /// # Errors
    /// The file cannot be written or the binary started.
    pub fn spawn_with_vars(
        env: &TestEnv,
        config_text: &str,
        extra: &[&str],
        vars: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let config = std::env::temp_dir().join(format!(
            "llmq-{}-{}.yaml",
            env.queue,
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::write(&config, config_text)?;
        let child = Command::new(binary("llmq-worker"))
            .env("REDIS_URL", redis_url())
            .env("DATABASE_URL", database_url())
            .env("LLMQ_CONFIG", &config)
            .env("LLMQ_MOCK_URL", env.mock.url())
            .env("RUST_LOG", "warn")
            .envs(vars.iter().copied())
            .args(["--queue", &env.queue, "--retry-base", "50ms"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        Ok(Self { child })
    }

    /// Sends `signal` (e.g. "KILL", "TERM") to the process.
    ///
    /// # Errors
    /// `kill` cannot be run.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()?;
        anyhow::ensure!(status.success(), "kill -{signal} failed");
        Ok(())
    }

    /// Waits for the process to exit, at most `within`.
    ///
    /// # Errors
    /// It is still running after `within`.
    pub async fn wait_exit(
        &mut self,
        within: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            anyhow::ensure!(
                started.elapsed() < within,
                "the worker did not exit within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small seeded generator (xorshift64*): the same seed makes the same cases, so a failing
/// property test can be replayed.
pub struct SeededRng(pub u64);

impl SeededRng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Puts `items` in a random order (Fisher-Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

/// A throwaway Postgres cluster on a free loopback port (initdb, run as the `postgres` user
/// when this is root), with TLS when given a certificate and key; stopped and removed on drop.
pub struct ScratchPostgres {
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
    options: String,
}

impl ScratchPostgres {
    fn bin(name: &str) -> PathBuf {
        let base = std::path::Path::new("/usr/lib/postgresql");
        let mut versions: Vec<PathBuf> = std::fs::read_dir(base)
            .expect("Postgres is installed under /usr/lib/postgresql")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        versions.sort();
        versions
            .last()
            .expect("a Postgres version")
            .join("bin")
            .join(name)
    }

    fn run(&self, program: &std::path::Path, args: &[&str]) {
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        let out = cmd.args(args).output().expect("Postgres's tools run");
        assert!(
            out.status.success(),
            "{} {args:?}: {}",
            program.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Makes and starts the cluster; `tls` is the server's certificate and key.
    ///
    /// # Panics
    /// Postgres's tools are missing or fail.
    #[must_use]
    pub fn start(tls: Option<(&std::path::Path, &std::path::Path)>) -> Self {
        let dir = std::env::temp_dir().join(format!("llmq-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let as_postgres = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout == b"0\n");
        let d = dir.display().to_string();
        let port = free_port();
        let mut options = format!("-p {port} -k {d} -c listen_addresses=127.0.0.1");
        if let Some((cert, key)) = tls {
            std::fs::copy(cert, dir.join("server.pem")).expect("the certificate");
            std::fs::copy(key, dir.join("server.key")).expect("the key");
            options.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={d}/server.pem -c ssl_key_file={d}/server.key"
            ));
        }
        if as_postgres {
            let status = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(&dir)
                .status();
            assert!(status.is_ok_and(|s| s.success()));
        }
        if tls.is_some() {
            let status = Command::new("chmod")
                .arg("600")
                .arg(dir.join("server.key"))
                .status();
            assert!(status.is_ok_and(|s| s.success()));
        }
        let pg = Self {
            dir,
            port,
            as_postgres,
            options,
        };
        let data = pg.data();
        pg.run(
            &Self::bin("initdb"),
            &["-D", &data, "-A", "trust", "-U", "postgres"],
        );
        pg.start_server();
        pg
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn start_server(&self) {
        let log = format!("{}/log", self.dir.display());
        self.run(
            &Self::bin("pg_ctl"),
            &[
                "-D",
                &self.data(),
                "-l",
                &log,
                "-o",
                &self.options,
                "-w",
                "start",
            ],
        );
    }

    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `db`, without TLS.
    #[must_use]
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Stops the server as a crash would (`-m immediate`: no checkpoint, every connection
    /// cut, the WAL replayed at the start), then starts it again.
    pub fn crash_and_restart(&self) {
        self.run(
            &Self::bin("pg_ctl"),
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
        self.start_server();
    }
}

impl Drop for ScratchPostgres {
    fn drop(&mut self) {
        let data = self.data();
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(Self::bin("pg_ctl"));
            c
        } else {
            Command::new(Self::bin("pg_ctl"))
        };
        let _ = cmd.args(["-D", &data, "-m", "immediate", "stop"]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Where the ledger's rollups and the raw rows they sum differ, read in one snapshot (so
/// writers may go on meanwhile): one line per differing key of each rollup, none when every
/// rollup equals its rows exactly. Keys whose sums are all zero count as absent.
///
/// # Errors
/// Postgres fails.
pub async fn rollup_mismatches(pool: &sqlx::PgPool) -> anyhow::Result<Vec<String>> {
    const CHECKS: [(&str, &str, &str); 7] = [
        (
            // The latency histogram compared as a key.
            "routing_rollups",
            "SELECT day, queue, provider, model, task_type, risk, ledger_hist_sum(latency)::text,
                sum(tries), sum(successes), 0, 0, 0, 0, 0
             FROM routing_rollups GROUP BY 1, 2, 3, 4, 5, 6",
            "SELECT (called_at AT TIME ZONE 'UTC')::date, queue, provider, model, task_type,
                coalesce(task_risk, ''),
                coalesce(ledger_hist(ledger_latency_bucket(latency_ms), 1)
                    FILTER (WHERE outcome = 'ok'), array_fill(0::bigint, ARRAY[160]))::text,
                count(*), count(*) FILTER (WHERE ledger_call_succeeded(c)), 0, 0, 0, 0, 0
             FROM provider_calls c WHERE ledger_call_counts(c) AND CALL_SUMMED
             GROUP BY 1, 2, 3, 4, 5, 6",
        ),
        (
            "call_rollups",
            "SELECT day, queue, provider, model, task_type, sum(calls) AS calls,
                sum(input_tokens) AS i, sum(output_tokens) AS o, sum(cached_tokens) AS c,
                sum(reasoning_tokens) AS r, sum(cost_usd) AS cost, sum(batch_saved_usd) AS saved
             FROM call_rollups GROUP BY 1, 2, 3, 4, 5",
            "SELECT (called_at AT TIME ZONE 'UTC')::date, queue, provider, model, task_type,
                count(*) FILTER (WHERE outcome NOT IN ('unsent', 'cached')), sum(input_tokens),
                sum(output_tokens), sum(cached_tokens), sum(reasoning_tokens), sum(cost_usd),
                coalesce(sum(list_cost_usd - cost_usd), 0)
             FROM provider_calls WHERE CALL_SUMMED GROUP BY 1, 2, 3, 4, 5",
        ),
        (
            "task_rollups",
            "SELECT day, queue, provider, model, task_type, risk, sum(tasks) AS calls,
                sum(counted) AS i, sum(successes) AS o, sum(cost_usd) AS c,
                sum(counted_cost_usd) AS r, sum(durations) AS cost, sum(duration_ms) AS saved
             FROM task_rollups GROUP BY 1, 2, 3, 4, 5, 6",
            "SELECT (finished_at AT TIME ZONE 'UTC')::date, queue, coalesce(provider, ''),
                coalesce(model, ''), task_type, coalesce(risk, ''), count(*),
                count(*) FILTER (WHERE ledger_task_counts(tasks)),
                count(*) FILTER (WHERE ledger_task_counts(tasks)
                    AND ledger_task_succeeded(tasks)),
                sum(cost_usd), coalesce(sum(cost_usd) FILTER (WHERE ledger_task_counts(tasks)), 0),
                count(duration_ms) FILTER (WHERE ledger_task_counts(tasks)),
                coalesce(sum(duration_ms) FILTER (WHERE ledger_task_counts(tasks)), 0)
             FROM tasks WHERE TASK_SUMMED GROUP BY 1, 2, 3, 4, 5, 6",
        ),
        (
            // Spend by tenant and tag (migration 20261211000001): the calls' sums.
            "spend_rollups calls",
            "SELECT day, tenant, tag, value, queue, provider, model, task_type, sum(calls),
                sum(input_tokens), sum(output_tokens), sum(cached_tokens), 0,
                sum(cost_usd), sum(batch_saved_usd)
             FROM spend_rollups GROUP BY 1, 2, 3, 4, 5, 6, 7, 8",
            "SELECT (called_at AT TIME ZONE 'UTC')::date, k.tenant, k.tag, k.value, queue,
                provider, model, task_type,
                count(*) FILTER (WHERE outcome NOT IN ('unsent', 'cached')), sum(input_tokens),
                sum(output_tokens), sum(cached_tokens), 0, sum(cost_usd),
                coalesce(sum(list_cost_usd - cost_usd), 0)
             FROM provider_calls c CROSS JOIN LATERAL ledger_spend_keys(c.tenant, c.tags) k
             WHERE CALL_SUMMED GROUP BY 1, 2, 3, 4, 5, 6, 7, 8",
        ),
        (
            // ... and the finished tasks'.
            "spend_rollups tasks",
            "SELECT day, tenant, tag, value, queue, provider, model, task_type, sum(tasks),
                sum(counted), sum(successes), sum(counted_cost_usd), sum(durations),
                sum(duration_ms), 0
             FROM spend_rollups GROUP BY 1, 2, 3, 4, 5, 6, 7, 8",
            "SELECT (finished_at AT TIME ZONE 'UTC')::date, k.tenant, k.tag, k.value, queue,
                coalesce(provider, ''), coalesce(model, ''), task_type, count(*),
                count(*) FILTER (WHERE ledger_task_counts(t)),
                count(*) FILTER (WHERE ledger_task_counts(t) AND ledger_task_succeeded(t)),
                coalesce(sum(cost_usd) FILTER (WHERE ledger_task_counts(t)), 0),
                count(duration_ms) FILTER (WHERE ledger_task_counts(t)),
                coalesce(sum(duration_ms) FILTER (WHERE ledger_task_counts(t)), 0), 0
             FROM tasks t CROSS JOIN LATERAL ledger_spend_keys(t.tenant, t.tags) k
             WHERE TASK_SUMMED GROUP BY 1, 2, 3, 4, 5, 6, 7, 8",
        ),
        (
            // ... and by day alone, over every tenant.
            "spend_days",
            "SELECT day, tag, value, sum(calls), sum(input_tokens), sum(output_tokens),
                sum(cached_tokens), sum(tasks), sum(cost_usd), sum(batch_saved_usd)
             FROM spend_days GROUP BY 1, 2, 3",
            "SELECT day, tag, value, sum(calls), sum(i), sum(o), sum(c), sum(tasks), sum(cost),
                sum(saved)
             FROM (SELECT (called_at AT TIME ZONE 'UTC')::date AS day, k.tag,
                    CASE WHEN k.tag = '' THEN k.tenant ELSE k.value END AS value,
                    count(*) FILTER (WHERE outcome NOT IN ('unsent', 'cached')) AS calls,
                    sum(input_tokens) AS i, sum(output_tokens) AS o, sum(cached_tokens) AS c,
                    0 AS tasks, sum(cost_usd) AS cost,
                    coalesce(sum(list_cost_usd - cost_usd), 0) AS saved
                 FROM provider_calls p CROSS JOIN LATERAL ledger_spend_keys(p.tenant, p.tags) k
                 WHERE CALL_SUMMED GROUP BY 1, 2, 3
                 UNION ALL
                 SELECT (finished_at AT TIME ZONE 'UTC')::date, k.tag,
                    CASE WHEN k.tag = '' THEN k.tenant ELSE k.value END, 0, 0, 0, 0, count(*),
                    0, 0
                 FROM tasks t CROSS JOIN LATERAL ledger_spend_keys(t.tenant, t.tags) k
                 WHERE TASK_SUMMED GROUP BY 1, 2, 3) s
             GROUP BY 1, 2, 3",
        ),
        (
            // Whole chains; `first_day` is checked below.
            "chain_costs",
            "SELECT chain_id, calls, tasks AS i, input_tokens AS o, output_tokens AS c,
                cached_tokens AS r, cost_usd AS cost, batch_saved_usd AS saved
             FROM chain_costs",
            "SELECT chain_id, sum(calls), sum(tasks), sum(i), sum(o), sum(c), sum(cost),
                sum(saved)
             FROM (SELECT chain_id, count(*) FILTER (WHERE outcome NOT IN ('unsent', 'cached')) AS calls,
                    0 AS tasks, sum(input_tokens) AS i, sum(output_tokens) AS o,
                    sum(cached_tokens) AS c, sum(cost_usd) AS cost,
                    coalesce(sum(list_cost_usd - cost_usd), 0) AS saved
                 FROM provider_calls WHERE chain_id IS NOT NULL AND CALL_SUMMED GROUP BY 1
                 UNION ALL
                 SELECT chain_id, 0, count(*), 0, 0, 0, 0, 0
                 FROM tasks WHERE chain_id IS NOT NULL AND TASK_SUMMED GROUP BY 1) s
             GROUP BY 1",
        ),
    ];
    // What writers wrote since the last roll is summed now; what they write meanwhile is
    // above the line read in the snapshot below, and left out of the rows compared.
    llmq_shared::ledger::roll(pool).await?;
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    // The rows the rollups sum (migration 20261204000001): below the line, but a call still
    // `started`; and what was written before the line existed.
    let summed = |sql: &str| {
        sql.replace(
            "CALL_SUMMED",
            "(written IS NULL OR (written < (SELECT upto FROM ledger_rolled)
                AND written <> ALL (SELECT unnest(pending) FROM ledger_rolled) AND outcome <> 'started'))",
        )
        .replace(
            "TASK_SUMMED",
            "(written IS NULL OR (written < (SELECT upto FROM ledger_rolled)
                AND written <> ALL (SELECT unnest(pending) FROM ledger_rolled)))",
        )
    };
    let mut out = Vec::new();
    for (name, rollup, raw) in CHECKS {
        let raw = summed(raw);
        // Compared by position: the keys, then seven sums.
        let keys = match name {
            "routing_rollups" => 7,
            "call_rollups" => 5,
            "task_rollups" => 6,
            "spend_rollups calls" | "spend_rollups tasks" => 8,
            "spend_days" => 3,
            _ => 1,
        };
        let columns: Vec<String> = (1..=keys)
            .map(|k| format!("k{k}"))
            .chain(["calls", "i", "o", "c", "r", "cost", "saved"].map(String::from))
            .collect();
        let columns = columns.join(", ");
        let nonzero = "NOT (calls = 0 AND i = 0 AND o = 0 AND c = 0 AND r = 0 AND cost = 0
            AND saved = 0)";
        let sql = format!(
            "WITH a AS (SELECT * FROM ({rollup}) x ({columns}) WHERE {nonzero}),
                  b AS (SELECT * FROM ({raw}) y ({columns}) WHERE {nonzero})
             SELECT 'rollup', row_to_json(d)::text FROM (SELECT * FROM a EXCEPT SELECT * FROM b) d
             UNION ALL
             SELECT 'rows', row_to_json(d)::text FROM (SELECT * FROM b EXCEPT SELECT * FROM a) d"
        );
        let rows: Vec<(String, String)> = sqlx::query_as(&sql).fetch_all(&mut *tx).await?;
        out.extend(
            rows.into_iter()
                .map(|(side, row)| format!("{name}: only in the {side}: {row}")),
        );
    }
    // A chain is dated by its earliest row ever recorded, so never after one it has now.
    let late: Vec<(String, String)> = sqlx::query_as(&summed(
        "SELECT k.chain_id, k.first_day::text FROM chain_costs k
         JOIN (SELECT chain_id, min((called_at AT TIME ZONE 'UTC')::date) AS day
               FROM provider_calls WHERE CALL_SUMMED GROUP BY 1
               UNION ALL
               SELECT chain_id, min((finished_at AT TIME ZONE 'UTC')::date) FROM tasks
               WHERE TASK_SUMMED GROUP BY 1) r USING (chain_id)
         GROUP BY 1, 2 HAVING k.first_day > min(r.day)",
    ))
    .fetch_all(&mut *tx)
    .await?;
    out.extend(
        late.into_iter()
            .map(|(chain, day)| format!("chain_costs: {chain} dated {day}, after its first row")),
    );
    tx.commit().await?;
    Ok(out)
}

/// Calls whose copy of their task's status, verdict and risk (what routing reads) differs
/// from the task's row, or that carry one without a task row.
///
/// # Errors
/// Postgres fails.
pub async fn calls_out_of_step(pool: &sqlx::PgPool) -> anyhow::Result<i64> {
    // A new task's view is copied to its calls by the roll that sums it.
    llmq_shared::ledger::roll(pool).await?;
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM provider_calls c LEFT JOIN tasks t USING (task_id)
         WHERE (c.task_status, c.task_verdict, c.task_risk)
             IS DISTINCT FROM (t.status, t.verdict, t.risk)",
    )
    .fetch_one(pool)
    .await?)
}

/// A task id as the tests hold one (the text a CLI printed, an entry's `id`, or the id
/// itself), read as one.
pub trait AsTaskId {
    fn tid(&self) -> TaskId;
}

impl AsTaskId for str {
    fn tid(&self) -> TaskId {
        self.parse().expect("a task id")
    }
}

impl AsTaskId for String {
    fn tid(&self) -> TaskId {
        self.as_str().tid()
    }
}

impl AsTaskId for TaskId {
    fn tid(&self) -> TaskId {
        *self
    }
}

/// [`AsTaskId::tid`] of each.
pub fn tids<T: AsTaskId>(ids: &[T]) -> Vec<TaskId> {
    ids.iter().map(AsTaskId::tid).collect()
}

#[cfg(test)]
mod tests {
    /// `free_port` hands out a different port each call, none that `bind(0)` could hand
    /// another test's server meanwhile, and none that is taken.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn free_ports_are_distinct_free_and_below_what_bind_0_hands_out() {
        let ports: Vec<u16> = (0..50).map(|_| super::free_port()).collect();
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(
            distinct.len(),
            ports.len(),
            "a port handed out twice: {ports:?}"
        );
        for _ in 0..50 {
            let any = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let p = any.local_addr().unwrap().port();
            assert!(
                ports.iter().all(|q| *q < p),
                "bind(0) gave {p}, below {ports:?}"
            );
        }
        for p in ports {
            assert!(
                std::net::TcpListener::bind(("127.0.0.1", p)).is_ok(),
                "{p} is taken"
            );
        }
    }
}
