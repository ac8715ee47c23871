//! A `judge` step: a model picks the best of its parents' outputs by number; the chosen
//! output is the step's.

use std::fmt::Write as _;

use llmq_shared::outcome::ErrorClass;
use llmq_shared::provider::Completion;

use super::kind::{Context, StepKind};
use super::{Prepared, Reading, distinct_from, failure};
use crate::executor::attempt::Outcome;

pub(super) struct Judge;

impl StepKind for Judge {
    fn appended(&self, cx: &Context<'_>) -> usize {
        cx.parents_out()
    }

    fn prepare(&self, cx: Context<'_>, mut prompt: String) -> Prepared {
        prompt.push_str("\n\n## Candidates\n");
        for (i, (_, out)) in cx.candidates.iter().enumerate() {
            let _ = write!(prompt, "\n[{}]\n{out}\n", i + 1);
        }
        let _ = write!(
            prompt,
            "\nAnswer with the number of the best candidate (1 to {}) first.",
            cx.candidates.len()
        );
        let constraints = distinct_from(
            &cx.step.distinct,
            cx.candidates.iter().filter_map(|(n, _)| cx.states.get(*n)),
        );
        let texts = cx.candidates.into_iter().map(|(_, o)| o).collect();
        Prepared::call(prompt, constraints, Reading::Pick(texts))
    }
}

/// The judge's answer: the candidate it names (the first number in it, 1-based) is the
/// output; naming none fails the attempt.
pub(super) fn read(candidates: &[String], answer: Completion) -> Outcome {
    let n = answer
        .text
        .split(|c: char| !c.is_ascii_digit())
        .find(|s| !s.is_empty())
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|n| (1..=candidates.len()).contains(n));
    match n {
        Some(n) => Outcome::Answered(Completion {
            text: candidates[n - 1].clone(),
            ..answer
        }),
        None => Outcome::Failed(failure(
            ErrorClass::Retryable,
            format!(
                "the judge's answer names no candidate between 1 and {}: {}",
                candidates.len(),
                llmq_shared::provider::excerpt(&answer.text, 200)
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::chain::tests::{answer, output};

    #[test]
    fn a_judge_picks_by_number() {
        let pick = ["A".to_owned(), "B".to_owned()];
        assert_eq!(output(read(&pick, answer("2. B is better"))), "B");
        assert_eq!(output(read(&pick, answer("Candidate [1]"))), "A");
        assert!(matches!(read(&pick, answer("3")), Outcome::Failed(_)));
        assert!(matches!(read(&pick, answer("neither")), Outcome::Failed(_)));
    }
}
