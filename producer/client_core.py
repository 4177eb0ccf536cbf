"""What `Client` and `AsyncClient` share besides validation: their set-up and result waits.

`ClientCore` resolves the settings (validating only what a client reads), the broker and
result-backend URLs, one connection pool per Redis (the same one when both URLs match),
the image limits and the message envelope; each client passes the factory of its own
(blocking or asyncio) redis client. `finished` and `ResultWait` are the sans-IO rules of
`result()`: report each state, stop at the final one, or give up at the deadline. The
I/O stays in the two clients.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from producer.envelope import Envelope, database_number
from producer.submission import Draft, SubmitRequest, prepare
from producer.waiting import BACKUP_POLL_S
from vision_queue import tracing
from vision_queue.errors import WaitTimeout
from vision_queue.images import ImageLimits
from vision_queue.results import (
    Result,
    TaskStatus,
    check_task_id,
    decode_meta,
    final_result,
    is_final,
    status_of,
)
from vision_queue.settings import Settings

R = TypeVar("R")

# Connections per Redis a client keeps at most; more concurrent calls wait for one.
POOL_SIZE = 32


class ClientCore(Generic[R]):
    """The settings, URLs, connections, image limits and envelope of one client."""

    def __init__(
        self,
        settings: Settings | None,
        overrides: dict[str, Any],
        connect: Callable[[Settings, str], R],
    ) -> None:
        self.settings = settings or Settings.from_env(reader="client", **overrides)
        s = self.settings
        self._broker_url = s.effective_broker_url
        self._backend_url = s.effective_backend_url
        self._redis = connect(s, self._broker_url)
        self._results = (
            self._redis if self._backend_url == self._broker_url else connect(s, self._backend_url)
        )
        self._limits = ImageLimits.from_settings(s)
        self._envelope = Envelope(s, db=database_number(self._redis))
        # False in a server's client: no string or path a caller sent is opened as a file.
        self.local_files = True
        # Only when OTEL_EXPORTER_OTLP_ENDPOINT is set; a web backend that configured
        # OpenTelemetry itself keeps its own provider (vision_queue.tracing).
        tracing.setup("vq-client")

    def _submit_attributes(self, tasks: int) -> dict[str, Any]:
        return {"vq.tasks": tasks, "messaging.destination.name": self.settings.queue}

    def _drafts(self, requests: Iterable[SubmitRequest]) -> list[Draft]:
        """Every request validated and its images read; the first fault raises."""
        return [
            prepare(request, self.settings, self._limits, self.local_files)
            for request in requests
        ]


def finished(
    task_id: str, meta: dict[str, Any], on_status: Callable[[TaskStatus], None] | None
) -> Result | None:
    """Report the state in `meta` to `on_status`; the result if it is final, else None."""
    if on_status is not None:
        on_status(status_of(task_id, meta))
    return final_result(task_id, meta) if is_final(meta) else None


class ResultWait:
    """One `result(wait=True)`: each state read or pushed goes to `outcome` until it gives
    the result; meanwhile the client waits up to `pause` seconds for a pushed state."""

    def __init__(
        self,
        task_id: str,
        timeout: float | None,
        on_status: Callable[[TaskStatus], None] | None,
    ) -> None:
        check_task_id(task_id)
        self.task_id, self.timeout, self.on_status = task_id, timeout, on_status
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.pause = BACKUP_POLL_S

    def outcome(self, meta: dict[str, Any]) -> Result | None:
        """The result once `meta` is final; None to wait on. WaitTimeout past the deadline."""
        result = finished(self.task_id, meta, self.on_status)
        if result is not None:
            return result
        left = None if self.deadline is None else self.deadline - time.monotonic()
        if left is not None and left <= 0:
            raise WaitTimeout(f"task {self.task_id} did not finish within {self.timeout:g} s")
        self.pause = BACKUP_POLL_S if left is None else min(BACKUP_POLL_S, left)
        return None

    @staticmethod
    def pushed(message: bytes | None) -> dict[str, Any] | None:
        """The state a notification carried; None: read the stored state instead."""
        return decode_meta(message) if message else None
