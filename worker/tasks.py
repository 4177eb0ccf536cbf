"""Binds the request path to Celery: one place maps every outcome to retry, result or failure.

An outcome is one of: success; a coded error that is transient and has retries left
(retried with exponential backoff); cancelled (stored as Celery's REVOKED, with the text
so far, so Flower and the metrics count it apart from failures); any other coded error
(stored as a failure with its code); an unexpected exception (stored as `model_error`).
Every run logs exactly one line; only an unexpected exception logs a traceback.

Results are stored here, not by Celery (the tasks ignore Celery's result handling), so
that storing is bounded and conditional (`worker.delivery.results`): a task whose worker lost
its lease, or whose result someone else stored first, stores nothing (outcome
`abandoned` / `duplicate`); a result Redis keeps refusing is handed back to the queue
(outcome `requeued`) instead of leaving the worker stuck.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery, Task
from celery.exceptions import Ignore, Terminated
from celery.signals import task_revoked
from celery.worker import state as worker_state
from kombu.exceptions import OperationalError

from vision_queue import tracing
from vision_queue.documents import page_marker
from vision_queue.errors import (
    Cancelled,
    InvalidInput,
    ModelError,
    TaskFailed,
    VisionQueueError,
)
from vision_queue.protocol import CANCEL_KEY, DELIVERIES_KEY, PROGRESS_STATE, TaskName
from vision_queue.results import TaskResult, Timings, task_failed_json
from vision_queue.settings import Settings
from worker.delivery.results import EXISTS, LOST, STORED, ResultStore, StoreGaveUp, StreamTail
from worker.delivery.streams import StreamWriter
from worker.delivery.webhooks import WebhookSender, notify_task_end
from worker.document_pages import page_ended, page_ended_again, page_stream_text
from worker.documents import register_document_task
from worker.handler import LeaseLost, TaskContext, TaskControl, handle

if TYPE_CHECKING:
    from worker.broker.lease_keeper import LeaseKeeper
    from worker.broker.leases import Lease, LeaseBook
    from worker.health import HealthReporter
    from worker.inference.engine import Engine
    from worker.metrics import WorkerMetrics

log = logging.getLogger("vision_queue.task")

_PROGRESS_INTERVAL_S = 0.5
_CANCEL_POLL_INTERVAL_S = 0.5


@dataclass
class WorkerRuntime:
    """Everything the tasks of one worker share: built once, before any message is taken."""

    settings: Settings
    engine: Engine
    redis: redis.Redis
    name: str
    metrics: WorkerMetrics
    health: HealthReporter
    results: ResultStore
    webhooks: WebhookSender
    # Documents drawn at once (VQ_DOCUMENT_RENDERS): each draw is a child process of up to
    # VQ_DOCUMENT_PAGE_MEMORY_BYTES, so this bounds what hostile PDFs cost the host.
    document_renders: threading.BoundedSemaphore
    leases: LeaseBook | None = None
    keeper: LeaseKeeper | None = None


def register_tasks(app: Celery, runtime: WorkerRuntime) -> None:
    for name in TaskName:
        app.task(
            bind=True,
            name=name.celery_name,
            max_retries=None,
            # States are stored by `execute`, bounded and first-writer-wins.
            ignore_result=True,
            # Coded outcomes, not crashes: Celery logs them without a traceback.
            throws=(TaskFailed, Terminated),
        )(_task_function(runtime, name))
    register_document_task(app, runtime)
    task_revoked.connect(_revoked_handler(runtime), weak=False, dispatch_uid="vq-revoked")


def _task_function(runtime: WorkerRuntime, name: TaskName) -> Any:
    def run(task: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return execute(task, runtime, name, args, kwargs)

    run.__name__ = run.__qualname__ = name.value
    return run


@dataclass
class _Run:
    """One delivery of one task on this worker."""

    task: Task
    runtime: WorkerRuntime
    name: TaskName
    result: TaskResult
    ctx: TaskContext
    lease: Lease | None
    stream: StreamWriter
    outcome: str = "success"
    delivery: int = 0
    stored_state: str | None = None  # the final state this run stored, if it stored one

    @property
    def retries(self) -> int:
        return int(self.task.request.retries or 0)


def execute(
    task: Task,
    runtime: WorkerRuntime,
    name: TaskName,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> dict[str, Any]:
    # A page of a document (worker/documents.py) stops when its document is cancelled too.
    page = page_marker(args[0]) if len(args) == 1 else None
    run = _start(task, runtime, name, page)
    runtime.health.task_started(run.result.id)
    try:
        state = _run_request(run, args, kwargs)
        return _store_outcome(run, state)
    finally:
        runtime.health.task_finished(run.result.id)
        _log_and_measure(runtime, run.result, run.outcome, run.ctx.started_at, run.delivery)
        notify_task_end(runtime.webhooks, args, run.result.to_dict(), run.outcome)
        if page is not None and run.stored_state is not None:
            page_ended(
                runtime, page[0], page[1], run.result.id, run.stored_state, run.result.to_dict()
            )
        elif page is not None and run.outcome == "duplicate":
            # Stored by a worker that died before reporting it: report it now (once).
            page_ended_again(runtime, page[0], page[1], run.result.id)


def _start(
    task: Task, runtime: WorkerRuntime, name: TaskName, page: tuple[str, int] | None = None
) -> _Run:
    task_id: str = task.request.id
    document_id = page[0] if page else None
    lease = runtime.leases.for_task(task_id) if runtime.leases is not None else None
    results = runtime.results
    stream = StreamWriter(
        results.results,
        task_id,
        lease,
        runtime.settings.result_expires_s,
        same_server=results.same_server,
    )
    retries = int(task.request.retries or 0)
    settings = runtime.settings
    started_at = time.time()
    # Everything the engine asks and tells between tokens, in one object for the run.
    control = TaskControl(
        task_id,
        deadline=started_at + settings.task_time_limit_s,
        time_limit_s=settings.task_time_limit_s,
        still_ours=lease.valid if lease is not None else (lambda: True),
        is_cancelled=_CancelWatch(task_id, runtime.redis, document_id),
        report_progress=_ProgressReporter(results, task_id, name.celery_name, lease, retries),
        # A document's page streams into the document's stream too, marked with its page
        # (its logprobs, when asked for, only on its own stream).
        stream_text=stream.write if page is None else page_stream_text(runtime, page, stream),
        stream_logprobs=stream.write_logprobs,
        # Choices stream into the task's own stream only (a page's document stream has one
        # text per page).
        stream_choice_text=lambda index, piece: stream.write(piece, index),
        stream_choice_logprobs=lambda index, entry: stream.write_logprobs(entry, index),
    )
    ctx = TaskContext(
        task_id=task_id,
        settings=settings,
        engine=runtime.engine,
        redis=runtime.redis,
        worker_name=runtime.name,
        control=control,
        started_at=started_at,
    )
    result = TaskResult(
        id=task_id,
        task=name.value,
        model=runtime.engine.model_id,
        worker=runtime.name,
        device=runtime.engine.device,
    )
    return _Run(task, runtime, name, result, ctx, lease, stream)


def _run_request(run: _Run, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Run the request; return the final state to store, or raise Celery's Retry / Ignore."""
    runtime, settings, task_id = run.runtime, run.runtime.settings, run.result.id
    try:
        if runtime.results.final_state(task_id) is not None:
            # Redelivered after its result was stored (the ack was lost): done already.
            run.outcome = "duplicate"
            raise Ignore()
        run.delivery = _count_delivery(runtime.redis, task_id, run.retries, settings)
        if run.delivery > settings.max_deliveries:
            raise ModelError(
                f"a worker died {run.delivery - 1} times while running this task; giving up "
                f"(VQ_MAX_DELIVERIES={settings.max_deliveries})"
            )
        started = {"pid": os.getpid(), "hostname": runtime.name}
        runtime.results.update(
            task_id, run.name.celery_name, "STARTED", started, run.lease, run.retries
        )
        run.stream.begin()
        if len(args) != 1 or kwargs:
            raise InvalidInput("a task takes exactly one request object", field="request")
        message = args[0]
        if isinstance(message, dict) and message.get("task") != run.name.value:
            raise InvalidInput("the request's task does not match the task name", field="task")
        handle(message, run.ctx, run.result)
        _forget_deliveries(runtime.redis, task_id, run.retries)
        return "SUCCESS"
    except Ignore:
        raise
    except LeaseLost:
        run.outcome = "abandoned"
        _uncount_delivery(run)
        raise Ignore() from None
    except (redis.RedisError, OperationalError) as exc:
        # Redis itself failed (restart, failover, full): not the request's fault. Hand the
        # message back; a live worker restores it as soon as Redis takes writes again.
        run.outcome = "requeued"
        _uncount_delivery(run)
        log.warning("task id=%s: Redis failed (%s); handing it back", task_id, type(exc).__name__)
        _hand_back(run)
        raise Ignore() from None
    except Cancelled as error:
        run.outcome = error.code.value
        _record_error(run, error)
        return "REVOKED"
    except VisionQueueError as error:
        run.outcome = error.code.value
        if error.transient and run.retries < settings.max_retries:
            run.outcome = "retry"
            _forget_deliveries(runtime.redis, task_id, run.retries)
            _record_error(run, error)
            runtime.results.update(
                task_id,
                run.name.celery_name,
                "RETRY",
                task_failed_json(run.result.to_dict()),
                run.lease,
                run.retries,
            )
            raise run.task.retry(exc=error, countdown=_backoff_s(settings, run.retries)) from None
        _record_error(run, error)
        return "FAILURE"
    except Exception as exc:
        run.outcome = "model_error"
        log.exception("task id=%s task=%s crashed", task_id, run.name.value)
        _record_error(run, ModelError(f"internal error: {type(exc).__name__}"))
        return "FAILURE"


def _store_outcome(run: _Run, state: str) -> dict[str, Any]:
    """Store the final state, then tell Celery the outcome (events, ack) that matches it."""
    runtime = run.runtime
    payload = run.result.to_dict()
    try:
        with tracing.span("vq.store", {"vq.state": state}):
            stored = runtime.results.finish(
                run.result.id,
                run.name.celery_name,
                state,
                payload,
                run.lease,
                run.retries,
                run.stream.tail(),
            )
    except StoreGaveUp as exc:
        run.outcome = "requeued"
        log.warning("task id=%s: result not stored (%s); handing it back", run.result.id, exc)
        _uncount_delivery(run)
        _hand_back(run)
        raise Ignore() from None
    if stored == LOST:
        run.outcome = "abandoned"
        _uncount_delivery(run)
        raise Ignore()
    if stored == EXISTS:
        run.outcome = "duplicate"
        raise Ignore()
    run.stored_state = state
    if state == "SUCCESS":
        return payload
    if state == "REVOKED":
        # Celery then sends task-revoked (Flower's REVOKED) and acknowledges the message.
        raise Terminated("cancelled")
    raise TaskFailed(payload)


def _record_error(run: _Run, error: VisionQueueError) -> None:
    _forget_deliveries(run.runtime.redis, run.result.id, run.retries)
    run.result.error = error.to_dict()
    run.result.timings.total = run.result.timings.total or (time.time() - run.ctx.started_at)


def _hand_back(run: _Run) -> None:
    """Give up the lease; the next sweep of a live worker puts the message back."""
    if run.lease is not None and run.runtime.keeper is not None:
        run.runtime.keeper.release(run.lease)


def _revoked_handler(runtime: WorkerRuntime) -> Any:
    """A task revoked before it ran (Celery skipped it): store it as cancelled."""

    def on_revoked(request: Any = None, **_: Any) -> None:
        task_id = getattr(request, "id", None)
        task_name = str(getattr(request, "task_name", "") or getattr(request, "name", ""))
        if not task_id:
            return
        short = task_name.removeprefix("vision_queue.")
        result = TaskResult(id=task_id, task=short, worker=runtime.name)
        result.error = Cancelled("cancelled before it started").to_dict()
        try:
            stored = runtime.results.finish(
                task_id, task_name, "REVOKED", result.to_dict(), None, 0, StreamTail()
            )
        except StoreGaveUp as exc:
            log.warning("task id=%s: cancellation not stored (%s)", task_id, exc)
            return
        if stored == STORED:
            _log_and_measure(runtime, result, "cancelled", time.time(), 0)

    return on_revoked


def _count_delivery(client: redis.Redis, task_id: str, retries: int, settings: Settings) -> int:
    """Count deliveries of this message, to fail a task that keeps killing its workers.

    A worker that dies mid-task (SIGKILL, OOM killer, a segfault in a kernel) leaves the
    message unacknowledged, and a live worker hands it back once the lease lapses.
    Without a bound, an input that crashes every worker would loop forever.
    """
    key = DELIVERIES_KEY.format(task_id=task_id) + f":{retries}"
    pipe = client.pipeline()
    pipe.incr(key)
    pipe.expire(key, settings.result_expires_s)
    return int(pipe.execute()[0])


# KEYS: the delivery counter. Only a count still there is taken back: an ended run may
# have forgotten it already (`_forget_deliveries`).
_UNCOUNT = """
local count = tonumber(redis.call('GET', KEYS[1]) or '0')
if count > 0 then
  return redis.call('DECR', KEYS[1])
end
return 0
"""


def _uncount_delivery(run: _Run) -> None:
    """A run that ends alive without a result (abandoned, handed back) did not kill its
    worker: it must not bring the task closer to VQ_MAX_DELIVERIES. Counted, a lease lost
    over and over (a take right after a Sentinel failover) could fail a task that never
    ran."""
    if run.delivery > 0:
        key = DELIVERIES_KEY.format(task_id=run.result.id) + f":{run.retries}"
        with contextlib.suppress(redis.RedisError):
            run.runtime.redis.register_script(_UNCOUNT)(keys=[key])


def _forget_deliveries(client: redis.Redis, task_id: str, retries: int) -> None:
    with contextlib.suppress(redis.RedisError):
        client.delete(DELIVERIES_KEY.format(task_id=task_id) + f":{retries}")


def _backoff_s(settings: Settings, retries: int) -> float:
    return float(min(settings.retry_backoff_max_s, settings.retry_backoff_s * (2**retries)))


class _CancelWatch:
    """Cheap per-token check: the revoke broadcast lands in worker state at once; the Redis
    key (set by `Client.cancel`) covers a worker that started after the broadcast."""

    def __init__(self, task_id: str, client: redis.Redis, document_id: str | None = None) -> None:
        self.task_id = task_id
        self.client = client
        # A page task also stops when its document is cancelled.
        self.ids = (task_id,) if document_id is None else (task_id, document_id)
        self.keys = [CANCEL_KEY.format(task_id=one) for one in self.ids]
        self._next_poll = 0.0
        self._cancelled = False

    def __call__(self) -> bool:
        if self._cancelled or any(one in worker_state.revoked for one in self.ids):
            self._cancelled = True
            return True
        now = time.monotonic()
        if now >= self._next_poll:
            self._next_poll = now + _CANCEL_POLL_INTERVAL_S
            # Redis restarting: keep generating; the revoke broadcast still applies.
            with contextlib.suppress(redis.RedisError):
                self._cancelled = bool(self.client.exists(*self.keys))
        return self._cancelled


class _ProgressReporter:
    """Tokens so far, stored as the PROGRESS state (which wakes waiting clients)."""

    def __init__(
        self, store: ResultStore, task_id: str, name: str, lease: Lease | None, retries: int
    ) -> None:
        self.store = store
        self.task_id = task_id
        self.name = name
        self.lease = lease
        self.retries = retries
        self._next = 0.0

    def __call__(self, tokens: int) -> None:
        now = time.monotonic()
        if now >= self._next:
            self._next = now + _PROGRESS_INTERVAL_S
            # Best effort; the result itself is stored with retries.
            self.store.update(
                self.task_id,
                self.name,
                PROGRESS_STATE,
                {"tokens": tokens},
                self.lease,
                self.retries,
            )


def _log_and_measure(
    runtime: WorkerRuntime, result: TaskResult, outcome: str, started_at: float, delivery: int
) -> None:
    timings: Timings = result.timings
    total = timings.total or (time.time() - started_at)
    # One line per task; never image bytes, URLs' query strings or prompts.
    log.info(
        "task id=%s task=%s outcome=%s duration_s=%.3f queued_s=%.3f prompt_tokens=%d "
        "completion_tokens=%d delivery=%d",
        result.id,
        result.task,
        outcome,
        total,
        timings.queued,
        result.prompt_tokens,
        result.completion_tokens,
        delivery,
    )
    runtime.metrics.record(
        result.task,
        outcome,
        queued_s=timings.queued,
        generate_s=timings.generate,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        peak_memory_bytes=runtime.engine.peak_memory_bytes(),
    )
