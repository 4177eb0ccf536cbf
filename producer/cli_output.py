"""What `producer` tells a person: task rules in `--help`, states, progress, warnings.

States are shown in words (queued, running, succeeded, failed) and, in JSON, as the
documented PENDING, STARTED, RETRY, SUCCESS, FAILURE: never PROGRESS, our custom Celery
state while a task generates (`TaskStatus.shown_state`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from vision_queue.protocol import TASK_SPECS, TaskName
from vision_queue.results import Result, TaskStatus
from vision_queue.settings import Settings, SettingsError

# While a task stays queued, how often a wait looks again for a live worker on its queue.
WORKER_RECHECK_S = 10.0


def tasks_help(settings: Settings | None = None) -> str:
    """The per-task rules, from the contract and the token caps this client enforces."""
    if settings is None:
        try:
            settings = Settings.from_env(reader="client")
        except SettingsError:
            settings = Settings()
    caps = settings.token_caps
    lines = ["tasks (images per task; --max-new-tokens cap, also the default):"]
    for task in TaskName:
        spec = TASK_SPECS[task]
        most = min(spec.max_images, settings.max_images)
        count = f"{spec.min_images}" if spec.min_images == most else f"{spec.min_images}-{most}"
        noun = "image" if most == 1 else "images"
        prompt = "needs --prompt" if spec.fixed_prompt is None else "fixed prompt, no --prompt"
        lines.append(f"  {task.value:<9} {count} {noun}; {prompt}; up to {caps[task]} tokens")
    lines.append("  (caps from VQ_MAX_NEW_TOKENS_CAPS; workers apply their own as well)")
    return "\n".join(lines) + "\n"


def describe_status(status: TaskStatus, result: Result | None = None) -> str:
    """One line for a person; `result` (for a finished task) adds its outcome."""
    where = f" on {status.worker}" if status.worker else ""
    if status.state in ("PENDING", "RECEIVED"):
        return f"{status.id}: queued"
    if status.state == "RETRY":
        return f"{status.id}: waiting to retry"
    if not status.done:
        if status.pages_total:
            pages = f"{status.pages_done} of {status.pages_total} pages done"
            return f"{status.id}: running{where}, {pages}"
        return f"{status.id}: running{where}, {status.tokens} tokens so far"
    tokens = f", {status.tokens} tokens" if status.tokens else ""
    if status.state == "SUCCESS":
        return f"{status.id}: succeeded{where}{tokens}"
    error = result.get("error") if result is not None else None
    reason = f": {error['code']}: {error['message']}" if error else ""
    return f"{status.id}: failed{where}{tokens}{reason}"


def status_json(status: TaskStatus) -> dict[str, Any]:
    shown: dict[str, Any] = {"id": status.id, "state": status.shown_state}
    if not status.done or status.tokens:
        shown["tokens"] = status.tokens
    shown["worker"] = status.worker
    if status.pages_total:  # a document job
        shown["pages_done"] = status.pages_done
        shown["pages_total"] = status.pages_total
    return shown


def warn(message: str) -> None:
    print(f"producer: {message}", file=sys.stderr, flush=True)


class WaitReporter:
    """Called with every status a wait sees: one rewritten status line on a terminal, and
    once, on stderr, a warning when the task is queued where no live worker consumes."""

    def __init__(
        self,
        live_workers: Callable[[], list[str]],
        queue: str,
        show_progress: bool,
    ) -> None:
        self._live_workers = live_workers
        self._queue = queue
        self._show_progress = show_progress
        self._last = ""
        self._warned = False
        self._next_check = 0.0

    def __call__(self, status: TaskStatus) -> None:
        if status.state == "PENDING":
            self.check_workers()
        if not self._show_progress:
            return
        line = describe_status(status)
        if line != self._last:
            sys.stderr.write("\r\x1b[2K" + line)
            sys.stderr.flush()
            self._last = line

    def check_workers(self) -> None:
        if self._warned or time.monotonic() < self._next_check:
            return
        self._next_check = time.monotonic() + WORKER_RECHECK_S
        if not self._live_workers():
            self.finish()
            warn(
                f"no worker is consuming queue {self._queue} (still waiting; "
                "start a worker on it, or check VQ_QUEUE)"
            )
            self._warned = True

    def finish(self) -> None:
        """End the status line, so what follows starts on a line of its own."""
        if self._show_progress and self._last:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._last = ""
