//! `llmq-scheduler`: wiring only; the logic is [`llmq_scheduler::run`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use llmq_shared::config::Config;

/// Records closed quota windows, archives and trims dead letters and enqueues recurring tasks.
/// Run several for availability: one holds the lease and acts, the others stand by.
#[derive(Parser, Debug)]
#[command(name = "llmq-scheduler", version)]
struct Args {
    /// Redis the workers use.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Postgres for the archive and quota history (migrate it first with `llmq migrate`).
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// The provider file: quotas, and the `scheduler` section (lease, retention, recurring).
    #[arg(long, env = "LLMQ_CONFIG")]
    config: PathBuf,
    /// Names this instance in the lease [default: host-pid-random].
    #[arg(long, env = "LLMQ_SCHEDULER_ID")]
    id: Option<String>,
    /// How often standbys look for a free lease and the holder for due work.
    #[arg(long, env = "LLMQ_SCHEDULER_TICK", default_value = "1s", value_parser = humantime::parse_duration)]
    tick: Duration,
    /// How often closed quota windows are looked for.
    #[arg(long, env = "LLMQ_QUOTA_EVERY", default_value = "1m", value_parser = humantime::parse_duration)]
    quota_every: Duration,
    /// How often dead letters are archived and trimmed.
    #[arg(long, env = "LLMQ_DEAD_LETTERS_EVERY", default_value = "1m", value_parser = humantime::parse_duration)]
    dead_letters_every: Duration,
    /// A queue whose dead letters to archive; repeat for several [default: every queue a
    /// worker has served].
    #[arg(long = "queue", env = "LLMQ_QUEUES", value_delimiter = ',')]
    queues: Vec<String>,
    /// Serve /healthz, /readyz and Prometheus /metrics here, e.g. 0.0.0.0:9465.
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
            eprintln!("llmq-scheduler: {e}");
            return ExitCode::from(2);
        }
    };
    let mut settings = llmq_scheduler::Settings::new(&args.redis_url, &args.database_url, config);
    settings.config_file = args.config.display().to_string();
    settings.id = args.id;
    settings.tick = args.tick;
    settings.quota_every = args.quota_every;
    settings.dead_letters_every = args.dead_letters_every;
    settings.queues = args.queues;
    let endpoints = tokio_util::sync::CancellationToken::new();
    if let Some(addr) = args.metrics_listen {
        // A standby is as ready as the holder: either can act within a lease.
        let ready = llmq_shared::health::Readiness::default();
        ready.set(true);
        if let Err(e) = llmq_shared::health::serve(addr, ready, endpoints.clone()).await {
            eprintln!(
                "llmq-scheduler: cannot serve metrics on {addr}: {e}; pass --metrics-listen with a free port"
            );
            return ExitCode::from(2);
        }
    }
    let outcome = llmq_scheduler::run(settings, llmq_shared::shutdown::on_signal()).await;
    endpoints.cancel();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("llmq-scheduler: {e}");
            ExitCode::from(2)
        }
    }
}
