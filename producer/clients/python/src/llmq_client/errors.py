"""Every error this library raises. Each message is a sentence that says what is wrong and
how to fix it; catch :class:`LlmqError` for all of them."""

from __future__ import annotations


class LlmqError(Exception):
    """Base of every error this library raises.

    An error that stopped :meth:`Client.enqueue_many` partway says so, and carries the ids of
    the tasks it had enqueued (``enqueued``) and of those in the round trip that failed,
    which Redis may or may not have written (``unknown``); for any other error both are
    empty."""

    enqueued: tuple[str, ...] = ()
    unknown: tuple[str, ...] = ()


class InvalidTask(LlmqError, ValueError):
    """A task a worker would refuse (its dead letter would say the same). Nothing was written."""


class InvalidChain(LlmqError, ValueError):
    """A chain a worker would refuse. Nothing was written."""


class InvalidQueue(LlmqError, ValueError):
    """A queue name that cannot be used in llmq's keys."""


class InvalidId(LlmqError, ValueError):
    """A task id or chain id that names nothing llmq could have written."""


class BadRedisUrl(LlmqError, ValueError):
    """A Redis URL written in a form llmq does not take."""


class RedisUnavailable(LlmqError, ConnectionError):
    """Redis (or the cluster's seeds, or the sentinels) could not be reached."""


class RedisFailed(LlmqError):
    """Redis answered a command with an error."""


class WaitTimeout(LlmqError, TimeoutError):
    """A task or chain did not end within the time given."""


class ChainRefused(LlmqError):
    """The worker refused a submitted chain: the message is its dead letter's error."""


class NotFound(LlmqError, LookupError):
    """No dead letter with that id."""


class ReplayRefused(LlmqError):
    """A dead letter this library does not replay (a chain step's)."""


class InvalidRecord(LlmqError, ValueError):
    """Something read from Redis (a result record, a chain's state) that is not what llmq
    writes there: written by hand, by another program, or damaged."""


class InvalidArgument(LlmqError, ValueError):
    """An argument of a call that is out of range (a timeout, a limit, a provider name)."""
