//! `llmq web` over real HTTP against the real Redis: the overview shows what `llmq status`
//! counts, a task's page and a dead letter's show hostile text as text, every answer carries
//! headers that forbid script and framing, and bad requests or Redis away get a page that
//! says so.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use llmq::web::{WebState, serve};
use llmq_shared::envelope::Envelope;
use llmq_shared::queue::Client;
use llmq_tests::harness::{TestEnv, redis_url};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

/// A read-only web server on a free loopback port until the token is cancelled; its base URL.
async fn web(redis: Client) -> (String, CancellationToken) {
    serve_state(WebState::new(redis)).await
}

async fn serve_state(state: WebState) -> (String, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(serve(listener, state, stop.clone()));
    (base, stop)
}

async fn get(url: &str) -> (u16, reqwest::header::HeaderMap, String) {
    let r = reqwest::get(url).await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.text().await.unwrap())
}

#[tokio::test]
async fn the_pages_show_the_queues_and_hostile_text_only_as_text() {
    let env = TestEnv::new().await.unwrap();
    let (base, stop) = web(Client::new(&redis_url()).unwrap()).await;
    // Three tasks waiting (no worker yet): the overview counts them as `llmq status` does.
    env.redis.ensure_group(&env.keys).await.unwrap();
    for i in 0..3 {
        env.redis
            .enqueue(&env.keys, &Envelope::new(format!("waiting {i}")))
            .await
            .unwrap();
    }
    env.redis
        .heartbeat("web-test", std::slice::from_ref(&env.keys), true)
        .await
        .unwrap();
    let counts = env.redis.counts(&env.keys).await.unwrap();
    let (status, headers, body) = get(&format!("{base}/")).await;
    assert_eq!(status, 200);
    let row = format!(
        "<td>{q}</td><td>{}</td><td>{}</td><td>{}</td><td><a href=\"/dead?queue={q}\">{}</a></td><td>{}</td>",
        counts.ready,
        counts.in_flight,
        counts.delayed,
        counts.dead,
        counts.duplicates,
        q = env.queue,
    );
    assert!(body.contains(&row), "{row} in {body}");
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"));
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-eval"),
        "only the server's own script file may run, never inline script: {csp}"
    );
    assert!(!csp.contains("script-src 'self' 'unsafe-inline'"), "{csp}");
    assert_eq!(headers["x-frame-options"], "DENY");

    // A task whose prompt and answer carry markup; and a dead letter that does.
    let worker = env.worker();
    let mut e = Envelope::new("<img src=x onerror=alert(1)>");
    e.model = Some("mock-fast".into());
    env.redis.enqueue(&env.keys, &e).await.unwrap();
    let id = e.id.unwrap();
    env.wait_final(&id, WAIT).await.unwrap();
    env.xadd("task", br#"{"v":2,"prompt":"<script>alert(1)</script>"}"#)
        .await
        .unwrap();
    env.dead_letter_saying("version", WAIT).await.unwrap();
    let (status, _, body) = get(&format!("{base}/task?queue={}&id={id}", env.queue)).await;
    assert_eq!(status, 200, "{body}");
    // With no queue named, every queue is looked in.
    let (status, _, any) = get(&format!("{base}/task?id={id}")).await;
    assert_eq!(status, 200, "{any}");
    assert!(any.contains(&env.queue), "{any}");
    assert!(
        body.contains("&lt;img src=x onerror=alert(1)&gt;"),
        "{body}"
    );
    assert!(
        !body.contains("<img src=x"),
        "markup reached the page: {body}"
    );
    let (status, _, body) = get(&format!("{base}/dead?queue={}", env.queue)).await;
    assert_eq!(status, 200);
    assert!(
        body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{body}"
    );
    assert!(
        !body.contains("<script>"),
        "a script reached the page: {body}"
    );
    worker.stop().await.unwrap();
    stop.cancel();
}

#[tokio::test]
async fn bad_requests_and_redis_away_get_a_page_that_says_so() {
    let env = TestEnv::new().await.unwrap();
    let (base, stop) = web(Client::new(&redis_url()).unwrap()).await;
    let (status, _, body) = get(&format!("{base}/task?queue={}&id=not-an-id", env.queue)).await;
    assert_eq!(status, 400);
    assert!(body.contains("A task id is a UUID"), "{body}");
    let unknown = uuid::Uuid::new_v4();
    let (status, _, body) = get(&format!("{base}/task?queue={}&id={unknown}", env.queue)).await;
    assert_eq!(status, 404);
    assert!(body.contains("has no task"), "{body}");
    let (status, _, _) = get(&format!("{base}/nowhere")).await;
    assert_eq!(status, 404);
    // On loopback it answers only to loopback names: a page whose name was pointed at
    // 127.0.0.1 (DNS rebinding) reads nothing.
    let r = reqwest::Client::new()
        .get(format!("{base}/"))
        .header("host", "evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 421);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("answers only to localhost")
    );
    let r = reqwest::Client::new()
        .get(format!("{base}/"))
        .header("host", "localhost:1234")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    stop.cancel();

    // Redis away: 503 with the reason, and the server still answers.
    let port = llmq_tests::harness::free_port();
    let (base, stop) = web(Client::new(&format!("redis://127.0.0.1:{port}")).unwrap()).await;
    for _ in 0..2 {
        let (status, headers, body) = get(&format!("{base}/")).await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("Redis cannot be reached"), "{body}");
        assert!(headers.contains_key("content-security-policy"));
    }
    stop.cancel();
}

#[tokio::test]
async fn a_chain_is_drawn_as_its_dag_with_each_step_s_status_and_its_text_escaped() {
    let env = TestEnv::new().await.unwrap();
    let (base, stop) = web(Client::new(&redis_url()).unwrap()).await;
    env.redis.ensure_group(&env.keys).await.unwrap();
    let worker = env.worker();
    let chain_id = format!("web-{}", env.queue);
    let spec = serde_json::json!({
        "v": 1,
        "chain_id": chain_id,
        "steps": [
            {"name": "plan", "prompt": "<b>plan</b> it", "model": "mock-fast"},
            {"name": "build", "after": ["plan"], "prompt": "build {{plan.summary}}", "model": "mock-fast"},
            {"name": "check", "after": ["plan"], "prompt": "check {{plan.summary}}", "model": "mock-fast"}
        ]
    });
    env.redis
        .submit_chain(&env.keys, &spec.to_string())
        .await
        .unwrap();
    let c = env.chain_ended(&chain_id, WAIT).await;
    assert_eq!(c.state, "succeeded", "{c:?}");
    let (status, _, body) = get(&format!("{base}/chains?queue={}", env.queue)).await;
    assert_eq!(status, 200);
    assert!(body.contains(&chain_id), "{body}");
    let (status, _, body) = get(&format!("{base}/chain?queue={}&id={chain_id}", env.queue)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("<svg"), "{body}");
    assert_eq!(body.matches("<rect").count(), 3, "a box per step: {body}");
    assert_eq!(
        body.matches("<path class=\"edge\"").count(),
        2,
        "an edge per parent, with an arrowhead: {body}"
    );
    assert_eq!(
        body.matches("marker-end=\"url(#arrow)\"").count(),
        2,
        "{body}"
    );
    assert_eq!(
        body.matches("<rect class=\"step succeeded\"").count(),
        3,
        "every step succeeded: {body}"
    );
    assert!(body.contains("&lt;b&gt;plan&lt;/b&gt;"), "{body}");
    assert!(!body.contains("<b>plan"), "markup reached the page: {body}");
    let (status, _, body) = get(&format!("{base}/chain?queue={}&id=nope", env.queue)).await;
    assert_eq!(status, 404);
    assert!(body.contains("has no chain"), "{body}");
    worker.stop().await.unwrap();
    stop.cancel();
}

const TOKEN: &str = "s3cret-web-token";

/// A person's browser, by hand: the session cookie it was given and the page's
/// anti-forgery value.
struct Browser {
    http: reqwest::Client,
    base: String,
    cookie: String,
    csrf: String,
}

impl Browser {
    fn http() -> reqwest::Client {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
    }

    async fn sign_in(base: &str) -> Self {
        let http = Self::http();
        let r = http
            .post(format!("{base}/login"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("token={TOKEN}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 303);
        let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
        assert!(
            set.contains("HttpOnly") && set.contains("SameSite=Strict"),
            "{set}"
        );
        let cookie = set.split(';').next().unwrap().to_owned();
        let page = http
            .get(format!("{base}/"))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let csrf = page
            .split("name=\"csrf\" value=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .expect("a signed-in page carries the anti-forgery field")
            .to_owned();
        Self {
            http,
            base: base.to_owned(),
            cookie,
            csrf,
        }
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// POSTs `form` (the anti-forgery field added) as the page's own form would.
    async fn post(&self, path: &str, form: &[(&str, &str)]) -> (u16, String) {
        let mut fields: Vec<(&str, &str)> = vec![("csrf", &self.csrf)];
        fields.extend_from_slice(form);
        post_raw(
            &self.http,
            &format!("{}{path}", self.base),
            &fields,
            &[("cookie", &self.cookie), ("origin", &self.base)],
        )
        .await
    }
}

async fn post_raw(
    http: &reqwest::Client,
    url: &str,
    form: &[(&str, &str)],
    headers: &[(&str, &str)],
) -> (u16, String) {
    let body: String = form
        .iter()
        .map(|(k, v)| format!("{k}={}", urlencode(v)))
        .collect::<Vec<_>>()
        .join("&");
    let mut r = http
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test]
async fn every_action_needs_the_token_and_the_anti_forgery_field() {
    let env = TestEnv::new().await.unwrap();
    env.redis.ensure_group(&env.keys).await.unwrap();
    let (dead_id, _) = env.replayable_dead_letter("keep me").await;
    let queued = llmq_shared::envelope::Envelope::new("cancel me");
    env.redis.enqueue(&env.keys, &queued).await.unwrap();
    let queued = queued.id.unwrap().to_string();
    let q = env.queue.as_str();
    let actions: [(&str, Vec<(&str, &str)>); 7] = [
        ("/dead/replay", vec![("queue", q), ("id", &dead_id)]),
        ("/task/cancel", vec![("queue", q), ("id", &queued)]),
        ("/dead/purge", vec![("queue", q), ("id", &dead_id)]),
        ("/queue/pause", vec![("queue", q)]),
        ("/queue/resume", vec![("queue", q)]),
        (
            "/approvals/decide",
            vec![
                ("queue", q),
                ("chain", "c"),
                ("step", "s"),
                ("decision", "approve"),
            ],
        ),
        ("/logout", vec![]),
    ];
    let http = Browser::http();

    // Read-only: no token configured, so every action is refused and the page says why.
    let (base, stop) = web(Client::new(&redis_url()).unwrap()).await;
    let (_, _, overview) = get(&format!("{base}/")).await;
    assert!(overview.contains("read-only"), "{overview}");
    assert!(!overview.contains("<button>Pause"), "{overview}");
    for (path, form) in &actions {
        let (status, body) = post_raw(&http, &format!("{base}{path}"), form, &[]).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.contains("LLMQ_WEB_TOKEN"), "{path}: {body}");
    }
    stop.cancel();

    let (base, stop) = serve_state(WebState {
        token: Some(TOKEN.into()),
        ..WebState::new(Client::new(&redis_url()).unwrap())
    })
    .await;
    let b = Browser::sign_in(&base).await;
    let cookie = ("cookie", b.cookie.as_str());
    for (path, form) in &actions {
        let url = format!("{base}{path}");
        // Not signed in.
        let (status, body) = post_raw(&http, &url, form, &[]).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.contains("Sign in"), "{path}: {body}");
        // A wrong token as a bearer.
        let (status, _) = post_raw(&http, &url, form, &[("authorization", "Bearer wrong")]).await;
        assert_eq!(status, 403, "{path}");
        // Signed in, but the form lacks the anti-forgery field, or carries a wrong one.
        let (status, body) = post_raw(&http, &url, form, &[cookie]).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.contains("anti-forgery"), "{path}: {body}");
        let mut wrong = vec![("csrf", "0000")];
        wrong.extend_from_slice(form);
        let (status, _) = post_raw(&http, &url, &wrong, &[cookie]).await;
        assert_eq!(status, 403, "{path}");
        // Everything right, but sent from another site.
        let mut good = vec![("csrf", b.csrf.as_str())];
        good.extend_from_slice(form);
        let (status, body) = post_raw(
            &http,
            &url,
            &good,
            &[cookie, ("origin", "http://evil.example")],
        )
        .await;
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.contains("another site"), "{path}: {body}");
    }
    // Nothing of that acted.
    let counts = env.redis.counts(&env.keys).await.unwrap();
    assert_eq!((counts.dead, counts.paused), (1, false));
    let marks = || async {
        let marks = env.redis.cancel_marks(&env.keys, 0).await.unwrap();
        marks.into_iter().map(|(m, _)| m).collect::<Vec<_>>()
    };
    assert!(marks().await.is_empty());
    // The task's page offers its cancel, which sets its mark.
    let (status, body) = b.get(&format!("/task?queue={q}&id={queued}")).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Cancel this task"), "{body}");
    let (status, body) = b
        .post("/task/cancel", &[("queue", q), ("id", &queued)])
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Cancelled task"), "{body}");
    assert_eq!(marks().await, [format!("task:{queued}")]);
    // A wrong token does not sign in.
    let (status, body) = post_raw(&http, &format!("{base}/login"), &[("token", "nope")], &[]).await;
    assert_eq!(status, 403, "{body}");

    // The right way: the page's form, and a script with the bearer token.
    let (status, body) = b.post("/queue/pause", &[("queue", q)]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Paused queue"), "{body}");
    assert!(env.redis.counts(&env.keys).await.unwrap().paused);
    let bearer = format!("Bearer {TOKEN}");
    let (status, body) = post_raw(
        &http,
        &format!("{base}/queue/resume"),
        &[("queue", q)],
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(!env.redis.counts(&env.keys).await.unwrap().paused);
    // Signed out, the old cookie no longer acts.
    let (status, _) = b.post("/logout", &[]).await;
    assert_eq!(status, 303);
    let (status, _) = b.post("/queue/pause", &[("queue", q)]).await;
    assert_eq!(status, 403);
    stop.cancel();
}

#[tokio::test]
async fn approving_moves_the_chain_on_and_replaying_runs_the_dead_letter() {
    let env = TestEnv::new().await.unwrap();
    env.redis.ensure_group(&env.keys).await.unwrap();
    let worker = env.worker();
    let (base, stop) = serve_state(WebState {
        token: Some(TOKEN.into()),
        ..WebState::new(Client::new(&redis_url()).unwrap())
    })
    .await;
    let b = Browser::sign_in(&base).await;
    let chain = |id: &str| {
        serde_json::json!({"v": 1, "chain_id": id, "steps": [
            {"name": "impl", "prompt": "Write <i>it</i>", "model": "mock-fast"},
            {"name": "ship", "kind": "approval", "after": ["impl"], "timeout": "1h"},
            {"name": "docs", "after": ["ship"], "prompt": "Document {{ship.summary}}", "model": "mock-fast"}]})
        .to_string()
    };
    let (yes, no) = (format!("{}-yes", env.queue), format!("{}-no", env.queue));
    for id in [&yes, &no] {
        env.redis.submit_chain(&env.keys, &chain(id)).await.unwrap();
    }
    for id in [&yes, &no] {
        env.eventually("the step awaiting approval", WAIT, || async {
            env.redis
                .chain(&env.keys, id)
                .await
                .unwrap()
                .is_some_and(|c| c.steps["ship"].status == "awaiting_approval")
        })
        .await
        .unwrap();
    }
    let (status, page) = b.get("/approvals").await;
    assert_eq!(status, 200);
    assert!(page.contains(&format!("data-chain=\"{yes}\"")), "{page}");
    assert!(page.contains("value=\"approve\""), "{page}");
    let c = env.redis.chain(&env.keys, &yes).await.unwrap().unwrap();
    let parent = c.steps["impl"].summary.clone().unwrap();
    assert!(
        page.contains(&llmq::web::esc(&parent)),
        "the parent's summary: {page}"
    );

    let decide = |id: &str, decision: &str| {
        let (q, id, decision) = (env.queue.clone(), id.to_owned(), decision.to_owned());
        let b = &b;
        async move {
            b.post(
                "/approvals/decide",
                &[
                    ("queue", &q),
                    ("chain", &id),
                    ("step", "ship"),
                    ("decision", &decision),
                    ("note", "looks <b>good</b>"),
                ],
            )
            .await
        }
    };
    let (status, body) = decide(&yes, "approve").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Approved step ship"), "{body}");
    let c = env.chain_ended(&yes, WAIT).await;
    assert_eq!(c.state, "succeeded", "{c:?}");
    assert_eq!(
        c.steps["ship"].summary.as_deref(),
        Some("looks <b>good</b>")
    );
    let (status, body) = decide(&no, "reject").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(env.chain_ended(&no, WAIT).await.state, "failed");
    // Deciding again, or a step that is not there.
    let (status, body) = decide(&yes, "approve").await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("not waiting for approval"), "{body}");
    let (status, _) = decide("no-such-chain", "approve").await;
    assert_eq!(status, 404);
    let (_, shown) = b.get(&format!("/chain?queue={}&id={yes}", env.queue)).await;
    assert!(shown.contains("looks &lt;b&gt;good&lt;/b&gt;"), "{shown}");

    // A dead letter replayed from the page runs; one purged is gone.
    let (replay_id, task_id) = env.replayable_dead_letter("run me again").await;
    let (purge_id, _) = env
        .replayable_dead_letter("<script>alert(1)</script>")
        .await;
    let (status, list) = b.get(&format!("/dead?queue={}", env.queue)).await;
    assert_eq!(status, 200);
    assert!(list.contains(&format!("value=\"{replay_id}\"")), "{list}");
    assert!(!list.contains("<script>alert"), "{list}");
    let (status, body) = b
        .post(
            "/dead/replay",
            &[
                ("queue", &env.queue),
                ("confirm", "1"),
                ("all", "0"),
                ("id", &replay_id),
            ],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Replayed 1 dead letter"), "{body}");
    let r = env.wait_final(&task_id, WAIT).await.unwrap();
    assert_eq!(r.status, llmq_shared::outcome::Status::Succeeded, "{r:?}");
    let (status, body) = b
        .post("/dead/purge", &[("queue", &env.queue), ("id", &purge_id)])
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Purged 1 dead letter"), "{body}");
    assert_eq!(env.redis.counts(&env.keys).await.unwrap().dead, 0);
    // Gone now: a page that says so; "all" without the confirmation box is refused.
    let (status, _) = b
        .post("/dead/replay", &[("queue", &env.queue), ("id", &replay_id)])
        .await;
    assert_eq!(status, 404);
    let (status, body) = b
        .post("/dead/purge", &[("queue", &env.queue), ("all", "1")])
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = b
        .post("/dead/purge", &[("queue", &env.queue), ("id", "+")])
        .await;
    assert_eq!(status, 400);
    worker.stop().await.unwrap();
    stop.cancel();
}

/// Long lists come in pages by cursor: every dead letter and every chain of a state exactly
/// once, whatever the page boundaries (60 chains share one millisecond).
#[tokio::test]
async fn long_lists_come_in_cursor_pages_that_miss_and_repeat_nothing() {
    let env = TestEnv::new().await.unwrap();
    let (base, stop) = web(Client::new(&redis_url()).unwrap()).await;
    let mut dead = std::collections::HashSet::new();
    for i in 0..120 {
        dead.insert(env.replayable_dead_letter(&format!("letter {i}")).await.0);
    }
    let mut c = env.redis.conn().await.unwrap();
    let mut want_failed = std::collections::HashSet::new();
    for i in 0..150 {
        let id = format!("chain-{i:03}");
        let at = if i < 60 {
            1_700_000_000_000_i64
        } else {
            1_700_000_000_000 + i
        };
        let state = if i % 3 == 0 { "failed" } else { "succeeded" };
        if state == "failed" {
            want_failed.insert(id.clone());
        }
        let _: () = redis::pipe()
            .zadd(env.keys.chains(), &id, at)
            .hset(env.keys.chain(&id), "state", state)
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let rows = |body: &str, attr: &str| -> Vec<String> {
        body.split(attr)
            .skip(1)
            .filter_map(|r| r.split('"').next().map(str::to_owned))
            .collect()
    };
    let next = |body: &str| -> Option<String> {
        body.split("id=\"older\" href=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .map(|h| h.replace("&amp;", "&"))
    };
    let mut seen = Vec::new();
    let mut url = format!("/dead?queue={}", env.queue);
    let mut pages = 0;
    loop {
        let (status, _, body) = get(&format!("{base}{url}")).await;
        assert_eq!(status, 200, "{body}");
        seen.extend(rows(&body, "data-dead=\""));
        pages += 1;
        match next(&body) {
            Some(n) => url = n,
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 120);
    assert_eq!(
        seen.iter()
            .cloned()
            .collect::<std::collections::HashSet<_>>(),
        dead
    );

    // Every chain, then the failed ones: page boundaries fall inside the 60 of one ms.
    for (filter, want) in [("", 150), ("&state=failed", want_failed.len())] {
        let mut seen = Vec::new();
        let mut url = format!("/chains?queue={}{filter}", env.queue);
        loop {
            let (status, _, body) = get(&format!("{base}{url}")).await;
            assert_eq!(status, 200, "{body}");
            seen.extend(
                body.split("<tr><td><a href=\"/chain?")
                    .skip(1)
                    .filter_map(|r| r.split("\">").nth(1)?.split('<').next().map(str::to_owned)),
            );
            match next(&body) {
                Some(n) => url = n,
                None => break,
            }
        }
        assert_eq!(seen.len(), want, "{filter}: {seen:?}");
        let seen: std::collections::HashSet<_> = seen.into_iter().collect();
        assert_eq!(seen.len(), want, "{filter}: a chain shown twice");
        if !filter.is_empty() {
            assert_eq!(seen, want_failed);
        }
    }
    let (status, _, _) = get(&format!("{base}/chains?queue={}&state=bogus", env.queue)).await;
    assert_eq!(status, 400);
    let (status, _, _) = get(&format!("{base}/dead?queue={}&before=x", env.queue)).await;
    assert_eq!(status, 400);
    stop.cancel();
}

#[tokio::test]
async fn the_costs_page_charts_the_ledger_for_a_range() {
    let env = TestEnv::new().await.unwrap();
    let (base, stop) = web(Client::new(&redis_url()).unwrap()).await;
    let (status, _, body) = get(&format!("{base}/costs")).await;
    assert_eq!(
        status, 503,
        "without a ledger the page says where costs live: {body}"
    );
    assert!(body.contains("DATABASE_URL"), "{body}");
    stop.cancel();

    let (base, stop) = serve_state(WebState {
        ledger: Some(env.ledger.clone()),
        ..WebState::new(Client::new(&redis_url()).unwrap())
    })
    .await;
    let worker = env.worker();
    let mut e = Envelope::new("cost me");
    e.model = Some("mock-fast".into());
    // And one task of a batch, which the page can show alone.
    let batch = format!("web-{}", env.queue);
    let mut b = Envelope::new("cost me in a batch");
    b.model = Some("mock-smart".into());
    b.batch_id = Some(batch.clone().into());
    // Whose it is, in markup the page must escape, and a team tag.
    let tenant = format!("<i>{}</i>", env.queue);
    b.tenant = Some(tenant.clone().into());
    b.tags = [("team".to_owned(), "search".to_owned())].into();
    for t in [&e, &b] {
        env.redis.enqueue(&env.keys, t).await.unwrap();
        env.wait_final(&t.id.unwrap(), WAIT).await.unwrap();
    }
    worker.stop().await.unwrap();
    let (status, _, body) = get(&format!("{base}/costs")).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("<svg id=\"by-day\""), "{body}");
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    assert!(
        body.contains(&format!("{today}: $")),
        "today has a bar: {body}"
    );
    for part in [
        "By provider",
        "By model",
        "By task type",
        "By tenant",
        "(none)",
        "Costliest chains",
        "Insights",
    ] {
        assert!(body.contains(part), "{part}: {body}");
    }
    assert!(!body.contains(&tenant), "a tenant is shown escaped: {body}");
    // One tenant's page, by its team tag too.
    let tenant_query: String = tenant
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'0'..=b'9' | b'-' => char::from(b).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (status, _, body) = get(&format!("{base}/costs?tenant={tenant_query}&tag=team")).await;
    assert_eq!(status, 200, "{body}");
    let shown = tenant.replace('<', "&lt;").replace('>', "&gt;");
    assert!(
        body.contains(&format!("over 1 call(s) of tenant {shown}")),
        "the tenant's one call: {body}"
    );
    assert!(
        body.contains("By tag team") && body.contains("<td>search</td>"),
        "{body}"
    );
    assert!(body.contains("mock/mock-smart") && !body.contains("mock/mock-fast"));
    assert!(
        !body.contains(&tenant) && !body.contains("Costliest chains"),
        "{body}"
    );
    let (status, _, body) = get(&format!("{base}/costs?tag=te%20am")).await;
    assert_eq!(status, 400, "{body}");
    let (status, _, body) = get(&format!("{base}/costs?batch={batch}")).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(&format!("over 1 call(s) of batch {batch}")),
        "the batch's one call: {body}"
    );
    assert!(body.contains("mock/mock-smart") && !body.contains("mock/mock-fast"));
    assert!(!body.contains("Costliest chains"), "{body}");
    let (status, _, body) = get(&format!("{base}/costs?batch=%3Cb%3E")).await;
    assert_eq!(status, 400, "{body}");
    assert!(!body.contains("<b>"), "{body}");
    let (status, _, body) = get(&format!("{base}/costs?since=2026-13-01")).await;
    assert_eq!(status, 400, "{body}");
    let (status, _, _) = get(&format!("{base}/costs?since=2026-11-02&until=2026-11-01")).await;
    assert_eq!(status, 400);
    stop.cancel();
}

/// The binary as Kubernetes runs it: `--health-check` says whether a server answers (exit 1,
/// then 0), and SIGTERM stops the server with exit 0.
#[tokio::test]
async fn the_binary_answers_its_health_check_and_stops_on_sigterm() {
    let port = llmq_tests::harness::free_port();
    let listen = format!("127.0.0.1:{port}");
    let llmq = llmq_tests::harness::binary("llmq");
    let check = || {
        std::process::Command::new(&llmq)
            .args(["web", "--health-check"])
            .env("LLMQ_WEB_LISTEN", &listen)
            .output()
            .unwrap()
    };
    let out = check();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not answer"));
    let mut server = std::process::Command::new(&llmq)
        .args(["web", "--listen", &listen])
        .env("REDIS_URL", redis_url())
        .env_remove("LLMQ_WEB_TOKEN")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut up = false;
    for _ in 0..100 {
        if check().status.success() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "llmq web never answered its health check");
    let pid = server.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut status = None;
    for _ in 0..100 {
        if let Some(s) = server.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let Some(status) = status else {
        server.kill().unwrap();
        panic!("llmq web did not stop within 10 s of SIGTERM");
    };
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn the_overview_shows_the_room_by_priority_and_tenants_as_text() {
    let env = TestEnv::new().await.unwrap();
    let (base, stop) = web(Client::new(&redis_url()).unwrap()).await;
    let mut s = env.settings();
    s.concurrency = 1;
    let w = llmq_tests::harness::WorkerHandle::start(s);
    let hostile = "<img src=x onerror=alert(1)>";
    for i in 0..4 {
        let mut e = Envelope::new(format!("slow {i}"));
        e.model = Some("slow-1500".into());
        e.priority = Some(3);
        e.tenant = Some(hostile.into());
        env.redis.enqueue(&env.keys, &e).await.unwrap();
    }
    // One runs; three wait their turn in the room.
    env.eventually("three tasks in the room", WAIT, || async {
        env.redis.counts(&env.keys).await.unwrap().ready_by_priority == [(3, 3)]
    })
    .await
    .unwrap();
    let (status, _, body) = get(&format!("{base}/")).await;
    assert_eq!(status, 200);
    let line = format!(
        "{q}: priority 3: 3; busiest tenants: &lt;img src=x onerror=alert(1)&gt; 3 (priority 3)",
        q = env.queue
    );
    assert!(body.contains(&line), "{line} in {body}");
    assert!(!body.contains(hostile), "{body}");
    w.stop().await.unwrap();
    stop.cancel();
}

/// The workers page lists a worker with the task it holds; drained from the page it takes
/// no new task and finishes the one it held, and `llmq worker resume` sets it going again.
#[tokio::test]
async fn a_worker_drained_from_the_page_finishes_what_it_holds_and_takes_nothing_new() {
    let env = TestEnv::new().await.unwrap();
    let (base, stop) = serve_state(WebState {
        token: Some(TOKEN.into()),
        ..WebState::new(Client::new(&redis_url()).unwrap())
    })
    .await;
    let id = format!("{}-drainee", env.queue);
    let mut settings = env.settings();
    settings.worker_id = Some(id.clone());
    settings.concurrency = 2;
    let worker = llmq_tests::harness::WorkerHandle::start(settings);
    let mut slow = Envelope::new("hold me");
    slow.model = Some("slow-5000".into());
    slow.task_type = Some("code_review".into());
    env.redis.enqueue(&env.keys, &slow).await.unwrap();
    let slow_id = slow.id.unwrap();
    let browser = Browser::sign_in(&base).await;
    // The page shows the worker (from its heartbeat) holding the slow task (read from Redis).
    let page = std::cell::RefCell::new(String::new());
    env.eventually("the worker shown holding the slow task", WAIT, || async {
        let got = browser
            .get(&format!("/workers?queue={}", env.queue))
            .await
            .1;
        let shown =
            got.contains(&format!("id={slow_id}\">code_review</a>")) && got.contains(" / 2</td>");
        *page.borrow_mut() = got;
        shown
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", page.borrow()));
    let page = page.into_inner();
    assert!(page.contains(&format!("<code>{id}</code>")), "{page}");
    assert!(
        page.contains("<span class=\"state live\">live</span>"),
        "{page}"
    );

    let (status, said) = browser.post("/workers/drain", &[("id", &id)]).await;
    assert_eq!(status, 200, "{said}");
    assert!(said.contains("drains"), "{said}");
    let (status, _) = browser
        .post("/workers/drain", &[("id", "no-such-worker")])
        .await;
    assert_eq!(status, 404);
    // Once it has noticed (its next beat), new tasks wait while the slow one finishes.
    env.eventually("the worker noticing its drain", WAIT, || async {
        env.redis
            .fleet()
            .await
            .unwrap()
            .iter()
            .any(|w| w.id == id && w.info.as_ref().is_some_and(|i| i.draining))
    })
    .await
    .unwrap();
    let mut waiting = Vec::new();
    for i in 0..3 {
        let mut e = Envelope::new(format!("after the drain {i}"));
        e.model = Some("mock-fast".into());
        env.redis.enqueue(&env.keys, &e).await.unwrap();
        waiting.push(e.id.unwrap());
    }
    let r = env.wait_final(&slow_id, WAIT).await.unwrap();
    assert_eq!(r.status, llmq_shared::outcome::Status::Succeeded);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let counts = env.redis.counts(&env.keys).await.unwrap();
    assert_eq!((counts.ready, counts.in_flight), (3, 0), "{counts:?}");
    env.eventually("the page showing the worker drained", WAIT, || async {
        let got = browser.get("/workers").await.1;
        got.contains(&format!(
            "<code>{id}</code></td><td><span class=\"state drained\">"
        ))
    })
    .await
    .unwrap();
    let (code, listed) = env.cli(&["worker", "list"]).await;
    assert_eq!(code, 0);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("drained")),
        "{listed}"
    );

    let (code, said) = env.cli(&["worker", "resume", &id]).await;
    assert_eq!(code, 0, "{said}");
    for t in &waiting {
        let r = env.wait_final(t, WAIT).await.unwrap();
        assert_eq!(
            (r.status, r.attempts),
            (llmq_shared::outcome::Status::Succeeded, 1)
        );
    }
    let (code, _) = env.cli(&["worker", "drain", "no-such-worker"]).await;
    assert_eq!(code, 1);
    worker.stop().await.unwrap();
    // A worker that stopped cleanly leaves the registry.
    assert!(!env.redis.fleet().await.unwrap().iter().any(|w| w.id == id));
    stop.cancel();
}

/// Dead letters as a work list: a search by the error's words and by model finds exactly
/// its letters, the errors come grouped, and "replay all that match" replays 5,000 of 10,000
/// in the background, each once, while the page keeps answering and shows its progress.
#[tokio::test]
async fn dead_letters_are_searched_grouped_and_replayed_in_the_background() {
    let env = TestEnv::new().await.unwrap();
    let (base, stop) = serve_state(WebState {
        token: Some(TOKEN.into()),
        ..WebState::new(Client::new(&redis_url()).unwrap())
    })
    .await;
    env.redis.ensure_group(&env.keys).await.unwrap();
    let mut c = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for start in (0..10_000).step_by(1000) {
        let mut pipe = redis::pipe();
        for i in start..start + 1000 {
            let mut e = Envelope::new(format!("letter {i}"));
            e.model = Some(
                if i % 2 == 0 {
                    "mock-fast"
                } else {
                    "mock-smart"
                }
                .into(),
            );
            let error = if i % 2 == 0 {
                format!("quota exceeded for key {i}")
            } else {
                format!("<b>bad</b> request {i}")
            };
            pipe.cmd("XADD")
                .arg(env.keys.dead())
                .arg("*")
                .arg("task")
                .arg(e.to_json())
                .arg("error")
                .arg(error)
                .arg("class")
                .arg(if i % 2 == 0 { "quota" } else { "fatal" })
                .ignore();
        }
        let () = pipe.query_async(&mut c).await.unwrap();
    }
    let b = Browser::sign_in(&base).await;
    let q = &env.queue;
    let (status, page) = b
        .get(&format!("/dead?queue={q}&q=QUOTA+exceeded&model=mock-fast"))
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page.matches("<tr data-dead=").count(), 50, "{page}");
    assert!(!page.contains("request 9"), "{page}");
    assert!(page.contains("quota exceeded for key"), "{page}");
    let (_, none) = b
        .get(&format!("/dead?queue={q}&q=quota&model=mock-smart"))
        .await;
    assert!(none.contains("No dead letters here match"), "{none}");
    // Grouped by error, numbers as #, markup as text.
    let (_, all) = b.get(&format!("/dead?queue={q}")).await;
    assert!(all.contains("quota exceeded for key #"), "{all}");
    assert!(all.contains("&lt;b&gt;bad&lt;/b&gt; request #"), "{all}");

    let (status, said) = b
        .post(
            "/dead/replay",
            &[
                ("queue", q),
                ("all", "1"),
                ("confirm", "1"),
                ("q", "quota exceeded"),
            ],
        )
        .await;
    assert_eq!(status, 200, "{said}");
    assert!(said.contains("in the background"), "{said}");
    // The page answers while the job runs, and shows it; then it ends with every match once.
    let mut pages = 0;
    loop {
        let (status, page) = b.get(&format!("/dead?queue={q}")).await;
        assert_eq!(status, 200);
        pages += 1;
        if page.contains("done at") {
            assert!(page.contains("<td class=\"num\">10000</td><td class=\"num\">5000</td><td class=\"num\">5000</td>"), "{page}");
            break;
        }
        assert!(pages < 3000, "the job did not end: {page}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let counts = env.redis.counts(&env.keys).await.unwrap();
    assert_eq!((counts.dead, counts.ready), (5000, 5000), "{counts:?}");
    // Without the confirmation, nothing starts.
    let (status, _) = b
        .post("/dead/purge", &[("queue", q), ("all", "1"), ("q", "bad")])
        .await;
    assert_eq!(status, 400);
    stop.cancel();
}
