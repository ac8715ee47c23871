//! A merge: an `llm` step after several parents whose prompt names none of them; their
//! outputs follow its prompt.

use std::fmt::Write as _;

use llmq_shared::routing::Constraints;

use super::kind::{Context, StepKind};
use super::{Prepared, Reading};

pub(super) struct Merge;

impl StepKind for Merge {
    fn appended(&self, cx: &Context<'_>) -> usize {
        cx.parents_out()
    }

    fn prepare(&self, cx: Context<'_>, mut prompt: String) -> Prepared {
        prompt.push_str("\n\n## Inputs\n");
        for (name, out) in &cx.candidates {
            let _ = write!(prompt, "\n### {name}\n{out}\n");
        }
        Prepared::call(prompt, Constraints::default(), Reading::Plain)
    }
}
