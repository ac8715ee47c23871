//! The llmq scheduler (being written).
