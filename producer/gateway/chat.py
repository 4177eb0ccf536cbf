"""OpenAI chat completions in terms of the contract: an `ask` task with a conversation.

Messages become `ChatMessage` turns (system and developer messages as system turns); the
`image_url` parts of user messages become the request's images in order of appearance,
each turn showing its own images before its text, so the worker numbers them
`<|image_1|>`... across the conversation. Text parts of one message are joined by new
lines. Sampling fields map one to one; `temperature` left out means greedy decoding
(OpenAI's default is 1). `priority` (high, normal, low) is this gateway's own extension
field (the OpenAI SDKs send it with `extra_body`).

Every other field of OpenAI's request is either refused with a 400 naming it, when it asks
for something this server does not do (`REFUSED`: tools, penalties, logit bias,
audio...; a value that asks for nothing,
such as `null`, `[]`, `false` or a penalty of 0, passes), or accepted and ignored
(`IGNORED`: bookkeeping such as `user` or `metadata`). A field in neither list is refused
as unknown. The README's gateway section lists both.

`response_format` in OpenAI's shapes (`json_schema`, `json_object`, `text`) is the task's
own (vision_queue.structured): the worker's decoding is constrained by the schema, so the
SDK's `parse()` gets JSON that validates; a schema outside the supported subset is a 400
naming `response_format`, before anything is queued.

`logprobs: true` with `top_logprobs` (0..20) is the task's `options.logprobs`: the
result's per-token list is OpenAI's `choices[0].logprobs.content` as it is; streamed,
each chunk carries the entries of its tokens (vision_queue.logprobs says what they are).
`n` (1..8) is the task's `options.n`: one prefill, n rows decoding together, n choices.
Streamed, each chunk's `choices[0].index` names its choice (the stream's deltas carry it),
and every choice gets its own last chunk with its `finish_reason` (and the logprobs of its
tokens whose text came with the end) before the one usage chunk.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from producer.gateway.wire import image_string
from vision_queue.errors import InvalidInput
from vision_queue.generation_options import MAX_CHOICES
from vision_queue.logprobs import check_logprobs_options
from vision_queue.protocol import Priority
from vision_queue.schemas import (
    ChatMessage,
    ImageRef,
    Role,
    TaskOptions,
    parse_priority,
    stop_strings,
)
from vision_queue.structured import parse_response_format

_REQUEST = ConfigDict(strict=True, extra="allow")
_PART = ConfigDict(strict=True, extra="ignore")
_ROLES = {
    "system": Role.SYSTEM,
    "developer": Role.SYSTEM,
    "user": Role.USER,
    "assistant": Role.ASSISTANT,
}
# Fields that ask for something this server does not do: refused (400 naming the field)
# unless their value asks for nothing (null, false, empty, 0).
REFUSED = (
    "tools",
    "functions",
    "tool_choice",
    "function_call",
    "audio",
    "prediction",
    "modalities",
    "logit_bias",
    "frequency_penalty",
    "presence_penalty",
    "web_search_options",
    "reasoning_effort",
)
# Accepted and ignored: bookkeeping, or meaningful only with a refused field.
IGNORED = (
    "user",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
    "safety_identifier",
    "prompt_cache_key",
    "verbosity",
)
# On a message: only `name` is ignored; tool calls and the rest are refused when set.
_MESSAGE_IGNORED = ("name",)


class TextPart(BaseModel):
    model_config = _PART
    type: Literal["text"]
    text: str


class ImageUrl(BaseModel):
    model_config = _PART
    url: str = Field(description="https://... or data:image/png;base64,...")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    model_config = _PART
    type: Literal["image_url"]
    image_url: ImageUrl


class FileData(BaseModel):
    model_config = _PART
    filename: str | None = None
    file_data: str = Field(description="data:application/pdf;base64,...")


class FilePart(BaseModel):
    """A PDF: its pages become the prompt's images, in order (gateway/chat_documents.py)."""

    model_config = _PART
    type: Literal["file"]
    file: FileData


ContentPart = Annotated[TextPart | ImagePart | FilePart, Field(discriminator="type")]
# Draws a `file` part's pages: (file_data, where, images so far) -> PNG bytes per page.
DocumentPages = Callable[[str, str, int], list[bytes]]


class ChatCompletionMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = _PART
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's request this gateway acts on; others are REFUSED or IGNORED."""

    model_config = _REQUEST
    model: str
    messages: list[ChatCompletionMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    max_tokens: int | None = Field(None, description="Older name of max_completion_tokens.")
    temperature: float | None = Field(None, description="0..2; left out: 0 (greedy).")
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, description="0..20, with logprobs: true.")
    response_format: dict[str, Any] | None = None
    priority: str | None = Field(
        None,
        description="vision-queue extension: high, normal (default) or low; a worker takes "
        "a waiting high task first.",
    )


@dataclass(frozen=True)
class Conversation:
    """What the gateway submits for one chat completion."""

    turns: tuple[ChatMessage, ...]
    images: list[ImageRef | bytes]
    image_params: list[str]  # where each image came from: messages[i].content[j]
    options: TaskOptions
    budget_param: str = "max_completion_tokens"  # the request's name for max_new_tokens
    priority: Priority = Priority.NORMAL

    def param_of(self, field: str | None) -> str | None:
        """The request's own name for a field the client names in the contract's terms."""
        if field == "max_new_tokens":
            return self.budget_param
        if field and field.startswith("images[") and field.endswith("]"):
            index = field[7:-1]
            if index.isdigit() and int(index) < len(self.image_params):
                return self.image_params[int(index)]
        return field


def conversation(
    request: ChatCompletionRequest,
    allowlist: frozenset[str] = frozenset(),
    max_image_bytes: int = 20 * 1024 * 1024,
    documents: DocumentPages | None = None,
) -> Conversation:
    """The turns, images and options for `request`; InvalidInput naming the field if not.

    Image data: URIs are decoded here (the byte cap first); nothing becomes a path."""
    _check_extra(request.model_extra or {}, "")
    for index, message in enumerate(request.messages):
        _check_extra(message.model_extra or {}, f"messages[{index}].", _MESSAGE_IGNORED)
    if request.n is not None and not 1 <= request.n <= MAX_CHOICES:
        raise InvalidInput(f"n must be from 1 to {MAX_CHOICES}", field="n")
    check_logprobs_options(bool(request.logprobs), request.top_logprobs)

    turns: list[ChatMessage] = []
    images: list[ImageRef | bytes] = []
    params: list[str] = []
    for index, message in enumerate(request.messages):
        role = _ROLES[message.role]
        content = message.content
        texts: list[str] = []
        shown = 0
        if isinstance(content, str):
            texts.append(content)
        elif content is not None:
            for position, part in enumerate(content):
                where = f"messages[{index}].content[{position}]"
                if isinstance(part, TextPart):
                    texts.append(part.text)
                    continue
                if role is not Role.USER:
                    raise InvalidInput("only user messages may carry images", field=where)
                if isinstance(part, FilePart):
                    if documents is None:
                        raise InvalidInput("file parts are not accepted here", field=where)
                    pages = documents(part.file.file_data, where, len(images))
                    images.extend(pages)
                    params.extend([where] * len(pages))
                    shown += len(pages)
                    continue
                images.append(image_string(part.image_url.url, where, allowlist, max_image_bytes))
                params.append(where)
                shown += 1
        turns.append(ChatMessage(role, "\n".join(texts), shown))
    budget = "max_tokens" if request.max_completion_tokens is None else "max_completion_tokens"
    priority = parse_priority(request.priority)
    return Conversation(tuple(turns), images, params, _options(request), budget, priority)


def _check_extra(extra: dict[str, Any], prefix: str, ignored: tuple[str, ...] = IGNORED) -> None:
    for name, value in extra.items():
        if name in ignored:
            continue
        field = f"{prefix}{name[:40]}"
        if name in REFUSED or prefix:
            if value in (None, False, 0, "", [], {}):
                continue
            raise InvalidInput(f"{field} is not supported by this server", field=field)
        raise InvalidInput(
            f"{field} is not a field this server knows (see the README for the fields it "
            "implements, ignores and refuses)",
            field=field,
        )


def _options(request: ChatCompletionRequest) -> TaskOptions:
    budget = request.max_completion_tokens
    if budget is None:
        budget = request.max_tokens
    return TaskOptions(
        max_new_tokens=budget,
        temperature=0.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        seed=request.seed,
        stop=() if request.stop is None else stop_strings(request.stop),
        response_format=parse_response_format(request.response_format),
        logprobs=bool(request.logprobs),
        top_logprobs=request.top_logprobs,
        n=None if request.n in (None, 1) else request.n,
    )


# Responses --------------------------------------------------------------------------------


def completion_id(task_id: str) -> str:
    return f"chatcmpl-{task_id}"


def usage(result: dict[str, Any]) -> dict[str, Any]:
    counts = result.get("usage") or {}
    prompt = int(counts.get("prompt_tokens", 0))
    completion = int(counts.get("completion_tokens", 0))
    cached = int(counts.get("cached_tokens", 0))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        # OpenAI's field: prompt tokens the worker's image cache served (no work redone).
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def completion(task_id: str, model: str, result: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": completion_id(task_id),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": choice.get("index", 0),
                "message": {"role": "assistant", "content": choice.get("text", "")},
                "finish_reason": choice.get("finish_reason") or "stop",
                "logprobs": logprobs(choice.get("logprobs")),
            }
            for choice in result.get("choices") or [result]
        ],
        "usage": usage(result),
    }


def logprobs(entries: Any) -> dict[str, Any] | None:
    """OpenAI's `choices[i].logprobs`: the result's entries as its `content` (None: none)."""
    if entries is None:
        return None
    return {"content": entries, "refusal": None}


def chunk(
    task_id: str,
    model: str,
    created: int,
    delta: dict[str, str],
    finish_reason: str | None = None,
    entries: list[dict[str, Any]] | None = None,
    index: int = 0,
) -> dict[str, Any]:
    choice = {
        "index": index,
        "delta": delta,
        "finish_reason": finish_reason,
        "logprobs": logprobs(entries),
    }
    return {
        "id": completion_id(task_id),
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [choice],
    }


def usage_chunk(task_id: str, model: str, created: int, result: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": completion_id(task_id),
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage(result),
    }


def model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "vision-queue"}
