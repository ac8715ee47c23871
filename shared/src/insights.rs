//! What the ledger says of each model, for operators (`llmq insights`): success, cost and
//! latency by model and task type, rankings, and the switches that would save money at
//! similar success.
//!
//! Reports count finished tasks by the model that finished them (learned routing counts each
//! call instead, `Ledger::routing_stats`): a task counts when it ended on its model's own
//! account (an outage, a rate limit, a quota or a refused task counts neither way), and
//! succeeded when it succeeded and no review or check rejected its output.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::ledger::Result;

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
}

/// Success, cost and latency per model and task type, best success first within a type.
///
/// # Errors
/// Postgres fails.
pub async fn by_model(pool: &PgPool, f: &Filter) -> Result<Vec<ModelLine>> {
    type Row = (String, String, String, i64, i64, f64, f64);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT provider, model, task_type, count(*),
            count(*) FILTER (WHERE status = 'succeeded' AND verdict IS NOT FALSE),
            coalesce(sum(cost_usd), 0)::float8, coalesce(avg(duration_ms), 0)::float8
         FROM tasks
         WHERE finished_at >= $1 AND provider IS NOT NULL AND model IS NOT NULL
           AND status IN ('succeeded', 'dead', 'failed')
           AND coalesce(error_class, 'fatal') IN ('fatal', 'retryable')
           AND ($2::text IS NULL OR task_type = $2)
           AND ($3::text IS NULL OR risk = $3)
           AND ($4::text IS NULL OR model = $4)
         GROUP BY provider, model, task_type",
    )
    .bind(f.since.unwrap_or(DateTime::<Utc>::UNIX_EPOCH))
    .bind(&f.task_type)
    .bind(&f.risk)
    .bind(&f.model)
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
