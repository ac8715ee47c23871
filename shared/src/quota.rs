//! Quotas, rate limits and budgets, shared by every worker through Redis Lua.
//!
//! Before a call a worker reserves one request plus the estimated tokens and cost; the
//! script checks every limit of the provider and either takes the reservation or refuses,
//! atomically, so two workers can never both take the last request or spend the last dollar.
//! After the call the reservation is reconciled with the real usage.
//!
//! Windows: requests per day reset at 00:00 UTC, dollars per month on the 1st (UTC);
//! `rpm` and `tpm` count a sliding window (`quotas.window`, one minute by default, plus a
//! margin: [`Quotas::counted_window`]) from when each request is sent: a reservation is
//! stamped again right before its request goes out ([`Limiter::stamp`]).
//! Every function takes the time as an argument, so tests drive the clock.

use chrono::{DateTime, Datelike, TimeZone, Utc};
use redis::Script;

mod tenant;

pub use tenant::{SETTLE_EVERY, TENANT_WINDOW, TenantDecision, TenantGrant, TenantRefusal};

use crate::config::Quotas;
use crate::keys::ProviderKeys;
use crate::queue::{Client, Result};

/// A reservation to reconcile after the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub provider: String,
    pub id: String,
    pub tokens: u64,
    pub micro_usd: i64,
    month: String,
    /// The tpm pace's nanoseconds per token (0: no tpm), so reconciling moves it.
    token_pace_ns: u64,
    /// The thousandths of tokens the reservation charged the tpm pace (the mean of what
    /// calls use, a fraction), so reconciling moves it by what the call used beyond them.
    paced_millitokens: u64,
}

/// A task that may wait in a provider's line, and when it first asked for this call.
#[derive(Debug, Clone, Copy)]
pub struct Waiter<'a> {
    pub task: &'a str,
    pub since: DateTime<Utc>,
}

/// Why a provider cannot take a call now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// `requests_per_day`, `usd_per_month`, `rpm` or `tpm`.
    pub limit: String,
    /// When the limit frees up: for a paced limit, this asker's next slot.
    pub until: DateTime<Utc>,
    /// The asker waits in the provider's line until `until`, then asks again: its slot is
    /// near and kept for it. Otherwise it hands its task back.
    pub in_line: bool,
}

impl Refusal {
    /// The refusal as a sentence.
    #[must_use]
    pub fn describe(&self, provider: &str) -> String {
        let what = match self.limit.as_str() {
            "requests_per_day" => "its requests for today are used up",
            "usd_per_month" => "its budget for this month is spent",
            "rpm" => "it is at its requests-per-minute limit",
            "tpm" => "it is at its tokens-per-minute limit",
            _ => "a limit is reached",
        };
        format!(
            "{provider}: {what} until {}",
            self.until.format("%Y-%m-%d %H:%M:%S UTC")
        )
    }
}

/// The outcome of [`Limiter::reserve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Granted {
        reservation: Reservation,
        /// Thresholds crossed for the first time this window, e.g. `usd_per_month:80`.
        crossed: Vec<String>,
    },
    Refused(Refusal),
}

/// One line of `llmq quota`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct QuotaLine {
    pub provider: String,
    pub quota: String,
    pub used: f64,
    pub limit: f64,
    pub remaining: f64,
    pub reset: DateTime<Utc>,
}

impl QuotaLine {
    /// Whether the line counts dollars.
    #[must_use]
    pub fn money(&self) -> bool {
        self.quota == "usd_per_month" || self.quota.starts_with("budget_usd")
    }

    /// How much of the limit is used, in percent (0 for no limit).
    #[must_use]
    pub fn percent(&self) -> f64 {
        if self.limit > 0.0 {
            self.used * 100.0 / self.limit
        } else {
            0.0
        }
    }
}

/// A reply's element as text.
fn text(v: &redis::Value) -> String {
    match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        redis::Value::Int(n) => n.to_string(),
        other => format!("{other:?}"),
    }
}

/// A refusal as the quota scripts answer it: `{0, limit name, when it frees up (ms)}`.
fn refusal(reply: &[redis::Value], now: DateTime<Utc>) -> Refusal {
    let until_ms = reply
        .get(2)
        .map(text)
        .and_then(|t| t.parse::<i64>().ok())
        .unwrap_or(0);
    Refusal {
        limit: reply.get(1).map(text).unwrap_or_default(),
        until: DateTime::from_timestamp_millis(until_ms).unwrap_or(now),
        in_line: matches!(reply.get(3), Some(redis::Value::Int(1))),
    }
}

/// Quota and rate-limit state in Redis.
#[derive(Clone)]
pub struct Limiter {
    redis: Client,
    reserve: std::sync::Arc<Script>,
    stamp: std::sync::Arc<Script>,
    reconcile: std::sync::Arc<Script>,
    tenant_reserve: std::sync::Arc<Script>,
    /// Tenants' settles not yet sent (`tenant.rs`).
    settles: std::sync::Arc<std::sync::Mutex<tenant::Settles>>,
    /// Tenants' calls waiting for their reservation (`tenant.rs`).
    asks: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, tenant::Asks>>>,
}

impl Limiter {
    #[must_use]
    pub fn new(redis: Client) -> Self {
        Self {
            redis,
            reserve: std::sync::Arc::new(Script::new(concat!(
                include_str!("quota/window.lua"),
                include_str!("quota/reserve.lua")
            ))),
            stamp: std::sync::Arc::new(Script::new(concat!(
                include_str!("quota/window.lua"),
                include_str!("quota/stamp.lua")
            ))),
            reconcile: std::sync::Arc::new(Script::new(include_str!("quota/reconcile.lua"))),
            tenant_reserve: std::sync::Arc::new(Script::new(include_str!(
                "quota/tenant_reserve.lua"
            ))),
            settles: std::sync::Arc::default(),
            asks: std::sync::Arc::default(),
        }
    }

    /// Reserves one call of about `tokens` tokens costing about `usd`, for a task of
    /// `priority` (0 when it has none): the shares `quotas.reserve` holds for the other
    /// priorities that are asking are left free (`quota/reserve.lua`). The asker may not
    /// wait in the line: see [`Limiter::reserve_in_line`].
    ///
    /// # Errors
    /// Redis fails.
    pub async fn reserve(
        &self,
        provider: &str,
        quotas: &Quotas,
        priority: u8,
        tokens: u64,
        usd: f64,
        now: DateTime<Utc>,
    ) -> Result<Decision> {
        self.reserve_in_line(provider, quotas, (priority, None), tokens, usd, now)
            .await
    }

    /// [`Limiter::reserve`] for `asker`: a priority, and the task asking, which may wait in
    /// the provider's line when its slot is near (`Refusal::in_line`): the line gives a slot
    /// that opens to the most urgent priority waiting, and within it to who asked first. A
    /// waiter back late (past its slot and grace) has left the line; it comes back in at
    /// the place its first ask gives it (at most a window old), not at the end.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn reserve_in_line(
        &self,
        provider: &str,
        quotas: &Quotas,
        asker: (u8, Option<Waiter<'_>>),
        tokens: u64,
        usd: f64,
        now: DateTime<Utc>,
    ) -> Result<Decision> {
        let (priority, waiter) = asker;
        let keys = ProviderKeys::new(provider);
        let (day, month) = (day_label(now.date_naive()), month_label(now.date_naive()));
        let micro = to_micro(usd);
        let id = uuid::Uuid::new_v4().simple().to_string();
        let limit = |v: Option<u64>| v.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX));
        let mut c = self.redis.conn().await?;
        let reply: Vec<redis::Value> = self
            .reserve
            .key(keys.requests_on(&day))
            .key(keys.spend_in(&month))
            .key(keys.requests_window())
            .key(keys.tokens_window())
            .key(keys.alerts())
            .key(keys.tokens_sum())
            .key(keys.requests_pace())
            .key(keys.tokens_pace())
            .key(keys.line())
            .key(keys.line_back())
            .key(keys.tokens_mean())
            .key(keys.tokens_slack())
            .arg(now.timestamp_millis())
            .arg(&id)
            .arg(tokens)
            .arg(micro)
            .arg(limit(quotas.requests_per_day))
            .arg(quotas.usd_per_month.map_or(-1, to_micro))
            .arg(limit(quotas.rpm))
            .arg(limit(quotas.tpm))
            .arg(quotas.counted_window().as_millis() as i64)
            .arg(next_day(now).timestamp_millis())
            .arg(next_month(now).timestamp_millis())
            .arg(&day)
            .arg(&month)
            .arg(priority)
            .arg(shares(quotas))
            .arg(quotas.burst())
            .arg(waiter.map_or("", |w| w.task))
            .arg(waiter.map_or(0, |w| w.since.timestamp_millis()))
            .invoke_async(&mut c)
            .await?;
        match reply.first() {
            Some(redis::Value::Int(1)) => Ok(Decision::Granted {
                reservation: Reservation {
                    provider: provider.to_owned(),
                    id,
                    tokens,
                    micro_usd: micro,
                    month,
                    token_pace_ns: quotas.tpm.map_or(0, |t| {
                        (quotas.counted_window().as_nanos() / u128::from(t.max(1))) as u64
                    }),
                    paced_millitokens: match reply.get(1) {
                        Some(redis::Value::Int(n)) => u64::try_from(*n).unwrap_or(tokens * 1000),
                        _ => tokens * 1000,
                    },
                },
                crossed: reply.iter().skip(2).map(text).collect(),
            }),
            _ => Ok(Decision::Refused(refusal(&reply, now))),
        }
    }

    /// Stamps granted reservation `r` with `now`, when its request is sent: a provider counts
    /// requests as they arrive, so the rolling windows (`rpm`, `tpm`) count the send, not the
    /// reservation. `Some` when the call waited so long that its reservation left the window
    /// and the window is full now: send it no sooner than the refusal says. Without a
    /// rolling window there is nothing to stamp, and no Redis call.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn stamp(
        &self,
        r: &Reservation,
        quotas: &Quotas,
        now: DateTime<Utc>,
    ) -> Result<Option<Refusal>> {
        if quotas.rpm.is_none() && quotas.tpm.is_none() {
            return Ok(None);
        }
        let keys = ProviderKeys::new(&r.provider);
        let limit = |v: Option<u64>| v.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX));
        let mut c = self.redis.conn().await?;
        let reply: Vec<redis::Value> = self
            .stamp
            .key(keys.requests_window())
            .key(keys.tokens_window())
            .key(keys.tokens_sum())
            .arg(now.timestamp_millis())
            .arg(&r.id)
            .arg(r.tokens)
            .arg(limit(quotas.rpm))
            .arg(limit(quotas.tpm))
            .arg(quotas.counted_window().as_millis() as i64)
            .invoke_async(&mut c)
            .await?;
        Ok(match reply.first() {
            Some(redis::Value::Int(1)) => None,
            _ => Some(refusal(&reply, now)),
        })
    }

    /// Replaces a reservation's estimate with the real tokens and cost.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn reconcile(&self, r: &Reservation, tokens: u64, usd: f64) -> Result<()> {
        let keys = ProviderKeys::new(&r.provider);
        let mut c = self.redis.conn().await?;
        self.reconcile
            .key(keys.spend_in(&r.month))
            .key(keys.tokens_window())
            .key(keys.tokens_sum())
            .key(keys.tokens_pace())
            .key(keys.tokens_mean())
            .key(keys.tokens_slack())
            .arg(&r.id)
            .arg(r.tokens)
            .arg(tokens)
            .arg(to_micro(usd) - r.micro_usd)
            .arg(r.token_pace_ns as f64 / 1e6)
            .arg(r.paced_millitokens as f64 / 1000.0)
            .invoke_async::<i64>(&mut c)
            .await?;
        Ok(())
    }

    /// Usage against every limit of the provider file: each provider's quotas, then each
    /// tenant's limits, for the tenants it names and `tenants` (the default limits' too).
    ///
    /// # Errors
    /// Redis fails.
    pub async fn all_usage(
        &self,
        config: &crate::config::Config,
        tenants: &[String],
        now: DateTime<Utc>,
    ) -> Result<Vec<QuotaLine>> {
        let mut lines = Vec::new();
        for p in config.providers.iter().filter(|p| !p.quotas.is_empty()) {
            lines.extend(self.usage(&p.name, &p.quotas, now).await?);
        }
        let named = config.tenants.limits.keys();
        let mut seen = std::collections::BTreeSet::new();
        for tenant in named.chain(tenants) {
            if let Some(limits) = config.tenants.limits_of(tenant)
                && seen.insert(tenant.as_str())
            {
                lines.extend(self.tenant_usage(tenant, limits, now).await?);
            }
        }
        Ok(lines)
    }

    /// Usage against every configured limit of `provider`.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn usage(
        &self,
        provider: &str,
        quotas: &Quotas,
        now: DateTime<Utc>,
    ) -> Result<Vec<QuotaLine>> {
        let keys = ProviderKeys::new(provider);
        let mut c = self.redis.conn().await?;
        let since = now.timestamp_millis() - quotas.counted_window().as_millis() as i64;
        let (day, month, in_window, members): (Option<u64>, Option<i64>, u64, Vec<String>) =
            redis::pipe()
                .get(keys.requests_on(&day_label(now.date_naive())))
                .get(keys.spend_in(&month_label(now.date_naive())))
                .zcount(keys.requests_window(), since, "+inf")
                .zrangebyscore(keys.tokens_window(), since, "+inf")
                .query_async(&mut c)
                .await?;
        let tokens = tokens_of(&members);
        let window_end =
            now + chrono::Duration::from_std(quotas.counted_window()).unwrap_or_default();
        let mut out = Vec::new();
        let mut line = |quota: &str, used: f64, limit: f64, reset| {
            out.push(QuotaLine {
                provider: provider.to_owned(),
                quota: quota.to_owned(),
                used,
                limit,
                remaining: (limit - used).max(0.0),
                reset,
            });
        };
        if let Some(l) = quotas.requests_per_day {
            line(
                "requests_per_day",
                day.unwrap_or(0) as f64,
                l as f64,
                next_day(now),
            );
        }
        if let Some(l) = quotas.usd_per_month {
            line(
                "usd_per_month",
                month.unwrap_or(0) as f64 / 1e6,
                l,
                next_month(now),
            );
        }
        if let Some(l) = quotas.rpm {
            line("rpm", in_window as f64, l as f64, window_end);
        }
        if let Some(l) = quotas.tpm {
            line("tpm", tokens as f64, l as f64, window_end);
        }
        // With shares set, each priority's use of the window: against its share when it
        // has one (`... held for priority <p>`), else against the whole limit (`... used by
        // priority <p>`), shown while it has calls in the window.
        if quotas.reserve.iter().any(|&pct| pct > 0) {
            // Every priority's window in one round trip.
            let mut pipe = redis::pipe();
            for p in 0..quotas.reserve.len() {
                pipe.zcount(keys.requests_window_of(p), since, "+inf")
                    .zrangebyscore(keys.tokens_window_of(p), since, "+inf");
            }
            let windows: Vec<(u64, Vec<String>)> = pipe.query_async(&mut c).await?;
            for (p, (&pct, (requests, members))) in quotas.reserve.iter().zip(windows).enumerate() {
                if pct == 0 && requests == 0 {
                    continue;
                }
                let (what, share) = if pct > 0 {
                    ("held for", u64::from(pct))
                } else {
                    ("used by", 100)
                };
                if let Some(l) = quotas.rpm {
                    let limit = (l * share / 100) as f64;
                    line(
                        &format!("rpm {what} priority {p}"),
                        requests as f64,
                        limit,
                        window_end,
                    );
                }
                if let Some(l) = quotas.tpm {
                    let limit = (l * share / 100) as f64;
                    let used = tokens_of(&members) as f64;
                    line(&format!("tpm {what} priority {p}"), used, limit, window_end);
                }
            }
        }
        Ok(out)
    }
}

/// USD as integer micro-dollars, rounded up so reservations never undercount.
fn to_micro(usd: f64) -> i64 {
    (usd * 1e6).ceil() as i64
}

/// The label of a day's request counter (`YYYYMMDD`, UTC).
#[must_use]
pub fn day_label(d: chrono::NaiveDate) -> String {
    d.format("%Y%m%d").to_string()
}

/// The label of a month's spend counter (`YYYYMM`, UTC).
#[must_use]
pub fn month_label(d: chrono::NaiveDate) -> String {
    d.format("%Y%m").to_string()
}

/// The next 00:00 UTC.
#[must_use]
pub fn next_day(t: DateTime<Utc>) -> DateTime<Utc> {
    let d = t.date_naive() + chrono::Duration::days(1);
    Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).unwrap_or_default())
}

/// 00:00 UTC on the next 1st.
#[must_use]
pub fn next_month(t: DateTime<Utc>) -> DateTime<Utc> {
    let (y, m) = if t.month() == 12 {
        (t.year() + 1, 1)
    } else {
        (t.year(), t.month() + 1)
    };
    Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0).single().unwrap_or(t)
}

/// The tokens of a token window's members (`<reservation id>:<tokens>`).
fn tokens_of(members: &[String]) -> u64 {
    members
        .iter()
        .filter_map(|m| m.rsplit(':').next()?.parse::<u64>().ok())
        .sum()
}

/// `quotas.reserve` as `reserve.lua` reads it: `<priority>:<percent>` comma-separated.
fn shares(quotas: &Quotas) -> String {
    let mut out = String::new();
    for (p, pct) in quotas
        .reserve
        .iter()
        .enumerate()
        .filter(|(_, pct)| **pct > 0)
    {
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(&format!("{p}:{pct}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_reset_at_utc_boundaries() {
        let t = Utc.with_ymd_and_hms(2026, 12, 31, 23, 59, 59).unwrap();
        assert_eq!(
            next_day(t),
            Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap()
        );
        assert_eq!(
            next_month(t),
            Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap()
        );
        let t = Utc.with_ymd_and_hms(2026, 2, 10, 5, 0, 0).unwrap();
        assert_eq!(
            next_month(t),
            Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap()
        );
    }
}
