"""Shutdown on signals: the first SIGTERM finishes the running task, the next one stops now.

Celery's warm shutdown (SIGTERM) stops taking messages and waits for the running task,
which is what an orchestrator's stop with a grace period wants. Celery's cold shutdown
cannot stop a task running in a pool thread: the process would wait for the generation
anyway, while the message had already been handed back at connection close, so the task
could run twice. Instead, a second SIGTERM or SIGINT, or any SIGQUIT, hands the running
message back to the queue and exits at once; another worker runs it again.

The stuck-task watchdog does the same by itself: a thread pool cannot kill a task, so a
slot that stays busy past VQ_TASK_TIME_LIMIT_S + 2 x VQ_STUCK_TASK_GRACE_S (a kernel
that never returns, a lock that is never released) makes the worker hand its messages
back and exit with EXIT_TASK_STUCK, for the orchestrator to restart it. Readiness has
already been failing for a grace period by then (worker/health.py). The delivery count
(worker/tasks.py) bounds how often one message may do this.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType
from typing import Any

from worker.health import HealthReporter

log = logging.getLogger("vision_queue.worker")

EXIT_STOPPED_NOW = 1
EXIT_TASK_STUCK = 4


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


def start_stuck_task_watchdog(
    worker: Any, health: HealthReporter, stuck_after_s: float, grace_s: float
) -> threading.Thread:
    """A daemon thread that exits the process once a task is busy past the deadline.

    Readiness fails at `stuck_after_s`; the watchdog acts `grace_s` later, so an
    orchestrator that polls readiness sees the worker unhealthy first.
    """
    deadline_s = stuck_after_s + grace_s
    interval_s = max(0.2, min(5.0, grace_s / 4))

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            now = time.time()
            overdue = [
                (task_id, now - started)
                for task_id, started in health.running().items()
                if now - started > deadline_s
            ]
            if overdue:
                task_id, busy_s = max(overdue, key=lambda item: item[1])
                health.shutting_down()
                log.error(
                    "task id=%s stuck for %.0fs (VQ_TASK_TIME_LIMIT_S + 2 x "
                    "VQ_STUCK_TASK_GRACE_S = %.0fs): handing it back and exiting",
                    task_id,
                    busy_s,
                    deadline_s,
                )
                _requeue_unacked(worker)
                logging.shutdown()
                os._exit(EXIT_TASK_STUCK)

    thread = threading.Thread(target=watch, name="stuck-task-watchdog", daemon=True)
    thread.start()
    return thread
