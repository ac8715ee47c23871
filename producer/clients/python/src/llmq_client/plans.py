"""What each client call does, written once and free of I/O.

A plan is a generator that yields operations (a Redis command, a pipeline of commands, a
pause, a value for the caller) and is sent back each operation's result. :class:`Client`
carries them out with redis-py, :class:`AsyncClient` with redis.asyncio; neither holds any
logic of its own beyond that.
"""

from __future__ import annotations

import re
import time
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

from . import wirejson
from .envelope import _BATCH_ID, MAX_TENANT_BYTES, replayed_task
from .errors import ChainRefused, InvalidArgument, LlmqError, NotFound, ReplayRefused, WaitTimeout
from .keys import Keys, canonical_task_id, check_chain_id, has_control, parse_uuid, utf8
from .records import (
    STEP_ENDED,
    ChainEnd,
    ChainHandle,
    DeadLetter,
    TaskRecord,
    chain_json,
    dead_letter,
    entries,
    field_map,
    live_piece,
    read_entries,
    step,
    step_state,
    text,
)

T = TypeVar("T")


@dataclass(frozen=True)
class Command:
    """One Redis command; its reply is sent back."""

    args: tuple[Any, ...]


@dataclass(frozen=True)
class Pipeline:
    """Commands sent in one round trip (all keys of one queue: one cluster slot); the list
    of their replies is sent back. With ``keep_errors``, a command Redis answered with an
    error has that error (an :class:`LlmqError`) as its reply, the others their replies;
    else the first such error is raised. A round trip that fails as a whole (a lost
    connection) raises its error into the plan."""

    commands: tuple[tuple[Any, ...], ...]
    keep_errors: bool = False


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Emit:
    """A value for the caller of an iterating call (``follow``, ``follow_chain``)."""

    value: Any


Op = Command | Pipeline | Sleep | Emit
Plan = Generator[Op, Any, T]

#: Tasks per pipelined round trip, as ``llmq batch`` sends them.
PIPELINE_SIZE = 1000
#: The most dead letters one call lists (each may be as large as a task, 1 MiB by default).
MAX_DEAD_LETTERS = 1000
#: Dead letters per XREVRANGE.
DEAD_PAGE = 100
#: The longest blocking read of a live answer before the task's record is looked at.
BLOCK_MS = 1000
_STREAM_ID = re.compile(r"[0-9]+-[0-9]+")
#: The statuses of a task that has ended: a cancel leaves it as it was.
ENDED = ("succeeded", "failed", "dead", "cancelled")


def replay_script() -> str:
    """shared/src/queue/replay.lua, the script ``llmq dlq replay`` runs, as the package
    carries it."""
    return resources.files("llmq_client").joinpath("replay.lua").read_text(encoding="utf-8")


def _partly(error: LlmqError, total: int, enqueued: list[str], unknown: list[str]) -> LlmqError:
    """``error`` again (same class), saying what of a batch was written before it, with the
    ids as ``enqueued`` (written) and ``unknown`` (in the round trip that failed: written or
    not)."""
    told = f"{len(enqueued)} of the {total} tasks were enqueued (their ids are the error's .enqueued)"
    if unknown:
        told += f" and {len(unknown)} may or may not have been (.unknown: look for their records before enqueueing them again)"
    again = type(error)(f"{str(error).rstrip('.')}; {told}.")
    again.enqueued, again.unknown = tuple(enqueued), tuple(unknown)
    return again


def enqueue(keys: Keys, payloads: list[tuple[str, str]], batch: bool = True) -> Plan[list[str]]:
    """XADDs the ``task`` fields, pipelined; returns the task ids. When Redis fails partway
    through a ``batch``, the error carries the ids already enqueued (``.enqueued``) and those
    of the round trip that failed (``.unknown``)."""
    enqueued: list[str] = []
    for start in range(0, len(payloads), PIPELINE_SIZE):
        chunk = payloads[start : start + PIPELINE_SIZE]
        commands = tuple(("XADD", keys.stream, "*", "task", payload) for _, payload in chunk)
        try:
            replies = yield Pipeline(commands, keep_errors=True)
        except LlmqError as e:
            if not batch:
                raise
            raise _partly(e, len(payloads), enqueued, [task_id for task_id, _ in chunk]) from e
        failed: LlmqError | None = None
        for (task_id, _), reply in zip(chunk, replies, strict=True):
            if isinstance(reply, LlmqError):
                failed = failed or reply
            else:
                enqueued.append(task_id)
        if failed is not None:
            if not batch:
                raise failed
            raise _partly(failed, len(payloads), enqueued, []) from failed
    return [task_id for task_id, _ in payloads]


def result(keys: Keys, task_id: str) -> Plan[TaskRecord | None]:
    return TaskRecord.parse((yield Command(("GET", keys.result(task_id)))), canonical_task_id(task_id))


def _waiting(keys: Keys, task_id: str, record: TaskRecord | None) -> str:
    if record is None:
        return (
            f"task {task_id} has no result record yet (it is queued, running or waiting for its "
            f"run_at; is a worker serving queue `{keys.queue}`?)"
        )
    return f"task {task_id} is {record.status} ({record.error_class}: {record.error})"


def wait(keys: Keys, task_ids: Iterable[str], timeout: float, poll: float) -> Plan[list[TaskRecord]]:
    """Polls the tasks' records (docs/wire-format.md, "Waiting for a result") until every one
    is final; :class:`WaitTimeout` after ``timeout`` seconds."""
    ids = [canonical_task_id(t) for t in task_ids]
    deadline = time.monotonic() + timeout
    done: dict[str, TaskRecord] = {}
    last: dict[str, TaskRecord | None] = {}
    while True:
        pending = [t for t in ids if t not in done]
        if pending:
            replies = yield Command(("MGET", *[keys.result(t) for t in pending]))
            for task_id, raw in zip(pending, replies, strict=True):
                record = last[task_id] = TaskRecord.parse(raw, task_id)
                if record is not None and record.final:
                    done[task_id] = record
            pending = [t for t in ids if t not in done]
        if not pending:
            return [done[t] for t in ids]
        if time.monotonic() >= deadline:
            many = f"{len(pending)} of {len(ids)} tasks have" if len(ids) > 1 else "the task has"
            raise WaitTimeout(
                f"{many} no final status after {timeout:g}s: {_waiting(keys, pending[0], last.get(pending[0]))}; "
                "wait longer, or call wait() again later."
            )
        yield Sleep(_until(deadline, poll))


def _until(deadline: float, poll: float) -> float:
    """The pause before the next look: ``poll``, but never past ``deadline`` (monotonic)."""
    return max(0.0, min(poll, deadline - time.monotonic()))


def follow(keys: Keys, task_id: str, timeout: float) -> Plan[None]:
    """Emits the pieces of a task's live answer (``llmq:{q}:out:<id>``) as they are written,
    until it is done or the task has a final status."""
    out, res = keys.out(task_id), keys.result(task_id)
    deadline = time.monotonic() + timeout
    after, final = "0", False
    while True:
        left_ms = int((deadline - time.monotonic()) * 1000)
        block = () if final else ("BLOCK", max(1, min(BLOCK_MS, left_ms)))
        got = read_entries((yield Command(("XREAD", "COUNT", 1000, *block, "STREAMS", out, after))))
        for entry_id, fields in got:
            after = entry_id
            if fields.get("event") == "done":
                return None
            piece = live_piece(fields)
            if piece is not None:
                yield Emit(piece)
        if final:
            if not got:  # everything written before the record has been read
                return None
            continue
        record = TaskRecord.parse((yield Command(("GET", res))), canonical_task_id(task_id))
        final = record is not None and record.final
        if not final and time.monotonic() >= deadline:
            raise WaitTimeout(
                f"the live answer of task {task_id} did not end within {timeout:g}s: "
                f"{_waiting(keys, canonical_task_id(task_id), record)}; follow it again, or wait() for it."
            )


def submit_chain(keys: Keys, chain_id: str, spec: str) -> Plan[ChainHandle]:
    """One XADD with the spec in the ``chain`` field."""
    entry_id = yield Command(("XADD", keys.stream, "*", "chain", spec))
    return ChainHandle(chain_id, keys.queue, text(entry_id))


def _records(keys: Keys, task_ids: list[str]) -> Plan[dict[str, TaskRecord | None]]:
    ids = [t for t in task_ids if t]
    if not ids:
        return {}
    replies = yield Pipeline(tuple(("GET", keys.result(t)) for t in ids))
    return {t: TaskRecord.parse(raw, canonical_task_id(t)) for t, raw in zip(ids, replies, strict=True)}


def follow_chain(keys: Keys, chain: ChainHandle | str, timeout: float, poll: float) -> Plan[ChainEnd]:
    """Emits each step of a chain whenever its status changes (`blocked`, `queued`: its task
    is waiting or running, and its live answer can be followed; then how it ended; every round
    of a step that runs again), then the chain's end, which it returns. :class:`ChainRefused` when the worker refused the
    chain (known only for a :class:`ChainHandle`)."""
    chain_id = check_chain_id(chain.chain_id if isinstance(chain, ChainHandle) else chain)
    refusal = keys.result(chain.refusal_id) if isinstance(chain, ChainHandle) else None
    deadline = time.monotonic() + timeout
    seen: set[tuple[str, int, str]] = set()
    order: list[str] = []  # the steps as the spec lists them (parents, mostly, first)
    while True:
        reads = {
            "state": ("HGET", keys.chain(chain_id), "state"),
            "steps": ("HGETALL", keys.chain_steps(chain_id)),
        }
        if not order:
            reads["spec"] = ("HGET", keys.chain(chain_id), "spec")
        if refusal:
            reads["refusal"] = ("GET", refusal)
        got = dict(zip(reads, (yield Pipeline(tuple(reads.values()))), strict=True))
        state = text(got["state"]) if got["state"] is not None else None
        if got.get("spec") is not None:
            listed = chain_json(got["spec"], chain_id, "the spec").get("steps")
            order = (
                [str(s.get("name")) for s in listed if isinstance(s, dict)]
                if isinstance(listed, list)
                else []
            )
        steps = {
            name: step_state(chain_json(raw, chain_id, f"the state of step `{name}`"))
            for name, raw in sorted(field_map(got["steps"]).items(), key=lambda s: _place(order, s[0]))
        }
        refused = TaskRecord.parse(
            got.get("refusal"), chain.refusal_id if isinstance(chain, ChainHandle) else None
        )
        if state is None and refused is not None and refused.status == "dead":
            raise ChainRefused(
                f"the worker refused chain {chain_id} (dead letter of task {refused.task_id}): "
                f"{refused.error}; fix the chain and submit it again."
            )
        changed = [name for name, s in steps.items() if (name, s["round"], s["status"]) not in seen]
        finished = state not in (None, "running")
        wanted = list(steps) if finished else changed
        ids = [steps[n]["task_id"] for n in wanted if steps[n]["status"] in STEP_ENDED]
        records = yield from _records(keys, [t for t in ids if parse_uuid(t) is not None])
        made = {n: step(n, steps[n], records.get(steps[n]["task_id"])) for n in wanted}
        for name in changed:
            seen.add((name, steps[name]["round"], steps[name]["status"]))
            yield Emit(made[name])
        if finished:
            assert state is not None
            end = ChainEnd(chain_id, state, made)
            yield Emit(end)
            return end
        if time.monotonic() >= deadline:
            states = ", ".join(f"{n} {s.get('status')}" for n, s in steps.items()) or "not expanded yet"
            raise WaitTimeout(
                f"chain {chain_id} did not end within {timeout:g}s (its steps: {states}); "
                "follow it again later, or look with `llmq chain show`."
            )
        yield Sleep(_until(deadline, poll))


def _place(order: list[str], name: str) -> tuple[int, str]:
    return (order.index(name) if name in order else len(order), name)


def dead_letters(keys: Keys, limit: int, before: str | None = None) -> Plan[list[DeadLetter]]:
    """The newest ``limit`` dead letters (at most :data:`MAX_DEAD_LETTERS`), newest first,
    read :data:`DEAD_PAGE` at a time; with ``before`` (a dead-entry id), those older than it."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_DEAD_LETTERS:
        raise InvalidArgument(
            f"limit must be a whole number from 1 to {MAX_DEAD_LETTERS}, not {limit!r}; for older letters, "
            "call dead_letters again with before= the id of the last letter listed."
        )
    if before is not None and not (isinstance(before, str) and _STREAM_ID.fullmatch(before)):
        raise InvalidArgument(f"before must be a dead letter's id, such as 1700000000000-0, not {before!r}.")
    end = "+" if before is None else f"({before}"
    out: list[DeadLetter] = []
    while len(out) < limit:
        count = min(DEAD_PAGE, limit - len(out))
        page = entries((yield Command(("XREVRANGE", keys.dead, end, "-", "COUNT", count))))
        out.extend(dead_letter(keys.queue, e) for e in page)
        if len(page) < count:
            break
        end = f"({page[-1][0]}"
    return out


def find_dead(keys: Keys, ident: str) -> Plan[DeadLetter]:
    """The dead letter with dead-entry id or task id ``ident``, as ``llmq dlq replay`` finds it."""
    if isinstance(ident, str) and _STREAM_ID.fullmatch(ident):
        found = entries((yield Command(("XRANGE", keys.dead, ident, ident))))
        if found:
            return dead_letter(keys.queue, found[0])
    else:
        task_id = canonical_task_id(ident)
        end = "+"
        while True:
            page = entries((yield Command(("XREVRANGE", keys.dead, end, "-", "COUNT", DEAD_PAGE))))
            for entry in page:
                letter = dead_letter(keys.queue, entry)
                if letter.task_id == task_id:
                    return letter
            if len(page) < DEAD_PAGE:
                break
            end = f"({page[-1][0]}"
    raise NotFound(
        f"no dead letter {ident} in queue `{keys.queue}`; it may have been replayed, purged or "
        "archived (list them with dead_letters(), or `llmq dlq list --archived`)."
    )


def replay(keys: Keys, dead: DeadLetter | str, provider: str | None, script: str) -> Plan[str]:
    """Replays a plain task's dead letter as ``llmq dlq replay`` does: the envelope reset by
    :func:`replayed_task`, then replay.lua re-enqueues it, deletes the letter and the task's
    record in one step. Returns the task id."""
    if provider is not None and (
        not isinstance(provider, str) or not provider.strip() or "\0" in provider or not utf8(provider)
    ):
        raise InvalidArgument(
            f"provider must be a provider's name from the workers' provider file, not {provider!r}."
        )
    if isinstance(dead, DeadLetter):
        if dead.queue != keys.queue:
            raise NotFound(
                f"dead letter {dead.id} is of queue `{dead.queue}`, not `{keys.queue}`; "
                "replay it with a client of its queue."
            )
        letter = dead
    else:
        letter = yield from find_dead(keys, dead)
    chain_step = letter.chain_step
    if chain_step is not None:
        chain_id, name = chain_step
        raise ReplayRefused(
            f"dead letter {letter.id} is step `{name}` of chain {chain_id}, and resuming a chain is the "
            f"llmq binaries' job: run `llmq dlq replay {letter.id} --queue {keys.queue}` or "
            f"`llmq chain retry {chain_id} --from {name} --queue {keys.queue}`."
        )
    task = replayed_task(letter.task, letter.task_id, provider)
    args = (keys.dead, keys.stream, keys.result(letter.task_id), letter.id, task)
    done = yield Command(("EVAL", script, 3, *args))
    if int(done) != 1:
        raise NotFound(
            f"dead letter {letter.id} is no longer in queue `{keys.queue}`: it was replayed or purged meanwhile."
        )
    return letter.task_id


def _cancel_marks(task_ids: Iterable[object], batch: object, tenant: object) -> tuple[list[str], list[str]]:
    """The canonical ids of the tasks named (each once, in order) and the marks of the batch
    and the tenant named; :class:`InvalidId` or :class:`InvalidArgument` for what names
    nothing a task could carry."""
    ids = list(dict.fromkeys(canonical_task_id(t) for t in task_ids))
    others: list[str] = []
    if batch is not None:
        if not (isinstance(batch, str) and _BATCH_ID.fullmatch(batch)):
            raise InvalidArgument(
                f"batch must be the batch_id its tasks were enqueued with: 1 to 128 letters, digits, "
                f"`-`, `_`, `.` or `:`, not {batch!r}."
            )
        others.append(f"batch:{batch}")
    if tenant is not None:
        if not isinstance(tenant, str):
            raise InvalidArgument(
                f"tenant must be the tenant its tasks were enqueued with, a string, not {tenant!r}."
            )
        if not utf8(tenant):
            raise InvalidArgument(
                "tenant holds a lone surrogate, which no task's tenant has; give the tenant in UTF-8."
            )
        size = len(tenant.encode("utf-8"))
        if size == 0:
            raise InvalidArgument("tenant is empty; give the tenant whose tasks to cancel, or leave it out.")
        if size > MAX_TENANT_BYTES:
            raise InvalidArgument(
                f"tenant is {size} bytes long, and no task's tenant is longer than {MAX_TENANT_BYTES}; "
                "give the tenant its tasks were enqueued with."
            )
        if has_control(tenant):
            raise InvalidArgument(
                "tenant contains a control character (a newline, tab or NUL), which no task's tenant has; "
                "give the tenant its tasks were enqueued with."
            )
        others.append(f"tenant:{tenant}")
    if not ids and not others:
        raise InvalidArgument("cancel names nothing to cancel: give task ids, batch= or tenant=.")
    return ids, others


def _ended(raw: Any) -> str | None:
    """The status of a task whose result record says it has ended, else None (no record, one
    still ``delayed``, or one llmq did not write: the mark is set, as ``llmq cancel`` sets it)."""
    if raw is None:
        return None
    try:
        record = wirejson.loads(text(raw))
    except ValueError:
        return None
    status = record.get("status") if isinstance(record, dict) else None
    return status if isinstance(status, str) and status in ENDED else None


def cancel(keys: Keys, task_ids: Iterable[object], batch: object, tenant: object) -> Plan[dict[str, str]]:
    """Sets the cancel marks of the tasks, the batch and the tenant named (docs/wire-format.md,
    "Cancelling"): one MGET of the tasks' records, then one ``ZADD GT`` of every mark, each
    scored now (this machine's clock, in ms). A task whose record says it has ended gets no
    mark. Returns, for each ``task:<id>``, ``batch:<id>`` and ``tenant:<name>`` named,
    ``cancelled`` (its mark is set) or the status the task had ended with."""
    ids, others = _cancel_marks(task_ids, batch, tenant)
    named = [f"task:{t}" for t in ids] + others
    ended: dict[str, str] = {}
    if ids:
        replies = yield Command(("MGET", *[keys.result(t) for t in ids]))
        for task_id, raw in zip(ids, replies, strict=True):
            status = _ended(raw)
            if status is not None:
                ended[f"task:{task_id}"] = status
    marks = [m for m in named if m not in ended]
    if marks:
        now = time.time_ns() // 1_000_000
        yield Command(("ZADD", keys.cancels, "GT", *[x for m in marks for x in (now, m)]))
    return {m: ended.get(m, "cancelled") for m in named}
