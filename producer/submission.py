"""What `Client` and `AsyncClient` share before anything is written: a request checked.

`prepare` validates a request and reads its images (cheap rules first, nothing queued on
a fault) into a `Draft`; `producer.envelope` turns drafts into the bytes and commands that
queue them, so one round trip queues one task or a thousand.
"""

from __future__ import annotations

import io
import os
import secrets
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image

from vision_queue.addresses import check_url, check_url_length
from vision_queue.errors import ImageTooLarge, InvalidInput, VisionQueueError
from vision_queue.image_refs import RefKind, ref_kind
from vision_queue.images import ImageLimits, decode_base64_image, inspect_image, read_image_path
from vision_queue.protocol import (
    Priority,
    TaskName,
)
from vision_queue.schemas import (
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
from vision_queue.settings import Settings
from vision_queue.structured import parse_response_format

# What `submit` accepts per image: bytes, an http(s) URL, a `data:` URI, a local file
# (read and staged by the client), or an explicit ImageRef (e.g. a path on the workers).
# A PIL image (sent as PNG) or a binary file object (read) are accepted too.
ImageInput = bytes | str | os.PathLike[str] | ImageRef | Image.Image | BinaryIO

# A string this long that is not a URL is base64 text, not a path (PATH_MAX is 4096).
_LONGEST_PATH = 4096


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
    # A caller-chosen task id (a UUID never used before); None: a new random one. The
    # gateway's idempotency keys and batch lines use it (producer.idempotency).
    task_id: str | None = None
    # OpenAI's shape ({"type": "json_schema", "json_schema": {...}} or {"type":
    # "json_object"}) or a pydantic model class: the text is JSON that validates.
    response_format: Any = None
    logprobs: bool = False  # each token's logprob in the result (vision_queue.logprobs)
    top_logprobs: int | None = None  # 0..20 alternatives per token, with logprobs
    n: int | None = None  # choices (1..8) from one prefill: the result's `choices`


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
    task_id: str | None = None


def prepare(
    request: SubmitRequest, settings: Settings, limits: ImageLimits, local_files: bool = True
) -> Draft:
    """Validate and read the images; raise a coded error before anything is queued.

    Without `local_files` (a server's client) no path or file-like name is ever opened."""
    name = task_name(request.task)
    priority = parse_priority(request.priority)
    if request.task_id is not None:
        _check_given_id(request.task_id)
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
        response_format=parse_response_format(request.response_format),
        logprobs=request.logprobs,
        top_logprobs=request.top_logprobs,
        n=request.n,
    )
    # The cheap rules first, before reading or uploading any image.
    placeholder = (ImageRef(ImageSource.URL, "-"),) * len(images)
    messages, callback_url = request.messages, request.callback_url
    check_request(
        TaskRequest(
            name, placeholder, request.prompt, options, messages=messages, callback_url=callback_url
        ),
        settings,
    )
    prepared = tuple(
        _image_named(image, f"images[{i}]", settings, limits, local_files)
        for i, image in enumerate(images)
    )
    return Draft(
        name, prepared, request.prompt, options, messages, callback_url, priority, request.task_id
    )


def _check_given_id(task_id: object) -> None:
    try:
        uuid.UUID(str(task_id))
    except ValueError:
        raise InvalidInput(f"task_id {preview(task_id)} is not a UUID", field="task_id") from None


def image_list(images: object) -> tuple[ImageInput, ...]:
    """`images` as given to submit: a list (any iterable) of images, even for one image.

    One image passed on its own (bytes, a path, a URL, a PIL image, a file) is refused
    with the fix, rather than read as a sequence of bytes or characters.
    """
    if isinstance(images, (list, tuple)):  # the usual case, without the checks below
        return tuple(images)
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
    image: ImageInput, field: str, settings: Settings, limits: ImageLimits, local_files: bool
) -> ImageRef | bytes:
    """`_prepare_image`, its errors naming the image (`images[i]`) when they name nothing."""
    try:
        if not local_files and (
            isinstance(image, os.PathLike)
            or (isinstance(image, ImageRef) and image.source is ImageSource.PATH)
        ):
            raise InvalidInput("this client takes no paths", field=field)
        return _prepare_image(image, field, settings, limits, local_files)
    except VisionQueueError as exc:
        if exc.field is None:
            exc.field = field
        name = _file_name(image)
        if name and Path(name).name[:80] not in exc.message:
            exc.message = f"{name}: {exc.message}"
            exc.args = (exc.message,)
        raise


def _file_name(image: object) -> str | None:
    """The file an image came from, as an error names it (clipped): a path given as such,
    or a file object's name; None for URLs, data and bytes."""
    if isinstance(image, str):
        if image[:5].lower() == "data:" or "://" in image[:16] or len(image) > _LONGEST_PATH:
            return None
        name = image
    elif isinstance(image, os.PathLike):
        name = os.fspath(image)
    elif _is_file(image) and isinstance(getattr(image, "name", None), str):
        name = getattr(image, "name", "")
    else:
        return None
    return preview(name, 80) if len(name) > 80 else name


def _prepare_image(
    image: ImageInput, field: str, settings: Settings, limits: ImageLimits, local_files: bool
) -> ImageRef | bytes:
    if isinstance(image, ImageRef):
        return image
    if _is_pil_image(image):
        data = _pil_png(image, field)
    elif _is_file(image):
        data = _read_file_object(image, settings.max_image_bytes, field)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, str):
        kind = ref_kind(image, field, allow_path=local_files)
        if kind is RefKind.URL:
            # Refuse internal addresses now, so the caller hears it before anything is
            # queued; the worker checks again after resolving the name.
            check_url_length(image, field)
            check_url(image, settings.private_host_allowlist)
            return ImageRef(ImageSource.URL, image)
        if kind is RefKind.DATA:
            data = decode_base64_image(image, field=field, max_bytes=settings.max_image_bytes)
        elif len(image) > _LONGEST_PATH:
            raise InvalidInput(
                f"{preview(image)} ({len(image)} characters) is not a path or URL; for "
                "base64 text pass the decoded bytes (base64.b64decode) or a "
                "data:image/...;base64, URI",
                field=field,
            )
        else:
            data = read_image_path(image, settings.max_image_bytes, field=field)
    elif isinstance(image, os.PathLike):
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
