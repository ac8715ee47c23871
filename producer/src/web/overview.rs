//! The overview (queues with pause and resume, providers, quota bars, the scheduler) and a
//! task by id.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use futures_util::{StreamExt, TryStreamExt};
use llmq_shared::circuit::Circuits;
use llmq_shared::config::Config;
use llmq_shared::keys::{QueueKeys, SchedulerKeys};
use llmq_shared::queue::Client;
use llmq_shared::quota::{Limiter, QuotaLine};

use super::auth::done;
use super::{
    App, AppState, Viewer, action, action_form, esc, field, message, page, redis_away, urlencode,
};

/// A quota's use as a bar, with marks at 50, 80 and 90 %.
fn bar(pct: f64) -> String {
    let pct = pct.clamp(0.0, 100.0);
    let class = match pct {
        p if p >= 90.0 => "fill hot",
        p if p >= 80.0 => "fill warn",
        _ => "fill",
    };
    format!(
        "<div class=\"bar\" role=\"meter\" aria-valuenow=\"{pct:.0}\" aria-valuemin=\"0\" \
         aria-valuemax=\"100\"><div class=\"{class}\" style=\"width:{pct:.1}%\"></div>\
         <div class=\"mark\" style=\"left:50%\"></div><div class=\"mark\" style=\"left:80%\">\
         </div><div class=\"mark\" style=\"left:90%\"></div></div>"
    )
}

/// A share with the digits it needs: `0%` only when nothing is used.
fn percent(p: f64) -> String {
    match p {
        0.0 => "0%".into(),
        p if p < 0.1 => format!("{p:.3}%"),
        p if p < 10.0 => format!("{p:.1}%"),
        p => format!("{p:.0}%"),
    }
}

fn quota_rows(lines: &[QuotaLine]) -> String {
    let mut rows = String::new();
    for l in lines {
        let money = l.money();
        let num = |v: f64| {
            if money {
                crate::render::usd(v)
            } else {
                format!("{v:.0}")
            }
        };
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{} of {} ({})</td><td>{}</td></tr>",
            esc(&l.provider),
            esc(&l.quota),
            bar(l.percent()),
            num(l.used),
            num(l.limit),
            percent(l.percent()),
            l.reset.format("%Y-%m-%d %H:%M UTC"),
        ));
    }
    rows
}

/// Each provider's state as the workers see it: disabled, cooling down (its circuit open,
/// with why and until when), or ready, with its models that cool down. Read from Redis, so
/// the page calls no provider and needs no API key.
async fn providers(redis: &Client, config: &Config) -> Result<String, llmq_shared::queue::Error> {
    let scopes = config.circuit_scopes();
    let open = Circuits::new(redis.clone(), "llmq-web")
        .open(&scopes)
        .await?;
    let mut rows = String::new();
    for p in &config.providers {
        let mine: Vec<_> = open.iter().filter(|o| *o.provider == *p.name).collect();
        let whole = mine.iter().find(|o| o.model.is_none());
        let (state, detail) = match (p.enabled, whole) {
            (false, _) => ("disabled", "disabled in the provider file".to_owned()),
            (true, Some(o)) => ("cooling down", o.describe()),
            (true, None) if mine.is_empty() => ("ready", String::new()),
            (true, None) => (
                "ready",
                mine.iter()
                    .map(|o| o.describe())
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
        };
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{state}</td><td>{}</td></tr>",
            esc(&p.name),
            esc(&detail)
        ));
    }
    Ok(rows)
}

/// How many queues the overview counts at once.
const OVERVIEW_PARALLEL: usize = 32;

pub(super) async fn overview(State(app): AppState, viewer: Viewer) -> Response {
    let redis = &app.web.redis;
    let queues = match app.queues().await {
        Ok(q) => q,
        Err(e) => return redis_away(&e, &viewer),
    };
    // Many queues' counts at once over the one multiplexed connection, in order.
    let counted: Result<Vec<_>, _> = futures_util::stream::iter(queues.clone())
        .map(|name| {
            let redis = redis.clone();
            async move {
                let keys = QueueKeys::new(&name);
                tokio::try_join!(redis.counts(&keys), redis.approvals_soonest(&keys, 1))
            }
        })
        .buffered(OVERVIEW_PARALLEL)
        .try_collect()
        .await;
    let counted = match counted {
        Ok(c) => c,
        Err(e) => return redis_away(&e, &viewer),
    };
    let mut rows = String::new();
    let mut rooms = String::new();
    let mut waiting_approval = 0u64;
    for (name, (c, (_, approvals))) in queues.iter().zip(counted) {
        waiting_approval += approvals;
        let q = esc(name);
        let u = esc(&urlencode(name));
        if !c.ready_by_priority.is_empty() {
            // Tenant names are the producers' text: escaped like every other.
            let tenants = match redis.busiest_tenants(&QueueKeys::new(name), 5).await {
                Ok(t) => t,
                Err(e) => return redis_away(&e, &viewer),
            };
            let top: Vec<String> = tenants.iter().map(|t| t.describe(esc)).collect();
            rooms.push_str(&format!(
                "<li data-room=\"{q}\">{q}: {}; busiest tenants: {}</li>",
                c.room_by_priority(),
                top.join(", ")
            ));
        }
        let (state, button) = if c.paused {
            (
                "<span class=\"paused\">paused</span>",
                action_form(
                    &viewer,
                    "/queue/resume",
                    &[("queue", name)],
                    "<button>Resume</button>",
                ),
            )
        } else {
            (
                "running",
                action_form(
                    &viewer,
                    "/queue/pause",
                    &[("queue", name)],
                    "<button>Pause</button>",
                ),
            )
        };
        rows.push_str(&format!(
            "<tr data-queue=\"{q}\"><td>{q}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td><a href=\"/dead?queue={u}\">{}</a></td><td>{}</td><td>{}</td>\
             <td>{state} {button}</td><td><a href=\"/chains?queue={u}\">chains</a></td></tr>",
            c.ready, c.in_flight, c.delayed, c.dead, c.duplicates, c.workers,
        ));
    }
    let (providers, quotas) = match &app.web.config {
        Some(config) => match tokio::try_join!(
            providers_section(redis, config),
            quotas_section(redis, config)
        ) {
            Ok(sections) => sections,
            Err(e) => return redis_away(&e, &viewer),
        },
        None => (
            "<h2>Providers</h2><p class=\"note\">Start <code>llmq web</code> with \
             <code>--config</code> (or <code>LLMQ_CONFIG</code>) to see each provider's \
             state and quota use.</p>"
                .to_owned(),
            String::new(),
        ),
    };
    let keys = SchedulerKeys::new(app.web.scheduler_namespace.as_deref());
    let scheduler = match llmq_shared::archive::scheduler_status(redis, &keys).await {
        Ok(s) => s,
        Err(e) => {
            return message(
                StatusCode::SERVICE_UNAVAILABLE,
                "Redis cannot be reached",
                &e.to_string(),
                &viewer,
            );
        }
    };
    let (holder, duties) = scheduler_section(&scheduler);
    if !rooms.is_empty() {
        rooms = format!(
            "<p class=\"note\">Of the ready tasks, waiting their turn (priority 0 first, \
             tenants in turn):</p><ul id=\"rooms\">{rooms}</ul>"
        );
    }
    let body = format!(
        "<div id=\"live\" data-refresh=\"5000\"><h2>Queues</h2><table id=\"queues\"><tr>\
         <th>Queue</th><th>Ready</th><th>In flight</th><th>Delayed</th><th>Dead</th>\
         <th title=\"Tasks sent again with an idempotency_key already used, answered with the first's answer without a call\">Copies</th>\
         <th>Workers</th><th>State</th><th></th></tr>{rows}</table>{rooms}\
         <p><a href=\"/approvals\">{waiting_approval} step(s) wait for approval</a></p>\
         {providers}{quotas}<h2>Scheduler</h2><p>{holder}</p><table><tr><th>Duty</th>\
         <th>State</th><th>Last run</th><th>Detail</th></tr>{duties}</table></div>\
         <h2>Find a task</h2><form action=\"/task\" method=\"get\">\
         <label>Queue <input name=\"queue\" placeholder=\"any\"></label> \
         <label>Task id <input name=\"id\" size=\"40\"></label> <button>Show</button></form>"
    );
    page(StatusCode::OK, "llmq", &body, &viewer)
}

/// Each provider's state, as the workers found it.
async fn providers_section(
    redis: &Client,
    config: &Config,
) -> Result<String, llmq_shared::queue::Error> {
    let rows = providers(redis, config).await?;
    Ok(format!(
        "<h2>Providers</h2><p class=\"note\">As the workers found them: a provider or \
         model whose calls keep failing cools down, and every worker skips it until \
         then.</p><table><tr><th>Provider</th><th>State</th><th>Detail</th></tr>\
         {rows}</table>"
    ))
}

/// Each quota's use, with the marks the workers alert at.
async fn quotas_section(
    redis: &Client,
    config: &Config,
) -> Result<String, llmq_shared::queue::Error> {
    let limiter = Limiter::new(redis.clone());
    let now = chrono::Utc::now();
    let lines = limiter.all_usage(config, &[], now).await?;
    Ok(if lines.is_empty() {
        "<h2>Quotas</h2><p>No provider in the provider file has a quota, and no tenant a \
         limit.</p>"
            .to_owned()
    } else {
        format!(
            "<h2>Quotas</h2><p class=\"note\">Marks at 50, 80 and 90 %.</p><table>\
             <tr><th>Provider</th><th>Quota</th><th>Use</th><th>Used</th>\
             <th>Resets</th></tr>{}</table>",
            quota_rows(&lines)
        )
    })
}

/// Who holds the scheduler's lease, and a row for each duty.
fn scheduler_section(scheduler: &llmq_shared::archive::SchedulerStatus) -> (String, String) {
    let mut duties = String::new();
    for d in &scheduler.duties {
        duties.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&d.name),
            d.state(),
            d.last_run
                .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                .unwrap_or_else(|| "never".into()),
            esc(&d.detail)
        ));
    }
    // Recurring tasks, as `llmq status` lists them.
    for r in &scheduler.recurring {
        duties.push_str(&format!(
            "<tr><td>recurring {}</td><td></td><td>{}</td><td>last tick</td></tr>",
            esc(&r.name),
            r.last_tick
                .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                .unwrap_or_else(|| "never".into()),
        ));
    }
    let holder = scheduler.holder.as_deref().map_or_else(
        || "none active (start llmq-scheduler)".to_owned(),
        |h| format!("active: {}", esc(h)),
    );
    (holder, duties)
}

/// POST `/queue/pause` and `/queue/resume`.
async fn pause_or_resume(app: &Arc<App>, headers: &HeaderMap, body: &str, pause: bool) -> Response {
    let viewer = app.sessions.viewer(headers);
    let (fields, queue) = match action(app, headers, body, &viewer) {
        Ok(x) => x,
        Err(page) => return *page,
    };
    let keys = QueueKeys::new(&queue);
    let reason = field(&fields, "reason").unwrap_or("");
    let changed = if pause {
        app.web.redis.pause_queue(&keys, "llmq web", reason).await
    } else {
        app.web.redis.resume_queue(&keys).await
    };
    match changed {
        Ok(changed) => {
            let what = match (pause, changed) {
                (true, true) => format!(
                    "Paused queue {queue}: workers take none of its tasks within a second; \
                     tasks in flight finish."
                ),
                (true, false) => format!("Queue {queue} was already paused."),
                (false, true) => format!("Resumed queue {queue}: workers take its tasks again."),
                (false, false) => format!("Queue {queue} was not paused."),
            };
            done(
                if pause { "Paused" } else { "Resumed" },
                &what,
                "/",
                &viewer,
            )
        }
        Err(e) => redis_away(&e, &viewer),
    }
}

pub(super) async fn pause(State(app): AppState, headers: HeaderMap, body: String) -> Response {
    pause_or_resume(&app, &headers, &body, true).await
}

pub(super) async fn resume(State(app): AppState, headers: HeaderMap, body: String) -> Response {
    pause_or_resume(&app, &headers, &body, false).await
}
