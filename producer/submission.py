"""What `Client` and `AsyncClient` share when they queue a task: everything but the I/O.

`prepare` validates a request and reads its images (cheap rules first, nothing queued on
a fault); `Envelope.outgoing` stages nothing yet but builds every byte that will be
written: the staged images, the submitted marker, the task message and its `task-sent`
event; `queue_commands` writes them into a Redis pipeline, sync or async alike, so one
round trip queues one task or a thousand.

The task message is the one Celery's `send_task` writes (protocol 2, JSON, utf-8, no
compression), in the list layout of kombu's Redis transport: a JSON object whose `body` is
the base64 of `[args, kwargs, embed]`, pushed with LPUSH onto the list of the task's priority
(`producer.contract.priority_queue`: `<queue>.high`, `<queue>`, `<queue>.low`; kombu's
own message priority stays 0). `tests/producer/test_submission.py` checks it field by field
against what Celery itself writes, so workers (and their door checks) cannot tell the two
apart.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import secrets
import socket
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from PIL import Image

from producer.addresses import check_url, check_url_length
from producer.contract import (
    CANCEL_KEY,
    STAGED_IMAGE_KEY,
    SUBMITTED_KEY,
    Priority,
    TaskName,
    priority_queue,
)
from producer.errors import ImageTooLarge, InvalidInput, VisionQueueError
from producer.images import ImageLimits, decode_base64_image, inspect_image, read_image_path
from producer.results import TaskHandle
from producer.schemas import (
    ChatMessage,
    ImageRef,
    ImageSource,
    TaskOptions,
    TaskRequest,
    check_request,
    parse_priority,
    preview,
    stop_strings,
)
from producer.settings import Settings

# What `submit` accepts per image: bytes, an http(s) URL, a `data:` URI, a local file
# (read and staged by the client), or an explicit ImageRef (e.g. a path on the workers).
# A PIL image (sent as PNG) or a binary file object (read) are accepted too.
ImageInput = bytes | str | os.PathLike[str] | ImageRef | Image.Image | BinaryIO

# A string this long that is not a URL is base64 text, not a path (PATH_MAX is 4096).
_LONGEST_PATH = 4096

# Most tasks written by one pipeline: keeps a burst from holding Redis for long.
BATCH_TASKS = 500


@dataclass(frozen=True)
class SubmitRequest:
    """One task to queue: the arguments of `submit`, for `submit_many`."""

    task: TaskName | str
    images: Sequence[ImageInput] = ()
    prompt: str | None = None
    max_new_tokens: int | None = None
    num_crops: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: str | Sequence[str] = ()
    messages: tuple[ChatMessage, ...] | None = None  # ask: a conversation instead of prompt
    callback_url: str | None = None  # webhook for the result
    priority: Priority | str | None = Priority.NORMAL  # high, normal (None) or low


@dataclass(frozen=True)
class Draft:
    """A validated request whose images are read and checked, not yet staged."""

    task: TaskName
    images: tuple[ImageRef | bytes, ...]
    prompt: str | None
    options: TaskOptions
    messages: tuple[ChatMessage, ...] | None = None
    callback_url: str | None = None
    priority: Priority = Priority.NORMAL


@dataclass(frozen=True)
class Outgoing:
    """Every byte one submit writes, in the order it is written."""

    handle: TaskHandle
    staged: tuple[tuple[str, bytes], ...]  # (key, image bytes)
    message: bytes  # the entry LPUSHed onto `queue`
    queue: str  # the Redis list of the task's priority
    sent_event: bytes  # the `task-sent` event Flower counts


def prepare(request: SubmitRequest, settings: Settings, limits: ImageLimits) -> Draft:
    """Validate and read the images; raise a coded error before anything is queued."""
    name = task_name(request.task)
    priority = parse_priority(request.priority)
    images = image_list(request.images)
    seed = request.seed
    if request.temperature and request.temperature > 0 and seed is None:
        # A seed chosen now makes a redelivered task sample the same text again, so a
        # stream that a dead worker began continues without a seam.
        seed = secrets.randbits(62)
    options = TaskOptions(
        max_new_tokens=request.max_new_tokens,
        num_crops=request.num_crops,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=seed,
        stop=stop_strings(request.stop),
    )
    # The cheap rules first, before reading or uploading any image.
    placeholder = tuple(ImageRef(ImageSource.URL, "-") for _ in images)
    messages, callback_url = request.messages, request.callback_url
    check_request(
        TaskRequest(
            name, placeholder, request.prompt, options, messages=messages, callback_url=callback_url
        ),
        settings,
    )
    prepared = tuple(
        _image_named(image, f"images[{i}]", settings, limits) for i, image in enumerate(images)
    )
    return Draft(name, prepared, request.prompt, options, messages, callback_url, priority)


def image_list(images: object) -> tuple[ImageInput, ...]:
    """`images` as given to submit: a list (any iterable) of images, even for one image.

    One image passed on its own (bytes, a path, a URL, a PIL image, a file) is refused
    with the fix, rather than read as a sequence of bytes or characters.
    """
    if isinstance(images, (bytes, bytearray, memoryview, str, os.PathLike, ImageRef)) or (
        _is_pil_image(images) or _is_file(images)
    ):
        raise InvalidInput(
            f"images takes a list of images, got one {type(images).__name__}: "
            "pass [image] for a single image",
            field="images",
        )
    if not isinstance(images, Iterable):
        raise InvalidInput(
            f"images must be a list of images, got {preview(images)}", field="images"
        )
    return tuple(images)


def task_name(task: TaskName | str) -> TaskName:
    try:
        return TaskName(task)
    except ValueError:
        known = ", ".join(t.value for t in TaskName)
        raise InvalidInput(f"unknown task {preview(task)} (known: {known})", field="task") from None


def _image_named(
    image: ImageInput, field: str, settings: Settings, limits: ImageLimits
) -> ImageRef | bytes:
    """`_prepare_image`, its errors naming the image (`images[i]`) when they name nothing."""
    try:
        return _prepare_image(image, field, settings, limits)
    except VisionQueueError as exc:
        if exc.field is None:
            exc.field = field
        raise


def _prepare_image(
    image: ImageInput, field: str, settings: Settings, limits: ImageLimits
) -> ImageRef | bytes:
    if isinstance(image, ImageRef):
        return image
    if _is_pil_image(image):
        data = _pil_png(image, field)
    elif _is_file(image):
        data = _read_file_object(image, settings.max_image_bytes, field)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, str) and image.startswith(("http://", "https://")):
        # Refuse internal addresses now, so the caller hears it before anything is queued;
        # the worker checks again after resolving the name.
        check_url_length(image, field)
        check_url(image, settings.private_host_allowlist)
        return ImageRef(ImageSource.URL, image)
    elif isinstance(image, str) and "://" in image[:16]:
        raise InvalidInput("only http(s) URLs are accepted", field=field)
    elif isinstance(image, str) and image.startswith("data:"):
        data = decode_base64_image(image, field=field)
    elif isinstance(image, str) and len(image) > _LONGEST_PATH:
        raise InvalidInput(
            f"{preview(image)} ({len(image)} characters) is not a path or URL; for base64 "
            "text pass the decoded bytes (base64.b64decode) or a data:image/...;base64, URI",
            field=field,
        )
    elif isinstance(image, (str, os.PathLike)):
        data = read_image_path(image, settings.max_image_bytes, field=field)
    else:
        raise InvalidInput(
            f"an image is bytes, a path, an http(s) URL, a data: URI, a PIL image or a "
            f"binary file; got {preview(image)}",
            field=field,
        )
    inspect_image(data, limits)
    return data


def _is_pil_image(value: object) -> bool:
    return isinstance(value, Image.Image)


def _is_file(value: object) -> bool:
    return callable(getattr(value, "read", None)) and not isinstance(value, ImageRef)


def _pil_png(image: Any, field: str) -> bytes:
    """A PIL image as PNG: lossless, so the worker sees exactly these pixels."""
    buffer = io.BytesIO()
    try:
        image.save(buffer, format="PNG")
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"cannot encode the PIL image as PNG: {exc}", field=field) from None
    return buffer.getvalue()


def _read_file_object(file: Any, max_bytes: int, field: str) -> bytes:
    data = file.read(max_bytes + 1)
    if isinstance(data, str):
        raise InvalidInput("open image files in binary mode: open(path, 'rb')", field=field)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidInput(f"the file's read() gave {preview(data)}, not bytes", field=field)
    if len(data) > max_bytes:
        raise ImageTooLarge(f"the file has more than the limit of {max_bytes} bytes", field=field)
    return bytes(data)


@dataclass
class Envelope:
    """Builds messages as one Celery producer would: one origin name, one Lamport clock."""

    settings: Settings
    db: int = 0
    hostname: str = field(default_factory=lambda: f"gen{os.getpid()}@{socket.gethostname()}")
    reply_to: str = field(default_factory=lambda: str(uuid.uuid4()))
    _clock: int = 0

    def outgoing(self, draft: Draft) -> Outgoing:
        staged: list[tuple[str, bytes]] = []
        refs: list[ImageRef] = []
        for image in draft.images:
            if isinstance(image, ImageRef):
                refs.append(image)
                continue
            digest = hashlib.sha256(image).hexdigest()
            staged.append((STAGED_IMAGE_KEY.format(digest=digest), image))
            refs.append(ImageRef(ImageSource.STAGED, digest))
        request = TaskRequest(
            draft.task,
            tuple(refs),
            draft.prompt,
            draft.options,
            messages=draft.messages,
            callback_url=draft.callback_url,
        )
        task_id = str(uuid.uuid4())
        argsrepr = safe_repr(request)
        queue = priority_queue(self.settings.queue, draft.priority)
        return Outgoing(
            handle=TaskHandle(task_id, draft.task),
            staged=tuple(staged),
            message=self.task_message(task_id, draft.task, request.to_message(), argsrepr, queue),
            sent_event=self.sent_event(task_id, draft.task, argsrepr, queue),
            queue=queue,
        )

    def task_message(
        self,
        task_id: str,
        task: TaskName,
        request: dict[str, Any],
        argsrepr: str,
        queue: str | None = None,
    ) -> bytes:
        """Celery's message; `queue` (default: the normal list) is where a worker hands it
        back to (kombu restores by routing key)."""
        embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
        body = json.dumps([[request], {}, embed]).encode("utf-8")
        headers: dict[str, Any] = {
            "lang": "py",
            "task": task.celery_name,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": argsrepr,
            "kwargsrepr": "{}",
            "origin": self.hostname,
            "ignore_result": None,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        }
        properties = {
            "correlation_id": task_id,
            "reply_to": self.reply_to,
            "argsrepr": argsrepr,
            "kwargsrepr": "{}",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue or self.settings.queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        }
        return _kombu_message(body, headers, properties)

    def sent_event(
        self, task_id: str, task: TaskName, argsrepr: str, queue: str | None = None
    ) -> bytes:
        queue = queue or self.settings.queue
        body = {
            "hostname": self.hostname,
            "utcoffset": _utcoffset(),
            "pid": os.getpid(),
            "clock": self._tick(),
            "uuid": task_id,
            "root_id": task_id,
            "parent_id": None,
            "name": task.celery_name,
            "args": argsrepr,
            "kwargs": "{}",
            "retries": 0,
            "eta": None,
            "expires": None,
            "queue": queue,
            "exchange": "",
            "routing_key": queue,
            "timestamp": time.time(),
            "type": "task-sent",
        }
        properties = {
            "delivery_mode": 1,
            "delivery_info": {"exchange": "celeryev", "routing_key": "task.sent"},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        }
        encoded = json.dumps(body).encode("utf-8")
        return _kombu_message(encoded, {"hostname": self.hostname}, properties)

    def revoke_broadcast(self, task_id: str) -> bytes:
        """Celery's `control.revoke(task_id)`: running workers stop the task at once."""
        body = {
            "method": "revoke",
            "arguments": {"task_id": task_id, "terminate": False, "signal": "SIGTERM"},
            "destination": None,
            "pattern": None,
            "matcher": None,
        }
        properties = {
            "delivery_mode": 2,
            "delivery_info": {"exchange": "celery.pidbox", "routing_key": ""},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        }
        # Celery's broadcasts expire after their reply timeout (1 s); workers drop late ones.
        headers = {"clock": self._tick(), "expires": time.time() + 1.0}
        return _kombu_message(json.dumps(body).encode("utf-8"), headers, properties)

    # Where kombu's Redis transport publishes fanout exchanges (fanout_prefix and
    # fanout_patterns are on): "/<db>.<exchange>" plus "/<routing key>" when there is one.
    @property
    def events_channel(self) -> str:
        return f"/{self.db}.celeryev/task.sent"

    @property
    def control_channel(self) -> str:
        return f"/{self.db}.celery.pidbox"

    def _tick(self) -> int:
        self._clock += 1
        return self._clock


def queue_commands(pipe: Any, batch: Iterable[Outgoing], envelope: Envelope) -> None:
    """Write a batch into a pipeline (sync or async: the calls only buffer commands).

    Images come first and the messages last, so a message is never on the queue before
    the bytes it names; the same image in several tasks is written once. Each list gets
    one LPUSH of all its messages, in order (the first is taken first, as with one LPUSH
    each): a command per task fewer to send and parse.
    """
    settings = envelope.settings
    ttl = settings.result_expires_s
    written: set[str] = set()
    by_queue: dict[str, list[bytes]] = {}
    events: list[bytes] = []
    for item in batch:
        for key, data in item.staged:
            if key not in written:
                written.add(key)
                pipe.set(key, data, ex=ttl, nx=True)
                pipe.expire(key, ttl)
        pipe.set(SUBMITTED_KEY.format(task_id=item.handle.id), item.handle.task.value, ex=ttl)
        by_queue.setdefault(item.queue, []).append(item.message)
        events.append(item.sent_event)
    for queue, messages in by_queue.items():
        pipe.lpush(queue, *messages)
    for event in events:
        pipe.publish(envelope.events_channel, event)


def cancel_commands(pipe: Any, task_id: str, envelope: Envelope) -> None:
    """The cancel key covers workers that take the task later; the broadcast, running ones."""
    key = CANCEL_KEY.format(task_id=task_id)
    pipe.set(key, "1", ex=envelope.settings.result_expires_s)
    pipe.publish(envelope.control_channel, envelope.revoke_broadcast(task_id))


def batches(items: Sequence[Outgoing]) -> Iterable[Sequence[Outgoing]]:
    for start in range(0, len(items), BATCH_TASKS):
        yield items[start : start + BATCH_TASKS]


def safe_repr(request: TaskRequest) -> str:
    """What Flower and task events show: image references without URL query strings."""
    images = ", ".join(image.describe() for image in request.images)
    prompt = "" if request.prompt is None else f", prompt={request.prompt[:60]!r}"
    return f"({request.task.value}, images=[{images}]{prompt})"


def _kombu_message(body: bytes, headers: dict[str, Any], properties: dict[str, Any]) -> bytes:
    message = {
        "body": base64.b64encode(body).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": properties,
    }
    return json.dumps(message).encode("utf-8")


def _utcoffset() -> int:
    """Celery's `utcoffset()`: hours west of UTC, as events carry it."""
    if time.daylight:
        return time.altzone // 3600
    return time.timezone // 3600


def database_number(client: Any) -> int:
    """The db index a redis(-py) client talks to, for kombu's fanout channel names."""
    kwargs = client.connection_pool.connection_kwargs
    return int(kwargs.get("db", 0) or 0)
