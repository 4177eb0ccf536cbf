"""The door's rules, one by one: what our client sends passes, everything else is refused."""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
import uuid
from typing import Any

import pytest
from kombu.transport.virtual import Message
from support.messages import NO_EMBED, envelope, headers, request, valid_body

from worker.broker.intake import (
    MAX_BODY_BYTES,
    UNREADABLE_CONTENT_TYPE,
    check_message,
    sanitize_brpop_reply,
)

# One clock for the whole module: etas are written relative to it, not to the wall clock,
# so a test that runs minutes after collection judges the same times.
NOW = time.time()
HORIZON_S = 360.0


def check(
    body: Any = None,
    message_headers: dict[str, Any] | None = None,
    content_type: Any = "application/json",
    content_encoding: Any = "utf-8",
):
    raw = json.dumps(valid_body() if body is None else body).encode()
    return check_message(
        content_type,
        content_encoding,
        headers(str(uuid.uuid4())) if message_headers is None else message_headers,
        raw,
        now=NOW,
        eta_horizon_s=HORIZON_S,
    )


def test_what_our_client_sends_passes():
    assert check() is None


def test_what_celerys_own_retry_sends_passes():
    # task.retry(countdown=...) re-sends the same headers with retries+1 and an eta.
    task_id = str(uuid.uuid4())
    eta = (dt.datetime.fromtimestamp(NOW, dt.timezone.utc) + dt.timedelta(seconds=60)).isoformat()
    retry = {**headers(task_id), "retries": 1, "eta": eta, "parent_id": task_id}
    assert check(message_headers=retry) is None


def test_a_traced_producers_trace_context_passes():
    # vision_queue/tracing.py: the W3C headers a traced gateway or client adds.
    traced = {
        **headers(str(uuid.uuid4())),
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "tracestate": "vendor=t61rcWkgMzE,other=x",
    }
    assert check(message_headers=traced) is None


def test_what_kombu_hands_back_after_a_worker_died_passes():
    # kombu's restore marks the message: headers["redelivered"] = True
    assert check(message_headers={**headers(str(uuid.uuid4())), "redelivered": True}) is None


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"content_type": "application/x-python-serialize"}, "content_type"),
        ({"content_type": ""}, "content_type"),
        ({"content_type": None}, "content_type"),
        ({"content_encoding": "binary"}, "encoding"),
        ({"content_type": UNREADABLE_CONTENT_TYPE}, "envelope"),
    ],
)
def test_only_utf8_json_passes(change: dict[str, Any], code: str):
    refusal = check(**change)
    assert refusal is not None and refusal.code == code


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("timelimit", ["a", "b"]),
        ("timelimit", [1]),
        ("timelimit", [float("nan"), None]),
        ("timelimit", [True, None]),
        ("retries", "0"),
        ("retries", -1),
        ("retries", True),
        ("eta", 12),
        ("eta", "not a time"),
        ("expires", ["2030-01-01"]),
        ("shadow", "celery.backend_cleanup"),
        ("group", "g1"),
        ("ignore_result", "yes"),
        ("stamps", {"a": 1}),
        ("argsrepr", "x" * 5000),
        ("compression", "application/x-gzip"),
        ("chain", [{"task": "x"}]),
        ("callbacks", None),  # not a protocol-2 header at all
        ("redelivered", "yes"),
        ("traceparent", "00-" + "0" * 31 + "-" + "1" * 16 + "-01"),  # trace id too short
        ("traceparent", "ff-" + "a" * 32 + "-" + "b" * 16 + "-01"),  # version ff is invalid
        ("traceparent", "00-" + "A" * 32 + "-" + "b" * 16 + "-01"),  # upper case
        ("traceparent", ["00-" + "a" * 32 + "-" + "b" * 16 + "-01"]),
        ("tracestate", "k=" + "v" * 600),
        ("tracestate", "k=v\n"),
        ("tracestate", 7),
    ],
)
def test_a_header_celery_cannot_use_or_does_not_define_is_refused(name: str, value: Any):
    message_headers = {**headers(str(uuid.uuid4())), name: value}
    refusal = check(message_headers=message_headers)
    assert refusal is not None
    assert refusal.code in ("headers", "compression")
    assert refusal.task_id == message_headers["id"]  # still answerable


def test_an_eta_further_ahead_than_any_retry_is_refused():
    far = (dt.datetime.fromtimestamp(NOW, dt.timezone.utc) + dt.timedelta(hours=3)).isoformat()
    refusal = check(message_headers={**headers(str(uuid.uuid4())), "eta": far})
    assert refusal is not None and "eta" in refusal.reason


@pytest.mark.parametrize(
    "task_id",
    [None, 42, "", "not-a-uuid", "{" + str(uuid.uuid4())[:34] + "}", str(uuid.uuid4().int)],
)
def test_the_id_must_be_a_uuid(task_id: Any):
    message_headers = headers("x")
    message_headers["id"] = task_id
    refusal = check(message_headers=message_headers)
    assert refusal is not None and refusal.code == "headers" and refusal.task_id is None


def test_an_upper_case_uuid_is_an_id_as_written():
    task_id = str(uuid.uuid4()).upper()  # what some other-language clients send
    assert check(message_headers=headers(task_id)) is None
    refusal = check(body={}, message_headers=headers(task_id))
    assert refusal is not None and refusal.task_id == task_id


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("celery.accumulate", "builtin_task"),
        ("celery.backend_cleanup", "builtin_task"),
        ("celery.starmap", "builtin_task"),
        ("celery.chord_unlock", "builtin_task"),
        ("os.system", "task_name"),
        ("vision_queue.paint", "task_name"),
        (["vision_queue.ask"], "task_name"),
        ({"name": "vision_queue.ask"}, "task_name"),
    ],
)
def test_only_the_four_task_names_pass(name: Any, code: str):
    refusal = check(message_headers=headers(str(uuid.uuid4()), name))
    assert refusal is not None and refusal.code == code
    assert refusal.task is None  # not one of ours: the failure names no task


@pytest.mark.parametrize(
    "body",
    [
        {"args": [], "kwargs": {}},
        "a string",
        [[request()], {}],
        ["not-a-list", {}, NO_EMBED],
        [[request(), request()], {}, NO_EMBED],
        [["a string, not a request object"], {}, NO_EMBED],
        [[request()], {"extra": 1}, NO_EMBED],
        [[request()], {}, {**NO_EMBED, "chain": [{"junk": True}]}],
        [[request()], {}, {**NO_EMBED, "callbacks": []}],
        [[request()], {}, {**NO_EMBED, "group_id": "g"}],
    ],
)
def test_the_body_must_be_exactly_one_request_without_workflow(body: Any):
    refusal = check(body=body)
    assert refusal is not None and refusal.code == "body"


def test_bodies_that_are_not_utf8_json_or_too_large_are_refused():
    task_headers = headers(str(uuid.uuid4()))
    for raw in (b"\xff\xfe", b"[[{}], {}, {", b"[" * 100_000, b" " * (MAX_BODY_BYTES + 1)):
        refusal = check_message(
            "application/json", "utf-8", task_headers, raw, now=NOW, eta_horizon_s=HORIZON_S
        )
        assert refusal is not None and refusal.code == "body"


def test_a_refusal_never_quotes_the_message():
    secret = "SECRET-" + "x" * 50
    message_headers = {**headers(str(uuid.uuid4())), secret: secret}
    refusal = check(body={"token": secret}, message_headers=message_headers)
    assert refusal is not None and "SECRET" not in refusal.reason


# Below kombu ---------------------------------------------------------------------------------


def to_message(reply: Any) -> Message:
    """What kombu's Redis transport does with the item, step for step."""
    _queue, item = reply
    return Message(json.loads(item), channel=_Channel())


class _Channel:
    def decode_body(self, body: str, encoding: str | None) -> bytes:
        return base64.b64decode(body) if encoding == "base64" else body.encode()


def test_a_kombu_envelope_passes_unchanged():
    item = json.dumps(envelope(valid_body(), headers(str(uuid.uuid4())))).encode()
    assert sanitize_brpop_reply([b"gpu", item]) == (b"gpu", item)
    assert sanitize_brpop_reply(None) is None


@pytest.mark.parametrize(
    "item",
    [
        b"not json",
        b"\xff\xfe",
        b"[1, 2]",
        b'"a string"',
        b'{"body": "", "headers": {}}',
        json.dumps({"properties": {"delivery_tag": 5}}).encode(),
        json.dumps(
            {"properties": {"delivery_tag": "t", "body_encoding": "rot13"}, "body": "x"}
        ).encode(),
        json.dumps(
            {"properties": {"delivery_tag": "t", "body_encoding": "base64"}, "body": "!!"}
        ).encode(),
        json.dumps({"properties": {"delivery_tag": "t"}, "headers": "h"}).encode(),
        json.dumps({"properties": {"delivery_tag": "t", "delivery_info": "x"}}).encode(),
    ],
)
def test_an_item_kombu_cannot_read_becomes_an_unreadable_message_with_its_bytes(item: bytes):
    message = to_message(sanitize_brpop_reply([b"gpu", item]))
    assert message.content_type == UNREADABLE_CONTENT_TYPE
    assert message.body == item  # kept for the dead-letter list
    assert message.delivery_info["routing_key"] == "gpu"


def test_a_compressed_item_is_refused_before_kombu_inflates_it():
    task_id = str(uuid.uuid4())
    item = envelope(b"x\x9c" + b"\0" * 10, {**headers(task_id), "compression": "zlib"})
    message = to_message(sanitize_brpop_reply([b"gpu", json.dumps(item).encode()]))
    assert message.content_type == UNREADABLE_CONTENT_TYPE  # never decompressed
    refusal = check_message(
        message.content_type,
        message.content_encoding,
        message.headers,
        message.body,
        now=NOW,
        eta_horizon_s=HORIZON_S,
    )
    assert refusal is not None and refusal.task_id == task_id and "compressed" in refusal.reason
