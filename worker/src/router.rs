//! Picks the provider and model for a task and says why.
//!
//! A provider or model hint is honoured; otherwise the cheapest configured model of an
//! enabled provider is used.

use std::collections::HashMap;
use std::sync::Arc;

use llmq_shared::config::{Config, Kind, Model, ProviderConfig};
use llmq_shared::envelope::Envelope;
use llmq_shared::provider::Provider;
use llmq_shared::provider::openai::{OpenAi, TokenLimitField};

/// Where a task goes.
#[derive(Clone)]
pub struct Route {
    pub provider: Arc<dyn Provider>,
    pub model: Model,
    pub reason: &'static str,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("provider", &self.provider.name())
            .field("model", &self.model.id)
            .field("reason", &self.reason)
            .finish()
    }
}

/// A task that names something the provider file does not have. Retrying cannot help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RouteError(String);

/// The configured providers, ready to call.
pub struct Router {
    config: Config,
    providers: HashMap<String, Arc<dyn Provider>>,
}

impl Router {
    /// Builds an HTTP client per provider from the provider file.
    #[must_use]
    pub fn new(config: Config, http: &reqwest::Client) -> Self {
        let providers = config
            .providers
            .iter()
            .map(|p| (p.name.clone(), build(p, http)))
            .collect();
        Self { config, providers }
    }

    /// Replaces the implementation behind provider `name` (benchmarks and tests use an
    /// in-process provider).
    #[must_use]
    pub fn with_provider(mut self, name: &str, provider: Arc<dyn Provider>) -> Self {
        self.providers.insert(name.to_owned(), provider);
        self
    }

    #[must_use]
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The provider and model for `env`.
    ///
    /// # Errors
    /// The task names a provider or model that is not configured or is disabled.
    pub fn route(&self, env: &Envelope) -> Result<Route, RouteError> {
        let enabled = || self.config.providers.iter().filter(|p| p.enabled);
        let (provider, model, reason) = match (&env.provider, &env.model) {
            (Some(name), model) => {
                let p = self.config.provider(name).ok_or_else(|| {
                    RouteError(format!(
                        "provider `{name}` is not in the provider file; known providers: {}",
                        names(self.config.providers.iter())
                    ))
                })?;
                if !p.enabled {
                    return Err(RouteError(format!(
                        "provider `{name}` is disabled in the provider file"
                    )));
                }
                match model {
                    Some(m) => (p, find_model(p, m)?, "provider and model hints honoured"),
                    None => (p, cheapest(p), "provider hint honoured; its cheapest model"),
                }
            }
            (None, Some(m)) => {
                let p = enabled().find(|p| p.model(m).is_some()).ok_or_else(|| {
                    RouteError(format!(
                        "no enabled provider offers model `{m}`; add it under a provider's models"
                    ))
                })?;
                (p, find_model(p, m)?, "model hint honoured")
            }
            (None, None) => {
                let p = enabled()
                    .min_by(|a, b| price(cheapest(a)).total_cmp(&price(cheapest(b))))
                    .ok_or_else(|| RouteError("no provider is enabled".into()))?;
                (p, cheapest(p), "cheapest configured model")
            }
        };
        let implementation = self
            .providers
            .get(&provider.name)
            .cloned()
            .ok_or_else(|| RouteError(format!("provider `{}` has no client", provider.name)))?;
        Ok(Route {
            provider: implementation,
            model: model.clone(),
            reason,
        })
    }
}

fn build(p: &ProviderConfig, http: &reqwest::Client) -> Arc<dyn Provider> {
    let field = match p.kind {
        Kind::Openai => TokenLimitField::MaxCompletionTokens,
        // The other kinds are wired in with their adapters.
        _ => TokenLimitField::MaxTokens,
    };
    Arc::new(OpenAi::new(
        &p.name,
        &p.base_url,
        p.api_key.clone(),
        field,
        http.clone(),
    ))
}

fn find_model<'a>(p: &'a ProviderConfig, id: &str) -> Result<&'a Model, RouteError> {
    p.model(id).ok_or_else(|| {
        RouteError(format!(
            "provider `{}` has no model `{id}`; its models: {}",
            p.name,
            p.models
                .iter()
                .map(|m| m.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}

/// Providers always list at least one model (the config validates it).
fn cheapest(p: &ProviderConfig) -> &Model {
    let mut best = &p.models[0];
    for m in &p.models[1..] {
        if price(m) < price(best) {
            best = m;
        }
    }
    best
}

fn price(m: &Model) -> f64 {
    m.prices.input + m.prices.output
}

fn names<'a>(ps: impl Iterator<Item = &'a ProviderConfig>) -> String {
    ps.map(|p| p.name.as_str()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        let text = r#"
providers:
  - name: a
    kind: openai_compatible
    base_url: http://127.0.0.1:1/v1
    models:
      - {id: big, input_usd_per_mtok: 5, output_usd_per_mtok: 15}
      - {id: small, input_usd_per_mtok: 0.1, output_usd_per_mtok: 0.4}
  - name: b
    kind: openai_compatible
    base_url: http://127.0.0.1:2/v1
    models:
      - {id: tiny, input_usd_per_mtok: 0.05, output_usd_per_mtok: 0.1}
  - name: off
    kind: openai_compatible
    enabled: false
    base_url: http://127.0.0.1:3/v1
    models:
      - {id: free, input_usd_per_mtok: 0, output_usd_per_mtok: 0}
"#;
        let config = Config::parse("t.yaml", text, &|_| None).unwrap();
        Router::new(config, &reqwest::Client::new())
    }

    #[test]
    fn hints_are_honoured_and_defaults_are_cheapest() {
        let r = router();
        let mut env = Envelope::new("x");
        let route = r.route(&env).unwrap();
        assert_eq!(
            (route.provider.name(), route.model.id.as_str()),
            ("b", "tiny")
        );
        env.provider = Some("a".into());
        let route = r.route(&env).unwrap();
        assert_eq!(
            (route.provider.name(), route.model.id.as_str()),
            ("a", "small")
        );
        env.model = Some("big".into());
        assert_eq!(r.route(&env).unwrap().model.id, "big");
        env.provider = None;
        assert_eq!(r.route(&env).unwrap().provider.name(), "a");
    }

    #[test]
    fn unknown_or_disabled_names_are_clear_errors() {
        let r = router();
        let mut env = Envelope::new("x");
        env.provider = Some("zzz".into());
        assert!(
            r.route(&env)
                .unwrap_err()
                .0
                .contains("known providers: a, b, off")
        );
        env.provider = Some("off".into());
        assert!(r.route(&env).unwrap_err().0.contains("disabled"));
        env.provider = Some("a".into());
        env.model = Some("nope".into());
        assert!(
            r.route(&env)
                .unwrap_err()
                .0
                .contains("its models: big, small")
        );
    }
}
