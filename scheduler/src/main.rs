//! `llmq-scheduler` (being written).

fn main() {}
