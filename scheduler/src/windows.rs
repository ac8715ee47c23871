//! The `quota_windows` duty: records the usage of closed quota windows.
//!
//! Quota counters are per-window Redis keys (`ProviderKeys::requests_on(day)`,
//! `ProviderKeys::spend_in(month)`) that expire a day after their window ends, so nothing
//! resets them: at 00:00 UTC reservations start counting in the new day's empty key, and on
//! the 1st in the new month's. What this duty adds is history: on its first run of a day it
//! writes the previous day's requests of every provider with quotas to `quota_history`, and on
//! the 1st the previous month's spend, while those keys still exist. Rows are upserted, so a
//! second run (a new holder, a restart) writes the same values, or later-reconciled ones; a
//! counter that is gone never overwrites a recorded value.

use chrono::{Datelike, NaiveDate};

use llmq_shared::keys::ProviderKeys;
use llmq_shared::quota::{day_label, month_label};

use crate::{Result, Scheduler};

impl Scheduler {
    /// The `quota_windows` duty: records yesterday's requests and, on the 1st, last month's
    /// spend of every provider with quotas, once per day per holder. Returns what it recorded.
    ///
    /// # Errors
    /// Redis or Postgres fails; [`crate::Error::NotLeader`] when another instance took over.
    pub async fn close_quota_windows(&mut self) -> Result<String> {
        let now = self.now();
        let today = now.date_naive();
        let Some(day) = today.pred_opt() else {
            return Ok("no previous day".into());
        };
        if self.windows_closed == Some(today) {
            return Ok(format!("windows up to {day} are recorded"));
        }
        let month = (today.day() == 1).then(|| day.with_day(1)).flatten();
        let providers: Vec<String> = self
            .config
            .providers
            .iter()
            .filter(|p| !p.quotas.is_empty())
            .map(|p| p.name.to_string())
            .collect();
        // One pipeline per provider: each stays in its provider's slot (Redis Cluster).
        let mut counters: Vec<Option<i64>> = Vec::new();
        if !providers.is_empty() {
            let mut c = self.redis.conn().await?;
            for name in &providers {
                let keys = ProviderKeys::new(name);
                let mut pipe = redis::pipe();
                pipe.get(keys.requests_on(&day_label(day)));
                if month.is_some() {
                    pipe.get(keys.spend_in(&month_label(day)));
                }
                let part: Vec<Option<i64>> = pipe.query_async(&mut c).await?;
                counters.extend(part);
            }
        }
        let mut counters = counters.into_iter();
        let mut tx = self.lease.fenced_tx(&self.redis, &self.pool).await?;
        for name in &providers {
            let requests = counters.next().flatten();
            record(&mut tx, name, "day", day, requests, now).await?;
            if let Some(month) = month {
                let micro_usd = counters.next().flatten();
                record(&mut tx, name, "month", month, micro_usd, now).await?;
            }
        }
        tx.commit().await?;
        self.windows_closed = Some(today);
        let months = month.map_or(String::new(), |m| {
            format!(" and month {}", m.format("%Y-%m"))
        });
        Ok(format!(
            "recorded day {day}{months} for {} provider(s)",
            providers.len()
        ))
    }
}

/// Upserts one window: requests for a day, micro-dollars for a month. `counter` is what Redis
/// held; `None` (the key is gone: the window saw no use, or it expired after being recorded)
/// inserts a zero row but never overwrites one.
async fn record(
    tx: &mut sqlx::PgConnection,
    provider: &str,
    kind: &str,
    start: NaiveDate,
    counter: Option<i64>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<()> {
    let value = Some(counter.unwrap_or(0));
    let (requests, micro_usd) = if kind == "day" {
        (value, None)
    } else {
        (None, value)
    };
    sqlx::query(
        "INSERT INTO quota_history (provider, window_kind, window_start, requests, usd, closed_at)
         VALUES ($1, $2, $3, $4, $5::bigint / 1000000.0, $6)
         ON CONFLICT (provider, window_kind, window_start) DO UPDATE
         SET requests = EXCLUDED.requests, usd = EXCLUDED.usd, closed_at = EXCLUDED.closed_at
         WHERE $7::bool",
    )
    .bind(provider)
    .bind(kind)
    .bind(start)
    .bind(requests)
    .bind(micro_usd)
    .bind(now)
    .bind(counter.is_some())
    .execute(tx)
    .await?;
    Ok(())
}
