//! Providers and their models: kinds, tiers, capabilities, prices, quotas; and validating
//! a provider entry of the file.

use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

use super::env::{ENV_FIX, expand};
use super::raw::{RawBatch, RawCommand, RawModel, RawProvider, RawQuotas};
use super::{Errors, Result};
use crate::envelope::TaskType;
pub use crate::envelope::Tier;
use crate::outcome::Usage;

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

/// HTTP clients per provider when the file names none: with a server limit of 100 HTTP/2
/// streams a connection, room for 1,600 calls in flight per worker.
pub const DEFAULT_CONNECTIONS: usize = 16;
const MAX_CONNECTIONS: u32 = 1024;

/// How calls to a provider use HTTP/2, so that thousands of calls in flight share a few
/// connections instead of one socket each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Http2 {
    /// HTTP/2 where the server offers it over TLS (ALPN), else HTTP/1.1: every public API.
    #[default]
    Auto,
    /// HTTP/2 from the first byte, without TLS (h2c): local servers that speak it.
    PriorKnowledge,
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
    /// Reads images. Never assumed: a model takes a task with an image only when it lists
    /// `vision`.
    Vision,
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
            Capability::Vision => "vision",
        }
    }

    pub const ALL: [Capability; 8] = [
        Capability::Code,
        Capability::Analysis,
        Capability::Planning,
        Capability::Review,
        Capability::ComplexReasoning,
        Capability::Docs,
        Capability::SimpleTasks,
        Capability::Vision,
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

/// Anthropic's price of a five-minute cache write, as a multiple of the input price.
pub const CACHE_WRITE_MULTIPLIER: f64 = 1.25;
/// Anthropic's price of a cache read, as a multiple of the input price.
pub const ANTHROPIC_CACHE_READ_MULTIPLIER: f64 = 0.1;

/// USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Prices {
    pub input: f64,
    pub output: f64,
    /// Cached prompt tokens; the input price when the provider file gives none.
    pub cached_input: f64,
    /// Prompt tokens written to the provider's cache: 1.25 times the input price (Anthropic's
    /// five-minute cache, the one llmq asks for) unless the provider file says otherwise.
    pub cache_write: f64,
    /// Through the provider's batch API: half the input and output prices (OpenAI,
    /// Anthropic and Gemini all sell batches at 50 % off) unless the file says otherwise.
    pub batch_input: f64,
    pub batch_output: f64,
}

impl Prices {
    /// The cost of one call in USD. Cached tokens and tokens written to the cache are part
    /// of `input_tokens` and priced at their own rates; reasoning tokens are part of
    /// `output_tokens`.
    #[must_use]
    pub fn cost(&self, usage: &Usage) -> f64 {
        let cached = usage.cached_tokens.min(usage.input_tokens);
        let written = usage.cache_write_tokens.min(usage.input_tokens - cached);
        let fresh = usage.input_tokens - cached - written;
        (fresh as f64 * self.input
            + cached as f64 * self.cached_input
            + written as f64 * self.cache_write
            + usage.output_tokens as f64 * self.output)
            / 1_000_000.0
    }

    /// List prices with the defaults: a cache write at 1.25 times the input price, a batch
    /// at half of each.
    #[must_use]
    pub fn list(input: f64, output: f64, cached_input: f64) -> Self {
        Self {
            input,
            output,
            cached_input,
            cache_write: input * CACHE_WRITE_MULTIPLIER,
            batch_input: input / 2.0,
            batch_output: output / 2.0,
        }
    }

    /// The prices of a call made through the provider's batch API; cached prompt tokens and
    /// cache writes get the same discount as the others.
    #[must_use]
    pub fn batch(&self) -> Prices {
        let discount = |price: f64| {
            if self.input > 0.0 {
                price * self.batch_input / self.input
            } else {
                price / 2.0
            }
        };
        Prices {
            input: self.batch_input,
            output: self.batch_output,
            cached_input: discount(self.cached_input),
            cache_write: discount(self.cache_write),
            ..*self
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    /// Shared, not copied, by every ledger row of a call to this model.
    pub id: std::sync::Arc<str>,
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
    /// llmq's bundled price table (`shared/src/config/prices.yaml`), for a model the file gives no
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
    /// A model without listed capabilities can do anything but read images (`vision` must
    /// be listed: a text model answers an image with a 400).
    #[must_use]
    pub fn can(&self, c: Capability) -> bool {
        self.capabilities.contains(&c) || (self.capabilities.is_empty() && c != Capability::Vision)
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
    /// Requests that may go at once beyond the steady pace (`rpm` calls spread evenly over
    /// the window, `tpm` tokens likewise); `None`: [`Quotas::burst`]'s default.
    pub burst: Option<u64>,
    /// Per priority (the index), the percent of `rpm` and `tpm` held for its calls while it
    /// asks for some (0: nothing held). Under 100 in all, so every priority keeps a share.
    pub reserve: [u8; 10],
}

/// The longest rolling window a provider's `rpm` and `tpm` may count over.
pub const MAX_WINDOW: Duration = Duration::from_secs(24 * 3600);

impl Quotas {
    /// How long a request counts against `rpm` and `tpm`: the window and a margin of 1 % of
    /// it (at least 50 ms). A request is stamped when it is sent and the provider counts it
    /// when it arrives, tens of milliseconds later under load; without the margin the first
    /// requests of a window could arrive inside the provider's previous one.
    #[must_use]
    pub fn counted_window(&self) -> Duration {
        self.window + (self.window / 100).max(Duration::from_millis(50))
    }

    /// Requests that may go at once beyond the steady pace: as the file says, else none.
    /// The pace spends `rpm` as one call every counted window / rpm, so a flood never
    /// spends a window's budget in its first seconds, and the next slot is never more than
    /// about an interval away; `tpm` tokens may run ahead of theirs by as long (1 % of the
    /// window a burst, without `rpm`). A burst of n costs a gap of n intervals a window
    /// later, when the window's log is full: the next slot may then be n + 1 away.
    #[must_use]
    pub fn burst(&self) -> u64 {
        self.burst.unwrap_or(0)
    }

    /// Why one call of `tokens` tokens costing `usd` can never be granted: it needs more than
    /// a whole window's tokens or a whole month's budget, so waiting for a reset cannot help.
    #[must_use]
    pub fn never_fits(&self, tokens: u64, usd: f64) -> Option<String> {
        if let Some(tpm) = self.tpm.filter(|&t| tokens > t) {
            return Some(format!(
                "a call needs about {tokens} tokens (max_tokens included), more than its whole tpm of {tpm}"
            ));
        }
        if let Some(month) = self.usd_per_month.filter(|&m| usd > m) {
            return Some(format!(
                "a call could cost ${usd:.2} (max_tokens included), more than its whole usd_per_month of ${month:.2}"
            ));
        }
        None
    }
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            requests_per_day: None,
            usd_per_month: None,
            rpm: None,
            tpm: None,
            window: Duration::from_secs(60),
            burst: None,
            reserve: [0; 10],
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
    /// Options that take the next argument as their value, so task text may fill it.
    pub value_options: Vec<String>,
    /// What the CLI's environment holds besides `PATH` and `HOME`.
    pub env: crate::process::ChildEnv,
    pub delay: Option<(Duration, Duration)>,
}

#[derive(Debug, Clone)]
pub struct ProviderConfig {
    /// Shared, not copied, by every ledger row of a call to this provider.
    pub name: std::sync::Arc<str>,
    pub kind: Kind,
    pub enabled: bool,
    pub base_url: String,
    /// How the provider speaks HTTP/2.
    pub http2: Http2,
    /// How many HTTP clients (each one HTTP/2 connection) a worker spreads calls over.
    pub connections: usize,
    pub api_key: Option<SecretString>,
    pub cost_tier: CostTier,
    pub quotas: Quotas,
    pub command: Option<CommandConfig>,
    /// Set: tasks that can wait (`deadline`) go through the provider's batch API.
    pub batch: Option<BatchConfig>,
    /// Whether llmq asks the provider to cache a long prompt's stable prefix (Anthropic's
    /// `cache_control`, OpenAI's `prompt_cache_key`); a task's `prompt_cache` can say no.
    pub prompt_cache: bool,
    pub models: Vec<Model>,
}

/// How a provider's batch API is used (the provider file's `batch:` section).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// How long the first waiting task waits for others before its batch is sent.
    pub gather: Duration,
    /// Requests per batch at most; more waiting tasks make more batches.
    pub max_requests: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            gather: Duration::from_secs(60),
            max_requests: 1000,
        }
    }
}

/// The most requests llmq puts in one batch: every provider takes at least this many
/// (OpenAI 50,000, Anthropic 100,000; Gemini's inline requests up to 20 MB in all).
pub const MAX_BATCH_REQUESTS: usize = 10_000;

impl ProviderConfig {
    #[must_use]
    pub fn model(&self, id: &str) -> Option<&Model> {
        self.models.iter().find(|m| *m.id == *id)
    }
}

/// A provider's `quotas`, checked: each key named where it is wrong.
fn quotas(errs: &Errors<'_>, at: &dyn Fn(&str) -> String, q: RawQuotas) -> Result<Quotas> {
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
    // Rolling windows are for minutes and hours; a day's limit is requests_per_day.
    if window > MAX_WINDOW {
        return Err(errs.at(
            at("quotas.window"),
            format!(
                "{} is longer than a day",
                humantime::format_duration(window)
            ),
            "give at most 1d; for a daily limit use requests_per_day",
        ));
    }
    let mut reserve = [0u8; 10];
    for (&priority, &percent) in q.reserve.iter().flatten() {
        let slot = usize::try_from(priority)
            .ok()
            .and_then(|i| reserve.get_mut(i))
            .ok_or_else(|| {
                errs.at(
                    at("quotas.reserve"),
                    format!("priority {priority} is out of range"),
                    "name priorities 0 (most urgent) to 9",
                )
            })?;
        *slot = u8::try_from(percent)
            .ok()
            .filter(|p| (1..=99).contains(p))
            .ok_or_else(|| {
                errs.at(
                    at(&format!("quotas.reserve.{priority}")),
                    format!("{percent} is not a share"),
                    "give a percent of rpm and tpm from 1 to 99",
                )
            })?;
    }
    let held: u32 = reserve.iter().map(|&p| u32::from(p)).sum();
    if held >= 100 {
        return Err(errs.at(
            at("quotas.reserve"),
            format!("the shares add up to {held} %"),
            "keep them under 100 % in all, so that the priorities without a share keep some of the limit",
        ));
    }
    if let (Some(burst), Some(rpm)) = (q.burst, q.rpm)
        && burst > rpm
    {
        return Err(errs.at(
            at("quotas.burst"),
            format!("a burst of {burst} is more than the rpm of {rpm}"),
            "give at most rpm (the whole window at once), or leave it out for none",
        ));
    }
    if q.burst.is_some() && q.rpm.is_none() && q.tpm.is_none() {
        return Err(errs.at(
            at("quotas.burst"),
            "there is no rpm or tpm to pace",
            "set quotas.rpm or quotas.tpm, or leave burst out",
        ));
    }
    if held > 0 && q.rpm.is_none() && q.tpm.is_none() {
        return Err(errs.at(
            at("quotas.reserve"),
            "there is no rpm or tpm to share",
            "set quotas.rpm or quotas.tpm, or leave reserve out",
        ));
    }
    Ok(Quotas {
        requests_per_day: q.requests_per_day,
        usd_per_month: q.usd_per_month,
        rpm: q.rpm,
        tpm: q.tpm,
        window,
        burst: q.burst,
        reserve,
    })
}

/// One model of a provider of `kind`, checked, its prices from the file or llmq's bundled
/// table; `earlier`: the provider's models before it.
fn model(
    errs: &Errors<'_>,
    at: &dyn Fn(&str) -> String,
    kind: Kind,
    m: RawModel,
    earlier: &[Model],
) -> Result<Model> {
    if m.id.trim().is_empty() {
        return Err(errs.at(
            at("id"),
            "the model id is empty",
            "set id to the model name the provider expects",
        ));
    }
    if earlier.iter().any(|x| *x.id == *m.id) {
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
        ("cache_write_usd_per_mtok", m.cache_write_usd_per_mtok),
        ("batch_input_usd_per_mtok", m.batch_input_usd_per_mtok),
        ("batch_output_usd_per_mtok", m.batch_output_usd_per_mtok),
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
                Prices::list(
                    input,
                    output,
                    m.cached_input_usd_per_mtok.unwrap_or(match kind {
                        // Anthropic sells a cache read at a tenth of the input price.
                        Kind::Anthropic => input * ANTHROPIC_CACHE_READ_MULTIPLIER,
                        _ => input,
                    }),
                ),
                PriceSource::File,
                m.context_window,
            ),
            (None, None, Some(b)) => (
                Prices::list(b.input, b.output, b.cached_input.unwrap_or(b.input)),
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
    let mut prices = prices;
    if let Some(p) = m.cache_write_usd_per_mtok {
        prices.cache_write = p;
    }
    if let Some(p) = m.batch_input_usd_per_mtok {
        prices.batch_input = p;
    }
    if let Some(p) = m.batch_output_usd_per_mtok {
        prices.batch_output = p;
    }
    Ok(Model {
        name: m.name.unwrap_or_else(|| m.id.clone()),
        id: m.id.into(),
        capabilities: m.capabilities,
        tier: m.tier,
        context_window: window,
        prices,
        price_source,
    })
}

/// A provider's `batch` section, checked.
fn batch(errs: &Errors<'_>, at: &dyn Fn(&str) -> String, b: RawBatch) -> Result<BatchConfig> {
    let mut batch = BatchConfig::default();
    if let Some(g) = b.gather.as_deref() {
        batch.gather = errs.duration(at("batch.gather"), g)?;
        if batch.gather > Duration::from_secs(3600) {
            return Err(errs.at(
                at("batch.gather"),
                format!("{g} is longer than an hour"),
                "give at most 1h; a task waits this long for others before its batch is sent",
            ));
        }
    }
    match b.max_requests {
        None => {}
        Some(n @ 1..=MAX_BATCH_REQUESTS) => batch.max_requests = n,
        Some(n) => {
            return Err(errs.at(
                at("batch.max_requests"),
                format!("{n} requests per batch is not a usable number"),
                &format!("use 1 to {MAX_BATCH_REQUESTS}"),
            ));
        }
    }
    Ok(batch)
}

/// Where a provider of `kind` is reached (`url` from the file, `${ENV}` expanded, else the
/// kind's own), checked to be http(s); a command provider has none.
fn base_url(
    errs: &Errors<'_>,
    at: &dyn Fn(&str) -> String,
    kind: Kind,
    url: Option<String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String> {
    let base_url = match (url, kind.default_base_url()) {
        (Some(url), _) => expand(&url, env).map_err(|m| errs.at(at("base_url"), m, ENV_FIX))?,
        (None, Some(url)) => url.to_owned(),
        (None, None) if kind == Kind::Command => String::new(),
        (None, None) => {
            return Err(errs.at(
                at("base_url"),
                "an openai_compatible provider needs a base_url",
                "set base_url to the server's address up to /v1, e.g. http://127.0.0.1:8000/v1",
            ));
        }
    };
    if kind != Kind::Command
        && !(base_url.starts_with("http://") || base_url.starts_with("https://"))
    {
        return Err(errs.at(
            at("base_url"),
            format!(
                "`{}` is not an http(s) URL",
                crate::text::without_credentials(&base_url)
            ),
            "write it as http://host:port/v1 or https://host/v1",
        ));
    }
    Ok(base_url)
}

pub(super) fn provider(
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
    if earlier.iter().any(|q| *q.name == *p.name) {
        return Err(errs.at(
            at("name"),
            format!("provider `{}` is listed twice", p.name),
            "give every provider its own name",
        ));
    }
    let base_url = base_url(errs, &at, p.kind, p.base_url, env)?;
    let api_key = p
        .api_key
        .filter(|_| errs.with_secrets)
        .map(|k| expand(&k, env).map_err(|m| errs.at(at("api_key"), m, ENV_FIX)))
        .transpose()?
        .map(SecretString::from);
    let command = match (p.kind, p.command) {
        (Kind::Command, Some(c)) => Some(command(errs, i, &p.name, c, env)?),
        (Kind::Command, None) => {
            return Err(errs.at(
                at("command"),
                "a command provider needs a command section",
                "add command: {program: claude, args: [\"-p\"], prompt_via: stdin}",
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
        Some(q) => quotas(errs, &at, q)?,
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
        let model = model(errs, &at, p.kind, m, &models)?;
        models.push(model);
    }
    let batch = match p.batch {
        None => None,
        Some(_)
            if !matches!(
                p.kind,
                Kind::Openai | Kind::OpenaiCompatible | Kind::Anthropic | Kind::Gemini
            ) =>
        {
            return Err(errs.at(
                at("batch"),
                format!("kind {} has no batch API", p.kind.as_str()),
                "remove the batch section; only openai, openai_compatible (a server with /v1/batches), anthropic and gemini take one",
            ));
        }
        Some(b) => Some(batch(errs, &at, b)?),
    };
    let connections = match p.connections {
        None => DEFAULT_CONNECTIONS,
        Some(n @ 1..=MAX_CONNECTIONS) => n as usize,
        Some(n) => {
            return Err(errs.at(
                at("connections"),
                format!("{n} connections is not a usable number"),
                &format!(
                    "use 1 to {MAX_CONNECTIONS}; calls in flight per worker are about connections x the server's HTTP/2 stream limit (often 100)"
                ),
            ));
        }
    };
    Ok(ProviderConfig {
        name: p.name.into(),
        kind: p.kind,
        enabled: p.enabled,
        base_url,
        http2: p.http2,
        connections,
        api_key,
        cost_tier: p.cost_tier,
        quotas,
        command,
        batch,
        prompt_cache: p.prompt_cache,
        models,
    })
}

pub(super) fn command(
    errs: &Errors<'_>,
    i: usize,
    provider: &str,
    c: RawCommand,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<CommandConfig> {
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
    for (j, option) in c.value_options.iter().enumerate() {
        if !option.starts_with('-') || option == "--" || option.contains('{') {
            return Err(errs.at(
                at(&format!("value_options[{j}]")),
                format!("`{option}` is not an option"),
                "list options exactly as args has them, e.g. value_options: [\"--prompt\"]",
            ));
        }
    }
    if let Some(bad) = unsafe_argument(&c.args, &c.value_options) {
        let arg = &c.args[bad.index];
        return Err(errs.at(
            at(&format!("args[{}]", bad.index)),
            format!(
                "provider {provider} puts {} in `{arg}`, where `{}` could read task text as an option",
                bad.placeholder, c.program
            ),
            &format!(
                "pass it on stdin (prompt_via: stdin, with no {0} in args), as --option={0}, \
                 after an option listed in value_options, or after a \"--\" argument",
                bad.placeholder
            ),
        ));
    }
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
        value_options: c.value_options,
        env: super::env::child_env(errs, &at("env"), c.env, env)?,
        delay,
    })
}

/// The placeholders that carry task text; `{model}` comes from the provider file.
pub(crate) const TASK_TEXT: [&str; 2] = ["{prompt}", "{system}"];

/// The argument after which no option parser reads options.
pub(crate) const END_OF_OPTIONS: &str = "--";

/// An argument of a template that puts task text where a program could read it as an option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsafeArgument {
    /// Its index in the template.
    pub index: usize,
    /// `{prompt}` or `{system}`.
    pub placeholder: &'static str,
}

/// The first argument of template `args` that puts `{prompt}` or `{system}` anywhere but in
/// the value of `--option=…`, right after one of `value_options`, or after a `--` argument.
#[must_use]
pub fn unsafe_argument(args: &[String], value_options: &[String]) -> Option<UnsafeArgument> {
    let end = args
        .iter()
        .position(|a| a == END_OF_OPTIONS)
        .unwrap_or(args.len());
    args[..end].iter().enumerate().find_map(|(index, arg)| {
        let placeholder = *TASK_TEXT.iter().find(|t| arg.contains(*t))?;
        let attached = arg
            .strip_prefix("--")
            .and_then(|a| a.split_once('='))
            .is_some_and(|(name, _)| !name.is_empty() && !name.contains('{'));
        let after_value_option = index
            .checked_sub(1)
            .is_some_and(|p| value_options.contains(&args[p]));
        (!attached && !after_value_option).then_some(UnsafeArgument { index, placeholder })
    })
}
