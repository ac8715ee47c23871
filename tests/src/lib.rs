//! End-to-end support for llmq: `llmq-mock`, the mock LLM server, and helpers the suites share.
//!
//! Layout: `mock` (the server, one module per wire format), `harness` (a test's own queue,
//! database and mock, in-process workers and worker processes). The suites are modules of
//! one test binary, `tests/e2e/`.

pub mod cluster;
pub mod harness;
pub mod mock;
