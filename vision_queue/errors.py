"""The error hierarchy shared by the producer and the worker.

Every failure a user can see carries one of a few stable codes. Whether a failure is
worth retrying is decided here, by the class, and nowhere else: the worker's retry
policy only asks `error.transient`.
"""

from __future__ import annotations

from enum import Enum
from typing import Any


class ErrorCode(str, Enum):
    INVALID_INPUT = "invalid_input"
    IMAGE_FETCH_FAILED = "image_fetch_failed"
    IMAGE_TOO_LARGE = "image_too_large"
    UNSUPPORTED_IMAGE = "unsupported_image"
    MODEL_ERROR = "model_error"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    INVALID_DOCUMENT = "invalid_document"
    DOCUMENT_FAILED = "document_failed"


# Longest message an error carries: a message quoting untrusted input (a path that was
# really base64, a library's error about it) is cut here, whatever the raiser forgot.
MAX_MESSAGE_CHARS = 500


class VisionQueueError(Exception):
    """Root of every error this project raises on purpose."""

    code: ErrorCode = ErrorCode.MODEL_ERROR
    transient: bool = False

    def __init__(self, message: str, *, field: str | None = None) -> None:
        message = str(message)
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 1] + "…"
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code.value, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return error

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"


class InvalidInput(VisionQueueError):
    code = ErrorCode.INVALID_INPUT


class ImageFetchFailed(VisionQueueError):
    """The image could not be fetched. Permanent (404, refused address) unless `transient`."""

    code = ErrorCode.IMAGE_FETCH_FAILED

    def __init__(self, message: str, *, field: str | None = None, transient: bool = False):
        super().__init__(message, field=field)
        self.transient = transient


class ImageTooLarge(VisionQueueError):
    code = ErrorCode.IMAGE_TOO_LARGE


class UnsupportedImage(VisionQueueError):
    code = ErrorCode.UNSUPPORTED_IMAGE


class ModelError(VisionQueueError):
    code = ErrorCode.MODEL_ERROR


class ResourceExhausted(VisionQueueError):
    """Out of device memory. Not retried on the same request: the same input would fail again."""

    code = ErrorCode.RESOURCE_EXHAUSTED


class TaskTimeout(VisionQueueError):
    code = ErrorCode.TIMEOUT


class Cancelled(VisionQueueError):
    code = ErrorCode.CANCELLED


class InvalidDocument(VisionQueueError):
    """A PDF that cannot be used: not a PDF, damaged, encrypted, no pages or too many."""

    code = ErrorCode.INVALID_DOCUMENT


class DocumentFailed(VisionQueueError):
    """More pages of a document failed than its `max_failed_pages` allows."""

    code = ErrorCode.DOCUMENT_FAILED


_BY_CODE: dict[ErrorCode, type[VisionQueueError]] = {
    cls.code: cls
    for cls in (
        InvalidInput,
        ImageFetchFailed,
        ImageTooLarge,
        UnsupportedImage,
        ModelError,
        ResourceExhausted,
        TaskTimeout,
        Cancelled,
        InvalidDocument,
        DocumentFailed,
    )
}


def error_from_dict(error: dict[str, Any]) -> VisionQueueError:
    """Rebuild a coded error from its wire form (`{"code": ..., "message": ...}`)."""
    try:
        cls = _BY_CODE[ErrorCode(error.get("code"))]
    except ValueError:
        cls = ModelError
    return cls(str(error.get("message", "")), field=error.get("field"))


# Client-side conditions: they never travel through the queue.


class ClientError(Exception):
    """Raised by the producer client for conditions outside a task's own outcome."""


class BrokerUnavailable(ClientError):
    """Redis (broker or result backend) could not be used: unreachable after a short bounded
    retry, refusing the password, or refusing writes. The message says which and what to fix."""


class BrokerAuthenticationFailed(BrokerUnavailable):
    """Redis refused the password (or user) in the configured URL: a setting to fix, not retried."""


class BrokerOutOfMemory(BrokerUnavailable):
    """Redis reached its `maxmemory` and refuses writes (the shipped policy never evicts)."""


class BrokerBusy(ClientError):
    """Every pooled Redis connection stayed in use for the whole wait: this client is
    overloaded (too many calls at once), Redis itself answers. Retry shortly."""


class UnknownTaskId(ClientError):
    """No task with this id is known: never submitted, or its result has expired."""


class WaitTimeout(ClientError):
    """The task did not finish within the time the caller was willing to wait."""


# The module names Celery stores with a failure (`exc_module`): this class's module, and
# the one it had before the contract got a package of its own, which results stored by
# earlier workers still carry. Readers accept both; workers write the first.
FAILURE_EXC_MODULES = ("vision_queue.errors", "producer.errors")


class TaskFailed(Exception):
    """The wire form of a failed task, stored by Celery in the result backend.

    Celery serialises an exception as its module, type and args; the single argument is
    the complete failure result (id, task, error, timings...), so a client rebuilds it
    exactly. Only JSON is accepted, so this never executes anything on the reader's side.
    """


    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__(result)
        self.result = result

    @property
    def error(self) -> VisionQueueError:
        return error_from_dict(self.result.get("error", {}))

    def __str__(self) -> str:
        error = self.result.get("error", {})
        return f"{error.get('code', 'model_error')}: {error.get('message', '')}"
