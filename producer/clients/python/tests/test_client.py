"""The synchronous client against a real worker (the mock provider: `mock-fast` answers
"mock answer from mock-fast: <prompt>", `fail-400` makes a task dead)."""

from __future__ import annotations

import json
from typing import Any

from llmq_client import Client, Restart, Task, Text

from .conftest import answer, unique

WAIT = 30.0


def test_a_task_is_enqueued_and_its_result_waited_for(client: Client, queue: str) -> None:
    prompt = unique("From Python")
    task_id = client.enqueue(prompt, model="mock-fast")
    record = client.wait(task_id, timeout=WAIT)
    assert record.status == "succeeded" and record.succeeded and record.final
    assert record.output == answer(prompt)
    assert (record.task_id, record.queue, record.model) == (task_id, queue, "mock-fast")
    assert record.cost_usd > 0 and record.input_tokens > 0
    assert record.raw["status"] == "succeeded"
    assert client.result(task_id) == record


def test_a_task_a_provider_refuses_ends_dead(client: Client) -> None:
    record = client.wait(client.enqueue(unique("Refused"), model="fail-400"), timeout=WAIT)
    assert (record.status, record.error_class, record.output) == ("dead", "fatal", None)
    assert record.final and not record.succeeded and record.error


def test_a_batch_is_one_pipelined_round_trip_and_every_task_runs(client: Client) -> None:
    prompts = [unique(f"Batch {i}") for i in range(20)]
    tasks: list[Task] = [{"prompt": p, "model": "mock-fast", "task_type": "research"} for p in prompts]
    rounds = count_round_trips(client)
    ids = client.enqueue_many(tasks)
    assert rounds == {"pipelines": 1, "commands": 0}, "20 XADDs in one round trip"
    records = client.wait_all(ids, timeout=WAIT)
    assert [r.output for r in records] == [answer(p) for p in prompts]
    assert {r.task_type for r in records} == {"research"}


def test_a_large_batch_goes_1000_tasks_a_round_trip(idle: Client) -> None:
    rounds = count_round_trips(idle)
    ids = idle.enqueue_many({"prompt": f"task {i}"} for i in range(2500))
    assert rounds["pipelines"] == 3 and rounds["commands"] == 0
    assert len(set(ids)) == 2500
    assert idle.redis.xlen(idle.keys.stream) == 2500
    first = json.loads(idle.redis.xrange(idle.keys.stream, count=1)[0][1][b"task"])
    assert first["id"] == ids[0] and first["prompt"] == "task 0" and first["v"] == 1


def test_an_answer_fitting_a_json_schema_comes_back_parsed(client: Client) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    task_id = client.enqueue(
        unique("Where?"), model="mock-fast", response_format={"type": "json_schema", "schema": schema}
    )
    record = client.wait(task_id, timeout=WAIT)
    assert record.status == "succeeded", record
    assert record.json == {"city": "x"}


def test_a_live_answer_is_followed_as_it_is_written(client: Client) -> None:
    prompt = unique("Tell a story")
    task_id = client.enqueue(prompt, model="mock-fast", stream=True)
    pieces = list(client.follow(task_id, timeout=WAIT))
    assert pieces and all(isinstance(p, Text) for p in pieces), pieces
    record = client.wait(task_id, timeout=WAIT)
    assert "".join(p.text for p in pieces if isinstance(p, Text)) == record.output == answer(prompt)
    # Followed again after the end: the same answer, read from the start.
    assert list(client.follow(task_id, timeout=WAIT)) == pieces


def test_a_live_answer_cut_halfway_says_so_and_the_retry_streams_it_whole(client: Client) -> None:
    prompt = unique("A tale [[mock:stream-break-once]]")
    task_id = client.enqueue(prompt, model="mock-fast", stream=True)
    pieces = list(client.follow(task_id, timeout=WAIT))
    restarts = [i for i, p in enumerate(pieces) if isinstance(p, Restart)]
    assert restarts and restarts[0] > 0, f"part of the answer came first: {pieces}"
    after = "".join(p.text for p in pieces[restarts[-1] + 1 :] if isinstance(p, Text))
    assert after == client.wait(task_id, timeout=WAIT).output == answer(prompt)


def test_a_task_that_does_not_stream_is_followed_to_its_end(client: Client) -> None:
    task_id = client.enqueue(unique("No stream"), model="mock-fast")
    assert list(client.follow(task_id, timeout=WAIT)) == []
    assert client.wait(task_id, timeout=1).succeeded


def test_priorities_and_tenants_are_accepted_by_a_worker(client: Client) -> None:
    cases: list[dict[str, Any]] = [
        {"priority": 0},
        {"priority": 9},
        {"priority": 3, "tenant": "acme"},
        {"tenant": "é" * 64},  # 128 bytes, the most a tenant may have
        {"tenant": "team/β #2"},
    ]
    ids = client.enqueue_many([{"prompt": unique("Classed"), "model": "mock-fast", **c} for c in cases])
    ids.append(client.enqueue(unique("One classed"), model="mock-fast", priority=5, tenant="globex"))
    records = client.wait_all(ids, timeout=WAIT)
    assert [r.status for r in records] == ["succeeded"] * len(ids), records


def test_every_field_a_worker_accepts(client: Client) -> None:
    """A task with every field set (as the schema test builds it) runs on a real worker."""
    from .test_schema import full_task

    task = full_task()
    del task["task_id"]
    task["prompt"] = unique("Every field")
    task["idempotency_key"] = unique("umbrella")
    record = client.wait(client.enqueue(**task), timeout=WAIT)
    assert record.status == "succeeded", record
    assert record.json == {"umbrella": True} and record.chain_id == "nightly"
    assert record.duplicate_of is None


def test_a_copy_of_a_keyed_task_is_answered_with_the_first_ones_answer(client: Client) -> None:
    key = unique("order")
    prompt = unique("Keyed")
    first = client.enqueue(prompt, model="mock-fast", idempotency_key=key, idempotency_window="1h")
    record = client.wait(first, timeout=WAIT)
    assert (record.status, record.output, record.duplicate_of) == ("succeeded", answer(prompt), None), record
    # A copy, within the window: the first one's answer, without a call.
    copy = client.wait(
        client.enqueue(unique("Keyed copy"), model="mock-fast", idempotency_key=key), timeout=WAIT
    )
    assert (copy.status, copy.output, copy.duplicate_of, copy.cost_usd) == (
        "succeeded",
        record.output,
        first,
        0.0,
    ), copy
    assert copy.raw["duplicate_of"] == first
    # The same key for another tenant is another key: its task runs.
    other = client.wait(
        client.enqueue(prompt, model="mock-fast", idempotency_key=key, tenant="acme"), timeout=WAIT
    )
    assert (other.status, other.duplicate_of) == ("succeeded", None), other


def count_round_trips(client: Client) -> dict[str, int]:
    """Counts the pipelines and the single commands ``client`` sends from now on."""
    seen = {"pipelines": 0, "commands": 0}
    redis = client.redis
    make_pipeline, execute_command = redis.pipeline, redis.execute_command

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = make_pipeline(*args, **kwargs)
        run = pipe.execute

        def execute(*a: Any, **k: Any) -> Any:
            seen["pipelines"] += 1
            return run(*a, **k)

        pipe.execute = execute
        return pipe

    def command(*args: Any, **kwargs: Any) -> Any:
        seen["commands"] += 1
        return execute_command(*args, **kwargs)

    redis.pipeline, redis.execute_command = pipeline, command
    return seen
