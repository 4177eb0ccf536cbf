"""The client a web backend uses: submit a job, poll its status, read or cancel it."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from celery.result import AsyncResult
from kombu.exceptions import OperationalError

from producer.addresses import check_url, check_url_length
from producer.celery_config import make_celery_app
from producer.contract import CANCEL_KEY, PROGRESS_STATE, SUBMITTED_KEY, TaskName
from producer.errors import (
    BrokerUnavailable,
    Cancelled,
    InvalidInput,
    TaskFailed,
    UnknownTaskId,
    WaitTimeout,
)
from producer.images import ImageLimits, decode_base64_image, inspect_image, read_image_path
from producer.redis_connect import redis_client
from producer.schemas import (
    ImageRef,
    ImageSource,
    TaskOptions,
    TaskRequest,
    check_request,
    preview,
    stop_strings,
)
from producer.settings import Settings, mask_url
from producer.staging import stage_image

# What `submit` accepts per image: bytes, an http(s) URL, a `data:` URI, a local file
# (read and staged by the client), or an explicit ImageRef (e.g. a path on the workers).
ImageInput = bytes | str | os.PathLike[str] | ImageRef

_POLL_INTERVAL_S = 0.2


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


class Client:
    """Submit and follow vision jobs. Thread-safe; create one per process and reuse it."""

    def __init__(self, settings: Settings | None = None, **overrides: Any) -> None:
        self.settings = settings or Settings.from_env(**overrides)
        self._app = make_celery_app(self.settings)
        self._redis = redis_client(self.settings)
        self._limits = ImageLimits.from_settings(self.settings)

    # Submitting ------------------------------------------------------------------------

    def submit(
        self,
        task: TaskName | str,
        images: Iterable[ImageInput] = (),
        prompt: str | None = None,
        *,
        max_new_tokens: int | None = None,
        num_crops: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
    ) -> TaskHandle:
        """Validate, stage image bytes, enqueue. Bad input raises before anything is queued.

        `temperature` 0 (the default) decodes greedily; above 0 samples, with `top_p` and,
        for repeatable text, a `seed`. The text ends before the first of up to 4 `stop`
        strings.
        """
        name = _task_name(task)
        image_list = list(images)
        options = TaskOptions(
            max_new_tokens=max_new_tokens,
            num_crops=num_crops,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop_strings(stop),
        )
        # Check the cheap rules before reading or uploading any image.
        placeholder = tuple(ImageRef(ImageSource.URL, "-") for _ in image_list)
        check_request(TaskRequest(name, placeholder, prompt, options), self.settings)
        prepared = [
            self._prepare_image(image, f"images[{i}]") for i, image in enumerate(image_list)
        ]

        self._ensure_reachable()
        refs = tuple(self._stage(ref_or_bytes) for ref_or_bytes in prepared)
        request = TaskRequest(name, refs, prompt, options)
        task_id = str(uuid.uuid4())
        self._guard(
            lambda: self._redis.set(
                SUBMITTED_KEY.format(task_id=task_id), name.value, ex=self.settings.result_expires_s
            )
        )
        self._guard(
            lambda: self._app.send_task(
                name.celery_name,
                args=(request.to_message(),),
                task_id=task_id,
                queue=self.settings.queue,
                argsrepr=_safe_repr(request),
                kwargsrepr="{}",
                retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
            )
        )
        return TaskHandle(task_id, name)

    def _prepare_image(self, image: ImageInput, field: str) -> ImageRef | bytes:
        if isinstance(image, ImageRef):
            return image
        if isinstance(image, (bytes, bytearray, memoryview)):
            data = bytes(image)
        elif isinstance(image, str) and image.startswith(("http://", "https://")):
            # Refuse internal addresses now, so the caller hears it before anything is queued;
            # the worker checks again after resolving the name.
            check_url_length(image, field)
            check_url(image, self.settings.private_host_allowlist)
            return ImageRef(ImageSource.URL, image)
        elif isinstance(image, str) and "://" in image[:16]:
            raise InvalidInput("only http(s) URLs are accepted", field=field)
        elif isinstance(image, str) and image.startswith("data:"):
            data = decode_base64_image(image, field=field)
        else:
            data = read_image_path(image, self.settings.max_image_bytes, field=field)
        inspect_image(data, self._limits)
        return data

    def _stage(self, image: ImageRef | bytes) -> ImageRef:
        if isinstance(image, ImageRef):
            return image
        data = image
        digest = self._guard(lambda: stage_image(self._redis, data, self.settings.result_expires_s))
        return ImageRef(ImageSource.STAGED, digest)

    # Following ------------------------------------------------------------------------

    def status(self, task_id: str) -> TaskStatus:
        meta = self._meta(task_id)
        info = meta.get("result") if meta["status"] == PROGRESS_STATE else None
        tokens = int(info.get("tokens", 0)) if isinstance(info, dict) else 0
        worker = str(meta.get("worker") or "")
        state = "FAILURE" if meta["status"] == "REVOKED" else meta["status"]
        return TaskStatus(task_id, state, tokens, worker)

    def result(
        self,
        task_id: str,
        wait: bool = False,
        timeout: float | None = None,
        on_status: Callable[[TaskStatus], None] | None = None,
    ) -> dict[str, Any] | None:
        """The result object plus `state`; None if not finished and `wait` is false.

        With `wait`, poll until done; raise WaitTimeout after `timeout` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status(task_id)
            if on_status is not None:
                on_status(status)
            if status.done:
                return self._final_result(task_id)
            if not wait:
                return None
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"task {task_id} did not finish within {timeout:g} s")
            time.sleep(_POLL_INTERVAL_S)

    def cancel(self, task_id: str) -> None:
        """Cancel a task: a queued one never runs, a running one stops at its next token."""
        self._meta(task_id)  # raises UnknownTaskId
        key = CANCEL_KEY.format(task_id=task_id)
        self._guard(lambda: self._redis.set(key, "1", ex=self.settings.result_expires_s))
        # The broadcast reaches running workers at once; the key covers workers that start later.
        self._guard(lambda: self._app.control.revoke(task_id))

    def close(self) -> None:
        self._redis.close()
        self._app.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Internals --------------------------------------------------------------------------

    def _meta(self, task_id: str) -> dict[str, Any]:
        _check_task_id(task_id)
        result = AsyncResult(task_id, app=self._app)
        meta: dict[str, Any] = self._guard(lambda: result.backend.get_task_meta(task_id))
        if meta["status"] == "PENDING":
            known = self._guard(lambda: self._redis.exists(SUBMITTED_KEY.format(task_id=task_id)))
            if not known:
                raise UnknownTaskId(f"no task {task_id}: never submitted, or its result expired")
        return meta

    def _final_result(self, task_id: str) -> dict[str, Any]:
        meta = self._meta(task_id)
        state, value = meta["status"], meta.get("result")
        if state == "SUCCESS" and isinstance(value, dict):
            return {**value, "state": "SUCCESS"}
        if isinstance(value, TaskFailed):
            return {**value.result, "state": "FAILURE"}
        if state == "REVOKED":
            error = Cancelled("cancelled before it started").to_dict()
        else:
            error = {"code": "model_error", "message": f"{type(value).__name__}: {value}"[:500]}
        return {"id": task_id, "task": meta.get("name") or "", "error": error, "state": "FAILURE"}

    def _ensure_reachable(self) -> None:
        """Fail fast (exit 3 in the CLI) instead of letting a send block on a dead broker."""
        deadline = time.monotonic() + self.settings.connect_timeout_s
        while True:
            try:
                self._redis.ping()
                return
            except redis.RedisError as exc:
                if time.monotonic() >= deadline:
                    raise BrokerUnavailable(_unreachable_message(self.settings, exc)) from exc
                time.sleep(0.5)

    def _guard(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except (redis.RedisError, OSError, OperationalError) as exc:
            raise BrokerUnavailable(_unreachable_message(self.settings, exc)) from exc


def _task_name(task: TaskName | str) -> TaskName:
    try:
        return TaskName(task)
    except ValueError:
        known = ", ".join(t.value for t in TaskName)
        raise InvalidInput(f"unknown task {preview(task)} (known: {known})", field="task") from None


def _check_task_id(task_id: str) -> None:
    try:
        uuid.UUID(task_id)
    except (ValueError, TypeError, AttributeError):
        raise UnknownTaskId(f"{preview(task_id)} is not a task id") from None


def _safe_repr(request: TaskRequest) -> str:
    """What Flower and task events show: image references without URL query strings."""
    images = ", ".join(image.describe() for image in request.images)
    prompt = "" if request.prompt is None else f", prompt={request.prompt[:60]!r}"
    return f"({request.task.value}, images=[{images}]{prompt})"


def _unreachable_message(settings: Settings, exc: BaseException) -> str:
    return f"Redis at {mask_url(settings.effective_broker_url)} is unreachable: {exc}"
