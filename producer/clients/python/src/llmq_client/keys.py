"""Queue names, task ids and the Redis keys built from them (docs/wire-format.md, "Keys").

Every key of queue ``q`` starts with ``llmq:{q}:``; the braces are a Redis Cluster hash tag,
so a name holding a brace would move keys out of the queue's slot. Names are checked as the
operator page checks them (producer/src/web/mod.rs): 1 to 200 bytes, no braces, no control
characters.
"""

from __future__ import annotations

import re
import unicodedata
import uuid

from .errors import InvalidId, InvalidQueue

MAX_QUEUE_BYTES = 200
#: The longest chain id a worker accepts, in characters.
MAX_CHAIN_ID = 512

_SIMPLE = re.compile(r"[0-9a-fA-F]{32}")
_HYPHENATED = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def has_control(text: str) -> bool:
    """Whether ``text`` holds a control character (Unicode category Cc, as Rust's
    ``char::is_control``)."""
    return any(unicodedata.category(c) == "Cc" for c in text)


def utf8(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8 (it holds no lone surrogate, which Python
    strings may and Redis keys, JSON and Rust strings may not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_queue(name: object) -> str:
    """``name`` if it can be used as a queue name, else :class:`InvalidQueue`."""
    ok = (
        isinstance(name, str)
        and name.strip() != ""
        and utf8(name)
        and len(name.encode("utf-8")) <= MAX_QUEUE_BYTES
        and "{" not in name
        and "}" not in name
        and not has_control(name)
    )
    if not ok:
        raise InvalidQueue(
            f"{name!r} is not a queue name llmq can use: give 1 to {MAX_QUEUE_BYTES} bytes of UTF-8 "
            "without braces or control characters, such as default (letters, digits, -, _ and . are safest)."
        )
    assert isinstance(name, str)
    return name


def parse_uuid(text: str) -> uuid.UUID | None:
    """A UUID in exactly the spellings the worker's parser (Rust's uuid crate, ``Uuid::parse_str``)
    takes, else None: 32 hex digits; 36 characters hyphenated 8-4-4-4-12; that in braces,
    ``{...}``; or that after ``urn:uuid:`` in any case. Nothing else (no ``{32 hex digits}``,
    no ``urn:uuid:`` before 32 digits or braces, no spaces or newline around it)."""
    if not isinstance(text, str):
        return None
    if len(text) == 32 and _SIMPLE.fullmatch(text):
        return uuid.UUID(hex=text)
    if len(text) == 38 and text[0] == "{" and text[-1] == "}":
        hyphenated = text[1:-1]
    elif len(text) == 45 and text[:9].isascii() and text[:9].lower() == "urn:uuid:":
        hyphenated = text[9:]
    else:
        hyphenated = text
    if len(hyphenated) == 36 and _HYPHENATED.fullmatch(hyphenated):
        return uuid.UUID(hex=hyphenated)
    return None


def canonical_task_id(task_id: object) -> str:
    """A task id in the canonical form the worker stores results under."""
    if isinstance(task_id, uuid.UUID):
        return str(task_id)
    parsed = parse_uuid(task_id) if isinstance(task_id, str) else None
    if parsed is None:
        raise InvalidId(
            f"{task_id!r} is not a task id: give the UUID that enqueue() returned "
            "(e.g. 0b6f4c2e-8a57-4a43-9c3e-2f5d8e7a1b90)."
        )
    return str(parsed)


def chain_id_problem(chain_id: object) -> str | None:
    """Why ``chain_id`` cannot name a chain (as the worker says), or None."""
    if not isinstance(chain_id, str):
        return f"`chain_id` must be a string, not {type(chain_id).__name__}"
    if not chain_id.strip():
        return "`chain_id` is empty; leave it out or name the chain"
    if len(chain_id) > MAX_CHAIN_ID or has_control(chain_id):
        return (
            f"`chain_id` must be at most {MAX_CHAIN_ID} characters, none of them control "
            "characters (tab, newline, NUL, ...)"
        )
    if not utf8(chain_id):
        return "`chain_id` holds a lone surrogate, which is not text a worker reads; give a chain id in UTF-8"
    return None


def check_chain_id(chain_id: object) -> str:
    problem = chain_id_problem(chain_id)
    if problem is not None:
        raise InvalidId(f"{problem}.")
    assert isinstance(chain_id, str)
    return chain_id


def derive_id(queue: str, entry_id: str) -> str:
    """The id a worker gives a task (or a chain) whose producer set none: a UUIDv5 of where
    it sits in the stream."""
    return str(uuid.uuid5(uuid.NAMESPACE_OID, f"llmq:{queue}:{entry_id}"))


def chain_key_id(queue: str, tenant: str | None, key: str) -> str:
    """The id a worker gives a chain submitted with ``idempotency_key`` ``key`` and no
    ``chain_id`` (``chain_id`` in shared/src/idempotency.rs): a UUIDv5 in the OID namespace of
    ``llmq-chain-key:<queue>:<tenant's length in UTF-8 bytes>:<tenant>:<key>``, the tenant
    empty when the chain names none. Submitting it twice names one chain."""
    tenant = tenant or ""
    name = f"llmq-chain-key:{queue}:{len(tenant.encode('utf-8'))}:{tenant}:{key}"
    return str(uuid.uuid5(uuid.NAMESPACE_OID, name))


class Keys:
    """The key names of one queue."""

    def __init__(self, queue: str) -> None:
        self.queue = check_queue(queue)
        self.prefix = f"llmq:{{{self.queue}}}"

    @property
    def stream(self) -> str:
        return f"{self.prefix}:stream"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def cancels(self) -> str:
        """The queue's cancel marks: a sorted set of ``task:<id>``, ``batch:<batch id>`` and
        ``tenant:<tenant>``, each scored by when it was set (ms since the epoch)."""
        return f"{self.prefix}:cancels"

    def result(self, task_id: str) -> str:
        return f"{self.prefix}:result:{canonical_task_id(task_id)}"

    def out(self, task_id: str) -> str:
        return f"{self.prefix}:out:{canonical_task_id(task_id)}"

    def chain(self, chain_id: str) -> str:
        return f"{self.prefix}:chain:{check_chain_id(chain_id)}"

    def chain_steps(self, chain_id: str) -> str:
        return f"{self.chain(chain_id)}:steps"
