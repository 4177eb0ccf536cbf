"""Webhooks waiting to be delivered, kept in Redis so a worker's death does not lose them.

A delivery is recorded when its task ends, before the first attempt: a hash
`vq:webhook:<task id>` (url, body, attempts made so far), expiring with the result, and
the task id in the sorted set `vq:webhooks`, scored with the time (Redis' clock, in ms)
until which a sender holds it. The sender holding it pushes that time ahead before each
attempt, far enough to cover the attempt and the backoff after it, and removes both keys
once the delivery ends (delivered, refused, or out of attempts). A sender that dies stops
pushing: the delivery falls due, and whichever live worker's sender claims it first
continues from the attempt after the last one made, so the attempts stay bounded.

Delivery is at least once: a sender frozen past its hold and then resumed may post a
result another worker also posts. Receivers tell repeats apart by `X-VQ-Task-Id`.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from vision_queue.protocol import STATS_KEY, WEBHOOK_KEY, WEBHOOK_OUTBOX_KEY

# KEYS: outbox, record. ARGV: task id, url, body, hold ms, ttl s, trace. 1 if recorded, 0
# if the task already has a delivery (a second end of the same task sends nothing more).
_RECORD = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 0
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('HSET', KEYS[2], 'url', ARGV[2], 'body', ARGV[3], 'attempts', 0, 'trace', ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[4]), ARGV[1])
return 1
"""
# KEYS: outbox, record. ARGV: task id, attempts made, hold ms.
_HOLD = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZADD', KEYS[1], 'XX', now_ms + tonumber(ARGV[3]), ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[2], 'attempts', ARGV[2])
end
return 1
"""
# KEYS: outbox. ARGV: most to claim, hold ms, record key prefix. Returns, per delivery
# claimed, its task id, url, body, attempts made and trace context. A due id whose record
# expired is dropped.
_CLAIM = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, tonumber(ARGV[1]))
local claimed = {}
for _, task_id in ipairs(due) do
  local record = redis.call('HMGET', ARGV[3] .. task_id, 'url', 'body', 'attempts', 'trace')
  if record[1] then
    redis.call('ZADD', KEYS[1], 'XX', now_ms + tonumber(ARGV[2]), task_id)
    table.insert(claimed, task_id)
    table.insert(claimed, record[1])
    table.insert(claimed, record[2])
    table.insert(claimed, record[3])
    table.insert(claimed, record[4] or '')
  else
    redis.call('ZREM', KEYS[1], task_id)
  end
end
return claimed
"""


@dataclass(frozen=True)
class Delivery:
    url: str
    task_id: str
    body: bytes
    attempts_made: int = 0  # by this or earlier senders; the next attempt is one more
    # The ended task's trace context (W3C headers as JSON, "" untraced): a sender, this
    # worker's or one that takes the delivery over, opens its attempts' spans under it.
    trace: str = ""


class WebhookOutbox:
    """The deliveries of every worker on this Redis; thread-safe (redis-py's pool)."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self._record = client.register_script(_RECORD)
        self._hold = client.register_script(_HOLD)
        self._claim = client.register_script(_CLAIM)

    def record(self, delivery: Delivery, hold_s: float) -> bool:
        """Keep `delivery`, held by the caller for `hold_s`; False if its task has one."""
        recorded = self._record(
            keys=[WEBHOOK_OUTBOX_KEY, _record_key(delivery.task_id)],
            args=[
                delivery.task_id, delivery.url, delivery.body, _ms(hold_s), self.ttl_s,
                delivery.trace,
            ],
        )
        return bool(recorded)

    def hold(self, task_id: str, attempts_made: int, hold_s: float) -> None:
        """Keep holding a delivery for `hold_s` more, `attempts_made` attempts in."""
        self._hold(
            keys=[WEBHOOK_OUTBOX_KEY, _record_key(task_id)],
            args=[task_id, attempts_made, _ms(hold_s)],
        )

    def claim_due(self, most: int, hold_s: float) -> list[Delivery]:
        """Deliveries nobody holds any more (their sender died), now held by the caller."""
        flat = self._claim(keys=[WEBHOOK_OUTBOX_KEY], args=[most, _ms(hold_s), _record_key("")])
        return [
            Delivery(
                url=flat[i].decode(),
                task_id=flat[i - 1].decode(),
                body=bytes(flat[i + 1]),
                attempts_made=int(flat[i + 2]),
                trace=bytes(flat[i + 3]).decode(),
            )
            for i in range(1, len(flat), 5)
        ]

    def finish(self, task_id: str, delivered: bool | None = None) -> None:
        """The delivery ended (delivered, refused or out of attempts): forget it, and count
        the outcome in the fleet's counters (vq:stats, exported by producer/queue_exporter)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.zrem(WEBHOOK_OUTBOX_KEY, task_id)
        pipe.delete(_record_key(task_id))
        if delivered is not None:
            field = "webhooks_delivered" if delivered else "webhooks_dropped"
            pipe.hincrby(STATS_KEY, field, 1)
        pipe.execute()


def _record_key(task_id: str) -> str:
    return WEBHOOK_KEY.format(task_id=task_id)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
