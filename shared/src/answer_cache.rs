//! The answer cache's rules: which tasks it answers (a task's `cache`, else its queue's
//! `answer_cache.queues` entry), and what makes two requests identical. And the provider
//! prompt cache's warm-up: which requests share a prompt prefix worth warming. The Redis side
//! (the answers kept, the single flights) is `crate::queue::answers`.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::AnswerCache;
use crate::conversation::{Message, ResponseFormat, Tool, ToolCall, ToolChoice};
use crate::envelope::{CacheAsk, Envelope, Risk, Tier, samples};
use crate::ids::TaskId;

/// How a task uses the answer cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Use {
    /// Not at all.
    Off,
    /// Answered from it when an identical request's answer is kept; its own answer kept for
    /// `ttl`.
    On { ttl: Duration },
    /// The task asks for it but cannot be cached: a dead letter, with this field and reason.
    Refused { field: String, message: String },
}

/// How `env`, on `queue`, uses the answer cache of `config`.
#[must_use]
pub fn use_of(config: &AnswerCache, queue: &str, env: &Envelope) -> Use {
    // The common case, no cache anywhere: a field check.
    if env.cache.is_none() && config.queues.is_empty() {
        return Use::Off;
    }
    let uncacheable = env
        .tools
        .iter()
        .position(|t| config.uncacheable_tools.contains(&t.name));
    match env.cache.as_deref() {
        Some(CacheAsk::Use(false)) => Use::Off,
        Some(ask @ CacheAsk::Keep(_)) => match (uncacheable, ask.ttl()) {
            (Some(i), _) => Use::Refused {
                field: format!("tools[{i}]"),
                message: format!(
                    "`{}` is in the provider file's answer_cache.uncacheable_tools: its calls depend on more than the request; drop `cache` or the tool",
                    crate::text::excerpt(&env.tools[i].name, 64)
                ),
            },
            (None, Some(ttl)) => Use::On { ttl },
            // The envelope's own check refused anything else.
            (None, None) => Use::Off,
        },
        Some(CacheAsk::Use(true)) | None => match config.queues.get(queue) {
            Some(q)
                if uncacheable.is_none()
                    && !env.streams()
                    && (q.sampled || !samples(env.temperature)) =>
            {
                Use::On { ttl: q.ttl }
            }
            _ => Use::Off,
        },
    }
}

/// What makes two requests identical: what the model reads, how it is asked, and what picks
/// it. Not the task's id, times, attempts, priority or metadata.
#[derive(Serialize)]
struct Request<'a> {
    v: u8,
    provider: Option<&'a str>,
    model: Option<&'a str>,
    task_type: Option<&'a str>,
    risk: Option<Risk>,
    area: Option<&'a str>,
    min_tier: Option<Tier>,
    fallback: Option<bool>,
    system: Option<&'a str>,
    messages: &'a [Message],
    prompt: &'a str,
    tools: &'a [Tool],
    tool_choice: Option<&'a ToolChoice>,
    response_format: Option<&'a ResponseFormat>,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    /// `None` when tenants share answers.
    tenant: Option<&'a str>,
}

/// The request's name in the cache: a SHA-256 of what makes it identical, in hex. A
/// cryptographic hash, so no task can be made to collide with another's request and read its
/// answer. `None` when the request cannot be written out whole (then it is not cached: a
/// part of it would name it).
#[must_use]
pub fn request_hash(env: &Envelope, share_across_tenants: bool) -> Option<String> {
    let request = Request {
        v: 1,
        provider: env.provider.as_deref(),
        model: env.model.as_deref(),
        task_type: env.task_type.as_deref(),
        risk: env.risk,
        area: env.area.as_deref(),
        min_tier: env.min_tier,
        fallback: env.fallback,
        system: env.system.as_deref(),
        messages: &env.messages,
        prompt: &env.prompt,
        tools: &env.tools,
        tool_choice: env.tool_choice.as_deref(),
        response_format: env.response_format.as_deref(),
        max_tokens: env.max_tokens,
        temperature: env.temperature,
        tenant: if share_across_tenants {
            None
        } else {
            env.tenant.as_deref()
        },
    };
    json_sha256(&request)
}

/// The SHA-256 of `value`'s JSON, in hex; `None` when it cannot be written out whole.
fn json_sha256(value: &impl Serialize) -> Option<String> {
    let mut hasher = Sha256::new();
    serde_json::to_writer(HashWriter(&mut hasher), value).ok()?;
    Some(hex(&hasher.finalize()))
}

/// The name of `req`'s stable prompt prefix (its tools, system prompt and turns before the
/// last) when a provider of `kind` caches it for `req.model` (Anthropic's and OpenAI's
/// minimums) and the request asks for prompt caching: requests sharing it are sent so that
/// one call warms the cache before the others read it. `None` for a request with nothing
/// worth caching.
#[must_use]
pub fn warm_prefix(req: &crate::provider::Request, kind: crate::config::Kind) -> Option<String> {
    let min = crate::provider::min_cached_tokens(kind, req.model)?;
    if !req.prompt_cache {
        return None;
    }
    // Up to the first point long enough to be cached: tasks that share their tools or
    // system prompt share it whatever their conversations say after.
    let prefix = req.cache_prefix();
    let long = |n: Option<u64>| n.is_some_and(|n| n >= min);
    let (system, leading) = if long(prefix.tools) {
        (None, &[][..])
    } else if long(prefix.system) {
        (req.system_text(), &[][..])
    } else if long(prefix.leading) {
        let leading = if req.prompt.is_empty() {
            &req.messages[..req.messages.len().saturating_sub(1)]
        } else {
            &req.messages[..]
        };
        (req.system_text(), leading)
    } else {
        return None;
    };
    json_sha256(&(&req.tools, system.as_deref(), leading))
}

fn hex(bytes: &[u8]) -> String {
    let mut hex = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        use std::fmt::Write;
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

/// Feeds serde_json's output straight into the hash, without a buffer.
struct HashWriter<'a>(&'a mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An answer as the cache keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedAnswer {
    /// The task whose call answered.
    pub task_id: TaskId,
    pub provider: String,
    pub model: String,
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// What the call cost at list prices: what each hit saves.
    pub list_cost_usd: f64,
}

#[cfg(test)]
mod tests;
