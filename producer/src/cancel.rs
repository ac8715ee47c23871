//! `llmq cancel`: sets cancel marks (`llmq_shared::queue::Target`), or with `--dry-run` says
//! what they would end.

use std::io::Write;

use llmq_shared::keys::QueueKeys;
use llmq_shared::queue::{Cancelled, Client, Target};

use crate::cli::CancelArgs;
use crate::{EXIT_OK, Result, emit};

pub async fn run(redis: &Client, args: CancelArgs, out: &mut dyn Write) -> Result<u8> {
    let keys = QueueKeys::new(&args.queue);
    let mut targets: Vec<Target> = args.task_ids.iter().copied().map(Target::Task).collect();
    targets.extend(args.batch.clone().map(Target::Batch));
    targets.extend(args.tenant.clone().map(Target::Tenant));
    let mut report = String::new();
    if args.dry_run {
        for (id, record) in args
            .task_ids
            .iter()
            .zip(redis.results(&keys, &args.task_ids).await?)
        {
            report.push_str(&match record {
                Some(r) if r.status.is_final() => {
                    format!("task {id}: already {}; it would be left as it is\n", r.status)
                }
                Some(r) => format!("task {id}: {}; it would be cancelled\n", r.status),
                None => format!(
                    "task {id}: no result yet (queued, or not of queue `{}`); it would be cancelled where a worker meets it\n",
                    args.queue
                ),
            });
        }
        if let Some(batch) = &args.batch {
            report.push_str(&batch_line(redis, &keys, batch, "would end").await?);
        }
        if let Some(tenant) = &args.tenant {
            report.push_str(&tenant_line(redis, &keys, tenant, "would end").await?);
        }
        report.push_str("nothing was cancelled (--dry-run)\n");
        emit(out, &report);
        return Ok(EXIT_OK);
    }
    let done = redis.cancel(&keys, &targets).await?;
    for (target, done) in targets.iter().zip(done) {
        match (target, done) {
            (Target::Task(id), Cancelled::Ended(status)) => {
                report.push_str(&format!(
                    "task {id}: had already ended ({status}); left as it was\n"
                ));
            }
            (Target::Task(id), Cancelled::Marked(_)) => report.push_str(&format!(
                "task {id}: cancelled; it does not run (a call in flight is dropped)\n"
            )),
            (Target::Batch(batch), _) => {
                report.push_str(&batch_line(redis, &keys, batch, "end").await?);
            }
            (Target::Tenant(tenant), _) => {
                report.push_str(&tenant_line(redis, &keys, tenant, "end").await?);
            }
            (Target::Queued(_), _) => {}
        }
    }
    report.push_str(&format!(
        "workers of queue `{}` act on it within a second; `llmq result <id>` then says `cancelled`\n",
        args.queue
    ));
    emit(out, &report);
    Ok(EXIT_OK)
}

/// What a cancel of `batch` ends: its tasks enqueued less those that finished.
async fn batch_line(redis: &Client, keys: &QueueKeys, batch: &str, verb: &str) -> Result<String> {
    let enqueued = redis.batch_progress(keys, batch).await?;
    let finished = redis.batch_finished(keys, batch).await?;
    Ok(if enqueued == 0 {
        format!(
            "batch {batch}: no tasks of it are known in queue `{}` (none enqueued, or over a week ago); any that come {verb} cancelled\n",
            keys.name()
        )
    } else {
        format!(
            "batch {batch}: {} of its {enqueued} tasks enqueued have not finished; they {verb} cancelled\n",
            enqueued.saturating_sub(finished)
        )
    })
}

/// What a cancel of `tenant` ends: its tasks waiting in the room now, and any of its work
/// enqueued until now that is running or waiting elsewhere.
async fn tenant_line(redis: &Client, keys: &QueueKeys, tenant: &str, verb: &str) -> Result<String> {
    let waiting: u64 = redis
        .busiest_tenants(keys, usize::MAX)
        .await?
        .iter()
        .filter(|b| b.tenant == tenant)
        .map(|b| b.waiting)
        .sum();
    Ok(format!(
        "tenant {}: {waiting} of its tasks wait in queue `{}` now; they, and its tasks running or waiting to retry, {verb} cancelled; its tasks enqueued later run\n",
        tenant.escape_debug(),
        keys.name()
    ))
}
