"""Batch records in Redis, shared by every gateway process (the router and the feeder).

    vq:gw:batch:{id}           hash: `meta` (JSON: owner, endpoint, input file, window,
                               metadata, created/expires, priority, line counts), `status`,
                               `cursor` (valid lines handed to the queue so far),
                               `completed`, `failed`, `<status>_at`, file ids
    vq:gw:batch:{id}:lines     list: the valid input lines, compact JSON, in file order
    vq:gw:batch:{id}:refused   list: error lines of the input lines refused at creation
    vq:gw:batch:{id}:inflight  hash: position -> when (ms) the feeder took it, then "q" once
                               its task is on the queue
    vq:gw:batch:{id}:done      hash: position -> "o" or "e" + its output line
    vq:gw:batch:{id}:lease     the feeder process working on the batch (a token, expiring)
    vq:gw:batches:{key_id}     sorted set: the key's batches by creation time
    vq:gw:batches:active       set: batches the feeders still work on

Every key of a batch expires `RETENTION_S` after the batch ends (at most its window plus
that while it runs); its output and error files are kept as long.
"""

from __future__ import annotations

import json
import time
from typing import Any

from producer.gateway.files import RETENTION_S
from vision_queue.protocol import KEY_PREFIX

BATCH_KEY = KEY_PREFIX + ":gw:batch:{batch_id}"
PARTS = ("lines", "refused", "inflight", "done", "lease")
KEY_BATCHES_KEY = KEY_PREFIX + ":gw:batches:{key_id}"
ACTIVE_KEY = KEY_PREFIX + ":gw:batches:active"
WINDOWS = {"24h": 24 * 3600}
STATUSES = (
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
)
ENDED = ("failed", "completed", "expired", "cancelled")
_TIMES = [f"{s}_at" for s in STATUSES if s not in ("validating",)]


def key(batch_id: str, part: str | None = None) -> str:
    base = BATCH_KEY.format(batch_id=batch_id)
    return base if part is None else f"{base}:{part}"


def all_keys(batch_id: str) -> list[str]:
    return [key(batch_id), *(key(batch_id, part) for part in PARTS)]


def new_batch_id(seed: str) -> str:
    return "batch_" + seed.replace("-", "")


async def write_new(
    redis: Any, meta: dict[str, Any], lines: list[str], refused: list[dict[str, Any]]
) -> dict[str, Any]:
    """Store a checked batch: running if it has lines to run, else straight to finalizing."""
    batch_id, now = meta["id"], int(time.time())
    status = "in_progress" if lines else "finalizing"
    fields: dict[str, Any] = {
        "meta": json.dumps(meta),
        "status": status,
        "cursor": 0,
        "completed": 0,
        "failed": 0,
        "in_progress_at": now,
    }
    if status == "finalizing":
        fields["finalizing_at"] = now
    keep = int(meta["expires_at"] - now) + RETENTION_S
    pipe = redis.pipeline(transaction=True)
    pipe.delete(*all_keys(batch_id))
    pipe.hset(key(batch_id), mapping=fields)
    for start in range(0, len(lines), 1000):
        pipe.rpush(key(batch_id, "lines"), *lines[start : start + 1000])
    for start in range(0, len(refused), 1000):
        pipe.rpush(
            key(batch_id, "refused"), *(json.dumps(r) for r in refused[start : start + 1000])
        )
    for name in all_keys(batch_id)[:3]:
        pipe.expire(name, keep)
    index = KEY_BATCHES_KEY.format(key_id=meta["owner"])
    # Microseconds, not created_at's seconds: batches of one second list in creation order.
    pipe.zadd(index, {batch_id: time.time_ns() // 1000})
    pipe.expire(index, keep)
    pipe.sadd(ACTIVE_KEY, batch_id)
    await pipe.execute()
    return await read(redis, batch_id) or {}


async def read(redis: Any, batch_id: str) -> dict[str, Any] | None:
    """The stored fields, `meta` decoded; None if there is no such batch."""
    return _decoded(await redis.hgetall(key(batch_id[:100])))


async def read_many(redis: Any, batch_ids: list[str]) -> list[dict[str, Any] | None]:
    """`read` for many batches in one round trip."""
    pipe = redis.pipeline(transaction=False)
    for batch_id in batch_ids:
        pipe.hgetall(key(batch_id[:100]))
    return [_decoded(raw) for raw in await pipe.execute()]


def _decoded(raw: dict[Any, Any]) -> dict[str, Any] | None:
    if not raw:
        return None
    record = {_text(k): _text(v) for k, v in raw.items()}
    record["meta"] = json.loads(record["meta"])
    return record


async def owned(redis: Any, batch_id: str, key_id: str) -> dict[str, Any] | None:
    record = await read(redis, batch_id)
    if record is None or record["meta"]["owner"] != key_id:
        return None
    return record


def batch_object(record: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's batch object."""
    meta = record["meta"]
    refused = int(meta.get("refused", 0))
    errors = meta.get("errors")
    body: dict[str, Any] = {
        "id": meta["id"],
        "object": "batch",
        "endpoint": meta["endpoint"],
        "errors": {"object": "list", "data": errors} if errors else None,
        "input_file_id": meta["input_file_id"],
        "completion_window": meta["completion_window"],
        "status": record["status"],
        "output_file_id": record.get("output_file_id") or None,
        "error_file_id": record.get("error_file_id") or None,
        "created_at": meta["created_at"],
        "expires_at": meta["expires_at"],
        "request_counts": {
            "total": int(meta["total"]),
            "completed": int(record.get("completed", 0)),
            "failed": int(record.get("failed", 0)) + refused,
        },
        "metadata": meta.get("metadata") or None,
    }
    for name in _TIMES:
        value = record.get(name)
        body[name] = int(value) if value else None
    body["priority"] = meta.get("priority")  # vision-queue extension
    return body


# KEYS: the batch. ARGV: now. Asks a running batch to stop: 1, or 0 if it is not running.
CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'in_progress' and status ~= 'validating' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'cancelling', 'cancelling_at', ARGV[1])
return 1
"""

# KEYS: lease. ARGV: token, ms. Takes or keeps the lease: 1, or 0 if another holds it.
LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
return 1
"""

# KEYS: batch, inflight. ARGV: expected cursor, how many, now (ms). Hands lines to this
# feeder: their first position, or -1 if the cursor moved (another feeder got there).
ADVANCE = """
local at = tonumber(redis.call('HGET', KEYS[1], 'cursor'))
if at ~= tonumber(ARGV[1]) then return -1 end
for i = at, at + tonumber(ARGV[2]) - 1 do redis.call('HSET', KEYS[2], i, ARGV[3]) end
redis.call('HSET', KEYS[1], 'cursor', at + tonumber(ARGV[2]))
return at
"""

# KEYS: inflight. ARGV: position, the queued-at it was read with, now (ms). Claims the
# re-queueing of a line whose task never reached the queue: 1, or 0 if claimed already.
REQUEUE = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""

# KEYS: inflight. ARGV: position. Notes that the line's task is on the queue (if the line
# is still in flight), so it is never re-queued.
QUEUED = "q"
MARK_QUEUED = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], 'q') end
return 1
"""

# KEYS: batch, inflight, done. ARGV: position, "o" or "e" + line, counter. Records a line
# once: 1, or 0 if it was not in flight (recorded already).
RECORD = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[1], ARGV[3], 1)
return 1
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
