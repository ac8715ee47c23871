//! `llmq-scheduler`: wiring only; the logic is [`llmq_scheduler::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use llmq_shared::config::Config;

/// Records closed quota windows, archives and trims dead letters and enqueues recurring tasks.
/// Run several for availability: one holds the lease and acts, the others stand by.
#[derive(Parser)]
#[command(name = "llmq-scheduler", version)]
struct Args {
    /// The provider file: quotas, and the `scheduler` section (lease, retention, recurring).
    #[arg(long, env = "LLMQ_CONFIG")]
    config: PathBuf,
    #[command(flatten)]
    settings: llmq_scheduler::Settings,
}

#[tokio::main]
async fn main() -> ExitCode {
    let _traces = llmq_shared::telemetry::init("info", "llmq-scheduler");
    let Args {
        config,
        mut settings,
    } = Args::parse();
    // The provider file without its secrets, unless a provider's batch API is to be used:
    // the scheduler sends those batches, so it needs those keys (and then reads them all).
    let loaded = Config::load_without_secrets(&config).and_then(|c| {
        if c.providers.iter().any(|p| p.enabled && p.batch.is_some()) {
            Config::load(&config)
        } else {
            Ok(c)
        }
    });
    settings.config = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "llmq-scheduler: {e} (the scheduler sends provider batches, so it needs the API keys of the providers with a batch section)"
            );
            return ExitCode::from(2);
        }
    };
    match llmq_scheduler::run(settings, llmq_shared::shutdown::on_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("llmq-scheduler: {e}");
            ExitCode::from(2)
        }
    }
}
