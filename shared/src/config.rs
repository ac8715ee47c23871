//! The provider file (`LLMQ_CONFIG`): providers, their models, prices, quotas, and routing.
//!
//! The YAML is read into `deny_unknown_fields` raw structs, then validated into typed config.
//! Every error names the file, the key, what is wrong and how to fix it.
//! Secrets are written as `${ENV_VAR}` (or `${ENV_VAR:-default}`) and held as [`SecretString`].
//! `docs/configuration.md` documents every key.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

use crate::envelope::TaskType;

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

/// The wire format a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// api.openai.com: the output limit is sent as `max_completion_tokens`.
    Openai,
    /// Any OpenAI-compatible server: the output limit is sent as `max_tokens`.
    OpenaiCompatible,
    /// Anthropic Messages.
    Anthropic,
    /// Google Gemini generateContent.
    Gemini,
    /// Ollama's native `/api/chat`.
    Ollama,
    /// A local CLI (`claude -p`, `gemini -p`, `codex exec`).
    Command,
}

impl Kind {
    fn default_base_url(self) -> Option<&'static str> {
        match self {
            Kind::Openai => Some("https://api.openai.com/v1"),
            Kind::Anthropic => Some("https://api.anthropic.com"),
            Kind::Gemini => Some("https://generativelanguage.googleapis.com/v1beta"),
            Kind::Ollama => Some("http://127.0.0.1:11434"),
            Kind::OpenaiCompatible | Kind::Command => None,
        }
    }

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Openai => "openai",
            Kind::OpenaiCompatible => "openai_compatible",
            Kind::Anthropic => "anthropic",
            Kind::Gemini => "gemini",
            Kind::Ollama => "ollama",
            Kind::Command => "command",
        }
    }
}

/// How a provider is paid for; routing prefers free, then subscription, then paid.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize, Default,
)]
#[serde(rename_all = "snake_case")]
pub enum CostTier {
    Free,
    Subscription,
    #[default]
    Paid,
}

/// How capable a model is.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize, Default,
)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    Fast,
    #[default]
    Standard,
    Advanced,
}

impl Tier {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Fast => "fast",
            Tier::Standard => "standard",
            Tier::Advanced => "advanced",
        }
    }
}

impl CostTier {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            CostTier::Free => "free",
            CostTier::Subscription => "subscription",
            CostTier::Paid => "paid",
        }
    }
}

impl Risk {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Risk::Low => "low",
            Risk::Medium => "medium",
            Risk::High => "high",
        }
    }
}

/// What a model is good for.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, serde::Serialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Capability {
    Code,
    Analysis,
    Planning,
    Review,
    ComplexReasoning,
    Docs,
    SimpleTasks,
}

impl Capability {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Code => "code",
            Capability::Analysis => "analysis",
            Capability::Planning => "planning",
            Capability::Review => "review",
            Capability::ComplexReasoning => "complex_reasoning",
            Capability::Docs => "docs",
            Capability::SimpleTasks => "simple_tasks",
        }
    }

    pub const ALL: [Capability; 7] = [
        Capability::Code,
        Capability::Analysis,
        Capability::Planning,
        Capability::Review,
        Capability::ComplexReasoning,
        Capability::Docs,
        Capability::SimpleTasks,
    ];

    /// What a task type needs by default.
    #[must_use]
    pub fn for_task(t: TaskType) -> Capability {
        match t {
            TaskType::CodeGeneration
            | TaskType::Refactoring
            | TaskType::SqlDbWork
            | TaskType::Testing
            | TaskType::Debugging => Capability::Code,
            TaskType::Research | TaskType::DataAnalysis => Capability::Analysis,
            TaskType::Documentation => Capability::Docs,
            TaskType::CodeReview => Capability::Review,
            TaskType::Planning => Capability::Planning,
        }
    }
}

/// How risky a task is; risk raises the minimum tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Risk {
    Low,
    Medium,
    High,
}

/// USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Prices {
    pub input: f64,
    pub output: f64,
    /// Cached prompt tokens; the input price when the provider file gives none.
    pub cached_input: f64,
}

impl Prices {
    /// The cost of one call in USD. Cached tokens are part of `input_tokens` and priced at
    /// their own rate; reasoning tokens are part of `output_tokens`.
    #[must_use]
    pub fn cost(&self, usage: &crate::provider::Usage) -> f64 {
        let cached = usage.cached_tokens.min(usage.input_tokens);
        let fresh = usage.input_tokens - cached;
        (fresh as f64 * self.input
            + cached as f64 * self.cached_input
            + usage.output_tokens as f64 * self.output)
            / 1_000_000.0
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub id: String,
    pub name: String,
    pub capabilities: Vec<Capability>,
    pub tier: Tier,
    pub context_window: Option<u64>,
    pub prices: Prices,
    /// Where the prices come from.
    pub price_source: PriceSource,
}

/// Where a model's prices come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PriceSource {
    /// The provider file.
    File,
    /// llmq's bundled price table (`shared/src/prices.yaml`), for a model the file gives no
    /// prices for.
    Bundled,
}

impl PriceSource {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            PriceSource::File => "provider file",
            PriceSource::Bundled => "bundled table",
        }
    }
}

/// llmq's bundled price table.
#[derive(Debug, Deserialize)]
pub struct PriceTable {
    /// Where the figures come from.
    pub source: String,
    /// When they were last checked.
    pub as_of: String,
    pub models: std::collections::BTreeMap<String, BundledPrice>,
}

/// One model of the bundled table, USD per million tokens.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundledPrice {
    pub input: f64,
    pub output: f64,
    pub cached_input: Option<f64>,
    pub context_window: Option<u64>,
}

/// The bundled price table; no network needed.
#[must_use]
pub fn bundled_prices() -> &'static PriceTable {
    static TABLE: std::sync::OnceLock<PriceTable> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        serde_yaml_ng::from_str(include_str!("prices.yaml")).unwrap_or_else(|_| PriceTable {
            source: "unreadable".into(),
            as_of: String::new(),
            models: std::collections::BTreeMap::new(),
        })
    })
}

impl Model {
    /// A model without listed capabilities can do anything.
    #[must_use]
    pub fn can(&self, c: Capability) -> bool {
        self.capabilities.is_empty() || self.capabilities.contains(&c)
    }
}

/// Limits shared by every worker. Days and months reset in UTC.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quotas {
    pub requests_per_day: Option<u64>,
    pub usd_per_month: Option<f64>,
    /// Requests per sliding `window`.
    pub rpm: Option<u64>,
    /// Tokens per sliding `window`.
    pub tpm: Option<u64>,
    /// The window `rpm` and `tpm` count over: one minute unless the file says otherwise.
    pub window: Duration,
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            requests_per_day: None,
            usd_per_month: None,
            rpm: None,
            tpm: None,
            window: Duration::from_secs(60),
        }
    }
}

impl Quotas {
    /// True when no limit is set.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.requests_per_day.is_none()
            && self.usd_per_month.is_none()
            && self.rpm.is_none()
            && self.tpm.is_none()
    }
}

/// How a `command` provider runs its CLI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandConfig {
    pub program: String,
    pub args: Vec<String>,
    pub prompt_via_stdin: bool,
    pub delay: Option<(Duration, Duration)>,
}

#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub name: String,
    pub kind: Kind,
    pub enabled: bool,
    pub base_url: String,
    pub api_key: Option<SecretString>,
    pub cost_tier: CostTier,
    pub quotas: Quotas,
    pub command: Option<CommandConfig>,
    pub models: Vec<Model>,
}

impl ProviderConfig {
    #[must_use]
    pub fn model(&self, id: &str) -> Option<&Model> {
        self.models.iter().find(|m| m.id == id)
    }
}

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

#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
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

/// How long dead letters are kept.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retention {
    /// Dead letters older than this are archived to Postgres and trimmed from Redis.
    pub keep_in_redis: Duration,
    /// Past this many, the oldest are archived and trimmed regardless of age.
    pub max_in_redis: u64,
    /// Archived dead letters older than this are deleted from Postgres.
    pub keep_archived: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            keep_in_redis: Duration::from_secs(7 * 24 * 3600),
            max_in_redis: 10_000,
            keep_archived: Duration::from_secs(90 * 24 * 3600),
        }
    }
}

/// A task the scheduler enqueues on a cron schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct Recurring {
    /// Unique; names the task in logs and in its exactly-once marker.
    pub name: String,
    /// The cron expression, as written; the scheduler parses it.
    pub cron: String,
    pub queue: String,
    /// Envelope fields (prompt, type, model, ...) for each run; `v` and `id` are added.
    pub task: serde_json::Map<String, serde_json::Value>,
}

/// The scheduler's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// How long a scheduler's lease lasts without renewal; a standby takes over after it.
    pub lease: Duration,
    pub dead_letters: Retention,
    pub recurring: Vec<Recurring>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(15),
            dead_letters: Retention::default(),
            recurring: Vec::new(),
        }
    }
}

/// The validated provider file.
#[derive(Debug, Clone)]
pub struct Config {
    pub providers: Vec<ProviderConfig>,
    pub routing: Routing,
    pub scheduler: SchedulerConfig,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    providers: Vec<RawProvider>,
    #[serde(default)]
    routing: Option<RawRouting>,
    #[serde(default)]
    scheduler: Option<RawScheduler>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScheduler {
    lease: Option<String>,
    dead_letters: Option<RawRetention>,
    #[serde(default)]
    recurring: Vec<RawRecurring>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    keep_in_redis: Option<String>,
    max_in_redis: Option<u64>,
    keep_archived: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecurring {
    name: String,
    cron: String,
    #[serde(default = "default_queue")]
    queue: String,
    task: serde_json::Map<String, serde_json::Value>,
}

fn default_queue() -> String {
    "default".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    name: String,
    kind: Kind,
    #[serde(default = "yes")]
    enabled: bool,
    base_url: Option<String>,
    api_key: Option<String>,
    #[serde(default)]
    cost_tier: CostTier,
    #[serde(default)]
    quotas: Option<RawQuotas>,
    #[serde(default)]
    command: Option<RawCommand>,
    models: Vec<RawModel>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuotas {
    requests_per_day: Option<u64>,
    usd_per_month: Option<f64>,
    rpm: Option<u64>,
    tpm: Option<u64>,
    /// Only UTC is supported; accepted so files can say so.
    reset_timezone: Option<String>,
    window: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCommand {
    program: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    prompt_via: Option<String>,
    #[serde(default)]
    delay: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    id: String,
    name: Option<String>,
    #[serde(default)]
    capabilities: Vec<Capability>,
    #[serde(default)]
    tier: Tier,
    context_window: Option<u64>,
    input_usd_per_mtok: Option<f64>,
    output_usd_per_mtok: Option<f64>,
    cached_input_usd_per_mtok: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouting {
    #[serde(default)]
    strategy: Option<String>,
    max_cost_per_task: Option<f64>,
    #[serde(default)]
    fallback: Vec<String>,
    #[serde(default)]
    rules: Vec<RawRule>,
    #[serde(default)]
    keywords: std::collections::BTreeMap<Capability, Vec<String>>,
    retry: Option<RawRetry>,
    cooldown: Option<RawCooldown>,
    max_wait: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    task_type: Option<String>,
    risk: Option<Risk>,
    area: Option<String>,
    tier: Option<Tier>,
    model: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    tries_per_provider: Option<u32>,
    backoff: Option<Vec<String>>,
    max_retry_after: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCooldown {
    after_failures: Option<u32>,
    #[serde(rename = "for")]
    duration: Option<String>,
}

/// Builds errors that all name the same file.
struct Errors<'a> {
    file: &'a str,
}

impl Errors<'_> {
    fn at(&self, key: impl Into<String>, problem: impl Into<String>, fix: &str) -> Error {
        Error {
            file: self.file.to_owned(),
            key: key.into(),
            problem: problem.into(),
            fix: fix.to_owned(),
        }
    }

    fn duration(&self, key: String, text: &str) -> Result<Duration> {
        humantime::parse_duration(text).map_err(|e| {
            self.at(
                key,
                format!("`{text}` is not a duration ({e})"),
                "write it as e.g. 500ms, 2s or 5m",
            )
        })
    }
}

impl Config {
    /// Reads and validates the provider file at `path`.
    ///
    /// # Errors
    /// The file cannot be read, is not valid YAML of the expected shape, or fails validation.
    pub fn load(path: &Path) -> Result<Self> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Error {
            file: file.clone(),
            key: "-".into(),
            problem: format!("cannot read the provider file ({e})"),
            fix: "set LLMQ_CONFIG to the path of a provider file such as examples/providers.mock.yaml".into(),
        })?;
        Self::parse(&file, &text, &|name| std::env::var(name).ok())
    }

    /// Parses provider-file text; `env` looks up `${VAR}` references.
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn parse(file: &str, text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let errs = Errors { file };
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
            providers.push(provider(&errs, i, p, env, &providers)?);
        }
        if !providers.iter().any(|p| p.enabled) {
            return Err(errs.at(
                "providers",
                "every provider is disabled",
                "set enabled: true on at least one provider",
            ));
        }
        let routing = match raw.routing {
            Some(r) => routing(&errs, r, &providers)?,
            None => Routing::default(),
        };
        let scheduler = match raw.scheduler {
            Some(s) => scheduler(&errs, s)?,
            None => SchedulerConfig::default(),
        };
        Ok(Self {
            providers,
            routing,
            scheduler,
        })
    }

    #[must_use]
    pub fn provider(&self, name: &str) -> Option<&ProviderConfig> {
        self.providers.iter().find(|p| p.name == name)
    }
}

fn provider(
    errs: &Errors<'_>,
    i: usize,
    p: RawProvider,
    env: &dyn Fn(&str) -> Option<String>,
    earlier: &[ProviderConfig],
) -> Result<ProviderConfig> {
    let at = |k: &str| format!("providers[{i}].{k}");
    if p.name.trim().is_empty() || p.name.contains(['/', ' ']) {
        return Err(errs.at(
            at("name"),
            format!("`{}` is not a usable name", p.name),
            "use a short name without spaces or slashes, such as `openai`",
        ));
    }
    if earlier.iter().any(|q| q.name == p.name) {
        return Err(errs.at(
            at("name"),
            format!("provider `{}` is listed twice", p.name),
            "give every provider its own name",
        ));
    }
    let base_url = match (p.base_url, p.kind.default_base_url()) {
        (Some(url), _) => expand(&url, env).map_err(|m| errs.at(at("base_url"), m, ENV_FIX))?,
        (None, Some(url)) => url.to_owned(),
        (None, None) if p.kind == Kind::Command => String::new(),
        (None, None) => {
            return Err(errs.at(
                at("base_url"),
                "an openai_compatible provider needs a base_url",
                "set base_url to the server's address up to /v1, e.g. http://127.0.0.1:8000/v1",
            ));
        }
    };
    if p.kind != Kind::Command
        && !(base_url.starts_with("http://") || base_url.starts_with("https://"))
    {
        return Err(errs.at(
            at("base_url"),
            format!("`{base_url}` is not an http(s) URL"),
            "write it as http://host:port/v1 or https://host/v1",
        ));
    }
    let api_key = p
        .api_key
        .map(|k| expand(&k, env).map_err(|m| errs.at(at("api_key"), m, ENV_FIX)))
        .transpose()?
        .map(SecretString::from);
    let command = match (p.kind, p.command) {
        (Kind::Command, Some(c)) => Some(command(errs, i, c)?),
        (Kind::Command, None) => {
            return Err(errs.at(
                at("command"),
                "a command provider needs a command section",
                "add command: {program: claude, args: [\"-p\", \"{prompt}\"]}",
            ));
        }
        (_, Some(_)) => {
            return Err(errs.at(
                at("command"),
                format!(
                    "only kind command takes a command section, not kind {}",
                    p.kind.as_str()
                ),
                "remove it, or set kind: command",
            ));
        }
        (_, None) => None,
    };
    let quotas = match p.quotas {
        Some(q) => {
            if let Some(tz) = q
                .reset_timezone
                .as_deref()
                .filter(|tz| !tz.eq_ignore_ascii_case("utc"))
            {
                return Err(errs.at(
                    at("quotas.reset_timezone"),
                    format!("`{tz}` is not supported"),
                    "quota windows reset in UTC; write UTC or leave it out",
                ));
            }
            for (key, zero) in [
                ("requests_per_day", q.requests_per_day == Some(0)),
                ("rpm", q.rpm == Some(0)),
                ("tpm", q.tpm == Some(0)),
                (
                    "usd_per_month",
                    q.usd_per_month.is_some_and(|v| !v.is_finite() || v <= 0.0),
                ),
            ] {
                if zero {
                    return Err(errs.at(
                        at(&format!("quotas.{key}")),
                        "a quota must be more than zero",
                        "raise it, or set enabled: false to stop using the provider",
                    ));
                }
            }
            let window = match q.window.as_deref() {
                Some(w) => errs.duration(at("quotas.window"), w)?,
                None => Quotas::default().window,
            };
            if window.is_zero() {
                return Err(errs.at(
                    at("quotas.window"),
                    "the window cannot be zero",
                    "leave it out for one minute, or give e.g. 10s",
                ));
            }
            Quotas {
                requests_per_day: q.requests_per_day,
                usd_per_month: q.usd_per_month,
                rpm: q.rpm,
                tpm: q.tpm,
                window,
            }
        }
        None => Quotas::default(),
    };
    if p.models.is_empty() {
        return Err(errs.at(
            at("models"),
            "no model is listed",
            "list at least one model with its id and prices",
        ));
    }
    let mut models: Vec<Model> = Vec::with_capacity(p.models.len());
    for (j, m) in p.models.into_iter().enumerate() {
        let at = |k: &str| format!("providers[{i}].models[{j}].{k}");
        if m.id.trim().is_empty() {
            return Err(errs.at(
                at("id"),
                "the model id is empty",
                "set id to the model name the provider expects",
            ));
        }
        if models.iter().any(|x| x.id == m.id) {
            return Err(errs.at(
                at("id"),
                format!("model `{}` is listed twice", m.id),
                "list each model once",
            ));
        }
        for (key, v) in [
            ("input_usd_per_mtok", m.input_usd_per_mtok),
            ("output_usd_per_mtok", m.output_usd_per_mtok),
            ("cached_input_usd_per_mtok", m.cached_input_usd_per_mtok),
        ] {
            if v.is_some_and(|v| !v.is_finite() || v < 0.0) {
                return Err(errs.at(
                    at(key),
                    "a price must be a number of USD per million tokens, zero or more",
                    "write it as e.g. 0.15 (use 0 for a free model)",
                ));
            }
        }
        if m.context_window == Some(0) {
            return Err(errs.at(
                at("context_window"),
                "the context window cannot be 0 tokens",
                "give the model's context size in tokens, e.g. 128000, or leave it out",
            ));
        }
        let bundled = bundled_prices().models.get(&m.id).copied();
        let (prices, price_source, window) =
            match (m.input_usd_per_mtok, m.output_usd_per_mtok, bundled) {
                (Some(input), Some(output), _) => (
                    Prices {
                        input,
                        output,
                        cached_input: m.cached_input_usd_per_mtok.unwrap_or(input),
                    },
                    PriceSource::File,
                    m.context_window,
                ),
                (None, None, Some(b)) => (
                    Prices {
                        input: b.input,
                        output: b.output,
                        cached_input: b.cached_input.unwrap_or(b.input),
                    },
                    PriceSource::Bundled,
                    m.context_window.or(b.context_window),
                ),
                (None, None, None) => {
                    return Err(errs.at(
                        at("input_usd_per_mtok"),
                        format!(
                            "model `{}` has no prices and is not in llmq's bundled price table",
                            m.id
                        ),
                        "add input_usd_per_mtok and output_usd_per_mtok (0 for a free model)",
                    ));
                }
                _ => {
                    return Err(errs.at(
                        at(if m.input_usd_per_mtok.is_none() {
                            "input_usd_per_mtok"
                        } else {
                            "output_usd_per_mtok"
                        }),
                        "only one of the input and output prices is given",
                        "give both, or neither to use the bundled price table",
                    ));
                }
            };
        models.push(Model {
            name: m.name.unwrap_or_else(|| m.id.clone()),
            id: m.id,
            capabilities: m.capabilities,
            tier: m.tier,
            context_window: window,
            prices,
            price_source,
        });
    }
    Ok(ProviderConfig {
        name: p.name,
        kind: p.kind,
        enabled: p.enabled,
        base_url,
        api_key,
        cost_tier: p.cost_tier,
        quotas,
        command,
        models,
    })
}

fn command(errs: &Errors<'_>, i: usize, c: RawCommand) -> Result<CommandConfig> {
    let at = |k: &str| format!("providers[{i}].command.{k}");
    if c.program.trim().is_empty() {
        return Err(errs.at(
            at("program"),
            "the program is empty",
            "name the CLI to run, e.g. claude",
        ));
    }
    let prompt_via_stdin = match c.prompt_via.as_deref() {
        None | Some("arg") => false,
        Some("stdin") => true,
        Some(other) => {
            return Err(errs.at(
                at("prompt_via"),
                format!("`{other}` is not a way to pass the prompt"),
                "use arg or stdin",
            ));
        }
    };
    let delay = match c.delay {
        None => None,
        Some(d) if d.len() == 2 => {
            let min = errs.duration(at("delay[0]"), &d[0])?;
            let max = errs.duration(at("delay[1]"), &d[1])?;
            if min > max {
                return Err(errs.at(
                    at("delay"),
                    "the first delay is longer than the second",
                    "write it as [shortest, longest], e.g. [1s, 3s]",
                ));
            }
            Some((min, max))
        }
        Some(_) => {
            return Err(errs.at(
                at("delay"),
                "the delay needs exactly two durations",
                "write it as [shortest, longest], e.g. [1s, 3s]",
            ));
        }
    };
    Ok(CommandConfig {
        program: c.program,
        args: c.args,
        prompt_via_stdin,
        delay,
    })
}

fn routing(errs: &Errors<'_>, r: RawRouting, providers: &[ProviderConfig]) -> Result<Routing> {
    if let Some(s) = r.strategy.as_deref().filter(|s| *s != "cheapest") {
        return Err(errs.at(
            "routing.strategy",
            format!("`{s}` is not a routing strategy"),
            "use cheapest (the only strategy so far)",
        ));
    }
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
        if !providers.iter().any(|p| &p.name == name) {
            return Err(errs.at(
                format!("routing.fallback[{i}]"),
                format!("no provider is named `{name}`"),
                "list provider names from the providers section",
            ));
        }
    }
    let mut rules = Vec::with_capacity(r.rules.len());
    for (i, rule) in r.rules.into_iter().enumerate() {
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
                    .find(|x| x.name == p)
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
        rules.push(Rule {
            task_type,
            risk: rule.risk,
            area: rule.area,
            target,
        });
    }
    let keywords = r
        .keywords
        .into_iter()
        .map(|(cap, words)| (cap, words.into_iter().map(|w| w.to_lowercase()).collect()))
        .collect();
    let mut retry = Retry::default();
    if let Some(raw) = r.retry {
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
    }
    let mut cooldown = Cooldown::default();
    if let Some(raw) = r.cooldown {
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
    }
    let max_wait = match r.max_wait {
        Some(m) => errs.duration("routing.max_wait".into(), &m)?,
        None => DEFAULT_MAX_WAIT,
    };
    Ok(Routing {
        max_cost_per_task: r.max_cost_per_task,
        fallback: r.fallback,
        rules,
        keywords,
        retry,
        cooldown,
        max_wait,
    })
}

fn scheduler(errs: &Errors<'_>, raw: RawScheduler) -> Result<SchedulerConfig> {
    let mut out = SchedulerConfig::default();
    if let Some(l) = raw.lease {
        out.lease = errs.duration("scheduler.lease".into(), &l)?;
        if out.lease < Duration::from_secs(1) {
            return Err(errs.at(
                "scheduler.lease",
                "a lease shorter than a second would flap",
                "use e.g. 15s",
            ));
        }
    }
    if let Some(r) = raw.dead_letters {
        if let Some(d) = r.keep_in_redis {
            out.dead_letters.keep_in_redis =
                errs.duration("scheduler.dead_letters.keep_in_redis".into(), &d)?;
        }
        if let Some(n) = r.max_in_redis {
            out.dead_letters.max_in_redis = n;
        }
        if let Some(d) = r.keep_archived {
            out.dead_letters.keep_archived =
                errs.duration("scheduler.dead_letters.keep_archived".into(), &d)?;
        }
    }
    for (i, r) in raw.recurring.into_iter().enumerate() {
        let at = |k: &str| format!("scheduler.recurring[{i}].{k}");
        if r.name.trim().is_empty() || out.recurring.iter().any(|x: &Recurring| x.name == r.name) {
            return Err(errs.at(
                at("name"),
                format!("`{}` is empty or used twice", r.name),
                "give every recurring task its own name",
            ));
        }
        if r.cron.split_whitespace().count() < 5 {
            return Err(errs.at(
                at("cron"),
                format!("`{}` is not a cron expression", r.cron),
                "write five fields, e.g. \"0 2 * * *\" for 02:00 UTC daily",
            ));
        }
        let prompt_ok = r
            .task
            .get("prompt")
            .and_then(|p| p.as_str())
            .is_some_and(|p| !p.trim().is_empty());
        if !prompt_ok {
            return Err(errs.at(
                at("task.prompt"),
                "the task has no prompt",
                "set task: {prompt: \"...\"}",
            ));
        }
        out.recurring.push(Recurring {
            name: r.name,
            cron: r.cron,
            queue: r.queue,
            task: r.task,
        });
    }
    Ok(out)
}

const ENV_FIX: &str = "export the variable, or give a default as ${NAME:-value}";

/// Expands `${VAR}` and `${VAR:-default}`.
fn expand(
    value: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("`{value}` has a `${{` without its closing `}}`"))?;
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        match (env(name).filter(|v| !v.is_empty()), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => return Err(format!("environment variable {name} is not set")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
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
    command: {program: claude, args: ["-p", "{prompt}"], delay: [1s, 2s]}
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
    fn the_shipped_provider_files_are_valid() {
        let any = |name: &str| (!name.ends_with("_URL")).then(|| "set".to_owned());
        let example = Config::parse(
            "providers.example.yaml",
            include_str!("../../providers.example.yaml"),
            &any,
        )
        .unwrap();
        assert!(example.providers.len() >= 6);
        assert!(!example.routing.rules.is_empty());
        Config::parse(
            "providers.mock.yaml",
            include_str!("../../examples/providers.mock.yaml"),
            &any,
        )
        .unwrap();
        Config::parse(
            "providers.openai.yaml",
            include_str!("../../examples/providers.openai.yaml"),
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
        let prices = Prices {
            input: 1.0,
            output: 2.0,
            cached_input: 0.5,
        };
        let usage = crate::provider::Usage {
            input_tokens: 1_000_000,
            output_tokens: 1_000_000,
            cached_tokens: 500_000,
            reasoning_tokens: 0,
        };
        assert!((prices.cost(&usage) - 2.75).abs() < 1e-9);
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
                    "command: {program: claude, args: [\"-p\", \"{prompt}\"], delay: [1s, 2s]}",
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
