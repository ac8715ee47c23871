//! Dead letters: a queue's, newest first in pages (cursor: the last entry's id); one shown
//! whole; replay and purge of one, the selected, or all of a queue (in bounded rounds).

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use llmq_shared::keys::QueueKeys;
use llmq_shared::queue::{DeadLetter, Replayed};
use serde::Deserialize;

use super::auth::done;
use super::dead_work::{self, DeadFilter};
use super::{
    AppState, Viewer, action, action_form, esc, field, form_time, given, is_entry_id, message,
    page, queue_in, redis_away, urlencode,
};

/// How many dead letters one page lists.
const DEAD_PAGE: usize = 50;
/// How many dead letters may be selected at once.
const MAX_SELECTED: usize = 5000;

#[derive(Deserialize, Default)]
pub(super) struct DeadQuery {
    queue: Option<String>,
    /// The cursor: the id of the last dead letter the previous page looked at.
    before: Option<String>,
    id: Option<String>,
    class: Option<String>,
    q: Option<String>,
    provider: Option<String>,
    model: Option<String>,
    #[serde(rename = "type")]
    task_type: Option<String>,
    tenant: Option<String>,
    since: Option<String>,
    until: Option<String>,
    /// `1`: search the letters the scheduler archived to Postgres.
    archived: Option<String>,
}

/// The filter a query or a form asks for.
fn filter_of(get: impl Fn(&str) -> Option<String>) -> Result<DeadFilter, String> {
    Ok(DeadFilter {
        class: given(get("class").as_deref()).map(str::to_owned),
        text: given(get("q").as_deref()).map(str::to_owned),
        provider: given(get("provider").as_deref()).map(str::to_owned),
        model: given(get("model").as_deref()).map(str::to_owned),
        task_type: given(get("type").as_deref()).map(str::to_owned),
        tenant: given(get("tenant").as_deref()).map(str::to_owned),
        since_ms: form_time(get("since").as_deref(), false, "since")?.map(|t| t.timestamp_millis()),
        until_ms: form_time(get("until").as_deref(), true, "until")?.map(|t| t.timestamp_millis()),
    })
}

impl DeadQuery {
    fn filter(&self) -> Result<DeadFilter, String> {
        filter_of(|k| {
            match k {
                "class" => &self.class,
                "q" => &self.q,
                "provider" => &self.provider,
                "model" => &self.model,
                "type" => &self.task_type,
                "tenant" => &self.tenant,
                "since" => &self.since,
                "until" => &self.until,
                _ => &None,
            }
            .clone()
        })
    }

    /// This search's fields as a query string (no cursor), escaped for an attribute.
    fn query(&self, queue: &str) -> String {
        let mut parts = vec![format!("queue={}", urlencode(queue))];
        for (k, v) in [
            ("class", &self.class),
            ("q", &self.q),
            ("provider", &self.provider),
            ("model", &self.model),
            ("type", &self.task_type),
            ("tenant", &self.tenant),
            ("since", &self.since),
            ("until", &self.until),
        ] {
            if let Some(v) = given(v.as_deref()) {
                parts.push(format!("{k}={}", urlencode(v)));
            }
        }
        esc(&parts.join("&"))
    }
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
         </td><td><a href=\"/task?queue={queue_u}&amp;id={task}\">{task}</a></td><td>{}</td>\
         <td class=\"num\">{}</td><td>{}</td><td><pre>{}</pre></td></tr>",
        esc(&d.class),
        d.attempts,
        esc(&d.error),
        esc(&llmq_shared::text::excerpt(&d.task, 400)),
        id = esc(&d.id),
        task = esc(&d.task_id.to_string()),
    )
}

fn search_form(q: &DeadQuery, queue: &str) -> String {
    let field = super::search_field;
    let archived = if q.archived.as_deref() == Some("1") {
        " checked"
    } else {
        ""
    };
    format!(
        "<form class=\"search\" method=\"get\" action=\"/dead\">\
         <input type=\"hidden\" name=\"queue\" value=\"{}\">{}{}{}{}{}{}{}{}\
         <label><input type=\"checkbox\" name=\"archived\" value=\"1\"{archived}> archived \
         (Postgres)</label> <button>Search</button></form>",
        esc(queue),
        field("q", "Error", &q.q, "words of the error"),
        field("class", "Class", &q.class, "fatal"),
        field("provider", "Provider", &q.provider, ""),
        field("model", "Model", &q.model, ""),
        field("type", "Type", &q.task_type, ""),
        field("tenant", "Tenant", &q.tenant, ""),
        field("since", "From", &q.since, "YYYY-MM-DD[THH:MM]"),
        field("until", "To", &q.until, "YYYY-MM-DD[THH:MM]"),
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
    let filter = match q.filter() {
        Ok(f) => f,
        Err(why) => return message(StatusCode::BAD_REQUEST, "Not a search", &why, &viewer),
    };
    let form = search_form(&q, &queue);
    if q.archived.as_deref() == Some("1") {
        let body = match archived(&app, &queue, &filter).await {
            Ok(b) => b,
            Err(e) => {
                return message(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "The ledger cannot be read",
                    &e,
                    &viewer,
                );
            }
        };
        return page(
            StatusCode::OK,
            &format!("Archived dead letters of {queue}"),
            &format!("{form}{body}"),
            &viewer,
        );
    }
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
    let redis = &app.web.redis;
    let found = match dead_work::scan(
        redis,
        &keys,
        &filter,
        before,
        DEAD_PAGE,
        dead_work::SCAN_BUDGET,
    )
    .await
    {
        Ok(s) => s,
        Err(e) => return redis_away(&e, &viewer),
    };
    let u = esc(&urlencode(&queue));
    let query = q.query(&queue);
    let rows: String = found.letters.iter().map(|d| row(d, &u, &viewer)).collect();
    let older = found.next.as_ref().map_or_else(String::new, |next| {
        format!(
            "<p class=\"pager\"><a href=\"/dead?{query}\">Newest</a> \
             <a id=\"older\" href=\"/dead?{query}&amp;before={}\">Older →</a></p>",
            esc(next)
        )
    });
    let groups = if before.is_none() {
        match groups_section(redis, &keys, &filter, &query).await {
            Ok(g) => g,
            Err(e) => return redis_away(&e, &viewer),
        }
    } else {
        String::new()
    };
    let actions = actions(&app, &viewer, &queue, &q, &found);
    let looked = if filter.is_empty() {
        String::new()
    } else {
        format!(
            "<p class=\"note\">{} of the {} letters looked at match{}.</p>",
            found.letters.len(),
            found.scanned,
            if found.next.is_some() {
                " (Older looks further)"
            } else {
                ""
            }
        )
    };
    let pick_head = if matches!(viewer, Viewer::SignedIn { .. }) {
        "<th></th>"
    } else {
        ""
    };
    let table = if found.letters.is_empty() {
        "<p>No dead letters here match.</p>".to_owned()
    } else {
        format!(
            "<div class=\"scroll\"><table id=\"dead\"><thead><tr>{pick_head}<th>Dead letter</th>\
             <th>Task</th><th>Class</th><th class=\"num\">Attempts</th><th>Error</th>\
             <th>Task as it died</th></tr></thead><tbody>{rows}</tbody></table></div>"
        )
    };
    let body = format!("{form}{groups}{actions}{looked}{table}{older}");
    page(
        StatusCode::OK,
        &format!("Dead letters of {queue}"),
        &body,
        &viewer,
    )
}

/// The newest letters' errors by group, each a link to its letters.
async fn groups_section(
    redis: &llmq_shared::queue::Client,
    keys: &QueueKeys,
    filter: &DeadFilter,
    query: &str,
) -> llmq_shared::queue::Result<String> {
    let seen = dead_work::scan(
        redis,
        keys,
        filter,
        None,
        dead_work::SCAN_BUDGET,
        dead_work::SCAN_BUDGET,
    )
    .await?;
    let groups = dead_work::groups(&seen.letters);
    if groups.len() < 2 {
        return Ok(String::new());
    }
    let rows: String = groups
        .iter()
        .take(15)
        .map(|(g, class, n)| {
            format!(
                "<tr><td class=\"num\">{n}</td><td>{}</td><td><a href=\"/dead?{query}&amp;class={}&amp;q={}\">{}</a></td></tr>",
                esc(class),
                esc(&urlencode(class)),
                esc(&urlencode(&dead_work::group_words(g))),
                esc(g)
            )
        })
        .collect();
    Ok(format!(
        "<details open><summary>By error, of the newest {} matching</summary><table>\
         <thead><tr><th class=\"num\">Letters</th><th>Class</th><th>Error (numbers as #)</th>\
         </tr></thead><tbody>{rows}</tbody></table></details>",
        seen.letters.len()
    ))
}

/// The actions of a signed-in viewer: the selected, and everything that matches in the
/// background; and the jobs under way.
fn actions(
    app: &super::App,
    viewer: &Viewer,
    queue: &str,
    q: &DeadQuery,
    found: &dead_work::Scan,
) -> String {
    let jobs = jobs_section(app, queue);
    if !matches!(viewer, Viewer::SignedIn { .. }) {
        return jobs;
    }
    let selected = if found.letters.is_empty() {
        String::new()
    } else {
        action_form(
            viewer,
            "/dead/replay",
            &[("queue", queue)],
            "<button>Replay selected</button> \
             <button formaction=\"/dead/purge\">Purge selected</button>",
        )
        .replacen("<form ", "<form id=\"selected\" ", 1)
    };
    let mut hidden: Vec<(&str, &str)> = vec![("queue", queue), ("all", "1")];
    let fields = [
        ("class", &q.class),
        ("q", &q.q),
        ("provider", &q.provider),
        ("model", &q.model),
        ("type", &q.task_type),
        ("tenant", &q.tenant),
        ("since", &q.since),
        ("until", &q.until),
    ];
    for (k, v) in &fields {
        if let Some(v) = v.as_deref().filter(|v| !v.trim().is_empty()) {
            hidden.push((k, v));
        }
    }
    let all = action_form(
        viewer,
        "/dead/replay",
        &hidden,
        "<label><input type=\"checkbox\" name=\"confirm\" value=\"1\" required> every dead \
         letter of this queue that matches the search</label> <button>Replay all that match</button> \
         <button formaction=\"/dead/purge\">Purge all that match</button>",
    );
    format!("<p>{selected}</p><p>{all}</p>{jobs}")
}

/// The background jobs of this queue, newest first, refreshed while any runs.
fn jobs_section(app: &super::App, queue: &str) -> String {
    let jobs: Vec<dead_work::Job> = app
        .jobs
        .all()
        .into_iter()
        .filter(|j| j.queue == queue)
        .collect();
    if jobs.is_empty() {
        return String::new();
    }
    let running = jobs.iter().any(|j| j.finished.is_none());
    let rows: String = jobs
        .iter()
        .map(|j| {
            let state = match (&j.finished, &j.failed) {
                (None, _) => "running".to_owned(),
                (Some(_), Some(e)) => format!("stopped: {e}"),
                (Some(t), None) => format!("done at {}", t.format("%H:%M:%S")),
            };
            let refused = if j.refused.is_empty() {
                String::new()
            } else {
                format!(
                    "<details><summary>{} refused</summary><ul>{}</ul></details>",
                    j.refused_count,
                    j.refused
                        .iter()
                        .map(|r| format!("<li>{}</li>", esc(r)))
                        .collect::<String>()
                )
            };
            format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td><td>{refused}</td></tr>",
                j.started.format("%H:%M:%S"),
                if j.replay { "replay" } else { "purge" },
                esc(&j.filter),
                esc(&state),
                j.scanned,
                j.matched,
                j.done,
            )
        })
        .collect();
    let live = if running {
        " id=\"live\" data-refresh=\"1000\""
    } else {
        ""
    };
    format!(
        "<div{live}><h2>Background jobs</h2><table id=\"jobs\"><thead><tr><th>Started</th>\
         <th>Action</th><th>What</th><th>State</th><th class=\"num\">Looked at</th>\
         <th class=\"num\">Matched</th><th class=\"num\">Done</th><th></th></tr></thead>\
         <tbody>{rows}</tbody></table></div>"
    )
}

/// The archived letters that match, newest first (the first 50 of at most 5,000 looked at).
async fn archived(app: &super::App, queue: &str, f: &DeadFilter) -> Result<String, String> {
    let Some(ledger) = &app.web.ledger else {
        return Ok(
            "<p class=\"note\">Archived letters are in Postgres: start <code>llmq web\
                   </code> with <code>--database-url</code>.</p>"
                .to_owned(),
        );
    };
    type Row = (
        String,
        String,
        String,
        String,
        i64,
        Option<chrono::DateTime<chrono::Utc>>,
        String,
        chrono::DateTime<chrono::Utc>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT dead_id, task_id, error, class, attempts, failed_at, task, archived_at
         FROM dead_letters_archive
         WHERE queue = $1 AND ($2::text IS NULL OR class = $2)
           AND ($3::text IS NULL OR strpos(lower(error), lower($3)) > 0)
           AND ($4::timestamptz IS NULL OR failed_at >= $4)
           AND ($5::timestamptz IS NULL OR failed_at < $5)
         ORDER BY archived_at DESC LIMIT 5000",
    )
    .bind(queue)
    .bind(&f.class)
    .bind(&f.text)
    .bind(f.since_ms.and_then(chrono::DateTime::from_timestamp_millis))
    .bind(f.until_ms.and_then(chrono::DateTime::from_timestamp_millis))
    .fetch_all(ledger.pool())
    .await
    .map_err(|e| e.to_string())?;
    let letters: Vec<(DeadLetter, chrono::DateTime<chrono::Utc>)> = rows
        .into_iter()
        .filter_map(
            |(id, task_id, error, class, attempts, failed_at, task, at)| {
                Some((
                    DeadLetter {
                        id,
                        task_id: task_id.parse().ok()?,
                        queue: queue.to_owned(),
                        error,
                        class,
                        attempts: u64::try_from(attempts).unwrap_or(0),
                        failed_at,
                        task,
                    },
                    at,
                ))
            },
        )
        .filter(|(d, _)| f.matches(d))
        .collect();
    let rows: String = letters
        .iter()
        .take(DEAD_PAGE)
        .map(|(d, at)| {
            format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td>\
                 <td><pre>{}</pre></td></tr>",
                at.format("%Y-%m-%d %H:%M"),
                esc(&d.task_id.to_string()),
                esc(&d.class),
                d.attempts,
                esc(&d.error),
                esc(&llmq_shared::text::excerpt(&d.task, 400))
            )
        })
        .collect();
    Ok(format!(
        "<p class=\"note\">{} archived letter(s) match (of the newest 5,000 the ledger's \
         filters pass); the newest {} shown. <code>llmq dlq replay ID --database-url ...</code> \
         replays one.</p><div class=\"scroll\"><table><thead><tr><th>Archived</th><th>Task</th>\
         <th>Class</th><th class=\"num\">Attempts</th><th>Error</th><th>Task as it died</th>\
         </tr></thead><tbody>{rows}</tbody></table></div>",
        letters.len(),
        letters.len().min(DEAD_PAGE)
    ))
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

/// The dead letters an action names: the selected ids. `Err` is the page to answer instead.
async fn chosen(
    app: &super::App,
    keys: &QueueKeys,
    fields: &[(String, String)],
    viewer: &Viewer,
) -> Result<Vec<DeadLetter>, Response> {
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
    if ids.len() > MAX_SELECTED {
        return Err(message(
            StatusCode::BAD_REQUEST,
            "Too many at once",
            &format!(
                "Select at most {MAX_SELECTED} dead letters at once, or replay all that match \
                 a search."
            ),
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
        Ok(d) => Ok(d),
        Err(e) => Err(redis_away(&e, viewer)),
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
    let back = format!("/dead?queue={}", urlencode(&queue));
    if field(&fields, "all") == Some("1") {
        return everything(app, viewer, &queue, &fields, replay, &back);
    }
    let dead = match chosen(app, &keys, &fields, viewer).await {
        Ok(d) => d,
        Err(page) => return page,
    };
    tracing::info!(
        queue,
        replay,
        letters = dead.len(),
        "dead letters acted on from llmq web"
    );
    if !replay {
        let purged = match app.web.redis.purge(&keys, &dead).await {
            Ok(n) => n,
            Err(e) => return redis_away(&e, viewer),
        };
        let what = format!("Purged {purged} dead letter(s) from queue {queue}.");
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
    done("Replayed", &what, &back, viewer)
}

/// Starts replaying (or purging) every letter the form's search matches, in the background.
fn everything(
    app: &super::App,
    viewer: &Viewer,
    queue: &str,
    fields: &[(String, String)],
    replay: bool,
    back: &str,
) -> Response {
    if field(fields, "confirm") != Some("1") {
        return message(
            StatusCode::BAD_REQUEST,
            "Confirm first",
            "Tick the box that says you mean every dead letter that matches.",
            viewer,
        );
    }
    let filter = match filter_of(|k| field(fields, k).map(str::to_owned)) {
        Ok(f) => f,
        Err(why) => return message(StatusCode::BAD_REQUEST, "Not a search", &why, viewer),
    };
    let what = filter.describe();
    let id = app.jobs.start(app.web.redis.clone(), queue, filter, replay);
    tracing::info!(
        queue,
        replay,
        job = id,
        what,
        "dead letters job started from llmq web"
    );
    let verb = if replay { "Replaying" } else { "Purging" };
    done(
        verb,
        &format!(
            "{verb} {what} of queue {queue} in the background, oldest first; the dead letters \
             page shows its progress."
        ),
        back,
        viewer,
    )
}
