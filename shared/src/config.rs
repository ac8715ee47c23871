//! The provider file (`LLMQ_CONFIG`): providers, their models and prices.
//!
//! The YAML is read into `deny_unknown_fields` raw structs, then validated into typed config.
//! Every error names the file, the key, what is wrong and how to fix it.
//! Secrets are written as `${ENV_VAR}` (or `${ENV_VAR:-default}`) and held as [`SecretString`].

use std::fmt;
use std::path::Path;

use secrecy::SecretString;
use serde::Deserialize;

/// A problem in the provider file: `file:key: what is wrong; how to fix`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Error {
    pub file: String,
    pub key: String,
    pub problem: String,
    pub fix: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}; {}",
            self.file, self.key, self.problem, self.fix
        )
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The wire format a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// api.openai.com: the output limit is sent as `max_completion_tokens`.
    Openai,
    /// Any OpenAI-compatible server: the output limit is sent as `max_tokens`.
    OpenaiCompatible,
}

impl Kind {
    fn default_base_url(self) -> Option<&'static str> {
        match self {
            Kind::Openai => Some("https://api.openai.com/v1"),
            Kind::OpenaiCompatible => None,
        }
    }
}

/// USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Prices {
    pub input: f64,
    pub output: f64,
    /// Cached prompt tokens; the input price when the provider file gives none.
    pub cached_input: f64,
}

impl Prices {
    /// The cost of one call in USD. Cached tokens are part of `input_tokens` and priced at
    /// their own rate; reasoning tokens are part of `output_tokens`.
    #[must_use]
    pub fn cost(&self, usage: &crate::provider::Usage) -> f64 {
        let cached = usage.cached_tokens.min(usage.input_tokens);
        let fresh = usage.input_tokens - cached;
        (fresh as f64 * self.input
            + cached as f64 * self.cached_input
            + usage.output_tokens as f64 * self.output)
            / 1_000_000.0
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub id: String,
    pub prices: Prices,
}

#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub name: String,
    pub kind: Kind,
    pub enabled: bool,
    pub base_url: String,
    pub api_key: Option<SecretString>,
    pub models: Vec<Model>,
}

impl ProviderConfig {
    #[must_use]
    pub fn model(&self, id: &str) -> Option<&Model> {
        self.models.iter().find(|m| m.id == id)
    }
}

/// The validated provider file.
#[derive(Debug, Clone)]
pub struct Config {
    pub providers: Vec<ProviderConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    providers: Vec<RawProvider>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    name: String,
    kind: Kind,
    #[serde(default = "yes")]
    enabled: bool,
    base_url: Option<String>,
    api_key: Option<String>,
    models: Vec<RawModel>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    id: String,
    input_usd_per_mtok: f64,
    output_usd_per_mtok: f64,
    cached_input_usd_per_mtok: Option<f64>,
}

impl Config {
    /// Reads and validates the provider file at `path`.
    ///
    /// # Errors
    /// The file cannot be read, is not valid YAML of the expected shape, or fails validation.
    pub fn load(path: &Path) -> Result<Self> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Error {
            file: file.clone(),
            key: "-".into(),
            problem: format!("cannot read the provider file ({e})"),
            fix: "set LLMQ_CONFIG to the path of a provider file such as examples/providers.mock.yaml".into(),
        })?;
        Self::parse(&file, &text, &|name| std::env::var(name).ok())
    }

    /// Parses provider-file text; `env` looks up `${VAR}` references.
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn parse(file: &str, text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let raw: RawFile = serde_yaml_ng::from_str(text).map_err(|e| {
            let (key, problem) = split_yaml_error(&e.to_string());
            Error {
                file: file.to_owned(),
                key,
                problem,
                fix: "see docs/configuration.md for every key and its type".into(),
            }
        })?;
        let err = |key: String, problem: String, fix: &str| Error {
            file: file.to_owned(),
            key,
            problem,
            fix: fix.to_owned(),
        };
        if raw.providers.is_empty() {
            return Err(err(
                "providers".into(),
                "no provider is listed".into(),
                "add at least one provider with a name, kind and models",
            ));
        }
        let mut providers = Vec::with_capacity(raw.providers.len());
        for (i, p) in raw.providers.into_iter().enumerate() {
            let at = |k: &str| format!("providers[{i}].{k}");
            if p.name.trim().is_empty() || p.name.contains(['/', ' ']) {
                return Err(err(
                    at("name"),
                    format!("`{}` is not a usable name", p.name),
                    "use a short name without spaces or slashes, such as `openai`",
                ));
            }
            if providers.iter().any(|q: &ProviderConfig| q.name == p.name) {
                return Err(err(
                    at("name"),
                    format!("provider `{}` is listed twice", p.name),
                    "give every provider its own name",
                ));
            }
            let base_url = match (p.base_url, p.kind.default_base_url()) {
                (Some(url), _) => expand(&url, env).map_err(|m| err(at("base_url"), m, ENV_FIX))?,
                (None, Some(url)) => url.to_owned(),
                (None, None) => {
                    return Err(err(
                        at("base_url"),
                        "an openai_compatible provider needs a base_url".into(),
                        "set base_url to the server's address up to /v1, e.g. http://127.0.0.1:8000/v1",
                    ));
                }
            };
            if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
                return Err(err(
                    at("base_url"),
                    format!("`{base_url}` is not an http(s) URL"),
                    "write it as http://host:port/v1 or https://host/v1",
                ));
            }
            let api_key = p
                .api_key
                .map(|k| expand(&k, env).map_err(|m| err(at("api_key"), m, ENV_FIX)))
                .transpose()?
                .map(SecretString::from);
            if p.models.is_empty() {
                return Err(err(
                    at("models"),
                    "no model is listed".into(),
                    "list at least one model with its id and prices",
                ));
            }
            let mut models: Vec<Model> = Vec::with_capacity(p.models.len());
            for (j, m) in p.models.into_iter().enumerate() {
                let at = |k: &str| format!("providers[{i}].models[{j}].{k}");
                if m.id.trim().is_empty() {
                    return Err(err(
                        at("id"),
                        "the model id is empty".into(),
                        "set id to the model name the provider expects",
                    ));
                }
                if models.iter().any(|x| x.id == m.id) {
                    return Err(err(
                        at("id"),
                        format!("model `{}` is listed twice", m.id),
                        "list each model once",
                    ));
                }
                for (key, v) in [
                    ("input_usd_per_mtok", Some(m.input_usd_per_mtok)),
                    ("output_usd_per_mtok", Some(m.output_usd_per_mtok)),
                    ("cached_input_usd_per_mtok", m.cached_input_usd_per_mtok),
                ] {
                    if v.is_some_and(|v| !v.is_finite() || v < 0.0) {
                        return Err(err(
                            at(key),
                            "a price must be a number of USD per million tokens, zero or more"
                                .into(),
                            "write it as e.g. 0.15 (use 0 for a free model)",
                        ));
                    }
                }
                models.push(Model {
                    id: m.id,
                    prices: Prices {
                        input: m.input_usd_per_mtok,
                        output: m.output_usd_per_mtok,
                        cached_input: m.cached_input_usd_per_mtok.unwrap_or(m.input_usd_per_mtok),
                    },
                });
            }
            providers.push(ProviderConfig {
                name: p.name,
                kind: p.kind,
                enabled: p.enabled,
                base_url,
                api_key,
                models,
            });
        }
        if !providers.iter().any(|p| p.enabled) {
            return Err(err(
                "providers".into(),
                "every provider is disabled".into(),
                "set enabled: true on at least one provider",
            ));
        }
        Ok(Self { providers })
    }

    #[must_use]
    pub fn provider(&self, name: &str) -> Option<&ProviderConfig> {
        self.providers.iter().find(|p| p.name == name)
    }
}

const ENV_FIX: &str = "export the variable, or give a default as ${NAME:-value}";

/// Expands `${VAR}` and `${VAR:-default}`.
fn expand(
    value: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("`{value}` has a `${{` without its closing `}}`"))?;
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        match (env(name).filter(|v| !v.is_empty()), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => return Err(format!("environment variable {name} is not set")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// serde_yaml_ng says `providers[0].kind: unknown variant ...`; split the path off.
fn split_yaml_error(msg: &str) -> (String, String) {
    match msg.split_once(": ") {
        Some((path, rest))
            if !path.contains(' ')
                && (path.contains('.') || path.contains('[') || path == "providers") =>
        {
            (path.to_owned(), rest.to_owned())
        }
        _ => ("-".to_owned(), msg.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "KEY").then(|| "sk-test".to_owned())
    }

    const GOOD: &str = r#"
providers:
  - name: mock
    kind: openai_compatible
    base_url: ${MOCK_URL:-http://127.0.0.1:8089}/v1
    api_key: ${KEY}
    models:
      - id: mock-fast
        input_usd_per_mtok: 1.0
        output_usd_per_mtok: 2.0
        cached_input_usd_per_mtok: 0.5
"#;

    #[test]
    fn a_good_file_parses_and_expands_env() {
        let c = Config::parse("p.yaml", GOOD, &env).unwrap();
        let p = c.provider("mock").unwrap();
        assert_eq!(p.base_url, "http://127.0.0.1:8089/v1");
        assert_eq!(
            secrecy::ExposeSecret::expose_secret(p.api_key.as_ref().unwrap()),
            "sk-test"
        );
        assert_eq!(p.model("mock-fast").unwrap().prices.cached_input, 0.5);
    }

    #[test]
    fn cost_prices_cached_tokens_at_their_rate() {
        let prices = Prices {
            input: 1.0,
            output: 2.0,
            cached_input: 0.5,
        };
        let usage = crate::provider::Usage {
            input_tokens: 1_000_000,
            output_tokens: 1_000_000,
            cached_tokens: 500_000,
            reasoning_tokens: 0,
        };
        assert!((prices.cost(&usage) - 2.75).abs() < 1e-9);
    }

    #[test]
    fn broken_files_name_the_key() {
        let cases = [
            (
                GOOD.replace("kind: openai_compatible", "kind: telepathy"),
                "providers[0].kind",
            ),
            (GOOD.replace("${KEY}", "${NOPE}"), "providers[0].api_key"),
            (
                GOOD.replace(
                    "base_url: ${MOCK_URL:-http://127.0.0.1:8089}/v1",
                    "base_url: ftp://x",
                ),
                "providers[0].base_url",
            ),
            (
                GOOD.replace("input_usd_per_mtok: 1.0", "input_usd_per_mtok: -1"),
                "providers[0].models[0].input_usd_per_mtok",
            ),
            (
                GOOD.replace("    api_key", "    colour: red\n    api_key"),
                "providers[0]",
            ),
            (
                GOOD.replace("name: mock", "name: my mock"),
                "providers[0].name",
            ),
            ("providers: []".to_owned(), "providers"),
        ];
        for (text, key) in cases {
            let e = Config::parse("p.yaml", &text, &env).unwrap_err();
            assert!(e.to_string().starts_with(&format!("p.yaml:{key}")), "{e}");
            assert!(!e.fix.is_empty());
        }
    }
}
