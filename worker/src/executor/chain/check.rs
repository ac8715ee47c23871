//! A `check` step: a quality gate that runs a command the operator named in the
//! provider file (never one from the task), without a shell, with its parent's output on
//! stdin and an environment of `PATH`, `HOME` and its entry's `env:` only. Exit 0 passes
//! and its output is the step's; anything else fails the step with what the command printed.
//!
//! It makes no call: its command runs on its parent's output, and a failure may send the
//! work back (`on_reject`), as a review's rejection does.

use std::process::Stdio;

use llmq_shared::config::CheckConfig;
use llmq_shared::outcome::ErrorClass;
use llmq_shared::provider::{Completion, Usage, excerpt};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::kind::{Context, StepKind};
use super::{Prepared, rework};
use crate::executor::attempt::{AttemptError, Outcome, Rejection};

pub(super) struct Check;

impl StepKind for Check {
    fn prepare(&self, cx: Context<'_>, _prompt: String) -> Prepared {
        let Some((parent, input)) = cx.candidates.into_iter().next() else {
            return Prepared::Fatal(
                "handoff unresolved: the output of the step this check checks has no value".into(),
            );
        };
        Prepared::Check {
            command: cx.step.command.clone().unwrap_or_default(),
            input,
            rework: cx.full.and_then(|f| rework(f, cx.step, cx.config)),
            judged: cx.states.get(parent).and_then(|s| s.task_id),
        }
    }
}

/// Runs check `name` on `input`.
pub(super) async fn run(name: &str, check: &CheckConfig, input: &str) -> Outcome {
    let fail = |message: String| {
        Outcome::Failed(AttemptError {
            class: ErrorClass::Fatal,
            message,
            tried: Vec::new(),
            retry_after: None,
        })
    };
    let program = &check.program;
    let mut command = Command::new(program);
    check.env.apply(&mut command);
    let mut child = match command
        .args(&check.args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return fail(format!("check `{name}` cannot run `{program}`: {e}")),
    };
    if let Some(mut stdin) = child.stdin.take() {
        let text = input.to_owned();
        // Write while the command reads; a command that stops reading early is its business.
        tokio::spawn(async move {
            let _ = stdin.write_all(text.as_bytes()).await;
        });
    }
    let output = match tokio::time::timeout(check.timeout, child.wait_with_output()).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => return fail(format!("check `{name}` failed to run `{program}`: {e}")),
        Err(_) => {
            return fail(format!(
                "check `{name}` ran longer than {} and was stopped",
                humantime::format_duration(check.timeout)
            ));
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        let text = if stdout.trim().is_empty() {
            format!("check `{name}` passed")
        } else {
            stdout
        };
        return Outcome::Answered(Completion {
            text,
            usage: Usage::default(),
            ..Completion::default()
        });
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let said = [stdout.trim(), stderr.trim()]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join("\n");
    let code = output
        .status
        .code()
        .map_or_else(|| "a signal".to_owned(), |c| format!("exit {c}"));
    // A verdict on the work, which may send it back; a check that cannot run or runs too
    // long is not one.
    Outcome::Rejected(Rejection(format!(
        "the check rejected the work: check `{name}` failed ({code}): {}",
        excerpt(&said, 1000)
    )))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn check(program: &str, args: &[&str]) -> CheckConfig {
        CheckConfig {
            program: program.into(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            env: llmq_shared::process::ChildEnv::default(),
            timeout: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn exit_0_passes_with_its_output_and_anything_else_fails_with_it() {
        match run("wc", &check("wc", &["-c"]), "hello").await {
            Outcome::Answered(c) => assert_eq!(c.text.trim(), "5"),
            other => panic!("{other:?}"),
        }
        match run("grep", &check("grep", &["-q", "TODO"]), "no todos here").await {
            Outcome::Rejected(r) => {
                assert!(
                    r.0.starts_with("the check rejected the work: check `grep` failed (exit 1)"),
                    "{r}"
                );
            }
            other => panic!("{other:?}"),
        }
        match run("gone", &check("llmq-no-such-check", &[]), "x").await {
            Outcome::Failed(e) => assert!(e.message.contains("cannot run `llmq-no-such-check`")),
            other => panic!("{other:?}"),
        }
        let mut slow = check("sleep", &["5"]);
        slow.timeout = Duration::from_millis(100);
        match run("slow", &slow, "").await {
            Outcome::Failed(e) => assert!(e.message.contains("ran longer than 100ms")),
            other => panic!("{other:?}"),
        }
    }
}
