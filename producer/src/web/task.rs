//! A task's whole story (`/task?queue=&id=`): its record in Redis and its row in the ledger,
//! the request it made (prompt and messages, as text), every provider call with its error,
//! tokens, cost and time, its answer and tool calls, links to its chain, batch, duplicate and
//! cached origin; and what can be done to it: cancel, run now (delayed), replay (dead).

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use llmq_shared::history::{FoundTask, TaskCall};
use llmq_shared::ids::TaskId;
use llmq_shared::keys::QueueKeys;
use llmq_shared::outcome::{Status, TaskRecord};
use llmq_shared::queue::Found;
use serde::Deserialize;

use super::auth::done;
use super::{
    AppState, Viewer, action, action_form, esc, field, message, page, queue_in, redis_away,
    urlencode,
};
use crate::render::usd;

#[derive(Deserialize)]
pub(super) struct TaskQuery {
    queue: Option<String>,
    id: Option<String>,
}

/// How many delayed, ready and dead entries of a queue a task lookup reads at most.
const TASK_SCAN: usize = 5000;

/// Everything known of one task.
struct Story {
    queue: String,
    found: Found,
    row: Option<FoundTask>,
    calls: Vec<TaskCall>,
}

impl Story {
    fn status(&self) -> String {
        match (&self.found.record, &self.row) {
            (Some(r), _) => format!("{:?}", r.status).to_lowercase(),
            (None, Some(row)) => row.status.clone(),
            _ => "unknown".into(),
        }
    }

    fn ended(&self) -> bool {
        self.found
            .record
            .as_ref()
            .map_or(self.row.is_some(), |r| r.status.is_final())
    }
}

/// The task's id from the query, or the page to answer instead.
fn task_id(raw: Option<&str>, viewer: &Viewer) -> Result<TaskId, Box<Response>> {
    raw.and_then(|id| id.trim().parse::<TaskId>().ok())
        .ok_or_else(|| {
            Box::new(page(
                StatusCode::BAD_REQUEST,
                "Not a task id",
                "<p>A task id is a UUID, as <code>llmq submit</code> printed it, such as \
                 <code>0b6c2d1e-3f4a-4b5c-9d6e-7f8091a2b3c4</code>.</p>",
                viewer,
            ))
        })
}

/// Looks for task `id` in `queues` (Redis), then in the ledger.
async fn story(
    app: &super::App,
    queues: &[String],
    id: TaskId,
    viewer: &Viewer,
) -> Result<Option<Story>, Box<Response>> {
    let (row, calls) = match &app.web.ledger {
        Some(ledger) => {
            let uuid = id.uuid();
            let read = async {
                Ok::<_, llmq_shared::ledger::Error>((
                    ledger.finished_task(uuid).await?,
                    ledger.task_calls(uuid).await?,
                ))
            };
            read.await.map_err(|e| {
                Box::new(message(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "The ledger cannot be read",
                    &e.to_string(),
                    viewer,
                ))
            })?
        }
        None => (None, Vec::new()),
    };
    let mut found = None;
    // A task the ledger has seen end is held nowhere in Redis (but a dead one's letter): its
    // stored record is one lookup, and no scan is made for it.
    let ended = row
        .as_ref()
        .filter(|r| r.status != "dead" && queues.contains(&r.queue));
    if let Some(r) = ended {
        let keys = QueueKeys::new(&r.queue);
        let record = app
            .web
            .redis
            .results(&keys, &[id])
            .await
            .map_err(|e| Box::new(redis_away(&e, viewer)))?
            .pop()
            .flatten();
        found = Some((
            r.queue.clone(),
            Found {
                record,
                ..Found::default()
            },
        ));
    } else {
        for queue in queues {
            let f = app
                .web
                .redis
                .task_and_request(&QueueKeys::new(queue), id, TASK_SCAN)
                .await
                .map_err(|e| Box::new(redis_away(&e, viewer)))?;
            if f.record.is_some() {
                found = Some((queue.clone(), f));
                break;
            }
        }
    }
    let (queue, found) = match (found, &row) {
        (Some(f), _) => f,
        (None, Some(r)) => (r.queue.clone(), Found::default()),
        (None, None) => return Ok(None),
    };
    Ok(Some(Story {
        queue,
        found,
        row,
        calls,
    }))
}

/// GET `/task`.
pub(super) async fn show(
    State(app): AppState,
    viewer: Viewer,
    Query(q): Query<TaskQuery>,
) -> Response {
    // No queue named: every queue is looked in.
    let named = q.queue.as_deref().map(str::trim).filter(|q| !q.is_empty());
    let queues = match named {
        Some(name) => match queue_in(Some(name), &viewer) {
            Ok(q) => vec![q],
            Err(page) => return *page,
        },
        None => match app.web.redis.known_queues().await {
            Ok(q) => q,
            Err(e) => return redis_away(&e, &viewer),
        },
    };
    let id = match task_id(q.id.as_deref(), &viewer) {
        Ok(id) => id,
        Err(page) => return *page,
    };
    let story = match story(&app, &queues, id, &viewer).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            let missing = named.map_or_else(
                || format!("No queue has task {id}"),
                |q| format!("Queue {q} has no task {id}"),
            );
            return message(
                StatusCode::NOT_FOUND,
                "No such task",
                &format!(
                    "{missing}: it was never enqueued there, its result is older than the \
                     workers' --result-ttl and the ledger has no row of it, or it waits behind \
                     more than {TASK_SCAN} delayed, ready or dead tasks (llmq result finds it \
                     there)."
                ),
                &viewer,
            );
        }
        Err(page) => return *page,
    };
    let body = format!(
        "<div id=\"live\" data-refresh=\"3000\"{done}>{summary}{actions}{request}{calls}{answer}</div>",
        done = if story.ended() { " data-done" } else { "" },
        summary = summary(&story),
        actions = actions(&story, id, &viewer),
        request = request(story.found.request.as_deref()),
        calls = calls(&story.calls),
        answer = story.found.record.as_ref().map(answer).unwrap_or_default(),
    );
    page(StatusCode::OK, &format!("Task {id}"), &body, &viewer)
}

fn row(name: &str, value: &str) -> String {
    format!("<tr><th>{name}</th><td>{}</td></tr>", esc(value))
}

/// A row whose value is HTML made here.
fn row_html(name: &str, html: &str) -> String {
    format!("<tr><th>{name}</th><td>{html}</td></tr>")
}

fn task_link(queue: &str, id: TaskId) -> String {
    format!(
        "<a href=\"/task?queue={}&amp;id={id}\">{id}</a>",
        esc(&urlencode(queue))
    )
}

fn summary(s: &Story) -> String {
    let r = s.found.record.as_ref();
    let l = s.row.as_ref();
    let q = &s.queue;
    let mut t = String::new();
    t.push_str(&row("Queue", q));
    let st = s.status();
    t.push_str(&row_html(
        "Status",
        &format!("<span class=\"state {0}\">{0}</span>", esc(&st)),
    ));
    let attempts = r
        .map(|r| i64::from(r.attempts))
        .or(l.map(|l| i64::from(l.attempts)));
    if let Some(a) = attempts {
        t.push_str(&row("Attempts", &a.to_string()));
    }
    let task_type = r
        .and_then(|r| r.task_type.clone())
        .or(l.map(|l| l.task_type.clone()));
    if let Some(tt) = task_type {
        t.push_str(&row("Type", &tt));
    }
    if let Some(l) = l {
        if let Some(tenant) = &l.tenant {
            t.push_str(&row("Tenant", tenant));
        }
        if let Some(tags) = &l.tags {
            t.push_str(&row("Tags", &tags.to_string()));
        }
    }
    let provider = r
        .and_then(|r| r.provider.clone())
        .or(l.and_then(|l| l.provider.clone()));
    let model = r
        .and_then(|r| r.model.clone())
        .or(l.and_then(|l| l.model.clone()));
    if let (Some(p), Some(m)) = (provider, model) {
        t.push_str(&row("Provider/model", &format!("{p}/{m}")));
    }
    if let Some(route) = r.and_then(|r| r.route.as_ref()) {
        t.push_str(&row("Route", route));
    }
    if let Some(learned) = r.and_then(|r| r.learned.as_ref()) {
        t.push_str(&row(
            "Chosen by",
            &format!(
                "{} (propensity {:.3}{}) of {}",
                learned.strategy,
                learned.propensity,
                if learned.explored { ", exploring" } else { "" },
                learned.candidates.join(", ")
            ),
        ));
    }
    if let Some(r) = r {
        t.push_str(&row(
            "Tokens",
            &format!(
                "{} in ({} cached), {} out ({} reasoning)",
                r.input_tokens, r.cached_tokens, r.output_tokens, r.reasoning_tokens
            ),
        ));
        t.push_str(&row("Cost", &usd(r.cost_usd)));
        if r.duration_ms > 0 {
            t.push_str(&row(
                "Took",
                &format!("{:.2} s", r.duration_ms as f64 / 1000.0),
            ));
        }
    } else if let Some(l) = l {
        t.push_str(&row(
            "Tokens",
            &format!("{} in, {} out", l.input_tokens, l.output_tokens),
        ));
        t.push_str(&row("Cost", &usd(l.cost_usd)));
        if let Some(ms) = l.duration_ms {
            t.push_str(&row("Took", &format!("{:.2} s", ms as f64 / 1000.0)));
        }
    }
    if let Some(at) = l.and_then(|l| l.enqueued_at) {
        t.push_str(&row(
            "Enqueued",
            &at.format("%Y-%m-%d %H:%M:%S%.3f UTC").to_string(),
        ));
    }
    let finished = r.and_then(|r| r.finished_at).or(l.map(|l| l.finished_at));
    if let Some(at) = finished {
        t.push_str(&row(
            "Finished",
            &at.format("%Y-%m-%d %H:%M:%S%.3f UTC").to_string(),
        ));
    }
    t.push_str(&links(s));
    format!("<table class=\"story\">{t}</table>")
}

/// The rows that link the task to others (its chain, batch, the task it copies, the cached
/// origin) and say how it ended (truncated, its errors).
fn links(s: &Story) -> String {
    let r = s.found.record.as_ref();
    let l = s.row.as_ref();
    let q = &s.queue;
    let mut t = String::new();
    let chain = r
        .and_then(|r| r.chain_id.clone())
        .or(l.and_then(|l| l.chain_id.clone()));
    if let Some(chain) = chain {
        t.push_str(&row_html(
            "Chain",
            &format!(
                "<a href=\"/chain?queue={}&amp;id={}\">{}</a>",
                esc(&urlencode(q)),
                esc(&urlencode(&chain)),
                esc(&chain)
            ),
        ));
    }
    if let Some(batch) = l.and_then(|l| l.batch_id.as_ref()) {
        t.push_str(&row_html(
            "Batch",
            &format!(
                "<a href=\"/tasks?state=finished&amp;queue={}&amp;batch={}\">{}</a>",
                esc(&urlencode(q)),
                esc(&urlencode(batch)),
                esc(batch)
            ),
        ));
    }
    if let Some(first) = r.and_then(|r| r.duplicate_of) {
        t.push_str(&row_html(
            "Copy of",
            &format!(
                "{} (answered with its answer, no call)",
                task_link(q, first)
            ),
        ));
    }
    if let Some(origin) = r.and_then(|r| r.cached_from) {
        t.push_str(&row_html(
            "Cached from",
            &format!(
                "{} (the answer cache answered, no call)",
                task_link(q, origin)
            ),
        ));
    } else if r.is_some_and(|r| r.cached) {
        t.push_str(&row("Cached", "answered from the answer cache, no call"));
    }
    if r.is_some_and(|r| r.truncated) {
        t.push_str(&row("Truncated", "the answer stopped at max_tokens"));
    }
    let error = r
        .and_then(|r| r.error.clone())
        .or(l.and_then(|l| l.error.clone()));
    if let Some(e) = error {
        t.push_str(&row_html("Error", &format!("<pre>{}</pre>", esc(&e))));
    }
    if let Some(r) = r.filter(|r| !r.provider_errors.is_empty()) {
        let items: String = r
            .provider_errors
            .iter()
            .map(|e| format!("<li>{}</li>", esc(e)))
            .collect();
        t.push_str(&row_html("Provider errors", &format!("<ul>{items}</ul>")));
    }
    t
}

fn actions(s: &Story, id: TaskId, viewer: &Viewer) -> String {
    let id = id.to_string();
    let q = s.queue.as_str();
    let status = s.found.record.as_ref().map(|r| r.status);
    let mut out = String::new();
    if !s.ended() {
        out.push_str(&action_form(
            viewer,
            "/task/cancel",
            &[("queue", q), ("id", &id)],
            "<button data-confirm=\"Cancel this task? It never runs, or its call is dropped.\">Cancel</button>",
        ));
    }
    if status == Some(Status::Delayed) {
        out.push_str(&action_form(
            viewer,
            "/task/run-now",
            &[("queue", q), ("id", &id)],
            "<button data-confirm=\"Run this task now rather than when it is due?\">Run now</button>",
        ));
    }
    if let Some(dead) = &s.found.dead_entry {
        out.push_str(&action_form(
            viewer,
            "/dead/replay",
            &[("queue", q), ("id", dead)],
            "<button data-confirm=\"Replay this dead task? It runs again with its attempts reset.\">Replay</button>",
        ));
    }
    if out.is_empty() {
        out
    } else {
        format!("<p class=\"actions\">{out}</p>")
    }
}

/// The request as text: system, each message, the prompt; the envelope itself when it is
/// not one.
fn request(envelope: Option<&str>) -> String {
    let Some(text) = envelope else {
        return String::new();
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
        return format!(
            "<h2>Request</h2><pre>{}</pre>",
            esc(&llmq_shared::text::excerpt(text, 20_000))
        );
    };
    let mut turns = Vec::new();
    if let Some(system) = v.get("system").and_then(|s| s.as_str()) {
        turns.push(("system".to_owned(), system.to_owned()));
    }
    for m in v
        .get("messages")
        .and_then(|m| m.as_array())
        .into_iter()
        .flatten()
    {
        let role = m
            .get("role")
            .and_then(|r| r.as_str())
            .unwrap_or("?")
            .to_owned();
        let content = match m.get("content") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => serde_json::to_string_pretty(other).unwrap_or_default(),
            None => String::new(),
        };
        turns.push((role, content));
    }
    if let Some(prompt) = v
        .get("prompt")
        .and_then(|p| p.as_str())
        .filter(|p| !p.is_empty())
    {
        turns.push(("user".to_owned(), prompt.to_owned()));
    }
    let shown: String = turns
        .iter()
        .map(|(role, text)| {
            format!(
                "<tr><th>{}</th><td><pre>{}</pre></td></tr>",
                esc(role),
                esc(&llmq_shared::text::excerpt(text, 20_000))
            )
        })
        .collect();
    format!("<h2>Request</h2><table class=\"story\">{shown}</table>")
}

fn calls(calls: &[TaskCall]) -> String {
    if calls.is_empty() {
        return String::new();
    }
    let rows: String = calls
        .iter()
        .map(|c| {
            let error = c.error.as_deref().map_or_else(String::new, |e| {
                format!(
                    "{}{}",
                    c.error_class
                        .as_deref()
                        .map_or_else(String::new, |k| format!("<b>{}</b>: ", esc(k))),
                    esc(&crate::render::cut(e, 300))
                )
            });
            format!(
                "<tr><td>{}</td><td class=\"num\">{}.{}.{}</td><td>{}/{}</td>\
                 <td><span class=\"state {o}\">{o}</span></td><td class=\"num\">{} / {} ({} \
                 cached)</td><td class=\"num\">{}</td><td class=\"num\">{} ms</td><td>{}</td>\
                 <td>{error}</td></tr>",
                c.called_at.format("%H:%M:%S%.3f"),
                c.run,
                c.attempt,
                c.call_no,
                esc(&c.provider),
                esc(&c.model),
                c.input_tokens,
                c.output_tokens,
                c.cached_tokens,
                usd(c.cost_usd),
                c.latency_ms,
                esc(&c.worker),
                o = esc(&c.outcome),
            )
        })
        .collect();
    format!(
        "<h2>Provider calls</h2><div class=\"scroll\"><table><thead><tr><th>At (UTC)</th>\
         <th class=\"num\">Run.attempt.call</th><th>Provider/model</th><th>Outcome</th>\
         <th class=\"num\">Tokens in / out</th><th class=\"num\">Cost</th>\
         <th class=\"num\">Latency</th><th>Worker</th><th>Error</th></tr></thead>\
         <tbody>{rows}</tbody></table></div>"
    )
}

fn answer(r: &TaskRecord) -> String {
    let mut out = String::new();
    if let Some(o) = &r.output {
        out.push_str(&format!("<h2>Answer</h2><pre>{}</pre>", esc(o)));
    }
    if !r.tool_calls.is_empty() {
        out.push_str(&format!(
            "<h2>Tool calls</h2><pre>{}</pre>",
            esc(&serde_json::to_string_pretty(&r.tool_calls).unwrap_or_default())
        ));
    }
    out
}

/// The queue and task an action's form names, when the viewer may act; else the page to
/// answer instead.
fn task_action(
    app: &super::App,
    headers: &HeaderMap,
    body: &str,
    viewer: &Viewer,
) -> Result<(String, TaskId), Box<Response>> {
    let (fields, queue) = action(app, headers, body, viewer)?;
    Ok((queue, task_id(field(&fields, "id"), viewer)?))
}

/// POST `/task/cancel`: sets the task's cancel mark, as `llmq cancel` does.
pub(super) async fn cancel(State(app): AppState, headers: HeaderMap, body: String) -> Response {
    let viewer = app.sessions.viewer(&headers);
    let (queue, id) = match task_action(&app, &headers, &body, &viewer) {
        Ok(x) => x,
        Err(page) => return *page,
    };
    let target = [llmq_shared::queue::Target::Task(id)];
    match app.web.redis.cancel(&QueueKeys::new(&queue), &target).await {
        Ok(answer) => {
            tracing::info!(queue, task = %id, "cancel asked from llmq web");
            let what = match answer.first() {
                Some(llmq_shared::queue::Cancelled::Ended(status)) => {
                    format!("Task {id} had already ended ({status}); it was left as it was.")
                }
                _ => format!(
                    "Cancelled task {id} of queue {queue}: workers end it within a second; \
                     it never runs, or its call is dropped."
                ),
            };
            let back = format!("/task?queue={}&id={id}", urlencode(&queue));
            done("Cancelled", &what, &back, &viewer)
        }
        Err(e) => redis_away(&e, &viewer),
    }
}

/// POST `/task/run-now`: a delayed task becomes due now.
pub(super) async fn run_now(State(app): AppState, headers: HeaderMap, body: String) -> Response {
    let viewer = app.sessions.viewer(&headers);
    let (queue, id) = match task_action(&app, &headers, &body, &viewer) {
        Ok(x) => x,
        Err(page) => return *page,
    };
    let keys = QueueKeys::new(&queue);
    let redis = &app.web.redis;
    let found = match redis.task_and_request(&keys, id, TASK_SCAN).await {
        Ok(f) => f,
        Err(e) => return redis_away(&e, &viewer),
    };
    let delayed = found
        .record
        .as_ref()
        .is_some_and(|r| r.status == Status::Delayed);
    let moved = match (delayed, found.request) {
        (true, Some(member)) => match redis.run_now(&keys, &member).await {
            Ok(moved) => moved,
            Err(e) => return redis_away(&e, &viewer),
        },
        _ => false,
    };
    let back = format!("/task?queue={}&id={id}", urlencode(&queue));
    if moved {
        tracing::info!(queue, task = %id, "run now asked from llmq web");
        done(
            "Due now",
            &format!(
                "Task {id} is due now: the next promotion (within a second) moves it to the stream."
            ),
            &back,
            &viewer,
        )
    } else {
        message(
            StatusCode::CONFLICT,
            "Not delayed",
            &format!("Task {id} is not delayed any more; it was left as it is."),
            &viewer,
        )
    }
}
