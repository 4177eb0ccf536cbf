"""The request path of one task, top-down: validate, fetch, decode, generate, encode.

It knows nothing of Celery: `tasks.py` binds it to the queue and decides what an
outcome means for retries. Everything a request needs arrives through `TaskContext`,
so no global state sits on this path. A task stopped while generating (cancelled, out of
time) keeps the text it generated so far and its usage in `result`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL import Image

from vision_queue.errors import Cancelled, TaskTimeout
from vision_queue.images import ImageLimits, decode_image
from vision_queue.results import TaskResult
from vision_queue.schemas import ImageRef, ImageSource, TaskRequest, parse_request
from vision_queue.settings import Settings
from vision_queue.staging import load_staged_image
from worker.fetch import fetch_image_bytes, read_local_image
from worker.inference.engine import Engine, GenerationRequest

if TYPE_CHECKING:
    import redis


@dataclass
class TaskContext:
    """What one run of a task needs besides its message."""

    task_id: str
    settings: Settings
    engine: Engine
    redis: redis.Redis
    worker_name: str
    started_at: float = field(default_factory=time.time)
    # Polled between tokens; returns True once the task is cancelled.
    is_cancelled: Callable[[], bool] = lambda: False
    # Told the number of tokens generated so far (progress for clients).
    on_progress: Callable[[int], None] = lambda tokens: None
    # Given each new piece of text as soon as it is final (the task's stream).
    on_text: Callable[[str], None] = lambda text: None
    # Polled between tokens; False once this worker no longer holds the task's lease.
    still_ours: Callable[[], bool] = lambda: True


class LeaseLost(Exception):
    """This worker lost the task to another (it froze or was cut off): stop, store nothing."""


def handle(message: Any, ctx: TaskContext, result: TaskResult) -> None:
    """Run one request, filling `result` as it goes (a failure still reports its timings)."""
    request = parse_request(message, ctx.settings)
    result.timings.queued = max(0.0, ctx.started_at - request.submitted_at)
    deadline = ctx.started_at + ctx.settings.task_time_limit_s
    _stop_if_needed(ctx, deadline)

    began = time.perf_counter()
    blobs = [_load_bytes(ref, ctx.settings, ctx.redis) for ref in request.images]
    result.timings.fetch = time.perf_counter() - began

    limits = ImageLimits.from_settings(ctx.settings)
    began = time.perf_counter()
    images = [decode_image(blob, limits, deadline=deadline) for blob in blobs]
    decode_s = time.perf_counter() - began

    so_far = _SoFar()
    try:
        output = ctx.engine.generate(_generation_request(request, images, ctx, deadline, so_far))
    except (Cancelled, TaskTimeout) as stopped:
        so_far.fill(result, "cancelled" if isinstance(stopped, Cancelled) else "")
        result.timings.preprocess = decode_s
        result.timings.total = time.time() - ctx.started_at
        raise

    result.text = output.text
    result.finish_reason = output.finish_reason
    result.prompt_tokens = output.prompt_tokens
    result.completion_tokens = output.completion_tokens
    result.timings.preprocess = decode_s + output.preprocess_s
    result.timings.generate = output.prefill_s + output.decode_s
    result.timings.total = time.time() - ctx.started_at


@dataclass
class _SoFar:
    """What generation produced until now, for a task that is stopped midway."""

    pieces: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def fill(self, result: TaskResult, finish_reason: str) -> None:
        result.text = "".join(self.pieces)
        result.prompt_tokens = self.prompt_tokens
        result.completion_tokens = self.completion_tokens
        result.finish_reason = finish_reason if self.prompt_tokens else ""


def _generation_request(
    request: TaskRequest,
    images: list[Image.Image],
    ctx: TaskContext,
    deadline: float,
    so_far: _SoFar,
) -> GenerationRequest:
    def on_token(count: int) -> None:
        so_far.completion_tokens = count
        _stop_if_needed(ctx, deadline)
        ctx.on_progress(count)

    def on_text(piece: str) -> None:
        so_far.pieces.append(piece)
        ctx.on_text(piece)

    def on_prompt(tokens: int) -> None:
        so_far.prompt_tokens = tokens

    return GenerationRequest(
        prompt=request.effective_prompt(),
        images=images,
        max_new_tokens=request.max_new_tokens(ctx.settings),
        num_crops=request.options.num_crops or ctx.settings.default_num_crops or None,
        on_token=on_token,
        # Waiting for a batch row, or prefilling: cancel and deadline still apply.
        on_wait=lambda: _stop_if_needed(ctx, deadline),
        temperature=request.options.temperature,
        top_p=request.options.top_p,
        seed=request.options.seed,
        stop=request.options.stop,
        on_text=on_text,
        on_prompt=on_prompt,
    )


def _stop_if_needed(ctx: TaskContext, deadline: float) -> None:
    if not ctx.still_ours():
        raise LeaseLost(f"task {ctx.task_id} is another worker's now")
    if ctx.is_cancelled():
        raise Cancelled("cancelled by the client")
    if time.time() > deadline:
        raise TaskTimeout(
            f"task ran longer than VQ_TASK_TIME_LIMIT_S={ctx.settings.task_time_limit_s}s"
        )


def _load_bytes(ref: ImageRef, settings: Settings, client: redis.Redis) -> bytes:
    if ref.source is ImageSource.STAGED:
        return load_staged_image(client, ref.ref)
    if ref.source is ImageSource.URL:
        return fetch_image_bytes(ref.ref, settings)
    return read_local_image(ref.ref, settings)
