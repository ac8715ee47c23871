//! `llmq worker`: the fleet's workers, and draining one.

use std::io::Write;

use llmq_shared::queue::{Client, SeenWorker, now_ms};

use crate::cli::WorkerCommand;
use crate::render::cut;
use crate::{EXIT_FAILED, EXIT_OK, Result, emit};

pub async fn run(redis: &Client, cmd: WorkerCommand, out: &mut dyn Write) -> Result<u8> {
    match cmd {
        WorkerCommand::List { json } => {
            let fleet = redis.fleet().await?;
            if json {
                emit(out, &crate::to_json(&fleet));
            } else {
                emit(out, &table(&fleet, now_ms()));
            }
            Ok(EXIT_OK)
        }
        WorkerCommand::Drain { id } => drain(redis, &id, true, out).await,
        WorkerCommand::Resume { id } => drain(redis, &id, false, out).await,
    }
}

async fn drain(redis: &Client, id: &str, drain: bool, out: &mut dyn Write) -> Result<u8> {
    let by = std::env::var("USER").unwrap_or_else(|_| "llmq worker".into());
    if !redis.drain_worker(id, &by, drain).await? {
        eprintln!(
            "llmq: no worker `{}` was heard from within the hour; `llmq worker list` shows \
             their ids",
            cut(id, 80)
        );
        return Ok(EXIT_FAILED);
    }
    let said = if drain {
        format!(
            "worker `{id}` drains: it takes no new task within 5 s and finishes those it \
             holds. `llmq worker resume {id}` undoes it.\n"
        )
    } else {
        format!("worker `{id}` takes tasks again (within 5 s)\n")
    };
    emit(out, &said);
    Ok(EXIT_OK)
}

/// How a worker stands: `live`, `draining`, `drained` (holds nothing), or `silent` since
/// its last beat.
#[must_use]
pub fn state(w: &SeenWorker) -> &'static str {
    let holds = w.info.as_ref().map_or(0, |i| i.busy);
    match (
        w.live,
        w.drain.is_some() || w.info.as_ref().is_some_and(|i| i.draining),
    ) {
        (false, _) => "silent",
        (true, true) if holds == 0 => "drained",
        (true, true) => "draining",
        (true, false) => "live",
    }
}

/// `ms` as a short age: `42s`, `5m`, `3h`.
#[must_use]
pub fn age(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

fn table(fleet: &[SeenWorker], now: i64) -> String {
    if fleet.is_empty() {
        return "no worker was heard from within the hour\n".into();
    }
    let mut s = format!(
        "{:<36} {:<9} {:>5} {:>6} {:>6} {:>8} {:>8}  {}\n",
        "WORKER", "STATE", "HELD", "SLOTS", "CALLS", "BEAT", "UP", "QUEUES"
    );
    for w in fleet {
        let (held, slots, calls, up, queues) = w.info.as_ref().map_or_else(
            || {
                (
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    String::new(),
                )
            },
            |i| {
                (
                    i.busy.to_string(),
                    i.concurrency.to_string(),
                    i.calls.to_string(),
                    age(now - i.started_ms),
                    i.queues.join(","),
                )
            },
        );
        s.push_str(&format!(
            "{:<36} {:<9} {:>5} {:>6} {:>6} {:>8} {:>8}  {}\n",
            cut(&w.id, 36),
            state(w),
            held,
            slots,
            calls,
            format!("{} ago", age(now - w.beat_ms)),
            up,
            cut(&queues, 60)
        ));
    }
    s
}
