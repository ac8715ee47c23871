//! Routing: rules, fallback, retries, cooldowns and how long a task may wait; and
//! validating the file's `routing` section.

use std::time::Duration;

use super::raw::{RawCooldown, RawRetry, RawRouting, RawRule};
use super::{Capability, Errors, ProviderConfig, Result, Tier};
use crate::envelope::{Risk, TaskType};

/// One routing rule: tasks that match every given condition go to the tier or model.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub task_type: Option<TaskType>,
    pub risk: Option<Risk>,
    pub area: Option<String>,
    pub target: RuleTarget,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RuleTarget {
    Tier(Tier),
    /// `provider/model`.
    Model {
        provider: String,
        model: String,
    },
}

/// Retry and fallback across providers.
#[derive(Debug, Clone, PartialEq)]
pub struct Retry {
    /// Tries per provider before falling back to the next one.
    pub tries_per_provider: u32,
    /// Wait before each further try, by try; the last one repeats.
    pub backoff: Vec<Duration>,
    /// A Retry-After longer than this moves on to the next provider instead of waiting.
    pub max_retry_after: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            tries_per_provider: 3,
            backoff: vec![
                Duration::from_secs(1),
                Duration::from_secs(2),
                Duration::from_secs(4),
            ],
            max_retry_after: Duration::from_secs(60),
        }
    }
}

/// A provider failing this often in a row is skipped by every worker for a while.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cooldown {
    pub after_failures: u32,
    pub duration: Duration,
}

impl Default for Cooldown {
    fn default() -> Self {
        Self {
            after_failures: 5,
            duration: Duration::from_secs(60),
        }
    }
}

/// How the capable models are ordered, after a task's hints and a rule's model
/// (`routing.strategy`; docs/configuration.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Strategy {
    /// Free, then subscription, then paid; then the preferred tier; then the lowest price.
    #[default]
    Cheapest,
    /// The highest observed success for the task's type and risk.
    Performance,
    /// The cheapest whose observed success is within `routing.tolerance` of the best.
    Cost,
    /// The most success per dollar.
    Balanced,
    /// `cost` on success drawn from each model's posterior (Thompson sampling) for at most
    /// `routing.explore` of the tasks, on the posterior means for the rest.
    Learning,
}

impl Strategy {
    pub const ALL: [Strategy; 5] = [
        Strategy::Cheapest,
        Strategy::Performance,
        Strategy::Cost,
        Strategy::Balanced,
        Strategy::Learning,
    ];

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Cheapest => "cheapest",
            Strategy::Performance => "performance",
            Strategy::Cost => "cost",
            Strategy::Balanced => "balanced",
            Strategy::Learning => "learning",
        }
    }
}

impl std::str::FromStr for Strategy {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Strategy::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "`{s}` is not a routing strategy; use cheapest, performance, cost, balanced or learning"
                )
            })
    }
}

/// Default [`Routing::explore`]: at most a tenth of the tasks explore.
pub const DEFAULT_EXPLORE: f64 = 0.1;
/// Default [`Routing::tolerance`]: two points of success.
pub const DEFAULT_TOLERANCE: f64 = 0.02;
/// Default [`Routing::prior`]: a configured model is expected to do nine tasks in ten.
pub const DEFAULT_PRIOR: f64 = 0.9;

#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub strategy: Strategy,
    /// `learning`: the most of the tasks that may explore (0 to 1).
    pub explore: f64,
    /// `cost` and `learning`: how much lower a cheaper model's success may be than the
    /// best's (0 to 1).
    pub tolerance: f64,
    /// Learned strategies: the success expected of a model with no history (0 to 1).
    pub prior: f64,
    /// Tasks whose estimated cost is higher are not sent to that model.
    pub max_cost_per_task: Option<f64>,
    /// Providers to try, in order, after the chosen one.
    pub fallback: Vec<String>,
    pub rules: Vec<Rule>,
    /// A prompt containing one of the words needs that capability.
    pub keywords: Vec<(Capability, Vec<String>)>,
    pub retry: Retry,
    pub cooldown: Cooldown,
    /// How long a task may wait for a provider to become callable (an outage, an open
    /// circuit, a rate limit) before it becomes a dead letter.
    pub max_wait: Duration,
}

/// Default [`Routing::max_wait`]: an hour.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(3600);

impl Default for Routing {
    fn default() -> Self {
        Self {
            strategy: Strategy::Cheapest,
            explore: DEFAULT_EXPLORE,
            tolerance: DEFAULT_TOLERANCE,
            prior: DEFAULT_PRIOR,
            max_cost_per_task: None,
            fallback: Vec::new(),
            rules: Vec::new(),
            keywords: Vec::new(),
            retry: Retry::default(),
            cooldown: Cooldown::default(),
            max_wait: DEFAULT_MAX_WAIT,
        }
    }
}

/// One routing rule, checked: which tasks it applies to, and the tier or model they go to.
fn rule(errs: &Errors<'_>, i: usize, rule: RawRule, providers: &[ProviderConfig]) -> Result<Rule> {
    let at = |k: &str| format!("routing.rules[{i}]{k}");
    let task_type = rule
        .task_type
        .map(|t| {
            t.parse::<TaskType>().map_err(|e| {
                errs.at(
                    at(".task_type"),
                    e.to_string(),
                    "use one of the ten task types",
                )
            })
        })
        .transpose()?;
    let target = match (rule.tier, rule.model) {
        (Some(t), None) => RuleTarget::Tier(t),
        (None, Some(m)) => {
            let Some((p, model)) = m.split_once('/') else {
                return Err(errs.at(
                    at(".model"),
                    format!("`{m}` does not say which provider"),
                    "write it as provider/model, e.g. openai/gpt-4o",
                ));
            };
            let known = providers
                .iter()
                .find(|x| *x.name == *p)
                .is_some_and(|x| x.model(model).is_some());
            if !known {
                return Err(errs.at(
                    at(".model"),
                    format!("no provider `{p}` with model `{model}`"),
                    "name a model listed under providers",
                ));
            }
            RuleTarget::Model {
                provider: p.to_owned(),
                model: model.to_owned(),
            }
        }
        _ => {
            return Err(errs.at(
                at(""),
                "a rule needs exactly one of tier or model",
                "add tier: fast|standard|advanced, or model: provider/model",
            ));
        }
    };
    if task_type.is_none() && rule.risk.is_none() && rule.area.is_none() {
        return Err(errs.at(
            at(""),
            "a rule needs at least one of task_type, risk or area",
            "say which tasks it applies to",
        ));
    }
    Ok(Rule {
        task_type,
        risk: rule.risk,
        area: rule.area,
        target,
    })
}

/// `routing.retry`, checked.
fn retry(errs: &Errors<'_>, raw: RawRetry) -> Result<Retry> {
    let mut retry = Retry::default();
    if let Some(n) = raw.tries_per_provider {
        if n == 0 {
            return Err(errs.at(
                "routing.retry.tries_per_provider",
                "a provider needs at least one try",
                "set it to 1 or more (default 3)",
            ));
        }
        retry.tries_per_provider = n;
    }
    if let Some(b) = raw.backoff {
        if b.is_empty() {
            return Err(errs.at(
                "routing.retry.backoff",
                "the list is empty",
                "give at least one wait, e.g. [1s, 2s, 4s]",
            ));
        }
        retry.backoff = b
            .iter()
            .enumerate()
            .map(|(i, d)| errs.duration(format!("routing.retry.backoff[{i}]"), d))
            .collect::<Result<_>>()?;
    }
    if let Some(m) = raw.max_retry_after {
        retry.max_retry_after = errs.duration("routing.retry.max_retry_after".into(), &m)?;
    }
    Ok(retry)
}

/// `routing.cooldown`, checked.
fn cooldown(errs: &Errors<'_>, raw: RawCooldown) -> Result<Cooldown> {
    let mut cooldown = Cooldown::default();
    if let Some(n) = raw.after_failures {
        if n == 0 {
            return Err(errs.at(
                "routing.cooldown.after_failures",
                "0 failures would cool every provider down at once",
                "set it to 1 or more (default 5)",
            ));
        }
        cooldown.after_failures = n;
    }
    if let Some(d) = raw.duration {
        cooldown.duration = errs.duration("routing.cooldown.for".into(), &d)?;
    }
    Ok(cooldown)
}

pub(super) fn routing(
    errs: &Errors<'_>,
    r: RawRouting,
    providers: &[ProviderConfig],
) -> Result<Routing> {
    let strategy = match r.strategy.as_deref() {
        None => Strategy::Cheapest,
        Some(s) => s.parse::<Strategy>().map_err(|_| {
            errs.at(
                "routing.strategy",
                format!("`{s}` is not a routing strategy"),
                "use cheapest, performance, cost, balanced or learning",
            )
        })?,
    };
    let share = |key: &str, v: Option<f64>, default: f64, fix: &str| match v {
        None => Ok(default),
        Some(v) if (0.0..=1.0).contains(&v) => Ok(v),
        Some(v) => Err(errs.at(key, format!("{v} is not between 0 and 1"), fix)),
    };
    let explore = share(
        "routing.explore",
        r.explore,
        DEFAULT_EXPLORE,
        "give the most of the tasks that may explore as a share, e.g. 0.1 for a tenth",
    )?;
    let tolerance = share(
        "routing.tolerance",
        r.tolerance,
        DEFAULT_TOLERANCE,
        "give the success a cheaper model may give up as a share, e.g. 0.02 for two points",
    )?;
    let prior = share(
        "routing.prior",
        r.prior,
        DEFAULT_PRIOR,
        "give the success expected of a model with no history as a share, e.g. 0.9",
    )?;
    if r.max_cost_per_task
        .is_some_and(|v| !v.is_finite() || v <= 0.0)
    {
        return Err(errs.at(
            "routing.max_cost_per_task",
            "the cap must be more than zero",
            "write it in USD, e.g. 0.50",
        ));
    }
    for (i, name) in r.fallback.iter().enumerate() {
        if !providers.iter().any(|p| *p.name == **name) {
            return Err(errs.at(
                format!("routing.fallback[{i}]"),
                format!("no provider is named `{name}`"),
                "list provider names from the providers section",
            ));
        }
    }
    let mut rules = Vec::with_capacity(r.rules.len());
    for (i, raw) in r.rules.into_iter().enumerate() {
        rules.push(rule(errs, i, raw, providers)?);
    }
    let keywords = r
        .keywords
        .into_iter()
        .map(|(cap, words)| (cap, words.into_iter().map(|w| w.to_lowercase()).collect()))
        .collect();
    let retry = r
        .retry
        .map_or_else(|| Ok(Retry::default()), |raw| retry(errs, raw))?;
    let cooldown = r
        .cooldown
        .map_or_else(|| Ok(Cooldown::default()), |raw| cooldown(errs, raw))?;
    let max_wait = match r.max_wait {
        Some(m) => errs.duration("routing.max_wait".into(), &m)?,
        None => DEFAULT_MAX_WAIT,
    };
    Ok(Routing {
        strategy,
        explore,
        tolerance,
        prior,
        max_cost_per_task: r.max_cost_per_task,
        fallback: r.fallback,
        rules,
        keywords,
        retry,
        cooldown,
        max_wait,
    })
}
