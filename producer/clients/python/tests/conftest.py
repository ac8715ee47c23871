"""What the tests share. tests/tests/e2e/client_python.rs runs them against real workers and
sets, besides REDIS_URL:

- LLMQ_QUEUE: a queue a worker serves on REDIS_URL, on LLMQ_CLUSTER_URL and on
  LLMQ_SENTINEL_URL (each a worker of its own, all with the mock provider file);
- LLMQ_REPLAY_CLI_QUEUE and LLMQ_REPLAY_PY_QUEUE: two queues no worker serves, holding the
  same dead letters; `llmq dlq replay --all --platform mock` has replayed the first;
- LLMQ_TLS_URL and LLMQ_TLS_CA: a Redis on a TLS port only (no worker), and the CA that
  signed its certificate;
- LLMQ_REPO: the repository, for the schemas and the canonical replay.lua.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmq_client import Client

REPO = Path(os.environ.get("LLMQ_REPO") or Path(__file__).resolve().parents[4])


def env(name: str) -> str:
    """A variable the Rust driver sets; a test run without it fails saying how to run it."""
    value = os.environ.get(name)
    if not value:
        pytest.fail(
            f"{name} is not set: run these tests through "
            "`cargo test -p llmq-tests --test e2e client_python`, which starts the workers"
        )
    return value


def unique(text: str) -> str:
    """``text`` made unique (the mock answers with the first 60 characters of a prompt)."""
    return f"{text} {uuid.uuid4().hex[:8]}"


def answer(prompt: str, model: str = "mock-fast") -> str:
    return f"mock answer from {model}: {prompt}"


def assert_sentence(error: BaseException, *says: str) -> None:
    """The error's message is one sentence (one line, several words, a full stop) saying each
    of ``says``."""
    text = str(error)
    assert "\n" not in text and text.endswith(".") and len(text.split()) >= 5, repr(text)
    for part in says:
        assert part in text, f"{part!r} not in {text!r}"


@pytest.fixture
def queue() -> str:
    return env("LLMQ_QUEUE")


@pytest.fixture
def client(queue: str) -> Iterator[Client]:
    with Client.from_url(env("REDIS_URL"), queue) as c:
        yield c


@pytest.fixture
def idle(queue: str) -> Iterator[Client]:
    """A client of a queue no worker serves (its keys deleted afterwards)."""
    with Client.from_url(env("REDIS_URL"), f"{queue}-idle-{uuid.uuid4().hex[:6]}") as c:
        yield c
        keys = c.redis.keys(f"{c.keys.prefix}:*")
        if keys:
            c.redis.delete(*keys)
