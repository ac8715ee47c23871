//! The task search (`/tasks`): finished tasks from the ledger by state and filters, paged by
//! cursor in both directions with nothing missed or repeated; live ones (ready, in flight,
//! delayed) from Redis; hostile text shown as text.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::Duration;

use chrono::Utc;
use llmq::web::{WebState, serve};
use llmq_shared::envelope::Envelope;
use llmq_shared::history::{Page, TaskFilter};
use llmq_shared::outcome::Status;
use llmq_shared::queue::Client;
use llmq_tests::harness::{SeededRng, TestEnv, redis_url};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

async fn web(env: &TestEnv) -> (String, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let state = WebState {
        ledger: Some(env.ledger.clone()),
        ..WebState::new(Client::new(&redis_url()).unwrap())
    };
    tokio::spawn(serve(listener, state, stop.clone()));
    (base, stop)
}

async fn get(url: &str) -> (u16, String) {
    let r = reqwest::get(url).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Ledger rows of a queue of its own, many sharing a finish time (ties broken by id) and
/// spread over two days, a seeded mix of states, tenants and errors: every search pages
/// through exactly the rows its SQL selects, older then newer, none twice.
#[tokio::test]
async fn every_search_pages_through_exactly_what_it_matches() {
    let env = TestEnv::new().await.unwrap();
    let pool = env.ledger.pool();
    let mut rng = SeededRng(0x7a5c);
    let now = Utc::now();
    let statuses = [
        "succeeded",
        "succeeded",
        "succeeded",
        "failed",
        "dead",
        "cancelled",
    ];
    for i in 0..400 {
        let status = statuses[rng.below(statuses.len())];
        // Clumps of equal times, a few seconds to two days back.
        let back = chrono::Duration::seconds((rng.below(60) * 2900) as i64);
        let error = (status != "succeeded").then(|| {
            if rng.below(3) == 0 {
                format!("quota 50%_off exceeded for call {i}")
            } else {
                format!("bad request {i}")
            }
        });
        sqlx::query(
            "INSERT INTO tasks (task_id, queue, task_type, status, attempts, model, tenant, tags,
                error, error_class, finished_at)
             VALUES ($1, $2, $3, $4, 1, $5, $6, $7, $8, $9, $10)",
        )
        .bind(uuid::Uuid::new_v4())
        .bind(&env.queue)
        .bind(if i % 2 == 0 {
            "code_review"
        } else {
            "research"
        })
        .bind(status)
        .bind(if i % 3 == 0 {
            "mock-smart"
        } else {
            "mock-fast"
        })
        .bind(format!("tenant-{}", i % 4))
        .bind(serde_json::json!({"team": if i % 5 == 0 { "search" } else { "ads" }}))
        .bind(&error)
        .bind(
            error
                .as_ref()
                .map(|_| if i % 2 == 0 { "fatal" } else { "transient" }),
        )
        .bind(now - back)
        .execute(pool)
        .await
        .unwrap();
    }
    let base = TaskFilter {
        queue: Some(env.queue.clone()),
        since: now - chrono::Duration::days(3),
        until: now + chrono::Duration::seconds(1),
        ..TaskFilter::default()
    };
    let searches = [
        base.clone(),
        TaskFilter {
            status: Some("succeeded".into()),
            ..base.clone()
        },
        TaskFilter {
            status: Some("dead".into()),
            ..base.clone()
        },
        TaskFilter {
            text: Some("50%_OFF".into()),
            ..base.clone()
        },
        TaskFilter {
            tenant: Some("tenant-1".into()),
            task_type: Some("research".into()),
            ..base.clone()
        },
        TaskFilter {
            tag: Some(("team".into(), "search".into())),
            ..base.clone()
        },
        TaskFilter {
            model: Some("mock-smart".into()),
            error_class: Some("fatal".into()),
            ..base.clone()
        },
        TaskFilter {
            since: now - chrono::Duration::hours(5),
            ..base.clone()
        },
    ];
    for f in &searches {
        let want: i64 = {
            let mut q = sqlx::QueryBuilder::<sqlx::Postgres>::new(
                "SELECT count(*) FROM tasks WHERE queue = ",
            );
            q.push_bind(&env.queue)
                .push(" AND finished_at >= ")
                .push_bind(f.since)
                .push(" AND finished_at < ")
                .push_bind(f.until);
            if let Some(s) = &f.status {
                q.push(" AND status = ").push_bind(s);
            }
            if let Some(t) = &f.text {
                q.push(" AND strpos(lower(error), lower(")
                    .push_bind(t)
                    .push(")) > 0");
            }
            if let Some(t) = &f.tenant {
                q.push(" AND tenant = ").push_bind(t);
            }
            if let Some(t) = &f.task_type {
                q.push(" AND task_type = ").push_bind(t);
            }
            if let Some((k, v)) = &f.tag {
                q.push(" AND tags ->> ")
                    .push_bind(k)
                    .push(" = ")
                    .push_bind(v);
            }
            if let Some(m) = &f.model {
                q.push(" AND model = ").push_bind(m);
            }
            if let Some(c) = &f.error_class {
                q.push(" AND error_class = ").push_bind(c);
            }
            q.build_query_scalar().fetch_one(pool).await.unwrap()
        };
        assert!(want > 0, "a search that finds nothing tests nothing: {f:?}");
        // Older, page by page, from the newest.
        let mut seen = Vec::new();
        let mut page = env.ledger.find_tasks(f, Page::Newest, 17).await.unwrap();
        assert_eq!((page.count, page.more), (want, false), "{f:?}");
        assert!(page.newer.is_none());
        loop {
            seen.extend(page.tasks.iter().map(|t| (t.finished_at, t.task_id)));
            match page.older {
                Some(c) => page = env.ledger.find_tasks(f, Page::Older(c), 17).await.unwrap(),
                None => break,
            }
        }
        assert_eq!(seen.len() as i64, want, "{f:?}");
        let unique: HashSet<_> = seen.iter().collect();
        assert_eq!(unique.len(), seen.len(), "a task shown twice: {f:?}");
        assert!(
            seen.windows(2).all(|w| w[0] > w[1]),
            "not newest first: {f:?}"
        );
        // And back to the newest.
        let mut back = Vec::new();
        while let Some(c) = page.newer {
            page = env.ledger.find_tasks(f, Page::Newer(c), 17).await.unwrap();
            back.splice(0..0, page.tasks.iter().map(|t| (t.finished_at, t.task_id)));
        }
        let last_page = seen.len() - seen.len().div_ceil(17).saturating_sub(1) * 17;
        assert_eq!(back, seen[..seen.len() - last_page], "{f:?}");
    }
}

/// As an operator would: a failed task found by a word of its error, ready, delayed and in
/// flight tasks listed live, and markup in a prompt, a tenant or an error shown as text.
#[tokio::test]
async fn the_page_finds_failures_by_their_words_and_lists_live_tasks() {
    let env = TestEnv::new().await.unwrap();
    let (base, stop) = web(&env).await;
    let q = &env.queue;
    // Live first: nothing reads the queue yet.
    env.redis.ensure_group(&env.keys).await.unwrap();
    let mut ready = Envelope::new("<script>alert('ready')</script>");
    ready.tenant = Some("<b>acme</b>".into());
    env.redis.enqueue(&env.keys, &ready).await.unwrap();
    let mut later = Envelope::new("run me tomorrow");
    later.run_at = Some(Utc::now() + chrono::Duration::days(1));
    env.redis.enqueue(&env.keys, &later).await.unwrap();
    // The overview shows the queue though no worker has served it yet.
    env.eventually(
        "the overview listing a queue no worker served",
        WAIT,
        || async {
            get(&format!("{base}/"))
                .await
                .1
                .contains(&format!("data-queue=\"{q}\""))
        },
    )
    .await
    .unwrap();
    let (status, body) = get(&format!("{base}/tasks?queue={q}&state=ready")).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&ready.id.unwrap().to_string()[..8]), "{body}");
    assert!(
        body.contains("&lt;script&gt;alert(&#39;ready&#39;)"),
        "{body}"
    );
    assert!(
        body.contains("&lt;b&gt;acme&lt;/b&gt;") && !body.contains("<b>acme"),
        "{body}"
    );
    let (_, body) = get(&format!("{base}/tasks?queue={q}&state=delayed")).await;
    assert!(
        body.contains("run me tomorrow") && body.contains("1 task(s) delayed"),
        "{body}"
    );
    let (_, body) = get(&format!(
        "{base}/tasks?queue={q}&state=ready&q=nothing-like-it"
    ))
    .await;
    assert!(
        !body.contains("alert(&#39;ready"),
        "the filter leaves it out: {body}"
    );

    // A worker runs them: the ready one succeeds, a slow one is in flight, one fails.
    let worker = env.worker();
    let mut slow = Envelope::new("take your time");
    slow.model = Some("slow-5000".into());
    env.redis.enqueue(&env.keys, &slow).await.unwrap();
    let mut bad = Envelope::new("this one is refused");
    bad.model = Some("fail-400".into());
    bad.tenant = Some("<i>t</i>".into());
    env.redis.enqueue(&env.keys, &bad).await.unwrap();
    let bad_id = bad.id.unwrap();
    env.eventually("the slow task in flight", WAIT, || async {
        get(&format!("{base}/tasks?queue={q}&state=in_flight"))
            .await
            .1
            .contains("take your time")
    })
    .await
    .unwrap();
    let r = env.wait_final(&bad_id, WAIT).await.unwrap();
    assert_eq!(r.status, Status::Dead, "{r:?}");
    let word = r
        .error
        .as_deref()
        .unwrap()
        .split_whitespace()
        .find(|w| w.len() > 5)
        .unwrap()
        .to_owned();
    let mut page = String::new();
    for _ in 0..200 {
        page = get(&format!(
            "{base}/tasks?queue={q}&state=dead&q={}",
            word.trim_matches(|c: char| !c.is_alphanumeric())
        ))
        .await
        .1;
        if page.contains(&bad_id.to_string()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(page.contains(&format!("id={bad_id}")), "{word}: {page}");
    assert!(page.contains("&lt;i&gt;t&lt;/i&gt;"), "{page}");
    assert!(page.contains("1 task(s) finished"), "{page}");
    // The same words find nothing among the tasks that succeeded.
    let (_, none) = get(&format!("{base}/tasks?queue={q}&state=succeeded&q=refused")).await;
    assert!(none.contains("0 task(s) finished"), "{none}");
    // Bad input gets a page that says so.
    for bad in [
        "state=sleeping",
        "state=finished&since=yesterday",
        "state=finished&older=x_y",
        "state=ready&queue=a%7Db",
    ] {
        let (status, body) = get(&format!("{base}/tasks?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    worker.stop().await.unwrap();
    stop.cancel();
}

/// A task's page tells its whole story: the request as text, each provider call with its
/// error, and the actions its state allows (replay a dead one, run a delayed one now), each
/// refused without a sign-in.
#[tokio::test]
async fn a_task_s_page_tells_its_story_and_offers_what_its_state_allows() {
    let env = TestEnv::new().await.unwrap();
    let token = "tasks-token";
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let state = WebState {
        ledger: Some(env.ledger.clone()),
        token: Some(token.into()),
        ..WebState::new(Client::new(&redis_url()).unwrap())
    };
    tokio::spawn(serve(listener, state, stop.clone()));
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let signed = http
        .post(format!("{base}/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={token}"))
        .send()
        .await
        .unwrap();
    let cookie = signed.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let get_page = |path: String| {
        let (http, cookie, base) = (http.clone(), cookie.clone(), base.clone());
        async move {
            http.get(format!("{base}{path}"))
                .header("cookie", cookie)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    let post = |path: &'static str, csrf: String, id: String| {
        let (http, cookie, base, queue) = (
            http.clone(),
            cookie.clone(),
            base.clone(),
            env.queue.clone(),
        );
        async move {
            let r = http
                .post(format!("{base}{path}"))
                .header("cookie", cookie)
                .header("origin", &base)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(format!("csrf={csrf}&queue={queue}&id={id}"))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let csrf_of = |page: &str| {
        page.split("name=\"csrf\" value=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap()
            .to_owned()
    };

    // A delayed task: run now.
    env.redis.ensure_group(&env.keys).await.unwrap();
    let mut later = Envelope::new("later, please");
    later.model = Some("mock-fast".into());
    later.run_at = Some(Utc::now() + chrono::Duration::days(1));
    env.redis.enqueue(&env.keys, &later).await.unwrap();
    let later_id = later.id.unwrap();
    let shown = get_page(format!("/task?queue={}&id={later_id}", env.queue)).await;
    assert!(
        shown.contains("later, please") && shown.contains("Run now"),
        "{shown}"
    );
    let worker = env.worker();
    let (status, said) = post("/task/run-now", csrf_of(&shown), later_id.to_string()).await;
    assert_eq!(status, 200, "{said}");
    let r = env.wait_final(&later_id, WAIT).await.unwrap();
    assert_eq!(r.status, Status::Succeeded);

    // A dead task with markup in its prompt and system text: its request as text, its
    // calls with their errors, a replay.
    let mut bad = Envelope::new("<script>alert('p')</script>");
    bad.system = Some("<b>be brief</b>".into());
    bad.model = Some("fail-400".into());
    env.redis.enqueue(&env.keys, &bad).await.unwrap();
    let bad_id = bad.id.unwrap();
    assert_eq!(
        env.wait_final(&bad_id, WAIT).await.unwrap().status,
        Status::Dead
    );
    let mut shown = String::new();
    for _ in 0..200 {
        shown = get_page(format!("/task?queue={}&id={bad_id}", env.queue)).await;
        if shown.contains("Provider calls") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        shown.contains("&lt;script&gt;alert(&#39;p&#39;)&lt;/script&gt;"),
        "{shown}"
    );
    assert!(
        shown.contains("&lt;b&gt;be brief&lt;/b&gt;") && !shown.contains("<b>be brief"),
        "{shown}"
    );
    assert!(
        shown.contains("Provider calls") && shown.contains("fail-400"),
        "{shown}"
    );
    assert!(
        shown.contains("Replay") && shown.contains(" data-done"),
        "{shown}"
    );
    // Without the anti-forgery field, refused.
    let (status, _) = post("/task/run-now", "nope".into(), bad_id.to_string()).await;
    assert_eq!(status, 403);
    let (status, said) = post("/task/run-now", csrf_of(&shown), bad_id.to_string()).await;
    assert_eq!(status, 409, "a dead task is not delayed: {said}");
    worker.stop().await.unwrap();
    stop.cancel();
}

/// The percentile of `v` as Postgres's `percentile_cont` makes it (linear between ranks).
fn percentile(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let pos = q * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// The charts' figures, as their JSON says them, are what the rows say: each minute's counts,
/// waits and call latencies computed here from seeded rows, and each day's p95 of the 30-day
/// chart within the 5 % its histogram allows.
#[tokio::test]
async fn the_charts_say_what_the_ledger_s_rows_say() {
    let env = TestEnv::new().await.unwrap();
    let (base, stop) = web(&env).await;
    let pool = env.ledger.pool();
    let mut rng = SeededRng(0xc4a7);
    let now = Utc::now();
    let minute = |k: i64| {
        chrono::DurationRound::duration_trunc(now, chrono::Duration::minutes(1)).unwrap()
            - chrono::Duration::minutes(k)
    };
    // Per minute (3, 7, 12 minutes ago) and per day (2, 5 days ago): tasks and calls.
    // Per point: its time, the waits and call latencies, the succeeded and the dead.
    type Want = (chrono::DateTime<Utc>, Vec<f64>, Vec<f64>, i64, i64);
    let mut want: Vec<Want> = Vec::new();
    for at in [
        minute(3),
        minute(7),
        minute(12),
        minute(60 * 24 * 2),
        minute(60 * 24 * 5),
    ] {
        let (mut waits, mut latencies, mut ok, mut dead) = (Vec::new(), Vec::new(), 0, 0);
        for _ in 0..(20 + rng.below(30)) {
            let id = uuid::Uuid::new_v4();
            let status = if rng.below(5) == 0 {
                "dead"
            } else {
                "succeeded"
            };
            let (wait, run) = (rng.below(5000) as i64, 100 + rng.below(2000) as i64);
            let finished = at + chrono::Duration::seconds(3 + rng.below(56) as i64);
            sqlx::query(
                "INSERT INTO tasks (task_id, queue, task_type, status, attempts, finished_at,
                    enqueued_at, duration_ms)
                 VALUES ($1, $2, 'research', $3, 1, $4, $5, $6)",
            )
            .bind(id)
            .bind(&env.queue)
            .bind(status)
            .bind(finished)
            .bind(finished - chrono::Duration::milliseconds(wait + run))
            .bind(run)
            .execute(pool)
            .await
            .unwrap();
            let latency = 50 + rng.below(3000) as i32;
            sqlx::query(
                "INSERT INTO provider_calls (task_id, run, attempt, call_no, queue, task_type,
                    provider, model, input_tokens, output_tokens, cached_tokens,
                    reasoning_tokens, cost_usd, latency_ms, outcome, worker, called_at, delivery)
                 VALUES ($1, 0, 1, 0, $2, 'research', 'mock', 'mock-fast', 10, 5, 0, 0,
                    0.000001, $3, 'ok', 'w', $4, $1)",
            )
            .bind(id)
            .bind(&env.queue)
            .bind(latency)
            .bind(finished - chrono::Duration::milliseconds(run))
            .execute(pool)
            .await
            .unwrap();
            waits.push(wait as f64);
            latencies.push(f64::from(latency));
            if status == "dead" {
                dead += 1;
            } else {
                ok += 1;
            }
        }
        want.push((at, waits, latencies, ok, dead));
    }
    let json = |span: &str| {
        let url = format!("{base}/charts?queue={}&span={span}&format=json", env.queue);
        async move {
            reqwest::get(url)
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        }
    };
    let hour = json("hour").await;
    let points = hour["points"].as_array().unwrap();
    assert_eq!(points.len(), 60);
    for (at, waits, latencies, ok, dead) in &want[..3] {
        let p = points
            .iter()
            .find(|p| {
                p["at"]
                    .as_str()
                    .unwrap()
                    .parse::<chrono::DateTime<Utc>>()
                    .unwrap()
                    == *at
            })
            .unwrap_or_else(|| panic!("no point at {at}: {hour}"));
        assert_eq!(p["succeeded"].as_i64().unwrap(), *ok, "{p}");
        assert_eq!(p["dead"].as_i64().unwrap(), *dead, "{p}");
        assert_eq!(p["calls"].as_i64().unwrap(), ok + dead, "{p}");
        for (field, values, q) in [
            ("wait_p95_ms", waits, 0.95),
            ("wait_p50_ms", waits, 0.5),
            ("call_p95_ms", latencies, 0.95),
        ] {
            let got = p[field].as_f64().unwrap();
            let exact = percentile(values.clone(), q);
            assert!(
                (got - exact).abs() < 1.5,
                "{field} at {at}: {got} against {exact}"
            );
        }
    }
    // The minutes with nothing are there, empty.
    assert!(points.iter().filter(|p| p["finished"] == 0).count() >= 57);
    // 30 days, from the rollups: each day's count exact, its p95 within the histogram's 5 %.
    let month = json("30d").await;
    for (at, _, latencies, ok, dead) in &want[3..] {
        let day = at.date_naive().to_string();
        let p = month["points"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["at"].as_str().unwrap().starts_with(&day))
            .unwrap();
        assert_eq!(p["finished"].as_i64().unwrap(), ok + dead, "{p}");
        assert_eq!(p["failed"].as_i64().unwrap(), *dead, "{p}");
        let got = p["call_p95_ms"].as_f64().unwrap();
        let exact = percentile(latencies.clone(), 0.95);
        assert!(
            (got / exact - 1.0).abs() <= 0.06,
            "p95 of {day}: {got} against {exact}"
        );
    }
    // The page draws them; the CSV carries a line per minute.
    let (status, page) = get(&format!("{base}/charts?queue={}&span=hour", env.queue)).await;
    assert_eq!(status, 200);
    assert!(
        page.contains("<svg class=\"chart\"") && page.contains("Time waiting"),
        "{page}"
    );
    let (_, csv) = get(&format!(
        "{base}/charts?queue={}&span=day&format=csv",
        env.queue
    ))
    .await;
    assert_eq!(csv.lines().count(), 25, "{csv}");
    let (status, _) = get(&format!("{base}/charts?span=week")).await;
    assert_eq!(status, 400);
    stop.cancel();
}
