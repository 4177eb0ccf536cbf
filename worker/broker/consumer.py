"""The worker's Celery consumer, with a door in front of Celery's task handler.

`consumer_class(door)` returns a subclass of Celery's Consumer (passed to
`app.Worker(consumer_cls=...)`, Celery's documented hook) that differs in four places:

* `create_task_handler` wraps Celery's handler: every message goes to `Door.admit`
  first (rules in worker/broker/intake.py), and only an admitted one reaches Celery's strategy;
* `on_decode_error` (kombu could not read a message at all) refuses like the door does,
  instead of Celery's critical log line that prints up to 1 KB of the body;
* the remote-control step answers through `worker.broker.remote_control`'s door (message shape,
  the commands answered);
* a bootstep, run on every (re)start of the consumer once the task channel exists,
  installs `sanitize_brpop_reply` on the channel's Redis client and reports the start to
  the health file, so readiness can tell a restart loop from a healthy worker.

A refused message is dead-lettered, acknowledged (so it is never delivered again, to this
worker or any other), logged in one line without payload, counted in
`vq_messages_refused_total`, and, when its id is readable, answered with `invalid_input`.
Redis failing during that bookkeeping never stops the consumer: the message is then left
unacknowledged and comes back after the visibility timeout, to be refused again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import redis
from celery import bootsteps
from celery.worker.consumer import Consumer
from kombu.exceptions import OperationalError

from vision_queue.settings import Settings
from worker.broker.dead_letters import dead_letter_entry, push_dead_letter, store_refusal_failure
from worker.broker.intake import ETA_SLACK_S, Refusal, check_message, sanitize_brpop_reply
from worker.broker.remote_control import GuardedControl

if TYPE_CHECKING:
    from worker.health import HealthReporter
    from worker.metrics import WorkerMetrics

log = logging.getLogger("vision_queue.worker")


@dataclass
class Door:
    """Everything the consumer's door needs, built once by the runner."""

    settings: Settings
    worker: str
    redis: redis.Redis
    backend: Any  # the app's Celery result backend
    metrics: WorkerMetrics
    health: HealthReporter

    def admit(self, message: Any) -> bool:
        """True when the message may go on to Celery; otherwise it has been refused."""
        try:
            refusal = check_message(
                message.content_type,
                message.content_encoding,
                message.headers,
                message.body,
                now=time.time(),
                eta_horizon_s=self.settings.retry_backoff_max_s + ETA_SLACK_S,
            )
        except Exception as exc:  # a rule tripping over input: refuse, never crash
            refusal = Refusal("internal", f"checking the message failed ({type(exc).__name__})")
        if refusal is None:
            return True
        self.refuse(message, refusal)
        return False

    def refuse(self, message: Any, refusal: Refusal) -> None:
        queue = _queue_of(message)
        log.warning(
            "refused message id=%s task=%s queue=%s code=%s: %s",
            refusal.task_id or "-",
            refusal.task or "-",
            queue,
            refusal.code,
            refusal.reason,
        )
        self.metrics.refused.labels(refusal.code).inc()
        try:
            push_dead_letter(
                self.redis,
                dead_letter_entry(
                    refusal,
                    worker=self.worker,
                    queue=queue,
                    content_type=message.content_type,
                    content_encoding=message.content_encoding,
                    headers=message.headers,
                    body=message.body,
                ),
            )
            store_refusal_failure(self.backend, refusal, self.worker)
        except (redis.RedisError, OperationalError, OSError) as exc:
            # Not acknowledged: it returns after the visibility timeout and is refused again.
            log.warning("could not dead-letter a refused message (%s)", type(exc).__name__)
            return
        _ack(message)

    def on_consumer_started(self, consumer: Any) -> None:
        self.health.consumer_started()
        client = consumer.task_consumer.channel.client
        default = client.response_callbacks.get("BRPOP")

        def brpop(response: Any, **options: Any) -> Any:
            reply = default(response, **options) if default is not None else response
            return sanitize_brpop_reply(reply)

        client.set_response_callback("BRPOP", brpop)


def _queue_of(message: Any) -> str:
    info = message.delivery_info if isinstance(message.delivery_info, dict) else {}
    queue = info.get("routing_key")
    return queue[:64] if isinstance(queue, str) and queue else "-"


def _ack(message: Any) -> None:
    try:
        message.ack()
    except Exception as exc:  # already acknowledged, or the channel went away
        log.warning("could not acknowledge a refused message (%s)", type(exc).__name__)


class _DoorStep(bootsteps.StartStopStep):
    """Runs on every consumer (re)start, once the task consumer's channel exists."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, parent: Any) -> None:
        parent.door.on_consumer_started(parent)


_CELERY_CONTROL_STEP = "celery.worker.consumer.control:Control"


class GuardedConsumer(Consumer):
    door: Door

    class Blueprint(Consumer.Blueprint):
        default_steps: ClassVar[list[Any]] = [
            *(
                GuardedControl if step == _CELERY_CONTROL_STEP else step
                for step in Consumer.Blueprint.default_steps
            ),
            _DoorStep,
        ]

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], None]:
        celery_handler = super().create_task_handler(*args, **kwargs)
        door = self.door

        def on_task_message(message: Any) -> None:
            if door.admit(message):
                celery_handler(message)

        return on_task_message

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        self.door.refuse(
            message, Refusal("envelope", f"kombu could not decode it ({type(exc).__name__})")
        )


def consumer_class(door: Door) -> type[GuardedConsumer]:
    """A consumer class bound to `door`, for `app.Worker(consumer_cls=...)`."""
    return type("VisionQueueConsumer", (GuardedConsumer,), {"door": door})
