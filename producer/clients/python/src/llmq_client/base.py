"""What :class:`Client` and :class:`AsyncClient` share: their settings, and the plan each call
runs (see plans.py). The two classes add only the I/O."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
from redis.exceptions import RedisClusterException

from . import chain as chains
from . import envelope as E
from . import plans
from .errors import InvalidArgument
from .keys import Keys
from .records import ChainEnd, ChainHandle, DeadLetter, TaskRecord
from .urls import Target, failure, parse_url

#: Where Redis is when neither a URL nor REDIS_URL says.
DEFAULT_URL = "redis://127.0.0.1:6379"
#: What redis-py raises (a cluster's own errors are not RedisErrors).
REDIS_ERRORS = (redis.RedisError, RedisClusterException)
B = TypeVar("B", bound="Base")


@dataclass(frozen=True)
class Flavour:
    """The redis-py classes a client connects with: redis-py's or redis.asyncio's."""

    single: Any
    cluster: Any
    node: Any
    sentinel: Any

    def connect(self, target: Target, options: Mapping[str, Any]) -> tuple[Any, list[Any]]:
        """A client for ``target``, and the clients it leaves open that are to be closed with
        it (a Sentinel's, one per sentinel); ``options`` are passed to them (e.g.
        socket_timeout)."""
        if target.kind == "single":
            return self.single.from_url(target.url, **options), []
        auth: dict[str, Any] = {"username": target.username, "password": target.password, "ssl": target.tls}
        if target.kind == "cluster":
            nodes = [self.node(h, p) for h, p in target.nodes]
            return self.cluster(startup_nodes=nodes, **auth, **options), []
        # The sentinels are asked without the credentials, which are the master's.
        sentinel = self.sentinel(list(target.nodes), db=target.db, **auth, **options)
        return sentinel.master_for(target.master), list(sentinel.sentinels)


def target_of(url: str | None) -> Target:
    """The URL given, else ``REDIS_URL``, else the local default."""
    return parse_url(url if url is not None else os.environ.get("REDIS_URL", DEFAULT_URL))


def _seconds(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise InvalidArgument(f"{name} must be a number of seconds, 0 or more, not {value!r}.")
    return float(value)


def _payload_limit(max_payload_bytes: Any) -> int:
    if isinstance(max_payload_bytes, bool) or not isinstance(max_payload_bytes, int) or max_payload_bytes < 1:
        raise InvalidArgument(
            f"max_payload_bytes must be the workers' --max-payload-bytes, a whole number, not {max_payload_bytes!r}."
        )
    return max_payload_bytes


class Base:
    """A queue on a Redis: the key names, the payload limit and the plans of every call.

    ``closes``: redis-py clients closed with this one (made by :meth:`from_url`: a Sentinel's
    connections to its sentinels)."""

    flavour: Flavour

    def __init__(
        self,
        redis: Any,
        queue: str = "default",
        *,
        max_payload_bytes: int = E.DEFAULT_MAX_PAYLOAD_BYTES,
        target: Target | None = None,
        closes: Iterable[Any] = (),
    ) -> None:
        self.keys = Keys(queue)
        self.max_payload_bytes = _payload_limit(max_payload_bytes)
        self.redis = redis
        self._closes = list(closes)
        self._target = target or Target("single", "", "the Redis client given")
        self._script = plans.replay_script()

    @classmethod
    def from_url(
        cls: type[B],
        url: str | None = None,
        queue: str = "default",
        *,
        max_payload_bytes: int = E.DEFAULT_MAX_PAYLOAD_BYTES,
        **redis_options: Any,
    ) -> B:
        """A client of ``queue`` on the Redis ``url`` names, as the llmq binaries take it
        (default: ``REDIS_URL``, else redis://127.0.0.1:6379). ``max_payload_bytes``: the
        workers' --max-payload-bytes; ``redis_options`` go to redis-py. A single Redis and a
        Sentinel's master are connected to on the first call, a cluster's seeds at once."""
        target = target_of(url)
        Keys(queue)  # an InvalidQueue before any connection is made
        _payload_limit(max_payload_bytes)
        try:
            client, closes = cls.flavour.connect(target, redis_options)
        except REDIS_ERRORS as e:
            raise failure(target, e) from e
        return cls(client, queue, max_payload_bytes=max_payload_bytes, target=target, closes=closes)

    @property
    def queue(self) -> str:
        return self.keys.queue

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._target.shown!r}, queue={self.queue!r})"

    def _enqueue(self, prompt: str | None, fields: Mapping[str, Any]) -> plans.Plan[list[str]]:
        task = dict(fields) if prompt is None else {**fields, "prompt": prompt}
        task_id, env = E.build(task)
        return plans.enqueue(self.keys, [(task_id, E.encode(env, self.max_payload_bytes))], batch=False)

    def _enqueue_many(self, tasks: Iterable[Mapping[str, Any]]) -> plans.Plan[list[str]]:
        return plans.enqueue(self.keys, E.build_batch(tasks, self.max_payload_bytes))

    def _result(self, task_id: str) -> plans.Plan[TaskRecord | None]:
        return plans.result(self.keys, task_id)

    def _wait(self, task_ids: Iterable[str], timeout: float, poll: float) -> plans.Plan[list[TaskRecord]]:
        return plans.wait(self.keys, list(task_ids), _seconds("timeout", timeout), _seconds("poll", poll))

    def _follow(self, task_id: str, timeout: float) -> plans.Plan[None]:
        return plans.follow(self.keys, task_id, _seconds("timeout", timeout))

    def _submit_chain(
        self, spec: Mapping[str, Any], variables: Mapping[str, str] | None
    ) -> plans.Plan[ChainHandle]:
        chain_id, text = chains.build(spec, variables, self.max_payload_bytes, self.keys.queue)
        return plans.submit_chain(self.keys, chain_id, text)

    def _follow_chain(self, chain: ChainHandle | str, timeout: float, poll: float) -> plans.Plan[ChainEnd]:
        return plans.follow_chain(self.keys, chain, _seconds("timeout", timeout), _seconds("poll", poll))

    def _dead_letters(self, limit: int, before: str | None) -> plans.Plan[list[DeadLetter]]:
        return plans.dead_letters(self.keys, limit, before)

    def _replay(self, dead: DeadLetter | str, provider: str | None) -> plans.Plan[str]:
        return plans.replay(self.keys, dead, provider, self._script)

    def _cancel(
        self, task_ids: Iterable[str], batch: str | None, tenant: str | None
    ) -> plans.Plan[dict[str, str]]:
        return plans.cancel(self.keys, task_ids, batch, tenant)
