//! Figures over time for the operator page's charts and their CSV and JSON: per queue or
//! overall, tasks finished, succeeded, failed and dead, p50/p95 of time waiting and running,
//! calls by provider and model, call latency, tokens and cost.
//!
//! The last hour (by minute) and the last day (by hour) are read from the ledger's rows through
//! the BRIN summaries of finish and call times (`ledger::LATE_INDEXES`), exact; thirty days (by
//! day) from the rollups, whose call latency is a histogram of buckets 10 % wide (its p50 and
//! p95 are the bucket's middle, within 5 %), and which keep no waiting time.

use chrono::{DateTime, Duration, DurationRound, Utc};

use crate::ledger::{Ledger, Result};

/// How far back a series reaches, and its step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    /// The last 60 minutes, by minute.
    Hour,
    /// The last 24 hours, by hour.
    Day,
    /// The last 30 days, by day (from the rollups).
    Month,
}

impl Span {
    /// `hour`, `day` or `30d`.
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "hour" => Some(Self::Hour),
            "day" => Some(Self::Day),
            "30d" => Some(Self::Month),
            _ => None,
        }
    }

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Hour => "hour",
            Self::Day => "day",
            Self::Month => "30d",
        }
    }

    /// The step between two points.
    #[must_use]
    pub fn step(self) -> Duration {
        match self {
            Self::Hour => Duration::minutes(1),
            Self::Day => Duration::hours(1),
            Self::Month => Duration::days(1),
        }
    }

    /// The points' times: `[first, end)` by the step, ending with the one that holds `now`.
    #[must_use]
    pub fn range(self, now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
        let step = self.step();
        let last = now.duration_trunc(step).unwrap_or(now);
        let n = match self {
            Self::Hour => 60,
            Self::Day => 24,
            Self::Month => 30,
        };
        (last - step * (n - 1), last + step)
    }
}

/// One point: what finished and was called in `[at, at + step)`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct Point {
    pub at: DateTime<Utc>,
    pub finished: i64,
    pub succeeded: i64,
    /// Ended without success (failed, dead or cancelled); in a 30-day series, all of these.
    pub failed: i64,
    /// Of `failed`, dead-lettered (not told apart in a 30-day series: 0).
    pub dead: i64,
    /// From enqueue to its last attempt's start: time in the queue, retries' waits included.
    pub wait_p50_ms: Option<f64>,
    pub wait_p95_ms: Option<f64>,
    /// Its last attempt's duration (in a 30-day series, the mean, in both).
    pub run_p50_ms: Option<f64>,
    pub run_p95_ms: Option<f64>,
    pub calls: i64,
    /// Of the calls that answered.
    pub call_p50_ms: Option<f64>,
    pub call_p95_ms: Option<f64>,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost_usd: f64,
}

/// Calls of one provider and model in one point.
#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct ModelCalls {
    pub at: DateTime<Utc>,
    pub provider: String,
    pub model: String,
    pub calls: i64,
    pub errors: i64,
}

/// A series: a point per step (empty ones included), and the calls by provider and model.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Series {
    pub span: &'static str,
    pub queue: Option<String>,
    pub points: Vec<Point>,
    pub models: Vec<ModelCalls>,
}

/// The latency a histogram bucket stands for: the middle of `[1.1^i - 1, 1.1^(i+1) - 1)` ms
/// (`ledger_latency_bucket` in migrations/20261126000002_routing_rollups.sql).
fn bucket_ms(i: usize) -> f64 {
    let (lo, hi) = (1.1f64.powi(i as i32) - 1.0, 1.1f64.powi(i as i32 + 1) - 1.0);
    f64::midpoint(lo, hi)
}

/// The `q` quantile of a latency histogram; `None` when it is empty.
fn hist_quantile(h: &[i64], q: f64) -> Option<f64> {
    let total: i64 = h.iter().sum();
    if total == 0 {
        return None;
    }
    let want = (q * total as f64).ceil().max(1.0) as i64;
    let mut seen = 0;
    for (i, n) in h.iter().enumerate() {
        seen += n;
        if seen >= want {
            return Some(bucket_ms(i));
        }
    }
    None
}

impl Ledger {
    /// The series of `span` up to `now`, of `queue` or of every queue.
    ///
    /// # Errors
    /// Postgres fails.
    pub async fn series(
        &self,
        span: Span,
        queue: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Series> {
        let (from, to) = span.range(now);
        let (mut got, models) = match span {
            Span::Month => self.series_of_rollups(queue, from, to).await?,
            _ => self.series_of_rows(span, queue, from, to).await?,
        };
        // A point for every step, empty where nothing happened.
        let mut points = Vec::new();
        let mut at = from;
        got.sort_by_key(|p| p.at);
        let mut it = got.into_iter().peekable();
        while at < to {
            match it.peek() {
                Some(p) if p.at == at => points.extend(it.next()),
                _ => points.push(Point {
                    at,
                    ..Point::default()
                }),
            }
            at += span.step();
        }
        Ok(Series {
            span: span.name(),
            queue: queue.map(str::to_owned),
            points,
            models,
        })
    }

    async fn series_of_rows(
        &self,
        span: Span,
        queue: Option<&str>,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<(Vec<Point>, Vec<ModelCalls>)> {
        let step = format!("1 {}", if span == Span::Hour { "minute" } else { "hour" });
        let tasks = sqlx::query_as::<_, Point>(
            "WITH t AS (
                SELECT date_bin($1::interval, finished_at, $2) AS at, status, duration_ms,
                    extract(epoch FROM finished_at - enqueued_at) * 1000
                        - coalesce(duration_ms, 0) AS wait_ms
                FROM tasks
                WHERE finished_at >= $2 AND finished_at < $3 AND ($4::text IS NULL OR queue = $4)),
             c AS (
                SELECT date_bin($1::interval, called_at, $2) AS at,
                    count(*) AS calls,
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms)
                        FILTER (WHERE outcome = 'ok') AS call_p50_ms,
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms)
                        FILTER (WHERE outcome = 'ok') AS call_p95_ms,
                    sum(input_tokens)::int8 AS input_tokens,
                    sum(output_tokens)::int8 AS output_tokens,
                    sum(cost_usd)::float8 AS cost_usd
                FROM provider_calls
                WHERE called_at >= $2 AND called_at < $3 AND ($4::text IS NULL OR queue = $4)
                GROUP BY 1),
             s AS (
                SELECT at, count(*) AS finished,
                    count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
                    count(*) FILTER (WHERE status <> 'succeeded') AS failed,
                    count(*) FILTER (WHERE status = 'dead') AS dead,
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY wait_ms)
                        FILTER (WHERE wait_ms >= 0) AS wait_p50_ms,
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY wait_ms)
                        FILTER (WHERE wait_ms >= 0) AS wait_p95_ms,
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms) AS run_p50_ms,
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms) AS run_p95_ms
                FROM t GROUP BY 1)
             SELECT coalesce(s.at, c.at) AS at,
                coalesce(finished, 0) AS finished, coalesce(succeeded, 0) AS succeeded,
                coalesce(failed, 0) AS failed, coalesce(dead, 0) AS dead,
                wait_p50_ms, wait_p95_ms, run_p50_ms, run_p95_ms,
                coalesce(calls, 0) AS calls, call_p50_ms, call_p95_ms,
                coalesce(input_tokens, 0) AS input_tokens,
                coalesce(output_tokens, 0) AS output_tokens,
                coalesce(cost_usd, 0) AS cost_usd
             FROM s FULL JOIN c ON c.at = s.at",
        )
        .bind(&step)
        .bind(from)
        .bind(to)
        .bind(queue)
        .fetch_all(self.pool());
        let models = sqlx::query_as::<_, ModelCalls>(
            "SELECT date_bin($1::interval, called_at, $2) AS at, provider, model,
                count(*) AS calls, count(*) FILTER (WHERE outcome = 'error') AS errors
             FROM provider_calls
             WHERE called_at >= $2 AND called_at < $3 AND ($4::text IS NULL OR queue = $4)
             GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
        )
        .bind(&step)
        .bind(from)
        .bind(to)
        .bind(queue)
        .fetch_all(self.pool());
        // Each on a connection of its own, at once.
        Ok(tokio::try_join!(tasks, models)?)
    }

    async fn series_of_rollups(
        &self,
        queue: Option<&str>,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<(Vec<Point>, Vec<ModelCalls>)> {
        let (since, until) = (from.date_naive(), to.date_naive());
        // The rollups hold what the roll has summed: sum first, as every report does.
        crate::ledger::roll(self.pool()).await?;
        type Day = (chrono::NaiveDate, i64, i64, Option<f64>);
        let tasks: Vec<Day> = sqlx::query_as(
            "SELECT day, sum(tasks)::int8, sum(successes)::int8,
                (sum(duration_ms)::float8 / nullif(sum(durations), 0))
             FROM task_rollups
             WHERE day >= $1 AND day < $2 AND ($3::text IS NULL OR queue = $3)
             GROUP BY 1",
        )
        .bind(since)
        .bind(until)
        .bind(queue)
        .fetch_all(self.pool())
        .await?;
        type Calls = (chrono::NaiveDate, i64, i64, i64, f64);
        let calls: Vec<Calls> = sqlx::query_as(
            "SELECT day, sum(calls)::int8, sum(input_tokens)::int8, sum(output_tokens)::int8,
                sum(cost_usd)::float8
             FROM call_rollups
             WHERE day >= $1 AND day < $2 AND ($3::text IS NULL OR queue = $3)
             GROUP BY 1",
        )
        .bind(since)
        .bind(until)
        .bind(queue)
        .fetch_all(self.pool())
        .await?;
        // Each day's latency histogram, summed over its rows here (a sum per bucket in SQL
        // unnests every row's 160 buckets: ten times slower).
        let rows: Vec<(chrono::NaiveDate, Vec<i64>)> = sqlx::query_as(
            "SELECT day, latency FROM routing_rollups
             WHERE day >= $1 AND day < $2 AND ($3::text IS NULL OR queue = $3)",
        )
        .bind(since)
        .bind(until)
        .bind(queue)
        .fetch_all(self.pool())
        .await?;
        let mut hists: std::collections::BTreeMap<chrono::NaiveDate, Vec<i64>> =
            std::collections::BTreeMap::new();
        for (day, h) in rows {
            let sum = hists.entry(day).or_insert_with(|| vec![0; h.len()]);
            if sum.len() < h.len() {
                sum.resize(h.len(), 0);
            }
            for (s, n) in sum.iter_mut().zip(h) {
                *s += n;
            }
        }
        let models: Vec<(chrono::NaiveDate, String, String, i64)> = sqlx::query_as(
            "SELECT day, provider, model, sum(calls)::int8 FROM call_rollups
             WHERE day >= $1 AND day < $2 AND ($3::text IS NULL OR queue = $3)
             GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
        )
        .bind(since)
        .bind(until)
        .bind(queue)
        .fetch_all(self.pool())
        .await?;
        let at = |d: chrono::NaiveDate| d.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc();
        let mut fill = std::collections::BTreeMap::<chrono::NaiveDate, Point>::new();
        fn entry(
            fill: &mut std::collections::BTreeMap<chrono::NaiveDate, Point>,
            d: chrono::NaiveDate,
        ) -> &mut Point {
            fill.entry(d).or_insert_with(|| Point {
                at: d.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc(),
                ..Point::default()
            })
        }
        for (d, n, ok, mean) in tasks {
            let p = entry(&mut fill, d);
            p.finished = n;
            p.succeeded = ok;
            p.failed = n - ok;
            p.run_p50_ms = mean;
            p.run_p95_ms = mean;
        }
        for (d, n, input, output, cost) in calls {
            let p = entry(&mut fill, d);
            p.calls = n;
            p.input_tokens = input;
            p.output_tokens = output;
            p.cost_usd = cost;
        }
        for (d, h) in hists {
            let p = entry(&mut fill, d);
            p.call_p50_ms = hist_quantile(&h, 0.5);
            p.call_p95_ms = hist_quantile(&h, 0.95);
        }
        let models = models
            .into_iter()
            .map(|(d, provider, model, calls)| ModelCalls {
                at: at(d),
                provider,
                model,
                calls,
                errors: 0,
            })
            .collect();
        Ok((fill.into_values().collect(), models))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_s_quantiles_land_within_its_bucket() {
        // 95 calls in bucket 50 (116.4 to 128.1 ms), 5 in bucket 80.
        let mut h = vec![0i64; 160];
        h[50] = 95;
        h[80] = 5;
        let p50 = hist_quantile(&h, 0.5).unwrap();
        assert!((116.3..128.2).contains(&p50), "{p50}");
        let p95 = hist_quantile(&h, 0.95).unwrap();
        assert!((116.3..128.2).contains(&p95), "{p95}");
        let p99 = hist_quantile(&h, 0.99).unwrap();
        assert!(p99 > 1000.0, "{p99}");
        assert_eq!(hist_quantile(&[0; 160], 0.5), None);
    }

    #[test]
    fn a_span_ends_with_the_step_that_holds_now() {
        let now = DateTime::parse_from_rfc3339("2026-11-29T10:17:42Z")
            .unwrap()
            .to_utc();
        let (from, to) = Span::Hour.range(now);
        assert_eq!((to - from).num_minutes(), 60);
        assert_eq!(to.to_rfc3339(), "2026-11-29T10:18:00+00:00");
        let (from, to) = Span::Month.range(now);
        assert_eq!((to - from).num_days(), 30);
        assert_eq!(to.to_rfc3339(), "2026-11-30T00:00:00+00:00");
    }
}
