"""Every Redis connection the project opens itself (not Celery's) is made here.

Staging, cancel keys, health, delivery counters, result waits and streams all call
`redis_client` / `async_redis_client`, so how the project reaches Redis (timeouts, TLS,
one day Sentinel) is decided in one place. Celery's broker and result backend connections
are configured from the same settings in `producer.celery_config`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio

if TYPE_CHECKING:
    from producer.settings import Settings


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
    if max_connections is None:
        return redis.asyncio.Redis.from_url(target, **options)
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        target, max_connections=max_connections, timeout=settings.connect_timeout_s, **options
    )
    return redis.asyncio.Redis.from_pool(pool)
