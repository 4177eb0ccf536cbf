"""OpenAI's Batch API: `/v1/batches`.

    POST /v1/batches              input_file_id, endpoint, completion_window "24h", metadata
                                  (and `priority`, this gateway's extension: low by default)
    GET  /v1/batches              the caller's batches, newest first (limit, after)
    GET  /v1/batches/{id}
    POST /v1/batches/{id}/cancel

Creating a batch checks every line of its input file (`batch_lines`): the good ones are
stored to run, the bad ones go to the error file. The batch feeder (`batch_feeder`) then
queues the lines as ordinary `ask` tasks, a few at a time as the queue drains, and writes
the output and error files when the last line has ended. A batch belongs to the key that
created it; another key gets 404.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from producer.gateway import batch_store as store
from producer.gateway import files
from producer.gateway import idempotency as idempotent
from producer.gateway.batch_lines import ENDPOINTS, MAX_LINES, check_file
from producer.gateway.errors import ApiError, GatewayCode
from producer.gateway.listing import list_page
from producer.gateway.state import Authorized, state_of
from vision_queue.errors import InvalidInput
from vision_queue.protocol import Priority
from vision_queue.schemas import parse_priority

router = APIRouter(prefix="/v1/batches", tags=["Batches"])
_MISSING: dict[int | str, dict[str, Any]] = {404: {"description": "No such batch for this key."}}


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="allow")
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None
    priority: str | None = Field(
        None, description="vision-queue extension: the lines' priority; low by default."
    )


@router.post(
    "",
    summary="Create a batch from an uploaded JSONL file",
    responses={
        404: {"description": "No such input file for this key."},
        409: {"description": "The Idempotency-Key was used with another request."},
    },
)
async def create_batch(body: BatchCreate, request: Request, who: Authorized) -> dict[str, Any]:
    state = state_of(request)
    if body.endpoint not in ENDPOINTS:
        raise InvalidInput(f"endpoint must be one of {', '.join(ENDPOINTS)}", field="endpoint")
    if body.completion_window not in store.WINDOWS:
        raise InvalidInput('completion_window must be "24h"', field="completion_window")
    if body.metadata is not None and len(body.metadata) > 16:
        raise InvalidInput("metadata has at most 16 pairs", field="metadata")
    priority = parse_priority(body.priority) if body.priority else Priority.LOW

    async def create(seed: str | None) -> dict[str, Any]:
        batch_id = store.new_batch_id(seed or files.new_file_id()[5:])
        content = await files.content_of(state, who.key_id, body.input_file_id)
        model = state.settings.gateway_model_name
        checked = await anyio.to_thread.run_sync(
            check_file, content, body.endpoint, model, state.settings, priority
        )
        if checked.total == 0:
            raise InvalidInput("the input file has no lines", field="input_file_id")
        if checked.total > MAX_LINES:
            raise InvalidInput(f"a batch has at most {MAX_LINES} lines", field="input_file_id")
        now = int(time.time())
        meta = {
            "id": batch_id,
            "owner": who.key_id,
            "endpoint": body.endpoint,
            "input_file_id": body.input_file_id,
            "completion_window": body.completion_window,
            "metadata": body.metadata,
            "created_at": now,
            "expires_at": now + store.WINDOWS[body.completion_window],
            "priority": priority.value,
            "total": checked.total,
            "valid": len(checked.valid),
            "refused": len(checked.errors),
        }
        record = await store.write_new(state.redis, meta, checked.valid, checked.errors)
        return store.batch_object(record)

    async def replay(batch_id: str) -> dict[str, Any]:
        record = await store.owned(state.redis, store.new_batch_id(batch_id), who.key_id)
        if record is None:
            raise _missing(batch_id)
        return store.batch_object(record)

    parts = [body.model_dump(mode="json")]
    return await idempotent.once(state, who.key_id, request, parts, create, replay)


@router.get("", summary="The caller's batches, newest first")
async def list_batches(
    request: Request,
    who: Authorized,
    limit: int = Query(20, ge=1, le=100),
    after: str | None = None,
) -> dict[str, Any]:
    state = state_of(request)
    index = store.KEY_BATCHES_KEY.format(key_id=who.key_id)
    ids = [store._text(i) for i in await state.redis.zrevrange(index, 0, -1)]

    async def load(batch_ids: list[str]) -> list[dict[str, Any] | None]:
        records = await store.read_many(state.redis, batch_ids)
        return [
            store.batch_object(record)
            if record is not None and record["meta"]["owner"] == who.key_id
            else None
            for record in records
        ]

    return await list_page(ids, after, limit, load)


@router.get("/{batch_id}", summary="A batch", responses=_MISSING)
async def get_batch(batch_id: str, request: Request, who: Authorized) -> dict[str, Any]:
    record = await store.owned(state_of(request).redis, batch_id, who.key_id)
    if record is None:
        raise _missing(batch_id)
    return store.batch_object(record)


@router.post(
    "/{batch_id}/cancel",
    summary="Cancel a batch: queued lines stop, running ones end",
    responses=_MISSING,
)
async def cancel_batch(batch_id: str, request: Request, who: Authorized) -> dict[str, Any]:
    state = state_of(request)
    record = await store.owned(state.redis, batch_id, who.key_id)
    if record is None:
        raise _missing(batch_id)
    await state.redis.eval(store.CANCEL, 1, store.key(batch_id), int(time.time()))
    record = await store.owned(state.redis, batch_id, who.key_id)
    return store.batch_object(record or {})


def _missing(batch_id: str) -> ApiError:
    return ApiError(404, GatewayCode.NOT_FOUND.value, f"no batch {batch_id[:100]!r}")
