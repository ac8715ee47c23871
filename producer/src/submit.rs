//! `llmq submit` and `llmq batch`: build envelopes, enqueue them, and optionally wait.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::time::{Duration, Instant};

use chrono::Utc;
use llmq_shared::conversation::{Message, ResponseFormat, Tool, ToolChoice};
use llmq_shared::envelope::{CacheAsk, CacheKeep, Envelope, TaskType};
use llmq_shared::keys::QueueKeys;
use llmq_shared::outcome::{Status, TaskRecord};
use llmq_shared::queue::{Client, OutEntry};
use serde::{Deserialize, Serialize};

use crate::cli::{Batch, Format, Submit};
use crate::{EXIT_FAILED, EXIT_OK, EXIT_USAGE, Error, Result, emit, render, to_json, write_file};

pub async fn submit(redis: &Client, args: Submit, out: &mut dyn Write) -> Result<u8> {
    let prompt = if args.prompt == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).map_err(|e| {
            Error::Usage(format!("cannot read the prompt from standard input: {e}"))
        })?;
        s
    } else {
        args.prompt
    };
    if prompt.trim().is_empty() {
        return Err(Error::Usage(
            "the prompt is empty; pass --prompt with some text".into(),
        ));
    }
    let mut env = Envelope::new(prompt);
    env.system = args.system;
    env.task_type = Some(args.task_type.to_string());
    env.provider = args.platform;
    env.model = args.model;
    env.chain_id = args.chain_id;
    llmq_shared::envelope::check_class(args.priority, args.tenant.as_deref())
        .map_err(|e| Error::Usage(e.to_string()))?;
    env.priority = args.priority;
    env.tenant = args.tenant;
    if args.no_fallback {
        env.fallback = Some(false);
    }
    env.timeout = Some(args.timeout);
    env.max_attempts = Some(args.max_attempts);
    env.max_tokens = args.max_tokens;
    env.temperature = args.temperature;
    env.metadata = args.metadata;
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
    env.idempotency_key = args.idempotency_key;
    env.idempotency_window = args.idempotency_window;
    if env.cache.is_some() || env.idempotency_key.is_some() {
        // Refused here, in the worker's words, rather than as a dead letter.
        Envelope::parse(env.to_json().as_bytes(), usize::MAX)
            .map_err(|e| Error::Usage(e.to_string()))?;
    }
    env.enqueued_at = Some(Utc::now());
    if let Some(delay) = args.delay {
        env.run_at = Some(Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default());
    }
    let id = env.id.map(|u| u.to_string()).unwrap_or_default();
    // With traces exported, the worker's spans for this task join the submit's trace.
    let span = tracing::trace_span!(
        target: llmq_shared::telemetry::TARGET,
        "llmq.submit",
        llmq.task.id = %id,
        llmq.queue = %args.queue,
    );
    env.traceparent = llmq_shared::telemetry::traceparent(&span);
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
        follow(redis, &keys, &id, args.wait_timeout, out).await?;
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
    id: &str,
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
        let ids = [id.to_owned()];
        let finished = redis.results(keys, &ids).await?[0]
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
    ids: &[String],
    timeout: Option<Duration>,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Option<TaskRecord>>> {
    let started = Instant::now();
    let mut done: Vec<Option<TaskRecord>> = vec![None; ids.len()];
    let mut open: Vec<usize> = (0..ids.len()).collect();
    let mut pause = Duration::from_millis(10);
    while !open.is_empty() {
        for chunk in open.clone().chunks(1000) {
            let chunk_ids: Vec<String> = chunk.iter().map(|&i| ids[i].clone()).collect();
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

/// One task of a batch file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchTask {
    #[serde(default)]
    prompt: String,
    #[serde(default)]
    messages: Vec<Message>,
    #[serde(default)]
    tools: Vec<Tool>,
    #[serde(default)]
    tool_choice: Option<ToolChoice>,
    #[serde(default)]
    response_format: Option<ResponseFormat>,
    #[serde(rename = "type", default)]
    task_type: Option<String>,
    #[serde(default)]
    platform: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    timeout: Option<u64>,
    #[serde(default)]
    metadata: Option<serde_json::Value>,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    chain_id: Option<String>,
    #[serde(default)]
    max_attempts: Option<u32>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    deadline: Option<String>,
    #[serde(default)]
    priority: Option<i64>,
    #[serde(default)]
    tenant: Option<String>,
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
    let text = std::fs::read_to_string(&args.input)
        .map_err(|e| Error::Usage(format!("cannot read {}: {e}", args.input.display())))?;
    let items: Vec<serde_json::Value> = serde_json::from_str(&text).map_err(|e| {
        Error::Usage(format!(
            "{} is not a JSON array of tasks: {e}",
            args.input.display()
        ))
    })?;
    // --parallel: one concurrency key for the whole batch.
    let parallel_key = args
        .parallel
        .map(|_| format!("batch-{}", uuid::Uuid::new_v4().simple()));
    let fallback = match (args.fallback, args.no_fallback) {
        (_, true) => Some(false),
        (true, _) => Some(true),
        _ => None,
    };
    let output = args.output.as_deref().map(batch_output);
    let mut envs = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let t: BatchTask = serde_json::from_value(item)
            .map_err(|e| Error::Usage(format!("{} task [{i}]: {e}", args.input.display())))?;
        if t.prompt.trim().is_empty() && t.messages.is_empty() {
            return Err(Error::Usage(format!(
                "{} task [{i}]: the prompt is empty; give \"prompt\" or \"messages\"",
                args.input.display()
            )));
        }
        if let Some(ty) = &t.task_type {
            ty.parse::<TaskType>()
                .map_err(|e| Error::Usage(format!("{} task [{i}]: {e}", args.input.display())))?;
        }
        let mut env = Envelope::new(t.prompt);
        env.task_type = t.task_type;
        env.provider = t.platform;
        env.model = t.model;
        env.timeout = t.timeout;
        env.metadata = t.metadata;
        env.system = t.system;
        env.chain_id = t.chain_id;
        env.max_attempts = t.max_attempts;
        env.max_tokens = t.max_tokens;
        env.temperature = t.temperature;
        env.enqueued_at = Some(Utc::now());
        env.concurrency_key.clone_from(&parallel_key);
        env.concurrency_limit = args.parallel;
        env.messages = t.messages;
        env.tools = t.tools;
        env.tool_choice = t.tool_choice;
        env.response_format = t.response_format;
        env.deadline = t.deadline.or_else(|| args.provider_batch.clone());
        env.fallback = fallback;
        env.priority = t.priority.or(args.priority);
        env.tenant = t.tenant.or_else(|| args.tenant.clone());
        // Refused here, as a worker would refuse it, rather than becoming a dead letter.
        Envelope::from_value(serde_json::to_value(&env).unwrap_or_default())
            .map_err(|e| Error::Usage(format!("{} task [{i}]: {e}", args.input.display())))?;
        envs.push(env);
    }
    if envs.is_empty() {
        return Err(Error::Usage(format!(
            "{} holds no tasks",
            args.input.display()
        )));
    }
    if !check_quotas(redis, &args, &envs, out).await? {
        return Ok(EXIT_USAGE);
    }
    if args.dry_run {
        return Ok(EXIT_OK);
    }
    let keys = QueueKeys::new(&args.queue);
    redis.ensure_group(&keys).await?;
    let started = Instant::now();
    for chunk in envs.chunks(1000) {
        redis.enqueue_many(&keys, chunk).await?;
    }
    let ids: Vec<String> = envs
        .iter()
        .filter_map(|e| e.id)
        .map(|u| u.to_string())
        .collect();
    if !args.wait {
        let listing = match args.format {
            Format::Text => ids.iter().map(|id| format!("{id}\n")).collect::<String>(),
            Format::Json => to_json(&serde_json::json!({"queue": args.queue, "task_ids": ids})),
        };
        if let Some(path) = &output {
            write_report(path, &listing)?;
        }
        emit(out, &listing);
        eprintln!("enqueued {} tasks to queue `{}`", ids.len(), args.queue);
        return Ok(EXIT_OK);
    }
    let bar = indicatif::ProgressBar::new(ids.len() as u64);
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} tasks finished ({elapsed})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let records = wait_for(redis, &keys, &ids, args.wait_timeout, |n| {
        bar.set_position(n as u64)
    })
    .await?;
    bar.finish_and_clear();
    let unfinished = records.iter().filter(|r| r.is_none()).count();
    let results: Vec<TaskRecord> = records
        .into_iter()
        .zip(&ids)
        .map(|(r, id)| r.unwrap_or_else(|| TaskRecord::pending(id, &args.queue, Status::Queued)))
        .collect();
    let report = summarize(results, started.elapsed());
    if let Some(path) = &output {
        write_report(path, &to_json(&report))?;
    }
    match args.format {
        Format::Json => emit(out, &to_json(&report)),
        Format::Text => emit(out, &summary_text(&report, unfinished)),
    }
    Ok(if report.failure_count == 0 {
        EXIT_OK
    } else {
        EXIT_FAILED
    })
}

/// With a provider file, estimates the batch and, when a quota would pass 90 %, asks before
/// going on: `--yes` goes on, a terminal is asked, anything else refuses. `--dry-run` prints
/// the estimate to `out` (else it goes to stderr). Returns whether to enqueue.
async fn check_quotas(
    redis: &Client,
    args: &Batch,
    envs: &[Envelope],
    out: &mut dyn Write,
) -> Result<bool> {
    let Some(path) = &args.config else {
        if args.dry_run {
            return Err(Error::Usage(
                "--dry-run estimates the batch from the provider file; pass --config or set LLMQ_CONFIG".into(),
            ));
        }
        return Ok(true);
    };
    let config = llmq_shared::config::Config::load(path)?;
    let est = crate::estimate::estimate(redis, &config, envs, args.parallel.is_some(), Utc::now())
        .await?;
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

fn summarize(results: Vec<TaskRecord>, took: Duration) -> BatchReport {
    let mut by_provider: BTreeMap<String, ProviderSummary> = BTreeMap::new();
    for r in &results {
        let line = by_provider
            .entry(r.provider.clone().unwrap_or_else(|| "-".into()))
            .or_default();
        if r.status == Status::Succeeded {
            line.succeeded += 1;
        } else {
            line.failed += 1;
        }
        line.cost_usd += r.cost_usd;
    }
    let total = results.len();
    let ok = results
        .iter()
        .filter(|r| r.status == Status::Succeeded)
        .count();
    BatchReport {
        total_tasks: total,
        success_count: ok,
        failure_count: total - ok,
        success_rate: if total == 0 {
            0.0
        } else {
            ok as f64 * 100.0 / total as f64
        },
        total_cost: results.iter().map(|r| r.cost_usd).fold(0.0, |a, b| a + b),
        total_duration: took.as_secs_f64(),
        by_provider,
        results,
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
