//! `llmq quota` and `llmq providers check|list`.

use std::io::Write;

use llmq_shared::config::{Config, Kind};
use llmq_shared::queue::Client;
use llmq_shared::quota::Limiter;
use serde::Serialize;

use crate::cli::{Format, ProvidersCommand, QuotaArgs};
use crate::{EXIT_OK, EXIT_USAGE, Result, emit, render, to_json};

pub async fn quota(redis: &Client, args: QuotaArgs, out: &mut dyn Write) -> Result<u8> {
    if args.history {
        return history(args, out).await;
    }
    let config = Config::load(&args.config)?;
    let limiter = Limiter::new(redis.clone());
    let now = chrono::Utc::now();
    let lines = limiter.all_usage(&config, &args.tenant, now).await?;
    match args.format {
        Format::Json => emit(out, &to_json(&lines)),
        Format::Text => {
            if lines.is_empty() {
                emit(
                    out,
                    "no provider in the provider file has a quota, and no tenant a limit\n",
                );
                return Ok(EXIT_OK);
            }
            let mut s = format!(
                "{:<32} {:<17} {:>12} {:>12} {:>12}  {}\n",
                "PROVIDER/TENANT", "QUOTA", "USED", "LIMIT", "REMAINING", "RESET"
            );
            for l in &lines {
                let money = l.money();
                let num = |v: f64| {
                    if money {
                        render::usd(v)
                    } else {
                        format!("{v:.0}")
                    }
                };
                let pct = l.percent();
                let flag = match pct {
                    p if p >= 90.0 => " (90%+)",
                    p if p >= 80.0 => " (80%+)",
                    p if p >= 50.0 => " (50%+)",
                    _ => "",
                };
                s.push_str(&format!(
                    "{:<32} {:<17} {:>12} {:>12} {:>12}  {}{flag}\n",
                    render::cut(&l.provider, 32),
                    l.quota,
                    num(l.used),
                    num(l.limit),
                    num(l.remaining),
                    l.reset.format("%Y-%m-%d %H:%M:%S UTC"),
                ));
            }
            emit(out, &s);
        }
    }
    Ok(EXIT_OK)
}

/// `llmq quota --history`: closed windows, newest first.
async fn history(args: QuotaArgs, out: &mut dyn Write) -> Result<u8> {
    let ledger = crate::ledger(args.database_url.as_deref(), "--history").await?;
    let rows = llmq_shared::archive::quota_history(ledger.pool(), args.provider.as_deref()).await?;
    match args.format {
        Format::Json => emit(out, &to_json(&rows)),
        Format::Text => {
            if rows.is_empty() {
                emit(
                    out,
                    "no closed quota window yet (the scheduler records each one as it closes)\n",
                );
                return Ok(EXIT_OK);
            }
            let mut s = format!(
                "{:<20} {:<7} {:<12} {:>10} {:>12}\n",
                "PROVIDER", "WINDOW", "START", "REQUESTS", "SPENT"
            );
            for r in &rows {
                s.push_str(&format!(
                    "{:<20} {:<7} {:<12} {:>10} {:>12}\n",
                    render::cut(&r.provider, 20),
                    r.window_kind,
                    r.window_start,
                    r.requests.map_or_else(|| "-".to_owned(), |n| n.to_string()),
                    r.usd.map_or_else(|| "-".to_owned(), render::usd),
                ));
            }
            emit(out, &s);
        }
    }
    Ok(EXIT_OK)
}

/// A configured model as `llmq providers list` shows it.
#[derive(Debug, Serialize)]
struct ModelLine {
    provider: String,
    kind: &'static str,
    enabled: bool,
    cost_tier: &'static str,
    model: String,
    name: String,
    tier: &'static str,
    capabilities: Vec<&'static str>,
    context_window: Option<u64>,
    input_usd_per_mtok: f64,
    output_usd_per_mtok: f64,
    cached_input_usd_per_mtok: f64,
    price_source: &'static str,
}

pub fn run(cmd: ProvidersCommand, out: &mut dyn Write) -> Result<u8> {
    match cmd {
        ProvidersCommand::Check { config } => {
            let parsed = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return Ok(EXIT_USAGE);
                }
            };
            let file = config.display().to_string();
            let problems = lint(&file, &parsed);
            for p in &problems {
                eprintln!("{p}");
            }
            if !problems.is_empty() {
                return Ok(EXIT_USAGE);
            }
            let models: usize = parsed.providers.iter().map(|p| p.models.len()).sum();
            emit(
                out,
                &format!(
                    "{file}: {} providers, {models} models: no problems\n",
                    parsed.providers.len()
                ),
            );
            Ok(EXIT_OK)
        }
        ProvidersCommand::List {
            config,
            capability,
            tier,
            max_cost,
            format,
        } => {
            let parsed = Config::load(&config)?;
            let lines: Vec<ModelLine> = parsed
                .providers
                .iter()
                .flat_map(|p| p.models.iter().map(move |m| (p, m)))
                .filter(|(_, m)| capability.is_none_or(|c| m.can(c)))
                .filter(|(_, m)| tier.is_none_or(|t| m.tier == t))
                .filter(|(_, m)| max_cost.is_none_or(|c| m.prices.input + m.prices.output <= c))
                .map(|(p, m)| ModelLine {
                    provider: p.name.to_string(),
                    kind: p.kind.as_str(),
                    enabled: p.enabled,
                    cost_tier: p.cost_tier.as_str(),
                    model: m.id.to_string(),
                    name: m.name.clone(),
                    tier: m.tier.as_str(),
                    capabilities: m.capabilities.iter().map(|c| c.as_str()).collect(),
                    context_window: m.context_window,
                    input_usd_per_mtok: m.prices.input,
                    output_usd_per_mtok: m.prices.output,
                    cached_input_usd_per_mtok: m.prices.cached_input,
                    price_source: m.price_source.as_str(),
                })
                .collect();
            match format {
                Format::Json => emit(out, &to_json(&lines)),
                Format::Text => {
                    let mut s = format!(
                        "{:<16} {:<26} {:<13} {:<9} {:>9} {:>9} {:>9}  {:<14} {}\n",
                        "PROVIDER",
                        "MODEL",
                        "COST TIER",
                        "TIER",
                        "IN $/M",
                        "OUT $/M",
                        "CACHED",
                        "PRICE FROM",
                        "CAPABILITIES"
                    );
                    for l in &lines {
                        let off = if l.enabled { "" } else { " (disabled)" };
                        s.push_str(&format!(
                            "{:<16} {:<26} {:<13} {:<9} {:>9.3} {:>9.3} {:>9.3}  {:<14} {}{off}\n",
                            render::cut(&l.provider, 16),
                            render::cut(&l.model, 26),
                            l.cost_tier,
                            l.tier,
                            l.input_usd_per_mtok,
                            l.output_usd_per_mtok,
                            l.cached_input_usd_per_mtok,
                            l.price_source,
                            if l.capabilities.is_empty() {
                                "any".to_owned()
                            } else {
                                l.capabilities.join(", ")
                            },
                        ));
                    }
                    let table = llmq_shared::config::bundled_prices();
                    s.push_str(&format!(
                        "(USD per million tokens; the bundled table is from {}, as of {})\n",
                        table.source, table.as_of
                    ));
                    emit(out, &s);
                }
            }
            Ok(EXIT_OK)
        }
    }
}

/// Problems a valid file can still have, each as `file:key: problem; fix`.
fn lint(file: &str, c: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for (i, p) in c.providers.iter().enumerate() {
        let needs_key = matches!(p.kind, Kind::Openai | Kind::Anthropic | Kind::Gemini);
        if needs_key && p.api_key.is_none() && p.enabled {
            out.push(format!(
                "{file}:providers[{i}].api_key: provider `{}` ({}) has no API key; set api_key: ${{ENV_VAR}}",
                p.name,
                p.kind.as_str()
            ));
        }
        if let Some(cmd) = &p.command
            && p.enabled
            && !on_path(&cmd.program)
        {
            out.push(format!(
                "{file}:providers[{i}].command.program: `{}` is not on PATH; install it or give its full path",
                cmd.program
            ));
        }
    }
    for (i, name) in c.routing.fallback.iter().enumerate() {
        if c.provider(name).is_some_and(|p| !p.enabled) {
            out.push(format!(
                "{file}:routing.fallback[{i}]: provider `{name}` is disabled, so it is never used; enable it or remove it from the list"
            ));
        }
    }
    out
}

fn on_path(program: &str) -> bool {
    if program.contains('/') {
        return std::path::Path::new(program).is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}
