"""Cancelling (docs/wire-format.md, "Cancelling"): the marks written to a queue no worker
serves, as ``llmq cancel`` writes them, and the plan's commands checked without Redis. What a
worker does with a mark is checked with real workers on the Rust side (tests/tests/e2e/cancel.rs)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable

import pytest

from llmq_client import AsyncClient, Client, InvalidArgument, InvalidId, LlmqError, plans
from llmq_client.keys import Keys

from .conftest import assert_sentence
from .test_async import run
from .test_client import count_round_trips

U = "0b6f4c2e-8a57-4a43-9c3e-2f5d8e7a1b90"


def record(task_id: str, queue: str, status: str) -> str:
    """A result record as a worker stores one."""
    return json.dumps(
        {
            "task_id": task_id,
            "queue": queue,
            "status": status,
            "provider": "mock",
            "model": "mock-fast",
            "output": "done" if status == "succeeded" else None,
            "error": None if status == "succeeded" else "it ended",
            "attempts": 1,
            "cost_usd": 0.0,
            "finished_at": "2030-01-01T00:00:00Z",
        }
    )


def marks(client: Client) -> dict[str, float]:
    return {m.decode(): s for m, s in client.redis.zrange(client.keys.cancels, 0, -1, withscores=True)}


def test_a_cancel_marks_what_it_names_and_leaves_an_ended_task_alone(idle: Client) -> None:
    ended, fresh = str(uuid.uuid4()), str(uuid.uuid4())
    idle.redis.set(idle.keys.result(ended), record(ended, idle.queue, "succeeded"))
    rounds = count_round_trips(idle)
    before = time.time() * 1000
    done = idle.cancel(ended, fresh, batch="nightly-2030:01", tenant="acme corp")
    after = time.time() * 1000
    assert done == {
        f"task:{ended}": "succeeded",
        f"task:{fresh}": "cancelled",
        "batch:nightly-2030:01": "cancelled",
        "tenant:acme corp": "cancelled",
    }
    assert rounds == {"pipelines": 0, "commands": 2}, "one MGET, then one ZADD of every mark"
    set_ = marks(idle)
    assert sorted(set_) == sorted([f"task:{fresh}", "batch:nightly-2030:01", "tenant:acme corp"])
    assert all(before - 1 <= s <= after + 1 for s in set_.values()), set_
    assert len(set(set_.values())) == 1, "every mark of one cancel has the same time"
    # The ended task's record is as it was.
    assert idle.result(ended).status == "succeeded"  # type: ignore[union-attr]


def test_a_mark_set_again_only_moves_later(idle: Client) -> None:
    task_id = str(uuid.uuid4())
    assert idle.cancel(task_id) == {f"task:{task_id}": "cancelled"}
    first = marks(idle)[f"task:{task_id}"]
    time.sleep(0.01)
    # Another spelling of the id names the same task.
    assert idle.cancel(task_id.upper().replace("-", "")) == {f"task:{task_id}": "cancelled"}
    second = marks(idle)[f"task:{task_id}"]
    assert second > first
    later = 4102444800000  # 2100-01-01: a mark set by a clock ahead stays where it is
    idle.redis.zadd(idle.keys.cancels, {"tenant:t": later})
    assert idle.cancel(tenant="t") == {"tenant:t": "cancelled"}
    assert marks(idle)["tenant:t"] == later


def test_every_ended_status_is_left_alone_and_a_record_not_ended_is_marked(idle: Client) -> None:
    ids = {status: str(uuid.uuid4()) for status in ("succeeded", "failed", "dead", "cancelled", "delayed")}
    for status, task_id in ids.items():
        idle.redis.set(idle.keys.result(task_id), record(task_id, idle.queue, status))
    stray = str(uuid.uuid4())
    idle.redis.set(idle.keys.result(stray), "not json")  # as llmq cancel: marked, not an error
    done = idle.cancel(*ids.values(), stray, ids["dead"])
    assert done == {
        **{f"task:{t}": s if s != "delayed" else "cancelled" for s, t in ids.items()},
        f"task:{stray}": "cancelled",
    }
    assert sorted(marks(idle)) == sorted([f"task:{ids['delayed']}", f"task:{stray}"])


def test_a_cancel_of_ended_tasks_only_sets_nothing(idle: Client) -> None:
    task_id = str(uuid.uuid4())
    idle.redis.set(idle.keys.result(task_id), record(task_id, idle.queue, "dead"))
    rounds = count_round_trips(idle)
    assert idle.cancel(task_id) == {f"task:{task_id}": "dead"}
    assert rounds == {"pipelines": 0, "commands": 1}, "the MGET alone"
    assert idle.redis.exists(idle.keys.cancels) == 0


def test_the_async_client_cancels_alike(idle: Client) -> None:
    ended, fresh = str(uuid.uuid4()), str(uuid.uuid4())
    idle.redis.set(idle.keys.result(ended), record(ended, idle.queue, "failed"))

    async def body(client: AsyncClient) -> None:
        assert await client.cancel(ended, fresh, batch="b-1", tenant="t") == {
            f"task:{ended}": "failed",
            f"task:{fresh}": "cancelled",
            "batch:b-1": "cancelled",
            "tenant:t": "cancelled",
        }
        with pytest.raises(InvalidArgument) as e:
            await client.cancel()
        assert_sentence(e.value, "cancel names nothing to cancel")

    run(idle.queue, body)
    assert sorted(marks(idle)) == sorted([f"task:{fresh}", "batch:b-1", "tenant:t"])


def test_bad_cancels_are_sentences_and_write_nothing(idle: Client) -> None:
    rounds = count_round_trips(idle)
    cases: list[tuple[Callable[[], object], type[LlmqError], str]] = [
        (lambda: idle.cancel("not-a-uuid"), InvalidId, "'not-a-uuid' is not a task id"),
        (lambda: idle.cancel(str(uuid.uuid4()), "12"), InvalidId, "'12' is not a task id"),
        (lambda: idle.cancel(), InvalidArgument, "cancel names nothing to cancel"),
        (lambda: idle.cancel(tenant=""), InvalidArgument, "tenant is empty"),
        (lambda: idle.cancel(tenant="a\nb"), InvalidArgument, "tenant contains a control character"),
        (lambda: idle.cancel(tenant="é" * 65), InvalidArgument, "tenant is 130 bytes long"),
        (lambda: idle.cancel(tenant="lone \ud800"), InvalidArgument, "tenant holds a lone surrogate"),
        (lambda: idle.cancel(tenant=7), InvalidArgument, "tenant must be"),  # type: ignore[arg-type]
        (lambda: idle.cancel(batch=""), InvalidArgument, "batch must be the batch_id"),
        (lambda: idle.cancel(batch="a b"), InvalidArgument, "1 to 128 letters, digits"),
        (lambda: idle.cancel(batch="x" * 129), InvalidArgument, "batch must be the batch_id"),
        (lambda: idle.cancel(U, batch="ok", tenant="\t"), InvalidArgument, "tenant contains a control"),
    ]
    for call, error, says in cases:
        with pytest.raises(error) as e:
            call()
        assert_sentence(e.value, says)
        assert isinstance(e.value, LlmqError) and isinstance(e.value, ValueError)
    assert rounds == {"pipelines": 0, "commands": 0}, "nothing is sent for a bad cancel"
    # The longest tenant and batch id a task may carry are taken.
    assert idle.cancel(tenant="é" * 64, batch="x" * 128) == {
        "batch:" + "x" * 128: "cancelled",
        "tenant:" + "é" * 64: "cancelled",
    }


class Clock:
    """The wall clock the plan reads, stopped."""

    def time_ns(self) -> int:
        return 1_764_400_000_123_456_789


def test_the_plan_reads_the_records_once_and_writes_every_mark_in_one_zadd(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(plans, "time", Clock())
    keys = Keys("q")
    other = str(uuid.UUID(int=1))
    plan = plans.cancel(keys, [U, other.upper(), U], "b", "t")
    assert next(plan) == plans.Command(("MGET", f"llmq:{{q}}:result:{U}", f"llmq:{{q}}:result:{other}"))
    ended = record(other, "q", "cancelled").encode()
    assert plan.send([None, ended]) == plans.Command(
        ("ZADD", "llmq:{q}:cancels", "GT", 1_764_400_000_123, f"task:{U}", 1_764_400_000_123, "batch:b")
        + (1_764_400_000_123, "tenant:t")
    )
    with pytest.raises(StopIteration) as stop:
        plan.send(3)
    assert stop.value.value == {
        f"task:{U}": "cancelled",
        f"task:{other}": "cancelled",
        "batch:b": "cancelled",
        "tenant:t": "cancelled",
    }
    # Without task ids there is nothing to read: the ZADD comes first.
    plan = plans.cancel(keys, [], None, "t")
    assert next(plan) == plans.Command(("ZADD", "llmq:{q}:cancels", "GT", 1_764_400_000_123, "tenant:t"))
