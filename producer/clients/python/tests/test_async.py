"""The asynchronous client: the same calls, awaited, against a real worker."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from llmq_client import AsyncClient, ChainEnd, Step, Text

from .conftest import answer, env, unique

WAIT = 30.0


def run(queue: str, body: Callable[[AsyncClient], Awaitable[None]], url: str | None = None) -> None:
    async def main() -> None:
        async with AsyncClient.from_url(url or env("REDIS_URL"), queue) as client:
            await body(client)

    asyncio.run(main())


def test_async_enqueue_wait_and_batch(queue: str) -> None:
    async def body(client: AsyncClient) -> None:
        prompt = unique("Async")
        record = await client.wait(await client.enqueue(prompt, model="mock-fast"), timeout=WAIT)
        assert (record.status, record.output) == ("succeeded", answer(prompt))
        prompts = [unique(f"Async batch {i}") for i in range(5)]
        ids = await client.enqueue_many({"prompt": p, "model": "mock-fast", "priority": 2} for p in prompts)
        records = await client.wait_all(ids, timeout=WAIT)
        assert [r.output for r in records] == [answer(p) for p in prompts]
        dead = await client.wait(
            await client.enqueue(unique("Async refused"), model="fail-400"), timeout=WAIT
        )
        assert dead.status == "dead"
        assert (await client.result(ids[0])) == records[0]

    run(queue, body)


def test_async_live_answer_and_json(queue: str) -> None:
    async def body(client: AsyncClient) -> None:
        prompt = unique("Async story")
        task_id = await client.enqueue(prompt, model="mock-fast", stream=True)
        pieces = [p async for p in client.follow(task_id, timeout=WAIT)]
        assert "".join(p.text for p in pieces if isinstance(p, Text)) == answer(prompt)
        schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3}}, "required": ["n"]}
        task_id = await client.enqueue(
            unique("Count"), model="mock-fast", response_format={"type": "json_schema", "schema": schema}
        )
        assert (await client.wait(task_id, timeout=WAIT)).json == {"n": 3}

    run(queue, body)


def test_async_chain_and_dead_letter_replay(queue: str) -> None:
    async def body(client: AsyncClient) -> None:
        chain = await client.submit_chain(
            {
                "steps": [
                    {"name": "one", "prompt": "First"},
                    {"name": "two", "after": ["one"], "prompt": "Then"},
                ]
            }
        )
        events = [e async for e in client.follow_chain(chain, timeout=WAIT)]
        assert [e.name for e in events if isinstance(e, Step) and e.ended] == ["one", "two"]
        assert isinstance(events[-1], ChainEnd) and events[-1].state == "succeeded"

        prompt = unique("Async flaky")
        task_id = await client.enqueue(prompt, model="flaky", max_attempts=1)
        assert (await client.wait(task_id, timeout=WAIT)).status == "dead"
        letter = next(d for d in await client.dead_letters(1000) if d.task_id == task_id)
        assert await client.replay(letter.id) == task_id
        record = await client.wait(task_id, timeout=WAIT)
        assert (record.status, record.output) == ("succeeded", answer(prompt, "flaky"))

    run(queue, body)


def test_leaving_a_live_answer_early_stops_reading(queue: str) -> None:
    async def body(client: AsyncClient) -> None:
        task_id = await client.enqueue(
            unique("Slow story [[mock:stream-slow]]"), model="mock-fast", stream=True
        )
        reads: list[tuple[Any, ...]] = []
        execute = client.redis.execute_command

        async def counted(*args: Any, **kwargs: Any) -> Any:
            if args and args[0] == "XREAD":
                reads.append(args)
            return await execute(*args, **kwargs)

        client.redis.execute_command = counted
        read = []
        async for piece in client.follow(task_id, timeout=WAIT):
            assert isinstance(piece, Text)
            read.append(piece)
            break
        assert len(read) == 1 and reads, "the first piece was read from the live answer"
        before = len(reads)
        # The answer goes on being written to its end; nothing of it is read any more.
        assert (await client.wait(task_id, timeout=WAIT)).succeeded
        for _ in range(10):
            await asyncio.sleep(0)  # let a left generator be finalised, were it to read again
        assert len(reads) == before, f"the live answer was read after it was left: {reads[before:]}"
        assert await client.redis.xlen(client.keys.out(task_id)) > len(read), "there was more to read"

    run(queue, body)
