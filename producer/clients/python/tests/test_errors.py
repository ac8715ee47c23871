"""Every error a user can cause is an exception whose message is a sentence, and a task the
client refuses is one a worker refuses too, for the same reason in the same words."""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import redis

import llmq_client
from llmq_client import (
    AsyncClient,
    BadRedisUrl,
    Client,
    InvalidArgument,
    InvalidChain,
    InvalidId,
    InvalidQueue,
    InvalidTask,
    LlmqError,
    RedisFailed,
    RedisUnavailable,
    WaitTimeout,
)
from llmq_client.keys import derive_id

from .conftest import assert_sentence, env, unique

# Envelopes (as JSON) a worker refuses, each for a reason the client words as the worker does.
REFUSED: list[dict[str, Any]] = [
    {"prompt": "x", "priority": 12},
    {"prompt": "x", "priority": -1},
    {"prompt": "x", "tenant": "a\nb"},
    {"prompt": "x", "tenant": "evil\x1b[2J"},
    {"prompt": "x", "tenant": ""},
    {"prompt": "x", "tenant": "é" * 65},
    {"prompt": "   "},
    {"prompt": ""},
    {"prompt": "x", "type": "poetry"},
    {"prompt": "x", "max_attempts": 0},
    {"prompt": "x", "timeout": 0},
    {"prompt": "x", "timeout": 2592001},
    {"prompt": "x", "concurrency_key": "k"},
    {"prompt": "x", "concurrency_limit": 2},
    {"prompt": "x", "concurrency_key": " ", "concurrency_limit": 1},
    {"prompt": "x", "concurrency_key": "k", "concurrency_limit": 0},
    {"prompt": "x", "stream": True, "tools": [{"name": "t"}]},
    {"prompt": "x", "deadline": "2h"},
    {"prompt": "x", "deadline": "31d"},
    {"prompt": "x", "deadline": "24h", "stream": True},
    {"prompt": "x", "deadline": "soon"},
    {"prompt": "x", "deadline": "1.5"},
    {"prompt": "x", "deadline": "3 fortnights"},
    {"prompt": "x", "deadline": "23h 59m 59s 999ms"},
    {"prompt": "x", "deadline": "1M 1d"},
    {"prompt": "x", "deadline": "2y"},
    {"prompt": "x", "deadline": "1.h"},
    {"prompt": "x", "cache": True},
    {"prompt": "x", "cache": {"ttl": "24h"}},
    {"prompt": "x", "cache": {"ttl": "24h", "sampled": False}, "temperature": 0.7},
    {"prompt": "x", "cache": {"ttl": "0.5s"}, "temperature": 0},
    {"prompt": "x", "cache": {"ttl": "31d"}, "temperature": 0},
    {"prompt": "x", "cache": {"ttl": "soon"}, "temperature": 0},
    {"prompt": "x", "cache": {"ttl": "24h"}, "temperature": 0, "stream": True},
    {"prompt": "x", "cache": {"ttl": "24h"}, "stream": True},
    {"prompt": "x", "cache": True, "deadline": "2h"},
    {"prompt": "x", "cache": True, "model": "mock\u0000fast"},
    {"prompt": "x", "model": "mock\u0000fast"},
    {"prompt": "x", "idempotency_key": ""},
    {"prompt": "x", "idempotency_window": "1h"},
    {"prompt": "x", "idempotency_key": "refused-window", "idempotency_window": "soon"},
    {"prompt": "x", "idempotency_key": "refused-window", "idempotency_window": "0.5s"},
    {"prompt": "x", "idempotency_key": "refused-window", "idempotency_window": "31d"},
    {"prompt": "x", "idempotency_key": "refused-window", "idempotency_window": "1 d 2"},
    {"prompt": "x", "idempotency_key": "", "model": "mock\u0000fast"},
    {"prompt": "x", "idempotency_window": "1h", "model": "mock\u0000fast"},
    {"prompt": "x", "idempotency_key": "refused\u0000key"},
    {"prompt": "x", "idempotency_key": "", "cache": True},
    {"prompt": "x", "batch_id": ""},
    {"prompt": "x", "batch_id": "x" * 129},
    {"prompt": "x", "batch_id": "batch 1"},
    {"prompt": "x", "batch_id": "batch/1"},
    {"prompt": "x", "batch_id": "batch\u0000"},
    {"prompt": "x", "batch_id": "", "idempotency_key": ""},
    {"prompt": "x", "batch_id": "", "model": "mock\u0000fast"},
    {"prompt": "x", "messages": [{"role": "tool", "tool_call_id": "c1", "content": "r"}]},
    {"prompt": "x", "messages": [{"role": "user", "content": " "}]},
    {"prompt": "", "messages": [{"role": "system", "content": "be brief"}]},
    {"prompt": "x", "messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "c 1", "name": "t"}]}]},
    {"prompt": "x", "messages": [{"role": "user", "content": [{"type": "image", "url": "ftp://x/y.png"}]}]},
    {"prompt": "x", "messages": [{"role": "assistant", "content": [{"type": "image", "data": "AAAA", "media_type": "image/png"}]}]},
    {"prompt": "x", "tools": [{"name": "1bad"}]},
    {"prompt": "x", "tools": [{"name": "t"}, {"name": "t"}]},
    {"prompt": "x", "tools": [{"name": "t", "parameters": {"type": "array"}}]},
    {"prompt": "x", "tool_choice": "required"},
    {"prompt": "x", "tool_choice": {"name": "nope"}, "tools": [{"name": "t"}]},
    {"prompt": "x", "response_format": {"type": "json_schema", "schema": [1]}},
    {"prompt": "x", "response_format": {"type": "json_schema", "schema": {}, "name": "has space"}},
]  # fmt: skip


def python_names(case: dict[str, Any]) -> dict[str, Any]:
    return {"task_type" if k == "type" else k: v for k, v in case.items()}


def test_a_task_the_client_refuses_a_worker_refuses_in_the_same_words(client: Client) -> None:
    said = []
    for case in REFUSED:
        with pytest.raises(InvalidTask) as refused:
            client.enqueue(**python_names(case))
        assert_sentence(refused.value)
        said.append(str(refused.value))
    # The same envelopes, written raw: each becomes a dead letter saying the same.
    ids = [str(uuid.uuid4()) for _ in REFUSED]
    for task_id, case in zip(ids, REFUSED, strict=True):
        client.redis.xadd(client.keys.stream, {"task": json.dumps({"v": 1, "id": task_id, **case})})
    for case, mine, record in zip(REFUSED, said, client.wait_all(ids, timeout=30), strict=True):
        assert (record.status, record.error_class) == ("dead", "invalid"), (case, record)
        assert mine == f"{record.error}.", f"{case}: the client says {mine!r}, the worker {record.error!r}"


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"priority": "3"}, "field `priority` is wrong"),
        ({"priority": 3.0}, "field `priority` is wrong"),
        ({"priority": True}, "field `priority` is wrong"),
        ({"tenant": 7}, "field `tenant` is wrong: must be a string"),
        ({"max_tokens": -1}, "field `max_tokens` is wrong"),
        ({"max_attempts": 2**32}, "field `max_attempts` is wrong"),
        ({"temperature": math.nan}, "field `temperature` is wrong: must be a finite number"),
        ({"temperature": 1e39}, "field `temperature` is wrong: 1e+39 is too large"),
        ({"stream": "yes"}, "field `stream` is wrong: must be true or false"),
        ({"risk": "extreme"}, "field `risk` is wrong: must be one of low, medium, high"),
        ({"min_tier": "huge"}, "field `min_tier` is wrong"),
        ({"task_id": "nope"}, "field `id` is wrong: must be a UUID"),
        ({"run_at": "tomorrow"}, "field `run_at` is wrong: must be an RFC 3339 time"),
        ({"run_at": datetime(2030, 1, 1)}, "field `run_at` is wrong: is a datetime without a time zone"),
        ({"timeout": timedelta(seconds=1.5)}, "field `timeout` is wrong: must be whole seconds"),
        ({"deadline": "soon"}, "field `deadline` is wrong: `soon` is not a duration"),
        ({"idempotency_key": ""}, "field `idempotency_key` is wrong: is empty"),
        ({"idempotency_window": "1h"}, "field `idempotency_window` is wrong: needs idempotency_key"),
        (
            {"idempotency_key": "k", "idempotency_window": timedelta(seconds=1.5)},
            "field `idempotency_window` is wrong: must be whole seconds",
        ),
        (
            {"idempotency_key": "k", "idempotency_window": 3600},
            "field `idempotency_window` is wrong: must be a string",
        ),
        ({"batch_id": "a/b"}, "field `batch_id` is wrong: must be 1 to 128 letters, digits"),
        ({"batch_id": 42}, "field `batch_id` is wrong: must be a string"),
        ({"metadata": {1, 2}}, "field `metadata` is wrong: is not JSON"),
        ({"metadata": {"x": math.inf}}, "field `metadata` is wrong: is not JSON"),
        ({"messages": "hi"}, "field `messages` is wrong: must be a list of turns"),
        ({"messages": [{"role": "user", "text": "hi"}]}, "has an unknown field `text`"),
        ({"tool_choice": "maybe"}, "field `tool_choice` is wrong"),
        ({"response_format": {"type": "xml"}}, "field `response_format` is wrong"),
        ({"tools": [{"name": "t", "parameters": {}, "code": "rm -rf /"}]}, "unknown field `code`"),
        ({"prompt": None}, "the task has no prompt"),
        ({"prompt": 5}, "field `prompt` is wrong: must be a string"),
        ({"nonsense": 1}, "`nonsense` is not a task field"),
        ({"attempts": 2}, "`attempts` is not a task field (workers set `attempts`)"),
        ({"id": str(uuid.uuid4())}, "`id` is not a task field (write task_id= for the envelope's `id`)"),
        ({"prompt": "x" * (1 << 20)}, "over the 1048576-byte limit"),
    ],
)
def test_bad_field_values_are_sentences(idle: Client, fields: dict[str, Any], says: str) -> None:
    task = {"prompt": "x", **fields}
    with pytest.raises(InvalidTask) as e:
        idle.enqueue(**task)
    assert_sentence(e.value, says)
    with pytest.raises(InvalidTask) as e:
        idle.enqueue_many([{"prompt": "fine"}, task])
    assert_sentence(e.value, "task 1 of the batch: ", says)
    assert idle.redis.xlen(idle.keys.stream) == 0, "nothing of a refused batch is written"


@pytest.mark.parametrize("name", ["", "   ", "a{b", "a}b", "a\nb", "tab\there", "x" * 201, 7, "lone \ud800"])
def test_a_queue_name_that_cannot_make_keys_is_refused(name: Any) -> None:
    with pytest.raises(InvalidQueue) as e:
        Client.from_url(env("REDIS_URL"), name)
    assert_sentence(e.value, "is not a queue name llmq can use")
    with pytest.raises(InvalidQueue):
        AsyncClient.from_url(env("REDIS_URL"), name)


def test_a_bad_queue_name_is_refused_before_connecting() -> None:
    # A cluster is connected to at once: nothing listens on port 1, so a connection tried
    # first would be the error.
    for name in ["a{b", "lone \udc00"]:
        with pytest.raises(InvalidQueue):
            Client.from_url("redis+cluster://127.0.0.1:1", name)
        with pytest.raises(InvalidArgument):
            Client.from_url("redis+cluster://127.0.0.1:1", "q", max_payload_bytes=0)


def test_queue_names_the_workers_use_are_accepted() -> None:
    for name in ["default", "a.b-c_d", "x" * 200, "with space", "ünïcode"]:
        Client.from_url(env("REDIS_URL"), name).close()


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("", "the Redis URL is empty"),
        ("localhost:6379", "it has no scheme"),
        ("http://127.0.0.1:6379", "`http://` is not a scheme llmq takes"),
        ("redis://127.0.0.1:notaport", "bad Redis URL `redis://127.0.0.1:notaport`"),
        ("redis://127.0.0.1:6379/zero", "`zero` is not a database number"),
        ("redis+cluster://", "a cluster URL needs at least one seed node"),
        ("redis+cluster://h:1,h:99999", "`h:99999` is not host:port"),
        ("redis+sentinel://h:26379", "needs the sentinels and the master's name"),
        ("redis+sentinel:///mymaster", "needs the sentinels and the master's name"),
        ("redis+sentinel://h:1/m/x", "`x` is not a database number"),
        ("redis+cluster://user:secret@h:1,h:99999", "redis+cluster://h:1,h:99999"),
    ],
)
def test_a_bad_url_names_the_forms_to_write(url: str, says: str) -> None:
    for make in (Client.from_url, AsyncClient.from_url):
        with pytest.raises(BadRedisUrl) as e:
            make(url, "q")
        assert_sentence(e.value, says, "write it as redis://host:port, rediss://host:port, redis+cluster://")
        assert "secret" not in str(e.value)


def test_a_redis_that_cannot_be_reached_is_a_sentence(queue: str) -> None:
    plain = env("REDIS_URL").replace("redis://", "redis+cluster://")
    sentinel = env("LLMQ_SENTINEL_URL").replace("/mymaster", "/nosuchmaster")
    cases = [
        ("redis://127.0.0.1:1", "cannot reach Redis at redis://127.0.0.1:1", "start Redis or set REDIS_URL"),
        (
            "redis+cluster://127.0.0.1:1,127.0.0.1:2",
            "no seed node of the Redis Cluster answered",
            "127.0.0.1:2",
        ),
        (plain, "is not in cluster mode", "use redis://host:port for a single Redis"),
        (
            sentinel,
            "no sentinel named a reachable master `nosuchmaster`",
            "check the sentinels' host:port list",
        ),
        ("redis+sentinel://127.0.0.1:1/mymaster", "no sentinel named a reachable master", "127.0.0.1:1"),
    ]
    options = {"socket_connect_timeout": 2, "socket_timeout": 2}
    for url, *says in cases:
        with pytest.raises(RedisUnavailable) as e:
            with Client.from_url(url, queue, **options) as c:
                c.enqueue("x")
        assert_sentence(e.value, *says)

        async def attempt(url: str = url) -> None:
            async with AsyncClient.from_url(url, queue, **options) as c:
                await c.result(str(uuid.uuid4()))

        with pytest.raises(RedisUnavailable) as e:
            asyncio.run(attempt())
        assert_sentence(e.value, *says)


def test_waiting_too_short_is_a_sentence(idle: Client) -> None:
    task_id = idle.enqueue("nobody serves this queue")
    with pytest.raises(WaitTimeout) as e:
        idle.wait(task_id, timeout=0.3)
    assert_sentence(e.value, task_id, "has no result record yet", f"is a worker serving queue `{idle.queue}`")
    with pytest.raises(WaitTimeout) as e:
        list(idle.follow(task_id, timeout=0.3))
    assert_sentence(e.value, f"the live answer of task {task_id} did not end within 0.3s")
    with pytest.raises(WaitTimeout) as e:
        idle.wait_chain("no-such-chain", timeout=0.3)
    assert_sentence(e.value, "chain no-such-chain did not end within 0.3s (its steps: not expanded yet)")


def test_bad_arguments_are_sentences(idle: Client) -> None:
    for call, error, says in [
        (lambda: idle.wait("not-a-uuid"), InvalidId, "'not-a-uuid' is not a task id"),
        (lambda: idle.follow("12", timeout=1).__next__(), InvalidId, "is not a task id"),
        (
            lambda: idle.wait(str(uuid.uuid4()), timeout=-1),
            InvalidArgument,
            "timeout must be a number of seconds",
        ),
        (
            lambda: idle.wait(str(uuid.uuid4()), timeout="1"),
            InvalidArgument,
            "timeout must be a number of seconds",
        ),
        (lambda: idle.dead_letters(0), InvalidArgument, "limit must be a whole number"),
        (
            lambda: idle.replay("1-0", provider="lone \ud800"),
            InvalidArgument,
            "provider must be a provider's name",
        ),
        (lambda: idle.replay("1-0", provider=""), InvalidArgument, "provider must be a provider's name"),
        (lambda: idle.wait_chain("a\tb"), InvalidId, "`chain_id` must be at most 512 characters"),
        (lambda: Client(idle.redis, "q", max_payload_bytes=0), InvalidArgument, "max_payload_bytes must be"),
    ]:
        with pytest.raises(error) as e:
            call()
        assert_sentence(e.value, says)
        assert isinstance(e.value, LlmqError)


CHAIN = {"steps": [{"name": "a", "prompt": "A"}, {"name": "b", "after": ["a"], "prompt": "B {{a.output}}"}]}


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"colour": "red"}, "`colour` is not a chain field"),
        ({"v": 2}, "the chain has version 2"),
        ({"chain_id": ""}, "`chain_id` is empty"),
        ({"chain_id": "x" * 513}, "`chain_id` must be at most 512 characters"),
        ({"idempotency_key": ""}, "`idempotency_key` is empty or holds a NUL character"),
        ({"idempotency_key": 7}, "`idempotency_key` must be a string"),
        ({"tenant": "a\tb"}, "field `tenant` is wrong: contains a control character"),
        ({"priority": 10}, "field `priority` is wrong: 10 is out of range"),
        ({"max_parallel": 0}, "`max_parallel` must be at least 1"),
        ({"on_failure": "explode"}, "`on_failure` must be cancel_descendants or fail_chain"),
        ({"vars": {"n": 1}}, "`vars` must map names to text"),
        ({"defaults": {"prompt": "x"}}, "`defaults` may set only type, risk"),
        ({"steps": []}, "the chain has no steps"),
        ({"steps": [{"name": "a b", "prompt": "x"}]}, "step name `a b` must be letters, digits"),
        ({"steps": [{"name": "a", "prompt": "x"}, {"name": "a", "prompt": "y"}]}, "two steps are named `a`"),
        (
            {"steps": [{"name": "a", "prompt": "x", "after": ["z"]}]},
            "step `a` is after `z`, which is not a step",
        ),
        ({"steps": [{"name": "a", "prompt": "x", "after": ["a"]}]}, "step `a` is after itself"),
        (
            {
                "steps": [
                    {"name": "a", "prompt": "x", "after": ["b"]},
                    {"name": "b", "prompt": "y", "after": ["a"]},
                ]
            },
            "steps a -> b -> a form a cycle",
        ),
        ({"steps": [{"name": "a"}]}, 'step `a`: the step has no prompt; set "prompt"'),
        ({"steps": [{"name": "a", "prompt": "x", "kind": "vote"}]}, "step `a`: unknown kind `vote`"),
        ({"steps": [{"name": "a", "prompt": "x", "model": 4}]}, "step `a`: `model` must be a string"),
        ({"steps": [{"name": "a", "prompt": "x", "type": "poetry"}]}, "step `a`: unknown task type `poetry`"),
        (
            {"steps": [{"name": "a", "prompt": "x", "timeout": "soon"}]},
            "step `a`: timeout `soon` is not a duration (expected number at 0)",
        ),
        ({"steps": [{"name": "a", "prompt": "x", "colour": 1}]}, "step `a`: `colour` is not a step field"),
        ({"steps": [{"name": "a", "prompt": "x", "stream": "yes"}]}, "step `a`: `stream` must be"),
        (
            {
                "defaults": {"tools": [{"name": "look", "parameters": {"type": "object"}}]},
                "steps": [{"name": "a", "prompt": "x", "stream": True}],
            },
            "step `a`: `stream` cannot be used with tools yet",
        ),
    ],
)
def test_a_bad_chain_is_refused_with_a_sentence(idle: Client, change: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidChain) as e:
        idle.submit_chain({**CHAIN, **change})
    assert_sentence(e.value, "the chain is invalid: ", says)
    with pytest.raises(InvalidChain) as e:
        idle.submit_chain(["not", "a", "mapping"])  # type: ignore[arg-type]
    assert_sentence(e.value)
    assert idle.redis.xlen(idle.keys.stream) == 0


def test_every_error_class_is_an_llmq_error() -> None:
    for name in llmq_client.__all__:
        value = getattr(llmq_client, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, LlmqError), name


def nested(levels: int) -> Any:
    value: Any = "deep"
    for _ in range(levels):
        value = [value]
    return value


def test_json_as_deep_as_a_worker_reads_runs_and_deeper_is_a_sentence(client: Client) -> None:
    # 126 levels in `metadata`, 127 with the envelope: the most serde_json reads.
    record = client.wait(client.enqueue(unique("Deep"), model="mock-fast", metadata=nested(126)), timeout=30)
    assert record.status == "succeeded", record
    for levels in (127, 200_000):
        with pytest.raises(InvalidTask) as e:
            client.enqueue("x", metadata=nested(levels))
        assert_sentence(
            e.value, "field `metadata` is wrong: nests arrays and objects deeper than a worker reads"
        )
    # The same, written raw: a worker cannot read it, not even its id (so the task's id is
    # the one derived from its entry).
    raw = json.dumps({"v": 1, "id": str(uuid.uuid4()), "prompt": "x", "metadata": nested(127)})
    entry_id = client.redis.xadd(client.keys.stream, {"task": raw}).decode()
    record = client.wait(derive_id(client.queue, entry_id), timeout=30)
    assert (record.status, record.error_class) == ("dead", "invalid"), record


def test_times_at_the_ends_of_the_calendar_run(client: Client) -> None:
    early = datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1)))
    ids = [
        client.enqueue(unique("Year 1"), model="mock-fast", run_at="0001-01-01T00:00:00+01:00"),
        client.enqueue(unique("Year 0"), model="mock-fast", run_at=early),
    ]
    assert [r.status for r in client.wait_all(ids, timeout=30)] == ["succeeded", "succeeded"]


def test_a_batch_cut_short_by_redis_says_which_tasks_were_enqueued(idle: Client) -> None:
    make_pipeline, rounds = idle.redis.pipeline, []
    failure: list[Any] = []

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = make_pipeline(*args, **kwargs)
        run = pipe.execute

        def execute(*a: Any, **k: Any) -> Any:
            rounds.append(1)
            if len(rounds) == 2 and failure == ["connection"]:
                raise redis.exceptions.ConnectionError("Connection reset by peer")
            replies = run(*a, **k)
            if failure == ["reply"]:
                replies[500] = redis.exceptions.ResponseError(
                    "OOM command not allowed when used memory > 'maxmemory'"
                )
            return replies

        pipe.execute = execute
        return pipe

    idle.redis.pipeline = pipeline
    failure.append("connection")
    with pytest.raises(RedisUnavailable) as cut:
        idle.enqueue_many({"prompt": f"task {i}"} for i in range(2500))
    assert_sentence(
        cut.value,
        "cannot reach Redis",
        "1000 of the 2500 tasks were enqueued",
        "1000 may or may not have been",
    )
    written = [json.loads(f[b"task"])["id"] for _, f in idle.redis.xrange(idle.keys.stream)]
    assert len(written) == 1000 and list(cut.value.enqueued) == written
    assert len(cut.value.unknown) == 1000 and not set(cut.value.unknown) & set(written)

    idle.redis.delete(idle.keys.stream)
    rounds.clear()
    failure[:] = ["reply"]
    with pytest.raises(RedisFailed) as refused:
        idle.enqueue_many({"prompt": f"task {i}"} for i in range(2500))
    assert_sentence(refused.value, "OOM command not allowed", "999 of the 2500 tasks were enqueued")
    assert len(refused.value.enqueued) == 999 and refused.value.unknown == ()
    assert len(rounds) == 1, "nothing more is sent after a refused command"
    # One task: the error as it came.
    rounds.clear()
    failure[:] = ["connection"]
    idle.enqueue("first round")
    with pytest.raises(RedisUnavailable) as single:
        idle.enqueue("second round")
    assert single.value.enqueued == () and "enqueued" not in str(single.value)
