"""The client's lists of fields against the schemas in the repository (issue 35 item 5): a
property added to a schema but not to the client fails here, and what the client writes, fully
populated, validates against the schema."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timedelta, timezone
from typing import Any

import jsonschema
import pytest
from referencing import Registry, Resource

import llmq_client
from llmq_client import envelope as E
from llmq_client.chain import build as build_chain
from llmq_client.envelope import Task

from .conftest import REPO


def schema(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((REPO / "schema" / name).read_text(encoding="utf-8"))
    return loaded


def differ(what: str, schema_names: set[str], client_names: set[str]) -> str:
    return (
        f"{what}: in the schema but not the client: {sorted(schema_names - client_names)}; "
        f"in the client but not the schema: {sorted(client_names - schema_names)}"
    )


def test_every_envelope_property_is_known_to_the_client() -> None:
    props = set(schema("envelope.schema.json")["properties"])
    mine = {"v", *llmq_client.PRODUCER_FIELDS, *llmq_client.WORKER_FIELDS}
    assert props == mine, differ("envelope", props, mine)
    # The typed checks cover the same fields.
    assert set(E.FIELD_KINDS) == props


def test_every_chain_property_is_known_to_the_client() -> None:
    chain = schema("chain.schema.json")
    top = set(chain["properties"])
    assert top == set(llmq_client.CHAIN_FIELDS), differ("chain", top, set(llmq_client.CHAIN_FIELDS))
    steps = set(chain["properties"]["steps"]["items"]["properties"])
    assert steps == set(llmq_client.STEP_FIELDS), differ("chain step", steps, set(llmq_client.STEP_FIELDS))
    defaults = set(chain["properties"]["defaults"]["properties"])
    assert defaults == set(llmq_client.STEP_TASK_FIELDS), differ(
        "chain defaults", defaults, set(llmq_client.STEP_TASK_FIELDS)
    )


def test_every_result_record_property_is_read_by_the_client() -> None:
    props = set(schema("result.schema.json")["properties"])
    mine = {f.name for f in dataclasses.fields(llmq_client.TaskRecord)} - {"raw"}
    assert props == mine, differ("result record", props, mine)


def full_task() -> dict[str, Any]:
    """A task with every field the client takes (stream false: true is not allowed with tools
    or a deadline)."""
    return {
        "prompt": "Should I take an umbrella?",
        "task_id": "0b6f4c2e-8a57-4a43-9c3e-2f5d8e7a1b90",
        "system": "You answer tersely.",
        "messages": [
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}}],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 degrees"},
        ],
        "tools": [
            {
                "name": "get_weather",
                "description": "The weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            }
        ],
        "tool_choice": "auto",
        "response_format": {
            "type": "json_schema",
            "name": "advice",
            "schema": {
                "type": "object",
                "properties": {"umbrella": {"type": "boolean"}},
                "required": ["umbrella"],
            },
        },
        "stream": False,
        "prompt_cache": False,
        "cache": {"ttl": "1h", "sampled": True},
        "deadline": "24h",
        "task_type": "research",
        "provider": "mock",
        "model": "mock-fast",
        "chain_id": "nightly",
        "risk": "low",
        "area": "weather",
        "timeout": timedelta(minutes=5),
        "max_attempts": 2,
        "run_at": datetime(2020, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
        "idempotency_key": "umbrella-1",
        "idempotency_window": timedelta(hours=1),
        "batch_id": "batch-2020-01-02:weather",
        "max_tokens": 200,
        "temperature": 0.2,
        "metadata": {"ticket": "OPS-42", "tags": ["a", None]},
        "priority": 2,
        "tenant": "acme",
        "tags": {"team": "search", "feature": "umbrella"},
        "concurrency_key": "weather",
        "concurrency_limit": 2,
        "fallback": False,
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "enqueued_at": datetime.now(timezone.utc),
        "min_tier": "fast",
    }


def test_a_fully_populated_envelope_validates_against_the_schema() -> None:
    task = full_task()
    assert set(task) == set(Task.__annotations__), "full_task() must set every field the client takes"
    task_id, env = E.build(task)
    assert task_id == task["task_id"]
    assert set(env) == {"v", *llmq_client.PRODUCER_FIELDS}, "every field reaches the envelope"
    written = json.loads(E.encode(env, E.DEFAULT_MAX_PAYLOAD_BYTES))
    validator = jsonschema.Draft202012Validator(
        schema("envelope.schema.json"), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(written)]
    assert not errors, errors
    assert written["timeout"] == 300 and written["run_at"] == "2020-01-02T03:04:05Z"
    assert written["idempotency_window"] == "3600s"
    assert written["batch_id"] == "batch-2020-01-02:weather"


def test_a_fully_populated_chain_validates_against_the_schema() -> None:
    envelope_schema = schema("envelope.schema.json")
    registry: Registry = Registry().with_resource(
        envelope_schema["$id"], Resource.from_contents(envelope_schema)
    )
    task_fields = {
        "type": "research",
        "risk": "low",
        "area": "docs",
        "provider": "mock",
        "model": "mock-fast",
        "system": "Be brief.",
        "max_tokens": 100,
        "temperature": 0.5,
        "max_attempts": 2,
        "timeout": "5m",
        "response_format": {"type": "json_object"},
        "tools": [{"name": "look", "parameters": {"type": "object"}}],
        "tool_choice": "none",
        "prompt_cache": False,
    }
    spec = {
        "v": 1,
        "chain_id": "full-chain",
        "idempotency_key": "full-chain-1",
        "on_failure": "fail_chain",
        "vars": {"topic": "caching"},
        "max_parallel": 2,
        "priority": 1,
        "tenant": "acme",
        "defaults": task_fields,
        "steps": [
            {"name": "draft", "prompt": "Write about {{topic}}", **task_fields},
            {"name": "other", "prompt": "Also {{topic}}", "stream": True, "tools": []},
            {
                "name": "review",
                "after": ["draft", "other"],
                "kind": "review",
                "reviews": "draft",
                "distinct": "model",
                "min_success": 1,
                "escalate": True,
                "on_reject": {"rerun": "draft", "max_rounds": 2, "escalate": False},
            },
            {"name": "check", "after": ["review"], "kind": "check", "command": "lint"},
            {"name": "ok", "after": ["check"], "kind": "approval", "on_timeout": "approve"},
        ],
    }
    used = {k for s in spec["steps"] for k in s}  # type: ignore[attr-defined]
    assert used == set(llmq_client.STEP_FIELDS), "the spec must use every step field"
    assert set(spec) == set(llmq_client.CHAIN_FIELDS)
    chain_id, text = build_chain(spec, {"extra": "x"}, E.DEFAULT_MAX_PAYLOAD_BYTES, "default")
    assert chain_id == "full-chain"
    validator = jsonschema.Draft202012Validator(schema("chain.schema.json"), registry=registry)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(json.loads(text))]
    assert not errors, errors


@pytest.mark.parametrize("field", sorted(set(llmq_client.PRODUCER_FIELDS) - {"prompt"}))
def test_each_field_alone_validates(field: str) -> None:
    """Each field on its own (with the fields it needs) writes an envelope the schema takes."""
    full = full_task()
    python = {v: k for k, v in E.WIRE_NAMES.items()}.get(field, field)
    task = {"prompt": "x", python: full[python]}
    if field in ("concurrency_key", "concurrency_limit"):
        task.update(concurrency_key="k", concurrency_limit=1)
    if field in ("tool_choice", "messages"):
        task["tools"] = full["tools"]
    if field == "idempotency_window":
        task["idempotency_key"] = full["idempotency_key"]
    _, env = E.build(task)
    validator = jsonschema.Draft202012Validator(schema("envelope.schema.json"))
    assert not list(validator.iter_errors(json.loads(E.encode(env, 1 << 20))))


@pytest.mark.parametrize(
    ("tags", "says"),
    [
        (["team"], "must be an object"),
        ({f"t{i}": "v" for i in range(9)}, "at most 8"),
        ({"team name": "x"}, "has a tag named"),
        ({"team": ""}, "is empty"),
        ({"team": 7}, "must be a string"),
        ({"team": "a\nb"}, "control character"),
        ({"team": "x" * 129}, "is 129 bytes long"),
    ],
)
def test_tags_are_refused_as_the_worker_refuses_them(tags: Any, says: str) -> None:
    with pytest.raises(llmq_client.InvalidTask, match=says):
        E.build({"prompt": "x", "tags": tags})
