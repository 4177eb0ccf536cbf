"""OpenAI-compatible routes: `POST /v1/chat/completions`, `GET /v1/models`.

A completion is an `ask` task: queued like any other (durable, fair, cancellable), then
waited for (non-streaming) or followed on the task's stream (streaming). A caller that
disconnects before the end cancels its task, since nobody else will read the answer; so
does a wait past VQ_GATEWAY_WAIT_TIMEOUT_S (504).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from producer.gateway import chat, sse, usage
from producer.gateway import idempotency as idempotent
from producer.gateway.answers import (
    check_model,
    end_stream,
    finished_task,
    submit_conversation,
)
from producer.gateway.auth import Caller
from producer.gateway.chat_documents import document_pages
from producer.gateway.errors import from_exception, task_error
from producer.gateway.state import Authorized, GatewayState, state_of
from producer.gateway.wire import check_json_bounds, check_text, off_loop_if_large
from vision_queue.errors import ClientError, TaskFailed, VisionQueueError
from vision_queue.protocol import TaskName

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])

# nginx's convention for "the client closed the request": only metrics ever see it.
# Beside the errors every /v1 route documents (app._document_errors).
_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "Unknown model."},
    409: {"description": "The task was cancelled."},
    500: {"description": "The model failed (model_error)."},
    504: {"description": "The task did not finish within VQ_GATEWAY_WAIT_TIMEOUT_S."},
}


@router.get("/models", summary="The served model")
async def list_models(request: Request, who: Authorized) -> dict[str, Any]:
    name = state_of(request).settings.gateway_model_name
    return {"object": "list", "data": [chat.model_card(name)]}


@router.get("/models/{model_id}", summary="One model", responses={404: _ERRORS[404]})
async def get_model(model_id: str, request: Request, who: Authorized) -> dict[str, Any]:
    name = state_of(request).settings.gateway_model_name
    check_model(model_id, name)
    return chat.model_card(name)


_CHAT_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}
    },
}


@router.post(
    "/chat/completions",
    summary="Chat completion (text and image_url parts; stream or not)",
    openapi_extra={"requestBody": _CHAT_BODY},
    responses={
        200: {
            "description": "The completion, or with `stream: true` server-sent chunks "
            "ending with `data: [DONE]`.",
            "content": {"text/event-stream": {"schema": sse.EVENT_SCHEMA}},
        },
        **_ERRORS,
    },
)
async def chat_completions(request: Request, who: Authorized) -> Response:
    state = state_of(request)
    settings = state.settings
    model = settings.gateway_model_name
    raw = await request.body()

    def parse() -> tuple[chat.ChatCompletionRequest, chat.Conversation]:
        check_json_bounds(raw, settings.max_conversation_chars)
        body = chat.ChatCompletionRequest.model_validate_json(raw)
        check_text({**body.model_dump(), **(body.model_extra or {})})
        check_model(body.model, model)
        allowlist = settings.private_host_allowlist

        def documents(file_data: str, where: str, images: int) -> list[bytes]:
            return document_pages(file_data, where, images, settings)

        return body, chat.conversation(body, allowlist, settings.max_image_bytes, documents)

    # A `file` part's pages are drawn while parsing: never on the event loop, and only so
    # many at once (each draw may hold up to VQ_DOCUMENT_PAGE_MEMORY_BYTES).
    if b'"file"' in raw:
        body, convo = await anyio.to_thread.run_sync(parse, limiter=state.document_renders)
    else:
        body, convo = await off_loop_if_large(len(raw), parse)
    try:
        handle = await idempotent.once(
            state,
            who.key_id,
            request,
            [await request.body()],
            lambda task_id: submit_conversation(state, who, convo, task_id),
            idempotent.task_of(TaskName.ASK),
        )
    except VisionQueueError as exc:
        exc.field = convo.param_of(exc.field)
        raise
    headers = {"X-Task-Id": handle.id}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(
                state,
                who,
                handle.id,
                model,
                include_usage,
                convo.options.logprobs,
                convo.options.n or 1,
            ),
            media_type=sse.MEDIA_TYPE,
            headers={**sse.HEADERS, **headers},
        )
    outcome = await finished_task(state, request, who, handle.id, headers, convo.param_of)
    if isinstance(outcome, Response):
        return outcome
    return JSONResponse(chat.completion(handle.id, model, outcome), headers=headers)


async def _stream(
    state: GatewayState,
    who: Caller,
    task_id: str,
    model: str,
    include_usage: bool,
    wants_logprobs: bool = False,
    choices: int = 1,
) -> AsyncIterator[bytes]:
    created = int(time.time())
    ended = False
    events = state.client.stream_events(task_id)
    try:
        for index in range(choices):  # OpenAI's first chunk of each choice names the role
            role = {"role": "assistant"}
            yield sse.json_event(chat.chunk(task_id, model, created, role, None, None, index))
        sent: dict[int, int] = {}  # per choice: logprobs entries already in chunks
        async for item in events:
            if item.kind == "delta":
                if item.text or item.logprobs:
                    delta = {"content": item.text}
                    index = item.choice or 0
                    entries = item.logprobs if wants_logprobs else None
                    sent[index] = sent.get(index, 0) + len(entries or ())
                    yield sse.json_event(
                        chat.chunk(task_id, model, created, delta, None, entries, index)
                    )
                continue
            ended = True
            result = item.result or {}
            await usage.count(state, who.key_id, task_id, result)
            if result.get("error") or result.get("state") == "FAILURE":
                # OpenAI's streamed error: SDKs raise it as an APIError.
                yield sse.json_event(task_error(result.get("error") or {}).body())
                return
            for choice in result.get("choices") or [result]:
                index = int(choice.get("index", 0))
                reason = choice.get("finish_reason") or "stop"
                # Entries of tokens whose text came with the end (held back until then).
                rest = (
                    (choice.get("logprobs") or [])[sent.get(index, 0) :]
                    if wants_logprobs
                    else None
                )
                yield sse.json_event(chat.chunk(task_id, model, created, {}, reason, rest, index))
            if include_usage:
                yield sse.json_event(chat.usage_chunk(task_id, model, created, result))
            yield sse.event("[DONE]")
            return
    except (ClientError, TaskFailed) as exc:  # Redis went away, or the stream broke
        yield sse.json_event(from_exception(exc).body())
    finally:
        await end_stream(state, who, task_id, events, ended)
