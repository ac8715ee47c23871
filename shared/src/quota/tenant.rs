//! A tenant's limits (`tenants.limits` in the provider file), shared by every worker:
//! budgets per day and month, `rpm`, `tpm` and calls in flight, reserved before each call
//! with the provider's quotas and settled after it (`tenant_reserve.lua`,
//! `tenant_settle.lua`).

use chrono::{DateTime, Utc};

use super::{QuotaLine, day_label, month_label, next_day, next_month, text, to_micro, tokens_of};
use crate::config::TenantLimits;
use crate::keys::TenantKeys;
use crate::queue::Result;

/// The window a tenant's `rpm` and `tpm` count over.
pub const TENANT_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// A tenant's reservation, settled after its call ([`super::Limiter::settle_tenant`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantGrant {
    pub tenant: String,
    id: String,
    tokens: u64,
    micro_usd: i64,
    day: String,
    month: String,
    /// Whether the day's and the month's budgets counted it.
    budgets: (bool, bool),
}

impl TenantGrant {
    /// What it reserved: tokens and dollars.
    #[must_use]
    pub fn estimate(&self) -> (u64, f64) {
        (self.tokens, self.micro_usd as f64 / 1e6)
    }
}

/// Why a tenant's call cannot be made now.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantRefusal {
    pub tenant: String,
    /// `budget_usd_day`, `budget_usd_month`, `rpm`, `tpm` or `max_in_flight`.
    pub limit: String,
    /// When it frees up.
    pub until: DateTime<Utc>,
    /// The limit's value (dollars, requests, tokens or calls).
    pub value: f64,
}

impl TenantRefusal {
    /// Whether a budget refused it (what `on_budget` decides about).
    #[must_use]
    pub fn is_budget(&self) -> bool {
        self.limit.starts_with("budget_usd")
    }

    /// The refusal as a sentence naming the tenant, the limit and when it resets.
    #[must_use]
    pub fn describe(&self) -> String {
        let what = match self.limit.as_str() {
            "budget_usd_day" => format!("its budget of ${:.2} a day is spent", self.value),
            "budget_usd_month" => format!("its budget of ${:.2} a month is spent", self.value),
            "rpm" => format!("it is at its {} requests a minute", self.value),
            "tpm" => format!("it is at its {} tokens a minute", self.value),
            "max_in_flight" => format!("it has {} calls in flight, its most", self.value),
            other => format!("it is at its limit {other}"),
        };
        format!(
            "tenant {:?}: {what} until {}",
            self.tenant,
            self.until.format("%Y-%m-%d %H:%M:%S UTC")
        )
    }
}

/// The outcome of [`super::Limiter::reserve_tenant`].
#[derive(Debug, Clone, PartialEq)]
pub enum TenantDecision {
    Granted {
        grant: TenantGrant,
        /// Budget thresholds crossed for the first time this day or month, e.g.
        /// `budget_usd_month:80`.
        crossed: Vec<String>,
    },
    Refused(TenantRefusal),
}

/// `-1` for no limit, as the scripts read it.
fn limit(v: Option<u64>) -> i64 {
    v.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX))
}

impl super::Limiter {
    /// Reserves one call of `tenant` of about `tokens` tokens costing about `usd` against
    /// `limits`; a call in flight counts for `lease` at most, should its worker die.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn reserve_tenant(
        &self,
        tenant: &str,
        limits: &TenantLimits,
        tokens: u64,
        usd: f64,
        lease: std::time::Duration,
        now: DateTime<Utc>,
    ) -> Result<TenantDecision> {
        let keys = TenantKeys::new(tenant);
        let (day, month) = (day_label(now.date_naive()), month_label(now.date_naive()));
        let micro = to_micro(usd);
        let id = uuid::Uuid::new_v4().simple().to_string();
        let mut c = self.redis.conn().await?;
        let reply: Vec<redis::Value> = self
            .tenant_reserve
            .key(keys.spend_on(&day))
            .key(keys.spend_in(&month))
            .key(keys.requests_window())
            .key(keys.tokens_window())
            .key(keys.tokens_sum())
            .key(keys.in_flight())
            .key(keys.alerts())
            .arg(now.timestamp_millis())
            .arg(&id)
            .arg(tokens)
            .arg(micro)
            .arg(limits.budget_usd_day.map_or(-1, to_micro))
            .arg(limits.budget_usd_month.map_or(-1, to_micro))
            .arg(limit(limits.rpm))
            .arg(limit(limits.tpm))
            .arg(limit(limits.max_in_flight))
            .arg(TENANT_WINDOW.as_millis() as i64)
            .arg(next_day(now).timestamp_millis())
            .arg(next_month(now).timestamp_millis())
            .arg(lease.as_millis().max(1000) as i64)
            .arg(&day)
            .arg(&month)
            .invoke_async(&mut c)
            .await?;
        if let Some(redis::Value::Int(1)) = reply.first() {
            return Ok(TenantDecision::Granted {
                grant: TenantGrant {
                    tenant: tenant.to_owned(),
                    id,
                    tokens,
                    micro_usd: micro,
                    day,
                    month,
                    budgets: (
                        limits.budget_usd_day.is_some(),
                        limits.budget_usd_month.is_some(),
                    ),
                },
                crossed: reply.iter().skip(1).map(text).collect(),
            });
        }
        let name = reply.get(1).map(text).unwrap_or_default();
        let until_ms = reply.get(2).map(text).and_then(|t| t.parse::<i64>().ok());
        let value = match name.as_str() {
            "budget_usd_day" => limits.budget_usd_day.unwrap_or_default(),
            "budget_usd_month" => limits.budget_usd_month.unwrap_or_default(),
            "rpm" => limits.rpm.unwrap_or_default() as f64,
            "tpm" => limits.tpm.unwrap_or_default() as f64,
            _ => limits.max_in_flight.unwrap_or_default() as f64,
        };
        Ok(TenantDecision::Refused(TenantRefusal {
            tenant: tenant.to_owned(),
            limit: name,
            until: until_ms
                .and_then(DateTime::from_timestamp_millis)
                .unwrap_or(now),
            value,
        }))
    }

    /// Settles `grant` at what its call used and cost: `(0, 0.0)` for a call never sent,
    /// which gives its reservation back whole.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn settle_tenant(&self, grant: &TenantGrant, tokens: u64, usd: f64) -> Result<()> {
        let keys = TenantKeys::new(&grant.tenant);
        let mut c = self.redis.conn().await?;
        self.tenant_settle
            .key(keys.spend_on(&grant.day))
            .key(keys.spend_in(&grant.month))
            .key(keys.tokens_window())
            .key(keys.tokens_sum())
            .key(keys.in_flight())
            .arg(&grant.id)
            .arg(grant.tokens)
            .arg(tokens)
            .arg(to_micro(usd) - grant.micro_usd)
            .arg(u8::from(grant.budgets.0))
            .arg(u8::from(grant.budgets.1))
            .invoke_async::<i64>(&mut c)
            .await?;
        Ok(())
    }

    /// Usage against every limit of `tenant` (a line's `provider` is `tenant <name>`).
    ///
    /// # Errors
    /// Redis fails.
    pub async fn tenant_usage(
        &self,
        tenant: &str,
        limits: &TenantLimits,
        now: DateTime<Utc>,
    ) -> Result<Vec<QuotaLine>> {
        let keys = TenantKeys::new(tenant);
        let mut c = self.redis.conn().await?;
        let since = now.timestamp_millis() - TENANT_WINDOW.as_millis() as i64;
        type Usage = (Option<i64>, Option<i64>, u64, Vec<String>, u64);
        let (day, month, requests, members, in_flight): Usage = redis::pipe()
            .get(keys.spend_on(&day_label(now.date_naive())))
            .get(keys.spend_in(&month_label(now.date_naive())))
            .zcount(keys.requests_window(), since, "+inf")
            .zrangebyscore(keys.tokens_window(), since, "+inf")
            .zcount(keys.in_flight(), now.timestamp_millis(), "+inf")
            .query_async(&mut c)
            .await?;
        let window_end = now + chrono::Duration::from_std(TENANT_WINDOW).unwrap_or_default();
        let who = format!("tenant {tenant}");
        let line = |quota: &str, used: f64, limit: f64, reset| QuotaLine {
            provider: who.clone(),
            quota: quota.to_owned(),
            used,
            limit,
            remaining: (limit - used).max(0.0),
            reset,
        };
        let mut out = Vec::new();
        if let Some(l) = limits.budget_usd_day {
            let used = day.unwrap_or(0) as f64 / 1e6;
            out.push(line("budget_usd_day", used, l, next_day(now)));
        }
        if let Some(l) = limits.budget_usd_month {
            let used = month.unwrap_or(0) as f64 / 1e6;
            out.push(line("budget_usd_month", used, l, next_month(now)));
        }
        if let Some(l) = limits.rpm {
            out.push(line("rpm", requests as f64, l as f64, window_end));
        }
        if let Some(l) = limits.tpm {
            let used = tokens_of(&members) as f64;
            out.push(line("tpm", used, l as f64, window_end));
        }
        if let Some(l) = limits.max_in_flight {
            out.push(line("max_in_flight", in_flight as f64, l as f64, now));
        }
        Ok(out)
    }
}
