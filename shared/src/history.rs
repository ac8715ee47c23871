//! Finished tasks found by state, filters and time, newest first: the ledger's side of the
//! operator page's task search (`/tasks`).
//!
//! Two indexes serve it (built by `llmq migrate`, see `ledger::LATE_INDEXES`): the tasks
//! that did not succeed, a B-tree by finish time of a few rows in a hundred, which a search of
//! failures or of an error's text walks newest first; and a BRIN summary of every task's
//! finish time, which a search of all tasks reads a window at a time, newest first, widening
//! the window until the page is full. A page is keyed by its edge (finish time, task id), so
//! paging older or newer repeats and misses nothing however many rows arrive meanwhile.

use chrono::{DateTime, Duration, Utc};
use sqlx::{Postgres, QueryBuilder};
use uuid::Uuid;

use crate::ledger::{Ledger, Result};

/// The most rows counted for a search's total: beyond it the page says "at least".
pub const COUNT_CAP: i64 = 10_000;

/// What a search asks for: every field narrows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskFilter {
    pub queue: Option<String>,
    /// `succeeded`, `failed`, `dead` or `cancelled`; `None`, any.
    pub status: Option<String>,
    pub task_type: Option<String>,
    pub tenant: Option<String>,
    /// A tag's name and value.
    pub tag: Option<(String, String)>,
    pub model: Option<String>,
    pub error_class: Option<String>,
    pub batch: Option<String>,
    /// Words of the error, as typed (case ignored).
    pub text: Option<String>,
    /// Finished at or after.
    pub since: DateTime<Utc>,
    /// Finished before.
    pub until: DateTime<Utc>,
}

impl TaskFilter {
    /// Only tasks that did not succeed can match: the partial index serves it.
    fn unsucceeded(&self) -> bool {
        self.text.is_some()
            || self.error_class.is_some()
            || self.status.as_deref().is_some_and(|s| s != "succeeded")
    }
}

/// A page's edge: a task's finish time and id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub at: DateTime<Utc>,
    pub id: Uuid,
}

impl Cursor {
    /// `<µs since the epoch>_<task id>`, for a URL.
    #[must_use]
    pub fn encode(&self) -> String {
        format!("{}_{}", self.at.timestamp_micros(), self.id)
    }

    /// What [`Cursor::encode`] made; `None` for anything else.
    #[must_use]
    pub fn decode(text: &str) -> Option<Self> {
        let (us, id) = text.split_once('_')?;
        Some(Self {
            at: DateTime::from_timestamp_micros(us.parse().ok()?)?,
            id: id.parse().ok()?,
        })
    }
}

/// Which page of a search.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    Newest,
    /// The tasks finished before this edge.
    Older(Cursor),
    /// The tasks finished after this edge.
    Newer(Cursor),
}

/// One finished task as its ledger row holds it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow, serde::Serialize)]
pub struct FoundTask {
    pub task_id: Uuid,
    pub queue: String,
    pub chain_id: Option<String>,
    pub task_type: String,
    pub status: String,
    pub attempts: i32,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost_usd: f64,
    pub error: Option<String>,
    pub error_class: Option<String>,
    pub finished_at: DateTime<Utc>,
    pub enqueued_at: Option<DateTime<Utc>>,
    pub duration_ms: Option<i64>,
    pub batch_id: Option<String>,
    pub tenant: Option<String>,
    pub tags: Option<serde_json::Value>,
}

impl FoundTask {
    fn cursor(&self) -> Cursor {
        Cursor {
            at: self.finished_at,
            id: self.task_id,
        }
    }
}

/// A page of a search, newest first, with the edges to page from and the total.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TaskPage {
    pub tasks: Vec<FoundTask>,
    /// Where the next older page starts, if there is one.
    #[serde(skip)]
    pub older: Option<Cursor>,
    /// Where the next newer page starts, if this is not the newest.
    #[serde(skip)]
    pub newer: Option<Cursor>,
    /// How many tasks match, up to [`COUNT_CAP`].
    pub count: i64,
    /// `count` reached the cap: at least that many match.
    pub more: bool,
}

const COLUMNS: &str = "task_id, queue, chain_id, task_type, status, attempts, provider, model, \
     input_tokens, output_tokens, cost_usd::float8 AS cost_usd, error, error_class, finished_at, \
     enqueued_at, duration_ms, batch_id, tenant, tags";

/// `text` as a `LIKE` pattern that matches it anywhere, its wildcards taken literally.
fn contains(text: &str) -> String {
    let mut p = String::with_capacity(text.len() + 2);
    p.push('%');
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
}

/// The filter's conditions, each bound (never spliced), after a `WHERE`.
fn conditions(q: &mut QueryBuilder<'_, Postgres>, f: &TaskFilter) {
    q.push(" finished_at >= ")
        .push_bind(f.since)
        .push(" AND finished_at < ")
        .push_bind(f.until);
    if f.unsucceeded() {
        // Said as the partial index says it, so the planner can use it.
        q.push(" AND status <> 'succeeded'");
    }
    let mut eq = |column: &str, value: &Option<String>| {
        if let Some(v) = value {
            q.push(format!(" AND {column} = ")).push_bind(v.clone());
        }
    };
    eq("queue", &f.queue);
    eq("status", &f.status);
    eq("task_type", &f.task_type);
    eq("tenant", &f.tenant);
    eq("model", &f.model);
    eq("error_class", &f.error_class);
    eq("batch_id", &f.batch);
    if let Some((name, value)) = &f.tag {
        q.push(" AND tags @> ")
            .push_bind(serde_json::json!({ name: value }))
            .push("::jsonb");
    }
    if let Some(text) = &f.text {
        q.push(" AND error ILIKE ").push_bind(contains(text));
    }
}

impl Ledger {
    /// One page (`limit` tasks) of the finished tasks `filter` matches, newest first.
    ///
    /// # Errors
    /// Postgres fails.
    pub async fn find_tasks(
        &self,
        filter: &TaskFilter,
        page: Page,
        limit: i64,
    ) -> Result<TaskPage> {
        let limit = limit.clamp(1, 500);
        let older = !matches!(page, Page::Newer(_));
        let edge = match page {
            Page::Newest => None,
            Page::Older(c) | Page::Newer(c) => Some(c),
        };
        // One more than the page: whether there is a further page.
        let find = async {
            if filter.unsucceeded() {
                self.tasks_between(filter, filter.since, filter.until, edge, older, limit + 1)
                    .await
            } else {
                self.tasks_by_windows(filter, edge, older, limit + 1).await
            }
        };
        let (mut rows, (count, more)) = if edge.is_none() {
            let rows = find.await?;
            // The newest page with no further one holds every match: its length is the
            // count, and a filter that matches few rows of a long range is read once.
            let counted = if rows.len() as i64 <= limit {
                (rows.len() as i64, false)
            } else {
                self.count_tasks(filter).await?
            };
            (rows, counted)
        } else {
            tokio::try_join!(find, self.count_tasks(filter))?
        };
        let further = rows.len() as i64 > limit;
        rows.truncate(limit as usize);
        if !older {
            rows.reverse();
        }
        let (first, last) = (
            rows.first().map(FoundTask::cursor),
            rows.last().map(FoundTask::cursor),
        );
        let (newer, older_edge) = if older {
            (edge.and(first), if further { last } else { None })
        } else {
            (if further { first } else { None }, last.or(edge))
        };
        Ok(TaskPage {
            tasks: rows,
            older: older_edge,
            newer,
            count,
            more,
        })
    }

    /// Up to `limit` tasks finished in `[lo, hi)` past `edge` (older or newer), in that
    /// order.
    async fn tasks_between(
        &self,
        filter: &TaskFilter,
        lo: DateTime<Utc>,
        hi: DateTime<Utc>,
        edge: Option<Cursor>,
        older: bool,
        limit: i64,
    ) -> Result<Vec<FoundTask>> {
        let mut q = QueryBuilder::<Postgres>::new(format!("SELECT {COLUMNS} FROM tasks WHERE"));
        let window = TaskFilter {
            since: lo.max(filter.since),
            until: hi.min(filter.until),
            ..filter.clone()
        };
        conditions(&mut q, &window);
        if let Some(c) = edge {
            q.push(if older {
                " AND (finished_at, task_id) < ("
            } else {
                " AND (finished_at, task_id) > ("
            })
            .push_bind(c.at)
            .push(", ")
            .push_bind(c.id)
            .push(")");
        }
        q.push(if older {
            " ORDER BY finished_at DESC, task_id DESC LIMIT "
        } else {
            " ORDER BY finished_at, task_id LIMIT "
        })
        .push_bind(limit);
        Ok(q.build_query_as::<FoundTask>()
            .fetch_all(self.pool())
            .await?)
    }

    /// [`Ledger::tasks_between`] a window at a time from the edge (15 minutes, then four
    /// times wider each time) until `limit` are found or the range ends: each window is read
    /// through the BRIN summary of finish times alone.
    async fn tasks_by_windows(
        &self,
        filter: &TaskFilter,
        edge: Option<Cursor>,
        older: bool,
        limit: i64,
    ) -> Result<Vec<FoundTask>> {
        let mut found: Vec<FoundTask> = Vec::new();
        let mut width = Duration::minutes(15);
        let mut from = edge.map(|c| c.at);
        loop {
            let (lo, hi) = if older {
                let hi = from.map_or(filter.until, |t| {
                    // The edge's own instant may hold more tasks: the edge's id tells them.
                    t + Duration::microseconds(1)
                });
                (hi - width, hi)
            } else {
                let lo = from.unwrap_or(filter.since);
                (lo, lo + width)
            };
            let last = found.last().map(FoundTask::cursor).or(edge);
            let more = self
                .tasks_between(filter, lo, hi, last, older, limit - found.len() as i64)
                .await?;
            found.extend(more);
            let ended = if older {
                lo <= filter.since
            } else {
                hi >= filter.until
            };
            if found.len() as i64 >= limit || ended {
                return Ok(found);
            }
            from = Some(if older { lo } else { hi });
            width = width * 4;
        }
    }

    /// How many tasks `filter` matches, counted to [`COUNT_CAP`]; whether it reached it.
    async fn count_tasks(&self, filter: &TaskFilter) -> Result<(i64, bool)> {
        let mut q =
            QueryBuilder::<Postgres>::new("SELECT count(*) FROM (SELECT 1 FROM tasks WHERE");
        conditions(&mut q, filter);
        q.push(" LIMIT ").push_bind(COUNT_CAP + 1).push(") c");
        let n: i64 = q.build_query_scalar().fetch_one(self.pool()).await?;
        Ok((n.min(COUNT_CAP), n > COUNT_CAP))
    }
}

/// One provider call of a task, as the ledger holds it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow, serde::Serialize)]
pub struct TaskCall {
    /// Replays from the dead letters start a new run.
    pub run: i32,
    pub attempt: i32,
    pub call_no: i32,
    pub provider: String,
    pub model: String,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cached_tokens: i64,
    pub cost_usd: f64,
    pub latency_ms: i32,
    pub outcome: String,
    pub error_class: Option<String>,
    pub error: Option<String>,
    pub worker: String,
    pub called_at: DateTime<Utc>,
}

/// The most calls of one task the page reads.
const CALLS_SHOWN: i64 = 200;

impl Ledger {
    /// Task `id`'s ledger row (its latest, should a replay have finished it again).
    ///
    /// # Errors
    /// Postgres fails.
    pub async fn finished_task(&self, id: Uuid) -> Result<Option<FoundTask>> {
        Ok(sqlx::query_as::<_, FoundTask>(&format!(
            "SELECT {COLUMNS} FROM tasks WHERE task_id = $1 ORDER BY finished_at DESC LIMIT 1"
        ))
        .bind(id)
        .fetch_optional(self.pool())
        .await?)
    }

    /// Task `id`'s provider calls in the order made (the first [`CALLS_SHOWN`]).
    ///
    /// # Errors
    /// Postgres fails.
    pub async fn task_calls(&self, id: Uuid) -> Result<Vec<TaskCall>> {
        Ok(sqlx::query_as::<_, TaskCall>(
            "SELECT run, attempt, call_no, provider, model, input_tokens, output_tokens,
                cached_tokens, cost_usd::float8 AS cost_usd, latency_ms, outcome, error_class,
                error, worker, called_at
             FROM provider_calls WHERE task_id = $1
             ORDER BY run, attempt, call_no LIMIT $2",
        )
        .bind(id)
        .bind(CALLS_SHOWN)
        .fetch_all(self.pool())
        .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_survives_its_url_and_nothing_else_passes_for_one() {
        let c = Cursor {
            at: DateTime::from_timestamp_micros(1_764_000_000_123_456).unwrap(),
            id: Uuid::new_v4(),
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        for bad in [
            "",
            "_",
            "1_",
            "x_00000000-0000-0000-0000-000000000000",
            "1-2",
        ] {
            assert_eq!(Cursor::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn wildcards_in_the_searched_text_are_taken_literally() {
        assert_eq!(contains("50%_off\\"), "%50\\%\\_off\\\\%");
    }
}
