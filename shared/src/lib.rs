//! llmq's shared core: the Redis contract every producer and worker speaks, the task
//! envelope, providers, the provider file and the Postgres ledger.
//!
//! Layout (imports run one way: envelope <- config <- provider <- routing <- queue users,
//! and config <- idempotency <- chain; `make lint` fails on a cycle, tests/tests/layout.rs):
//! - `envelope`: the task as producers write it (`conversation`: its turns, tools and answer
//!   format); `outcome`: its record, error classes, usage;
//! - `config`: the provider file, validated (providers, routing, scheduler, `${ENV}`);
//! - `provider`: one adapter per wire format, the shared HTTP exchange, clients and probes;
//! - `routing`: `plan(config, task, constraints, stats)`, pure;
//! - `ids`: a task's `TaskId` and its stream entry's `EntryId`, parsed once where they enter;
//! - `keys`: every Redis key name; `queue`: every operation on a queue, one file each;
//! - `answer_cache`: which tasks the answer cache answers, and what makes requests identical;
//!   `idempotency`: which tasks are copies of one another (`idempotency_key`);
//! - `quota`: shared quotas and rate limits; `circuit`: shared circuit breakers;
//! - `retry`: the one backoff policy; `ledger`, `archive`: Postgres; `insights`: what the
//!   ledger says of each model (`llmq insights`);
//! - `text`: untrusted text made storable (Postgres) and printable (terminals); `tokens`: a
//!   prompt's tokens before the call (a model's tokenizer, else the one estimate);
//! - `tls`: the one rustls crypto provider every connection uses;
//! - `health`, `telemetry`, `shutdown`, `process`: what every binary needs.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use llmq_shared::{envelope::Envelope, keys::QueueKeys, queue::Client};
//!
//! let redis = Client::new("redis://127.0.0.1:6379")?;
//! let keys = QueueKeys::new("default");
//! redis.ensure_group(&keys).await?;
//! redis.enqueue(&keys, &Envelope::new("Summarise the attached log")).await?;
//! # Ok(()) }
//! ```

pub mod answer_cache;
pub mod archive;
pub mod chain;
pub mod circuit;
pub mod config;
pub mod conversation;
pub mod envelope;
pub mod health;
pub mod history;
pub mod idempotency;
pub mod ids;
pub mod insights;
pub mod keys;
pub mod ledger;
pub mod outcome;
pub mod process;
pub mod provider;
pub mod queue;
pub mod quota;
pub mod retry;
pub mod routing;
pub mod series;
pub mod shutdown;
pub mod telemetry;
pub mod text;
pub mod tls;
pub mod tokens;
