//! What the three batch APIs share: a batch's items and their answers, when it ends and how,
//! and the task that answers its items. The wire formats are `openai::batch` (files and
//! batches), `anthropic::batch` (Message Batches) and `gemini::batch` (inlined
//! `batchGenerateContent`).
//!
//! A batch is created in progress. The first poll (a GET of the batch) always sees it still
//! in progress; a later one sees it ended once [`MockOptions::batch_delay`] has passed since
//! its creation and, for a batch that runs, once all its items have been answered. Its items
//! are answered by a background task that starts after the delay, a few at a time, each by the
//! format's own route handler called in-process, so magic models, markers and counters work as
//! for a single request. Cancelling stops that task; the batch ends cancelled on the next
//! poll, with the items answered so far kept.

use super::*;

use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::StreamExt;

/// How many items of one batch are answered at the same time.
const BATCH_PARALLEL: usize = 8;
/// How long a batch may take before it expires, as every provider has it.
pub(super) const BATCH_WINDOW: chrono::TimeDelta = chrono::TimeDelta::hours(24);

/// Which API a batch came in by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Format {
    OpenAi,
    Anthropic,
    Gemini,
}

/// What the batch's model asks of the batch as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fate {
    /// Its items are answered, each by its own magic.
    Run,
    /// `batch-expire`: ends expired, no item answered.
    Expire,
    /// `batch-fail`: ends failed, no item answered.
    Fail,
    /// `batch-stuck`: never ends until cancelled.
    Stuck,
}

impl Fate {
    fn of(model: &str) -> Self {
        match model.trim() {
            "batch-expire" => Fate::Expire,
            "batch-fail" => Fate::Fail,
            "batch-stuck" => Fate::Stuck,
            _ => Fate::Run,
        }
    }
}

/// How a batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    Completed,
    Expired,
    Failed,
    Cancelled,
}

/// An item's answer: the status and JSON body its format's route gave.
#[derive(Debug, Clone)]
pub(super) struct Reply {
    pub(super) status: u16,
    pub(super) body: Value,
}

impl Reply {
    pub(super) fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// One request of a batch.
#[derive(Debug, Clone)]
pub(super) struct Item {
    /// The caller's name for it: `custom_id`, or Gemini's `metadata.key` (else its index).
    pub(super) key: String,
    /// The model it names (counted in [`MockServer::batch_items`]).
    pub(super) model: String,
    /// The request body, as its format's single-request route takes it.
    pub(super) body: Value,
    /// Gemini's metadata for the item, given back with its answer.
    pub(super) metadata: Value,
}

/// A batch, whatever its format.
pub(super) struct Batch {
    pub(super) format: Format,
    /// The model of the batch as a whole, which chooses its [`Fate`].
    pub(super) model: String,
    pub(super) fate: Fate,
    pub(super) created: DateTime<Utc>,
    pub(super) items: Vec<Item>,
    /// The answer of each item, in the order of `items`, once it has one.
    pub(super) replies: Vec<Option<Reply>>,
    /// When a poll first saw it (in progress from then on).
    pub(super) started: Option<DateTime<Utc>>,
    /// Every item has been answered.
    work_done: bool,
    pub(super) cancel_at: Option<DateTime<Utc>>,
    pub(super) ended: Option<(End, DateTime<Utc>)>,
    /// Stops the task answering the items (a child of the server's shutdown token).
    token: CancellationToken,
    /// The format's own fields (OpenAI's file ids and metadata, Gemini's display name).
    pub(super) extra: Value,
}

impl Batch {
    pub(super) fn new(
        state: &Shared,
        format: Format,
        model: String,
        items: Vec<Item>,
        extra: Value,
    ) -> Self {
        Self {
            format,
            fate: Fate::of(&model),
            model,
            created: Utc::now(),
            replies: vec![None; items.len()],
            items,
            started: None,
            work_done: false,
            cancel_at: None,
            ended: None,
            token: state.shutdown.child_token(),
            extra,
        }
    }

    /// Moves the batch on as a poll sees it; true when this poll ended it. The first poll
    /// only starts it, so a client always sees it in progress at least once.
    pub(super) fn poll(&mut self, delay: Duration) -> bool {
        if self.ended.is_some() {
            return false;
        }
        let now = Utc::now();
        if self.cancel_at.is_some() {
            self.end(End::Cancelled, now);
            return true;
        }
        if self.started.is_none() {
            self.started = Some(now);
            return false;
        }
        let due = (now - self.created).to_std().unwrap_or_default() >= delay;
        let end = match self.fate {
            Fate::Stuck => None,
            Fate::Expire => due.then_some(End::Expired),
            Fate::Fail => due.then_some(End::Failed),
            Fate::Run => self.work_done.then_some(End::Completed),
        };
        match end {
            Some(end) => {
                self.end(end, now);
                true
            }
            None => false,
        }
    }

    /// Asks the batch to stop; false when it had already ended.
    pub(super) fn cancel(&mut self) -> bool {
        if self.ended.is_some() {
            return false;
        }
        self.cancel_at.get_or_insert_with(Utc::now);
        self.token.cancel();
        true
    }

    fn end(&mut self, end: End, at: DateTime<Utc>) {
        self.ended = Some((end, at));
        self.token.cancel();
    }

    pub(super) fn end_kind(&self) -> Option<End> {
        self.ended.map(|(end, _)| end)
    }

    /// (answered with a 2xx, answered with an error, not answered).
    pub(super) fn counts(&self) -> (u64, u64, u64) {
        let mut out = (0, 0, 0);
        for reply in &self.replies {
            match reply {
                Some(r) if r.ok() => out.0 += 1,
                Some(_) => out.1 += 1,
                None => out.2 += 1,
            }
        }
        out
    }

    /// When it was last changed, as far as a client can tell.
    pub(super) fn updated(&self) -> DateTime<Utc> {
        [self.ended.map(|(_, at)| at), self.cancel_at, self.started]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(self.created)
    }
}

/// An uploaded or written OpenAI file: its File object, its bytes, and (for an input file)
/// the requests it holds.
pub(super) struct StoredFile {
    pub(super) object: Value,
    pub(super) bytes: Bytes,
    pub(super) items: Vec<Item>,
}

/// The batches and files of a server, kept for its lifetime.
#[derive(Default)]
pub(super) struct Batches {
    pub(super) all: Mutex<HashMap<String, Batch>>,
    pub(super) files: Mutex<HashMap<String, StoredFile>>,
    /// Batches created per model of the batch.
    created: Mutex<HashMap<String, u64>>,
    /// Items answered in batches, per model of the item.
    answered: Mutex<HashMap<String, u64>>,
}

impl Batches {
    pub(super) fn created(&self, model: &str) -> u64 {
        lock(&self.created).get(model).copied().unwrap_or(0)
    }

    pub(super) fn files(&self) -> usize {
        lock(&self.files).len()
    }

    pub(super) fn answered(&self, model: &str) -> u64 {
        lock(&self.answered).get(model).copied().unwrap_or(0)
    }

    pub(super) fn created_by_model(&self) -> HashMap<String, u64> {
        lock(&self.created).clone()
    }

    pub(super) fn answered_by_model(&self) -> HashMap<String, u64> {
        lock(&self.answered).clone()
    }

    /// A page of `format`'s batches, newest first, as `f` shows each: at most `size` after the
    /// batch `after` (exclusive), and whether more follow.
    pub(super) fn page<R>(
        &self,
        format: Format,
        size: usize,
        after: Option<&str>,
        f: impl Fn(&str, &Batch) -> R,
    ) -> (Vec<(String, R)>, bool) {
        let all = lock(&self.all);
        let mut mine: Vec<(&String, &Batch)> =
            all.iter().filter(|(_, b)| b.format == format).collect();
        mine.sort_by(|a, b| b.1.created.cmp(&a.1.created).then(b.0.cmp(a.0)));
        let start = after
            .and_then(|a| mine.iter().position(|(id, _)| id.as_str() == a))
            .map_or(0, |i| i + 1);
        let rest = &mine[start.min(mine.len())..];
        let page = rest
            .iter()
            .take(size)
            .map(|(id, b)| ((*id).clone(), f(id, b)))
            .collect();
        (page, rest.len() > size)
    }

    /// Runs `f` on batch `id`; `None` when there is no such batch (or it is of another
    /// format).
    pub(super) fn with<R>(
        &self,
        id: &str,
        format: Format,
        f: impl FnOnce(&mut Batch) -> R,
    ) -> Option<R> {
        lock(&self.all)
            .get_mut(id)
            .filter(|b| b.format == format)
            .map(f)
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Keeps a new batch under `id`, counts it and, unless its model says otherwise, starts
/// answering its items once [`MockOptions::batch_delay`] has passed.
pub(super) fn start(state: &Arc<Shared>, id: &str, batch: Batch) {
    *lock(&state.batch.created)
        .entry(batch.model.clone())
        .or_insert(0) += 1;
    let run = (batch.fate == Fate::Run).then(|| {
        (
            batch.format,
            batch.items.clone(),
            batch.token.clone(),
            batch.model.clone(),
        )
    });
    lock(&state.batch.all).insert(id.to_owned(), batch);
    if let Some((format, items, token, model)) = run {
        tokio::spawn(answer_all(
            Arc::clone(state),
            id.to_owned(),
            format,
            model,
            items,
            token,
        ));
    }
}

/// Answers a batch's items, [`BATCH_PARALLEL`] at a time, after the batch delay; stops when
/// the batch is cancelled or the server shuts down.
async fn answer_all(
    state: Arc<Shared>,
    id: String,
    format: Format,
    model: String,
    items: Vec<Item>,
    token: CancellationToken,
) {
    let work = async {
        tokio::time::sleep(state.opts.batch_delay).await;
        futures_util::stream::iter(items.into_iter().enumerate())
            .map(|(i, item)| {
                let state = Arc::clone(&state);
                let model = model.clone();
                async move {
                    let reply = answer(&state, format, &model, &item).await;
                    (i, item.model, reply)
                }
            })
            .buffer_unordered(BATCH_PARALLEL)
            .for_each(|(i, model, reply)| {
                *lock(&state.batch.answered).entry(model).or_insert(0) += 1;
                if let Some(b) = lock(&state.batch.all).get_mut(&id)
                    && b.ended.is_none()
                    && b.cancel_at.is_none()
                    && let Some(slot) = b.replies.get_mut(i)
                {
                    *slot = Some(reply);
                }
                std::future::ready(())
            })
            .await;
    };
    tokio::select! {
        () = work => {
            if let Some(b) = lock(&state.batch.all).get_mut(&id) {
                b.work_done = true;
            }
        }
        () = token.cancelled() => {}
    }
}

/// One item, answered by its format's route handler in-process.
async fn answer(state: &Arc<Shared>, format: Format, batch_model: &str, item: &Item) -> Reply {
    let response = match format {
        Format::OpenAi => openai::batch_item(state, item).await,
        Format::Anthropic => anthropic::batch_item(state, item).await,
        Format::Gemini => gemini::batch_item(state, batch_model, item).await,
    };
    let status = response.status().as_u16();
    let body = axum::body::to_bytes(response.into_body(), BODY_LIMIT)
        .await
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    Reply { status, body }
}

/// A new id: letters and digits only, safe anywhere in a URL path.
pub(super) fn new_id() -> String {
    short_id()
}

/// RFC 3339 with microseconds and `Z`, as Anthropic and Google write times.
pub(super) fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// This server's base URL as the client reached it: the request's authority or `Host`,
/// else the address it listens on.
pub(super) fn base_url(state: &Shared, uri: &Uri, headers: &HeaderMap) -> String {
    let host = uri
        .authority()
        .map(ToString::to_string)
        .or_else(|| {
            headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .or_else(|| state.addr.get().map(ToString::to_string))
        .unwrap_or_else(|| "127.0.0.1".to_owned());
    format!("http://{host}")
}
