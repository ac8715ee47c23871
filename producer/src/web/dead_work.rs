//! Dead letters as a work list: filtered (class, the error's words, provider, model, task
//! type, tenant, time), grouped by error, and replayed or purged in the background, what
//! matches, with progress. A job walks the dead stream once, oldest first, by cursor, up to the
//! newest letter there when it started: it never reads a letter twice, so letters it cannot
//! replay (a refused chain step) are passed, not met again.

use std::sync::{Arc, Mutex};

use llmq_shared::keys::QueueKeys;
use llmq_shared::queue::{Client, DeadLetter, Replayed};

/// Letters one page or one group count reads at most.
pub(super) const SCAN_BUDGET: usize = 5000;

/// Jobs kept for the page (the newest).
const JOBS_KEPT: usize = 20;

/// What narrows the dead letters; every field is optional.
#[derive(Debug, Clone, Default)]
pub(crate) struct DeadFilter {
    pub class: Option<String>,
    /// Words of the error, case ignored.
    pub text: Option<String>,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub task_type: Option<String>,
    pub tenant: Option<String>,
    /// Died at or after (ms since the epoch).
    pub since_ms: Option<i64>,
    /// Died before.
    pub until_ms: Option<i64>,
}

impl DeadFilter {
    pub fn is_empty(&self) -> bool {
        self.fields().iter().all(|(_, v)| v.is_none())
            && self.since_ms.is_none()
            && self.until_ms.is_none()
    }

    /// The text fields as the query names them.
    pub fn fields(&self) -> [(&'static str, &Option<String>); 6] {
        [
            ("class", &self.class),
            ("q", &self.text),
            ("provider", &self.provider),
            ("model", &self.model),
            ("type", &self.task_type),
            ("tenant", &self.tenant),
        ]
    }

    /// Whether letter `d` passes.
    pub fn matches(&self, d: &DeadLetter) -> bool {
        if self.class.as_deref().is_some_and(|c| c != d.class) {
            return false;
        }
        if let Some(t) = &self.text
            && !d.error.to_lowercase().contains(&t.to_lowercase())
        {
            return false;
        }
        let wants = [
            ("provider", &self.provider),
            ("model", &self.model),
            ("type", &self.task_type),
            ("tenant", &self.tenant),
        ];
        if wants.iter().all(|(_, v)| v.is_none()) {
            return true;
        }
        let env: serde_json::Value = serde_json::from_str(&d.task).unwrap_or_default();
        wants.iter().all(|(k, want)| {
            want.as_deref()
                .is_none_or(|w| env.get(*k).and_then(|v| v.as_str()) == Some(w))
        })
    }

    /// The dead stream's bounds for a walk newest first: (from, to) for `XREVRANGE`.
    fn newest_first_bounds(&self, before: Option<&str>) -> (String, String) {
        let from = match (before, self.until_ms) {
            (Some(b), _) => format!("({b}"),
            (None, Some(u)) => format!("({u}"),
            (None, None) => "+".into(),
        };
        let to = self.since_ms.map_or_else(|| "-".into(), |s| s.to_string());
        (from, to)
    }

    /// One line saying what this filter asks for, for the jobs' list.
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = self
            .fields()
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
            .collect();
        if let Some(s) = self.since_ms {
            parts.push(format!("since {}", super::when_ms(s)));
        }
        if let Some(u) = self.until_ms {
            parts.push(format!("until {}", super::when_ms(u)));
        }
        if parts.is_empty() {
            "every dead letter".into()
        } else {
            parts.join(", ")
        }
    }
}

/// A page of matching letters, newest first.
pub(super) struct Scan {
    pub letters: Vec<DeadLetter>,
    /// The last letter looked at, when there may be more: the next page starts after it.
    pub next: Option<String>,
    pub scanned: usize,
}

/// Up to `want` letters matching `f`, newest first, older than `before`, looking at no more
/// than `budget`.
pub(super) async fn scan(
    redis: &Client,
    keys: &QueueKeys,
    f: &DeadFilter,
    before: Option<&str>,
    want: usize,
    budget: usize,
) -> llmq_shared::queue::Result<Scan> {
    let (mut from, to) = f.newest_first_bounds(before);
    let (mut letters, mut scanned) = (Vec::new(), 0);
    loop {
        let count = 500.min(budget - scanned);
        let page = redis.dead_range(keys, &from, &to, count, true).await?;
        scanned += page.len();
        let last = page.last().map(|d| d.id.clone());
        let full = page.len() == count;
        for d in page {
            if letters.len() == want {
                // The next page starts at this one: nothing after the last kept is skipped.
                return Ok(Scan {
                    next: letters.last().map(|l: &DeadLetter| l.id.clone()),
                    letters,
                    scanned,
                });
            }
            if f.matches(&d) {
                letters.push(d);
            }
        }
        match last {
            Some(last) if full && scanned < budget => from = format!("({last}"),
            Some(last) if full => {
                return Ok(Scan {
                    letters,
                    next: Some(last),
                    scanned,
                });
            }
            _ => {
                return Ok(Scan {
                    letters,
                    next: None,
                    scanned,
                });
            }
        }
    }
}

/// An error as its group names it: numbers and ids made `#`, cut to 100 characters.
pub(super) fn group_of(error: &str) -> String {
    let mut out = String::new();
    let mut in_number = false;
    for c in error.chars() {
        if c.is_ascii_digit() || (in_number && c.is_ascii_hexdigit()) {
            if !in_number {
                out.push('#');
            }
            in_number = true;
        } else {
            in_number = false;
            out.push(c);
        }
        if out.chars().count() >= 100 {
            break;
        }
    }
    out
}

/// The letters' errors by group, most first: (group, class, count).
pub(super) fn groups(letters: &[DeadLetter]) -> Vec<(String, String, usize)> {
    let mut out: Vec<(String, String, usize)> = Vec::new();
    for d in letters {
        let g = group_of(&d.error);
        match out.iter_mut().find(|(k, c, _)| *k == g && *c == d.class) {
            Some(e) => e.2 += 1,
            None => out.push((g, d.class.clone(), 1)),
        }
    }
    out.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
    out
}

/// The longest run of a group's text without a `#`: the words to search its letters by.
pub(super) fn group_words(group: &str) -> String {
    group
        .split('#')
        .map(str::trim)
        .max_by_key(|s| s.len())
        .unwrap_or("")
        .to_owned()
}

/// One background replay or purge, as the page shows it.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub queue: String,
    pub replay: bool,
    pub filter: String,
    pub started: chrono::DateTime<chrono::Utc>,
    pub scanned: u64,
    pub matched: u64,
    pub done: u64,
    /// Letters it could not replay, with why (the first 20).
    pub refused: Vec<String>,
    pub refused_count: u64,
    pub finished: Option<chrono::DateTime<chrono::Utc>>,
    pub failed: Option<String>,
}

/// The jobs started by this server, newest first.
#[derive(Default)]
pub(crate) struct Jobs {
    list: Mutex<Vec<Arc<Mutex<Job>>>>,
    next: std::sync::atomic::AtomicU64,
}

impl Jobs {
    pub fn all(&self) -> Vec<Job> {
        self.list
            .lock()
            .map(|l| {
                l.iter()
                    .filter_map(|j| j.lock().ok().map(|j| j.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Starts replaying (or purging) what `filter` matches in `queue`, in the background.
    pub fn start(&self, redis: Client, queue: &str, filter: DeadFilter, replay: bool) -> u64 {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let job = Arc::new(Mutex::new(Job {
            queue: queue.to_owned(),
            replay,
            filter: filter.describe(),
            started: chrono::Utc::now(),
            scanned: 0,
            matched: 0,
            done: 0,
            refused: Vec::new(),
            refused_count: 0,
            finished: None,
            failed: None,
        }));
        if let Ok(mut l) = self.list.lock() {
            l.insert(0, Arc::clone(&job));
            l.truncate(JOBS_KEPT);
        }
        let keys = QueueKeys::new(queue);
        tokio::spawn(async move {
            let result = walk(&redis, &keys, &filter, replay, &job).await;
            if let Ok(mut j) = job.lock() {
                j.finished = Some(chrono::Utc::now());
                if let Err(e) = result {
                    j.failed = Some(e.to_string());
                }
                tracing::info!(
                    queue = j.queue,
                    replay,
                    filter = j.filter,
                    matched = j.matched,
                    done = j.done,
                    "dead letters job from llmq web ended"
                );
            }
        });
        id
    }
}

/// The job's walk: oldest first, 500 letters a read, up to the newest there at its start.
async fn walk(
    redis: &Client,
    keys: &QueueKeys,
    f: &DeadFilter,
    replay: bool,
    job: &Mutex<Job>,
) -> llmq_shared::queue::Result<()> {
    let newest = redis.dead_range(keys, "+", "-", 1, true).await?;
    let Some(end) = newest.first().map(|d| d.id.clone()) else {
        return Ok(());
    };
    let end_ms = end
        .split('-')
        .next()
        .and_then(|ms| ms.parse::<i64>().ok())
        .unwrap_or(i64::MAX);
    let until = match f.until_ms {
        Some(u) if u <= end_ms => format!("({u}"),
        _ => end,
    };
    let mut from = f.since_ms.map_or_else(|| "-".to_owned(), |s| s.to_string());
    loop {
        let page = redis.dead_range(keys, &from, &until, 500, false).await?;
        let Some(last) = page.last().map(|d| d.id.clone()) else {
            return Ok(());
        };
        let matching: Vec<DeadLetter> = page.iter().filter(|d| f.matches(d)).cloned().collect();
        let (mut done, mut refused) = (0u64, Vec::new());
        if replay {
            for d in &matching {
                match redis.replay(keys, d, None).await? {
                    Replayed::Enqueued | Replayed::Resumed(_) => done += 1,
                    Replayed::Gone => {}
                    Replayed::Refused(why) => refused.push(format!("{}: {why}", d.id)),
                }
            }
        } else {
            done = redis.purge(keys, &matching).await?;
        }
        if let Ok(mut j) = job.lock() {
            j.scanned += page.len() as u64;
            j.matched += matching.len() as u64;
            j.done += done;
            j.refused_count += refused.len() as u64;
            let room = 20usize.saturating_sub(j.refused.len());
            j.refused.extend(refused.into_iter().take(room));
        }
        if page.len() < 500 {
            return Ok(());
        }
        from = format!("({last}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_that_differ_by_numbers_and_ids_share_a_group() {
        assert_eq!(
            group_of("HTTP 429 from mock for task 7f3a9c: retry after 12 s"),
            group_of("HTTP 429 from mock for task 0b1e22: retry after 3 s")
        );
        assert_ne!(
            group_of("HTTP 429 rate limited"),
            group_of("HTTP 400 bad request")
        );
        assert_eq!(
            group_words("HTTP # from mock: retry after # s"),
            "from mock: retry after"
        );
    }
}
