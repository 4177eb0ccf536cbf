"""The lines of a batch input file: checked when the batch is created, turned into tasks
as the feeder queues them, and written back in OpenAI's output line format.

An input line is `{"custom_id": ..., "method": "POST", "url": <endpoint>, "body": {...}}`;
`custom_id` is unique in the file, `url` is the batch's endpoint, and the body is what that
endpoint takes (its model the served one, no `stream`), checked as the endpoint checks it,
images included. A bad line goes to the error file with its reason and never reaches the
queue. An output line is `{"id", "custom_id", "response": {"status_code", "request_id",
"body"}, "error"}`: the body a chat completion or a response object for a finished task,
an error object for a failed one; lines that never ran have `response` null and `error`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from producer.gateway import chat
from producer.gateway import responses as shapes
from producer.gateway.errors import task_error
from producer.submission import SubmitRequest, prepare
from vision_queue.errors import VisionQueueError
from vision_queue.images import ImageLimits
from vision_queue.protocol import Priority, TaskName
from vision_queue.settings import Settings

ENDPOINTS = ("/v1/chat/completions", "/v1/responses")
MAX_LINES = 100_000
_LINE_NAMESPACE = uuid.UUID("6f1c3a52-8c1e-4f7e-9b8a-1d2c3b4a5e6f")


@dataclass(frozen=True)
class Checked:
    valid: list[str]  # the lines to run, as compact JSON, in file order
    errors: list[dict[str, Any]]  # output lines of the refused ones
    total: int  # every non-blank line


def line_task_id(batch_id: str, position: int) -> str:
    """The task id of the batch's `position`-th valid line: the same on every feed."""
    return str(uuid.uuid5(_LINE_NAMESPACE, f"{batch_id}/{position}"))


def check_file(
    content: bytes, endpoint: str, model: str, settings: Settings, priority: Priority
) -> Checked:
    limits = ImageLimits.from_settings(settings)
    seen: set[str] = set()
    valid: list[str] = []
    errors: list[dict[str, Any]] = []
    total = 0
    for number, text in _lines(content):
        total += 1
        custom_id: Any = None
        try:
            line = json.loads(text)
            if not isinstance(line, dict):
                raise ValueError("a line is a JSON object")
            custom_id = line.get("custom_id")
            if not isinstance(custom_id, str) or not custom_id:
                raise ValueError("custom_id must be a non-empty string")
            if custom_id in seen:
                raise ValueError(f"custom_id {custom_id[:64]!r} is not unique in the file")
            seen.add(custom_id)
            if line.get("method", "POST") != "POST":
                raise ValueError("method must be POST")
            if line.get("url") != endpoint:
                raise ValueError(f"url must be the batch's endpoint {endpoint}")
            body = line.get("body")
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            prepare(to_request(endpoint, body, model, settings, priority, None), settings, limits)
        except (ValueError, VisionQueueError) as exc:
            errors.append(refused(custom_id, number, _reason(exc)))
            continue
        valid.append(json.dumps({"custom_id": custom_id, "body": body}, separators=(",", ":")))
    return Checked(valid, errors, total)


def to_request(
    endpoint: str,
    body: dict[str, Any],
    model: str,
    settings: Settings,
    priority: Priority,
    task_id: str | None,
) -> SubmitRequest:
    """The task one line's body asks for (ValueError or VisionQueueError if it is bad)."""
    if body.get("stream"):
        raise ValueError("stream is not supported in a batch")
    if endpoint == "/v1/responses":
        request = shapes.chat_request(shapes.ResponsesRequest.model_validate(body))
    else:
        request = chat.ChatCompletionRequest.model_validate(body)
    if request.model != model:
        raise ValueError(f"model {request.model[:100]!r} does not exist here; use {model!r}")
    convo = chat.conversation(request, settings.private_host_allowlist)
    options = convo.options
    return SubmitRequest(
        TaskName.ASK,
        list(convo.images),
        None,
        options.max_new_tokens,
        options.num_crops,
        options.temperature,
        options.top_p,
        options.seed,
        options.stop,
        convo.turns,
        None,
        priority if request.priority is None else convo.priority,
        task_id,
    )


def finished(
    endpoint: str,
    body: dict[str, Any],
    model: str,
    task_id: str,
    custom_id: str,
    result: dict[str, Any],
) -> tuple[bool, dict[str, Any]]:
    """(succeeded, output line) of a line whose task has ended."""
    line_id = "batch_req_" + task_id.replace("-", "")
    if result.get("state") == "SUCCESS":
        if endpoint == "/v1/responses":
            request = shapes.ResponsesRequest.model_validate(body)
            answer = shapes.response(task_id, model, request, shapes.now(), result)
        else:
            answer = chat.completion(task_id, model, result)
        response = {"status_code": 200, "request_id": task_id, "body": answer}
        return True, {"id": line_id, "custom_id": custom_id, "response": response, "error": None}
    error = task_error(result.get("error") or {})
    response = {"status_code": error.status, "request_id": task_id, "body": error.body()}
    return False, {"id": line_id, "custom_id": custom_id, "response": response, "error": None}


def unrun(custom_id: str, task_id: str, code: str, message: str) -> dict[str, Any]:
    """The error line of a line that never ran (cancelled, expired)."""
    return {
        "id": "batch_req_" + task_id.replace("-", ""),
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


def refused(custom_id: Any, number: int, reason: str) -> dict[str, Any]:
    return {
        "id": f"batch_req_line{number}",
        "custom_id": custom_id if isinstance(custom_id, str) else None,
        "response": None,
        "error": {"code": "invalid_request", "message": reason, "line": number},
    }


def _lines(content: bytes) -> Iterator[tuple[int, str]]:
    for number, raw in enumerate(content.decode("utf-8").splitlines(), start=1):
        if raw.strip():
            yield number, raw


def _reason(exc: Exception) -> str:
    if isinstance(exc, VisionQueueError):
        where = f" ({exc.field})" if exc.field else ""
        return f"{exc.code.value}: {exc.message}{where}"[:500]
    return str(exc)[:500]
