//! The provider file's shape as serde reads it: every struct `deny_unknown_fields`, so a
//! misspelt key is an error that names it.

use serde::Deserialize;

use super::{Capability, CostTier, Http2, Kind, Tier};
use crate::envelope::Risk;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    pub(super) providers: Vec<RawProvider>,
    #[serde(default)]
    pub(super) routing: Option<RawRouting>,
    #[serde(default)]
    pub(super) scheduler: Option<RawScheduler>,
    #[serde(default)]
    pub(super) checks: std::collections::BTreeMap<String, RawCheck>,
    #[serde(default)]
    pub(super) chains: Option<RawChains>,
    #[serde(default)]
    pub(super) ledger: Option<RawLedger>,
    #[serde(default)]
    pub(super) tenants: Option<RawTenants>,
    #[serde(default)]
    pub(super) answer_cache: Option<RawAnswerCache>,
    #[serde(default)]
    pub(super) idempotency: Option<RawIdempotency>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIdempotency {
    pub(super) window: Option<String>,
    #[serde(default)]
    pub(super) queues: std::collections::BTreeMap<String, RawQueueIdempotency>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQueueIdempotency {
    pub(super) window: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAnswerCache {
    pub(super) max_memory_mb: Option<u64>,
    #[serde(default)]
    pub(super) share_across_tenants: bool,
    #[serde(default)]
    pub(super) uncacheable_tools: Vec<String>,
    #[serde(default)]
    pub(super) queues: std::collections::BTreeMap<String, RawQueueCache>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQueueCache {
    pub(super) ttl: String,
    #[serde(default)]
    pub(super) sampled: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTenants {
    #[serde(default)]
    pub(super) weights: std::collections::BTreeMap<String, i64>,
    #[serde(default)]
    pub(super) limits: std::collections::BTreeMap<String, RawTenantLimits>,
    pub(super) default_limits: Option<RawTenantLimits>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTenantLimits {
    pub(super) budget_usd: Option<RawBudget>,
    pub(super) rpm: Option<u64>,
    pub(super) tpm: Option<u64>,
    pub(super) max_in_flight: Option<u64>,
    pub(super) on_budget: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBudget {
    pub(super) day: Option<f64>,
    pub(super) month: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLedger {
    pub(super) retention: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawChains {
    pub(super) max_rounds: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCheck {
    pub(super) program: String,
    #[serde(default)]
    pub(super) args: Vec<String>,
    #[serde(default)]
    pub(super) env: std::collections::BTreeMap<String, String>,
    pub(super) timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawScheduler {
    pub(super) lease: Option<String>,
    pub(super) dead_letters: Option<RawRetention>,
    #[serde(default)]
    pub(super) recurring: Vec<RawRecurring>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetention {
    pub(super) keep_in_redis: Option<String>,
    pub(super) max_in_redis: Option<u64>,
    pub(super) keep_archived: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRecurring {
    pub(super) name: String,
    pub(super) cron: String,
    #[serde(default = "default_queue")]
    pub(super) queue: String,
    pub(super) task: serde_json::Map<String, serde_json::Value>,
}

pub(super) fn default_queue() -> String {
    "default".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProvider {
    pub(super) name: String,
    pub(super) kind: Kind,
    #[serde(default = "yes")]
    pub(super) enabled: bool,
    pub(super) base_url: Option<String>,
    pub(super) api_key: Option<String>,
    #[serde(default)]
    pub(super) cost_tier: CostTier,
    #[serde(default)]
    pub(super) quotas: Option<RawQuotas>,
    #[serde(default)]
    pub(super) command: Option<RawCommand>,
    #[serde(default)]
    pub(super) http2: Http2,
    #[serde(default)]
    pub(super) connections: Option<u32>,
    #[serde(default)]
    pub(super) batch: Option<RawBatch>,
    #[serde(default = "yes")]
    pub(super) prompt_cache: bool,
    pub(super) models: Vec<RawModel>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBatch {
    pub(super) gather: Option<String>,
    pub(super) max_requests: Option<usize>,
}

pub(super) fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQuotas {
    pub(super) requests_per_day: Option<u64>,
    pub(super) usd_per_month: Option<f64>,
    pub(super) rpm: Option<u64>,
    pub(super) tpm: Option<u64>,
    /// Requests that may go at once beyond the steady pace of `rpm` and `tpm`.
    pub(super) burst: Option<u64>,
    /// Percent of `rpm` and `tpm` held for a priority while it has calls to make.
    pub(super) reserve: Option<std::collections::BTreeMap<i64, i64>>,
    /// Only UTC is supported; accepted so files can say so.
    pub(super) reset_timezone: Option<String>,
    pub(super) window: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCommand {
    pub(super) program: String,
    #[serde(default)]
    pub(super) args: Vec<String>,
    #[serde(default)]
    pub(super) prompt_via: Option<String>,
    #[serde(default)]
    pub(super) value_options: Vec<String>,
    #[serde(default)]
    pub(super) env: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub(super) delay: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModel {
    pub(super) id: String,
    pub(super) name: Option<String>,
    #[serde(default)]
    pub(super) capabilities: Vec<Capability>,
    #[serde(default)]
    pub(super) tier: Tier,
    pub(super) context_window: Option<u64>,
    pub(super) input_usd_per_mtok: Option<f64>,
    pub(super) output_usd_per_mtok: Option<f64>,
    pub(super) cached_input_usd_per_mtok: Option<f64>,
    pub(super) cache_write_usd_per_mtok: Option<f64>,
    pub(super) batch_input_usd_per_mtok: Option<f64>,
    pub(super) batch_output_usd_per_mtok: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRouting {
    #[serde(default)]
    pub(super) strategy: Option<String>,
    pub(super) explore: Option<f64>,
    pub(super) tolerance: Option<f64>,
    pub(super) prior: Option<f64>,
    pub(super) max_cost_per_task: Option<f64>,
    #[serde(default)]
    pub(super) fallback: Vec<String>,
    #[serde(default)]
    pub(super) rules: Vec<RawRule>,
    #[serde(default)]
    pub(super) keywords: std::collections::BTreeMap<Capability, Vec<String>>,
    pub(super) retry: Option<RawRetry>,
    pub(super) cooldown: Option<RawCooldown>,
    pub(super) max_wait: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    pub(super) task_type: Option<String>,
    pub(super) risk: Option<Risk>,
    pub(super) area: Option<String>,
    pub(super) tier: Option<Tier>,
    pub(super) model: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetry {
    pub(super) tries_per_provider: Option<u32>,
    pub(super) backoff: Option<Vec<String>>,
    pub(super) max_retry_after: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCooldown {
    pub(super) after_failures: Option<u32>,
    #[serde(rename = "for")]
    pub(super) duration: Option<String>,
}
