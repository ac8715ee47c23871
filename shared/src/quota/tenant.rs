//! A tenant's limits (`tenants.limits` in the provider file), shared by every worker:
//! budgets per day and month, `rpm`, `tpm` and calls in flight, reserved before each call
//! with the provider's quotas (`tenant_reserve.lua`) and settled after it. Settles are
//! gathered and sent every [`SETTLE_EVERY`], a command per tenant's counter for all the
//! calls settled meanwhile, so a call costs Redis one script. A settle nearly always lowers
//! what a reservation counted (the estimate counts `max_tokens` whole) or frees a place in
//! flight: sent a moment later, it makes the limits stricter meanwhile, not looser; only a
//! call that cost more than its estimate adds the rest that moment later.

use std::collections::HashMap;
use std::sync::PoisonError;

use chrono::{DateTime, Utc};

use super::{QuotaLine, day_label, month_label, next_day, next_month, text, to_micro};
use crate::config::TenantLimits;
use crate::keys::TenantKeys;
use crate::queue::{Error, Result};

/// The window a tenant's `rpm` and `tpm` count over.
pub const TENANT_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// How often gathered settles are sent.
pub const SETTLE_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

/// How far ahead a tenant's pace grants a slot: a call whose slot is nearer waits for it in
/// the worker; one further is refused (its task held in the room) until it is nearer.
const HORIZON: std::time::Duration = std::time::Duration::from_secs(1);

/// The most calls one script reserves.
const MAX_ASKS: usize = 64;

/// One call waiting for its reservation.
#[derive(Debug)]
struct Ask {
    limits: TenantLimits,
    tokens: u64,
    micro: i64,
    lease: std::time::Duration,
    now: DateTime<Utc>,
    tx: tokio::sync::oneshot::Sender<Result<TenantDecision>>,
}

/// A tenant's calls waiting for their reservation, and whether an ask is in flight.
#[derive(Debug, Default)]
pub(super) struct Asks {
    waiting: Vec<Ask>,
    asking: bool,
}

/// The same error for each of a batch's calls.
fn copy(e: &Error) -> Error {
    match e {
        Error::Connect(why) => Error::Connect(why.clone()),
        other => Error::Protocol(other.to_string()),
    }
}

/// Settles not yet sent, by tenant: what to add to each of its counters, and the calls no
/// longer in flight.
#[derive(Debug, Default)]
pub(super) struct Settles {
    by_tenant: HashMap<String, Settle>,
    /// Whether the task that sends them runs.
    sending: bool,
}

#[derive(Debug, Default)]
struct Settle {
    counters: HashMap<String, i64>,
    done: Vec<String>,
}

/// A tenant's reservation, settled after its call ([`super::Limiter::settle_tenant`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantGrant {
    pub tenant: String,
    id: String,
    micro_usd: i64,
    day: String,
    month: String,
    /// Whether the day's and the month's budgets counted it.
    budgets: (bool, bool),
    /// Whether it holds a place in flight.
    in_flight: bool,
    /// How long to wait for the slot the tenant's pace gave it.
    pub wait: std::time::Duration,
}

impl TenantGrant {
    /// The dollars it reserved.
    #[must_use]
    pub fn estimate(&self) -> f64 {
        self.micro_usd as f64 / 1e6
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
    /// `limits`; a call in flight counts for `lease` at most, should its worker die. The
    /// calls of a tenant asked for while one ask is in flight go together in the next (one
    /// script for them all, `tenant_reserve.lua`), each granted or refused as if alone.
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
        let (tx, rx) = tokio::sync::oneshot::channel();
        let ask = Ask {
            limits: *limits,
            tokens,
            micro: to_micro(usd),
            lease,
            now,
            tx,
        };
        let start = {
            let mut asks = self.asks.lock().unwrap_or_else(PoisonError::into_inner);
            let queue = asks.entry(tenant.to_owned()).or_default();
            queue.waiting.push(ask);
            !std::mem::replace(&mut queue.asking, true)
        };
        if start {
            let limiter = self.clone();
            let tenant = tenant.to_owned();
            tokio::spawn(async move { limiter.ask_tenant(&tenant).await });
        }
        rx.await
            .map_err(|_| Error::Protocol("a tenant's reservation was dropped".into()))?
    }

    /// Sends `tenant`'s asks, as many at once as wait, until none waits.
    async fn ask_tenant(&self, tenant: &str) {
        loop {
            let asks = {
                let mut all = self.asks.lock().unwrap_or_else(PoisonError::into_inner);
                let Some(queue) = all.get_mut(tenant) else {
                    return;
                };
                if queue.waiting.is_empty() {
                    all.remove(tenant);
                    return;
                }
                let n = queue.waiting.len().min(MAX_ASKS);
                queue.waiting.drain(..n).collect::<Vec<Ask>>()
            };
            match self.reserve_many(tenant, &asks).await {
                Ok(decisions) => {
                    for (ask, d) in asks.into_iter().zip(decisions) {
                        let _ = ask.tx.send(Ok(d));
                    }
                }
                Err(e) => {
                    for ask in asks {
                        let _ = ask.tx.send(Err(copy(&e)));
                    }
                }
            }
        }
    }

    /// One `tenant_reserve.lua` for `asks`, all of one tenant.
    async fn reserve_many(&self, tenant: &str, asks: &[Ask]) -> Result<Vec<TenantDecision>> {
        let Some(first) = asks.first() else {
            return Ok(Vec::new());
        };
        let (limits, now) = (&first.limits, first.now);
        let keys = TenantKeys::new(tenant);
        let (day, month) = (day_label(now.date_naive()), month_label(now.date_naive()));
        let ids: Vec<String> = asks
            .iter()
            .map(|_| uuid::Uuid::new_v4().simple().to_string())
            .collect();
        let mut inv = self.tenant_reserve.key(keys.spend_on(&day));
        inv.key(keys.spend_in(&month))
            .key(keys.requests_pace())
            .key(keys.tokens_pace())
            .key(keys.in_flight())
            .key(keys.alerts())
            .arg(now.timestamp_millis())
            .arg(limits.budget_usd_day.map_or(-1, to_micro))
            .arg(limits.budget_usd_month.map_or(-1, to_micro))
            .arg(limit(limits.rpm))
            .arg(limit(limits.tpm))
            .arg(limit(limits.max_in_flight))
            .arg(TENANT_WINDOW.as_millis() as i64)
            .arg(next_day(now).timestamp_millis())
            .arg(next_month(now).timestamp_millis())
            .arg(first.lease.as_millis().max(1000) as i64)
            .arg(&day)
            .arg(&month)
            .arg(HORIZON.as_millis() as i64);
        for (ask, id) in asks.iter().zip(&ids) {
            inv.arg(id).arg(ask.tokens).arg(ask.micro);
        }
        let mut c = self.redis.conn().await?;
        let reply: Vec<redis::Value> = inv.invoke_async(&mut c).await?;
        if reply.len() < 3 * asks.len() {
            return Err(Error::Protocol(format!(
                "a tenant's reservation returned {reply:?}"
            )));
        }
        let crossed: Vec<String> = reply[3 * asks.len()..].iter().map(text).collect();
        let number = |v: &redis::Value| text(v).parse::<i64>().ok();
        let value = |name: &str| match name {
            "budget_usd_day" => limits.budget_usd_day.unwrap_or_default(),
            "budget_usd_month" => limits.budget_usd_month.unwrap_or_default(),
            "rpm" => limits.rpm.unwrap_or_default() as f64,
            "tpm" => limits.tpm.unwrap_or_default() as f64,
            _ => limits.max_in_flight.unwrap_or_default() as f64,
        };
        let mut out = Vec::with_capacity(asks.len());
        for (i, (ask, id)) in asks.iter().zip(ids).enumerate() {
            let r = &reply[3 * i..3 * i + 3];
            out.push(if let redis::Value::Int(1) = r[0] {
                let wait = u64::try_from(number(&r[1]).unwrap_or(0)).unwrap_or(0);
                TenantDecision::Granted {
                    grant: TenantGrant {
                        tenant: tenant.to_owned(),
                        id,
                        micro_usd: ask.micro,
                        day: day.clone(),
                        month: month.clone(),
                        budgets: (
                            limits.budget_usd_day.is_some(),
                            limits.budget_usd_month.is_some(),
                        ),
                        in_flight: limits.max_in_flight.is_some(),
                        wait: std::time::Duration::from_millis(wait),
                    },
                    // Told once, with the first call granted.
                    crossed: if i == 0 { crossed.clone() } else { Vec::new() },
                }
            } else {
                let name = text(&r[1]);
                TenantDecision::Refused(TenantRefusal {
                    tenant: tenant.to_owned(),
                    value: value(&name),
                    limit: name,
                    until: number(&r[2])
                        .and_then(DateTime::from_timestamp_millis)
                        .unwrap_or(now),
                })
            });
        }
        Ok(out)
    }

    /// Settles `grant` at what its call used and cost: `(0, 0.0)` for a call never sent,
    /// which gives its reservation back whole. Gathered, and sent within [`SETTLE_EVERY`]
    /// by a task of this limiter's own (started by the first settle), or by
    /// [`Limiter::send_settles`](super::Limiter::send_settles).
    pub fn settle_tenant(&self, grant: &TenantGrant, usd: f64) {
        let keys = TenantKeys::new(&grant.tenant);
        let more = to_micro(usd) - grant.micro_usd;
        let start = {
            let mut settles = self.settles.lock().unwrap_or_else(PoisonError::into_inner);
            let settle = settles.by_tenant.entry(grant.tenant.clone()).or_default();
            if more != 0 {
                if grant.budgets.0 {
                    *settle
                        .counters
                        .entry(keys.spend_on(&grant.day))
                        .or_default() += more;
                }
                if grant.budgets.1 {
                    *settle
                        .counters
                        .entry(keys.spend_in(&grant.month))
                        .or_default() += more;
                }
            }
            if grant.in_flight {
                settle.done.push(grant.id.clone());
            }
            !std::mem::replace(&mut settles.sending, true)
        };
        if start && let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let limiter = self.clone();
            runtime.spawn(async move {
                loop {
                    tokio::time::sleep(SETTLE_EVERY).await;
                    if let Err(e) = limiter.send_settles().await {
                        tracing::warn!("cannot settle tenants' calls (sent again shortly): {e}");
                    }
                }
            });
        }
    }

    /// Sends the settles gathered: per tenant, one pipeline of a command per counter and
    /// one for the calls no longer in flight. A tenant's that fail are gathered again.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn send_settles(&self) -> Result<()> {
        let taken = std::mem::take(
            &mut self
                .settles
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .by_tenant,
        );
        let mut failed = None;
        for (tenant, settle) in taken {
            let keys = TenantKeys::new(&tenant);
            let mut pipe = redis::pipe();
            for (key, more) in &settle.counters {
                // A counter whose day or month is long over has expired: not made again.
                pipe.cmd("INCRBY").arg(key).arg(*more).ignore();
                pipe.cmd("PEXPIRE")
                    .arg(key)
                    .arg(2 * 86_400_000)
                    .arg("NX")
                    .ignore();
            }
            if !settle.done.is_empty() {
                pipe.zrem(keys.in_flight(), &settle.done).ignore();
            }
            let sent: Result<()> = async {
                let mut c = self.redis.conn().await?;
                pipe.query_async::<()>(&mut c).await?;
                Ok(())
            }
            .await;
            if let Err(e) = sent {
                let mut settles = self.settles.lock().unwrap_or_else(PoisonError::into_inner);
                let again = settles.by_tenant.entry(tenant).or_default();
                for (key, more) in settle.counters {
                    *again.counters.entry(key).or_default() += more;
                }
                again.done.extend(settle.done);
                failed = Some(e);
            }
        }
        failed.map_or(Ok(()), Err)
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
        type Usage = (Option<i64>, Option<i64>, Option<f64>, Option<f64>, u64);
        let (day, month, rpm_pace, tpm_pace, in_flight): Usage = redis::pipe()
            .get(keys.spend_on(&day_label(now.date_naive())))
            .get(keys.spend_in(&month_label(now.date_naive())))
            .get(keys.requests_pace())
            .get(keys.tokens_pace())
            .zcount(keys.in_flight(), now.timestamp_millis(), "+inf")
            .query_async(&mut c)
            .await?;
        // A pace ahead of now by a whole minute is the limit, spent: the share of the minute
        // it is ahead.
        let ahead = |pace: Option<f64>| {
            let ms = pace.unwrap_or(0.0) - now.timestamp_millis() as f64;
            (ms / TENANT_WINDOW.as_millis() as f64).clamp(0.0, 1.0)
        };
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
            let used = (ahead(rpm_pace) * l as f64).round();
            out.push(line("rpm", used, l as f64, window_end));
        }
        if let Some(l) = limits.tpm {
            let used = (ahead(tpm_pace) * l as f64).round();
            out.push(line("tpm", used, l as f64, window_end));
        }
        if let Some(l) = limits.max_in_flight {
            out.push(line("max_in_flight", in_flight as f64, l as f64, now));
        }
        Ok(out)
    }
}
