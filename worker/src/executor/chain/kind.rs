//! The kinds of chain step, told apart in one place ([`of`]): what each adds after its
//! prompt, and how it runs. Each kind lives in a module of its own.

use std::collections::HashMap;

use llmq_shared::chain::{self, ChainState, Kind, StepState};
use llmq_shared::config::Config;
use llmq_shared::envelope::Envelope;

use super::{Prepared, approval, check, consensus, judge, llm, merge, review};

/// What a step's kind reads to decide how it runs.
pub(super) struct Context<'a> {
    pub step: &'a chain::Step,
    pub env: &'a Envelope,
    pub config: &'a Config,
    /// The states of the steps it reads: its own, its parents', those its prompt names.
    pub states: &'a HashMap<String, StepState>,
    /// The outputs of the steps it reads that succeeded, where it needs them.
    pub outputs: &'a HashMap<&'a str, String>,
    /// Its parents that succeeded, with their outputs, in `after` order.
    pub candidates: Vec<(&'a str, String)>,
    /// The whole chain, for a step that may send work back or escalate.
    pub full: Option<&'a ChainState>,
}

impl Context<'_> {
    /// What its parents' outputs take after the prompt, with their framing (a heading, a
    /// name or a number each, an instruction; counted a little high).
    pub fn parents_out(&self) -> usize {
        self.step.after.iter().fold(160usize, |n, p| {
            let out = self.outputs.get(p.as_str()).map_or(0, String::len);
            n.saturating_add(out).saturating_add(p.len() + 16)
        })
    }
}

/// A kind of step.
pub(super) trait StepKind: Sync {
    /// Whether it reads its parents' outputs whatever its prompt names.
    fn reads_outputs(&self) -> bool {
        true
    }

    /// The bytes it appends after its prompt, counted before anything is filled in, so
    /// outputs cannot make a prompt of any size.
    fn appended(&self, _cx: &Context<'_>) -> usize {
        0
    }

    /// How it runs, with `prompt` its filled-in prompt.
    fn prepare(&self, cx: Context<'_>, prompt: String) -> Prepared;
}

/// The kind of `step`: the one place kinds are told apart.
pub(super) fn of(step: &chain::Step) -> &'static dyn StepKind {
    match step.kind {
        // After several parents, a prompt naming none of them merges their outputs.
        Kind::Llm if step.after.len() > 1 && chain::references(&step.prompt).is_empty() => {
            &merge::Merge
        }
        Kind::Llm => &llm::Llm,
        Kind::Judge => &judge::Judge,
        Kind::Consensus => &consensus::Consensus,
        Kind::Review => &review::Review,
        Kind::Check => &check::Check,
        Kind::Approval => &approval::Approval,
    }
}
