"""Spans of a task's stages that need no code in the request path (docs/tracing.md).

Connected only when tracing is on (`worker/runner.py`), after the Celery instrumentation,
so the task's span is current when these run:

- `vq.queue_wait`: from the request's `submitted_at` (the producer's clock) to the moment
  the worker starts the task (this host's clock; NTP keeps the skew to milliseconds, and
  a negative wait is recorded as zero).
"""

from __future__ import annotations

import time
from typing import Any

from vision_queue import tracing


def record_queue_wait(task: Any = None, args: Any = None, **_: Any) -> None:
    """`task_prerun` receiver: the wait of the task about to run, as a finished span."""
    request = args[0] if isinstance(args, (list, tuple)) and args else None
    if not isinstance(request, dict):
        return
    submitted = request.get("submitted_at")
    if isinstance(submitted, bool) or not isinstance(submitted, (int, float)):
        return
    now = time.time()
    delivery = getattr(getattr(task, "request", None), "delivery_info", None) or {}
    attributes = {"vq.task": str(request.get("task", "")),
                  "messaging.destination.name": str(delivery.get("routing_key", ""))}
    tracing.record_span("vq.queue_wait", min(float(submitted), now), now, attributes)


def connect() -> None:
    """Connect the receivers (call after `tracing.instrument_celery()`)."""
    if not tracing.enabled():
        return
    from celery.signals import task_prerun

    task_prerun.connect(record_queue_wait, weak=False)
