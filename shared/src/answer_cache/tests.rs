use std::time::Duration;

use super::*;
use crate::config::QueueCache;
use crate::conversation::Tool;
use crate::envelope::CacheKeep;

fn env(prompt: &str) -> Envelope {
    let mut e = Envelope::new(prompt);
    e.temperature = Some(0.0);
    e
}

fn tool(name: &str) -> Tool {
    Tool {
        name: name.into(),
        description: None,
        parameters: serde_json::json!({"type": "object", "properties": {}}),
    }
}

fn keep(ttl: &str, sampled: bool) -> Option<Box<CacheAsk>> {
    Some(Box::new(CacheAsk::Keep(CacheKeep {
        ttl: ttl.into(),
        sampled,
    })))
}

#[test]
fn identical_requests_share_a_hash_whatever_the_task_around_them() {
    let a = env("Summarise the report");
    let mut b = env("Summarise the report");
    b.priority = Some(3);
    b.metadata = Some(Box::new(serde_json::json!({"job": 7})));
    b.attempts = 2;
    b.enqueued_at = Some(chrono::Utc::now());
    b.idempotency_key = Some("k".into());
    b.cache = keep("1h", false);
    assert_ne!(a.id, b.id);
    assert_eq!(request_hash(&a, false), request_hash(&b, false));
    assert_eq!(request_hash(&a, false).unwrap().len(), 64);
}

#[test]
fn what_the_model_reads_or_what_picks_it_changes_the_hash() {
    let base = env("Summarise the report");
    let h = request_hash(&base, false);
    type Change = Box<dyn Fn(&mut Envelope)>;
    let changes: Vec<(&str, Change)> = vec![
        ("prompt", Box::new(|e| e.prompt.push('.'))),
        ("system", Box::new(|e| e.system = Some("Be brief".into()))),
        ("model", Box::new(|e| e.model = Some("gpt-4o".into()))),
        ("provider", Box::new(|e| e.provider = Some("openai".into()))),
        (
            "type",
            Box::new(|e| e.task_type = Some("code_review".into())),
        ),
        ("temperature", Box::new(|e| e.temperature = Some(0.5))),
        ("max_tokens", Box::new(|e| e.max_tokens = Some(100))),
        ("tools", Box::new(|e| e.tools = vec![tool("lookup")])),
        ("tenant", Box::new(|e| e.tenant = Some("acme".into()))),
        ("fallback", Box::new(|e| e.fallback = Some(false))),
    ];
    for (what, change) in changes {
        let mut e = base.clone();
        change(&mut e);
        assert_ne!(request_hash(&e, false), h, "{what} must change the hash");
    }
}

#[test]
fn tenants_share_answers_only_when_the_provider_file_allows_it() {
    let mut a = env("Summarise the report");
    let mut b = a.clone();
    a.tenant = Some("acme".into());
    b.tenant = Some("globex".into());
    assert_ne!(request_hash(&a, false), request_hash(&b, false));
    assert_eq!(request_hash(&a, true), request_hash(&b, true));
}

fn config() -> AnswerCache {
    let mut c = AnswerCache::default();
    c.queues.insert(
        "cached".into(),
        QueueCache {
            ttl: Duration::from_secs(600),
            sampled: false,
        },
    );
    c.uncacheable_tools.insert("now".into());
    c
}

#[test]
fn a_task_asks_or_its_queue_does_and_a_task_can_say_no() {
    let c = config();
    let ten_min = Use::On {
        ttl: Duration::from_secs(600),
    };
    assert_eq!(use_of(&c, "other", &env("x")), Use::Off);
    assert_eq!(use_of(&c, "cached", &env("x")), ten_min);
    let mut own = env("x");
    own.cache = keep("24h", false);
    let day = Use::On {
        ttl: Duration::from_secs(24 * 3600),
    };
    assert_eq!(use_of(&c, "other", &own), day, "the task's own TTL");
    assert_eq!(use_of(&c, "cached", &own), day, "before its queue's");
    let mut no = env("x");
    no.cache = Some(Box::new(CacheAsk::Use(false)));
    assert_eq!(use_of(&c, "cached", &no), Use::Off);
}

#[test]
fn a_queue_caches_no_sampled_streamed_or_uncacheable_request() {
    let c = config();
    let mut sampled = env("x");
    sampled.temperature = None;
    assert_eq!(use_of(&c, "cached", &sampled), Use::Off, "unset samples");
    sampled.temperature = Some(0.7);
    assert_eq!(use_of(&c, "cached", &sampled), Use::Off);
    let mut streamed = env("x");
    streamed.stream = Some(true);
    assert_eq!(use_of(&c, "cached", &streamed), Use::Off);
    let mut tools = env("x");
    tools.tools = vec![tool("lookup"), tool("now")];
    assert_eq!(use_of(&c, "cached", &tools), Use::Off);

    let mut all = config();
    all.queues.get_mut("cached").unwrap().sampled = true;
    assert!(matches!(use_of(&all, "cached", &sampled), Use::On { .. }));
}

#[test]
fn a_task_asking_with_an_uncacheable_tool_is_refused_naming_the_tool() {
    let mut e = env("x");
    e.tools = vec![tool("lookup"), tool("now")];
    e.cache = keep("1h", false);
    match use_of(&config(), "other", &e) {
        Use::Refused { field, message } => {
            assert_eq!(field, "tools[1]");
            assert!(message.contains("`now`") && message.contains("uncacheable_tools"));
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn the_envelope_refuses_a_cache_it_cannot_keep() {
    let check = |json: &str| {
        Envelope::parse(json.as_bytes(), 1 << 20)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    check(r#"{"v":1,"prompt":"x","temperature":0,"cache":{"ttl":"24h"}}"#).unwrap();
    check(r#"{"v":1,"prompt":"x","cache":{"ttl":"24h","sampled":true}}"#).unwrap();
    check(r#"{"v":1,"prompt":"x","cache":false}"#).unwrap();
    for (json, says) in [
        (
            r#"{"v":1,"prompt":"x","temperature":0,"cache":true}"#,
            "needs a time",
        ),
        (
            r#"{"v":1,"prompt":"x","temperature":0,"cache":{"ttl":"0s"}}"#,
            "between 1s and 30d",
        ),
        (
            r#"{"v":1,"prompt":"x","temperature":0,"cache":{"ttl":"31d"}}"#,
            "between 1s and 30d",
        ),
        (
            r#"{"v":1,"prompt":"x","temperature":0,"cache":{"ttl":"soon"}}"#,
            "not a duration",
        ),
        (
            r#"{"v":1,"prompt":"x","temperature":0,"cache":{"tll":"1h"}}"#,
            "cache",
        ),
        (
            r#"{"v":1,"prompt":"x","cache":{"ttl":"1h"}}"#,
            "\"temperature\": 0",
        ),
        (
            r#"{"v":1,"prompt":"x","temperature":0.2,"cache":{"ttl":"1h"}}"#,
            "sampled",
        ),
        (
            r#"{"v":1,"prompt":"x","temperature":0,"stream":true,"cache":{"ttl":"1h"}}"#,
            "stream",
        ),
    ] {
        let err = check(json).expect_err(json);
        assert!(err.contains("cache") && err.contains(says), "{json}: {err}");
    }
}

#[test]
fn a_cached_answer_reads_back_as_written() {
    let a = CachedAnswer {
        task_id: crate::ids::TaskId::random(),
        provider: "p".into(),
        model: "m".into(),
        text: "answer".into(),
        json: Some(serde_json::json!({"a": 1})),
        tool_calls: Vec::new(),
        list_cost_usd: 0.25,
    };
    let json = serde_json::to_string(&a).unwrap();
    assert_eq!(serde_json::from_str::<CachedAnswer>(&json).unwrap(), a);
}
