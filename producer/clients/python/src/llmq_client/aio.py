"""The asynchronous client, on redis.asyncio: the same calls as :class:`Client`, awaited."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, TypeVar

import redis.asyncio as aredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel

from . import plans
from .base import REDIS_ERRORS, Base, Flavour
from .envelope import Task, TaskFields
from .errors import LlmqError
from .records import ChainEnd, ChainHandle, DeadLetter, Restart, Step, TaskRecord, Text
from .urls import failure

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # pragma: no cover
    from typing_extensions import Unpack

T = TypeVar("T")


class AsyncClient(Base):
    """As :class:`Client`, for asyncio: every call is awaited, ``follow`` and
    ``follow_chain`` are async iterators. ``async with AsyncClient.from_url(...) as c:``."""

    flavour = Flavour(aredis.Redis, RedisCluster, ClusterNode, Sentinel)

    async def close(self) -> None:
        try:
            await self.redis.aclose()
        finally:
            for other in self._closes:
                await other.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- I/O: the only code that differs from Client.

    async def _do(self, op: plans.Op) -> Any:
        try:
            if isinstance(op, plans.Command):
                return await self.redis.execute_command(*op.args)
            if isinstance(op, plans.Pipeline):
                pipe = self.redis.pipeline(transaction=False)
                for args in op.commands:
                    pipe.execute_command(*args)
                replies = await pipe.execute(raise_on_error=not op.keep_errors)
                return [failure(self._target, r) if isinstance(r, Exception) else r for r in replies]
        except REDIS_ERRORS as e:
            raise failure(self._target, e) from e
        if isinstance(op, plans.Sleep):
            await asyncio.sleep(op.seconds)
        return None

    async def _run(self, plan: plans.Plan[T]) -> T:
        reply, error = None, None
        try:
            while True:
                op = plan.send(reply) if error is None else plan.throw(error)
                try:
                    reply, error = await self._do(op), None
                except LlmqError as e:
                    reply, error = None, e
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    async def _iter(self, plan: plans.Plan[Any]) -> AsyncIterator[Any]:
        reply, error = None, None
        try:
            while True:
                try:
                    op = plan.send(reply) if error is None else plan.throw(error)
                except StopIteration:
                    return
                reply, error = None, None
                if isinstance(op, plans.Emit):
                    yield op.value
                    continue
                try:
                    reply = await self._do(op)
                except LlmqError as e:
                    error = e
        finally:
            plan.close()

    # --- The calls (see Client for what each does).

    async def enqueue(self, prompt: str | None = None, **fields: Unpack[TaskFields]) -> str:
        return (await self._run(self._enqueue(prompt, fields)))[0]

    async def enqueue_many(self, tasks: Iterable[Task]) -> list[str]:
        return await self._run(self._enqueue_many(tasks))

    async def result(self, task_id: str) -> TaskRecord | None:
        return await self._run(self._result(task_id))

    async def wait(self, task_id: str, timeout: float = 60.0, poll: float = 0.1) -> TaskRecord:
        return (await self._run(self._wait([task_id], timeout, poll)))[0]

    async def wait_all(
        self, task_ids: Iterable[str], timeout: float = 60.0, poll: float = 0.1
    ) -> list[TaskRecord]:
        return await self._run(self._wait(task_ids, timeout, poll))

    def follow(self, task_id: str, timeout: float = 300.0) -> AsyncIterator[Text | Restart]:
        return self._iter(self._follow(task_id, timeout))

    async def submit_chain(
        self, spec: Mapping[str, Any], vars: Mapping[str, str] | None = None
    ) -> ChainHandle:
        return await self._run(self._submit_chain(spec, vars))

    def follow_chain(
        self, chain: ChainHandle | str, timeout: float = 300.0, poll: float = 0.1
    ) -> AsyncIterator[Step | ChainEnd]:
        return self._iter(self._follow_chain(chain, timeout, poll))

    async def wait_chain(
        self, chain: ChainHandle | str, timeout: float = 300.0, poll: float = 0.1
    ) -> ChainEnd:
        return await self._run(self._follow_chain(chain, timeout, poll))

    async def dead_letters(self, limit: int = 100, before: str | None = None) -> list[DeadLetter]:
        return await self._run(self._dead_letters(limit, before))

    async def replay(self, dead: DeadLetter | str, provider: str | None = None) -> str:
        return await self._run(self._replay(dead, provider))

    async def cancel(
        self, *task_ids: str, batch: str | None = None, tenant: str | None = None
    ) -> dict[str, str]:
        return await self._run(self._cancel(task_ids, batch, tenant))
