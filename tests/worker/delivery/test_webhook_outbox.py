"""The webhook outbox: deliveries kept in a real Redis until they end, taken over when their
sender dies, never more attempts in all than VQ_WEBHOOK_MAX_ATTEMPTS.

A "dead sender" is what a killed worker leaves behind: its delivery recorded, its hold
lapsed. The receiver is real HTTP on loopback.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from support.http_server import HOOK_HOST
from support.webhook_receiver import WebhookReceiver

from vision_queue.protocol import STATS_KEY, WEBHOOK_KEY, WEBHOOK_OUTBOX_KEY
from vision_queue.settings import Settings
from worker.delivery.webhook_outbox import Delivery, WebhookOutbox
from worker.delivery.webhooks import WebhookSender, notify_task_end

TASK_ID = "0f6d1c9e-6a43-4c1b-8a0e-2b7f5d3e9c41"
BODY = json.dumps({"id": TASK_ID, "task": "ask", "text": "Bonjour."}).encode()
MAX_ATTEMPTS = 4


def settings(**changes: Any) -> Settings:
    values: dict[str, Any] = {
        "webhook_secret": "whsec-outbox-test",
        "webhook_allowed_private_hosts": HOOK_HOST,
        "webhook_max_attempts": MAX_ATTEMPTS,
        "webhook_backoff_s": 0.2,
        "webhook_timeout_s": 5.0,
    }
    values.update(changes)
    return Settings.from_env({}, **values)


@pytest.fixture
def admin(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def outbox(admin: redis.Redis) -> WebhookOutbox:
    return WebhookOutbox(admin, ttl_s=3600)


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as running:
        yield running


def left_by_a_dead_sender(outbox: WebhookOutbox, url: str, attempts_made: int) -> None:
    """What a worker killed after `attempts_made` attempts leaves: a record it no longer holds."""
    assert outbox.record(Delivery(url, TASK_ID, BODY), hold_s=60)
    outbox.hold(TASK_ID, attempts_made, hold_s=0.001)
    time.sleep(0.01)


def test_a_delivery_is_kept_in_redis_while_it_is_tried_and_forgotten_once_delivered(
    receiver: WebhookReceiver, outbox: WebhookOutbox, admin: redis.Redis
):
    # Given a receiver that holds the first request open
    receiver.hold = threading.Event()
    sender = WebhookSender(settings(), outbox=outbox)
    notify_task_end(sender, ({"callback_url": receiver.url()},), {"id": TASK_ID}, "success")
    receiver.wait_for(1)
    # While it is being tried, the delivery is in Redis, one attempt in, held by its sender
    record = admin.hgetall(WEBHOOK_KEY.format(task_id=TASK_ID))
    assert record[b"url"] == receiver.url().encode() and record[b"attempts"] == b"1"
    held_until_ms = admin.zscore(WEBHOOK_OUTBOX_KEY, TASK_ID)
    assert held_until_ms is not None and held_until_ms > time.time() * 1000
    assert outbox.claim_due(10, hold_s=30) == []  # nobody else may take it
    assert 0 < admin.ttl(WEBHOOK_KEY.format(task_id=TASK_ID)) <= 3600  # gone with the result
    # Once delivered, nothing is left
    receiver.hold.set()
    deadline = time.monotonic() + 30
    while admin.exists(WEBHOOK_KEY.format(task_id=TASK_ID)):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert admin.zscore(WEBHOOK_OUTBOX_KEY, TASK_ID) is None
    assert admin.hget(STATS_KEY, "webhooks_delivered") == b"1"  # the fleet's count
    sender.close()


def test_a_dead_senders_delivery_is_taken_over_and_continues_its_attempts(
    receiver: WebhookReceiver, outbox: WebhookOutbox, admin: redis.Redis
):
    # Given a delivery whose worker died after its second attempt
    left_by_a_dead_sender(outbox, receiver.url(), attempts_made=2)
    # When a live worker's sender polls the outbox
    sender = WebhookSender(settings(), outbox=outbox, poll_s=0.1)
    # Then it sends it, as attempt 3, the same signed body
    [hook] = receiver.wait_for(1, timeout_s=30)
    assert hook.headers["X-VQ-Attempt"] == "3" and hook.headers["X-VQ-Task-Id"] == TASK_ID
    assert hook.body == BODY
    deadline = time.monotonic() + 30
    while admin.zscore(WEBHOOK_OUTBOX_KEY, TASK_ID) is not None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    sender.close()


def test_attempts_stay_bounded_across_the_senders_that_took_it_over(
    receiver: WebhookReceiver, outbox: WebhookOutbox, admin: redis.Redis
):
    receiver.statuses = [503]
    left_by_a_dead_sender(outbox, receiver.url(), attempts_made=MAX_ATTEMPTS - 1)
    sender = WebhookSender(settings(), outbox=outbox, poll_s=0.1)
    [hook] = receiver.wait_for(1, timeout_s=30)
    assert hook.headers["X-VQ-Attempt"] == str(MAX_ATTEMPTS)
    deadline = time.monotonic() + 30
    while admin.zscore(WEBHOOK_OUTBOX_KEY, TASK_ID) is not None:  # dropped: out of attempts
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.5)  # several polls later, still the one attempt
    assert len(receiver.hooks) == 1
    assert admin.hget(STATS_KEY, "webhooks_dropped") == b"1"
    sender.close()


def test_a_task_that_ends_twice_records_one_delivery(outbox: WebhookOutbox):
    assert outbox.record(Delivery("https://hooks.example.com/a", TASK_ID, BODY), hold_s=30)
    assert not outbox.record(Delivery("https://hooks.example.com/b", TASK_ID, BODY), hold_s=30)


def test_only_one_sender_takes_over_a_delivery(outbox: WebhookOutbox):
    left_by_a_dead_sender(outbox, "https://hooks.example.com/a", attempts_made=1)
    claims = [outbox.claim_due(10, hold_s=30) for _ in range(3)]
    assert [len(claim) for claim in claims] == [1, 0, 0]
    assert claims[0][0] == Delivery("https://hooks.example.com/a", TASK_ID, BODY, 1)


def test_a_due_delivery_whose_record_expired_is_dropped(outbox: WebhookOutbox, admin: redis.Redis):
    left_by_a_dead_sender(outbox, "https://hooks.example.com/a", attempts_made=1)
    admin.delete(WEBHOOK_KEY.format(task_id=TASK_ID))  # expired with its result
    assert outbox.claim_due(10, hold_s=30) == []
    assert admin.zscore(WEBHOOK_OUTBOX_KEY, TASK_ID) is None


def test_a_taken_over_delivery_keeps_its_tasks_trace_context(outbox: WebhookOutbox):
    # Given a traced task's delivery whose sender died before its first attempt
    trace = '{"traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}'
    assert outbox.record(
        Delivery("https://hooks.example.com/a", TASK_ID, BODY, trace=trace), hold_s=0.001
    )
    time.sleep(0.01)  # its hold lapsed
    # When another sender takes it over, then its attempts open spans in the same trace
    (claimed,) = outbox.claim_due(10, hold_s=30)
    assert claimed.trace == trace


def test_a_delivery_recorded_by_an_older_worker_has_no_trace(
    outbox: WebhookOutbox, admin: redis.Redis
):
    left_by_a_dead_sender(outbox, "https://hooks.example.com/a", attempts_made=1)
    admin.hdel(WEBHOOK_KEY.format(task_id=TASK_ID), "trace")  # written before traces
    (claimed,) = outbox.claim_due(10, hold_s=30)
    assert claimed.trace == "" and claimed.attempts_made == 1
