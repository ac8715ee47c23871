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
    settings.config = match Config::load_without_secrets(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("llmq-scheduler: {e}");
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
