//! A `review` step: a model judges another step's output and answers a verdict,
//! `{"verdict": "approve"|"reject", "findings": [...]}`; a rejection may send the work back
//! (`on_reject`).

use llmq_shared::outcome::ErrorClass;
use llmq_shared::provider::Completion;

use super::kind::{Context, StepKind};
use super::{Prepared, Reading, distinct_from, escalation, failure, rework};
use crate::executor::attempt::{Outcome, Rejection};

pub(super) struct Review;

impl StepKind for Review {
    fn appended(&self, cx: &Context<'_>) -> usize {
        cx.step
            .reviews
            .as_deref()
            .and_then(|r| cx.outputs.get(r))
            .map_or(0, |o| o.len().saturating_add(400))
    }

    fn prepare(&self, cx: Context<'_>, prompt: String) -> Prepared {
        let reviewed = cx.step.reviews.clone().unwrap_or_default();
        let Some(work) = cx.outputs.get(reviewed.as_str()) else {
            return Prepared::Fatal(format!(
                "handoff unresolved: the output of `{reviewed}`, the step this one reviews, has no value"
            ));
        };
        let prompt = format!(
            "{prompt}\n\n## Work to review (step `{reviewed}`)\n\n{work}\n\nAnswer with JSON only: {{\"verdict\": \"approve\" or \"reject\", \"findings\": [\"...\"]}}."
        );
        let constraints = distinct_from(&cx.step.distinct, cx.states.get(&reviewed));
        let rework = cx.full.and_then(|f| rework(f, cx.step, cx.config));
        let judged = cx.states.get(&reviewed).and_then(|s| s.task_id);
        Prepared::Call {
            prompt,
            constraints,
            read: Reading::Verdict { reviewed, judged },
            rework,
            escalation: cx.full.and_then(|f| escalation(f, cx.step)),
        }
    }
}

/// The review's answer: an approval is the step's output (the verdict), a rejection a
/// verdict with its findings; no verdict fails the attempt.
pub(super) fn read(reviewed: &str, answer: Completion) -> Outcome {
    let Some(v) = verdict(&answer.text) else {
        return Outcome::Failed(failure(
            ErrorClass::Retryable,
            format!(
                "the review's answer is not a verdict ({{\"verdict\": \"approve\"|\"reject\"}}): {}",
                llmq_shared::provider::excerpt(&answer.text, 200)
            ),
        ));
    };
    let findings = v
        .get("findings")
        .and_then(|f| f.as_array())
        .map(|f| {
            f.iter()
                .filter_map(|x| x.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default();
    match v.get("verdict").and_then(|x| x.as_str()) {
        Some("approve") => Outcome::Answered(Completion {
            text: v.to_string(),
            ..answer
        }),
        _ => Outcome::Rejected(Rejection(format!(
            "the review rejected step `{reviewed}`: {findings}"
        ))),
    }
}

/// The first JSON object in `answer` with a `verdict` of approve or reject.
fn verdict(answer: &str) -> Option<serde_json::Value> {
    let start = answer.find('{')?;
    let end = answer.rfind('}')?;
    let v: serde_json::Value = serde_json::from_str(answer.get(start..=end)?).ok()?;
    matches!(
        v.get("verdict").and_then(|x| x.as_str()),
        Some("approve" | "reject")
    )
    .then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::attempt::AttemptError;
    use crate::executor::chain::tests::{answer, output};

    #[test]
    fn a_review_reads_its_verdict() {
        let ok = output(read(
            "impl",
            answer(r#"Sure: {"verdict": "approve", "findings": []}"#),
        ));
        assert!(ok.contains("approve"));
        let rejected = read(
            "impl",
            answer(r#"{"verdict":"reject","findings":["no tests","typo"]}"#),
        );
        assert!(
            matches!(&rejected, Outcome::Rejected(r) if r.0 == "the review rejected step `impl`: no tests; typo"),
            "a rejection is a verdict, not a failed call: {rejected:?}"
        );
        assert!(matches!(
            read("impl", answer("looks fine")),
            Outcome::Failed(AttemptError {
                class: ErrorClass::Retryable,
                ..
            })
        ));
    }
}
