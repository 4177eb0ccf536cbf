"""Settings every worker sharing one Redis database must agree on: the visibility timeout.

kombu keeps one set of unacknowledged messages per database, whatever their queue, and
each worker's restore sweep hands back every entry older than *its own* visibility
timeout. One worker started with a shorter `VQ_VISIBILITY_TIMEOUT_S`, even on another
queue, therefore redelivers the long tasks other workers are still running (seen: two
successes for one task). So the first worker records its value under
VISIBILITY_TIMEOUT_KEY, and a worker whose value differs refuses to start.

The record is a lease rather than a permanent setting: every running worker refreshes
its expiry (one visibility timeout) from a background thread, so it lasts while any
worker runs and lapses one visibility timeout after the last one stopped. By then every
message taken with the old value has been handed back, so a new value is safe. To change
it sooner, stop every worker and delete the key.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from vision_queue.protocol import VISIBILITY_TIMEOUT_KEY
from vision_queue.settings import Settings

log = logging.getLogger("vision_queue.worker")

# Sets the value if absent, refreshes the expiry if equal; returns the value recorded.
_CLAIM = """
local current = redis.call('GET', KEYS[1])
if not current then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return ARGV[1]
end
if current == ARGV[1] then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return current
"""


class VisibilityTimeoutConflict(RuntimeError):
    """This worker's VQ_VISIBILITY_TIMEOUT_S differs from the deployment's recorded one."""


def claim_visibility_timeout(client: redis.Redis, settings: Settings) -> None:
    """Record or confirm this worker's visibility timeout; raise on a different one.

    Retries while Redis is unreachable (a worker waits for its broker anyway).
    """
    delay = 0.5
    while True:
        try:
            recorded = _claim(client, settings.visibility_timeout_s)
            break
        except redis.RedisError as exc:
            log.warning(
                "cannot check VQ_VISIBILITY_TIMEOUT_S against Redis yet (%s); retrying",
                type(exc).__name__,
            )
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
    if recorded != str(settings.visibility_timeout_s):
        raise VisibilityTimeoutConflict(
            f"VQ_VISIBILITY_TIMEOUT_S={settings.visibility_timeout_s}, but the workers "
            f"sharing this Redis database run with VQ_VISIBILITY_TIMEOUT_S={recorded} "
            f"(recorded in {VISIBILITY_TIMEOUT_KEY}). With two values, the shorter one "
            "redelivers the other workers' running tasks. Start this worker with "
            f"VQ_VISIBILITY_TIMEOUT_S={recorded}, or stop every worker and delete the key "
            "to change it."
        )


def keep_visibility_timeout_claimed(client: redis.Redis, settings: Settings) -> threading.Thread:
    """Refresh the record's expiry while this worker runs (a daemon thread)."""
    interval_s = max(1.0, min(60.0, settings.visibility_timeout_s / 3))

    def refresh() -> None:
        while True:
            time.sleep(interval_s)
            try:
                recorded = _claim(client, settings.visibility_timeout_s)
            except redis.RedisError:
                continue  # Redis is away; the record outlives a few missed refreshes
            if recorded != str(settings.visibility_timeout_s):
                log.error(
                    "%s now holds %s, not this worker's VQ_VISIBILITY_TIMEOUT_S=%d: someone "
                    "changed it while workers run",
                    VISIBILITY_TIMEOUT_KEY,
                    recorded,
                    settings.visibility_timeout_s,
                )

    thread = threading.Thread(target=refresh, name="visibility-timeout-lease", daemon=True)
    thread.start()
    return thread


def _claim(client: redis.Redis, value: int) -> str:
    recorded = client.eval(_CLAIM, 1, VISIBILITY_TIMEOUT_KEY, str(value), str(value))
    return recorded.decode() if isinstance(recorded, bytes) else str(recorded)
