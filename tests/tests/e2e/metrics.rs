//! `/healthz`, `/readyz` and `/metrics` of a running worker.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use llmq_tests::harness::{TestEnv, WorkerHandle};

#[tokio::test]
async fn a_worker_serves_health_readiness_and_prometheus_metrics() {
    let env = TestEnv::new().await.unwrap();
    let port = llmq_tests::harness::free_port();
    let mut s = env.settings();
    s.metrics_listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
    let w = WorkerHandle::start(s);
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    env.eventually("the worker ready", Duration::from_secs(10), || async {
        http.get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await
    .unwrap();
    assert_eq!(
        http.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let (code, _) = env
        .cli(&[
            "submit", "--prompt", "count me", "--queue", &env.queue, "--wait",
        ])
        .await;
    assert_eq!(code, 0);
    let body = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let succeeded = format!(
        "llmq_tasks_total{{queue=\"{}\",outcome=\"succeeded\"}} 1",
        env.queue
    );
    assert!(body.contains(&succeeded), "no `{succeeded}` in\n{body}");
    assert!(body.contains("llmq_provider_call_seconds_bucket"), "{body}");
    assert!(body.contains("llmq_tokens_total"), "{body}");
    w.stop().await.unwrap();
}

#[tokio::test]
async fn a_worker_whose_finisher_cannot_write_is_not_ready_until_it_can() {
    let env = TestEnv::new().await.unwrap();
    let (url, ledger) = env.own_ledger().await;
    let port = llmq_tests::harness::free_port();
    let mut s = env.settings();
    s.database_url = Some(url);
    s.metrics_listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
    let w = WorkerHandle::start(s);
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    let http = reqwest::Client::new();
    let status = || async {
        http.get(&readyz)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .ok()
    };
    env.eventually("the worker ready", Duration::from_secs(10), || async {
        status().await == Some(200)
    })
    .await
    .unwrap();

    // Every write of a call fails until the table is back: the worker must say so.
    sqlx::query("ALTER TABLE provider_calls RENAME TO provider_calls_away")
        .execute(ledger.pool())
        .await
        .unwrap();
    let mut task = llmq_shared::envelope::Envelope::new("wait for the ledger");
    task.model = Some("mock-fast".into());
    let id = task.id.unwrap();
    env.redis.enqueue(&env.keys, &task).await.unwrap();
    env.eventually("the worker unready", Duration::from_secs(10), || async {
        status().await == Some(503)
    })
    .await
    .unwrap();
    sqlx::query("ALTER TABLE provider_calls_away RENAME TO provider_calls")
        .execute(ledger.pool())
        .await
        .unwrap();
    let r = env.wait_final(&id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(r.status, llmq_shared::outcome::Status::Succeeded);
    env.eventually(
        "the worker ready again",
        Duration::from_secs(10),
        || async { status().await == Some(200) },
    )
    .await
    .unwrap();
    w.stop().await.unwrap();
}

/// `promtool check metrics` on what the running binaries serve: a worker that ran tasks (one
/// failing) and a scheduler that published its gauges. Every metric has HELP and TYPE, the
/// counters end in `_total` and are counters, units are Prometheus's; the build is named.
#[tokio::test]
async fn every_binary_s_metrics_pass_promtool() {
    let env = TestEnv::new().await.unwrap();
    let promtool = which("promtool");
    let http = reqwest::Client::new();
    let scrape = |port: u16| {
        let http = http.clone();
        async move {
            http.get(format!("http://127.0.0.1:{port}/metrics"))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()
        }
    };
    let worker_port = llmq_tests::harness::free_port();
    let worker = llmq_tests::harness::WorkerProcess::spawn(
        &env,
        &["--metrics-listen", &format!("127.0.0.1:{worker_port}")],
    )
    .unwrap();
    let mut ids = Vec::new();
    for model in ["mock-fast", "mock-fast", "fail-400"] {
        let mut e = llmq_shared::envelope::Envelope::new("measure me");
        e.model = Some(model.into());
        e.priority = Some(3);
        env.redis.enqueue(&env.keys, &e).await.unwrap();
        ids.push(e.id.unwrap());
    }
    for id in &ids {
        env.wait_final(id, Duration::from_secs(30)).await.unwrap();
    }
    let body = std::cell::RefCell::new(String::new());
    env.eventually("the worker's metrics", Duration::from_secs(10), || async {
        let got = scrape(worker_port).await.unwrap_or_default();
        let done = got.contains("llmq_task_latency_seconds_bucket");
        *body.borrow_mut() = got;
        done
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", body.borrow()));
    let worker_body = body.borrow().clone();
    let body = worker_body;
    for want in [
        "# TYPE llmq_cost_microdollars_total counter",
        "# HELP llmq_tasks_total ",
        "# TYPE llmq_task_wait_seconds histogram",
        "llmq_build_info{version=\"",
    ] {
        assert!(body.contains(want), "no `{want}` in\n{body}");
    }
    assert!(
        body.contains(&format!(
            "llmq_task_wait_seconds_count{{queue=\"{}\",task_type=\"data_analysis\",priority=\"3\"}} 3",
            env.queue
        )),
        "{body}"
    );
    assert!(!body.contains("llmq_cost_usd_total"), "{body}");
    promtool_passes(&promtool, "llmq-worker", &body);
    drop(worker);
    let body = std::cell::RefCell::new(String::new());

    let config = std::env::temp_dir().join(format!("llmq-{}-scheduler.yaml", env.queue));
    std::fs::write(
        &config,
        include_str!("../../../examples/providers.mock.yaml"),
    )
    .unwrap();
    let port = llmq_tests::harness::free_port();
    let mut scheduler = std::process::Command::new(llmq_tests::harness::binary("llmq-scheduler"))
        .env("REDIS_URL", llmq_tests::harness::redis_url())
        .env("DATABASE_URL", llmq_tests::harness::database_url())
        .env("LLMQ_CONFIG", &config)
        .env("LLMQ_SCHEDULER_NAMESPACE", &env.queue)
        .env("RUST_LOG", "warn")
        .args([
            "--queue",
            &env.queue,
            "--metrics-listen",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    env.eventually(
        "the scheduler's gauges",
        Duration::from_secs(20),
        || async {
            let got = scrape(port).await.unwrap_or_default();
            let done = got.contains("llmq_queue_oldest_ready_age_seconds");
            *body.borrow_mut() = got;
            done
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", body.borrow()));
    let body = body.into_inner();
    let _ = scheduler.kill();
    let _ = scheduler.wait();
    assert!(body.contains("# HELP llmq_queue_backlog "), "{body}");
    promtool_passes(&promtool, "llmq-scheduler", &body);
}

/// The path of `program`, which the suite needs (`make test` installs it).
fn which(program: &str) -> std::path::PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(program))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{program} is missing: `make promtool-deps` installs it"))
}

fn promtool_passes(promtool: &std::path::Path, who: &str, body: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool on {who}'s metrics: {said}\n{body}"
    );
}

/// The alert rules (`deploy/monitoring/alerts.yaml`): `promtool check rules`, and `promtool
/// test rules` with a case for every alert firing and one staying quiet; and every metric an
/// expression names is one the binaries describe (`llmq_shared::health`), every label it
/// groups by one they set.
#[test]
fn the_alert_rules_pass_promtool_and_name_only_exported_metrics() {
    let promtool = which("promtool");
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/monitoring");
    for args in [
        ["check", "rules", "alerts.yaml"],
        ["test", "rules", "alerts.test.yaml"],
    ] {
        let out = std::process::Command::new(&promtool)
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rules = std::fs::read_to_string(format!("{dir}/alerts.yaml")).unwrap();
    let tests = std::fs::read_to_string(format!("{dir}/alerts.test.yaml")).unwrap();
    // Every alert has a case that fires and a case that stays quiet.
    for alert in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        let cases: Vec<&str> = tests
            .split("- name: ")
            .filter(|c| c.contains(&format!("alertname: {alert}\n")))
            .collect();
        assert!(
            cases.iter().any(|c| c.contains("exp_labels")),
            "no case where {alert} fires"
        );
        assert!(
            cases.iter().any(|c| c.contains("exp_alerts: []")),
            "no case where {alert} stays quiet"
        );
    }
    let sources: String = ["shared/src", "worker/src", "scheduler/src", "producer/src"]
        .iter()
        .flat_map(|d| rust_files(&format!("{}/../{d}", env!("CARGO_MANIFEST_DIR"))))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    let described: std::collections::HashSet<String> = words_after(&sources, "describe_")
        .into_iter()
        .filter(|w| w.starts_with("llmq_"))
        .collect();
    // Labels the code sets: `"name" =>` in a metric's macro.
    let labels: std::collections::HashSet<String> = sources
        .split("\" =>")
        .filter_map(|before| before.rsplit('"').next().map(str::to_owned))
        .collect();
    for name in rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("llmq_"))
    {
        let base = name
            .trim_end_matches("_bucket")
            .trim_end_matches("_count")
            .trim_end_matches("_sum");
        assert!(
            described.contains(base),
            "alerts.yaml names {name}, which no binary exports"
        );
    }
    for by in rules.split("by (").skip(1) {
        for label in by.split(')').next().unwrap().split(',').map(str::trim) {
            assert!(
                labels.contains(label),
                "alerts.yaml groups by `{label}`, which no metric has"
            );
        }
    }
}

fn rust_files(dir: &str) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(rust_files(p.to_str().unwrap()));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}

/// The first string literal after each `marker...!(` in `text`.
fn words_after(text: &str, marker: &str) -> Vec<String> {
    text.split(marker)
        .skip(1)
        .filter_map(|rest| {
            let (_, args) = rest.split_once("!(")?;
            let quoted = args.trim_start().strip_prefix('"')?;
            Some(quoted.split('"').next()?.to_owned())
        })
        .collect()
}
