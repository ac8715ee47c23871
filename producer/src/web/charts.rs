//! Over time (`/charts?queue=&span=hour|day|30d[&format=csv|json]`): tasks finished and
//! failed, waits, run times, calls by provider and model, call latency, tokens and cost, as SVG
//! drawn here (no script library, nothing fetched), with the numbers beneath and the same
//! figures as CSV or JSON ([`llmq_shared::series`]).

use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use llmq_shared::series::{Point, Series, Span};
use serde::Deserialize;

use super::{AppState, Viewer, esc, message, page, queue_name, urlencode};
use crate::render::usd;

#[derive(Deserialize)]
pub(super) struct ChartsQuery {
    queue: Option<String>,
    span: Option<String>,
    format: Option<String>,
}

/// GET `/charts`.
pub(super) async fn charts(
    State(app): AppState,
    Query(q): Query<ChartsQuery>,
    viewer: Viewer,
) -> Response {
    let Some(span) = Span::parse(q.span.as_deref().unwrap_or("hour")) else {
        return message(
            StatusCode::BAD_REQUEST,
            "No such span",
            "A chart's span is hour (by minute), day (by hour) or 30d (by day).",
            &viewer,
        );
    };
    let queue = match q.queue.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        None => None,
        Some(raw) => match queue_name(Some(raw)) {
            Ok(name) => Some(name),
            Err(why) => return message(StatusCode::BAD_REQUEST, "Not a queue", &why, &viewer),
        },
    };
    let Some(ledger) = &app.web.ledger else {
        return message(
            StatusCode::SERVICE_UNAVAILABLE,
            "No ledger",
            "The charts are drawn from the ledger: start llmq web with --database-url (or \
             DATABASE_URL).",
            &viewer,
        );
    };
    let series = match ledger
        .series(span, queue.as_deref(), chrono::Utc::now())
        .await
    {
        Ok(s) => s,
        Err(e) => {
            return message(
                StatusCode::SERVICE_UNAVAILABLE,
                "The ledger cannot be read",
                &e.to_string(),
                &viewer,
            );
        }
    };
    match q.format.as_deref() {
        Some("json") => typed(
            "application/json",
            serde_json::to_string_pretty(&series).unwrap_or_default(),
        ),
        Some("csv") => typed("text/csv; charset=utf-8", csv(&series)),
        None | Some("html") => {
            let body = html(&series, span);
            page(StatusCode::OK, "Over time", &body, &viewer)
        }
        Some(_) => message(
            StatusCode::BAD_REQUEST,
            "No such format",
            "The figures come as html (the page), csv or json.",
            &viewer,
        ),
    }
}

fn typed(content_type: &'static str, body: String) -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response()
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(String::new, |v| format!("{v:.1}"))
}

/// The points, one line each; a text field that could start a formula in a spreadsheet
/// never occurs (every field is a number or a time).
fn csv(s: &Series) -> String {
    let mut out = String::from(
        "at,finished,succeeded,failed,dead,wait_p50_ms,wait_p95_ms,run_p50_ms,run_p95_ms,\
         calls,call_p50_ms,call_p95_ms,input_tokens,output_tokens,cost_usd\n",
    );
    for p in &s.points {
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{:.10}\n",
            p.at.to_rfc3339(),
            p.finished,
            p.succeeded,
            p.failed,
            p.dead,
            opt(p.wait_p50_ms),
            opt(p.wait_p95_ms),
            opt(p.run_p50_ms),
            opt(p.run_p95_ms),
            p.calls,
            opt(p.call_p50_ms),
            opt(p.call_p95_ms),
            p.input_tokens,
            p.output_tokens,
            p.cost_usd
        ));
    }
    out
}

/// One line of a chart: its name, its CSS class (its colour), a value per point.
struct Line<'a> {
    name: &'a str,
    class: &'a str,
    values: Vec<Option<f64>>,
}

const W: f64 = 720.0;
const H: f64 = 160.0;
const PAD: f64 = 36.0;

/// A chart of `lines` over the points' times; `bars` stacks them as bars instead.
fn chart(title: &str, unit: &str, s: &Series, lines: &[Line<'_>], bars: bool) -> String {
    let n = s.points.len().max(1);
    let top = (0..n)
        .map(|i| {
            let vals = lines
                .iter()
                .filter_map(|l| l.values.get(i).copied().flatten());
            if bars {
                vals.sum::<f64>()
            } else {
                vals.fold(0.0, f64::max)
            }
        })
        .fold(0.0, f64::max);
    let top = if top > 0.0 { top } else { 1.0 };
    let x = |i: usize| PAD + (W - PAD - 8.0) * (i as f64 + 0.5) / n as f64;
    let y = |v: f64| H - 20.0 - (H - 30.0) * v / top;
    let mut svg = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"{t}\">\
         <line class=\"axis\" x1=\"{PAD}\" y1=\"{b}\" x2=\"{W}\" y2=\"{b}\"/>\
         <text class=\"tick\" x=\"2\" y=\"14\">{top}</text><text class=\"tick\" x=\"2\" y=\"{b}\">0</text>",
        t = esc(title),
        b = H - 20.0,
        top = esc(&short(top, unit)),
    );
    let label_every = (n / 6).max(1);
    for (i, p) in s.points.iter().enumerate() {
        if i % label_every == 0 {
            let f = if s.span == "30d" { "%m-%d" } else { "%H:%M" };
            svg.push_str(&format!(
                "<text class=\"tick\" x=\"{:.1}\" y=\"{}\">{}</text>",
                x(i) - 14.0,
                H - 4.0,
                p.at.format(f)
            ));
        }
    }
    if bars {
        let bw = ((W - PAD - 8.0) / n as f64 * 0.8).max(1.0);
        for i in 0..n {
            let mut base = 0.0;
            for l in lines {
                let v = l.values.get(i).copied().flatten().unwrap_or(0.0);
                if v <= 0.0 {
                    continue;
                }
                svg.push_str(&format!(
                    "<rect class=\"{}\" x=\"{:.1}\" y=\"{:.1}\" width=\"{bw:.1}\" height=\"{:.1}\">\
                     <title>{} {}: {}</title></rect>",
                    l.class,
                    x(i) - bw / 2.0,
                    y(base + v),
                    y(base) - y(base + v),
                    s.points[i].at.format("%Y-%m-%d %H:%M"),
                    esc(l.name),
                    esc(&short(v, unit))
                ));
                base += v;
            }
        }
    } else {
        for l in lines {
            let mut path = String::new();
            for (i, v) in l.values.iter().enumerate() {
                let Some(v) = v else { continue };
                path.push_str(&format!(
                    "{}{:.1},{:.1} ",
                    if path.is_empty() { "M" } else { "L" },
                    x(i),
                    y(*v)
                ));
                svg.push_str(&format!(
                    "<circle class=\"{}\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"2\"><title>{} {}: {}</title></circle>",
                    l.class,
                    x(i),
                    y(*v),
                    s.points[i].at.format("%Y-%m-%d %H:%M"),
                    esc(l.name),
                    esc(&short(*v, unit))
                ));
            }
            if !path.is_empty() {
                svg.push_str(&format!(
                    "<path class=\"{}\" d=\"{}\"/>",
                    l.class,
                    path.trim_end()
                ));
            }
        }
    }
    svg.push_str("</svg>");
    let legend: String = lines
        .iter()
        .map(|l| format!("<span class=\"key {}\">{}</span>", l.class, esc(l.name)))
        .collect();
    format!(
        "<figure><figcaption>{} {legend}</figcaption>{svg}</figure>",
        esc(title)
    )
}

/// A value with its unit, as short as reads well.
fn short(v: f64, unit: &str) -> String {
    match unit {
        "$" => usd(v),
        "ms" if v >= 1000.0 => format!("{:.2} s", v / 1000.0),
        "ms" => format!("{v:.0} ms"),
        _ if v >= 1e6 => format!("{:.1}M", v / 1e6),
        _ if v >= 1e4 => format!("{:.1}k", v / 1e3),
        _ => format!("{v:.0}"),
    }
}

fn series_of(s: &Series, f: impl Fn(&Point) -> Option<f64>) -> Vec<Option<f64>> {
    s.points.iter().map(f).collect()
}

/// A line of `values` named `name`, coloured by `class`.
fn line<'a>(name: &'a str, class: &'a str, values: Vec<Option<f64>>) -> Line<'a> {
    Line {
        name,
        class,
        values,
    }
}

/// A chart of a p50 and a p95 line, in ms.
fn percentiles(
    title: &str,
    s: &Series,
    p50: fn(&Point) -> Option<f64>,
    p95: fn(&Point) -> Option<f64>,
) -> String {
    let lines = [
        line("p50", "p50", series_of(s, p50)),
        line("p95", "p95", series_of(s, p95)),
    ];
    chart(title, "ms", s, &lines, false)
}

/// Every chart of the series.
fn charts_of(s: &Series, span: Span) -> String {
    let count = |f: fn(&Point) -> i64| series_of(s, move |p| Some(f(p) as f64));
    let tasks = [
        line("succeeded", "ok", count(|p| p.succeeded)),
        line("failed", "bad", count(|p| p.failed - p.dead)),
        line("dead", "dead", count(|p| p.dead)),
    ];
    let tokens = [
        line("input", "p50", count(|p| p.input_tokens)),
        line("output", "p95", count(|p| p.output_tokens)),
    ];
    let run_title = if span == Span::Month {
        "Time running (mean)"
    } else {
        "Time running"
    };
    let charts = [
        chart("Tasks finished", "", s, &tasks, true),
        percentiles(
            "Time waiting in the queue",
            s,
            |p| p.wait_p50_ms,
            |p| p.wait_p95_ms,
        ),
        percentiles(run_title, s, |p| p.run_p50_ms, |p| p.run_p95_ms),
        chart(
            "Provider calls",
            "",
            s,
            &[line("calls", "p50", count(|p| p.calls))],
            true,
        ),
        percentiles(
            "Provider call latency (answered calls)",
            s,
            |p| p.call_p50_ms,
            |p| p.call_p95_ms,
        ),
        chart("Tokens", "", s, &tokens, true),
        chart(
            "Cost",
            "$",
            s,
            &[line("cost", "ok", series_of(s, |p| Some(p.cost_usd)))],
            true,
        ),
    ]
    .concat();
    format!("<div class=\"charts\">{charts}</div>")
}

/// The calls by provider and model over the span, most first, as table rows.
fn model_rows(s: &Series) -> String {
    let mut by_model: Vec<(String, i64, i64)> = Vec::new();
    for m in &s.models {
        let key = format!("{}/{}", m.provider, m.model);
        match by_model.iter_mut().find(|(k, ..)| *k == key) {
            Some(e) => {
                e.1 += m.calls;
                e.2 += m.errors;
            }
            None => by_model.push((key, m.calls, m.errors)),
        }
    }
    by_model.sort_by_key(|m| std::cmp::Reverse(m.1));
    by_model
        .iter()
        .map(|(k, calls, errors)| {
            format!(
                "<tr><td>{}</td><td class=\"num\">{calls}</td><td class=\"num\">{errors}</td></tr>",
                esc(k)
            )
        })
        .collect()
}

/// Every point's figures, as table rows.
fn number_rows(s: &Series) -> String {
    s.points
        .iter()
        .map(|p| {
            format!(
                "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td></tr>",
                p.at.format("%Y-%m-%d %H:%M"),
                p.finished,
                p.succeeded,
                p.failed,
                p.dead,
                opt(p.wait_p50_ms),
                opt(p.wait_p95_ms),
                opt(p.run_p50_ms),
                opt(p.run_p95_ms),
                p.calls,
                opt(p.call_p50_ms),
                opt(p.call_p95_ms),
                usd(p.cost_usd)
            )
        })
        .collect()
}

fn html(s: &Series, span: Span) -> String {
    let (charts, model_rows, numbers) = (charts_of(s, span), model_rows(s), number_rows(s));
    let q = s.queue.as_deref().unwrap_or("");
    let link = |span: &str, format: &str| {
        esc(&format!(
            "/charts?span={span}{}{}",
            if q.is_empty() {
                String::new()
            } else {
                format!("&queue={}", urlencode(q))
            },
            if format.is_empty() {
                String::new()
            } else {
                format!("&format={format}")
            }
        ))
    };
    let spans: String = [
        ("hour", "Last hour"),
        ("day", "Last day"),
        ("30d", "30 days"),
    ]
    .iter()
    .map(|(name, label)| {
        let here = if *name == span.name() {
            " class=\"here\""
        } else {
            ""
        };
        format!("<a{here} href=\"{}\">{label}</a>", link(name, ""))
    })
    .collect();
    let source = if span == Span::Month {
        "From the ledger's daily rollups: failed counts every task that did not succeed; \
         call latency is read from a histogram of buckets 10 % wide (within 5 %); running \
         time is the mean; waiting time is not kept by day."
    } else {
        "From the ledger's rows, exact. Waiting is from enqueue to the start of the last \
         attempt (retries' waits included)."
    };
    format!(
        "<form method=\"get\" action=\"/charts\"><input type=\"hidden\" name=\"span\" value=\"{}\">\
         <label>Queue <input name=\"queue\" value=\"{}\" placeholder=\"every queue\"></label> \
         <button>Show</button></form><nav class=\"tabs\">{spans}</nav>\
         <p class=\"note\">{source} Also as <a href=\"{}\">CSV</a> and <a href=\"{}\">JSON</a>.</p>\
         <div id=\"live\" data-refresh=\"{}\">{charts}<h2>Calls by provider and model</h2><table><thead><tr>\
         <th>Provider/model</th><th class=\"num\">Calls</th><th class=\"num\">Errors</th></tr>\
         </thead><tbody>{model_rows}</tbody></table><details><summary>The numbers</summary>\
         <div class=\"scroll\"><table><thead><tr><th>At (UTC)</th><th class=\"num\">Finished</th>\
         <th class=\"num\">Succeeded</th><th class=\"num\">Failed</th><th class=\"num\">Dead</th>\
         <th class=\"num\">Wait p50 ms</th><th class=\"num\">Wait p95 ms</th>\
         <th class=\"num\">Run p50 ms</th><th class=\"num\">Run p95 ms</th>\
         <th class=\"num\">Calls</th><th class=\"num\">Call p50 ms</th>\
         <th class=\"num\">Call p95 ms</th><th class=\"num\">Cost</th></tr></thead>\
         <tbody>{numbers}</tbody></table></div></details></div>",
        esc(span.name()),
        esc(q),
        link(span.name(), "csv"),
        link(span.name(), "json"),
        if span == Span::Hour { 10_000 } else { 60_000 },
    )
}
