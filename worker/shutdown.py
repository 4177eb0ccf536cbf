"""Shutdown on signals: the first SIGTERM finishes the running task, the next one stops now.

Celery's warm shutdown (SIGTERM) stops taking messages and waits for the running task,
which is what an orchestrator's stop with a grace period wants. Celery's cold shutdown
cannot stop a task running in a pool thread: the process would wait for the generation
anyway, while the message had already been handed back at connection close, so the task
could run twice. Instead, a second SIGTERM or SIGINT, or any SIGQUIT, hands the running
message back to the queue and exits at once; another worker runs it again.
"""

from __future__ import annotations

import logging
import os
import signal
from types import FrameType
from typing import Any

from worker.health import HealthReporter

log = logging.getLogger("vision_queue.worker")

EXIT_STOPPED_NOW = 1


def install_shutdown_handlers(worker: Any, health: HealthReporter) -> None:
    """Wrap Celery's handlers; call from the main thread once Celery has installed them."""
    first_signal_seen = False

    def stop_now(signum: int) -> None:
        health.shutting_down()
        log.warning(
            "%s: stopping now; the running task goes back to the queue", signal.Signals(signum).name
        )
        _requeue_unacked(worker)
        logging.shutdown()
        os._exit(EXIT_STOPPED_NOW)

    def wrap(signum: int, celery_handler: Any) -> None:
        def handler(sig: int, frame: FrameType | None) -> None:
            nonlocal first_signal_seen
            if first_signal_seen or sig == signal.SIGQUIT:
                stop_now(sig)
            first_signal_seen = True
            health.shutting_down()
            if callable(celery_handler):
                celery_handler(sig, frame)

        signal.signal(signum, handler)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        wrap(signum, signal.getsignal(signum))


def _requeue_unacked(worker: Any) -> None:
    try:
        worker.consumer.task_consumer.channel.qos.restore_unacked()
    except Exception as exc:  # the message still returns after the visibility timeout
        log.warning(
            "could not hand the message back now (%s); it returns after VQ_VISIBILITY_TIMEOUT_S",
            type(exc).__name__,
        )
