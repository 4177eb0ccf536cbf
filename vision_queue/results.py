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
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypedDict, cast

from vision_queue.errors import FAILURE_EXC_MODULES, Cancelled, UnknownTaskId
from vision_queue.logprobs import TokenLogprob
from vision_queue.protocol import FINAL_STATES, PROGRESS_STATE, RESULT_KEY, SUBMITTED_KEY, TaskName
from vision_queue.schemas import preview


class _UsageCounts(TypedDict):
    prompt_tokens: int
    completion_tokens: int


class Usage(_UsageCounts, total=False):
    # Prompt positions a worker took from its image cache instead of computing them
    # (worker/model/image_cache.py); part of prompt_tokens. Absent from older workers.
    cached_tokens: int


class _ChoiceFields(TypedDict):
    index: int
    text: str
    finish_reason: str
    completion_tokens: int


class Choice(_ChoiceFields, total=False):
    """One of the `n` choices of a task that asked for more than one."""

    logprobs: list[TokenLogprob]


class ResultTimings(TypedDict):
    """Seconds spent in each phase of the task."""

    queued: float
    fetch: float
    preprocess: float
    generate: float
    total: float


class _ResultErrorFields(TypedDict):
    code: str  # an ErrorCode value
    message: str


class ResultError(_ResultErrorFields, total=False):
    field: str  # the request field at fault, when one is


class _ResultFields(TypedDict):
    id: str
    task: str
    state: Literal["SUCCESS", "FAILURE"]
    text: str  # a cancelled task keeps the text generated so far
    model: str
    usage: Usage
    finish_reason: str  # "stop" | "length" | "cancelled"; "" if it failed before generating
    timings: ResultTimings
    worker: str
    device: str


class Result(_ResultFields, total=False):
    """A finished task's result, as `Client.result` returns it (the JSON, typed).

    A failure (`state` FAILURE) adds `error`; a task that asked for `options.logprobs`
    adds `logprobs`, one entry per generated token (vision_queue.logprobs); one that asked
    for `options.n` above 1 adds `choices` (`text` and `logprobs` are the first one's,
    `usage.completion_tokens` counts them all, `prompt_tokens` the prompt once).
    """

    error: ResultError
    logprobs: list[TokenLogprob]
    choices: list[Choice]


def result_json(result: Result) -> dict[str, Any]:
    """A result as a plain JSON object, for code that adds to it or reads unknown keys."""
    return cast("dict[str, Any]", result)


@dataclass(frozen=True)
class TaskHandle:
    id: str
    task: TaskName


@dataclass(frozen=True)
class TaskStatus:
    id: str
    state: str  # PENDING (queued), STARTED, PROGRESS, RETRY, SUCCESS, FAILURE
    # Generated so far while running (a document: by its pages ended so far); in all, once
    # finished.
    tokens: int = 0
    worker: str = ""
    # A document job (vision_queue/documents.py): pages ended so far, and its page count.
    pages_done: int = 0
    pages_total: int = 0

    @property
    def done(self) -> bool:
        return self.state in ("SUCCESS", "FAILURE")

    @property
    def shown_state(self) -> str:
        """The state to show a person: PROGRESS (our custom state while generating) is
        STARTED; the others are the documented PENDING, STARTED, RETRY, SUCCESS, FAILURE."""
        return "STARTED" if self.state == PROGRESS_STATE else self.state


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
    worker = str(meta.get("worker") or "")
    shown = "FAILURE" if state == "REVOKED" else state
    done, total = _pages(meta)
    return TaskStatus(task_id, shown, _tokens(meta), worker, done, total)


def _pages(meta: dict[str, Any]) -> tuple[int, int]:
    """A document's (pages ended, pages in all), from its progress or its result."""
    value = meta.get("result")
    if is_final(meta) and meta.get("status") != "SUCCESS":
        value = failure_carried(value)
    if not isinstance(value, dict):
        return 0, 0
    done, total = value.get("pages_done", 0), value.get("pages_total", 0)
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in (done, total)):
        return 0, 0
    return done, total


def _tokens(meta: dict[str, Any]) -> int:
    """Tokens so far while generating; once finished, those of the result's usage."""
    value = meta.get("result")
    if meta.get("status") == PROGRESS_STATE:
        counted = value.get("tokens", 0) if isinstance(value, dict) else 0
    elif is_final(meta):
        result = value if meta.get("status") == "SUCCESS" else failure_carried(value)
        usage = result.get("usage") if isinstance(result, dict) else None
        counted = usage.get("completion_tokens", 0) if isinstance(usage, dict) else 0
    else:
        counted = 0
    return counted if isinstance(counted, int) and not isinstance(counted, bool) else 0


def final_result(task_id: str, meta: dict[str, Any]) -> Result:
    """The result object plus `state` (SUCCESS or FAILURE) of a finished task."""
    state, value = meta["status"], meta.get("result")
    if state == "SUCCESS" and isinstance(value, dict):
        return cast("Result", {**value, "state": "SUCCESS"})
    carried = failure_carried(value)
    if carried is not None:
        return cast("Result", {**carried, "state": "FAILURE"})
    # Ended without a result of ours (revoked before it started, or not our JSON): the
    # same shape, nothing generated.
    if state == "REVOKED":
        error = Cancelled("cancelled before it started").to_dict()
    else:
        error = {"code": "model_error", "message": _describe_exception(value)[:500]}
    empty = ResultTimings(queued=0.0, fetch=0.0, preprocess=0.0, generate=0.0, total=0.0)
    return Result(
        id=task_id,
        task=_short_name(meta),
        state="FAILURE",
        text="",
        model="",
        usage=Usage(prompt_tokens=0, completion_tokens=0),
        finish_reason="",
        timings=empty,
        worker=str(meta.get("worker") or ""),
        device="",
        error=cast("ResultError", error),
    )


def failure_carried(value: Any) -> dict[str, Any] | None:
    """The failure result inside Celery's JSON form of `vision_queue.errors.TaskFailed`."""
    if not isinstance(value, dict) or value.get("exc_type") != "TaskFailed":
        return None
    if value.get("exc_module") not in FAILURE_EXC_MODULES:
        return None
    args = value.get("exc_message")
    if isinstance(args, list) and len(args) == 1 and isinstance(args[0], dict):
        return args[0]
    return None


def task_failed_json(result: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `failure_carried`: what workers store as a failure's `result`."""
    return {"exc_type": "TaskFailed", "exc_module": FAILURE_EXC_MODULES[0], "exc_message": [result]}


def _describe_exception(value: Any) -> str:
    if isinstance(value, dict):
        args = value.get("exc_message")
        text = ", ".join(str(a) for a in args) if isinstance(args, list) else str(args or "")
        return f"{value.get('exc_type', 'Error')}: {text}"
    return f"Error: {value}"


def _short_name(meta: dict[str, Any]) -> str:
    name = str(meta.get("name") or "")
    return name.removeprefix("vision_queue.")


# What a worker stores (`Result` above is how clients read it) ----------------------------


@dataclass
class Timings:
    queued: float = 0.0
    fetch: float = 0.0
    preprocess: float = 0.0
    generate: float = 0.0
    total: float = 0.0

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in asdict(self).items()}


@dataclass
class TaskResult:
    """What a finished task stores: the same shape for success and failure."""

    id: str
    task: str
    text: str = ""
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timings: Timings = field(default_factory=Timings)
    worker: str = ""
    device: str = ""
    # "stop" (end token or stop string), "length" (token budget), "cancelled"; empty when
    # the task failed before generating.
    finish_reason: str = ""
    error: dict[str, Any] | None = None
    logprobs: list[TokenLogprob] | None = None  # only when the task asked for them
    cached_tokens: int = 0  # prompt positions taken from the worker's image cache
    choices: list[Choice] | None = None  # only for options.n above 1

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "task": self.task,
            "text": self.text,
            "model": self.model,
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "cached_tokens": self.cached_tokens,
            },
            "finish_reason": self.finish_reason,
            "timings": self.timings.rounded(),
            "worker": self.worker,
            "device": self.device,
        }
        if self.error is not None:
            out["error"] = self.error
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
        if self.choices is not None:
            out["choices"] = self.choices
        return out
