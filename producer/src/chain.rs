//! `llmq chain submit|show|list`.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use llmq_shared::chain::Chain;
use llmq_shared::chain::{ChainState, ChainStatus, StepStatus};
use llmq_shared::ids::EntryId;
use llmq_shared::keys::QueueKeys;
use llmq_shared::outcome::Status;
use llmq_shared::queue::{Client, Refused};
use serde::Serialize;
use serde_json::Value;

use crate::cli::{ChainCommand, Format};
use crate::{EXIT_FAILED, EXIT_OK, Error, Result, emit, render, to_json};

pub async fn run(redis: &Client, cmd: ChainCommand, out: &mut dyn Write) -> Result<u8> {
    match cmd {
        ChainCommand::Submit {
            file,
            queue,
            vars,
            wait,
            wait_timeout,
            format,
        } => {
            submit(
                redis,
                &file,
                &queue,
                &vars,
                wait.then_some(wait_timeout),
                format,
                out,
            )
            .await
        }
        ChainCommand::Show {
            chain_id,
            queue,
            format,
        } => show(redis, &chain_id, &queue, format, out).await,
        ChainCommand::Cancel { chain_id, queue } => cancel(redis, &chain_id, &queue, out).await,
        ChainCommand::Retry {
            chain_id,
            queue,
            from,
        } => retry(redis, &chain_id, &queue, from.as_deref(), out).await,
        ChainCommand::Pending { queue, format } => pending(redis, &queue, format, out).await,
        ChainCommand::Approve {
            chain_id,
            step,
            queue,
            note,
        } => {
            let note = note.unwrap_or_else(|| "approved by an operator".into());
            decide(redis, out, &queue, &chain_id, &step, true, &note).await
        }
        ChainCommand::Reject {
            chain_id,
            step,
            queue,
            reason,
        } => {
            let why = format!("rejected by an operator: {reason}");
            decide(redis, out, &queue, &chain_id, &step, false, &why).await
        }
        ChainCommand::List {
            queue,
            state,
            limit,
            format,
        } => list(redis, &queue, state.as_deref(), limit, format, out).await,
    }
}

/// `llmq chain submit`: the chain in, then with `--wait` (`Some`, with its timeout if one was
/// given) watched to its end.
async fn submit(
    redis: &Client,
    file: &std::path::Path,
    queue: &str,
    vars: &[String],
    wait: Option<Option<Duration>>,
    format: Format,
    out: &mut dyn Write,
) -> Result<u8> {
    let keys = QueueKeys::new(queue);
    let spec = read_spec(file, vars)?;
    let chain = Chain::parse(spec.as_bytes(), usize::MAX, queue, EntryId::default())
        .map_err(|e| Error::Usage(format!("{}: {e}", file.display())))?;
    redis.ensure_group(&keys).await?;
    redis.submit_chain(&keys, &spec).await?;
    let Some(wait_timeout) = wait else {
        match format {
            Format::Text => emit(out, &format!("{}\n", chain.id)),
            Format::Json => emit(out, &to_json(&serde_json::json!({"chain_id": chain.id}))),
        }
        return Ok(EXIT_OK);
    };
    if format == Format::Text {
        emit(out, &format!("chain {} submitted to `{queue}`\n", chain.id));
    }
    watch(redis, &keys, &chain.id, wait_timeout, format, out).await
}

/// `llmq chain show`.
async fn show(
    redis: &Client,
    chain_id: &str,
    queue: &str,
    format: Format,
    out: &mut dyn Write,
) -> Result<u8> {
    let keys = QueueKeys::new(queue);
    let Some(state) = redis.chain(&keys, chain_id).await? else {
        eprintln!(
            "llmq: no chain {chain_id} in queue `{queue}` (it may be in another queue: pass --queue)"
        );
        return Ok(EXIT_FAILED);
    };
    let view = view(redis, &keys, &state).await?;
    match format {
        Format::Json => emit(out, &to_json(&view)),
        Format::Text => emit(out, &text(&view)),
    }
    Ok(EXIT_OK)
}

/// `llmq chain cancel`.
async fn cancel(redis: &Client, chain_id: &str, queue: &str, out: &mut dyn Write) -> Result<u8> {
    let keys = QueueKeys::new(queue);
    match redis.cancel_chain(&keys, chain_id).await? {
        Ok(n) => {
            emit(
                out,
                &format!("chain {chain_id} cancelled; {n} step(s) will not run\n"),
            );
            Ok(EXIT_OK)
        }
        Err(r) => Ok(refused(chain_id, queue, r, "it has already ended")),
    }
}

/// `llmq chain retry`: the failed or cancelled steps (or `from` and what follows) again.
async fn retry(
    redis: &Client,
    chain_id: &str,
    queue: &str,
    from: Option<&str>,
    out: &mut dyn Write,
) -> Result<u8> {
    let keys = QueueKeys::new(queue);
    let Some(state) = redis.chain(&keys, chain_id).await? else {
        return Ok(refused(chain_id, queue, Refused::NoSuchChain, ""));
    };
    let reruns = match state.retry(from) {
        Ok(r) => r,
        Err(why) => {
            eprintln!("llmq: {why}");
            return Ok(EXIT_FAILED);
        }
    };
    if reruns.is_empty() {
        emit(
            out,
            &format!("chain {chain_id}: no failed or cancelled step to rerun\n"),
        );
        return Ok(EXIT_OK);
    }
    match redis.retry_chain(&keys, chain_id, &reruns).await? {
        Ok(_) => {
            let names: Vec<&str> = reruns.iter().map(|r| r.step.as_str()).collect();
            emit(
                out,
                &format!("chain {chain_id}: rerunning {}\n", names.join(", ")),
            );
            Ok(EXIT_OK)
        }
        Err(r) => Ok(refused(
            chain_id,
            queue,
            r,
            "it is still running; wait for it to end or cancel it first",
        )),
    }
}

/// `llmq chain pending`: the approvals waiting, with their deadlines.
async fn pending(redis: &Client, queue: &str, format: Format, out: &mut dyn Write) -> Result<u8> {
    let keys = QueueKeys::new(queue);
    let rows: Vec<serde_json::Value> = redis
        .approvals(&keys, None)
        .await?
        .into_iter()
        .map(|(chain, step, at)| {
            serde_json::json!({
                "chain_id": chain,
                "step": step,
                "deadline": chrono::DateTime::from_timestamp_millis(at),
            })
        })
        .collect();
    match format {
        Format::Json => emit(out, &to_json(&rows)),
        Format::Text => {
            let mut s = format!("{:<38} {:<16} DEADLINE\n", "CHAIN", "STEP");
            for r in &rows {
                s.push_str(&format!(
                    "{:<38} {:<16} {}\n",
                    render::cut(r["chain_id"].as_str().unwrap_or_default(), 38),
                    r["step"].as_str().unwrap_or_default(),
                    r["deadline"].as_str().unwrap_or_default()
                ));
            }
            emit(out, &s);
        }
    }
    Ok(EXIT_OK)
}

/// `llmq chain list`: the newest `limit` chains, in `state` if given.
async fn list(
    redis: &Client,
    queue: &str,
    state: Option<&str>,
    limit: usize,
    format: Format,
    out: &mut dyn Write,
) -> Result<u8> {
    let keys = QueueKeys::new(queue);
    let mut rows = Vec::new();
    for (id, _) in redis.chains(&keys, limit).await? {
        let Some(c) = redis.chain(&keys, &id).await? else {
            continue;
        };
        if state.is_some_and(|s| s != c.state.as_str()) {
            continue;
        }
        let done = c.steps.values().filter(|s| s.status.ended()).count();
        rows.push(serde_json::json!({
            "chain_id": id,
            "state": c.state,
            "steps": c.spec.steps.len(),
            "finished_steps": done,
            "created_at": c.created_at,
        }));
    }
    match format {
        Format::Json => emit(out, &to_json(&rows)),
        Format::Text => {
            let mut s = format!(
                "{:<38} {:<10} {:>7}  SUBMITTED\n",
                "CHAIN", "STATE", "STEPS"
            );
            for r in &rows {
                s.push_str(&format!(
                    "{:<38} {:<10} {:>3}/{:<3}  {}\n",
                    render::cut(r["chain_id"].as_str().unwrap_or_default(), 38),
                    r["state"].as_str().unwrap_or_default(),
                    r["finished_steps"],
                    r["steps"],
                    r["created_at"].as_str().unwrap_or_default(),
                ));
            }
            emit(out, &s);
        }
    }
    Ok(EXIT_OK)
}

/// The chain file (or stdin) with `--var`s merged into its `vars`, and a `chain_id` when it
/// gives none, so the id can be printed before the chain runs.
fn read_spec(file: &std::path::Path, vars: &[String]) -> Result<String> {
    let text = if file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| Error::Usage(format!("cannot read the chain from stdin: {e}")))?;
        s
    } else {
        std::fs::read_to_string(file)
            .map_err(|e| Error::Usage(format!("cannot read {}: {e}", file.display())))?
    };
    let mut value: Value = serde_json::from_str(&text)
        .map_err(|e| Error::Usage(format!("{} is not valid JSON: {e}", file.display())))?;
    let Some(obj) = value.as_object_mut() else {
        return Err(Error::Usage(format!(
            "{} must hold a JSON object (a chain)",
            file.display()
        )));
    };
    for v in vars {
        let Some((name, val)) = v.split_once('=') else {
            return Err(Error::Usage(format!(
                "--var `{v}` is not NAME=VALUE; write e.g. --var input=\"the billing service\""
            )));
        };
        let map = obj
            .entry("vars")
            .or_insert_with(|| Value::Object(serde_json::Map::new()));
        if let Some(m) = map.as_object_mut() {
            m.insert(name.to_owned(), Value::String(val.to_owned()));
        }
    }
    if !obj.contains_key("chain_id") {
        obj.insert(
            "chain_id".into(),
            Value::String(uuid::Uuid::new_v4().to_string()),
        );
    }
    Ok(value.to_string())
}

/// Prints each step as it ends, then the chain's outcome. Exit 0 when it succeeded.
async fn watch(
    redis: &Client,
    keys: &QueueKeys,
    chain_id: &str,
    timeout: Option<Duration>,
    format: Format,
    out: &mut dyn Write,
) -> Result<u8> {
    let started = Instant::now();
    let mut told: HashSet<String> = HashSet::new();
    loop {
        if let Some(state) = redis.chain(keys, chain_id).await? {
            if format == Format::Text {
                for step in &state.spec.steps {
                    let Some(s) = state.steps.get(&step.name) else {
                        continue;
                    };
                    if s.status.ended() && told.insert(step.name.clone()) {
                        let by = match (&s.provider, &s.model) {
                            (Some(p), Some(m)) => format!(" by {p}/{m}"),
                            _ => String::new(),
                        };
                        let why = s
                            .error
                            .as_deref()
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default();
                        emit(out, &format!("  {:<16} {}{by}{why}\n", step.name, s.status));
                    }
                }
            }
            if state.state != ChainStatus::Running {
                let view = view(redis, keys, &state).await?;
                match format {
                    Format::Json => emit(out, &to_json(&view)),
                    Format::Text => emit(out, &outcome_text(&view)),
                }
                return Ok(if state.state == ChainStatus::Succeeded {
                    EXIT_OK
                } else {
                    EXIT_FAILED
                });
            }
        }
        if timeout.is_some_and(|t| started.elapsed() >= t) {
            eprintln!("llmq: chain {chain_id} is still running; see `llmq chain show {chain_id}`");
            return Ok(EXIT_FAILED);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A step as `llmq chain show` prints it.
#[derive(Debug, Serialize)]
struct StepView {
    name: String,
    kind: &'static str,
    status: String,
    task_id: String,
    provider: Option<String>,
    model: Option<String>,
    round: u32,
    cost_usd: f64,
    summary: Option<String>,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct ChainView {
    chain_id: String,
    queue: String,
    state: ChainStatus,
    created_at: Option<chrono::DateTime<chrono::Utc>>,
    finished_at: Option<chrono::DateTime<chrono::Utc>>,
    cost_usd: f64,
    steps: Vec<StepView>,
}

async fn view(redis: &Client, keys: &QueueKeys, state: &ChainState) -> Result<ChainView> {
    let mut steps = Vec::with_capacity(state.spec.steps.len());
    for step in &state.spec.steps {
        let s = state.steps.get(&step.name).cloned().unwrap_or_default();
        // The chain says `queued` until the step ends; its task says whether it runs or
        // waits for a retry.
        let status = if let Some(id) = s.task_id.filter(|_| s.status == StepStatus::Queued) {
            match redis.task(keys, id).await?.map(|r| r.status) {
                Some(Status::Running) => "running".to_owned(),
                Some(Status::Delayed) => "retrying".to_owned(),
                _ => "queued".to_owned(),
            }
        } else {
            s.status.as_str().to_owned()
        };
        steps.push(StepView {
            name: step.name.clone(),
            kind: step.kind.as_str(),
            status,
            // Empty for a step without state (the wire format before typed ids).
            task_id: s.task_id.map(|t| t.to_string()).unwrap_or_default(),
            provider: s.provider,
            model: s.model,
            round: s.round,
            cost_usd: s.cost_usd,
            summary: s.summary,
            error: s.error,
        });
    }
    Ok(ChainView {
        chain_id: state.spec.id.clone(),
        queue: keys.name().to_owned(),
        state: state.state,
        created_at: state.created_at,
        finished_at: state.finished_at,
        cost_usd: steps.iter().map(|s| s.cost_usd).fold(0.0, |a, b| a + b),
        steps,
    })
}

fn text(v: &ChainView) -> String {
    let mut s = format!(
        "Chain:    {}\nQueue:    {}\nState:    {}\nCost:     ${:.6}\n\n{:<16} {:<10} {:<18} {:<28} {:>10}  SUMMARY / ERROR\n",
        v.chain_id,
        v.queue,
        v.state,
        v.cost_usd,
        "STEP",
        "KIND",
        "STATUS",
        "PROVIDER/MODEL",
        "COST"
    );
    for st in &v.steps {
        let by = match (&st.provider, &st.model) {
            (Some(p), Some(m)) => format!("{p}/{m}"),
            _ => "-".to_owned(),
        };
        let note = st.error.as_deref().or(st.summary.as_deref()).unwrap_or("");
        s.push_str(&format!(
            "{:<16} {:<10} {:<18} {:<28} {:>10}  {}\n",
            render::cut(&st.name, 16),
            st.kind,
            st.status,
            render::cut(&by, 28),
            format!("${:.6}", st.cost_usd),
            render::cut(&note.replace('\n', " "), 80)
        ));
    }
    s
}

/// The end of a watched chain: its state, and the output summary of each last step.
fn outcome_text(v: &ChainView) -> String {
    let mut s = format!("chain {}: {} (${:.6})\n", v.chain_id, v.state, v.cost_usd);
    for st in &v.steps {
        if let Some(sum) = &st.summary
            && st.status == "succeeded"
        {
            s.push_str(&format!("\n## {}\n{sum}\n", st.name));
        }
    }
    s
}

/// Says why a chain command could not act; exit 1.
fn refused(chain_id: &str, queue: &str, r: Refused, wrong_state: &str) -> u8 {
    match r {
        Refused::NoSuchChain => eprintln!(
            "llmq: no chain {chain_id} in queue `{queue}` (it may be in another queue: pass --queue)"
        ),
        // Only a scheduler's fenced writes are refused so; a person's are not fenced.
        Refused::WrongState | Refused::NotHolder => {
            eprintln!("llmq: chain {chain_id}: {wrong_state}");
        }
    }
    EXIT_FAILED
}

/// Takes a person's decision on an approval step, once.
async fn decide(
    redis: &Client,
    out: &mut dyn Write,
    queue: &str,
    chain_id: &str,
    step: &str,
    approve: bool,
    note: &str,
) -> Result<u8> {
    let keys = QueueKeys::new(queue);
    match redis
        .decide_approval(&keys, chain_id, step, approve, note, None)
        .await?
    {
        Ok(()) => {
            let what = if approve { "approved" } else { "rejected" };
            emit(out, &format!("chain {chain_id}: step `{step}` {what}\n"));
            Ok(EXIT_OK)
        }
        Err(Refused::NoSuchChain) => {
            eprintln!(
                "llmq: chain {chain_id} has no step `{step}` in queue `{queue}` (pass --queue if it is elsewhere)"
            );
            Ok(EXIT_FAILED)
        }
        // NotHolder: only a scheduler's fenced decision is refused so.
        Err(Refused::WrongState | Refused::NotHolder) => {
            eprintln!(
                "llmq: step `{step}` of chain {chain_id} is not awaiting approval: it was decided before, or it is not an approval that has been reached"
            );
            Ok(EXIT_FAILED)
        }
    }
}
