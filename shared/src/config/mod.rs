//! The provider file (`LLMQ_CONFIG`): providers, their models, prices, quotas, routing and
//! the scheduler.
//!
//! The YAML is read into `deny_unknown_fields` raw structs, then validated into typed config.
//! Every error names the file, the key, what is wrong and how to fix it. Everything the
//! scheduler would refuse is refused here, so `llmq providers check` and every binary agree.
//! Secrets are written as `${ENV_VAR}` (or `${ENV_VAR:-default}`) and held as `SecretString`.
//! `docs/configuration.md` documents every key.
//!
//! Layout:
//! - `raw`: the file's shape, as serde reads it;
//! - `provider`: providers, models, prices, quotas, and their validation;
//! - `routing`: rules, retries, cooldowns, and their validation;
//! - `scheduler`: lease, dead-letter retention, recurring tasks (cron parsed here);
//! - `checks`: the commands chains' `check` steps may run;
//! - `env`: `${VAR}` expansion.

use std::fmt;
use std::path::Path;
use std::time::Duration;

mod checks;
mod env;
mod provider;
mod raw;
mod routing;
mod scheduler;
mod tenants;

pub use checks::{CheckConfig, DEFAULT_CHECK_TIMEOUT};
pub use provider::*;
pub use routing::*;
pub use scheduler::*;
pub use tenants::{OnBudget, TenantLimits, Tenants};

use raw::RawFile;

/// A problem in the provider file: `file:key: what is wrong; how to fix`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Error {
    pub file: String,
    pub key: String,
    pub problem: String,
    pub fix: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}; {}",
            self.file, self.key, self.problem, self.fix
        )
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The validated provider file. The default has no provider: a binary fills it in from
/// `--config` before it runs, and a worker refuses to start without one.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub providers: Vec<ProviderConfig>,
    pub routing: Routing,
    pub scheduler: SchedulerConfig,
    /// Quality gates chains' `check` steps may run, by name.
    pub checks: std::collections::BTreeMap<String, CheckConfig>,
    pub chains: Chains,
    pub ledger: LedgerConfig,
    /// `tenants:`: each tenant's weight in a queue's room, and its limits.
    pub tenants: Tenants,
    pub answer_cache: AnswerCache,
    pub idempotency: Idempotency,
}

/// Idempotency keys (`idempotency:` in the provider file): how long after a keyed task
/// succeeded a copy of it is still answered with its answer, unless the task says
/// (`idempotency_window`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    /// Every queue's but those in `queues`.
    pub window: Duration,
    pub queues: std::collections::BTreeMap<String, Duration>,
}

/// `idempotency.window` when unset: a day, as BullMQ's and Stripe's keys.
pub const DEFAULT_IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 3600);

impl Default for Idempotency {
    fn default() -> Self {
        Self {
            window: DEFAULT_IDEMPOTENCY_WINDOW,
            queues: std::collections::BTreeMap::new(),
        }
    }
}

impl Idempotency {
    /// The window of queue `queue`'s keys.
    #[must_use]
    pub fn window_of(&self, queue: &str) -> Duration {
        self.queues.get(queue).copied().unwrap_or(self.window)
    }
}

/// `idempotency:`, checked: each window a TTL of 1s to 30d.
fn idempotency(errs: &Errors<'_>, raw: Option<raw::RawIdempotency>) -> Result<Idempotency> {
    let Some(raw) = raw else {
        return Ok(Idempotency::default());
    };
    let window = |key: String, text: &str| {
        crate::envelope::cache_ttl(text).map_err(|e| {
            errs.at(
                key,
                e,
                "it is how long after a keyed task succeeded its copies are answered with its answer",
            )
        })
    };
    let mut queues = std::collections::BTreeMap::new();
    for (queue, q) in raw.queues {
        let key = format!("idempotency.queues.{queue}.window");
        queues.insert(queue, window(key, &q.window)?);
    }
    Ok(Idempotency {
        window: match raw.window {
            Some(text) => window("idempotency.window".into(), &text)?,
            None => DEFAULT_IDEMPOTENCY_WINDOW,
        },
        queues,
    })
}

/// The answer cache (`answer_cache:` in the provider file): which queues' tasks are answered
/// from it without asking, and its bounds. A task's own `cache` comes first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnswerCache {
    /// Queues whose tasks are cached unless they say `"cache": false`.
    pub queues: std::collections::BTreeMap<String, QueueCache>,
    /// The most bytes of answers one queue keeps; the answers nearest their end go first.
    pub max_bytes: u64,
    /// Whether a tenant's request may be answered with another tenant's answer.
    pub share_across_tenants: bool,
    /// Tools whose calls depend on more than the request (the time, a database): a request
    /// offering one is never cached.
    pub uncacheable_tools: std::collections::BTreeSet<String>,
}

/// A queue's answer cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueCache {
    pub ttl: Duration,
    /// Whether sampled requests (`temperature` above 0 or unset) are cached too.
    pub sampled: bool,
}

/// `answer_cache.max_memory_mb` when unset: 256 MiB per queue.
pub const DEFAULT_ANSWER_CACHE_MB: u64 = 256;
/// The largest `answer_cache.max_memory_mb`: 1 TiB.
pub const MAX_ANSWER_CACHE_MB: u64 = 1024 * 1024;

impl Default for AnswerCache {
    fn default() -> Self {
        Self {
            queues: std::collections::BTreeMap::new(),
            max_bytes: DEFAULT_ANSWER_CACHE_MB * 1024 * 1024,
            share_across_tenants: false,
            uncacheable_tools: std::collections::BTreeSet::new(),
        }
    }
}

/// The highest `tenants.weights` value.
pub const MAX_TENANT_WEIGHT: i64 = 100;

/// What the Postgres ledger keeps (`ledger:` in the provider file).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LedgerConfig {
    /// Months of calls and tasks whose last day is older than this are dropped whole by the
    /// scheduler (the rollups stay); `None` keeps everything.
    pub retention: Option<Duration>,
}

/// The longest `ledger.retention` taken: ten years.
pub const MAX_LEDGER_RETENTION: Duration = Duration::from_secs(3660 * 24 * 3600);

/// How many times one step may run again after its first run (escalations, rejections and
/// `llmq chain retry` together) unless the provider file's `chains.max_rounds` says otherwise.
pub const DEFAULT_MAX_ROUNDS: u32 = 10;
/// The highest `chains.max_rounds` accepted.
pub const MAX_ROUNDS_CEILING: u32 = 100;

/// Bounds every chain meets, whatever its spec asks (`chains:` in the provider file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chains {
    /// The most times one step runs again after its first run, escalations, rejections sent
    /// back and `llmq chain retry` together.
    pub max_rounds: u32,
}

impl Default for Chains {
    fn default() -> Self {
        Self {
            max_rounds: DEFAULT_MAX_ROUNDS,
        }
    }
}

/// Builds errors that all name the same file.
pub(super) struct Errors<'a> {
    pub(super) file: &'a str,
    /// Whether secrets (`api_key`, a command's or check's `env:`) are read: the scheduler
    /// never calls a provider or runs a program, so it is given none of them.
    pub(super) with_secrets: bool,
}

impl Errors<'_> {
    pub(super) fn at(
        &self,
        key: impl Into<String>,
        problem: impl Into<String>,
        fix: &str,
    ) -> Error {
        Error {
            file: self.file.to_owned(),
            key: key.into(),
            problem: problem.into(),
            fix: fix.to_owned(),
        }
    }

    pub(super) fn duration(&self, key: String, text: &str) -> Result<Duration> {
        humantime::parse_duration(text).map_err(|e| {
            self.at(
                key,
                format!("`{text}` is not a duration ({e})"),
                "write it as e.g. 500ms, 2s or 5m",
            )
        })
    }
}

/// `ledger.retention`: between a day and [`MAX_LEDGER_RETENTION`]. A month's partition goes
/// once its last day is older than this, so the current month never can.
fn retention(errs: &Errors<'_>, text: &str) -> Result<Duration> {
    const DAY: Duration = Duration::from_secs(24 * 3600);
    let keep = errs.duration("ledger.retention".into(), text)?;
    if keep < DAY {
        return Err(errs.at(
            "ledger.retention",
            format!("`{text}` is shorter than a day, and the ledger drops whole months"),
            "give at least 1d (e.g. 400d), or leave it out to keep everything",
        ));
    }
    if keep > MAX_LEDGER_RETENTION {
        return Err(errs.at(
            "ledger.retention",
            format!("`{text}` is longer than ten years"),
            "give at most 3660d, or leave it out to keep everything",
        ));
    }
    Ok(keep)
}

/// `answer_cache:`, checked.
fn answer_cache(errs: &Errors<'_>, raw: Option<raw::RawAnswerCache>) -> Result<AnswerCache> {
    let Some(raw) = raw else {
        return Ok(AnswerCache::default());
    };
    let mb = raw.max_memory_mb.unwrap_or(DEFAULT_ANSWER_CACHE_MB);
    if !(1..=MAX_ANSWER_CACHE_MB).contains(&mb) {
        return Err(errs.at(
            "answer_cache.max_memory_mb",
            format!("{mb} is not between 1 and {MAX_ANSWER_CACHE_MB}"),
            "give the most megabytes of answers one queue keeps, e.g. 256",
        ));
    }
    let mut queues = std::collections::BTreeMap::new();
    for (queue, q) in raw.queues {
        let key = format!("answer_cache.queues.{queue}.ttl");
        let ttl = crate::envelope::cache_ttl(&q.ttl)
            .map_err(|e| errs.at(key, e, "it is how long an answer is kept"))?;
        queues.insert(
            queue,
            QueueCache {
                ttl,
                sampled: q.sampled,
            },
        );
    }
    Ok(AnswerCache {
        queues,
        max_bytes: mb * 1024 * 1024,
        share_across_tenants: raw.share_across_tenants,
        uncacheable_tools: raw.uncacheable_tools.into_iter().collect(),
    })
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error {
        file: path.display().to_string(),
        key: "-".into(),
        problem: format!("cannot read the provider file ({e})"),
        fix: "set LLMQ_CONFIG to the path of a provider file such as examples/providers.mock.yaml"
            .into(),
    })
}

impl Config {
    /// Every provider with its models' ids: the scopes of the fleet's circuits.
    #[must_use]
    pub fn circuit_scopes(&self) -> Vec<(String, Vec<String>)> {
        self.providers
            .iter()
            .map(|p| {
                (
                    p.name.to_string(),
                    p.models.iter().map(|m| m.id.to_string()).collect(),
                )
            })
            .collect()
    }

    /// Reads and validates the provider file at `path`.
    ///
    /// # Errors
    /// The file cannot be read, is not valid YAML of the expected shape, or fails validation.
    pub fn load(path: &Path) -> Result<Self> {
        let file = path.display().to_string();
        let text = read(path)?;
        Self::parse(&file, &text, &|name| std::env::var(name).ok())
    }

    /// [`Config::load`] without its secrets: `api_key` and `env:` values are neither read
    /// nor required, so a process that calls no provider and runs no program (the
    /// scheduler) needs no API key in its environment.
    ///
    /// # Errors
    /// As [`Config::load`], but for unset variables named only by secrets.
    pub fn load_without_secrets(path: &Path) -> Result<Self> {
        let file = path.display().to_string();
        let text = read(path)?;
        Self::parse_with(&file, &text, &|name| std::env::var(name).ok(), false)
    }

    /// Parses provider-file text; `env` looks up `${VAR}` references.
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn parse(file: &str, text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        Self::parse_with(file, text, env, true)
    }

    fn parse_with(
        file: &str,
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
        with_secrets: bool,
    ) -> Result<Self> {
        let errs = Errors { file, with_secrets };
        let raw: RawFile = serde_yaml_ng::from_str(text).map_err(|e| {
            let (key, problem) = split_yaml_error(&e.to_string());
            errs.at(
                key,
                problem,
                "see docs/configuration.md for every key and its type",
            )
        })?;
        if raw.providers.is_empty() {
            return Err(errs.at(
                "providers",
                "no provider is listed",
                "add at least one provider with a name, kind and models",
            ));
        }
        let mut providers = Vec::with_capacity(raw.providers.len());
        for (i, p) in raw.providers.into_iter().enumerate() {
            providers.push(provider::provider(&errs, i, p, env, &providers)?);
        }
        if !providers.iter().any(|p| p.enabled) {
            return Err(errs.at(
                "providers",
                "every provider is disabled",
                "set enabled: true on at least one provider",
            ));
        }
        let routing = match raw.routing {
            Some(r) => routing::routing(&errs, r, &providers)?,
            None => Routing::default(),
        };
        let scheduler = match raw.scheduler {
            Some(s) => scheduler::scheduler(&errs, s)?,
            None => SchedulerConfig::default(),
        };
        let checks = checks::checks(&errs, raw.checks, env)?;
        let chains = match raw.chains {
            None => Chains::default(),
            Some(c) => Chains {
                max_rounds: match c.max_rounds {
                    None => DEFAULT_MAX_ROUNDS,
                    Some(n) if (1..=MAX_ROUNDS_CEILING).contains(&n) => n,
                    Some(n) => {
                        return Err(errs.at(
                            "chains.max_rounds",
                            format!("{n} is not between 1 and {}", MAX_ROUNDS_CEILING),
                            "give how many times one chain step may run again, e.g. 10",
                        ));
                    }
                },
            },
        };
        let ledger = LedgerConfig {
            retention: match raw.ledger.and_then(|l| l.retention) {
                None => None,
                Some(text) => Some(retention(&errs, &text)?),
            },
        };
        let answer_cache = answer_cache(&errs, raw.answer_cache)?;
        let idempotency = idempotency(&errs, raw.idempotency)?;
        let tenants = tenants::tenants(&errs, raw.tenants)?;
        Ok(Self {
            providers,
            routing,
            scheduler,
            checks,
            chains,
            ledger,
            tenants,
            answer_cache,
            idempotency,
        })
    }

    #[must_use]
    pub fn provider(&self, name: &str) -> Option<&ProviderConfig> {
        self.providers.iter().find(|p| *p.name == *name)
    }

    /// The tier of model `id`, at the first provider that lists it.
    #[must_use]
    pub fn tier_of(&self, id: &str) -> Option<crate::envelope::Tier> {
        let mut models = self.providers.iter().flat_map(|p| &p.models);
        models.find(|m| *m.id == *id).map(|m| m.tier)
    }
}

/// serde_yaml_ng says `providers[0].kind: unknown variant ...`; split the path off.
fn split_yaml_error(msg: &str) -> (String, String) {
    match msg.split_once(": ") {
        Some((path, rest))
            if !path.contains(' ')
                && (path.contains('.')
                    || path.contains('[')
                    || path == "providers"
                    || path == "routing") =>
        {
            (path.to_owned(), rest.to_owned())
        }
        _ => ("-".to_owned(), msg.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "KEY").then(|| "sk-test".to_owned())
    }

    const GOOD: &str = r#"
providers:
  - name: mock
    kind: openai_compatible
    base_url: ${MOCK_URL:-http://127.0.0.1:8089}/v1
    api_key: ${KEY}
    cost_tier: free
    quotas: {requests_per_day: 100, rpm: 10}
    models:
      - id: mock-fast
        capabilities: [code, docs]
        tier: fast
        context_window: 8000
        input_usd_per_mtok: 1.0
        output_usd_per_mtok: 2.0
        cached_input_usd_per_mtok: 0.5
  - name: cli
    kind: command
    command: {program: claude, args: ["-p"], prompt_via: stdin, delay: [1s, 2s]}
    models:
      - {id: sonnet, input_usd_per_mtok: 0, output_usd_per_mtok: 0}
routing:
  max_cost_per_task: 0.5
  fallback: [cli]
  rules:
    - {task_type: documentation, tier: fast}
    - {risk: high, model: mock/mock-fast}
  keywords:
    review: [audit]
  retry: {tries_per_provider: 2, backoff: [10ms, 20ms]}
  cooldown: {after_failures: 3, for: 30s}
"#;

    #[test]
    fn a_good_file_parses_and_expands_env() {
        let c = Config::parse("p.yaml", GOOD, &env).unwrap();
        let p = c.provider("mock").unwrap();
        assert_eq!(p.base_url, "http://127.0.0.1:8089/v1");
        assert_eq!(
            secrecy::ExposeSecret::expose_secret(p.api_key.as_ref().unwrap()),
            "sk-test"
        );
        let m = p.model("mock-fast").unwrap();
        assert_eq!(m.prices.cached_input, 0.5);
        assert_eq!((m.tier, p.cost_tier), (Tier::Fast, CostTier::Free));
        assert_eq!(p.quotas.rpm, Some(10));
        let shared = Config::parse(
            "p.yaml",
            &GOOD.replace("rpm: 10", "rpm: 10, reserve: {0: 50, 2: 20}"),
            &env,
        )
        .unwrap();
        let mut reserve = [0; 10];
        (reserve[0], reserve[2]) = (50, 20);
        assert_eq!(shared.providers[0].quotas.reserve, reserve);
        let cli = c.provider("cli").unwrap();
        assert_eq!(
            cli.command.as_ref().unwrap().delay,
            Some((Duration::from_secs(1), Duration::from_secs(2)))
        );
        assert_eq!(c.routing.retry.tries_per_provider, 2);
        assert_eq!(c.routing.cooldown.after_failures, 3);
        assert_eq!(c.routing.rules.len(), 2);
        assert_eq!(
            c.routing.keywords,
            vec![(Capability::Review, vec!["audit".to_owned()])]
        );
    }

    #[test]
    fn connections_default_and_out_of_range_names_the_key() {
        let c = Config::parse("p.yaml", GOOD, &env).unwrap();
        assert_eq!(
            c.provider("mock").unwrap().connections,
            provider::DEFAULT_CONNECTIONS
        );
        let four = GOOD.replace("cost_tier: free", "cost_tier: free\n    connections: 4");
        let c = Config::parse("p.yaml", &four, &env).unwrap();
        assert_eq!(c.provider("mock").unwrap().connections, 4);
        let zero = GOOD.replace("cost_tier: free", "cost_tier: free\n    connections: 0");
        let err = Config::parse("p.yaml", &zero, &env)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("providers[0].connections") && err.contains("use 1 to 1024"),
            "{err}"
        );
    }

    #[test]
    fn answer_cache_queues_ttls_and_bound_are_checked_naming_the_key() {
        let c = Config::parse("p.yaml", GOOD, &env).unwrap();
        assert_eq!(c.answer_cache, AnswerCache::default(), "off unless asked");
        assert_eq!(c.answer_cache.max_bytes, 256 * 1024 * 1024);
        let with = |a: &str| format!("{GOOD}answer_cache:\n{a}");
        let on = with(
            "  max_memory_mb: 16\n  share_across_tenants: true\n  uncacheable_tools: [now]\n  queues:\n    reviews: {ttl: 24h, sampled: true}\n",
        );
        let c = Config::parse("p.yaml", &on, &env).unwrap();
        assert_eq!(c.answer_cache.max_bytes, 16 * 1024 * 1024);
        assert!(c.answer_cache.share_across_tenants);
        assert!(c.answer_cache.uncacheable_tools.contains("now"));
        assert_eq!(
            c.answer_cache.queues["reviews"],
            QueueCache {
                ttl: Duration::from_secs(24 * 3600),
                sampled: true
            }
        );
        for (a, key, says) in [
            (
                "  queues:\n    reviews: {ttl: 0s}\n",
                "answer_cache.queues.reviews.ttl",
                "between 1s and 30d",
            ),
            (
                "  queues:\n    reviews: {ttl: 40d}\n",
                "answer_cache.queues.reviews.ttl",
                "between 1s and 30d",
            ),
            (
                "  queues:\n    reviews: {ttl: tomorrow}\n",
                "answer_cache.queues.reviews.ttl",
                "not a duration",
            ),
            (
                "  max_memory_mb: 0\n",
                "answer_cache.max_memory_mb",
                "not between",
            ),
            ("  max_bytes: 5\n", "max_bytes", "unknown field"),
        ] {
            let err = Config::parse("p.yaml", &with(a), &env)
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains(says), "{a}: {err}");
        }
    }

    #[test]
    fn tenant_weights_are_one_to_a_hundred_tasks_a_turn() {
        let with = |w: &str| format!("{GOOD}tenants:\n  weights: {w}\n");
        let c = Config::parse("p.yaml", &with("{acme: 3, globex: 1}"), &env).unwrap();
        assert_eq!(
            c.tenants.weights,
            std::collections::BTreeMap::from([("acme".to_owned(), 3)]),
            "a weight of 1 is the default, not listed"
        );
        for (w, key, says) in [
            ("{acme: 0}", "tenants.weights.acme", "0 is not a weight"),
            ("{acme: 101}", "tenants.weights.acme", "101 is not a weight"),
            ("{\"\": 2}", "tenants.weights.", "is empty"),
        ] {
            let err = Config::parse("p.yaml", &with(w), &env)
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains(says), "{w}: {err}");
        }
    }

    #[test]
    fn tenant_limits_are_read_per_tenant_with_a_default_and_say_which_key_and_fix() {
        let with = |l: &str| format!("{GOOD}tenants:\n{l}");
        let c = Config::parse(
            "p.yaml",
            &with(
                "  limits:\n    acme: {budget_usd: {day: 5, month: 100}, rpm: 60, on_budget: downgrade}\n    \
                 globex: {max_in_flight: 2, tpm: 50000, on_budget: fail}\n  \
                 default_limits: {budget_usd: {month: 10}}\n",
            ),
            &env,
        )
        .unwrap();
        let acme = c.tenants.limits_of("acme").unwrap();
        assert_eq!(
            (
                acme.budget_usd_day,
                acme.budget_usd_month,
                acme.rpm,
                acme.on_budget
            ),
            (Some(5.0), Some(100.0), Some(60), OnBudget::Downgrade)
        );
        let globex = c.tenants.limits_of("globex").unwrap();
        assert_eq!(
            (
                globex.max_in_flight,
                globex.tpm,
                globex.on_budget,
                globex.budget_usd_month
            ),
            (Some(2), Some(50000), OnBudget::Fail, None)
        );
        let other = c.tenants.limits_of("initech").unwrap();
        assert_eq!(
            (other.budget_usd_month, other.on_budget),
            (Some(10.0), OnBudget::Wait),
            "a tenant not named has the default limits"
        );
        let none = Config::parse("p.yaml", GOOD, &env).unwrap();
        assert_eq!(none.tenants.limits_of("acme"), None);
        for (l, key, says) in [
            (
                "  limits:\n    acme: {budget_usd: {day: 0}}\n",
                "tenants.limits.acme.budget_usd.day",
                "is not a budget",
            ),
            (
                "  limits:\n    acme: {budget_usd: {week: 3}}\n",
                "week",
                "unknown field",
            ),
            (
                "  limits:\n    acme: {rpm: 0}\n",
                "tenants.limits.acme.rpm",
                "would stop every call",
            ),
            (
                "  limits:\n    acme: {on_budget: panic}\n",
                "tenants.limits.acme.on_budget",
                "give wait, downgrade or fail",
            ),
            (
                "  default_limits: {max_in_flight: 0}\n",
                "tenants.default_limits.max_in_flight",
                "would stop",
            ),
            (
                "  limits:\n    \"\": {rpm: 3}\n",
                "tenants.limits.",
                "is empty",
            ),
        ] {
            let err = Config::parse("p.yaml", &with(l), &env)
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains(says), "{l}: {err}");
        }
    }

    #[test]
    fn ledger_retention_is_a_day_to_ten_years_and_says_which_key_and_fix() {
        let c = Config::parse("p.yaml", GOOD, &env).unwrap();
        assert_eq!(c.ledger.retention, None, "everything is kept by default");
        let with = |r: &str| format!("{GOOD}ledger:\n  retention: {r}\n");
        let c = Config::parse("p.yaml", &with("400d"), &env).unwrap();
        assert_eq!(
            c.ledger.retention,
            Some(Duration::from_secs(400 * 24 * 3600))
        );
        for (bad, says) in [
            ("12h", "shorter than a day"),
            ("0s", "shorter than a day"),
            ("3661d", "longer than ten years"),
            ("forever", "is not a duration"),
        ] {
            let err = Config::parse("p.yaml", &with(bad), &env)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("ledger.retention") && err.contains(says),
                "{bad}: {err}"
            );
        }
        let err = Config::parse("p.yaml", &format!("{GOOD}ledger:\n  keep: 4d\n"), &env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("keep"), "{err}");
    }

    #[test]
    fn without_secrets_no_api_key_is_needed_or_read() {
        let err = Config::parse("p.yaml", GOOD, &|_| None).unwrap_err();
        assert!(err.to_string().contains("api_key"), "{err}");
        let c = Config::parse_with("p.yaml", GOOD, &|_| None, false).unwrap();
        assert!(c.provider("mock").unwrap().api_key.is_none());
        let c = Config::parse_with("p.yaml", GOOD, &env, false).unwrap();
        assert!(c.provider("mock").unwrap().api_key.is_none());
    }

    #[test]
    fn the_shipped_provider_files_are_valid() {
        let any = |name: &str| (!name.ends_with("_URL")).then(|| "set".to_owned());
        let example = Config::parse(
            "providers.example.yaml",
            include_str!("../../../providers.example.yaml"),
            &any,
        )
        .unwrap();
        assert!(example.providers.len() >= 6);
        assert!(!example.routing.rules.is_empty());
        Config::parse(
            "providers.mock.yaml",
            include_str!("../../../examples/providers.mock.yaml"),
            &any,
        )
        .unwrap();
        // The provider file the Kubernetes manifests mount.
        let kubernetes = Config::parse(
            "deploy/kubernetes/base/providers.yaml",
            include_str!("../../../deploy/kubernetes/base/providers.yaml"),
            &any,
        )
        .unwrap();
        assert!(!kubernetes.providers.is_empty());
        Config::parse(
            "providers.openai.yaml",
            include_str!("../../../examples/providers.openai.yaml"),
            &any,
        )
        .unwrap();
    }

    #[test]
    fn the_bundled_table_fills_in_prices_and_the_file_overrides_it() {
        let table = bundled_prices();
        assert!(table.models.len() >= 20, "the bundled table parses");
        assert!(!table.as_of.is_empty() && !table.source.is_empty());
        let text = r#"
providers:
  - name: openai
    kind: openai
    api_key: k
    models:
      - {id: gpt-4o-mini}
      - {id: gpt-4o, input_usd_per_mtok: 2.0, output_usd_per_mtok: 8.0}
"#;
        let c = Config::parse("p.yaml", text, &env).unwrap();
        let p = c.provider("openai").unwrap();
        let mini = p.model("gpt-4o-mini").unwrap();
        assert_eq!(mini.price_source, PriceSource::Bundled);
        assert_eq!(
            (
                mini.prices.input,
                mini.prices.output,
                mini.prices.cached_input
            ),
            (0.15, 0.60, 0.075)
        );
        assert_eq!(mini.context_window, Some(128000));
        let big = p.model("gpt-4o").unwrap();
        assert_eq!(
            (big.price_source, big.prices.input),
            (PriceSource::File, 2.0)
        );
        let err = Config::parse(
            "p.yaml",
            &text.replace("{id: gpt-4o-mini}", "{id: my-own-model}"),
            &env,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("not in llmq's bundled price table"),
            "{err}"
        );
        let err = Config::parse(
            "p.yaml",
            &text.replace(
                "{id: gpt-4o-mini}",
                "{id: gpt-4o-mini, input_usd_per_mtok: 1}",
            ),
            &env,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("only one of the input and output prices"),
            "{err}"
        );
    }

    #[test]
    fn cost_prices_cached_tokens_at_their_rate() {
        let prices = Prices::list(1.0, 2.0, 0.5);
        let usage = crate::outcome::Usage {
            input_tokens: 1_000_000,
            output_tokens: 1_000_000,
            cached_tokens: 500_000,
            cache_write_tokens: 0,
            reasoning_tokens: 0,
        };
        assert!((prices.cost(&usage) - 2.75).abs() < 1e-9);
    }

    #[test]
    fn cache_writes_cost_a_quarter_more_than_input_unless_the_file_says() {
        // 1M input tokens: 200k read from the cache, 300k written to it, 500k plain.
        let usage = crate::outcome::Usage {
            input_tokens: 1_000_000,
            output_tokens: 0,
            cached_tokens: 200_000,
            cache_write_tokens: 300_000,
            reasoning_tokens: 0,
        };
        let prices = Prices::list(3.0, 15.0, 0.3);
        assert!((prices.cost(&usage) - (1.5 + 0.06 + 1.125)).abs() < 1e-9);
        // The batch discount applies to writes as to the rest.
        assert!((prices.batch().cost(&usage) - (1.5 + 0.06 + 1.125) / 2.0).abs() < 1e-9);
        let config = Config::parse(
            "p.yaml",
            &GOOD.replace(
                "input_usd_per_mtok: 1.0",
                "input_usd_per_mtok: 1.0\n        cache_write_usd_per_mtok: 2.0",
            ),
            &env,
        )
        .unwrap();
        assert_eq!(config.providers[0].models[0].prices.cache_write, 2.0);
        assert!(config.providers[0].prompt_cache, "on unless the file says");
        let off = Config::parse(
            "p.yaml",
            &GOOD.replace(
                "kind: openai_compatible",
                "kind: openai_compatible\n    prompt_cache: false",
            ),
            &env,
        )
        .unwrap();
        assert!(!off.providers[0].prompt_cache);
        // An Anthropic model without a cached price reads the cache at a tenth of its input
        // price, as Anthropic bills it; another kind at its input price, unless the file says.
        let anthropic = Config::parse(
            "p.yaml",
            "providers:\n  - name: claude\n    kind: anthropic\n    api_key: k\n    models:\n      - {id: c, input_usd_per_mtok: 3, output_usd_per_mtok: 15}\n",
            &env,
        )
        .unwrap();
        let prices = anthropic.providers[0].models[0].prices;
        assert!((prices.cached_input - 0.3).abs() < 1e-12 && prices.cache_write == 3.75);
        assert_eq!(config.providers[0].models[0].prices.cached_input, 0.5);
    }

    #[test]
    fn broken_files_name_the_key() {
        let cases = [
            (
                GOOD.replace("kind: openai_compatible", "kind: telepathy"),
                "providers[0].kind",
            ),
            (GOOD.replace("${KEY}", "${NOPE}"), "providers[0].api_key"),
            (
                GOOD.replace(
                    "base_url: ${MOCK_URL:-http://127.0.0.1:8089}/v1",
                    "base_url: ftp://x",
                ),
                "providers[0].base_url",
            ),
            (
                GOOD.replace("input_usd_per_mtok: 1.0", "input_usd_per_mtok: -1"),
                "providers[0].models[0].input_usd_per_mtok",
            ),
            (
                GOOD.replace("    api_key", "    colour: red\n    api_key"),
                "providers[0]",
            ),
            (
                GOOD.replace("name: mock", "name: my mock"),
                "providers[0].name",
            ),
            ("providers: []".to_owned(), "providers"),
            (
                GOOD.replace("cost_tier: free", "cost_tier: cheap"),
                "providers[0].cost_tier",
            ),
            (GOOD.replace("rpm: 10", "rpm: 0"), "providers[0].quotas.rpm"),
            (
                GOOD.replace("rpm: 10", "rpm: 10, reserve: {12: 50}"),
                "providers[0].quotas.reserve",
            ),
            (
                GOOD.replace("rpm: 10", "rpm: 10, reserve: {0: 0}"),
                "providers[0].quotas.reserve.0",
            ),
            (
                GOOD.replace("rpm: 10", "rpm: 10, reserve: {0: 60, 3: 40}"),
                "providers[0].quotas.reserve",
            ),
            (
                GOOD.replace("rpm: 10", "reserve: {0: 60}"),
                "providers[0].quotas.reserve",
            ),
            (
                GOOD.replace("rpm: 10", "rpm: 10, window: 2d"),
                "providers[0].quotas.window",
            ),
            (
                GOOD.replace("rpm: 10", "rpm: 10, burst: 11"),
                "providers[0].quotas.burst",
            ),
            (
                GOOD.replace("rpm: 10", "burst: 2"),
                "providers[0].quotas.burst",
            ),
            (
                GOOD.replace(
                    "tier: fast\n        context",
                    "tier: genius\n        context",
                ),
                "providers[0].models[0].tier",
            ),
            (
                GOOD.replace("[code, docs]", "[code, poetry]"),
                "providers[0].models[0].capabilities",
            ),
            (
                GOOD.replace("context_window: 8000", "context_window: 0"),
                "providers[0].models[0].context_window",
            ),
            (
                GOOD.replace("delay: [1s, 2s]", "delay: [3s, 2s]"),
                "providers[1].command.delay",
            ),
            (
                GOOD.replace(
                    "command: {program: claude, args: [\"-p\"], prompt_via: stdin, delay: [1s, 2s]}",
                    "",
                ),
                "providers[1].command",
            ),
            (
                GOOD.replace("fallback: [cli]", "fallback: [nobody]"),
                "routing.fallback[0]",
            ),
            (
                GOOD.replace("fallback: [cli]", "fallback: [cli]\n  max_wait: a while"),
                "routing.max_wait",
            ),
            (
                GOOD.replace(
                    "{task_type: documentation, tier: fast}",
                    "{task_type: poetry, tier: fast}",
                ),
                "routing.rules[0].task_type",
            ),
            (
                GOOD.replace("model: mock/mock-fast", "model: mock-fast"),
                "routing.rules[1].model",
            ),
            (
                GOOD.replace("{task_type: documentation, tier: fast}", "{tier: fast}"),
                "routing.rules[0]",
            ),
            (
                GOOD.replace("backoff: [10ms, 20ms]", "backoff: [soon]"),
                "routing.retry.backoff[0]",
            ),
            (
                GOOD.replace("for: 30s", "for: forever"),
                "routing.cooldown.for",
            ),
            (
                GOOD.replace("max_cost_per_task: 0.5", "max_cost_per_task: -1"),
                "routing.max_cost_per_task",
            ),
        ];
        for (text, key) in cases {
            let e = Config::parse("p.yaml", &text, &env).unwrap_err();
            assert!(
                e.to_string().starts_with(&format!("p.yaml:{key}")),
                "want {key}: {e}"
            );
            assert!(!e.fix.is_empty());
        }
    }
}
