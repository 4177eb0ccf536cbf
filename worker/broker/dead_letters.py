"""Where refused messages go: a capped, expiring list in Redis, and a coded failure.

Each refused message becomes one JSON entry at the head of DEAD_LETTER_KEY:

    {"at": 1764590000.12, "worker": "gpu0@host", "queue": "gpu", "code": "body",
     "reason": "message arguments are not one request object",
     "task_id": "3f0c…" | null, "task": "describe" | null, "size": 812,
     "message": {"content_type": …, "content_encoding": …, "headers": {…},
                 "body_base64": "…", "truncated": false}}

The list keeps the newest DEAD_LETTER_MAX_ENTRIES entries and expires
DEAD_LETTER_TTL_S after the last push, so a flood of bad messages cannot fill Redis.
The message itself is kept (up to MAX_KEPT_BODY_BYTES of body) for an operator to look
at with redis-cli; `worker dead-letters` prints only the metadata, never the bytes.

When the id is a readable UUID the client would otherwise wait forever, so a coded
`invalid_input` failure is stored for it, exactly as worker/tasks.py stores failures
(TaskFailed holding the result dict), but only if no result exists for that id yet: a
message that reuses a real task's id must not replace that task's result.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from typing import Any

import redis
from celery import states
from kombu.utils.json import dumps as kombu_dumps

from vision_queue.errors import InvalidInput, TaskFailed
from vision_queue.protocol import DEAD_LETTER_KEY, DEAD_LETTER_MAX_ENTRIES, DEAD_LETTER_TTL_S
from vision_queue.results import TaskResult
from worker.broker.intake import Refusal

log = logging.getLogger("vision_queue.worker")

MAX_KEPT_BODY_BYTES = 64 * 1024


def dead_letter_entry(
    refusal: Refusal,
    *,
    worker: str,
    queue: str,
    content_type: Any,
    content_encoding: Any,
    headers: Any,
    body: Any,
) -> dict[str, Any]:
    raw = body if isinstance(body, bytes) else str(body or "").encode("utf-8", "surrogatepass")
    try:
        kept_headers = json.loads(kombu_dumps(headers)) if isinstance(headers, dict) else None
    except (TypeError, ValueError):
        kept_headers = None
    return {
        "at": round(time.time(), 3),
        "worker": worker,
        "queue": queue,
        "code": refusal.code,
        "reason": refusal.reason,
        "task_id": refusal.task_id,
        "task": refusal.task,
        "size": len(raw),
        "message": {
            "content_type": content_type if isinstance(content_type, str) else None,
            "content_encoding": content_encoding if isinstance(content_encoding, str) else None,
            "headers": kept_headers,
            "body_base64": base64.b64encode(raw[:MAX_KEPT_BODY_BYTES]).decode("ascii"),
            "truncated": len(raw) > MAX_KEPT_BODY_BYTES,
        },
    }


def push_dead_letter(client: redis.Redis, entry: dict[str, Any]) -> None:
    pipe = client.pipeline(transaction=True)
    pipe.lpush(DEAD_LETTER_KEY, json.dumps(entry))
    pipe.ltrim(DEAD_LETTER_KEY, 0, DEAD_LETTER_MAX_ENTRIES - 1)
    pipe.expire(DEAD_LETTER_KEY, DEAD_LETTER_TTL_S)
    pipe.execute()


def read_dead_letters(client: redis.Redis, limit: int = 50) -> list[dict[str, Any]]:
    """The newest `limit` entries, each without its message bytes (metadata only)."""
    entries: list[dict[str, Any]] = []
    for raw in client.lrange(DEAD_LETTER_KEY, 0, max(0, limit - 1)):
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if isinstance(entry, dict):
            message = entry.pop("message", None)
            if isinstance(message, dict):
                entry["content_type"] = message.get("content_type")
            entries.append(entry)
    return entries


def store_refusal_failure(backend: Any, refusal: Refusal, worker: str) -> bool:
    """Store `invalid_input` for the refused message's id unless a result exists already.

    Returns True when stored. `backend` is the app's Celery Redis result backend: its own
    key, encoding and expiry are used, so clients read this like any other failure.
    """
    if refusal.task_id is None:
        return False
    error = InvalidInput(
        f"the worker refused the message before running it: {refusal.reason}", field="message"
    )
    result = TaskResult(id=refusal.task_id, task=refusal.task or "", worker=worker)
    result.error = error.to_dict()
    meta = backend._get_result_meta(
        result=backend.prepare_exception(TaskFailed(result.to_dict())),
        state=states.FAILURE,
        traceback=None,
        request=None,
    )
    meta.update(task_id=refusal.task_id, name=refusal.task or None, worker=worker)
    key = backend.get_key_for_task(refusal.task_id)
    value = backend.encode(meta)
    expires = getattr(backend, "failure_expires", None) or backend.expires
    client: redis.Redis = backend.client
    # NX: first writer wins, so a real task's result (or its STARTED/PROGRESS state,
    # which it will replace itself) is never overwritten by a message reusing its id.
    if not client.set(key, value, nx=True, ex=int(expires) if expires else None):
        return False
    client.publish(key, value)  # Celery's result waiters listen on the key's channel
    return True
