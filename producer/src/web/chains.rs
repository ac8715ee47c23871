//! Chains (a queue's, by state, in pages; one drawn as its DAG) and approvals (what waits
//! for a person, with the parents' summaries; approve or reject with a note).

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use llmq_shared::chain::{ChainState, StepStatus};
use llmq_shared::keys::QueueKeys;
use llmq_shared::queue::Refused;
use serde::Deserialize;

use super::auth::done;
use super::{
    AppState, Viewer, action, action_form, esc, field, message, page, queue_in, redis_away,
    urlencode, when_ms,
};
use crate::render::usd;

/// How many chains one page lists.
const CHAIN_PAGE: usize = 50;
/// How many index entries one page of a state's chains reads at most.
const CHAIN_SCAN: usize = 2000;
/// How many approvals the page lists, soonest deadline first.
const APPROVALS_SHOWN: usize = 200;
/// The chain states one may list by.
const STATES: [&str; 4] = ["running", "succeeded", "failed", "cancelled"];

#[derive(Deserialize)]
pub(super) struct ChainQuery {
    queue: Option<String>,
    id: Option<String>,
    state: Option<String>,
    /// The cursor: `<submitted at ms>:<chain id>` of the last chain of the previous page.
    after: Option<String>,
}

pub(super) async fn chains(
    State(app): AppState,
    viewer: Viewer,
    Query(q): Query<ChainQuery>,
) -> Response {
    let queue = match queue_in(q.queue.as_deref(), &viewer) {
        Ok(q) => q,
        Err(page) => return *page,
    };
    let state = q.state.as_deref().filter(|s| !s.is_empty());
    if let Some(s) = state
        && !STATES.contains(&s)
    {
        return message(
            StatusCode::BAD_REQUEST,
            "Not a chain state",
            &format!(
                "`{s}` is not a chain state: use one of {}.",
                STATES.join(", ")
            ),
            &viewer,
        );
    }
    let after = match q.after.as_deref().filter(|a| !a.is_empty()) {
        None => None,
        Some(a) => match a
            .split_once(':')
            .and_then(|(ms, id)| Some((ms.parse::<i64>().ok()?, id)))
        {
            Some((ms, id)) => Some((ms, id.to_owned())),
            None => {
                return message(
                    StatusCode::BAD_REQUEST,
                    "Not a page cursor",
                    "The `after` parameter is the cursor a chains page links to: follow the \
                     Older link instead of writing it by hand.",
                    &viewer,
                );
            }
        },
    };
    let keys = QueueKeys::new(&queue);
    // One more than the page: a list that ends on a page's last chain links to no empty page.
    let mut listed = match app
        .web
        .redis
        .chains_page(&keys, after, state, CHAIN_PAGE + 1, CHAIN_SCAN)
        .await
    {
        Ok(l) => l,
        Err(e) => return redis_away(&e, &viewer),
    };
    if listed.chains.len() > CHAIN_PAGE {
        listed.chains.truncate(CHAIN_PAGE);
        listed.next = listed.chains.last().map(|(id, at, _)| (*at, id.clone()));
    }
    let u = esc(&urlencode(&queue));
    let mut rows = String::new();
    for (id, at, st) in &listed.chains {
        rows.push_str(&format!(
            "<tr><td><a href=\"/chain?queue={u}&amp;id={}\">{}</a></td><td>{}</td><td>{}</td></tr>",
            esc(&urlencode(id)),
            esc(id),
            esc(st),
            when_ms(*at)
        ));
    }
    let mut filter = format!("<a href=\"/chains?queue={u}\">all</a>");
    for s in STATES {
        filter.push_str(&format!(
            " · <a href=\"/chains?queue={u}&amp;state={s}\">{s}</a>"
        ));
    }
    let state_q = state.map(|s| format!("&amp;state={s}")).unwrap_or_default();
    let older = listed
        .next
        .as_ref()
        .map(|(ms, id)| {
            format!(
                "<p><a id=\"older\" href=\"/chains?queue={u}{state_q}&amp;after={}\">Older</a></p>",
                esc(&urlencode(&format!("{ms}:{id}")))
            )
        })
        .unwrap_or_default();
    let body = if listed.chains.is_empty() {
        format!("<p>Show: {filter}</p><p>No chains here.</p>")
    } else {
        format!(
            "<p>Show: {filter}</p><table id=\"chains\"><tr><th>Chain</th><th>State</th>\
             <th>Submitted</th></tr>{rows}</table>{older}"
        )
    };
    let title = match state {
        Some(s) => format!("Chains of {queue}: {s}"),
        None => format!("Chains of {queue}"),
    };
    page(StatusCode::OK, &title, &body, &viewer)
}

/// The class of a step's box, by its status (its colours are the stylesheet's).
fn step_class(status: &str) -> &'static str {
    match status {
        "succeeded" => "succeeded",
        "failed" => "failed",
        "cancelled" => "cancelled",
        "awaiting_approval" => "waiting",
        "queued" | "running" | "retrying" => "running",
        _ => "blocked",
    }
}

/// The chain's steps as an SVG DAG, left to right, and a table row per step.
fn draw(c: &ChainState) -> (String, String) {
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
        "<svg class=\"dag\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" \
         height=\"{height}\" role=\"img\" aria-label=\"the chain's steps\"><defs>\
         <marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"7\" \
         markerHeight=\"7\" orient=\"auto-start-reverse\"><path d=\"M0,0 L10,5 L0,10 z\"/>\
         </marker></defs>"
    );
    for s in steps {
        let (x, y) = at(&s.name);
        for p in &s.after {
            let (px, py) = at(p);
            // From the parent's right edge to the step's left, curved, with an arrowhead.
            let (x1, y1, y2) = (px + w, py + h / 2, y + h / 2);
            let mid = (x1 + x) / 2;
            svg.push_str(&format!(
                "<path class=\"edge\" d=\"M{x1},{y1} C{mid},{y1} {mid},{y2} {x},{y2}\" \
                 marker-end=\"url(#arrow)\"/>"
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
            "<g><rect class=\"step {}\" x=\"{x}\" y=\"{y}\" width=\"{w}\" height=\"{h}\" \
             rx=\"6\"/><text x=\"{}\" y=\"{}\" font-size=\"13\" \
             font-weight=\"bold\">{}</text><text x=\"{}\" y=\"{}\" font-size=\"11\">{} \
             {}</text><text x=\"{}\" y=\"{}\" font-size=\"11\">{}</text></g>",
            step_class(status),
            x + 8,
            y + 18,
            esc(&s.name),
            x + 8,
            y + 33,
            esc(status),
            esc(&model),
            x + 8,
            y + 47,
            usd(cost),
        ));
        table.push_str(&format!(
            "<tr><td>{}</td><td><span class=\"state {}\">{}</span></td><td>{}</td>\
             <td class=\"num\">{}</td><td>{}</td><td>{}</td></tr>",
            esc(&s.name),
            step_class(status),
            esc(status),
            esc(&model),
            usd(cost),
            esc(st.and_then(|st| st.summary.as_deref()).unwrap_or("")),
            esc(st.and_then(|st| st.error.as_deref()).unwrap_or(""))
        ));
    }
    svg.push_str("</svg>");
    (svg, table)
}

pub(super) async fn chain(
    State(app): AppState,
    viewer: Viewer,
    Query(q): Query<ChainQuery>,
) -> Response {
    let queue = match queue_in(q.queue.as_deref(), &viewer) {
        Ok(q) => q,
        Err(page) => return *page,
    };
    let id = q.id.unwrap_or_default();
    let keys = QueueKeys::new(&queue);
    let c = match app.web.redis.chain(&keys, &id).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            return message(
                StatusCode::NOT_FOUND,
                "No such chain",
                &format!(
                    "Queue {queue} has no chain {id}: it was never submitted there, or its keys \
                     expired."
                ),
                &viewer,
            );
        }
        Err(e) => return redis_away(&e, &viewer),
    };
    let (svg, table) = draw(&c);
    let waiting: Vec<&str> = c
        .steps
        .iter()
        .filter(|(_, s)| s.status == StepStatus::AwaitingApproval)
        .map(|(n, _)| n.as_str())
        .collect();
    let approvals = if waiting.is_empty() {
        String::new()
    } else {
        format!(
            "<p><a href=\"/approvals\">{} step(s) of this chain wait for approval</a></p>",
            waiting.len()
        )
    };
    let body = format!(
        "<div id=\"live\" data-refresh=\"3000\"><p>State: <span id=\"chain-state\">{}</span></p>\
         {approvals}{svg}<h2>Steps</h2><table id=\"steps\"><tr><th>Step</th><th>Status</th>\
         <th>Model</th><th>Cost</th><th>Summary</th><th>Error</th></tr>{table}</table></div>",
        c.state.as_str()
    );
    page(StatusCode::OK, &format!("Chain {id}"), &body, &viewer)
}

pub(super) async fn approvals(State(app): AppState, viewer: Viewer) -> Response {
    let redis = &app.web.redis;
    let queues = match redis.known_queues().await {
        Ok(q) => q,
        Err(e) => return redis_away(&e, &viewer),
    };
    let mut waiting = Vec::new();
    let mut total = 0u64;
    for q in &queues {
        match redis
            .approvals_soonest(&QueueKeys::new(q), APPROVALS_SHOWN)
            .await
        {
            Ok((a, n)) => {
                total += n;
                waiting.extend(a.into_iter().map(|(c, s, at)| (q.clone(), c, s, at)));
            }
            Err(e) => return redis_away(&e, &viewer),
        }
    }
    waiting.sort_by_key(|w| w.3);
    waiting.truncate(APPROVALS_SHOWN);
    let mut items = String::new();
    let mut chains: HashMap<(String, String), Option<ChainState>> = HashMap::new();
    for (queue, chain_id, step, deadline) in &waiting {
        let key = (queue.clone(), chain_id.clone());
        if !chains.contains_key(&key) {
            match redis.chain(&QueueKeys::new(queue), chain_id).await {
                Ok(c) => chains.insert(key.clone(), c),
                Err(e) => return redis_away(&e, &viewer),
            };
        }
        let Some(Some(c)) = chains.get(&key) else {
            continue;
        };
        let mut parents = String::new();
        for p in c
            .spec
            .step(step)
            .map(|s| s.after.as_slice())
            .unwrap_or_default()
        {
            let summary = c
                .steps
                .get(p)
                .and_then(|s| s.summary.as_deref())
                .unwrap_or("(no summary)");
            parents.push_str(&format!(
                "<tr><th>{}</th><td><pre>{}</pre></td></tr>",
                esc(p),
                esc(summary)
            ));
        }
        let decide = action_form(
            &viewer,
            "/approvals/decide",
            &[("queue", queue), ("chain", chain_id), ("step", step)],
            "<label>Note <input name=\"note\" size=\"50\"></label> \
             <button name=\"decision\" value=\"approve\">Approve</button> \
             <button name=\"decision\" value=\"reject\">Reject</button>",
        );
        items.push_str(&format!(
            "<div class=\"approval\" data-chain=\"{}\" data-step=\"{}\"><h2>Step {} of chain \
             <a href=\"/chain?queue={}&amp;id={}\">{}</a> ({})</h2><p>Decide by {}.</p>\
             <table>{parents}</table>{decide}</div>",
            esc(chain_id),
            esc(step),
            esc(step),
            esc(&urlencode(queue)),
            esc(&urlencode(chain_id)),
            esc(chain_id),
            esc(queue),
            when_ms(*deadline),
        ));
    }
    let body = if total == 0 {
        "<div id=\"live\" data-refresh=\"5000\"><p>Nothing waits for approval.</p></div>".to_owned()
    } else {
        let shown = if total > APPROVALS_SHOWN as u64 {
            format!("<p>The {APPROVALS_SHOWN} with the soonest deadlines of {total}.</p>")
        } else {
            String::new()
        };
        // Live too, so a new approval shows without a reload (live.js leaves the part alone
        // while a note is being written in it).
        format!("<div id=\"live\" data-refresh=\"5000\">{shown}{items}</div>")
    };
    page(StatusCode::OK, "Approvals", &body, &viewer)
}

pub(super) async fn decide(
    State(app): AppState,
    viewer: Viewer,
    headers: HeaderMap,
    body: String,
) -> Response {
    let (fields, queue) = match action(&app, &headers, &body, &viewer) {
        Ok(x) => x,
        Err(page) => return *page,
    };
    let chain_id = field(&fields, "chain").unwrap_or("");
    let step = field(&fields, "step").unwrap_or("");
    let note = field(&fields, "note").unwrap_or("");
    let approve = match field(&fields, "decision") {
        Some("approve") => true,
        Some("reject") => false,
        _ => {
            return message(
                StatusCode::BAD_REQUEST,
                "No decision",
                "Press Approve or Reject.",
                &viewer,
            );
        }
    };
    if chain_id.is_empty() || step.is_empty() {
        return message(
            StatusCode::BAD_REQUEST,
            "Which step?",
            "The form names no chain or no step: decide from the approvals page.",
            &viewer,
        );
    }
    let keys = QueueKeys::new(&queue);
    match app
        .web
        .redis
        .decide_approval(&keys, chain_id, step, approve, note, None)
        .await
    {
        Ok(Ok(())) => {
            let what = if approve { "Approved" } else { "Rejected" };
            done(
                what,
                &format!("{what} step {step} of chain {chain_id}; the chain moves on."),
                &format!(
                    "/chain?queue={}&id={}",
                    urlencode(&queue),
                    urlencode(chain_id)
                ),
                &viewer,
            )
        }
        Ok(Err(Refused::NoSuchChain)) => message(
            StatusCode::NOT_FOUND,
            "No such step",
            &format!("Queue {queue} has no chain {chain_id} with a step {step}."),
            &viewer,
        ),
        Ok(Err(Refused::WrongState | Refused::NotHolder)) => message(
            StatusCode::CONFLICT,
            "Not waiting for approval",
            &format!(
                "Step {step} of chain {chain_id} is not waiting for approval: it was decided \
                 before, or the chain has not reached it."
            ),
            &viewer,
        ),
        Err(e) => redis_away(&e, &viewer),
    }
}
