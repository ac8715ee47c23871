//! Costs from the ledger for a chosen range: by day as a chart, by provider, model, task type
//! and chain, and the switches `llmq insights optimize` proposes.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{NaiveDate, Utc};
use llmq_shared::insights;
use llmq_shared::ledger::{CostLine, GroupBy, Scope};
use serde::Deserialize;

use super::{AppState, Viewer, esc, given, message, page};

/// The longest range one page reports.
const MAX_DAYS: i64 = 366;
/// Lines per table.
const TOP: usize = 20;

#[derive(Deserialize)]
pub(super) struct CostsQuery {
    /// First day, `YYYY-MM-DD` (UTC); default 30 days ago.
    since: Option<String>,
    /// Last day, included; default today.
    until: Option<String>,
    /// One batch's costs (`llmq batch`'s id); its range starts a year back by default.
    batch: Option<String>,
    /// One tenant's costs.
    tenant: Option<String>,
    /// A tag's name: the costs by its value too.
    tag: Option<String>,
}

/// The batch, tenant and tag fields given, each checked: or a title and why it is refused.
#[allow(clippy::type_complexity)]
fn fields(
    q: &CostsQuery,
) -> Result<(Option<&str>, Option<&str>, Option<&str>), (&'static str, String)> {
    let (batch, tenant, tag) = (
        given(q.batch.as_deref()),
        given(q.tenant.as_deref()),
        given(q.tag.as_deref()),
    );
    if let Some(b) = batch
        && let Err(e) = llmq_shared::envelope::check_batch_id(b)
    {
        return Err(("Not a batch id", format!("A batch id {e}.")));
    }
    if let Some(name) = tag
        && let Err(e) =
            llmq_shared::envelope::check_tags(&[(name.to_owned(), "-".to_owned())].into())
    {
        return Err(("Not a tag", format!("{e}.")));
    }
    Ok((batch, tenant, tag))
}

fn day(raw: Option<&str>, default: NaiveDate, name: &str) -> Result<NaiveDate, String> {
    match raw.map(str::trim).filter(|s| !s.is_empty()) {
        None => Ok(default),
        Some(s) => NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .map_err(|_| format!("`{s}` is not a day for `{name}`: write it as 2026-11-24.")),
    }
}

/// Costs by day as an SVG bar chart, one bar per day of the range.
fn chart(days: &[CostLine], since: NaiveDate, until: NaiveDate) -> String {
    let n = (until - since).num_days().max(0) as usize + 1;
    let max = days.iter().map(|d| d.cost_usd).fold(0.0_f64, f64::max);
    let (w, h, pad) = (640.0_f64, 160.0_f64, 30.0_f64);
    let step = w / n as f64;
    let mut svg = format!(
        "<svg id=\"by-day\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" \
         role=\"img\" aria-label=\"cost by day\"><line x1=\"0\" y1=\"{h}\" x2=\"{w}\" y2=\"{h}\" \
         stroke=\"#888\"/><text x=\"2\" y=\"12\" font-size=\"11\">${max:.4} max a day</text>",
        w,
        h + pad
    );
    for (i, date) in since.iter_days().take(n).enumerate() {
        let key = date.format("%Y-%m-%d").to_string();
        let cost = days
            .iter()
            .find(|d| d.key == key)
            .map_or(0.0, |d| d.cost_usd);
        let bh = if max > 0.0 {
            cost / max * (h - 16.0)
        } else {
            0.0
        };
        let x = i as f64 * step;
        svg.push_str(&format!(
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"#6a9\">\
             <title>{key}: ${cost:.6}</title></rect>",
            x + step * 0.1,
            h - bh,
            (step * 0.8).max(1.0)
        ));
        // The first day's date, the middle one's and the last one's, kept inside the chart.
        let anchor = match i {
            0 => Some(("start", x)),
            i if i + 1 == n => Some(("end", w)),
            i if n > 2 && i == n / 2 => Some(("middle", x + step / 2.0)),
            _ => None,
        };
        if let Some((anchor, at)) = anchor {
            svg.push_str(&format!(
                "<text x=\"{at:.1}\" y=\"{}\" font-size=\"10\" text-anchor=\"{anchor}\">{key}</text>",
                h + 14.0
            ));
        }
    }
    svg.push_str("</svg>");
    svg
}

fn table(title: &str, lines: &[CostLine]) -> String {
    if lines.is_empty() {
        return String::new();
    }
    let mut rows = String::new();
    for l in lines.iter().take(TOP) {
        let key = if l.key.is_empty() {
            "(none)".to_owned()
        } else {
            esc(&l.key)
        };
        rows.push_str(&format!(
            "<tr><td>{key}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>${:.6}</td></tr>",
            l.calls, l.tasks, l.input_tokens, l.output_tokens, l.cost_usd
        ));
    }
    let more = if lines.len() > TOP {
        format!(
            "<p class=\"note\">The {TOP} costliest of {}.</p>",
            lines.len()
        )
    } else {
        String::new()
    };
    format!(
        "<h2>{}</h2><table><tr><th></th><th>Calls</th><th>Tasks</th><th>Input tokens</th>\
         <th>Output tokens</th><th>Cost</th></tr>{rows}</table>{more}",
        esc(title)
    )
}

/// The costliest chains begun in the range: a section even when there is none.
fn chains_table(chains: &[CostLine]) -> String {
    if chains.is_empty() {
        return "<h2>Costliest chains</h2><p>No chain began in this range.</p>".to_owned();
    }
    format!(
        "{}<p class=\"note\">The chains begun in the range, each with its whole cost.</p>",
        table("Costliest chains", chains)
    )
}

/// The first and last day of a page, and the ledger's bounds for them.
type Range = (
    chrono::NaiveDate,
    chrono::NaiveDate,
    chrono::DateTime<Utc>,
    chrono::DateTime<Utc>,
);

/// The days asked for (30 to `until`, or `MAX_DAYS` for one batch), with the ledger's
/// bounds for them; or why they cannot be read.
fn range(q: &CostsQuery, batch: bool, today: chrono::NaiveDate) -> Result<Range, String> {
    day(q.until.as_deref(), today, "until").and_then(|until| {
        let back = if batch { MAX_DAYS - 1 } else { 29 };
        let since = day(
            q.since.as_deref(),
            until - chrono::Duration::days(back),
            "since",
        )?;
        let Some((from, to)) = llmq_shared::ledger::days(since, until) else {
            return Err(format!(
                "The range starts ({since}) after it ends ({until})."
            ));
        };
        if (until - since).num_days() >= MAX_DAYS {
            return Err(format!("Choose a range of at most {MAX_DAYS} days."));
        }
        Ok((since, until, from, to))
    })
}

/// The switches that would save money at similar success.
fn insights_section(switches: &[insights::Switch]) -> String {
    if switches.is_empty() {
        "<h2>Insights</h2><p>No switch would save money at similar success yet (each model \
         needs 20 tasks of a type to be compared).</p>"
            .to_owned()
    } else {
        let mut rows = String::new();
        for s in switches {
            rows.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>${:.6} a task (${:.4} over {} tasks)\
                 </td><td>{:.0}% of {} against {:.0}% of {}</td></tr>",
                esc(&s.task_type),
                esc(&s.from),
                esc(&s.to),
                s.saving_per_task_usd,
                s.saving_usd,
                s.from_tasks,
                s.from_success_rate * 100.0,
                s.from_tasks,
                s.to_success_rate * 100.0,
                s.to_tasks
            ));
        }
        format!(
            "<h2>Insights</h2><table><tr><th>Task type</th><th>From</th><th>To</th>\
             <th>Saving</th><th>Success (from against to)</th></tr>{rows}</table>"
        )
    }
}

/// Postgres could not answer: a page that says so.
fn postgres_away(e: &dyn std::fmt::Display, viewer: &Viewer) -> Response {
    message(
        StatusCode::SERVICE_UNAVAILABLE,
        "Postgres cannot answer",
        &e.to_string(),
        viewer,
    )
}

pub(super) async fn costs(
    State(app): AppState,
    viewer: Viewer,
    Query(q): Query<CostsQuery>,
) -> Response {
    let Some(ledger) = &app.web.ledger else {
        return page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Costs",
            "<p>The costs live in Postgres: start <code>llmq web</code> with \
             <code>--database-url</code> (or <code>DATABASE_URL</code>) to see them.</p>",
            &viewer,
        );
    };
    let (batch, tenant, tag) = match fields(&q) {
        Ok(f) => f,
        Err((title, why)) => return message(StatusCode::BAD_REQUEST, title, &why, &viewer),
    };
    let scope = match (batch, tenant) {
        (Some(b), _) => Scope::Batch(b),
        (None, Some(t)) => Scope::Tenant(t),
        (None, None) => Scope::All,
    };
    // One batch's or one tenant's page is theirs alone: no chains, no insights of others.
    let whole = scope == Scope::All;
    let today = Utc::now().date_naive();
    let range = range(&q, batch.is_some(), today);
    let (since, until, from, to) = match range {
        Ok(r) => r,
        Err(why) => return message(StatusCode::BAD_REQUEST, "Not a range", &why, &viewer),
    };
    let filter = insights::Filter {
        since: Some(from),
        tenant: tenant.map(str::to_owned),
        ..insights::Filter::default()
    };
    // Read at once: they share one roll of the ledger (`ledger::roll`) and the pool's
    // connections.
    let reads = tokio::try_join!(
        futures_util::future::try_join_all(
            GroupBy::PAGE
                .into_iter()
                .chain(tag.map(GroupBy::Tag))
                .map(|by| ledger.costs(from, to, scope, by))
        ),
        async {
            match whole {
                false => Ok(Vec::new()),
                true => ledger.costliest_chains(from, to, TOP as u32).await,
            }
        },
        async {
            match batch {
                Some(_) => Ok(Vec::new()),
                None => insights::by_model(ledger.pool(), &filter).await,
            }
        },
    );
    let (parts, chains, models) = match reads {
        Ok(r) => r,
        Err(e) => return postgres_away(&e, &viewer),
    };
    let total: f64 = parts[1].iter().map(|l| l.cost_usd).sum();
    let calls: i64 = parts[1].iter().map(|l| l.calls).sum();
    let saved: f64 = parts[1].iter().map(|l| l.saved_usd).sum();
    let switches = insights::switches(&models, 0.02, 20);
    let insight = if batch.is_some() {
        String::new()
    } else {
        insights_section(&switches)
    };
    let body = format!(
        "<form method=\"get\" action=\"/costs\"><label>From <input type=\"date\" name=\"since\" \
         value=\"{since}\"></label> <label>to <input type=\"date\" name=\"until\" \
         value=\"{until}\"></label> <label>batch <input name=\"batch\" value=\"{}\" \
         placeholder=\"all\"></label> <label>tenant <input name=\"tenant\" value=\"{}\" \
         placeholder=\"all\"></label> <label>by tag <input name=\"tag\" value=\"{}\" \
         placeholder=\"team\"></label> <button>Show</button></form>\
         <p id=\"total\">${total:.6} over {calls} call(s){} from {since} to {until} (UTC)\
         {}.</p>{}{}{}{}{}{}{}{insight}",
        esc(batch.unwrap_or_default()),
        esc(tenant.unwrap_or_default()),
        esc(tag.unwrap_or_default()),
        match (batch, tenant) {
            (Some(b), _) => format!(" of batch {}", esc(b)),
            (None, Some(t)) => format!(" of tenant {}", esc(t)),
            (None, None) => String::new(),
        },
        if saved > 0.0 {
            format!("; provider batches and prompt caching saved ${saved:.6} against list prices")
        } else if saved < 0.0 {
            format!(
                "; provider batches and prompt caching together cost ${:.6} more than list prices",
                -saved
            )
        } else {
            String::new()
        },
        chart(&parts[0], since, until),
        table("By provider", &parts[1]),
        table("By model", &parts[2]),
        table("By task type", &parts[3]),
        table("By tenant", &parts[4]),
        tag.map_or_else(String::new, |name| table(
            &format!("By tag {name}"),
            &parts[5]
        )),
        if whole {
            chains_table(&chains)
        } else {
            String::new()
        },
    );
    page(StatusCode::OK, "Costs", &body, &viewer)
}
