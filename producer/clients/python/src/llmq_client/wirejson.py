"""JSON as the Rust side reads it (serde_json), for what this library reads back from Redis
(dead letters, records, chains) and what it writes.

serde_json refuses, where Python's ``json`` takes them: arrays and objects nested more than
127 deep (its recursion limit; Python's own parser would raise RecursionError far deeper),
``NaN`` and ``Infinity``, numbers beyond a 64-bit float, and lone surrogates (``"\\ud800"``).
Text the worker would not read as JSON is not JSON here either, so a dead letter is read, and
replayed, as the worker and ``llmq dlq replay`` read it, and hostile text is never a traceback.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

#: The deepest nesting of arrays and objects serde_json reads (its limit of 128, exclusive).
MAX_DEPTH = 127

# A JSON string (or the start of one left open), and a bracket.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class NotJson(ValueError):
    """Text serde_json does not read as JSON."""


class Object(dict[str, Any]):
    """A JSON object that remembers the keys it was given more than once (serde_json keeps
    the last value of such a key in a map, but refuses a struct's field given twice). Pass
    as ``object_pairs_hook`` to :func:`loads`."""

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(pairs)
        self.repeated: set[str] = set()
        if len(pairs) != len(self):
            seen: set[str] = set()
            for k, _ in pairs:
                if k in seen:
                    self.repeated.add(k)
                seen.add(k)


def repeats(value: Any) -> bool:
    """Whether ``value`` is an :class:`Object` that was given a key more than once."""
    return isinstance(value, Object) and bool(value.repeated)


def depth(text: str) -> int:
    """How deep arrays and objects nest in ``text`` (0 for a scalar), counted without
    recursion; brackets inside strings do not count."""
    deepest = level = 0
    for m in _BRACKETS.finditer(_STRING.sub("", text)):
        if m.group() in "[{":
            level += 1
            deepest = max(deepest, level)
        else:
            level -= 1
    return deepest


def _constant(name: str) -> Any:
    raise NotJson(f"{name} is not JSON")


def _float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise NotJson(f"{text[:20]} is out of range of a 64-bit float")
    return value


def _int(text: str) -> int | float:
    value = int(text)
    if -(2**63) <= value < 2**64:
        return value
    # serde_json reads an integer beyond 64 bits as a float, or refuses it beyond a float.
    try:
        return float(value)
    except OverflowError:
        raise NotJson(f"{text[:20]}... is out of range of a 64-bit float") from None


def _no_surrogates(value: Any) -> None:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                raise NotJson("a string holds a lone surrogate")
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def loads(text: str, **hooks: Any) -> Any:
    """``text`` parsed as serde_json parses it, or :class:`NotJson` (a ValueError) for what
    serde_json refuses. ``hooks``: ``object_pairs_hook`` and the like, passed on."""
    if depth(text) > MAX_DEPTH:
        raise NotJson(f"it nests deeper than {MAX_DEPTH} levels")
    try:
        value = json.loads(text, parse_constant=_constant, parse_float=_float, parse_int=_int, **hooks)
    except NotJson:
        raise
    except (ValueError, RecursionError) as e:
        raise NotJson(str(e)) from None
    _no_surrogates(value)
    return value


def dumps(value: Any) -> str:
    """Compact JSON, as the wire format asks; ValueError or TypeError for what is not JSON,
    RecursionError for a value nested too deeply to write."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
