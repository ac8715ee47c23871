//! The Prometheus figures of provider calls, through handles registered once per provider
//! and model: building a metric's key (its labels copied into a fresh vector) and looking it
//! up in the registry for each of six figures on every call cost more than the rest of a
//! call's bookkeeping.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use llmq_shared::config::Config;
use llmq_shared::provider::{self, Completion, Usage};
use std::sync::atomic::{AtomicU64, Ordering};

use metrics::{Counter, Histogram};

/// Handles for every model of every configured provider, each made on the model's first
/// call (so they belong to the recorder installed by then).
pub struct CallMetrics(HashMap<String, HashMap<String, OnceLock<Handles>>>);

struct Handles {
    answered: Counter,
    seconds: Histogram,
    input: Counter,
    output: Counter,
    cached: Counter,
    /// `llmq_cost_microdollars_total`, and every cost it was given in picodollars: each call
    /// adds the whole microdollars its sum crossed, so costs below a microdollar are not lost.
    cost: Counter,
    picodollars: AtomicU64,
}

impl Handles {
    fn new(provider: &str, model: &str) -> Self {
        let p = provider.to_owned();
        Self {
            answered: calls(provider, model, "ok"),
            seconds: metrics::histogram!("llmq_provider_call_seconds", "provider" => p.clone(), "model" => model.to_owned()),
            input: metrics::counter!("llmq_tokens_total", "provider" => p.clone(), "kind" => "input"),
            output: metrics::counter!("llmq_tokens_total", "provider" => p.clone(), "kind" => "output"),
            cached: metrics::counter!("llmq_tokens_total", "provider" => p.clone(), "kind" => "cached"),
            cost: metrics::counter!("llmq_cost_microdollars_total", "provider" => p),
            picodollars: AtomicU64::new(0),
        }
    }
}

/// `llmq_provider_calls_total` of one outcome: `ok`, or the error's class.
fn calls(provider: &str, model: &str, outcome: &'static str) -> Counter {
    metrics::counter!("llmq_provider_calls_total", "provider" => provider.to_owned(), "model" => model.to_owned(), "outcome" => outcome)
}

impl CallMetrics {
    #[must_use]
    pub fn new(config: &Config) -> Self {
        let models = |p: &llmq_shared::config::ProviderConfig| {
            p.models
                .iter()
                .map(|m| (m.id.to_string(), OnceLock::new()))
                .collect()
        };
        Self(
            config
                .providers
                .iter()
                .map(|p| (p.name.to_string(), models(p)))
                .collect(),
        )
    }

    /// Counts one call of `model` at `provider`.
    pub fn record(
        &self,
        provider: &str,
        model: &str,
        result: &provider::Result<Completion>,
        took: Duration,
        usage: &Usage,
        cost: f64,
    ) {
        let unlisted;
        let h = match self.0.get(provider).and_then(|m| m.get(model)) {
            Some(cell) => cell.get_or_init(|| Handles::new(provider, model)),
            // Not in the provider file (a test's stand-in): registered for this call only.
            None => {
                unlisted = Handles::new(provider, model);
                &unlisted
            }
        };
        match result {
            Ok(_) => h.answered.increment(1),
            // Failures are few: their counters are looked up when they happen.
            Err(e) => calls(provider, model, e.class.as_str()).increment(1),
        }
        h.seconds.record(took.as_secs_f64());
        h.input.increment(usage.input_tokens);
        h.output.increment(usage.output_tokens);
        h.cached.increment(usage.cached_tokens);
        h.add_cost(cost);
    }
}

impl Handles {
    /// Adds `usd` to the cost counter in whole microdollars, the rest carried to the next.
    fn add_cost(&self, usd: f64) {
        if !(usd.is_finite() && usd > 0.0) {
            return;
        }
        // At most a few hundred dollars a call: far inside u64 picodollars.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let pico = (usd * 1e12).round() as u64;
        let before = self.picodollars.fetch_add(pico, Ordering::Relaxed);
        let crossed = (before + pico) / 1_000_000 - before / 1_000_000;
        if crossed > 0 {
            self.cost.increment(crossed);
        }
    }
}
