use super::*;

fn parse(json: &str) -> Result<Chain> {
    Chain::parse(
        json.as_bytes(),
        1 << 20,
        "q",
        crate::ids::EntryId::new(1, 0),
    )
}

fn reason(json: &str) -> String {
    parse(json).unwrap_err().to_string()
}

const GOOD: &str = r#"{"v": 1, "chain_id": "c1", "vars": {"input": "a billing service"},
 "defaults": {"type": "code_generation", "max_attempts": 2, "timeout": 300},
 "steps": [
  {"name": "plan", "prompt": "Plan: {{input}}", "type": "planning", "risk": "medium"},
  {"name": "impl_a", "after": ["plan"], "prompt": "Implement:\n{{plan.output}}", "model": "gpt-4o-mini"},
  {"name": "impl_b", "after": ["plan"], "prompt": "Implement:\n{{plan.summary}}", "timeout": "2m"},
  {"name": "pick", "kind": "judge", "after": ["impl_a", "impl_b"], "distinct": "model"},
  {"name": "review", "kind": "review", "reviews": "pick", "after": ["pick"], "distinct": "model"},
  {"name": "docs", "after": ["review"], "prompt": "Document: {{pick.summary}}", "type": "documentation"}]}"#;

#[test]
fn a_good_chain_is_read_with_defaults_vars_and_children() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.id, "c1");
    assert_eq!(c.on_failure, OnFailure::CancelDescendants);
    let plan = c.step("plan").unwrap();
    assert_eq!(plan.prompt, "Plan: a billing service");
    assert_eq!(plan.children, ["impl_a", "impl_b"]);
    assert_eq!(plan.task.task_type.as_deref(), Some("planning"));
    assert_eq!(plan.task.max_attempts, Some(2), "from defaults");
    assert_eq!(plan.task.timeout, Some(300));
    assert_eq!(plan.task.chain_id.as_deref(), Some("c1"));
    assert_eq!(plan.task.step.as_deref(), Some("plan"));
    assert_eq!(plan.task.id, Some(step_task_id("c1", "plan", 0)));
    let b = c.step("impl_b").unwrap();
    assert_eq!(b.task.timeout, Some(120));
    assert_eq!(b.task.task_type.as_deref(), Some("code_generation"));
    let pick = c.step("pick").unwrap();
    assert_eq!(pick.kind, Kind::Judge);
    assert_eq!(pick.min_success, 1);
    assert_eq!(c.step("review").unwrap().reviews.as_deref(), Some("pick"));
    assert!(c.step("docs").unwrap().children.is_empty());
}

#[test]
fn stream_and_prompt_cache_come_from_the_defaults_unless_a_step_says_otherwise() {
    let c = parse(
        r#"{"v": 1, "chain_id": "s", "defaults": {"stream": true, "prompt_cache": false},
            "steps": [{"name": "a", "prompt": "A"},
                      {"name": "b", "prompt": "B", "stream": false, "prompt_cache": true}]}"#,
    )
    .unwrap();
    let task = |name: &str| c.step(name).unwrap().task.clone();
    assert_eq!(
        (task("a").stream, task("a").prompt_cache),
        (Some(true), Some(false))
    );
    assert_eq!(
        (task("b").stream, task("b").prompt_cache),
        (Some(false), Some(true))
    );
    // A streamed step cannot have tools, from the defaults or its own.
    let tools = r#"[{"name": "look", "parameters": {"type": "object"}}]"#;
    let err = reason(&format!(
        r#"{{"v": 1, "defaults": {{"tools": {tools}}}, "steps": [{{"name": "a", "prompt": "A", "stream": true}}]}}"#
    ));
    assert!(err.contains("stream") && err.contains("tools"), "{err}");
}

#[test]
fn max_parallel_puts_every_step_under_one_concurrency_key() {
    let c = parse(
        r#"{"v":1,"chain_id":"c9","max_parallel":2,"steps":[{"name":"a","prompt":"x"},{"name":"b","prompt":"y"}]}"#,
    )
    .unwrap();
    for s in &c.steps {
        assert_eq!(s.task.concurrency_key.as_deref(), Some("chain-c9"));
        assert_eq!(s.task.concurrency_limit, Some(2));
    }
    assert!(
        reason(r#"{"v":1,"max_parallel":0,"steps":[{"name":"a","prompt":"x"}]}"#)
            .contains("`max_parallel` must be at least 1")
    );
    let long = "c".repeat(300);
    let c = parse(&format!(
        r#"{{"v":1,"chain_id":"{long}","max_parallel":1,"steps":[{{"name":"a","prompt":"x"}}]}}"#
    ))
    .unwrap();
    let key = c.steps[0].task.concurrency_key.clone().unwrap();
    assert!(key.starts_with("chain-") && key.len() < 50, "{key}");
}

#[test]
fn a_chain_without_an_id_is_named_by_its_entry() {
    let c = parse(r#"{"v":1,"steps":[{"name":"a","prompt":"x"}]}"#).unwrap();
    assert_eq!(
        c.id,
        envelope::derive_id("q", crate::ids::EntryId::new(1, 0)).to_string()
    );
}

#[test]
fn each_bad_chain_names_the_step_and_the_problem() {
    for (json, want) in [
        (
            r#"{"v":1,"steps":[{"name":"a","prompt":"x","after":["b"]},{"name":"b","prompt":"y","after":["a"]}]}"#,
            "form a cycle",
        ),
        (
            r#"{"v":1,"steps":[{"name":"a","prompt":"x","after":["nope"]}]}"#,
            "step `a` is after `nope`, which is not a step of this chain",
        ),
        (
            r#"{"v":1,"steps":[{"name":"a","prompt":"x"},{"name":"a","prompt":"y"}]}"#,
            "two steps are named `a`",
        ),
        (
            r#"{"v":1,"steps":[{"name":"a","prompt":"x"},{"name":"b","prompt":"{{a.output}}"}]}"#,
            "step `b`: the prompt uses `a`, which is not a step this one runs after",
        ),
        (
            r#"{"v":1,"steps":[{"name":"a","prompt":"{{topic}}"}]}"#,
            "step `a`: {{topic}} is not a variable of the chain",
        ),
        (
            r#"{"v":1,"steps":[{"name":"a","kind":"magic","prompt":"x"}]}"#,
            "step `a`: unknown kind `magic`",
        ),
        (
            r#"{"v":1,"steps":[{"name":"a","kind":"approval","on_timeout":"shrug"}]}"#,
            "step `a`: on_timeout `shrug` is neither `reject` nor `approve`",
        ),
        (
            r#"{"v":1,"steps":[{"name":"a","prompt":"x","on_timeout":"approve"}]}"#,
            "step `a`: `on_timeout` is only for approval steps",
        ),
        (
            r#"{"v":1,"steps":[{"name":"a","prompt":"x"},{"name":"t","kind":"check","after":["a"]}]}"#,
            "step `t`: a check step needs `command`",
        ),
        (
            r#"{"v":1,"steps":[{"name":"t","kind":"check","command":"pytest"}]}"#,
            "step `t`: a check step runs after exactly one step",
        ),
        (
            r#"{"v":1,"steps":[{"name":"a","prompt":"x","command":"rm"}]}"#,
            "step `a`: `command` is only for check steps",
        ),
        (
            r#"{"v":1,"steps":[{"name":"a","prompt":"x"},{"name":"j","kind":"judge","after":["a"]}]}"#,
            "step `j`: a judge step needs at least two steps",
        ),
        (
            r#"{"v":1,"steps":[{"name":"a","prompt":"x","type":"poetry"}]}"#,
            "step `a`: unknown task type `poetry`",
        ),
        (
            r#"{"v":1,"steps":[{"name":"a","prompt":"x","colour":"red"}]}"#,
            "unknown field `colour`",
        ),
        (r#"{"v":1,"steps":[]}"#, "the chain has no steps"),
        (r#"{"v":2,"steps":[]}"#, "understands only \"v\": 1"),
        (r#"{"steps":[]}"#, "no \"v\" field"),
        ("not json", "not valid JSON"),
    ] {
        let got = reason(json);
        assert!(got.contains(want), "{json}\n wanted `{want}`, got `{got}`");
    }
    let many: Vec<String> = (0..65)
        .map(|i| format!(r#"{{"name":"s{i}","prompt":"x"}}"#))
        .collect();
    let json = format!(r#"{{"v":1,"steps":[{}]}}"#, many.join(","));
    assert!(reason(&json).contains("has 65 steps; a chain may have at most 64"));
    let err = Chain::parse(GOOD.as_bytes(), 100, "q", crate::ids::EntryId::new(1, 0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("over the 100-byte limit"), "{err}");
}

#[test]
fn references_are_found_and_filled() {
    let text = "A {{x}} B {{plan.summary}} C {{ plan.output }} D {{not a ref}} {{open";
    let refs: Vec<Reference> = references(text).into_iter().map(|(_, r)| r).collect();
    assert_eq!(
        refs,
        [
            Reference::Var("x".into()),
            Reference::Summary("plan".into()),
            Reference::Output("plan".into())
        ]
    );
    let filled = fill(text, |r| match r {
        Reference::Output(_) => Some("OUT".into()),
        _ => None,
    });
    assert_eq!(
        filled,
        "A {{x}} B {{plan.summary}} C OUT D {{not a ref}} {{open"
    );
    assert_eq!(summary(&"é".repeat(600)).chars().count(), SUMMARY_CHARS + 1);
}

#[test]
fn json_references_name_a_step_and_a_path() {
    let text = "{{a.json}} {{a.json.x.0.name}} {{a.jsonx}} {{a.json.}} {{a.json..b}} {{a b.json}}";
    let refs: Vec<Reference> = references(text).into_iter().map(|(_, r)| r).collect();
    let path = |p: &[&str]| p.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert_eq!(
        refs,
        [
            Reference::Json("a".into(), vec![]),
            Reference::Json("a".into(), path(&["x", "0", "name"])),
        ]
    );
    assert_eq!(refs[1].to_string(), "{{a.json.x.0.name}}");
    let json = serde_json::json!({"x": [{"name": "Ada", "n": 3}], "s": "text"});
    assert_eq!(
        json_at(&json, &path(&["x", "0", "name"])).as_deref(),
        Some("Ada")
    );
    assert_eq!(
        json_at(&json, &path(&["x", "0", "n"])).as_deref(),
        Some("3")
    );
    assert_eq!(
        json_at(&json, &path(&["x", "0"])).as_deref(),
        Some(r#"{"n":3,"name":"Ada"}"#)
    );
    assert_eq!(json_at(&json, &path(&["x", "1"])), None);
    assert_eq!(json_at(&json, &path(&["s", "0"])), None);
}

#[test]
fn a_consensus_needs_no_prompt_and_joins_need_two_parents() {
    let c = parse(
        r#"{"v":1,"steps":[{"name":"a","prompt":"x"},{"name":"b","prompt":"x"},
            {"name":"vote","kind":"consensus","after":["a","b"],"min_success":2}]}"#,
    )
    .unwrap();
    let vote = c.step("vote").unwrap();
    assert_eq!((vote.kind, vote.min_success), (Kind::Consensus, 2));
    assert!(
        reason(
            r#"{"v":1,"steps":[{"name":"a","prompt":"x"},{"name":"b","prompt":"x"},
            {"name":"vote","kind":"consensus","after":["a","b"],"min_success":3}]}"#
        )
        .contains("min_success 3 must be between 1 and the number of parents (2)")
    );
}

#[test]
fn the_shipped_templates_are_valid_chains() {
    for (file, text) in [
        (
            "cross-review",
            include_str!("../../../examples/chains/cross-review.json"),
        ),
        (
            "best-of-n",
            include_str!("../../../examples/chains/best-of-n.json"),
        ),
        (
            "consensus",
            include_str!("../../../examples/chains/consensus.json"),
        ),
        (
            "simple",
            include_str!("../../../examples/chains/simple.json"),
        ),
        (
            "medium",
            include_str!("../../../examples/chains/medium.json"),
        ),
        (
            "complex",
            include_str!("../../../examples/chains/complex.json"),
        ),
        (
            "architectural",
            include_str!("../../../examples/chains/architectural.json"),
        ),
    ] {
        let c = parse(text).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(!c.steps.is_empty(), "{file}");
    }
}

#[test]
fn a_check_names_a_configured_command() {
    let c = parse(
        r#"{"v":1,"steps":[{"name":"a","prompt":"x"},{"name":"t","kind":"check","after":["a"],"command":"tests"}]}"#,
    )
    .unwrap();
    assert_eq!(c.step("t").unwrap().command.as_deref(), Some("tests"));
    assert!(c.unknown_check(|n| n == "tests").is_none());
    let e = c.unknown_check(|_| false).unwrap().to_string();
    assert_eq!(
        e,
        "step `t`: check `tests` is not configured; add it under `checks:` in the provider file"
    );
}

#[test]
fn a_review_may_send_the_work_back() {
    let c = parse(
        r#"{"v":1,"steps":[{"name":"a","prompt":"x"},
            {"name":"r","kind":"review","after":["a"],"on_reject":{"rerun":"a","max_rounds":2}}]}"#,
    )
    .unwrap();
    let o = c.step("r").unwrap().on_reject.clone().unwrap();
    assert_eq!((o.rerun.as_str(), o.max_rounds), ("a", 2));
    for (json, want) in [
        (
            r#"{"v":1,"steps":[{"name":"a","prompt":"x"},{"name":"r","kind":"review","after":["a"],"on_reject":{"rerun":"zz"}}]}"#,
            "on_reject reruns `zz`, which is not a step this one runs after",
        ),
        (
            r#"{"v":1,"steps":[{"name":"a","prompt":"x"},{"name":"b","after":["a"],"prompt":"y","on_reject":{"rerun":"a"}}]}"#,
            "`on_reject` is only for review and check steps",
        ),
        (
            r#"{"v":1,"steps":[{"name":"a","prompt":"x"},{"name":"t","kind":"consensus","after":["a","a2"],"escalate":true},{"name":"a2","prompt":"y"}]}"#,
            "`escalate` is only for steps that call a model",
        ),
    ] {
        let got = reason(json);
        assert!(got.contains(want), "{got}");
    }
}

#[test]
fn a_chain_id_with_a_control_character_or_too_long_is_refused() {
    for id in ["a\tb", "a\nb", "a\u{0}b", &"c".repeat(513)] {
        let spec =
            serde_json::json!({"v": 1, "chain_id": id, "steps": [{"name": "a", "prompt": "x"}]});
        assert!(
            reason(&spec.to_string()).contains("`chain_id` must be at most 512 characters"),
            "{id:?}"
        );
    }
}

#[test]
fn a_parent_named_twice_is_refused() {
    let spec = serde_json::json!({"v": 1, "steps": [{"name": "a", "prompt": "p"},
        {"name": "b", "after": ["a", "a"], "prompt": "q"}]});
    assert!(
        reason(&spec.to_string()).contains("step `b` names `a` twice in `after`"),
        "{}",
        reason(&spec.to_string())
    );
}

#[test]
fn a_variable_holding_a_reference_or_filling_past_the_limit_is_refused() {
    let spec = serde_json::json!({"v": 1, "vars": {"x": "{{a.output}}"},
        "steps": [{"name": "a", "prompt": "p"}, {"name": "b", "after": ["a"], "prompt": "{{x}}"}]});
    assert!(reason(&spec.to_string()).contains("variable `x` contains a `{{...}}` reference"));
    // Nor may one form a reference with the prompt's own braces.
    for (prompt, x) in [("{{x}}.output}}", "{{a"), ("{{x}}a.summary}}", "{{")] {
        let spec = serde_json::json!({"v": 1, "vars": {"x": x},
            "steps": [{"name": "a", "prompt": "p"}, {"name": "b", "after": ["a"], "prompt": prompt}]});
        assert!(
            reason(&spec.to_string()).contains("would form a `{{...}}` reference"),
            "{prompt} with x = {x}"
        );
    }
    // Braces inside a value, as in code, are text.
    let spec = serde_json::json!({"v": 1, "vars": {"x": "fn main() { let v = {}; }"},
        "steps": [{"name": "a", "prompt": "Review {{x}}"}]});
    assert_eq!(
        parse(&spec.to_string()).unwrap().steps[0].prompt,
        "Review fn main() { let v = {}; }"
    );
    // 100 bytes referenced 20 times is 2,000 bytes: over a 1,000-byte limit, counted before
    // anything is filled in.
    let spec = serde_json::json!({"v": 1, "vars": {"x": "y".repeat(100)},
        "steps": [{"name": "a", "prompt": "{{x}}".repeat(20)}]});
    let e = Chain::parse(
        spec.to_string().as_bytes(),
        1000,
        "q",
        crate::ids::EntryId::new(1, 0),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains(
            "its prompt is 2000 bytes once its variables are filled in, over the 1000-byte limit"
        ),
        "{e}"
    );
    // Each step fits, the chain does not: six of 750 bytes against 4 x 1,000.
    let steps: Vec<_> = (0..6)
        .map(|i| serde_json::json!({"name": format!("s{i}"), "prompt": "{{x}}{{x}}{{x}}"}))
        .collect();
    let spec = serde_json::json!({"v": 1, "vars": {"x": "y".repeat(250)}, "steps": steps});
    let e = Chain::parse(
        spec.to_string().as_bytes(),
        1000,
        "q",
        crate::ids::EntryId::new(1, 0),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("the chain's prompts come to more than 4000 bytes"),
        "{e}"
    );
    assert!(
        Chain::parse(
            spec.to_string().as_bytes(),
            2000,
            "q",
            crate::ids::EntryId::new(1, 0)
        )
        .is_ok()
    );
}

#[test]
fn a_step_task_over_the_limit_as_json_is_refused() {
    // 280 bytes of prompt, four times as many once its control characters are escaped.
    let spec = serde_json::json!({"v": 1, "vars": {"x": "\u{1}a".repeat(70)},
        "steps": [{"name": "a", "prompt": "{{x}}{{x}}"}]});
    let e = Chain::parse(
        spec.to_string().as_bytes(),
        1000,
        "q",
        crate::ids::EntryId::new(1, 0),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("bytes as JSON, over the 1000-byte limit"),
        "{e}"
    );
}
