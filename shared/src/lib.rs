//! llmq's shared core: the Redis contract every producer and worker speaks, the task
//! envelope, providers, the provider file and the Postgres ledger.
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

pub mod archive;
pub mod circuit;
pub mod config;
pub mod envelope;
pub mod health;
pub mod keys;
pub mod ledger;
pub mod outcome;
pub mod process;
pub mod provider;
pub mod queue;
pub mod quota;
pub mod retry;
pub mod routing;
pub mod shutdown;
pub mod telemetry;
