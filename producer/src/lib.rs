//! The `llmq` command line as a library, so tests can run every command in-process.
//!
//! Layout: `cli` (the clap tree), `submit` (submit, batch, waiting), `estimate` (what a
//! batch would cost and which quotas it would push, before it is enqueued), `chain` (chain
//! submit, show, list, cancel, retry, approve, reject), `inspect` (result, status), `dlq`,
//! `providers` (check, list, quota), `costs` (costs, migrate), `insights`, `render` (text
//! output), `web` (the operators' page), `serve` (OpenAI's and Anthropic's APIs in front of
//! the queue, and the keys they take).
//!
//! ```no_run
//! # async fn demo() {
//! use clap::Parser;
//! let cli = llmq::cli::Cli::parse_from(["llmq", "submit", "--prompt", "Hello", "--wait"]);
//! let exit_code = llmq::run(cli, &mut std::io::stdout()).await;
//! # }
//! ```

use std::io::Write;

mod batch_file;
mod batch_input;
mod cancel;
mod chain;
pub mod cli;
mod costs;
mod dlq;
mod estimate;
mod insights;
mod inspect;
mod providers;
mod render;
pub mod serve;
mod submit;
pub mod web;
mod workers;

pub use submit::{BatchReport, wait_for};

/// Exit code: the task(s) succeeded, or the command did what it was asked.
pub const EXIT_OK: u8 = 0;
/// Exit code: a task failed (or did not finish within --wait-timeout).
pub const EXIT_FAILED: u8 = 1;
/// Exit code: bad arguments, configuration, or a service that cannot be reached.
pub const EXIT_USAGE: u8 = 2;

/// A problem that stops a command; printed as `llmq: <sentence>` with exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Redis(#[from] llmq_shared::queue::Error),
    #[error(transparent)]
    Ledger(#[from] llmq_shared::ledger::Error),
    #[error(transparent)]
    Config(#[from] llmq_shared::config::Error),
    #[error(transparent)]
    Archive(#[from] llmq_shared::archive::Error),
    #[error("{0}")]
    Usage(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Runs one command, writing its report to `out`; returns the exit code.
pub async fn run(cli: cli::Cli, out: &mut dyn Write) -> u8 {
    match dispatch(cli, out).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("llmq: {e}");
            EXIT_USAGE
        }
    }
}

async fn dispatch(cli: cli::Cli, out: &mut dyn Write) -> Result<u8> {
    use cli::Command;
    let redis = || llmq_shared::queue::Client::new(&cli.redis_url);
    match cli.command {
        Command::Submit(args) => submit::submit(&redis()?, args, out).await,
        Command::Batch(args) => submit::batch(&redis()?, args, out).await,
        Command::Result(args) => inspect::result(&redis()?, args, out).await,
        Command::Cancel(args) => cancel::run(&redis()?, args, out).await,
        Command::Status(args) => inspect::status(&redis()?, args, out).await,
        Command::Dlq(args) => dlq::run(&redis()?, args.command, out).await,
        Command::Migrate(args) => costs::migrate(args, out).await,
        Command::Costs(args) => costs::costs(args, out).await,
        Command::Insights(args) => insights::run(args, out).await,
        Command::Quota(args) => providers::quota(&redis()?, args, out).await,
        Command::Providers(args) => providers::run(args.command, out),
        Command::Chain(args) => chain::run(&redis()?, args.command, out).await,
        Command::Queue(args) => inspect::queue(&redis()?, args.command, out).await,
        Command::Worker(args) => workers::run(&redis()?, args.command, out).await,
        Command::Serve(args) => {
            if args.health_check {
                return web::probe("llmq serve", args.listen).await;
            }
            let config = args
                .config
                .as_deref()
                .map(llmq_shared::config::Config::load_without_secrets)
                .transpose()?;
            let keys = args
                .keys
                .as_deref()
                .map(serve::keys::KeyFile::open)
                .transpose()
                .map_err(Error::Usage)?;
            let database = match args.database_url.as_deref() {
                Some(url) => Some(ledger(Some(url), "llmq serve").await?.pool().clone()),
                None => None,
            };
            let state = serve::ServeState {
                redis: redis()?,
                queue: args.queue,
                keys,
                config,
                wait: args.wait,
                database,
                batch_lease: args.batch_lease,
            };
            serve::run(state, args.listen).await
        }
        Command::Keys(args) => match args.command {
            cli::KeysCommand::Create {
                file,
                tenant,
                models,
                highest_priority,
                requests_per_minute,
                tags,
            } => {
                let grant = serve::keys::Grant {
                    tenant,
                    models,
                    highest_priority,
                    requests_per_minute,
                    tags: tags.into_iter().collect(),
                };
                serve::keys::create(&file, grant, out)
            }
            cli::KeysCommand::List { file } => serve::keys::list(&file, out),
            cli::KeysCommand::Revoke { file, id } => serve::keys::revoke(&file, &id, out),
        },
        Command::Web(args) => {
            if args.health_check {
                return web::health_check(args.listen).await;
            }
            let config = args
                .config
                .as_deref()
                .map(llmq_shared::config::Config::load_without_secrets)
                .transpose()?;
            let ledger = match args.database_url.as_deref() {
                Some(url) => Some(llmq_shared::ledger::Ledger::connect(url, 2).await?),
                None => None,
            };
            let state = web::WebState {
                scheduler_namespace: args.scheduler_namespace,
                token: args.token,
                config,
                ledger,
                ..web::WebState::new(redis()?)
            };
            web::run(state, args.listen).await
        }
    }
}

/// Writes `text` to `out`, ignoring a closed pipe (`llmq ... | head`).
/// Writes `text` with its control characters shown, not obeyed: task text, model output and
/// errors may carry escape sequences meant for the operator's terminal.
fn emit(out: &mut dyn Write, text: &str) {
    let text = llmq_shared::text::printable(text);
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// The ledger, for commands that need Postgres only for some of their options.
async fn ledger(url: Option<&str>, why: &str) -> Result<llmq_shared::ledger::Ledger> {
    let url = url.ok_or_else(|| {
        Error::Usage(format!(
            "{why} needs Postgres; set DATABASE_URL or pass --database-url"
        ))
    })?;
    Ok(llmq_shared::ledger::Ledger::connect(url, 2).await?)
}

fn write_file(path: &std::path::Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|source| Error::Write {
        path: path.display().to_string(),
        source,
    })
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    let mut s = serde_json::to_string_pretty(value).unwrap_or_default();
    s.push('\n');
    s
}
