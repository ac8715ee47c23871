"""llmq_client: enqueue LLM tasks and chains into llmq, wait for their results, follow live
answers, cancel tasks, list and replay dead letters. The wire format is docs/wire-format.md.

    from llmq_client import Client

    with Client.from_url("redis://127.0.0.1:6379", queue="default") as llmq:
        task_id = llmq.enqueue("Summarise this report: ...", model="gpt-4o-mini")
        print(llmq.wait(task_id).output)

:class:`AsyncClient` has the same calls for asyncio.
"""

from .aio import AsyncClient
from .chain import CHAIN_FIELDS, STEP_FIELDS, STEP_TASK_FIELDS
from .client import Client
from .envelope import PRODUCER_FIELDS, WORKER_FIELDS, CacheAsk, Task, TaskFields
from .errors import (
    BadRedisUrl,
    ChainRefused,
    InvalidArgument,
    InvalidChain,
    InvalidId,
    InvalidQueue,
    InvalidRecord,
    InvalidTask,
    LlmqError,
    NotFound,
    RedisFailed,
    RedisUnavailable,
    ReplayRefused,
    WaitTimeout,
)
from .records import ChainEnd, ChainHandle, DeadLetter, Restart, Step, TaskRecord, Text

__all__ = [
    "CHAIN_FIELDS",
    "PRODUCER_FIELDS",
    "STEP_FIELDS",
    "STEP_TASK_FIELDS",
    "WORKER_FIELDS",
    "AsyncClient",
    "BadRedisUrl",
    "CacheAsk",
    "ChainEnd",
    "ChainHandle",
    "ChainRefused",
    "Client",
    "DeadLetter",
    "InvalidArgument",
    "InvalidChain",
    "InvalidId",
    "InvalidQueue",
    "InvalidRecord",
    "InvalidTask",
    "LlmqError",
    "NotFound",
    "RedisFailed",
    "RedisUnavailable",
    "ReplayRefused",
    "Restart",
    "Step",
    "Task",
    "TaskFields",
    "TaskRecord",
    "Text",
    "WaitTimeout",
]
