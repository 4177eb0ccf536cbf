"""Reading a task's state as both clients see it: Celery's result meta, decoded without Celery.

Workers store each state change as Celery's Redis backend does (JSON under
`celery-task-meta-<id>`, the same JSON PUBLISHed on a channel of that name). A failure's
`result` is Celery's JSON form of an exception; ours is `TaskFailed` carrying the whole
failure result, which is read here field by field: nothing named in the meta is ever
imported or called.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from producer.contract import FINAL_STATES, PROGRESS_STATE, RESULT_KEY, SUBMITTED_KEY, TaskName
from producer.errors import Cancelled, UnknownTaskId
from producer.schemas import preview


@dataclass(frozen=True)
class TaskHandle:
    id: str
    task: TaskName


@dataclass(frozen=True)
class TaskStatus:
    id: str
    state: str  # PENDING (queued), STARTED, PROGRESS, RETRY, SUCCESS, FAILURE
    tokens: int = 0  # generated so far, while running
    worker: str = ""

    @property
    def done(self) -> bool:
        return self.state in ("SUCCESS", "FAILURE")


def result_key(task_id: str) -> str:
    return RESULT_KEY.format(task_id=task_id)


def check_task_id(task_id: str) -> None:
    try:
        uuid.UUID(task_id)
    except (ValueError, TypeError, AttributeError):
        raise UnknownTaskId(f"{preview(task_id)} is not a task id") from None


def read_commands(pipe: Any, task_id: str) -> None:
    """One round trip: the stored meta, and whether the id was ever submitted."""
    pipe.get(result_key(task_id))
    pipe.exists(SUBMITTED_KEY.format(task_id=task_id))


def meta_from_replies(task_id: str, replies: list[Any]) -> dict[str, Any]:
    """The meta from `read_commands`' replies; an id nobody submitted raises UnknownTaskId."""
    raw, known = replies[0], replies[1]
    meta = decode_meta(raw)
    if meta is None:
        if not known:
            raise UnknownTaskId(f"no task {task_id}: never submitted, or its result expired")
        return {"status": "PENDING", "result": None}
    return meta


def decode_meta(raw: bytes | str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {"status": "FAILURE", "result": {"exc_type": "CorruptResult", "exc_message": []}}
    if not isinstance(meta, dict) or not isinstance(meta.get("status"), str):
        return {"status": "FAILURE", "result": {"exc_type": "CorruptResult", "exc_message": []}}
    return meta


def is_final(meta: dict[str, Any]) -> bool:
    return meta.get("status") in FINAL_STATES


def status_of(task_id: str, meta: dict[str, Any]) -> TaskStatus:
    state = str(meta["status"])
    info = meta.get("result") if state == PROGRESS_STATE else None
    tokens = int(info.get("tokens", 0)) if isinstance(info, dict) else 0
    worker = str(meta.get("worker") or "")
    return TaskStatus(task_id, "FAILURE" if state == "REVOKED" else state, tokens, worker)


def final_result(task_id: str, meta: dict[str, Any]) -> dict[str, Any]:
    """The result object plus `state` (SUCCESS or FAILURE) of a finished task."""
    state, value = meta["status"], meta.get("result")
    if state == "SUCCESS" and isinstance(value, dict):
        return {**value, "state": "SUCCESS"}
    carried = failure_carried(value)
    if carried is not None:
        return {**carried, "state": "FAILURE"}
    if state == "REVOKED":
        error = Cancelled("cancelled before it started").to_dict()
    else:
        error = {"code": "model_error", "message": _describe_exception(value)[:500]}
    return {"id": task_id, "task": _short_name(meta), "error": error, "state": "FAILURE"}


def failure_carried(value: Any) -> dict[str, Any] | None:
    """The failure result inside Celery's JSON form of `producer.errors.TaskFailed`."""
    if not isinstance(value, dict) or value.get("exc_type") != "TaskFailed":
        return None
    if value.get("exc_module") != "producer.errors":
        return None
    args = value.get("exc_message")
    if isinstance(args, list) and len(args) == 1 and isinstance(args[0], dict):
        return args[0]
    return None


def task_failed_json(result: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `failure_carried`: what workers store as a failure's `result`."""
    return {"exc_type": "TaskFailed", "exc_module": "producer.errors", "exc_message": [result]}


def _describe_exception(value: Any) -> str:
    if isinstance(value, dict):
        args = value.get("exc_message")
        text = ", ".join(str(a) for a in args) if isinstance(args, list) else str(args or "")
        return f"{value.get('exc_type', 'Error')}: {text}"
    return f"Error: {value}"


def _short_name(meta: dict[str, Any]) -> str:
    name = str(meta.get("name") or "")
    return name.removeprefix("vision_queue.")
