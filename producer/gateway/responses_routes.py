"""`POST /v1/responses`: OpenAI's Responses API on the chat completions' task path.

Like a chat completion, a response is an `ask` task, waited for or followed on the task's
stream; a caller that leaves early cancels it. With `stream: true` the events are the
ones OpenAI's SDKs read: `response.created`, `response.in_progress`,
`response.output_item.added`, `response.content_part.added`, `response.output_text.delta`
(one per text delta), `response.output_text.done`, `response.content_part.done`,
`response.output_item.done`, then `response.completed` (or `response.incomplete` at the
token limit, `response.failed` when the task failed), each with its `sequence_number`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from producer.gateway import chat, sse, usage
from producer.gateway import responses as shapes
from producer.gateway.answers import (
    check_model,
    end_stream,
    finished_task,
    submit_conversation,
)
from producer.gateway.auth import Caller
from producer.gateway.errors import from_exception, task_error
from producer.gateway.state import Authorized, GatewayState, state_of
from vision_queue.errors import ClientError, TaskFailed, VisionQueueError

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])


@router.post(
    "/responses",
    summary="Create a model response (stateless; stream or not)",
    responses={
        200: {
            "description": "The response object, or with `stream: true` its events.",
            "content": {"text/event-stream": {"schema": sse.EVENT_SCHEMA}},
        },
        404: {"description": "Unknown model."},
        504: {"description": "The task did not finish within VQ_GATEWAY_WAIT_TIMEOUT_S."},
    },
)
async def create_response(
    body: shapes.ResponsesRequest, request: Request, who: Authorized
) -> Response:
    state = state_of(request)
    model = state.settings.gateway_model_name
    check_model(body.model, model)
    convo = chat.conversation(shapes.chat_request(body), state.settings.private_host_allowlist)
    try:
        handle = await submit_conversation(state, who, convo)
    except VisionQueueError as exc:
        exc.field = _param(convo.param_of(exc.field))
        raise
    headers = {"X-Task-Id": handle.id}
    created = shapes.now()
    if body.stream:
        return StreamingResponse(
            _stream(state, who, handle.id, model, body, created),
            media_type=sse.MEDIA_TYPE,
            headers={**sse.HEADERS, **headers},
        )
    outcome = await finished_task(
        state, request, who, handle.id, headers, lambda field: _param(convo.param_of(field))
    )
    if isinstance(outcome, Response):
        return outcome
    return JSONResponse(shapes.response(handle.id, model, body, created, outcome), headers=headers)


def _param(field: str | None) -> str | None:
    """`messages[i]...` of the chat form back in the request's terms, roughly: `input`."""
    if field and field.startswith("messages["):
        return "input"
    return field


class _Events:
    """Numbers the events of one stream."""

    def __init__(self) -> None:
        self.sequence = 0

    def __call__(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse.json_event(data, name=kind)


async def _stream(
    state: GatewayState,
    who: Caller,
    task_id: str,
    model: str,
    body: shapes.ResponsesRequest,
    created: int,
) -> AsyncIterator[bytes]:
    emit = _Events()
    ended = False
    item_id = shapes.message_id(task_id)
    at = {"item_id": item_id, "output_index": 0, "content_index": 0}
    text: list[str] = []
    events = state.client.stream_events(task_id)
    try:
        start = shapes.response(task_id, model, body, created)
        yield emit("response.created", response=start)
        yield emit("response.in_progress", response=start)
        item = shapes.message(task_id, "", status="in_progress")
        yield emit("response.output_item.added", output_index=0, item=item)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        yield emit("response.content_part.added", **at, part=part)
        async for event in events:
            if event.kind == "delta":
                if event.text:
                    text.append(event.text)
                    yield emit("response.output_text.delta", **at, delta=event.text, logprobs=[])
                continue
            ended = True
            result = event.result or {}
            await usage.count(state, who.key_id, task_id, result)
            if result.get("error") or result.get("state") == "FAILURE":
                error = task_error(result.get("error") or {})
                failed = shapes.response(
                    task_id,
                    model,
                    body,
                    created,
                    error={"code": error.code, "message": error.message},
                )
                yield emit("response.failed", response=failed)
                return
            whole = "".join(text) if text else str(result.get("text", ""))
            result = {**result, "text": whole}
            final = shapes.response(task_id, model, body, created, result)
            done_part = {**part, "text": whole}
            yield emit("response.output_text.done", **at, text=whole, logprobs=[])
            yield emit("response.content_part.done", **at, part=done_part)
            yield emit("response.output_item.done", output_index=0, item=final["output"][0])
            kind = (
                "response.incomplete" if final["status"] == "incomplete" else "response.completed"
            )
            yield emit(kind, response=final)
            return
    except (ClientError, TaskFailed) as exc:
        problem = from_exception(exc)
        yield emit("error", code=problem.code, message=problem.message, param=problem.param)
    finally:
        await end_stream(state, who, task_id, events, ended)
