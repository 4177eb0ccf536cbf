"""The bytes a submit writes, as one Celery producer would write them, and their commands.

The task message is the one Celery's `send_task` writes (protocol 2, JSON, utf-8, no
compression), in the list layout of kombu's Redis transport: a JSON object whose `body` is
the base64 of `[args, kwargs, embed]`, pushed with LPUSH onto the list of the task's priority
(`vision_queue.protocol.priority_queue`: `<queue>.high`, `<queue>`, `<queue>.low`; kombu's
own message priority stays 0). `tests/producer/test_submission.py` checks it field by field
against what Celery itself writes, so workers (and their door checks) cannot tell the two
apart.

Queueing many tasks is bound by this module's CPU time, not by Redis: the request is
encoded by orjson (the json module took most of a task's time), the fields every message
shares once per envelope, and a batch costs a handful of commands
(one script for the markers, one LPUSH per list, one `task-sent` publish carrying the
whole batch's events as a list, which Celery's event receivers, Flower's included, accept).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii
from typing import Any, NamedTuple

import orjson

from producer.submission import Draft
from vision_queue.protocol import (
    CANCEL_KEY,
    STAGED_IMAGE_KEY,
    SUBMITTED_KEY,
    TaskName,
    priority_queue,
    priority_queues,
)
from vision_queue.results import TaskHandle
from vision_queue.schemas import ImageRef, ImageSource, TaskRequest
from vision_queue.settings import Settings
from vision_queue.tracing import trace_headers

# Most tasks written by one pipeline: keeps a burst from holding Redis for long.
BATCH_TASKS = 500

# KEYS: the tasks' `submitted` markers. ARGV: seconds to keep them, then each task's name.
_MARK_SUBMITTED = """
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[i + 1], 'EX', ARGV[1])
end
return #KEYS
"""

# The `embed` of a task without callbacks, errbacks, chain or chord.
_NO_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


class Outgoing(NamedTuple):
    """Every byte one submit writes, in the order it is written."""

    handle: TaskHandle
    staged: tuple[tuple[str, bytes], ...]  # (key, image bytes)
    message: bytes  # the entry LPUSHed onto `queue`
    queue: str  # the Redis list of the task's priority
    sent_event: str  # the `task-sent` event Flower counts, as JSON (`Envelope.events`)


@dataclass
class Envelope:
    """Builds messages as one Celery producer would: one origin name, one Lamport clock.

    A message is assembled from JSON pieces: what every message shares is encoded once
    here, what a task's queue and name add once per queue and name, and only the request
    itself goes through the JSON encoder per task. `tests/producer/test_submission.py`
    parses the result and compares it with Celery's own.
    """

    settings: Settings
    db: int = 0
    hostname: str = field(default_factory=lambda: f"gen{os.getpid()}@{socket.gethostname()}")
    reply_to: str = field(default_factory=lambda: new_id())
    _clock: int = 0

    def __post_init__(self) -> None:
        self._task_headers = _fields(
            {
                "lang": "py",
                "shadow": None,
                "eta": None,
                "expires": None,
                "group": None,
                "group_index": None,
                "retries": 0,
                "timelimit": [None, None],
                "parent_id": None,
                "kwargsrepr": "{}",
                "origin": self.hostname,
                "ignore_result": None,
                "replaced_task_nesting": 0,
                "stamped_headers": None,
                "stamps": {},
            }
        )
        self._task_properties = _fields(
            {
                "reply_to": self.reply_to,
                "kwargsrepr": "{}",
                "delivery_mode": 2,
                "priority": 0,
                "body_encoding": "base64",
            }
        )
        self._event_fields = _fields(
            {
                "hostname": self.hostname,
                "utcoffset": _utcoffset(),
                "parent_id": None,
                "kwargs": "{}",
                "retries": 0,
                "eta": None,
                "expires": None,
                "exchange": "",
                "type": "task-sent",
            }
        )
        # JSON-encoded once: the task names, and the lists of the settings' queue.
        self._task_names = {task: _quote(task.celery_name) for task in TaskName}
        self._queue_names = {name: _quote(name) for name in priority_queues(self.settings.queue)}

    def outgoing(self, draft: Draft) -> Outgoing:
        """Everything one validated request writes."""
        staged: list[tuple[str, bytes]] = []
        refs: list[ImageRef] = []
        for image in draft.images:
            if isinstance(image, ImageRef):
                refs.append(image)
                continue
            digest = hashlib.sha256(image).hexdigest()
            staged.append((STAGED_IMAGE_KEY.format(digest=digest), image))
            refs.append(ImageRef(ImageSource.STAGED, digest))
        return self.outgoing_request(draft, tuple(refs), tuple(staged))

    def outgoing_request(
        self,
        draft: Draft,
        refs: tuple[ImageRef, ...],
        staged: tuple[tuple[str, bytes], ...],
        body: Callable[[TaskRequest], dict[str, Any]] | None = None,
        celery_name: str | None = None,
    ) -> Outgoing:
        """The message of `draft` over images already staged or referenced; `body` turns
        its request into the message's argument (default: the request's own form) and
        `celery_name` names another task (a document job: producer/documents.py)."""
        request = TaskRequest(
            draft.task,
            refs,
            draft.prompt,
            draft.options,
            messages=draft.messages,
            callback_url=draft.callback_url,
        )
        task_id = draft.task_id or new_id()
        argsrepr = safe_repr(request)
        queue = priority_queue(self.settings.queue, draft.priority)
        argument = request.to_message() if body is None else body(request)
        return Outgoing(
            handle=TaskHandle(task_id, draft.task),
            staged=staged,
            message=self.task_message(
                task_id, draft.task, argument, argsrepr, queue, celery_name=celery_name
            ),
            queue=queue,
            sent_event=self.sent_event(
                task_id, draft.task, argsrepr, queue, celery_name=celery_name
            ),
        )

    def task_message(
        self,
        task_id: str,
        task: TaskName,
        request: dict[str, Any],
        argsrepr: str,
        queue: str | None = None,
        celery_name: str | None = None,
    ) -> bytes:
        """Celery's message; `queue` (default: the normal list) is where a worker hands it
        back to (kombu restores by routing key). `celery_name` overrides the task's name
        (a document job: vision_queue/documents.py)."""
        body = _json_bytes([[request], {}, _NO_EMBED])
        name = _quote(celery_name) if celery_name else self._task_names[task]
        shown, quoted_id = _quote(argsrepr), _quote(task_id)
        routing_key = self._queue_name(queue)
        # The current trace (W3C traceparent/tracestate) rides in the headers, where the
        # worker's Celery instrumentation finds it; nothing when tracing is off.
        traced = "".join(
            f", {_quote(field)}: {_quote(value)}" for field, value in trace_headers().items()
        )
        headers = (
            f'{{"task": {name}, "id": {quoted_id}, "root_id": {quoted_id}{traced}, '
            f'"argsrepr": {shown}, {self._task_headers}}}'
        )
        properties = (
            f'{{"correlation_id": {quoted_id}, "argsrepr": {shown}, '
            f'"delivery_info": {{"exchange": "", "routing_key": {routing_key}}}, '
            f'"delivery_tag": "{new_delivery_tag()}", {self._task_properties}}}'
        )
        return _kombu_message(body, headers, properties)

    def sent_event(
        self,
        task_id: str,
        task: TaskName,
        argsrepr: str,
        queue: str | None = None,
        celery_name: str | None = None,
    ) -> str:
        """The `task-sent` event of one task, as JSON; `events` wraps events into a message."""
        routing_key, quoted_id = self._queue_name(queue), _quote(task_id)
        name = _quote(celery_name) if celery_name else self._task_names[task]
        return (
            f'{{"uuid": {quoted_id}, "root_id": {quoted_id}, '
            f'"name": {name}, "args": {_quote(argsrepr)}, '
            f'"queue": {routing_key}, "routing_key": {routing_key}, "pid": {os.getpid()}, '
            f'"clock": {self._tick()}, "timestamp": {time.time()!r}, {self._event_fields}}}'
        )

    def events(self, events: Sequence[str]) -> bytes:
        """One message on the events channel: a single event as Celery sends it, or a list
        of them, as Celery's dispatcher sends a group."""
        body = events[0] if len(events) == 1 else f"[{', '.join(events)}]"
        return _kombu_message(
            body.encode(),
            json.dumps({"hostname": self.hostname}),
            _fanout_properties("celeryev", "task.sent", delivery_mode=1),
        )

    def revoke_broadcast(self, task_id: str) -> bytes:
        """Celery's `control.revoke(task_id)`: running workers stop the task at once."""
        body = {
            "method": "revoke",
            "arguments": {"task_id": task_id, "terminate": False, "signal": "SIGTERM"},
            "destination": None,
            "pattern": None,
            "matcher": None,
        }
        # Celery's broadcasts expire after their reply timeout (1 s); workers drop late ones.
        headers = {"clock": self._tick(), "expires": time.time() + 1.0}
        return _kombu_message(
            json.dumps(body).encode("utf-8"),
            json.dumps(headers),
            _fanout_properties("celery.pidbox", "", delivery_mode=2),
        )

    # Where kombu's Redis transport publishes fanout exchanges (fanout_prefix and
    # fanout_patterns are on): "/<db>.<exchange>" plus "/<routing key>" when there is one.
    @property
    def events_channel(self) -> str:
        return f"/{self.db}.celeryev/task.sent"

    @property
    def control_channel(self) -> str:
        return f"/{self.db}.celery.pidbox"

    def _queue_name(self, queue: str | None) -> str:
        """`queue` (default: the normal list) as JSON."""
        queue = queue or self.settings.queue
        return self._queue_names.get(queue) or _quote(queue)

    def _tick(self) -> int:
        self._clock += 1
        return self._clock


def queue_commands(pipe: Any, batch: Sequence[Outgoing], envelope: Envelope) -> None:
    """Write a batch into a pipeline (sync or async: the calls only buffer commands).

    Images come first and the messages last, so a message is never on the queue before
    the bytes it names; the same image in several tasks is written once. Each list gets
    one LPUSH of all its messages, in order (the first is taken first, as with one LPUSH
    each), and the batch's events go out in one publish.
    """
    ttl = envelope.settings.result_expires_s
    written: set[str] = set()
    by_queue: dict[str, list[bytes]] = {}
    for item in batch:
        for key, data in item.staged:
            if key not in written:
                written.add(key)
                pipe.set(key, data, ex=ttl, nx=True)
                pipe.expire(key, ttl)
        by_queue.setdefault(item.queue, []).append(item.message)
    markers = [SUBMITTED_KEY.format(task_id=item.handle.id) for item in batch]
    names = [item.handle.task.value for item in batch]
    pipe.eval(_MARK_SUBMITTED, len(markers), *markers, ttl, *names)
    for queue, messages in by_queue.items():
        pipe.lpush(queue, *messages)
    pipe.publish(envelope.events_channel, envelope.events([item.sent_event for item in batch]))


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


class _DeliveryTags:
    """Delivery tags unique to this process: a random prefix and a counter.

    kombu's transport keys its unacked messages and the workers their leases by the tag,
    so two messages must never share one; a forked child draws a prefix of its own.
    """

    def __init__(self) -> None:
        self._renew()
        os.register_at_fork(after_in_child=self._renew)

    def _renew(self) -> None:
        # A UUID's first four groups: with the 12 hex digits of the counter, a UUID's shape.
        self._prefix = new_id()[:24]
        self._counter = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):012x}"


def new_delivery_tag() -> str:
    return _delivery_tags.next()


def new_id() -> str:
    """A random UUID (version 4) as text, as `str(uuid.uuid4())` gives, at half its cost."""
    value = int.from_bytes(os.urandom(16), "big")
    value = (value & ~(0xF000 << 64) | (0x4000 << 64)) & ~(0xC000 << 48) | (0x8000 << 48)
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def database_number(client: Any) -> int:
    """The db index a redis(-py) client talks to, for kombu's fanout channel names."""
    kwargs = client.connection_pool.connection_kwargs
    return int(kwargs.get("db", 0) or 0)


def _fields(values: dict[str, Any]) -> str:
    """A JSON object's members without the braces, to close a templated object with."""
    return json.dumps(values)[1:-1]


def _fanout_properties(exchange: str, routing_key: str, delivery_mode: int) -> str:
    """kombu's properties of a message published on a fanout exchange (events, control)."""
    return json.dumps(
        {
            "delivery_mode": delivery_mode,
            "delivery_info": {"exchange": exchange, "routing_key": routing_key},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": new_id(),
        }
    )


def _kombu_message(body: bytes, headers: str, properties: str) -> bytes:
    """kombu's Redis list entry, its headers and properties already JSON."""
    encoded_body = base64.b64encode(body).decode("ascii")  # nothing in it needs escaping
    return (
        f'{{"body": "{encoded_body}", "content-encoding": "utf-8", '
        f'"content-type": "application/json", "headers": {headers}, '
        f'"properties": {properties}}}'
    ).encode()


def _json_bytes(value: Any) -> bytes:
    """`value` as compact UTF-8 JSON; the json module's escapes where orjson refuses a
    string (lone surrogates in a URL, say: the worker judges those)."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return json.dumps(value).encode("ascii")


def _quote(text: str) -> str:
    """`text` as a JSON string, as `json.dumps` writes it (ASCII, escaped)."""
    return encode_basestring_ascii(text)


def _utcoffset() -> int:
    """Celery's `utcoffset()`: hours west of UTC, as events carry it."""
    if time.daylight:
        return time.altzone // 3600
    return time.timezone // 3600


_delivery_tags = _DeliveryTags()
