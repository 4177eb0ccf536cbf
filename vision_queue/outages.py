"""What a client does when Redis cannot serve it: retry briefly, then one clear error.

Every client operation (submit, status, result, cancel, stream; sync and async) runs its
Redis calls through `call` / `acall`: connection failures are retried until
VQ_CONNECT_TIMEOUT_S has passed, then `BrokerUnavailable` is raised. A refused password
and a full Redis are not retried: they are settings or capacity to fix, and the message
says which. An endpoint that is not Redis but answers something RESP-shaped (redis-py then
fails inside its handshake with a plain Python error) is `BrokerUnavailable` saying so.
No call waits for more than the connect timeout plus one socket timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis
from redis.sentinel import MasterNotFoundError

from vision_queue.errors import (
    BrokerAuthenticationFailed,
    BrokerBusy,
    BrokerOutOfMemory,
    BrokerUnavailable,
)
from vision_queue.redis_urls import mask_url
from vision_queue.sentinel import is_sentinel_url
from vision_queue.settings import Settings

T = TypeVar("T")

_RETRY_PAUSE_S = 0.25


def url_setting(settings: Settings, url: str) -> str:
    """The environment variable that holds `url`, so an error names what to fix."""
    if url == settings.broker_url:
        return "VQ_BROKER_URL"
    if url == settings.result_backend_url:
        return "VQ_RESULT_BACKEND_URL"
    return "REDIS_URL"


# What redis-py's BlockingConnectionPool raises when no connection was free in time.
POOL_EXHAUSTED = "No connection available."


# What redis-py raises, as plain Python errors, when a handshake reply has the wrong shape:
# an endpoint that is not Redis but answers something RESP-like (one that echoes, a proxy).
_HANDSHAKE_FAULTS = (AttributeError, TypeError, IndexError, KeyError)
_HANDSHAKE_CODE = frozenset({"on_connect", "on_connect_check_health"})


def is_not_redis(exc: BaseException) -> bool:
    """`exc` came from inside redis-py's connection handshake, not from our own code."""
    if not isinstance(exc, _HANDSHAKE_FAULTS):
        return False
    trace = exc.__traceback__
    while trace is not None:
        frame = trace.tb_frame
        module = str(frame.f_globals.get("__name__", ""))
        if frame.f_code.co_name in _HANDSHAKE_CODE and module.startswith("redis."):
            return True
        trace = trace.tb_next
    return False


def broker_error(
    settings: Settings, url: str, exc: BaseException
) -> BrokerUnavailable | BrokerBusy:
    where = mask_url(url)
    if is_not_redis(exc):
        return BrokerUnavailable(
            f"Redis at {where} is unreachable: what answers there is not a Redis server "
            f"(its handshake reply made no sense); check {url_setting(settings, url)}"
        )
    if is_pool_exhausted(exc):
        return BrokerBusy(
            f"every connection to Redis at {where} stayed busy for "
            f"{settings.connect_timeout_s:g} s: too many calls at once; retry shortly"
        )
    if _sentinels_refused_password(exc):
        given = "a wrong" if settings.redis_sentinel_password else "no"
        return BrokerAuthenticationFailed(
            f"the sentinels at {where} refused the connection (authentication failed: "
            f"{given} VQ_REDIS_SENTINEL_PASSWORD); set it to their requirepass"
        )
    if _is_auth_failure(exc):
        setting = url_setting(settings, url)
        if is_sentinel_url(url):
            # A sentinel without its password and the master without its own both say NOAUTH.
            return BrokerAuthenticationFailed(
                f"Redis at {where} refused the connection (authentication failed: {exc}); "
                f"check VQ_REDIS_SENTINEL_PASSWORD (the sentinels' password) and the "
                f"password in {setting} (the master's)"
            )
        if not urlsplit(url).password:
            return BrokerAuthenticationFailed(
                f"Redis at {where} requires a password (authentication failed: no password "
                f"in {setting}); put it in the URL: redis://:PASSWORD@host:port/db"
            )
        return BrokerAuthenticationFailed(
            f"Redis at {where} refused the credentials (authentication failed: {exc}); "
            f"set the right password in {setting}"
        )
    if isinstance(exc, redis.OutOfMemoryError):
        return BrokerOutOfMemory(
            f"Redis is out of memory at {where}: it refuses writes (maxmemory reached); "
            "free memory or raise maxmemory, then try again"
        )
    if isinstance(exc, redis.ReadOnlyError):
        return BrokerUnavailable(
            f"Redis at {where} is a read-only replica; point {url_setting(settings, url)} "
            "at the primary"
        )
    return BrokerUnavailable(f"Redis at {where} is unreachable: {exc}")


def is_pool_exhausted(exc: BaseException) -> bool:
    """The pool had no free connection in time: the caller is busy, Redis is not down."""
    return isinstance(exc, redis.ConnectionError) and str(exc) == POOL_EXHAUSTED


def is_retryable(exc: BaseException) -> bool:
    if is_pool_exhausted(exc):
        return False  # the pool already waited the connect timeout
    if _is_auth_failure(exc) or _sentinels_refused_password(exc):
        return False
    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError))


def _is_auth_failure(exc: BaseException) -> bool:
    if isinstance(exc, (redis.AuthenticationError, redis.exceptions.AuthorizationError)):
        return True
    refused = (
        redis.exceptions.NoPermissionError,
        redis.exceptions.AuthenticationWrongNumberOfArgsError,
    )
    if isinstance(exc, refused):
        return True
    text = str(exc)
    return isinstance(exc, redis.ResponseError) and text.startswith(("NOAUTH", "WRONGPASS"))


def _sentinels_refused_password(exc: BaseException) -> bool:
    """redis-py asks each sentinel in turn and, when none answers, reports what each said
    inside one MasterNotFoundError (an AuthenticationError is a ConnectionError to it)."""
    return isinstance(exc, MasterNotFoundError) and "AuthenticationError" in str(exc)


def call(settings: Settings, url: str, operation: Callable[[], T]) -> T:
    """Run `operation`, retrying connection failures until the connect timeout has passed."""
    deadline = time.monotonic() + settings.connect_timeout_s
    while True:
        try:
            return operation()
        except (redis.RedisError, OSError) as exc:
            if not is_retryable(exc) or time.monotonic() >= deadline:
                raise broker_error(settings, url, exc) from exc
        except _HANDSHAKE_FAULTS as exc:
            if not is_not_redis(exc):
                raise
            raise broker_error(settings, url, exc) from exc
        time.sleep(_RETRY_PAUSE_S)


async def acall(settings: Settings, url: str, operation: Callable[[], Awaitable[T]]) -> T:
    """The asyncio twin of `call`."""
    deadline = time.monotonic() + settings.connect_timeout_s
    while True:
        try:
            return await operation()
        except (redis.RedisError, OSError) as exc:
            if not is_retryable(exc) or time.monotonic() >= deadline:
                raise broker_error(settings, url, exc) from exc
        except _HANDSHAKE_FAULTS as exc:
            if not is_not_redis(exc):
                raise
            raise broker_error(settings, url, exc) from exc
        await asyncio.sleep(_RETRY_PAUSE_S)


def client_options(settings: Settings) -> dict[str, Any]:
    """Connection options for a client's own Redis connections: our retry loop bounds the
    time, so redis-py's own retries (ten by default, with backoff) are switched off, and a
    hung server answers within the connect timeout rather than a longer socket timeout."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return {
        "retry": Retry(NoBackoff(), 0),
        "socket_timeout": settings.connect_timeout_s,
    }


def async_client_options(settings: Settings) -> dict[str, Any]:
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return {
        "retry": Retry(NoBackoff(), 0),
        "socket_timeout": settings.connect_timeout_s,
    }
