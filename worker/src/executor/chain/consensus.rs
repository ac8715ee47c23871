//! A `consensus` step: no call; the majority of its parents' normalised outputs is its
//! output, and a tie fails it.

use super::Prepared;
use super::kind::{Context, StepKind};

pub(super) struct Consensus;

impl StepKind for Consensus {
    fn prepare(&self, cx: Context<'_>, _prompt: String) -> Prepared {
        consensus(&cx.candidates)
    }
}

/// The majority of the candidates' normalised outputs; a tie fails.
fn consensus(candidates: &[(&str, String)]) -> Prepared {
    let norm = |s: &str| {
        s.split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase()
    };
    let mut counts: Vec<(String, usize, &str)> = Vec::new();
    for (_, out) in candidates {
        let key = norm(out);
        match counts.iter_mut().find(|(k, _, _)| *k == key) {
            Some(c) => c.1 += 1,
            None => counts.push((key, 1, out)),
        }
    }
    counts.sort_by_key(|c| std::cmp::Reverse(c.1));
    match counts.as_slice() {
        [] => Prepared::Fatal("consensus has no output to count".into()),
        [(_, n, _), (_, m, _), ..] if n == m => Prepared::Fatal(format!(
            "no consensus: {} outputs, the most common ones tie with {n} each",
            candidates.len()
        )),
        [(_, _, out), ..] => Prepared::Output((*out).to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consensus_takes_the_majority_and_fails_on_a_tie() {
        let c = [
            ("a", "Yes.".to_owned()),
            ("b", " yes. ".to_owned()),
            ("c", "No".to_owned()),
        ];
        assert!(matches!(consensus(&c), Prepared::Output(o) if o == "Yes."));
        let tie = [("a", "Yes".to_owned()), ("b", "No".to_owned())];
        assert!(matches!(consensus(&tie), Prepared::Fatal(m) if m.contains("tie")));
    }
}
