//! One attempt: try the plan's candidates in order until one answers.
//!
//! Per candidate: skip it while its circuit is open or its quota refuses; call it; on a
//! rate limit wait out a short Retry-After (no try used); on a task's fault (a 500, a 400)
//! retry it with backoff up to `tries_per_provider` or move on; on an outage (no
//! connection, a timeout, 502/503/504/529) note when to look again and move on at once.
//! Every failure with a health scope counts against the provider's or model's circuit.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use llmq_shared::circuit::Admission;
use llmq_shared::config::Kind;
use llmq_shared::config::{OnBudget, TenantLimits};
use llmq_shared::envelope::Envelope;
use llmq_shared::ids::{EntryId, TaskId};
use llmq_shared::keys::QueueKeys;
use llmq_shared::ledger::{CallOutcome, CallRow};
use llmq_shared::outcome::ErrorClass;
use llmq_shared::provider::{self, Completion, Request, Usage};
use llmq_shared::queue::OutEntry;
use llmq_shared::quota::{
    Decision, Reservation, TenantDecision, TenantGrant, TenantRefusal, Waiter,
};
use llmq_shared::retry::RetryPolicy;
use llmq_shared::routing::{Candidate, Plan};
use llmq_shared::telemetry;
use tracing::Instrument;
use uuid::Uuid;

use super::{Executor, RoomTurn};

/// Retry-After waits within one provider before moving on to the next.
const MAX_RATE_WAITS: u32 = 3;

/// What an attempt came to.
#[derive(Debug)]
pub enum Outcome {
    Answered(Completion),
    /// The hard stop came: hand the task back.
    Released,
    /// No candidate could be called, and none failed because of the task.
    Unavailable(Unavailable),
    /// The task failed: a fatal answer, or retryable errors from providers that answer.
    Failed(AttemptError),
    /// A review or a check judged the work and rejected it: a verdict, not a failed call,
    /// so [`decide`](super::decide) may send the work back.
    Rejected(Rejection),
    /// The task's tenant is at one of its limits (`tenants.limits`): its tasks wait in the
    /// room until it frees, or, `fail`ing (`on_budget: fail` at a budget), this one ends.
    Held {
        refusal: Box<TenantRefusal>,
        fail: bool,
    },
}

/// A review's or a check's rejection, as a sentence with its findings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection(pub String);

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why no candidate could be called, and the earliest moment one may be.
#[derive(Debug, Clone, PartialEq)]
pub struct Unavailable {
    pub until: DateTime<Utc>,
    /// One sentence per candidate that could not be called.
    pub reasons: Vec<String>,
    /// `QuotaExhausted` when every candidate is at one of its configured quotas or rate
    /// limits, `RateLimited` when every one answered 429, else `Unavailable`.
    pub class: ErrorClass,
    /// Every candidate only waits for its pace (`rpm`, `tpm`): its slot comes within
    /// moments, so a task of the room goes back to its tenant's head there, where the
    /// room's order decides who asks next.
    pub paced: bool,
}

impl Unavailable {
    /// Every reason, joined.
    #[must_use]
    pub fn reason(&self) -> String {
        let what = match self.class {
            ErrorClass::QuotaExhausted => "every capable provider is out of quota",
            ErrorClass::RateLimited => "every capable provider is rate-limited",
            _ => "no capable provider can be called now",
        };
        format!("{what}: {}", self.reasons.join("; "))
    }
}

/// An attempt that failed because of the task, with every provider it tried.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptError {
    pub class: ErrorClass,
    /// The last error, as `provider/model: ...`.
    pub message: String,
    /// Providers called, in order.
    pub tried: Vec<String>,
    pub retry_after: Option<Duration>,
}

impl AttemptError {
    /// The error of the last attempt, after `attempts` attempts.
    #[must_use]
    pub fn gave_up(&self, attempts: u32) -> String {
        let plural = if attempts == 1 { "" } else { "s" };
        if self.tried.len() > 1 {
            format!("gave up after {attempts} attempt{plural}; {self}")
        } else {
            format!("gave up after {attempts} attempt{plural}; last error: {self}")
        }
    }
}

impl fmt::Display for AttemptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.tried.len() > 1 {
            write!(
                f,
                "all providers failed; last error: {}; tried: {}",
                self.message,
                self.tried.join(", ")
            )
        } else {
            f.write_str(&self.message)
        }
    }
}

/// An attempt with everything it did, for the record and the ledger.
pub struct Tried {
    pub outcome: Outcome,
    /// Why the router chose the first candidate, and why the attempt moved on.
    pub route: String,
    /// Each failed or skipped candidate, in order.
    pub errors: Vec<String>,
    /// The provider and model called last.
    pub last: Option<(String, String)>,
}

impl Tried {
    /// An outcome reached without calling anyone.
    pub(super) fn without_call(outcome: Outcome) -> Self {
        Self {
            outcome,
            route: String::new(),
            errors: Vec::new(),
            last: None,
        }
    }

    /// An attempt's end: what it kept borrowed while its calls ran, copied.
    fn of(
        outcome: Outcome,
        route: Cow<'_, str>,
        errors: Vec<String>,
        last: Option<(&str, &str)>,
    ) -> Self {
        Self {
            outcome,
            route: route.into_owned(),
            errors,
            last: last.map(|(provider, model)| (provider.to_owned(), model.to_owned())),
        }
    }
}

/// What stopped one candidate.
enum Stop {
    Answered(Completion),
    Released,
    /// The task's tenant is at one of its limits.
    Tenant(Box<TenantRefusal>),
    /// Cannot be called before `until`.
    Later {
        until: DateTime<Utc>,
        why: String,
        class: ErrorClass,
        /// Only this model is out: the provider's other models may still be asked.
        model_only: bool,
        /// Only the provider's pace holds it back ([`Unavailable::paced`]).
        paced: bool,
    },
    /// Failed because of the task.
    Failed(provider::Error),
    /// Could not be asked (Redis failed while checking it).
    Skipped,
}

/// What the candidates of an attempt that did not answer left, for the next candidate and
/// for the attempt's outcome.
#[derive(Default)]
struct Past {
    /// Providers called, for the error.
    tried: Vec<String>,
    /// Providers asked, whose other models are skipped.
    asked: Vec<String>,
    /// Why the attempt moved on from the last candidate, for the route.
    moved_on: Option<String>,
    /// The last failure that was the task's.
    fault: Option<provider::Error>,
    /// Candidates that cannot be called before a time.
    later: Vec<(DateTime<Utc>, ErrorClass, String, bool)>,
}

impl Past {
    /// The attempt leaves provider `name`, having `called` it, and `asked` it (it is not asked
    /// again for another model) unless only its model was out.
    fn left(&mut self, name: &str, called: bool, asked: bool) {
        if called && !self.tried.iter().any(|n| n == name) {
            self.tried.push(name.to_owned());
        }
        if asked {
            self.asked.push(name.to_owned());
        }
    }
}

/// One attempt of one task.
pub(super) struct Attempt<'a> {
    pub exec: &'a Executor,
    /// This delivery of the task, which keys its calls in the ledger.
    pub delivery: Uuid,
    pub env: &'a Envelope,
    pub queue: &'a QueueKeys,
    pub task_id: TaskId,
    /// The stream entry whose claim this worker must still hold when a call starts.
    pub entry_id: EntryId,
    pub task_type: &'static str,
    pub number: u32,
    /// Every call made, for the ledger; kept by the caller so a timeout loses none.
    pub calls: &'a mut Vec<CallRow>,
    /// Set while a call waits for the ledger to record its start or for its rate-limit
    /// window, unsent: an attempt that times out then was stopped by neither its task nor
    /// its provider.
    pub waiting: &'a std::sync::atomic::AtomicBool,
    /// For a task fed from the room: its turn, told when the task's first call starts.
    pub turn: Option<&'a RoomTurn<'a>>,
    /// Cancelled when the task must stop (a cancel that names it, the hard stop): its call
    /// is dropped, its wait ends, and the attempt ends `Released`.
    pub stop: &'a tokio_util::sync::CancellationToken,
}

impl Attempt<'_> {
    /// Runs the attempt. By reference: an async fn taken by value keeps its argument beside
    /// the local it moves into, twice the room for the whole of the call.
    pub async fn run(&mut self, plan: &Plan<'_>) -> Tried {
        // Borrowed while the calls run, and the last provider and model called with them:
        // copies would be held (and allocated) for the whole of every call.
        let mut route = Cow::Borrowed(plan.reason.as_str());
        let mut errors = Vec::new();
        let mut last: Option<(&str, &str)> = None;
        // What the candidates that did not answer left: none until one does not, so the
        // first candidate's call (most tasks' only one) carries 8 bytes of it.
        let mut past: Option<Box<Past>> = None;
        // A tenant at its budget that steps down (`on_budget: downgrade`): only candidates
        // cheaper than the one refused, and the refusal, should none of them fit.
        let mut budget: Option<(f64, Box<TenantRefusal>)> = None;
        for cand in &plan.candidates {
            if budget
                .as_ref()
                .is_some_and(|(usd, _)| cand.estimated_usd >= *usd)
            {
                continue;
            }
            let name = &*cand.provider.name;
            if past
                .as_ref()
                .is_some_and(|p| p.asked.iter().any(|n| n == name))
            {
                // A provider that failed or refused is not asked again for another model.
                continue;
            }
            if let Some(why) = past.as_mut().and_then(|p| p.moved_on.take()) {
                route = format!("{route}; {why} → {name}/{}", cand.model.id).into();
            }
            let calls_before = self.calls.len();
            let stop = self.candidate(cand, &mut errors, &mut last).await;
            let called = self.calls.len() > calls_before;
            match stop {
                Stop::Answered(completion) => {
                    return Tried::of(Outcome::Answered(completion), route, errors, last);
                }
                Stop::Released => return Tried::of(Outcome::Released, route, errors, last),
                Stop::Tenant(refusal) => {
                    let on_budget = self.limits().map(|(_, l)| l.on_budget);
                    if refusal.is_budget() && on_budget == Some(OnBudget::Downgrade) {
                        route = format!("{route}; {} → a cheaper model", refusal.describe()).into();
                        budget = Some((cand.estimated_usd, refusal));
                        continue;
                    }
                    let fail = refusal.is_budget() && on_budget == Some(OnBudget::Fail);
                    let outcome = Outcome::Held { refusal, fail };
                    return Tried::of(outcome, route, errors, last);
                }
                Stop::Later {
                    until,
                    why,
                    class,
                    model_only,
                    paced,
                } => {
                    let past = past.get_or_insert_default();
                    past.left(name, called, !model_only);
                    past.moved_on = Some(why.clone());
                    past.later.push((until, class, why, paced));
                }
                Stop::Failed(e) => {
                    let past = past.get_or_insert_default();
                    past.left(name, called, true);
                    past.moved_on = Some(format!("{name} failed"));
                    past.fault = Some(e);
                }
                Stop::Skipped => {
                    let past = past.get_or_insert_default();
                    past.left(name, called, true);
                    past.moved_on = Some(format!("{name} could not be checked"));
                }
            }
        }
        let Past {
            tried,
            fault,
            later,
            ..
        } = past.map(|p| *p).unwrap_or_default();
        let outcome = if let (None, Some((_, refusal))) = (&fault, budget) {
            // No cheaper model fit what is left of the budget: wait for it.
            Outcome::Held {
                refusal,
                fail: false,
            }
        } else if let Some(e) = fault {
            Outcome::Failed(AttemptError {
                class: e.class,
                message: e.to_string(),
                tried,
                retry_after: e.retry_after,
            })
        } else if let Some(until) = later.iter().map(|(t, ..)| *t).min() {
            let class = match later.first().map(|(_, c, ..)| *c) {
                Some(c) if later.iter().all(|(_, k, ..)| *k == c) => c,
                _ => ErrorClass::Unavailable,
            };
            let paced = later.iter().all(|(.., paced)| *paced);
            Outcome::Unavailable(Unavailable {
                until,
                reasons: later.into_iter().map(|(_, _, why, _)| why).collect(),
                class,
                paced,
            })
        } else {
            // Redis could not be asked about any candidate: the worker's fault, not the
            // task's; look again in a moment.
            Outcome::Unavailable(Unavailable {
                until: Utc::now() + chrono::Duration::seconds(1),
                reasons: errors.clone(),
                class: ErrorClass::Unavailable,
                paced: false,
            })
        };
        Tried::of(outcome, route, errors, last)
    }

    /// Tries one candidate until it answers, fails or cannot be called.
    async fn candidate<'p>(
        &mut self,
        cand: &Candidate<'p>,
        errors: &mut Vec<String>,
        last: &mut Option<(&'p str, &'p str)>,
    ) -> Stop {
        let exec = self.exec;
        let name = &*cand.provider.name;
        let model = &*cand.model.id;
        // Boxed, and only when Redis must be asked: the hot path allocates nothing.
        let probe = match if exec.circuits.admitted(name, model) {
            Ok(Admission::Call { probe: false })
        } else {
            Box::pin(exec.circuits.ask(name, model)).await
        } {
            Ok(Admission::Call { probe }) => probe,
            Ok(Admission::Wait(open)) => {
                let why = open.describe();
                errors.push(format!("{name}/{model}: skipped: {why}"));
                return Stop::Later {
                    until: open.until,
                    why,
                    class: ErrorClass::Unavailable,
                    model_only: open.model.is_some(),
                    paced: false,
                };
            }
            Err(e) => {
                // The circuit cannot be read: call anyway, as a closed circuit would.
                tracing::warn!(provider = name, "cannot read the circuit breaker: {e}");
                false
            }
        };
        let mut tries = 0;
        let mut rate_waits = 0;
        loop {
            // The tenant's limits first, only when it has some: boxed, kept out of the
            // call's state.
            let grant = match self.limits() {
                None => None,
                Some(_) => match Box::pin(self.tenant_slot(cand)).await {
                    Ok(grant) => grant,
                    Err(stop) => return stop,
                },
            };
            // Boxed, and only for quotas: a short wait, kept out of the call's state.
            let reservation = match if cand.provider.quotas.is_empty() {
                Ok(None)
            } else {
                Box::pin(self.reserve(cand)).await
            } {
                Ok(r) => r,
                Err(stop) => {
                    if let Stop::Later { why, .. } = &stop {
                        errors.push(why.clone());
                    }
                    self.settle_tenant(grant.as_deref(), Some(0.0));
                    return stop;
                }
            };
            // A call is made only on a claim this worker surely holds: one that lapsed (Redis
            // away past the visibility timeout) may be another worker's, and its call would
            // be a second, paid one.
            if self.stop.is_cancelled() {
                self.settle_tenant(grant.as_deref(), Some(0.0));
                return Stop::Released;
            }
            if !exec.claims.may_call(self.entry_id).await {
                tracing::warn!(
                    entry = %self.entry_id,
                    "the claim on this task lapsed before its call; handing it back uncalled"
                );
                self.settle_tenant(grant.as_deref(), Some(0.0));
                return Stop::Released;
            }
            if let Some(turn) = self.turn {
                turn.called();
            }
            tries += 1;
            *last = Some((name, model));
            let stop = self.stop;
            let row = self.calls.len();
            let called = tokio::select! {
                r = self.call(cand, reservation.as_deref()) => Some(r),
                () = stop.cancelled() => None,
            };
            if grant.is_some() {
                self.settle_tenant(grant.as_deref(), self.cost_of(row, called.is_some()));
            }
            let Some(called) = called else {
                return Stop::Released;
            };
            let e = match called {
                Ok(completion) => {
                    self.healthy(name, model, probe).await;
                    return Stop::Answered(completion);
                }
                Err(e) => e,
            };
            // Boxed: the error, and what is awaited for it, would otherwise be part of every
            // call's state for the whole of the call.
            let wait =
                match Box::pin(self.failed(cand, errors, e, probe, &mut tries, &mut rate_waits))
                    .await
                {
                    Ok(wait) => wait,
                    Err(stop) => return stop,
                };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.stop.cancelled() => return Stop::Released,
            }
        }
    }

    /// What a failed call of [`Attempt::candidate`] leads to: how long to wait before
    /// trying the candidate again, or how the candidate stops.
    async fn failed(
        &self,
        cand: &Candidate<'_>,
        errors: &mut Vec<String>,
        e: provider::Error,
        probe: bool,
        tries: &mut u32,
        rate_waits: &mut u32,
    ) -> Result<std::time::Duration, Stop> {
        let exec = self.exec;
        let routing = &exec.config.routing;
        let retry = &routing.retry;
        let name = &*cand.provider.name;
        let model = &*cand.model.id;
        errors.push(e.to_string());
        let opened = match e.scope() {
            Some(scope) => Box::pin(exec.circuits.failed(
                name,
                model,
                scope,
                &e.to_string(),
                &routing.cooldown,
            ))
            .await
            .unwrap_or_else(|err| {
                tracing::warn!(provider = name, "cannot count the failure: {err}");
                false
            }),
            None => false,
        };
        if opened {
            tracing::warn!(provider = name, model, "circuit opened: {e}");
        }
        if e.is_outage() || (probe && e.scope().is_some()) {
            // The provider, not the task: look again when it may answer.
            let wait = if opened || probe {
                routing.cooldown.duration
            } else {
                RetryPolicy::new(exec.retry_base, routing.cooldown.duration)
                    .delay(self.env.snoozes + 1, e.retry_after)
            };
            return Err(Stop::Later {
                until: Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default(),
                why: e.to_string(),
                class: ErrorClass::Unavailable,
                model_only: e.scope() == Some(provider::Scope::Model),
                paced: false,
            });
        }
        if probe && e.scope().is_none() {
            // It answered, about the task (a 400, a rate limit): it is up again.
            self.healthy(name, model, probe).await;
        }
        let wait = match e.class {
            ErrorClass::RateLimited => {
                match e.retry_after {
                    Some(w) if w <= retry.max_retry_after && *rate_waits < MAX_RATE_WAITS => {
                        // Waiting out a rate limit does not use a try.
                        *rate_waits += 1;
                        *tries -= 1;
                        w
                    }
                    wait => {
                        let wait = wait.unwrap_or(exec.retry_base);
                        return Err(Stop::Later {
                            until: Utc::now()
                                + chrono::Duration::from_std(wait).unwrap_or_default(),
                            why: e.to_string(),
                            class: ErrorClass::RateLimited,
                            model_only: false,
                            paced: false,
                        });
                    }
                }
            }
            ErrorClass::Retryable if *tries < retry.tries_per_provider => {
                // The configured waits: the first, doubling, up to the last. A
                // Retry-After is waited out in full, whatever the cap.
                let first = retry.backoff.first().copied().unwrap_or_default();
                let last = retry.backoff.last().copied().unwrap_or(first);
                RetryPolicy::new(first, last.max(first))
                    .delay(*tries, None)
                    .max(e.retry_after.unwrap_or_default())
            }
            _ => return Err(Stop::Failed(e)),
        };
        Ok(wait)
    }

    /// The wait another worker was asked for this model, as the 429 it stands for.
    async fn held(&self, cand: &Candidate<'_>) -> Option<provider::Error> {
        let (name, model) = (&*cand.provider.name, &*cand.model.id);
        // Not boxed: its fast path allocates nothing, and it boxes its slow path itself.
        match self.exec.circuits.held(name, model).await {
            Ok(Some(hold)) => {
                let mut e = provider::Error::new(
                    name,
                    model,
                    ErrorClass::RateLimited,
                    format!(
                        "not sent: the provider asked every caller to wait until {} ({})",
                        hold.until.format("%H:%M:%S%.3f UTC"),
                        hold.reason
                    ),
                );
                e.retry_after = Some(hold.remaining());
                Some(e)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(provider = name, "cannot read the provider's hold: {e}");
                None
            }
        }
    }

    /// A wait asked with a 429, or a 503 or 529, speaks to the API key, not to this worker:
    /// every worker waits it out.
    async fn hold_fleet(&self, cand: &Candidate<'_>, e: &provider::Error) {
        let asks_all = e.class == ErrorClass::RateLimited || matches!(e.status, Some(503 | 529));
        if let (true, Some(wait)) = (asks_all, e.retry_after)
            && let Err(err) = Box::pin(self.exec.circuits.hold(
                &cand.provider.name,
                &cand.model.id,
                wait,
                &e.to_string(),
            ))
            .await
        {
            tracing::warn!(
                provider = &*cand.provider.name,
                "cannot tell the fleet to wait: {err}"
            );
        }
    }

    /// A call got an answer: the provider and model are up.
    async fn healthy(&self, provider: &str, model: &str, probe: bool) {
        let circuits = &self.exec.circuits;
        if !probe && circuits.known_closed(provider, model) {
            // The hot path: nothing to reset, nothing allocated.
            return;
        }
        if let Err(e) = Box::pin(circuits.succeeded(provider, model, probe)).await {
            tracing::warn!(provider, "cannot reset the circuit breaker: {e}");
        }
    }

    /// Reserves the call against the task's tenant's limits and waits for the slot its
    /// pace gave it, when near; `None` when the tenant has no limits.
    async fn tenant_slot(&self, cand: &Candidate<'_>) -> Result<Option<Box<TenantGrant>>, Stop> {
        let Some((tenant, limits)) = self.limits() else {
            return Ok(None);
        };
        let grant = self.reserve_tenant(cand, tenant, limits).await?;
        if !grant.wait.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(grant.wait) => {}
                () = self.stop.cancelled() => {
                    self.settle_tenant(Some(&grant), Some(0.0));
                    return Err(Stop::Released);
                }
            }
        }
        Ok(Some(grant))
    }

    /// What the call of row `row` cost, for its tenant's settle: nothing for one never
    /// sent; `None` (its estimate stays spent: the provider may bill it) for one dropped in
    /// flight, which did not come `back`.
    fn cost_of(&self, row: usize, back: bool) -> Option<f64> {
        self.calls
            .get(row)
            .map_or(Some(0.0), |row| match (back, row.outcome) {
                (_, CallOutcome::Unsent) => Some(0.0),
                (false, _) => None,
                (true, _) => Some(row.cost_usd),
            })
    }

    /// The task's tenant and its limits (`tenants.limits`), when it has any.
    fn limits(&self) -> Option<(&str, &TenantLimits)> {
        let tenant = self.env.tenant.as_deref()?;
        Some((tenant, self.exec.config.tenants.limits_of(tenant)?))
    }

    /// Reserves one call of the task's tenant against its limits.
    async fn reserve_tenant(
        &self,
        cand: &Candidate<'_>,
        tenant: &str,
        limits: &TenantLimits,
    ) -> Result<Box<TenantGrant>, Stop> {
        let now = Utc::now();
        if let Some((limit, budget)) = limits.never_fits(cand.estimated_usd) {
            // No reset makes room for it: a cheaper model may fit, else the task fails.
            let refusal = TenantRefusal {
                tenant: tenant.to_owned(),
                limit: limit.to_owned(),
                until: if limit == "budget_usd_day" {
                    llmq_shared::quota::next_day(now)
                } else {
                    llmq_shared::quota::next_month(now)
                },
                value: budget,
            };
            if limits.on_budget == OnBudget::Downgrade {
                return Err(Stop::Tenant(Box::new(refusal)));
            }
            let per = if limit == "budget_usd_day" {
                "day"
            } else {
                "month"
            };
            return Err(Stop::Failed(provider::Error::new(
                &cand.provider.name,
                &cand.model.id,
                ErrorClass::Fatal,
                format!(
                    "a call could cost ${:.6} (max_tokens included), more than tenant {:?}'s whole budget of ${budget:.2} a {per}; lower max_tokens or raise tenants.limits",
                    cand.estimated_usd, tenant
                ),
            )));
        }
        let decision = self
            .exec
            .limiter
            .reserve_tenant(
                tenant,
                limits,
                cand.estimated_tokens,
                cand.estimated_usd,
                self.exec.attempt_timeout,
                now,
            )
            .await;
        match decision {
            Ok(TenantDecision::Granted { grant, crossed }) => {
                for c in crossed {
                    let (limit, percent) = c.rsplit_once(':').unwrap_or((&c, ""));
                    tracing::warn!(tenant, threshold = %c, "tenant budget threshold crossed");
                    metrics::counter!(
                        "llmq_tenant_budget_thresholds_total",
                        "tenant" => tenant.to_owned(),
                        "limit" => limit.to_owned(),
                        "percent" => percent.to_owned()
                    )
                    .increment(1);
                }
                Ok(Box::new(grant))
            }
            Ok(TenantDecision::Refused(r)) => {
                metrics::counter!(
                    "llmq_tenant_limited_total",
                    "tenant" => tenant.to_owned(),
                    "limit" => r.limit.clone()
                )
                .increment(1);
                Err(Stop::Tenant(Box::new(r)))
            }
            Err(e) => {
                // Without Redis no limit can be checked; do not call blind.
                tracing::warn!(tenant, "tenant limit check failed: {e}");
                Err(Stop::Skipped)
            }
        }
    }

    /// Settles the tenant's reservation, if any, at what its call cost (`None`: its
    /// estimate, for a call that may have been billed).
    fn settle_tenant(&self, grant: Option<&TenantGrant>, cost: Option<f64>) {
        if let Some(grant) = grant {
            let usd = cost.unwrap_or_else(|| grant.estimate());
            self.exec.limiter.settle_tenant(grant, usd);
        }
    }

    /// Reserves one call against the candidate's quotas, if it has any. Boxed: an 88-byte
    /// local of every call's state for the whole of the call, for most providers absent.
    /// A task whose slot is near waits for it here, in the provider's line
    /// (`quota/reserve.lua`); one whose slot is further is handed back.
    async fn reserve(&self, cand: &Candidate<'_>) -> Result<Option<Box<Reservation>>, Stop> {
        if cand.provider.quotas.is_empty() {
            return Ok(None);
        }
        let name = &*cand.provider.name;
        let asker = Some(self.task_id.uuid().simple().to_string());
        let since = Utc::now();
        let priority = self.env.class().map_or(0, |(p, _)| p);
        loop {
            let decision = self
                .exec
                .limiter
                .reserve_in_line(
                    name,
                    &cand.provider.quotas,
                    (
                        priority,
                        asker.as_deref().map(|task| Waiter { task, since }),
                    ),
                    cand.estimated_tokens,
                    cand.estimated_usd,
                    Utc::now(),
                )
                .await;
            match decision {
                Ok(Decision::Granted {
                    reservation,
                    crossed,
                }) => {
                    for c in crossed {
                        tracing::warn!(provider = name, threshold = %c, "quota threshold crossed");
                    }
                    return Ok(Some(Box::new(reservation)));
                }
                Ok(Decision::Refused(r)) if r.in_line => {
                    // Its slot is near and kept for it: wait here, unsent.
                    self.waiting
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    // At least a millisecond: a slot due now is never asked for in a spin.
                    // The attempt's timeout, raced against this, bounds the waits.
                    let wait = (r.until - Utc::now())
                        .to_std()
                        .unwrap_or_default()
                        .max(std::time::Duration::from_millis(1));
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = self.stop.cancelled() => return Err(Stop::Released),
                    }
                    self.waiting
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                }
                // Our own limits (per day, month or window) are known waits for a known
                // reset, not an outage: they are not bounded by max_wait.
                Ok(Decision::Refused(r)) => {
                    return Err(Stop::Later {
                        until: r.until,
                        why: r.describe(name),
                        class: ErrorClass::QuotaExhausted,
                        model_only: false,
                        paced: matches!(r.limit.as_str(), "rpm" | "tpm"),
                    });
                }
                Err(e) => {
                    // Without Redis no quota can be checked; do not call blind.
                    tracing::warn!(provider = name, "quota check failed: {e}");
                    return Err(Stop::Skipped);
                }
            }
        }
    }

    /// Stamps the call's reservation with the time it is sent. Waits
    /// while its rolling window is full, which only a call that waited longer than the window
    /// since its reservation can find; bounded by the attempt's timeout and the hard stop,
    /// which the caller races the call against.
    async fn stamp(&self, cand: &Candidate<'_>, r: &Reservation) {
        let quotas = &cand.provider.quotas;
        loop {
            let now = Utc::now();
            match self.exec.limiter.stamp(r, quotas, now).await {
                Ok(None) => return,
                Ok(Some(full)) => {
                    let wait = (full.until - now).to_std().unwrap_or_default();
                    tokio::time::sleep(wait.max(std::time::Duration::from_millis(10))).await;
                }
                Err(e) => {
                    // The reservation stands, stamped when it was made.
                    tracing::warn!(provider = r.provider, "cannot stamp the reservation: {e}");
                    return;
                }
            }
        }
    }

    /// Where a streamed answer goes as it arrives: the task's live answer, through a task of
    /// its own that the call never waits on.
    fn live_answer(&self) -> (Option<provider::Sink>, Option<tokio::task::JoinHandle<()>>) {
        if !self.env.streams() {
            return (None, None);
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let forwarder = tokio::spawn(forward(
            self.exec.redis.clone(),
            self.queue.clone(),
            self.task_id,
            rx,
        ));
        (Some(provider::Sink(tx)), Some(forwarder))
    }

    /// The ledger row of call number `row` (from 0) of this attempt, as it starts.
    fn start_row(&self, cand: &Candidate<'_>, row: usize) -> Box<[CallRow; 1]> {
        let (exec, env) = (self.exec, self.env);
        Box::new([CallRow {
            task_id: self.task_id.uuid(),
            delivery: self.delivery,
            run: env.replays as i32,
            attempt: self.number as i32,
            call_no: row as i32 + 1,
            queue: self.queue.shared_name(),
            chain_id: env.chain_id.as_deref().map(Into::into),
            task_type: self.task_type.into(),
            provider: Arc::clone(&cand.provider.name),
            model: Arc::clone(&cand.model.id),
            input_tokens: 0,
            output_tokens: 0,
            cached_tokens: 0,
            cache_write_tokens: 0,
            reasoning_tokens: 0,
            cost_usd: 0.0,
            latency_ms: 0,
            outcome: CallOutcome::Started,
            error_class: None,
            error: None,
            worker: Arc::clone(&exec.worker_id),
            called_at: Utc::now(),
            list_cost_usd: None,
            tenant: env.tenant.as_deref().map(Into::into),
            tags: env.tags_json(),
        }])
    }

    /// Makes one call, reconciles its reservation and records it for the ledger.
    async fn call(
        &mut self,
        cand: &Candidate<'_>,
        reservation: Option<&Reservation>,
    ) -> provider::Result<Completion> {
        let exec = self.exec;
        let env = self.env;
        let name = &*cand.provider.name;
        let (sink, forwarder) = self.live_answer();
        let req = Request {
            sink,
            ..Request::of(env, &cand.model.id, cand.provider)
        };
        // The row goes in before the call, so a worker that dies during it leaves a trace
        // of a call the provider may bill. It is boxed while its start is recorded: a
        // 320-byte local would size every task's state for the whole of its call. Boxed as
        // an array of one, so that for a task's first call the box becomes `calls` as is.
        let row = self.calls.len();
        let start = self.start_row(cand, row);
        if let Some(starts) = &exec.call_starts {
            use std::sync::atomic::Ordering::Relaxed;
            self.waiting.store(true, Relaxed);
            let recorded = Box::pin(starts.record(start[0].clone())).await;
            self.waiting.store(false, Relaxed);
            if !recorded {
                // Only at the hard stop, which the caller races this against: it hands the
                // task back without a call, and with no row for a call that was never made.
                return std::future::pending().await;
            }
        }
        if self.calls.is_empty() {
            let one: Box<[CallRow]> = start;
            *self.calls = Vec::from(one);
        } else {
            let [start] = *start;
            self.calls.push(start);
        }
        let span = call_span(&req, cand);
        if let Some(r) = reservation {
            // Not sent until stamped: an attempt that ends while this waits for its window
            // made no call here, which the row says.
            use std::sync::atomic::Ordering::Relaxed;
            self.calls[row].outcome = CallOutcome::Unsent;
            self.waiting.store(true, Relaxed);
            // `called_at` stays the row's start: it is part of the row's key.
            Box::pin(self.stamp(cand, r)).await;
            self.waiting.store(false, Relaxed);
            self.calls[row].outcome = CallOutcome::Started;
        }
        // A wait the provider asked of any worker for this model (Retry-After) holds this
        // call too, read as late as can be: the call is not sent (its row says so) and the
        // attempt waits as for a 429 of its own, using no try.
        if let Some(held) = self.held(cand).await {
            self.calls[row].outcome = CallOutcome::Unsent;
            return Err(held);
        }
        let started = Instant::now();
        let (result, span) = match exec.clients.get(name) {
            Some(client) => {
                // The span is moved into the call and read back from it: held once, not
                // twice, by every call in flight.
                let mut call = std::pin::pin!(client.complete(&req).instrument(span));
                let _under_way = InFlight::new(&exec.calls_in_flight);
                let result = call.as_mut().await;
                (result, call.span().clone())
            }
            None => {
                let e = provider::Error::new(
                    name,
                    req.model,
                    ErrorClass::Fatal,
                    "no client is built for this provider".into(),
                );
                (Err(e), span)
            }
        };
        let took = started.elapsed();
        // Boxed: what the end of a call awaits (the fleet's hold, the live answer's end, the
        // quota's reconcile) and what it keeps across those awaits would otherwise be part
        // of every call's state for the whole of the call.
        Box::pin(self.end_call(cand, reservation, req, forwarder, span, row, result, took)).await
    }

    /// The end of [`Attempt::call`]: the call's row, metrics and span get how it went.
    #[allow(clippy::too_many_arguments)]
    async fn end_call(
        &mut self,
        cand: &Candidate<'_>,
        reservation: Option<&Reservation>,
        mut req: Request<'_>,
        forwarder: Option<tokio::task::JoinHandle<()>>,
        span: tracing::Span,
        row: usize,
        result: provider::Result<Completion>,
        took: std::time::Duration,
    ) -> provider::Result<Completion> {
        let exec = self.exec;
        let name = &*cand.provider.name;
        if let Err(e) = &result {
            self.hold_fleet(cand, e).await;
        }
        let usage = result.as_ref().map(|c| c.usage).unwrap_or_default();
        // An answer that is not the JSON the task asked for is a failed call (billed as
        // made), which retries and falls back like any other.
        let result = result.and_then(|c| conform(c, &req, name));
        if let Some(forwarder) = forwarder {
            // The call is over: what it wrote is written before how it ended.
            req.sink = None;
            let _ = forwarder.await;
            let end = match &result {
                Ok(_) => OutEntry::Done,
                Err(e) => OutEntry::Restart(e.to_string()),
            };
            let id = self.task_id;
            // Boxed: a write's state would size every call's for the whole of the call.
            let write = Box::pin(exec.redis.append_out(self.queue, id, &end, true));
            if let Err(e) = write.await {
                tracing::warn!(task_id = %id, "cannot end the live answer: {e}");
            }
        }
        let cost = cand.model.prices.cost(&usage);
        if let Some(r) = reservation
            && let Err(e) = Box::pin(exec.limiter.reconcile(
                r,
                usage.input_tokens + usage.output_tokens,
                cost,
            ))
            .await
        {
            tracing::warn!(provider = name, "reconciling the quota failed: {e}");
        }
        exec.call_metrics
            .record(name, &cand.model.id, &result, took, &usage, cost);
        if !span.is_disabled() {
            // As i64: OpenTelemetry has no unsigned integers, and a u64 would go as text.
            let tokens = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            span.record("gen_ai.usage.input_tokens", tokens(usage.input_tokens));
            span.record("gen_ai.usage.output_tokens", tokens(usage.output_tokens));
            span.record("llmq.cost_usd", cost);
            if let Err(e) = &result {
                span.record("error.type", e.class.as_str());
            }
        }
        let error = result.as_ref().err();
        let call = &mut self.calls[row];
        call.input_tokens = usage.input_tokens as i64;
        call.output_tokens = usage.output_tokens as i64;
        call.cached_tokens = usage.cached_tokens as i64;
        call.cache_write_tokens = usage.cache_write_tokens as i64;
        call.reasoning_tokens = usage.reasoning_tokens as i64;
        call.cost_usd = cost;
        // What the provider's prompt cache saved (or, for a write no read followed, cost).
        call.list_cost_usd = (usage.cached_tokens + usage.cache_write_tokens > 0).then(|| {
            cand.model.prices.cost(&Usage {
                cached_tokens: 0,
                cache_write_tokens: 0,
                ..usage
            })
        });
        call.latency_ms = i32::try_from(took.as_millis()).unwrap_or(i32::MAX);
        call.outcome = if error.is_some() {
            CallOutcome::Error
        } else {
            CallOutcome::Ok
        };
        call.error_class = error.map(|e| e.class.to_string());
        call.error = error.map(ToString::to_string);
        result
    }
}

/// How often, at most, a live answer gets a new entry after its first: what arrives in
/// between goes in one entry. A provider streams a token or a few per event, tens of them a
/// second; one XADD per event would cost Redis that much per streaming task.
const LIVE_FLUSH: std::time::Duration = std::time::Duration::from_millis(50);

/// Appends what a streaming call sends to the task's live answer: the first piece at once,
/// then what arrived in each [`LIVE_FLUSH`] in one entry. Ends when the call drops its end
/// of the channel, with what it had written.
async fn forward(
    redis: llmq_shared::queue::Client,
    queue: QueueKeys,
    task_id: TaskId,
    mut pieces: tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let mut first = true;
    let mut open = true;
    while open {
        let Some(mut text) = pieces.recv().await else {
            break;
        };
        if !first {
            let until = tokio::time::Instant::now() + LIVE_FLUSH;
            loop {
                tokio::select! {
                    more = pieces.recv() => match more {
                        Some(more) => text.push_str(&more),
                        None => {
                            open = false;
                            break;
                        }
                    },
                    () = tokio::time::sleep_until(until) => break,
                }
            }
        }
        if let Err(e) = redis
            .append_out(&queue, task_id, &OutEntry::Text(text), first)
            .await
        {
            tracing::warn!(%task_id, "cannot append to the live answer: {e}");
        }
        first = false;
    }
}

/// The answer read as the JSON `req` asks for, when it asks for some; an answer with tool
/// calls is the model asking for their results, not its answer, and is not read.
pub(super) fn conform(
    mut c: Completion,
    req: &Request<'_>,
    provider: &str,
) -> provider::Result<Completion> {
    let Some(format) = &req.response_format else {
        return Ok(c);
    };
    if !c.tool_calls.is_empty() {
        return Ok(c);
    }
    match format.read(&c.text) {
        Ok(json) => {
            c.json = Some(json);
            Ok(c)
        }
        Err(why) => Err(provider::Error::new(
            provider,
            req.model,
            ErrorClass::Retryable,
            why,
        )),
    }
}

/// `gen_ai.system` of the OpenTelemetry GenAI conventions for a provider kind.
fn gen_ai_system(kind: Kind) -> &'static str {
    match kind {
        Kind::Openai | Kind::OpenaiCompatible => "openai",
        Kind::Anthropic => "anthropic",
        Kind::Gemini => "gcp.gemini",
        Kind::Ollama => "ollama",
        Kind::Command => "_OTHER",
    }
}

/// The span of a call to `cand` with `req`, as the GenAI semantic conventions name it.
fn call_span(req: &Request<'_>, cand: &Candidate<'_>) -> tracing::Span {
    let name = &*cand.provider.name;
    tracing::trace_span!(
        target: telemetry::TARGET,
        "gen_ai.call",
        otel.name = %format_args!("chat {}", req.model),
        otel.kind = "client",
        gen_ai.operation.name = "chat",
        gen_ai.system = gen_ai_system(cand.provider.kind),
        gen_ai.request.model = %req.model,
        gen_ai.usage.input_tokens = tracing::field::Empty,
        gen_ai.usage.output_tokens = tracing::field::Empty,
        error.type = tracing::field::Empty,
        llmq.provider = name,
        llmq.cost_usd = tracing::field::Empty,
    )
}

/// Counts a provider call under way for as long as it lives (a call dropped midway too).
struct InFlight<'a>(&'a std::sync::atomic::AtomicU64);

impl<'a> InFlight<'a> {
    fn new(count: &'a std::sync::atomic::AtomicU64) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}
