"""A Redis Cluster (redis+cluster://) and a Sentinel-watched master (redis+sentinel://), each
with a worker serving the queue: every kind of call, sync and async."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from llmq_client import AsyncClient, Client, RedisUnavailable, Text

from .conftest import answer, assert_sentence, env, unique

WAIT = 30.0


@pytest.mark.parametrize("url_var", ["LLMQ_CLUSTER_URL", "LLMQ_SENTINEL_URL"])
def test_every_call_on_a_cluster_and_behind_sentinels(queue: str, url_var: str) -> None:
    url = env(url_var)
    with Client.from_url(url, queue) as client:
        prompt = unique("Topology")
        assert client.wait(client.enqueue(prompt, model="mock-fast"), timeout=WAIT).output == answer(prompt)
        prompts = [unique(f"Topology batch {i}") for i in range(5)]
        ids = client.enqueue_many([{"prompt": p, "model": "mock-fast", "tenant": "acme"} for p in prompts])
        assert [r.output for r in client.wait_all(ids, timeout=WAIT)] == [answer(p) for p in prompts]

        streamed = unique("Topology story")
        task_id = client.enqueue(streamed, model="mock-fast", stream=True)
        text = "".join(p.text for p in client.follow(task_id, timeout=WAIT) if isinstance(p, Text))
        assert text == answer(streamed)

        chain = client.submit_chain(
            {"steps": [{"name": "a", "prompt": "A"}, {"name": "b", "after": ["a"], "prompt": "B"}]}
        )
        assert client.wait_chain(chain, timeout=WAIT).state == "succeeded"

        task_id = client.enqueue(unique("Topology refused"), model="fail-400")
        assert client.wait(task_id, timeout=WAIT).status == "dead"
        fresh = str(uuid.uuid4())  # names no task: its mark is set, and nothing is cancelled
        assert client.cancel(task_id, fresh) == {f"task:{task_id}": "dead", f"task:{fresh}": "cancelled"}
        assert client.redis.zscore(client.keys.cancels, f"task:{task_id}") is None
        assert client.redis.zscore(client.keys.cancels, f"task:{fresh}") is not None
        letter = next(d for d in client.dead_letters(1000) if d.task_id == task_id)
        assert client.replay(letter) == task_id  # replay.lua on this topology
        assert client.redis.xrange(client.keys.dead, letter.id, letter.id) == []

    async def main() -> None:
        async with AsyncClient.from_url(url, queue) as client:
            prompt = unique("Async topology")
            record = await client.wait(await client.enqueue(prompt, model="mock-fast"), timeout=WAIT)
            assert record.output == answer(prompt)
            task_id = await client.enqueue(unique("Async topology story"), model="mock-fast", stream=True)
            assert [p async for p in client.follow(task_id, timeout=WAIT)]
            ids = await client.enqueue_many([{"prompt": unique("x")}, {"prompt": unique("y")}])
            assert len(await client.wait_all(ids, timeout=WAIT)) == 2

    asyncio.run(main())


def test_a_redis_that_speaks_only_tls(queue: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = env("LLMQ_TLS_URL")
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    with pytest.raises(RedisUnavailable) as e:
        with Client.from_url(url, queue) as client:
            client.enqueue("x")
    assert_sentence(e.value, "certificate", "trust the CA that signed Redis's certificate with SSL_CERT_FILE")

    monkeypatch.setenv("SSL_CERT_FILE", env("LLMQ_TLS_CA"))
    with Client.from_url(url, queue) as client:
        client.enqueue("over TLS")
        client.enqueue_many([{"prompt": "one"}, {"prompt": "two"}])
        assert client.redis.xlen(client.keys.stream) == 3

    async def main() -> None:
        async with AsyncClient.from_url(url, queue) as client:
            await client.enqueue("async over TLS")
            assert await client.redis.xlen(client.keys.stream) == 4

    asyncio.run(main())


def connected(clients: list[Any]) -> int:
    """How many connections the redis-py clients' pools hold open."""
    pools = [c.connection_pool for c in clients]
    return sum(
        bool(conn.is_connected)
        for pool in pools
        for conn in [*pool._available_connections, *pool._in_use_connections]
    )


def test_closing_a_client_behind_sentinels_closes_its_connections_to_them(queue: str) -> None:
    url = env("LLMQ_SENTINEL_URL")
    client = Client.from_url(url, queue)
    client.enqueue(unique("Sentinel close"), model="mock-fast")  # the sentinels are asked
    sentinels = client.redis.connection_pool.sentinel_manager.sentinels
    assert connected(sentinels) > 0 and connected([client.redis]) > 0
    client.close()
    assert connected(sentinels) == 0 and connected([client.redis]) == 0

    async def main() -> None:
        aclient = AsyncClient.from_url(url, queue)
        await aclient.enqueue(unique("Async sentinel close"), model="mock-fast")
        asentinels = aclient.redis.connection_pool.sentinel_manager.sentinels
        assert connected(asentinels) > 0
        await aclient.close()
        assert connected(asentinels) == 0 and connected([aclient.redis]) == 0

    asyncio.run(main())
