//! `llmq submit` and `llmq batch`: build envelopes, enqueue them, and optionally wait.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::time::{Duration, Instant};

use chrono::Utc;
use llmq_shared::envelope::{CacheAsk, CacheKeep, Envelope, TaskType};
use llmq_shared::ids::TaskId;
use llmq_shared::keys::QueueKeys;
use llmq_shared::outcome::{Status, TaskRecord};
use llmq_shared::queue::{Client, OutEntry, Progress};
use serde::Serialize;

use crate::batch_file::{self, BatchTask, Reader, Shape};
use crate::batch_input::{self, At, Input};
use crate::cli::{Batch, Format, Submit};
use crate::{EXIT_FAILED, EXIT_OK, EXIT_USAGE, Error, Result, emit, render, to_json, write_file};

/// `--prompt` as given, or standard input's for `-`; an empty one is refused.
fn read_prompt(given: String) -> Result<String> {
    let prompt = if given == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).map_err(|e| {
            Error::Usage(format!("cannot read the prompt from standard input: {e}"))
        })?;
        s
    } else {
        given
    };
    if prompt.trim().is_empty() {
        return Err(Error::Usage(
            "the prompt is empty; pass --prompt with some text".into(),
        ));
    }
    Ok(prompt)
}

pub async fn submit(redis: &Client, args: Submit, out: &mut dyn Write) -> Result<u8> {
    let mut env = Envelope::new(read_prompt(args.prompt)?);
    env.system = args.system.map(Into::into);
    env.task_type = Some(args.task_type.to_string().into());
    env.provider = args.platform.map(Into::into);
    env.model = args.model.map(Into::into);
    env.chain_id = args.chain_id.map(Into::into);
    llmq_shared::envelope::check_class(args.priority, args.tenant.as_deref())
        .map_err(|e| Error::Usage(e.to_string()))?;
    env.priority = args.priority;
    env.tenant = args.tenant.map(Into::into);
    env.tags = args.tags.into_iter().collect();
    llmq_shared::envelope::check_tags(&env.tags).map_err(|e| Error::Usage(e.to_string()))?;
    if args.no_fallback {
        env.fallback = Some(false);
    }
    env.timeout = Some(args.timeout);
    env.max_attempts = Some(args.max_attempts);
    env.max_tokens = args.max_tokens;
    env.temperature = args.temperature;
    env.metadata = args.metadata.map(Box::new);
    if args.stream {
        env.stream = Some(true);
    }
    if let Some(ttl) = args.cache {
        env.cache = Some(Box::new(CacheAsk::Keep(CacheKeep {
            ttl,
            sampled: args.cache_sampled,
        })));
    } else if args.no_cache {
        env.cache = Some(Box::new(CacheAsk::Use(false)));
    }
    env.idempotency_key = args.idempotency_key.map(Into::into);
    env.idempotency_window = args.idempotency_window.map(Into::into);
    if env.cache.is_some() || env.idempotency_key.is_some() {
        // Refused here, in the worker's words, rather than as a dead letter.
        Envelope::parse(env.to_json().as_bytes(), usize::MAX)
            .map_err(|e| Error::Usage(e.to_string()))?;
    }
    env.enqueued_at = Some(Utc::now());
    if let Some(delay) = args.delay {
        env.run_at = Some(Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default());
    }
    // `Envelope::new` gave it its id.
    let id = env.id.unwrap_or_else(TaskId::random);
    env.id = Some(id);
    // With traces exported, the worker's spans for this task join the submit's trace.
    let span = tracing::trace_span!(
        target: llmq_shared::telemetry::TARGET,
        "llmq.submit",
        llmq.task.id = %id,
        llmq.queue = %args.queue,
    );
    env.traceparent = llmq_shared::telemetry::traceparent(&span).map(Into::into);
    let keys = QueueKeys::new(&args.queue);
    redis.ensure_group(&keys).await?;
    redis.enqueue(&keys, &env).await?;
    drop(span);
    if !args.wait {
        match args.format {
            Format::Text => emit(out, &format!("{id}\n")),
            Format::Json => emit(
                out,
                &to_json(&serde_json::json!({"task_id": id, "queue": args.queue})),
            ),
        }
        return Ok(EXIT_OK);
    }
    if args.stream {
        follow(redis, &keys, id, args.wait_timeout, out).await?;
    }
    let mut records = wait_for(
        redis,
        &keys,
        std::slice::from_ref(&id),
        args.wait_timeout,
        |_| {},
    )
    .await?;
    let Some(record) = records.pop().flatten() else {
        eprintln!("llmq: task {id} did not finish within the wait timeout; it is still queued");
        return Ok(EXIT_FAILED);
    };
    let text = match args.format {
        // The answer was printed as it came: the report follows without it.
        Format::Text if args.stream => {
            let mut shown = record.clone();
            shown.output = None;
            format!("\n\n{}", render::record(&shown))
        }
        Format::Text => render::record(&record),
        Format::Json if args.stream => format!("\n{}", to_json(&record)),
        Format::Json => to_json(&record),
    };
    if let Some(path) = &args.output {
        let body = match args.format {
            Format::Text => record.output.clone().unwrap_or_default(),
            Format::Json => text.clone(),
        };
        write_file(path, &body)?;
    }
    emit(out, &text);
    Ok(if record.status == Status::Succeeded {
        EXIT_OK
    } else {
        EXIT_FAILED
    })
}

/// Prints task `id`'s live answer as it is written, until it is complete, the task has a
/// final result (it failed), or `timeout` passes. A call that failed halfway says so and
/// the retry's answer follows.
async fn follow(
    redis: &Client,
    keys: &QueueKeys,
    id: TaskId,
    timeout: Option<Duration>,
    out: &mut dyn Write,
) -> Result<()> {
    let started = Instant::now();
    let mut conn = redis.blocking_conn().await?;
    let mut after = "0".to_owned();
    loop {
        let entries = Client::read_out(&mut conn, keys, id, &after, Duration::from_secs(1)).await?;
        for (entry_id, entry) in entries {
            after = entry_id;
            match entry {
                OutEntry::Text(t) => emit(out, &t),
                OutEntry::Restart(why) => {
                    emit(
                        out,
                        &format!("\n[the call failed halfway ({why}); retrying]\n"),
                    );
                }
                OutEntry::Done => return Ok(()),
            }
        }
        let finished = redis.results(keys, &[id]).await?[0]
            .as_ref()
            .is_some_and(|r| r.status.is_final());
        if finished || timeout.is_some_and(|t| started.elapsed() >= t) {
            return Ok(());
        }
    }
}

/// Polls stored results until every task is final or `timeout` passes. Returns, per id,
/// its final record (or `None` if it did not finish in time). `progress` is told how many
/// are done after each poll.
///
/// # Errors
/// Redis fails.
pub async fn wait_for(
    redis: &Client,
    keys: &QueueKeys,
    ids: &[TaskId],
    timeout: Option<Duration>,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Option<TaskRecord>>> {
    let started = Instant::now();
    let mut done: Vec<Option<TaskRecord>> = vec![None; ids.len()];
    let mut open: Vec<usize> = (0..ids.len()).collect();
    let mut pause = Duration::from_millis(10);
    while !open.is_empty() {
        for chunk in open.clone().chunks(1000) {
            let chunk_ids: Vec<TaskId> = chunk.iter().map(|&i| ids[i]).collect();
            for (&i, record) in chunk.iter().zip(redis.results(keys, &chunk_ids).await?) {
                if let Some(r) = record.filter(|r| r.status.is_final()) {
                    done[i] = Some(r);
                }
            }
        }
        open.retain(|&i| done[i].is_none());
        progress(ids.len() - open.len());
        if open.is_empty() || timeout.is_some_and(|t| started.elapsed() >= t) {
            break;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(250));
    }
    Ok(done)
}

/// Per-provider line of a batch report.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct ProviderSummary {
    pub succeeded: usize,
    pub failed: usize,
    pub cost_usd: f64,
}

/// What `llmq batch --wait --output` writes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BatchReport {
    pub total_tasks: usize,
    pub success_count: usize,
    pub failure_count: usize,
    /// Percent, 0 to 100.
    pub success_rate: f64,
    pub total_cost: f64,
    /// Seconds from the first enqueue to the last result.
    pub total_duration: f64,
    pub by_provider: BTreeMap<String, ProviderSummary>,
    pub results: Vec<TaskRecord>,
}

pub async fn batch(redis: &Client, args: Batch, out: &mut dyn Write) -> Result<u8> {
    let input = Input::of(&args.input);
    let batch_id = args
        .batch_id
        .clone()
        .unwrap_or_else(|| format!("b-{}", uuid::Uuid::new_v4().simple()));
    let shaper = Shaper {
        name: input.name(),
        queue: args.queue.clone(),
        batch_id: batch_id.clone(),
        // --parallel: one concurrency key for the whole batch.
        // Named by the batch, so a rerun's tasks share the first run's slots.
        parallel_key: args.parallel.map(|_| format!("batch-{batch_id}")),
        fallback: match (args.fallback, args.no_fallback) {
            (_, true) => Some(false),
            (true, _) => Some(true),
            _ => None,
        },
        args: &args,
    };
    let from_file = matches!(input, Input::File(_));
    if from_file {
        if let Some(exit) = check_file(redis, &args, &shaper, input.clone(), out).await? {
            return Ok(exit);
        }
    } else if args.dry_run {
        return Err(Error::Usage(
            "--dry-run estimates a batch from a file before it is enqueued; give --input FILE, not -".into(),
        ));
    }
    if args.dry_run {
        return Ok(EXIT_OK);
    }
    let keys = QueueKeys::new(&args.queue);
    redis.ensure_group(&keys).await?;
    // Said before anything goes in: a run cut short resumes with it.
    eprintln!(
        "batch {batch_id}: enqueuing to queue `{}`; if it is cut short, run the same command with --batch-id {batch_id} to enqueue the rest",
        args.queue
    );
    // An earlier run of this batch that was cut short: its tasks are in, in order.
    let skip = redis.batch_progress(&keys, &batch_id).await?;
    if skip > 0 {
        eprintln!(
            "batch {batch_id}: the first {skip} tasks were enqueued by an earlier run; enqueuing the rest"
        );
    }
    let started = Instant::now();
    let output = args.output.as_deref().map(batch_output);
    let mut listing = Listing::new(
        args.format,
        &args.queue,
        &batch_id,
        output.as_deref(),
        args.wait,
    )?;
    // A file's second read says nothing its first said.
    let second = if from_file {
        Reader::quiet()
    } else {
        Reader::default()
    };
    let tasks = batch_input::read(input, reader(second));
    let Sent {
        seen,
        enqueued,
        shape,
        customs,
        stopped,
    } = enqueue_all(redis, skip, tasks, &shaper, !from_file, &mut listing, out).await?;
    if let Some(e) = stopped {
        return Err(Error::Usage(format!(
            "{e}. {enqueued} tasks of batch {batch_id} are enqueued to queue `{}` (every task before this one); fix it and run the same command with --batch-id {batch_id} to enqueue the rest",
            args.queue
        )));
    }
    if seen == 0 {
        return Err(Error::Usage(format!("{} holds no tasks", shaper.name)));
    }
    let ids = listing.finish(out)?;
    eprintln!(
        "batch {batch_id}: {} tasks enqueued to queue `{}`{}",
        enqueued - skip,
        args.queue,
        if skip > 0 {
            format!(" ({skip} by an earlier run)")
        } else {
            String::new()
        }
    );
    if !args.wait {
        return Ok(EXIT_OK);
    }
    answer(
        redis,
        &args,
        Waited {
            keys,
            batch_id,
            ids,
            shape,
            customs,
            output,
            started,
        },
        out,
    )
    .await
}

/// A batch's tasks as they are read, each in its file's shape, or why one cannot be read.
type Tasks = tokio::sync::mpsc::Receiver<std::result::Result<(At, (Shape, BatchTask)), String>>;

/// What one run of a batch enqueued.
struct Sent {
    /// Tasks read, those an earlier run enqueued among them.
    seen: u64,
    /// The batch's tasks in Redis, in order.
    enqueued: u64,
    /// The shape of the file's records, and (to answer in it) each task's custom id.
    shape: Shape,
    customs: Vec<String>,
    /// The bad task that stopped the run, if one did: every task before it went in.
    stopped: Option<Error>,
}

/// Enqueues a batch's `tasks` after the first `skip` (an earlier run's), a chunk going to
/// Redis while the next is built, each task listed as it is read; `check`s each task unless
/// the file was checked whole before.
async fn enqueue_all(
    redis: &Client,
    skip: u64,
    mut tasks: Tasks,
    shaper: &Shaper<'_>,
    check: bool,
    listing: &mut Listing,
    out: &mut dyn Write,
) -> Result<Sent> {
    let keys = QueueKeys::new(&shaper.queue);
    // The shape of the file's records, and (to answer in it) each task's custom id.
    let mut shape = Shape::Native;
    let mut customs: Vec<String> = Vec::new();
    let mut chunk: Vec<Envelope> = Vec::with_capacity(ENQUEUE_CHUNK);
    let mut seen = 0u64;
    let mut enqueued = skip;
    // One chunk goes to Redis while the next is built.
    let mut sending: Option<tokio::task::JoinHandle<Result<u64>>> = None;
    let stopped = loop {
        let Some(task) = tasks.recv().await else {
            break None;
        };
        // A file's tasks were checked whole before; standard input's are checked here.
        let env = match task {
            Ok((at, (of, task))) => {
                shape = of;
                if shaper.args.wait && of != Shape::Native {
                    customs.push(task.custom_id.clone().unwrap_or_default());
                }
                shaper.envelope(at, task, check)
            }
            Err(e) => Err(Error::Usage(e)),
        };
        let env = match env {
            Ok(env) => env,
            Err(e) => break Some(e),
        };
        seen += 1;
        // Every line's task is named from its custom id as it is read.
        let id = env
            .id
            .ok_or_else(|| Error::Usage("a batch line's task has no id".into()))?;
        listing.add(out, id)?;
        if seen <= skip {
            continue;
        }
        chunk.push(env);
        if chunk.len() == ENQUEUE_CHUNK {
            if let Some(sent) = sending.take() {
                enqueued = sent.await.map_err(|e| Error::Usage(e.to_string()))??;
            }
            let full = std::mem::replace(&mut chunk, Vec::with_capacity(ENQUEUE_CHUNK));
            sending = Some(tokio::spawn(flush(
                redis.clone(),
                keys.clone(),
                shaper.batch_id.clone(),
                enqueued,
                full,
            )));
        }
    };
    if let Some(sent) = sending.take() {
        enqueued = sent.await.map_err(|e| Error::Usage(e.to_string()))??;
    }
    // Every task before a bad one goes in, so the batch resumes right after what went in.
    enqueued = flush(
        redis.clone(),
        keys.clone(),
        shaper.batch_id.clone(),
        enqueued,
        chunk,
    )
    .await?;
    Ok(Sent {
        seen,
        enqueued,
        shape,
        customs,
        stopped,
    })
}

/// Reads a batch file whole before anything is enqueued: a bad task stops the batch with
/// nothing in; with a provider file, each task is estimated as it goes by and the quotas
/// checked. `Some(exit code)` when the batch must not go in.
async fn check_file(
    redis: &Client,
    args: &Batch,
    shaper: &Shaper<'_>,
    input: Input,
    out: &mut dyn Write,
) -> Result<Option<u8>> {
    let config = args
        .config
        .as_deref()
        .map(llmq_shared::config::Config::load)
        .transpose()?;
    let mut tally = config.as_ref().map(crate::estimate::Tally::new);
    let mut tasks = batch_input::read(input, reader(Reader::default()));
    let mut count = 0u64;
    while let Some(task) = tasks.recv().await {
        let (at, (_, task)) = task.map_err(Error::Usage)?;
        let env = shaper.envelope(at, task, true)?;
        if let Some(tally) = &mut tally {
            tally.add(&env);
        }
        count += 1;
    }
    if count == 0 {
        return Err(Error::Usage(format!("{} holds no tasks", shaper.name)));
    }
    let estimate = match tally {
        Some(tally) => Some(
            tally
                .finish(redis, args.parallel.is_some(), Utc::now())
                .await?,
        ),
        None => None,
    };
    Ok((!check_quotas(args, estimate, out)?).then_some(EXIT_USAGE))
}

/// A batch enqueued, as `--wait` waits for it.
struct Waited {
    keys: QueueKeys,
    batch_id: String,
    /// Its tasks, in the file's order.
    ids: Vec<TaskId>,
    /// The shape of the file's records, and each task's custom id (to answer in it).
    shape: Shape,
    customs: Vec<String>,
    output: Option<std::path::PathBuf>,
    started: Instant,
}

/// Waits for a batch's tasks, then answers: a provider's batch file in that provider's
/// output shape (to `--output`, else standard output, the summary to standard error), llmq's
/// own as a report.
async fn answer(redis: &Client, args: &Batch, batch: Waited, out: &mut dyn Write) -> Result<u8> {
    let Waited {
        keys,
        batch_id,
        ids,
        shape,
        customs,
        output,
        started,
    } = batch;
    let bar = indicatif::ProgressBar::new(ids.len() as u64);
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} tasks finished ({elapsed})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    wait_batch(redis, &keys, &batch_id, &ids, args.wait_timeout, |n| {
        bar.set_position(n);
    })
    .await?;
    bar.finish_and_clear();
    // A directory's file holds JSON Lines for a provider's batch file.
    let output = output.map(|p| match args.output.as_deref() {
        Some(given) if given != p && shape != Shape::Native => p.with_extension("jsonl"),
        _ => p,
    });
    // Each result is read once, a chunk at a time. A provider's batch file is answered in
    // that provider's batch output shape as they come: to the --output file, else to standard
    // output (the summary then goes to standard error). llmq's own keeps them for its report.
    let answering = shape != Shape::Native;
    let mut answers = match (&output, answering) {
        (Some(path), true) => Some(create_output(path)?),
        _ => None,
    };
    let mut tally = Tally::default();
    let mut kept = Vec::new();
    for (chunk_no, chunk) in ids.chunks(WAIT_CHUNK).enumerate() {
        let records = redis.results(&keys, chunk).await?;
        for (i, (record, &id)) in records.into_iter().zip(chunk).enumerate() {
            let r = record.unwrap_or_else(|| TaskRecord::pending(id, &args.queue, Status::Queued));
            tally.add(&r);
            if !answering {
                kept.push(r);
                continue;
            }
            let custom = customs
                .get(chunk_no * WAIT_CHUNK + i)
                .map_or("", String::as_str);
            let line = format!("{}\n", batch_file::result_line(shape, custom, &r));
            match &mut answers {
                Some(file) => file
                    .write_all(line.as_bytes())
                    .map_err(|source| Error::Write {
                        path: "--output".into(),
                        source,
                    })?,
                None => emit(out, &line),
            }
        }
    }
    if let Some(mut file) = answers {
        file.flush().map_err(|source| Error::Write {
            path: "--output".into(),
            source,
        })?;
    }
    let unfinished = tally.unfinished;
    let report = tally.report(started.elapsed(), kept);
    let summary = match args.format {
        Format::Json => to_json(&report),
        Format::Text => summary_text(&report, unfinished),
    };
    match (&output, answering) {
        (None, true) => eprint!("{summary}"),
        (Some(path), false) => {
            write_report(path, &to_json(&report))?;
            emit(out, &summary);
        }
        _ => emit(out, &summary),
    }
    Ok(if report.failure_count == 0 {
        EXIT_OK
    } else {
        EXIT_FAILED
    })
}

/// Results read per round trip while a batch is waited on.
const WAIT_CHUNK: usize = 1000;
/// How long the workers' count of a batch's finished tasks may stand still below the total
/// before the tasks not yet seen finished are read (the count misses a task gone dead as
/// poison, and an envelope that was not valid JSON); doubled after each such read that found
/// none newly finished, up to [`SWEEP_MAX`].
const SWEEP_AFTER: Duration = Duration::from_secs(30);
const SWEEP_MAX: Duration = Duration::from_secs(600);

/// Waits until every task of batch `batch_id` has finished, or `timeout`, in flat memory and
/// without asking Redis about each task every round: the progress is the workers' count of
/// the batch's finished tasks; the tasks not yet seen finished are read (once each) when the
/// count reaches the total, or when it has stood still for a while.
pub(crate) async fn wait_batch(
    redis: &Client,
    keys: &QueueKeys,
    batch_id: &str,
    ids: &[TaskId],
    timeout: Option<Duration>,
    mut progress: impl FnMut(u64),
) -> Result<()> {
    let started = Instant::now();
    let total = ids.len() as u64;
    // Indexes of the tasks not yet seen finished.
    let mut open: Vec<u32> = (0..u32::try_from(ids.len()).unwrap_or(u32::MAX)).collect();
    let (mut last, mut moved) = (u64::MAX, Instant::now());
    let mut sweep_after = SWEEP_AFTER;
    // A count past the total with tasks still open (one counted twice) reads them at most
    // once a second.
    let mut swept = Instant::now()
        .checked_sub(Duration::from_secs(1))
        .unwrap_or_else(Instant::now);
    let mut pause = Duration::from_millis(10);
    loop {
        let counted = redis.batch_finished(keys, batch_id).await?.min(total);
        if counted != last {
            (last, moved) = (counted, Instant::now());
        }
        progress(counted.max(total - open.len() as u64));
        let complete = counted >= total && swept.elapsed() >= Duration::from_secs(1);
        if complete || moved.elapsed() >= sweep_after {
            let before = open.len();
            let mut still = Vec::new();
            for chunk in open.chunks(WAIT_CHUNK) {
                let chunk_ids: Vec<TaskId> = chunk.iter().map(|&i| ids[i as usize]).collect();
                let records = redis.results(keys, &chunk_ids).await?;
                for (&i, r) in chunk.iter().zip(records) {
                    if !r.is_some_and(|r| r.status.is_final()) {
                        still.push(i);
                    }
                }
            }
            open = still;
            if open.is_empty() {
                progress(total);
                return Ok(());
            }
            sweep_after = if open.len() < before {
                SWEEP_AFTER
            } else {
                (sweep_after * 2).min(SWEEP_MAX)
            };
            (moved, swept) = (Instant::now(), Instant::now());
        }
        if timeout.is_some_and(|t| started.elapsed() >= t) {
            return Ok(());
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

/// What reads a batch's records: each a task, with the shape of the file's first.
fn reader(
    mut reader: Reader,
) -> impl FnMut(serde_json::Value) -> std::result::Result<(Shape, BatchTask), String> {
    move |record| {
        let task = reader.task(record)?;
        Ok((reader.shape(), task))
    }
}

/// Tasks per enqueue script: a round trip each.
const ENQUEUE_CHUNK: usize = 1000;

/// Enqueues `chunk` with the batch's progress after it: `before` plus its length, which it
/// returns.
pub(crate) async fn flush(
    redis: Client,
    keys: QueueKeys,
    batch_id: String,
    before: u64,
    chunk: Vec<Envelope>,
) -> Result<u64> {
    if chunk.is_empty() {
        return Ok(before);
    }
    let mark = Progress {
        batch_id,
        enqueued: before + chunk.len() as u64,
    };
    redis.enqueue_marked(&keys, &chunk, Some(&mark)).await?;
    Ok(mark.enqueued)
}

/// Builds each task of a batch as the worker would take it.
struct Shaper<'a> {
    name: String,
    queue: String,
    batch_id: String,
    parallel_key: Option<String>,
    fallback: Option<bool>,
    args: &'a Batch,
}

impl Shaper<'_> {
    /// The envelope of the task at `at`: its id and idempotency key made of the batch's id
    /// and the task's `custom_id` (else where it is), so a rerun names the same tasks and
    /// none of them runs twice.
    /// `check`: refuse it here, in the worker's words, if a worker would.
    fn envelope(&self, at: At, t: BatchTask, check: bool) -> Result<Envelope> {
        let args = self.args;
        let fail = |e: &dyn std::fmt::Display| Error::Usage(format!("{} {at}: {e}", self.name));
        if t.prompt.trim().is_empty() && t.messages.is_empty() {
            return Err(fail(
                &"the prompt is empty; give \"prompt\" or \"messages\"",
            ));
        }
        if let Some(ty) = &t.task_type {
            ty.parse::<TaskType>().map_err(|e| fail(&e))?;
        }
        let custom = match t.custom_id {
            Some(c) if c.is_empty() => {
                return Err(fail(
                    &"`custom_id` is empty; give each task an id of its own, or leave it out",
                ));
            }
            Some(c) => c,
            None => at.key(),
        };
        let mut env = Envelope::new(t.prompt);
        env.id = Some(TaskId::from_uuid(uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            format!("llmq-batch:{}:{}:{custom}", self.queue, self.batch_id).as_bytes(),
        )));
        env.idempotency_key = Some(
            t.idempotency_key
                .unwrap_or_else(|| format!("{}:{custom}", self.batch_id))
                .into(),
        );
        env.idempotency_window = t.idempotency_window.map(Into::into);
        env.batch_id = Some(self.batch_id.as_str().into());
        env.task_type = t.task_type.map(Into::into);
        // --route: routing chooses, whatever model the line names.
        if !args.route {
            env.provider = t.platform.map(Into::into);
            env.model = t.model.map(Into::into);
        }
        env.timeout = t.timeout;
        env.metadata = t.metadata.map(Box::new);
        env.system = t.system.map(Into::into);
        env.chain_id = t.chain_id.map(Into::into);
        env.max_attempts = t.max_attempts;
        env.max_tokens = t.max_tokens;
        env.temperature = t.temperature;
        env.enqueued_at = Some(Utc::now());
        env.concurrency_key = self.parallel_key.as_deref().map(Into::into);
        env.concurrency_limit = args.parallel;
        env.messages = t.messages;
        env.tools = t.tools;
        env.tool_choice = t.tool_choice.map(Box::new);
        env.response_format = t.response_format.map(Box::new);
        env.deadline = t
            .deadline
            .or_else(|| args.provider_batch.clone())
            .map(Into::into);
        env.fallback = self.fallback;
        env.priority = t.priority.or(args.priority);
        env.tenant = t.tenant.or_else(|| args.tenant.clone()).map(Into::into);
        env.tags = args.tags.iter().cloned().chain(t.tags).collect();
        // Refused here, as a worker would refuse it, rather than becoming a dead letter.
        if check {
            Envelope::from_value(serde_json::to_value(&env).unwrap_or_default())
                .map_err(|e| fail(&e))?;
        }
        Ok(env)
    }
}

/// The batch's task ids as they are enqueued: printed (and written to `--output`) as they
/// come, so a batch of any size lists them in flat memory; kept only for `--wait`.
struct Listing {
    format: Format,
    file: Option<std::io::BufWriter<std::fs::File>>,
    keep: bool,
    ids: Vec<TaskId>,
    first: bool,
}

impl Listing {
    fn new(
        format: Format,
        queue: &str,
        batch_id: &str,
        output: Option<&std::path::Path>,
        wait: bool,
    ) -> Result<Self> {
        // With --wait, --output gets the report instead.
        let file = match output.filter(|_| !wait) {
            Some(path) => Some(create_output(path)?),
            None => None,
        };
        let mut listing = Self {
            format,
            file,
            keep: wait,
            ids: Vec::new(),
            first: true,
        };
        if format == Format::Json && !wait {
            let head = format!(
                "{{\"queue\":{},\"batch_id\":{},\"task_ids\":[",
                serde_json::Value::from(queue),
                serde_json::Value::from(batch_id)
            );
            listing.put(None, &head)?;
        }
        Ok(listing)
    }

    fn put(&mut self, out: Option<&mut dyn Write>, text: &str) -> Result<()> {
        if let Some(out) = out {
            emit(out, text);
        }
        if let Some(f) = &mut self.file {
            f.write_all(text.as_bytes())
                .map_err(|source| Error::Write {
                    path: "--output".into(),
                    source,
                })?;
        }
        Ok(())
    }

    fn add(&mut self, out: &mut dyn Write, id: TaskId) -> Result<()> {
        if self.keep {
            self.ids.push(id);
            return Ok(());
        }
        let text = match self.format {
            Format::Text => format!("{id}\n"),
            Format::Json if self.first => format!("\"{id}\""),
            Format::Json => format!(",\"{id}\""),
        };
        self.first = false;
        self.put(Some(out), &text)
    }

    /// Ends the listing; the ids, kept for `--wait`.
    fn finish(mut self, out: &mut dyn Write) -> Result<Vec<TaskId>> {
        if self.format == Format::Json && !self.keep {
            self.put(Some(out), "]}\n")?;
        }
        if let Some(f) = &mut self.file {
            f.flush().map_err(|source| Error::Write {
                path: "--output".into(),
                source,
            })?;
        }
        Ok(self.ids)
    }
}

/// With the estimate (made with a provider file), when a quota would pass 90 %, asks before
/// going on: `--yes` goes on, a terminal is asked, anything else refuses. `--dry-run` prints
/// the estimate to `out` (else it goes to stderr). Returns whether to enqueue.
fn check_quotas(
    args: &Batch,
    estimate: Option<crate::estimate::Estimate>,
    out: &mut dyn Write,
) -> Result<bool> {
    let Some(est) = estimate else {
        if args.dry_run {
            return Err(Error::Usage(
                "--dry-run estimates the batch from the provider file; pass --config or set LLMQ_CONFIG".into(),
            ));
        }
        return Ok(true);
    };
    if args.dry_run {
        match args.format {
            Format::Text => emit(out, &est.text()),
            Format::Json => emit(out, &to_json(&est)),
        }
        return Ok(true);
    }
    eprint!("{}", est.text());
    if est.warnings.is_empty() || args.yes {
        return Ok(true);
    }
    if !std::io::stdin().is_terminal() {
        eprintln!(
            "llmq: the batch would push a quota past 90 % (above); nothing was enqueued. Pass --yes to enqueue it anyway."
        );
        return Ok(false);
    }
    eprint!("Continue with this batch? [y/N] ");
    let mut answer = String::new();
    let _ = std::io::stdin().read_line(&mut answer);
    if matches!(answer.trim(), "y" | "Y" | "yes") {
        Ok(true)
    } else {
        eprintln!("llmq: nothing was enqueued.");
        Ok(false)
    }
}

/// Where `--output` writes: the path itself, or `batch_<timestamp>.json` inside it when it
/// is a directory (an existing one, or a path ending in `/`, created when the file is
/// written).
fn batch_output(path: &std::path::Path) -> std::path::PathBuf {
    let is_dir = path.is_dir() || path.as_os_str().to_string_lossy().ends_with('/');
    if is_dir {
        path.join(format!("batch_{}.json", Utc::now().format("%Y%m%d_%H%M%S")))
    } else {
        path.to_owned()
    }
}

/// Writes a batch's listing or report, making the directory `--output DIR/` named.
fn write_report(path: &std::path::Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| Error::Write {
            path: dir.display().to_string(),
            source,
        })?;
    }
    write_file(path, text)
}

/// An `--output` file to write as the batch goes, made empty (and its directory made).
fn create_output(path: &std::path::Path) -> Result<std::io::BufWriter<std::fs::File>> {
    write_report(path, "")?;
    let f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|source| Error::Write {
            path: path.display().to_string(),
            source,
        })?;
    Ok(std::io::BufWriter::new(f))
}

/// A batch's results counted as they are read.
#[derive(Debug, Default)]
struct Tally {
    by_provider: BTreeMap<String, ProviderSummary>,
    total: usize,
    succeeded: usize,
    unfinished: usize,
    cost_usd: f64,
}

impl Tally {
    fn add(&mut self, r: &TaskRecord) {
        let line = self
            .by_provider
            .entry(r.provider.clone().unwrap_or_else(|| "-".into()))
            .or_default();
        if r.status == Status::Succeeded {
            line.succeeded += 1;
            self.succeeded += 1;
        } else {
            line.failed += 1;
        }
        line.cost_usd += r.cost_usd;
        self.cost_usd += r.cost_usd;
        self.total += 1;
        self.unfinished += usize::from(!r.status.is_final());
    }

    fn report(self, took: Duration, results: Vec<TaskRecord>) -> BatchReport {
        BatchReport {
            total_tasks: self.total,
            success_count: self.succeeded,
            failure_count: self.total - self.succeeded,
            success_rate: if self.total == 0 {
                0.0
            } else {
                self.succeeded as f64 * 100.0 / self.total as f64
            },
            total_cost: self.cost_usd,
            total_duration: took.as_secs_f64(),
            by_provider: self.by_provider,
            results,
        }
    }
}

fn summary_text(r: &BatchReport, unfinished: usize) -> String {
    let mut s = format!("Batch finished: {} tasks\n", r.total_tasks);
    s.push_str(&format!("  Succeeded:     {}\n", r.success_count));
    s.push_str(&format!("  Failed:        {}\n", r.failure_count));
    if unfinished > 0 {
        s.push_str(&format!(
            "  (of which {unfinished} still unfinished at the wait timeout)\n"
        ));
    }
    s.push_str(&format!("  Success rate:  {:.1}%\n", r.success_rate));
    s.push_str(&format!("  Total cost:    {}\n", render::usd(r.total_cost)));
    s.push_str(&format!("  Duration:      {:.2}s\n", r.total_duration));
    s.push_str("  By provider:\n");
    for (name, p) in &r.by_provider {
        s.push_str(&format!(
            "    {name:<16} {:>5} ok {:>5} failed  {}\n",
            p.succeeded,
            p.failed,
            render::usd(p.cost_usd)
        ));
    }
    s
}
