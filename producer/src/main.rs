//! `llmq`: wiring only; the commands are in the library.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    // The Redis client's own warnings (a cluster seed that refused) would repeat the one
    // sentence the command prints.
    let _traces = llmq_shared::telemetry::init("warn,redis=error", "llmq");
    let cli = llmq::cli::Cli::parse();
    ExitCode::from(llmq::run(cli, &mut std::io::stdout()).await)
}
