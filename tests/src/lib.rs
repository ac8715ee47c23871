//! End-to-end support for llmq: `llmq-mock`, the mock LLM server, and helpers the suites share.

pub mod harness;
pub mod mock;
