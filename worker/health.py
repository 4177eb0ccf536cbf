"""Liveness and readiness that stay true while a long generation runs.

Celery's `inspect ping` is answered by the worker's main loop, and a health check must
not depend on the queue at all. Instead a heartbeat thread rewrites a small JSON file
every VQ_HEARTBEAT_INTERVAL_S; the `worker health` command reads it:

- live: the file is fresh (the process and its heartbeat thread are running);
- ready: live, the model is loaded and warmed up, the broker answers a ping, the Celery
  consumer is not restart-looping (RESTART_LOOP_STARTS starts within RESTART_WINDOW_S),
  and no task has been running longer than its `stuck_after_s` (VQ_TASK_TIME_LIMIT_S +
  VQ_STUCK_TASK_GRACE_S).

Generation releases the GIL inside torch, so the heartbeat keeps its pace while a
task runs; a stuck process stops refreshing the file and fails liveness. A process that
still beats but whose task thread is stuck fails readiness, and its watchdog
(worker/shutdown.py) hands the message back and exits after as long again.

The file holds one JSON object: worker, pid, state (loading | ready | busy | stopping),
model_loaded, consuming, running ({task id: started_at} for every busy slot),
stuck_after_s, consumer_starts (recent consumer start times), updated_at.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from vision_queue.outages import broker_error, is_retryable
from vision_queue.redis_connect import redis_client
from vision_queue.settings import Settings
from worker.identity import default_health_file, health_dir, pid_running

__all__ = [
    "HealthReporter",
    "check_live",
    "check_ready",
    "health_file_path",
    "pointed_health_files",
    "read_health",
]

log = logging.getLogger("vision_queue.worker")

# A file older than this many heartbeats means the process is dead or stuck.
_STALE_AFTER_BEATS = 5
# This many consumer starts within the window (the first start included) is a loop:
# Celery restarts its consumer after every connection error, about once a second. A
# Sentinel failover right after a start takes two restarts (the master's connection lost,
# then no master named for a moment while the sentinels vote): three starts, no loop.
RESTART_LOOP_STARTS = 4
RESTART_WINDOW_S = 60.0


def health_file_path(settings: Settings, worker_name: str) -> Path:
    """VQ_HEALTH_FILE, else the default file of `worker_name` (worker.identity's rule)."""
    if settings.health_file:
        return Path(settings.health_file)
    return default_health_file(worker_name)


# A worker whose heartbeat file is elsewhere (VQ_HEALTH_FILE, as `make demo` sets it) leaves
# a pointer to it in the temp dir, where `worker health` without a name looks.
_POINTER_SUFFIX = ".health.pointer"


def pointer_path(worker_name: str) -> Path:
    """Where a worker named `worker_name` points to its heartbeat file from the temp dir."""
    default = default_health_file(worker_name)
    return default.with_name(default.name.removesuffix(".health.json") + _POINTER_SUFFIX)


def pointed_health_files() -> list[Path]:
    """The heartbeat files that running workers point to from the temp dir, by name."""
    found = []
    for pointer in sorted(health_dir().glob(f"vision-queue-*{_POINTER_SUFFIX}")):
        try:
            data = json.loads(pointer.read_text())
            path, pid = Path(data["health_file"]), data["pid"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(pid, int) and pid_running(pid) and path.exists():
            found.append(path)
    return found


@dataclass
class HealthState:
    worker: str
    pid: int
    state: str = "loading"  # loading | ready | busy | stopping
    model_loaded: bool = False
    consuming: bool = False  # the Celery consumer is connected and taking messages
    running: dict[str, float] = field(default_factory=dict)  # task id -> started_at
    stuck_after_s: float | None = None  # a task running longer than this is stuck
    consumer_starts: list[float] = field(default_factory=list)  # the recent ones
    updated_at: float = 0.0


class HealthReporter:
    def __init__(
        self,
        path: Path,
        worker_name: str,
        interval_s: float,
        stuck_after_s: float | None = None,
    ) -> None:
        self.path = path
        self.interval_s = interval_s
        self._state = HealthState(worker=worker_name, pid=os.getpid(), stuck_after_s=stuck_after_s)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="health-heartbeat", daemon=True)
        self._pointer: Path | None = None  # in the temp dir, to a file elsewhere

    def start(self) -> None:
        self._write()
        self._point_to_file()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s * 2)
        self.path.unlink(missing_ok=True)
        if self._pointer is not None:
            self._pointer.unlink(missing_ok=True)

    def _point_to_file(self) -> None:
        """A heartbeat file outside the temp dir's default name gets a pointer there, so
        that `worker health` finds this worker without VQ_HEALTH_FILE."""
        name = self._state.worker
        if self.path.resolve() == default_health_file(name).resolve():
            return
        pointer = pointer_path(name)
        data = {"health_file": str(self.path.resolve()), "pid": os.getpid(), "worker": name}
        try:
            pointer.write_text(json.dumps(data))
        except OSError as exc:  # a read-only temp dir: `worker health` needs the path then
            log.warning("cannot write %s (%s): worker health needs --health-file", pointer, exc)
            return
        self._pointer = pointer

    def model_ready(self) -> None:
        self._update(state="ready", model_loaded=True)

    def consumer_ready(self) -> None:
        self._update(consuming=True)

    def shutting_down(self) -> None:
        self._update(state="stopping", consuming=False)

    def consumer_started(self) -> None:
        """Called on every (re)start of the Celery consumer."""
        with self._lock:
            starts = [*self._state.consumer_starts, time.time()]
            self._state.consumer_starts = starts[-RESTART_LOOP_STARTS * 2 :]
            self._write()

    def task_started(self, task_id: str) -> None:
        with self._lock:
            self._state.running[task_id] = time.time()
            if self._state.state != "stopping":
                self._state.state = "busy"
            self._write()

    def task_finished(self, task_id: str) -> None:
        with self._lock:
            self._state.running.pop(task_id, None)
            if self._state.state == "busy" and not self._state.running:
                self._state.state = "ready"
            self._write()

    def running(self) -> dict[str, float]:
        """A copy of {task id: started_at} for every busy slot."""
        with self._lock:
            return dict(self._state.running)

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
            payload = json.dumps(asdict(self._state))  # asdict copies: safe under the lock
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


def stuck_tasks(data: dict[str, Any], now: float) -> list[tuple[str, float]]:
    """(task id, seconds busy) of every task past the file's `stuck_after_s`, oldest first."""
    limit = data.get("stuck_after_s")
    running = data.get("running")
    if not isinstance(limit, (int, float)) or not isinstance(running, dict):
        return []
    busy = [
        (str(task_id), now - float(started))
        for task_id, started in running.items()
        if isinstance(started, (int, float)) and now - started > limit
    ]
    return sorted(busy, key=lambda item: -item[1])


def check_live(path: Path, interval_s: float, now: float | None = None) -> tuple[bool, str]:
    data = read_health(path)
    if data is None:
        return False, f"no heartbeat file at {path}"
    age = (now or time.time()) - float(data.get("updated_at", 0))
    if age > interval_s * _STALE_AFTER_BEATS:
        return False, f"heartbeat is {age:.1f}s old (worker dead or stuck)"
    return True, f"alive, state={data.get('state')}, heartbeat {age:.1f}s ago"


def check_ready(path: Path, settings: Settings, now: float | None = None) -> tuple[bool, str]:
    now = time.time() if now is None else now
    live, reason = check_live(path, settings.heartbeat_interval_s, now)
    if not live:
        return False, reason
    data = read_health(path) or {}
    if not data.get("model_loaded"):
        return False, "model not loaded yet"
    if data.get("state") == "stopping":
        return False, "worker is shutting down"
    stuck = stuck_tasks(data, now)
    if stuck:
        task_id, busy_s = stuck[0]
        return False, f"task {task_id} stuck: running for {busy_s:.0f}s, past its time limit"
    starts = [t for t in data.get("consumer_starts") or [] if isinstance(t, (int, float))]
    recent = [t for t in starts if now - t <= RESTART_WINDOW_S]
    if len(recent) >= RESTART_LOOP_STARTS:
        return False, (
            f"consumer restart-looping: {len(recent)} starts in the last "
            f"{RESTART_WINDOW_S:.0f}s (see the worker log for why)"
        )
    try:
        client = redis_client(settings, socket_connect_timeout=2, socket_timeout=2)
        client.ping()
        client.close()
    except redis.RedisError as exc:
        if is_retryable(exc):
            return False, f"broker unreachable: {type(exc).__name__}"
        # A refused password is a setting to fix: say which, as the producer does.
        error = broker_error(settings, settings.effective_broker_url, exc)
        return False, f"broker unusable: {error}"
    return True, f"ready, state={data.get('state')}"
