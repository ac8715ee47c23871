//! A local command-line client as a provider: `claude -p`, `gemini`, `codex exec`,
//! `ollama run`, or any program that reads a prompt and prints an answer.
//!
//! The program is started directly, never through a shell: every argument is one argv element
//! built from a template in which `{prompt}`, `{model}` and `{system}` are replaced in a single
//! pass, so a prompt full of shell metacharacters reaches the program byte for byte and text
//! inside a substituted value is never substituted again. Other braces are left alone.
//!
//! **Task text never becomes an option.** An argv element that starts with `-` is code to the
//! program that parses it (the Claude Code CLI's `--settings` can define hooks that run shell
//! commands), so [`unsafe_argument`] accepts `{prompt}` and `{system}` only where no option
//! parser reads them as an option:
//! - on stdin ([`PromptVia::Stdin`], the safest, with no placeholder in the arguments);
//! - attached to a long option, `--prompt={prompt}`;
//! - right after an option the template declares as taking a value
//!   ([`CommandSpec::value_options`], e.g. `["--prompt", "{prompt}"]`); since some parsers
//!   (yargs) still read a following `-x` as an option, such an argument that would start with
//!   `-` fails the call as [`ErrorClass::Fatal`] before the program starts;
//! - after an end-of-options `--` argument.
//!
//! The configuration refuses every other template (`llmq providers check` and every binary at
//! start); [`CommandRunner`] trusts the spec it is given.
//!
//! Where the prompt goes:
//! - [`PromptVia::Stdin`]: the prompt is written to the program's stdin, which is then closed.
//! - [`PromptVia::Arg`]: the prompt replaces `{prompt}` in every argument that contains it; if no
//!   argument contains it, the prompt is appended as the last argument, after a `--` (added
//!   unless the template has one). stdin is `/dev/null`. Linux limits one argument to 128 KiB;
//!   longer prompts fail as [`ErrorClass::Fatal`] and want `Stdin`.
//!
//! `{prompt}` and `{model}` are substituted wherever they appear, in either mode. The system
//! prompt replaces `{system}` where the template has it (the empty string when the request has
//! none); where it does not, a system prompt is put before the prompt, separated by a blank line,
//! wherever the prompt goes. `max_tokens` and `temperature` are not passed: command-line clients
//! have no common flags for them.
//!
//! The answer is the program's stdout without its trailing newline. Every call, including the
//! optional random pause before it, is bounded by [`Request::timeout`]; a call that runs over is
//! abandoned and the program killed. stdout and stderr are read up to
//! [`OUTPUT_LIMIT`] bytes each.
//!
//! **Token usage is an estimate.** Command-line clients do not report tokens reliably, so
//! [`Usage`] counts one token per four characters (rounded up) of the system prompt plus prompt
//! and of the answer, with no cached or reasoning tokens. These clients usually run on a
//! subscription, not per-token billing.

use std::io;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use super::{CallFuture, Completion, Error, Provider, Request, Result, Usage, excerpt};
use crate::config::{END_OF_OPTIONS, TASK_TEXT};
use crate::outcome::ErrorClass;
use crate::tokens::{estimate_text, estimate_tokens};

/// The most bytes kept from a program's stdout or stderr. A program that prints more to stdout
/// fails the call; stderr beyond it is read and discarded.
pub const OUTPUT_LIMIT: usize = 10 * 1024 * 1024;

/// How the prompt reaches the program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptVia {
    /// Written to stdin, which is then closed.
    Stdin,
    /// Substituted into the arguments containing `{prompt}`, or appended last after `--`.
    Arg,
}

/// How to run the program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSpec {
    /// The program, looked up on `PATH` unless it is a path, e.g. `claude`.
    pub program: String,
    /// The argument template, e.g. `["-p", "{prompt}", "--model", "{model}"]`.
    pub args: Vec<String>,
    pub prompt_via: PromptVia,
    /// Options that take the argument after them as their value, e.g. `--prompt`: task text
    /// may fill that argument (see [`unsafe_argument`]).
    pub value_options: Vec<String>,
    /// The program's environment: `PATH`, `HOME` and these, none of the worker's others.
    pub env: crate::process::ChildEnv,
    /// A random pause in `[min, max]` before each call (the Gemini CLI needs spacing between
    /// calls). It counts against the request's timeout.
    pub delay: Option<(Duration, Duration)>,
}

/// A provider that runs a local program once per call.
#[derive(Debug, Clone)]
pub struct CommandRunner {
    name: String,
    spec: CommandSpec,
}

/// The argv and stdin of one call.
#[derive(Debug, PartialEq, Eq)]
struct Invocation {
    args: Vec<String>,
    stdin: Option<String>,
}

impl CommandRunner {
    #[must_use]
    pub fn new(name: &str, spec: CommandSpec) -> Self {
        Self {
            name: name.to_owned(),
            spec,
        }
    }

    /// The argv and stdin of one call; an error names an argument task text would turn into
    /// an option.
    fn invocation(&self, req: &Request<'_>) -> Result<Invocation, String> {
        let template = &self.spec.args;
        let has = |placeholder: &str| template.iter().any(|a| a.contains(placeholder));
        let system = req.system_text().unwrap_or_default();
        let system = system.as_ref();
        let transcript = req.transcript();
        let prompt = if system.is_empty() || has("{system}") {
            transcript.into_owned()
        } else {
            format!("{system}\n\n{transcript}")
        };
        let values = [
            ("prompt", prompt.as_str()),
            ("model", req.model),
            ("system", system),
        ];
        let mut args = Vec::with_capacity(template.len() + 2);
        for (i, a) in template.iter().enumerate() {
            let arg = substitute(a, &values);
            let after = i.checked_sub(1).map(|p| &template[p]);
            if let Some(option) = after.filter(|o| self.spec.value_options.contains(o))
                && TASK_TEXT.iter().any(|t| a.contains(t))
                && arg.starts_with('-')
            {
                return Err(format!(
                    "the text for `{option}` starts with `-`, which `{}` could read as an option; \
                     pass the prompt on stdin (prompt_via: stdin) or as {option}={{prompt}}",
                    self.spec.program
                ));
            }
            args.push(arg);
        }
        let stdin = match self.spec.prompt_via {
            PromptVia::Stdin => Some(prompt),
            PromptVia::Arg => {
                if !has("{prompt}") {
                    if !template.iter().any(|a| a == END_OF_OPTIONS) {
                        args.push(END_OF_OPTIONS.to_owned());
                    }
                    args.push(prompt);
                }
                None
            }
        };
        Ok(Invocation { args, stdin })
    }

    fn error(&self, req: &Request<'_>, class: ErrorClass, message: String) -> Error {
        Error {
            class,
            provider: self.name.clone(),
            model: req.model.to_string(),
            status: None,
            message,
            retry_after: None,
            transport: None,
        }
    }

    fn spawn_error(&self, req: &Request<'_>, e: &io::Error) -> Error {
        let program = &self.spec.program;
        let (class, message) = match e.kind() {
            io::ErrorKind::NotFound => (
                ErrorClass::Fatal,
                format!("`{program}` is not installed or not on PATH"),
            ),
            io::ErrorKind::PermissionDenied => (
                ErrorClass::Fatal,
                format!("`{program}` cannot be run: permission denied"),
            ),
            io::ErrorKind::InvalidInput => (
                ErrorClass::Fatal,
                format!(
                    "an argument for `{program}` contains a NUL byte, which no program can be given; pass the prompt on stdin"
                ),
            ),
            io::ErrorKind::ArgumentListTooLong => (
                ErrorClass::Fatal,
                format!(
                    "the arguments are too long for `{program}`; pass the prompt on stdin instead"
                ),
            ),
            _ if matches!(e.raw_os_error(), Some(23 | 24)) => {
                return Error {
                    transport: Some(super::Transport::Exhausted),
                    ..self.error(
                        req,
                        ErrorClass::Retryable,
                        format!(
                            "this worker is out of file descriptors and cannot start `{program}` (raise its limit, e.g. ulimit -n, or lower --concurrency): {e}"
                        ),
                    )
                };
            }
            _ => (
                ErrorClass::Retryable,
                format!("cannot start `{program}`: {e}"),
            ),
        };
        self.error(req, class, message)
    }

    /// A non-zero exit, read like an HTTP answer where its text allows: a rate limit or a
    /// quota by its words, a context window that is too small as `context too long` (fatal,
    /// as for HTTP), a server error or a network failure the CLI met as the model's or the
    /// provider's health. Anything else is about the task: it retries and falls back, but
    /// opens no circuit.
    fn exit_error(&self, req: &Request<'_>, detail: &str, message: String) -> Error {
        let said = detail.to_lowercase();
        if is_context_window(&said) {
            return self.error(
                req,
                ErrorClass::Fatal,
                format!("context too long: {message}"),
            );
        }
        let class = classify_failure(detail);
        let mut e = self.error(req, class, message);
        if class == ErrorClass::Retryable {
            if let Some(status) = server_status(&said) {
                e.status = Some(status);
            } else if [
                "connection refused",
                "connection reset",
                "econnrefused",
                "econnreset",
                "network error",
                "could not resolve host",
                "getaddrinfo",
                "enotfound",
            ]
            .iter()
            .any(|w| said.contains(w))
            {
                e.transport = Some(super::Transport::Connect);
            }
        }
        e
    }

    async fn call(&self, req: &Request<'_>) -> Result<Completion> {
        match tokio::time::timeout(req.timeout, self.run(req)).await {
            Ok(result) => result,
            // Dropping `run` drops the child, and `kill_on_drop` kills it.
            Err(_) => Err(Error {
                transport: Some(super::Transport::Timeout),
                ..self.error(
                    req,
                    ErrorClass::Retryable,
                    format!("no answer within {:?}", req.timeout),
                )
            }),
        }
    }

    async fn run(&self, req: &Request<'_>) -> Result<Completion> {
        if let Some((min, max)) = self.spec.delay {
            tokio::time::sleep(pick_delay(min, max, uuid::Uuid::new_v4().as_u128())).await;
        }
        let program = &self.spec.program;
        let Invocation { args, stdin } = self
            .invocation(req)
            .map_err(|message| self.error(req, ErrorClass::Fatal, message))?;
        let mut command = Command::new(program);
        self.spec.env.apply(&mut command);
        let mut child = command
            .args(&args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0)
            .spawn()
            .map_err(|e| self.spawn_error(req, &e))?;
        let mut group = Group::of(&child);

        let pipe = child.stdin.take();
        let write = async move {
            match (pipe, stdin) {
                (Some(mut pipe), Some(text)) => {
                    let written = pipe.write_all(text.as_bytes()).await;
                    drop(pipe);
                    match written {
                        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
                        other => other,
                    }
                }
                _ => Ok(()),
            }
        };
        // Write and read at once: a program answering a long prompt fills its stdout pipe
        // before it has read all of stdin.
        let (written, out, err) = tokio::join!(
            write,
            read_capped(child.stdout.take(), false),
            read_capped(child.stderr.take(), true),
        );
        let io_error = |what: &str, e: io::Error| {
            self.error(
                req,
                ErrorClass::Retryable,
                format!("cannot {what} `{program}`: {e}"),
            )
        };
        let (out, out_overflow) = out.map_err(|e| io_error("read the output of", e))?;
        if out_overflow {
            group.kill();
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(self.error(
                req,
                ErrorClass::Retryable,
                format!(
                    "`{program}` printed more than {} MiB",
                    OUTPUT_LIMIT / 1024 / 1024
                ),
            ));
        }
        let (err, _) = err.map_err(|e| io_error("read the errors of", e))?;
        let status = child.wait().await.map_err(|e| io_error("wait for", e))?;
        group.ended();
        let stdout = String::from_utf8_lossy(&out);
        if !status.success() {
            let stderr = String::from_utf8_lossy(&err);
            // Some clients print their errors to stdout.
            let detail = if stderr.trim().is_empty() {
                stdout
            } else {
                stderr
            };
            let mut message = format!("`{program}` {}", describe_exit(status));
            let cut = excerpt(&detail, 300);
            if !cut.is_empty() {
                message.push_str(": ");
                message.push_str(&cut);
            }
            return Err(self.exit_error(req, &detail, message));
        }
        written.map_err(|e| io_error("write the prompt to", e))?;
        let text = stdout.trim_end_matches(['\n', '\r']);
        if text.trim().is_empty() {
            return Err(self.error(
                req,
                ErrorClass::Retryable,
                "the command printed nothing".to_owned(),
            ));
        }
        Ok(Completion {
            text: text.to_owned(),
            usage: Usage {
                input_tokens: estimate_tokens(req.system_text().as_deref(), &req.transcript()),
                output_tokens: estimate_text(text),
                cached_tokens: 0,
                cache_write_tokens: 0,
                reasoning_tokens: 0,
            },
            ..Completion::default()
        })
    }
}

impl Provider for CommandRunner {
    fn name(&self) -> &str {
        &self.name
    }

    fn complete<'a>(&'a self, request: &'a Request<'_>) -> CallFuture<'a> {
        Box::pin(self.call(request))
    }
}

/// Replaces `{name}` by its value in one pass; unknown placeholders and other braces stay.
fn substitute(template: &str, values: &[(&str, &str)]) -> String {
    const OPEN: &str = "{";
    const CLOSE: &str = "}";
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find(OPEN) {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        let hit = values.iter().find_map(|(name, value)| {
            let after = tail
                .strip_prefix(OPEN)?
                .strip_prefix(name)?
                .strip_prefix(CLOSE)?;
            Some((*value, after))
        });
        match hit {
            Some((value, after)) => {
                out.push_str(value);
                rest = after;
            }
            None => {
                out.push_str(OPEN);
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Reads up to [`OUTPUT_LIMIT`] bytes and says whether there was more. With `drain`, the rest is
/// read and thrown away so the program never blocks on a full pipe; without, the pipe is closed
/// as soon as the limit is passed.
async fn read_capped<R: AsyncRead + Unpin>(
    reader: Option<R>,
    drain: bool,
) -> io::Result<(Vec<u8>, bool)> {
    let Some(reader) = reader else {
        return Ok((Vec::new(), false));
    };
    let mut buf = Vec::new();
    let mut capped = reader.take(OUTPUT_LIMIT as u64 + 1);
    capped.read_to_end(&mut buf).await?;
    let overflow = buf.len() > OUTPUT_LIMIT;
    if overflow {
        buf.truncate(OUTPUT_LIMIT);
        if drain {
            tokio::io::copy(&mut capped.into_inner(), &mut tokio::io::sink()).await?;
        }
    }
    Ok((buf, overflow))
}

fn describe_exit(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exited with status {code}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return format!("was killed by signal {signal}");
        }
    }
    format!("exited abnormally ({status})")
}

/// Classifies a failed run by what the program said.
fn classify_failure(said: &str) -> ErrorClass {
    let said = said.to_lowercase();
    let has = |words: &[&str]| words.iter().any(|w| said.contains(w));
    let quota = has(&["quota", "usage limit", "credit balance"]);
    let per_day = has(&["per day", "per_day", "perday", "daily"]);
    let rate = has(&[
        "rate limit",
        "rate-limit",
        "rate_limit",
        "ratelimit",
        "too many requests",
        "resource_exhausted",
        "resource has been exhausted",
        "per minute",
        "per_minute",
        "perminute",
    ]) || mentions_number(&said, "429");
    if quota && (per_day || !rate) {
        // A used-up plan or daily allowance; a per-minute quota is a rate limit.
        ErrorClass::QuotaExhausted
    } else if rate {
        ErrorClass::RateLimited
    } else if has(&[
        "not found",
        "unknown model",
        "invalid",
        "unauthorized",
        "authentication",
        "not logged in",
    ]) {
        ErrorClass::Fatal
    } else {
        ErrorClass::Retryable
    }
}

/// Whether a CLI's (lowercased) error says the prompt did not fit the model's context.
fn is_context_window(said: &str) -> bool {
    [
        "context length",
        "context window",
        "context_length_exceeded",
        "maximum context",
        "prompt is too long",
        "input is too long",
        "exceeds the context",
        "exceeds the maximum number of tokens",
        "input length exceeds",
        "too many tokens",
    ]
    .iter()
    .any(|w| said.contains(w))
}

/// The server error a CLI's (lowercased) error reports, as the HTTP status it stands for.
fn server_status(said: &str) -> Option<u16> {
    for (words, status) in [
        ("internal server error", 500),
        ("bad gateway", 502),
        ("service unavailable", 503),
        ("gateway timeout", 504),
        ("overloaded", 529),
    ] {
        if said.contains(words) {
            return Some(status);
        }
    }
    [500u16, 502, 503, 504, 529]
        .into_iter()
        .find(|n| mentions_number(said, &n.to_string()))
}

/// Whether `number` occurs in `text` not as part of a longer number.
fn mentions_number(text: &str, number: &str) -> bool {
    text.match_indices(number).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + number.len()..].chars().next();
        !before.is_some_and(|c| c.is_ascii_digit()) && !after.is_some_and(|c| c.is_ascii_digit())
    })
}

/// A pause in `[min, max]` chosen by `random`; `min` when `max <= min`.
fn pick_delay(min: Duration, max: Duration, random: u128) -> Duration {
    if max <= min {
        return min;
    }
    let span = (max - min).as_nanos();
    let offset = random % (span + 1);
    min.saturating_add(Duration::from_nanos(
        u64::try_from(offset).unwrap_or(u64::MAX),
    ))
    .min(max)
}

/// The process group a command's program runs in (its own, led by it), killed whole when a
/// call is dropped before the program ended (a timeout, a cancel, the hard stop): what the
/// program started (a CLI's own subprocesses) stops with it, not only the program.
struct Group(Option<i32>);

impl Group {
    fn of(child: &tokio::process::Child) -> Self {
        Self(child.id().and_then(|pid| i32::try_from(pid).ok()))
    }

    /// The program ended and was waited for: nothing to kill.
    fn ended(&mut self) {
        self.0 = None;
    }

    /// Kills the group now (its leader not yet waited for).
    fn kill(&mut self) {
        drop(Self(self.0.take()));
    }
}

impl Drop for Group {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            // SAFETY: killpg takes two integers and touches no memory. The group's leader is
            // our child, not yet waited for (its `Child` is dropped after this), so its id
            // cannot have been reused by another group.
            unsafe {
                libc::killpg(pgid, libc::SIGKILL);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{UnsafeArgument, unsafe_argument};
    use std::time::Instant;

    // Harmless if it ever reached a shell.
    const NASTY: &str = "; echo shell-was-used; $(x) `y` ' \" | & > * < \\ ~ ! # $HOME %s %d {model} {system} {{prompt}}\n\ttab\nline ünïcödé 🚀 ";

    fn spec(program: &str, args: &[&str], prompt_via: PromptVia) -> CommandSpec {
        CommandSpec {
            program: program.to_owned(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            prompt_via,
            value_options: Vec::new(),
            env: crate::process::ChildEnv::default(),
            delay: None,
        }
    }

    fn runner(program: &str, args: &[&str], prompt_via: PromptVia) -> CommandRunner {
        CommandRunner::new("cli", spec(program, args, prompt_via))
    }

    fn request(prompt: &str) -> Request<'_> {
        Request {
            model: "model-1",
            system: None,
            prompt: prompt.into(),
            max_tokens: None,
            temperature: None,
            timeout: Duration::from_secs(10),
            ..Request::default()
        }
    }

    async fn text(r: &CommandRunner, req: &Request<'_>) -> String {
        match r.complete(req).await {
            Ok(c) => c.text,
            Err(e) => panic!("{e}"),
        }
    }

    async fn failure(r: &CommandRunner, req: &Request<'_>) -> Error {
        match r.complete(req).await {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => e,
        }
    }

    #[tokio::test]
    async fn metacharacters_pass_as_one_argument_byte_for_byte() {
        let r = runner("printf", &["%s", "{prompt}"], PromptVia::Arg);
        assert_eq!(text(&r, &request(NASTY)).await, NASTY);
    }

    #[tokio::test]
    async fn metacharacters_pass_through_stdin_byte_for_byte() {
        let r = runner("cat", &[], PromptVia::Stdin);
        assert_eq!(text(&r, &request(NASTY)).await, NASTY);
    }

    #[tokio::test]
    async fn prompt_substitutes_inside_a_larger_argument() {
        let r = runner("printf", &["%s", "--prompt={prompt}!"], PromptVia::Arg);
        assert_eq!(
            text(&r, &request("a b; c")).await,
            "--prompt=a b; c!".to_owned()
        );
    }

    #[tokio::test]
    async fn prompt_is_appended_after_an_end_of_options_without_a_placeholder() {
        let r = runner("printf", &["[%s]"], PromptVia::Arg);
        assert_eq!(text(&r, &request("--help")).await, "[--][--help]");
        // A template with its own `--` gets no second one.
        let r = runner("printf", &["[%s]", "--"], PromptVia::Arg);
        assert_eq!(text(&r, &request("-p")).await, "[--][-p]");
    }

    #[tokio::test]
    async fn model_and_system_are_substituted() {
        let r = runner(
            "printf",
            &["%s|%s|%s", "{model}", "{system}", "{prompt}"],
            PromptVia::Arg,
        );
        let mut req = request("hi");
        assert_eq!(text(&r, &req).await, "model-1||hi");
        req.system = Some("be brief".into());
        assert_eq!(text(&r, &req).await, "model-1|be brief|hi");
    }

    #[tokio::test]
    async fn system_prompt_goes_first_on_stdin() {
        let r = runner("cat", &[], PromptVia::Stdin);
        let mut req = request("the prompt");
        req.system = Some("the system".into());
        assert_eq!(text(&r, &req).await, "the system\n\nthe prompt");
    }

    #[tokio::test]
    async fn a_conversation_goes_to_stdin_as_a_transcript() {
        use crate::conversation::{Message, Role};
        let r = runner("cat", &[], PromptVia::Stdin);
        let mut req = request("and 3+3?");
        req.system = Some("the system".into());
        req.messages = vec![
            Message::text(Role::System, "in English"),
            Message::text(Role::User, "2+2?"),
            Message::text(Role::Assistant, "4"),
        ]
        .into();
        assert_eq!(
            text(&r, &req).await,
            "the system\n\nin English\n\n[user]\n2+2?\n\n[assistant]\n4\n\n[user]\nand 3+3?"
        );
    }

    #[tokio::test]
    async fn system_prompt_goes_first_in_the_argument_without_its_placeholder() {
        let r = runner("printf", &["%s", "{prompt}"], PromptVia::Arg);
        let mut req = request("the prompt");
        req.system = Some("the system".into());
        assert_eq!(text(&r, &req).await, "the system\n\nthe prompt");
    }

    #[tokio::test]
    async fn a_long_prompt_on_stdin_does_not_deadlock() {
        let r = runner("cat", &[], PromptVia::Stdin);
        let prompt = "0123456789abcdef".repeat(256 * 1024); // 4 MiB
        let mut req = request(&prompt);
        req.timeout = Duration::from_secs(20);
        assert_eq!(text(&r, &req).await.len(), prompt.len());
    }

    #[tokio::test]
    async fn a_prompt_too_long_for_an_argument_is_fatal() {
        let r = runner("printf", &["%s", "{prompt}"], PromptVia::Arg);
        let e = failure(&r, &request(&"x".repeat(256 * 1024))).await;
        assert_eq!(e.class, ErrorClass::Fatal, "{e}");
        assert!(e.message.contains("stdin"), "{e}");
    }

    #[tokio::test]
    async fn the_program_sees_path_home_and_its_own_env_only() {
        let mut s = spec("env", &[], PromptVia::Stdin);
        s.env = crate::process::ChildEnv(vec![("LLMQ_COMMAND_TEST".into(), "secret-value".into())]);
        assert!(!format!("{s:?}").contains("secret-value"));
        let r = CommandRunner::new("cli", s);
        let mut names: Vec<String> = text(&r, &request("p"))
            .await
            .lines()
            .map(|l| l.split('=').next().unwrap_or_default().to_owned())
            .collect();
        names.sort();
        // The test process has many more (CARGO_*, RUST_*): none reaches the program.
        let mut want = vec!["LLMQ_COMMAND_TEST"];
        want.extend(
            crate::process::ChildEnv::INHERITED
                .iter()
                .filter(|n| std::env::var_os(n).is_some()),
        );
        want.sort_unstable();
        assert_eq!(names, want);
    }

    #[tokio::test]
    async fn usage_is_estimated_from_characters() {
        // `%.0s` prints none of the system prompt, so the answer is the prompt alone.
        let r = runner(
            "printf",
            &["%.0s%s", "{system}", "{prompt}"],
            PromptVia::Arg,
        );
        let mut req = request("héllo"); // 5 characters, 6 bytes
        req.system = Some("abcdef".into());
        let c = r.complete(&req).await.unwrap();
        assert_eq!(c.text, "héllo");
        assert_eq!(
            c.usage,
            Usage {
                // 6 + 5 characters and 4 for each message's framing, a token per three (the
                // reservation's estimate); 3 without the system prompt.
                input_tokens: 7,
                output_tokens: 2, // 5 characters
                cached_tokens: 0,
                cache_write_tokens: 0,
                reasoning_tokens: 0
            }
        );
        req.prompt = "héy".into(); // 3 characters; 4 bytes would make an answer of 2
        req.system = None;
        let c = r.complete(&req).await.unwrap();
        assert_eq!((c.usage.input_tokens, c.usage.output_tokens), (3, 1));
    }

    #[tokio::test]
    async fn only_the_trailing_newline_is_trimmed() {
        let r = runner("printf", &["  out \n\n"], PromptVia::Stdin);
        assert_eq!(text(&r, &request("p")).await, "  out ");
    }

    #[tokio::test]
    async fn empty_output_is_retryable() {
        let r = runner("printf", &["\n"], PromptVia::Stdin);
        let e = failure(&r, &request("p")).await;
        assert_eq!(e.class, ErrorClass::Retryable);
        assert_eq!(e.message, "the command printed nothing");
        assert_eq!(e.provider, "cli");
        assert_eq!(e.model, "model-1");
    }

    #[tokio::test]
    async fn rate_limit_on_stderr_is_rate_limited() {
        let r = runner(
            "sh",
            &[
                "-c",
                "echo 'Error: Rate limit exceeded, slow down' >&2; exit 3",
            ],
            PromptVia::Stdin,
        );
        let e = failure(&r, &request("p")).await;
        assert_eq!(e.class, ErrorClass::RateLimited, "{e}");
        assert_eq!(
            e.message,
            "`sh` exited with status 3: Error: Rate limit exceeded, slow down"
        );
        assert_eq!(e.status, None);
    }

    #[tokio::test]
    async fn other_failures_are_classified() {
        let cases = [
            (
                "echo 'Claude AI usage limit reached' >&2; exit 1",
                ErrorClass::QuotaExhausted,
            ),
            ("echo 'model xyz not found' >&2; exit 1", ErrorClass::Fatal),
            ("echo 'connection reset' >&2; exit 1", ErrorClass::Retryable),
            // No stderr: stdout is what the program said.
            (
                "echo 'HTTP 429 Too Many Requests'; exit 2",
                ErrorClass::RateLimited,
            ),
        ];
        for (script, class) in cases {
            let r = runner("sh", &["-c", script], PromptVia::Stdin);
            let e = failure(&r, &request("p")).await;
            assert_eq!(e.class, class, "{script}: {e}");
        }
    }

    #[tokio::test]
    async fn an_exit_counts_against_a_circuit_only_when_its_text_says_the_model_or_provider_is_unwell()
     {
        use crate::provider::Scope;
        let cases = [
            // The task failed on this model: routing's business, not the circuit's.
            (
                "echo '3 tests failed' >&2; exit 1",
                ErrorClass::Retryable,
                None,
            ),
            ("exit 1", ErrorClass::Retryable, None),
            (
                "echo 'API Error: 529 overloaded' >&2; exit 1",
                ErrorClass::Retryable,
                Some(Scope::Model),
            ),
            (
                "echo 'Error: 503 Service Unavailable' >&2; exit 1",
                ErrorClass::Retryable,
                Some(Scope::Model),
            ),
            (
                "echo 'connect ECONNREFUSED 127.0.0.1:443' >&2; exit 1",
                ErrorClass::Retryable,
                Some(Scope::Provider),
            ),
            (
                "echo 'Prompt is too long: 250000 tokens' >&2; exit 1",
                ErrorClass::Fatal,
                None,
            ),
            (
                "echo 'Rate limit exceeded' >&2; exit 1",
                ErrorClass::RateLimited,
                None,
            ),
        ];
        for (script, class, scope) in cases {
            let r = runner("sh", &["-c", script], PromptVia::Stdin);
            let e = failure(&r, &request("p")).await;
            assert_eq!((e.class, e.scope()), (class, scope), "{script}: {e}");
        }
        let r = runner(
            "sh",
            &["-c", "echo 'prompt is too long' >&2; exit 1"],
            PromptVia::Stdin,
        );
        let e = failure(&r, &request("p")).await;
        assert!(
            e.message.starts_with("context too long: `sh` exited"),
            "{e}"
        );
        let r = runner("sh", &["-c", "sleep 5"], PromptVia::Stdin);
        let mut req = request("p");
        req.timeout = Duration::from_millis(100);
        let e = failure(&r, &req).await;
        assert_eq!(e.scope(), Some(Scope::Model), "no answer in time: {e}");
    }

    #[tokio::test]
    async fn a_signal_is_reported() {
        let r = runner("sh", &["-c", "kill -9 $$"], PromptVia::Stdin);
        let e = failure(&r, &request("p")).await;
        assert_eq!(e.class, ErrorClass::Retryable);
        assert_eq!(e.message, "`sh` was killed by signal 9");
    }

    #[test]
    fn stderr_wording_decides_the_class() {
        let cases = [
            ("Error: rate limit exceeded", ErrorClass::RateLimited),
            ("status 429", ErrorClass::RateLimited),
            ("request 14290 failed", ErrorClass::Retryable),
            (
                "You exceeded your current quota",
                ErrorClass::QuotaExhausted,
            ),
            ("usage limit reached|1750000000", ErrorClass::QuotaExhausted),
            (
                "429 RESOURCE_EXHAUSTED: Resource has been exhausted (e.g. check quota).",
                ErrorClass::RateLimited,
            ),
            (
                "429: Quota exceeded for metric requests per minute",
                ErrorClass::RateLimited,
            ),
            (
                "429: Quota exceeded for metric requests per day",
                ErrorClass::QuotaExhausted,
            ),
            ("Unknown model: gpt-9", ErrorClass::Fatal),
            ("Invalid API key", ErrorClass::Fatal),
            ("something broke", ErrorClass::Retryable),
            ("", ErrorClass::Retryable),
        ];
        for (said, class) in cases {
            assert_eq!(classify_failure(said), class, "{said}");
        }
    }

    #[tokio::test]
    async fn a_timeout_is_retryable_and_prompt() {
        let r = runner("sleep", &["30"], PromptVia::Stdin);
        let mut req = request("p");
        req.timeout = Duration::from_millis(500);
        let started = Instant::now();
        let e = failure(&r, &req).await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(e.class, ErrorClass::Retryable);
        assert!(e.message.starts_with("no answer within"), "{e}");
    }

    #[tokio::test]
    async fn a_timeout_kills_the_program() {
        let pid_file =
            std::env::temp_dir().join(format!("llmq-command-{}.pid", uuid::Uuid::new_v4()));
        // The fixture records its pid, then becomes `sleep` under the same pid.
        let r = runner(
            "sh",
            &["-c", "echo $$ > \"$0\"; exec sleep 30", "{prompt}"],
            PromptVia::Arg,
        );
        let mut req = request(pid_file.to_str().unwrap());
        req.timeout = Duration::from_millis(500);
        let e = failure(&r, &req).await;
        assert_eq!(e.class, ErrorClass::Retryable);
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        let _ = std::fs::remove_file(&pid_file);
        let stat = format!("/proc/{}/stat", pid.trim());
        let gone = || match std::fs::read_to_string(&stat) {
            Err(_) => true,
            // A zombie is dead, only not yet reaped.
            Ok(s) => s
                .rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z')),
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !gone() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(gone(), "process {} still runs", pid.trim());
    }

    #[tokio::test]
    async fn a_missing_program_is_fatal() {
        let program = format!("llmq-no-such-program-{}", uuid::Uuid::new_v4());
        let r = runner(&program, &[], PromptVia::Stdin);
        let e = failure(&r, &request("p")).await;
        assert_eq!(e.class, ErrorClass::Fatal);
        assert_eq!(
            e.message,
            format!("`{program}` is not installed or not on PATH")
        );
    }

    #[tokio::test]
    async fn a_program_without_permission_is_fatal() {
        let path = std::env::temp_dir().join(format!("llmq-not-exec-{}", uuid::Uuid::new_v4()));
        std::fs::write(&path, "#!/bin/sh\necho hi\n").unwrap();
        let r = runner(path.to_str().unwrap(), &[], PromptVia::Stdin);
        let e = failure(&r, &request("p")).await;
        let _ = std::fs::remove_file(&path);
        assert_eq!(e.class, ErrorClass::Fatal, "{e}");
        assert!(e.message.contains("permission denied"), "{e}");
    }

    #[tokio::test]
    async fn runaway_output_is_cut_off() {
        let r = runner("yes", &[], PromptVia::Stdin);
        let e = failure(&r, &request("p")).await;
        assert_eq!(e.class, ErrorClass::Retryable);
        assert_eq!(e.message, "`yes` printed more than 10 MiB");
    }

    #[tokio::test]
    async fn the_delay_comes_first() {
        let mut s = spec("printf", &["%s", "{prompt}"], PromptVia::Arg);
        s.delay = Some((Duration::from_millis(150), Duration::from_millis(200)));
        let r = CommandRunner::new("cli", s);
        let started = Instant::now();
        assert_eq!(text(&r, &request("p")).await, "p");
        assert!(
            started.elapsed() >= Duration::from_millis(150),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn the_delay_counts_against_the_timeout() {
        let mut s = spec("printf", &["%s", "{prompt}"], PromptVia::Arg);
        s.delay = Some((Duration::from_secs(30), Duration::from_secs(30)));
        let r = CommandRunner::new("cli", s);
        let mut req = request("p");
        req.timeout = Duration::from_millis(100);
        let e = failure(&r, &req).await;
        assert_eq!(e.class, ErrorClass::Retryable);
        assert!(e.message.starts_with("no answer within"), "{e}");
    }

    #[test]
    fn delays_stay_within_bounds() {
        let (min, max) = (Duration::from_millis(100), Duration::from_millis(300));
        let mut seen_low = false;
        let mut seen_high = false;
        for random in [0, 1, u128::MAX, u128::MAX / 3, 200_000_000, 200_000_001] {
            let d = pick_delay(min, max, random);
            assert!(d >= min && d <= max, "{d:?}");
            seen_low |= d == min;
            seen_high |= d == max;
        }
        assert!(seen_low && seen_high);
        for _ in 0..1000 {
            let d = pick_delay(min, max, uuid::Uuid::new_v4().as_u128());
            assert!(d >= min && d <= max, "{d:?}");
        }
        assert_eq!(pick_delay(max, min, 12345), max);
        assert_eq!(pick_delay(min, min, 12345), min);
    }

    #[test]
    fn substitution_is_one_pass_and_leaves_other_braces() {
        let values = [("prompt", "{model}"), ("model", "m")];
        assert_eq!(substitute("{prompt}/{model}", &values), "{model}/m");
        assert_eq!(substitute("{{prompt}}", &values), "{{model}}");
        assert_eq!(
            substitute("{\"a\":{other}} {", &values),
            "{\"a\":{other}} {"
        );
        assert_eq!(substitute("{prompt", &values), "{prompt");
        assert_eq!(substitute("é{model}é", &values), "émé");
    }

    #[test]
    fn invocation_follows_the_mode() {
        let mut req = request("p");
        req.system = Some("s".into());
        let r = runner("x", &["-p", "--model", "{model}"], PromptVia::Stdin);
        assert_eq!(
            r.invocation(&req),
            Ok(Invocation {
                args: vec!["-p".into(), "--model".into(), "model-1".into()],
                stdin: Some("s\n\np".into()),
            })
        );
        let r = runner("x", &["--system={system}"], PromptVia::Arg);
        assert_eq!(
            r.invocation(&req),
            Ok(Invocation {
                args: vec!["--system=s".into(), "--".into(), "p".into()],
                stdin: None,
            })
        );
    }

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|a| (*a).to_owned()).collect()
    }

    #[test]
    fn task_text_is_accepted_only_where_it_cannot_be_an_option() {
        let value_options = strings(&["--prompt", "-s"]);
        let safe: &[&[&str]] = &[
            &[],
            &["-p", "--model", "{model}"],
            &["--model={model}", "{model}"],
            &["--prompt={prompt}", "--system={system}"],
            &["--prompt=Q: {prompt}!"],
            &["--prompt", "{prompt}", "-s", "{system}"],
            &["-p", "--", "{prompt}"],
            &["--", "-x", "{system}\n{prompt}"],
        ];
        for args in safe {
            assert_eq!(
                unsafe_argument(&strings(args), &value_options),
                None,
                "{args:?}"
            );
        }
        let refused: &[(&[&str], usize, &str)] = &[
            (&["-p", "{prompt}", "--model", "{model}"], 1, "{prompt}"),
            (&["{prompt}"], 0, "{prompt}"),
            (&["Q: {prompt}"], 0, "{prompt}"),
            (&["-p{prompt}"], 0, "{prompt}"),
            (&["-p={prompt}"], 0, "{prompt}"),
            (&["--={prompt}"], 0, "{prompt}"),
            (&["--{prompt}=x"], 0, "{prompt}"),
            (&["--x{system}=y"], 0, "{system}"),
            (&["--system", "{system}"], 1, "{system}"),
            (&["--prompt", "{prompt}", "{system}", "--"], 2, "{system}"),
            (&["--prompt={prompt}", "-m", "{prompt}"], 2, "{prompt}"),
        ];
        for (args, index, placeholder) in refused {
            assert_eq!(
                unsafe_argument(&strings(args), &value_options),
                Some(UnsafeArgument {
                    index: *index,
                    placeholder
                }),
                "{args:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_value_after_a_value_option_never_starts_with_a_dash() {
        let mut s = spec("printf", &["%s|%s", "--prompt", "{prompt}"], PromptVia::Arg);
        s.value_options = strings(&["--prompt"]);
        let r = CommandRunner::new("cli", s);
        assert_eq!(text(&r, &request("a -b")).await, "--prompt|a -b");
        for prompt in ["-", "--", "-p", "--settings={}"] {
            let e = failure(&r, &request(prompt)).await;
            assert_eq!(e.class, ErrorClass::Fatal, "{prompt}: {e}");
            assert!(
                e.message
                    .starts_with("the text for `--prompt` starts with `-`, which `printf`"),
                "{e}"
            );
        }
        // A system prompt put before the prompt is what the argument starts with.
        let mut req = request("-p");
        req.system = Some("be brief".into());
        assert_eq!(text(&r, &req).await, "--prompt|be brief\n\n-p");
    }
}
