"""The native task API, for long jobs and for callers that want the queue's own model.

    POST   /v1/tasks              JSON or multipart -> 202 {"id": ...}
    GET    /v1/tasks/{id}         status while unfinished, then the result object
    GET    /v1/tasks/{id}/events  server-sent events: status, delta..., end (Last-Event-ID)
    DELETE /v1/tasks/{id}         cancel

Unlike a chat completion, a caller that leaves never cancels a task here: the task is
the caller's to follow later, from any gateway process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any, cast

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import UploadFile

from producer.documents import document_url
from producer.gateway import idempotency as idempotent
from producer.gateway import sse, usage
from producer.gateway.disconnect import close_stream
from producer.gateway.errors import ApiError, from_exception
from producer.gateway.state import Authorized, GatewayState, state_of
from producer.gateway.submission import check_owner, submit_task
from producer.gateway.wire import (
    CancelAccepted,
    DocumentData,
    TaskAccepted,
    TaskResultBody,
    TaskStatusBody,
    TaskSubmission,
    Unfinished,
    check_json_bounds,
    check_text,
    image_string,
    off_loop_if_large,
    submission_images,
)
from vision_queue.documents import decode_base64_document
from vision_queue.errors import (
    ClientError,
    ImageTooLarge,
    InvalidDocument,
    InvalidInput,
    TaskFailed,
)
from vision_queue.results import result_json
from vision_queue.schemas import ImageRef
from vision_queue.settings import Settings
from vision_queue.streams import check_cursor

router = APIRouter(prefix="/v1/tasks", tags=["Tasks"])

# An idle event stream gets a status event this often (progress, and keeps proxies open).
STATUS_EVERY_S = 10.0
_UNFINISHED = ("PENDING", "STARTED", "PROGRESS", "RETRY")
# Beside the errors every /v1 route documents (app._document_errors).
_COMMON: dict[int | str, dict[str, Any]] = {
    404: {"description": "No such task for this key (or its result expired)."},
}
_SUBMIT_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/TaskSubmission"}},
        "multipart/form-data": {"schema": {"$ref": "#/components/schemas/TaskUpload"}},
    },
}


@router.post(
    "",
    status_code=202,
    summary="Queue a task (JSON with image URLs or base64, or multipart files)",
    response_model=TaskAccepted,
    openapi_extra={"requestBody": _SUBMIT_BODY},
    responses={
        409: {"description": "The Idempotency-Key was used with another request."},
        415: {"description": "Not JSON or multipart/form-data."},
    },
)
async def create_task(request: Request, who: Authorized) -> JSONResponse:
    state = state_of(request)
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    document: bytes | str | None = None
    if kind == "multipart/form-data":
        submission, images, document = await _from_form(request, state)
    elif kind == "application/json" or kind.endswith("+json"):
        raw = await request.body()

        def parse() -> tuple[TaskSubmission, list[ImageRef | bytes]]:
            check_json_bounds(raw, state.settings.max_conversation_chars)
            submission = TaskSubmission.model_validate_json(raw)
            check_text(submission.model_dump(exclude={"images", "document"}))
            settings = state.settings
            allowlist = settings.private_host_allowlist
            return submission, submission_images(
                submission.images, settings.max_image_bytes, allowlist
            )

        submission, images = await off_loop_if_large(len(raw), parse)
        if submission.document is not None:
            document = await _json_document(submission.document, state.settings)
    else:
        raise ApiError(415, "invalid_input", "send application/json or multipart/form-data")
    handle = await idempotent.once(
        state,
        who.key_id,
        request,
        [submission.model_dump(mode="json"), *images, *([document] if document else [])],
        lambda task_id: submit_task(
            state,
            who,
            submission.task,
            images,
            prompt=submission.prompt,
            messages=None if submission.messages is None else tuple(submission.messages),
            options=submission.options,
            callback_url=submission.callback_url,
            priority=submission.priority,
            task_id=task_id,
            document=document,
            max_failed_pages=submission.max_failed_pages,
        ),
        idempotent.task_of(submission.task),
    )
    accepted = TaskAccepted(id=handle.id, task=handle.task)
    return JSONResponse(
        accepted.model_dump(mode="json"),
        status_code=202,
        headers={"Location": f"/v1/tasks/{handle.id}"},
    )


@router.get(
    "/{task_id}",
    summary="A task's status, or its result once it has ended",
    response_model=TaskStatusBody | TaskResultBody,
    responses=_COMMON,
)
async def get_task(task_id: str, request: Request, who: Authorized) -> JSONResponse:
    state = state_of(request)
    await check_owner(state, who, task_id)
    snapshot = await _snapshot(state, task_id)
    await usage.count(state, who.key_id, task_id, snapshot)
    return JSONResponse(snapshot)


@router.get(
    "/{task_id}/events",
    summary="Server-sent events: status, text deltas, the result; resumable",
    responses={
        200: {
            "description": "`event: status` (state, tokens), `event: delta` (seq, text, "
            "for a document the page it belongs to, for a task with options.n above 1 the "
            "choice, with options.logprobs its tokens' logprobs; `id:` is the cursor for "
            "Last-Event-ID), "
            "`event: end` (the result object).",
            "content": {"text/event-stream": {"schema": sse.EVENT_SCHEMA}},
        },
        **_COMMON,
    },
)
async def task_events(task_id: str, request: Request, who: Authorized) -> StreamingResponse:
    state = state_of(request)
    await check_owner(state, who, task_id)
    header = request.headers.get("last-event-id")
    after = header or request.query_params.get("after") or None
    check_cursor(after, "Last-Event-ID" if header else "after")  # 400, before any stream
    first = await _snapshot(state, task_id)  # 404 before the stream starts
    return StreamingResponse(
        _events(state, task_id, first, after), media_type=sse.MEDIA_TYPE, headers=sse.HEADERS
    )


@router.delete(
    "/{task_id}",
    status_code=202,
    summary="Cancel a task: a queued one never runs, a running one stops at its next token",
    response_model=CancelAccepted,
    responses={
        200: {"model": CancelAccepted, "description": "The task had already ended"},
        **_COMMON,
    },
)
async def cancel_task(task_id: str, request: Request, who: Authorized) -> JSONResponse:
    state = state_of(request)
    await check_owner(state, who, task_id)
    requested = await state.client.cancel(task_id)
    await state.limiter.release(who.key_id, task_id)
    if not requested:
        finished = CancelAccepted(id=task_id, status="already_finished")
        return JSONResponse(finished.model_dump(mode="json"), status_code=200)
    accepted = CancelAccepted(id=task_id, status="cancel_requested")
    return JSONResponse(accepted.model_dump(mode="json"), status_code=202)


# Internals --------------------------------------------------------------------------------


async def _snapshot(state: GatewayState, task_id: str) -> dict[str, Any]:
    status = await state.client.status(task_id)
    if status.done:
        result = await state.client.result(task_id)
        if result is not None:
            return TaskResultBody.of(result_json(result)).to_json()
    current = cast("Unfinished", status.state if status.state in _UNFINISHED else "PENDING")
    pages = {"pages_done": status.pages_done, "pages_total": status.pages_total}
    return TaskStatusBody(
        id=task_id,
        state=current,
        tokens=status.tokens,
        worker=status.worker,
        **(pages if status.pages_total else {}),
    ).model_dump(mode="json", exclude_none=True)


async def _events(
    state: GatewayState, task_id: str, first: dict[str, Any], after: str | None
) -> AsyncIterator[bytes]:
    yield sse.json_event(_status_of(first), name="status")
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=256)
    pump = asyncio.ensure_future(_pump(state, task_id, after, queue))
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), STATUS_EVERY_S)
            except asyncio.TimeoutError:
                try:
                    snapshot = await _snapshot(state, task_id)
                except ClientError as exc:
                    yield sse.json_event(from_exception(exc).body(), name="error")
                    return
                if snapshot["state"] in ("SUCCESS", "FAILURE") and pump.done():
                    yield sse.json_event(snapshot, name="end")
                    return
                yield sse.json_event(_status_of(snapshot), name="status")
                continue
            if isinstance(item, BaseException):
                yield sse.json_event(from_exception(item).body(), name="error")
                return
            if item is None:  # the stream ended without an end entry (expired)
                yield sse.json_event(await _snapshot(state, task_id), name="end")
                return
            if item.kind == "delta":
                # A document's pages and a task's choices stream side by side: marked.
                data: dict[str, Any] = {"seq": item.seq, "text": item.text, **item.marks()}
                yield sse.json_event(data, name="delta", event_id=item.cursor)
                continue
            result = TaskResultBody.of({"id": task_id, **(item.result or {})}).to_json()
            yield sse.json_event(result, name="end", event_id=item.cursor)
            return
    finally:
        with anyio.CancelScope(shield=True):
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump


async def _pump(
    state: GatewayState, task_id: str, after: str | None, queue: asyncio.Queue[Any]
) -> None:
    """Stream entries into `queue`, then None; an error is put there instead."""
    events = state.client.stream_events(task_id, after=after)
    try:
        async for item in events:
            await queue.put(item)
            if item.kind == "end":
                return
        await queue.put(None)
    except (ClientError, TaskFailed, OSError) as exc:
        await queue.put(exc)
    finally:
        with contextlib.suppress(Exception):
            await close_stream(events)


async def _json_document(given: DocumentData, settings: Settings) -> bytes | str:
    """PDF bytes (base64 decoded off the loop when large) or the checked URL of a PDF
    that a worker downloads."""
    data, url = given.data, given.url
    if (data is None) == (url is None):
        raise InvalidInput("give a document as exactly one of data and url", field="document")
    if url is not None:
        checked = document_url(url, settings, local_files=False)
        if checked is None:
            raise InvalidInput("document url must be an http(s) URL", field="document")
        return checked
    assert data is not None
    return await off_loop_if_large(
        len(data), lambda: decode_base64_document(data, settings.document_max_bytes)
    )


async def _form_document(item: Any, settings: Settings) -> bytes | None:
    """The multipart `document` field: a PDF file, read up to VQ_DOCUMENT_MAX_BYTES."""
    if item is None:
        return None
    if not isinstance(item, UploadFile):
        raise InvalidInput("document must be a file (a PDF)", field="document")
    data = await item.read(settings.document_max_bytes + 1)
    if len(data) > settings.document_max_bytes:
        raise InvalidDocument(
            f"the PDF is larger than VQ_DOCUMENT_MAX_BYTES={settings.document_max_bytes}",
            field="document",
        )
    return data


def _status_of(snapshot: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": snapshot["id"],
        "state": snapshot["state"],
        "tokens": snapshot.get("tokens", snapshot.get("usage", {}).get("completion_tokens", 0)),
    }


async def _from_form(
    request: Request, state: GatewayState
) -> tuple[TaskSubmission, list[ImageRef | bytes], bytes | None]:
    """Multipart: files (or URL text) under `images`, a PDF file under `document`, JSON
    text under messages/options."""
    settings = state.settings
    form = await request.form(max_files=settings.max_images, max_fields=32)
    try:
        fields: dict[str, Any] = {}
        names = ("task", "prompt", "callback_url", "messages", "options", "priority")
        for name in (*names, "max_failed_pages"):
            value = form.get(name)
            if value is None:
                continue
            if not isinstance(value, str):
                raise InvalidInput(f"{name} must be a text field, not a file", field=name)
            if name in ("messages", "options", "max_failed_pages"):
                try:
                    fields[name] = json.loads(value)
                except ValueError:
                    raise InvalidInput(f"{name} must be JSON", field=name) from None
            else:
                fields[name] = value
        submission = TaskSubmission.model_validate_json(json.dumps(fields))
        images: list[ImageRef | bytes] = []
        for index, item in enumerate(form.getlist("images")):
            where = f"images[{index}]"
            if isinstance(item, UploadFile):
                data = await item.read(settings.max_image_bytes + 1)
                if len(data) > settings.max_image_bytes:
                    raise ImageTooLarge(
                        f"image is more than the limit of {settings.max_image_bytes} bytes",
                        field=where,
                    )
                images.append(data)
            else:
                allowlist = settings.private_host_allowlist
                images.append(image_string(item, where, allowlist, settings.max_image_bytes))
        return submission, images, await _form_document(form.get("document"), settings)
    finally:
        await form.close()
