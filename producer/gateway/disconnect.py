"""Noticing a caller that went away, and cancelling its task when nobody else will read it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import TypeVar

import anyio
from fastapi import Request

from vision_queue.errors import ClientError

T = TypeVar("T")
log = logging.getLogger("vision_queue.gateway")


class Disconnected(Exception):
    """The caller closed the connection before the answer was ready."""


async def wait_for_disconnect(request: Request) -> None:
    # The body has been read: the next ASGI message is the disconnect (uvicorn sends it
    # as soon as the connection drops).
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """The result of `work`, or Disconnected as soon as the caller goes away."""
    job = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({job, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        watch.cancel()
        job.cancel()
        raise
    watch.cancel()
    if job.done():
        return job.result()
    job.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await job
    raise Disconnected()


async def cancel_quietly(cancel: Awaitable[object], task_id: str) -> None:
    """Cancel a task even from a cancelled request scope; failures are only logged."""
    with anyio.CancelScope(shield=True):
        try:
            await cancel
            log.info("task id=%s cancelled: the caller disconnected", task_id)
        except (ClientError, OSError) as exc:
            log.warning("task id=%s: cancel after disconnect failed (%s)", task_id, exc)


async def close_stream(iterator: object) -> None:
    """Close an async generator now, so its Redis connection goes back at once."""
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()
