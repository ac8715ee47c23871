//! What happens to a task: a pure function of the task, what its attempt came to (or why it
//! stopped before one), what its chain step may do instead of ending, and the retry policy,
//! so every rule here has a unit test without Redis. It is the only place a task's fate is
//! chosen: done, retry, wait, escalate, rework, dead, release, cancel, or a stop before the
//! call (parked, sent to a batch, answered as a copy, awaiting a person); nothing after it
//! looks at the outcome again, and each [`Transition`] carries what its write needs.

use std::time::Duration;

use chrono::{DateTime, Utc};
use llmq_shared::outcome::ErrorClass;
use llmq_shared::retry::RetryPolicy;

use llmq_shared::chain::Rerun;
use llmq_shared::envelope::Tier;
use llmq_shared::provider::Completion;
use llmq_shared::queue::BatchPark;

use super::attempt::{AttemptError, Outcome, Unavailable};
use super::chain::Rework;
use crate::finished::Finished;

/// The retry policy of one worker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Waits between attempts (`--retry-base` doubling up to `--retry-max`).
    pub retry: RetryPolicy,
    /// How long a task may wait for a provider to become callable (`routing.max_wait`).
    pub max_wait: Duration,
}

/// What the task carries into the decision.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskState {
    /// Attempts used before this one.
    pub attempts: u32,
    pub max_attempts: u32,
    /// Since when it has been waiting for a provider, if it has.
    pub waiting_since: Option<DateTime<Utc>>,
    /// Why a cancel that names the task stopped its attempt, if one did.
    pub cancelled: Option<String>,
}

/// Why a task stopped before its attempt: what a phase of the executor found.
#[derive(Debug, Clone, PartialEq)]
pub enum Stop {
    /// Parked in Redis (for a slot of its concurrency key, an identical request's call, a
    /// warm-up, the task holding its idempotency key): nothing to write.
    Parked,
    /// Redis failed, or the worker is at fault: not the task's doing.
    HandedBack,
    /// A copy of a task holding its idempotency key, answered with that task's answer: the
    /// write is made.
    Duplicate(Box<Finished>),
    /// Its chain or a cancel mark ended it, with why.
    Cancelled(String),
    /// It claims a chain step it is not the current task of, with why.
    NotItsStep(String),
    /// An approval step: a person decides by this deadline (ms since the epoch).
    Awaiting(i64),
    /// It can wait: its request goes to a provider batch.
    Batched(Box<BatchPark>),
}

/// What a chain step may do instead of ending, known before the decision. Each rerun in it
/// carries the round it leads to, within `chains.max_rounds` (or it would not exist: see
/// `ChainState::reruns`).
#[derive(Default)]
pub struct StepRounds {
    /// A review's or check's rejection sends this work back, while its rounds last.
    pub rework: Option<Rework>,
    /// The step escalates: its next round one tier up, or why it cannot have one.
    pub escalation: Option<Result<Escalation, String>>,
}

/// A wait for a provider: until `due`, without using an attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Wait {
    pub due: DateTime<Utc>,
    /// Since when the task has been waiting.
    pub since: DateTime<Utc>,
    pub reason: String,
    pub class: ErrorClass,
    /// Only a provider's pace held it.
    pub paced: bool,
    /// Its tenant is at its limits: it waits in the room, its tenant held there.
    pub hold: bool,
}

/// A step's next round, one tier up.
#[derive(Debug, Clone, PartialEq)]
pub struct Escalation {
    pub tier: Tier,
    pub reruns: Vec<Rerun>,
}

/// The Redis transition for the task.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    /// It answered: store the result.
    Done(Completion),
    /// The worker is stopping, or at fault: give the task back untouched.
    Release,
    /// No provider can be called now: wait without using an attempt.
    Wait(Wait),
    /// The attempt failed with `error` and is used up; try again at `due`.
    Retry {
        due: DateTime<Utc>,
        error: String,
        class: ErrorClass,
    },
    /// Nothing more will be tried.
    Dead { error: String, class: ErrorClass },
    /// A chain step failed for good with `error` and runs again at `tier`: this round ends
    /// failed, `reruns` (the step in its next round) run.
    Escalate {
        error: String,
        class: ErrorClass,
        tier: Tier,
        reruns: Vec<Rerun>,
    },
    /// A review or a check rejected the work with rounds left: its verdict (`findings`) is
    /// this task's result, and `reruns` (the work, with the findings, up to the judging
    /// step) run again.
    Rework {
        findings: String,
        reruns: Vec<Rerun>,
    },
    /// Parked in Redis until what it waits for frees: nothing to write.
    Park,
    /// Cancelled: it ends so, with what its calls cost, and ends its chain step.
    Cancel { why: String },
    /// Not its chain step's current task: a dead letter under the id of its own entry, which
    /// leaves the step (and the result of its real task) alone.
    Refuse { error: String },
    /// An approval step: acknowledged, its step awaiting a person until `deadline_ms`.
    Await { deadline_ms: i64 },
    /// Parked for a provider batch.
    Batch(Box<BatchPark>),
    /// A copy of a task holding its idempotency key: its write, as made.
    Duplicate(Box<Finished>),
}

impl Transition {
    fn dead(error: String, class: ErrorClass) -> Self {
        Self::Dead { error, class }
    }
}

/// Decides what becomes of a task that stopped before its attempt.
#[must_use]
pub fn stopped(stop: Stop) -> Transition {
    match stop {
        Stop::Parked => Transition::Park,
        Stop::HandedBack => Transition::Release,
        Stop::Duplicate(finished) => Transition::Duplicate(finished),
        Stop::Cancelled(why) => Transition::Cancel { why },
        Stop::NotItsStep(error) => Transition::Refuse { error },
        Stop::Awaiting(deadline_ms) => Transition::Await { deadline_ms },
        Stop::Batched(park) => Transition::Batch(park),
    }
}

/// Decides what becomes of a task after an attempt that came to `outcome`; a chain step may
/// instead run again as `rounds` allows.
#[must_use]
pub fn decide(
    task: TaskState,
    outcome: Outcome,
    rounds: StepRounds,
    policy: &Policy,
    now: DateTime<Utc>,
) -> Transition {
    let ended = match outcome {
        Outcome::Answered(completion) => return Transition::Done(completion),
        // A cancel stopped it: it ends so; the hard stop hands it back.
        Outcome::Released => {
            return match task.cancelled {
                Some(why) => Transition::Cancel { why },
                None => Transition::Release,
            };
        }
        Outcome::Unavailable(u) => wait(&task, &u, policy, now),
        // A tenant at its limits: a known wait for a known reset, in the room. Failing at
        // its budget ends the task as it is: a cheaper tier is the opposite of escalating.
        Outcome::Held { refusal, fail } => {
            if fail {
                return Transition::dead(
                    format!("{} (on_budget: fail)", refusal.describe()),
                    ErrorClass::QuotaExhausted,
                );
            }
            return Transition::Wait(Wait {
                due: refusal.until.max(now + chrono::Duration::milliseconds(100)),
                since: task.waiting_since.unwrap_or(now),
                reason: refusal.describe(),
                class: ErrorClass::QuotaExhausted,
                paced: false,
                hold: true,
            });
        }
        Outcome::Failed(e) => failed(&task, &e, policy, now),
        Outcome::Rejected(r) => match rounds.rework {
            Some(rework) => {
                let reruns = rework.with_findings(&r.0);
                return Transition::Rework {
                    findings: r.0,
                    reruns,
                };
            }
            // No rounds left: the verdict stands, and ends the step.
            None => Transition::dead(r.0, ErrorClass::Fatal),
        },
    };
    // A step that escalates and ended for good runs again one tier up, while it can. An
    // invalid task is not the step's to run again.
    match (ended, rounds.escalation) {
        (Transition::Dead { error, class }, Some(up)) if class != ErrorClass::Invalid => match up {
            Ok(up) => Transition::Escalate {
                error,
                class,
                tier: up.tier,
                reruns: up.reruns,
            },
            Err(why) => Transition::dead(format!("{error}; cannot escalate: {why}"), class),
        },
        (ended, _) => ended,
    }
}

fn wait(task: &TaskState, u: &Unavailable, policy: &Policy, now: DateTime<Utc>) -> Transition {
    let since = task.waiting_since.unwrap_or(now);
    // A configured quota or rate limit is a known wait for a known reset, not an outage:
    // it is not bounded by max_wait.
    let bounded = u.class != ErrorClass::QuotaExhausted;
    let waited = (now - since).to_std().unwrap_or_default();
    // Never spin: look again no sooner than a moment from now.
    let due = u.until.max(now + chrono::Duration::milliseconds(100));
    let bound = since + chrono::Duration::from_std(policy.max_wait).unwrap_or_default();
    // Past the bound, or nothing can be called before it: the wait ends now, without a call
    // the provider asked us not to make.
    if bounded && (waited >= policy.max_wait || due > bound) {
        return Transition::dead(
            format!(
                "waited {} for a provider, since {}, and none could be called within {} (routing.max_wait); {}",
                humantime::format_duration(round_secs(waited)),
                since.format("%Y-%m-%d %H:%M:%S UTC"),
                humantime::format_duration(policy.max_wait),
                u.reason()
            ),
            ErrorClass::Unavailable,
        );
    }
    Transition::Wait(Wait {
        due,
        since,
        reason: u.reason(),
        class: u.class,
        paced: u.paced,
        hold: false,
    })
}

fn failed(task: &TaskState, e: &AttemptError, policy: &Policy, now: DateTime<Utc>) -> Transition {
    let attempt = task.attempts + 1;
    if e.class.is_retryable() && attempt < task.max_attempts {
        let wait = policy.retry.delay(attempt, e.retry_after);
        return Transition::Retry {
            due: now + chrono::Duration::from_std(wait).unwrap_or_default(),
            error: e.to_string(),
            class: e.class,
        };
    }
    let error = if e.class.is_retryable() {
        e.gave_up(attempt)
    } else {
        e.to_string()
    };
    Transition::dead(error, e.class)
}

fn round_secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        retry: RetryPolicy::new(Duration::from_secs(1), Duration::from_secs(60)),
        max_wait: Duration::from_secs(3600),
    };

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_767_225_600 + secs, 0).unwrap()
    }

    fn task(attempts: u32, waiting_since: Option<DateTime<Utc>>) -> TaskState {
        TaskState {
            attempts,
            max_attempts: 3,
            waiting_since,
            cancelled: None,
        }
    }

    /// A wait's due time and first moment of waiting.
    fn waited(t: &Transition) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        match t {
            Transition::Wait(w) => Some((w.due, w.since)),
            _ => None,
        }
    }

    fn unavailable(class: ErrorClass, until: DateTime<Utc>) -> Outcome {
        Outcome::Unavailable(Unavailable {
            until,
            reasons: vec!["mock is cooling down until 00:01:00 UTC (cannot connect)".into()],
            class,
            paced: false,
        })
    }

    fn failed(class: ErrorClass, tried: &[&str]) -> Outcome {
        Outcome::Failed(AttemptError {
            class,
            message: "mock/x: HTTP 500: boom".into(),
            tried: tried.iter().map(|s| (*s).to_owned()).collect(),
            retry_after: None,
        })
    }

    #[test]
    fn an_outage_waits_until_the_provider_may_answer_without_using_an_attempt() {
        let t = decide(
            task(1, None),
            unavailable(ErrorClass::Unavailable, at(60)),
            StepRounds::default(),
            &POLICY,
            at(0),
        );
        assert_eq!(waited(&t), Some((at(60), at(0))));
        // A task already waiting keeps its first moment of waiting.
        let t = decide(
            task(0, Some(at(-100))),
            unavailable(ErrorClass::Unavailable, at(60)),
            StepRounds::default(),
            &POLICY,
            at(0),
        );
        assert_eq!(waited(&t), Some((at(60), at(-100))));
    }

    #[test]
    fn a_wait_never_spins_and_never_passes_max_wait() {
        let t = decide(
            task(0, None),
            unavailable(ErrorClass::RateLimited, at(-5)),
            StepRounds::default(),
            &POLICY,
            at(0),
        );
        assert_eq!(
            waited(&t),
            Some((at(0) + chrono::Duration::milliseconds(100), at(0)))
        );
        let t = decide(
            task(0, Some(at(-3590))),
            unavailable(ErrorClass::Unavailable, at(60)),
            StepRounds::default(),
            &POLICY,
            at(0),
        );
        assert!(
            matches!(t, Transition::Dead { .. }),
            "nothing can be called before the bound: it ends now, not with one more call: {t:?}"
        );
    }

    #[test]
    fn max_wait_ends_the_wait_with_what_it_waited_for_and_since_when() {
        let t = decide(
            task(0, Some(at(-3600))),
            unavailable(ErrorClass::Unavailable, at(60)),
            StepRounds::default(),
            &POLICY,
            at(0),
        );
        let Transition::Dead { error, class } = t else {
            panic!("{t:?}")
        };
        assert_eq!(class, ErrorClass::Unavailable);
        assert_eq!(
            error,
            "waited 1h for a provider, since 2025-12-31 23:00:00 UTC, and none could be called \
             within 1h (routing.max_wait); no capable provider can be called now: mock is \
             cooling down until 00:01:00 UTC (cannot connect)"
        );
    }

    #[test]
    fn a_used_up_quota_waits_for_its_reset_however_long() {
        let t = decide(
            task(0, Some(at(-7200))),
            unavailable(ErrorClass::QuotaExhausted, at(20_000)),
            StepRounds::default(),
            &POLICY,
            at(0),
        );
        assert_eq!(waited(&t), Some((at(20_000), at(-7200))));
    }

    #[test]
    fn a_task_fault_uses_an_attempt_and_dies_after_the_last() {
        let t = decide(
            task(0, None),
            failed(ErrorClass::Retryable, &["mock"]),
            StepRounds::default(),
            &POLICY,
            at(0),
        );
        let Transition::Retry { due, .. } = t else {
            panic!("{t:?}")
        };
        let wait = (due - at(0)).num_milliseconds();
        assert!((1000..2000).contains(&wait), "{wait}");

        let t = decide(
            task(2, None),
            failed(ErrorClass::Retryable, &["mock"]),
            StepRounds::default(),
            &POLICY,
            at(0),
        );
        assert_eq!(
            t,
            Transition::Dead {
                error: "gave up after 3 attempts; last error: mock/x: HTTP 500: boom".into(),
                class: ErrorClass::Retryable
            }
        );
        let t = decide(
            task(2, None),
            failed(ErrorClass::Retryable, &["a", "b"]),
            StepRounds::default(),
            &POLICY,
            at(0),
        );
        assert_eq!(
            t,
            Transition::Dead {
                error: "gave up after 3 attempts; all providers failed; last error: mock/x: HTTP 500: boom; tried: a, b".into(),
                class: ErrorClass::Retryable
            }
        );
    }

    #[test]
    fn a_fatal_error_dies_at_once_with_its_own_words() {
        let t = decide(
            task(0, None),
            failed(ErrorClass::Fatal, &["mock"]),
            StepRounds::default(),
            &POLICY,
            at(0),
        );
        assert_eq!(
            t,
            Transition::Dead {
                error: "mock/x: HTTP 500: boom".into(),
                class: ErrorClass::Fatal
            }
        );
    }

    #[test]
    fn answers_and_shutdowns_pass_through() {
        let answered = Outcome::Answered(answered_completion());
        assert_eq!(
            decide(
                task(0, None),
                answered,
                StepRounds::default(),
                &POLICY,
                at(0)
            ),
            Transition::Done(answered_completion())
        );
        assert_eq!(
            decide(
                task(0, None),
                Outcome::Released,
                StepRounds::default(),
                &POLICY,
                at(0)
            ),
            Transition::Release
        );
    }

    fn answered_completion() -> Completion {
        Completion {
            text: "ok".into(),
            ..Completion::default()
        }
    }

    #[test]
    fn a_cancel_during_the_attempt_ends_it_cancelled_and_the_hard_stop_hands_it_back() {
        let cancelled = TaskState {
            cancelled: Some("cancelled by llmq cancel".into()),
            ..task(1, None)
        };
        assert_eq!(
            decide(
                cancelled.clone(),
                Outcome::Released,
                StepRounds::default(),
                &POLICY,
                at(0)
            ),
            Transition::Cancel {
                why: "cancelled by llmq cancel".into()
            }
        );
        // A cancel that came as its call answered does not take the answer away.
        assert_eq!(
            decide(
                cancelled,
                Outcome::Answered(answered_completion()),
                StepRounds::default(),
                &POLICY,
                at(0)
            ),
            Transition::Done(answered_completion())
        );
    }

    #[test]
    fn every_stop_before_the_attempt_has_its_transition() {
        let park = llmq_shared::queue::BatchPark {
            group: "g".into(),
            envelope: "{}".into(),
            body: "{}".into(),
            deadline_ms: 7,
            generation: "0:0".into(),
        };
        // A copy's write, made by the key phase, goes through as it is.
        let copy = Finished::new(
            std::sync::Arc::new(llmq_shared::keys::QueueKeys::new("q")),
            llmq_shared::queue::Write::Task(llmq_shared::queue::Finish::ack(
                llmq_shared::ids::EntryId::new(1, 0),
                llmq_shared::ids::TaskId::random(),
            )),
            Vec::new(),
        );
        let cases = [
            (Stop::Parked, Transition::Park),
            (Stop::HandedBack, Transition::Release),
            (
                Stop::Cancelled("the chain was cancelled".into()),
                Transition::Cancel {
                    why: "the chain was cancelled".into(),
                },
            ),
            (
                Stop::NotItsStep("not the step's task".into()),
                Transition::Refuse {
                    error: "not the step's task".into(),
                },
            ),
            (Stop::Awaiting(42), Transition::Await { deadline_ms: 42 }),
            (
                Stop::Batched(Box::new(park.clone())),
                Transition::Batch(Box::new(park)),
            ),
            (
                Stop::Duplicate(Box::new(copy.clone())),
                Transition::Duplicate(Box::new(copy)),
            ),
        ];
        for (stop, transition) in cases {
            assert_eq!(stopped(stop), transition);
        }
    }

    fn rerun(step: &str, round: u32) -> Rerun {
        let mut task = llmq_shared::envelope::Envelope::new("Write the parser.");
        task.step = Some(step.into());
        task.id = Some(llmq_shared::chain::step_task_id("c", step, round));
        Rerun {
            step: step.into(),
            round,
            task,
            waits_for: Vec::new(),
            ok: 0,
            fold: String::new(),
        }
    }

    fn rework() -> Rework {
        Rework {
            review: "review".into(),
            rerun: "impl".into(),
            reruns: vec![rerun("impl", 1), rerun("review", 1)],
            escalate_from: None,
        }
    }

    fn rejected() -> Outcome {
        Outcome::Rejected(super::super::attempt::Rejection(
            "the review rejected step `impl`: no tests".into(),
        ))
    }

    fn up() -> Escalation {
        Escalation {
            tier: Tier::Standard,
            reruns: vec![rerun("impl", 1)],
        }
    }

    #[test]
    fn a_rejection_with_rounds_left_sends_the_work_back_with_its_findings() {
        let rounds = StepRounds {
            rework: Some(rework()),
            escalation: None,
        };
        let Transition::Rework { findings, reruns } =
            decide(task(0, None), rejected(), rounds, &POLICY, at(0))
        else {
            panic!("a rejection with rounds left is rework")
        };
        assert_eq!(findings, "the review rejected step `impl`: no tests");
        assert_eq!(reruns.len(), 2);
        assert!(
            reruns[0].task.prompt.starts_with("Write the parser.")
                && reruns[0].task.prompt.contains("no tests"),
            "the step to redo carries the findings after its prompt: {}",
            reruns[0].task.prompt
        );
        assert_eq!(
            reruns[1].task.prompt, "Write the parser.",
            "only the step to redo gets them"
        );
    }

    #[test]
    fn a_rejection_without_rounds_ends_the_step_or_escalates_it() {
        assert_eq!(
            decide(
                task(0, None),
                rejected(),
                StepRounds::default(),
                &POLICY,
                at(0)
            ),
            Transition::Dead {
                error: "the review rejected step `impl`: no tests".into(),
                class: ErrorClass::Fatal
            }
        );
        let rounds = StepRounds {
            rework: None,
            escalation: Some(Ok(up())),
        };
        assert!(matches!(
            decide(task(0, None), rejected(), rounds, &POLICY, at(0)),
            Transition::Escalate {
                tier: Tier::Standard,
                ..
            }
        ));
    }

    #[test]
    fn escalation_follows_only_a_failure_for_good_and_ends_with_why_when_it_cannot() {
        let with = |e: Result<Escalation, String>| StepRounds {
            rework: None,
            escalation: Some(e),
        };
        // Attempts left: retry at the same tier first.
        assert!(matches!(
            decide(
                task(0, None),
                failed(ErrorClass::Retryable, &["mock"]),
                with(Ok(up())),
                &POLICY,
                at(0)
            ),
            Transition::Retry { .. }
        ));
        let t = decide(
            task(0, None),
            failed(ErrorClass::Fatal, &["mock"]),
            with(Ok(up())),
            &POLICY,
            at(0),
        );
        assert_eq!(
            t,
            Transition::Escalate {
                error: "mock/x: HTTP 500: boom".into(),
                class: ErrorClass::Fatal,
                tier: Tier::Standard,
                reruns: vec![rerun("impl", 1)]
            }
        );
        let t = decide(
            task(0, None),
            failed(ErrorClass::Fatal, &["mock"]),
            with(Err(
                "nothing at the advanced-tier can take it: provider mock has no advanced-tier model"
                    .into(),
            )),
            &POLICY,
            at(0),
        );
        assert_eq!(
            t,
            Transition::Dead {
                error: "mock/x: HTTP 500: boom; cannot escalate: nothing at the advanced-tier \
                        can take it: provider mock has no advanced-tier model"
                    .into(),
                class: ErrorClass::Fatal
            }
        );
        // An invalid task is not the step's: it never runs the step again.
        assert!(matches!(
            decide(
                task(0, None),
                failed(ErrorClass::Invalid, &[]),
                with(Ok(up())),
                &POLICY,
                at(0)
            ),
            Transition::Dead {
                class: ErrorClass::Invalid,
                ..
            }
        ));
        // An answer is done, whatever the step could have done instead.
        let answered = Outcome::Answered(answered_completion());
        let rounds = StepRounds {
            rework: Some(rework()),
            escalation: Some(Ok(up())),
        };
        assert_eq!(
            decide(task(0, None), answered, rounds, &POLICY, at(0)),
            Transition::Done(answered_completion())
        );
    }
}
