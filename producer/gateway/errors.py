"""Every failure the gateway answers with, in OpenAI's error shape, mapped in one place.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "images[0]",
               "code": "unsupported_image"}}

`code` is one of the task error codes (vision_queue.errors.ErrorCode) or one of the gateway's
own below. The HTTP status follows from the code: bad input 400 (nothing was queued),
401 without a valid key, 404 unknown task, model or route, 413 body too large, 429 over a
limit (with Retry-After; also when this process's Redis connections are all busy: the
queue is up, the gateway is saturated), 503 Redis unreachable, 504 a wait timed out, 507
Redis out of memory (refusing new tasks; stored results can still be read).
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from producer.gateway.logs import clip
from vision_queue.errors import (
    BrokerBusy,
    BrokerOutOfMemory,
    BrokerUnavailable,
    ErrorCode,
    TaskFailed,
    UnknownTaskId,
    VisionQueueError,
    WaitTimeout,
)
from vision_queue.outages import is_pool_exhausted

log = logging.getLogger("vision_queue.gateway")


class GatewayCode(str, Enum):
    """Failures of the HTTP request itself, beside the task error codes."""

    INVALID_API_KEY = "invalid_api_key"
    NOT_FOUND = "not_found"
    MODEL_NOT_FOUND = "model_not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    REQUEST_TOO_LARGE = "request_too_large"
    RATE_LIMITED = "rate_limit_exceeded"
    TOO_MANY_TASKS = "too_many_tasks"
    BUSY = "server_busy"
    UNAVAILABLE = "unavailable"
    OUT_OF_MEMORY = "queue_out_of_memory"
    INTERNAL = "internal_error"


# Status of a task that ended with this code, when a request waited for it.
_TASK_STATUS = {
    ErrorCode.INVALID_INPUT: 400,
    ErrorCode.IMAGE_FETCH_FAILED: 400,
    ErrorCode.IMAGE_TOO_LARGE: 400,
    ErrorCode.UNSUPPORTED_IMAGE: 400,
    ErrorCode.RESOURCE_EXHAUSTED: 400,  # this input needs more memory than a worker has
    ErrorCode.TIMEOUT: 504,
    ErrorCode.CANCELLED: 409,
    ErrorCode.MODEL_ERROR: 500,
    ErrorCode.INVALID_DOCUMENT: 400,
    ErrorCode.DOCUMENT_FAILED: 500,
}
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str


class ErrorBody(BaseModel):
    """Every error answer: OpenAI's shape, `code` being ours."""

    error: ErrorDetail


# What any /v1 route may answer besides its own results.
COMMON_ERRORS = {
    400: "Invalid input; nothing was queued.",
    401: "Missing or invalid API key.",
    413: "Request body too large.",
    429: "Over this key's request rate (or task limit), or the gateway is saturated; see "
    "Retry-After.",
    503: "The queue (Redis) is unreachable.",
    507: "The queue (Redis) is out of memory: no new task is accepted; results still read.",
}
BUSY_RETRY_AFTER_S = 1


class ApiError(Exception):
    """An answer other than success, raised anywhere on a request path."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.code, self.message, self.param)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def task_error(error: dict[str, Any]) -> ApiError:
    """The answer for a task that failed, from its stored error (code, message, field)."""
    try:
        code = ErrorCode(error.get("code"))
    except ValueError:
        code = ErrorCode.MODEL_ERROR
    return ApiError(
        _TASK_STATUS[code], code.value, str(error.get("message", "")), param=error.get("field")
    )


def from_exception(exc: BaseException) -> ApiError:
    """The answer for any exception a request path lets through."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ClientDisconnect):
        # The caller left, or its connection was closed for a body arriving too slowly:
        # nobody reads this answer, and it is not the gateway's fault (no traceback).
        return ApiError(400, ErrorCode.INVALID_INPUT.value, "the request body did not arrive")
    if isinstance(exc, TaskFailed):  # a stream that ended in a failure
        return task_error(exc.result.get("error") or {})
    if isinstance(exc, VisionQueueError):
        status = 400 if _TASK_STATUS[exc.code] < 500 else _TASK_STATUS[exc.code]
        return ApiError(status, exc.code.value, exc.message, param=exc.field)
    if isinstance(exc, BrokerBusy) or is_pool_exhausted(exc):
        log.warning("gateway saturated: every Redis connection busy; answering 429")
        return ApiError(
            429,
            GatewayCode.BUSY.value,
            "the gateway is busy (every queue connection in use); retry shortly",
            headers={"Retry-After": str(BUSY_RETRY_AFTER_S)},
        )
    if isinstance(exc, (BrokerOutOfMemory, redis.OutOfMemoryError)):
        log.warning("queue out of memory: %s", clip(str(exc)))
        return ApiError(
            507,
            GatewayCode.OUT_OF_MEMORY.value,
            "the queue (Redis) is out of memory and refuses new tasks; stored results can "
            "still be read; retry later",
            headers={"Retry-After": "30"},
        )
    if isinstance(exc, (BrokerUnavailable, redis.RedisError)):
        # The details (host, "wrong password") are for the operator's log, not for callers.
        log.warning("queue unreachable: %s", clip(str(exc)))
        return ApiError(503, GatewayCode.UNAVAILABLE.value, "the queue is unreachable; retry")
    if isinstance(exc, UnknownTaskId):
        return ApiError(404, GatewayCode.NOT_FOUND.value, str(exc))
    if isinstance(exc, WaitTimeout):
        return ApiError(504, ErrorCode.TIMEOUT.value, str(exc))
    if isinstance(exc, (RequestValidationError, ValidationError)):
        return _validation_error(exc)
    if isinstance(exc, HTTPException):
        return _http_error(exc)
    log.error("unexpected %s on a request path", type(exc).__name__, exc_info=exc)
    return ApiError(500, GatewayCode.INTERNAL.value, "internal error")


def install_error_handlers(app: FastAPI) -> None:
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        return from_exception(exc).response()

    for kind in (
        ApiError,
        VisionQueueError,
        BrokerUnavailable,
        BrokerBusy,
        ClientDisconnect,
        redis.RedisError,
        UnknownTaskId,
        WaitTimeout,
        RequestValidationError,
        ValidationError,
        HTTPException,
        Exception,
    ):
        app.add_exception_handler(kind, handle)


def _validation_error(exc: RequestValidationError | ValidationError) -> ApiError:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    # ("body", "messages", 0, "content") -> "messages[0].content"
    param = ""
    for part in first.get("loc", ()):
        if part == "body" and not param:
            continue
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    message = str(first.get("msg", "invalid request"))
    if first.get("type") == "json_invalid" and ("surrogate" in message or "hex escape" in message):
        # "\ud800" without its pair: no text field may hold it (it is not UTF-8).
        message = f"text is not valid UTF-8 (a lone surrogate escape): {message}"
        param = param or "body"
    if param:
        message = f"{param}: {message}"
    return ApiError(400, ErrorCode.INVALID_INPUT.value, message, param=param or None)


def _http_error(exc: HTTPException) -> ApiError:
    code = {
        404: GatewayCode.NOT_FOUND,
        405: GatewayCode.METHOD_NOT_ALLOWED,
        413: GatewayCode.REQUEST_TOO_LARGE,
    }.get(exc.status_code)
    if code is None:
        code_text = ErrorCode.INVALID_INPUT.value if exc.status_code < 500 else "internal_error"
    else:
        code_text = code.value
    return ApiError(exc.status_code, code_text, str(exc.detail), headers=dict(exc.headers or {}))
