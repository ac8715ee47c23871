//! The lines of a batch file, in llmq's own shape or in a provider's: an OpenAI Batch file
//! (`{"custom_id", "method", "url", "body"}` a line) or an Anthropic Message Batches file
//! (`{"custom_id", "params"}` a line, or the `{"requests": [...]}` body), told apart by the
//! first record. A provider's request becomes a task (its model the task's pin unless
//! `--route`); each result goes back in that provider's batch output shape, whichever
//! provider answered, so parsers written for the provider keep working.
//!
//! Everything here is a user's data: it is converted field by field into the neutral shape
//! (`conversation`), which the worker checks as it checks any task; nothing is evaluated.

use std::collections::BTreeSet;

use llmq_shared::conversation::{
    Content, Message, NamedTool, Part, ResponseFormat, Role, Tool, ToolCall, ToolChoice, ToolMode,
};
use llmq_shared::outcome::{Status, TaskRecord};
use serde::Deserialize;
use serde_json::{Map, Value, json};

/// One task of a batch file in llmq's own shape.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchTask {
    #[serde(default)]
    pub prompt: String,
    #[serde(default)]
    pub messages: Vec<Message>,
    #[serde(default)]
    pub tools: Vec<Tool>,
    #[serde(default)]
    pub tool_choice: Option<ToolChoice>,
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
    #[serde(rename = "type", default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub platform: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub timeout: Option<u64>,
    #[serde(default)]
    pub metadata: Option<Value>,
    #[serde(default)]
    pub system: Option<String>,
    #[serde(default)]
    pub chain_id: Option<String>,
    #[serde(default)]
    pub max_attempts: Option<u32>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub deadline: Option<String>,
    #[serde(default)]
    pub priority: Option<i64>,
    #[serde(default)]
    pub tenant: Option<String>,
    #[serde(default)]
    pub tags: std::collections::BTreeMap<String, String>,
    /// The task's id within its batch (as in OpenAI's and Anthropic's batch files): with the
    /// batch's id, it names the task's id and idempotency key.
    #[serde(default)]
    pub custom_id: Option<String>,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub idempotency_window: Option<String>,
}

/// Whose shape a batch file's lines have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Native,
    /// OpenAI's Batch API input: `{"custom_id", "method", "url", "body"}`.
    OpenAi,
    /// Anthropic's Message Batches: `{"custom_id", "params"}`.
    Anthropic,
}

impl Shape {
    /// The shape of a record, by the fields only a provider's line has.
    #[must_use]
    pub fn of(record: &Value) -> Self {
        let has = |k: &str| record.get(k).is_some();
        if has("params") {
            Self::Anthropic
        } else if has("body") || has("url") || has("method") {
            Self::OpenAi
        } else {
            Self::Native
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Native => "an llmq task",
            Self::OpenAi => "an OpenAI Batch line",
            Self::Anthropic => "an Anthropic Message Batches request",
        }
    }
}

/// The one endpoint of OpenAI's Batch API that llmq runs.
pub const OPENAI_CHAT: &str = "/v1/chat/completions";

/// Reads a batch's records as tasks, in the shape its first record has.
#[derive(Debug, Default)]
pub struct Reader {
    shape: Option<Shape>,
    /// Fields of the provider's request that are not carried over, said once each.
    dropped: BTreeSet<String>,
    /// Say nothing of them: a second read of a file whose first read said it.
    quiet: bool,
}

impl Reader {
    /// A reader that does not say which fields are not carried over.
    #[must_use]
    pub fn quiet() -> Self {
        Self {
            quiet: true,
            ..Self::default()
        }
    }

    /// The shape of the records read so far.
    #[must_use]
    pub fn shape(&self) -> Shape {
        self.shape.unwrap_or(Shape::Native)
    }

    /// The task in `record`, or what is wrong with it as a sentence (without where it is:
    /// the caller names that).
    ///
    /// # Errors
    /// The record is not a task of the file's shape.
    pub fn task(&mut self, record: Value) -> Result<BatchTask, String> {
        let shape = Shape::of(&record);
        let first = *self.shape.get_or_insert(shape);
        if shape != first {
            return Err(format!(
                "this is {} but the file's first record is {}; a batch file holds one kind",
                shape.name(),
                first.name()
            ));
        }
        match shape {
            Shape::Native => serde_json::from_value(record).map_err(|e| e.to_string()),
            Shape::OpenAi => self.openai(record),
            Shape::Anthropic => self.anthropic(record),
        }
    }

    fn openai(&mut self, record: Value) -> Result<BatchTask, String> {
        let mut line = object(record, "the line")?;
        let custom_id = custom_id(&mut line)?;
        let method = take_str(&mut line, "method")?;
        if method.as_deref() != Some("POST") {
            return Err("`method` must be \"POST\", as in OpenAI's Batch files".into());
        }
        let url = take_str(&mut line, "url")?.unwrap_or_default();
        if url != OPENAI_CHAT {
            return Err(format!(
                "`url` {} is not an endpoint llmq runs; llmq runs {OPENAI_CHAT} (chat completions)",
                Value::from(llmq_shared::text::excerpt(&url, 60))
            ));
        }
        let body = line.remove("body").ok_or("the line has no `body`")?;
        refuse_rest(&line, "the line")?;
        let body = object(body, "`body`")?;
        Ok(BatchTask {
            custom_id: Some(custom_id),
            ..self.openai_body(body)?
        })
    }

    /// The task of a chat completions request's body (a Batch line's, or one `llmq serve`
    /// takes).
    ///
    /// # Errors
    /// The body is not a request llmq can run; the sentence names the field.
    pub fn openai_body(&mut self, mut body: Map<String, Value>) -> Result<BatchTask, String> {
        let mut task = BatchTask {
            model: take_str(&mut body, "model")?,
            ..BatchTask::default()
        };
        let messages = body.remove("messages").ok_or("`body` has no `messages`")?;
        for m in array(messages, "`body.messages`")? {
            task.messages.push(openai_message(m)?);
        }
        if let Some(tools) = body.remove("tools") {
            for t in array(tools, "`body.tools`")? {
                task.tools.push(openai_tool(t)?);
            }
        }
        task.tool_choice = body
            .remove("tool_choice")
            .map(openai_tool_choice)
            .transpose()?;
        task.response_format = match body.remove("response_format") {
            Some(f) => openai_response_format(f)?,
            None => None,
        };
        let max_completion = take_u32(&mut body, "max_completion_tokens")?;
        task.max_tokens = take_u32(&mut body, "max_tokens")?.or(max_completion);
        task.temperature = take_f32(&mut body, "temperature")?;
        task.metadata = body.remove("metadata").filter(|m| !m.is_null());
        self.dropped_fields("body", body);
        Ok(task)
    }

    fn anthropic(&mut self, record: Value) -> Result<BatchTask, String> {
        let mut line = object(record, "the request")?;
        let custom_id = custom_id(&mut line)?;
        let params = line.remove("params").unwrap_or_default();
        refuse_rest(&line, "the request")?;
        let params = object(params, "`params`")?;
        Ok(BatchTask {
            custom_id: Some(custom_id),
            ..self.anthropic_params(params)?
        })
    }

    /// The task of a Messages API request's parameters (a Message Batches request's, or one
    /// `llmq serve` takes).
    ///
    /// # Errors
    /// The parameters are not a request llmq can run; the sentence names the field.
    pub fn anthropic_params(
        &mut self,
        mut params: Map<String, Value>,
    ) -> Result<BatchTask, String> {
        let mut task = BatchTask {
            model: take_str(&mut params, "model")?,
            max_tokens: take_u32(&mut params, "max_tokens")?,
            temperature: take_f32(&mut params, "temperature")?,
            ..BatchTask::default()
        };
        task.system = match params.remove("system") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(blocks) => Some(text_blocks(blocks, "`params.system`")?.join("\n\n")),
        };
        let messages = params
            .remove("messages")
            .ok_or("`params` has no `messages`")?;
        for m in array(messages, "`params.messages`")? {
            task.messages.extend(anthropic_message(m)?);
        }
        if let Some(tools) = params.remove("tools") {
            for t in array(tools, "`params.tools`")? {
                task.tools.push(anthropic_tool(t)?);
            }
        }
        task.tool_choice = params
            .remove("tool_choice")
            .map(anthropic_tool_choice)
            .transpose()?
            .flatten();
        // Structured outputs: `output_config.format`, or the older `output_format`.
        let format = match params.remove("output_config") {
            Some(Value::Object(mut c)) => {
                let format = c.remove("format");
                self.dropped_fields("params.output_config", c);
                format
            }
            Some(_) => return Err("`params.output_config` must be an object".into()),
            None => None,
        };
        if let Some(f) = format.or_else(|| params.remove("output_format")) {
            let mut f = object(f, "the output format")?;
            if take_str(&mut f, "type")?.as_deref() != Some("json_schema") {
                return Err("the output format's `type` must be \"json_schema\"".into());
            }
            let schema = f
                .remove("schema")
                .ok_or("the output format has no `schema`")?;
            task.response_format = Some(ResponseFormat::JsonSchema {
                schema,
                name: None,
                strict: None,
            });
        }
        task.metadata = params.remove("metadata").filter(|m| !m.is_null());
        self.dropped_fields("params", params);
        Ok(task)
    }

    /// Says once, on standard error, each field of a request llmq does not carry over.
    fn dropped_fields(&mut self, within: &str, rest: Map<String, Value>) {
        for key in rest.keys() {
            let name = format!("`{within}.{}`", llmq_shared::text::excerpt(key, 40));
            if self.dropped.insert(name.clone()) && !self.quiet {
                eprintln!(
                    "llmq: {name} is not carried over (llmq carries the model, messages, system, tools, tool choice, response format, max tokens, temperature and metadata); the tasks run without it"
                );
            }
        }
    }
}

fn object(value: Value, what: &str) -> Result<Map<String, Value>, String> {
    match value {
        Value::Object(o) => Ok(o),
        _ => Err(format!("{what} must be a JSON object")),
    }
}

fn array(value: Value, what: &str) -> Result<Vec<Value>, String> {
    match value {
        Value::Array(a) => Ok(a),
        _ => Err(format!("{what} must be an array")),
    }
}

fn take_str(o: &mut Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match o.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("`{key}` must be a string")),
    }
}

fn take_u32(o: &mut Map<String, Value>, key: &str) -> Result<Option<u32>, String> {
    match o.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| format!("`{key}` must be a whole number of tokens")),
    }
}

fn take_f32(o: &mut Map<String, Value>, key: &str) -> Result<Option<f32>, String> {
    match o.remove(key) {
        None | Some(Value::Null) => Ok(None),
        #[allow(clippy::cast_possible_truncation)]
        Some(v) => v
            .as_f64()
            .map(|f| Some(f as f32))
            .ok_or_else(|| format!("`{key}` must be a number")),
    }
}

/// A line's `custom_id`: the task's name within the batch, which both providers require.
fn custom_id(line: &mut Map<String, Value>) -> Result<String, String> {
    match take_str(line, "custom_id")? {
        Some(c) if !c.is_empty() => Ok(c),
        _ => Err("the line has no `custom_id`; give each line an id of its own".into()),
    }
}

/// Refuses fields a provider's line does not have, as the provider would.
fn refuse_rest(line: &Map<String, Value>, what: &str) -> Result<(), String> {
    match line.keys().next() {
        Some(k) => Err(format!(
            "{what} has an unknown field `{}`",
            llmq_shared::text::excerpt(k, 40)
        )),
        None => Ok(()),
    }
}

/// One of OpenAI's chat messages as a neutral turn.
fn openai_message(m: Value) -> Result<Message, String> {
    let mut m = object(m, "a message")?;
    let role = match take_str(&mut m, "role")?.as_deref() {
        Some("system" | "developer") => Role::System,
        Some("user") => Role::User,
        Some("assistant") => Role::Assistant,
        Some("tool") => Role::Tool,
        other => {
            return Err(format!(
                "a message's `role` {} is not one llmq takes (system, developer, user, assistant, tool)",
                Value::from(llmq_shared::text::excerpt(other.unwrap_or(""), 20))
            ));
        }
    };
    let content = match m.remove("content") {
        None | Some(Value::Null) => Content::default(),
        Some(Value::String(s)) => Content::Text(s),
        Some(Value::Array(parts)) => {
            let parts = parts
                .into_iter()
                .map(openai_part)
                .collect::<Result<Vec<_>, _>>()?;
            one_text(parts)
        }
        Some(_) => return Err("a message's `content` must be text or an array of parts".into()),
    };
    let mut tool_calls = Vec::new();
    if let Some(calls) = m.remove("tool_calls") {
        for c in array(calls, "a message's `tool_calls`")? {
            let mut c = object(c, "a tool call")?;
            let id = take_str(&mut c, "id")?.ok_or("a tool call has no `id`")?;
            let mut f = object(
                c.remove("function")
                    .ok_or("a tool call has no `function`")?,
                "a tool call's `function`",
            )?;
            let name = take_str(&mut f, "name")?.ok_or("a tool call has no function `name`")?;
            // OpenAI sends the arguments as a JSON text.
            let arguments = match take_str(&mut f, "arguments")? {
                Some(text) => serde_json::from_str(&text).unwrap_or(Value::String(text)),
                None => Value::Null,
            };
            tool_calls.push(ToolCall {
                id,
                name,
                arguments,
                signature: None,
            });
        }
    }
    Ok(Message {
        role,
        content,
        tool_calls,
        tool_call_id: take_str(&mut m, "tool_call_id")?,
    })
}

/// One part of an OpenAI message: text, or an image by URL or `data:` URL.
fn openai_part(p: Value) -> Result<Part, String> {
    let mut p = object(p, "a content part")?;
    match take_str(&mut p, "type")?.as_deref() {
        Some("text") => Ok(Part::Text {
            text: take_str(&mut p, "text")?.unwrap_or_default(),
        }),
        Some("image_url") => {
            let mut image = object(
                p.remove("image_url").unwrap_or_default(),
                "an `image_url` part's `image_url`",
            )?;
            let url = take_str(&mut image, "url")?.ok_or("an `image_url` part has no `url`")?;
            Ok(image_at(url))
        }
        other => Err(format!(
            "a content part of type {} is not one llmq takes (text, image_url)",
            Value::from(llmq_shared::text::excerpt(other.unwrap_or(""), 20))
        )),
    }
}

/// An image at `url`, or inline when it is a `data:<type>;base64,` URL.
fn image_at(url: String) -> Part {
    if let Some(rest) = url.strip_prefix("data:")
        && let Some((media_type, data)) = rest.split_once(";base64,")
    {
        return Part::Image {
            url: None,
            data: Some(data.to_owned()),
            media_type: Some(media_type.to_owned()),
        };
    }
    Part::Image {
        url: Some(url),
        data: None,
        media_type: None,
    }
}

/// Parts as content: one text part as plain text.
fn one_text(mut parts: Vec<Part>) -> Content {
    if parts.len() == 1
        && let Some(Part::Text { text }) = parts.pop_if(|p| matches!(p, Part::Text { .. }))
    {
        return Content::Text(text);
    }
    Content::Parts(parts)
}

fn openai_tool(t: Value) -> Result<Tool, String> {
    let mut t = object(t, "a tool")?;
    if take_str(&mut t, "type")?.as_deref() != Some("function") {
        return Err("a tool's `type` must be \"function\"; llmq passes function tools".into());
    }
    let mut f = object(
        t.remove("function").ok_or("a tool has no `function`")?,
        "a tool's `function`",
    )?;
    Ok(Tool {
        name: take_str(&mut f, "name")?.ok_or("a tool has no function `name`")?,
        description: take_str(&mut f, "description")?,
        parameters: f
            .remove("parameters")
            .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
    })
}

fn openai_tool_choice(c: Value) -> Result<ToolChoice, String> {
    match c {
        Value::String(s) => serde_json::from_value(Value::String(s)).map_err(|_| {
            "`tool_choice` must be \"auto\", \"none\", \"required\" or a function".into()
        }),
        Value::Object(mut o) => {
            let name = o
                .remove("function")
                .and_then(|f| f.get("name").and_then(Value::as_str).map(str::to_owned))
                .ok_or("`tool_choice` names no function")?;
            Ok(ToolChoice::Named(NamedTool { name }))
        }
        _ => Err("`tool_choice` must be \"auto\", \"none\", \"required\" or a function".into()),
    }
}

fn openai_response_format(f: Value) -> Result<Option<ResponseFormat>, String> {
    let mut f = object(f, "`response_format`")?;
    match take_str(&mut f, "type")?.as_deref() {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(ResponseFormat::JsonObject)),
        Some("json_schema") => {
            let mut spec = object(
                f.remove("json_schema")
                    .ok_or("`response_format` has no `json_schema`")?,
                "`response_format.json_schema`",
            )?;
            Ok(Some(ResponseFormat::JsonSchema {
                schema: spec
                    .remove("schema")
                    .ok_or("`response_format.json_schema` has no `schema`")?,
                name: take_str(&mut spec, "name")?,
                strict: spec.remove("strict").and_then(|s| s.as_bool()),
            }))
        }
        _ => Err(
            "`response_format`'s `type` must be \"text\", \"json_object\" or \"json_schema\""
                .into(),
        ),
    }
}

/// The texts of a list of Anthropic text blocks (a system prompt's, a tool result's).
fn text_blocks(blocks: Value, what: &str) -> Result<Vec<String>, String> {
    array(blocks, what)?
        .into_iter()
        .map(|b| {
            let mut b = object(b, "a block")?;
            match take_str(&mut b, "type")?.as_deref() {
                Some("text") => Ok(take_str(&mut b, "text")?.unwrap_or_default()),
                _ => Err(format!("{what} may hold only text blocks")),
            }
        })
        .collect()
}

/// One of Anthropic's messages as neutral turns: a user message's tool results become tool
/// turns (before the rest of it), an assistant's tool uses its tool calls.
fn anthropic_message(m: Value) -> Result<Vec<Message>, String> {
    let mut m = object(m, "a message")?;
    let role = match take_str(&mut m, "role")?.as_deref() {
        Some("user") => Role::User,
        Some("assistant") => Role::Assistant,
        _ => return Err("a message's `role` must be \"user\" or \"assistant\"".into()),
    };
    let blocks = match m.remove("content") {
        Some(Value::String(s)) => return Ok(vec![Message::text(role, s)]),
        Some(Value::Array(blocks)) => blocks,
        _ => return Err("a message's `content` must be text or an array of blocks".into()),
    };
    let mut turns = Vec::new();
    let mut parts = Vec::new();
    let mut tool_calls = Vec::new();
    for b in blocks {
        let mut b = object(b, "a content block")?;
        match take_str(&mut b, "type")?.as_deref() {
            Some("text") => parts.push(Part::Text {
                text: take_str(&mut b, "text")?.unwrap_or_default(),
            }),
            Some("image") => {
                let mut source = object(
                    b.remove("source").ok_or("an image block has no `source`")?,
                    "an image's `source`",
                )?;
                parts.push(match take_str(&mut source, "type")?.as_deref() {
                    Some("base64") => Part::Image {
                        url: None,
                        data: take_str(&mut source, "data")?,
                        media_type: take_str(&mut source, "media_type")?,
                    },
                    Some("url") => Part::Image {
                        url: take_str(&mut source, "url")?,
                        data: None,
                        media_type: None,
                    },
                    _ => return Err("an image's `source` must be base64 or a URL".into()),
                });
            }
            Some("tool_use") if role == Role::Assistant => tool_calls.push(ToolCall {
                id: take_str(&mut b, "id")?.ok_or("a tool_use block has no `id`")?,
                name: take_str(&mut b, "name")?.ok_or("a tool_use block has no `name`")?,
                arguments: b.remove("input").unwrap_or_default(),
                signature: None,
            }),
            Some("tool_result") if role == Role::User => {
                let id = take_str(&mut b, "tool_use_id")?
                    .ok_or("a tool_result block has no `tool_use_id`")?;
                let text = match b.remove("content") {
                    None | Some(Value::Null) => String::new(),
                    Some(Value::String(s)) => s,
                    Some(blocks) => text_blocks(blocks, "a tool_result's `content`")?.join("\n\n"),
                };
                turns.push(Message {
                    tool_call_id: Some(id),
                    ..Message::text(Role::Tool, text)
                });
            }
            other => {
                return Err(format!(
                    "a {} message's content block of type {} is not one llmq takes (text, image, tool_use from the assistant, tool_result from the user)",
                    role.as_str(),
                    Value::from(llmq_shared::text::excerpt(other.unwrap_or(""), 30))
                ));
            }
        }
    }
    if !parts.is_empty() || !tool_calls.is_empty() {
        turns.push(Message {
            role,
            content: one_text(parts),
            tool_calls,
            tool_call_id: None,
        });
    }
    Ok(turns)
}

fn anthropic_tool(t: Value) -> Result<Tool, String> {
    let mut t = object(t, "a tool")?;
    if let Some(kind) = take_str(&mut t, "type")?.filter(|k| k != "custom") {
        return Err(format!(
            "the tool of type {} is one of Anthropic's own; llmq passes tools of yours (name, description, input_schema)",
            Value::from(llmq_shared::text::excerpt(&kind, 40))
        ));
    }
    Ok(Tool {
        name: take_str(&mut t, "name")?.ok_or("a tool has no `name`")?,
        description: take_str(&mut t, "description")?,
        parameters: t
            .remove("input_schema")
            .ok_or("a tool has no `input_schema`")?,
    })
}

/// Anthropic's tool choice; `None` for `auto` (the default).
fn anthropic_tool_choice(c: Value) -> Result<Option<ToolChoice>, String> {
    let mut c = object(c, "`tool_choice`")?;
    Ok(match take_str(&mut c, "type")?.as_deref() {
        Some("auto") => None,
        Some("any") => Some(ToolChoice::Mode(ToolMode::Required)),
        Some("none") => Some(ToolChoice::Mode(ToolMode::None)),
        Some("tool") => Some(ToolChoice::Named(NamedTool {
            name: take_str(&mut c, "name")?.ok_or("`tool_choice` names no tool")?,
        })),
        _ => return Err("`tool_choice`'s `type` must be auto, any, tool or none".into()),
    })
}

/// A task's result as a line of its provider's batch output: OpenAI's
/// `{id, custom_id, response: {status_code, request_id, body: <chat.completion>}, error}`,
/// Anthropic's `{custom_id, result: {type, ...}}`. A task still unfinished is `expired`, as a
/// provider reports a request its batch's window closed on. `llmq` holds the task's id,
/// provider and cost.
#[must_use]
pub fn result_line(shape: Shape, custom_id: &str, r: &TaskRecord) -> Value {
    let id = r.task_id.uuid().simple().to_string();
    let mut line = match shape {
        // A batch of llmq's own tasks writes its report instead; OpenAI's shape if asked.
        Shape::OpenAi | Shape::Native => openai_result(&id, r),
        Shape::Anthropic => anthropic_result(&id, r),
    };
    line["custom_id"] = Value::from(custom_id);
    line["llmq"] = json!({
        "task_id": r.task_id,
        "status": r.status.as_str(),
        "provider": r.provider,
        "model": r.model,
        "cost_usd": r.cost_usd,
        "duplicate_of": r.duplicate_of,
    });
    line
}

fn openai_result(id: &str, r: &TaskRecord) -> Value {
    let error = |code: &str, message: String| json!({"code": code, "message": message});
    let (response, error) = match r.status {
        Status::Succeeded => {
            let body = chat_completion(id, r);
            let response =
                json!({"status_code": 200, "request_id": format!("req_{id}"), "body": body});
            (response, Value::Null)
        }
        Status::Cancelled => (
            Value::Null,
            error(
                "batch_cancelled",
                "The task was cancelled before it ran.".into(),
            ),
        ),
        Status::Failed | Status::Dead => (
            Value::Null,
            error(
                r.error_class.map_or("failed", |c| c.as_str()),
                r.error.clone().unwrap_or_else(|| "The task failed.".into()),
            ),
        ),
        Status::Queued | Status::Delayed | Status::Running => (
            Value::Null,
            error(
                "batch_expired",
                "The task had not finished when the wait ended.".into(),
            ),
        ),
    };
    json!({"id": format!("batch_req_{id}"), "response": response, "error": error})
}

/// OpenAI's finish reason for a succeeded task's record.
#[must_use]
pub fn finish_reason(r: &TaskRecord) -> &'static str {
    if !r.tool_calls.is_empty() {
        "tool_calls"
    } else if r.truncated {
        "length"
    } else {
        "stop"
    }
}

/// A succeeded task's record as OpenAI's `chat.completion` (`chatcmpl-<id>`).
#[must_use]
pub fn chat_completion(id: &str, r: &TaskRecord) -> Value {
    let calls: Vec<Value> = r
        .tool_calls
        .iter()
        .map(|c| {
            json!({"id": c.id, "type": "function", "function": {
                "name": c.name, "arguments": c.arguments_object().to_string()}})
        })
        .collect();
    let text = r.output.clone().unwrap_or_default();
    let mut message = json!({
        "role": "assistant",
        "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { text.into() },
        "refusal": null,
    });
    if !calls.is_empty() {
        message["tool_calls"] = calls.into();
    }
    json!({
        "id": format!("chatcmpl-{id}"),
        "object": "chat.completion",
        "created": r.finished_at.map_or(0, |t| t.timestamp()),
        "model": r.model.clone().unwrap_or_default(),
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": finish_reason(r),
        }],
        "usage": {
            "prompt_tokens": r.input_tokens,
            "completion_tokens": r.output_tokens,
            "total_tokens": r.input_tokens + r.output_tokens,
            "prompt_tokens_details": {"cached_tokens": r.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": r.reasoning_tokens},
        },
    })
}

/// A succeeded task's record as Anthropic's `message` (`msg_<id>`).
#[must_use]
pub fn anthropic_reply(id: &str, r: &TaskRecord) -> Value {
    let mut content: Vec<Value> = Vec::new();
    if let Some(text) = r.output.as_deref().filter(|t| !t.is_empty()) {
        content.push(json!({"type": "text", "text": text}));
    }
    content.extend(r.tool_calls.iter().map(
        |c| json!({"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments_object()}),
    ));
    json!({
        "id": format!("msg_{id}"),
        "type": "message",
        "role": "assistant",
        "model": r.model.clone().unwrap_or_default(),
        "content": content,
        "stop_reason": if !r.tool_calls.is_empty() {
            "tool_use"
        } else if r.truncated {
            "max_tokens"
        } else {
            "end_turn"
        },
        "stop_sequence": null,
        "usage": {
            // Anthropic counts cache reads apart from the input; llmq within it.
            "input_tokens": r.input_tokens.saturating_sub(r.cached_tokens),
            "cache_read_input_tokens": r.cached_tokens,
            "cache_creation_input_tokens": 0,
            "output_tokens": r.output_tokens,
        },
    })
}

fn anthropic_result(id: &str, r: &TaskRecord) -> Value {
    let result = match r.status {
        Status::Succeeded => {
            json!({"type": "succeeded", "message": anthropic_reply(id, r)})
        }
        Status::Cancelled => json!({"type": "canceled"}),
        Status::Failed | Status::Dead => {
            let kind = match r.error_class {
                Some(
                    llmq_shared::outcome::ErrorClass::Fatal
                    | llmq_shared::outcome::ErrorClass::Invalid,
                ) => "invalid_request_error",
                Some(llmq_shared::outcome::ErrorClass::RateLimited) => "rate_limit_error",
                _ => "api_error",
            };
            json!({"type": "errored", "error": {"type": "error", "error": {
                "type": kind,
                "message": r.error.clone().unwrap_or_else(|| "The task failed.".into()),
            }}})
        }
        Status::Queued | Status::Delayed | Status::Running => json!({"type": "expired"}),
    };
    json!({"result": result})
}

#[cfg(test)]
mod tests;
