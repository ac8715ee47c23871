//! The end-to-end suites, one module each, in one test binary (one link instead of nine).
//! They talk to the real Redis and Postgres on this machine (`REDIS_URL`, `DATABASE_URL`)
//! and to llmq-mock over HTTP; every test uses its own queue, provider names and scheduler
//! namespace, so they run in parallel.

mod answer_cache;
mod batch;
mod browser;
mod cancel;
mod chain;
mod chain_property;
mod client_node;
mod client_python;
mod cluster;
mod command;
mod costs;
mod crash;
mod examples;
mod flow;
mod hostile;
mod idempotency;
mod learning;
mod ledger_partitions;
mod ledger_rollups;
mod metrics;
mod outage;
mod pause;
mod priority;
mod prompt_cache;
mod provider_batch;
mod providers;
mod quota;
mod requests;
mod routing;
mod scheduler;
mod serve;
mod tasks;
mod tenants;
mod tls;
mod traces;
mod web;
