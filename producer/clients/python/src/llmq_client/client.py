"""The synchronous client, on redis-py (``redis.Redis``, ``RedisCluster``, Sentinel)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import closing
from typing import Any, TypeVar

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import Sentinel

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


class Client(Base):
    """One queue of llmq, on a Redis, a Redis Cluster or the master Sentinel names.

    Make one with :meth:`from_url` (or wrap a redis-py client you have:
    ``Client(redis.Redis(...), queue="default")``). Every error is an :class:`LlmqError`
    whose message is a sentence.
    """

    flavour = Flavour(redis.Redis, RedisCluster, ClusterNode, Sentinel)

    def close(self) -> None:
        """Closes the connections (a Sentinel's to its sentinels too)."""
        try:
            self.redis.close()
        finally:
            for other in self._closes:
                other.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- I/O: the only code that differs from AsyncClient.

    def _do(self, op: plans.Op) -> Any:
        try:
            if isinstance(op, plans.Command):
                return self.redis.execute_command(*op.args)
            if isinstance(op, plans.Pipeline):
                pipe = self.redis.pipeline(transaction=False)
                for args in op.commands:
                    pipe.execute_command(*args)
                replies = pipe.execute(raise_on_error=not op.keep_errors)
                return [failure(self._target, r) if isinstance(r, Exception) else r for r in replies]
        except REDIS_ERRORS as e:
            raise failure(self._target, e) from e
        if isinstance(op, plans.Sleep):
            time.sleep(op.seconds)
        return None

    def _step(self, plan: plans.Plan[Any], reply: Any, error: LlmqError | None) -> plans.Op:
        """The plan's next operation, given the last one's reply, or its error (which the
        plan may catch)."""
        return plan.send(reply) if error is None else plan.throw(error)

    def _run(self, plan: plans.Plan[T]) -> T:
        reply, error = None, None
        try:
            while True:
                op = self._step(plan, reply, error)
                try:
                    reply, error = self._do(op), None
                except LlmqError as e:
                    reply, error = None, e
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    def _iter(self, plan: plans.Plan[Any]) -> Iterator[Any]:
        reply, error = None, None
        with closing(plan):
            while True:
                try:
                    op = self._step(plan, reply, error)
                except StopIteration:
                    return
                reply, error = None, None
                if isinstance(op, plans.Emit):
                    yield op.value
                    continue
                try:
                    reply = self._do(op)
                except LlmqError as e:
                    error = e

    # --- The calls.

    def enqueue(self, prompt: str | None = None, **fields: Unpack[TaskFields]) -> str:
        """Enqueues one task (one XADD) and returns its id. ``fields`` are the envelope's
        (``task_id`` for ``id``, ``task_type`` for ``type``); :class:`InvalidTask` for a
        task a worker would refuse."""
        return self._run(self._enqueue(prompt, fields))[0]

    def enqueue_many(self, tasks: Iterable[Task]) -> list[str]:
        """Enqueues tasks (each a mapping of ``prompt`` and fields), pipelined 1000 per round
        trip; returns their ids. Every task is checked before any is written."""
        return self._run(self._enqueue_many(tasks))

    def result(self, task_id: str) -> TaskRecord | None:
        """The task's result record as it is now (None before the first outcome)."""
        return self._run(self._result(task_id))

    def wait(self, task_id: str, timeout: float = 60.0, poll: float = 0.1) -> TaskRecord:
        """The task's record once it is final (succeeded, dead, failed or cancelled);
        :class:`WaitTimeout` after ``timeout`` seconds."""
        return self._run(self._wait([task_id], timeout, poll))[0]

    def wait_all(self, task_ids: Iterable[str], timeout: float = 60.0, poll: float = 0.1) -> list[TaskRecord]:
        """The tasks' final records, in the order given (one MGET per poll)."""
        return self._run(self._wait(task_ids, timeout, poll))

    def follow(self, task_id: str, timeout: float = 300.0) -> Iterator[Text | Restart]:
        """The live answer of a task enqueued with ``stream=True``, piece by piece as the
        worker writes it: :class:`Text`, or :class:`Restart` when a failed call voids what
        came before. Ends with the answer (or the task)."""
        return self._iter(self._follow(task_id, timeout))

    def submit_chain(self, spec: Mapping[str, Any], vars: Mapping[str, str] | None = None) -> ChainHandle:
        """Submits a chain (one XADD of its spec). Without a ``chain_id``, a chain with an
        ``idempotency_key`` is named from the key, as the worker names it (submitted twice, it
        is one chain); one without either is given a fresh id."""
        return self._run(self._submit_chain(spec, vars))

    def follow_chain(
        self, chain: ChainHandle | str, timeout: float = 300.0, poll: float = 0.1
    ) -> Iterator[Step | ChainEnd]:
        """Each :class:`Step` of the chain whenever its status changes (``queued``: its task's
        live answer can be followed), then the :class:`ChainEnd`."""
        return self._iter(self._follow_chain(chain, timeout, poll))

    def wait_chain(self, chain: ChainHandle | str, timeout: float = 300.0, poll: float = 0.1) -> ChainEnd:
        """The chain's end, with every step."""
        return self._run(self._follow_chain(chain, timeout, poll))

    def dead_letters(self, limit: int = 100, before: str | None = None) -> list[DeadLetter]:
        """The queue's newest dead letters, newest first: at most ``limit`` (1 to 1000, each
        letter being as large as its task); ``before``, a letter's id: those older than it,
        to page through more."""
        return self._run(self._dead_letters(limit, before))

    def replay(self, dead: DeadLetter | str, provider: str | None = None) -> str:
        """Replays a dead letter (or the one with that dead-entry id or task id) as
        ``llmq dlq replay`` does, optionally on another provider; returns the task id. A
        chain step's letter is refused (:class:`ReplayRefused`): use the llmq binaries."""
        return self._run(self._replay(dead, provider))

    def cancel(self, *task_ids: str, batch: str | None = None, tenant: str | None = None) -> dict[str, str]:
        """Cancels the tasks ``task_ids`` wherever they are, every task enqueued with
        ``batch_id`` ``batch``, and ``tenant``'s tasks enqueued until now (its later ones run):
        one MGET of the tasks' records, then one ZADD of every mark (docs/wire-format.md,
        "Cancelling"). Workers act within a second: a queued task never runs, a call in flight
        is dropped, and the task ends with status ``cancelled``. A task that had already ended
        is left as it was, with no mark. Returns, for each thing named (``task:<id>``,
        ``batch:<id>``, ``tenant:<name>``), ``cancelled`` (its mark is set) or the status the
        task had ended with (``succeeded``, ``failed``, ``dead`` or ``cancelled``).

        A tenant's cutoff is this machine's clock: a client whose clock is far behind Redis's
        may miss the tenant's tasks enqueued just before. :class:`InvalidId` for a task id
        that is not a UUID, :class:`InvalidArgument` for a bad batch id or tenant, or when
        nothing is named."""
        return self._run(self._cancel(task_ids, batch, tenant))
