"""Redis URLs as the llmq binaries take them (docs/configuration.md, "Redis: one server or a
cluster"; shared/src/queue/conn.rs), and the sentence for a connection that failed.

| URL | what |
|---|---|
| ``redis://[user:password@]host:port[/db]``, ``rediss://...`` | one Redis (TLS) |
| ``redis+cluster://[user:password@]host:port[,host:port...]``, ``rediss+cluster://...`` | a Redis Cluster: seed nodes |
| ``redis+sentinel://[:password@]host:port[,host:port...]/MASTER[/db]``, ``rediss+sentinel://...`` | the master Sentinel names |
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from .errors import BadRedisUrl, LlmqError, RedisFailed, RedisUnavailable
from .keys import utf8

FORMS = (
    "write it as redis://host:port, rediss://host:port, redis+cluster://host:port,host:port "
    "or redis+sentinel://host:port,host:port/MASTER_NAME"
)
_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]/?#@,]+)(?::([0-9]{1,5}))?")


@dataclass(frozen=True)
class Target:
    """Where a URL points: ``single`` (the URL as given), ``cluster`` (seed nodes) or
    ``sentinel`` (the sentinels and the master's name)."""

    kind: str
    url: str
    shown: str
    tls: bool = False
    nodes: tuple[tuple[str, int], ...] = ()
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    db: int = 0
    master: str = ""

    @property
    def seeds(self) -> str:
        return ", ".join(f"{h}:{p}" for h, p in self.nodes)


def without_credentials(url: str) -> str:
    """``url`` without its user info and query, for messages."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url.split("@")[-1]
    rest = rest.split("?")[0]
    hosts, slash, path = rest.partition("/")
    return f"{scheme}://{hosts.rpartition('@')[2]}{slash}{path}"


def _bad(url: str, why: str) -> BadRedisUrl:
    return BadRedisUrl(f"bad Redis URL `{without_credentials(url)}`: {why}; {FORMS}.")


def _credentials(userinfo: str) -> tuple[str | None, str | None]:
    if not userinfo:
        return None, None
    user, sep, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if sep else None)


def _nodes(url: str, hosts: str) -> tuple[tuple[str, int], ...]:
    nodes = []
    for h in (h.strip() for h in hosts.split(",")):
        if not h:
            continue
        m = _HOST_PORT.fullmatch(h)
        port = int(m.group(2)) if m and m.group(2) else 6379
        if m is None or not 0 < port < 65536:
            raise _bad(url, f"`{h}` is not host:port")
        nodes.append((m.group(1).strip("[]"), port))
    return tuple(nodes)


def parse_url(url: object) -> Target:
    """Where ``url`` points, or :class:`BadRedisUrl` saying how to write it."""
    if not isinstance(url, str) or not url.strip():
        raise BadRedisUrl(f"the Redis URL is empty; {FORMS}.")
    if not utf8(url):
        raise BadRedisUrl(f"the Redis URL holds a lone surrogate, which is not text; {FORMS}.")
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    shown = without_credentials(url)
    if not sep:
        raise _bad(url, "it has no scheme")
    if scheme in ("redis+cluster", "rediss+cluster"):
        userinfo, _, hosts = rest.rpartition("@")
        nodes = _nodes(url, re.split("[/?]", hosts)[0])
        if not nodes:
            raise _bad(
                url, "a cluster URL needs at least one seed node: redis+cluster://host:port[,host:port...]"
            )
        user, password = _credentials(userinfo)
        return Target("cluster", url, shown, scheme == "rediss+cluster", nodes, user, password)
    if scheme in ("redis+sentinel", "rediss+sentinel"):
        userinfo, _, rest = rest.rpartition("@")
        parts = rest.split("/")
        nodes = _nodes(url, parts[0])
        master = parts[1] if len(parts) > 1 else ""
        if not nodes or not master:
            raise _bad(
                url,
                "a Sentinel URL needs the sentinels and the master's name: "
                "redis+sentinel://host:port[,host:port...]/MASTER_NAME",
            )
        db = parts[2] if len(parts) > 2 else ""
        if db and not db.isdigit():
            raise _bad(url, f"`{db}` is not a database number")
        user, password = _credentials(userinfo)
        return Target(
            "sentinel", url, shown, scheme == "rediss+sentinel", nodes, user, password, int(db or 0), master
        )
    if scheme not in ("redis", "rediss", "unix"):
        raise _bad(url, f"`{scheme}://` is not a scheme llmq takes")
    try:
        split = urlsplit(url)
        split.port  # noqa: B018 (raises for a port that is not a number)
    except ValueError as e:
        raise _bad(url, str(e)) from None
    db = split.path.strip("/") if scheme != "unix" else ""
    if db and not db.isdigit():
        raise _bad(url, f"`{db}` is not a database number")
    return Target("single", url, shown, scheme == "rediss")


def _detail(e: BaseException) -> str:
    return " ".join(str(e).split()).rstrip(".") or type(e).__name__


def failure(target: Target, e: Exception) -> LlmqError:
    """The sentence for redis-py's error ``e`` on ``target``: what failed and what to do."""
    name, detail = type(e).__name__, _detail(e)
    lower = detail.lower()
    if name == "MasterNotFoundError" or (target.kind == "sentinel" and name == "ConnectionError"):
        return RedisUnavailable(
            f"no sentinel named a reachable master `{target.master}` ({target.seeds}): {detail}; check the "
            "sentinels' host:port list and the master's name in the URL "
            "(redis+sentinel://host:port,host:port/MASTER_NAME)."
        )
    if "cluster support disabled" in lower or "cluster mode is not enabled" in lower:
        return RedisUnavailable(
            f"the URL names a Redis Cluster (redis+cluster://), but {target.seeds} is not in cluster "
            f"mode ({detail}); use redis://host:port for a single Redis."
        )
    if "certificate" in lower:
        return RedisUnavailable(
            f"cannot reach Redis at {target.shown} ({detail}); trust the CA that signed Redis's "
            "certificate with SSL_CERT_FILE=/path/to/ca.pem, or check the host name in the URL."
        )
    if name == "AuthenticationError" or ("auth" in lower and "password" in lower):
        return RedisUnavailable(
            f"Redis at {target.shown} refused the credentials ({detail}); check the user and password in the URL."
        )
    if target.kind == "cluster" and name in ("RedisClusterException", "ConnectionError", "TimeoutError"):
        return RedisUnavailable(
            f"no seed node of the Redis Cluster answered ({target.seeds}): {detail}; start the cluster "
            "or set REDIS_URL to where it runs."
        )
    if name in ("ConnectionError", "TimeoutError", "BusyLoadingError") or isinstance(e, OSError):
        return RedisUnavailable(
            f"cannot reach Redis at {target.shown} ({detail}); start Redis or set REDIS_URL to where it runs."
        )
    return RedisFailed(f"Redis answered with an error: {detail}.")
