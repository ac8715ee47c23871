//! `llmq dlq`: list, show, replay and purge dead letters.

use std::io::Write;

use chrono::Utc;
use llmq_shared::keys::QueueKeys;
use llmq_shared::queue::{Client, DeadLetter, Replayed};

use crate::cli::{DlqCommand, Format};
use crate::{EXIT_FAILED, EXIT_OK, Error, Result, emit, render, to_json};

pub async fn run(redis: &Client, cmd: DlqCommand, out: &mut dyn Write) -> Result<u8> {
    match cmd {
        DlqCommand::List {
            queue,
            limit,
            archived,
            database_url,
            format,
        } => {
            let database_url = archived.then_some(database_url.as_deref());
            list(redis, &queue, limit, database_url, format, out).await
        }
        DlqCommand::Show { id, queue, format } => show(redis, &id, &queue, format, out).await,
        DlqCommand::Replay {
            ids,
            all,
            platform,
            queue,
            database_url,
        } => {
            let ids = (!all).then_some(ids.as_slice());
            replay(
                redis,
                ids,
                platform.as_deref(),
                &queue,
                database_url.as_deref(),
                out,
            )
            .await
        }
        DlqCommand::Purge {
            ids,
            older_than,
            queue,
        } => purge(redis, &ids, older_than, &queue, out).await,
    }
}

/// `llmq dlq list`: from Redis, or (`--archived`: `Some` with the ledger's URL, if given)
/// those the scheduler archived.
async fn list(
    redis: &Client,
    queue: &str,
    limit: usize,
    archived: Option<Option<&str>>,
    format: Format,
    out: &mut dyn Write,
) -> Result<u8> {
    let dead = if let Some(database_url) = archived {
        let ledger = crate::ledger(database_url, "--archived").await?;
        llmq_shared::archive::list_archived(ledger.pool(), queue, limit)
            .await?
            .into_iter()
            .map(DeadLetter::from)
            .collect()
    } else {
        redis.dead_letters(&QueueKeys::new(queue), limit).await?
    };
    match format {
        Format::Json => emit(out, &to_json(&dead)),
        Format::Text => emit(out, &list_text(&dead)),
    }
    Ok(EXIT_OK)
}

/// `llmq dlq show`.
async fn show(
    redis: &Client,
    id: &str,
    queue: &str,
    format: Format,
    out: &mut dyn Write,
) -> Result<u8> {
    let found = redis
        .find_dead(&QueueKeys::new(queue), &[id.to_owned()])
        .await?;
    let Some(d) = found.into_iter().next() else {
        eprintln!("llmq: no dead letter {id} in queue `{queue}`");
        return Ok(EXIT_FAILED);
    };
    match format {
        Format::Json => emit(out, &to_json(&d)),
        Format::Text => emit(out, &show_text(&d)),
    }
    Ok(EXIT_OK)
}

/// `llmq dlq replay`: `ids` (`None`: every one in Redis), those not in Redis from the
/// archive, each checked to exist before any is replayed.
async fn replay(
    redis: &Client,
    ids: Option<&[String]>,
    platform: Option<&str>,
    queue: &str,
    database_url: Option<&str>,
    out: &mut dyn Write,
) -> Result<u8> {
    let keys = QueueKeys::new(queue);
    let (dead, elsewhere) = match ids {
        None => (redis.dead_letters(&keys, usize::MAX).await?, Vec::new()),
        Some(ids) => {
            let found = redis.find_dead(&keys, ids).await?;
            let rest = absent(&found, ids);
            (found, rest)
        }
    };
    let mut done = Vec::new();
    if !elsewhere.is_empty() {
        // Not in Redis: the scheduler may have archived them. Check they all exist
        // before replaying anything.
        let ledger = match crate::ledger(database_url, "replaying archived dead letters").await {
            Ok(l) => l,
            Err(_) => return Err(missing(&elsewhere, queue)),
        };
        let found = llmq_shared::archive::take_archived(ledger.pool(), queue, &elsewhere).await?;
        let not_archived = absent(&found, &elsewhere);
        if !not_archived.is_empty() {
            return Err(missing(&not_archived, queue));
        }
        done = llmq_shared::archive::replay_archived(
            redis,
            ledger.pool(),
            queue,
            &elsewhere,
            platform,
        )
        .await?;
    }
    for d in &dead {
        let replayed = redis.replay(&keys, d, platform).await?;
        done.push((d.id.clone(), replayed));
    }
    let mut replayed = 0;
    for (id, what) in done {
        match what {
            Replayed::Enqueued => replayed += 1,
            Replayed::Gone => {}
            Replayed::Resumed(steps) => {
                replayed += 1;
                emit(
                    out,
                    &format!(
                        "dead letter {id}: its chain runs {} again\n",
                        steps.join(", ")
                    ),
                );
            }
            Replayed::Refused(why) => eprintln!("llmq: dead letter {id}: {why}"),
        }
    }
    emit(
        out,
        &format!("replayed {replayed} dead letter(s) to queue `{queue}`\n"),
    );
    Ok(EXIT_OK)
}

/// `llmq dlq purge`: `ids`, or those that failed longer than `older_than` ago.
async fn purge(
    redis: &Client,
    ids: &[String],
    older_than: Option<std::time::Duration>,
    queue: &str,
    out: &mut dyn Write,
) -> Result<u8> {
    let keys = QueueKeys::new(queue);
    let dead = match older_than {
        Some(age) => {
            let cutoff = Utc::now() - chrono::Duration::from_std(age).unwrap_or_default();
            redis
                .dead_letters(&keys, usize::MAX)
                .await?
                .into_iter()
                .filter(|d| d.failed_at.is_some_and(|t| t < cutoff))
                .collect()
        }
        None => found_all(redis, &keys, ids).await?,
    };
    let purged = redis.purge(&keys, &dead).await?;
    emit(
        out,
        &format!("purged {purged} dead letter(s) from queue `{queue}`\n"),
    );
    Ok(EXIT_OK)
}

fn missing(ids: &[String], queue: &str) -> Error {
    Error::Usage(format!(
        "no dead letter {} in queue `{queue}`, in Redis or archived; nothing was changed",
        ids.join(", ")
    ))
}

/// The dead letters for `ids`, or an error naming the ids that are not there.
async fn found_all(redis: &Client, keys: &QueueKeys, ids: &[String]) -> Result<Vec<DeadLetter>> {
    let found = redis.find_dead(keys, ids).await?;
    let absent = absent(&found, ids);
    if !absent.is_empty() {
        return Err(missing(&absent, keys.name()));
    }
    Ok(found)
}

/// The ids (dead-letter or task ids) that match none of `found`.
fn absent(found: &[DeadLetter], ids: &[String]) -> Vec<String> {
    ids.iter()
        .filter(|id| {
            !found
                .iter()
                .any(|d| d.id == **id || d.task_id.to_string() == **id)
        })
        .cloned()
        .collect()
}

fn list_text(dead: &[DeadLetter]) -> String {
    if dead.is_empty() {
        return "no dead letters\n".into();
    }
    let mut s = format!(
        "{:<17} {:<36} {:<16} {:>8} {:<20} {}\n",
        "ID", "TASK", "CLASS", "ATTEMPTS", "FAILED AT", "ERROR"
    );
    for d in dead {
        s.push_str(&format!(
            "{:<17} {:<36} {:<16} {:>8} {:<20} {}\n",
            d.id,
            d.task_id,
            d.class,
            d.attempts,
            d.failed_at
                .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_default(),
            render::cut(&d.error, 80)
        ));
    }
    s
}

fn show_text(d: &DeadLetter) -> String {
    let task = serde_json::from_str::<serde_json::Value>(&d.task)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| d.task.clone());
    format!(
        "Dead letter: {}\nTask ID:     {}\nQueue:       {}\nClass:       {}\nAttempts:    {}\nFailed at:   {}\nError:       {}\nTask:\n{}\n",
        d.id,
        d.task_id,
        d.queue,
        d.class,
        d.attempts,
        d.failed_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
        d.error,
        task
    )
}
