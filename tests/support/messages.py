"""Raw queue items, written the way kombu's Redis transport stores them (LPUSH of a JSON
envelope, base64 body), so tests can put on the queue anything a producer in another
language, an old version or an attacker with the Redis password could."""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

import redis

from vision_queue.protocol import DEAD_LETTER_KEY

QUEUE = "gpu"
NO_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def request(task: str = "ask", prompt: str | None = "Say hi.") -> dict[str, Any]:
    return {
        "v": 1,
        "task": task,
        "prompt": prompt,
        "images": [],
        "options": {},
        "submitted_at": time.time(),
    }


def headers(task_id: str, name: str = "vision_queue.ask") -> dict[str, Any]:
    """The protocol-2 headers `producer.Client` sends (see a real message in Redis)."""
    return {
        "lang": "py",
        "task": name,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": "(ask)",
        "kwargsrepr": "{}",
        "origin": "test@host",
        "ignore_result": None,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }


def envelope(
    body: bytes | str | Any,
    message_headers: dict[str, Any] | None,
    *,
    content_type: str | None = "application/json",
    content_encoding: str | None = "utf-8",
) -> dict[str, Any]:
    """kombu's stored form; a body that is not bytes or str is JSON-encoded first."""
    if not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    raw = body.encode() if isinstance(body, str) else body
    return {
        "body": base64.b64encode(raw).decode(),
        "content-encoding": content_encoding,
        "content-type": content_type,
        "headers": message_headers,
        "properties": {
            "correlation_id": (message_headers or {}).get("id") or str(uuid.uuid4()),
            "reply_to": str(uuid.uuid4()),
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": QUEUE},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }


def valid_body(message: dict[str, Any] | None = None) -> list[Any]:
    return [[message or request()], {}, dict(NO_EMBED)]


def push(client: redis.Redis, item: dict[str, Any] | bytes | str) -> None:
    """Put one raw item on the queue, exactly where kombu's publish would."""
    client.lpush(QUEUE, item if isinstance(item, (bytes, str)) else json.dumps(item))


def dead_letters(client: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in client.lrange(DEAD_LETTER_KEY, 0, -1)]


def wait_for_dead_letters(client: redis.Redis, count: int, timeout_s: float = 60) -> list[dict]:
    """Wait until the dead-letter list holds at least `count` entries; return them."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        entries = dead_letters(client)
        if len(entries) >= count:
            return entries
        time.sleep(0.05)
    raise TimeoutError(f"dead-letter list has {len(dead_letters(client))} of {count} entries")
