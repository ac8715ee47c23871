//! Who may act: `LLMQ_WEB_TOKEN`, sign-in sessions and the anti-forgery check.
//!
//! - No token configured: the page is read-only; every action answers 403 and says how to
//!   allow actions.
//! - A person signs in with the token (POST `/login`) and gets a session cookie
//!   (`HttpOnly`, `SameSite=Strict`) naming a session held in this process's memory; the
//!   session carries a random anti-forgery value that every action form repeats. An action
//!   needs both, so a page on another site can neither read the value nor send it.
//! - A script or `curl` may instead send `Authorization: Bearer <token>` with no cookie and
//!   no anti-forgery field: a browser never adds that header to a cross-site request.
//! - A POST whose `Origin` (or `Sec-Fetch-Site`) says it comes from another site is refused
//!   whatever it carries.
//!
//! Sessions live 12 hours, at most 1,000 at once; restarting the server signs everyone out.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use subtle::ConstantTimeEq;

use super::{App, esc, field, form_fields, message, page};

const COOKIE: &str = "llmq_session";
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
const MAX_SESSIONS: usize = 1000;

/// What the person looking at a page may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Viewer {
    /// No token is configured: nobody may act.
    ReadOnly,
    /// A token is configured and this browser has not signed in.
    SignedOut,
    /// Signed in: forms carry `csrf`.
    SignedIn { csrf: String },
}

struct Session {
    csrf: String,
    expires: Instant,
}

/// The token and the sign-in sessions.
pub(crate) struct Sessions {
    token: Option<String>,
    live: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    pub fn new(token: Option<String>) -> Self {
        Self {
            token: token.filter(|t| !t.is_empty()),
            live: Mutex::new(HashMap::new()),
        }
    }

    fn token_is(&self, given: &str) -> bool {
        self.token
            .as_deref()
            .is_some_and(|t| bool::from(t.as_bytes().ct_eq(given.as_bytes())))
    }

    /// A new session: (its id, its anti-forgery value).
    fn open(&self) -> (String, String) {
        let id = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let csrf = uuid::Uuid::new_v4().simple().to_string();
        let mut live = self
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        live.retain(|_, s| s.expires > now);
        if live.len() >= MAX_SESSIONS {
            // The session closest to expiry makes room.
            if let Some(oldest) = live
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
            {
                live.remove(&oldest);
            }
        }
        live.insert(
            id.clone(),
            Session {
                csrf: csrf.clone(),
                expires: now + SESSION_TTL,
            },
        );
        (id, csrf)
    }

    /// The anti-forgery value of the live session `id`.
    fn csrf(&self, id: &str) -> Option<String> {
        let live = self
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        live.get(id)
            .filter(|s| s.expires > Instant::now())
            .map(|s| s.csrf.clone())
    }

    fn close(&self, id: &str) {
        let mut live = self
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        live.remove(id);
    }

    pub(super) fn viewer(&self, headers: &HeaderMap) -> Viewer {
        if self.token.is_none() {
            return Viewer::ReadOnly;
        }
        match session_id(headers).and_then(|id| self.csrf(&id)) {
            Some(csrf) => Viewer::SignedIn { csrf },
            None => Viewer::SignedOut,
        }
    }
}

/// The session id the request's cookie names.
fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

impl FromRequestParts<Arc<App>> for Viewer {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, Infallible> {
        Ok(app.sessions.viewer(&parts.headers))
    }
}

/// Whether a POST comes from another site, by the headers browsers add.
fn cross_site(headers: &HeaderMap) -> bool {
    if headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|s| s == "cross-site" || s == "same-site")
    {
        return true;
    }
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    origin != format!("http://{host}") && origin != format!("https://{host}")
}

/// Whether this POST may act: `None` when it may, else the 403 page saying why.
pub(super) fn refused(
    app: &App,
    headers: &HeaderMap,
    fields: &[(String, String)],
) -> Option<Response> {
    let viewer = app.sessions.viewer(headers);
    let refuse = |why: &str| Some(message(StatusCode::FORBIDDEN, "Not allowed", why, &viewer));
    if app.sessions.token.is_none() {
        return refuse(
            "This page is read-only: start llmq web with LLMQ_WEB_TOKEN set to allow actions.",
        );
    }
    if cross_site(headers) {
        return refuse("A request from another site cannot act here.");
    }
    if let Some(auth) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        return match auth.strip_prefix("Bearer ") {
            Some(t) if app.sessions.token_is(t.trim()) => None,
            _ => refuse("The token in the Authorization header is wrong."),
        };
    }
    let Viewer::SignedIn { csrf } = &viewer else {
        return refuse("Sign in with the token first (the link at the top right).");
    };
    match field(fields, "csrf") {
        Some(sent) if bool::from(sent.as_bytes().ct_eq(csrf.as_bytes())) => None,
        _ => refuse(
            "The form's anti-forgery field is missing or wrong: reload the page and try again.",
        ),
    }
}

pub(super) async fn login_form(viewer: Viewer) -> Response {
    let body = match viewer {
        Viewer::ReadOnly => "<p>This page is read-only: start <code>llmq web</code> with \
                             <code>LLMQ_WEB_TOKEN</code> set to allow actions.</p>"
            .to_owned(),
        _ => "<form method=\"post\" action=\"/login\"><label>Token \
              <input type=\"password\" name=\"token\" autocomplete=\"current-password\" \
              autofocus></label> <button>Sign in</button></form>\
              <p class=\"note\">The token is <code>LLMQ_WEB_TOKEN</code> as the server was \
              started with.</p>"
            .to_owned(),
    };
    page(StatusCode::OK, "Sign in", &body, &viewer)
}

pub(super) async fn login(
    State(app): State<Arc<App>>,
    viewer: Viewer,
    headers: HeaderMap,
    body: String,
) -> Response {
    if app.sessions.token.is_none() {
        return message(
            StatusCode::FORBIDDEN,
            "Not allowed",
            "This page is read-only: start llmq web with LLMQ_WEB_TOKEN set to allow actions.",
            &viewer,
        );
    }
    if cross_site(&headers) {
        return message(
            StatusCode::FORBIDDEN,
            "Not allowed",
            "A request from another site cannot sign in here.",
            &viewer,
        );
    }
    let fields = form_fields(&body);
    if !field(&fields, "token").is_some_and(|t| app.sessions.token_is(t)) {
        // A wrong guess costs the guesser a moment.
        tokio::time::sleep(Duration::from_millis(250)).await;
        return page(
            StatusCode::FORBIDDEN,
            "Wrong token",
            "<p>That is not the token this server was started with. \
             <a href=\"/login\">Try again</a>.</p>",
            &viewer,
        );
    }
    let (id, _) = app.sessions.open();
    let cookie = format!(
        "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        SESSION_TTL.as_secs()
    );
    let mut r = Redirect::to("/").into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

pub(super) async fn logout(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let fields = form_fields(&body);
    if let Some(no) = refused(&app, &headers, &fields) {
        return no;
    }
    if let Some(id) = session_id(&headers) {
        app.sessions.close(&id);
    }
    let mut r = Redirect::to("/").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("llmq_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
    );
    r
}

/// A done action's page: what it did, and where to go on.
pub(super) fn done(title: &str, what: &str, back: &str, viewer: &Viewer) -> Response {
    page(
        StatusCode::OK,
        title,
        &format!(
            "<p class=\"done\">{}</p><p><a href=\"{}\">Back</a></p>",
            esc(what),
            esc(back)
        ),
        viewer,
    )
}
