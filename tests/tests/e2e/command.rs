#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]
//! Task text reaches a CLI provider or a check only where no option parser can read it as an
//! option: through `llmq-fake-cli`, whose parser is as permissive as the agent CLIs', for every
//! template form the provider file accepts, for the example file's own CLI entries, and for a
//! chain's check step; and the unsafe forms refused by `llmq providers check` and the worker.

use std::time::Duration;

use llmq_shared::config::Config;
use llmq_shared::outcome::ErrorClass;
use llmq_shared::provider::{Provider, Request, clients};
use llmq_tests::harness::{TestEnv, WorkerHandle, WorkerProcess, binary};
use serde_json::{Value, json};

/// Prompts shaped like options. The first is the attack: Claude Code settings with a hook.
const OPTION_LIKE: &[&str] = &[
    r#"--settings={"hooks":{"PreToolUse":[{"command":"touch pwned"}]}}"#,
    "-p",
    "--help",
    "--model=x",
    "-",
    "--",
    "--settings",
    "-m opus",
    "hello --settings={} -p",
    "\n--help",
];

fn fake() -> String {
    binary("llmq-fake-cli").display().to_string()
}

/// A provider file with one command provider `cli` running the fake CLI with `command`
/// (YAML flow-mapping entries after `program`).
fn file(command: &str) -> String {
    format!(
        "providers:\n  - name: cli\n    kind: command\n    command: {{program: \"{}\", {command}}}\n    models: [{{id: sonnet, input_usd_per_mtok: 0, output_usd_per_mtok: 0}}]\n",
        fake()
    )
}

fn provider(config: &Config, name: &str) -> std::sync::Arc<dyn Provider> {
    clients::build(config.provider(name).unwrap(), &reqwest::Client::new())
}

fn request<'a>(model: &'a str, prompt: &'a str, system: Option<&'a str>) -> Request<'a> {
    Request {
        model,
        system: system.map(Into::into),
        prompt: prompt.into(),
        max_tokens: None,
        temperature: None,
        timeout: Duration::from_secs(20),
        ..Request::default()
    }
}

/// What the fake CLI parsed.
async fn parsed(p: &dyn Provider, req: &Request<'_>) -> Value {
    let c = p.complete(req).await.unwrap_or_else(|e| panic!("{e}"));
    serde_json::from_str(&c.text).unwrap_or_else(|e| panic!("{e}: {}", c.text))
}

/// Nothing but the configured options was parsed as an option.
fn no_option_taken(v: &Value, prompt: &str) {
    assert_eq!(
        v["settings"],
        Value::Null,
        "{prompt:?} became an option: {v}"
    );
    assert_eq!(v["print"], true, "{prompt:?}: {v}");
    assert_eq!(v["model"], "sonnet", "{prompt:?}: {v}");
}

#[tokio::test]
async fn an_option_like_prompt_stays_text_in_every_accepted_template_form() {
    // (provider file entries, where the prompt must arrive)
    let forms = [
        (
            r#"args: ["-p", "--model", "{model}"], prompt_via: stdin"#,
            "stdin",
        ),
        (
            r#"args: ["-p", "--model={model}", "--prompt={prompt}"]"#,
            "prompt",
        ),
        (
            r#"args: ["-p", "--model", "{model}", "--", "{prompt}"]"#,
            "words",
        ),
        // No placeholder: appended after the `--` llmq adds.
        (
            r#"args: ["-p", "--model", "{model}"], prompt_via: arg"#,
            "words",
        ),
        (
            r#"args: ["-p", "--model", "{model}", "--prompt", "{prompt}"], value_options: ["--prompt"]"#,
            "prompt",
        ),
    ];
    for (entry, slot) in forms {
        let config = Config::parse("cli.yaml", &file(entry), &|_| None)
            .unwrap_or_else(|e| panic!("{entry}: {e}"));
        let p = provider(&config, "cli");
        for prompt in OPTION_LIKE {
            let req = request("sonnet", prompt, None);
            if entry.contains("value_options") && prompt.starts_with('-') {
                // A separate argument that would start with `-` never reaches the program.
                let e = p.complete(&req).await.unwrap_err();
                assert_eq!(e.class, ErrorClass::Fatal, "{entry} {prompt:?}: {e}");
                assert!(
                    e.message.contains("could read as an option"),
                    "{entry}: {e}"
                );
                continue;
            }
            let v = parsed(p.as_ref(), &req).await;
            no_option_taken(&v, prompt);
            let arrived = match slot {
                "words" => v["words"].clone(),
                other => v[other].clone(),
            };
            let want = if slot == "words" {
                json!([prompt])
            } else {
                json!(prompt)
            };
            assert_eq!(arrived, want, "{entry} {prompt:?}: {v}");
        }
    }
}

#[tokio::test]
async fn an_option_like_system_prompt_stays_text() {
    let config = Config::parse(
        "cli.yaml",
        &file(r#"args: ["-p", "--model", "{model}", "--system={system}", "--", "{prompt}"]"#),
        &|_| None,
    )
    .unwrap();
    let p = provider(&config, "cli");
    for text in OPTION_LIKE {
        let v = parsed(p.as_ref(), &request("sonnet", text, Some(text))).await;
        no_option_taken(&v, text);
        assert_eq!(v["system"], json!(text), "{v}");
        assert_eq!(v["words"], json!([text]), "{v}");
    }
}

#[tokio::test]
async fn the_example_files_cli_entries_take_the_prompt_on_stdin() {
    let any = |name: &str| (!name.ends_with("_URL")).then(|| "set".to_owned());
    let mut config = Config::parse(
        "providers.example.yaml",
        include_str!("../../../providers.example.yaml"),
        &any,
    )
    .unwrap();
    let mut seen = Vec::new();
    for p in &mut config.providers {
        if let Some(c) = &mut p.command {
            // The real CLI's options, parsed by the stand-in; no pause between calls.
            c.program = fake();
            c.delay = None;
            seen.push((p.name.clone(), p.models[0].id.clone()));
        }
    }
    assert_eq!(
        seen.iter().map(|(n, _)| &**n).collect::<Vec<_>>(),
        ["claude-cli", "gemini-cli", "codex-cli"]
    );
    for (name, model) in &seen {
        let p = provider(&config, name);
        for prompt in OPTION_LIKE {
            let v = parsed(p.as_ref(), &request(model, prompt, None)).await;
            assert_eq!(v["stdin"], json!(prompt), "{name}: {v}");
            assert_eq!(v["settings"], Value::Null, "{name}: {v}");
            assert_eq!(v["prompt"], Value::Null, "{name}: {v}");
            assert_eq!(v["model"], json!(model), "{name}: {v}");
            let words = if &**name == "codex-cli" {
                json!(["exec", "-"])
            } else {
                json!([])
            };
            assert_eq!(v["words"], words, "{name}: {v}");
        }
    }
}

/// Templates that put task text where a parser could take it for an option, with the
/// argument each refusal names.
const REFUSED: &[(&str, &str)] = &[
    // The old example: `-p` is a flag, so the prompt after it is read as options.
    (
        r#"args: ["-p", "{prompt}", "--model", "{model}"]"#,
        "args[1]",
    ),
    (r#"args: ["{prompt}"]"#, "args[0]"),
    (r#"args: ["-p{prompt}"]"#, "args[0]"),
    (r#"args: ["-s={system}", "--", "{prompt}"]"#, "args[0]"),
    (
        r#"args: ["--system", "{system}"], prompt_via: stdin"#,
        "args[1]",
    ),
    (
        r#"args: ["--prompt", "{prompt}"], value_options: ["--system"]"#,
        "args[1]",
    ),
];

#[tokio::test]
async fn providers_check_and_the_worker_refuse_an_unsafe_template() {
    let env = TestEnv::new().await.unwrap();
    for (i, (entry, arg)) in REFUSED.iter().enumerate() {
        let path = std::env::temp_dir().join(format!("{}-unsafe-{i}.yaml", env.queue));
        std::fs::write(&path, file(entry)).unwrap();
        let out = std::process::Command::new(binary("llmq"))
            .args(["providers", "check", "--config", path.to_str().unwrap()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{entry}: {stderr}");
        let key = format!(
            "{}:providers[0].command.{arg}: provider cli puts {{",
            path.display()
        );
        assert!(stderr.contains(&key), "{entry}: {stderr}");
        assert!(
            stderr.contains("could read task text as an option; pass it on stdin"),
            "{stderr}"
        );
        let _ = std::fs::remove_file(&path);
    }
    let bad_option = file(r#"args: ["--prompt", "{prompt}"], value_options: ["prompt"]"#);
    let path = std::env::temp_dir().join(format!("{}-unsafe-opt.yaml", env.queue));
    std::fs::write(&path, &bad_option).unwrap();
    let out = std::process::Command::new(binary("llmq"))
        .args(["providers", "check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("command.value_options[0]: `prompt` is not an option"),
        "{stderr}"
    );
    let _ = std::fs::remove_file(&path);

    // The worker refuses the same file at start, before it takes any task.
    let mut worker = WorkerProcess::spawn_with(&env, &file(REFUSED[0].0), &[]).unwrap();
    let status = worker.wait_exit(Duration::from_secs(30)).await.unwrap();
    assert_eq!(status.code(), Some(2));
}

#[tokio::test]
async fn a_check_gets_an_option_like_output_on_stdin_only() {
    use llmq_shared::config::CheckConfig;
    let env = TestEnv::new().await.unwrap();
    let mut s = env.settings();
    // `echo` answers with its prompt, so the step's output is the option-like text.
    s.config = Config::parse(
        "echo.yaml",
        "providers:\n  - {name: echo, kind: command, command: {program: cat, prompt_via: stdin}, models: [{id: m, input_usd_per_mtok: 0, output_usd_per_mtok: 0}]}\n",
        &|_| None,
    )
    .unwrap();
    s.config.checks.insert(
        "parse".into(),
        CheckConfig {
            program: fake(),
            args: vec!["-p".into(), "--model".into(), "sonnet".into()],
            env: Default::default(),
            timeout: Duration::from_secs(20),
        },
    );
    let w = WorkerHandle::start(s);
    env.redis.ensure_group(&env.keys).await.unwrap();
    let attack = OPTION_LIKE[0];
    let id = format!("{}-check", env.queue);
    let chain = json!({"v": 1, "chain_id": id, "steps": [
        {"name": "impl", "prompt": attack},
        {"name": "gate", "kind": "check", "after": ["impl"], "command": "parse"}]});
    env.xadd("chain", chain.to_string().as_bytes())
        .await
        .unwrap();
    let c = env.chain_ended(&id, Duration::from_secs(30)).await;
    assert_eq!(c.state, "succeeded", "{c:#?}");
    let out = env.step_output(&c, "gate").await;
    let v: Value = serde_json::from_str(&out).unwrap();
    no_option_taken(&v, attack);
    assert_eq!(v["stdin"], json!(attack), "{v}");
    assert_eq!(v["words"], json!([]), "{v}");
    w.stop().await.unwrap();
}

/// The names in `env`'s output.
fn names(env_output: &str) -> Vec<String> {
    let mut names: Vec<String> = env_output
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.to_owned()))
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_cli_and_a_check_see_none_of_the_workers_secrets() {
    let env = TestEnv::new().await.unwrap();
    // The worker process has REDIS_URL, DATABASE_URL and an API key in its environment.
    let config = "providers:\n  - {name: shell, kind: command, command: {program: env, prompt_via: stdin, env: {CLI_TOKEN: \"${LLMQ_TEST_CLI_TOKEN}\"}}, models: [{id: m, input_usd_per_mtok: 0, output_usd_per_mtok: 0}]}\nchecks:\n  printenv: {program: env, env: {GATE: \"on\"}}\n";
    let _worker = WorkerProcess::spawn_with_vars(
        &env,
        config,
        &[],
        &[
            ("OPENAI_API_KEY", "sk-must-not-leak"),
            ("LLMQ_TEST_CLI_TOKEN", "given"),
        ],
    )
    .unwrap();
    env.redis.ensure_group(&env.keys).await.unwrap();
    let id = format!("{}-env", env.queue);
    let chain = json!({"v": 1, "chain_id": id, "steps": [
        {"name": "cli", "prompt": "print your environment"},
        {"name": "gate", "kind": "check", "after": ["cli"], "command": "printenv"}]});
    env.xadd("chain", chain.to_string().as_bytes())
        .await
        .unwrap();
    let c = env.chain_ended(&id, Duration::from_secs(30)).await;
    assert_eq!(c.state, "succeeded", "{c:#?}");
    let cli = env.step_output(&c, "cli").await;
    assert_eq!(names(&cli), ["CLI_TOKEN", "HOME", "PATH"], "{cli}");
    assert!(cli.contains("CLI_TOKEN=given"), "{cli}");
    let gate = env.step_output(&c, "gate").await;
    assert_eq!(names(&gate), ["GATE", "HOME", "PATH"], "{gate}");
}

/// A call dropped before its program ended (a cancel, a timeout, the hard stop) kills the
/// program's whole process group: what it started in the background stops with it.
#[tokio::test]
async fn a_dropped_call_kills_what_the_program_started() {
    let dir = std::env::temp_dir().join(format!("llmq-group-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let pid_file = dir.join("child.pid");
    let script = format!("sleep 120 & echo $! > {}; wait", pid_file.display());
    let text = format!(
        "providers:\n  - name: cli\n    kind: command\n    command: {{program: sh, args: [\"-c\", {script:?}], prompt_via: stdin}}\n    models: [{{id: sonnet, input_usd_per_mtok: 0, output_usd_per_mtok: 0}}]\n"
    );
    let config = Config::parse("providers.yaml", &text, &|_| None).unwrap();
    let p = provider(&config, "cli");
    let req = request("sonnet", "hi", None);
    let mut call = Box::pin(p.complete(&req));
    let mut pid = None;
    for _ in 0..200 {
        tokio::select! {
            r = &mut call => panic!("the call ended: {:?}", r.map(|c| c.text)),
            () = tokio::time::sleep(Duration::from_millis(25)) => {}
        }
        pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        if pid.is_some() {
            break;
        }
    }
    let pid = pid.expect("the program started its background child");
    let alive = |pid: u32| {
        std::path::Path::new(&format!("/proc/{pid}")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z ")
    };
    assert!(alive(pid));
    drop(call);
    let mut gone = false;
    for _ in 0..100 {
        if !alive(pid) {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "the background child {pid} outlived the dropped call");
    std::fs::remove_dir_all(&dir).ok();
}
