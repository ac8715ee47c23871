//! `llmq-worker`: wiring only; the logic is [`llmq_worker::run`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use llmq_shared::config::Config;

/// Runs llmq tasks from Redis against LLM providers.
#[derive(Parser, Debug)]
#[command(name = "llmq-worker", version)]
struct Args {
    /// Redis to read tasks from.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Postgres for the cost ledger (migrate it first with `llmq migrate`).
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// The provider file.
    #[arg(long, env = "LLMQ_CONFIG")]
    config: PathBuf,
    /// A queue to serve; repeat for several.
    #[arg(
        long = "queue",
        env = "LLMQ_QUEUES",
        value_delimiter = ',',
        default_value = "default"
    )]
    queues: Vec<String>,
    /// Tasks run at once.
    #[arg(long, env = "LLMQ_CONCURRENCY", default_value_t = 32)]
    concurrency: usize,
    /// A task idle this long in a silent worker's hands is taken over by another.
    #[arg(long, env = "LLMQ_VISIBILITY_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    visibility_timeout: Duration,
    /// On SIGTERM, how long running tasks may take before they are handed back.
    #[arg(long, env = "LLMQ_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// Deliveries after which a task that keeps killing workers becomes a dead letter.
    #[arg(long, env = "LLMQ_MAX_DELIVERIES", default_value_t = 5)]
    max_deliveries: u64,
    /// How long results stay in Redis.
    #[arg(long, env = "LLMQ_RESULT_TTL", default_value = "7d", value_parser = humantime::parse_duration)]
    result_ttl: Duration,
    /// Larger tasks become dead letters.
    #[arg(long, env = "LLMQ_MAX_PAYLOAD_BYTES", default_value_t = 1024 * 1024)]
    max_payload_bytes: usize,
    /// The first retry waits about this long; each further one twice as long.
    #[arg(long, env = "LLMQ_RETRY_BASE", default_value = "1s", value_parser = humantime::parse_duration)]
    retry_base: Duration,
    /// The longest a retry waits.
    #[arg(long, env = "LLMQ_RETRY_MAX", default_value = "5m", value_parser = humantime::parse_duration)]
    retry_max: Duration,
    /// One attempt, every provider, retry and wait included, ends after this (a retryable
    /// failure); each single call is bounded by the task's own `timeout`.
    #[arg(long, env = "LLMQ_ATTEMPT_TIMEOUT", default_value = "30m", value_parser = humantime::parse_duration)]
    attempt_timeout: Duration,
    /// Serve /healthz, /readyz and Prometheus /metrics here, e.g. 0.0.0.0:9464.
    #[arg(long, env = "LLMQ_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
}

#[tokio::main]
async fn main() -> ExitCode {
    llmq_shared::telemetry::init("info");
    let args = Args::parse();
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("llmq-worker: {e}");
            return ExitCode::from(2);
        }
    };
    let mut settings = llmq_worker::Settings::new(&args.redis_url, config);
    settings.database_url = Some(args.database_url);
    settings.queues = args.queues;
    settings.concurrency = args.concurrency;
    settings.visibility_timeout = args.visibility_timeout;
    settings.grace = args.grace;
    settings.max_deliveries = args.max_deliveries;
    settings.result_ttl = args.result_ttl;
    settings.max_payload_bytes = args.max_payload_bytes;
    settings.retry_base = args.retry_base;
    settings.retry_max = args.retry_max;
    settings.attempt_timeout = args.attempt_timeout;
    settings.metrics_listen = args.metrics_listen;
    match llmq_worker::run(settings, llmq_shared::shutdown::on_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("llmq-worker: {e}");
            ExitCode::from(2)
        }
    }
}
