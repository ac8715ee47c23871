//! Routing: which providers and models a task goes to, in order, and why. A pure function of
//! the provider file, the task, the constraints a caller adds and what was learned so far;
//! no Redis, no network, so every rule is unit tested.
//!
//! The `cheapest` strategy, in order:
//! 1. A provider/model hint is honoured first (its quota is checked at call time; when it is
//!    used up, routing falls through to the rest of the plan).
//! 2. A matching routing rule pins a model or sets the tier.
//! 3. Otherwise: every enabled model that has the capability the task needs (from its type
//!    and keywords in its prompt), is at least the tier its risk (and the constraints) ask
//!    for, fits its context window and stays under `max_cost_per_task`, cheapest cost tier
//!    first (free, then subscription, then paid), then the preferred tier, then the lowest
//!    price.
//! 4. Providers in `routing.fallback` come last, with their cheapest capable model.
//!
//! A task with `fallback: false` keeps only the first candidate: the provider it names, or
//! the first pick of the rules above.
//!
//! Constraints exclude models or providers and raise the minimum tier everywhere, hints
//! included (a chain's review step must not be routed to the model it reviews).
//!
//! Other strategies (`routing.strategy`) reorder the capable models of step 3 by what the
//! fleet observed ([`Stats`]): `performance`, `cost`, `balanced` and `learning`.
//!
//! Layout: this module holds `plan` and its types (`Plan`, `Candidate`, `Constraints`,
//! `Stats` and `Observed`, `RouteError`), with `Ask`, what a task asks of a model, read
//! once and giving each step of the plan; `learn` orders candidates by their observed
//! success (Thompson sampling for `learning`); `tests` has the unit tests.

use std::collections::HashMap;

use crate::config::{Capability, Config, Kind, Model, ProviderConfig, RuleTarget, Strategy, Tier};
use crate::envelope::{Envelope, Risk};
use crate::outcome::Usage;
use crate::tokens::PromptTokens;

mod learn;
#[cfg(test)]
mod tests;

pub use learn::Learned;

/// One provider and model to try.
#[derive(Clone, Copy)]
pub struct Candidate<'a> {
    pub provider: &'a ProviderConfig,
    pub model: &'a Model,
    /// Estimated tokens in and out, for the quota reservation.
    pub estimated_tokens: u64,
    /// Estimated cost of one call, USD.
    pub estimated_usd: f64,
}

impl std::fmt::Debug for Candidate<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.provider.name, self.model.id)
    }
}

/// Where a task goes, in order of preference, and why the first one was chosen.
#[derive(Debug, Clone)]
pub struct Plan<'a> {
    pub candidates: Vec<Candidate<'a>>,
    pub reason: String,
    /// What a learned strategy chose, when one ordered the candidates.
    pub learned: Option<Learned>,
}

/// What a caller adds to the provider file's routing for one task.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Constraints {
    /// Model ids not to use (e.g. the model whose work a review step reviews).
    pub exclude_models: Vec<String>,
    /// Providers not to use.
    pub exclude_providers: Vec<String>,
    /// No model below this tier (e.g. an escalated retry).
    pub min_tier: Option<Tier>,
}

impl Constraints {
    fn allows(&self, p: &ProviderConfig, m: &Model) -> bool {
        !self.exclude_providers.iter().any(|x| **x == *p.name)
            && !self.exclude_models.iter().any(|x| **x == *m.id)
            && self.min_tier.is_none_or(|t| m.tier >= t)
    }
}

/// What the fleet observed of a model for a kind of task; the input of learned routing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Observed {
    /// Tasks it finished, successes and failures of the task's own (an outage is neither).
    pub tasks: u64,
    /// Tasks that succeeded, and that no review or check that judged them rejected.
    pub successes: u64,
    /// The median time of its answered calls, milliseconds; none before its first answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
}

/// Observations by (provider, model, task type, risk): a row per risk seen, and one with no
/// risk for every risk together, which a risk with no history of its own falls back to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub by_model: HashMap<(String, String, String, Option<Risk>), Observed>,
}

/// One row of [`Stats`], as the scheduler stores them in Redis.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StatRow {
    pub provider: String,
    pub model: String,
    pub task_type: String,
    pub risk: Option<Risk>,
    #[serde(flatten)]
    pub observed: Observed,
}

impl Stats {
    /// What was observed of `provider`/`model` for tasks of `task_type` and `risk` (or, with
    /// none for that risk, of every risk).
    #[must_use]
    pub fn observed(
        &self,
        provider: &str,
        model: &str,
        task_type: &str,
        risk: Option<Risk>,
    ) -> Observed {
        let key = |risk| {
            (
                provider.to_owned(),
                model.to_owned(),
                task_type.to_owned(),
                risk,
            )
        };
        risk.and_then(|r| self.by_model.get(&key(Some(r))))
            .or_else(|| self.by_model.get(&key(None)))
            .copied()
            .unwrap_or_default()
    }

    /// The rows, for storing.
    #[must_use]
    pub fn rows(&self) -> Vec<StatRow> {
        let mut rows: Vec<StatRow> = self
            .by_model
            .iter()
            .map(|((provider, model, task_type, risk), o)| StatRow {
                provider: provider.clone(),
                model: model.clone(),
                task_type: task_type.clone(),
                risk: *risk,
                observed: *o,
            })
            .collect();
        rows.sort_by(|a, b| {
            (&a.provider, &a.model, &a.task_type, a.risk).cmp(&(
                &b.provider,
                &b.model,
                &b.task_type,
                b.risk,
            ))
        });
        rows
    }

    /// Stats from stored rows.
    #[must_use]
    pub fn from_rows(rows: Vec<StatRow>) -> Self {
        Self {
            by_model: rows
                .into_iter()
                .map(|r| ((r.provider, r.model, r.task_type, r.risk), r.observed))
                .collect(),
        }
    }
}

/// A task that no configured model can take. Retrying cannot help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RouteError(String);

/// Output tokens assumed when a task sets no `max_tokens`, for estimates.
const DEFAULT_OUTPUT_ESTIMATE: u64 = 1024;

/// The plan for `task`.
///
/// # Errors
/// The task names a provider or model that is not configured, is disabled or is excluded,
/// or no model can take it.
pub fn plan<'a>(
    config: &'a Config,
    task: &Envelope,
    constraints: &Constraints,
    stats: &Stats,
) -> Result<Plan<'a>, RouteError> {
    // Every turn, tool and schema counts against the context window and the quotas.
    let read = task.read_text();
    let ask = Ask::new(config, task, constraints, &read);
    let mut plan: Vec<Candidate<'a>> = Vec::new();
    let mut reason = String::new();
    // 1. Hints.
    if task.provider.is_some() || task.model.is_some() {
        let (p, m) = hinted(config, task, ask.floor)?;
        plan.extend(ask.candidate(p, m));
        reason = ask.hint_reason(p, m, plan.is_empty());
    }
    // 2. A rule naming a model.
    if let Some((c, target)) = ask.rule_model(config) {
        if reason.is_empty() {
            reason = format!("routing rule: {}", ask.describe_rule(&target));
        }
        plan.push(c);
    }
    // 3. Everything capable, cheapest cost tier first; a learned strategy reorders them.
    let (capable, excluded_by_cost) = ask.capable(config);
    let (capable, learned) = ask.learn(config, capable, stats, &mut reason);
    if reason.is_empty()
        && let Some(first) = capable.first()
    {
        reason = ask.cheapest_reason(first);
    }
    plan.extend(capable);
    // 4. Fallback providers.
    plan.extend(ask.fallbacks(config));
    let mut plan = unique(plan);
    // A call no reset can make room for (max_tokens beyond a whole quota) is not waited on.
    let mut never = None;
    plan.retain(|c| {
        let why = (c.provider.quotas).never_fits(c.estimated_tokens, c.estimated_usd);
        if let Some(why) = &why {
            never.get_or_insert_with(|| format!("{c:?}: {why}"));
        }
        why.is_none()
    });
    if plan.is_empty()
        && let Some(why) = never
    {
        return Err(RouteError(format!(
            "no model can ever take this task: {why}; lower max_tokens"
        )));
    }
    if task.fallback == Some(false) {
        ask.fallback_off(config, &mut plan, &mut reason)?;
    }
    if plan.is_empty() {
        return Err(RouteError(ask.nothing_fits(excluded_by_cost)));
    }
    // What the strategy chose is the route's only when nothing (a hint, a rule's model) came
    // before its pick.
    let learned = learned
        .filter(|(_, (p, m))| {
            plan.first()
                .is_some_and(|c| c.provider.name == *p && c.model.id == *m)
        })
        .map(|(l, _)| l);
    Ok(Plan {
        candidates: plan,
        reason,
        learned,
    })
}

/// Each provider and model of `plan` once, at its first place. Plans are short: a scan is
/// cheaper than hashing.
fn unique(plan: Vec<Candidate<'_>>) -> Vec<Candidate<'_>> {
    let mut unique: Vec<Candidate<'_>> = Vec::with_capacity(plan.len());
    for c in plan {
        let same =
            |u: &Candidate<'_>| u.provider.name == c.provider.name && u.model.id == c.model.id;
        if !unique.iter().any(same) {
            unique.push(c);
        }
    }
    unique
}

/// A capable candidate and its rank: its provider's cost tier, whether it misses a rule's
/// tier, its price.
type Ranked<'a> = (Candidate<'a>, (u8, u8, u64));

/// What a strategy chose, and the provider and model it put first.
type Chosen = Option<(Learned, (std::sync::Arc<str>, std::sync::Arc<str>))>;

/// What a task asks of a model, read once from the task, the constraints and the provider
/// file's routing section, for every candidate.
struct Ask<'t> {
    task: &'t Envelope,
    constraints: &'t Constraints,
    routing: &'t crate::config::Routing,
    task_type: crate::envelope::TaskType,
    risk: Option<Risk>,
    area: Option<&'t str>,
    tokens: PromptTokens<'t>,
    output_tokens: u64,
    image_tokens: u64,
    images: bool,
    images_by_url: bool,
    /// The capabilities it needs: its type's, an image's, its prompt's keywords'.
    needs: Vec<Capability>,
    rule: Option<&'t crate::config::Rule>,
    /// The tier its risk, the constraints and the task raise the capable models to.
    min_tier: Tier,
    /// A floor no candidate goes below, hints included: a chain step's constraint, or the
    /// tier an escalation raised the task to. (Risk raises the tier of the capable models
    /// only: a hint still names its model.)
    floor: Option<Tier>,
    /// The tier a routing rule prefers.
    wanted_tier: Option<Tier>,
}

impl<'t> Ask<'t> {
    fn new(
        config: &'t Config,
        task: &'t Envelope,
        constraints: &'t Constraints,
        read: &'t str,
    ) -> Self {
        let task_type = task.task_type().unwrap_or_default();
        let routing = &config.routing;
        let risk = task.risk;
        let area = task.area.as_deref();
        let mut needs = vec![Capability::for_task(task_type)];
        let (image_count, images_by_url) = crate::conversation::images(&task.messages);
        if image_count > 0 {
            needs.push(Capability::Vision);
        }
        // A lowercase copy of the prompt only when there are keywords to look for in it.
        let lower = (!routing.keywords.is_empty()).then(|| read.to_lowercase());
        for (cap, words) in &routing.keywords {
            let found = |w: &String| lower.as_deref().is_some_and(|l| l.contains(w.as_str()));
            if words.iter().any(found) && !needs.contains(cap) {
                needs.push(*cap);
            }
        }
        let rule = routing.rules.iter().find(|r| {
            r.task_type.is_none_or(|t| t == task_type)
                && r.risk.is_none_or(|k| Some(k) == risk)
                && r.area.as_deref().is_none_or(|a| Some(a) == area)
        });
        let min_tier = match risk {
            Some(Risk::High) => Tier::Advanced,
            Some(Risk::Medium) => Tier::Standard,
            _ => Tier::Fast,
        }
        .max(constraints.min_tier.unwrap_or(Tier::Fast))
        .max(task.min_tier.unwrap_or(Tier::Fast));
        let wanted_tier = match rule.map(|r| &r.target) {
            Some(RuleTarget::Tier(t)) => Some(*t),
            _ => None,
        };
        Self {
            task,
            constraints,
            routing,
            task_type,
            risk,
            area,
            tokens: PromptTokens::new(task.system.as_deref(), read),
            output_tokens: task.max_tokens.map_or(DEFAULT_OUTPUT_ESTIMATE, u64::from),
            image_tokens: image_count * crate::conversation::IMAGE_TOKENS,
            images: image_count > 0,
            images_by_url,
            needs,
            rule,
            min_tier,
            floor: constraints.min_tier.max(task.min_tier),
            wanted_tier,
        }
    }

    /// Whether provider `p` can take the task's tools, images and stream: a local command
    /// cannot be handed tools or images, nor return the model's tool calls; Ollama takes
    /// images only as data, never by URL.
    fn takes_tools(&self, p: &ProviderConfig) -> bool {
        match p.kind {
            Kind::Command => self.task.tools.is_empty() && !self.images && !self.task.streams(),
            Kind::Ollama => !self.images_by_url,
            _ => true,
        }
    }

    /// `p`'s model `m` as a candidate, with its estimates, unless the constraints, the floor
    /// or the task's tools keep it out.
    fn candidate<'a>(&self, p: &'a ProviderConfig, m: &'a Model) -> Option<Candidate<'a>> {
        let allowed = self.constraints.allows(p, m)
            && self.floor.is_none_or(|t| m.tier >= t)
            && self.takes_tools(p);
        let input_tokens = self.tokens.for_model(&m.id) + self.image_tokens;
        allowed.then(|| Candidate {
            provider: p,
            model: m,
            estimated_tokens: input_tokens + self.output_tokens,
            estimated_usd: m.prices.cost(&Usage {
                input_tokens,
                output_tokens: self.output_tokens,
                cached_tokens: 0,
                cache_write_tokens: 0,
                reasoning_tokens: 0,
            }),
        })
    }

    /// Why the plan starts with the hint `p`/`m`; or, when it is `refused`, why it cannot.
    fn hint_reason(&self, p: &ProviderConfig, m: &Model, refused: bool) -> String {
        if refused {
            return match self.floor.filter(|t| m.tier < *t) {
                Some(t) => format!(
                    "provider {} has no {}-tier model or above for the hint",
                    p.name,
                    t.as_str()
                ),
                None if !self.takes_tools(p) => format!(
                    "the hint {}/{} cannot take the task's tools, images or stream ({} provider)",
                    p.name,
                    m.id,
                    p.kind.as_str()
                ),
                None => format!("the hint {}/{} is excluded for this step", p.name, m.id),
            };
        }
        match (&self.task.provider, &self.task.model) {
            (Some(_), Some(_)) => "provider and model hints honoured".into(),
            (Some(_), None) => "provider hint honoured; its cheapest model".into(),
            _ => "model hint honoured".into(),
        }
    }

    /// The model a matching routing rule names, as a candidate, and as the rule names it.
    fn rule_model<'a>(&self, config: &'a Config) -> Option<(Candidate<'a>, String)> {
        let Some(RuleTarget::Model { provider, model }) = self.rule.map(|r| &r.target) else {
            return None;
        };
        let p = enabled(config).find(|p| *p.name == **provider)?;
        let c = self.candidate(p, p.model(model)?)?;
        Some((c, format!("{provider}/{model}")))
    }

    fn describe_rule(&self, target: &str) -> String {
        describe_rule(self.task_type.as_str(), self.risk, self.area, target)
    }

    /// Every enabled model capable of the task, cheapest cost tier first, then the preferred
    /// tier, then the lowest price; and how many `max_cost_per_task` kept out.
    fn capable<'a>(&self, config: &'a Config) -> (Vec<Ranked<'a>>, usize) {
        let mut capable = Vec::new();
        let mut excluded_by_cost = 0;
        for p in enabled(config) {
            for m in &p.models {
                if !self.needs.iter().all(|c| m.can(*c)) || m.tier < self.min_tier {
                    continue;
                }
                let tokens = self.tokens.for_model(&m.id) + self.image_tokens + self.output_tokens;
                if m.context_window.is_some_and(|w| tokens > w) {
                    continue;
                }
                let Some(c) = self.candidate(p, m) else {
                    continue;
                };
                if (self.routing.max_cost_per_task).is_some_and(|cap| c.estimated_usd > cap) {
                    excluded_by_cost += 1;
                    continue;
                }
                let tier_miss = u8::from(self.wanted_tier.is_some_and(|t| t != m.tier));
                let price = ((m.prices.input + m.prices.output) * 1e6) as u64;
                capable.push((c, (p.cost_tier as u8, tier_miss, price)));
            }
        }
        capable.sort_by_key(|(_, key)| *key);
        (capable, excluded_by_cost)
    }

    /// The capable models in the order a learned strategy puts them (by what was observed
    /// of each), with what it chose; `reason` says why, when nothing before set it.
    fn learn<'a>(
        &self,
        config: &Config,
        capable: Vec<Ranked<'a>>,
        stats: &Stats,
        reason: &mut String,
    ) -> (Vec<Candidate<'a>>, Chosen) {
        let routing = &config.routing;
        if routing.strategy == Strategy::Cheapest || capable.is_empty() {
            return (capable.into_iter().map(|(c, _)| c).collect(), None);
        }
        let task_type = self.task_type.as_str();
        let observed: Vec<Observed> = capable
            .iter()
            .map(|(c, _)| stats.observed(&c.provider.name, &c.model.id, task_type, self.risk))
            .collect();
        let cost: Vec<f64> = capable.iter().map(|(c, _)| c.estimated_usd).collect();
        let (order, chose) = learn::order(
            routing.strategy,
            &observed,
            &cost,
            routing.explore,
            routing.tolerance,
            routing.prior,
            seed(self.task),
        );
        let mut slots: Vec<Option<_>> = capable.into_iter().map(Some).collect();
        let capable: Vec<Candidate<'a>> = order
            .iter()
            .filter_map(|i| slots[*i].take().map(|(c, _)| c))
            .collect();
        let learned = chose
            .zip(capable.first())
            .map(|(l, c)| (l, (c.provider.name.clone(), c.model.id.clone())));
        if reason.is_empty()
            && let (Some(first), Some(i)) = (capable.first(), order.first())
        {
            *reason = self.learned_reason(routing, first, observed[*i], chose);
        }
        (capable, learned)
    }

    /// Why a learned strategy put `first` first, having observed `o` of it.
    fn learned_reason(
        &self,
        routing: &crate::config::Routing,
        first: &Candidate<'_>,
        o: Observed,
        chose: Option<Learned>,
    ) -> String {
        let kind = match self.risk {
            Some(r) => format!("{}/{}", self.task_type.as_str(), r.as_str()),
            None => self.task_type.as_str().to_owned(),
        };
        let explored = match chose {
            Some(l) if l.explored => "; explored",
            _ => "",
        };
        let share = match chose {
            Some(_) => format!(
                "; explores at most {:.0} % of the time",
                routing.explore * 100.0
            ),
            None => String::new(),
        };
        let latency = o
            .latency_ms
            .map(|ms| format!(", median {:.1} s", ms as f64 / 1000.0))
            .unwrap_or_default();
        format!(
            "{}: {} for {kind} (success {:.2} over {} calls{latency}{explored}{share})",
            routing.strategy.as_str(),
            first.model.id,
            o.mean(routing.prior),
            o.tasks
        )
    }

    /// Why the cheapest capable model, `first`, comes first.
    fn cheapest_reason(&self, first: &Candidate<'_>) -> String {
        let tier = first.provider.cost_tier.as_str();
        match (self.rule, self.wanted_tier) {
            (Some(_), Some(t)) => format!(
                "routing rule: {}; cheapest {tier}-tier model",
                self.describe_rule(t.as_str())
            ),
            _ => format!(
                "cheapest capable model ({tier} tier) for {}",
                needs_text(&self.needs)
            ),
        }
    }

    /// The cheapest capable model of each provider in `routing.fallback`.
    fn fallbacks<'a>(&self, config: &'a Config) -> Vec<Candidate<'a>> {
        let mut out = Vec::new();
        for name in &config.routing.fallback {
            if let Some(p) = enabled(config).find(|p| *p.name == **name)
                && let Some(c) = p
                    .models
                    .iter()
                    .filter(|m| {
                        self.needs.iter().all(|c| m.can(*c))
                            && self.constraints.allows(p, m)
                            && self.floor.is_none_or(|t| m.tier >= t)
                    })
                    .min_by(|a, b| price(a).total_cmp(&price(b)))
                    .and_then(|m| self.candidate(p, m))
            {
                out.push(c);
            }
        }
        out
    }

    /// Fallback off: the named provider (its first model in the plan), or the first pick
    /// when the task names none; nothing else.
    fn fallback_off(
        &self,
        config: &Config,
        plan: &mut Vec<Candidate<'_>>,
        reason: &mut String,
    ) -> Result<(), RouteError> {
        if let Some(named) = &self.task.provider {
            plan.retain(|c| *c.provider.name == **named);
            if plan.is_empty() {
                return Err(RouteError(match self.floor {
                    Some(t)
                        if config
                            .provider(named)
                            .is_some_and(|p| p.models.iter().all(|m| m.tier < t)) =>
                    {
                        format!(
                            "provider {named} has no {}-tier model or above, and the task has fallback off",
                            t.as_str()
                        )
                    }
                    _ => format!(
                        "the task names provider `{named}` with fallback off, but `{named}` cannot take it here (excluded for this step, or no capable model)"
                    ),
                }));
            }
        }
        if plan.len() > 1 {
            plan.truncate(1);
            reason.push_str("; fallback off, so no other provider");
        }
        Ok(())
    }

    /// Why no model can take the task.
    fn nothing_fits(&self, excluded_by_cost: usize) -> String {
        let mut why = format!(
            "no enabled model can take this task: it needs {}",
            needs_text(&self.needs)
        );
        if self.min_tier > Tier::Fast {
            why.push_str(&format!(" at tier {} or above", self.min_tier.as_str()));
        }
        if excluded_by_cost > 0 {
            why.push_str(&format!(
                "; {excluded_by_cost} model(s) would cost more than max_cost_per_task"
            ));
        }
        if self.constraints != &Constraints::default() {
            why.push_str("; some models are excluded for this step");
        }
        if !self.task.tools.is_empty() || self.images || self.task.streams() {
            why.push_str(
                "; a task with tools, images or stream never goes to a local command, nor one with an image by URL to Ollama",
            );
        }
        why
    }
}

/// The providers the file enables.
fn enabled(config: &Config) -> impl Iterator<Item = &ProviderConfig> {
    config.providers.iter().filter(|p| p.enabled)
}

/// Which of `candidates` (any order, each with what was observed of it and its cost) a
/// strategy would put first without exploring: for judging a strategy against logged routes
/// (`llmq insights replay`). Ties in cost keep the given order.
#[must_use]
pub fn first_choice(
    strategy: Strategy,
    observed: &[Observed],
    cost: &[f64],
    routing: &crate::config::Routing,
) -> Option<usize> {
    let mut by_cost: Vec<usize> = (0..observed.len()).collect();
    by_cost.sort_by(|a, b| cost[*a].total_cmp(&cost[*b]));
    let o: Vec<Observed> = by_cost.iter().map(|i| observed[*i]).collect();
    let c: Vec<f64> = by_cost.iter().map(|i| cost[*i]).collect();
    let (order, _) = learn::order(strategy, &o, &c, 0.0, routing.tolerance, routing.prior, 0);
    order.first().map(|i| by_cost[*i])
}

/// The seed of a task's draws: its id and attempt, so a route can be reproduced.
fn seed(task: &Envelope) -> u64 {
    let id = task.id.map_or(0, |u| {
        let v = u.uuid().as_u128();
        (v as u64) ^ ((v >> 64) as u64)
    });
    id ^ u64::from(task.attempts).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The provider and model a task's hints name; with only a provider, its cheapest model at
/// `floor` or above (its cheapest of all when it has none that high).
fn hinted<'a>(
    config: &'a Config,
    task: &Envelope,
    floor: Option<Tier>,
) -> Result<(&'a ProviderConfig, &'a Model), RouteError> {
    match (&task.provider, &task.model) {
        (Some(name), model) => {
            let p = config.provider(name).ok_or_else(|| {
                RouteError(format!(
                    "provider `{name}` is not in the provider file; known providers: {}",
                    config
                        .providers
                        .iter()
                        .map(|p| &*p.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
            if !p.enabled {
                return Err(RouteError(format!(
                    "provider `{name}` is disabled in the provider file"
                )));
            }
            let m = match model {
                Some(m) => find_model(p, m)?,
                None => {
                    let cheapest = |high_enough: bool| {
                        p.models
                            .iter()
                            .filter(|m| !high_enough || floor.is_none_or(|t| m.tier >= t))
                            .min_by(|a, b| price(a).total_cmp(&price(b)))
                    };
                    cheapest(true)
                        .or_else(|| cheapest(false))
                        .ok_or_else(|| RouteError(format!("provider `{name}` lists no model")))?
                }
            };
            Ok((p, m))
        }
        (None, Some(m)) => {
            let p = config
                .providers
                .iter()
                .filter(|p| p.enabled)
                .find(|p| p.model(m).is_some())
                .ok_or_else(|| {
                    RouteError(format!(
                        "no enabled provider offers model `{m}`; add it under a provider's models"
                    ))
                })?;
            Ok((p, find_model(p, m)?))
        }
        (None, None) => Err(RouteError("no hint".into())),
    }
}

fn describe_rule(task_type: &str, risk: Option<Risk>, area: Option<&str>, target: &str) -> String {
    let mut s = task_type.to_owned();
    if let Some(r) = risk {
        s.push_str(&format!(", {} risk", r.as_str()));
    }
    if let Some(a) = area {
        s.push_str(&format!(", area {a}"));
    }
    format!("{s} → {target}")
}

fn needs_text(needs: &[Capability]) -> String {
    needs
        .iter()
        .map(|c| c.as_str())
        .collect::<Vec<_>>()
        .join(" + ")
}

fn find_model<'a>(p: &'a ProviderConfig, id: &str) -> Result<&'a Model, RouteError> {
    p.model(id).ok_or_else(|| {
        RouteError(format!(
            "provider `{}` has no model `{id}`; its models: {}",
            p.name,
            p.models
                .iter()
                .map(|m| &*m.id)
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}

fn price(m: &Model) -> f64 {
    m.prices.input + m.prices.output
}
