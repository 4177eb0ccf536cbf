"""The request body cap (VQ_GATEWAY_MAX_BODY_BYTES), counted while the body arrives.

A declared Content-Length above the cap is answered 413 before anything is read. Without
one (chunked uploads) or with a false one, the bytes are counted as they stream in, and
the read that passes the cap raises RequestTooLarge, which the error handlers answer 413.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producer.gateway.errors import ApiError, GatewayCode


class RequestTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than {limit} bytes")


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            error = ApiError(
                413,
                GatewayCode.REQUEST_TOO_LARGE.value,
                f"request body is larger than {self.max_bytes} bytes",
            )
            await error.response()(scope, receive, send)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise RequestTooLarge(self.max_bytes)
            return message

        await self.app(scope, counting_receive, send)
