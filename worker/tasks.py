"""Binds the request path to Celery: one place maps every outcome to retry, result or failure.

An outcome is one of: success; a coded error that is transient and has retries left
(retried with exponential backoff); any other coded error (stored as a failure with its
code); an unexpected exception (stored as `model_error`). Every run logs exactly one line.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery, Task
from celery.exceptions import Reject
from celery.worker import state as worker_state
from kombu.exceptions import OperationalError

from producer.contract import CANCEL_KEY, DELIVERIES_KEY, PROGRESS_STATE, TaskName
from producer.errors import InvalidInput, ModelError, TaskFailed, VisionQueueError
from producer.schemas import TaskResult, Timings
from producer.settings import Settings
from worker.handler import TaskContext, handle

if TYPE_CHECKING:
    from worker.engine import Engine
    from worker.health import HealthReporter
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


def register_tasks(app: Celery, runtime: WorkerRuntime) -> None:
    for name in TaskName:
        app.task(bind=True, name=name.celery_name, max_retries=None)(_task_function(runtime, name))


def _task_function(runtime: WorkerRuntime, name: TaskName) -> Any:
    def run(task: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return execute(task, runtime, name, args, kwargs)

    run.__name__ = run.__qualname__ = name.value
    return run


def execute(
    task: Task,
    runtime: WorkerRuntime,
    name: TaskName,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> dict[str, Any]:
    settings = runtime.settings
    task_id: str = task.request.id
    ctx = TaskContext(
        task_id=task_id,
        settings=settings,
        engine=runtime.engine,
        redis=runtime.redis,
        worker_name=runtime.name,
        is_cancelled=_CancelWatch(task_id, runtime.redis),
        on_progress=_ProgressReporter(task),
    )
    result = TaskResult(
        id=task_id,
        task=name.value,
        model=runtime.engine.model_id,
        worker=runtime.name,
        device=runtime.engine.device,
    )
    outcome = "success"
    delivery = 0
    runtime.health.task_started(task_id)
    try:
        delivery = _count_delivery(runtime.redis, task_id, task.request.retries, settings)
        if len(args) != 1 or kwargs:
            raise InvalidInput("a task takes exactly one request object", field="request")
        message = args[0]
        if isinstance(message, dict) and message.get("task") != name.value:
            raise InvalidInput("the request's task does not match the task name", field="task")
        handle(message, ctx, result)
        _forget_deliveries(runtime.redis, task_id, task.request.retries)
        return result.to_dict()
    except (redis.RedisError, OperationalError) as exc:
        # Redis itself is unreachable (restart, failover): not the request's fault. Hand the
        # message back; if even that fails, it returns after the visibility timeout.
        outcome = "requeued"
        log.warning("task id=%s: Redis unavailable (%s); requeueing", task_id, type(exc).__name__)
        raise Reject(exc, requeue=True) from None
    except VisionQueueError as error:
        outcome = error.code.value
        if error.transient and task.request.retries < settings.max_retries:
            outcome = "retry"
            _forget_deliveries(runtime.redis, task_id, task.request.retries)
            raise task.retry(
                exc=error, countdown=_backoff_s(settings, task.request.retries)
            ) from None
        raise _failure(result, error, ctx, task.request.retries) from None
    except Exception as exc:
        outcome = "model_error"
        log.exception("task id=%s task=%s crashed", task_id, name.value)
        internal = ModelError(f"internal error: {type(exc).__name__}")
        raise _failure(result, internal, ctx, task.request.retries) from None
    finally:
        runtime.health.task_finished(task_id)
        _log_and_measure(runtime, result, outcome, ctx, delivery)


def _failure(
    result: TaskResult, error: VisionQueueError, ctx: TaskContext, retries: int
) -> TaskFailed:
    _forget_deliveries(ctx.redis, result.id, retries)
    result.error = error.to_dict()
    result.timings.total = time.time() - ctx.started_at
    return TaskFailed(result.to_dict())


def _count_delivery(client: redis.Redis, task_id: str, retries: int, settings: Settings) -> int:
    """Count deliveries of this message; fail a task that keeps killing its workers.

    A worker that dies mid-task (SIGKILL, OOM killer, a segfault in a kernel) leaves the
    message unacknowledged, and Redis delivers it again after the visibility timeout.
    Without a bound, an input that crashes every worker would loop forever.
    """
    key = DELIVERIES_KEY.format(task_id=task_id) + f":{retries}"
    pipe = client.pipeline()
    pipe.incr(key)
    pipe.expire(key, settings.result_expires_s)
    delivery = int(pipe.execute()[0])
    if delivery > settings.max_deliveries:
        raise ModelError(
            f"a worker died {delivery - 1} times while running this task; giving up "
            f"(VQ_MAX_DELIVERIES={settings.max_deliveries})"
        )
    return delivery


def _forget_deliveries(client: redis.Redis, task_id: str, retries: int) -> None:
    client.delete(DELIVERIES_KEY.format(task_id=task_id) + f":{retries}")


def _backoff_s(settings: Settings, retries: int) -> float:
    return float(min(settings.retry_backoff_max_s, settings.retry_backoff_s * (2**retries)))


class _CancelWatch:
    """Cheap per-token check: the revoke broadcast lands in worker state at once; the Redis
    key (set by `Client.cancel`) covers a worker that started after the broadcast."""

    def __init__(self, task_id: str, client: redis.Redis) -> None:
        self.task_id = task_id
        self.client = client
        self._next_poll = 0.0
        self._cancelled = False

    def __call__(self) -> bool:
        if self._cancelled or self.task_id in worker_state.revoked:
            self._cancelled = True
            return True
        now = time.monotonic()
        if now >= self._next_poll:
            self._next_poll = now + _CANCEL_POLL_INTERVAL_S
            # Redis restarting: keep generating; the revoke broadcast still applies.
            with contextlib.suppress(redis.RedisError):
                self._cancelled = bool(self.client.exists(CANCEL_KEY.format(task_id=self.task_id)))
        return self._cancelled


class _ProgressReporter:
    def __init__(self, task: Task) -> None:
        self.task = task
        self._next = 0.0

    def __call__(self, tokens: int) -> None:
        now = time.monotonic()
        if now >= self._next:
            self._next = now + _PROGRESS_INTERVAL_S
            # Progress is best effort; the result itself is stored with retries.
            with contextlib.suppress(redis.RedisError, OperationalError):
                self.task.update_state(state=PROGRESS_STATE, meta={"tokens": tokens})


def _log_and_measure(
    runtime: WorkerRuntime, result: TaskResult, outcome: str, ctx: TaskContext, delivery: int
) -> None:
    timings: Timings = result.timings
    total = timings.total or (time.time() - ctx.started_at)
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
