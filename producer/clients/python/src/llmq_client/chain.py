"""Chain specs (docs/wire-format.md, "Chains"; schema/chain.schema.json): the shape checks a
worker makes before it expands a chain (shared/src/chain/mod.rs), so that a chain with an
unknown field, a bad name, a missing parent or a cycle is refused here with a sentence.
What needs the provider file (checks, chains.max_rounds) or the templates' references is
left to the worker: a chain it refuses ends as one dead letter, which following the chain
reports (:class:`ChainRefused`)."""

from __future__ import annotations

import copy
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from . import envelope as E
from . import wirejson
from .errors import InvalidChain
from .keys import chain_id_problem, chain_key_id, utf8

#: The top-level fields of a chain this library writes (tests compare them with the schema).
CHAIN_FIELDS = (
    "v",
    "chain_id",
    "idempotency_key",
    "on_failure",
    "vars",
    "max_parallel",
    "priority",
    "tenant",
    "defaults",
    "steps",
)
#: Task fields a step (or the chain's ``defaults``) may set.
STEP_TASK_FIELDS = (
    "type", "risk", "area", "provider", "model", "system", "max_tokens", "temperature",
    "max_attempts", "timeout", "response_format", "tools", "tool_choice", "stream",
    "prompt_cache",
)  # fmt: skip
#: Every field of a step.
STEP_FIELDS = (
    "name", "after", "kind", "on_timeout", "command", "prompt", "reviews", "distinct",
    "min_success", "escalate", "on_reject", *STEP_TASK_FIELDS,
)  # fmt: skip
KINDS = ("llm", "judge", "consensus", "review", "check", "approval")
MAX_STEPS = 64
_STEP_NAME = re.compile(r"[A-Za-z0-9_-]+")

# The JSON type of each step field (the chain's RawStep / RawFields).
_STEP_KINDS: dict[str, str | tuple[str, ...]] = {
    "type": "string",
    "risk": E.RISKS,
    "area": "string",
    "provider": "string",
    "model": "string",
    "system": "string",
    "max_tokens": "u32",
    "temperature": "number",
    "max_attempts": "u32",
    "response_format": "response_format",
    "tools": "tools",
    "tool_choice": "tool_choice",
    "stream": "bool",
    "prompt_cache": "bool",
    "kind": "string",
    "prompt": "string",
    "reviews": "string",
    "distinct": ("model", "provider"),
    "min_success": "u32",
    "escalate": "bool",
    "on_timeout": "string",
    "command": "string",
}


TOO_DEEP = (
    f"it nests arrays and objects deeper than a worker reads (at most {wirejson.MAX_DEPTH} levels in "
    "all, the chain's own included); flatten it"
)


def _fail(problem: str) -> InvalidChain:
    return InvalidChain(f"the chain is invalid: {problem}.")


def _check_fields(where: str, obj: Mapping[str, Any]) -> None:
    """The task fields of a step or of ``defaults``: types, names and values as a task's."""
    for name, value in obj.items():
        kind = _STEP_KINDS.get(name)
        if value is None or kind is None:
            continue
        problem = E._kind_problem(kind, value)
        if problem is not None:
            raise _fail(f"{where}: `{name}` {problem}")
        if isinstance(value, str) and "\0" in value:
            raise _fail(f"{where}: `{name}` {E.NUL}")
    if obj.get("type") is not None and obj["type"] not in E.TASK_TYPES:
        raise _fail(f"{where}: unknown task type `{obj['type']}`; use one of: {', '.join(E.TASK_TYPES)}")
    try:
        E.check_temperature(obj.get("temperature"))
    except E.Problem as e:
        raise _fail(f"{where}: {e}") from None
    if obj.get("max_attempts") == 0:
        raise _fail(f"{where}: `max_attempts` must be at least 1")
    timeout = obj.get("timeout")
    secs: Any = timeout
    if isinstance(timeout, str):
        try:
            secs = E.parse_duration(timeout)[0]  # whole seconds, as the worker keeps them
        except E.DurationError as e:
            raise _fail(f"{where}: timeout `{timeout}` is not a duration ({e})") from None
    if timeout is not None and not (E._is_int(secs) and 1 <= secs <= E.MAX_TIMEOUT_SECS):
        raise _fail(
            f'{where}: timeout must be whole seconds or a duration such as "5m", '
            f"from 1 second to {E.MAX_TIMEOUT_SECS} seconds (30 days)"
        )
    try:
        E.check_conversation([], obj.get("tools") or [], obj.get("tool_choice"), obj.get("response_format"))
    except E.Problem as e:
        raise _fail(f"{where}: {e}") from None


def _key_problem(key: str | None) -> str | None:
    """Why a chain's ``idempotency_key`` is refused (as ``Chain::parse`` words it), or None."""
    if key is None:
        return None
    if key == "" or "\0" in key:
        return (
            "`idempotency_key` is empty or holds a NUL character; give the chain a key of its own, "
            "or leave it out"
        )
    if not utf8(key):
        return (
            "`idempotency_key` holds a lone surrogate, which is not text a worker reads; give a key in UTF-8"
        )
    return None


def _is_name(text: str) -> bool:
    return bool(text) and all(c.isascii() and (c.isalnum() or c in "_-") for c in text)


def references(text: str) -> list[tuple[int, int, tuple[str, ...]]]:
    """Every ``{{...}}`` reference in ``text``, found as ``references`` in
    shared/src/chain/mod.rs finds them: (start, end, what it reads), what it reads being
    ("var", name), ("summary", step), ("output", step) or ("json", step, key...)."""
    out: list[tuple[int, int, tuple[str, ...]]] = []
    at = 0
    while (start := text.find("{{", at)) != -1:
        end = text.find("}}", start + 2)
        if end == -1:
            break
        inner = text[start + 2 : end].strip("".join(E.RUST_WHITESPACE))
        ref: tuple[str, ...] | None = None
        step, dot, rest = inner.partition(".")
        if dot and rest.startswith("json"):
            tail = rest[4:]
            path = [] if tail == "" else tail[1:].split(".") if tail.startswith(".") else None
            if path is not None and _is_name(step) and all(path):
                ref = ("json", step, *path)
        if ref is None:
            head, dot, last = inner.rpartition(".")
            if dot and last in ("summary", "output"):
                ref = (last, head)
            elif not dot and _is_name(inner):
                ref = ("var", inner)
        if ref is not None:
            out.append((start, end + 2, ref))
        at = end + 2
    return out


def _check_references(steps: Sequence[Mapping[str, Any]], variables: Mapping[str, str]) -> None:
    """What the worker refuses of a chain's variables: a value holding a reference, and
    values that, filled into a prompt, form a reference with the prompt's own text."""
    for name in sorted(variables):
        if references(variables[name]):
            raise _fail(
                f"variable `{name}` contains a `{{{{...}}}}` reference; variables are text, not templates"
            )
    for s in steps:
        prompt = s.get("prompt")
        if not isinstance(prompt, str):
            continue
        refs = references(prompt)
        if any(r[0] == "var" and r[1] not in variables for _, _, r in refs):
            continue  # the worker names the missing variable first
        filled, last = [], 0
        for start, end, r in refs:
            if r[0] == "var":
                filled += [prompt[last:start], variables[r[1]]]
                last = end
        filled.append(prompt[last:])

        def handoffs(text: str) -> list[tuple[str, ...]]:
            return [r for _, _, r in references(text) if r[0] != "var"]

        if handoffs("".join(filled)) != handoffs(prompt):
            raise _fail(
                f"step `{s['name']}`: its variables, filled in, would form a `{{{{...}}}}` reference with "
                "the prompt's own text; variables are text, not templates: keep `{{` and `}}` out of their values"
            )


def _cycle(steps: Sequence[Mapping[str, Any]]) -> list[str] | None:
    parents = {s["name"]: list(s.get("after") or []) for s in steps}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str] | None:
        if name in path:
            return path[path.index(name) :] + [name]
        if name in done:
            return None
        for p in parents.get(name, []):
            found = visit(p, path + [name])
            if found:
                return found
        done.add(name)
        return None

    for s in steps:
        found = visit(s["name"], [])
        if found:
            return found
    return None


def build(
    spec: Mapping[str, Any], variables: Mapping[str, str] | None, max_bytes: int, queue: str
) -> tuple[str, str]:
    """The chain id and the ``chain`` field of a chain spec for ``queue``, with ``variables``
    added to its ``vars``; :class:`InvalidChain` for a spec a worker would refuse for its
    shape. A spec without ``chain_id`` is given a fresh one, unless it has an
    ``idempotency_key``: then the worker names it from the key (:func:`chain_key_id`), and so
    does this."""
    if not isinstance(spec, Mapping):
        raise InvalidChain(f"a chain must be a mapping (its JSON spec), not {type(spec).__name__}.")
    try:
        chain = copy.deepcopy(dict(spec))
        return _build(chain, variables, max_bytes, queue)
    except RecursionError:
        raise _fail(TOO_DEEP) from None


def _build(
    chain: dict[str, Any], variables: Mapping[str, str] | None, max_bytes: int, queue: str
) -> tuple[str, str]:
    unknown = [k for k in chain if k not in CHAIN_FIELDS]
    if unknown:
        raise _fail(f"`{unknown[0]}` is not a chain field; use {', '.join(CHAIN_FIELDS)}")
    chain.setdefault("v", 1)
    if chain["v"] != 1 or not E._is_int(chain["v"]):
        raise _fail(f'the chain has version {E._show(chain["v"])}, but workers understand only "v": 1')
    key = chain.get("idempotency_key")
    # Its type first, as the worker's deserializer refuses it before any check.
    if key is not None and not isinstance(key, str):
        raise _fail(f"`idempotency_key` must be a string, not {type(key).__name__}")
    if chain.get("chain_id") is None:
        # Named by the worker from its key, as here; else a fresh id of its own.
        chain.pop("chain_id", None)
        if key is None:
            chain["chain_id"] = str(uuid.uuid4())
    # Chain::parse's order: the chain id, then the key.
    problem = chain_id_problem(chain["chain_id"]) if "chain_id" in chain else None
    if problem:
        raise _fail(problem)
    problem = _key_problem(key)
    if problem:
        raise _fail(problem)
    if chain.get("on_failure", "cancel_descendants") not in ("cancel_descendants", "fail_chain"):
        raise _fail("`on_failure` must be cancel_descendants or fail_chain")
    own = chain.get("vars", {})
    merged = {**own, **(variables or {})} if isinstance(own, Mapping) else None
    if merged is None or not all(isinstance(k, str) and isinstance(v, str) for k, v in merged.items()):
        raise _fail("`vars` must map names to text")
    if merged:
        chain["vars"] = merged
    mp = chain.get("max_parallel")
    if mp is not None and not (E._is_int(mp) and 1 <= mp <= E.U32_MAX):
        raise _fail("`max_parallel` must be at least 1: how many of the chain's steps may run at once")
    try:
        E.check_class(chain.get("priority"), chain.get("tenant"))
    except E.Problem as e:
        raise _fail(str(e)) from None
    defaults = chain.get("defaults", {})
    if not isinstance(defaults, Mapping) or any(k not in STEP_TASK_FIELDS for k in defaults):
        raise _fail(f"`defaults` may set only {', '.join(STEP_TASK_FIELDS)}")
    _check_fields("defaults", defaults)
    steps = chain.get("steps")
    if not isinstance(steps, list) or not steps:
        raise _fail('the chain has no steps; list at least one under "steps"')
    if len(steps) > MAX_STEPS:
        raise _fail(f"the chain has {len(steps)} steps; a chain may have at most {MAX_STEPS}")
    names: list[str] = []
    for i, s in enumerate(steps):
        if not isinstance(s, Mapping) or not isinstance(s.get("name"), str):
            raise _fail(f"step {i} must be an object with a `name`")
        if not _STEP_NAME.fullmatch(s["name"]):
            raise _fail(f"step name `{s['name']}` must be letters, digits, `_` or `-`")
        if s["name"] in names:
            raise _fail(f"two steps are named `{s['name']}`; give every step its own name")
        names.append(s["name"])
        unknown = [k for k in s if k not in STEP_FIELDS]
        if unknown:
            raise _fail(
                f"step `{s['name']}`: `{unknown[0]}` is not a step field; use {', '.join(STEP_FIELDS)}"
            )
    for s in steps:
        at = f"step `{s['name']}`"
        after = s.get("after", [])
        if not isinstance(after, list) or not all(isinstance(p, str) for p in after):
            raise _fail(f"{at}: `after` must be a list of step names")
        for j, p in enumerate(after):
            if p not in names:
                raise _fail(f"{at} is after `{p}`, which is not a step of this chain")
            if p == s["name"]:
                raise _fail(f"{at} is after itself")
            if p in after[:j]:
                raise _fail(f"{at} names `{p}` twice in `after`; name each parent once")
        kind = s.get("kind") or "llm"
        if kind not in KINDS:
            raise _fail(f"{at}: unknown kind `{kind}`; use one of {', '.join(KINDS)}")
        _check_fields(at, s)
        task = {**defaults, **{k: v for k, v in s.items() if v is not None}}
        if task.get("stream") is True and task.get("tools"):
            raise _fail(
                f"{at}: `stream` cannot be used with tools yet: a streamed answer carries text only; "
                "drop one of them"
            )
        prompt = s.get("prompt")
        if kind == "llm" and (not isinstance(prompt, str) or E._blank(prompt)):
            raise _fail(f'{at}: the step has no prompt; set "prompt"')
    cycle = _cycle(steps)
    if cycle:
        raise _fail(f"steps {' -> '.join(cycle)} form a cycle; a chain must not loop")
    _check_references(steps, chain.get("vars", {}))
    try:
        text = wirejson.dumps(chain)
        size = len(text.encode("utf-8"))
    except (TypeError, ValueError) as e:
        raise _fail(f"it is not JSON ({e})") from None
    if wirejson.depth(text) > wirejson.MAX_DEPTH:
        raise _fail(TOO_DEEP)
    if size > max_bytes:
        raise _fail(
            f"the chain is {size} bytes, over the {max_bytes}-byte limit; shorten its prompts "
            "(or pass max_payload_bytes if the workers take more)"
        )
    if "chain_id" in chain:
        return chain["chain_id"], text
    assert isinstance(key, str)  # a chain without an id has a key (checked above)
    return chain_key_id(queue, chain.get("tenant"), key), text
