"""Which workers are alive on a queue, from one sorted set per queue in Redis.

Each worker's heartbeat calls `announce`, pushing its own expiry a few heartbeats into the
future; readers ask for members whose expiry is still ahead. A worker that dies simply stops
announcing and drops out once its expiry passes: nothing has to clean up after it, and the
set stays as small as the fleet (stale members are trimmed on every announce).

Used by the gateway's readiness, by clients that warn when nobody consumes a queue, and by
workers that look for the tasks of dead workers.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from vision_queue.protocol import WORKER_PRESENCE_KEY

if TYPE_CHECKING:
    import redis
    import redis.asyncio


def presence_key(queue: str) -> str:
    return WORKER_PRESENCE_KEY.format(queue=queue)


def announce(
    client: redis.Redis, queues: list[str], worker: str, ttl_s: float, now: float | None = None
) -> None:
    """Mark `worker` alive on each of `queues` for the next `ttl_s` seconds."""
    moment = time.time() if now is None else now
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        key = presence_key(queue)
        pipe.zadd(key, {worker: moment + ttl_s})
        pipe.zremrangebyscore(key, "-inf", moment)
    pipe.execute()


def withdraw(client: redis.Redis, queues: list[str], worker: str) -> None:
    """A worker stopping cleanly leaves at once instead of when its expiry passes."""
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        pipe.zrem(presence_key(queue), worker)
    pipe.execute()


def live_workers(client: redis.Redis, queue: str, now: float | None = None) -> list[str]:
    moment = time.time() if now is None else now
    members = client.zrangebyscore(presence_key(queue), f"({moment}", "+inf")
    return sorted(_text(m) for m in members)


async def live_workers_async(
    client: redis.asyncio.Redis, queue: str, now: float | None = None
) -> list[str]:
    moment = time.time() if now is None else now
    members = await client.zrangebyscore(presence_key(queue), f"({moment}", "+inf")
    return sorted(_text(m) for m in members)


def _text(member: object) -> str:
    return member.decode() if isinstance(member, bytes) else str(member)
