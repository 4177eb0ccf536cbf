"""Queuing a task for a caller: its task slot, the client's checks, and who owns the task.

The owner (the caller's key id) is recorded beside the task, so one key never reads,
follows or cancels another key's tasks: they answer 404, as for an id that never existed.
Tasks queued by other means (the Python client, the CLI) have no owner and are visible to
every key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from producer.gateway.resolve import check_names
from vision_queue.errors import InvalidInput, UnknownTaskId
from vision_queue.protocol import KEY_PREFIX, Priority, TaskName
from vision_queue.schemas import ChatMessage, ImageRef, TaskOptions

if TYPE_CHECKING:
    from producer.gateway.auth import Caller
    from producer.gateway.state import GatewayState
    from vision_queue.results import TaskHandle

OWNER_KEY = KEY_PREFIX + ":gw:owner:{task_id}"


async def submit_task(
    state: GatewayState,
    who: Caller,
    task: TaskName,
    images: Sequence[ImageRef | bytes],
    *,
    prompt: str | None = None,
    messages: tuple[ChatMessage, ...] | None = None,
    options: TaskOptions = TaskOptions(),  # noqa: B008 (frozen)
    callback_url: str | None = None,
    priority: Priority = Priority.NORMAL,
    task_id: str | None = None,
    document: bytes | str | None = None,
    max_failed_pages: int = 0,
) -> TaskHandle:
    """Queue after every check; a refusal (400, 429, 503) leaves nothing queued or held.

    A `document` (PDF bytes) is checked by the client, off the loop; its pages are drawn on
    a worker, never in the gateway's process. A document URL (a str) has its host resolved
    and checked here like an image URL's; a worker downloads it and checks the PDF."""
    if callback_url is not None and not state.settings.webhook_secret:
        raise InvalidInput(
            "webhooks are not configured on this deployment (VQ_WEBHOOK_SECRET)",
            field="callback_url",
        )
    # Every route meets the same address rules, names resolved included, before a slot
    # is taken; the client's own checks (schemas, images) run inside submit.
    settings = state.settings
    await check_names(
        images,
        settings.private_host_allowlist,
        callback_url,
        settings.webhook_host_allowlist,
        document if isinstance(document, str) else None,
    )
    placeholder = await state.limiter.reserve_task(who.key_id)
    try:
        handle = await state.client.submit(
            task,
            images,
            prompt,
            max_new_tokens=options.max_new_tokens,
            num_crops=options.num_crops,
            temperature=options.temperature,
            top_p=options.top_p,
            seed=options.seed,
            stop=options.stop,
            messages=messages,
            callback_url=callback_url,
            priority=priority,
            task_id=task_id,
            response_format=options.response_format,
            logprobs=options.logprobs,
            top_logprobs=options.top_logprobs,
            n=options.n,
            document=document,
            max_failed_pages=max_failed_pages,
        )
    except BaseException:
        await state.limiter.release(who.key_id, placeholder)
        raise
    await state.limiter.bind_task(who.key_id, placeholder, handle.id)
    await state.redis.set(
        OWNER_KEY.format(task_id=handle.id), who.key_id, ex=state.settings.result_expires_s
    )
    return handle


async def check_owner(state: GatewayState, who: Caller, task_id: str) -> None:
    """UnknownTaskId (404) when the task belongs to another key."""
    if len(task_id) > 64:
        raise UnknownTaskId(f"{task_id[:64]!r}... is not a task id")
    owner = await state.redis.get(OWNER_KEY.format(task_id=task_id))
    if owner is not None and _text(owner) != who.key_id:
        raise UnknownTaskId(f"no task {task_id}: never submitted, or its result expired")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
