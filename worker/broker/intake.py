"""The rules a raw message must meet before Celery is allowed to parse or run it.

Celery trusts the envelope: a body that is a JSON object, a `timelimit` of strings, a
missing `id`, a `compression` header or a built-in task name each made a worker crash,
restart-loop, wedge or inflate a message, long before our own request checks ran. So the
worker's consumer (worker/broker/consumer.py) hands every message to its door
(worker/broker/door.py), which runs `check_message` first, and only a message that is
exactly what `producer.Client` sends, in Celery's protocol 2, goes on to Celery:

* content type `application/json`, encoding `utf-8`, no `compression` header;
* headers: only the names protocol 2 defines, plus the `redelivered` flag kombu adds when
  it hands a message back and the W3C `traceparent`/`tracestate` of a traced producer
  (vision_queue/tracing.py; our client and Celery's own retries send no others), each of
  the type Celery expects; `id` a UUID; `task` one of the four
  `vision_queue.*` names (Celery's built-ins, `celery.*`, are refused);
* body: at most MAX_BODY_BYTES of UTF-8 JSON, exactly `[args, kwargs, embed]` with one
  request object in `args`, no kwargs, and no chain, callbacks, errbacks or chord.

Whether the request object itself is a valid request is the task's business
(`vision_queue.schemas.parse_request`), which answers with a coded `invalid_input`.

`sanitize_brpop_reply` is the layer below: kombu turns the raw list item into a message
object before any consumer sees it, and an item that is not kombu's JSON envelope made it
raise inside the event loop ("Unrecoverable error"), while a `compression` header made it
inflate the body right there. Such an item is rewrapped as a message of content type
UNREADABLE_CONTENT_TYPE carrying the original bytes, which the rules above then refuse
like any other.

Every refusal carries a short fixed reason and never quotes the message.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import math
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery.utils.time import maybe_iso8601
from kombu.utils.json import dumps as kombu_dumps
from kombu.utils.json import loads as kombu_loads

from vision_queue.documents import DOCUMENT_TASK
from vision_queue.protocol import TaskName

# Our messages are well under 10 KB (images are references); this leaves room for the
# longest prompt written entirely as \u escapes and eight maximal URLs.
MAX_BODY_BYTES = 256 * 1024
UNREADABLE_CONTENT_TYPE = "application/x-vq-unreadable"
UNREADABLE_REASON_HEADER = "x-vq-unreadable"
# The four tasks, and the document job whose pages run as those (vision_queue/documents.py).
TASK_NAMES = frozenset(task.celery_name for task in TaskName) | {DOCUMENT_TASK}
# An eta further ahead than this is refused: only Celery's own retries set one, at most
# VQ_RETRY_BACKOFF_MAX_S ahead; this much more absorbs clock skew between workers.
ETA_SLACK_S = 300.0

_EMBED_KEYS = frozenset({"callbacks", "errbacks", "chain", "chord"})


@dataclass(frozen=True)
class Refusal:
    """Why a message was refused. `code` is a metric label, `reason` a fixed sentence."""

    code: str
    reason: str
    task_id: str | None = None  # the message's id, when it is a well-formed UUID
    task: str | None = None  # our task name, when the header names one


def _short_text(limit: int) -> Callable[[Any], bool]:
    return lambda value: value is None or (isinstance(value, str) and len(value) <= limit)


def _small_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 10_000


def _time_limits(value: Any) -> bool:
    if value is None:
        return True
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return False
    return all(
        limit is None
        or (
            isinstance(limit, (int, float))
            and not isinstance(limit, bool)
            and math.isfinite(limit)
            and 0 <= limit <= 10**7
        )
        for limit in value
    )


def _iso_time(value: Any) -> bool:
    if value is None:
        return True
    if not isinstance(value, str) or len(value) > 64:
        return False
    try:
        return isinstance(maybe_iso8601(value), dt.datetime)  # Celery's own parser
    except (ValueError, TypeError, OverflowError, AttributeError):
        return False


# version-trace id-parent id-flags, lower-case hex (W3C Trace Context; version ff is invalid).
_TRACEPARENT = re.compile(r"(?!ff)[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}\Z")
# Up to 32 list members of printable ASCII (no spaces inside a member), 512 characters.
_TRACESTATE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,510}[\x21-\x7e])?\Z")

# Every header protocol 2 defines, with the values Celery can act on without failing.
# Anything else is refused: unknown headers end up in the task's request context, where
# names such as `chain` or `callbacks` would be read as workflow instructions.
_HEADER_RULES: dict[str, Callable[[Any], bool]] = {
    "lang": _short_text(16),
    "task": lambda value: isinstance(value, str),  # the name itself is checked apart
    "id": lambda value: isinstance(value, str),  # checked apart, as a UUID
    "shadow": lambda value: value is None,
    "eta": _iso_time,
    "expires": _iso_time,
    "group": lambda value: value is None,
    "group_index": lambda value: value is None,
    "retries": _small_int,
    "timelimit": _time_limits,
    "root_id": _short_text(64),
    "parent_id": _short_text(64),
    "argsrepr": _short_text(4096),
    "kwargsrepr": _short_text(4096),
    "origin": _short_text(256),
    # Our tasks store their outcome themselves (worker.delivery.results) whatever this says;
    # Celery's own retry messages carry the tasks' ignore_result=True.
    "ignore_result": lambda value: value is None or isinstance(value, bool),
    "replaced_task_nesting": _small_int,
    "stamped_headers": lambda value: value is None or value == [],
    "stamps": lambda value: value is None or value == {},
    # Set by kombu itself when it hands a message back (worker died, requeue, shutdown).
    "redelivered": lambda value: value is None or isinstance(value, bool),
    # W3C trace context (vision_queue/tracing.py): a producer's span, continued by the
    # worker's tracing. Only its exact shapes pass; without tracing nothing reads them.
    "traceparent": lambda value: isinstance(value, str) and bool(_TRACEPARENT.match(value)),
    "tracestate": lambda value: isinstance(value, str) and bool(_TRACESTATE.match(value)),
}


def check_message(
    content_type: Any,
    content_encoding: Any,
    headers: Any,
    body: Any,
    *,
    now: float,
    eta_horizon_s: float,
) -> Refusal | None:
    """None when the message may go on to Celery, else the first rule it breaks."""
    task_id, task = _identity(headers)

    def refuse(code: str, reason: str) -> Refusal:
        return Refusal(code, reason, task_id, task)

    if content_type == UNREADABLE_CONTENT_TYPE:
        why = headers.get(UNREADABLE_REASON_HEADER) if isinstance(headers, dict) else None
        return refuse("envelope", str(why or "the queue item is not a kombu message"))
    if content_type != "application/json":
        return refuse("content_type", "content type is not application/json")
    if content_encoding != "utf-8":
        return refuse("encoding", "content encoding is not utf-8")
    if not isinstance(headers, dict):
        return refuse("headers", "message has no headers (not Celery protocol 2)")
    if "compression" in headers:
        return refuse("compression", "compressed messages are not accepted")
    unknown = [name for name in headers if name not in _HEADER_RULES]
    if unknown:
        return refuse("headers", "message has headers protocol 2 does not define")
    if not isinstance(headers.get("id"), str) or task_id is None:
        return refuse("headers", "header id is missing or not a UUID")
    name = headers.get("task")
    if not isinstance(name, str) or name not in TASK_NAMES:
        if isinstance(name, str) and name.startswith("celery."):
            return refuse("builtin_task", "Celery's built-in tasks are not run from the queue")
        return refuse("task_name", "header task is not one of the vision_queue tasks")
    for header, rule in _HEADER_RULES.items():
        if header in headers and not rule(headers[header]):
            return refuse("headers", f"header {header} has a value Celery cannot use")
    if _eta_too_late(headers.get("eta"), now, eta_horizon_s):
        return refuse("headers", "header eta is further ahead than any retry")
    return _check_body(body, refuse)


def _identity(headers: Any) -> tuple[str | None, str | None]:
    """The message's task id and task value, where readable: for the coded failure."""
    if not isinstance(headers, dict):
        return None, None
    raw_id = headers.get("id")
    task_id: str | None = None
    if isinstance(raw_id, str) and len(raw_id) == 36:
        try:
            # Canonical 8-4-4-4-12 form in either case; the id is kept as written, since
            # that is the key the client waits on.
            if str(uuid.UUID(raw_id)) == raw_id.lower():
                task_id = raw_id
        except ValueError:
            task_id = None
    name = headers.get("task")
    if isinstance(name, str) and name in TASK_NAMES:  # a list is unhashable: type first
        return task_id, name.removeprefix("vision_queue.")
    return task_id, None


def _eta_too_late(eta: Any, now: float, horizon_s: float) -> bool:
    if eta is None:
        return False
    when = maybe_iso8601(eta)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)  # Celery sends UTC (enable_utc)
    return bool(when.timestamp() > now + horizon_s)


def _check_body(body: Any, refuse: Callable[[str, str], Refusal]) -> Refusal | None:
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogatepass")
    if not isinstance(body, (bytes, bytearray, memoryview)):
        return refuse("body", "message body is missing")
    if len(body) > MAX_BODY_BYTES:
        return refuse("body", f"message body is larger than {MAX_BODY_BYTES} bytes")
    try:
        text = bytes(body).decode("utf-8")
        # kombu's own decoder, object hooks included: what Celery would see.
        payload = kombu_loads(text)
    except (UnicodeDecodeError, ValueError, TypeError, RecursionError, OverflowError):
        return refuse("body", "message body is not valid UTF-8 JSON")
    if not isinstance(payload, list) or len(payload) != 3:
        return refuse("body", "message body is not a protocol 2 [args, kwargs, embed] list")
    args, kwargs, embed = payload
    if not isinstance(args, list) or len(args) != 1 or not isinstance(args[0], dict):
        return refuse("body", "message arguments are not one request object")
    if kwargs != {}:
        return refuse("body", "message has keyword arguments")
    if not isinstance(embed, dict) or not set(embed) <= _EMBED_KEYS:
        return refuse("body", "message embed is not protocol 2's")
    if any(embed.get(key) is not None for key in _EMBED_KEYS):
        return refuse("body", "chains, callbacks, errbacks and chords are not accepted")
    return None


# Below kombu: the raw list item ------------------------------------------------------------


def sanitize_brpop_reply(reply: Any) -> Any:
    """A BRPOP reply `(queue, item)` whose item kombu can always turn into a message.

    Installed as the BRPOP response callback of the consumer's Redis client. An item
    that is kombu's envelope passes unchanged; anything else is replaced by a minimal
    envelope of content type UNREADABLE_CONTENT_TYPE whose body is the original bytes.
    """
    if not reply:
        return None
    queue, item = reply[0], reply[1]
    problem, identity = _envelope_problem(item)
    if problem is None:
        return (queue, item)
    raw = item if isinstance(item, bytes) else str(item).encode("utf-8", "surrogatepass")
    list_name = queue.decode("utf-8", "replace") if isinstance(queue, bytes) else str(queue)
    envelope = {
        "body": base64.b64encode(raw).decode("ascii"),
        "content-type": UNREADABLE_CONTENT_TYPE,
        "content-encoding": "binary",
        "headers": {UNREADABLE_REASON_HEADER: problem, **identity},
        "properties": {
            "delivery_tag": str(uuid.uuid4()),
            "body_encoding": "base64",
            "delivery_info": {"exchange": "", "routing_key": list_name[:64]},
            "priority": 0,
        },
    }
    return (queue, kombu_dumps(envelope).encode("utf-8"))


def _envelope_problem(item: Any) -> tuple[str | None, dict[str, str]]:
    """Why kombu's virtual transport would fail on this item (None when it would not),
    and the item's `id` and `task` headers where readable, so the refusal can answer."""
    if not isinstance(item, (bytes, str)):
        return "the queue item is not a string", {}
    try:
        text = item.decode("utf-8") if isinstance(item, bytes) else item
        envelope = kombu_loads(text)
    except (UnicodeDecodeError, ValueError, TypeError, RecursionError, OverflowError):
        return "the queue item is not JSON", {}
    if not isinstance(envelope, dict):
        return "the queue item is not a JSON object", {}
    headers = envelope.get("headers")
    identity = {
        name: headers[name][:200]
        for name in ("id", "task")
        if isinstance(headers, dict) and isinstance(headers.get(name), str)
    }
    return _kombu_problem(envelope, headers), identity


def broadcast_problem(message: Any) -> str | None:
    """Why kombu could not turn a decoded fanout message (a control broadcast, an event)
    into a message object, as `sanitize_brpop_reply` asks of a queue item; None if it can."""
    if not isinstance(message, dict):
        return "the queue item is not a JSON object"
    try:
        return _kombu_problem(message, message.get("headers"))
    except Exception as exc:  # a rule tripping over input: refuse, never crash
        return f"checking it failed ({type(exc).__name__})"


def _kombu_problem(envelope: dict[str, Any], headers: Any) -> str | None:
    properties = envelope.get("properties")
    if not isinstance(properties, dict):
        return "the queue item has no properties"
    tag = properties.get("delivery_tag")
    if not isinstance(tag, str) or not 0 < len(tag) <= 128:
        return "the queue item has no delivery tag"
    if not isinstance(properties.get("delivery_info", {}), dict):
        return "the queue item's delivery info is not an object"
    if not isinstance(properties.get("priority", 0), int):
        return "the queue item's priority is not a number"
    for name in ("content-type", "content-encoding"):
        if not isinstance(envelope.get(name), (str, type(None))):
            return f"the queue item's {name} is not a string"
    if not isinstance(headers, (dict, type(None))):
        return "the queue item's headers are not an object"
    if headers and "compression" in headers:
        # kombu inflates a compressed body while building the message object, whatever
        # accept_content says: a 1 MB item inflated to 1 GiB. Refused still compressed.
        return "compressed messages are not accepted"
    body = envelope.get("body")
    if body is None or body == "":
        return None
    if not isinstance(body, str):
        return "the queue item's body is not a string"
    encoding = properties.get("body_encoding")
    if encoding is None or (isinstance(encoding, str) and encoding.lower() == "utf-8"):
        return None
    if encoding != "base64":
        return "the queue item's body encoding is not base64"
    try:
        base64.b64decode(body.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return "the queue item's body is not base64"
    return None
