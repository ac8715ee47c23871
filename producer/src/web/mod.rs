//! `llmq web`: a page for operators, served on loopback by default. Server-rendered HTML;
//! the one script (`live.js`, served by this server) only refreshes a page's live part.
//!
//! Every piece of text from a task, a model or Redis goes through [`esc`], and every answer
//! carries a Content-Security-Policy that allows no inline script, no other origin and no
//! framing. Actions (approve, reject, replay, purge, pause, resume) need `LLMQ_WEB_TOKEN`:
//! without it the page is read-only and says so; with it, a person signs in with the token
//! and each action is a POST that carries the session's anti-forgery field ([`auth`]).
//!
//! A bad request, an unknown id, a refused action or Redis away each answer a page that says
//! so with the right status; the server goes on.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use llmq_shared::config::Config;
use llmq_shared::ledger::Ledger;
use llmq_shared::queue::Client;
use tokio_util::sync::CancellationToken;

mod auth;
mod chains;
mod charts;
mod costs;
mod dead;
mod dead_work;
mod overview;
mod task;
mod tasks;
mod workers;

pub use auth::Viewer;

/// Same-origin script only (`/live.js`), no inline script, no framing, no plugins; the one
/// stylesheet (`/style.css`) and inline style attributes (a quota bar's width).
const CSP: &str = "default-src 'none'; script-src 'self'; connect-src 'self'; \
                   style-src 'self' 'unsafe-inline'; img-src 'self'; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";

/// The script that refreshes a page's `#live` part every few seconds without a reload.
const LIVE_JS: &str = include_str!("live.js");

/// The one stylesheet: light or dark from the system, the same state colours everywhere.
const STYLE_CSS: &str = include_str!("style.css");

/// What `llmq web` is started with.
pub struct WebState {
    pub redis: Client,
    /// The scheduler namespace whose status the overview shows.
    pub scheduler_namespace: Option<String>,
    /// `LLMQ_WEB_TOKEN`: without it, the page only shows.
    pub token: Option<String>,
    /// The provider file (read without its secrets), for provider state and quota use.
    pub config: Option<Config>,
    /// The ledger, for the costs page.
    pub ledger: Option<Ledger>,
}

impl WebState {
    /// Read-only, over `redis` alone.
    #[must_use]
    pub fn new(redis: Client) -> Self {
        Self {
            redis,
            scheduler_namespace: None,
            token: None,
            config: None,
            ledger: None,
        }
    }
}

/// The server's state: what it was started with, and its sign-in sessions.
pub(crate) struct App {
    pub web: WebState,
    pub sessions: auth::Sessions,
    /// Listening on loopback: answer only requests addressed to a loopback name.
    pub loopback_only: bool,
    /// Dead letters replayed or purged in the background.
    pub jobs: dead_work::Jobs,
    /// Queues found in the keyspace that no worker has served yet ([`App::queues`]).
    pub discovered: std::sync::Mutex<Discovered>,
}

/// How often the walk over the keyspace for queues takes a step (5,000 keys).
const DISCOVERY_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// What the walk over the keyspace for queues found so far, where it is, and when it last
/// stepped.
#[derive(Default)]
pub(crate) struct Discovered {
    names: std::collections::BTreeSet<String>,
    cursor: u64,
    stepped: Option<std::time::Instant>,
}

impl App {
    /// Every queue: those workers have served, and those found in the keyspace (a queue with
    /// tasks and no worker yet). The keyspace is walked 5,000 keys a step, a step every
    /// [`DISCOVERY_EVERY`] at most, so an open page costs Redis little however many keys it
    /// holds.
    pub async fn queues(&self) -> Result<Vec<String>, llmq_shared::queue::Error> {
        let mut names = self.web.redis.known_queues().await?;
        let due = self
            .discovered
            .lock()
            .map(|d| d.stepped.is_none_or(|t| t.elapsed() >= DISCOVERY_EVERY))
            .unwrap_or(false);
        if due {
            let (cursor, first) = self
                .discovered
                .lock()
                .map(|d| (d.cursor, d.stepped.is_none()))
                .unwrap_or((0, false));
            // The first walk goes further (100,000 keys), so a queue shows at once on a
            // server just started. Best effort: a walk that fails (a Cluster node away) only
            // finds less.
            let calls = if first { 100 } else { 5 };
            let step = self.web.redis.discover_queues(cursor, calls).await;
            if let Ok(mut d) = self.discovered.lock() {
                d.stepped = Some(std::time::Instant::now());
                if let Ok((found, next)) = step {
                    d.names.extend(found);
                    d.cursor = next;
                }
            }
        }
        if let Ok(d) = self.discovered.lock() {
            names.extend(d.names.iter().cloned());
        }
        names.sort();
        names.dedup();
        Ok(names)
    }
}

type AppState = axum::extract::State<Arc<App>>;

/// Serves on `listener` until `shutdown`.
///
/// # Errors
/// The listener fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: WebState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let loopback_only = listener.local_addr()?.ip().is_loopback();
    let app = App {
        sessions: auth::Sessions::new(state.token.clone()),
        loopback_only,
        web: state,
        jobs: dead_work::Jobs::default(),
        discovered: std::sync::Mutex::default(),
    };
    axum::serve(listener, router(Arc::new(app)))
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
    let mode = if state.token.is_some() {
        "actions need a sign-in with LLMQ_WEB_TOKEN"
    } else {
        "read-only: set LLMQ_WEB_TOKEN to allow actions"
    };
    eprintln!("llmq web: serving on http://{listen} ({mode})");
    serve(listener, state, llmq_shared::shutdown::on_signal())
        .await
        .map_err(|e| crate::Error::Usage(format!("the web server failed: {e}")))?;
    Ok(crate::EXIT_OK)
}

/// `llmq web --health-check`: whether a server on `listen` answers `/healthz` (for an exec
/// probe: the server listens on loopback, which the kubelet cannot reach).
pub async fn health_check(listen: SocketAddr) -> crate::Result<u8> {
    probe("llmq web", listen).await
}

/// Whether server `name` on `listen` answers `/healthz`: exit 0 when it does, 1 when not.
pub async fn probe(name: &str, listen: SocketAddr) -> crate::Result<u8> {
    let mut at = listen;
    if at.ip().is_unspecified() {
        at.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(3))
        .build()
        .map_err(|e| crate::Error::Usage(format!("cannot make an HTTP client: {e}")))?;
    match http.get(format!("http://{at}/healthz")).send().await {
        Ok(r) if r.status().is_success() => Ok(crate::EXIT_OK),
        Ok(r) => {
            eprintln!("{name} on {at} answered /healthz with {}", r.status());
            Ok(crate::EXIT_FAILED)
        }
        Err(e) => {
            eprintln!("{name} on {at} does not answer: {e}");
            Ok(crate::EXIT_FAILED)
        }
    }
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(overview::overview))
        .route("/task", get(task::show))
        .route("/task/cancel", post(task::cancel))
        .route("/task/run-now", post(task::run_now))
        .route("/approvals", get(chains::approvals))
        .route("/approvals/decide", post(chains::decide))
        .route("/chains", get(chains::chains))
        .route("/chain", get(chains::chain))
        .route("/dead", get(dead::list))
        .route("/dead/show", get(dead::show))
        .route("/dead/replay", post(dead::replay))
        .route("/dead/purge", post(dead::purge))
        .route("/queue/pause", post(overview::pause))
        .route("/queue/resume", post(overview::resume))
        .route("/costs", get(costs::costs))
        .route("/tasks", get(tasks::list))
        .route("/charts", get(charts::charts))
        .route("/workers", get(workers::list))
        .route("/workers/drain", post(workers::drain))
        .route("/workers/resume", post(workers::resume))
        .route("/login", get(auth::login_form).post(auth::login))
        .route("/logout", post(auth::logout))
        .route("/live.js", get(live_js))
        .route("/style.css", get(style_css))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(|viewer: Viewer| async move {
            page(
                StatusCode::NOT_FOUND,
                "Not found",
                "<p>There is no such page. Start from the <a href=\"/\">overview</a>.</p>",
                &viewer,
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&app),
            local_hosts_only,
        ))
        .layer(axum::middleware::map_response(secure))
        .with_state(app)
}

async fn live_js() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/javascript; charset=utf-8"),
        )],
        LIVE_JS,
    )
        .into_response()
}

async fn style_css() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/css; charset=utf-8"),
        )],
        STYLE_CSS,
    )
        .into_response()
}

/// On loopback, answers only requests whose `Host` is a loopback name (`localhost`,
/// `127.0.0.1`, `[::1]`, any port, as `kubectl port-forward` gives): a page on another site
/// whose name an attacker points at 127.0.0.1 (DNS rebinding) could otherwise read the
/// pages from the operator's own browser. Listening elsewhere, the operator's ingress names
/// the host.
async fn local_hosts_only(
    axum::extract::State(app): axum::extract::State<Arc<App>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if app.loopback_only {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        if !is_loopback_host(host) {
            return message(
                StatusCode::MISDIRECTED_REQUEST,
                "Not this host",
                "This page listens on loopback and answers only to localhost, 127.0.0.1 or \
                 [::1]. To serve it under another name, listen on another address \
                 (LLMQ_WEB_LISTEN) behind your own ingress and authentication.",
                &Viewer::ReadOnly,
            );
        }
    }
    next.run(request).await
}

/// Whether a `Host` header names this machine's loopback.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6
            .split(']')
            .next()
            .map(|h| format!("[{h}]"))
            .unwrap_or_default(),
        None => host.split(':').next().unwrap_or("").to_ascii_lowercase(),
    };
    matches!(name.as_str(), "localhost" | "127.0.0.1" | "[::1]")
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
    // Not `no-referrer`: under it a browser sends `Origin: null` with the page's own forms,
    // and the origin is what tells them from another site's ([`auth`]).
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
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

/// `text` for a URL's query, already safe in an attribute.
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

/// A time in ms since the epoch, as the pages show it.
fn when_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default()
}

/// A form or query field given and not blank, trimmed.
fn given(field: Option<&str>) -> Option<&str> {
    field.map(str::trim).filter(|s| !s.is_empty())
}

/// A time from a form field: `YYYY-MM-DD` (its midnight, or the next one for an `end`) or
/// `YYYY-MM-DDTHH:MM[:SS]` (UTC); `None` when blank, a sentence naming `name` when neither.
fn form_time(
    raw: Option<&str>,
    end: bool,
    name: &str,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, String> {
    let Some(raw) = given(raw) else {
        return Ok(None);
    };
    if let Ok(d) = chrono::NaiveDate::parse_from_str(raw, "%Y-%m-%d") {
        let d = if end { d.succ_opt().unwrap_or(d) } else { d };
        return Ok(d.and_hms_opt(0, 0, 0).map(|t| t.and_utc()));
    }
    ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"]
        .iter()
        .find_map(|f| chrono::NaiveDateTime::parse_from_str(raw, f).ok())
        .map(|t| Some(t.and_utc()))
        .ok_or_else(|| {
            format!("`{name}` is not a date (YYYY-MM-DD) or a time (YYYY-MM-DDTHH:MM, UTC)")
        })
}

/// A labelled text field of a search form, holding `value` (escaped).
fn search_field(name: &str, label: &str, value: &Option<String>, hint: &str) -> String {
    format!(
        "<label>{label} <input name=\"{name}\" value=\"{}\" placeholder=\"{hint}\"></label> ",
        esc(value.as_deref().unwrap_or(""))
    )
}

/// A whole page: `body` is HTML made by this module (its text escaped).
fn page(status: StatusCode, title: &str, body: &str, viewer: &Viewer) -> Response {
    let who = match viewer {
        Viewer::ReadOnly => {
            "read-only: start <code>llmq web</code> with <code>LLMQ_WEB_TOKEN</code> to allow \
             actions"
                .to_owned()
        }
        Viewer::SignedOut => "read-only: <a href=\"/login\">sign in</a> to act".to_owned(),
        Viewer::SignedIn { csrf } => format!(
            "signed in <form class=\"inline\" method=\"post\" action=\"/logout\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\"><button>sign out</button></form>",
            esc(csrf)
        ),
    };
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} · llmq</title><link rel=\"stylesheet\" href=\"/style.css\">\
         <script src=\"/live.js\" defer></script></head><body>\
         <nav><a href=\"/\">Overview</a><a href=\"/tasks\">Tasks</a><a href=\"/workers\">Workers</a><a href=\"/charts\">Over time</a>\
         <a href=\"/approvals\">Approvals</a><a href=\"/costs\">Costs</a><span class=\"who\">{who}</span></nav>\
         <h1>{title}</h1>{body}</body></html>",
        title = esc(title)
    );
    (status, Html(html)).into_response()
}

/// A page that says one thing: `text` is plain text, escaped here.
fn message(status: StatusCode, title: &str, text: &str, viewer: &Viewer) -> Response {
    page(status, title, &format!("<p>{}</p>", esc(text)), viewer)
}

/// Redis could not answer: a page that says so.
fn redis_away(e: &llmq_shared::queue::Error, viewer: &Viewer) -> Response {
    message(
        StatusCode::SERVICE_UNAVAILABLE,
        "Redis cannot be reached",
        &e.to_string(),
        viewer,
    )
}

/// A POST form for an action: the anti-forgery field, `hidden` fields and `inner` HTML (its
/// inputs and buttons); nothing for a viewer who may not act.
fn action_form(viewer: &Viewer, action: &str, hidden: &[(&str, &str)], inner: &str) -> String {
    let Viewer::SignedIn { csrf } = viewer else {
        return String::new();
    };
    let mut fields = format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(csrf)
    );
    for (k, v) in hidden {
        fields.push_str(&format!(
            "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
            esc(k),
            esc(v)
        ));
    }
    format!(
        "<form class=\"inline\" method=\"post\" action=\"{}\">{fields}{inner}</form>",
        esc(action)
    )
}

/// A queue name from a query or form, trimmed, then as every binary takes one
/// ([`llmq_shared::keys::queue_name`]).
fn queue_name(raw: Option<&str>) -> Result<String, String> {
    llmq_shared::keys::queue_name(raw.map_or("default", str::trim))
}

/// The queue a request names, or the 400 page to answer instead.
fn queue_in(raw: Option<&str>, viewer: &Viewer) -> Result<String, Box<Response>> {
    queue_name(raw).map_err(|why| {
        Box::new(message(
            StatusCode::BAD_REQUEST,
            "Not a queue",
            &why,
            viewer,
        ))
    })
}

/// An action's form: its fields and queue when it may act ([`auth::refused`]) and names a
/// queue; else the page to answer instead.
fn action(
    app: &App,
    headers: &axum::http::HeaderMap,
    body: &str,
    viewer: &Viewer,
) -> Result<(Form, String), Box<Response>> {
    let fields = form_fields(body);
    if let Some(no) = auth::refused(app, headers, &fields) {
        return Err(Box::new(no));
    }
    let queue = queue_in(field(&fields, "queue"), viewer)?;
    Ok((fields, queue))
}

/// Whether `id` is a stream entry id (`<ms>-<seq>`), as dead letters are named.
fn is_entry_id(id: &str) -> bool {
    id.split_once('-').is_some_and(|(ms, seq)| {
        !ms.is_empty()
            && !seq.is_empty()
            && ms.len() <= 20
            && seq.len() <= 20
            && ms.bytes().all(|b| b.is_ascii_digit())
            && seq.bytes().all(|b| b.is_ascii_digit())
    })
}

/// A form's fields, repeated names kept in order.
type Form = Vec<(String, String)>;

/// The fields of a form body.
fn form_fields(body: &str) -> Form {
    form_urlencoded::parse(body.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
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

    #[test]
    fn only_loopback_names_reach_a_loopback_server() {
        for ok in [
            "localhost:8080",
            "127.0.0.1:9000",
            "[::1]:8080",
            "LOCALHOST",
            "127.0.0.1",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "",
            "evil.example:8080",
            "127.0.0.1.evil.example",
            "[::2]:80",
            "localhost.evil",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }

    #[test]
    fn only_stream_ids_name_dead_letters() {
        assert!(is_entry_id("1700000000000-0"));
        for bad in ["", "-", "1-", "-1", "1-2-3", "+", "(1-0", "1-0 ", "a-1"] {
            assert!(!is_entry_id(bad), "{bad}");
        }
    }

    #[test]
    fn queue_names_cannot_escape_their_hash_tag() {
        assert_eq!(queue_name(None).unwrap(), "default");
        assert!(queue_name(Some("a}b")).is_err());
        assert!(queue_name(Some("")).is_err());
        assert!(queue_name(Some("a\nb")).is_err());
    }
}
