"""Per-key limits kept in Redis, so they hold however many gateway processes share it.

* Request rate: a GCRA bucket per key (one key holding the "theoretical arrival time"),
  updated by one Lua script on Redis's own clock, so gateway clocks never matter. A key
  may send `burst` requests at once, then one every 60/`per_minute` seconds.
* Unfinished tasks: a sorted set per key of its task ids (score: when the entry expires
  at the latest). A submission first drops the ids whose result says they ended, then a
  Lua script adds a placeholder only if the set is below the limit: check and add are one
  step, so two gateways cannot both take the last slot. The placeholder becomes the task
  id once the task is queued, or goes away if queuing failed.

Both answer 429 with Retry-After when over.
"""

from __future__ import annotations

import contextlib
import json
import math
import uuid
from typing import TYPE_CHECKING

import redis
import redis.asyncio

from producer.gateway.errors import ApiError, GatewayCode
from vision_queue.protocol import KEY_PREFIX

if TYPE_CHECKING:
    from vision_queue.settings import Settings

RATE_KEY = KEY_PREFIX + ":gw:rate:{key_id}"
TASKS_KEY = KEY_PREFIX + ":gw:tasks:{key_id}"
# Celery's Redis result backend stores each task's state under this prefix.
_RESULT_META_PREFIX = "celery-task-meta-"
_ENDED_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
_PLACEHOLDER_TTL_MS = 60_000
_TASKS_RETRY_AFTER_S = 2

_GCRA = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now_ms)
if tat < now_ms then tat = now_ms end
local new_tat = tat + interval
local ahead = new_tat - now_ms
if ahead > interval * burst then
  return ahead - interval * burst
end
redis.call('SET', KEYS[1], new_tat, 'PX', ahead)
return 0
"""

_RESERVE = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
return 1
"""

_BIND = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""


class Limiter:
    def __init__(self, client: redis.asyncio.Redis, settings: Settings) -> None:
        self.client = client
        self.per_minute = settings.gateway_requests_per_minute
        self.burst = max(1, settings.gateway_request_burst)
        self.max_tasks = settings.gateway_max_tasks_per_key
        # No task outlives its result; an entry lives at most that long.
        self._task_ttl_ms = settings.result_expires_s * 1000
        self._gcra = client.register_script(_GCRA)
        self._reserve = client.register_script(_RESERVE)
        self._bind = client.register_script(_BIND)

    async def check_rate(self, key_id: str) -> None:
        """Count one request; 429 when the key is over its rate."""
        if not self.per_minute:
            return
        interval_ms = 60_000 / self.per_minute
        try:
            wait_ms = float(
                await self._gcra(
                    keys=[RATE_KEY.format(key_id=key_id)], args=[interval_ms, self.burst]
                )
            )
        except redis.OutOfMemoryError:
            # Redis refuses every write, so no task can be queued anyway; reading stored
            # results must keep working, so the rate is not counted meanwhile.
            return
        if wait_ms > 0:
            retry_after = max(1, math.ceil(wait_ms / 1000))
            raise ApiError(
                429,
                GatewayCode.RATE_LIMITED.value,
                f"more than {self.per_minute} requests per minute for this key; retry in "
                f"{retry_after} s",
                headers={"Retry-After": str(retry_after)},
            )

    async def reserve_task(self, key_id: str) -> str | None:
        """Take a slot for a task about to be queued; returns the placeholder to bind.

        None when there is no limit. 429 when the key already has its most tasks running.
        """
        if not self.max_tasks:
            return None
        key = TASKS_KEY.format(key_id=key_id)
        await self._forget_ended(key)
        placeholder = f"reserved:{uuid.uuid4()}"
        taken = await self._reserve(
            keys=[key],
            args=[self.max_tasks, placeholder, _PLACEHOLDER_TTL_MS, self._task_ttl_ms],
        )
        if not int(taken):
            raise ApiError(
                429,
                GatewayCode.TOO_MANY_TASKS.value,
                f"this key already has {self.max_tasks} unfinished tasks; retry when one ends",
                headers={"Retry-After": str(_TASKS_RETRY_AFTER_S)},
            )
        return placeholder

    async def bind_task(self, key_id: str, placeholder: str | None, task_id: str) -> None:
        if placeholder is not None:
            await self._bind(
                keys=[TASKS_KEY.format(key_id=key_id)],
                args=[placeholder, task_id, self._task_ttl_ms],
            )

    async def release(self, key_id: str, member: str | None) -> None:
        """The task ended (or was never queued): its slot is free at once.

        Best effort: if Redis cannot be reached, the next submission's sweep frees it.
        """
        if member is not None and self.max_tasks:
            with contextlib.suppress(redis.RedisError):
                await self.client.zrem(TASKS_KEY.format(key_id=key_id), member)

    async def _forget_ended(self, key: str) -> None:
        members = [
            m.decode() if isinstance(m, bytes) else str(m)
            for m in await self.client.zrange(key, 0, -1)
        ]
        task_ids = [m for m in members if not m.startswith("reserved:")]
        if not task_ids:
            return
        metas = await self.client.mget([_RESULT_META_PREFIX + task_id for task_id in task_ids])
        ended = [task_id for task_id, meta in zip(task_ids, metas, strict=True) if _has_ended(meta)]
        if ended:
            await self.client.zrem(key, *ended)


def _has_ended(meta: bytes | str | None) -> bool:
    if meta is None:
        return False  # still queued (no state stored yet)
    try:
        state = json.loads(meta).get("status")
    except (ValueError, AttributeError):
        return True  # unreadable: do not let it hold a slot for a day
    return state in _ENDED_STATES
