"""Chains submitted with the client and followed to their end, on a real worker."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from llmq_client import ChainEnd, ChainHandle, ChainRefused, Client, InvalidChain, Step, Text
from llmq_client.keys import chain_key_id

from .conftest import answer

WAIT = 60.0


def test_a_chain_is_followed_step_by_step_to_its_end(client: Client) -> None:
    topic = uuid.uuid4().hex[:8]
    chain = client.submit_chain(
        {
            "steps": [
                {"name": "plan", "prompt": "Plan {{input}}", "model": "mock-fast"},
                {"name": "impl", "after": ["plan"], "prompt": "Do {{plan.summary}}", "model": "mock-fast"},
            ]
        },
        vars={"input": topic},
    )
    events = list(client.follow_chain(chain, timeout=WAIT))
    # Each step's changes in order (whichever the polls saw of `blocked` and `queued`), the
    # last being how it ended.
    for name in ("plan", "impl"):
        seen = [e.status for e in events if isinstance(e, Step) and e.name == name]
        assert seen[-1] == "succeeded" and set(seen[:-1]) <= {"blocked", "queued"}, events
    steps = [e for e in events if isinstance(e, Step) and e.ended]
    assert [(s.name, s.status) for s in steps] == [("plan", "succeeded"), ("impl", "succeeded")], events
    assert steps[0].output == answer(f"Plan {topic}")
    assert steps[1].output == answer(f"Do {answer(f'Plan {topic}')}")
    end = events[-1]
    assert isinstance(end, ChainEnd) and end.state == "succeeded" and end.chain_id == chain.chain_id
    assert set(end.steps) == {"plan", "impl"} and end.steps["plan"].output == steps[0].output
    assert all(s.record is not None and s.record.chain_id == chain.chain_id for s in steps)
    # Waiting for it again reads the same end.
    assert client.wait_chain(chain.chain_id, timeout=WAIT) == end


def test_a_failed_step_cancels_the_steps_after_it(client: Client) -> None:
    chain = client.submit_chain(
        {
            "chain_id": f"fails-{uuid.uuid4().hex[:8]}",
            "priority": 4,
            "tenant": "acme",
            "steps": [
                {"name": "ok", "prompt": "Fine", "model": "mock-fast"},
                {"name": "bad", "prompt": "Refused", "model": "fail-400"},
                {"name": "after", "after": ["bad"], "prompt": "Never {{bad.output}}"},
            ],
        }
    )
    end = client.wait_chain(chain, timeout=WAIT)
    assert end.state == "failed"
    assert {n: s.status for n, s in end.steps.items()} == {
        "ok": "succeeded",
        "bad": "failed",
        "after": "cancelled",
    }
    assert end.steps["bad"].error and end.steps["bad"].output is None


def test_a_chain_submitted_twice_with_one_key_is_one_chain_named_from_it(client: Client) -> None:
    key = f"release-{uuid.uuid4().hex[:8]}"
    spec = {
        "idempotency_key": key,
        "tenant": "acme",
        "steps": [{"name": "a", "prompt": f"Once {key}", "model": "mock-fast"}],
    }
    first = client.submit_chain(spec)
    again = client.submit_chain(spec)
    assert first.chain_id == again.chain_id == chain_key_id(client.queue, "acme", key)
    # The worker names it so too: the chain is found, and followed to its end, under that id.
    end = client.wait_chain(first, timeout=WAIT)
    assert end.state == "succeeded" and end.chain_id == first.chain_id, end
    assert client.wait_chain(again, timeout=WAIT).steps["a"].task_id == end.steps["a"].task_id
    record = end.steps["a"].record
    assert record is not None and record.chain_id == first.chain_id


def test_a_chain_the_worker_refuses_is_reported_with_the_workers_reason(client: Client) -> None:
    chain = client.submit_chain({"steps": [{"name": "a", "prompt": "Uses {{nope}}"}]})
    with pytest.raises(ChainRefused) as e:
        list(client.follow_chain(chain, timeout=WAIT))
    text = str(e.value)
    assert f"the worker refused chain {chain.chain_id}" in text
    assert "the chain is invalid: step `a`: {{nope}} is not a variable of the chain" in text
    assert text.endswith("fix the chain and submit it again.")


@pytest.mark.parametrize(
    ("spec", "variables", "says"),
    [
        (
            {"steps": [{"name": "a", "prompt": "Use {{x}}"}]},
            {"x": "{{a.output}}"},
            "variable `x` contains a `{{...}}` reference; variables are text, not templates",
        ),
        (
            {"steps": [{"name": "a", "prompt": "Use {{x}}"}]},
            {"x": "  {{ y }} "},
            "variable `x` contains a `{{...}}` reference",
        ),
        (
            {
                "steps": [
                    {"name": "a", "prompt": "A"},
                    {"name": "b", "after": ["a"], "prompt": "{{x}}.output}}"},
                ]
            },
            {"x": "{{a"},
            "step `b`: its variables, filled in, would form a `{{...}}` reference with the prompt's own text",
        ),
    ],
)
def test_variables_holding_references_are_refused_in_the_workers_words(
    client: Client, spec: dict[str, Any], variables: dict[str, str], says: str
) -> None:
    with pytest.raises(InvalidChain) as e:
        client.submit_chain(spec, vars=variables)
    mine = str(e.value)
    assert mine.startswith(f"the chain is invalid: {says}"), mine
    # The same chain, written raw: the worker refuses it in the same words.
    raw = {"v": 1, "chain_id": f"vars-{uuid.uuid4().hex[:8]}", "vars": variables, **spec}
    entry_id = client.redis.xadd(client.keys.stream, {"chain": json.dumps(raw)}).decode()
    with pytest.raises(ChainRefused) as refused:
        client.wait_chain(ChainHandle(raw["chain_id"], client.queue, entry_id), timeout=WAIT)
    assert f": {mine[:-1]}; fix the chain" in str(refused.value), (mine, str(refused.value))


def test_variables_that_merely_mention_braces_are_taken(client: Client) -> None:
    chain = client.submit_chain(
        {"steps": [{"name": "a", "prompt": "Say {{x}}", "model": "mock-fast"}]},
        vars={"x": "{ not a {reference} }"},
    )
    assert client.wait_chain(chain, timeout=WAIT).state == "succeeded"


def test_a_steps_live_answer_is_followed_while_its_chain_runs(client: Client) -> None:
    """As the README shows: a chain whose first step streams its answer and whose second
    answers JSON that fits a schema; the first step's answer is read as it is written."""
    chain = client.submit_chain(
        {
            "steps": [
                {"name": "draft", "prompt": "Draft a note on {{input}}", "stream": True},
                {
                    "name": "facts",
                    "after": ["draft"],
                    "prompt": "The facts of {{draft.output}}",
                    "response_format": {
                        "type": "json_schema",
                        "schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
                    },
                },
            ]
        },
        vars={"input": "caching"},
    )
    streamed = ""
    end = None
    for event in client.follow_chain(chain, timeout=WAIT):
        # Its first change past `blocked`: `queued`, or already its end when a poll missed
        # the queued moment (the live answer is kept after the task ends).
        if isinstance(event, Step) and event.name == "draft" and event.status != "blocked" and not streamed:
            streamed = "".join(p.text for p in client.follow(event.task_id) if isinstance(p, Text))
        elif isinstance(event, ChainEnd):
            end = event
    assert end is not None and end.state == "succeeded", end
    assert streamed and streamed == end.steps["draft"].output
    facts = end.steps["facts"].record
    assert facts is not None and facts.json == {"city": "x"}
