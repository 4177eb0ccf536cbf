"""Server-sent events framing (https://html.spec.whatwg.org/#server-sent-events)."""

from __future__ import annotations

import json
from typing import Any

HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx would otherwise hold events back
}
MEDIA_TYPE = "text/event-stream"
# One event, as OpenAPI tools read a text/event-stream body: `data` is JSON text (or
# `[DONE]` at the end of a chat completion stream).
EVENT_SCHEMA = {
    "type": "object",
    "properties": {
        "event": {"type": "string", "enum": ["status", "delta", "end", "error"]},
        "data": {"type": "string"},
        "id": {"type": "string"},
    },
    "required": ["data"],
}


def event(data: str, *, name: str | None = None, event_id: str | None = None) -> bytes:
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if name is not None:
        lines.append(f"event: {name}")
    lines.extend(f"data: {line}" for line in data.split("\n"))
    return ("\n".join(lines) + "\n\n").encode()


def json_event(data: Any, *, name: str | None = None, event_id: str | None = None) -> bytes:
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return event(text, name=name, event_id=event_id)


def comment(text: str) -> bytes:
    """A line clients ignore; keeps proxies from closing an idle stream."""
    return f": {text}\n\n".encode()
