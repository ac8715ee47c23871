//! What a task can ask of a model beyond one prompt: earlier turns of a conversation
//! (`messages`), tools it may call (`tools`, `tool_choice`) and JSON that fits a schema
//! (`response_format`). One neutral shape, close to OpenAI's (the one most producers know);
//! each wire format turns it into its own in `provider`.
//!
//! Everything here comes from a task and is untrusted data: it is checked where it enters
//! ([`check`]), never executed (llmq never runs a tool call), and a schema is compiled with
//! no remote references and linear-time patterns.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Who said a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::Tool => "tool",
        }
    }
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: Role,
    /// The turn's text, or its parts. May be empty only for an assistant turn that calls
    /// tools.
    #[serde(default)]
    pub content: Content,
    /// An assistant turn's tool calls (the model's, from an earlier answer).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// A tool turn: the id of the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl Message {
    /// A turn of plain text.
    #[must_use]
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        Self {
            role,
            content: Content::Text(text.into()),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

/// A turn's content: text, or a list of parts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

impl Default for Content {
    fn default() -> Self {
        Self::Text(String::new())
    }
}

impl Content {
    /// The text of every part, joined by blank lines.
    #[must_use]
    pub fn joined(&self) -> String {
        match self {
            Self::Text(t) => t.clone(),
            Self::Parts(parts) => parts
                .iter()
                .filter_map(Part::text)
                .collect::<Vec<_>>()
                .join("\n\n"),
        }
    }

    fn texts(&self) -> Vec<&str> {
        match self {
            Self::Text(t) => vec![t.as_str()],
            Self::Parts(parts) => parts.iter().filter_map(Part::text).collect(),
        }
    }

    /// Its parts, when it has an image among them.
    #[must_use]
    pub fn with_images(&self) -> Option<&[Part]> {
        match self {
            Self::Parts(parts) if parts.iter().any(|p| matches!(p, Part::Image { .. })) => {
                Some(parts)
            }
            _ => None,
        }
    }

    fn is_blank(&self) -> bool {
        self.with_images().is_none() && self.texts().iter().all(|t| t.trim().is_empty())
    }
}

/// One part of a turn's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Part {
    Text {
        text: String,
    },
    /// An image: at a public `http(s)` URL, or as base64 `data` with its `media_type`.
    Image {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        url: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        media_type: Option<String>,
    },
}

/// The image types every provider that reads images accepts.
pub const IMAGE_TYPES: [&str; 4] = ["image/png", "image/jpeg", "image/gif", "image/webp"];

impl Part {
    /// The text of a text part.
    #[must_use]
    pub fn text(&self) -> Option<&str> {
        match self {
            Self::Text { text } => Some(text),
            Self::Image { .. } => None,
        }
    }

    /// An image's media type: as given, or from a URL's extension; `image/jpeg` otherwise.
    #[must_use]
    pub fn media_type(&self) -> &str {
        let Self::Image {
            url, media_type, ..
        } = self
        else {
            return "text/plain";
        };
        if let Some(t) = media_type {
            return t;
        }
        let lower = url.as_deref().unwrap_or_default().to_ascii_lowercase();
        let path = lower.split(['?', '#']).next().unwrap_or_default();
        IMAGE_TYPES
            .iter()
            .find(|t| {
                let ext = &t[6..];
                path.ends_with(&format!(".{ext}")) || (ext == "jpeg" && path.ends_with(".jpg"))
            })
            .copied()
            .unwrap_or("image/jpeg")
    }
}

/// A tool the model may call: a function with JSON-schema parameters. llmq passes it on and
/// returns the model's calls; it never runs them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tool {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON Schema of the arguments; an object with no properties when left out.
    #[serde(default = "empty_object_schema")]
    pub parameters: Value,
}

fn empty_object_schema() -> Value {
    serde_json::json!({"type": "object", "properties": {}})
}

/// Whether and which tool the model must call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ToolChoice {
    /// `"auto"` (the model decides), `"none"` (no tool) or `"required"` (some tool).
    Mode(ToolMode),
    /// `{"name": "..."}`: that tool.
    Named(NamedTool),
}

/// `{"name": "..."}` of a tool choice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedTool {
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ToolMode {
    Auto,
    None,
    Required,
}

/// A tool call the model made: which tool, with which arguments (a JSON object).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolCall {
    /// The provider's id for the call (made up as `call_<random>` where a format has none),
    /// which a later `tool` turn names.
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub arguments: Value,
    /// An opaque token the provider wants back with the call (Gemini's thought signature).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// An id for a call a provider gave none: unique, so a later tool turn names only it.
#[must_use]
pub fn made_up_call_id() -> String {
    format!("call_{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

impl ToolCall {
    /// The arguments as an object, as Anthropic and Gemini want them: an object as is,
    /// nothing as `{}`, anything else under `value`.
    #[must_use]
    pub fn arguments_object(&self) -> Value {
        match &self.arguments {
            Value::Object(_) => self.arguments.clone(),
            Value::Null => serde_json::json!({}),
            other => serde_json::json!({"value": other}),
        }
    }
}

/// The shape the answer must have.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResponseFormat {
    /// Any JSON object.
    JsonObject,
    /// JSON that validates against `schema`.
    JsonSchema {
        schema: Value,
        /// A name for the schema, where a format wants one (OpenAI); `answer` by default.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        /// Ask the provider to constrain decoding to the schema (OpenAI's `strict`; such
        /// schemas must close every object with `"additionalProperties": false`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        strict: Option<bool>,
    },
}

impl ResponseFormat {
    /// The schema's name for formats that want one.
    #[must_use]
    pub fn name(&self) -> &str {
        match self {
            Self::JsonSchema { name: Some(n), .. } => n,
            _ => "answer",
        }
    }

    /// Reads `text` as the JSON this format asks for: the value, or why not as a sentence.
    /// A fenced block (```json ... ```) around it is accepted, as models add one.
    ///
    /// # Errors
    /// The text is not JSON, not an object where one is asked for, or does not validate.
    pub fn read(&self, text: &str) -> Result<Value, String> {
        let trimmed = unfence(text);
        let value: Value = serde_json::from_str(trimmed).map_err(|e| {
            format!(
                "the answer is not JSON ({e}): {}",
                crate::text::excerpt(trimmed, 120)
            )
        })?;
        match self {
            Self::JsonObject if !value.is_object() => {
                Err("the answer is JSON but not an object, which response_format asks for".into())
            }
            Self::JsonObject => Ok(value),
            Self::JsonSchema { schema, .. } => {
                let validator = validator(schema)?;
                let errors: Vec<String> = validator
                    .iter_errors(&value)
                    .take(3)
                    .map(|e| {
                        let at = e.instance_path().to_string();
                        let at = if at.is_empty() { "/".into() } else { at };
                        format!("at {at}: {e}")
                    })
                    .collect();
                if errors.is_empty() {
                    Ok(value)
                } else {
                    Err(format!(
                        "the answer does not fit the schema: {}",
                        errors.join("; ")
                    ))
                }
            }
        }
    }
}

/// `text` without a Markdown code fence around it.
fn unfence(text: &str) -> &str {
    let t = text.trim();
    let Some(rest) = t.strip_prefix("```") else {
        return t;
    };
    let Some(body) = rest.strip_suffix("```") else {
        return t;
    };
    // The fence's info string (`json`) runs to the first newline.
    body.split_once('\n').map_or(body, |(_, b)| b).trim()
}

/// A validator for a schema from a task: draft from its `$schema` (2020-12 when it names
/// none), no remote references (a `$ref` to a URL fails to compile instead of fetching it),
/// and patterns matched in linear time by automata of bounded size, so no schema can make
/// a worker spin or take a lot of memory (a pattern too large to compile small is refused).
fn validator(schema: &Value) -> Result<jsonschema::Validator, String> {
    let patterns = jsonschema::PatternOptions::regex()
        .size_limit(PATTERN_BYTES)
        .dfa_size_limit(PATTERN_BYTES);
    jsonschema::options()
        .with_pattern_options(patterns)
        .build(schema)
        .map_err(|e| format!("{e}"))
}

/// The most memory one compiled pattern of a task's schema, and its lazy automaton's
/// cache, may take.
const PATTERN_BYTES: usize = 64 * 1024;

/// A field of a task that is wrong, and how: for the task's dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// The most tools a task may define (OpenAI's limit, the lowest of the providers').
pub const MAX_TOOLS: usize = 128;

/// Checks what a task asks beyond its prompt: every turn has a known role and content (a
/// tool turn its call's id), no text holds a NUL, every tool a name providers accept and a
/// parameter schema that compiles, a named tool choice names a defined tool, and a response
/// schema compiles.
///
/// # Errors
/// The first thing wrong, naming its field and the fix.
pub fn check(
    messages: &[Message],
    tools: &[Tool],
    tool_choice: Option<&ToolChoice>,
    response_format: Option<&ResponseFormat>,
) -> Result<(), Invalid> {
    check_messages(messages)?;
    check_tools(tools, tool_choice)?;
    check_format(response_format)
}

/// Each turn: its text, images and calls, every call answered by a tool turn.
fn check_messages(messages: &[Message]) -> Result<(), Invalid> {
    // Calls of the last assistant turn not yet answered, and every call id so far.
    let mut open: Vec<&str> = Vec::new();
    let mut ids: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for (i, m) in messages.iter().enumerate() {
        let at = |f: &str| format!("messages[{i}].{f}");
        let calls_only = m.role == Role::Assistant && !m.tool_calls.is_empty();
        if m.content.is_blank() && !calls_only {
            return Err(invalid(
                at("content"),
                "is empty; give the turn's text (only an assistant turn with tool_calls may have none)",
            ));
        }
        if m.content.texts().iter().any(|t| t.contains('\0')) {
            return Err(invalid(at("content"), NUL));
        }
        if let Content::Parts(parts) = &m.content {
            for (j, part) in parts.iter().enumerate() {
                check_image(&format!("messages[{i}].content[{j}]"), part)?;
            }
        }
        if m.content.with_images().is_some() && m.role != Role::User {
            return Err(invalid(at("content"), "only a user turn may carry images"));
        }
        if !m.tool_calls.is_empty() && m.role != Role::Assistant {
            return Err(invalid(
                at("tool_calls"),
                "only an assistant turn has tool calls",
            ));
        }
        if m.role != Role::Tool && !open.is_empty() {
            return Err(invalid(
                format!("messages[{i}]"),
                format!(
                    "comes before the call(s) {} of the assistant turn before it are answered; put a tool turn answering each call right after the turn that made it",
                    open.join(", ")
                ),
            ));
        }
        for (j, call) in m.tool_calls.iter().enumerate() {
            let at = format!("messages[{i}].tool_calls[{j}]");
            check_name(&format!("{at}.name"), &call.name)?;
            let id_ok = (1..=256).contains(&call.id.len())
                && call
                    .id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !id_ok {
                return Err(invalid(
                    format!("{at}.id"),
                    "must be 1 to 256 letters, digits, `_` or `-`: the id the tool turn answering it names",
                ));
            }
            if !ids.insert(call.id.as_str()) {
                return Err(invalid(
                    format!("{at}.id"),
                    format!(
                        "`{}` names another call too; give each call its own id",
                        call.id
                    ),
                ));
            }
            if !(call.arguments.is_object()
                || call.arguments.is_null()
                || call.arguments.is_string())
            {
                return Err(invalid(
                    format!("{at}.arguments"),
                    "must be a JSON object (or the text the model wrote)",
                ));
            }
            open.push(call.id.as_str());
        }
        match (m.role, &m.tool_call_id) {
            (Role::Tool, None) => {
                return Err(invalid(
                    at("tool_call_id"),
                    "is missing; a tool turn names the id of the call it answers",
                ));
            }
            (Role::Tool, Some(id)) => match open.iter().position(|c| c == id) {
                Some(k) => {
                    open.remove(k);
                }
                None => {
                    return Err(invalid(
                        at("tool_call_id"),
                        "names no unanswered call of the assistant turn right before; give the id of the call it answers",
                    ));
                }
            },
            (_, None) => {}
            (_, Some(_)) => {
                return Err(invalid(at("tool_call_id"), "belongs only to a tool turn"));
            }
        }
    }
    if !open.is_empty() {
        return Err(invalid(
            "messages",
            format!(
                "ends with the call(s) {} unanswered; add a tool turn answering each",
                open.join(", ")
            ),
        ));
    }
    Ok(())
}

/// The tools (at most [`MAX_TOOLS`], each named once with an object's schema) and what
/// `tool_choice` asks of them.
fn check_tools(tools: &[Tool], tool_choice: Option<&ToolChoice>) -> Result<(), Invalid> {
    if tools.len() > MAX_TOOLS {
        return Err(invalid(
            "tools",
            format!(
                "has {} tools; at most {MAX_TOOLS} are accepted",
                tools.len()
            ),
        ));
    }
    for (i, tool) in tools.iter().enumerate() {
        check_name(&format!("tools[{i}].name"), &tool.name)?;
        if tools[..i].iter().any(|t| t.name == tool.name) {
            return Err(invalid(
                format!("tools[{i}].name"),
                format!(
                    "`{}` is defined twice; give each tool its own name",
                    tool.name
                ),
            ));
        }
        if tool
            .description
            .as_deref()
            .is_some_and(|d| d.contains('\0'))
        {
            return Err(invalid(format!("tools[{i}].description"), NUL));
        }
        if tool.parameters.get("type").and_then(Value::as_str) != Some("object") {
            return Err(invalid(
                format!("tools[{i}].parameters"),
                "must be a JSON Schema of an object (\"type\": \"object\")",
            ));
        }
        validator(&tool.parameters).map_err(|e| {
            invalid(
                format!("tools[{i}].parameters"),
                format!("is not a valid JSON Schema: {e}"),
            )
        })?;
    }
    match tool_choice {
        Some(ToolChoice::Named(NamedTool { name })) if !tools.iter().any(|t| &t.name == name) => {
            return Err(invalid(
                "tool_choice",
                format!(
                    "names `{}`, which is not among the task's tools",
                    crate::text::excerpt(name, 64)
                ),
            ));
        }
        Some(ToolChoice::Mode(ToolMode::Required) | ToolChoice::Named(_)) if tools.is_empty() => {
            return Err(invalid(
                "tool_choice",
                "asks for a tool call, but the task defines no tools",
            ));
        }
        _ => {}
    }
    Ok(())
}

/// A JSON Schema asked for as the answer's format compiles.
fn check_format(response_format: Option<&ResponseFormat>) -> Result<(), Invalid> {
    if let Some(ResponseFormat::JsonSchema { schema, name, .. }) = response_format {
        if !schema.is_object() {
            return Err(invalid(
                "response_format.schema",
                "must be a JSON Schema (an object)",
            ));
        }
        validator(schema).map_err(|e| {
            invalid(
                "response_format.schema",
                format!("is not a valid JSON Schema: {e}"),
            )
        })?;
        if let Some(n) = name {
            check_name("response_format.name", n)?;
        }
    }
    Ok(())
}

/// An image part has a public `http(s)` URL or base64 data of a known type, not both.
fn check_image(field: &str, part: &Part) -> Result<(), Invalid> {
    let Part::Image {
        url,
        data,
        media_type,
    } = part
    else {
        return Ok(());
    };
    if let Some(t) = media_type
        && !IMAGE_TYPES.contains(&t.as_str())
    {
        return Err(invalid(
            format!("{field}.media_type"),
            format!(
                "`{}` is not an image type providers read; use one of {}",
                crate::text::excerpt(t, 40),
                IMAGE_TYPES.join(", ")
            ),
        ));
    }
    match (url, data) {
        (Some(url), None) => {
            let lower = url.to_ascii_lowercase();
            if !(lower.starts_with("https://") || lower.starts_with("http://"))
                || url.len() > 2048
                || url.chars().any(|c| c.is_control() || c.is_whitespace())
            {
                return Err(invalid(
                    format!("{field}.url"),
                    "must be an http or https URL of at most 2048 characters; send other images as base64 \"data\"",
                ));
            }
        }
        (None, Some(data)) => {
            if media_type.is_none() {
                return Err(invalid(
                    format!("{field}.media_type"),
                    format!("is needed with \"data\": one of {}", IMAGE_TYPES.join(", ")),
                ));
            }
            let base64 = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=');
            if data.is_empty() || !data.bytes().all(base64) {
                return Err(invalid(
                    format!("{field}.data"),
                    "must be the image's bytes in standard base64, without a data: prefix",
                ));
            }
        }
        _ => {
            return Err(invalid(
                field,
                "an image has either \"url\" or \"data\" (base64, with \"media_type\"), not both",
            ));
        }
    }
    Ok(())
}

/// How many images the turns carry, and whether any is by URL.
#[must_use]
pub fn images(messages: &[Message]) -> (u64, bool) {
    let parts = messages
        .iter()
        .filter_map(|m| m.content.with_images())
        .flatten();
    parts.fold((0, false), |(n, by_url), p| match p {
        Part::Image { url, .. } => (n + 1, by_url || url.is_some()),
        Part::Text { .. } => (n, by_url),
    })
}

/// Prompt tokens an image is reckoned at before the call (context windows and quota
/// reservations): about what Anthropic and OpenAI charge for a large one; the ledger gets
/// the provider's own count.
pub const IMAGE_TOKENS: u64 = 1_600;

const NUL: &str =
    "contains a NUL character (\\u0000), which cannot be stored or passed on; remove it";

/// A tool's or schema's name as every provider accepts it: 1 to 64 of `a-z A-Z 0-9 _ -`.
fn check_name(field: &str, name: &str) -> Result<(), Invalid> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!(
                "`{}` is not a name providers accept; use 1 to 64 letters, digits, `_` or `-`, starting with a letter or `_`",
                crate::text::excerpt(name, 64)
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse<T: serde::de::DeserializeOwned>(v: Value) -> T {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_schema_answer_is_read_validated_and_unfenced() {
        let format: ResponseFormat = parse(json!({
            "type": "json_schema",
            "schema": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
        }));
        assert_eq!(format.read("{\"n\": 3}").unwrap(), json!({"n": 3}));
        assert_eq!(
            format.read("```json\n{\"n\": 4}\n```").unwrap(),
            json!({"n": 4})
        );
        let e = format.read("{\"n\": \"three\"}").unwrap_err();
        assert!(
            e.starts_with("the answer does not fit the schema: at /n: "),
            "{e}"
        );
        let e = format.read("{}").unwrap_err();
        assert!(e.contains("\"n\" is a required property"), "{e}");
        let e = format.read("sure! here it is").unwrap_err();
        assert!(e.starts_with("the answer is not JSON"), "{e}");
        let object = ResponseFormat::JsonObject;
        assert!(object.read("[1]").unwrap_err().contains("not an object"));
    }

    #[test]
    fn each_kind_of_bad_request_names_its_field() {
        let user = Message::text(Role::User, "hi");
        let tool = |name: &str| Tool {
            name: name.into(),
            description: None,
            parameters: empty_object_schema(),
        };
        let field =
            |m: &[Message], t: &[Tool], c: Option<&ToolChoice>, f: Option<&ResponseFormat>| {
                check(m, t, c, f).unwrap_err().field
            };
        assert_eq!(
            field(&[Message::text(Role::User, " ")], &[], None, None),
            "messages[0].content"
        );
        assert_eq!(
            field(
                &[user.clone(), Message::text(Role::Tool, "42")],
                &[],
                None,
                None
            ),
            "messages[1].tool_call_id"
        );
        assert_eq!(
            field(&[Message::text(Role::User, "a\0b")], &[], None, None),
            "messages[0].content"
        );
        assert_eq!(
            field(std::slice::from_ref(&user), &[tool("")], None, None),
            "tools[0].name"
        );
        assert_eq!(
            field(std::slice::from_ref(&user), &[tool("rm -rf")], None, None),
            "tools[0].name"
        );
        assert_eq!(
            field(
                std::slice::from_ref(&user),
                &[tool("a"), tool("a")],
                None,
                None
            ),
            "tools[1].name"
        );
        let named = ToolChoice::Named(NamedTool {
            name: "nope".into(),
        });
        assert_eq!(
            field(
                std::slice::from_ref(&user),
                &[tool("a")],
                Some(&named),
                None
            ),
            "tool_choice"
        );
        let bad_schema = ResponseFormat::JsonSchema {
            schema: json!({"type": "no-such-type"}),
            name: None,
            strict: None,
        };
        assert_eq!(
            field(std::slice::from_ref(&user), &[], None, Some(&bad_schema)),
            "response_format.schema"
        );
        // A remote reference is not fetched: the schema does not compile, and nothing
        // connects to the address it names (a listener here would see it).
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let remote = ResponseFormat::JsonSchema {
            schema: json!({"$ref": format!("http://127.0.0.1:{port}/schema.json")}),
            name: None,
            strict: None,
        };
        assert_eq!(
            field(std::slice::from_ref(&user), &[], None, Some(&remote)),
            "response_format.schema"
        );
        assert_eq!(
            listener.accept().map(|_| ()).map_err(|e| e.kind()),
            Err(std::io::ErrorKind::WouldBlock),
            "the schema's $ref was fetched"
        );
        // Images: a URL or data, a known type, only from the user.
        let image = |url: Option<&str>, data: Option<&str>, media: Option<&str>| {
            vec![Message {
                content: Content::Parts(vec![Part::Image {
                    url: url.map(str::to_owned),
                    data: data.map(str::to_owned),
                    media_type: media.map(str::to_owned),
                }]),
                ..Message::text(Role::User, "")
            }]
        };
        check(
            &image(Some("https://x.test/a.png"), None, None),
            &[],
            None,
            None,
        )
        .unwrap();
        check(
            &image(None, Some("aGk="), Some("image/png")),
            &[],
            None,
            None,
        )
        .unwrap();
        for (bad, at) in [
            (
                image(Some("file:///etc/passwd"), None, None),
                "messages[0].content[0].url",
            ),
            (
                image(Some("https://x.test/a b.png"), None, None),
                "messages[0].content[0].url",
            ),
            (
                image(None, Some("aGk="), None),
                "messages[0].content[0].media_type",
            ),
            (
                image(None, Some("data:image/png;base64,aGk="), Some("image/png")),
                "messages[0].content[0].data",
            ),
            (
                image(None, Some("aGk="), Some("text/html")),
                "messages[0].content[0].media_type",
            ),
            (
                image(
                    Some("https://x.test/a.png"),
                    Some("aGk="),
                    Some("image/png"),
                ),
                "messages[0].content[0]",
            ),
            (image(None, None, None), "messages[0].content[0]"),
        ] {
            assert_eq!(field(&bad, &[], None, None), at);
        }
        let mut from_model = image(Some("https://x.test/a.png"), None, None);
        from_model[0].role = Role::Assistant;
        assert_eq!(field(&from_model, &[], None, None), "messages[0].content");
        // A tool call turn with no text is fine; the tool's answer names it.
        let call = Message {
            tool_calls: vec![ToolCall {
                id: "c1".into(),
                name: "a".into(),
                arguments: json!({}),
                signature: None,
            }],
            ..Message::text(Role::Assistant, "")
        };
        let answer = Message {
            tool_call_id: Some("c1".into()),
            ..Message::text(Role::Tool, "42")
        };
        check(
            &[user.clone(), call.clone(), answer.clone()],
            &[tool("a")],
            Some(&ToolChoice::Mode(ToolMode::Auto)),
            None,
        )
        .unwrap();
    }

    #[test]
    fn every_call_is_answered_right_after_the_turn_that_made_it() {
        let made = |ids: &[&str]| Message {
            tool_calls: ids
                .iter()
                .map(|id| ToolCall {
                    id: (*id).into(),
                    name: "a".into(),
                    arguments: json!({}),
                    signature: None,
                })
                .collect(),
            ..Message::text(Role::Assistant, "")
        };
        let answer = |id: &str| Message {
            tool_call_id: Some(id.into()),
            ..Message::text(Role::Tool, "42")
        };
        let user = || Message::text(Role::User, "go on");
        let field = |m: &[Message]| check(m, &[], None, None).map_err(|e| e.field);
        // Two calls at once, answered in any order, then the conversation goes on.
        assert_eq!(
            field(&[
                user(),
                made(&["c1", "c2"]),
                answer("c2"),
                answer("c1"),
                user()
            ]),
            Ok(())
        );
        assert_eq!(
            field(&[user(), made(&["c1", "c2"]), answer("c1")]),
            Err("messages".into()),
            "c2 is never answered"
        );
        assert_eq!(
            field(&[user(), made(&["c1"]), user(), answer("c1")]),
            Err("messages[2]".into()),
            "the answer must come right after"
        );
        assert_eq!(
            field(&[user(), made(&["c1"]), answer("c1"), answer("c1")]),
            Err("messages[3].tool_call_id".into()),
            "answered twice"
        );
        assert_eq!(
            field(&[
                user(),
                made(&["c1"]),
                answer("c1"),
                made(&["c1"]),
                answer("c1")
            ]),
            Err("messages[3].tool_calls[0].id".into()),
            "ids are unique"
        );
        assert_eq!(
            field(&[user(), made(&["call 1"])]),
            Err("messages[1].tool_calls[0].id".into())
        );
        // A name must start with a letter or `_` (Gemini's rule, the strictest).
        let tool = Tool {
            name: "1st".into(),
            description: None,
            parameters: empty_object_schema(),
        };
        assert_eq!(
            check(&[user()], &[tool], None, None).unwrap_err().field,
            "tools[0].name"
        );
        // A schema is an object; `true` is not one providers take.
        let format = ResponseFormat::JsonSchema {
            schema: json!(true),
            name: None,
            strict: None,
        };
        assert_eq!(
            check(&[user()], &[], None, Some(&format))
                .unwrap_err()
                .field,
            "response_format.schema"
        );
        // A pattern too large to compile small is refused, not compiled.
        let huge = ResponseFormat::JsonSchema {
            schema: json!({"type": "string", "pattern": "\\w{5000}"}),
            name: None,
            strict: None,
        };
        assert_eq!(
            check(&[user()], &[], None, Some(&huge)).unwrap_err().field,
            "response_format.schema"
        );
        let typo = json!({"name": "f", "typo": 1});
        assert!(serde_json::from_value::<ToolChoice>(typo).is_err());
    }

    #[test]
    fn roles_parts_and_choices_read_as_documented() {
        let m: Message = parse(
            json!({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}),
        );
        assert_eq!(m.content.joined(), "a\n\nb");
        assert!(
            serde_json::from_value::<Message>(json!({"role": "robot", "content": "x"})).is_err()
        );
        assert!(
            serde_json::from_value::<Message>(
                json!({"role": "user", "content": [{"type": "video"}]})
            )
            .is_err()
        );
        // A misspelt field is refused, not ignored.
        let typo = json!({"role": "tool", "content": "42", "tool_call": "c1"});
        assert!(serde_json::from_value::<Message>(typo).is_err());
        let typo = json!({"type": "json_schema", "schema": {}, "stricct": true});
        assert!(serde_json::from_value::<ResponseFormat>(typo).is_err());
        assert_eq!(
            parse::<ToolChoice>(json!("required")),
            ToolChoice::Mode(ToolMode::Required)
        );
        assert_eq!(
            parse::<ToolChoice>(json!({"name": "f"})),
            ToolChoice::Named(NamedTool { name: "f".into() })
        );
    }
}
