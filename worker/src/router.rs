//! Picks, for each task, the providers and models to try, in order, and says why.
//!
//! 1. A provider/model hint is honoured first (its quota is checked at call time; when it is
//!    used up, routing falls through to the rest of the plan).
//! 2. A matching routing rule pins a model or sets the tier.
//! 3. Otherwise: every enabled model that has the capability the task needs (from its type
//!    and keywords in its prompt), is at least the tier its risk asks for, fits its context
//!    window and stays under `max_cost_per_task`, cheapest cost tier first (free, then
//!    subscription, then paid), then the preferred tier, then the lowest price.
//! 4. Providers in `routing.fallback` come last, with their cheapest capable model.

use std::collections::HashMap;
use std::sync::Arc;

use llmq_shared::config::{
    Capability, Config, Kind, Model, ProviderConfig, Risk, RuleTarget, Tier,
};
use llmq_shared::envelope::Envelope;
use llmq_shared::provider::Provider;
use llmq_shared::provider::anthropic::Anthropic;
use llmq_shared::provider::command::{CommandRunner, CommandSpec, PromptVia};
use llmq_shared::provider::gemini::Gemini;
use llmq_shared::provider::ollama::Ollama;
use llmq_shared::provider::openai::{OpenAi, TokenLimitField};
use llmq_shared::quota::estimate_tokens;

/// One provider and model to try.
#[derive(Clone)]
pub struct Candidate {
    pub provider: Arc<dyn Provider>,
    pub config: Arc<ProviderConfig>,
    pub model: Model,
    /// Estimated tokens in and out, for the quota reservation.
    pub estimated_tokens: u64,
    /// Estimated cost of one call, USD.
    pub estimated_usd: f64,
}

impl std::fmt::Debug for Candidate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.config.name, self.model.id)
    }
}

/// Where a task goes, in order of preference, and why the first one was chosen.
#[derive(Debug, Clone)]
pub struct Plan {
    pub candidates: Vec<Candidate>,
    pub reason: String,
}

/// A task that no configured model can take. Retrying cannot help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RouteError(String);

/// The configured providers, ready to call.
pub struct Router {
    config: Config,
    providers: HashMap<String, (Arc<dyn Provider>, Arc<ProviderConfig>)>,
}

/// Output tokens assumed when a task sets no `max_tokens`, for estimates.
const DEFAULT_OUTPUT_ESTIMATE: u64 = 1024;

impl Router {
    /// Builds a client per provider from the provider file.
    #[must_use]
    pub fn new(config: Config, http: &reqwest::Client) -> Self {
        let providers = config
            .providers
            .iter()
            .map(|p| (p.name.clone(), (build(p, http), Arc::new(p.clone()))))
            .collect();
        Self { config, providers }
    }

    /// Replaces the implementation behind provider `name` (benchmarks and tests use an
    /// in-process provider).
    #[must_use]
    pub fn with_provider(mut self, name: &str, provider: Arc<dyn Provider>) -> Self {
        if let Some(entry) = self.providers.get_mut(name) {
            entry.0 = provider;
        }
        self
    }

    #[must_use]
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The plan for `env`.
    ///
    /// # Errors
    /// The task names a provider or model that is not configured or is disabled, or no
    /// model can take it.
    pub fn plan(&self, env: &Envelope) -> Result<Plan, RouteError> {
        let task_type = env.task_type().unwrap_or_default();
        let routing = &self.config.routing;
        let prompt_tokens = estimate_tokens(env.system.as_deref(), &env.prompt);
        let output_tokens = env.max_tokens.map_or(DEFAULT_OUTPUT_ESTIMATE, u64::from);
        let risk = env.risk;
        let area = env.area.as_deref();

        let mut needs = vec![Capability::for_task(task_type)];
        let lower = env.prompt.to_lowercase();
        for (cap, words) in &routing.keywords {
            if words.iter().any(|w| lower.contains(w.as_str())) && !needs.contains(cap) {
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
        };
        let wanted_tier = match rule.map(|r| &r.target) {
            Some(RuleTarget::Tier(t)) => Some(*t),
            _ => None,
        };

        let candidate = |p: &Arc<ProviderConfig>, m: &Model| {
            let (provider, config) = self.providers.get(&p.name)?;
            let usd = m.prices.cost(&llmq_shared::provider::Usage {
                input_tokens: prompt_tokens,
                output_tokens,
                cached_tokens: 0,
                reasoning_tokens: 0,
            });
            Some(Candidate {
                provider: Arc::clone(provider),
                config: Arc::clone(config),
                model: m.clone(),
                estimated_tokens: prompt_tokens + output_tokens,
                estimated_usd: usd,
            })
        };
        let mut plan: Vec<Candidate> = Vec::new();
        let mut reason = String::new();

        // 1. Hints.
        if env.provider.is_some() || env.model.is_some() {
            let (p, m) = self.hinted(env)?;
            plan.extend(candidate(&p, &m));
            reason = match (&env.provider, &env.model) {
                (Some(_), Some(_)) => "provider and model hints honoured".into(),
                (Some(_), None) => "provider hint honoured; its cheapest model".into(),
                _ => "model hint honoured".into(),
            };
        }
        // 2. A rule naming a model.
        if let Some(RuleTarget::Model { provider, model }) = rule.map(|r| &r.target)
            && let Some((_, p)) = self.providers.get(provider).filter(|(_, p)| p.enabled)
            && let Some(m) = p.model(model)
        {
            if reason.is_empty() {
                reason = format!(
                    "routing rule: {}",
                    describe_rule(
                        task_type.as_str(),
                        risk,
                        area,
                        &format!("{provider}/{model}")
                    )
                );
            }
            plan.extend(candidate(p, m));
        }
        // 3. Everything capable, cheapest cost tier first.
        let mut capable: Vec<(Candidate, (u8, u8, u64))> = Vec::new();
        let mut excluded_by_cost = 0;
        for p in self.enabled() {
            for m in &p.models {
                if !needs.iter().all(|c| m.can(*c)) || m.tier < min_tier {
                    continue;
                }
                if m.context_window
                    .is_some_and(|w| prompt_tokens + output_tokens > w)
                {
                    continue;
                }
                let Some(c) = candidate(p, m) else { continue };
                if routing
                    .max_cost_per_task
                    .is_some_and(|cap| c.estimated_usd > cap)
                {
                    excluded_by_cost += 1;
                    continue;
                }
                let tier_miss = match wanted_tier {
                    Some(t) if t == m.tier => 0,
                    Some(_) => 1,
                    None => 0,
                };
                let price = ((m.prices.input + m.prices.output) * 1e6) as u64;
                capable.push((c, (p.cost_tier as u8, tier_miss, price)));
            }
        }
        capable.sort_by_key(|(_, key)| *key);
        if reason.is_empty()
            && let Some((first, _)) = capable.first()
        {
            let tier = first.config.cost_tier.as_str();
            reason = match (rule, wanted_tier) {
                (Some(_), Some(t)) => format!(
                    "routing rule: {}; cheapest {tier}-tier model",
                    describe_rule(task_type.as_str(), risk, area, t.as_str())
                ),
                _ => format!(
                    "cheapest capable model ({tier} tier) for {}",
                    needs_text(&needs)
                ),
            };
        }
        plan.extend(capable.into_iter().map(|(c, _)| c));
        // 4. Fallback providers.
        for name in &routing.fallback {
            if let Some((_, p)) = self.providers.get(name).filter(|(_, p)| p.enabled)
                && let Some(m) = p
                    .models
                    .iter()
                    .filter(|m| needs.iter().all(|c| m.can(*c)))
                    .min_by(|a, b| price(a).total_cmp(&price(b)))
            {
                plan.extend(candidate(p, m));
            }
        }
        dedup(&mut plan);
        if plan.is_empty() {
            let mut why = format!(
                "no enabled model can take this task: it needs {}",
                needs_text(&needs)
            );
            if min_tier > Tier::Fast {
                why.push_str(&format!(" at tier {} or above", min_tier.as_str()));
            }
            if excluded_by_cost > 0 {
                why.push_str(&format!(
                    "; {excluded_by_cost} model(s) would cost more than max_cost_per_task"
                ));
            }
            return Err(RouteError(why));
        }
        Ok(Plan {
            candidates: plan,
            reason,
        })
    }

    fn enabled(&self) -> impl Iterator<Item = &Arc<ProviderConfig>> {
        self.config
            .providers
            .iter()
            .filter_map(|p| self.providers.get(&p.name).map(|(_, c)| c))
            .filter(|p| p.enabled)
    }

    fn hinted(&self, env: &Envelope) -> Result<(Arc<ProviderConfig>, Model), RouteError> {
        match (&env.provider, &env.model) {
            (Some(name), model) => {
                let (_, p) = self.providers.get(name).ok_or_else(|| {
                    RouteError(format!(
                        "provider `{name}` is not in the provider file; known providers: {}",
                        self.config
                            .providers
                            .iter()
                            .map(|p| p.name.as_str())
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
                    Some(m) => find_model(p, m)?.clone(),
                    None => p
                        .models
                        .iter()
                        .min_by(|a, b| price(a).total_cmp(&price(b)))
                        .cloned()
                        .ok_or_else(|| RouteError(format!("provider `{name}` lists no model")))?,
                };
                Ok((Arc::clone(p), m))
            }
            (None, Some(m)) => {
                let p = self.enabled().find(|p| p.model(m).is_some()).ok_or_else(|| {
                    RouteError(format!("no enabled provider offers model `{m}`; add it under a provider's models"))
                })?;
                Ok((Arc::clone(p), find_model(p, m)?.clone()))
            }
            (None, None) => Err(RouteError("no hint".into())),
        }
    }
}

fn dedup(plan: &mut Vec<Candidate>) {
    let mut seen = std::collections::HashSet::new();
    plan.retain(|c| seen.insert((c.config.name.clone(), c.model.id.clone())));
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

fn build(p: &ProviderConfig, http: &reqwest::Client) -> Arc<dyn Provider> {
    let http = http.clone();
    match p.kind {
        Kind::Openai => Arc::new(OpenAi::new(
            &p.name,
            &p.base_url,
            p.api_key.clone(),
            TokenLimitField::MaxCompletionTokens,
            http,
        )),
        Kind::OpenaiCompatible => Arc::new(OpenAi::new(
            &p.name,
            &p.base_url,
            p.api_key.clone(),
            TokenLimitField::MaxTokens,
            http,
        )),
        Kind::Anthropic => Arc::new(Anthropic::new(
            &p.name,
            &p.base_url,
            p.api_key.clone(),
            http,
        )),
        Kind::Gemini => Arc::new(Gemini::new(&p.name, &p.base_url, p.api_key.clone(), http)),
        Kind::Ollama => Arc::new(Ollama::new(&p.name, &p.base_url, http)),
        Kind::Command => {
            let c = p
                .command
                .clone()
                .unwrap_or_else(|| llmq_shared::config::CommandConfig {
                    program: p.name.clone(),
                    args: Vec::new(),
                    prompt_via_stdin: true,
                    delay: None,
                });
            Arc::new(CommandRunner::new(
                &p.name,
                CommandSpec {
                    program: c.program,
                    args: c.args,
                    prompt_via: if c.prompt_via_stdin {
                        PromptVia::Stdin
                    } else {
                        PromptVia::Arg
                    },
                    env: Vec::new(),
                    delay: c.delay,
                },
            ))
        }
    }
}

fn find_model<'a>(p: &'a ProviderConfig, id: &str) -> Result<&'a Model, RouteError> {
    p.model(id).ok_or_else(|| {
        RouteError(format!(
            "provider `{}` has no model `{id}`; its models: {}",
            p.name,
            p.models
                .iter()
                .map(|m| m.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}

fn price(m: &Model) -> f64 {
    m.prices.input + m.prices.output
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(routing: &str) -> Router {
        let text = format!(
            r#"
providers:
  - name: paid
    kind: openai_compatible
    base_url: http://127.0.0.1:1/v1
    models:
      - {{id: big, tier: advanced, capabilities: [code, review, complex_reasoning, planning], input_usd_per_mtok: 5, output_usd_per_mtok: 15}}
      - {{id: small, tier: fast, capabilities: [code, docs, simple_tasks, analysis], input_usd_per_mtok: 0.1, output_usd_per_mtok: 0.4}}
  - name: sub
    kind: openai_compatible
    cost_tier: subscription
    base_url: http://127.0.0.1:2/v1
    models:
      - {{id: mid, tier: standard, capabilities: [code, analysis, docs], input_usd_per_mtok: 3, output_usd_per_mtok: 6}}
  - name: free
    kind: openai_compatible
    cost_tier: free
    base_url: http://127.0.0.1:3/v1
    models:
      - {{id: tiny, tier: fast, capabilities: [docs, simple_tasks], input_usd_per_mtok: 0, output_usd_per_mtok: 0}}
  - name: off
    kind: openai_compatible
    enabled: false
    base_url: http://127.0.0.1:4/v1
    models:
      - {{id: gone, input_usd_per_mtok: 0, output_usd_per_mtok: 0}}
{routing}
"#
        );
        let config = Config::parse("t.yaml", &text, &|_| None).unwrap();
        Router::new(config, &reqwest::Client::new())
    }

    fn order(plan: &Plan) -> Vec<String> {
        plan.candidates.iter().map(|c| format!("{c:?}")).collect()
    }

    fn task(prompt: &str, ty: &str) -> Envelope {
        let mut e = Envelope::new(prompt);
        e.task_type = Some(ty.into());
        e
    }

    #[test]
    fn cost_tiers_come_in_order_free_subscription_paid() {
        let r = router("");
        let p = r.plan(&task("write docs", "documentation")).unwrap();
        assert_eq!(order(&p), ["free/tiny", "sub/mid", "paid/small"]);
        assert!(
            p.reason.contains("cheapest capable model (free tier)"),
            "{}",
            p.reason
        );
        let p = r.plan(&task("write code", "code_generation")).unwrap();
        assert_eq!(
            order(&p),
            ["sub/mid", "paid/small", "paid/big"],
            "free/tiny cannot code"
        );
    }

    #[test]
    fn hints_come_first_and_the_rest_remains_as_fallback() {
        let r = router("");
        let mut e = task("x", "documentation");
        e.provider = Some("paid".into());
        e.model = Some("big".into());
        let p = r.plan(&e).unwrap();
        assert_eq!(order(&p)[0], "paid/big");
        assert_eq!(p.reason, "provider and model hints honoured");
        assert!(
            order(&p).contains(&"free/tiny".to_owned()),
            "routing falls through when the hint's quota is gone"
        );
    }

    #[test]
    fn risk_raises_the_tier_and_rules_pin_models() {
        let r = router(
            "routing:\n  rules:\n    - {task_type: code_review, risk: high, model: paid/big}\n    - {task_type: documentation, tier: fast}\n",
        );
        let mut e = task("review the auth module", "code_review");
        e.risk = Some(Risk::High);
        let p = r.plan(&e).unwrap();
        assert_eq!(order(&p), ["paid/big"]);
        assert!(
            p.reason
                .starts_with("routing rule: code_review, high risk → paid/big"),
            "{}",
            p.reason
        );
        let p = r.plan(&task("docs", "documentation")).unwrap();
        assert_eq!(order(&p)[0], "free/tiny");
        assert!(
            p.reason.contains("routing rule: documentation → fast"),
            "{}",
            p.reason
        );
    }

    #[test]
    fn keywords_add_capabilities_and_the_cost_cap_filters() {
        let r = router(
            "routing:\n  max_cost_per_task: 0.01\n  keywords:\n    complex_reasoning: [architecture]\n",
        );
        let e = task("design the architecture", "code_generation");
        let err = r.plan(&e).unwrap_err().to_string();
        assert!(err.contains("needs code + complex_reasoning"), "{err}");
        assert!(
            err.contains("would cost more than max_cost_per_task"),
            "{err}"
        );
    }

    #[test]
    fn unknown_or_disabled_names_are_clear_errors() {
        let r = router("");
        let mut env = Envelope::new("x");
        env.provider = Some("zzz".into());
        assert!(
            r.plan(&env)
                .unwrap_err()
                .0
                .contains("known providers: paid, sub, free, off")
        );
        env.provider = Some("off".into());
        assert!(r.plan(&env).unwrap_err().0.contains("disabled"));
        env.provider = Some("paid".into());
        env.model = Some("nope".into());
        assert!(
            r.plan(&env)
                .unwrap_err()
                .0
                .contains("its models: big, small")
        );
    }
}
