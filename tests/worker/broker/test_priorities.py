"""The order a worker takes tasks in across the priorities' lists (worker/broker/priorities.py).

The rule on its own (`PriorityOrder`), then on kombu's real Redis channel, as the worker
consumes (the leased transport, the worker's transport options, BRPOP against a real
redis-server), with messages our client queued.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Queue

from producer import Client
from vision_queue.celery_config import celery_settings
from vision_queue.protocol import LEASE_KEY, priority_queues
from vision_queue.settings import Settings
from worker.broker.lease_keeper import LeaseKeeper
from worker.broker.leases import LeaseBook, install
from worker.broker.priorities import PriorityOrder
from worker.broker.transport import TRANSPORT

QUEUE = "prio-test"
HIGH, NORMAL, LOW = priority_queues(QUEUE)
RANKS = {HIGH: 0, NORMAL: 1, LOW: 2}


def takes(order: PriorityOrder, waiting: dict[str, int], count: int) -> list[str]:
    """Simulate BRPOP: the first list in the cycle's order that holds a task serves."""
    served = []
    for _ in range(count):
        keys = order.consume(len(order.items))
        queue = next(key for key in keys if waiting[key])
        waiting[queue] -= 1
        order.rotate(queue)
        served.append(queue)
    return served


def test_lists_are_tried_highest_first():
    order = PriorityOrder(RANKS, max_skips=10)
    order.update([LOW, NORMAL, HIGH])  # whatever order the consumer declared them in
    assert order.consume(3) == [HIGH, NORMAL, LOW]
    waiting = {HIGH: 2, NORMAL: 2, LOW: 2}
    assert takes(order, waiting, 6) == [HIGH, HIGH, NORMAL, NORMAL, LOW, LOW]


def test_a_waiting_low_task_is_passed_by_at_most_k_higher_ones():
    # Given a steady flood of high tasks and one low task waiting, K = 3
    order = PriorityOrder(RANKS, max_skips=3)
    order.update([HIGH, NORMAL, LOW])
    waiting = {HIGH: 100, NORMAL: 0, LOW: 2}
    # Then every fourth take is the low list's
    assert takes(order, waiting, 8) == [HIGH, HIGH, HIGH, LOW] * 2


def test_under_floods_of_high_and_low_the_normal_list_still_gets_its_turns():
    order = PriorityOrder(RANKS, max_skips=3)
    order.update([HIGH, NORMAL, LOW])
    waiting = {HIGH: 100, NORMAL: 100, LOW: 100}
    served = takes(order, waiting, 40)
    # Both lower lists fall due after 3 highs: the higher first, then the other
    assert served[:5] == [HIGH, HIGH, HIGH, NORMAL, LOW]
    for queue in (NORMAL, LOW):
        runs = "".join("x" if s == queue else "." for s in served).split("x")[1:-1]
        assert runs and max(len(run) for run in runs) <= 4, (queue, served)  # K + 1


@pytest.mark.parametrize("max_skips", [1, 2, 5, 10])
def test_no_waiting_task_waits_more_than_k_plus_one_takes(max_skips: int):
    # Given tasks arriving on all three lists at rates from a trickle to a flood
    rng = random.Random(max_skips)
    for _ in range(50):
        order = PriorityOrder(RANKS, max_skips)
        order.update([HIGH, NORMAL, LOW])
        rates = {queue: rng.choice([0.05, 0.3, 0.6, 0.95]) for queue in RANKS}
        waiting = dict.fromkeys(RANKS, 0)
        waited = dict.fromkeys(RANKS, 0)  # takes from other lists while one of ours waits
        for _ in range(300):
            for queue, rate in rates.items():
                waiting[queue] += rng.random() < rate
            keys = order.consume(3)
            served = next((key for key in keys if waiting[key]), None)
            if served is None:
                continue  # BRPOP would block until something arrives
            waiting[served] -= 1
            order.rotate(served)
            for queue in RANKS:
                waited[queue] = waited[queue] + 1 if waiting[queue] and queue != served else 0
                # Then none waits more than K + 1 takes, and a high task at most two
                limit = 2 if queue == HIGH else max_skips + 1
                assert waited[queue] <= limit, (queue, waited)


def test_an_empty_lower_list_does_not_save_up_turns():
    # Given a long run of high tasks while the lower lists were empty
    order = PriorityOrder(RANKS, max_skips=3)
    order.update([HIGH, NORMAL, LOW])
    waiting = {HIGH: 100, NORMAL: 0, LOW: 0}
    assert takes(order, waiting, 20) == [HIGH] * 20
    # When two low tasks arrive
    waiting[LOW] = 2
    served = takes(order, waiting, 8)
    # Then they get one turn each, K apart, not two in a row for the time they were absent
    lows = [index for index, queue in enumerate(served) if queue == LOW]
    assert len(lows) == 2 and lows[0] <= 3 and lows[1] - lows[0] == 4, served


def test_a_fault_in_the_counts_never_reaches_kombu():
    # kombu calls rotate between popping a message and delivering it: raising there would
    # lose the message. Given counts that lost track of a list
    order = PriorityOrder(RANKS, max_skips=3)
    order.update([HIGH, NORMAL, LOW])
    order.consume(3)
    del order.skipped[LOW]
    # When the next delivery is counted, then it does not raise and the counts start over
    order.rotate(HIGH)
    assert order.skipped == {HIGH: 0, NORMAL: 0, LOW: 0}
    assert order.consume(3) == [HIGH, NORMAL, LOW]


def test_k_below_one_is_refused():
    with pytest.raises(ValueError, match="max_skips"):
        PriorityOrder(RANKS, max_skips=0)


# --- On kombu's real channel ------------------------------------------------------------


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings.from_env({}, redis_url=redis_url, queue=QUEUE, priority_max_skips=4)


@pytest.fixture
def connection(settings: Settings) -> Iterator[Connection]:
    options = celery_settings(settings)["broker_transport_options"]
    install(LeaseBook("prio-worker", 30.0))
    conn = Connection(settings.redis_url, transport=TRANSPORT, transport_options=options)
    try:
        yield conn
    finally:
        conn.release()
        install(None)  # type: ignore[arg-type]


def consume(connection: Connection, count: int) -> list[tuple[str, str]]:
    """Take `count` messages one at a time (prefetch 1, ack before the next) as a worker
    does; return (list, prompt) in the order taken."""
    taken: list[tuple[str, str]] = []

    def on_message(body: Any, message: Any) -> None:
        taken.append((message.delivery_info["routing_key"], body[0][0]["prompt"]))
        message.ack()

    queues = [Queue(name, routing_key=name) for name in (LOW, NORMAL, HIGH)]
    channel = connection.channel()
    with Consumer(channel, queues, callbacks=[on_message], accept=["json"], prefetch_count=1):
        while len(taken) < count:
            connection.drain_events(timeout=10)
    return taken


def test_the_worker_channel_takes_high_then_normal_then_low_with_the_share(
    settings: Settings, connection: Connection, redis_url: str
):
    # Given 12 low tasks queued first, then 3 normal, then 6 high (K = 4)
    with Client(settings) as client:
        for i in range(12):
            client.submit("ask", [], f"low {i}", priority="low")
        for i in range(3):
            client.submit("ask", [], f"normal {i}")
        for i in range(6):
            client.submit("ask", [], f"high {i}", priority="high")
    admin = redis.Redis.from_url(redis_url)
    assert [admin.llen(name) for name in (HIGH, NORMAL, LOW)] == [6, 3, 12]
    # When one consumer takes them one at a time
    taken = consume(connection, 21)
    # Then each came from its own list, highs first, each list in its own queued order,
    # and a waiting list is passed by at most K = 4 tasks from above
    assert all(prompt.startswith({HIGH: "high", NORMAL: "normal", LOW: "low"}[queue])
               for queue, prompt in taken)
    assert [prompt for _, prompt in taken[:4]] == ["high 0", "high 1", "high 2", "high 3"]
    assert [prompt for _, prompt in taken[4:6]] == ["normal 0", "low 0"]
    assert [prompt for _, prompt in taken[6:8]] == ["high 4", "high 5"]
    assert [p for _, p in taken if p.startswith("low")] == [f"low {i}" for i in range(12)]
    assert [p for _, p in taken if p.startswith("normal")] == [f"normal {i}" for i in range(3)]
    assert [admin.llen(name) for name in (HIGH, NORMAL, LOW)] == [0, 0, 0]


def test_a_message_handed_back_returns_to_its_own_priority_list(
    settings: Settings, connection: Connection, redis_url: str
):
    # Given a low and a high task, and a worker that took the high one
    with Client(settings) as client:
        low = client.submit("ask", [], "low", priority="low")
        high = client.submit("ask", [], "high", priority="high")
    admin = redis.Redis.from_url(redis_url)
    channel = connection.default_channel
    message = channel.basic_get(HIGH)
    assert message.headers["id"] == high.id
    # When it hands the message back (requeue: a lost lease, a stopping worker)
    message.reject(requeue=True)
    # Then it is on the high list again, and the low one stays where it was
    assert admin.llen(HIGH) == 1 and admin.llen(LOW) == 1 and admin.llen(NORMAL) == 0
    again = channel.basic_get(HIGH)
    assert again.headers["id"] == high.id and again.headers.get("redelivered")
    again.ack()
    assert channel.basic_get(LOW).headers["id"] == low.id


def test_a_lapsed_lease_hands_the_message_back_to_its_own_list(settings: Settings, redis_url):
    admin = redis.Redis.from_url(redis_url)
    options = celery_settings(settings)["broker_transport_options"]

    def connect() -> Connection:
        return Connection(settings.redis_url, transport=TRANSPORT, transport_options=options)

    with Client(settings) as client:
        low = client.submit("ask", [], "low", priority="low")
    # Given a worker that took the low task, then died (its lease is never renewed)
    install(LeaseBook("dead-worker", 0.3))
    dead = connect()
    try:
        taken = dead.default_channel.basic_get(LOW)
        assert taken.headers["id"] == low.id and admin.llen(LOW) == 0
        lease = LEASE_KEY.format(tag=taken.delivery_tag)
        deadline = time.monotonic() + 30
        while admin.exists(lease) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not admin.exists(lease)
        # When a live worker's keeper sweeps
        live = LeaseBook("live-worker", 30.0)
        install(live)
        keeper = LeaseKeeper(live, admin, [QUEUE], 0.1, connect=connect)
        assert keeper.sweep() == 1
        # Then the message is back on the low list, not on the normal one
        assert [admin.llen(name) for name in (HIGH, NORMAL, LOW)] == [0, 0, 1]
        assert json.loads(admin.lindex(LOW, 0))["headers"]["id"] == low.id
    finally:
        dead.release()
        install(None)  # type: ignore[arg-type]
