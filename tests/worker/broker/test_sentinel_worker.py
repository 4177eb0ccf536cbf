"""The worker's broker transport and result backend for a sentinel:// URL, against the real
Sentinel deployment (tests/support/sentinel.py): leases and first-writer-wins hold there too.
The failover itself is tests/reliability/test_sentinel_failover.py."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
from kombu import Connection
from kombu import transport as kombu_transports
from support.sentinel import SentinelCluster

from producer import Client
from vision_queue.celery_config import celery_settings, make_celery_app
from vision_queue.master_fence import FENCE
from vision_queue.protocol import LEASE_KEY
from vision_queue.redis_connect import sentinel_watch
from vision_queue.results import result_key
from vision_queue.settings import Settings
from worker.broker.leases import LeaseBook, LeasedQoS, install
from worker.broker.transport import SENTINEL_TRANSPORT, LeasedSentinelTransport, transport_for
from worker.delivery.results import FirstWriterSentinelBackend, backend_url

QUEUE = "sentinel-leases-test"


def master(cluster: SentinelCluster):  # type: ignore[no-untyped-def]
    address = cluster.master_address()
    assert address is not None
    return cluster.server(address[1])


def test_a_message_taken_through_the_sentinels_is_leased_even_after_kombu_moves_on(
    sentinel_cluster: SentinelCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    aliases = kombu_transports.TRANSPORT_ALIASES
    monkeypatch.setitem(aliases, "sentinel", aliases["sentinel"])  # restored afterwards
    settings = Settings.from_env(sentinel_cluster.env(), queue=QUEUE)
    url = settings.effective_broker_url
    with Client(settings) as client:
        task_id = client.submit("ask", [], "Hello").id
    book = LeaseBook("sentinel-test@localhost", 30.0)
    install(book)
    # Given the worker's broker connection on a sentinel URL
    connection = Connection(
        url,
        transport=transport_for(url),
        transport_options=celery_settings(settings)["broker_transport_options"],
    )
    assert transport_for(url) == SENTINEL_TRANSPORT
    # When kombu moves on to the next sentinel URL, as it does after a failed attempt
    connection.maybe_switch_next()
    try:
        # Then it still runs the leased transport, and a message taken holds a lease
        assert isinstance(connection.transport, LeasedSentinelTransport)
        channel = connection.default_channel
        assert isinstance(channel.qos, LeasedQoS)
        message = channel.basic_get(QUEUE)
        assert message is not None and message.headers["id"] == task_id
        tag = message.delivery_tag
        lease = LEASE_KEY.format(tag=tag)
        assert master(sentinel_cluster).get(lease) == book.owner.encode()
        message.ack()
        assert master(sentinel_cluster).get(lease) is None
    finally:
        connection.release()


def test_the_worker_backend_on_a_sentinel_url_keeps_the_first_result_on_the_master(
    sentinel_cluster: SentinelCluster,
) -> None:
    settings = Settings.from_env(sentinel_cluster.env())
    app = make_celery_app(settings)
    app.conf.result_backend = backend_url(settings)
    backend = app.backend
    assert isinstance(backend, FirstWriterSentinelBackend)
    task_id = str(uuid.uuid4())
    backend.store_result(task_id, {"text": "first"}, "SUCCESS")
    backend.store_result(task_id, {"text": "second"}, "SUCCESS")
    stored = json.loads(master(sentinel_cluster).get(result_key(task_id)))
    assert stored["status"] == "SUCCESS" and stored["result"] == {"text": "first"}


@pytest.fixture
def watched(sentinel_cluster: SentinelCluster) -> Iterator[Settings]:
    """What a worker does at start through Sentinel: the master fence watches the sentinels.
    Forgotten afterwards, so later tests in this process see no fenced address."""
    sentinel_cluster.ensure_replica()
    settings = Settings.from_env(sentinel_cluster.env(), queue=QUEUE)
    watch = sentinel_watch(settings)
    assert watch is not None
    FENCE.watch(watch)
    FENCE.refresh()
    yield settings
    FENCE.reset()
    watch.close()


@pytest.mark.slow
def test_a_message_taken_right_after_a_planned_failover_is_leased_on_the_new_master(
    sentinel_cluster: SentinelCluster, watched: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    aliases = kombu_transports.TRANSPORT_ALIASES
    monkeypatch.setitem(aliases, "sentinel", aliases["sentinel"])  # restored afterwards
    url = watched.effective_broker_url
    with Client(watched) as client:
        first, second = (client.submit("ask", [], f"Say {i}.").id for i in range(2))
    book = LeaseBook("fence-test@localhost", 30.0)
    install(book)
    connection = Connection(
        url,
        transport=transport_for(url),
        transport_options=celery_settings(watched)["broker_transport_options"],
    )
    try:
        # Given a worker's broker connection that took and acknowledged a message, so its
        # pooled connection is open to the master
        channel = connection.default_channel
        taken = channel.basic_get(QUEUE)
        assert taken is not None and taken.headers["id"] == first
        taken.ack()
        assert sentinel_cluster.wait_replicated() >= 1
        # When the sentinels are told to fail over, and the next message is taken once they
        # name the new master, while the old one is still a master (they demote it only
        # seconds later) and the connection still open to it
        old_master = sentinel_cluster.planned_failover()
        new_master = sentinel_cluster.wait_for_new_master(old_master)
        sentinel_cluster.wait_switched(new_master[1])
        message = channel.basic_get(QUEUE)
        # Then its lease is on the new master, where the worker's results, streams and
        # renewals go: the task runs instead of finding its lease gone
        assert message is not None and message.headers["id"] == second
        lease = LEASE_KEY.format(tag=message.delivery_tag)
        assert sentinel_cluster.server(new_master[1]).get(lease) == book.owner.encode()
        # and its ack reaches the new master too
        message.ack()
        assert sentinel_cluster.server(new_master[1]).get(lease) is None
    finally:
        connection.release()
        sentinel_cluster.ensure_replica()  # the old master demoted and in sync again
