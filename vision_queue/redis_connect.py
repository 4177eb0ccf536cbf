"""Every Redis connection the project opens itself (not Celery's) is made here.

Staging, cancel keys, health, delivery counters, result waits and streams all call
`redis_client` / `async_redis_client`, so how the project reaches Redis (timeouts, TLS,
Sentinel) is decided in one place. Celery's broker and result backend connections are
configured from the same settings in `vision_queue.celery_config`, whose sentinel
transport options (`celery_sentinel_options`) are built here too: `vision_queue.sentinel`
only reads URLs and never needs a settings object.

For a sentinel:// URL (`vision_queue.sentinel`) the client is the sentinels' `master_for`
client: every new connection asks them where the master is, a connection to a master that
died or was demoted fails (a demoted one answers READONLY, which redis-py turns into a
connection error), and the caller's retry reaches the new master.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

from vision_queue.master_fence import FencedConnection, SentinelWatch
from vision_queue.sentinel import is_sentinel_url, parse_sentinel_url

if TYPE_CHECKING:
    from vision_queue.settings import Settings


def _options(settings: Settings, overrides: dict[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {
        "socket_connect_timeout": settings.connect_timeout_s,
        "socket_timeout": max(10.0, settings.connect_timeout_s),
        "health_check_interval": 30,
    }
    options.update(overrides)
    return options


def redis_client(
    settings: Settings,
    url: str | None = None,
    *,
    max_connections: int | None = None,
    **overrides: Any,
) -> redis.Redis:
    """A client for `url` (default: the broker's Redis) with the project's timeouts.

    With `max_connections`, callers beyond that many wait (up to the connect timeout) for a
    free connection instead of opening more.
    """
    target = url or settings.effective_broker_url
    options = _options(settings, overrides)
    if is_sentinel_url(target):
        return _sentinel_master(settings, target, options, max_connections)
    if max_connections is None:
        return redis.Redis.from_url(target, **options)
    pool = redis.BlockingConnectionPool.from_url(
        target, max_connections=max_connections, timeout=settings.connect_timeout_s, **options
    )
    return redis.Redis.from_pool(pool)


def async_redis_client(
    settings: Settings,
    url: str | None = None,
    *,
    max_connections: int | None = None,
    **overrides: Any,
) -> redis.asyncio.Redis:
    """The asyncio twin of `redis_client`: same URL rules, same timeouts."""
    target = url or settings.effective_broker_url
    options = _options(settings, overrides)
    if is_sentinel_url(target):
        return _async_sentinel_master(settings, target, options, max_connections)
    if max_connections is None:
        return redis.asyncio.Redis.from_url(target, **options)
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        target, max_connections=max_connections, timeout=settings.connect_timeout_s, **options
    )
    return redis.asyncio.Redis.from_pool(pool)


def _is_master(role_reply: Any) -> bool:
    first = role_reply[0] if isinstance(role_reply, (list, tuple)) and role_reply else b""
    return (first.decode() if isinstance(first, bytes) else str(first)) == "master"


class _MasterConnection(FencedConnection, redis.sentinel.SentinelManagedConnection):
    """A connection to the server the sentinels name as master, refused unless it says so,
    and moved off a master the sentinels replaced (`vision_queue.master_fence`).

    Right after a failover a sentinel that has not heard of it yet still names the old
    master; if that one is alive (a planned failover demotes it), it accepts reads as a
    replica, stale or empty while it resyncs: a status lookup would report a task unknown.
    Asking the server's ROLE on connect turns that into a connection error, which the
    caller's retry answers by asking the sentinels again.
    """

    def connect_to(self, address: tuple[str, int]) -> None:
        super().connect_to(address)
        self.send_command("ROLE")
        if not _is_master(self.read_response()):
            self.disconnect()
            raise redis.ConnectionError("the server the sentinels named is not the master yet")


class _AsyncMasterConnection(redis.asyncio.sentinel.SentinelManagedConnection):
    """The asyncio twin of `_MasterConnection`."""

    async def connect_to(self, address: tuple[str, int]) -> None:
        await super().connect_to(address)
        await self.send_command("ROLE")
        if not _is_master(await self.read_response()):
            await self.disconnect()
            raise redis.ConnectionError("the server the sentinels named is not the master yet")


class _BlockingSentinelPool(redis.sentinel.SentinelConnectionPool, redis.BlockingConnectionPool):
    """A sentinel-managed pool whose callers wait for a free connection past the limit."""


class _AsyncBlockingSentinelPool(
    redis.asyncio.sentinel.SentinelConnectionPool, redis.asyncio.BlockingConnectionPool
):
    """The asyncio twin of `_BlockingSentinelPool`."""


def _sentinel_options(settings: Settings, options: dict[str, Any]) -> dict[str, Any]:
    """The sentinels' own connections: their password and timeouts, and the caller's retry
    policy. A client that bounds its calls itself (vision_queue/outages.py) turns redis-py's
    retries off; left on for the sentinels, they made one refused password take 11 s."""
    kwargs = sentinel_kwargs(settings)
    if "retry" in options:
        kwargs["retry"] = options["retry"]
    return kwargs


def _pool_options(settings: Settings, max_connections: int | None) -> dict[str, Any]:
    if max_connections is None:
        return {}
    return {"max_connections": max_connections, "timeout": settings.connect_timeout_s}


def _sentinel_master(
    settings: Settings, url: str, options: dict[str, Any], max_connections: int | None
) -> redis.Redis:
    target = parse_sentinel_url(url)
    sentinels = redis.sentinel.Sentinel(
        list(target.sentinels), sentinel_kwargs=_sentinel_options(settings, options)
    )
    pool_class = (
        redis.sentinel.SentinelConnectionPool if max_connections is None else _BlockingSentinelPool
    )
    client: redis.Redis = sentinels.master_for(
        settings.redis_sentinel_master,
        redis_class=redis.Redis,
        connection_pool_class=pool_class,
        connection_class=_MasterConnection,
        **{**target.master_kwargs(), **options, **_pool_options(settings, max_connections)},
    )
    return client


def _async_sentinel_master(
    settings: Settings, url: str, options: dict[str, Any], max_connections: int | None
) -> redis.asyncio.Redis:
    target = parse_sentinel_url(url)
    sentinels = redis.asyncio.sentinel.Sentinel(
        list(target.sentinels), sentinel_kwargs=_sentinel_options(settings, options)
    )
    pool_class = (
        redis.asyncio.sentinel.SentinelConnectionPool
        if max_connections is None
        else _AsyncBlockingSentinelPool
    )
    client: redis.asyncio.Redis = sentinels.master_for(
        settings.redis_sentinel_master,
        redis_class=redis.asyncio.Redis,
        connection_pool_class=pool_class,
        connection_class=_AsyncMasterConnection,
        **{**target.master_kwargs(), **options, **_pool_options(settings, max_connections)},
    )
    return client


def sentinel_kwargs(settings: Settings) -> dict[str, Any]:
    """Connection options for the sentinels themselves (not the master)."""
    options: dict[str, Any] = {
        "socket_connect_timeout": settings.connect_timeout_s,
        "socket_timeout": settings.connect_timeout_s,
    }
    if settings.redis_sentinel_password:
        options["password"] = settings.redis_sentinel_password
    return options


def sentinel_watch(settings: Settings) -> SentinelWatch | None:
    """Who keeps this process's master fence current (`vision_queue.master_fence`); None
    unless the broker is reached through sentinels. Its calls fail fast: no retries."""
    url = settings.effective_broker_url
    if not is_sentinel_url(url):
        return None
    options = {**sentinel_kwargs(settings), "retry": Retry(NoBackoff(), 0)}
    sentinels = [
        redis.Redis(host=host, port=port, **options)
        for host, port in parse_sentinel_url(url).sentinels
    ]
    return SentinelWatch(sentinels, settings.redis_sentinel_master)


def celery_sentinel_options(settings: Settings, url: str) -> dict[str, Any]:
    """The transport options kombu's Sentinel transport and Celery's SentinelBackend read;
    empty for a plain Redis URL."""
    if not is_sentinel_url(url):
        return {}
    return {
        "master_name": settings.redis_sentinel_master,
        "sentinel_kwargs": sentinel_kwargs(settings),
    }
