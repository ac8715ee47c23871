//! Tasks by state, searchable: `/tasks?queue=&state=&...`. Live states (ready, in flight,
//! delayed) come from Redis a bounded range at a time; finished ones (succeeded, failed, dead,
//! cancelled, or any) from the ledger's indexed rows ([`llmq_shared::history`]), filtered by
//! type, tenant, tag, model, error class, batch, time and the error's words.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use chrono::Utc;
use llmq_shared::history::{Cursor, FoundTask, Page, TaskFilter, TaskPage};
use llmq_shared::keys::QueueKeys;
use llmq_shared::queue::{LiveTask, now_ms};
use serde::Deserialize;

use super::{AppState, Viewer, esc, is_entry_id, message, page, queue_name, redis_away, urlencode};
use crate::render::usd;
use crate::workers::age;

/// Tasks one page lists.
const PAGE: usize = 50;

/// The states, live ones first, as the page's tabs name them.
const STATES: &[(&str, &str)] = &[
    ("ready", "Ready"),
    ("in_flight", "In flight"),
    ("delayed", "Delayed"),
    ("finished", "Finished"),
    ("succeeded", "Succeeded"),
    ("failed", "Failed"),
    ("dead", "Dead"),
    ("cancelled", "Cancelled"),
];

#[derive(Deserialize, Default, Clone)]
pub(super) struct TasksQuery {
    queue: Option<String>,
    state: Option<String>,
    #[serde(rename = "type")]
    task_type: Option<String>,
    tenant: Option<String>,
    /// `name=value`.
    tag: Option<String>,
    model: Option<String>,
    class: Option<String>,
    batch: Option<String>,
    /// Words of the error (finished), or of the prompt's start (live).
    q: Option<String>,
    since: Option<String>,
    until: Option<String>,
    /// Cursors: the page after (older) or before (newer) this edge.
    older: Option<String>,
    newer: Option<String>,
}

/// A query's value, trimmed; `None` when empty.
fn given(v: &Option<String>) -> Option<String> {
    super::given(v.as_deref()).map(str::to_owned)
}

impl TasksQuery {
    /// The link to this search with `state` and the cursors replaced.
    fn link(&self, state: &str, older: Option<&str>, newer: Option<&str>) -> String {
        let mut parts = vec![format!("state={}", urlencode(state))];
        let fields = [
            ("queue", &self.queue),
            ("type", &self.task_type),
            ("tenant", &self.tenant),
            ("tag", &self.tag),
            ("model", &self.model),
            ("class", &self.class),
            ("batch", &self.batch),
            ("q", &self.q),
            ("since", &self.since),
            ("until", &self.until),
        ];
        for (k, v) in fields {
            if let Some(v) = given(v) {
                parts.push(format!("{k}={}", urlencode(&v)));
            }
        }
        if let Some(o) = older {
            parts.push(format!("older={}", urlencode(o)));
        }
        if let Some(n) = newer {
            parts.push(format!("newer={}", urlencode(n)));
        }
        esc(&format!("/tasks?{}", parts.join("&")))
    }

    /// The ledger search this asks for; a sentence when a field cannot be read.
    fn filter(&self, status: Option<&str>) -> Result<TaskFilter, String> {
        let now = Utc::now();
        let since = super::form_time(self.since.as_deref(), false, "since")?
            .unwrap_or(now - chrono::Duration::hours(24));
        let until = super::form_time(self.until.as_deref(), true, "until")?.unwrap_or(now);
        if since >= until {
            return Err(format!(
                "The range starts ({since}) at or after it ends ({until})."
            ));
        }
        let tag = match given(&self.tag) {
            None => None,
            Some(t) => match t.split_once('=') {
                Some((k, v)) if !k.trim().is_empty() => {
                    Some((k.trim().to_owned(), v.trim().to_owned()))
                }
                _ => return Err("`tag` is a name and a value: team=search".into()),
            },
        };
        Ok(TaskFilter {
            queue: given(&self.queue),
            status: status.map(str::to_owned),
            task_type: given(&self.task_type),
            tenant: given(&self.tenant),
            tag,
            model: given(&self.model),
            error_class: given(&self.class),
            batch: given(&self.batch),
            text: given(&self.q),
            since,
            until,
        })
    }

    /// Whether a live task passes the filters the page can apply to it.
    fn passes(&self, t: &LiveTask) -> bool {
        let same = |want: &Option<String>, have: &Option<String>| {
            given(want).is_none_or(|w| have.as_deref() == Some(w.as_str()))
        };
        same(&self.task_type, &t.task_type)
            && same(&self.tenant, &t.tenant)
            && same(&self.model, &t.model)
            && given(&self.q).is_none_or(|w| t.prompt.to_lowercase().contains(&w.to_lowercase()))
    }
}

/// GET `/tasks`.
pub(super) async fn list(
    State(app): AppState,
    Query(q): Query<TasksQuery>,
    viewer: Viewer,
) -> Response {
    let state = given(&q.state).unwrap_or_else(|| "finished".into());
    let Some((_, title)) = STATES.iter().find(|(s, _)| *s == state) else {
        return message(
            StatusCode::BAD_REQUEST,
            "No such state",
            "A task's state is one of ready, in_flight, delayed, finished, succeeded, failed, \
             dead or cancelled.",
            &viewer,
        );
    };
    if let Some(raw) = given(&q.queue)
        && let Err(why) = queue_name(Some(&raw))
    {
        return message(StatusCode::BAD_REQUEST, "Not a queue", &why, &viewer);
    }
    let tabs: Vec<String> = STATES
        .iter()
        .map(|(s, name)| {
            let class = if *s == state { " class=\"here\"" } else { "" };
            format!("<a{class} href=\"{}\">{name}</a>", q.link(s, None, None))
        })
        .collect();
    let listed = match state.as_str() {
        "ready" | "in_flight" | "delayed" => live(&app, &q, &state, &viewer).await,
        finished => {
            let status = (finished != "finished").then_some(finished);
            ledgered(&app, &q, status, &viewer).await
        }
    };
    let listed = match listed {
        Ok(html) => html,
        Err(page) => return *page,
    };
    let body = format!(
        "{form}<nav class=\"tabs\">{tabs}</nav><div id=\"live\" data-refresh=\"10000\">{listed}</div>",
        form = search_form(&q, &state),
        tabs = tabs.join(""),
    );
    page(
        StatusCode::OK,
        &format!("Tasks: {}", title.to_lowercase()),
        &body,
        &viewer,
    )
}

fn search_form(q: &TasksQuery, state: &str) -> String {
    let field = super::search_field;
    format!(
        "<form class=\"search\" method=\"get\" action=\"/tasks\">\
         <input type=\"hidden\" name=\"state\" value=\"{}\">{}{}{}{}{}{}{}{}{}{}\
         <button>Search</button></form>",
        esc(state),
        field("queue", "Queue", &q.queue, "any"),
        field("q", "Text", &q.q, "words of the error or prompt"),
        field("type", "Type", &q.task_type, "code_review"),
        field("tenant", "Tenant", &q.tenant, ""),
        field("tag", "Tag", &q.tag, "team=search"),
        field("model", "Model", &q.model, ""),
        field("class", "Error class", &q.class, "fatal"),
        field("batch", "Batch", &q.batch, ""),
        field("since", "From", &q.since, "YYYY-MM-DD[THH:MM]"),
        field("until", "To", &q.until, "YYYY-MM-DD[THH:MM]"),
    )
}

/// The finished tasks a search finds in the ledger.
async fn ledgered(
    app: &super::App,
    q: &TasksQuery,
    status: Option<&str>,
    viewer: &Viewer,
) -> Result<String, Box<Response>> {
    let Some(ledger) = &app.web.ledger else {
        return Ok(
            "<p class=\"note\">Finished tasks come from the ledger: start <code>llmq \
                   web</code> with <code>--database-url</code> (or <code>DATABASE_URL</code>).</p>"
                .to_owned(),
        );
    };
    let bad = |why: String| {
        Box::new(message(
            StatusCode::BAD_REQUEST,
            "Not a search",
            &why,
            viewer,
        ))
    };
    let filter = q.filter(status).map_err(bad)?;
    let cursor = |raw: &Option<String>| given(raw).map(|c| Cursor::decode(&c).ok_or(()));
    let at = match (cursor(&q.older), cursor(&q.newer)) {
        (Some(Err(())), _) | (_, Some(Err(()))) => {
            return Err(bad("That page's cursor is not one this page made.".into()));
        }
        (Some(Ok(c)), _) => Page::Older(c),
        (_, Some(Ok(c))) => Page::Newer(c),
        _ => Page::Newest,
    };
    let found = ledger
        .find_tasks(&filter, at, PAGE as i64)
        .await
        .map_err(|e| {
            Box::new(message(
                StatusCode::SERVICE_UNAVAILABLE,
                "The ledger cannot be read",
                &e.to_string(),
                viewer,
            ))
        })?;
    Ok(finished_table(
        q,
        status.unwrap_or("finished"),
        &filter,
        &found,
    ))
}

fn finished_table(q: &TasksQuery, state: &str, f: &TaskFilter, found: &TaskPage) -> String {
    let rows: String = found.tasks.iter().map(finished_row).collect();
    let count = if found.more {
        format!("at least {}", found.count)
    } else {
        found.count.to_string()
    };
    let pager = pager(
        found.newer.map(|c| q.link(state, None, Some(&c.encode()))),
        found.older.map(|c| q.link(state, Some(&c.encode()), None)),
    );
    format!(
        "<p class=\"note\">{count} task(s) finished from {} to {} UTC match.</p>\
         <div class=\"scroll\"><table class=\"tasks\"><thead><tr><th>Finished</th><th>Task</th>\
         <th>Queue</th><th>Type</th><th>Status</th><th>Model</th><th>Tenant</th>\
         <th class=\"num\">Tokens in / out</th><th class=\"num\">Cost</th>\
         <th class=\"num\">Took</th><th>Error</th></tr></thead><tbody>{rows}</tbody></table>\
         </div>{pager}",
        f.since.format("%Y-%m-%d %H:%M"),
        f.until.format("%Y-%m-%d %H:%M"),
    )
}

fn finished_row(t: &FoundTask) -> String {
    let error = t.error.as_deref().map_or_else(String::new, |e| {
        format!(
            "{}{}",
            t.error_class
                .as_deref()
                .map_or_else(String::new, |c| format!("<b>{}</b>: ", esc(c))),
            esc(&crate::render::cut(e, 160))
        )
    });
    let model = match (&t.provider, &t.model) {
        (Some(p), Some(m)) => format!("{p}/{m}"),
        (None, Some(m)) => m.clone(),
        _ => String::new(),
    };
    format!(
        "<tr><td>{}</td><td><a href=\"/task?queue={}&amp;id={id}\"><code>{short}</code></a></td>\
         <td>{}</td><td>{}</td><td><span class=\"state {st}\">{st}</span></td><td>{}</td>\
         <td>{}</td><td class=\"num\">{} / {}</td><td class=\"num\">{}</td>\
         <td class=\"num\">{}</td><td>{error}</td></tr>",
        t.finished_at.format("%Y-%m-%d %H:%M:%S"),
        esc(&urlencode(&t.queue)),
        esc(&t.queue),
        esc(&t.task_type),
        esc(&model),
        esc(t.tenant.as_deref().unwrap_or("")),
        t.input_tokens,
        t.output_tokens,
        usd(t.cost_usd),
        t.duration_ms
            .map_or_else(String::new, |ms| format!("{:.1} s", ms as f64 / 1000.0)),
        id = t.task_id,
        short = &t.task_id.to_string()[..8],
        st = esc(&t.status),
    )
}

fn pager(newer: Option<String>, older: Option<String>) -> String {
    let link = |href: Option<String>, text: &str| {
        href.map_or_else(
            || format!("<span class=\"off\">{text}</span>"),
            |h| format!("<a href=\"{h}\">{text}</a>"),
        )
    };
    format!(
        "<p class=\"pager\">{} {}</p>",
        link(newer, "← Newer"),
        link(older, "Older →")
    )
}

/// The live tasks of one queue in `state`, a page from its cursor.
async fn live(
    app: &super::App,
    q: &TasksQuery,
    state: &str,
    viewer: &Viewer,
) -> Result<String, Box<Response>> {
    let Some(queue) = given(&q.queue) else {
        return Ok("<p>Live tasks are a queue's: name one above.</p>".to_owned());
    };
    let keys = QueueKeys::new(&queue);
    let redis = &app.web.redis;
    let after = given(&q.older);
    let bad = || {
        Box::new(message(
            StatusCode::BAD_REQUEST,
            "Not a search",
            "That page's cursor is not one this page made.",
            viewer,
        ))
    };
    let away = |e: llmq_shared::queue::Error| Box::new(redis_away(&e, viewer));
    let (tasks, next, room) = match state {
        "ready" => {
            if after.as_deref().is_some_and(|a| !is_entry_id(a)) {
                return Err(bad());
            }
            let (tasks, next) = redis
                .ready_tasks(&keys, after.as_deref(), PAGE)
                .await
                .map_err(away)?;
            let room = if after.is_none() {
                redis.room_tasks(&keys, 10, 20).await.map_err(away)?
            } else {
                Vec::new()
            };
            (tasks, next, room)
        }
        "in_flight" => {
            if after.as_deref().is_some_and(|a| !is_entry_id(a)) {
                return Err(bad());
            }
            let (tasks, next) = redis
                .in_flight_tasks(&keys, after.as_deref(), PAGE)
                .await
                .map_err(away)?;
            (tasks, next, Vec::new())
        }
        _ => {
            let from = match after.as_deref().map(str::parse::<usize>) {
                None => 0,
                Some(Ok(n)) => n,
                Some(Err(_)) => return Err(bad()),
            };
            let (tasks, next) = redis.delayed_tasks(&keys, from, PAGE).await.map_err(away)?;
            (tasks, next.map(|n| n.to_string()), Vec::new())
        }
    };
    let counts = redis.counts(&keys).await.map_err(away)?;
    let now = now_ms();
    let shown: Vec<&LiveTask> = tasks.iter().filter(|t| q.passes(t)).collect();
    let rows: String = shown
        .iter()
        .map(|t| live_row(&queue, t, state, now))
        .collect();
    let room_rows: String = room
        .iter()
        .filter(|t| q.passes(t))
        .map(|t| live_row(&queue, t, "room", now))
        .collect();
    let total = match state {
        "ready" => counts.ready,
        "in_flight" => counts.in_flight,
        _ => counts.delayed,
    };
    let filtered = if shown.len() < tasks.len() {
        format!(
            " ({} of this page's {} pass the filters)",
            shown.len(),
            tasks.len()
        )
    } else {
        String::new()
    };
    let room_part = if room_rows.is_empty() {
        String::new()
    } else {
        format!(
            "<h2>Waiting their turn in the room</h2><p class=\"note\">Tasks with a priority or \
             a tenant wait here and reach the stream in turn: the busiest tenants' next 20.</p>\
             <div class=\"scroll\"><table class=\"tasks\">{}<tbody>{room_rows}</tbody></table></div>",
            live_head("room")
        )
    };
    let pager = pager(
        after.as_ref().map(|_| q.link(state, None, None)),
        next.map(|n| q.link(state, Some(&n), None)),
    );
    Ok(format!(
        "<p class=\"note\">{total} task(s) {what} in {queue}{filtered}.</p>\
         <div class=\"scroll\"><table class=\"tasks\">{head}<tbody>{rows}</tbody></table></div>\
         {pager}{room_part}",
        what = match state {
            "ready" => "ready",
            "in_flight" => "in flight",
            _ => "delayed",
        },
        queue = esc(&queue),
        head = live_head(state),
    ))
}

fn live_head(state: &str) -> String {
    let when = match state {
        "delayed" => "Due",
        "room" => "",
        _ => "Enqueued",
    };
    let held = if state == "in_flight" {
        "<th>Worker</th><th class=\"num\">Held</th><th class=\"num\">Deliveries</th>"
    } else {
        ""
    };
    format!(
        "<thead><tr><th>{when}</th><th>Task</th><th>Type</th><th>Model</th><th>Tenant</th>\
         <th class=\"num\">Priority</th>{held}<th>Prompt</th></tr></thead>"
    )
}

fn live_row(queue: &str, t: &LiveTask, state: &str, now: i64) -> String {
    let when = match state {
        "room" => String::new(),
        "delayed" => {
            let left = t.at_ms - now;
            format!("{} (in {})", super::when_ms(t.at_ms), age(left))
        }
        _ => format!("{} ago", age(now - t.at_ms)),
    };
    let task = t.task_id.map_or_else(
        || "<span class=\"note\">(no id yet)</span>".to_owned(),
        |id| {
            format!(
                "<a href=\"/task?queue={}&amp;id={id}\"><code>{}</code></a>",
                esc(&urlencode(queue)),
                &id.to_string()[..8]
            )
        },
    );
    let held = if state == "in_flight" {
        format!(
            "<td><a href=\"/workers\">{}</a></td><td class=\"num\">{}</td><td class=\"num\">{}</td>",
            esc(t.worker.as_deref().unwrap_or("")),
            t.idle_ms
                .map_or_else(String::new, |ms| age(i64::try_from(ms).unwrap_or(i64::MAX))),
            t.deliveries.unwrap_or(0)
        )
    } else {
        String::new()
    };
    let opt = |v: &Option<String>| esc(v.as_deref().unwrap_or(""));
    format!(
        "<tr><td>{when}</td><td>{task}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}\
         </td>{held}<td class=\"prompt\">{}</td></tr>",
        opt(&t.task_type),
        opt(&t.model),
        opt(&t.tenant),
        t.priority.map_or_else(String::new, |p| p.to_string()),
        esc(&crate::render::cut(&t.prompt, 120)),
    )
}
