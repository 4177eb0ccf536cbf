"""The worker's kombu transport: kombu's Redis channel with our rules composed in.

Each rule lives in its own module and is mixed in here, so one class list shows
everything a worker's channel does differently from kombu's:

* leases (`worker.broker.leases.LeasedQoS`): a dead or frozen worker's message is back on
  its queue within seconds;
* the priorities' order of lists in each BRPOP (`worker.broker.priorities.PriorityOrder`);
* broadcasts checked before kombu builds a message from them
  (`worker.broker.intake.broadcast_problem`; the remote-control rules themselves are in
  `worker.broker.remote_control`);
* event-loop connections that fail loudly instead of retrying inside kombu's read;
* through Sentinel, connections that leave a master the sentinels replaced
  (`vision_queue.master_fence`).

Celery and kombu name the transport by a dotted string (`TRANSPORT`, `SENTINEL_TRANSPORT`,
chosen by `transport_for`), so the classes must stay importable under these names.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from kombu import transport as kombu_transports
from kombu.transport import redis as kombu_redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from vision_queue.master_fence import fenced
from vision_queue.sentinel import is_sentinel_url
from worker.broker.intake import broadcast_problem
from worker.broker.leases import LeasedQoS
from worker.broker.priorities import MAX_SKIPS_OPTION, RANKS_OPTION, PriorityOrder

log = logging.getLogger("vision_queue.worker")


class _PriorityOrdered:
    """Consume in `PriorityOrder` when the transport options carry the ranks (the worker's
    do, `vision_queue.celery_config`)."""

    vq_priority_ranks: Mapping[str, int] | None = None
    vq_priority_max_skips: int = 10

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.vq_priority_ranks:
            self._queue_cycle = PriorityOrder(self.vq_priority_ranks, self.vq_priority_max_skips)


class BroadcastsChecked:
    """A fanout message kombu would fail on is dropped in one line. kombu builds its
    message object in the event loop, outside any handler, so a broadcast with headers
    that are not an object, say, stopped the whole worker."""

    def _deliver_fanout_message(self, message: Any, exchange: str) -> bool:
        problem = broadcast_problem(message)
        if problem is not None:
            log.warning("refused broadcast on %s: %s", str(exchange)[:64], problem)
            return False
        delivered: bool = super()._deliver_fanout_message(message, exchange)  # type: ignore[misc]
        return delivered


class _LoopConnectionsFailLoudly:
    """The event loop's connections (BRPOP, the fanout subscription) report a broken
    connection to kombu, which then restarts the consumer on a new connection.

    With redis-py's own retries a dropped subscription was reconnected inside kombu's
    read, off kombu's poller, and the read then blocked the event loop until a message
    came, which never did: the worker took nothing more and acked nothing (seen after a
    planned Sentinel failover, whose sentinels CLIENT KILL the demoted master's clients,
    and after a plain Redis restart).
    """

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        params: dict[str, Any] = super()._connparams(asynchronous)  # type: ignore[misc]
        if asynchronous:
            params["retry"] = Retry(NoBackoff(), 0)
        return params


class LeasedChannel(
    BroadcastsChecked, _LoopConnectionsFailLoudly, _PriorityOrdered, kombu_redis.Channel
):
    """kombu's Redis channel with leases, the priorities' order and checked broadcasts."""

    QoS = LeasedQoS
    # kombu's own tuple is typed by its length; ours is two longer.
    from_transport_options = (  # type: ignore[assignment]
        *kombu_redis.Channel.from_transport_options,
        RANKS_OPTION,
        MAX_SKIPS_OPTION,
    )


class LeasedTransport(kombu_redis.Transport):
    """kombu's Redis transport whose consumers hold leases (`broker_transport` setting)."""

    Channel = LeasedChannel


class _FencedSentinelPools:
    """The channel's connections check the master fence before each command. Its pooled
    ones (acks, leases, restores) move to the new master there; its event-loop ones
    (BRPOP, the fanout subscription) fail, and Celery restarts the consumer on the new
    master, instead of taking messages from the old one for the ~10 s until the sentinels
    demote it (a planned failover)."""

    def _sentinel_managed_pool(self, asynchronous: bool = False) -> Any:
        pool = super()._sentinel_managed_pool(asynchronous)  # type: ignore[misc]
        pool.connection_class = fenced(pool.connection_class, reconnect=not asynchronous)
        return pool


class LeasedSentinelChannel(
    BroadcastsChecked,
    _LoopConnectionsFailLoudly,
    _FencedSentinelPools,
    _PriorityOrdered,
    kombu_redis.SentinelChannel,
):
    """`LeasedChannel` on kombu's Sentinel channel (the master found through the
    sentinels); kombu reconnects through the sentinels."""

    QoS = LeasedQoS
    from_transport_options = (  # type: ignore[assignment]
        *kombu_redis.SentinelChannel.from_transport_options,
        RANKS_OPTION,
        MAX_SKIPS_OPTION,
    )


class LeasedSentinelTransport(kombu_redis.SentinelTransport):
    """`LeasedTransport` for sentinel:// broker URLs."""

    Channel = LeasedSentinelChannel


TRANSPORT = f"{__name__}:LeasedTransport"
SENTINEL_TRANSPORT = f"{__name__}:LeasedSentinelTransport"


def transport_for(broker_url: str) -> str:
    """The worker's `broker_transport`: leased, on plain Redis or through Sentinel.

    After a failed connection attempt kombu moves on to the next URL of a `;` list and takes
    the transport from its scheme again, ignoring the one configured; so in a worker the
    `sentinel` scheme itself is made to name the leased transport, or a failover would
    leave the worker consuming without leases.
    """
    if not is_sentinel_url(broker_url):
        return TRANSPORT
    kombu_transports.TRANSPORT_ALIASES["sentinel"] = SENTINEL_TRANSPORT
    return SENTINEL_TRANSPORT
