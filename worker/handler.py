"""The request path of one task, top-down: validate, fetch, decode, generate, encode.

It knows nothing of Celery: `tasks.py` binds it to the queue and decides what an
outcome means for retries. Everything a request needs arrives through `TaskContext`,
so no global state sits on this path; what steers and watches its generation (cancel,
deadline, lease, progress, streamed text) is one `TaskControl`, which `tasks.py` builds
once per run and the engine calls between tokens. A task stopped while generating
(cancelled, out of time) keeps the text it generated so far and its usage in `result`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL import Image

from vision_queue import tracing
from vision_queue.errors import Cancelled, TaskTimeout
from vision_queue.images import ImageLimits, decode_image
from vision_queue.logprobs import TokenLogprob, top_count
from vision_queue.results import Choice, TaskResult
from vision_queue.schemas import ImageRef, ImageSource, TaskRequest, parse_request
from vision_queue.settings import Settings
from vision_queue.staging import load_staged_image
from worker.fetch import fetch_image_bytes, read_local_image
from worker.inference.control import RunControl
from worker.inference.engine import Engine, GenerationRequest, GenerationResult

if TYPE_CHECKING:
    import redis


class LeaseLost(Exception):
    """This worker lost the task to another (it froze or was cut off): stop, store nothing."""


@dataclass
class _SoFar:
    """What generation produced until now, for a task that is stopped midway."""

    pieces: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None  # when the task asked for them

    def fill(self, result: TaskResult, finish_reason: str) -> None:
        result.text = "".join(self.pieces)
        result.logprobs = self.logprobs
        result.prompt_tokens = self.prompt_tokens
        result.completion_tokens = self.completion_tokens
        result.finish_reason = finish_reason if self.prompt_tokens else ""


@dataclass
class TaskControl(RunControl):
    """One run of a task as the engine sees it: stop when it must, report as it goes.

    Stops (raises) once the lease is another worker's, the client cancelled, or the
    deadline passed, in that order: a task that is no longer ours must not store even a
    cancellation. Also records what was generated so far, for a task stopped midway.
    """

    task_id: str
    deadline: float  # time.time() past which the task is out of time
    time_limit_s: int  # named in the timeout's message
    # False once this worker no longer holds the task's lease.
    still_ours: Callable[[], bool] = lambda: True
    # True once the task is cancelled; cheap enough to ask after every token.
    is_cancelled: Callable[[], bool] = lambda: False
    # Tokens generated so far (progress for clients); throttled by the callee.
    report_progress: Callable[[int], None] = lambda tokens: None
    # Each new piece of final text (the task's stream).
    stream_text: Callable[[str], None] = lambda text: None
    # Each token's logprobs, ahead of its text (the task's stream too).
    stream_logprobs: Callable[[TokenLogprob], None] = lambda entry: None
    # A task with several choices (`n`): each choice's text and logprobs, marked with its
    # index, in place of the two above.
    stream_choice_text: Callable[[int, str], None] = lambda index, text: None
    stream_choice_logprobs: Callable[[int, TokenLogprob], None] = lambda index, entry: None
    so_far: _SoFar = field(default_factory=_SoFar)

    def check(self) -> None:
        if not self.still_ours():
            raise LeaseLost(f"task {self.task_id} is another worker's now")
        if self.is_cancelled():
            raise Cancelled("cancelled by the client")
        if time.time() > self.deadline:
            raise TaskTimeout(f"task ran longer than VQ_TASK_TIME_LIMIT_S={self.time_limit_s}s")

    def on_prompt(self, tokens: int) -> None:
        self.so_far.prompt_tokens = tokens

    def on_token(self, count: int) -> None:
        # Counted before the check, so a task stopped here reports this token's usage;
        # progress only after it, so a stopped task reports none.
        self.so_far.completion_tokens = count
        self.check()
        self.report_progress(count)

    def on_logprobs(self, entry: TokenLogprob) -> None:
        if self.so_far.logprobs is None:
            self.so_far.logprobs = []
        self.so_far.logprobs.append(entry)
        self.stream_logprobs(entry)

    def on_text(self, piece: str) -> None:
        self.so_far.pieces.append(piece)
        self.stream_text(piece)

    def choice(self, index: int) -> RunControl:
        return _ChoiceControl(self, index)


@dataclass
class _ChoiceControl(RunControl):
    """One choice of a task with several: its text and logprobs go onto the task's stream
    marked with its index; choice 0 also steers the run and is what a stopped task keeps."""

    run: TaskControl
    index: int

    def check(self) -> None:
        if self.index == 0:
            self.run.check()

    def on_token(self, count: int) -> None:
        if self.index == 0:
            self.run.on_token(count)

    def on_logprobs(self, entry: TokenLogprob) -> None:
        if self.index == 0:
            so_far = self.run.so_far
            if so_far.logprobs is None:
                so_far.logprobs = []
            so_far.logprobs.append(entry)
        self.run.stream_choice_logprobs(self.index, entry)

    def on_text(self, piece: str) -> None:
        if self.index == 0:
            self.run.so_far.pieces.append(piece)
        self.run.stream_choice_text(self.index, piece)


@dataclass
class TaskContext:
    """What one run of a task needs besides its message."""

    task_id: str
    settings: Settings
    engine: Engine
    redis: redis.Redis
    worker_name: str
    control: TaskControl
    started_at: float = field(default_factory=time.time)


def handle(message: Any, ctx: TaskContext, result: TaskResult) -> None:
    """Run one request, filling `result` as it goes (a failure still reports its timings)."""
    request = parse_request(message, ctx.settings)
    result.timings.queued = max(0.0, ctx.started_at - request.submitted_at)
    control = ctx.control
    control.check()

    began = time.perf_counter()
    # Spans carry counts and sizes, never a URL: a signed URL's query string is a secret.
    with tracing.span("vq.fetch", {"vq.images": len(request.images)}) as fetching:
        blobs = [_load_bytes(ref, ctx.settings, ctx.redis) for ref in request.images]
        if fetching is not None:
            fetching.set_attribute("vq.image_bytes", sum(len(blob) for blob in blobs))
    result.timings.fetch = time.perf_counter() - began

    limits = ImageLimits.from_settings(ctx.settings)
    began = time.perf_counter()
    with tracing.span("vq.preprocess", {"vq.images": len(blobs)}):
        images = [decode_image(blob, limits, deadline=control.deadline) for blob in blobs]
    decode_s = time.perf_counter() - began

    began = time.perf_counter()
    try:
        hashes = [hashlib.sha256(blob).hexdigest() for blob in blobs]
        output = ctx.engine.generate(_generation_request(request, images, hashes, ctx))
        _record_engine_spans(output, ended_at=time.time())
    except (Cancelled, TaskTimeout) as stopped:
        control.so_far.fill(result, "cancelled" if isinstance(stopped, Cancelled) else "")
        result.timings.preprocess = decode_s
        # The engine's own split (prompt preparation, prefill, decode) is lost with the
        # stop: the time it spent until then is generation time, not zero.
        result.timings.generate = time.perf_counter() - began
        result.timings.total = time.time() - ctx.started_at
        raise

    result.text = output.text
    result.finish_reason = output.finish_reason
    result.prompt_tokens = output.prompt_tokens  # once, whatever `n`
    result.completion_tokens = output.completion_tokens + sum(
        more.completion_tokens for more in output.more
    )
    if output.more:
        result.choices = [_choice(index, c) for index, c in enumerate((output, *output.more))]
    result.logprobs = output.logprobs
    result.cached_tokens = output.cached_tokens
    result.timings.preprocess = decode_s + output.preprocess_s
    result.timings.generate = output.prefill_s + output.decode_s
    result.timings.total = time.time() - ctx.started_at


def _choice(index: int, output: GenerationResult) -> Choice:
    choice = Choice(
        index=index,
        text=output.text,
        finish_reason=output.finish_reason,
        completion_tokens=output.completion_tokens,
    )
    if output.logprobs is not None:
        choice["logprobs"] = output.logprobs
    return choice


def _record_engine_spans(output: GenerationResult, ended_at: float) -> None:
    """`vq.prefill` and `vq.decode` of this task, recorded from its own thread: the engine
    runs them on its device thread for many rows at once, where no task's trace is
    current. Placed back to back, ending when `generate` returned (their durations are the
    engine's own; the engine's prompt preparation and any wait for a row come before)."""
    if not tracing.enabled():
        return
    decode_began = ended_at - output.decode_s
    prefill_began = decode_began - output.prefill_s
    tracing.record_span(
        "vq.prefill", prefill_began, decode_began, {"vq.prompt_tokens": output.prompt_tokens}
    )
    tracing.record_span(
        "vq.decode",
        decode_began,
        ended_at,
        {
            "vq.completion_tokens": output.completion_tokens,
            "vq.finish_reason": output.finish_reason,
        },
    )


def _generation_request(
    request: TaskRequest, images: list[Image.Image], hashes: list[str], ctx: TaskContext
) -> GenerationRequest:
    return GenerationRequest(
        prompt=request.effective_prompt(),
        images=images,
        max_new_tokens=request.max_new_tokens(ctx.settings),
        num_crops=request.options.num_crops or ctx.settings.default_num_crops or None,
        temperature=request.options.temperature,
        top_p=request.options.top_p,
        seed=request.options.seed,
        stop=request.options.stop,
        response_format=request.options.response_format,
        logprobs=top_count(request.options.logprobs, request.options.top_logprobs),
        image_hashes=hashes,
        n=request.options.n or 1,
        control=ctx.control,
    )


def _load_bytes(ref: ImageRef, settings: Settings, client: redis.Redis) -> bytes:
    if ref.source is ImageSource.STAGED:
        return load_staged_image(client, ref.ref)
    if ref.source is ImageSource.URL:
        return fetch_image_bytes(ref.ref, settings)
    return read_local_image(ref.ref, settings)
