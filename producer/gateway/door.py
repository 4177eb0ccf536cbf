"""The door: what every request meets before any route reads a byte of its body.

In this order, from headers alone:

1. an `x-request-id` (the caller's, when it is a short token, else a new one) on every
   answer, refusals included;
2. on `/v1/...`: the client address's failed-key budget (VQ_GATEWAY_AUTH_FAILURES_PER_MINUTE
   per process: past it, 429 with Retry-After for the rest of the minute, before the key
   is even looked at), then the API key (401; a wrong key spends the budget);
3. the body cap of the route: a declared Content-Length above it is 413 at once; without
   one, the bytes are counted as they arrive and the read that passes the cap is 413.
   The routes that take a request or an upload get VQ_GATEWAY_MAX_BODY_BYTES, batch
   creation 64 KiB, every other route `SMALL_BODY_BYTES`.

So a caller without a key costs one header parse and one hash, never a body read or a
JSON parse, whatever the route or the body.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import OrderedDict

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producer.gateway.auth import KeyRing, presented_key
from producer.gateway.errors import ApiError, GatewayCode

# What a route without a body may still receive (a stray `{}` from a generic client).
SMALL_BODY_BYTES = 1024
# Routes whose body is a request or an upload: the full cap.
BODY_ROUTES = frozenset(
    {
        ("POST", "/v1/tasks"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/responses"),
        ("POST", "/v1/files"),
    }
)
# Routes whose body is a small JSON object (a batch: a file id, a window, metadata).
SMALL_JSON_ROUTES = {("POST", "/v1/batches"): 64 * 1024}
# Client addresses whose failures are remembered at once (least recently failed dropped).
_TRACKED_ADDRESSES = 10_000
_WINDOW_S = 60.0
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_REFUSALS = frozenset({401, 413, 429})


class RequestTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than {limit} bytes")


class FailedKeys:
    """Failed key attempts per client address in fixed one-minute windows (this process)."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._seen: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def retry_after(self, address: str) -> int:
        """Seconds until `address` may try again; 0 when it may now."""
        if not self.per_minute or address not in self._seen:
            return 0
        began, count = self._seen[address]
        left = began + _WINDOW_S - time.monotonic()
        if left <= 0:
            del self._seen[address]
            return 0
        return max(1, int(left + 0.999)) if count >= self.per_minute else 0

    def failed(self, address: str) -> None:
        if not self.per_minute:
            return
        now = time.monotonic()
        began, count = self._seen.pop(address, (now, 0))
        if now - began >= _WINDOW_S:
            began, count = now, 0
        self._seen[address] = (began, count + 1)
        while len(self._seen) > _TRACKED_ADDRESSES:
            self._seen.popitem(last=False)


class Door:
    def __init__(self, app: ASGIApp, keys: KeyRing, max_body_bytes: int, failures: FailedKeys):
        self.app = app
        self.keys = keys
        self.max_body_bytes = max_body_bytes
        self.failures = failures

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        request_id = _request_id(headers.get("x-request-id"))
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        # A refused body is never read: the connection closes after the answer instead of
        # draining what the caller still sends.
        has_body = headers.get("content-length", "0").strip() not in ("", "0") or (
            "transfer-encoding" in headers
        )

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = [(b"x-request-id", request_id.encode())]
                if has_body and message["status"] in _REFUSALS:
                    extra.append((b"connection", b"close"))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        refusal = self._refusal(scope, headers, state)
        if refusal is not None:
            await refusal.response()(scope, _no_body, send_with_id)
            return
        limit = self._body_cap(scope)
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise RequestTooLarge(limit)
            return message

        await self.app(scope, counting_receive, send_with_id)

    def _refusal(self, scope: Scope, headers: Headers, state: dict[str, object]) -> ApiError | None:
        path: str = scope["path"]
        if scope["method"] != "OPTIONS" and (path == "/v1" or path.startswith("/v1/")):
            address = scope["client"][0] if scope.get("client") else "unknown"
            wait = self.failures.retry_after(address)
            if wait:
                return ApiError(
                    429,
                    GatewayCode.RATE_LIMITED.value,
                    f"too many failed API key attempts from this address; retry in {wait} s",
                    headers={"Retry-After": str(wait)},
                )
            caller = self.keys.identify(presented_key(headers))
            if caller is None:
                self.failures.failed(address)
                return ApiError(
                    401,
                    GatewayCode.INVALID_API_KEY.value,
                    "missing or invalid API key (send Authorization: Bearer <key>)",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            state["caller"] = caller
        declared = headers.get("content-length")
        limit = self._body_cap(scope)
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            return ApiError(
                413,
                GatewayCode.REQUEST_TOO_LARGE.value,
                f"request body is larger than {limit} bytes",
            )
        return None

    def _body_cap(self, scope: Scope) -> int:
        path = scope["path"].rstrip("/") or "/"
        route = (scope["method"], path)
        if route in BODY_ROUTES:
            return self.max_body_bytes
        return SMALL_JSON_ROUTES.get(route, SMALL_BODY_BYTES)


def _request_id(given: str | None) -> str:
    if given and _REQUEST_ID.fullmatch(given):
        return given
    return uuid.uuid4().hex


async def _no_body() -> Message:
    """A refusal never reads the request: the connection is closed after the answer."""
    return {"type": "http.disconnect"}
