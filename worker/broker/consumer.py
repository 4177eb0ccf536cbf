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

How a refused message is dead-lettered and answered: worker/broker/door.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from celery import bootsteps
from celery.worker.consumer import Consumer

from worker.broker.door import Door
from worker.broker.intake import Refusal
from worker.broker.remote_control import GuardedControl


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
