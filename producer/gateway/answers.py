"""What the OpenAI routes share: the served model's check, queueing a conversation, the
wait for a non-streamed answer, turning a finished task into an answer or a coded error,
and the end of a streamed one."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import Response

from producer.gateway import usage
from producer.gateway.auth import Caller
from producer.gateway.chat import Conversation
from producer.gateway.disconnect import (
    Disconnected,
    cancel_quietly,
    close_stream,
    unless_disconnected,
)
from producer.gateway.errors import ApiError, GatewayCode, from_exception, task_error
from producer.gateway.state import GatewayState
from producer.gateway.submission import submit_task
from vision_queue.errors import WaitTimeout
from vision_queue.protocol import TaskName
from vision_queue.results import TaskHandle, result_json

# nginx's code for a client that closed the connection before the answer: nobody reads it.
CLIENT_CLOSED = 499


def check_model(asked: str, served: str) -> None:
    """A 404 in OpenAI's terms for a model this gateway does not serve."""
    if asked != served:
        raise ApiError(
            404,
            GatewayCode.MODEL_NOT_FOUND.value,
            f"the model {asked[:100]!r} does not exist here; this gateway serves {served!r}",
            param="model",
        )


async def submit_conversation(
    state: GatewayState, who: Caller, convo: Conversation, task_id: str | None = None
) -> TaskHandle:
    """Queue a chat conversation (chat completions, Responses) as an `ask` task."""
    return await submit_task(
        state,
        who,
        TaskName.ASK,
        convo.images,
        messages=convo.turns,
        options=convo.options,
        priority=convo.priority,
        task_id=task_id,
    )


async def end_stream(
    state: GatewayState, who: Caller, task_id: str, events: object, ended: bool
) -> None:
    """However a streamed answer stops (its end, an error, the caller gone): its events'
    connection goes back, a task that did not end is cancelled, its slot is released.
    Shielded: it runs when the response is cancelled too."""
    with anyio.CancelScope(shield=True):
        with contextlib.suppress(Exception):
            await close_stream(events)
        if not ended:
            await cancel_quietly(state.client.cancel(task_id), task_id)
        await state.limiter.release(who.key_id, task_id)


async def finished_task(
    state: GatewayState,
    request: Request,
    who: Caller,
    task_id: str,
    headers: dict[str, str],
    param_of: Callable[[str | None], str | None],
) -> dict[str, Any] | Response:
    """The task's successful result, or a 499 when the caller went away (the task is then
    cancelled); a failed task raises its coded error, with `param` in the request's terms.
    The task's slot under the key's limit is released and its usage counted either way."""
    try:
        result = await _wait(state, request, task_id)
    except WaitTimeout as exc:
        error = from_exception(exc)
        error.headers = headers
        raise error from None
    finally:
        with anyio.CancelScope(shield=True):
            await state.limiter.release(who.key_id, task_id)
    if result is None:
        return Response(status_code=CLIENT_CLOSED)
    await usage.count(state, who.key_id, task_id, result)
    if result.get("state") != "SUCCESS":
        error = task_error(result.get("error") or {})
        error.param = param_of(error.param)
        error.headers = headers
        raise error
    return result


async def _wait(state: GatewayState, request: Request, task_id: str) -> dict[str, Any] | None:
    """The result, or None when the caller went away (the task is cancelled then)."""
    waiting = state.client.result(task_id, wait=True, timeout=state.settings.gateway_wait_timeout_s)
    try:
        return result_json(await unless_disconnected(request, waiting))
    except Disconnected:
        await cancel_quietly(state.client.cancel(task_id), task_id)
        return None
    except WaitTimeout:
        await cancel_quietly(state.client.cancel(task_id), task_id)
        raise
