"""The task envelope (docs/wire-format.md, "The envelope"; schema/envelope.schema.json):
building one from keyword fields, and checking it as the worker does (shared/src/envelope.rs
and shared/src/conversation.rs), so that a task this library writes is never a dead letter
for its shape. Also what a replay does to a dead letter's envelope.

Checks run in two passes, as the worker's: the *typed* pass (each field has the JSON type the
worker's deserializer wants) and the *semantic* pass (ranges, names, the conversation's
order). A replay needs only the first: an envelope that deserializes is reset and re-encoded,
anything else is replayed as it came.
"""

from __future__ import annotations

import json
import math
import re
import struct
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, Literal, TypedDict

from . import wirejson
from .errors import InvalidTask
from .keys import has_control, parse_uuid

VERSION = 1
DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024
TASK_TYPES = (
    "code_generation",
    "research",
    "data_analysis",
    "refactoring",
    "documentation",
    "code_review",
    "sql_db_work",
    "testing",
    "debugging",
    "planning",
)
RISKS = ("low", "medium", "high")
TIERS = ("fast", "standard", "advanced")
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
F32_MAX = 3.4028234663852886e38
MAX_TIMEOUT_SECS = 30 * 24 * 3600
MAX_PRIORITY = 9
MAX_TENANT_BYTES = 128
MAX_CONCURRENCY_KEY = 200
MAX_TOOLS = 128
MIN_DEADLINE_SECS = 24 * 3600
MAX_DEADLINE_SECS = 30 * 24 * 3600
MIN_CACHE_TTL_SECS = 1
MAX_CACHE_TTL_SECS = 30 * 24 * 3600
#: A temperature at or below this (2**-150) is 0 as the worker's 32-bit float holds it.
_F32_ROUNDS_TO_ZERO = 2.0**-150
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
NUL = "contains a NUL character (\\u0000), which cannot be stored or passed on; remove it"


class _CacheTtl(TypedDict):
    ttl: str | timedelta


class CacheAsk(_CacheTtl, total=False):
    """``cache`` as an object (docs/wire-format.md, "Answer cache"): ``ttl``, how long an
    answer is kept (1s to 30d: ``"24h"``, or a timedelta of whole seconds); ``sampled``,
    True to cache a sampled answer too (``temperature`` unset or above 0), which every
    identical request then gets."""

    sampled: bool


class TaskFields(TypedDict, total=False):
    """The fields of a task, by their Python names: ``task_id`` is the envelope's ``id`` and
    ``task_type`` its ``type``; every other name is the envelope's. This is the library's own
    list of the envelope fields a producer sets (tests compare it with the schema)."""

    task_id: str | uuid.UUID
    system: str
    messages: Sequence[Mapping[str, Any]]
    tools: Sequence[Mapping[str, Any]]
    tool_choice: str | Mapping[str, Any]
    response_format: Mapping[str, Any]
    stream: bool
    prompt_cache: bool
    #: The answer cache: ``{"ttl": "24h"}`` (see :class:`CacheAsk`), or False for none, not
    #: even the queue's.
    cache: Literal[False] | CacheAsk
    deadline: str | timedelta
    task_type: str
    provider: str
    model: str
    chain_id: str
    risk: str
    area: str
    timeout: int | timedelta
    max_attempts: int
    run_at: datetime | str
    #: Tasks with the same key (on one queue, for one tenant) run once: a copy is answered with
    #: the first one's answer (its record's ``duplicate_of``). Not empty.
    idempotency_key: str
    #: How long after the first task with the key succeeded its copies get its answer: 1s to
    #: 30d (``"1h"``, or a timedelta of whole seconds). Needs ``idempotency_key``.
    idempotency_window: str | timedelta
    #: The batch the task came in (``llmq batch``'s id), kept with it in the ledger so that
    #: ``llmq costs --batch <id>`` reports one batch: 1 to 128 letters, digits, ``-``, ``_``,
    #: ``.`` or ``:``.
    batch_id: str
    max_tokens: int
    temperature: float
    metadata: Any
    priority: int
    tenant: str
    #: What the task is for, as up to 8 ``name: value`` pairs (``{"team": "search"}``): the
    #: ledger keeps them with the task and its calls. Names: 1 to 64 letters, digits, ``_``,
    #: ``-`` or ``.``; values: 1 to 128 bytes without a control character.
    tags: dict[str, str]
    concurrency_key: str
    concurrency_limit: int
    fallback: bool
    traceparent: str
    enqueued_at: datetime | str
    min_tier: str


class Task(TaskFields, total=False):
    """One task of :meth:`Client.enqueue_many`: ``prompt`` and any of :class:`TaskFields`."""

    prompt: str


#: Python names that differ from the envelope's.
WIRE_NAMES = {"task_id": "id", "task_type": "type"}
#: The envelope fields a producer sets, by their envelope names.
PRODUCER_FIELDS: tuple[str, ...] = tuple(WIRE_NAMES.get(n, n) for n in Task.__annotations__)
#: The envelope fields workers (or a chain's expansion, or a replay) set, never a producer.
WORKER_FIELDS: tuple[str, ...] = ("attempts", "snoozes", "waiting_since", "replays", "last_error", "step")

# The JSON type of every field, as the worker's deserializer wants it: (kind, null allowed).
FIELD_KINDS: dict[str, tuple[Any, bool]] = {
    "v": ("u64", False),
    "id": ("uuid", True),
    "prompt": ("string", False),
    "system": ("string", True),
    "messages": ("messages", False),
    "tools": ("tools", False),
    "tool_choice": ("tool_choice", True),
    "response_format": ("response_format", True),
    "stream": ("bool", True),
    "prompt_cache": ("bool", True),
    "cache": ("cache", True),
    "deadline": ("string", True),
    "type": ("string", True),
    "provider": ("string", True),
    "model": ("string", True),
    "chain_id": ("string", True),
    "step": ("string", True),
    "min_tier": (TIERS, True),
    "risk": (RISKS, True),
    "area": ("string", True),
    "timeout": ("u64", True),
    "max_attempts": ("u32", True),
    "run_at": ("datetime", True),
    "idempotency_key": ("string", True),
    "idempotency_window": ("string", True),
    "batch_id": ("string", True),
    "priority": ("i64", True),
    "tenant": ("string", True),
    "tags": ("any", True),
    "max_tokens": ("u32", True),
    "temperature": ("number", True),
    "metadata": ("any", True),
    "enqueued_at": ("datetime", True),
    "concurrency_key": ("string", True),
    "concurrency_limit": ("u32", True),
    "fallback": ("bool", True),
    "traceparent": ("string", True),
    "attempts": ("u32", False),
    "snoozes": ("u32", False),
    "waiting_since": ("datetime", True),
    "replays": ("u32", False),
    "last_error": ("string", True),
}
assert set(FIELD_KINDS) == {"v", *PRODUCER_FIELDS, *WORKER_FIELDS}

#: Text fields in which the worker refuses a NUL character.
NUL_FREE = (
    "prompt", "system", "type", "provider", "model", "chain_id", "step", "area",
    "idempotency_key", "concurrency_key", "traceparent",
)  # fmt: skip

_RFC3339 = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})[Tt ]([0-9]{2}:[0-9]{2}:[0-9]{2})(?:\.([0-9]+))?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
_CALL_ID = re.compile(r"[A-Za-z0-9_-]{1,256}")
_BATCH_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_BASE64 = re.compile(r"[A-Za-z0-9+/=]+")
#: What Rust's ``char::is_whitespace`` takes (Unicode White_Space; Python's isspace differs).
RUST_WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
    "\u200a\u2028\u2029\u202f\u205f\u3000"
)
_UNIT_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\u00b5")
# humantime's units: (seconds, nanoseconds) of one, and how a fraction of one is counted:
# in nanoseconds (below an hour), in whole seconds (from an hour up), or not at all (ns).
_NS, _SECS, _NONE = "ns", "secs", "none"
_UNITS: dict[str, tuple[int, int, str]] = {
    **dict.fromkeys(("nanos", "nsec", "ns"), (0, 1, _NONE)),
    **dict.fromkeys(("usec", "us", "\u00b5s"), (0, 1000, _NS)),
    **dict.fromkeys(("millis", "msec", "ms"), (0, 1_000_000, _NS)),
    **dict.fromkeys(("seconds", "second", "secs", "sec", "s"), (1, 0, _NS)),
    **dict.fromkeys(("minutes", "minute", "min", "mins", "m"), (60, 0, _NS)),
    **dict.fromkeys(("hours", "hour", "hr", "hrs", "h"), (3600, 0, _SECS)),
    **dict.fromkeys(("days", "day", "d"), (86400, 0, _SECS)),
    **dict.fromkeys(("weeks", "week", "wk", "wks", "w"), (7 * 86400, 0, _SECS)),
    **dict.fromkeys(("months", "month", "M"), (2_630_016, 0, _SECS)),
    **dict.fromkeys(("years", "year", "yr", "yrs", "y"), (31_557_600, 0, _SECS)),
}
_TOO_LARGE = (
    "number is too large or cannot be represented without a lack of precision "
    "(values below 1ns are not supported)"
)


class Problem(Exception):
    """A field that is wrong, before it is worded for the caller."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"field `{field}` is wrong: {message}")
        self.field = field


def _show(value: Any, limit: int = 60) -> str:
    """A value as JSON, cut short: for messages (a value too deep to write, by its type)."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=repr)
    except (RecursionError, ValueError):
        return f"a {type(value).__name__} nested too deeply to show"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _blank(text: str) -> bool:
    return text.strip() == ""


class DurationError(ValueError):
    """Why humantime does not read a text as a duration, in its words."""


def _u64(n: int) -> int:
    if n > U64_MAX:
        raise DurationError(_TOO_LARGE)
    return n


def _exact(n: int, d: int) -> int:
    if n % d:
        raise DurationError(_TOO_LARGE)
    return n // d


def parse_duration(src: str) -> tuple[int, int]:
    """``humantime::parse_duration`` (2.x), which the worker reads ``deadline`` and a chain
    step's ``timeout`` with: (seconds, nanoseconds), or :class:`DurationError` in its words.
    Numbers may have fractions and spaces between their digits; units are ns, us, ms, s, m,
    h, d, w, M (months of 30.44 days), y (365.25 days) and their longer spellings."""
    if src == "0":
        return 0, 0
    pos, end = 0, len(src)

    def offset(at: int) -> int:  # a byte offset, as humantime counts
        return len(src[:at].encode("utf-8", "surrogatepass"))

    def first_digit() -> int | None:
        nonlocal pos
        at = pos
        while pos < end:
            c = src[pos]
            pos += 1
            if "0" <= c <= "9":
                return ord(c) - 48
            if c not in RUST_WHITESPACE:
                raise DurationError(f"expected number at {offset(at)}")
        return None

    secs = nanos = 0

    def add(s: int, ns: int) -> None:
        nonlocal secs, nanos
        total = _u64(nanos + ns)
        if total > 1_000_000_000:
            s = _u64(s + total // 1_000_000_000)
            total %= 1_000_000_000
        secs = _u64(secs + s)
        nanos = total
        if nanos == 1_000_000_000:  # Duration::new carries it
            secs, nanos = _u64(secs + 1), 0

    def unit(n: int, frac: tuple[int, int] | None, start: int, stop: int) -> None:
        name = src[start:stop]
        if name not in _UNITS:
            if not name:
                raise DurationError(f"time unit needed, for example {n}sec or {n}ms")
            raise DurationError(
                f'unknown time unit "{name}", supported units: ns, us/\u00b5s, ms, sec, min, hours, '
                "days, weeks, months, years (and few variations)"
            )
        s, ns, fraction = _UNITS[name]
        add(_u64(n * s), _u64(n * ns))
        if frac is not None:
            num, den = frac
            if fraction == _NONE:
                raise DurationError(_TOO_LARGE)
            if fraction == _NS:
                add(0, _exact(_u64(num * (s * 1_000_000_000 + ns)), den))
            else:
                add(_exact(_u64(num * s), den), 0)

    n = first_digit()
    if n is None:
        raise DurationError("value was empty")
    while True:
        frac: tuple[int, int] | None = None
        off = pos
        while pos < end:
            c = src[pos]
            pos += 1
            if "0" <= c <= "9":
                n = _u64(n * 10 + ord(c) - 48)
            elif c in RUST_WHITESPACE:
                pass
            elif c in _UNIT_LETTERS:
                break
            elif c == ".":
                num, den, zeros = 0, 1, True
                while pos < end:
                    c = src[pos]
                    pos += 1
                    if "0" <= c <= "9":
                        den = _u64(den * 10)
                        if c != "0" or not zeros:
                            zeros = zeros and c == "0"
                            num = _u64(num * 10 + ord(c) - 48)
                    elif c in RUST_WHITESPACE:
                        pass
                    elif c in _UNIT_LETTERS:
                        break
                    else:
                        raise DurationError(f"invalid character at {offset(off)}")
                    off = pos
                if den == 1:
                    raise DurationError(f"invalid character at {offset(off)}")
                frac = (num, den)
                break
            else:
                raise DurationError(f"invalid character at {offset(off)}")
            off = pos
        start, off = off, pos
        more = False
        while pos < end:
            c = src[pos]
            pos += 1
            if "0" <= c <= "9":
                unit(n, frac, start, off)
                n, more = ord(c) - 48, True
                break
            if c in RUST_WHITESPACE:
                break
            if c not in _UNIT_LETTERS:
                raise DurationError(f"invalid character at {offset(off)}")
            off = pos
        if more:
            continue
        unit(n, frac, start, off)
        following = first_digit()
        if following is None:
            return secs, nanos
        n = following


def duration_problem(text: str) -> str | None:
    """Why humantime refuses ``text`` as a duration, in its words, or None."""
    try:
        parse_duration(text)
    except DurationError as e:
        return str(e)
    return None


def excerpt(text: str, limit: int) -> str:
    """At most ``limit`` characters of ``text``, trimmed, with an ellipsis when cut (as
    ``text::excerpt`` in shared/src/text.rs)."""
    trimmed = text.strip("".join(RUST_WHITESPACE))
    return trimmed if len(trimmed) <= limit else trimmed[:limit] + "\u2026"


# ---------------------------------------------------------------------------------------
# The typed pass: each field's JSON type.


def _kind_problem(kind: Any, v: Any) -> str | None:
    """What is wrong with ``v`` as a value of ``kind``, or None."""
    if kind == "any":
        return None
    if kind == "string":
        return None if isinstance(v, str) else "must be a string"
    if kind == "bool":
        return None if isinstance(v, bool) else "must be true or false"
    if kind in ("u32", "u64", "i64"):
        lo, hi = {"u32": (0, U32_MAX), "u64": (0, U64_MAX), "i64": (I64_MIN, I64_MAX)}[kind]
        if _is_int(v) and lo <= v <= hi:
            return None
        return f"must be a whole number from {lo} to {hi}, not {_show(v)}"
    if kind == "number":
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return None
        return f"must be a finite number, not {_show(v)}"
    if kind == "datetime":
        if isinstance(v, str) and _utc(v) is not None:
            return None
        return f"must be an RFC 3339 time such as 2030-01-02T03:04:05Z, not {_show(v)}"
    if kind == "uuid":
        if isinstance(v, str) and parse_uuid(v) is not None:
            return None
        return f"must be a UUID such as 0b6f4c2e-8a57-4a43-9c3e-2f5d8e7a1b90, not {_show(v)}"
    if isinstance(kind, tuple):
        return None if v in kind else f"must be one of {', '.join(kind)}, not {_show(v)}"
    return {
        "messages": _messages_problem,
        "tools": _tools_problem,
        "tool_choice": _tool_choice_problem,
        "response_format": _response_format_problem,
        "cache": _cache_problem,
    }[kind](v)


def _days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (any year)."""
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _civil_from_days(z: int) -> tuple[int, int, int]:
    z += 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + (3 if mp < 10 else -9)
    return yoe + era * 400 + (m <= 2), m, d


def _month_days(y: int, m: int) -> int:
    if m == 2:
        return 29 if y % 4 == 0 and (y % 100 != 0 or y % 400 == 0) else 28
    return 30 if m in (4, 6, 9, 11) else 31


def _utc(text: str) -> str | None:
    """An RFC 3339 time in UTC as the worker writes it back (chrono: seconds, then 3, 6 or 9
    fraction digits as needed, then Z; a year outside 0 to 9999 with its sign), or None when
    it is not one. Computed by hand: a time near year 1 or 9999 moves to year 0 or 10000 in
    UTC, which chrono holds and Python's datetime does not."""
    m = _RFC3339.fullmatch(text)
    if m is None:
        return None
    date, clock, fraction, offset = m.groups()
    year, month, day = (int(x) for x in date.split("-"))
    hour, minute, second = (int(x) for x in clock.split(":"))
    if not (1 <= month <= 12 and 1 <= day <= _month_days(year, month)):
        return None
    if hour > 23 or minute > 59 or second > 59:
        return None
    shift = 0
    if offset not in ("Z", "z"):
        oh, om = int(offset[1:3]), int(offset[4:6])
        if oh > 23 or om > 59:
            return None
        shift = (oh * 60 + om) * 60 * (-1 if offset[0] == "-" else 1)
    total = _days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second - shift
    days, secs = divmod(total, 86400)
    y, mo, d = _civil_from_days(days)
    nanos = int(((fraction or "") + "000000000")[:9])
    digits = 0 if nanos == 0 else 3 if nanos % 1_000_000 == 0 else 6 if nanos % 1000 == 0 else 9
    frac = f".{nanos:09d}"[: digits + 1] if digits else ""
    shown = f"{y:04d}" if 0 <= y <= 9999 else f"{y:+05d}"
    return f"{shown}-{mo:02d}-{d:02d}T{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}{frac}Z"


def _keys_problem(obj: Mapping[str, Any], allowed: Iterable[str], required: Iterable[str]) -> str | None:
    allowed = tuple(allowed)
    unknown = [k for k in obj if k not in allowed]
    if unknown:
        return f"has an unknown field `{unknown[0]}`; use only {', '.join(allowed)}"
    missing = [k for k in required if k not in obj]
    if missing:
        return f"needs the field `{missing[0]}`"
    return None


def _opt(obj: Mapping[str, Any], key: str, kind: str) -> str | None:
    if obj.get(key) is None:
        return None
    problem = _kind_problem(kind, obj[key])
    return None if problem is None else f"`{key}` {problem}"


def _part_problem(p: Any) -> str | None:
    if not isinstance(p, Mapping):
        return 'must be an object: {"type": "text", "text": ...} or an image'
    if p.get("type") == "text":
        keys = _keys_problem(p, ("type", "text"), ("text",))
        return keys or (None if isinstance(p["text"], str) else "`text` must be a string")
    if p.get("type") == "image":
        keys = _keys_problem(p, ("type", "url", "data", "media_type"), ())
        return (
            keys or _opt(p, "url", "string") or _opt(p, "data", "string") or _opt(p, "media_type", "string")
        )
    return "`type` must be text or image"


def _message_problem(m: Any) -> str | None:
    if not isinstance(m, Mapping):
        return "must be an object with a role and content"
    keys = _keys_problem(m, ("role", "content", "tool_calls", "tool_call_id"), ("role",))
    if keys:
        return keys
    if m["role"] not in ("system", "user", "assistant", "tool"):
        return f"`role` must be one of system, user, assistant, tool, not {_show(m['role'])}"
    content = m.get("content", "")
    if isinstance(content, list):
        for j, part in enumerate(content):
            problem = _part_problem(part)
            if problem:
                return f"content[{j}] {problem}"
    elif not isinstance(content, str):
        return "`content` must be a string or a list of parts"
    calls = m.get("tool_calls", [])
    if not isinstance(calls, list):
        return "`tool_calls` must be a list"
    for j, call in enumerate(calls):
        if not isinstance(call, Mapping):
            return f"tool_calls[{j}] must be an object with an id and a name"
        problem = (
            _keys_problem(call, ("id", "name", "arguments", "signature"), ("id", "name"))
            or _opt(call, "id", "string")
            or _opt(call, "name", "string")
            or _opt(call, "signature", "string")
        )
        if problem:
            return f"tool_calls[{j}] {problem}"
    return _opt(m, "tool_call_id", "string")


def _messages_problem(v: Any) -> str | None:
    if not isinstance(v, list):
        return "must be a list of turns"
    for i, m in enumerate(v):
        problem = _message_problem(m)
        if problem:
            return f"turn {i} {problem}"
    return None


def _tools_problem(v: Any) -> str | None:
    if not isinstance(v, list):
        return "must be a list of tools"
    for i, t in enumerate(v):
        if not isinstance(t, Mapping):
            return f"tool {i} must be an object with a name"
        problem = (
            _keys_problem(t, ("name", "description", "parameters"), ("name",))
            or _opt(t, "name", "string")
            or _opt(t, "description", "string")
        )
        if problem:
            return f"tool {i} {problem}"
    return None


def _tool_choice_problem(v: Any) -> str | None:
    if v in ("auto", "none", "required"):
        return None
    if isinstance(v, Mapping) and list(v) == ["name"] and isinstance(v["name"], str):
        return None
    return 'must be "auto", "none", "required" or {"name": "<a tool>"}'


def _response_format_problem(v: Any) -> str | None:
    if isinstance(v, Mapping) and v.get("type") == "json_object":
        return _keys_problem(v, ("type",), ())
    if isinstance(v, Mapping) and v.get("type") == "json_schema":
        return (
            _keys_problem(v, ("type", "schema", "name", "strict"), ("schema",))
            or _opt(v, "name", "string")
            or _opt(v, "strict", "bool")
        )
    return 'must be {"type": "json_object"} or {"type": "json_schema", "schema": {...}}'


def _cache_problem(v: Any) -> str | None:
    """``CacheAsk``: a boolean, or ``{"ttl": text, "sampled": bool}`` without other fields
    (``sampled`` may be left out, not null)."""
    if isinstance(v, bool):
        return None
    if not isinstance(v, Mapping):
        return f'must be false or {{"ttl": "24h"}} (an object with a ttl), not {_show(v)}'
    keys = _keys_problem(v, ("ttl", "sampled"), ("ttl",))
    if keys:
        return keys
    if not isinstance(v["ttl"], str):
        return f'`ttl` must be a duration as text, such as "24h", not {_show(v["ttl"])}'
    if "sampled" in v and not isinstance(v["sampled"], bool):
        return f"`sampled` must be true or false, not {_show(v['sampled'])}"
    return None


def typed_problem(env: Mapping[str, Any]) -> Problem | None:
    """The first field of ``env`` whose JSON type the worker's deserializer refuses."""
    for field, (kind, nullable) in FIELD_KINDS.items():
        if field not in env:
            continue
        v = env[field]
        if v is None:
            if nullable:
                continue
            return Problem(field, "must not be null; leave it out instead")
        problem = _kind_problem(kind, v)
        if problem is not None:
            return Problem(field, problem)
    return None


# ---------------------------------------------------------------------------------------
# The semantic pass (Envelope::check and conversation::check).


def check_name(field: str, name: str) -> None:
    if not _NAME.fullmatch(name):
        raise Problem(
            field,
            f"`{name[:64]}` is not a name providers accept; use 1 to 64 letters, digits, `_` or `-`, "
            "starting with a letter or `_`",
        )


MAX_TAGS = 8
MAX_TAG_VALUE_BYTES = 128
_TAG_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def check_tags(tags: Any) -> None:
    """Up to 8 tags, each named by 1 to 64 letters, digits, ``_``, ``-`` or ``.``, each value
    1 to 128 bytes without a control character (as the worker checks them)."""
    if tags is None:
        return
    if not isinstance(tags, dict):
        raise Problem("tags", f"must be an object of name: value pairs, not {_show(tags)}")
    if len(tags) > MAX_TAGS:
        raise Problem("tags", f"has {len(tags)} tags; a task carries at most {MAX_TAGS}")
    for name, value in tags.items():
        if not isinstance(name, str) or not _TAG_NAME.fullmatch(name):
            raise Problem(
                "tags",
                f"has a tag named {_show(name)}; name a tag with 1 to 64 letters, digits, `_`, `-` or `.`",
            )
        if not isinstance(value, str):
            raise Problem(f"tags.{name}", f"must be a string, not {_show(value)}")
        if value == "":
            raise Problem(f"tags.{name}", "is empty; leave the tag out or give it a value")
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > MAX_TAG_VALUE_BYTES:
            raise Problem(f"tags.{name}", f"is {size} bytes long; use at most {MAX_TAG_VALUE_BYTES}")
        if has_control(value):
            raise Problem(f"tags.{name}", "contains a control character (a newline, tab or NUL); remove it")


def check_class(priority: Any, tenant: Any) -> None:
    """A priority of 0 to 9 and a tenant of 1 to 128 bytes without control characters."""
    if priority is not None and not (_is_int(priority) and 0 <= priority <= MAX_PRIORITY):
        raise Problem(
            "priority",
            f"{_show(priority)} is out of range; use 0 (the default, most urgent) to "
            f"{MAX_PRIORITY} (least urgent)",
        )
    if tenant is None:
        return
    if not isinstance(tenant, str):
        raise Problem("tenant", "must be a string")
    size = len(tenant.encode("utf-8", "surrogatepass"))
    if size == 0:
        raise Problem("tenant", "is empty; leave it out or name the tenant")
    if size > MAX_TENANT_BYTES:
        raise Problem(
            "tenant", f"is {size} bytes long; use at most {MAX_TENANT_BYTES} (an id, not a description)"
        )
    if has_control(tenant):
        raise Problem("tenant", "contains a control character (a newline, tab or NUL); remove it")


def _check_concurrency(key: Any, limit: Any) -> None:
    if key is None and limit is None:
        return
    if limit is None:
        raise Problem(
            "concurrency_key", "needs a concurrency_limit, how many tasks of the key may run at once"
        )
    if key is None:
        raise Problem("concurrency_limit", "needs a concurrency_key, the name of the group it limits")
    if not isinstance(key, str) or _blank(key) or len(key) > MAX_CONCURRENCY_KEY:
        raise Problem(
            "concurrency_key", f"must be a non-empty string of at most {MAX_CONCURRENCY_KEY} characters"
        )
    if not (_is_int(limit) and 1 <= limit <= U32_MAX):
        raise Problem("concurrency_limit", f"must be a whole number of at least 1, not {_show(limit)}")


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    return [p["text"] for p in content if p.get("type") == "text"]


def _has_images(content: Any) -> bool:
    return isinstance(content, list) and any(p.get("type") == "image" for p in content)


def _check_image(field: str, part: Mapping[str, Any]) -> None:
    media_type, url, data = part.get("media_type"), part.get("url"), part.get("data")
    if media_type is not None and media_type not in IMAGE_TYPES:
        raise Problem(
            f"{field}.media_type",
            f"`{media_type[:40]}` is not an image type providers read; use one of {', '.join(IMAGE_TYPES)}",
        )
    if url is not None and data is None:
        lower = url.lower()
        if (
            not (lower.startswith("https://") or lower.startswith("http://"))
            or len(url) > 2048
            or has_control(url)
            or any(c.isspace() for c in url)
        ):
            raise Problem(
                f"{field}.url",
                'must be an http or https URL of at most 2048 characters; send other images as base64 "data"',
            )
    elif data is not None and url is None:
        if media_type is None:
            raise Problem(f"{field}.media_type", f'is needed with "data": one of {", ".join(IMAGE_TYPES)}')
        if not _BASE64.fullmatch(data):
            raise Problem(
                f"{field}.data", "must be the image's bytes in standard base64, without a data: prefix"
            )
    else:
        raise Problem(field, 'an image has either "url" or "data" (base64, with "media_type"), not both')


def check_conversation(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]],
    tool_choice: Any,
    response_format: Any,
) -> None:
    """What a task asks beyond its prompt, checked as conversation::check does (except that
    a schema is not compiled: the worker finds a schema that does not compile)."""
    open_calls: list[str] = []
    ids: set[str] = set()
    for i, m in enumerate(messages):
        at = f"messages[{i}]"
        role, content = m["role"], m.get("content", "")
        calls = m.get("tool_calls") or []
        calls_only = role == "assistant" and len(calls) > 0
        if not _has_images(content) and all(_blank(t) for t in _texts(content)) and not calls_only:
            raise Problem(
                f"{at}.content",
                "is empty; give the turn's text (only an assistant turn with tool_calls may have none)",
            )
        if any("\0" in t for t in _texts(content)):
            raise Problem(f"{at}.content", NUL)
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.get("type") == "image":
                    _check_image(f"{at}.content[{j}]", part)
        if _has_images(content) and role != "user":
            raise Problem(f"{at}.content", "only a user turn may carry images")
        if calls and role != "assistant":
            raise Problem(f"{at}.tool_calls", "only an assistant turn has tool calls")
        if role != "tool" and open_calls:
            raise Problem(
                at,
                f"comes before the call(s) {', '.join(open_calls)} of the assistant turn before it are "
                "answered; put a tool turn answering each call right after the turn that made it",
            )
        for j, call in enumerate(calls):
            cat = f"{at}.tool_calls[{j}]"
            check_name(f"{cat}.name", call["name"])
            if not _CALL_ID.fullmatch(call["id"]):
                raise Problem(
                    f"{cat}.id",
                    "must be 1 to 256 letters, digits, `_` or `-`: the id the tool turn answering it names",
                )
            if call["id"] in ids:
                raise Problem(
                    f"{cat}.id", f"`{call['id']}` names another call too; give each call its own id"
                )
            ids.add(call["id"])
            args = call.get("arguments")
            if not (args is None or isinstance(args, (str, Mapping))):
                raise Problem(f"{cat}.arguments", "must be a JSON object (or the text the model wrote)")
            open_calls.append(call["id"])
        answers = m.get("tool_call_id")
        if role == "tool":
            if answers is None:
                raise Problem(
                    f"{at}.tool_call_id", "is missing; a tool turn names the id of the call it answers"
                )
            if answers not in open_calls:
                raise Problem(
                    f"{at}.tool_call_id",
                    "names no unanswered call of the assistant turn right before; give the id of the call it answers",
                )
            open_calls.remove(answers)
        elif answers is not None:
            raise Problem(f"{at}.tool_call_id", "belongs only to a tool turn")
    if open_calls:
        raise Problem(
            "messages",
            f"ends with the call(s) {', '.join(open_calls)} unanswered; add a tool turn answering each",
        )
    if len(tools) > MAX_TOOLS:
        raise Problem("tools", f"has {len(tools)} tools; at most {MAX_TOOLS} are accepted")
    for i, tool in enumerate(tools):
        check_name(f"tools[{i}].name", tool["name"])
        if any(t["name"] == tool["name"] for t in tools[:i]):
            raise Problem(
                f"tools[{i}].name", f"`{tool['name']}` is defined twice; give each tool its own name"
            )
        if "\0" in (tool.get("description") or ""):
            raise Problem(f"tools[{i}].description", NUL)
        params = tool.get("parameters", {"type": "object"})
        if not isinstance(params, Mapping) or params.get("type") != "object":
            raise Problem(f"tools[{i}].parameters", 'must be a JSON Schema of an object ("type": "object")')
    named = tool_choice.get("name") if isinstance(tool_choice, Mapping) else None
    if named is not None and not any(t["name"] == named for t in tools):
        raise Problem("tool_choice", f"names `{named[:64]}`, which is not among the task's tools")
    if (tool_choice == "required" or named is not None) and not tools:
        raise Problem("tool_choice", "asks for a tool call, but the task defines no tools")
    if isinstance(response_format, Mapping) and response_format.get("type") == "json_schema":
        if not isinstance(response_format["schema"], Mapping):
            raise Problem("response_format.schema", "must be a JSON Schema (an object)")
        if response_format.get("name") is not None:
            check_name("response_format.name", response_format["name"])


def check_temperature(value: Any) -> None:
    """A temperature a worker reads as the 32-bit float it is (a larger one would turn into
    infinity on its way to the provider)."""
    if value is not None and abs(value) > F32_MAX:
        raise Problem("temperature", f"{value} is too large; give a sampling temperature such as 0.2")


def check_deadline(text: str, streams: bool) -> None:
    """A deadline as ``check_deadline`` in shared/src/envelope.rs checks it, in its words."""
    try:
        secs, nanos = parse_duration(text)
    except DurationError as e:
        raise Problem(
            "deadline", f'`{excerpt(text, 40)}` is not a duration ({e}); write it as e.g. "24h" or "3d"'
        ) from None
    if (secs, nanos) < (MIN_DEADLINE_SECS, 0):
        raise Problem(
            "deadline",
            f"{text} is shorter than the 24h a provider may take to run a batch; give at least 24h, "
            "or leave deadline out to call the model now",
        )
    if (secs, nanos) > (MAX_DEADLINE_SECS, 0):
        raise Problem("deadline", f"{text} is longer than 30 days; give at most 30d")
    if streams:
        raise Problem("deadline", "cannot be used with stream: a batch answers all at once; drop one of them")


def samples(temperature: Any) -> bool:
    """Whether a request samples its answer, as ``samples`` in shared/src/envelope.rs: its
    temperature unset, or above 0 as the worker's 32-bit float holds it (a positive one that
    rounds to 0 there does not sample)."""
    return temperature is None or temperature > _F32_ROUNDS_TO_ZERO


def check_ttl(field: str, text: str) -> None:
    """A duration of 1s to 30d, as ``cache_ttl`` in shared/src/envelope.rs reads a cache TTL
    (and an ``idempotency_window``), in its words, for ``field``."""
    try:
        secs, nanos = parse_duration(text)
    except DurationError as e:
        raise Problem(
            field, f'`{excerpt(text, 40)}` is not a duration ({e}); write it as e.g. "10m" or "24h"'
        ) from None
    if (secs, nanos) < (MIN_CACHE_TTL_SECS, 0) or (secs, nanos) > (MAX_CACHE_TTL_SECS, 0):
        raise Problem(field, f'{excerpt(text, 40)} is not between 1s and 30d; give e.g. "24h"')


def check_cache(ask: Any, streams: bool, temperature: Any) -> None:
    """``cache`` as ``CacheAsk::check`` in shared/src/envelope.rs checks it, in its words."""
    if ask is False:
        return
    if ask is True:
        raise Problem("cache", 'true needs a time to keep the answer; write {"ttl": "24h"}')
    check_ttl("cache.ttl", ask["ttl"])
    if streams:
        raise Problem(
            "cache", "cannot be used with stream: a cached answer is not streamed; drop one of them"
        )
    if samples(temperature) and ask.get("sampled") is not True:
        raise Problem(
            "cache",
            "would give every identical request one sampled answer (temperature is unset or above 0); "
            'set "temperature": 0, or "sampled": true in cache to keep one sample',
        )


def check_idempotency(key: str | None, window: str | None) -> None:
    """``idempotency_key`` and ``idempotency_window`` as ``Envelope::check_idempotency`` in
    shared/src/envelope.rs checks them, in its words: a key is not empty (every keyless
    producer would share it), and a window comes with a key and is a TTL."""
    if key == "":
        raise Problem(
            "idempotency_key",
            "is empty; give each task that must run once a key of its own, or leave it out",
        )
    if window is not None:
        if key is None:
            raise Problem(
                "idempotency_window",
                "needs idempotency_key: it is how long a key is remembered; add the key or drop the window",
            )
        check_ttl("idempotency_window", window)


def check_batch_id(batch_id: str) -> None:
    """``batch_id`` as ``check_batch_id`` in shared/src/envelope.rs checks it, in its words: it
    names keys, task ids and ledger rows, so a few safe ASCII characters."""
    if not _BATCH_ID.fullmatch(batch_id):
        raise Problem("batch_id", "must be 1 to 128 letters, digits, `-`, `_`, `.` or `:`")


def check_envelope(env: Mapping[str, Any]) -> None:
    """Raises :class:`Problem` (or :class:`InvalidTask` for a whole-task problem) for an
    envelope a worker would refuse, in the worker's order (Envelope::from_value)."""
    if env.get("v") != VERSION or not _is_int(env.get("v")):
        raise InvalidTask(f'the task has version {_show(env.get("v"))}, but workers understand only "v": 1.')
    field = {k: v for k, v in env.items() if v is not None}
    _check_concurrency(field.get("concurrency_key"), field.get("concurrency_limit"))
    messages = field.get("messages") or []
    prompt = field.get("prompt")
    if not messages and (prompt is None or (isinstance(prompt, str) and _blank(prompt))):
        raise InvalidTask('the task has no prompt; set "prompt" to a non-empty string, or give "messages".')
    problem = typed_problem(env)
    if problem is not None:
        raise problem
    prompt = field.get("prompt", "")
    if _blank(prompt) and all(m["role"] == "system" for m in messages):
        raise Problem(
            "messages", 'has only system turns and the prompt is empty; add a user turn or set "prompt"'
        )
    tools = field.get("tools") or []
    check_conversation(messages, tools, field.get("tool_choice"), field.get("response_format"))
    if field.get("stream") is True and tools:
        raise Problem(
            "stream", "cannot be used with tools yet: a streamed answer carries text only; drop one of them"
        )
    if "deadline" in field:
        check_deadline(field["deadline"], field.get("stream") is True)
    if "cache" in field:
        check_cache(field["cache"], field.get("stream") is True, field.get("temperature"))
    check_idempotency(field.get("idempotency_key"), field.get("idempotency_window"))
    if "batch_id" in field:
        check_batch_id(field["batch_id"])
    for name in NUL_FREE:
        if "\0" in field.get(name, ""):
            raise Problem(name, NUL)
    if field.get("type", "data_analysis") not in TASK_TYPES:
        raise InvalidTask(f"unknown task type `{field['type']}`; use one of: {', '.join(TASK_TYPES)}.")
    check_class(field.get("priority"), field.get("tenant"))
    check_tags(field.get("tags"))
    check_temperature(field.get("temperature"))
    if field.get("max_attempts") == 0:
        raise Problem("max_attempts", "must be at least 1")
    timeout = field.get("timeout")
    if timeout is not None and not 1 <= timeout <= MAX_TIMEOUT_SECS:
        raise Problem(
            "timeout",
            f"must be between 1 second and {MAX_TIMEOUT_SECS} seconds (30 days), not {timeout}",
        )


# ---------------------------------------------------------------------------------------
# Building envelopes.


def rfc3339(dt: datetime) -> str:
    """An aware datetime as RFC 3339 in UTC, e.g. ``2030-01-02T03:04:05Z`` (as the worker
    writes it back; a time that is year 0 or 10000 in UTC too)."""
    shown = _utc(dt.isoformat())
    if shown is None:  # an offset of seconds, which RFC 3339 cannot write
        raise ValueError(f"{dt.isoformat()} has a time zone offset that is not whole minutes")
    return shown


def _wire_value(field: str, value: Any) -> Any:
    """A Python value of ``field`` as the JSON the envelope holds."""
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise Problem(
                field, "is a datetime without a time zone; give one, e.g. datetime.now(timezone.utc)"
            )
        try:
            return rfc3339(value)
        except ValueError as e:
            raise Problem(field, f"{e}; give it in UTC") from None
    if isinstance(value, timedelta):
        secs = value.total_seconds()
        if secs != int(secs):
            raise Problem(field, f"must be whole seconds, not {secs}")
        return f"{int(secs)}s" if field in ("deadline", "cache.ttl", "idempotency_window") else int(secs)
    if field == "id":
        if isinstance(value, uuid.UUID):
            return str(value)
        parsed = parse_uuid(value) if isinstance(value, str) else None
        if parsed is None:
            raise Problem(
                "id", f"must be a UUID such as 0b6f4c2e-8a57-4a43-9c3e-2f5d8e7a1b90, not {_show(value)}"
            )
        return str(parsed)
    if field == "cache" and isinstance(value, Mapping):
        return {k: _wire_value("cache.ttl", v) if k == "ttl" else v for k, v in value.items()}
    if isinstance(value, tuple):
        return list(value)
    return value


def _cache_written(ask: Any) -> Any:
    """A valid ``cache`` as the worker writes it (serde): ``ttl``, then ``sampled`` only when
    true; ``false`` and ``true`` as they are."""
    if isinstance(ask, Mapping):
        return {"ttl": ask["ttl"], **({"sampled": True} if ask.get("sampled") is True else {})}
    return ask


def to_json(value: Any, field: str = "task", within: int = 0) -> str:
    """Compact JSON (as the wire format asks), or :class:`Problem` for what is not JSON or
    what nests deeper than a worker reads: serde_json reads at most 127 levels of arrays and
    objects, ``within`` of them around the value (1 for a field of the envelope)."""
    deepest = wirejson.MAX_DEPTH - within
    too_deep = (
        f"nests arrays and objects deeper than a worker reads (at most {deepest} levels here, "
        f"{wirejson.MAX_DEPTH} in the whole task); flatten it"
    )
    try:
        text = wirejson.dumps(value)
        text.encode("utf-8")
    except RecursionError:
        raise Problem(field, too_deep) from None
    except (TypeError, ValueError) as e:
        raise Problem(field, f"is not JSON ({e})") from None
    if wirejson.depth(text) > deepest:
        raise Problem(field, too_deep)
    return text


def _unknown_field(name: str) -> InvalidTask:
    if name in WIRE_NAMES.values():
        python = next(k for k, v in WIRE_NAMES.items() if v == name)
        hint = f" (write {python}= for the envelope's `{name}`)"
    elif name in WORKER_FIELDS:
        hint = f" (workers set `{name}`)"
    else:
        hint = ""
    return InvalidTask(f"`{name}` is not a task field{hint}; use {', '.join(sorted(Task.__annotations__))}.")


def build(task: Mapping[str, Any], now: datetime | None = None) -> tuple[str, dict[str, Any]]:
    """The task id and the envelope of one task given by Python names; :class:`InvalidTask`
    when a worker would refuse it."""
    try:
        if not isinstance(task, Mapping):
            raise InvalidTask(f"a task must be a mapping of its fields, not {type(task).__name__}.")
        env: dict[str, Any] = {"v": VERSION}
        for name, value in task.items():
            wire = WIRE_NAMES.get(name, name)
            if name in WIRE_NAMES.values() or wire not in PRODUCER_FIELDS:
                raise _unknown_field(name)
            if value is not None:
                env[wire] = _wire_value(wire, value)
        env.setdefault("id", str(uuid.uuid4()))
        env.setdefault("enqueued_at", rfc3339(now or datetime.now(timezone.utc)))
        for field in ("messages", "tools", "metadata", "response_format", "tool_choice"):
            if field in env:
                env[field] = json.loads(to_json(env[field], field, within=1))
        check_envelope(env)
        if "cache" in env:
            env["cache"] = _cache_written(env["cache"])
    except Problem as e:
        raise InvalidTask(f"{e}.") from None
    return env["id"], env


def encode(env: Mapping[str, Any], max_bytes: int) -> str:
    """The envelope as the ``task`` field, within the workers' payload limit."""
    try:
        text = to_json(env)
    except Problem as e:
        raise InvalidTask(f"{e}.") from None
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise InvalidTask(
            f"the task is {size} bytes, over the {max_bytes}-byte limit; send a shorter prompt "
            "(or, if the workers run with a larger --max-payload-bytes, pass max_payload_bytes)."
        )
    return text


def build_batch(tasks: Iterable[Mapping[str, Any]], max_bytes: int) -> list[tuple[str, str]]:
    """Each task's id and ``task`` field; :class:`InvalidTask` naming the first task a worker
    would refuse, before anything is written."""
    out = []
    for i, task in enumerate(tasks):
        try:
            task_id, env = build(task)
            out.append((task_id, encode(env, max_bytes)))
        except InvalidTask as e:
            raise InvalidTask(f"task {i} of the batch: {e}") from None
    return out


# ---------------------------------------------------------------------------------------
# Replays.


def _f32(x: float) -> float | None:
    """``x`` as the worker re-encodes a 32-bit float: its shortest decimal; None for one
    beyond the 32-bit range (which rounds to infinity)."""
    try:
        f: float = struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return None
    if math.isinf(f):
        return None
    for digits in range(1, 10):
        short = float(f"{f:.{digits}g}")
        if struct.unpack("f", struct.pack("f", short))[0] == f:
            return short
    return f


def _repeats_a_field(env: Mapping[str, Any]) -> bool:
    """Whether a struct the worker deserializes (the envelope, a turn, a part, a tool call, a
    tool, tool_choice, response_format, cache) names a field twice, which serde refuses. Free JSON
    (metadata, parameters, a schema, arguments, unknown fields) may: the last one counts."""
    if isinstance(env, wirejson.Object) and env.repeated & set(FIELD_KINDS):
        return True
    structs: list[Any] = [env.get("tool_choice"), env.get("response_format"), env.get("cache")]
    for m in env.get("messages") or []:
        structs.append(m)
        content = m.get("content")
        structs.extend(content if isinstance(content, list) else [])
        structs.extend(m.get("tool_calls") or [])
    structs.extend(env.get("tools") or [])
    return any(wirejson.repeats(s) for s in structs)


def _without_none(obj: Mapping[str, Any], keep: Iterable[str] = ()) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if v is not None or k in keep}


def _reencoded(env: dict[str, Any]) -> dict[str, Any]:
    """A typed envelope as the worker writes it back (serde): unset options, empty lists and
    zero counters left out, defaults filled in, times in UTC, floats as 32-bit. Unknown fields
    are kept as they came."""
    out = {k: v for k, v in env.items() if not (k in FIELD_KINDS and v is None)}
    for field in ("messages", "tools"):
        if out.get(field) == []:
            del out[field]
    for field in ("attempts", "snoozes", "replays"):
        if out.get(field) == 0:
            del out[field]
    for field in ("run_at", "enqueued_at", "waiting_since"):
        if field in out:
            out[field] = _utc(out[field])
    if "id" in out:
        out["id"] = str(parse_uuid(out["id"]))
    if "temperature" in out:
        out["temperature"] = _f32(out["temperature"])
    out.setdefault("prompt", "")
    if "messages" in out:
        out["messages"] = [_turn_reencoded(m) for m in out["messages"]]
    if "tools" in out:
        out["tools"] = [
            {"parameters": {"type": "object", "properties": {}}, **_without_none(t, ("parameters",))}
            for t in out["tools"]
        ]
    if isinstance(out.get("response_format"), dict):
        out["response_format"] = _without_none(out["response_format"])
    if "cache" in out:
        out["cache"] = _cache_written(out["cache"])
    return out


def _turn_reencoded(m: Mapping[str, Any]) -> dict[str, Any]:
    content = m.get("content", "")
    turn: dict[str, Any] = {
        "role": m["role"],
        "content": [_without_none(p) for p in content] if isinstance(content, list) else content,
    }
    calls = [{**_without_none(c), "arguments": c.get("arguments")} for c in m.get("tool_calls", [])]
    if calls:
        turn["tool_calls"] = calls
    if m.get("tool_call_id") is not None:
        turn["tool_call_id"] = m["tool_call_id"]
    return turn


def replayed_task(task: str, task_id: str, provider: str | None) -> str:
    """What replaying a dead letter enqueues, as ``replayed_task`` in
    shared/src/queue/dead_letter.rs: an envelope (a payload the worker's deserializer takes)
    with attempts, snoozes, waiting_since and last_error reset, one more replay, its id filled
    in if missing and, if given, a new provider; any other payload as it came."""
    try:
        env = wirejson.loads(task, object_pairs_hook=wirejson.Object)
    except ValueError:
        return task
    if not isinstance(env, dict) or "v" not in env or typed_problem(env) is not None:
        return task
    if _repeats_a_field(env):
        return task
    # serde_json (built with float_roundtrip) reads `temperature` straight into an f32, and
    # refuses one beyond its range ("number out of range").
    if env.get("temperature") is not None and _f32(env["temperature"]) is None:
        return task
    out = _reencoded(env)
    for field in ("attempts", "snoozes", "waiting_since", "last_error"):
        out.pop(field, None)
    # One more, saturating at the u32 maximum as Rust's `saturating_add`: never a number a
    # worker would refuse.
    out["replays"] = min(env.get("replays", 0) + 1, U32_MAX)
    out.setdefault("id", task_id)
    if provider is not None:
        out["provider"] = provider
    return wirejson.dumps(out)
