//! `llmq-mock`: the mock LLM server, speaking the OpenAI, Anthropic, Gemini and Ollama formats.
//!
//! ```text
//! llmq-mock --listen 127.0.0.1:8089 --latency 20ms
//! ```
//!
//! Prints `llmq-mock listening on http://ADDR` once it accepts connections and stops
//! gracefully on SIGTERM or ctrl-c. See `llmq_tests::mock` for the magic model names.

use std::io::{self, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use llmq_tests::mock::{MockOptions, serve};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Mock LLM server speaking the OpenAI chat-completions wire format.
///
/// The model name picks the behaviour: slow, slow-<ms>, timeout, fail-500, fail-503, fail-400,
/// fail-401, fail-404, rate-limit, rate-limit-ms, rate-limit-date, flaky, flaky-<n>,
/// context-too-long; any other name answers 200. A `[[mock:<name>]]` marker in the last user
/// message overrides the model.
#[derive(Debug, Parser)]
#[command(name = "llmq-mock", version)]
struct Args {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, env = "LLMQ_MOCK_LISTEN", default_value = "127.0.0.1:8089")]
    listen: String,

    /// Delay added to every successful response, e.g. 20ms or 1s.
    #[arg(long, env = "LLMQ_MOCK_LATENCY", default_value = "0s", value_parser = humantime::parse_duration)]
    latency: Duration,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let listener = match TcpListener::bind(args.listen.as_str()).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "llmq-mock: cannot listen on {}: {}",
                args.listen,
                bind_problem(&e)
            );
            return ExitCode::from(2);
        }
    };
    match run(listener, args.latency).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("llmq-mock: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(listener: TcpListener, latency: Duration) -> anyhow::Result<()> {
    let addr = listener
        .local_addr()
        .context("cannot read the listening address")?;
    let shutdown = CancellationToken::new();
    // Both handlers are installed before the "listening" line, so a script that signals
    // right after reading it is never ignored (ctrl_c() would install its handler lazily).
    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install the ctrl-c handler")?;
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        stop.cancel();
    });
    {
        let mut out = io::stdout().lock();
        writeln!(out, "llmq-mock listening on http://{addr}").context("cannot write to stdout")?;
        out.flush().context("cannot write to stdout")?;
    }
    serve(
        listener,
        MockOptions {
            latency,
            ..MockOptions::default()
        },
        shutdown,
    )
    .await
    .context("the server failed")?;
    Ok(())
}

/// A bind error as a sentence with a fix.
fn bind_problem(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::AddrInUse => {
            "address already in use; pass --listen with a free port".to_owned()
        }
        io::ErrorKind::PermissionDenied => {
            "permission denied; pass --listen with a port above 1023".to_owned()
        }
        io::ErrorKind::AddrNotAvailable => {
            "that address does not belong to this machine; pass --listen 127.0.0.1:PORT".to_owned()
        }
        io::ErrorKind::InvalidInput => {
            "not a valid address; pass --listen HOST:PORT, e.g. 127.0.0.1:8089".to_owned()
        }
        _ => format!("{e}; pass --listen HOST:PORT with a free port"),
    }
}
