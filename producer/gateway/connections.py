"""Connection limits of one gateway process, on uvicorn's own h11 protocol.

uvicorn closes a keep-alive connection that stays idle after an answer
(`timeout_keep_alive`), but a connection that never finishes its request line and
headers, or its body, is kept forever, and every such connection holds a file descriptor
and counts against `limit_concurrency`. `GuardedH11Protocol` adds, per connection:

* a header deadline (VQ_GATEWAY_HEADER_TIMEOUT_S) from the moment the connection opens or
  the previous answer ends until the request's headers are complete;
* a body deadline (VQ_GATEWAY_BODY_TIMEOUT_S) from the headers to the body's end;
* a cap on open connections (VQ_GATEWAY_MAX_CONNECTIONS): a new connection past it closes
  the connection idle the longest (no request in progress) or, when every one is busy,
  itself. So idle or trickling clients cannot starve health checks and real callers.

A closed connection writes nothing (a half-sent request cannot be answered); each kind of
event is logged once per interval (`producer.gateway.logs`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from vision_queue.settings import Settings

log = logging.getLogger("uvicorn.error")
# Largest request line plus headers h11 buffers (its default is 16 KiB).
MAX_HEAD_BYTES = 16 * 1024
KEEP_ALIVE_S = 5


class _Limits:
    header_timeout_s = 10.0
    body_timeout_s = 60.0
    max_connections = 1000


def configure(settings: Settings) -> None:
    """The limits every connection of this process gets (called in `create_app`)."""
    _Limits.header_timeout_s = settings.gateway_header_timeout_s
    _Limits.body_timeout_s = settings.gateway_body_timeout_s
    _Limits.max_connections = settings.gateway_max_connections


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's own knobs, matching the limits above."""
    return {
        "http": GuardedH11Protocol,
        "timeout_keep_alive": KEEP_ALIVE_S,
        "h11_max_incomplete_event_size": MAX_HEAD_BYTES,
        # A backstop only: the cap above keeps connections below it.
        "limit_concurrency": settings.gateway_max_connections + 1,
        "backlog": min(2048, settings.gateway_max_connections),
    }


class GuardedH11Protocol(H11Protocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._phase = "headers"
        self.idle_since: float | None = time.monotonic()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > _Limits.max_connections:
            self._make_room()
        if not self.transport.is_closing():
            self._arm("headers", _Limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.transport.is_closing():
            self._disarm()
            return
        state = self.conn.their_state
        if state is h11.SEND_BODY and self._phase == "headers":
            self.idle_since = None
            self._arm("body", _Limits.body_timeout_s)
        elif state is h11.DONE and self._phase != "answer":
            self.idle_since = None
            self._phase = "answer"  # the app has the request: no deadline of ours
            self._disarm()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self.idle_since = time.monotonic()
            self._arm("headers", _Limits.header_timeout_s)
        super().on_response_complete()

    def _arm(self, phase: str, seconds: float) -> None:
        self._disarm()
        self._phase = phase
        self._deadline = self.loop.call_later(seconds, self._expired, phase)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, phase: str) -> None:
        self._deadline = None
        if self.transport.is_closing() or self._phase != phase:
            return
        log.warning("closed a connection whose request %s did not arrive in time", phase)
        self.transport.close()

    def _make_room(self) -> None:
        idle = [
            c
            for c in self.connections
            if c is not self
            and isinstance(c, GuardedH11Protocol)
            and c.idle_since is not None
            and not c.transport.is_closing()
        ]
        if idle:
            oldest = min(idle, key=lambda c: c.idle_since or 0.0)
            log.warning(
                "%d connections open: closed the longest idle one", _Limits.max_connections
            )
            oldest.transport.close()
            return
        log.warning(
            "%d connections open, all busy: refused a new one", _Limits.max_connections
        )
        self.transport.close()
