//! What the ledger says of each model, for operators (`llmq insights`): success, cost and
//! latency by model and task type, rankings, the switches that would save money at similar
//! success, and what another strategy would have achieved on the routes a learned strategy
//! logged (inverse propensity weighting).
//!
//! Reports count finished tasks by the model that finished them (learned routing counts each
//! call instead, `Ledger::routing_stats`): a task counts when it ended on its model's own
//! account (an outage, a rate limit, a quota or a refused task counts neither way), and
//! succeeded when it succeeded and no review or check rejected its output.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::ledger::Result;

/// A finished task (`tasks`) that counts for or against its model: it ended on the model's
/// own account (an outage, a rate limit, a quota or a refused task is neither). Defined once,
/// in SQL, where the rollups use it too.
const TASK_COUNTS: &str = "ledger_task_counts(tasks)";

/// A finished task (`tasks`) that succeeded: no review or check rejected its output.
const TASK_SUCCEEDED: &str = "ledger_task_succeeded(tasks)";

/// One model on one task type.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelLine {
    pub provider: String,
    pub model: String,
    pub task_type: String,
    pub tasks: i64,
    pub successes: i64,
    pub success_rate: f64,
    pub cost_usd: f64,
    pub cost_per_task_usd: f64,
    pub avg_duration_ms: f64,
}

/// Which tasks a report covers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    pub since: Option<DateTime<Utc>>,
    pub task_type: Option<String>,
    pub risk: Option<String>,
    pub model: Option<String>,
    /// One tenant's tasks, from `spend_rollups` (which knows no risk: with a tenant, `risk`
    /// must be `None`).
    pub tenant: Option<String>,
}

/// Success, cost and latency per model and task type, best success first within a type.
///
/// # Errors
/// Postgres fails.
pub async fn by_model(pool: &PgPool, f: &Filter) -> Result<Vec<ModelLine>> {
    type Row = (String, String, String, i64, i64, f64, f64);
    crate::ledger::roll(pool).await?;
    // From the rollups: whole UTC days from `since`'s.
    // A tenant's from its spend (no tag), whose key has no risk.
    let (rollup, by) = match f.tenant {
        Some(_) => (
            "spend_rollups",
            "tag = '' AND tenant = $5 AND $3::text IS NULL",
        ),
        None => ("task_rollups", "($3::text IS NULL OR risk = $3)"),
    };
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "SELECT provider, model, task_type, sum(counted)::int8, sum(successes)::int8,
            sum(counted_cost_usd)::float8,
            coalesce(sum(duration_ms)::float8 / nullif(sum(durations), 0), 0)
         FROM {rollup}
         WHERE day >= ($1 AT TIME ZONE 'UTC')::date AND provider <> '' AND model <> ''
           AND ($2::text IS NULL OR task_type = $2)
           AND {by}
           AND ($4::text IS NULL OR model = $4)
         GROUP BY provider, model, task_type
         HAVING sum(counted) > 0"
    ))
    .bind(f.since.unwrap_or(DateTime::<Utc>::UNIX_EPOCH))
    .bind(&f.task_type)
    .bind(&f.risk)
    .bind(&f.model)
    .bind(&f.tenant)
    .fetch_all(pool)
    .await?;
    let mut lines: Vec<ModelLine> = rows
        .into_iter()
        .map(
            |(provider, model, task_type, tasks, successes, cost_usd, avg_duration_ms)| {
                let n = tasks.max(1) as f64;
                ModelLine {
                    provider,
                    model,
                    task_type,
                    tasks,
                    successes,
                    success_rate: successes as f64 / n,
                    cost_usd,
                    cost_per_task_usd: cost_usd / n,
                    avg_duration_ms,
                }
            },
        )
        .collect();
    lines.sort_by(|a, b| {
        a.task_type
            .cmp(&b.task_type)
            .then(b.success_rate.total_cmp(&a.success_rate))
            .then(a.cost_per_task_usd.total_cmp(&b.cost_per_task_usd))
    });
    Ok(lines)
}

/// A switch that would save money at similar success.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Switch {
    pub task_type: String,
    /// The model that did most of the type's tasks, `provider/model`.
    pub from: String,
    pub to: String,
    pub saving_per_task_usd: f64,
    /// The saving over as many tasks as `from` did.
    pub saving_usd: f64,
    pub from_success_rate: f64,
    pub from_tasks: i64,
    pub to_success_rate: f64,
    pub to_tasks: i64,
}

/// For each task type, the cheapest model whose success is within `tolerance` of the model
/// that did most of its tasks, over at least `min_tasks` tasks of its own: the saving per
/// task and the evidence. Pure, over [`by_model`]'s lines.
#[must_use]
pub fn switches(lines: &[ModelLine], tolerance: f64, min_tasks: i64) -> Vec<Switch> {
    let types: std::collections::BTreeSet<&str> =
        lines.iter().map(|l| l.task_type.as_str()).collect();
    let mut out = Vec::new();
    for ty in types {
        let of_type: Vec<&ModelLine> = lines.iter().filter(|l| l.task_type == ty).collect();
        let Some(current) = of_type.iter().max_by_key(|l| l.tasks) else {
            continue;
        };
        let better = of_type
            .iter()
            .filter(|l| {
                l.tasks >= min_tasks
                    && l.success_rate >= current.success_rate - tolerance
                    && l.cost_per_task_usd < current.cost_per_task_usd
            })
            .min_by(|a, b| a.cost_per_task_usd.total_cmp(&b.cost_per_task_usd));
        if let Some(to) = better {
            let saving = current.cost_per_task_usd - to.cost_per_task_usd;
            out.push(Switch {
                task_type: ty.to_owned(),
                from: format!("{}/{}", current.provider, current.model),
                to: format!("{}/{}", to.provider, to.model),
                saving_per_task_usd: saving,
                saving_usd: saving * current.tasks as f64,
                from_success_rate: current.success_rate,
                from_tasks: current.tasks,
                to_success_rate: to.success_rate,
                to_tasks: to.tasks,
            });
        }
    }
    out.sort_by(|a, b| b.saving_usd.total_cmp(&a.saving_usd));
    out
}

/// A route a learned strategy chose and logged, with how its task ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Logged {
    pub task_type: String,
    pub risk: Option<crate::envelope::Risk>,
    /// `provider/model`, in the logged order; the first is the one chosen.
    pub candidates: Vec<String>,
    /// The probability the logging strategy gave the first.
    pub propensity: f64,
    pub success: bool,
    pub cost_usd: f64,
}

/// The routes learned strategies logged since `since` (tasks that ended on their model's
/// own account, as [`by_model`] counts them).
///
/// # Errors
/// Postgres fails.
pub async fn logged_routes(pool: &PgPool, since: Option<DateTime<Utc>>) -> Result<Vec<Logged>> {
    type Row = (String, Option<String>, String, f64, bool, f64);
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "SELECT task_type, risk, candidates::text, propensity, {TASK_SUCCEEDED},
            cost_usd::float8
         FROM tasks
         WHERE finished_at >= $1 AND candidates IS NOT NULL AND propensity > 0
           AND {TASK_COUNTS}"
    ))
    .bind(since.unwrap_or(DateTime::<Utc>::UNIX_EPOCH))
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(
            |(task_type, risk, candidates, propensity, success, cost_usd)| {
                Some(Logged {
                    task_type,
                    risk: risk.and_then(|r| r.parse().ok()),
                    candidates: serde_json::from_str(&candidates).ok()?,
                    propensity,
                    success,
                    cost_usd,
                })
            },
        )
        .collect())
}

/// The queues the ledger has seen (a call or a finished task).
///
/// # Errors
/// Postgres fails.
pub async fn queues(pool: &PgPool) -> Result<Vec<String>> {
    crate::ledger::roll(pool).await?;
    Ok(
        sqlx::query_scalar("SELECT queue FROM ledger_queues ORDER BY queue")
            .fetch_all(pool)
            .await?,
    )
}

/// What a strategy would have achieved on logged routes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Replay {
    pub strategy: String,
    /// Logged routes read.
    pub routes: usize,
    /// Those whose choice the strategy would have made too: the evidence.
    pub matched: usize,
    /// The matched routes' weight as a number of equally weighted routes.
    pub effective_routes: f64,
    pub logged_success_rate: f64,
    pub logged_cost_per_task_usd: f64,
    /// Inverse-propensity-weighted (self-normalised) estimates; `None` without evidence.
    pub success_rate: Option<f64>,
    pub cost_per_task_usd: Option<f64>,
}

/// Estimates, from `logged` routes, the success and cost per task of a strategy that puts
/// `choose(route)` first: each route whose logged choice (its first candidate) is the one
/// the strategy would make counts with weight 1 / propensity. Pure.
#[must_use]
pub fn replay(
    strategy: &str,
    logged: &[Logged],
    choose: impl Fn(&Logged) -> Option<usize>,
) -> Replay {
    let n = logged.len().max(1) as f64;
    let (mut w, mut w2, mut ws, mut wc, mut matched) = (0.0, 0.0, 0.0, 0.0, 0);
    for l in logged {
        if choose(l) != Some(0) {
            continue;
        }
        let weight = 1.0 / l.propensity;
        matched += 1;
        w += weight;
        w2 += weight * weight;
        ws += weight * f64::from(u8::from(l.success));
        wc += weight * l.cost_usd;
    }
    Replay {
        strategy: strategy.to_owned(),
        routes: logged.len(),
        matched,
        effective_routes: if w2 > 0.0 { w * w / w2 } else { 0.0 },
        logged_success_rate: logged.iter().filter(|l| l.success).count() as f64 / n,
        logged_cost_per_task_usd: logged.iter().map(|l| l.cost_usd).sum::<f64>() / n,
        success_rate: (w > 0.0).then(|| ws / w),
        cost_per_task_usd: (w > 0.0).then(|| wc / w),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(model: &str, ty: &str, tasks: i64, successes: i64, cost: f64) -> ModelLine {
        ModelLine {
            provider: "p".into(),
            model: model.into(),
            task_type: ty.into(),
            tasks,
            successes,
            success_rate: successes as f64 / tasks as f64,
            cost_usd: cost * tasks as f64,
            cost_per_task_usd: cost,
            avg_duration_ms: 0.0,
        }
    }

    #[test]
    fn replay_weighs_the_matching_routes_by_their_propensity() {
        let route = |first: &str, p: f64, success: bool, cost: f64| Logged {
            task_type: "docs".into(),
            risk: None,
            candidates: vec![first.into(), "other".into()],
            propensity: p,
            success,
            cost_usd: cost,
        };
        let logged = [
            route("cheap", 0.5, true, 0.001),
            route("cheap", 0.25, false, 0.001),
            route("dear", 0.9, true, 0.02),
        ];
        // A strategy that always picks "cheap": the first two count, weights 2 and 4.
        let r = replay("cost", &logged, |l| {
            l.candidates.iter().position(|c| c == "cheap")
        });
        assert_eq!((r.routes, r.matched), (3, 2));
        assert!((r.success_rate.unwrap() - 2.0 / 6.0).abs() < 1e-12);
        assert!((r.cost_per_task_usd.unwrap() - 0.001).abs() < 1e-12);
        assert!((r.effective_routes - 36.0 / 20.0).abs() < 1e-12);
        assert!((r.logged_success_rate - 2.0 / 3.0).abs() < 1e-12);
        // No evidence, no estimate.
        let none = replay("x", &logged, |_| Some(1));
        assert_eq!((none.matched, none.success_rate), (0, None));
    }

    #[test]
    fn a_switch_needs_similar_success_enough_evidence_and_a_saving() {
        let lines = [
            line("premium", "docs", 200, 196, 0.02),
            line("cheap", "docs", 50, 48, 0.001),
            line("cheaper", "docs", 5, 5, 0.0001),
            line("premium", "review", 100, 95, 0.02),
            line("cheap", "review", 100, 60, 0.001),
        ];
        let s = switches(&lines, 0.02, 10);
        assert_eq!(s.len(), 1, "{s:?}");
        assert_eq!(
            (s[0].from.as_str(), s[0].to.as_str()),
            ("p/premium", "p/cheap")
        );
        assert!((s[0].saving_per_task_usd - 0.019).abs() < 1e-12);
        assert!((s[0].saving_usd - 3.8).abs() < 1e-9);
    }
}
