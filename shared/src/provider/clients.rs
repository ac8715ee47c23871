//! A client per configured provider, and asking each whether it answers, the way its kind
//! answers: OpenAI and compatible servers `GET /models` with a bearer token, Anthropic
//! `GET /v1/models` with `x-api-key`, Gemini `GET /models` with `x-goog-api-key`, Ollama
//! `GET /api/tags`, and a command runner looks its program up on `PATH` (it never runs it).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use secrecy::ExposeSecret;

use super::anthropic::{ANTHROPIC_VERSION, Anthropic};
use super::command::{CommandRunner, CommandSpec, PromptVia};
use super::gemini::Gemini;
use super::ollama::Ollama;
use super::openai::{Dialect, OpenAi};
use super::{CallFuture, Provider, Request};
use crate::config::{CommandConfig, Config, Http2, Kind, ProviderConfig};

/// How long a readiness probe waits for an answer.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The configured providers, ready to call, by name.
#[derive(Clone)]
pub struct Clients(HashMap<String, Arc<dyn Provider>>);

impl Clients {
    /// A client for every provider of `config`; `concurrency` is how many calls a worker makes
    /// at once, which sizes the idle HTTP/1.1 pools.
    ///
    /// # Errors
    /// When the TLS backend cannot be set up.
    pub fn new(config: &Config, concurrency: usize) -> Result<Self, reqwest::Error> {
        let mut clients = HashMap::new();
        for p in &config.providers {
            // HTTP/2 happens with prior knowledge, or over TLS when the server offers it;
            // plain HTTP/1.1 opens a connection per call in flight anyway.
            let http2 = p.http2 == Http2::PriorKnowledge || p.base_url.starts_with("https://");
            let provider: Arc<dyn Provider> =
                if p.kind == Kind::Command || p.connections == 1 || !http2 {
                    build(p, &http_client(p, concurrency)?)
                } else {
                    // One HTTP/2 connection carries only as many calls as the server allows
                    // streams (often 100), and a client keeps one connection per host: calls
                    // beyond that would queue. So each provider gets several clients.
                    let each = concurrency.div_ceil(p.connections).max(1);
                    let spread = (0..p.connections)
                        .map(|_| http_client(p, each).map(|http| build(p, &http)))
                        .collect::<Result<Vec<_>, _>>()?;
                    Arc::new(Spread {
                        name: p.name.to_string(),
                        providers: spread,
                        next: AtomicUsize::new(0),
                    })
                };
            clients.insert(p.name.to_string(), provider);
        }
        Ok(Self(clients))
    }

    /// The client of provider `name`.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Provider>> {
        self.0.get(name)
    }

    /// Replaces the client behind provider `name` (benchmarks and tests use an in-process
    /// provider). A name the file does not list is ignored.
    pub fn replace(&mut self, name: &str, provider: Arc<dyn Provider>) {
        if let Some(entry) = self.0.get_mut(name) {
            *entry = provider;
        }
    }
}

/// An HTTP client for provider `p`, keeping up to `idle` idle HTTP/1.1 connections.
///
/// # Errors
/// When the TLS backend cannot be set up.
pub fn http_client(p: &ProviderConfig, idle: usize) -> Result<reqwest::Client, reqwest::Error> {
    let builder = reqwest::Client::builder().pool_max_idle_per_host(idle);
    match p.http2 {
        Http2::PriorKnowledge => builder.http2_prior_knowledge(),
        Http2::Auto => builder,
    }
    .build()
}

/// Calls spread in turn over several clients of one provider.
struct Spread {
    name: String,
    providers: Vec<Arc<dyn Provider>>,
    next: AtomicUsize,
}

impl Provider for Spread {
    fn name(&self) -> &str {
        &self.name
    }

    fn complete<'a>(&'a self, request: &'a Request<'_>) -> CallFuture<'a> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.providers.len();
        self.providers[i].complete(request)
    }
}

/// The client for one provider entry.
#[must_use]
pub fn build(p: &ProviderConfig, http: &reqwest::Client) -> Arc<dyn Provider> {
    let http = http.clone();
    match p.kind {
        Kind::Openai | Kind::OpenaiCompatible => Arc::new(OpenAi::new(
            &p.name,
            &p.base_url,
            p.api_key.clone(),
            Dialect::of(p.kind),
            http,
        )),
        Kind::Anthropic => Arc::new(Anthropic::new(
            &p.name,
            &p.base_url,
            p.api_key.clone(),
            http,
        )),
        Kind::Gemini => Arc::new(Gemini::new(&p.name, &p.base_url, p.api_key.clone(), http)),
        Kind::Ollama => Arc::new(Ollama::new(&p.name, &p.base_url, http)),
        Kind::Command => {
            let c = command_of(p);
            Arc::new(CommandRunner::new(
                &p.name,
                CommandSpec {
                    program: c.program,
                    args: c.args,
                    prompt_via: if c.prompt_via_stdin {
                        PromptVia::Stdin
                    } else {
                        PromptVia::Arg
                    },
                    value_options: c.value_options,
                    env: c.env,
                    delay: c.delay,
                },
            ))
        }
    }
}

/// A command provider's command; the provider's name when the file gives none.
fn command_of(p: &ProviderConfig) -> CommandConfig {
    p.command.clone().unwrap_or_else(|| CommandConfig {
        program: p.name.to_string(),
        args: Vec::new(),
        prompt_via_stdin: true,
        value_options: Vec::new(),
        env: crate::process::ChildEnv::default(),
        delay: None,
    })
}

/// Whether a provider answers, as `llmq status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Readiness {
    pub name: String,
    pub enabled: bool,
    pub ready: bool,
    /// What was asked and what came back, as a sentence.
    pub detail: String,
}

/// Asks provider `p` whether it answers, the way its kind answers. Costs no tokens.
pub async fn probe(p: &ProviderConfig, http: &reqwest::Client) -> Readiness {
    let status = |ready: bool, detail: String| Readiness {
        name: p.name.to_string(),
        enabled: p.enabled,
        ready,
        detail,
    };
    if !p.enabled {
        return status(false, "disabled in the provider file".into());
    }
    let base = p.base_url.trim_end_matches('/');
    let key = p.api_key.as_ref().map(|k| k.expose_secret().to_owned());
    let req = match p.kind {
        Kind::Openai | Kind::OpenaiCompatible => {
            let r = http.get(format!("{base}/models"));
            match &key {
                Some(k) => r.bearer_auth(k),
                None => r,
            }
        }
        Kind::Anthropic => http
            .get(format!("{base}/v1/models"))
            .header("x-api-key", key.unwrap_or_default())
            .header("anthropic-version", ANTHROPIC_VERSION),
        Kind::Gemini => http
            .get(format!("{base}/models"))
            .header("x-goog-api-key", key.unwrap_or_default()),
        Kind::Ollama => http.get(format!("{base}/api/tags")),
        Kind::Command => {
            let program = command_of(p).program;
            return match find_program(&program) {
                Some(path) => status(true, format!("runs `{}`", path.display())),
                None => status(
                    false,
                    format!("`{program}` is not installed or not on PATH"),
                ),
            };
        }
    };
    let url = crate::text::without_credentials(base);
    match req.timeout(PROBE_TIMEOUT).send().await {
        Ok(r) if r.status().is_success() => status(true, format!("answers at {url}")),
        Ok(r) => status(
            false,
            format!("{url} answered HTTP {}", r.status().as_u16()),
        ),
        Err(e) if e.is_timeout() => status(
            false,
            format!("{url} did not answer within {}s", PROBE_TIMEOUT.as_secs()),
        ),
        Err(_) => status(false, format!("cannot connect to {url}")),
    }
}

/// Where `program` would be run from: itself when it names a path, else the first match on
/// `PATH` that is a file.
fn find_program(program: &str) -> Option<std::path::PathBuf> {
    let direct = std::path::Path::new(program);
    if program.contains('/') {
        return direct.is_file().then(|| direct.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_found_on_path_or_by_path() {
        assert!(find_program("sh").is_some());
        assert!(find_program("/bin/sh").is_some());
        assert!(find_program("llmq-no-such-program").is_none());
        assert!(find_program("./llmq-no-such-program").is_none());
    }
}
