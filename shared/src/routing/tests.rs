use super::*;

fn config(routing: &str) -> Config {
    let text = format!(
        r#"
providers:
  - name: paid
    kind: openai_compatible
    base_url: http://127.0.0.1:1/v1
    models:
      - {{id: big, tier: advanced, capabilities: [code, review, complex_reasoning, planning], input_usd_per_mtok: 5, output_usd_per_mtok: 15}}
      - {{id: small, tier: fast, capabilities: [code, docs, simple_tasks, analysis], input_usd_per_mtok: 0.1, output_usd_per_mtok: 0.4}}
  - name: sub
    kind: openai_compatible
    cost_tier: subscription
    base_url: http://127.0.0.1:2/v1
    models:
      - {{id: mid, tier: standard, capabilities: [code, analysis, docs], input_usd_per_mtok: 3, output_usd_per_mtok: 6}}
  - name: free
    kind: openai_compatible
    cost_tier: free
    base_url: http://127.0.0.1:3/v1
    models:
      - {{id: tiny, tier: fast, capabilities: [docs, simple_tasks], input_usd_per_mtok: 0, output_usd_per_mtok: 0}}
  - name: off
    kind: openai_compatible
    enabled: false
    base_url: http://127.0.0.1:4/v1
    models:
      - {{id: gone, input_usd_per_mtok: 0, output_usd_per_mtok: 0}}
{routing}
"#
    );
    Config::parse("t.yaml", &text, &|_| None).unwrap()
}

fn order(plan: &Plan) -> Vec<String> {
    plan.candidates.iter().map(|c| format!("{c:?}")).collect()
}

fn task(prompt: &str, ty: &str) -> Envelope {
    let mut e = Envelope::new(prompt);
    e.task_type = Some(ty.into());
    e
}

#[test]
fn cost_tiers_come_in_order_free_subscription_paid() {
    let r = config("");
    let p = plan(
        &r,
        &task("write docs", "documentation"),
        &Constraints::default(),
        &Stats::default(),
    )
    .unwrap();
    assert_eq!(order(&p), ["free/tiny", "sub/mid", "paid/small"]);
    assert!(
        p.reason.contains("cheapest capable model (free tier)"),
        "{}",
        p.reason
    );
    let p = plan(
        &r,
        &task("write code", "code_generation"),
        &Constraints::default(),
        &Stats::default(),
    )
    .unwrap();
    assert_eq!(
        order(&p),
        ["sub/mid", "paid/small", "paid/big"],
        "free/tiny cannot code"
    );
}

#[test]
fn hints_come_first_and_the_rest_remains_as_fallback() {
    let r = config("");
    let mut e = task("x", "documentation");
    e.provider = Some("paid".into());
    e.model = Some("big".into());
    let p = plan(&r, &e, &Constraints::default(), &Stats::default()).unwrap();
    assert_eq!(order(&p)[0], "paid/big");
    assert_eq!(p.reason, "provider and model hints honoured");
    assert!(
        order(&p).contains(&"free/tiny".to_owned()),
        "routing falls through when the hint's quota is gone"
    );
}

#[test]
fn with_fallback_off_only_the_named_provider_is_tried() {
    let r = config("");
    let mut e = task("x", "documentation");
    e.provider = Some("paid".into());
    e.model = Some("big".into());
    e.fallback = Some(false);
    let p = plan(&r, &e, &Constraints::default(), &Stats::default()).unwrap();
    assert_eq!(order(&p), ["paid/big"]);
    assert!(
        p.reason.ends_with("fallback off, so no other provider"),
        "{}",
        p.reason
    );
    e.fallback = Some(true);
    let p = plan(&r, &e, &Constraints::default(), &Stats::default()).unwrap();
    assert!(order(&p).len() > 1);
}

#[test]
fn risk_raises_the_tier_and_rules_pin_models() {
    let r = config(
        "routing:\n  rules:\n    - {task_type: code_review, risk: high, model: paid/big}\n    - {task_type: documentation, tier: fast}\n",
    );
    let mut e = task("review the auth module", "code_review");
    e.risk = Some(Risk::High);
    let p = plan(&r, &e, &Constraints::default(), &Stats::default()).unwrap();
    assert_eq!(order(&p), ["paid/big"]);
    assert!(
        p.reason
            .starts_with("routing rule: code_review, high risk → paid/big"),
        "{}",
        p.reason
    );
    let p = plan(
        &r,
        &task("docs", "documentation"),
        &Constraints::default(),
        &Stats::default(),
    )
    .unwrap();
    assert_eq!(order(&p)[0], "free/tiny");
    assert!(
        p.reason.contains("routing rule: documentation → fast"),
        "{}",
        p.reason
    );
}

#[test]
fn keywords_add_capabilities_and_the_cost_cap_filters() {
    let r = config(
        "routing:\n  max_cost_per_task: 0.01\n  keywords:\n    complex_reasoning: [architecture]\n",
    );
    let e = task("design the architecture", "code_generation");
    let err = plan(&r, &e, &Constraints::default(), &Stats::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs code + complex_reasoning"), "{err}");
    assert!(
        err.contains("would cost more than max_cost_per_task"),
        "{err}"
    );
}

#[test]
fn unknown_or_disabled_names_are_clear_errors() {
    let r = config("");
    let mut env = Envelope::new("x");
    env.provider = Some("zzz".into());
    assert!(
        plan(&r, &env, &Constraints::default(), &Stats::default())
            .unwrap_err()
            .0
            .contains("known providers: paid, sub, free, off")
    );
    env.provider = Some("off".into());
    assert!(
        plan(&r, &env, &Constraints::default(), &Stats::default())
            .unwrap_err()
            .0
            .contains("disabled")
    );
    env.provider = Some("paid".into());
    env.model = Some("nope".into());
    assert!(
        plan(&r, &env, &Constraints::default(), &Stats::default())
            .unwrap_err()
            .0
            .contains("its models: big, small")
    );
}

#[test]
fn constraints_exclude_models_and_providers_and_raise_the_tier_even_for_hints() {
    let r = config("");
    let mut e = task("write code", "code_generation");
    e.provider = Some("paid".into());
    e.model = Some("small".into());
    let c = Constraints {
        exclude_models: vec!["small".into()],
        ..Constraints::default()
    };
    let p = plan(&r, &e, &c, &Stats::default()).unwrap();
    assert_eq!(order(&p), ["sub/mid", "paid/big"]);
    assert!(p.reason.contains("excluded"), "{}", p.reason);

    let c = Constraints {
        exclude_providers: vec!["sub".into()],
        min_tier: Some(Tier::Standard),
        ..Constraints::default()
    };
    let p = plan(
        &r,
        &task("write code", "code_generation"),
        &c,
        &Stats::default(),
    )
    .unwrap();
    assert_eq!(
        order(&p),
        ["paid/big"],
        "small is below standard, sub is excluded"
    );

    let c = Constraints {
        exclude_models: vec!["big".into(), "mid".into(), "small".into()],
        ..Constraints::default()
    };
    let err = plan(
        &r,
        &task("write code", "code_generation"),
        &c,
        &Stats::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("excluded for this step"), "{err}");
}

#[test]
fn a_call_larger_than_a_whole_quota_is_refused_not_waited_on() {
    let mut c = config("");
    for p in &mut c.providers {
        p.quotas.usd_per_month = Some(20.0);
        p.quotas.tpm = Some(10_000_000_000);
    }
    let mut t = task("write docs", "documentation");
    t.max_tokens = Some(u32::MAX);
    // free/tiny costs nothing, so only its tokens can outgrow its quota.
    let p = plan(&c, &t, &Constraints::default(), &Stats::default()).unwrap();
    assert_eq!(order(&p), ["free/tiny"]);
    c.providers[2].quotas.tpm = Some(100_000);
    let e = plan(&c, &t, &Constraints::default(), &Stats::default()).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("no model can ever take this task: "),
        "{e}"
    );
    assert!(e.to_string().ends_with("; lower max_tokens"), "{e}");
    // An ordinary max_tokens fits.
    t.max_tokens = Some(1000);
    assert_eq!(
        order(&plan(&c, &t, &Constraints::default(), &Stats::default()).unwrap()),
        ["free/tiny", "sub/mid", "paid/small"]
    );
}

fn stats(rows: &[(&str, &str, &str, u64, u64)]) -> Stats {
    Stats {
        by_model: rows
            .iter()
            .map(|(p, m, ty, tasks, successes)| {
                let key = ((*p).to_owned(), (*m).to_owned(), (*ty).to_owned(), None);
                let o = Observed {
                    tasks: *tasks,
                    successes: *successes,
                    latency_ms: None,
                };
                (key, o)
            })
            .collect(),
    }
}

#[test]
fn a_learned_strategy_routes_away_from_a_model_that_fails_a_task_type_and_says_why() {
    // History: the subscription model fails code generation two times in three; the paid
    // small one succeeds.
    let history = stats(&[
        ("sub", "mid", "code_generation", 120, 40),
        ("paid", "small", "code_generation", 118, 111),
        ("paid", "big", "code_generation", 30, 27),
    ]);
    let e = task("write code", "code_generation");
    let plain = config("");
    let cheapest = plan(&plain, &e, &Constraints::default(), &history).unwrap();
    assert_eq!(order(&cheapest)[0], "sub/mid", "cheapest ignores history");
    for strategy in ["cost", "learning"] {
        let r = config(&format!("routing:\n  strategy: {strategy}\n  explore: 0\n"));
        let p = plan(&r, &e, &Constraints::default(), &history).unwrap();
        assert_eq!(
            order(&p),
            ["paid/small", "paid/big", "sub/mid"],
            "{strategy}"
        );
        assert!(
            p.reason.starts_with(&format!(
                "{strategy}: small for code_generation (success 0.94 over 118 calls"
            )),
            "{}",
            p.reason
        );
    }
    let r = config("routing:\n  strategy: learning\n  explore: 0\n");
    let learned = plan(&r, &e, &Constraints::default(), &history)
        .unwrap()
        .learned
        .unwrap();
    assert!(!learned.explored);
    assert!((learned.propensity - 1.0).abs() < 1e-9, "{learned:?}");
    // A type with no history routes as the prior sees it: every model alike, the cheapest.
    let p = plan(
        &r,
        &task("docs", "documentation"),
        &Constraints::default(),
        &history,
    )
    .unwrap();
    assert_eq!(order(&p)[0], "free/tiny");
    // Hints still come first.
    let mut hinted = e.clone();
    hinted.model = Some("mid".into());
    let p = plan(&r, &hinted, &Constraints::default(), &history).unwrap();
    assert_eq!(order(&p)[0], "sub/mid");
    assert!(p.learned.is_none(), "the hint, not the strategy, chose");
}

#[test]
fn a_bad_strategy_or_share_names_the_key_and_the_fix() {
    let bad = |routing: &str| {
        let text = format!(
            "providers:\n  - name: p\n    kind: openai_compatible\n    base_url: http://127.0.0.1:1/v1\n    models:\n      - {{id: m, input_usd_per_mtok: 1, output_usd_per_mtok: 1}}\nrouting:\n{routing}\n"
        );
        Config::parse("t.yaml", &text, &|_| None)
            .unwrap_err()
            .to_string()
    };
    let e = bad("  strategy: smartest");
    assert!(
        e.contains("routing.strategy") && e.contains("`smartest` is not a routing strategy"),
        "{e}"
    );
    assert!(
        e.contains("cheapest, performance, cost, balanced or learning"),
        "{e}"
    );
    let e = bad("  explore: 1.5");
    assert!(
        e.contains("routing.explore") && e.contains("1.5 is not between 0 and 1"),
        "{e}"
    );
    let e = bad("  tolerance: -0.1");
    assert!(e.contains("routing.tolerance"), "{e}");
    let e = bad("  prior: 1.2");
    assert!(
        e.contains("routing.prior") && e.contains("1.2 is not between 0 and 1"),
        "{e}"
    );
}

#[test]
fn a_task_with_tools_is_never_routed_to_a_local_command_and_its_turns_count() {
    let text = r#"
providers:
  - name: cli
    kind: command
    cost_tier: free
    command: {program: claude, args: ["-p"], prompt_via: stdin}
    models:
      - {id: sonnet, capabilities: [analysis], input_usd_per_mtok: 0, output_usd_per_mtok: 0}
  - name: api
    kind: openai_compatible
    base_url: http://127.0.0.1:1/v1
    models:
      - {id: small, capabilities: [analysis], context_window: 200, input_usd_per_mtok: 1, output_usd_per_mtok: 2}
"#;
    let c = Config::parse("t.yaml", text, &|_| None).unwrap();
    let mut e = task("summarise", "data_analysis");
    e.max_tokens = Some(10);
    let plain = plan(&c, &e, &Constraints::default(), &Stats::default()).unwrap();
    assert_eq!(order(&plain), ["cli/sonnet", "api/small"]);
    e.tools = vec![crate::conversation::Tool {
        name: "lookup".into(),
        description: None,
        parameters: serde_json::json!({"type": "object"}),
    }];
    let tooled = plan(&c, &e, &Constraints::default(), &Stats::default()).unwrap();
    assert_eq!(order(&tooled), ["api/small"]);
    // A hint to the command is refused with the reason.
    e.provider = Some("cli".into());
    e.fallback = Some(false);
    let err = plan(&c, &e, &Constraints::default(), &Stats::default()).unwrap_err();
    assert!(err.to_string().contains("cannot take"), "{err}");
    // Earlier turns count against the context window: 200 tokens of history do not fit.
    let mut long = task("and now?", "data_analysis");
    long.max_tokens = Some(10);
    long.messages = vec![crate::conversation::Message::text(
        crate::conversation::Role::User,
        "word ".repeat(400),
    )];
    let p = plan(&c, &long, &Constraints::default(), &Stats::default()).unwrap();
    assert_eq!(
        order(&p),
        ["cli/sonnet"],
        "the API model's window is too small"
    );
}

#[test]
fn an_image_goes_only_to_a_model_that_lists_vision_and_can_take_it() {
    let text = r#"
providers:
  - name: local
    kind: ollama
    cost_tier: free
    base_url: http://127.0.0.1:11434
    models:
      - {id: llava, capabilities: [analysis, vision], input_usd_per_mtok: 0, output_usd_per_mtok: 0}
  - name: api
    kind: openai_compatible
    base_url: http://127.0.0.1:1/v1
    models:
      - {id: any, input_usd_per_mtok: 1, output_usd_per_mtok: 2}
      - {id: eyes, capabilities: [analysis, vision], input_usd_per_mtok: 2, output_usd_per_mtok: 4}
"#;
    let c = Config::parse("t.yaml", text, &|_| None).unwrap();
    use crate::conversation::{Content, Message, Part, Role};
    let with = |image: Part| {
        let mut e = task("", "data_analysis");
        e.messages = vec![Message {
            content: Content::Parts(vec![
                Part::Text {
                    text: "what is this?".into(),
                },
                image,
            ]),
            ..Message::text(Role::User, "")
        }];
        e
    };
    let data = Part::Image {
        url: None,
        data: Some("aGk=".into()),
        media_type: Some("image/png".into()),
    };
    let url = Part::Image {
        url: Some("https://example.com/a.png".into()),
        data: None,
        media_type: None,
    };
    let routed =
        |e: &Envelope| order(&plan(&c, e, &Constraints::default(), &Stats::default()).unwrap());
    // `any` lists no capabilities, which means everything but vision.
    assert_eq!(
        routed(&task("hi", "data_analysis")),
        ["local/llava", "api/any", "api/eyes"]
    );
    assert_eq!(routed(&with(data)), ["local/llava", "api/eyes"]);
    assert_eq!(
        routed(&with(url)),
        ["api/eyes"],
        "Ollama takes no image by URL"
    );
}
