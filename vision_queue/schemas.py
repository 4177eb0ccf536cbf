"""Request and result shapes, and the validation both sides run on a request.

A request travels as a small JSON object (well under 10 KB whatever the images weigh):
images are referenced, never inlined. The worker validates every message again, since
anyone who can write to Redis can put a message on the queue.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from vision_queue.addresses import check_url, check_url_length
from vision_queue.errors import ImageFetchFailed, InvalidInput
from vision_queue.generation_options import check_generation_options, is_integer, is_number
from vision_queue.protocol import TASK_SPECS, Priority, TaskName, control_token_in
from vision_queue.settings import Settings
from vision_queue.structured import parse_response_format

SCHEMA_VERSION = 1
_DIGEST = re.compile(r"[0-9a-f]{64}")
_MAX_REF_CHARS = 4096


class ImageSource(str, Enum):
    URL = "url"  # http(s) URL the worker fetches (address-checked)
    STAGED = "staged"  # bytes staged in Redis under their SHA-256
    PATH = "path"  # file on the worker's filesystem, under VQ_LOCAL_IMAGE_ROOTS


@dataclass(frozen=True)
class ImageRef:
    source: ImageSource
    ref: str

    def to_dict(self) -> dict[str, str]:
        return {"source": self.source.value, "ref": self.ref}

    def describe(self) -> str:
        """A log-safe description: URLs lose their query string, which may hold tokens."""
        if self.source is ImageSource.URL:
            return "url:" + self.ref.split("?", 1)[0][:200]
        if self.source is ImageSource.STAGED:
            return "staged:" + self.ref[:12]
        return "path:" + self.ref[-200:]


class Role(str, Enum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


@dataclass(frozen=True)
class ChatMessage:
    """One turn of an `ask` conversation.

    `images` is how many of the request's images this turn shows, placed before its text;
    images are numbered in order across the whole conversation (the first turn's come
    first). Only user turns show images. The worker renders the turns in Phi-3's chat
    format (`worker.model.processor.chat_text`).
    """

    role: Role
    text: str
    images: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role.value, "text": self.text, "images": self.images}


MAX_MESSAGES = 64
MAX_CALLBACK_URL_CHARS = 2048
# Chat-control and image tags (<|user|>, <|end|>, <|image_1|>...) are the template's alone.

# On the wire only when set (not None, not False): older workers read the rest.
_OPTIONAL = ("response_format", "logprobs", "top_logprobs", "n")


@dataclass(frozen=True)
class TaskOptions:
    """How to generate. The defaults are greedy decoding up to the task's token cap."""

    max_new_tokens: int | None = None
    num_crops: int | None = None
    temperature: float = 0.0  # 0 = greedy; otherwise sample from softmax(logits / T)
    top_p: float = 1.0  # nucleus sampling: the smallest set of ids whose mass reaches top_p
    seed: int | None = None  # same seed + same inputs = same text, whatever shares the batch
    stop: tuple[str, ...] = ()  # up to 4 strings; the text ends before the first one
    response_format: dict[str, Any] | None = None  # vision_queue.structured's canonical form
    logprobs: bool = False  # each token's logprob in the result (vision_queue.logprobs)
    top_logprobs: int | None = None  # 0..20 alternatives per token, with logprobs
    n: int | None = None  # choices (1..8) from one prefill; None = 1

    def to_dict(self) -> dict[str, Any]:
        # Spelled out, not dataclasses.asdict (which deep-copies): built once per submit.
        return {
            "max_new_tokens": self.max_new_tokens,
            "num_crops": self.num_crops,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": list(self.stop),
        } | {k: v for k in _OPTIONAL if (v := getattr(self, k)) is not None and v is not False}


@dataclass(frozen=True)
class TaskRequest:
    task: TaskName
    images: tuple[ImageRef, ...]
    prompt: str | None = None
    options: TaskOptions = field(default_factory=TaskOptions)
    submitted_at: float = field(default_factory=time.time)
    # `ask` only, instead of `prompt`: a system message and earlier turns, ending with the
    # user's question.
    messages: tuple[ChatMessage, ...] | None = None
    # When the task ends, the worker POSTs the result here, signed (worker/delivery/webhooks.py).
    callback_url: str | None = None

    def to_message(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "v": SCHEMA_VERSION,
            "task": self.task.value,
            "prompt": self.prompt,
            "images": [image.to_dict() for image in self.images],
            "options": self.options.to_dict(),
            "submitted_at": self.submitted_at,
        }
        # Only when set, so a message without them reads the same to an older worker.
        if self.messages is not None:
            message["messages"] = [turn.to_dict() for turn in self.messages]
        if self.callback_url is not None:
            message["callback_url"] = self.callback_url
        return message

    def effective_prompt(self) -> str | tuple[ChatMessage, ...]:
        """What the template renders: the fixed prompt, the user's prompt, or the turns."""
        spec = TASK_SPECS[self.task]
        if spec.fixed_prompt is not None:
            return spec.fixed_prompt
        if self.messages is not None:
            return self.messages
        return self.prompt or ""

    def max_new_tokens(self, settings: Settings) -> int:
        cap = settings.token_caps[self.task]
        return self.options.max_new_tokens or cap


def parse_request(message: Any, settings: Settings) -> TaskRequest:
    """Validate a wire message into a TaskRequest or raise InvalidInput naming the field."""
    if not isinstance(message, dict):
        raise InvalidInput("request must be a JSON object", field="request")
    try:
        task = TaskName(message.get("task"))
    except ValueError:
        known = ", ".join(t.value for t in TaskName)
        raise InvalidInput(
            f"unknown task {preview(message.get('task'))} (known: {known})", field="task"
        ) from None

    images = _parse_images(message.get("images", []))
    prompt = message.get("prompt")
    options = _parse_options(message.get("options") or {})
    submitted_at = message.get("submitted_at", time.time())
    if not isinstance(submitted_at, (int, float)) or isinstance(submitted_at, bool):
        raise InvalidInput("submitted_at must be a number", field="submitted_at")
    try:
        submitted_at = float(submitted_at)
    except OverflowError:  # an integer beyond any float
        raise InvalidInput("submitted_at must be a finite number", field="submitted_at") from None
    raw_messages = message.get("messages")
    messages = None if raw_messages is None else _parse_messages(raw_messages)
    callback_url = message.get("callback_url")
    request = TaskRequest(task, images, prompt, options, submitted_at, messages, callback_url)
    check_request(request, settings)
    return request


def check_request(request: TaskRequest, settings: Settings) -> None:
    """The rules for a request; the producer runs them before queuing, the worker again."""
    spec = TASK_SPECS[request.task]
    count = len(request.images)
    most = min(spec.max_images, settings.max_images)
    if count < spec.min_images or count > most:
        wanted = str(spec.min_images) if spec.min_images == most else f"{spec.min_images}..{most}"
        raise InvalidInput(
            f"{request.task.value} takes {wanted} image(s), got {count}", field="images"
        )

    prompt = request.prompt
    if prompt is not None and not isinstance(prompt, str):
        raise InvalidInput(f"prompt must be a string, got {preview(prompt)}", field="prompt")
    if request.messages is not None:
        if spec.fixed_prompt is not None:
            raise InvalidInput(
                f"{request.task.value} uses a fixed prompt; use the ask task for a conversation",
                field="messages",
            )
        if prompt is not None:
            raise InvalidInput("give either a prompt or messages, not both", field="prompt")
        check_conversation(request.messages, count, settings)
    elif spec.fixed_prompt is None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidInput(f"{request.task.value} needs a prompt", field="prompt")
    elif prompt is not None:
        raise InvalidInput(
            f"{request.task.value} uses a fixed prompt; use the ask task for your own",
            field="prompt",
        )
    if isinstance(prompt, str):
        if len(prompt) > settings.max_prompt_chars:
            raise InvalidInput(
                f"prompt has {len(prompt)} characters, more than {settings.max_prompt_chars}",
                field="prompt",
            )
        _check_user_text(prompt, "prompt", "prompt")

    for index, image in enumerate(request.images):
        if image.source is ImageSource.URL:
            check_url_length(image.ref, field=f"images[{index}]")
    _check_integer_options(request.options)
    if request.callback_url is not None:
        check_callback_url(request.callback_url, settings.webhook_host_allowlist)
    submitted_at = request.submitted_at
    if (
        not isinstance(submitted_at, (int, float))
        or isinstance(submitted_at, bool)
        or not math.isfinite(submitted_at)
    ):
        raise InvalidInput("submitted_at must be a finite number", field="submitted_at")

    cap = settings.token_caps[request.task]
    max_new = request.options.max_new_tokens
    if max_new is not None and not 1 <= max_new <= cap:
        raise InvalidInput(
            f"max_new_tokens must be between 1 and {cap} for {request.task.value}",
            field="max_new_tokens",
        )
    crops = request.options.num_crops
    if crops is not None and not 1 <= crops <= 16:
        raise InvalidInput("num_crops must be between 1 and 16", field="num_crops")
    check_generation_options(request.options)


def check_conversation(
    messages: tuple[ChatMessage, ...], num_images: int, settings: Settings
) -> None:
    """The rules for an `ask` conversation; each fault names the turn (`messages[i]`)."""
    if not 1 <= len(messages) <= MAX_MESSAGES:
        raise InvalidInput(f"messages must hold 1 to {MAX_MESSAGES} turns", field="messages")
    if messages[-1].role is not Role.USER:
        raise InvalidInput("the last message must be the user's", field="messages")
    total = 0
    for index, turn in enumerate(messages):
        where = f"messages[{index}]"
        if turn.images and turn.role is not Role.USER:
            raise InvalidInput("only user messages may show images", field=where)
        if turn.role is Role.USER and not turn.images and not turn.text.strip():
            raise InvalidInput("a user message needs text or an image", field=where)
        _check_user_text(turn.text, where, "message text")
        total += len(turn.text)
    if total > settings.max_conversation_chars:
        raise InvalidInput(
            f"messages hold {total} characters, more than {settings.max_conversation_chars}",
            field="messages",
        )
    shown = sum(turn.images for turn in messages)
    if shown != num_images:
        raise InvalidInput(
            f"the messages show {shown} image(s) but the request has {num_images}",
            field="messages",
        )


def check_callback_url(url: Any, allowlist: frozenset[str]) -> None:
    """A webhook target: the fetched-URL rules (public addresses unless allow-listed)."""
    if not isinstance(url, str) or not url or len(url) > MAX_CALLBACK_URL_CHARS:
        raise InvalidInput(
            f"callback_url must be a URL of at most {MAX_CALLBACK_URL_CHARS} characters",
            field="callback_url",
        )
    try:
        check_url(url, allowlist)
    except ImageFetchFailed as exc:
        reason = exc.message.replace("image URL", "callback URL")
        raise InvalidInput(reason, field="callback_url") from None


def _check_user_text(text: str, where: str, label: str) -> None:
    """User text (a prompt, a conversation turn) as the model will read it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates: from invalid UTF-8 read with surrogateescape, or a broken client.
        raise InvalidInput(f"{label} is not valid UTF-8 text", field=where) from None
    if "\x00" in text:
        raise InvalidInput(f"{label} must not contain NUL characters", field=where)
    token = control_token_in(text)
    if token is not None:
        # User text: control tokens and image tags are the template's alone.
        raise InvalidInput(
            f"{label} must not contain the control token {token[:24]}", field=where
        )


def parse_priority(value: Any) -> Priority:
    """A caller's priority: high, normal or low (None: normal); else InvalidInput."""
    if value is None:
        return Priority.NORMAL
    if isinstance(value, Priority):
        return value
    if isinstance(value, str):
        try:
            return Priority(value)
        except ValueError:
            pass
    known = ", ".join(priority.value for priority in Priority)
    raise InvalidInput(f"priority must be one of {known}, not {preview(value)}", field="priority")


def stop_strings(stop: Any) -> tuple[str, ...]:
    """A caller's `stop` (one string or several) as the tuple TaskOptions holds."""
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, (list, tuple)):
        return tuple(stop)
    raise InvalidInput("stop must be a string or a list of strings", field="stop")



def redact_message(message: Any) -> Any:
    """A request's wire form with every URL's query string and fragment removed.

    What may be kept where the request is stored for show (Celery's extended result meta):
    signed URLs carry their credentials in the query string.
    """
    if not isinstance(message, dict) or not isinstance(message.get("images"), list):
        return message
    images = []
    for image in message["images"]:
        if (
            isinstance(image, dict)
            and image.get("source") == "url"
            and isinstance(image.get("ref"), str)
        ):
            image = {**image, "ref": image["ref"].split("#", 1)[0].split("?", 1)[0]}
        images.append(image)
    return {**message, "images": images}


def preview(value: Any, limit: int = 40) -> str:
    """A short, safe echo of untrusted input for an error message.

    Strings show at most `limit` characters; anything else only its type, never its repr
    (which could be huge, or carry an object's address).
    """
    if isinstance(value, str):
        return repr(value if len(value) <= limit else value[:limit] + "…")
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, int) and abs(value) < 10**12:
        return str(value)
    return f"a {type(value).__name__}"


def _check_integer_options(options: TaskOptions) -> None:
    """Booleans are ints to Python and floats compare like ints: refuse both by type."""
    for name in ("max_new_tokens", "num_crops"):
        value = getattr(options, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise InvalidInput(f"{name} must be an integer, got {preview(value)}", field=name)


def _parse_images(raw: Any) -> tuple[ImageRef, ...]:
    if not isinstance(raw, list):
        raise InvalidInput("images must be a list", field="images")
    refs: list[ImageRef] = []
    for index, item in enumerate(raw):
        where = f"images[{index}]"
        if not isinstance(item, dict):
            raise InvalidInput("each image must be an object", field=where)
        try:
            source = ImageSource(item.get("source"))
        except ValueError:
            raise InvalidInput("image source must be url, staged or path", field=where) from None
        ref = item.get("ref")
        if source is ImageSource.URL:
            check_url_length(ref, field=where)
        if not isinstance(ref, str) or not ref or len(ref) > _MAX_REF_CHARS:
            raise InvalidInput(
                f"image ref must be a non-empty string of at most {_MAX_REF_CHARS} characters",
                field=where,
            )
        if source is ImageSource.STAGED and not _DIGEST.fullmatch(ref):
            raise InvalidInput("staged image ref must be a SHA-256 hex digest", field=where)
        refs.append(ImageRef(source, ref))
    return tuple(refs)


def _parse_messages(raw: Any) -> tuple[ChatMessage, ...]:
    """Types only; the rules are check_conversation's."""
    if not isinstance(raw, list) or len(raw) > MAX_MESSAGES:
        raise InvalidInput(f"messages must be a list of at most {MAX_MESSAGES}", field="messages")
    turns: list[ChatMessage] = []
    for index, item in enumerate(raw):
        where = f"messages[{index}]"
        if not isinstance(item, dict) or set(item) - {"role", "text", "images"}:
            raise InvalidInput("each message is an object of role, text, images", field=where)
        try:
            role = Role(item.get("role"))
        except ValueError:
            raise InvalidInput("role must be system, user or assistant", field=where) from None
        text, images = item.get("text", ""), item.get("images", 0)
        if not isinstance(text, str):
            raise InvalidInput("message text must be a string", field=where)
        if not is_integer(images) or images < 0:
            raise InvalidInput("message images must be a count (0 or more)", field=where)
        turns.append(ChatMessage(role, text, images))
    return tuple(turns)


_OPTION_NAMES = frozenset(f.name for f in fields(TaskOptions))


def _parse_options(raw: Any) -> TaskOptions:
    """Types only; the ranges are check_request's (the same rules on both sides)."""
    if not isinstance(raw, dict):
        raise InvalidInput("options must be an object", field="options")
    unknown = sorted(str(key) for key in set(raw) - _OPTION_NAMES)
    if unknown:
        raise InvalidInput(f"unknown option {preview(unknown[0])}", field=unknown[0][:40])
    values: dict[str, Any] = {}
    for name in ("max_new_tokens", "num_crops", "seed", "top_logprobs", "n"):
        value = raw.get(name)
        if value is not None and not is_integer(value):
            raise InvalidInput(f"{name} must be an integer", field=name)
        values[name] = value
    for name, default in (("temperature", 0.0), ("top_p", 1.0)):
        value = raw.get(name, default)
        if not is_number(value):
            raise InvalidInput(f"{name} must be a number", field=name)
        values[name] = float(value)
    stop = raw.get("stop") or []
    if not isinstance(stop, list):
        raise InvalidInput("stop must be a list of strings", field="stop")
    values["stop"] = tuple(stop)
    values["response_format"] = parse_response_format(raw.get("response_format"))
    values["logprobs"] = raw.get("logprobs", False)
    if not isinstance(values["logprobs"], bool):
        raise InvalidInput("logprobs must be true or false", field="logprobs")
    return TaskOptions(**values)
