//! Dead letters: a queue's, newest first in pages (cursor: the last entry's id); one shown
//! whole; replay and purge of one, the selected, or all of a queue (in bounded rounds).

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use llmq_shared::keys::QueueKeys;
use llmq_shared::queue::{DeadLetter, Replayed};
use serde::Deserialize;

use super::auth::done;
use super::{
    AppState, Viewer, action, action_form, esc, field, is_entry_id, message, page, queue_in,
    redis_away, urlencode,
};

/// How many dead letters one page lists.
const DEAD_PAGE: usize = 50;
/// How many dead letters one "all" action handles; the page says what is left.
const ALL_ROUND: usize = 5000;

#[derive(Deserialize)]
pub(super) struct DeadQuery {
    queue: Option<String>,
    /// The cursor: the id of the last dead letter of the previous page.
    before: Option<String>,
    id: Option<String>,
}

fn row(d: &DeadLetter, queue_u: &str, viewer: &Viewer) -> String {
    let pick = match viewer {
        Viewer::SignedIn { .. } => format!(
            "<td><input type=\"checkbox\" name=\"id\" value=\"{}\" form=\"selected\"></td>",
            esc(&d.id)
        ),
        _ => String::new(),
    };
    format!(
        "<tr data-dead=\"{id}\">{pick}<td><a href=\"/dead/show?queue={queue_u}&amp;id={id}\">{id}</a>\
         </td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><pre>{}</pre></td></tr>",
        esc(&d.task_id.to_string()),
        esc(&d.class),
        d.attempts,
        esc(&d.error),
        esc(&llmq_shared::text::excerpt(&d.task, 400)),
        id = esc(&d.id),
    )
}

pub(super) async fn list(
    State(app): AppState,
    viewer: Viewer,
    Query(q): Query<DeadQuery>,
) -> Response {
    let queue = match queue_in(q.queue.as_deref(), &viewer) {
        Ok(q) => q,
        Err(page) => return *page,
    };
    let before = q.before.as_deref().filter(|b| !b.is_empty());
    if before.is_some_and(|b| !is_entry_id(b)) {
        return message(
            StatusCode::BAD_REQUEST,
            "Not a page cursor",
            "The `before` parameter is a dead letter's id, such as 1700000000000-0.",
            &viewer,
        );
    }
    let keys = QueueKeys::new(&queue);
    let letters = match app
        .web
        .redis
        .dead_letters_before(&keys, before, DEAD_PAGE)
        .await
    {
        Ok(l) => l,
        Err(e) => return redis_away(&e, &viewer),
    };
    let u = esc(&urlencode(&queue));
    let rows: String = letters.iter().map(|d| row(d, &u, &viewer)).collect();
    let older = match letters.last() {
        Some(last) if letters.len() == DEAD_PAGE => format!(
            "<p><a id=\"older\" href=\"/dead?queue={u}&amp;before={}\">Older</a></p>",
            esc(&last.id)
        ),
        _ => String::new(),
    };
    let signed_in = matches!(viewer, Viewer::SignedIn { .. });
    let actions = if signed_in && !letters.is_empty() {
        let selected = action_form(
            &viewer,
            "/dead/replay",
            &[("queue", &queue)],
            "<button>Replay selected</button> \
             <button formaction=\"/dead/purge\">Purge selected</button>",
        )
        .replacen("<form ", "<form id=\"selected\" ", 1);
        let all = action_form(
            &viewer,
            "/dead/replay",
            &[("queue", &queue), ("all", "1")],
            "<label><input type=\"checkbox\" name=\"confirm\" value=\"1\" required> all of \
             this queue's dead letters</label> <button>Replay all</button> \
             <button formaction=\"/dead/purge\">Purge all</button>",
        );
        format!("<p>{selected}</p><p>{all}</p>")
    } else {
        String::new()
    };
    let pick_head = if signed_in { "<th></th>" } else { "" };
    let body = if letters.is_empty() {
        "<p>No dead letters here.</p>".to_owned()
    } else {
        format!(
            "{actions}<table id=\"dead\"><tr>{pick_head}<th>Dead letter</th><th>Task</th>\
             <th>Class</th><th>Attempts</th><th>Error</th><th>Task as it died</th></tr>{rows}\
             </table>{older}"
        )
    };
    page(
        StatusCode::OK,
        &format!("Dead letters of {queue}"),
        &body,
        &viewer,
    )
}

pub(super) async fn show(
    State(app): AppState,
    viewer: Viewer,
    Query(q): Query<DeadQuery>,
) -> Response {
    let queue = match queue_in(q.queue.as_deref(), &viewer) {
        Ok(q) => q,
        Err(page) => return *page,
    };
    let id = q.id.unwrap_or_default();
    if !is_entry_id(&id) {
        return message(
            StatusCode::BAD_REQUEST,
            "Not a dead letter id",
            "A dead letter's id looks like 1700000000000-0, as the dead letters page lists it.",
            &viewer,
        );
    }
    let keys = QueueKeys::new(&queue);
    let found = match app
        .web
        .redis
        .dead_letters_at(&keys, std::slice::from_ref(&id))
        .await
    {
        Ok(f) => f,
        Err(e) => return redis_away(&e, &viewer),
    };
    let Some(d) = found.first() else {
        return message(
            StatusCode::NOT_FOUND,
            "No such dead letter",
            &format!("Queue {queue} has no dead letter {id}: it was replayed, purged or archived."),
            &viewer,
        );
    };
    let failed = d
        .failed_at
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default();
    let act = action_form(
        &viewer,
        "/dead/replay",
        &[("queue", &queue), ("id", &d.id)],
        "<button>Replay</button> <button formaction=\"/dead/purge\">Purge</button>",
    );
    let body = format!(
        "<table><tr><th>Task</th><td>{}</td></tr><tr><th>Class</th><td>{}</td></tr>\
         <tr><th>Attempts</th><td>{}</td></tr><tr><th>Failed at</th><td>{failed}</td></tr>\
         <tr><th>Error</th><td>{}</td></tr></table><p>{act}</p><h2>Task as it died</h2>\
         <pre>{}</pre>",
        esc(&d.task_id.to_string()),
        esc(&d.class),
        d.attempts,
        esc(&d.error),
        esc(&d.task),
    );
    page(StatusCode::OK, &format!("Dead letter {id}"), &body, &viewer)
}

/// The dead letters an action names: the selected ids, or a round of all of the queue.
/// `Err` is the page to answer instead.
async fn chosen(
    app: &super::App,
    keys: &QueueKeys,
    fields: &[(String, String)],
    viewer: &Viewer,
) -> Result<(Vec<DeadLetter>, bool), Response> {
    if field(fields, "all") == Some("1") {
        if field(fields, "confirm") != Some("1") {
            return Err(message(
                StatusCode::BAD_REQUEST,
                "Confirm first",
                "Tick the box that says you mean all of this queue's dead letters.",
                viewer,
            ));
        }
        return match app.web.redis.dead_letters(keys, ALL_ROUND).await {
            Ok(d) => Ok((d, true)),
            Err(e) => Err(redis_away(&e, viewer)),
        };
    }
    let ids: Vec<String> = fields
        .iter()
        .filter(|(k, _)| k == "id")
        .map(|(_, v)| v.trim().to_owned())
        .collect();
    if ids.is_empty() {
        return Err(message(
            StatusCode::BAD_REQUEST,
            "Nothing selected",
            "Select the dead letters to act on first.",
            viewer,
        ));
    }
    if let Some(bad) = ids.iter().find(|i| !is_entry_id(i)) {
        return Err(message(
            StatusCode::BAD_REQUEST,
            "Not a dead letter id",
            &format!("`{bad}` is not a dead letter's id (such as 1700000000000-0)."),
            viewer,
        ));
    }
    if ids.len() > ALL_ROUND {
        return Err(message(
            StatusCode::BAD_REQUEST,
            "Too many at once",
            &format!("Select at most {ALL_ROUND} dead letters at once."),
            viewer,
        ));
    }
    match app.web.redis.dead_letters_at(keys, &ids).await {
        Ok(d) if d.is_empty() => Err(message(
            StatusCode::NOT_FOUND,
            "No such dead letter",
            "None of the selected dead letters is there any more: replayed, purged or archived.",
            viewer,
        )),
        Ok(d) => Ok((d, false)),
        Err(e) => Err(redis_away(&e, viewer)),
    }
}

/// What is left after a round of "all".
async fn left(app: &super::App, keys: &QueueKeys, all: bool) -> String {
    if !all {
        return String::new();
    }
    match app.web.redis.counts(keys).await {
        Ok(c) if c.dead > 0 => format!(
            " {} remain: press the button again for the next round.",
            c.dead
        ),
        _ => String::new(),
    }
}

pub(super) async fn replay(
    State(app): AppState,
    viewer: Viewer,
    headers: HeaderMap,
    body: String,
) -> Response {
    act(&app, &viewer, &headers, &body, true).await
}

pub(super) async fn purge(
    State(app): AppState,
    viewer: Viewer,
    headers: HeaderMap,
    body: String,
) -> Response {
    act(&app, &viewer, &headers, &body, false).await
}

/// Replays (or purges) the dead letters the form names.
async fn act(
    app: &super::App,
    viewer: &Viewer,
    headers: &HeaderMap,
    body: &str,
    replay: bool,
) -> Response {
    let (fields, queue) = match action(app, headers, body, viewer) {
        Ok(x) => x,
        Err(page) => return *page,
    };
    let keys = QueueKeys::new(&queue);
    let (dead, all) = match chosen(app, &keys, &fields, viewer).await {
        Ok(d) => d,
        Err(page) => return page,
    };
    let back = format!("/dead?queue={}", urlencode(&queue));
    if !replay {
        let purged = match app.web.redis.purge(&keys, &dead).await {
            Ok(n) => n,
            Err(e) => return redis_away(&e, viewer),
        };
        let what = format!(
            "Purged {purged} dead letter(s) from queue {queue}.{}",
            left(app, &keys, all).await
        );
        return done("Purged", &what, &back, viewer);
    }
    let (mut replayed, mut notes) = (0usize, Vec::new());
    for d in &dead {
        match app.web.redis.replay(&keys, d, None).await {
            Ok(Replayed::Enqueued) => replayed += 1,
            Ok(Replayed::Gone) => {}
            Ok(Replayed::Resumed(steps)) => {
                replayed += 1;
                notes.push(format!(
                    "dead letter {}: its chain runs {} again",
                    d.id,
                    steps.join(", ")
                ));
            }
            Ok(Replayed::Refused(why)) => notes.push(format!("dead letter {}: {why}", d.id)),
            Err(e) => return redis_away(&e, viewer),
        }
    }
    let mut what = format!("Replayed {replayed} dead letter(s) to queue {queue}.");
    for n in notes.iter().take(20) {
        what.push(' ');
        what.push_str(n);
        what.push('.');
    }
    what.push_str(&left(app, &keys, all).await);
    done("Replayed", &what, &back, viewer)
}
