//! `llmq-worker`: wiring only; the logic is [`llmq_worker::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use llmq_shared::config::Config;

/// Runs llmq tasks from Redis against LLM providers.
#[derive(Parser)]
#[command(name = "llmq-worker", version)]
struct Args {
    /// The provider file.
    #[arg(long, env = "LLMQ_CONFIG")]
    config: PathBuf,
    #[command(flatten)]
    settings: llmq_worker::Settings,
}

fn main() -> ExitCode {
    // Before the runtime's threads exist.
    llmq_worker::tune_malloc();
    llmq_worker::guard_secrets_from_children();
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(run()),
        Err(e) => {
            eprintln!("llmq-worker: cannot start the async runtime: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run() -> ExitCode {
    let _traces = llmq_shared::telemetry::init("info", "llmq-worker");
    let Args {
        config,
        mut settings,
    } = Args::parse();
    settings.config = match Config::load(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("llmq-worker: {e}");
            return ExitCode::from(2);
        }
    };
    match llmq_worker::run(settings, llmq_shared::shutdown::on_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("llmq-worker: {e}");
            ExitCode::from(2)
        }
    }
}
