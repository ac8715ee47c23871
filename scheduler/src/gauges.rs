//! The `gauges` duty: queue depths and quota use as Prometheus gauges, published by the
//! scheduler that holds the lease and by no one else, so a sum over pods counts each queue
//! once (workers used to publish them, and N worker replicas counted every queue N times).
//!
//! `llmq_queue_backlog{queue}` is what an autoscaler wants: tasks waiting plus running, the
//! same number as `XLEN` of the queue's stream (llmq deletes an entry when its task ends).
//! A scheduler that loses the lease sets what it published to 0, so a sum stays right.

use std::time::Duration;

use llmq_shared::keys::QueueKeys;
use llmq_shared::quota::Limiter;

use crate::{Result, Scheduler};

/// How often the holder publishes.
pub(crate) const EVERY: Duration = Duration::from_secs(5);

/// The per-queue gauges, with the count each one shows.
const QUEUE_GAUGES: [&str; 6] = [
    "llmq_queue_ready",
    "llmq_queue_in_flight",
    "llmq_queue_delayed",
    "llmq_queue_dead",
    "llmq_queue_backlog",
    "llmq_queue_workers",
];

/// 1 on the scheduler that holds the lease (and publishes), 0 on the others.
const LEADER: &str = "llmq_scheduler_is_leader";

/// 1 while a configured provider/model's circuit is open.
const CIRCUIT_OPEN: &str = "llmq_circuit_open";

/// How long the oldest task ready in a queue's stream has waited (s), 0 with none.
const OLDEST_READY: &str = "llmq_queue_oldest_ready_age_seconds";

/// Every priority a task can have, for the room's gauge.
const PRIORITIES: std::ops::RangeInclusive<u8> = 0..=llmq_shared::envelope::MAX_PRIORITY;

/// `llmq_queue_ready_in_room{queue,priority}`: tasks waiting in the room at priority `p`.
fn room_gauge(queue: &str, p: u8) -> metrics::Gauge {
    metrics::gauge!("llmq_queue_ready_in_room", "queue" => queue.to_owned(), "priority" => p.to_string())
}

impl Scheduler {
    /// Publishes every served queue's depths and every quota's use. Returns what it did.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn publish_gauges(&mut self) -> Result<String> {
        let queues = self.served_queues().await?;
        for queue in &queues {
            let c = self.redis.counts(&QueueKeys::new(queue)).await?;
            let values = [
                c.ready,
                c.in_flight,
                c.delayed,
                c.dead,
                c.ready + c.in_flight,
                c.workers,
            ];
            for (name, value) in QUEUE_GAUGES.iter().zip(values) {
                metrics::gauge!(*name, "queue" => queue.clone()).set(value as f64);
            }
            let oldest = self.redis.oldest_ready_ms(&QueueKeys::new(queue)).await?;
            let age_s = oldest.map_or(0.0, |ms| {
                ((chrono::Utc::now().timestamp_millis() - ms).max(0) as f64) / 1000.0
            });
            metrics::gauge!(OLDEST_READY, "queue" => queue.clone()).set(age_s);
            // Per priority, not per tenant: ten labels at most.
            for p in PRIORITIES {
                let n = c
                    .ready_by_priority
                    .iter()
                    .find(|(q, _)| *q == p)
                    .map_or(0, |(_, n)| *n);
                room_gauge(queue, p).set(n as f64);
            }
            if !self.gauged_queues.contains(queue) {
                self.gauged_queues.push(queue.clone());
            }
        }
        metrics::gauge!(LEADER).set(1.0);
        let circuits = self.publish_circuits().await?;
        let limiter = Limiter::new(self.redis.clone());
        let now = self.now();
        let mut quotas = 0;
        for p in self
            .config
            .providers
            .iter()
            .filter(|p| !p.quotas.is_empty())
        {
            for l in limiter.usage(&p.name, &p.quotas, now).await? {
                let ratio = if l.limit > 0.0 { l.used / l.limit } else { 0.0 };
                let key = (l.provider, l.quota);
                metrics::gauge!("llmq_quota_used_ratio", "provider" => key.0.clone(), "quota" => key.1.clone())
                    .set(ratio);
                if !self.gauged_quotas.contains(&key) {
                    self.gauged_quotas.push(key);
                }
                quotas += 1;
            }
        }
        Ok(format!(
            "published the depths of {} queue(s), the use of {quotas} quota(s) and {circuits} \
             open circuit(s)",
            queues.len()
        ))
    }

    /// `llmq_circuit_open{provider,model}`: 1 for each configured pair whose circuit (or
    /// provider's) is open now, else 0. Returns how many are open.
    async fn publish_circuits(&mut self) -> Result<usize> {
        let pairs: Vec<(String, Vec<String>)> = self
            .config
            .providers
            .iter()
            .map(|p| {
                let models = p.models.iter().map(|m| m.id.to_string()).collect();
                (p.name.to_string(), models)
            })
            .collect();
        let open = llmq_shared::circuit::Circuits::new(self.redis.clone(), "llmq-scheduler")
            .open(&pairs)
            .await?;
        let mut n = 0;
        for (provider, models) in &pairs {
            for model in models {
                let is_open = open.iter().any(|o| {
                    o.provider == *provider && o.model.as_ref().is_none_or(|m| m == model)
                });
                n += usize::from(is_open);
                metrics::gauge!(CIRCUIT_OPEN, "provider" => provider.clone(), "model" => model.clone())
                    .set(if is_open { 1.0 } else { 0.0 });
            }
        }
        self.gauged_circuits = pairs;
        Ok(n)
    }

    /// Sets every gauge this instance published to 0: it no longer holds the lease, and the
    /// holder publishes the real figures.
    pub(crate) fn zero_gauges(&mut self) {
        metrics::gauge!(LEADER).set(0.0);
        for (provider, models) in self.gauged_circuits.drain(..) {
            for model in models {
                metrics::gauge!(CIRCUIT_OPEN, "provider" => provider.clone(), "model" => model)
                    .set(0.0);
            }
        }
        for queue in self.gauged_queues.drain(..) {
            for name in QUEUE_GAUGES.iter().chain([&OLDEST_READY]) {
                metrics::gauge!(*name, "queue" => queue.clone()).set(0.0);
            }
            for p in PRIORITIES {
                room_gauge(&queue, p).set(0.0);
            }
        }
        for (provider, quota) in self.gauged_quotas.drain(..) {
            metrics::gauge!("llmq_quota_used_ratio", "provider" => provider, "quota" => quota)
                .set(0.0);
        }
    }
}
