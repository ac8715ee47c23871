"""What the library reads back: result records, dead letters, live answers and chain steps,
and the Redis replies they come in (bytes or text, RESP2 or RESP3 shapes)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from . import wirejson
from .errors import InvalidRecord
from .keys import derive_id, parse_uuid

#: The statuses after which nothing happens to a task without an operator.
FINAL = ("succeeded", "failed", "dead", "cancelled")
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
    #: True: the output limit (``max_tokens``) cut the answer short.
    truncated: bool = False
    #: True: answered from the answer cache, without a call (``cost_usd`` 0).
    cached: bool = False
    #: For a cached answer, the task whose call gave it.
    cached_from: str | None = None
    #: For a copy of a task with the same ``idempotency_key``: that task, whose answer (output,
    #: json, tool_calls, provider, model) this is, without a call (``cost_usd`` 0).
    duplicate_of: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def parse(cls, raw: Any, task_id: str | None = None) -> TaskRecord | None:
        """The record stored as ``raw`` (None for no value); :class:`InvalidRecord` for a
        value that is not a record llmq writes (``task_id`` names the task in its message)."""
        if raw is None:
            return None
        what = f"the result record of task {task_id}" if task_id else "a result record"
        fix = "llmq's workers did not write it: delete the key, or replay or enqueue the task again"
        try:
            data = wirejson.loads(text(raw))
        except ValueError as e:
            raise InvalidRecord(f"{what} is not JSON ({brief(e)}); {fix}.") from None
        if not isinstance(data, dict):
            raise InvalidRecord(f"{what} is JSON {_kind(data)}, not an object; {fix}.")
        for name in ("task_id", "queue", "status"):
            if not isinstance(data.get(name), str):
                raise InvalidRecord(f"{what} has no `{name}` text; {fix}.")
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
        """The payload as a JSON object, when the worker reads it as one (else None)."""
        try:
            value = wirejson.loads(self.task)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    @property
    def chain_step(self) -> tuple[str, str] | None:
        """(chain id, step) when the payload names both, as the binaries read it
        (``chain_step_of`` in shared/src/envelope.rs): a chain step's letter."""
        return chain_step_of(self.task)


def chain_step_of(task: str) -> tuple[str, str] | None:
    """The chain and step a payload names, as serde reads ``struct {chain_id: Option<String>,
    step: Option<String>}`` from it: an object with both as text (each at most once), or an
    array of exactly those two texts; else None."""
    try:
        value = wirejson.loads(task, object_pairs_hook=wirejson.Object)
    except ValueError:
        return None
    if isinstance(value, wirejson.Object):
        if value.repeated & {"chain_id", "step"}:
            return None
        pair = (value.get("chain_id"), value.get("step"))
    elif isinstance(value, list) and len(value) == 2:
        pair = (value[0], value[1])
    else:
        return None
    chain_id, step = pair
    return (chain_id, step) if isinstance(chain_id, str) and isinstance(step, str) else None


def task_id_of(queue: str, entry_id: str, task: str) -> str:
    """The task id of a payload, even one that is not a valid envelope, as the worker finds it
    (``task_id_of`` in shared/src/envelope.rs): its ``id`` if that is a UUID, else the id
    derived from where the task sat in the stream."""
    try:
        payload = wirejson.loads(task)
    except ValueError:
        payload = None
    named = payload.get("id") if isinstance(payload, dict) else None
    parsed = parse_uuid(named) if isinstance(named, str) else None
    return str(parsed) if parsed else derive_id(queue, entry_id)


_RUST_UNSIGNED = re.compile(r"\+?[0-9]+")
_RUST_SIGNED = re.compile(r"[+-]?[0-9]+")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def rust_u64(value: str) -> int | None:
    """``value.parse::<u64>()``: ASCII digits with an optional +, within 64 bits."""
    n = int(value) if _RUST_UNSIGNED.fullmatch(value) else -1
    return n if 0 <= n < 2**64 else None


def millis_time(value: str) -> datetime | None:
    """A time in milliseconds since 1970 as the binaries read ``failed_at`` (an i64), None for
    anything else or for a time a Python datetime cannot hold (before year 1, after 9999)."""
    n = int(value) if _RUST_SIGNED.fullmatch(value) else None
    if n is None or not -(2**63) <= n < 2**63:
        return None
    try:
        return _EPOCH + timedelta(milliseconds=n)
    except OverflowError:
        return None


def dead_letter(queue: str, entry: tuple[str, dict[str, str]]) -> DeadLetter:
    """A dead letter from its stream entry, read as the binaries read it (``dead_letter`` in
    shared/src/queue/reply.rs): whatever its fields hold, never an error; a field that does
    not parse reads as the binaries read it (0, None)."""
    dead_id, f = entry
    task = f.get("task", "")
    return DeadLetter(
        id=dead_id,
        task_id=task_id_of(queue, f.get("entry_id", ""), task),
        queue=queue,
        error=f.get("error", ""),
        error_class=f.get("class", ""),
        attempts=rust_u64(f.get("attempts", "")) or 0,
        failed_at=millis_time(f.get("failed_at", "")),
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
    def ended(self) -> bool:
        """Whether the step has ended (``succeeded``, ``failed`` or ``cancelled``) in this
        round; before, ``blocked`` (waiting for its parents) or ``queued`` (its task waits or
        runs: follow its live answer at ``task_id``)."""
        return self.status in STEP_ENDED

    @property
    def output(self) -> str | None:
        """The step's whole output: its task's (or, for a step that calls no model, its
        summary)."""
        if self.record is not None and self.record.output is not None:
            return self.record.output
        return self.summary if self.status == "succeeded" else None


def brief(e: BaseException) -> str:
    """An error's message on one line, without a closing full stop."""
    return " ".join(str(e).split()).rstrip(".")[:200] or type(e).__name__


def _kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def chain_json(raw: Any, chain_id: str, what: str) -> dict[str, Any]:
    """A chain's ``spec`` or one step's state as the JSON object llmq writes;
    :class:`InvalidRecord` for anything else."""
    try:
        value = wirejson.loads(text(raw))
    except ValueError as e:
        value, problem = None, f"is not JSON ({brief(e)})"
    else:
        problem = "" if isinstance(value, dict) else f"is JSON {_kind(value)}, not an object"
    if problem:
        raise InvalidRecord(
            f"{what} of chain {chain_id} {problem}; llmq's workers did not write it, so look at the "
            f"chain with `llmq chain show {chain_id}`."
        )
    assert isinstance(value, dict)
    return value


def _opt_text(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def step_state(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A step's state with every field this library reads of the type llmq writes: text,
    a whole number or a number (a field of another type reads as left out)."""
    number = raw.get("cost_usd")
    rnd = raw.get("round")
    return {
        **raw,
        "status": raw["status"] if isinstance(raw.get("status"), str) else "",
        "round": rnd if isinstance(rnd, int) and not isinstance(rnd, bool) else 0,
        "task_id": raw["task_id"] if isinstance(raw.get("task_id"), str) else "",
        "provider": _opt_text(raw.get("provider")),
        "model": _opt_text(raw.get("model")),
        "error": _opt_text(raw.get("error")),
        "summary": _opt_text(raw.get("summary")),
        "cost_usd": float(number)
        if isinstance(number, (int, float)) and not isinstance(number, bool)
        else 0.0,
    }


def step(name: str, state: Mapping[str, Any], record: TaskRecord | None) -> Step:
    """A step from its state (as :func:`step_state` made it) and its task's record."""
    return Step(
        name=name,
        status=state["status"],
        round=state["round"],
        task_id=state["task_id"],
        provider=state["provider"],
        model=state["model"],
        error=state["error"],
        summary=state["summary"],
        cost_usd=state["cost_usd"],
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
