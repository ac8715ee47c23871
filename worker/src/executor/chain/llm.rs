//! An `llm` step: its prompt, with its handoffs filled in, to a model; the answer is its
//! output.

use llmq_shared::routing::Constraints;

use super::kind::{Context, StepKind};
use super::{Prepared, Reading};

pub(super) struct Llm;

impl StepKind for Llm {
    fn reads_outputs(&self) -> bool {
        false
    }

    fn prepare(&self, _cx: Context<'_>, prompt: String) -> Prepared {
        Prepared::call(prompt, Constraints::default(), Reading::Plain)
    }
}
