//! `llmq insights`: what the ledger says of each model (`llmq_shared::insights`), as tables
//! or JSON.

use std::io::Write;

use chrono::{TimeZone, Utc};
use llmq_shared::insights::{self, Filter, ModelLine};

use crate::cli::{Format, Insights, InsightsCmd};
use crate::{EXIT_OK, Error, Result, emit, render, to_json};

/// What `--tenant` cannot be given with: a tenant's spend is summed without risk, and the
/// routes a strategy logged without tenant.
fn refuse_tenant(command: &Insights) -> Result<()> {
    match command {
        Insights::Rankings { risk: Some(_), .. } => Err(Error::Usage(
            "--risk and --tenant cannot be given together: a tenant's insights are summed without risk; leave one out".into(),
        )),
        Insights::Replay { .. } => Err(Error::Usage(
            "llmq insights replay reads every route a learned strategy logged, whoever's task it was; leave --tenant out".into(),
        )),
        _ => Ok(()),
    }
}

pub async fn run(args: InsightsCmd, out: &mut dyn Write) -> Result<u8> {
    let ledger = crate::ledger(args.database_url.as_deref(), "llmq insights").await?;
    ledger.check_migrated().await?;
    let since = args
        .since
        .map(|d| Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).unwrap_or_default()));
    let mut filter = Filter {
        since,
        tenant: args.tenant,
        ..Filter::default()
    };
    if filter.tenant.is_some() {
        refuse_tenant(&args.command)?;
    }
    let json = args.format == Format::Json;
    match args.command {
        Insights::Summary => {
            let lines = insights::by_model(ledger.pool(), &filter).await?;
            print_lines(out, &lines, json);
        }
        Insights::Rankings { task_type, risk } => {
            filter.task_type = Some(task_type);
            filter.risk = risk.map(|r| r.as_str().to_owned());
            let lines = insights::by_model(ledger.pool(), &filter).await?;
            print_lines(out, &lines, json);
        }
        Insights::Model { id } => {
            filter.model = Some(id);
            let lines = insights::by_model(ledger.pool(), &filter).await?;
            print_lines(out, &lines, json);
        }
        Insights::Replay { strategy, config } => {
            let config = llmq_shared::config::Config::load_without_secrets(&config)?;
            let logged = insights::logged_routes(ledger.pool(), since).await?;
            let queues = insights::queues(ledger.pool()).await?;
            let window = since.unwrap_or_else(|| Utc::now() - chrono::Duration::days(30));
            let stats = ledger.routing_stats(&queues, window).await?;
            let price = |c: &str| {
                let (p, m) = c.split_once('/')?;
                let model = config.provider(p)?.model(m)?;
                Some(model.prices.input + model.prices.output)
            };
            let r = insights::replay(strategy.as_str(), &logged, |l| {
                let cost: Vec<f64> = l
                    .candidates
                    .iter()
                    .map(|c| price(c))
                    .collect::<Option<_>>()?;
                let observed: Vec<_> = l
                    .candidates
                    .iter()
                    .map(|c| {
                        let (p, m) = c.split_once('/').unwrap_or((c, ""));
                        stats.observed(p, m, &l.task_type, l.risk)
                    })
                    .collect();
                llmq_shared::routing::first_choice(strategy, &observed, &cost, &config.routing)
            });
            if json {
                emit(out, &to_json(&r));
            } else {
                let est =
                    |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("no evidence".into(), f);
                emit(
                    out,
                    &format!(
                        "{}: success {} and {} per task, estimated from {} of {} logged routes (as many as {:.0} equally weighted); the logged routes: success {:.3}, {} per task\n",
                        r.strategy,
                        est(r.success_rate, &|v| format!("{v:.3}")),
                        est(r.cost_per_task_usd, &|v| render::usd(v)),
                        r.matched,
                        r.routes,
                        r.effective_routes,
                        r.logged_success_rate,
                        render::usd(r.logged_cost_per_task_usd),
                    ),
                );
            }
        }
        Insights::Optimize {
            tolerance,
            min_tasks,
        } => {
            let lines = insights::by_model(ledger.pool(), &filter).await?;
            let switches = insights::switches(&lines, tolerance, min_tasks);
            if json {
                emit(out, &to_json(&switches));
            } else if switches.is_empty() {
                emit(
                    out,
                    "no switch would save money at similar success on this history\n",
                );
            } else {
                for s in &switches {
                    emit(
                        out,
                        &format!(
                            "{}: {} -> {} saves {} per task ({} over its {} tasks): success {:.2} over {} tasks against {:.2} over {}\n",
                            render::cut(&s.task_type, 40),
                            render::cut(&s.from, 60),
                            render::cut(&s.to, 60),
                            render::usd(s.saving_per_task_usd),
                            render::usd(s.saving_usd),
                            s.from_tasks,
                            s.to_success_rate,
                            s.to_tasks,
                            s.from_success_rate,
                            s.from_tasks,
                        ),
                    );
                }
            }
        }
    }
    Ok(EXIT_OK)
}

fn print_lines(out: &mut dyn Write, lines: &[ModelLine], json: bool) {
    if json {
        emit(out, &to_json(&lines));
        return;
    }
    if lines.is_empty() {
        emit(out, "no finished tasks in the ledger for this report\n");
        return;
    }
    emit(
        out,
        &format!(
            "{:<20} {:<32} {:>7} {:>8} {:>12} {:>12} {:>10}\n",
            "task type", "model", "tasks", "success", "cost", "per task", "avg ms"
        ),
    );
    for l in lines {
        emit(
            out,
            &format!(
                "{:<20} {:<32} {:>7} {:>7.1}% {:>12} {:>12} {:>10.0}\n",
                render::cut(&l.task_type, 20),
                render::cut(&format!("{}/{}", l.provider, l.model), 32),
                l.tasks,
                l.success_rate * 100.0,
                render::usd(l.cost_usd),
                render::usd(l.cost_per_task_usd),
                l.avg_duration_ms,
            ),
        );
    }
}
