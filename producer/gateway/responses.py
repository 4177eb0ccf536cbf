"""OpenAI's Responses API in terms of chat completions: the same `ask` task, other shapes.

`input` is a string (one user message) or a list of messages whose content is a string or
parts: `input_text`, `input_image` (`image_url`: https or a data: URI) and, in assistant
messages, `output_text`. `instructions` becomes the system turn. The gateway is stateless:
nothing is stored (`store` is answered false) and `previous_response_id` is refused with a
400. Sampling: `max_output_tokens`, `temperature` (left out: greedy), `top_p`. `text.format`
is `text`, `json_object` or `json_schema` (`name`, `schema`, `strict`: the chat API's
`response_format`, flattened; decoding follows the schema, vision_queue.structured); a
schema outside the supported subset is a 400 naming `text.format`. Tools are refused.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from producer.gateway import chat
from vision_queue.errors import InvalidInput
from vision_queue.structured import check_response_format, parse_response_format

_UNSUPPORTED = ("tools", "tool_choice", "reasoning", "conversation", "prompt", "background")


class ResponsesRequest(BaseModel):
    """The fields of OpenAI's request this gateway acts on; others are accepted and unused."""

    model_config = ConfigDict(strict=True, extra="allow")
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool | None = False
    store: bool | None = None
    previous_response_id: str | None = None
    text: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    priority: str | None = Field(
        None, description="vision-queue extension: high, normal (default) or low."
    )


def chat_request(request: ResponsesRequest) -> chat.ChatCompletionRequest:
    """The chat completion request that asks the same; InvalidInput naming the field."""
    extra = request.model_extra or {}
    for name in _UNSUPPORTED:
        if extra.get(name):
            raise InvalidInput(f"{name} is not supported by this model", field=name)
    if request.previous_response_id is not None:
        raise InvalidInput(
            "previous_response_id is not supported: this gateway stores no responses "
            "(store is false); send the whole conversation in input",
            field="previous_response_id",
        )
    response_format = _response_format((request.text or {}).get("format"))
    messages: list[dict[str, Any]] = []
    if request.instructions:
        messages.append({"role": "system", "content": request.instructions})
    if isinstance(request.input, str):
        messages.append({"role": "user", "content": request.input})
    else:
        for index, item in enumerate(request.input):
            messages.append(_message(item, f"input[{index}]"))
    if not messages:
        raise InvalidInput("input is empty", field="input")
    body: dict[str, Any] = {"model": request.model, "messages": messages}
    if request.max_output_tokens is not None:
        body["max_completion_tokens"] = request.max_output_tokens
    for name in ("temperature", "top_p", "priority"):
        value = getattr(request, name)
        if value is not None:
            body[name] = value
    if response_format is not None:
        body["response_format"] = response_format
    try:
        return chat.ChatCompletionRequest.model_validate(body)
    except ValueError as exc:
        raise InvalidInput(f"input is not valid: {str(exc)[:300]}", field="input") from None


def _response_format(fmt: Any) -> dict[str, Any] | None:
    """`text.format` as the chat API's response_format, checked; InvalidInput naming it."""
    if fmt is None:
        return None
    try:
        if not isinstance(fmt, dict):
            raise InvalidInput("text.format must be an object", field="text.format")
        if fmt.get("type") == "json_schema":
            spec = {key: value for key, value in fmt.items() if key != "type"}
            fmt = {"type": "json_schema", "json_schema": spec}
        canonical = parse_response_format(fmt)
        check_response_format(canonical)
    except InvalidInput as exc:
        message = exc.message.replace("response_format.json_schema.", "text.format.")
        raise InvalidInput(message.replace("response_format", "text.format"),
                           field="text.format") from None
    return canonical


def text_format(request: ResponsesRequest) -> dict[str, Any]:
    """The `text.format` a response echoes: the request's, or text."""
    fmt = (request.text or {}).get("format")
    return fmt if isinstance(fmt, dict) else {"type": "text"}


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    kind = item.get("type", "message")
    if kind != "message":
        raise InvalidInput(f"input items of type {str(kind)[:40]!r} are not supported", field=where)
    role = item.get("role")
    if role not in ("user", "system", "developer", "assistant"):
        raise InvalidInput("role must be user, system, developer or assistant", field=where)
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise InvalidInput("content must be a string or a list of parts", field=where)
    parts: list[dict[str, Any]] = []
    for position, part in enumerate(content):
        at = f"{where}.content[{position}]"
        if not isinstance(part, dict):
            raise InvalidInput("a content part is an object", field=at)
        kind = part.get("type")
        if kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        elif kind == "input_image":
            raise InvalidInput("input_image needs image_url (file_id is not supported)", field=at)
        else:
            raise InvalidInput(f"unsupported content part {str(kind)[:40]!r}", field=at)
    return {"role": role, "content": parts}


def response_id(task_id: str) -> str:
    return "resp_" + task_id.replace("-", "")


def message_id(task_id: str) -> str:
    return "msg_" + task_id.replace("-", "")


def usage(result: dict[str, Any]) -> dict[str, Any]:
    counts = chat.usage(result)
    return {
        "input_tokens": counts["prompt_tokens"],
        "input_tokens_details": counts["prompt_tokens_details"],
        "output_tokens": counts["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": counts["total_tokens"],
    }


def message(task_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {
        "type": "message",
        "id": message_id(task_id),
        "status": status,
        "role": "assistant",
        "content": content if status == "completed" or text else [],
    }


def response(
    task_id: str,
    model: str,
    request: ResponsesRequest,
    created: int,
    result: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The response object: in progress (no result), completed, incomplete or failed."""
    body: dict[str, Any] = {
        "id": response_id(task_id),
        "object": "response",
        "created_at": created,
        "status": "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "metadata": request.metadata or {},
        "model": model,
        "output": [],
        "parallel_tool_calls": False,
        "previous_response_id": None,
        "reasoning": None,
        "store": False,
        "temperature": 0.0 if request.temperature is None else request.temperature,
        "text": {"format": text_format(request)},
        "tool_choice": "none",
        "tools": [],
        "top_p": 1.0 if request.top_p is None else request.top_p,
        "truncation": "disabled",
        "usage": None,
        "user": None,
    }
    if error is not None:
        body.update(status="failed", error=error)
    elif result is not None:
        if result.get("finish_reason") == "length":
            body.update(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
        else:
            body["status"] = "completed"
        body["output"] = [message(task_id, str(result.get("text", "")))]
        body["usage"] = usage(result)
    return body


def now() -> int:
    return int(time.time())
