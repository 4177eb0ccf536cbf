"""The Celery settings both sides share, built from `Settings` in one place."""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu.entity import Queue

from vision_queue.protocol import TaskName, priority_queues
from vision_queue.redis_connect import celery_sentinel_options
from vision_queue.settings import Settings

APP_NAME = "vision_queue"


def celery_settings(settings: Settings) -> dict[str, Any]:
    transport_options = {
        # kombu's own fallback for a message whose worker died: our leases
        # (worker/broker/leases.py) bring such a message back within seconds, and this only
        # has to outlast the longest task so kombu never restores a running one (checked in
        # Settings).
        "visibility_timeout": settings.visibility_timeout_s,
        # Sweep for such messages every restore_interval_s (kombu's default is every 100 s).
        "unacked_restore_interval": settings.restore_interval_s,
        "unacked_restore_throttle": 1,
        "socket_connect_timeout": settings.connect_timeout_s,
        "socket_timeout": max(30.0, settings.connect_timeout_s),
        "retry_on_timeout": True,
    }
    return {
        "broker_url": settings.effective_broker_url,
        "result_backend": settings.effective_backend_url,
        # JSON only: a pickle message is refused by kombu before any code sees it.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # Redelivery when a worker dies mid-task: ack after the task, not before.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        # A worker runs up to VQ_MAX_BATCH tasks at once, one per batch row (its pool has
        # that many threads). It takes a message only while a row is free (Redis brokers,
        # Celery 5.6+), so a message never waits in a busy worker that another could run.
        "worker_prefetch_multiplier": 1,
        "worker_disable_prefetch": True,
        "broker_transport_options": _with_sentinel(
            {**transport_options, **priority_transport_options(settings)},
            settings,
            settings.effective_broker_url,
        ),
        "result_backend_transport_options": _with_sentinel(
            transport_options, settings, settings.effective_backend_url
        ),
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "result_expires": settings.result_expires_s,
        # A result stored while Redis restarts is retried, not lost (backoff up to 10 s).
        "result_backend_always_retry": True,
        "result_backend_max_retries": 30,
        "result_extended": True,
        "task_track_started": True,
        # Flower needs task events.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_default_queue": settings.queue,
        # One queue (Redis list) per priority; a task without one goes to the normal list.
        "task_queues": [Queue(name, routing_key=name) for name in priority_queues(settings.queue)],
        "task_routes": {task.celery_name: {"queue": settings.queue} for task in TaskName},
        # A thread pool cannot kill a running task: VQ_TASK_TIME_LIMIT_S is enforced by the
        # engine, which checks the task's deadline between tokens (worker/handler.py).
        "task_time_limit": None,
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # Flower and `revoke` need it; what a broadcast may do is decided by the worker's
        # door (worker/broker/remote_control.py, VQ_REMOTE_CONTROL).
        "worker_enable_remote_control": True,
        # Producers build protocol-2 messages themselves (producer/envelope.py), with
        # argument reprs that drop URL query strings: URLs may carry tokens.
        "task_protocol": 2,
    }


def priority_transport_options(settings: Settings) -> dict[str, Any]:
    """How a worker orders the priorities' lists in its BRPOP (worker/broker/priorities.py)."""
    lists = priority_queues(settings.queue)
    return {
        # Priorities are lists of their own: kombu's message priorities, which would add
        # three more keys per list to every BRPOP, are not used (every message has 0).
        "priority_steps": [0],
        "vq_priority_ranks": {name: rank for rank, name in enumerate(lists)},
        "vq_priority_max_skips": settings.priority_max_skips,
    }


def _with_sentinel(options: dict[str, Any], settings: Settings, url: str) -> dict[str, Any]:
    """For a sentinel:// URL, kombu's Sentinel transport and Celery's SentinelBackend also
    need the master's name and how to talk to the sentinels (`vision_queue.sentinel`)."""
    return {**options, **celery_sentinel_options(settings, url)}


def make_celery_app(settings: Settings) -> Celery:
    app = Celery(APP_NAME, set_as_current=False)
    app.conf.update(celery_settings(settings))
    return app
