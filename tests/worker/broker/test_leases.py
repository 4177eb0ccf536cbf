"""Leases on kombu's own Redis channels, against a real redis-server.

Two "workers" live in this process (each a lease book and a kombu connection on the
leased transport); the message is one our client queued. The lease TTL is short so a
lapse happens within the test; nothing else is faked.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection

from producer import Client
from scripts.devstack import free_port
from vision_queue.protocol import LEASE_KEY, LEASED_KEY, STATS_KEY
from vision_queue.settings import Settings
from worker.broker.lease_keeper import LeaseKeeper
from worker.broker.leases import Lease, LeaseBook, install
from worker.broker.transport import TRANSPORT

QUEUE = "leases-test"
TTL_S = 0.6


@pytest.fixture
def queued_id(redis_url: str) -> str:
    settings = Settings.from_env({}, redis_url=redis_url, queue=QUEUE)
    with Client(settings) as client:
        return client.submit("ask", [], "Hello").id


class Worker:
    def __init__(self, redis_url: str, name: str, **transport_options: Any) -> None:
        self.book = LeaseBook(name, TTL_S)
        self.connection = Connection(
            redis_url, transport=TRANSPORT, transport_options=transport_options
        )
        self.channel = self.connection.default_channel
        self.client = redis.Redis.from_url(redis_url)
        self.keeper = LeaseKeeper(
            self.book,
            self.client,
            [QUEUE],
            0.1,
            connect=lambda: Connection(redis_url, transport=TRANSPORT),
        )

    def take(self) -> Any:
        install(self.book)
        message = self.channel.basic_get(QUEUE)
        assert message is not None
        return message

    def ack(self, message: Any) -> None:
        install(self.book)
        message.ack()

    def sweep(self) -> int:
        install(self.book)
        return self.keeper.sweep()

    def close(self) -> None:
        self.connection.release()
        self.client.close()


@pytest.fixture
def workers(redis_url: str) -> Iterator[tuple[Worker, Worker]]:
    pair = (Worker(redis_url, "worker-a"), Worker(redis_url, "worker-b"))
    yield pair
    for worker in pair:
        worker.close()


def holder(admin: redis.Redis, tag: str) -> bytes | None:
    return admin.get(LEASE_KEY.format(tag=tag))


def test_a_lapsed_lease_is_handed_back_and_the_old_holder_cannot_ack_it_away(
    redis_url: str, queued_id: str, workers: tuple[Worker, Worker]
) -> None:
    admin = redis.Redis.from_url(redis_url)
    a, b = workers
    # Given worker A took the message: it holds the lease, the message is in `unacked`
    taken = a.take()
    tag = taken.delivery_tag
    assert taken.headers["id"] == queued_id
    assert holder(admin, tag) == b"worker-a"
    assert admin.hexists("unacked", tag) and admin.zscore(LEASED_KEY, tag) is not None
    assert b.sweep() == 0  # a live lease is left alone
    # When A stops renewing (dead or frozen) and the lease lapses
    time.sleep(TTL_S + 0.3)
    assert holder(admin, tag) is None
    # Then a live worker's sweep puts the message back at the front of the queue
    assert b.sweep() == 1
    assert admin.llen(QUEUE) == 1 and not admin.hexists("unacked", tag)
    assert admin.hget(STATS_KEY, "redelivered") == b"1"  # the fleet's count (vq-exporter)
    again = b.take()
    assert again.headers["id"] == queued_id and again.delivery_tag == tag  # same tag
    assert holder(admin, tag) == b"worker-b"
    # And A, resuming, learns from its next renewal that the lease is lost
    stale = a.book.get(tag)
    assert stale is not None
    a.keeper.renew()
    assert not stale.valid()
    # and its ack of the stale delivery leaves B's message where it is
    a.ack(taken)
    assert admin.hexists("unacked", tag) and holder(admin, tag) == b"worker-b"
    b.ack(again)
    assert not admin.hexists("unacked", tag) and holder(admin, tag) is None
    assert admin.zscore(LEASED_KEY, tag) is None


def test_renewing_keeps_a_lease_and_reports_one_lost(
    redis_url: str, queued_id: str, workers: tuple[Worker, Worker]
) -> None:
    admin = redis.Redis.from_url(redis_url)
    a, _ = workers
    taken = a.take()
    lease = a.book.get(taken.delivery_tag)
    assert lease is not None
    for _ in range(4):  # longer than the TTL, renewed all along
        time.sleep(TTL_S / 3)
        a.keeper.renew()
    assert lease.valid() and holder(admin, taken.delivery_tag) == b"worker-a"
    admin.set(LEASE_KEY.format(tag=taken.delivery_tag), "someone-else")
    a.keeper.renew()
    assert not lease.valid()


def test_messages_without_a_lease_are_left_to_the_visibility_timeout(
    redis_url: str, queued_id: str, workers: tuple[Worker, Worker]
) -> None:
    admin = redis.Redis.from_url(redis_url)
    _, b = workers
    # A worker of an older version takes the message through kombu's own transport.
    with Connection(redis_url) as old:
        message = old.default_channel.basic_get(QUEUE)
        assert message is not None
        tag = message.delivery_tag
        assert admin.hexists("unacked", tag) and holder(admin, tag) is None
        assert b.sweep() == 0
        assert admin.hexists("unacked", tag)  # still the old worker's
        message.ack()


def test_the_visibility_timeout_never_restores_a_message_a_live_worker_holds(
    redis_url: str, queued_id: str
) -> None:
    admin = redis.Redis.from_url(redis_url)
    # A worker configured with a far too short visibility timeout (issue 8, item 4).
    impatient = Worker(redis_url, "impatient", visibility_timeout=0)
    patient = Worker(redis_url, "patient")
    try:
        taken = patient.take()
        install(impatient.book)
        impatient.channel.qos.restore_visible(num=100, interval=1)
        assert admin.hexists("unacked", taken.delivery_tag)
        assert admin.llen(QUEUE) == 0
        patient.ack(taken)
    finally:
        impatient.close()
        patient.close()


def test_a_message_taken_while_redis_refuses_writes_is_recorded_once_redis_accepts_them(
    redis_url: str, queued_id: str, workers: tuple[Worker, Worker]
):
    # Given a worker that pops a message (RPOP is allowed in a full Redis) whose record in
    # `unacked` is refused: until the record is written it holds the only copy
    worker, _ = workers
    admin = redis.Redis.from_url(redis_url)
    limit = admin.config_get("maxmemory")["maxmemory"]
    refused_before = _oom_errors(admin)
    taken: list[Any] = []
    admin.config_set("maxmemory", 1)
    try:
        thread = threading.Thread(target=lambda: taken.append(worker.take()), daemon=True)
        thread.start()
        deadline = time.monotonic() + 120
        while _oom_errors(admin) == refused_before:  # its first attempt was refused
            assert time.monotonic() < deadline, "the worker never tried to record its message"
            time.sleep(0.01)
        assert thread.is_alive() and not taken  # it keeps the message, still trying
    finally:
        admin.config_set("maxmemory", limit)
    # When Redis accepts writes again, then the message is recorded with its lease: not lost
    thread.join(timeout=60)
    assert taken and taken[0].headers["id"] == queued_id
    tag = taken[0].delivery_tag
    assert holder(admin, tag) == b"worker-a"
    assert admin.hexists("unacked", tag)
    assert admin.llen(QUEUE) == 0
    worker.ack(taken[0])
    assert not admin.hexists("unacked", tag)


def take_with_lease_held_in_redis(worker: Worker, admin: redis.Redis) -> tuple[Any, Lease]:
    """Take the message, its lease kept a minute in Redis (past this module's short TTL), as
    for a lease whose renewals Redis applied."""
    taken = worker.take()
    lease = worker.book.get(taken.delivery_tag)
    assert lease is not None
    admin.pexpire(LEASE_KEY.format(tag=taken.delivery_tag), 60_000)
    return taken, lease


def test_a_handed_back_message_whose_release_redis_refused_goes_back_when_acked(
    redis_url: str, queued_id: str, workers: tuple[Worker, Worker]
):
    # Given a task that hands its message back (its result could not be stored) while its
    # keeper cannot reach Redis (restarting), so the lease stays in Redis, still its own
    admin = redis.Redis.from_url(redis_url)
    worker, _ = workers
    taken, lease = take_with_lease_held_in_redis(worker, admin)
    tag = taken.delivery_tag
    unreachable = redis.Redis(port=free_port(), socket_connect_timeout=1)
    cut_off = LeaseKeeper(
        worker.book,
        unreachable,
        [QUEUE],
        0.1,
        connect=lambda: Connection(redis_url, transport=TRANSPORT),
    )
    cut_off.release(lease)
    assert holder(admin, tag) == b"worker-a"
    # When Celery acknowledges it (it does for every ignored task), Redis being back
    worker.ack(taken)
    # Then the message is at the front of its queue again, not removed: nothing is lost
    assert admin.llen(QUEUE) == 1 and not admin.hexists("unacked", tag)
    assert holder(admin, tag) is None and admin.zscore(LEASED_KEY, tag) is None
    assert worker.take().headers["id"] == queued_id


def test_a_task_abandoned_by_its_own_reckoning_gives_its_message_back_on_ack(
    redis_url: str, queued_id: str, workers: tuple[Worker, Worker]
):
    # Given renewals Redis applied but whose replies never came: Redis holds the lease
    # for this worker, while the worker, not having heard back within the TTL, abandons
    admin = redis.Redis.from_url(redis_url)
    worker, _ = workers
    taken, lease = take_with_lease_held_in_redis(worker, admin)
    tag = taken.delivery_tag
    time.sleep(TTL_S + 0.2)
    assert not lease.valid()
    # When its message is acknowledged, then it goes back on its queue for a live worker
    worker.ack(taken)
    assert admin.llen(QUEUE) == 1 and not admin.hexists("unacked", tag)


def test_a_lease_given_up_is_not_renewed(
    redis_url: str, queued_id: str, workers: tuple[Worker, Worker]
):
    admin = redis.Redis.from_url(redis_url)
    worker, _ = workers
    taken = worker.take()
    lease = worker.book.get(taken.delivery_tag)
    assert lease is not None
    lease.mark_lost()
    key = LEASE_KEY.format(tag=taken.delivery_tag)
    ttl_before = admin.pttl(key)
    time.sleep(0.05)
    worker.keeper.renew()
    assert 0 < admin.pttl(key) < ttl_before  # left to lapse


def test_a_lost_connection_leaves_a_running_message_with_its_lease_not_run_twice(
    redis_url: str, queued_id: str, workers: tuple[Worker, Worker]
):
    # Given a worker running a message under a valid lease
    admin = redis.Redis.from_url(redis_url)
    worker, other = workers
    taken = worker.take()
    tag = taken.delivery_tag
    # When its channel closes (kombu does so when the connection is lost)
    worker.channel.close()
    # Then the message stays taken, under the same lease: no other worker runs it again
    assert admin.llen(QUEUE) == 0 and admin.hexists("unacked", tag)
    assert holder(admin, tag) == b"worker-a"
    assert other.sweep() == 0
    # and the task's ack, once it finishes, removes it
    worker.ack(taken)
    assert not admin.hexists("unacked", tag) and holder(admin, tag) is None


def test_a_closing_channel_restores_a_message_whose_lease_is_not_valid(
    redis_url: str, queued_id: str, workers: tuple[Worker, Worker]
):
    admin = redis.Redis.from_url(redis_url)
    worker, _ = workers
    taken = worker.take()
    lease = worker.book.get(taken.delivery_tag)
    assert lease is not None
    lease.mark_lost()  # its task gave it up
    worker.channel.close()
    assert admin.llen(QUEUE) == 1 and not admin.hexists("unacked", taken.delivery_tag)


def _oom_errors(admin: redis.Redis) -> int:
    stats = admin.info("errorstats")
    entry = stats.get("errorstat_OOM")
    return int(entry["count"]) if entry else 0
