//! What `llmq batch` works out before it enqueues, given the provider file: where the routing
//! would send each task first, what that would cost, and which quotas the batch would push
//! past 90 % or use up, so a user can stop before a batch burns a free tier or a budget.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use llmq_shared::config::{Config, CostTier};
use llmq_shared::envelope::Envelope;
use llmq_shared::queue::Client;
use llmq_shared::quota::Limiter;
use llmq_shared::routing::{self, Constraints, Stats};
use serde::Serialize;

use crate::Result;

/// Quotas are warned about when the batch would take them to this share or beyond.
const WARN_AT: f64 = 0.9;

/// One provider's share of the batch.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct Share {
    pub requests: u64,
    pub tokens: u64,
    pub cost_usd: f64,
}

/// The estimate of a batch.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct Estimate {
    /// Per provider the routing picks first.
    pub providers: BTreeMap<String, Share>,
    /// Tasks no provider can take (they would become dead letters).
    pub unroutable: usize,
    /// Quotas the batch would push past 90 % or use up, and free tiers it would overflow.
    pub warnings: Vec<String>,
}

impl Estimate {
    /// The estimate as lines for a person.
    #[must_use]
    pub fn text(&self) -> String {
        let mut s = String::from("Estimate (each task's first provider):\n");
        for (name, share) in &self.providers {
            let _ = writeln!(
                s,
                "  {name:<20} {:>6} requests  {:>10} tokens  {}",
                share.requests,
                share.tokens,
                crate::render::usd(share.cost_usd)
            );
        }
        if self.unroutable > 0 {
            let _ = writeln!(
                s,
                "  {} task(s) no provider can take: they would become dead letters",
                self.unroutable
            );
        }
        for w in &self.warnings {
            let _ = writeln!(s, "warning: {w}");
        }
        s
    }
}

/// A batch's estimate as its tasks go by, one at a time, so a batch of any size is
/// estimated in flat memory: each task routed as a worker would (first choice only); the
/// quotas are checked in Redis at the end ([`Tally::finish`]).
pub struct Tally<'a> {
    config: &'a Config,
    est: Estimate,
    /// Per free provider: the providers its tasks would go to next.
    next_after: BTreeMap<String, Vec<String>>,
}

impl<'a> Tally<'a> {
    #[must_use]
    pub fn new(config: &'a Config) -> Self {
        Self {
            config,
            est: Estimate::default(),
            next_after: BTreeMap::new(),
        }
    }

    pub fn add(&mut self, task: &Envelope) {
        let Ok(plan) = routing::plan(
            self.config,
            task,
            &Constraints::default(),
            &Stats::default(),
        ) else {
            self.est.unroutable += 1;
            return;
        };
        let Some(first) = plan.candidates.first() else {
            self.est.unroutable += 1;
            return;
        };
        let name = &first.provider.name;
        let share = self.est.providers.entry(name.to_string()).or_default();
        share.requests += 1;
        share.tokens += first.estimated_tokens;
        share.cost_usd += first.estimated_usd;
        if first.provider.cost_tier == CostTier::Free {
            let next = self.next_after.entry(name.to_string()).or_default();
            for c in plan.candidates.iter().skip(1) {
                if c.provider.cost_tier != CostTier::Free
                    && !next.iter().any(|n| **n == *c.provider.name)
                {
                    next.push(c.provider.name.to_string());
                }
            }
        }
    }

    /// The estimate, with the quotas in Redis the batch would push past 90 % or use up.
    /// `parallel`: the batch is capped with `--parallel`, so a free tier's overflow is not
    /// warned about separately.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn finish(
        self,
        redis: &Client,
        parallel: bool,
        now: DateTime<Utc>,
    ) -> Result<Estimate> {
        let Self {
            config,
            mut est,
            next_after,
        } = self;
        let limiter = Limiter::new(redis.clone());
        for (name, share) in &est.providers {
            let Some(p) = config.provider(name) else {
                continue;
            };
            if p.quotas.requests_per_day.is_none() && p.quotas.usd_per_month.is_none() {
                continue;
            }
            for line in limiter.usage(name, &p.quotas, now).await? {
                let (adds, unit) = match line.quota.as_str() {
                    "requests_per_day" => (share.requests as f64, "requests"),
                    "usd_per_month" => (share.cost_usd, "USD"),
                    // Rate limits make the batch wait, they do not end.
                    _ => continue,
                };
                if line.limit <= 0.0 {
                    continue;
                }
                let after = line.used + adds;
                let pct = |v: f64| 100.0 * v / line.limit;
                if after >= WARN_AT * line.limit
                    && (line.used < WARN_AT * line.limit || after > line.limit)
                {
                    let mut w = format!(
                        "{name}: {} would go from {:.0}% to {:.0}% ({} used + {} for this batch, of {} {unit})",
                        line.quota,
                        pct(line.used),
                        pct(after),
                        amount(line.used),
                        amount(adds),
                        amount(line.limit),
                    );
                    if after > line.limit {
                        let _ = write!(w, "; it runs out {} short", amount(after - line.limit));
                    }
                    est.warnings.push(w);
                }
                if !parallel
                    && p.cost_tier == CostTier::Free
                    && line.quota == "requests_per_day"
                    && adds > line.remaining
                {
                    let over = adds - line.remaining;
                    let next = next_after.get(name).cloned().unwrap_or_default();
                    let to = if next.is_empty() {
                        "no other provider can take them, so they will wait for tomorrow's quota"
                            .to_owned()
                    } else {
                        format!("they will fall through to {}", next.join(", "))
                    };
                    est.warnings.push(format!(
                        "{name} is a free tier with {} requests left today; the other {} task(s) of this batch go elsewhere: {to}",
                        amount(line.remaining),
                        amount(over),
                    ));
                }
            }
        }
        Ok(est)
    }
}

/// A count or an amount, without needless decimals.
fn amount(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.4}")
    }
}
