"""Streamed text as both clients read it: one Redis Stream per task, followed by cursor.

A worker appends entries to `vq:stream:<id>` while it generates: `seq` (0, 1, 2...),
`kind` ("delta" with `text`, whole characters only, and with `logprobs` when the task
asked for them, or "end" with `result`, the final result JSON including `state`); a
document's deltas also carry `page`, the page whose text they are (its pages stream side
by side into the document's one stream); the deltas of a task with several choices
(`options.n` above 1) carry `choice`, the index (0-based) of the choice whose text and
logprobs they are (its choices stream side by side; a single-choice task's deltas have no
`choice`, as before). The end entry is written in the same Lua call
that stores the result, so a stream never ends without a result and a result never exists
without its end entry. Every entry's id is also PUBLISHed on the channel of the same
name, which is how readers wait without polling.

`StreamFollower` is the reading logic without I/O: it turns entries into `StreamEvent`s
from a cursor on, refuses gaps or repeats (sequence numbers), and ends at "end". The
clients only fetch entries (XRANGE after the cursor) and wait for the next notification.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from vision_queue.errors import InvalidInput, TaskFailed
from vision_queue.protocol import STREAM_KEY
from vision_queue.results import final_result, is_final

# Entries fetched per XRANGE call.
FETCH_COUNT = 512
# A Redis Stream entry id: milliseconds-sequence (or milliseconds alone).
_CURSOR = re.compile(r"[0-9]{1,20}(-[0-9]{1,20})?")


@dataclass(frozen=True)
class StreamEvent:
    cursor: str  # the entry's Redis Stream id: resume after it (SSE `id:` / Last-Event-ID)
    kind: Literal["delta", "end"]
    text: str = ""  # the delta ("" on end)
    seq: int = 0
    result: dict[str, Any] | None = None  # the final result JSON (with `state`) on end
    page: int | None = None  # a document's delta: the page (1-based) whose text this is
    # A delta's tokens' logprobs, for a task that asked (vision_queue.logprobs); else None.
    logprobs: list[dict[str, Any]] | None = None
    # A delta of a task with several choices: the choice (0-based) whose text this is.
    choice: int | None = None

    @property
    def failed(self) -> bool:
        return self.kind == "end" and (self.result or {}).get("state") != "SUCCESS"

    def marks(self) -> dict[str, Any]:
        """The delta's `page`, `choice` and `logprobs` that it has, as JSON shows them."""
        shown = {"page": self.page, "choice": self.choice, "logprobs": self.logprobs}
        return {name: value for name, value in shown.items() if value is not None}


def stream_key(task_id: str) -> str:
    return STREAM_KEY.format(task_id=task_id)


@dataclass
class StreamFollower:
    """Where a reader is in one task's stream, and what the next entries mean."""

    task_id: str
    cursor: str | None = None  # last entry id seen; None = from the start
    next_seq: int | None = None  # None until the first entry after a resumed cursor
    done: bool = False
    _events: list[StreamEvent] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_cursor(self.cursor)

    def range_start(self) -> str:
        """XRANGE's start: everything after the cursor (exclusive), or the whole stream."""
        return "-" if self.cursor is None else f"({self.cursor}"

    def accept(self, entries: list[tuple[Any, dict[Any, Any]]]) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        for entry_id, fields in entries:
            if self.done:
                break
            event = _event(_text(entry_id), fields)
            if self.next_seq is not None and event.seq != self.next_seq:
                # Entries are only appended, never trimmed below their bound, so this means
                # the stream was replaced under the reader (it expired and a rerun began).
                raise TaskFailed(
                    {
                        "id": self.task_id,
                        "error": {
                            "code": "model_error",
                            "message": f"stream skipped from entry {self.next_seq} to {event.seq}",
                        },
                        "state": "FAILURE",
                    }
                )
            self.next_seq = event.seq + 1
            self.cursor = event.cursor
            self.done = event.kind == "end"
            events.append(event)
        return events

    def ended_without_stream(self, meta: dict[str, Any]) -> StreamEvent | None:
        """A task finished with no end entry (refused before any worker ran it, e.g. an
        unregistered name): end with its stored result instead of waiting forever."""
        if not is_final(meta):
            return None
        self.done = True
        result = cast("dict[str, Any]", final_result(self.task_id, meta))
        return StreamEvent(self.cursor or "0-0", "end", "", self.next_seq or 0, result)


def check_cursor(cursor: str | None, field: str = "after") -> None:
    """A cursor must be an entry id this stream could have given (`1760000000000-3`);
    anything else is the caller's mistake (InvalidInput naming `field`), never sent on."""
    if cursor is not None and (not isinstance(cursor, str) or not _CURSOR.fullmatch(cursor)):
        raise InvalidInput(
            "the stream cursor is not an event id (digits-digits, as sent in `id:`)", field=field
        )


def raise_if_failed(event: StreamEvent) -> None:
    if event.failed:
        raise TaskFailed(dict(event.result or {}))


def _event(entry_id: str, fields: dict[Any, Any]) -> StreamEvent:
    values = {_text(k): _text(v) for k, v in fields.items()}
    kind = "end" if values.get("kind") == "end" else "delta"
    seq = int(values.get("seq", "0") or 0)
    if kind == "end":
        try:
            result = json.loads(values.get("result", "{}"))
        except ValueError:
            result = {"error": {"code": "model_error", "message": "unreadable end entry"}}
        return StreamEvent(entry_id, "end", "", seq, result if isinstance(result, dict) else {})
    return StreamEvent(
        entry_id, "delta", values.get("text", ""), seq, None, _number(values.get("page")),
        _logprobs(values.get("logprobs")), _number(values.get("choice")),
    )


def _number(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


def _logprobs(value: str | None) -> list[dict[str, Any]] | None:
    if not value:
        return None
    try:
        entries = json.loads(value)
    except ValueError:
        return None
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else None


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
