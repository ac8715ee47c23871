"""What the library reads back: result records, dead letters, live answers and chain steps,
and the Redis replies they come in (bytes or text, RESP2 or RESP3 shapes)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .keys import derive_id, parse_uuid

#: The statuses after which nothing happens to a task without an operator.
FINAL = ("succeeded", "failed", "dead")
#: The statuses in which a chain step has ended (for its current round).
STEP_ENDED = ("succeeded", "failed", "cancelled")


def text(v: Any) -> str:
    """A reply value as text (invalid UTF-8 replaced, as the worker does)."""
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).decode("utf-8", "replace")
    return "" if v is None else str(v)


def field_map(raw: Any) -> dict[str, str]:
    """A stream entry's or hash's fields, from a mapping or a flat list."""
    if isinstance(raw, Mapping):
        return {text(k): text(v) for k, v in raw.items()}
    items = list(raw or [])
    return {text(k): text(v) for k, v in zip(items[::2], items[1::2], strict=False)}


def entries(reply: Any) -> list[tuple[str, dict[str, str]]]:
    """The entries of an XRANGE / XREVRANGE reply: (id, fields)."""
    return [(text(e[0]), field_map(e[1])) for e in reply or [] if e]


def read_entries(reply: Any) -> list[tuple[str, dict[str, str]]]:
    """The entries of an XREAD reply for one stream."""
    if not reply:
        return []
    streams = reply.values() if isinstance(reply, Mapping) else [s[1] for s in reply]
    out: list[tuple[str, dict[str, str]]] = []
    for s in streams:
        # RESP3 parsers wrap a stream's entries in one more list.
        if s and isinstance(s[0], list) and s[0] and isinstance(s[0][0], (list, tuple)):
            s = s[0]
        out.extend(entries(s))
    return out


@dataclass(frozen=True)
class TaskRecord:
    """A task's result record (docs/wire-format.md, "The result record"): its fields, and
    ``raw``, the whole JSON object, for fields added later."""

    task_id: str
    queue: str
    status: str
    provider: str | None = None
    model: str | None = None
    output: str | None = None
    error: str | None = None
    error_class: str | None = None
    attempts: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float = 0.0
    duration_ms: int = 0
    task_type: str | None = None
    chain_id: str | None = None
    finished_at: str | None = None
    route: str | None = None
    provider_errors: list[str] = field(default_factory=list)
    learned: dict[str, Any] | None = None
    #: The answer parsed as JSON, for a task with ``response_format``.
    json: Any = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def parse(cls, raw: Any) -> TaskRecord | None:
        """The record stored as ``raw`` (None for no value)."""
        if raw is None:
            return None
        data = json.loads(text(raw))
        names = {f.name for f in dataclasses.fields(cls)} - {"raw"}
        return cls(**{k: v for k, v in data.items() if k in names}, raw=data)

    @property
    def final(self) -> bool:
        """Nothing more happens to the task without an operator."""
        return self.status in FINAL

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"


@dataclass(frozen=True)
class DeadLetter:
    """One entry of ``llmq:{q}:dead`` (docs/wire-format.md, "Dead letters")."""

    #: The dead-entry id (what ``llmq dlq replay`` takes, as well as the task id).
    id: str
    task_id: str
    queue: str
    error: str
    #: The error class (the entry's ``class`` field).
    error_class: str
    attempts: int
    failed_at: datetime | None
    #: The id the task had in the ready stream.
    entry_id: str
    #: The envelope as it was when the task died (for a refused one, the payload as it came).
    task: str

    @property
    def envelope(self) -> dict[str, Any] | None:
        try:
            value = json.loads(self.task)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    @property
    def chain_step(self) -> tuple[str, str] | None:
        """(chain id, step) when the payload names both: a chain step's letter."""
        env = self.envelope or {}
        chain_id, step = env.get("chain_id"), env.get("step")
        return (chain_id, step) if isinstance(chain_id, str) and isinstance(step, str) else None


def dead_letter(queue: str, entry: tuple[str, dict[str, str]]) -> DeadLetter:
    """A dead letter from its stream entry, its task id found as the worker finds it."""
    dead_id, f = entry
    task = f.get("task", "")
    try:
        payload = json.loads(task)
    except ValueError:
        payload = None
    named = payload.get("id") if isinstance(payload, dict) else None
    parsed = parse_uuid(named) if isinstance(named, str) else None
    failed_at = f.get("failed_at", "")
    return DeadLetter(
        id=dead_id,
        task_id=str(parsed) if parsed else derive_id(queue, f.get("entry_id", "")),
        queue=queue,
        error=f.get("error", ""),
        error_class=f.get("class", ""),
        attempts=int(f["attempts"]) if f.get("attempts", "").isdigit() else 0,
        failed_at=(
            datetime.fromtimestamp(int(failed_at) / 1000, timezone.utc)
            if failed_at.lstrip("-").isdigit()
            else None
        ),
        entry_id=f.get("entry_id", ""),
        task=task,
    )


@dataclass(frozen=True)
class Text:
    """The next piece of a live answer."""

    text: str


@dataclass(frozen=True)
class Restart:
    """The call failed after part of its answer: what was written so far is void; the
    retry's whole answer follows (or the task ends, as its record says)."""

    error: str


def live_piece(fields: dict[str, str]) -> Text | Restart | None:
    """One entry of ``llmq:{q}:out:<id>``; None for ``done`` (and for unknown events)."""
    event = fields.get("event")
    if event is None:
        return Text(fields["text"]) if "text" in fields else None
    if event == "restart":
        return Restart(fields.get("error", ""))
    return None


@dataclass(frozen=True)
class Step:
    """A chain step as its chain records it, with its task's record when it has one."""

    name: str
    status: str
    round: int
    task_id: str
    provider: str | None
    model: str | None
    error: str | None
    #: At most 500 characters of its output.
    summary: str | None
    cost_usd: float
    record: TaskRecord | None

    @property
    def output(self) -> str | None:
        """The step's whole output: its task's (or, for a step that calls no model, its
        summary)."""
        if self.record is not None and self.record.output is not None:
            return self.record.output
        return self.summary if self.status == "succeeded" else None


def step(name: str, state: Mapping[str, Any], record: TaskRecord | None) -> Step:
    return Step(
        name=name,
        status=str(state.get("status", "")),
        round=int(state.get("round") or 0),
        task_id=str(state.get("task_id") or ""),
        provider=state.get("provider"),
        model=state.get("model"),
        error=state.get("error"),
        summary=state.get("summary"),
        cost_usd=float(state.get("cost_usd") or 0.0),
        record=record,
    )


@dataclass(frozen=True)
class ChainEnd:
    """A chain's end: its state (``succeeded``, ``failed`` or ``cancelled``) and its steps."""

    chain_id: str
    state: str
    steps: dict[str, Step]


@dataclass(frozen=True)
class ChainHandle:
    """A submitted chain: its id, and the stream entry that carried it (a chain the worker
    refuses becomes a dead letter under the id derived from that entry)."""

    chain_id: str
    queue: str
    entry_id: str

    @property
    def refusal_id(self) -> str:
        return derive_id(self.queue, self.entry_id)

    def __str__(self) -> str:
        return self.chain_id
