//! `llmq web`: a page for operators, served on loopback by default. Server-rendered HTML
//! with no script: every piece of text from a task, a model or Redis goes through [`esc`],
//! and every answer carries a Content-Security-Policy that allows no script and no framing.
//!
//! Pages so far (read-only): the overview (queues, live workers, the scheduler and its
//! duties), a task by id, and a queue's dead letters. A bad request, an unknown task or
//! Redis away each answer a page that says so with the right status; the server goes on.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use llmq_shared::keys::{QueueKeys, SchedulerKeys};
use llmq_shared::queue::Client;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// How many dead letters one page lists.
const DEAD_PAGE: usize = 50;

/// No script, no framing, no plugins; styles inline only.
const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// What every page reads.
pub struct WebState {
    pub redis: Client,
    /// The scheduler namespace whose status the overview shows.
    pub scheduler_namespace: Option<String>,
}

/// Serves on `listener` until `shutdown`.
///
/// # Errors
/// The listener fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: WebState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(Arc::new(state)))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Binds `listen` and serves until SIGTERM or ctrl-c.
///
/// # Errors
/// The address cannot be bound.
pub async fn run(state: WebState, listen: SocketAddr) -> crate::Result<u8> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| crate::Error::Usage(format!("cannot listen on {listen}: {e}")))?;
    eprintln!("llmq web: serving on http://{listen} (read-only)");
    serve(listener, state, llmq_shared::shutdown::on_signal())
        .await
        .map_err(|e| crate::Error::Usage(format!("the web server failed: {e}")))?;
    Ok(crate::EXIT_OK)
}

fn router(state: Arc<WebState>) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/task", get(task))
        .route("/dead", get(dead))
        .route("/chains", get(chains))
        .route("/chain", get(chain))
        .fallback(|| async {
            page(
                StatusCode::NOT_FOUND,
                "Not found",
                "<p>There is no such page. Start from the <a href=\"/\">overview</a>.</p>",
            )
        })
        .layer(axum::middleware::map_response(secure))
        .with_state(state)
}

/// The headers every answer carries.
async fn secure(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Text made safe for HTML, in an element or a quoted attribute.
#[must_use]
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A whole page: `body` is HTML made by this module (its text escaped).
fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title} · llmq</title>\
         <style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}pre{{white-space:pre-wrap}}\
         .note{{color:#666}}</style></head><body>\
         <nav><a href=\"/\">Overview</a></nav><h1>{title}</h1>\
         <p class=\"note\">Read-only: this page shows; it changes nothing.</p>{body}</body></html>",
        title = esc(title)
    );
    (status, Html(html)).into_response()
}

/// Redis could not answer: a page that says so.
fn redis_away(e: &llmq_shared::queue::Error) -> Response {
    page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Redis cannot be reached",
        &format!("<p>{}</p>", esc(&e.to_string())),
    )
}

async fn overview(State(state): State<Arc<WebState>>) -> Response {
    let queues = match state.redis.known_queues().await {
        Ok(q) => q,
        Err(e) => return redis_away(&e),
    };
    let mut rows = String::new();
    for name in &queues {
        let keys = QueueKeys::new(name);
        let c = match state.redis.counts(&keys).await {
            Ok(c) => c,
            Err(e) => return redis_away(&e),
        };
        let q = esc(name);
        rows.push_str(&format!(
            "<tr><td>{q}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td><a href=\"/dead?queue={u}\">{}</a></td><td>{}</td>\
             <td><a href=\"/chains?queue={u}\">chains</a></td></tr>",
            c.ready,
            c.in_flight,
            c.delayed,
            c.dead,
            c.workers,
            u = esc(&urlencode(name)),
        ));
    }
    let keys = SchedulerKeys::new(state.scheduler_namespace.as_deref());
    let scheduler = match llmq_shared::archive::scheduler_status(&state.redis, &keys).await {
        Ok(s) => s,
        Err(e) => {
            return page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Redis cannot be reached",
                &format!("<p>{}</p>", esc(&e.to_string())),
            );
        }
    };
    let mut duties = String::new();
    for d in &scheduler.duties {
        let state = match (d.ok, d.overdue) {
            (_, true) => "overdue",
            (true, false) => "ok",
            (false, false) => "failed",
        };
        duties.push_str(&format!(
            "<tr><td>{}</td><td>{state}</td><td>{}</td><td>{}</td></tr>",
            esc(&d.name),
            d.last_run
                .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                .unwrap_or_else(|| "never".into()),
            esc(&d.detail)
        ));
    }
    let holder = scheduler.holder.as_deref().map_or_else(
        || "none active (start llmq-scheduler)".to_owned(),
        |h| format!("active: {}", esc(h)),
    );
    let body = format!(
        "<h2>Queues</h2><table><tr><th>Queue</th><th>Ready</th><th>In flight</th>\
         <th>Delayed</th><th>Dead</th><th>Workers</th><th></th></tr>{rows}</table>\
         <h2>Find a task</h2><form action=\"/task\" method=\"get\">\
         <label>Queue <input name=\"queue\" value=\"default\"></label> \
         <label>Task id <input name=\"id\" size=\"40\"></label> <button>Show</button></form>\
         <h2>Scheduler</h2><p>{holder}</p><table><tr><th>Duty</th><th>State</th>\
         <th>Last run</th><th>Detail</th></tr>{duties}</table>"
    );
    page(StatusCode::OK, "llmq", &body)
}

#[derive(Deserialize)]
struct TaskQuery {
    queue: Option<String>,
    id: Option<String>,
}

async fn task(State(state): State<Arc<WebState>>, Query(q): Query<TaskQuery>) -> Response {
    let queue = q.queue.unwrap_or_else(|| "default".into());
    let Some(id) =
        q.id.as_deref()
            .and_then(|id| uuid::Uuid::parse_str(id.trim()).ok())
    else {
        return page(
            StatusCode::BAD_REQUEST,
            "Not a task id",
            "<p>A task id is a UUID, as <code>llmq submit</code> printed it, such as \
             <code>0b6c2d1e-3f4a-4b5c-9d6e-7f8091a2b3c4</code>.</p>",
        );
    };
    let keys = QueueKeys::new(&queue);
    let record = match state.redis.task(&keys, &id.to_string()).await {
        Ok(r) => r,
        Err(e) => return redis_away(&e),
    };
    let Some(r) = record else {
        return page(
            StatusCode::NOT_FOUND,
            "No such task",
            &format!(
                "<p>Queue {} has no task {id}: it was never enqueued there, or its result is \
                 older than the workers' <code>--result-ttl</code>.</p>",
                esc(&queue)
            ),
        );
    };
    let row = |name: &str, value: &str| format!("<tr><th>{name}</th><td>{}</td></tr>", esc(value));
    let mut table = String::new();
    table.push_str(&row("Queue", &queue));
    table.push_str(&row("Status", &format!("{:?}", r.status).to_lowercase()));
    table.push_str(&row("Attempts", &r.attempts.to_string()));
    if let (Some(p), Some(m)) = (&r.provider, &r.model) {
        table.push_str(&row("Provider/model", &format!("{p}/{m}")));
    }
    if let Some(route) = &r.route {
        table.push_str(&row("Route", route));
    }
    table.push_str(&row("Cost", &format!("${:.6}", r.cost_usd)));
    if let Some(e) = &r.error {
        table.push_str(&row("Error", e));
    }
    let output = r
        .output
        .as_deref()
        .map(|o| format!("<h2>Output</h2><pre>{}</pre>", esc(o)))
        .unwrap_or_default();
    page(
        StatusCode::OK,
        &format!("Task {id}"),
        &format!("<table>{table}</table>{output}"),
    )
}

#[derive(Deserialize)]
struct DeadQuery {
    queue: Option<String>,
}

async fn dead(State(state): State<Arc<WebState>>, Query(q): Query<DeadQuery>) -> Response {
    let queue = q.queue.unwrap_or_else(|| "default".into());
    let keys = QueueKeys::new(&queue);
    let letters = match state.redis.dead_letters(&keys, DEAD_PAGE).await {
        Ok(l) => l,
        Err(e) => return redis_away(&e),
    };
    let mut rows = String::new();
    for d in &letters {
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><pre>{}</pre></td></tr>",
            esc(&d.task_id),
            esc(&d.class),
            d.attempts,
            esc(&d.error),
            esc(&llmq_shared::text::excerpt(&d.task, 400))
        ));
    }
    let body = if letters.is_empty() {
        "<p>No dead letters.</p>".to_owned()
    } else {
        format!(
            "<p>The newest {} (<code>llmq dlq list</code> shows more).</p><table><tr><th>Task</th>\
             <th>Class</th><th>Attempts</th><th>Error</th><th>Task as it died</th></tr>{rows}</table>",
            letters.len()
        )
    };
    page(StatusCode::OK, &format!("Dead letters of {queue}"), &body)
}

#[derive(Deserialize)]
struct ChainQuery {
    queue: Option<String>,
    id: Option<String>,
}

/// How many chains one page lists.
const CHAIN_PAGE: usize = 50;

async fn chains(State(state): State<Arc<WebState>>, Query(q): Query<ChainQuery>) -> Response {
    let queue = q.queue.unwrap_or_else(|| "default".into());
    let keys = QueueKeys::new(&queue);
    let listed = match state.redis.chains(&keys, CHAIN_PAGE).await {
        Ok(l) => l,
        Err(e) => return redis_away(&e),
    };
    let mut rows = String::new();
    for (id, at) in &listed {
        let when = chrono::DateTime::from_timestamp_millis(*at)
            .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
            .unwrap_or_default();
        rows.push_str(&format!(
            "<tr><td><a href=\"/chain?queue={}&amp;id={}\">{}</a></td><td>{when}</td></tr>",
            esc(&urlencode(&queue)),
            esc(&urlencode(id)),
            esc(id)
        ));
    }
    let body = if listed.is_empty() {
        "<p>No chains.</p>".to_owned()
    } else {
        format!("<table><tr><th>Chain</th><th>Submitted</th></tr>{rows}</table>")
    };
    page(StatusCode::OK, &format!("Chains of {queue}"), &body)
}

/// The fill of a step's box, by its status.
fn step_colour(status: &str) -> &'static str {
    match status {
        "succeeded" => "#c8efc8",
        "failed" => "#f6c6c6",
        "cancelled" => "#dddddd",
        "awaiting_approval" => "#cdd6f6",
        "queued" | "running" | "retrying" => "#f8efb8",
        _ => "#f2f2f2",
    }
}

async fn chain(State(state): State<Arc<WebState>>, Query(q): Query<ChainQuery>) -> Response {
    let queue = q.queue.unwrap_or_else(|| "default".into());
    let id = q.id.unwrap_or_default();
    let keys = QueueKeys::new(&queue);
    let c = match state.redis.chain(&keys, &id).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            return page(
                StatusCode::NOT_FOUND,
                "No such chain",
                &format!(
                    "<p>Queue {} has no chain {}: it was never submitted there, or its keys \
                     expired.</p>",
                    esc(&queue),
                    esc(&id)
                ),
            );
        }
        Err(e) => return redis_away(&e),
    };
    // Each step one column right of its deepest parent: the DAG left to right.
    let steps = &c.spec.steps;
    let mut depth: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for _ in 0..steps.len() {
        for s in steps {
            let d = s
                .after
                .iter()
                .map(|p| depth.get(p.as_str()).map_or(0, |d| d + 1))
                .max()
                .unwrap_or(0);
            depth.insert(s.name.as_str(), d);
        }
    }
    let (w, h, gap_x, gap_y) = (190, 56, 60, 20);
    let mut row_of: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut used: std::collections::HashMap<usize, usize> = std::collections::HashMap::new();
    for s in steps {
        let d = depth.get(s.name.as_str()).copied().unwrap_or(0);
        let r = used.entry(d).or_insert(0);
        row_of.insert(s.name.as_str(), *r);
        *r += 1;
    }
    let at = |name: &str| {
        let d = depth.get(name).copied().unwrap_or(0);
        let r = row_of.get(name).copied().unwrap_or(0);
        (10 + d * (w + gap_x), 10 + r * (h + gap_y))
    };
    let width = 20 + (depth.values().max().copied().unwrap_or(0) + 1) * (w + gap_x);
    let height = 20 + used.values().max().copied().unwrap_or(1) * (h + gap_y);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         role=\"img\" aria-label=\"the chain's steps\">"
    );
    for s in steps {
        let (x, y) = at(&s.name);
        for p in &s.after {
            let (px, py) = at(p);
            svg.push_str(&format!(
                "<line x1=\"{}\" y1=\"{}\" x2=\"{x}\" y2=\"{}\" stroke=\"#888\"/>",
                px + w,
                py + h / 2,
                y + h / 2
            ));
        }
    }
    let mut table = String::new();
    for s in steps {
        let (x, y) = at(&s.name);
        let st = c.steps.get(&s.name);
        let status = st.map_or("blocked", |st| st.status.as_str());
        let model = st.and_then(|st| st.model.clone()).unwrap_or_default();
        let cost = st.map_or(0.0, |st| st.cost_usd);
        svg.push_str(&format!(
            "<g><rect x=\"{x}\" y=\"{y}\" width=\"{w}\" height=\"{h}\" rx=\"6\" \
             fill=\"{}\" stroke=\"#555\"/><text x=\"{}\" y=\"{}\" font-size=\"13\" \
             font-weight=\"bold\">{}</text><text x=\"{}\" y=\"{}\" font-size=\"11\">{} \
             {}</text><text x=\"{}\" y=\"{}\" font-size=\"11\">${cost:.4}</text></g>",
            step_colour(status),
            x + 8,
            y + 18,
            esc(&s.name),
            x + 8,
            y + 33,
            esc(status),
            esc(&model),
            x + 8,
            y + 47,
        ));
        table.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>${cost:.6}</td><td>{}</td><td>{}</td></tr>",
            esc(&s.name),
            esc(status),
            esc(&model),
            esc(st.and_then(|st| st.summary.as_deref()).unwrap_or("")),
            esc(st.and_then(|st| st.error.as_deref()).unwrap_or(""))
        ));
    }
    svg.push_str("</svg>");
    let body = format!(
        "<p>State: {}</p>{svg}<h2>Steps</h2><table><tr><th>Step</th><th>Status</th>\
         <th>Model</th><th>Cost</th><th>Summary</th><th>Error</th></tr>{table}</table>",
        esc(&c.state)
    );
    page(StatusCode::OK, &format!("Chain {id}"), &body)
}

/// `text` for a URL's query.
fn urlencode(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_cannot_become_markup() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
        assert_eq!(urlencode("a b&c/{d}"), "a%20b%26c%2F%7Bd%7D");
    }
}
