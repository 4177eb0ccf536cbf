"""Webhooks: a signed POST of the result when a task ends, retried, never blocking the task.

A real HTTP receiver on loopback (allow-listed, as a private deployment would) answers with
the statuses each test scripts; the receiver verifies signatures with the snippet that
docs/security.md shows to users.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from support.http_server import HOOK_HOST
from support.webhook_receiver import WebhookReceiver, documented_verifier

from vision_queue.settings import Settings
from worker.delivery.webhooks import Delivery, WebhookSender, notify_task_end, sign

SECRET = "whsec-test-0123456789"
HOOK_PATH = "/hooks/vq?token=s3cret"  # a token in the query, as receivers often want
TASK_ID = "5b0e7f3c-2f7a-4d0c-9a51-7d1f3c1e8a10"
RESULT = {
    "id": TASK_ID,
    "task": "ask",
    "text": "Un carré rouge.",
    "usage": {"prompt_tokens": 12, "completion_tokens": 5},
    "finish_reason": "stop",
}


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as running:
        yield running


def settings(**changes: Any) -> Settings:
    values: dict[str, Any] = {
        "webhook_secret": SECRET,
        "webhook_allowed_private_hosts": HOOK_HOST,
        "webhook_max_attempts": 4,
        "webhook_backoff_s": 0.5,
    }
    values.update(changes)
    return Settings.from_env({}, **values)


class RecordedSleep:
    """The backoff clock: records each wait instead of spending it."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def delivery(receiver: WebhookReceiver) -> Delivery:
    return Delivery(receiver.url(HOOK_PATH), TASK_ID, json.dumps(RESULT).encode())


def notify(settings: Settings, args: tuple[Any, ...], result: dict[str, Any], outcome: str) -> None:
    """A task's end as the worker reports it, to a sender of these settings."""
    notify_task_end(WebhookSender(settings), args, result, outcome)


def test_the_result_arrives_signed_so_the_documented_check_accepts_it(receiver: WebhookReceiver):
    # Given a receiver and the verification snippet from the docs,
    verify = documented_verifier()
    # when a task that named it as callback_url ends,
    notify(settings(), ({"callback_url": receiver.url(HOOK_PATH)},), RESULT, "success")
    # then it receives the result with its state, signed, naming the task.
    [hook] = receiver.wait_for(1)
    headers, body = hook.headers, hook.body
    assert json.loads(body) == {**RESULT, "state": "SUCCESS"}
    assert headers["Content-Type"] == "application/json"
    assert headers["X-VQ-Task-Id"] == TASK_ID
    assert headers["X-VQ-Attempt"] == "1"
    assert verify(SECRET, headers["X-VQ-Signature"], body)
    # A changed body, another secret or a replayed old signature fail the same check.
    assert not verify(SECRET, headers["X-VQ-Signature"], body.replace(b"rouge", b"bleu"))
    assert not verify("another-secret", headers["X-VQ-Signature"], body)
    assert not verify(SECRET, sign(SECRET, 1_000_000_000, body), body)


def test_a_failed_task_is_reported_as_a_failure(receiver: WebhookReceiver):
    failed = {**RESULT, "text": "", "error": {"code": "unsupported_image", "message": "x"}}
    notify(settings(), ({"callback_url": receiver.url(HOOK_PATH)},), failed, "unsupported_image")

    report = json.loads(receiver.wait_for(1)[0].body)
    assert report["state"] == "FAILURE"
    assert report["error"]["code"] == "unsupported_image"


def test_delivery_never_waits_for_the_receiver(receiver: WebhookReceiver):
    # Given a receiver that holds every request open until the test lets it go,
    receiver.hold = threading.Event()
    # when the task ends, the call returns while the receiver still holds the request.
    notify(settings(), ({"callback_url": receiver.url(HOOK_PATH)},), RESULT, "success")
    receiver.wait_for(1)
    assert not receiver.hold.is_set()
    receiver.hold.set()


def test_server_errors_are_retried_with_doubling_backoff_until_delivered(receiver: WebhookReceiver):
    receiver.statuses = [503, 500, 429, 200]
    sleep = RecordedSleep()
    sender = WebhookSender(settings(), sleep=sleep)

    assert sender.deliver(delivery(receiver)) is True

    assert [hook.headers["X-VQ-Attempt"] for hook in receiver.hooks] == ["1", "2", "3", "4"]
    assert sleep.waits == [0.5, 1.0, 2.0]
    assert len({hook.body for hook in receiver.hooks}) == 1  # the same body every time


def test_a_receiver_that_keeps_failing_gets_a_bounded_number_of_attempts(receiver: WebhookReceiver):
    receiver.statuses = [500]
    sender = WebhookSender(settings(webhook_max_attempts=3), sleep=RecordedSleep())

    assert sender.deliver(delivery(receiver)) is False
    assert len(receiver.hooks) == 3


@pytest.mark.parametrize("status", [400, 401, 404, 302])
def test_a_refusal_or_redirect_is_not_retried(receiver: WebhookReceiver, status: int):
    receiver.statuses = [status, 200]
    sender = WebhookSender(settings(), sleep=RecordedSleep())

    assert sender.deliver(delivery(receiver)) is False
    assert len(receiver.hooks) == 1  # and a redirect's target was never asked


def test_an_unreachable_receiver_is_retried():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sleep = RecordedSleep()
    allowed = f"127.0.0.1:{port}"
    sender = WebhookSender(
        settings(webhook_max_attempts=2, webhook_allowed_private_hosts=allowed), sleep=sleep
    )

    assert sender.deliver(Delivery(f"http://127.0.0.1:{port}/hook", TASK_ID, b"{}")) is False
    assert sleep.waits == [0.5]


def test_a_name_that_resolves_to_a_private_address_is_never_connected_to():
    # The address check itself: the resolver answers with the metadata address.
    def resolve(host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", port))]

    sender = WebhookSender(settings(), resolve=resolve, sleep=RecordedSleep())

    assert sender.deliver(Delivery("https://hooks.example.com/vq", TASK_ID, b"{}")) is False


def test_no_webhook_for_runs_that_do_not_end_the_task(
    receiver: WebhookReceiver, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="vision_queue.webhook")
    message = {"callback_url": receiver.url(HOOK_PATH)}
    # A retry or a requeue: the task runs again, so it has not ended.
    notify(settings(), (message,), RESULT, "retry")
    notify(settings(), (message,), RESULT, "requeued")
    # No secret configured: nothing can be signed, so nothing is sent.
    notify(settings(webhook_secret=""), (message,), RESULT, "success")
    # A loopback receiver that is not allow-listed is refused before any connection.
    notify(settings(webhook_allowed_private_hosts=""), (message,), RESULT, "success")
    # Then the one webhook that should go out is the only one the receiver sees.
    notify(settings(), (message,), {**RESULT, "text": "last"}, "success")

    receiver.wait_for(1)
    assert [json.loads(hook.body)["text"] for hook in receiver.hooks] == ["last"]
    assert "VQ_WEBHOOK_SECRET is not set" in caplog.text
    assert "non-public address" in caplog.text
    assert "s3cret" not in caplog.text  # the query string may hold a token


def test_a_hostile_message_cannot_break_the_task_end():
    for args in [(), ("text",), ({"callback_url": 7},), ({"callback_url": "gopher://x"},)]:
        notify(settings(), args, RESULT, "success")  # returns, raises nothing
