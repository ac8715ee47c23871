//! `llmq migrate` and `llmq costs`.

use std::io::Write;

use chrono::{DateTime, Utc};
use llmq_shared::ledger::{self, GroupBy, Ledger, Scope};

use crate::cli::{By, Costs, Format, Migrate};
use crate::{EXIT_OK, Error, Result, emit, render, to_json};

pub async fn migrate(args: Migrate, out: &mut dyn Write) -> Result<u8> {
    let ledger = Ledger::connect(&args.database_url, 1).await?;
    // What takes minutes on a populated ledger says so as it goes, on stderr.
    ledger
        .migrate_telling(&mut |step| eprintln!("llmq migrate: {step}"))
        .await?;
    emit(out, "database migrated\n");
    Ok(EXIT_OK)
}

pub async fn costs(args: Costs, out: &mut dyn Write) -> Result<u8> {
    // The days asked for, both included: with no end, up to today; with no start, since
    // the epoch. A range that ends before it starts is a mistake, not an empty report.
    let (first, last) = match args.date {
        Some(d) => (d, d),
        None => (
            args.since.unwrap_or(DateTime::UNIX_EPOCH.date_naive()),
            args.until.unwrap_or_else(|| Utc::now().date_naive()),
        ),
    };
    let Some((since, until)) = ledger::days(first, last) else {
        return Err(Error::Usage(format!(
            "the range starts ({first}) after it ends ({last}); give a --since no later than --until"
        )));
    };
    let ledger = Ledger::connect(&args.database_url, 2).await?;
    ledger.check_migrated().await?;
    let by = match &args.by {
        By::Provider => GroupBy::Provider,
        By::Model => GroupBy::Model,
        By::Type => GroupBy::TaskType,
        By::Day => GroupBy::Day,
        By::Chain => GroupBy::Chain,
        By::Tenant => GroupBy::Tenant,
        By::Tag(name) => GroupBy::Tag(name),
    };
    let scope = match (&args.chain_id, &args.batch, &args.tenant) {
        (Some(chain), _, _) => Scope::Chain(chain),
        (None, Some(batch), _) => Scope::Batch(batch),
        (None, None, Some(tenant)) => Scope::Tenant(tenant),
        (None, None, None) => Scope::All,
    };
    // By chain over the ledger, the lines are whole chains (begun in the range, the
    // costliest `--limit`), so the total is read by provider: the calls made in the range.
    let chains = scope == Scope::All && by == GroupBy::Chain;
    let lines = if chains {
        ledger.costliest_chains(since, until, args.limit).await?
    } else {
        ledger.costs(since, until, scope, by).await?
    };
    let by_provider;
    let totals = if chains {
        by_provider = ledger
            .costs(since, until, Scope::All, GroupBy::Provider)
            .await?;
        &by_provider
    } else {
        &lines
    };
    let total: f64 = totals.iter().map(|l| l.cost_usd).fold(0.0, |a, b| a + b);
    let saved: f64 = totals.iter().map(|l| l.saved_usd).fold(0.0, |a, b| a + b);
    let calls: i64 = totals.iter().map(|l| l.calls).sum();
    let tasks = ledger.tasks_in(since, until, scope).await?;
    let chain = match &args.chain_id {
        Some(id) => ledger.chain_tasks(id, since, until).await?,
        None => Vec::new(),
    };
    match args.format {
        Format::Json => emit(
            out,
            &to_json(&serde_json::json!({
                "since": since, "until": until, "total_cost_usd": total,
                "saved_usd": saved,
                "calls": calls, "tasks": tasks, "breakdown": lines,
                "chain_tasks": chain,
            })),
        ),
        Format::Text => {
            let report = Report {
                lines: &lines,
                whole_chains: chains,
                total,
                saved,
                calls,
                tasks,
                chain: &chain,
            };
            emit(out, &text(&args, last, &report));
        }
    }
    Ok(EXIT_OK)
}

/// What `llmq costs` says, read from the ledger.
struct Report<'a> {
    /// A line per provider, model, type, day or chain (`whole_chains`: the costliest chains
    /// begun in the range, each with its whole cost).
    lines: &'a [ledger::CostLine],
    whole_chains: bool,
    total: f64,
    saved: f64,
    calls: i64,
    tasks: i64,
    /// With `--chain-id`: its tasks.
    chain: &'a [ledger::ChainTask],
}

/// The report as text, for the range asked (`last`: its last day).
fn text(args: &Costs, last: chrono::NaiveDate, r: &Report<'_>) -> String {
    let Report {
        lines,
        whole_chains: chains,
        total,
        saved,
        calls,
        tasks,
        chain,
    } = *r;
    let range = match (args.date, args.since) {
        (Some(d), _) => format!("on {d}"),
        (None, Some(s)) => format!("from {s} to {last}"),
        (None, None) => format!("up to {last}"),
    };
    let of = match (&args.batch, &args.tenant) {
        (Some(batch), _) => format!(" of batch {batch}"),
        (None, Some(tenant)) => format!(" of tenant {}", tenant.escape_debug()),
        (None, None) => String::new(),
    };
    let mut s = format!(
        "Costs{of} {range}\nTotal: {} over {calls} calls, {tasks} tasks\n",
        render::usd(total)
    );
    if saved > 0.0 {
        s.push_str(&format!(
            "Provider batches and prompt caching saved {} against list prices ({} at list prices)\n",
            render::usd(saved),
            render::usd(total + saved)
        ));
    } else if saved < 0.0 {
        s.push_str(&format!(
            "Provider batches and prompt caching together cost {} more than list prices (cache writes that few reads followed)\n",
            render::usd(-saved)
        ));
    }
    s.push('\n');
    if chains {
        s.push_str(&format!(
            "The {} costliest chains begun in the range, each with its whole cost:\n",
            lines.len()
        ));
    }
    s.push_str(&format!(
        "{:<32} {:>7} {:>7} {:>12} {:>12} {:>12} {:>12}\n",
        args.by.header(),
        "CALLS",
        "TASKS",
        "IN TOKENS",
        "CACHED",
        "OUT TOKENS",
        "COST"
    ));
    for l in lines {
        s.push_str(&format!(
            "{:<32} {:>7} {:>7} {:>12} {:>12} {:>12} {:>12}\n",
            match (&args.by, l.key.as_str()) {
                (By::Tenant | By::Tag(_), "") => "(none)".to_owned(),
                _ => render::cut(&l.key, 32),
            },
            l.calls,
            l.tasks,
            l.input_tokens,
            l.cached_tokens,
            l.output_tokens,
            render::usd(l.cost_usd)
        ));
    }
    if let Some(id) = &args.chain_id {
        s.push_str(&format!("\nChain {id}: {} tasks\n", chain.len()));
        s.push_str(&format!(
            "{:<36} {:<16} {:>5} {:>12}  {}\n",
            "TASK", "TYPE", "CALLS", "COST", "PROVIDER/MODEL"
        ));
        for t in chain {
            s.push_str(&format!(
                "{:<36} {:<16} {:>5} {:>12}  {}\n",
                t.task_id,
                t.task_type,
                t.calls,
                render::usd(t.cost_usd),
                t.models.join(" → ")
            ));
        }
    }
    s
}
