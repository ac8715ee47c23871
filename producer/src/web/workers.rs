//! The workers page: every worker process of the fleet, what each holds now and for how long,
//! the circuits the fleet shares, and draining a worker (it takes nothing new and finishes
//! what it holds).

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use llmq_shared::keys::QueueKeys;
use llmq_shared::queue::{HeldTask, SeenWorker, now_ms};
use serde::Deserialize;

use super::auth::{done, refused};
use super::{
    AppState, Viewer, action_form, esc, field, form_fields, message, page, queue_name, redis_away,
    urlencode,
};
use crate::workers::{age, state};

/// Held tasks read per queue, oldest first (each a read of its entry); the rest are counted in
/// each worker's row.
const HELD_SHOWN: usize = 50;

#[derive(Deserialize)]
pub(super) struct WorkersQuery {
    queue: Option<String>,
}

/// GET `/workers?queue=`: the fleet, or the workers of one queue.
pub(super) async fn list(
    State(app): AppState,
    Query(q): Query<WorkersQuery>,
    viewer: Viewer,
) -> Response {
    let only = match q.queue.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        None => None,
        Some(raw) => match queue_name(Some(raw)) {
            Ok(name) => Some(name),
            Err(why) => return message(StatusCode::BAD_REQUEST, "Not a queue", &why, &viewer),
        },
    };
    let redis = &app.web.redis;
    let mut fleet = match redis.fleet().await {
        Ok(f) => f,
        Err(e) => return redis_away(&e, &viewer),
    };
    if let Some(only) = &only {
        fleet.retain(|w| w.info.as_ref().is_some_and(|i| i.queues.contains(only)));
    }
    let mut queues: Vec<String> = fleet
        .iter()
        .filter_map(|w| w.info.as_ref())
        .flat_map(|i| i.queues.iter().cloned())
        .collect();
    queues.sort();
    queues.dedup();
    let mut held: HashMap<String, Vec<HeldTask>> = HashMap::new();
    for name in &queues {
        match redis.held(&QueueKeys::new(name), None, HELD_SHOWN).await {
            Ok(tasks) => {
                for t in tasks {
                    held.entry(t.worker.clone()).or_default().push(t);
                }
            }
            Err(e) => return redis_away(&e, &viewer),
        }
    }
    let now = now_ms();
    let mut rows = String::new();
    for w in &fleet {
        rows.push_str(&worker_row(
            w,
            held.get(&w.id).map_or(&[][..], Vec::as_slice),
            now,
            &viewer,
        ));
    }
    // Workers gone from the registry whose tasks nobody has taken over yet.
    for (who, tasks) in &held {
        if !fleet.iter().any(|w| &w.id == who) {
            rows.push_str(&format!(
                "<tr class=\"silent\"><td>{}</td><td><span class=\"state silent\">gone</span></td>\
                 <td colspan=\"6\">no heartbeat within the hour; holds:</td><td>{}</td></tr>",
                esc(who),
                held_list(tasks)
            ));
        }
    }
    let circuits = circuits_section(&app).await;
    let title = only
        .as_ref()
        .map_or_else(|| "Workers".to_owned(), |q| format!("Workers of {q}"));
    let body = format!(
        "<form method=\"get\" action=\"/workers\"><label>Queue <input name=\"queue\" \
         value=\"{}\" placeholder=\"any\"></label> <button>Show</button></form>\
         <div id=\"live\" data-refresh=\"5000\"><p class=\"note\">{} worker(s) heard from \
         within the hour. A worker beats every 5 s; one silent for 15 s is shown as such until \
         its tasks are taken over. A drained worker takes no new task and finishes those it \
         holds.</p><div class=\"scroll\"><table id=\"workers\"><thead><tr><th>Worker</th>\
         <th>State</th><th>Host</th><th>Queues</th><th>Version</th><th class=\"num\">Held / \
         slots</th><th class=\"num\">Calls</th><th>Heartbeat</th><th>Tasks held (age)</th>\
         </tr></thead><tbody>{rows}</tbody></table></div>{circuits}</div>",
        esc(only.as_deref().unwrap_or("")),
        fleet.len(),
    );
    page(StatusCode::OK, &title, &body, &viewer)
}

fn worker_row(w: &SeenWorker, held: &[HeldTask], now: i64, viewer: &Viewer) -> String {
    let st = state(w);
    let button = if w.drain.is_some() {
        action_form(
            viewer,
            "/workers/resume",
            &[("id", &w.id)],
            "<button>Resume</button>",
        )
    } else if w.live {
        action_form(
            viewer,
            "/workers/drain",
            &[("id", &w.id)],
            "<button data-confirm=\"Drain this worker? It takes no new task and finishes those it holds.\">Drain</button>",
        )
    } else {
        String::new()
    };
    let (host, queues, version, slots, calls, up) =
        w.info.as_ref().map_or_else(Default::default, |i| {
            let queues: Vec<String> = i
                .queues
                .iter()
                .map(|q| {
                    format!(
                        "<a href=\"/workers?queue={}\">{}</a>",
                        esc(&urlencode(q)),
                        esc(q)
                    )
                })
                .collect();
            (
                esc(&i.host),
                queues.join(", "),
                esc(&i.version),
                format!("{} / {}", i.busy, i.concurrency),
                i.calls.to_string(),
                format!("up {}", age(now - i.started_ms)),
            )
        });
    format!(
        "<tr data-worker=\"{id}\"><td><code>{id}</code></td><td><span class=\"state {st}\">{st}\
         </span> {button}</td><td>{host}</td><td>{queues}</td><td>{version}</td>\
         <td class=\"num\">{slots}</td><td class=\"num\">{calls}</td><td>{beat} ago<br>\
         <span class=\"note\">{up}</span></td><td>{held}</td></tr>",
        id = esc(&w.id),
        beat = age(now - w.beat_ms),
        held = held_list(held),
    )
}

fn held_list(held: &[HeldTask]) -> String {
    if held.is_empty() {
        return String::new();
    }
    let items: Vec<String> = held
        .iter()
        .map(|t| {
            let what = t.task_type.as_deref().unwrap_or("task");
            let link = t.task_id.map_or_else(
                || esc(&t.entry_id),
                |id| {
                    format!(
                        "<a href=\"/task?queue={}&amp;id={id}\">{}</a>",
                        esc(&urlencode(&t.queue)),
                        esc(what)
                    )
                },
            );
            let again = if t.deliveries > 1 {
                format!(", delivery {}", t.deliveries)
            } else {
                String::new()
            };
            format!(
                "<li>{link} {}{again}</li>",
                age(i64::try_from(t.idle_ms).unwrap_or(i64::MAX))
            )
        })
        .collect();
    format!("<ul class=\"held\">{}</ul>", items.join(""))
}

/// The circuits every worker shares (they live in Redis): those open now.
async fn circuits_section(app: &super::App) -> String {
    let Some(config) = &app.web.config else {
        return String::new();
    };
    let circuits = llmq_shared::circuit::Circuits::new(app.web.redis.clone(), "llmq web");
    let pairs: Vec<(String, Vec<String>)> = config
        .providers
        .iter()
        .map(|p| {
            (
                p.name.to_string(),
                p.models.iter().map(|m| m.id.to_string()).collect(),
            )
        })
        .collect();
    match circuits.open(&pairs).await {
        Ok(open) if open.is_empty() => {
            "<h2>Circuits</h2><p>Every provider's and model's circuit is closed: every worker \
             calls them.</p>"
                .to_owned()
        }
        Ok(open) => {
            let items: Vec<String> = open
                .iter()
                .map(|o| format!("<li>{}</li>", esc(&o.describe())))
                .collect();
            format!(
                "<h2>Circuits</h2><p class=\"note\">Shared by every worker: an open one is \
                 skipped by all until it cools down.</p><ul>{}</ul>",
                items.join("")
            )
        }
        Err(e) => format!(
            "<h2>Circuits</h2><p>Cannot read them: {}</p>",
            esc(&e.to_string())
        ),
    }
}

/// POST `/workers/drain` and `/workers/resume`.
async fn drain_or_resume(
    app: &super::App,
    headers: &HeaderMap,
    body: &str,
    drain: bool,
) -> Response {
    let viewer = app.sessions.viewer(headers);
    let fields = form_fields(body);
    if let Some(no) = refused(app, headers, &fields) {
        return no;
    }
    let Some(id) = field(&fields, "id")
        .map(str::trim)
        .filter(|id| !id.is_empty())
    else {
        return message(
            StatusCode::BAD_REQUEST,
            "No worker",
            "Name a worker by its id.",
            &viewer,
        );
    };
    match app.web.redis.drain_worker(id, "llmq web", drain).await {
        Ok(true) => {
            tracing::info!(worker = id, drain, "asked from llmq web");
            let what = if drain {
                format!(
                    "Worker {id} drains: it takes no new task within 5 s and finishes those it holds."
                )
            } else {
                format!("Worker {id} takes tasks again within 5 s.")
            };
            done(
                if drain { "Draining" } else { "Resumed" },
                &what,
                "/workers",
                &viewer,
            )
        }
        Ok(false) => message(
            StatusCode::NOT_FOUND,
            "No such worker",
            "No worker of that id was heard from within the hour.",
            &viewer,
        ),
        Err(e) => redis_away(&e, &viewer),
    }
}

pub(super) async fn drain(State(app): AppState, headers: HeaderMap, body: String) -> Response {
    drain_or_resume(&app, &headers, &body, true).await
}

pub(super) async fn resume(State(app): AppState, headers: HeaderMap, body: String) -> Response {
    drain_or_resume(&app, &headers, &body, false).await
}
