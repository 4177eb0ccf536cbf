"""Where a worker stores task states: first writer wins, and only while it holds the lease.

Results are stored as Celery's Redis backend stores them (the meta JSON under
`celery-task-meta-<id>`, PUBLISHed on the channel of that name, so clients and Flower read
them unchanged), but by one Lua script that refuses to write:

- after a final state (SUCCESS, FAILURE, REVOKED) is stored: a result is never replaced,
  so a task that ran twice (its worker froze and came back) still has exactly one result;
- when the writer no longer holds the task's lease (`worker.broker.leases`): a worker that lost
  its message to another stops writing the moment the other one owns it.

A final state is stored together with the stream's last delta and its "end" entry, in the
same script, so a stream's end and the result exist together or not at all.

Storing a final state is retried on Redis errors (out of memory, lost connection, read-only
replica) for at most VQ_LEASE_TTL_S; then the task is handed back (`StoreGaveUp`), and a
live worker runs it again once Redis accepts writes.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import redis
from celery.backends.redis import RedisBackend, SentinelBackend

from vision_queue.protocol import FINAL_STATES, LEASE_KEY, STREAM_MAX_ENTRIES
from vision_queue.results import result_key, task_failed_json
from vision_queue.schemas import redact_message
from vision_queue.sentinel import is_sentinel_url
from vision_queue.settings import Settings
from vision_queue.streams import stream_key

if TYPE_CHECKING:
    from worker.broker.leases import Lease

log = logging.getLogger("vision_queue.task")

# KEYS: meta, lease, stream. ARGV: meta JSON, expiry s, lease owner ("" = no lease check),
# final ("1"/"0"), last delta text, its seq, the end entry's seq, stream MAXLEN, end result,
# then a task with several choices: each choice's last delta as two values, choice and text
# (numbered on from the last delta's seq, in place of the last delta's text).
_STORE = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' then
    local state = meta['status']
    if state == 'SUCCESS' or state == 'FAILURE' or state == 'REVOKED' then
      return 'exists'
    end
  end
end
if ARGV[3] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[3] then
  return 'lost'
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('PUBLISH', KEYS[1], ARGV[1])
if ARGV[4] == '1' then
  if ARGV[5] ~= '' then
    redis.call('XADD', KEYS[3], 'MAXLEN', ARGV[8], '*',
               'seq', ARGV[6], 'kind', 'delta', 'text', ARGV[5])
  end
  for i = 10, #ARGV, 2 do
    redis.call('XADD', KEYS[3], 'MAXLEN', ARGV[8], '*', 'seq', tonumber(ARGV[6]) + (i - 10) / 2,
               'kind', 'delta', 'text', ARGV[i + 1], 'choice', ARGV[i])
  end
  local id = redis.call('XADD', KEYS[3], 'MAXLEN', ARGV[8], '*',
                        'seq', ARGV[7], 'kind', 'end', 'result', ARGV[9])
  redis.call('EXPIRE', KEYS[3], ARGV[2])
  redis.call('PUBLISH', KEYS[3], id)
end
return 'stored'
"""

STORED, EXISTS, LOST = "stored", "exists", "lost"
_FIRST_PAUSE_S, _LONGEST_PAUSE_S = 0.2, 2.0


class StoreGaveUp(Exception):
    """Redis refused the final state for longer than the bound: hand the task back."""


@dataclass(frozen=True)
class StreamTail:
    """What the stream still lacks when the task ends: its last delta, then the end entry."""

    text: str = ""
    delta_seq: int = 0
    end_seq: int = 0
    # A task with several choices: each choice's last delta, (choice, text), numbered from
    # `delta_seq` on (`text` is then empty).
    choices: tuple[tuple[int, str], ...] = ()


class ResultStore:
    def __init__(
        self,
        results: redis.Redis,
        leases: redis.Redis,
        settings: Settings,
        worker_name: str,
        *,
        same_server: bool,
    ) -> None:
        self.results = results
        self.leases = leases
        self.settings = settings
        self.worker_name = worker_name
        # One Redis for both: the lease is checked inside the store script (atomic). Two:
        # it is checked just before, on the broker.
        self.same_server = same_server
        self._script = results.register_script(_STORE)

    def final_state(self, task_id: str) -> str | None:
        """The stored final state, if any: a redelivered task that already finished is not
        run again."""
        raw = self.results.get(result_key(task_id))
        if raw is None:
            return None
        try:
            state = json.loads(raw).get("status")
        except (ValueError, AttributeError):
            return None
        return state if state in FINAL_STATES else None

    def update(
        self, task_id: str, name: str, state: str, result: Any, lease: Lease | None, retries: int
    ) -> bool:
        """A state on the way (STARTED, PROGRESS, RETRY); best effort, never raises."""
        try:
            return self._store(task_id, name, state, result, lease, retries, None) == STORED
        except (redis.RedisError, OSError) as exc:
            log.debug("task id=%s: %s not stored (%s)", task_id, state, type(exc).__name__)
            return False

    def finish(
        self,
        task_id: str,
        name: str,
        state: str,
        result: dict[str, Any],
        lease: Lease | None,
        retries: int,
        tail: StreamTail,
    ) -> str:
        """Store the final state; STORED, EXISTS (someone stored one first) or LOST (the
        lease is someone else's). Retries Redis errors while the bound lasts, then raises
        StoreGaveUp."""
        stored = {**result, "state": "SUCCESS" if state == "SUCCESS" else "FAILURE"}
        value = result if state == "SUCCESS" else task_failed_json(result)
        give_up_at = time.monotonic() + self.settings.lease_ttl_s
        pause = _FIRST_PAUSE_S
        while True:
            try:
                return self._store(task_id, name, state, value, lease, retries, (tail, stored))
            except (redis.RedisError, OSError) as exc:
                if time.monotonic() + pause > give_up_at:
                    raise StoreGaveUp(f"{type(exc).__name__}: {exc}") from exc
                log.warning(
                    "task id=%s: storing the result failed (%s); retrying",
                    task_id,
                    type(exc).__name__,
                )
            time.sleep(pause)
            pause = min(_LONGEST_PAUSE_S, pause * 2)

    def _store(
        self,
        task_id: str,
        name: str,
        state: str,
        value: Any,
        lease: Lease | None,
        retries: int,
        final: tuple[StreamTail, dict[str, Any]] | None,
    ) -> str:
        owner = lease.owner if lease is not None else ""
        lease_key = LEASE_KEY.format(tag=lease.tag) if lease is not None else LEASE_KEY
        if lease is not None and not self.same_server:
            if _text(self.leases.get(lease_key)) != owner:
                return LOST
            owner = ""
        meta = self.meta(task_id, name, state, value, retries)
        tail, stored = final if final is not None else (StreamTail(), {})
        reply = self._script(
            keys=[result_key(task_id), lease_key, stream_key(task_id)],
            args=[
                meta,
                self.settings.result_expires_s,
                owner,
                "1" if final is not None else "0",
                tail.text,
                tail.delta_seq,
                tail.end_seq,
                STREAM_MAX_ENTRIES,
                json.dumps(stored, ensure_ascii=False) if final is not None else "",
                *[value for choice, text in tail.choices for value in (choice, text)],
            ],
        )
        return _text(reply)

    def meta(self, task_id: str, name: str, state: str, value: Any, retries: int) -> str:
        """Celery's meta JSON (result_extended), without args: they may hold signed URLs."""
        done = state in FINAL_STATES
        return json.dumps(
            {
                "status": state,
                "result": value,
                "traceback": None,
                "children": [],
                "date_done": datetime.now(timezone.utc).isoformat() if done else None,
                "task_id": task_id,
                "name": name,
                "args": None,
                "kwargs": None,
                "worker": self.worker_name,
                "retries": retries,
                "queue": self.settings.queue,
            },
            ensure_ascii=False,
        )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


class FirstWriterRedisBackend(RedisBackend):
    """Celery's Redis backend for what Celery itself stores on a worker (a refused,
    unregistered task; a revoked one): the same first-writer-wins rule as our own states,
    and no signed URL kept: with `result_extended`, Celery writes the task's arguments into
    the meta, and those hold image URLs whole, so their query strings are removed
    (`vision_queue.schemas.redact_message`). The message on the queue keeps the full URLs."""

    def _get_result_meta(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        meta: dict[str, Any] = super()._get_result_meta(*args, **kwargs)
        if isinstance(meta.get("args"), (list, tuple)):
            meta["args"] = [redact_message(arg) for arg in meta["args"]]
        if meta.get("kwargs"):
            meta["kwargs"] = {}
        return meta

    def _set(self, key: str, value: str, expires: int | None = None) -> None:
        if expires is None:
            expires = self.expires
        script = self.client.register_script(_STORE)
        # Final "0": no stream entry; no lease check (Celery's own writes hold no lease).
        script(
            keys=[key, LEASE_KEY, key],
            args=[value, int(expires or 86400), "", "0", "", 0, 0, STREAM_MAX_ENTRIES, ""],
        )


class FirstWriterSentinelBackend(FirstWriterRedisBackend, SentinelBackend):
    """`FirstWriterRedisBackend` for a sentinel:// result backend: Celery's SentinelBackend
    finds the master through the sentinels on every new connection."""


def backend_url(settings: Settings) -> str:
    """The result backend setting that makes a worker's app use `FirstWriterRedisBackend`
    (or its Sentinel twin)."""
    url = settings.effective_backend_url
    backend = FirstWriterSentinelBackend if is_sentinel_url(url) else FirstWriterRedisBackend
    return f"{backend.__module__}:{backend.__name__}+{url}"
