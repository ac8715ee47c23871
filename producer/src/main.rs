//! `llmq`: wiring only; the commands are in the library.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let _traces = llmq_shared::telemetry::init("warn", "llmq");
    let cli = llmq::cli::Cli::parse();
    ExitCode::from(llmq::run(cli, &mut std::io::stdout()).await)
}
