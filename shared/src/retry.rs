//! The one retry policy every backoff in llmq goes through, built on backon's exponential
//! backoff: a task's next attempt, the wait before a provider's next try, a worker writing
//! outcomes while Redis or Postgres is away, a fetcher whose reads fail.
//!
//! The wait before retry *n* is `first × 2^(n−1)`, capped at `max`, times a jitter uniform in
//! [1, 2) so that workers that failed together do not come back together, and capped at `max`
//! again; never shorter than a wait the other side asked for (`Retry-After`), itself capped
//! at `max`.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Exponential backoff with jitter between `first` and `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The wait before the first retry (before jitter).
    pub first: Duration,
    /// No wait is longer.
    pub max: Duration,
}

impl RetryPolicy {
    #[must_use]
    pub const fn new(first: Duration, max: Duration) -> Self {
        Self { first, max }
    }

    /// The waits before retry 1, 2, 3, ... without end.
    #[must_use]
    pub fn waits(&self) -> ExponentialBackoff {
        ExponentialBuilder::new()
            .with_min_delay(self.first)
            .with_max_delay(self.max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
    }

    /// The wait before retry `n` (1 for the first), never shorter than `at_least`.
    #[must_use]
    pub fn delay(&self, n: u32, at_least: Option<Duration>) -> Duration {
        // After 64 doublings every wait is the cap.
        let step = n.saturating_sub(1).min(64) as usize;
        let wait = self.waits().nth(step).unwrap_or(self.max).min(self.max);
        wait.max(at_least.unwrap_or_default()).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_with_jitter_up_to_the_cap() {
        let p = RetryPolicy::new(Duration::from_secs(1), Duration::from_secs(60));
        for n in 1..=5u32 {
            let base = 2f64.powi(n as i32 - 1);
            let got = p.delay(n, None).as_secs_f64();
            assert!(got >= base && got < base * 2.0, "retry {n}: {got}");
        }
        assert_eq!(p.delay(30, None), p.max);
        assert_eq!(p.delay(1_000, None), p.max);
        let waits: Vec<Duration> = p.waits().take(10).collect();
        assert!(waits.iter().all(|w| *w >= p.first), "{waits:?}");
    }

    #[test]
    fn a_requested_wait_is_honoured_up_to_the_cap() {
        let p = RetryPolicy::new(Duration::from_secs(1), Duration::from_secs(60));
        assert!(p.delay(1, Some(Duration::from_secs(9))) >= Duration::from_secs(9));
        assert_eq!(p.delay(1, Some(Duration::from_secs(600))), p.max);
    }
}
