"""The gateway's `Idempotency-Key` header (POST /v1/tasks, /v1/chat/completions, /v1/batches).

The record and its rules are `producer.idempotency`'s, scoped by the caller's key id, so
two API keys never see each other's keys. The fingerprint is what the route submits (the
method, the path and the request's parsed content), so the same key with a different body
is 409 `idempotency_conflict`. A second request with a key still being served waits for
the first to queue its task, then answers with that task: two identical requests racing
create one task.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from fastapi import Request

from producer import idempotency
from producer.envelope import new_id
from producer.gateway.errors import ApiError
from producer.gateway.state import GatewayState
from vision_queue.errors import InvalidInput
from vision_queue.protocol import TaskName
from vision_queue.results import TaskHandle

T = TypeVar("T")
HEADER = "idempotency-key"
CONFLICT = "idempotency_conflict"


def task_of(task: TaskName) -> Callable[[str], Awaitable[TaskHandle]]:
    """The replay of a route that queues a task: the first request's task."""

    async def replay(task_id: str) -> TaskHandle:
        return TaskHandle(task_id, task)

    return replay


def key_of(request: Request) -> str | None:
    key = request.headers.get(HEADER)
    if key is None:
        return None
    try:
        idempotency.check_key(key)
    except InvalidInput as exc:
        exc.field = "Idempotency-Key"
        raise
    return key


async def once(
    state: GatewayState,
    key_id: str,
    request: Request,
    parts: Sequence[Any],
    create: Callable[[str | None], Awaitable[T]],
    replay: Callable[[str], Awaitable[T]],
) -> T:
    """`create(id)` once per Idempotency-Key (`create(None)` without one); `replay(id)` for
    the requests that repeat it."""
    key = key_of(request)
    if key is None:
        return await create(None)
    record = idempotency.record_key(key_id, key)
    mark = idempotency.fingerprint([request.method, request.url.path, *parts])
    deadline = time.monotonic() + idempotency.WAIT_S
    while True:
        reply = await state.redis.eval(*idempotency.claim_args(record, mark, new_id()))
        found = idempotency.outcome(reply, mark)
        if found.kind == "conflict":
            raise ApiError(
                409,
                CONFLICT,
                f"the Idempotency-Key {key[:64]!r} was already used with a different request",
                param="Idempotency-Key",
            )
        if found.kind == "done":
            return await replay(found.id)
        if found.kind == "new":
            break
        if time.monotonic() > deadline:
            raise ApiError(
                409, CONFLICT, "a request with this Idempotency-Key is still being served"
            )
        await asyncio.sleep(idempotency.POLL_S)
    try:
        created = await create(found.id)
    except BaseException:
        await state.redis.eval(*idempotency.release_args(record, found.id))
        raise
    await state.redis.eval(*idempotency.finish_args(record, found.id))
    return created
