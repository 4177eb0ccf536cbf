"""Idempotency keys: the same key with the same request gives the same task, never a second.

Both Python clients (`submit(..., idempotency_key=...)`) and the gateway (the
`Idempotency-Key` header) use one record per key in Redis, written atomically by a script:

    vq:idem:{scope}:{sha256 of the key}  ->  {"f": fingerprint, "id": task or batch id,
                                              "done": 0 | 1}

The first request claims the record (`done` 0, kept `PENDING_S`) with a new id, queues its
task under that very id (`SubmitRequest.task_id`), then marks it done for `WINDOW_S`. A
second request with the same key meets the record: a different fingerprint is a conflict
(`IdempotencyConflict`; the gateway's 409 `idempotency_conflict`); the same one gets the
recorded id, after waiting out a claim still pending, so two racing requests queue one
task. A claim whose request failed is dropped, so a retry runs it. The scope keeps keys
apart: each API key at the gateway, `client` for the Python clients.

This module is sans-IO: the clients and the gateway run its scripts on their connection.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vision_queue.errors import InvalidInput, WaitTimeout
from vision_queue.protocol import KEY_PREFIX

IDEMPOTENCY_KEY = KEY_PREFIX + ":idem:{scope}:{digest}"
# How long a finished request's key answers with its id.
WINDOW_S = 24 * 3600
# How long a claim may stay pending (its request crashed mid-way): then the key is free.
PENDING_S = 60
# How long a second request waits for the first one's claim to resolve.
WAIT_S = 30.0
POLL_S = 0.05
# Longest key accepted (Stripe's limit).
MAX_KEY_LENGTH = 255
CLIENT_SCOPE = "client"

# KEYS[1]: the record. ARGV: fingerprint, new id, pending seconds.
# Returns {"new", id} when this request claimed the key, else {"seen", record}.
CLAIM = """
local seen = redis.call('GET', KEYS[1])
if seen then return {'seen', seen} end
local record = cjson.encode({f = ARGV[1], id = ARGV[2], done = 0})
redis.call('SET', KEYS[1], record, 'EX', tonumber(ARGV[3]))
return {'new', ARGV[2]}
"""
# KEYS[1]: the record. ARGV: id, window seconds. Marks this request's claim done.
FINISH = """
local seen = redis.call('GET', KEYS[1])
if not seen then return 0 end
local record = cjson.decode(seen)
if record.id ~= ARGV[1] then return 0 end
record.done = 1
redis.call('SET', KEYS[1], cjson.encode(record), 'EX', tonumber(ARGV[2]))
return 1
"""
# KEYS[1]: the record. ARGV: id. Drops this request's claim (its request failed).
RELEASE = """
local seen = redis.call('GET', KEYS[1])
if not seen then return 0 end
if cjson.decode(seen).id ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""


class IdempotencyConflict(InvalidInput):
    """The idempotency key was used with a different request."""


@dataclass(frozen=True)
class Outcome:
    """What a claim found: `new` (run the request as `id`), `done` (answer with `id`),
    `pending` (another request holds the key: wait) or `conflict`."""

    kind: str
    id: str


def record_key(scope: str, key: str) -> str:
    check_key(key)
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
    return IDEMPOTENCY_KEY.format(scope=scope, digest=digest)


def check_key(key: object) -> None:
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
        raise InvalidInput(
            f"an idempotency key is 1 to {MAX_KEY_LENGTH} characters", field="idempotency_key"
        )


def claim_args(record: str, fingerprint: str, new_id: str) -> tuple[Any, ...]:
    """The arguments of `eval` for CLAIM."""
    return (CLAIM, 1, record, fingerprint, new_id, PENDING_S)


def finish_args(record: str, task_id: str) -> tuple[Any, ...]:
    return (FINISH, 1, record, task_id, WINDOW_S)


def release_args(record: str, task_id: str) -> tuple[Any, ...]:
    return (RELEASE, 1, record, task_id)


def outcome(reply: Sequence[Any], fingerprint: str) -> Outcome:
    """Read CLAIM's reply."""
    kind, value = (_text(item) for item in reply)
    if kind == "new":
        return Outcome("new", value)
    record = json.loads(value)
    if record.get("f") != fingerprint:
        return Outcome("conflict", str(record.get("id", "")))
    return Outcome("done" if record.get("done") else "pending", str(record["id"]))


class ClientClaim:
    """One client submit under `key`, without I/O: the client evals `claim(new id)` until
    `decide` returns the outcome to act on (`new`: queue the request as its id, then eval
    `finish`, or `release` if queueing failed; `done`: the recorded task), sleeping
    `POLL_S` whenever it returns None (another request holds the key)."""

    def __init__(self, key: str, fingerprint: str) -> None:
        self.key = key
        self.record = record_key(CLIENT_SCOPE, key)
        self.fingerprint = fingerprint
        self.deadline = time.monotonic() + WAIT_S

    def claim(self, new_id: str) -> tuple[Any, ...]:
        return claim_args(self.record, self.fingerprint, new_id)

    def decide(self, reply: Sequence[Any]) -> Outcome | None:
        found = outcome(reply, self.fingerprint)
        if found.kind == "conflict":
            raise conflict(self.key)
        if found.kind in ("new", "done"):
            return found
        if time.monotonic() > self.deadline:
            raise WaitTimeout(f"the idempotency key {self.key[:64]!r} is held by a request")
        return None

    def finish(self, task_id: str) -> tuple[Any, ...]:
        return finish_args(self.record, task_id)

    def release(self, task_id: str) -> tuple[Any, ...]:
        return release_args(self.record, task_id)


def conflict(key: str) -> IdempotencyConflict:
    return IdempotencyConflict(
        f"the idempotency key {key[:64]!r} was already used with a different request",
        field="idempotency_key",
    )


def fingerprint(parts: Sequence[Any]) -> str:
    """A digest of a request's parts (bytes hashed as they are, the rest as JSON)."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, (bytes, bytearray, memoryview)):
            digest.update(b"b" + hashlib.sha256(part).digest())
        else:
            digest.update(b"j" + json.dumps(part, sort_keys=True, default=repr).encode())
    return digest.hexdigest()


def request_fingerprint(request: Any) -> str:
    """The fingerprint of a `SubmitRequest` (before any seed is drawn)."""
    parts: list[Any] = []
    for name, value in vars(request).items():
        if name == "images":
            parts.extend(_image_part(image) for image in value)
        elif name != "task_id":
            parts.append([name, value])
    return fingerprint(parts)


def _image_part(image: Any) -> Any:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, str):
        return image
    return repr(image)  # a path, an ImageRef, a PIL image or a file: by identity of form


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
