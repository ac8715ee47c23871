//! `llmq result`, `llmq status` and `llmq queue pause|resume`.

use std::io::Write;

use llmq_shared::config::Config;
use llmq_shared::keys::{QueueKeys, SchedulerKeys};
use llmq_shared::provider::clients::{Readiness, probe};
use llmq_shared::queue::{Client, QueueCounts};
use serde::Serialize;

use crate::cli::{Format, QueueCommand, ResultArgs, StatusArgs};
use crate::{EXIT_FAILED, EXIT_OK, Result, emit, render, to_json};

pub async fn result(redis: &Client, args: ResultArgs, out: &mut dyn Write) -> Result<u8> {
    let keys = QueueKeys::new(&args.queue);
    let Some(record) = redis.task(&keys, args.task_id).await? else {
        eprintln!(
            "llmq: no task {} in queue `{}` (it may have expired, or be in another queue: pass --queue)",
            args.task_id, args.queue
        );
        return Ok(EXIT_FAILED);
    };
    match args.format {
        Format::Text => emit(out, &render::record(&record)),
        Format::Json => emit(out, &to_json(&record)),
    }
    Ok(EXIT_OK)
}

/// An open circuit in `llmq status`: a provider or model every worker skips for now.
#[derive(Debug, Serialize)]
pub struct CoolingDown {
    /// `provider` or `provider/model`.
    pub scope: String,
    pub reason: String,
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    pub until: chrono::DateTime<chrono::Utc>,
    /// True when the cooldown is over and the next call (a probe) decides.
    pub probing: bool,
}

/// Provider batches of a queue in `llmq status`: tasks waiting to be sent, and open batches.
#[derive(Debug, Serialize)]
struct QueueBatches {
    queue: String,
    /// Tasks waiting for a batch, per `provider/model`.
    waiting: Vec<(String, u64)>,
    open: Vec<llmq_shared::queue::BatchRecord>,
}

#[derive(Debug, Serialize)]
struct StatusReport {
    queues: Vec<QueueCounts>,
    /// Per queue with tasks in its room, the tenants with the most of them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    busiest_tenants: Vec<(String, Vec<llmq_shared::queue::TenantBacklog>)>,
    batches: Vec<QueueBatches>,
    providers: Vec<Readiness>,
    cooling_down: Vec<CoolingDown>,
    scheduler: llmq_shared::archive::SchedulerStatus,
}

pub async fn status(redis: &Client, args: StatusArgs, out: &mut dyn Write) -> Result<u8> {
    let mut names = if args.queues.is_empty() {
        redis.known_queues().await?
    } else {
        args.queues.clone()
    };
    if names.is_empty() {
        names.push("default".into());
    }
    let mut queues = Vec::with_capacity(names.len());
    let mut busiest_tenants = Vec::new();
    let mut batches = Vec::new();
    for name in &names {
        let keys = QueueKeys::new(name);
        let counts = redis.counts(&keys).await?;
        if !counts.ready_by_priority.is_empty() {
            busiest_tenants.push((name.clone(), redis.busiest_tenants(&keys, 5).await?));
        }
        queues.push(counts);
        let waiting: Vec<(String, u64)> = redis
            .batch_groups(&keys)
            .await?
            .into_iter()
            .map(|g| (g.name, g.waiting))
            .collect();
        let open = redis.open_batches(&keys).await?;
        if !waiting.is_empty() || !open.is_empty() {
            batches.push(QueueBatches {
                queue: name.clone(),
                waiting,
                open,
            });
        }
    }
    let mut providers = Vec::new();
    let mut cooling_down = Vec::new();
    if let Some(path) = &args.config {
        let config = Config::load(path)?;
        let http = reqwest::Client::new();
        // A few providers, each answering within 3 s: one after another is fine.
        for p in &config.providers {
            providers.push(probe(p, &http).await);
        }
        let scopes = config.circuit_scopes();
        let circuits = llmq_shared::circuit::Circuits::new(redis.clone(), "llmq-status");
        cooling_down = circuits
            .open(&scopes)
            .await?
            .into_iter()
            .map(|o| CoolingDown {
                scope: o.scope(),
                reason: o.reason,
                since: o.since,
                until: o.until,
                probing: o.probing,
            })
            .collect();
    }
    let scheduler = llmq_shared::archive::scheduler_status(
        redis,
        &SchedulerKeys::new(args.scheduler_namespace.as_deref()),
    )
    .await?;
    let report = StatusReport {
        queues,
        busiest_tenants,
        batches,
        providers,
        cooling_down,
        scheduler,
    };
    match args.format {
        Format::Json => emit(out, &to_json(&report)),
        Format::Text => emit(out, &status_text(&report, args.config.is_some())),
    }
    Ok(EXIT_OK)
}

/// `llmq queue pause|resume`.
pub async fn queue(redis: &Client, cmd: QueueCommand, out: &mut dyn Write) -> Result<u8> {
    match cmd {
        QueueCommand::Pause { queue, reason } => {
            if !redis.known_queues().await?.contains(&queue) {
                eprintln!(
                    "llmq: no worker has served a queue `{queue}` yet; pausing it anyway (check \
                     the name with llmq status)"
                );
            }
            let by = std::env::var("USER").unwrap_or_else(|_| "llmq queue pause".into());
            let done = redis
                .pause_queue(&QueueKeys::new(&queue), &by, &reason)
                .await?;
            let what = if done { "paused" } else { "was already paused" };
            emit(
                out,
                &format!(
                    "queue `{queue}` {what}: workers take none of its tasks (within a second); \
                     tasks in flight finish. `llmq queue resume {queue}` undoes it.\n"
                ),
            );
        }
        QueueCommand::Resume { queue } => {
            let done = redis.resume_queue(&QueueKeys::new(&queue)).await?;
            let what = if done { "resumed" } else { "was not paused" };
            emit(out, &format!("queue `{queue}` {what}\n"));
        }
    }
    Ok(EXIT_OK)
}

fn status_text(r: &StatusReport, with_providers: bool) -> String {
    let mut s = queues_text(r);
    batches_text(&mut s, &r.batches);
    if with_providers {
        providers_text(&mut s, r);
    } else {
        s.push_str("\n(set LLMQ_CONFIG or pass --config to check providers)\n");
    }
    scheduler_text(&mut s, &r.scheduler);
    s
}

/// The queues' table, then what waits in each room by priority, the busiest tenants and
/// the paused queues.
fn queues_text(r: &StatusReport) -> String {
    let mut s = format!(
        "{:<20} {:>8} {:>10} {:>8} {:>6} {:>8}\n",
        "QUEUE", "READY", "IN FLIGHT", "DELAYED", "DEAD", "WORKERS"
    );
    for q in &r.queues {
        s.push_str(&format!(
            "{:<20} {:>8} {:>10} {:>8} {:>6} {:>8}\n",
            render::cut(&q.queue, 20),
            q.ready,
            q.in_flight,
            q.delayed,
            q.dead,
            q.workers
        ));
    }
    for q in r.queues.iter().filter(|q| !q.ready_by_priority.is_empty()) {
        s.push_str(&format!(
            "queue `{}`: of the ready tasks, waiting in the room by priority (0 most urgent): {}\n",
            q.queue,
            q.room_by_priority()
        ));
    }
    for (queue, top) in &r.busiest_tenants {
        let top: Vec<String> = top
            .iter()
            .map(|t| t.describe(|name| render::cut(name, 40)))
            .collect();
        s.push_str(&format!(
            "queue `{queue}`: busiest tenants: {}\n",
            top.join(", ")
        ));
    }
    for q in r.queues.iter().filter(|q| q.paused) {
        s.push_str(&format!(
            "queue `{}` is paused: workers take none of its tasks (llmq queue resume {})\n",
            q.queue, q.queue
        ));
    }
    s
}

/// The provider batches: tasks waiting for one, and those open.
fn batches_text(s: &mut String, batches: &[QueueBatches]) {
    if !batches.is_empty() {
        s.push_str("\nPROVIDER BATCHES (tasks that can wait, at the batch price)\n");
    }
    for b in batches {
        for (group, n) in &b.waiting {
            s.push_str(&format!(
                "  {:<20} {n} task(s) waiting for a batch to {group}\n",
                render::cut(&b.queue, 20)
            ));
        }
        for o in &b.open {
            let age = (llmq_shared::queue::now_ms() - o.created_ms).max(0) / 1000;
            s.push_str(&format!(
                "  {:<20} batch {} to {}/{}: {} task(s), {}, {age} s old{}\n",
                render::cut(&b.queue, 20),
                o.id,
                o.provider,
                o.model,
                o.task_ids.len(),
                o.state,
                o.remote
                    .as_deref()
                    .map(|r| format!(" (the provider's {})", render::cut(r, 60)))
                    .unwrap_or_default()
            ));
        }
    }
}

/// Whether each provider is ready, and what cools down.
fn providers_text(s: &mut String, r: &StatusReport) {
    s.push_str(&format!(
        "\n{:<20} {:<8} {}\n",
        "PROVIDER", "READY", "DETAIL"
    ));
    for p in &r.providers {
        let ready = if p.ready { "yes" } else { "no" };
        s.push_str(&format!("{:<20} {:<8} {}\n", p.name, ready, p.detail));
    }
    if r.cooling_down.is_empty() {
        s.push_str("\nCooling down: nothing\n");
    } else {
        s.push_str(
            "\nCooling down (every worker skips these; tasks with nowhere else to go wait):\n",
        );
        for c in &r.cooling_down {
            let since = c
                .since
                .map(|t| format!(" since {}", t.format("%H:%M:%S")))
                .unwrap_or_default();
            let state = if c.probing {
                "cooldown over; the next call probes it".to_owned()
            } else {
                format!("{since} until {} UTC", c.until.format("%H:%M:%S"))
            };
            s.push_str(&format!(
                "  {:<32} {}: {}\n",
                c.scope,
                state.trim_start(),
                render::cut(&c.reason, 160)
            ));
        }
    }
}

/// Which scheduler holds the lease, and its duties' last runs.
fn scheduler_text(s: &mut String, sch: &llmq_shared::archive::SchedulerStatus) {
    match &sch.holder {
        Some(holder) => s.push_str(&format!(
            "\nSCHEDULER  active: {holder} (fence {}, lease {} ms left)\n",
            sch.fence,
            sch.lease_ttl_ms.unwrap_or(0)
        )),
        None => s.push_str("\nSCHEDULER  none active (start llmq-scheduler)\n"),
    }
    let when = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map_or_else(
            || "never".to_owned(),
            |t| t.format("%Y-%m-%d %H:%M:%S").to_string(),
        )
    };
    // As wide as the longest duty's name (`ledger_partitions` is 17), so the columns line up.
    let width = sch
        .duties
        .iter()
        .map(|d| d.name.len())
        .max()
        .unwrap_or(0)
        .max(16);
    for d in &sch.duties {
        // Loud where something is wrong.
        let state = match d.state() {
            "ok" => "ok".to_owned(),
            other => other.to_uppercase(),
        };
        s.push_str(&format!(
            "  {:<width$} {:<8} last run {}  {}\n",
            d.name,
            state,
            when(d.last_run),
            render::cut(&d.detail, 60)
        ));
    }
    for rec in &sch.recurring {
        s.push_str(&format!(
            "  recurring {:<20} last tick {}\n",
            rec.name,
            when(rec.last_tick)
        ));
    }
}

#[cfg(test)]
mod tests {
    use llmq_shared::archive::{DutyStatus, SchedulerStatus};

    use super::{StatusReport, status_text};

    /// The duties' columns line up whatever their names' lengths: `ledger_partitions` pushed
    /// its state and time a column right of the others.
    #[test]
    fn the_duties_columns_line_up() {
        let duty = |name: &str| DutyStatus {
            name: name.into(),
            last_run: Some(chrono::Utc::now()),
            ok: true,
            detail: "done".into(),
            holder: "s-1".into(),
            overdue: false,
        };
        let r = StatusReport {
            queues: Vec::new(),
            busiest_tenants: Vec::new(),
            batches: Vec::new(),
            providers: Vec::new(),
            cooling_down: Vec::new(),
            scheduler: SchedulerStatus {
                holder: Some("s-1".into()),
                fence: 1,
                lease_ttl_ms: Some(10_000),
                duties: vec![
                    duty("approvals"),
                    duty("ledger_partitions"),
                    duty("promote"),
                ],
                recurring: Vec::new(),
            },
        };
        let text = status_text(&r, false);
        let columns: Vec<usize> = text.lines().filter_map(|l| l.find("last run")).collect();
        assert_eq!(columns.len(), 3, "{text}");
        assert!(columns.iter().all(|c| *c == columns[0]), "{text}");
    }
}
