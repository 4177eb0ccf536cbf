"""Liveness and readiness that stay true while a long generation runs.

Celery's `inspect ping` is answered by the worker's main loop, and a health check must
not depend on the queue at all. Instead a heartbeat thread rewrites a small JSON file
every VQ_HEARTBEAT_INTERVAL_S; the `worker health` command reads it:

- live: the file is fresh (the process and its heartbeat thread are running);
- ready: live, the model is loaded and warmed up, and the broker answers a ping.

Generation releases the GIL inside torch, so the heartbeat keeps its pace while a
task runs; a stuck process stops refreshing the file and fails liveness.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from producer.redis_connect import redis_client
from producer.settings import Settings

log = logging.getLogger("vision_queue.worker")

# A file older than this many heartbeats means the process is dead or stuck.
_STALE_AFTER_BEATS = 5


def default_worker_name(device: str) -> str:
    return f"gpu-{device.replace(':', '')}@{socket.gethostname()}"


def health_file_path(settings: Settings, worker_name: str) -> Path:
    if settings.health_file:
        return Path(settings.health_file)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in worker_name)
    return Path(tempfile.gettempdir()) / f"vision-queue-{safe or 'worker'}.health.json"


@dataclass
class HealthState:
    worker: str
    pid: int
    state: str = "loading"  # loading | ready | busy | stopping
    model_loaded: bool = False
    consuming: bool = False  # the Celery consumer is connected and taking messages
    current_task: str | None = None  # the oldest of running_tasks
    task_started_at: float | None = None
    running_tasks: list[str] = field(default_factory=list)  # one per busy slot
    updated_at: float = 0.0


class HealthReporter:
    def __init__(self, path: Path, worker_name: str, interval_s: float) -> None:
        self.path = path
        self.interval_s = interval_s
        self._state = HealthState(worker=worker_name, pid=os.getpid())
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="health-heartbeat", daemon=True)

    def start(self) -> None:
        self._write()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s * 2)
        self.path.unlink(missing_ok=True)

    def model_ready(self) -> None:
        self._update(state="ready", model_loaded=True)

    def consumer_ready(self) -> None:
        self._update(consuming=True)

    def shutting_down(self) -> None:
        self._update(state="stopping", consuming=False)

    def task_started(self, task_id: str) -> None:
        with self._lock:
            state = self._state
            if not state.running_tasks:
                state.current_task, state.task_started_at = task_id, time.time()
            state.running_tasks.append(task_id)
            if state.state == "ready":
                state.state = "busy"
        self._write()

    def task_finished(self, task_id: str | None = None) -> None:
        with self._lock:
            state = self._state
            running = state.running_tasks
            if task_id in running:
                running.remove(task_id)
            elif running:
                running.pop(0)
            if not running:
                if state.state == "busy":
                    state.state = "ready"
                state.current_task = state.task_started_at = None
            elif state.current_task not in running:
                state.current_task, state.task_started_at = running[0], time.time()
            self._write()

    def _update(self, **changes: Any) -> None:
        with self._lock:
            for name, value in changes.items():
                setattr(self._state, name, value)
        self._write()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._write()

    def _write(self) -> None:
        # One writer at a time (heartbeat thread, task thread): they share the temp file.
        with self._lock:
            self._state.updated_at = time.time()
            payload = json.dumps(asdict(self._state))
            # Write then rename, so a reader never sees half a file.
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            try:
                tmp.write_text(payload)
                tmp.replace(self.path)
            except OSError as exc:
                # A full or read-only disk must not fail tasks; liveness will report it.
                log.warning("cannot write health file %s: %s", self.path, exc)


def read_health(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_live(path: Path, interval_s: float, now: float | None = None) -> tuple[bool, str]:
    data = read_health(path)
    if data is None:
        return False, f"no heartbeat file at {path}"
    age = (now or time.time()) - float(data.get("updated_at", 0))
    if age > interval_s * _STALE_AFTER_BEATS:
        return False, f"heartbeat is {age:.1f}s old (worker dead or stuck)"
    return True, f"alive, state={data.get('state')}, heartbeat {age:.1f}s ago"


def check_ready(path: Path, settings: Settings) -> tuple[bool, str]:
    live, reason = check_live(path, settings.heartbeat_interval_s)
    if not live:
        return False, reason
    data = read_health(path) or {}
    if not data.get("model_loaded"):
        return False, "model not loaded yet"
    if data.get("state") == "stopping":
        return False, "worker is shutting down"
    try:
        client = redis_client(settings, socket_connect_timeout=2, socket_timeout=2)
        client.ping()
        client.close()
    except redis.RedisError as exc:
        return False, f"broker unreachable: {type(exc).__name__}"
    return True, f"ready, state={data.get('state')}"
