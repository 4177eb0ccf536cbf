"""Keep signed URLs' query strings out of what Celery stores about a task.

With `result_extended` (which gives clients the worker's name and the task name),
Celery's result backend writes the task's arguments into every state it stores,
STARTED, PROGRESS and the final result, and those arguments hold the image URLs whole.
Our tasks therefore store through a backend whose result meta carries the arguments
with every URL's query string removed (`producer.schemas.redact_message`). The message
on the queue, and the arguments the task runs with (retries included), keep the full
URLs: only what is kept for show is redacted. Flower's argument column already shows the
client's redacted `argsrepr`.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from producer.contract import TaskName
from producer.schemas import redact_message


def install_result_redaction(app: Celery) -> None:
    """Give each of our registered tasks a backend that stores redacted arguments."""
    base: type[Any] = type(app.backend)

    class RedactingBackend(base):
        def _get_result_meta(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
            meta: dict[str, Any] = super()._get_result_meta(*args, **kwargs)
            if isinstance(meta.get("args"), (list, tuple)):
                meta["args"] = [redact_message(arg) for arg in meta["args"]]
            if meta.get("kwargs"):
                meta["kwargs"] = {}
            return meta

    # The app's backend already resolved its URL: the setting may name a backend class
    # ("module:Class+redis://...", worker.result_store), which is not a URL to parse.
    backend = RedactingBackend(app=app, url=getattr(app.backend, "url", None))
    for name in TaskName:
        app.tasks[name.celery_name].backend = backend
