//! Provider batch APIs: many requests sent at once, answered within a day at about half the
//! price. Each format's own API, over the same HTTP client as its calls:
//!
//! - OpenAI (and a compatible server with `/v1/batches`): the requests as a JSONL file
//!   uploaded to `POST {base}/files` (`purpose=batch`), `POST {base}/batches` on it, polled
//!   with `GET {base}/batches/{id}`; the answers are the output and error files,
//!   `GET {base}/files/{id}/content`.
//! - Anthropic: `POST /v1/messages/batches` with the requests inline, polled with
//!   `GET /v1/messages/batches/{id}` until `ended`, then `GET .../{id}/results` (JSONL).
//! - Gemini: `POST {base}/models/{model}:batchGenerateContent` with inlined requests, an
//!   operation polled with `GET {base}/batches/{id}` until `done`; the answers are inline.
//!
//! Each request's body is the format's own call body ([`item_body`]), and each answer is
//! read by the format's own parser, so a batch answer means what a call's answer means.
//! Ids the provider gives are checked before they go into a URL; a result's URL is never
//! taken from an answer (the API key goes only where the provider file says).

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

use super::openai::Dialect;
use super::{Completion, Error, Format, Request, Result, Transport, anthropic, gemini, openai};
use crate::config::{Kind, ProviderConfig};
use crate::outcome::ErrorClass;

/// How long one request to a batch API may take (an upload of thousands of requests
/// included).
const HTTP_TIMEOUT: Duration = Duration::from_secs(120);

/// How many pages of a provider's newest batches [`BatchClient::find`] looks through.
pub const FIND_PAGES: usize = 5;

/// The most bytes of results llmq reads for one batch.
const MAX_RESULTS_BYTES: usize = 512 << 20;

/// One request of a batch: the id its answer comes back under, and its body.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub custom_id: String,
    pub body: Value,
}

/// What a batch has come to.
#[derive(Debug)]
pub enum Poll {
    /// Still running.
    Running,
    /// Over. `results` holds each request that ran, by its custom id; a request it does not
    /// list did not run, for the reason `unrun` gives.
    Ended {
        results: Vec<(String, Result<Completion>)>,
        unrun: String,
    },
}

/// The body of one batch request to provider `p`: what a call to it would send. `None` for
/// a kind without a batch API.
#[must_use]
pub fn item_body(p: &ProviderConfig, req: &Request<'_>) -> Option<Value> {
    match p.kind {
        Kind::Openai | Kind::OpenaiCompatible => Some(openai::body(req, Dialect::of(p.kind))),
        Kind::Anthropic => Some(anthropic::Anthropic::body(req)),
        Kind::Gemini => Some(gemini::Gemini::body(req)),
        Kind::Ollama | Kind::Command => None,
    }
}

/// A client for one provider's batch API.
pub struct BatchClient {
    name: String,
    kind: Kind,
    base: String,
    api_key: Option<SecretString>,
    http: reqwest::Client,
}

impl BatchClient {
    /// The batch client of `p`, when its kind has a batch API.
    #[must_use]
    pub fn new(p: &ProviderConfig, http: reqwest::Client) -> Option<Self> {
        let base = p.base_url.trim_end_matches('/');
        let base = match p.kind {
            Kind::Openai | Kind::OpenaiCompatible | Kind::Gemini => base.to_owned(),
            // The Messages adapter tolerates a base URL with or without `/v1`.
            Kind::Anthropic => base.strip_suffix("/v1").unwrap_or(base).to_owned(),
            Kind::Ollama | Kind::Command => return None,
        };
        Some(Self {
            name: p.name.to_string(),
            kind: p.kind,
            base,
            api_key: p.api_key.clone(),
            http,
        })
    }

    /// The most bytes of requests one batch may carry: Gemini takes inline requests up to
    /// 20 MB in all; the others take files far larger, bounded here so one batch's requests
    /// stay a reasonable read for Redis and the scheduler.
    #[must_use]
    pub fn max_bytes(&self) -> usize {
        match self.kind {
            Kind::Gemini => 19 << 20,
            _ => 32 << 20,
        }
    }

    /// Sends `items` for `model` as one batch labelled `label`; returns the provider's id of
    /// the batch.
    ///
    /// # Errors
    /// The provider refused it or could not be reached: nothing was created, or (a broken
    /// connection after the request was sent) the provider may have created it.
    pub async fn submit(&self, model: &str, label: &str, items: &[Item]) -> Result<String> {
        match self.kind {
            Kind::Anthropic => {
                let requests: Vec<Value> = items
                    .iter()
                    .map(|i| json!({"custom_id": i.custom_id, "params": i.body}))
                    .collect();
                let url = format!("{}/v1/messages/batches", self.base);
                let v = self
                    .send_json(model, self.post(&url).json(&json!({"requests": requests})))
                    .await?;
                self.id_in(model, &v, "id")
            }
            Kind::Gemini => {
                let requests: Vec<Value> = items
                    .iter()
                    .map(|i| json!({"request": i.body, "metadata": {"key": i.custom_id}}))
                    .collect();
                let model_id = model.strip_prefix("models/").unwrap_or(model);
                let url = format!("{}/models/{model_id}:batchGenerateContent", self.base);
                let body = json!({"batch": {
                    "display_name": label,
                    "input_config": {"requests": {"requests": requests}},
                }});
                let v = self.send_json(model, self.post(&url).json(&body)).await?;
                let name = self.id_in(model, &v, "name")?;
                match name.strip_prefix("batches/") {
                    Some(id) if safe_id(id) => Ok(name),
                    _ => Err(self.garbled(model, format!("the batch's name `{name}`"))),
                }
            }
            _ => {
                let mut jsonl = String::new();
                for i in items {
                    let line = json!({
                        "custom_id": i.custom_id,
                        "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": i.body,
                    });
                    jsonl.push_str(&line.to_string());
                    jsonl.push('\n');
                }
                let boundary = format!("llmq-{}", uuid::Uuid::new_v4().simple());
                let form = multipart(&boundary, &jsonl);
                let upload = self
                    .post(&format!("{}/files", self.base))
                    .header(
                        reqwest::header::CONTENT_TYPE,
                        format!("multipart/form-data; boundary={boundary}"),
                    )
                    .body(form);
                let file = self.send_json(model, upload).await?;
                let file_id = self.id_in(model, &file, "id")?;
                let create = json!({
                    "input_file_id": file_id,
                    "endpoint": "/v1/chat/completions",
                    "completion_window": "24h",
                    "metadata": {"llmq_batch": label},
                });
                let url = format!("{}/batches", self.base);
                let v = self.send_json(model, self.post(&url).json(&create)).await?;
                self.id_in(model, &v, "id")
            }
        }
    }

    /// Whether the provider holds a batch labelled `label` (as [`BatchClient::submit`] labels
    /// it), among its most recent ones: its id if so. A sender that died after the provider
    /// created a batch but before its id was recorded left it there; looking it up before
    /// sending again keeps the batch from being sent (and paid for) twice. OpenAI finds it by
    /// its `metadata.llmq_batch`, Gemini by its display name, among the newest
    /// [`FIND_PAGES`] pages of 100. Anthropic's Message Batches carry no label: `None`, and
    /// the caller sends again (its window is one request: the batch is created and its id
    /// answered by the same call).
    ///
    /// # Errors
    /// The provider could not be asked, or answered something unreadable.
    pub async fn find(&self, model: &str, label: &str) -> Result<Option<String>> {
        let (size, list, next, cursor, label_at): (&str, &str, &str, &str, &[&str]) =
            match self.kind {
                Kind::Anthropic | Kind::Ollama | Kind::Command => return Ok(None),
                Kind::Gemini => (
                    "pageSize",
                    "operations",
                    "nextPageToken",
                    "pageToken",
                    &["metadata", "displayName"],
                ),
                Kind::Openai | Kind::OpenaiCompatible => (
                    "limit",
                    "data",
                    "last_id",
                    "after",
                    &["metadata", "llmq_batch"],
                ),
            };
        let url = format!("{}/batches", self.base);
        let mut token: Option<String> = None;
        for _ in 0..FIND_PAGES {
            let mut query = vec![(size, "100".to_owned())];
            if let Some(t) = token.take() {
                query.push((cursor, t));
            }
            let v = self.send_json(model, self.get(&url).query(&query)).await?;
            let Some(items) = v[list].as_array() else {
                // Gemini leaves the list out when there is none.
                return if v.get(list).is_none() && self.kind == Kind::Gemini {
                    Ok(None)
                } else {
                    Err(self.garbled(model, format!("no `{list}` list in {v}")))
                };
            };
            let found = items.iter().find(|b| {
                label_at
                    .iter()
                    .fold(*b, |v, k| &v[*k])
                    .as_str()
                    .is_some_and(|l| l == label)
            });
            if let Some(b) = found {
                let field = if self.kind == Kind::Gemini {
                    "name"
                } else {
                    "id"
                };
                return self.id_in(model, b, field).map(Some);
            }
            let more = self.kind == Kind::Gemini || v["has_more"] == true;
            match v[next].as_str() {
                Some(t) if more && !t.is_empty() => token = Some(t.to_owned()),
                _ => return Ok(None),
            }
        }
        Ok(None)
    }

    /// Asks what batch `id` (as [`BatchClient::submit`] returned it) has come to, and reads
    /// its results once it is over.
    ///
    /// # Errors
    /// The provider could not be asked, or answered something unreadable.
    pub async fn poll(&self, model: &str, id: &str) -> Result<Poll> {
        self.check_id(model, id)?;
        match self.kind {
            Kind::Anthropic => self.poll_anthropic(model, id).await,
            Kind::Gemini => self.poll_gemini(model, id).await,
            _ => self.poll_openai(model, id).await,
        }
    }

    /// [`BatchClient::poll`] of a Message Batch: its results once `ended`.
    async fn poll_anthropic(&self, model: &str, id: &str) -> Result<Poll> {
        let url = format!("{}/v1/messages/batches/{id}", self.base);
        let v = self.send_json(model, self.get(&url)).await?;
        if v["processing_status"] != "ended" {
            return Ok(Poll::Running);
        }
        let text = self
            .send_text(model, self.get(&format!("{url}/results")))
            .await?;
        let results = lines(&text)
            .filter_map(|line| {
                let id = line["custom_id"].as_str()?.to_owned();
                let result = &line["result"];
                let answer = match result["type"].as_str()? {
                    "succeeded" => parse(&self.name, model, &anthropic::FORMAT, &result["message"]),
                    "errored" => {
                        let error = &result["error"]["error"];
                        let error = if error.is_object() {
                            error
                        } else {
                            &result["error"]
                        };
                        let status = anthropic_status(error["type"].as_str());
                        let body = json!({"type": "error", "error": error}).to_string();
                        Err(anthropic::FORMAT.error(&self.name, model, status, &body, None))
                    }
                    // canceled, expired: not run.
                    _ => return None,
                };
                Some((id, answer))
            })
            .collect();
        Ok(Poll::Ended {
            results,
            unrun: "the batch ended before the request ran (cancelled or expired)".into(),
        })
    }

    /// [`BatchClient::poll`] of a Gemini batch operation: its inlined responses once done.
    async fn poll_gemini(&self, model: &str, id: &str) -> Result<Poll> {
        let url = format!("{}/{id}", self.base);
        let v = self.send_json(model, self.get(&url)).await?;
        if v["done"] != true {
            return Ok(Poll::Running);
        }
        let state = v["metadata"]["state"].as_str().unwrap_or("").to_owned();
        let responses = v["response"]["inlinedResponses"]["inlinedResponses"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let results = responses
            .iter()
            .enumerate()
            .map(|(k, r)| {
                let id = r["metadata"]["key"]
                    .as_str()
                    .map_or_else(|| format!("t{k}"), str::to_owned);
                let answer = if r["error"].is_object() {
                    let status = r["error"]["code"]
                        .as_u64()
                        .and_then(|c| u16::try_from(c).ok())
                        .filter(|c| (400..600).contains(c))
                        .unwrap_or(500);
                    let body = json!({"error": r["error"]}).to_string();
                    Err(gemini::FORMAT.error(&self.name, model, status, &body, None))
                } else {
                    parse(&self.name, model, &gemini::FORMAT, &r["response"])
                };
                (id, answer)
            })
            .collect();
        let unrun = match v["error"]["message"].as_str() {
            Some(m) => format!("the batch ended {state}: {}", super::excerpt(m, 200)),
            None => format!("the batch ended {state} before the request ran"),
        };
        Ok(Poll::Ended { results, unrun })
    }

    /// [`BatchClient::poll`] of an OpenAI batch: its output and error files once it is over.
    async fn poll_openai(&self, model: &str, id: &str) -> Result<Poll> {
        let url = format!("{}/batches/{id}", self.base);
        let v = self.send_json(model, self.get(&url)).await?;
        let status = v["status"].as_str().unwrap_or("");
        if !matches!(status, "completed" | "failed" | "expired" | "cancelled") {
            return Ok(Poll::Running);
        }
        let mut results = Vec::new();
        for field in ["output_file_id", "error_file_id"] {
            let Some(file) = v[field].as_str() else {
                continue;
            };
            self.check_id(model, file)?;
            let url = format!("{}/files/{file}/content", self.base);
            let text = self.send_text(model, self.get(&url)).await?;
            results.extend(lines(&text).filter_map(|line| {
                let id = line["custom_id"].as_str()?.to_owned();
                let response = line.get("response").filter(|r| r.is_object())?;
                let code = response["status_code"]
                    .as_u64()
                    .and_then(|c| u16::try_from(c).ok())
                    .unwrap_or(500);
                let answer = if (200..300).contains(&code) {
                    parse(&self.name, model, &openai::FORMAT, &response["body"])
                } else {
                    let body = response["body"].to_string();
                    Err(openai::FORMAT.error(&self.name, model, code, &body, None))
                };
                Some((id, answer))
            }));
        }
        let why = v["errors"]["data"][0]["message"]
            .as_str()
            .map(|m| format!(": {}", super::excerpt(m, 200)))
            .unwrap_or_default();
        Ok(Poll::Ended {
            results,
            unrun: format!("the batch ended {status} before the request ran{why}"),
        })
    }

    /// Asks the provider to cancel batch `id`; requests already answered stay answered (and
    /// billed).
    ///
    /// # Errors
    /// The provider could not be asked or refused.
    pub async fn cancel(&self, model: &str, id: &str) -> Result<()> {
        self.check_id(model, id)?;
        let url = match self.kind {
            Kind::Anthropic => format!("{}/v1/messages/batches/{id}/cancel", self.base),
            Kind::Gemini => format!("{}/{id}:cancel", self.base),
            _ => format!("{}/batches/{id}/cancel", self.base),
        };
        self.send_text(model, self.post(&url)).await.map(drop)
    }

    fn post(&self, url: &str) -> reqwest::RequestBuilder {
        self.auth(self.http.post(url))
    }

    fn get(&self, url: &str) -> reqwest::RequestBuilder {
        self.auth(self.http.get(url))
    }

    fn auth(&self, builder: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let builder = builder.timeout(HTTP_TIMEOUT);
        let Some(key) = &self.api_key else {
            return match self.kind {
                Kind::Anthropic => {
                    builder.header("anthropic-version", anthropic::ANTHROPIC_VERSION)
                }
                _ => builder,
            };
        };
        match self.kind {
            Kind::Anthropic => builder
                .header("anthropic-version", anthropic::ANTHROPIC_VERSION)
                .header("x-api-key", key.expose_secret()),
            Kind::Gemini => builder.header("x-goog-api-key", key.expose_secret()),
            _ => builder.bearer_auth(key.expose_secret()),
        }
    }

    fn format(&self) -> &'static Format {
        match self.kind {
            Kind::Anthropic => &anthropic::FORMAT,
            Kind::Gemini => &gemini::FORMAT,
            _ => &openai::FORMAT,
        }
    }

    /// Sends `builder`; a 2xx body as text, bounded, or the classified error.
    async fn send_text(&self, model: &str, builder: reqwest::RequestBuilder) -> Result<String> {
        let req = Request {
            model,
            timeout: HTTP_TIMEOUT,
            ..Request::default()
        };
        let broken = |e: &reqwest::Error| {
            let (transport, m) = super::transport_message(e, &req);
            Error {
                transport: Some(transport),
                ..Error::new(&self.name, model, ErrorClass::Retryable, m)
            }
        };
        let mut response = builder.send().await.map_err(|e| broken(&e))?;
        let status = response.status().as_u16();
        let wait = super::retry_after(response.headers());
        // Read a piece at a time, so an answer past the bound is refused before it is held.
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| broken(&e))? {
            if body.len() + chunk.len() > MAX_RESULTS_BYTES {
                return Err(Error {
                    transport: Some(Transport::Broken),
                    ..Error::new(
                        &self.name,
                        model,
                        ErrorClass::Retryable,
                        format!("the batch API answered over {MAX_RESULTS_BYTES} bytes"),
                    )
                });
            }
            body.extend_from_slice(&chunk);
        }
        let body = String::from_utf8_lossy(&body).into_owned();
        if !(200..300).contains(&status) {
            return Err(self.format().error(&self.name, model, status, &body, wait));
        }
        Ok(body)
    }

    async fn send_json(&self, model: &str, builder: reqwest::RequestBuilder) -> Result<Value> {
        let text = self.send_text(model, builder).await?;
        serde_json::from_str(&text).map_err(|e| {
            self.garbled(
                model,
                format!(
                    "an answer that is not JSON ({e}): {}",
                    super::excerpt(&text, 120)
                ),
            )
        })
    }

    /// The id in field `field` of `v`, checked to be safe in a URL path.
    fn id_in(&self, model: &str, v: &Value, field: &str) -> Result<String> {
        match v[field].as_str() {
            Some(id) if safe_id(id.strip_prefix("batches/").unwrap_or(id)) => Ok(id.to_owned()),
            _ => Err(self.garbled(model, format!("no usable `{field}` in {v}"))),
        }
    }

    fn check_id(&self, model: &str, id: &str) -> Result<()> {
        if safe_id(id.strip_prefix("batches/").unwrap_or(id)) {
            Ok(())
        } else {
            Err(Error::new(
                &self.name,
                model,
                ErrorClass::Fatal,
                format!("`{}` is not a batch id", super::excerpt(id, 80)),
            ))
        }
    }

    fn garbled(&self, model: &str, what: String) -> Error {
        Error::new(
            &self.name,
            model,
            ErrorClass::Retryable,
            format!("the batch API answered {}", super::excerpt(&what, 300)),
        )
    }
}

/// An id a provider gave, fit to go into a URL path as it is.
fn safe_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 200
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A batch request's answer, read as a call's answer.
fn parse(provider: &str, model: &str, format: &Format, body: &Value) -> Result<Completion> {
    (format.parse)(&body.to_string()).map_err(|(class, m)| Error::new(provider, model, class, m))
}

/// The HTTP status an Anthropic error type stands for.
fn anthropic_status(kind: Option<&str>) -> u16 {
    match kind {
        Some("invalid_request_error") => 400,
        Some("authentication_error") => 401,
        Some("permission_error") => 403,
        Some("not_found_error") => 404,
        Some("request_too_large") => 413,
        Some("rate_limit_error") => 429,
        Some("overloaded_error") => 529,
        _ => 500,
    }
}

/// The JSON objects of a JSONL text; a line that is not one is skipped (its request then
/// counts as not run, and falls back to a call).
fn lines(text: &str) -> impl Iterator<Item = Value> + '_ {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(Value::is_object)
}

/// A multipart/form-data body with OpenAI's two upload fields: `purpose` and the JSONL
/// `file`. The boundary is random, so no JSON line can contain it.
fn multipart(boundary: &str, jsonl: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(jsonl.len() + 400);
    out.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"llmq-batch.jsonl\"\r\n\
             Content-Type: application/jsonl\r\n\r\n"
        )
        .as_bytes(),
    );
    out.extend_from_slice(jsonl.as_bytes());
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_from_answers_cannot_leave_their_path() {
        assert!(safe_id("batch_abc-123"));
        for bad in ["", "../files", "a/b", "x?y=1", "a b", "%2e%2e"] {
            assert!(!safe_id(bad), "{bad}");
        }
    }

    #[test]
    fn anthropic_error_types_map_to_their_statuses() {
        assert_eq!(anthropic_status(Some("invalid_request_error")), 400);
        assert_eq!(anthropic_status(Some("overloaded_error")), 529);
        assert_eq!(anthropic_status(None), 500);
    }

    #[test]
    fn the_upload_is_a_two_part_form() {
        let body = String::from_utf8(multipart("B", "{\"a\":1}\n")).unwrap();
        assert!(body.starts_with(
            "--B\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--B\r\n"
        ));
        assert!(body.ends_with("{\"a\":1}\n\r\n--B--\r\n"));
    }
}
