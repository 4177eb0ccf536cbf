"""The native task API's request and result schemas, built from the contract's own types.

`TaskOptions` and `ChatMessage` are the dataclasses of `vision_queue.schemas`, used as they
are; the result mirrors `TaskResult.to_dict()` (tests hold the two field for field). Types
and shapes are checked here; the rules (ranges, image counts, special tokens, URL
addresses) are the contract's `check_request`, run by the client when the gateway submits,
so an HTTP caller meets exactly the checks a Python caller does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypeVar

import anyio.to_thread
from pydantic import BaseModel, ConfigDict, Field

from vision_queue.addresses import check_url
from vision_queue.documents import DOCUMENT_RESULT_FIELDS
from vision_queue.errors import ImageFetchFailed, InvalidInput
from vision_queue.image_refs import RefKind, ref_kind
from vision_queue.images import decode_base64_image
from vision_queue.protocol import Priority, TaskName
from vision_queue.results import Timings
from vision_queue.schemas import ChatMessage, ImageRef, ImageSource, TaskOptions

T = TypeVar("T")

_STRICT = ConfigDict(strict=True, extra="forbid")
# Bodies up to this size are parsed on the event loop (well under a millisecond); larger
# ones, up to VQ_GATEWAY_MAX_BODY_BYTES, in a worker thread, so no parse stalls the loop.
INLINE_PARSE_BYTES = 64 * 1024


# JSON values a request body may hold beyond the characters of its text: structure
# (messages, parts, options) never comes near it; images are single strings.
_STRUCTURE_ALLOWANCE = 4096


def check_json_bounds(raw: bytes, max_text_chars: int) -> None:
    """Refuse, before parsing, a body with more JSON values than any request needs.

    Parsing and validating runs in C holding the GIL: a thread does not keep it from
    the event loop. What makes it slow is the number of values (2 s for 400,000 small
    objects), not the bytes (a 20 MB base64 image is one string). Each `{` or `,`
    outside a string starts a value; inside strings they are text, bounded by
    VQ_MAX_CONVERSATION_CHARS. So more of either than that plus a structural allowance
    is refused at C speed, and validation stays a few hundred milliseconds at worst."""
    limit = max_text_chars + _STRUCTURE_ALLOWANCE
    if raw.count(b"{") > limit or raw.count(b",") > limit:
        raise InvalidInput(
            f"the body holds more than {limit} JSON objects or items; no request needs that",
            field="body",
        )


async def off_loop_if_large(size: int, work: Callable[[], T]) -> T:
    """`work()` (parsing, base64 decoding) inline for a small body, else in a thread."""
    if size <= INLINE_PARSE_BYTES:
        return work()
    return await anyio.to_thread.run_sync(work)


_OUTPUT = ConfigDict(extra="ignore")


class ImageInput(BaseModel):
    """One image: exactly one of `url` and `data`."""

    model_config = _STRICT
    url: str | None = Field(None, description="http(s) URL a worker fetches (public hosts).")
    data: str | None = Field(
        None, description="The file as base64, or a data:image/...;base64, URI."
    )


class DocumentData(BaseModel):
    """A PDF: exactly one of `data` (base64 or a data:application/pdf;base64, URI) and `url`."""

    model_config = _STRICT
    data: str | None = Field(None, description="The PDF as base64 or a data: URI.")
    url: str | None = Field(
        None, description="http(s) URL of the PDF; a worker downloads it (public hosts)."
    )


class TaskSubmission(BaseModel):
    """`POST /v1/tasks` as JSON. Multipart uploads carry the same fields (see TaskUpload)."""

    model_config = _STRICT
    task: TaskName
    images: list[ImageInput] = Field(
        default_factory=list, description="describe/ocr: 1, compare: 2..8, ask: 0..8."
    )
    prompt: str | None = Field(None, description="ask only: the question.")
    messages: list[ChatMessage] | None = Field(
        None,
        description="ask only, instead of prompt: system message and earlier turns, ending "
        "with the user's; `images` counts the request's images each user turn shows, in order.",
    )
    options: TaskOptions = Field(
        default_factory=TaskOptions,
        description="max_new_tokens (capped per task), num_crops 1..16, temperature 0..2 "
        "(0 = greedy), top_p (0, 1], seed, up to 4 stop strings, logprobs (true) with "
        "top_logprobs 0..20, n 1..8 (choices from one prefill), response_format (OpenAI's "
        'shape: {"type": "json_schema", "json_schema": {"name", "schema", "strict"}} or '
        '{"type": "json_object"}).',
    )
    callback_url: str | None = Field(
        None, description="When the task ends, its result is POSTed here, signed."
    )
    priority: Priority = Field(
        Priority.NORMAL,
        description="high, normal (default) or low: a worker takes a waiting high task "
        "before normal ones, and those before low ones.",
    )
    document: DocumentData | None = Field(
        None,
        description="ocr, describe, ask: a PDF instead of images; its pages run in parallel "
        "as one task whose result lists every page.",
    )
    max_failed_pages: int = Field(
        0, description="With a document: it still succeeds when at most this many pages failed."
    )


class TaskUpload(BaseModel):
    """`POST /v1/tasks` as multipart/form-data: files under `images`, JSON in text fields."""

    task: TaskName
    images: list[bytes] = Field(default_factory=list, json_schema_extra={"format": "binary"})
    prompt: str | None = None
    messages: str | None = Field(None, description="JSON array, as in the JSON form.")
    options: str | None = Field(None, description="JSON object, as in the JSON form.")
    callback_url: str | None = None
    priority: Priority = Priority.NORMAL
    document: bytes | None = Field(None, json_schema_extra={"format": "binary"})
    max_failed_pages: int = 0


class TaskAccepted(BaseModel):
    id: str
    task: TaskName
    state: Literal["PENDING"] = "PENDING"


class Usage(BaseModel):
    model_config = _OUTPUT
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Prompt tokens served from the worker's image cache (part of prompt_tokens); absent
    # where the stored result has none (older workers, a document's joined result).
    cached_tokens: int | None = None


class TaskError(BaseModel):
    model_config = _OUTPUT
    code: str = Field(description="One of the error codes in the README.")
    message: str
    field: str | None = None


class TaskResultBody(BaseModel):
    """A finished task: `TaskResult.to_dict()` plus `state`. Failures carry `error`."""

    model_config = _OUTPUT
    id: str
    task: str
    state: Literal["SUCCESS", "FAILURE"]
    text: str = ""
    model: str = ""
    usage: Usage = Field(default_factory=Usage)
    finish_reason: str = Field("", description='"stop", "length", "cancelled", or "".')
    timings: Timings = Field(default_factory=Timings)
    worker: str = ""
    device: str = ""
    error: TaskError | None = None
    # A document's pages, in order (page, id, state, text, usage, error when it failed).
    pages: list[dict[str, Any]] | None = None
    pages_total: int | None = None
    pages_done: int | None = None
    pages_failed: int | None = None
    # With options.logprobs: per generated token, OpenAI's {token, logprob, bytes,
    # top_logprobs} (vision_queue.logprobs).
    logprobs: list[dict[str, Any]] | None = None
    # With options.n above 1: each choice's index, text, finish_reason, completion_tokens
    # (and logprobs); `text` is the first one's.
    choices: list[dict[str, Any]] | None = None

    @classmethod
    def of(cls, result: dict[str, Any]) -> TaskResultBody:
        return cls.model_validate(result)

    def to_json(self) -> dict[str, Any]:
        body = self.model_dump(mode="json")
        # As TaskResult.to_dict: `error` only on failure, its `field` only when named.
        if body["error"] is None:
            del body["error"]
        elif body["error"]["field"] is None:
            del body["error"]["field"]
        if body["usage"]["cached_tokens"] is None:
            del body["usage"]["cached_tokens"]
        for name in (*DOCUMENT_RESULT_FIELDS, "logprobs", "choices"):
            if body[name] is None:
                del body[name]
        return body


class CancelAccepted(BaseModel):
    id: str
    status: Literal["cancel_requested", "already_finished"] = Field(
        "cancel_requested",
        description="cancel_requested (202): the task then ends with error code cancelled; "
        "already_finished (200): it had ended before, and its result stands.",
    )


Unfinished = Literal["PENDING", "STARTED", "PROGRESS", "RETRY"]


class TaskStatusBody(BaseModel):
    """A task not finished yet."""

    id: str
    state: Unfinished
    tokens: int = Field(0, description="Tokens generated so far, while running.")
    worker: str = ""
    pages_done: int | None = Field(None, description="A document: its pages ended so far.")
    pages_total: int | None = Field(None, description="A document: its page count.")


def url_image(url: str, field: str, allowlist: frozenset[str]) -> ImageRef:
    """A URL for the client to queue, as an explicit URL reference (never a string the
    client would have to interpret). The address rules run here, so a refusal names the
    image's field; names are resolved later (`producer.gateway.resolve`)."""
    if ref_kind(url, field, allow_path=False) is not RefKind.URL:
        raise InvalidInput("image URLs must be http(s)", field=field)
    try:
        check_url(url, allowlist)
    except ImageFetchFailed as exc:
        exc.field = field
        raise
    return ImageRef(ImageSource.URL, url)


def image_string(
    text: str, field: str, allowlist: frozenset[str], max_bytes: int
) -> ImageRef | bytes:
    """What a remote caller sent as an image string: a data: URI (decoded here, with the
    byte cap before expanding) or an http(s) URL; anything else is refused, never read."""
    if ref_kind(text, field, allow_path=False) is RefKind.DATA:
        return decode_base64_image(text, field=field, max_bytes=max_bytes)
    return url_image(text, field, allowlist)


def data_image(data: str, field: str, max_bytes: int) -> bytes:
    """base64 or a data: URI; strict decoding, the byte cap before expanding."""
    return decode_base64_image(data, field=field, max_bytes=max_bytes)


def submission_images(
    images: list[ImageInput], max_bytes: int, allowlist: frozenset[str]
) -> list[ImageRef | bytes]:
    out: list[ImageRef | bytes] = []
    for index, image in enumerate(images):
        field = f"images[{index}]"
        if (image.url is None) == (image.data is None):
            raise InvalidInput("give an image as exactly one of url and data", field=field)
        if image.url is not None:
            out.append(url_image(image.url, field, allowlist))
        else:
            assert image.data is not None
            out.append(data_image(image.data, field, max_bytes))
    return out


def lone_surrogate_at(value: object, where: str = "") -> str | None:
    """Where the first text holding a lone surrogate (not UTF-8) is, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "body"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = lone_surrogate_at(str(key), where) or lone_surrogate_at(
                item, f"{where}.{key}" if where else str(key)
            )
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = lone_surrogate_at(item, f"{where}[{index}]")
            if found:
                return found
    return None


def check_text(value: object) -> None:
    """Every text field of a request must be valid UTF-8 (no lone surrogates)."""
    where = lone_surrogate_at(value)
    if where is not None:
        field = where[:80]
        raise InvalidInput(f"{field}: text is not valid UTF-8 (lone surrogate)", field=field)
