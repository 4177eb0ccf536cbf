"""The master fence (vision_queue/master_fence.py): which addresses a failover replaced,
and a connection that will not send a command to one. The failover itself, through real
sentinels: tests/worker/broker/test_sentinel_worker.py and tests/reliability."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from vision_queue.master_fence import FENCE, MasterFence, fenced

A, B = ("10.0.0.1", 6379), ("10.0.0.2", 6379)


def test_only_a_newer_configuration_replaces_a_master() -> None:
    fence = MasterFence()
    # Given the sentinels' first answer
    assert fence.observe(A, 1) is False
    assert not fence.replaced(*A)
    # When a sentinel that has not heard of a failover yet answers with an older epoch,
    # nothing changes
    assert fence.observe(B, 0) is False
    assert not fence.replaced(*B)
    # Then a newer epoch naming another server replaces the first
    assert fence.observe(B, 2) is True
    assert fence.replaced("10.0.0.1", "6379") and not fence.replaced(*B)
    # and a failover back makes the first the master again and fences the second
    assert fence.observe(A, 3) is True
    assert fence.replaced(*B) and not fence.replaced(*A)


def test_the_master_every_sentinel_names_is_never_refused() -> None:
    # Given a fence that saw a newer epoch than the sentinels now report (the leader of a
    # failover reports the new epoch before it switches)
    fence = MasterFence()
    fence.observe(A, 1)
    fence.observe(B, 5)
    assert fence.replaced(*A)
    # When every sentinel that answers names the first server, with an older epoch
    assert fence.observe(A, 2) is False  # one sentinel alone: not trusted
    assert fence.observe(A, 2, agreed=True) is True
    # Then the fence follows them
    assert not fence.replaced(*A) and fence.replaced(*B)


@pytest.fixture
def fence_reset() -> Iterator[None]:
    yield
    FENCE.reset()


def test_a_connection_to_a_replaced_master_sends_nothing(redis_url: str, fence_reset: None) -> None:
    # Given connections open to a real server, one as kombu's event loop holds it, one pooled
    pool = redis.ConnectionPool.from_url(redis_url)
    host, port = pool.connection_kwargs["host"], int(pool.connection_kwargs["port"])
    loop = fenced(redis.Connection, reconnect=False)(**pool.connection_kwargs)
    pooled = fenced(redis.Connection)(**pool.connection_kwargs)
    for connection in (loop, pooled):
        connection.connect()
        connection.send_command("PING")
        assert connection.read_response() in (b"PONG", "PONG")
    # When the sentinels replace that server
    FENCE.observe((host, port), 1)
    FENCE.observe(("127.0.0.2", 1), 2)
    # Then neither sends it a command: the event loop's raises (kombu restarts its
    # consumer); the pooled one reconnects through the sentinels, and here, where nothing
    # names another server, refuses too; both have dropped their sockets
    with pytest.raises(redis.ConnectionError, match="replaced"):
        loop.send_command("PING")
    with pytest.raises(redis.ConnectionError, match="replaced"):
        pooled.send_command("PING")
    assert loop._sock is None and pooled._sock is None
    # and once it is the master again (a newer epoch), they serve
    FENCE.observe((host, port), 3)
    pooled.send_command("PING")
    assert pooled.read_response() in (b"PONG", "PONG")
    pooled.disconnect()
