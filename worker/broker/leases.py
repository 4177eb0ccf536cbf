"""Leases: a dead or frozen worker's message is back on the queue within seconds.

kombu's Redis transport keeps every message a worker has taken in the `unacked` hash
until it is acknowledged, and restores one only after the visibility timeout (an hour by
default), because it cannot tell a dead worker from a slow one. A lease tells them apart:

- when a message is delivered, the worker sets `vq:lease:<delivery tag>` to its own name,
  expiring VQ_LEASE_TTL_S ahead, in the same transaction that records the message in
  `unacked`, and adds the tag to the sorted set `vq:leased`;
- every heartbeat (`worker.broker.lease_keeper`) renews the leases it holds; a lease found
  gone or someone else's is lost: the task is abandoned (no more stream writes, no result);
- every heartbeat, the one worker holding the sweep lock looks for tags in `vq:leased`
  whose lease has lapsed while their message is still in `unacked`, and restores those
  messages to the front of their queue at once (kombu's restore by delivery tag);
- acknowledging and restoring are conditional: a worker that lost a lease never removes
  or restores the message another worker now holds (the tag stays the same across
  redeliveries), and kombu's visibility-timeout sweep never restores a message whose
  lease a live worker holds. The visibility timeout remains for messages without a lease
  (for example taken by a worker of an older version);
- a closing channel (a lost connection included) keeps the messages it runs under their
  leases rather than handing them back, and Celery's ack of a message its task gave up
  puts it back on its queue instead of removing it.

Renewing needs only GET and PEXPIRE, which Redis allows even when it is out of memory, so
a full Redis does not cost running tasks their leases. All expiry is Redis' own clock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from kombu.exceptions import OperationalError
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from vision_queue.master_fence import FENCE
from vision_queue.protocol import LEASE_KEY, LEASED_KEY

log = logging.getLogger("vision_queue.worker")

# KEYS: lease, unacked_index, unacked, leased. ARGV: owner, tag.
_ACK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[2])
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[4], ARGV[2])
return 1
"""
# Retrying to record a popped message while Redis refuses writes (LeasedQoS.append).
_RECORD_FIRST_PAUSE_S, _RECORD_MAX_PAUSE_S = 0.1, 2.0


def lease_key(tag: str) -> str:
    return LEASE_KEY.format(tag=tag)


@dataclass
class Lease:
    """This worker's lease on one delivered message."""

    tag: str
    task_id: str
    owner: str
    ttl_s: float
    renewed_at: float = field(default_factory=time.monotonic)  # before the last renewal
    _lost: threading.Event = field(default_factory=threading.Event)

    def mark_lost(self) -> None:
        self._lost.set()

    def lost(self) -> bool:
        return self._lost.is_set()

    def valid(self) -> bool:
        """Still ours by our own reckoning: not seen lost, and renewed within the TTL
        (measured from before the renewal was sent, so never later than Redis expires it)."""
        return not self._lost.is_set() and time.monotonic() - self.renewed_at < self.ttl_s


class LeaseBook:
    """The leases this worker holds, by delivery tag and by task id. Thread-safe."""

    def __init__(self, owner: str, ttl_s: float) -> None:
        self.owner = owner
        self.ttl_s = ttl_s
        # A live channel for acks of messages whose own channel closed (set by the keeper).
        self.live_channel: Callable[[], Any] | None = None
        self._by_tag: dict[str, Lease] = {}
        self._lock = threading.Lock()

    def add(self, tag: str, task_id: str, taken_at: float) -> Lease:
        lease = Lease(tag, task_id, self.owner, self.ttl_s, renewed_at=taken_at)
        with self._lock:
            self._by_tag[tag] = lease
        return lease

    def get(self, tag: str) -> Lease | None:
        with self._lock:
            return self._by_tag.get(tag)

    def pop(self, tag: str) -> Lease | None:
        with self._lock:
            return self._by_tag.pop(tag, None)

    def for_task(self, task_id: str) -> Lease | None:
        with self._lock:
            found = [lease for lease in self._by_tag.values() if lease.task_id == task_id]
        return found[-1] if found else None

    def held(self) -> list[Lease]:
        with self._lock:
            return list(self._by_tag.values())


_installed: LeaseBook | None = None


def install(book: LeaseBook) -> None:
    """Make this process's kombu channels (`worker.broker.transport`) take leases for `book`."""
    global _installed
    _installed = book


def installed() -> LeaseBook | None:
    return _installed


class LeasedQoS(kombu_redis.QoS):
    """kombu's Redis ack emulation, with a lease taken, renewed and honoured per message."""

    def append(self, message: Any, delivery_tag: str) -> None:
        book = _installed
        if book is None:
            super().append(message, delivery_tag)
            return
        delivery = message.delivery_info
        headers = message.headers if isinstance(message.headers, dict) else {}
        taken_at = time.monotonic()
        record = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        # Through Sentinel: the lease goes where this worker's results and renewals go, the
        # master the sentinels name now, even if the message came from one they just
        # replaced (vision_queue/master_fence.py). Without it a take right after a planned
        # failover leased on the old master and was abandoned, again and again.
        FENCE.refresh()
        self._record_taken(delivery_tag, record, book.owner, book.ttl_s, headers.get("id"))
        book.add(delivery_tag, str(headers.get("id") or ""), taken_at)
        virtual.QoS.append(self, message, delivery_tag)

    def _record_taken(
        self, tag: str, record: str, owner: str, ttl_s: float, task_id: object
    ) -> None:
        """Record a message just popped from its list, however long Redis takes to accept it.

        BRPOP has already removed the message from the queue: until this transaction is
        applied, this process holds the only copy. Giving up here (Redis restarting, full,
        or failing over) would lose it, so keep trying; the worker can serve nothing else
        while Redis refuses writes anyway. Applying it twice is harmless (same values).
        """
        pause_s = _RECORD_FIRST_PAUSE_S
        while True:
            try:
                with self.pipe_or_acquire() as pipe:
                    # One transaction: a message is never in `unacked` without its lease.
                    now = time.time()
                    pipe.set(lease_key(tag), owner, px=int(ttl_s * 1000))
                    pipe.zadd(LEASED_KEY, {tag: now})
                    pipe.zadd(self.unacked_index_key, {tag: now})
                    pipe.hset(self.unacked_key, tag, record)
                    pipe.execute()
                return
            except redis.RedisError as exc:
                log.warning(
                    "task %s: could not record the message it took (%s); holding it and "
                    "retrying in %.1fs",
                    task_id or "?",
                    type(exc).__name__,
                    pause_s,
                )
                time.sleep(pause_s)
                pause_s = min(pause_s * 2, _RECORD_MAX_PAUSE_S)

    def ack(self, delivery_tag: str) -> None:
        book = _installed
        lease = book.pop(delivery_tag) if book is not None else None
        if lease is None:
            super().ack(delivery_tag)
            return
        if not lease.valid():
            self._give_back(delivery_tag, lease)
            virtual.QoS.ack(self, delivery_tag)
            return
        try:
            qos = self._live_qos(book)
            with qos.channel.conn_or_acquire() as client:
                removed = client.register_script(_ACK)(
                    keys=[
                        lease_key(delivery_tag),
                        qos.unacked_index_key,
                        qos.unacked_key,
                        LEASED_KEY,
                    ],
                    args=[lease.owner, delivery_tag],
                )
            if not removed:
                log.info(
                    "task id=%s: lease lost before the ack; the message is another "
                    "worker's now and stays where it is",
                    lease.task_id,
                )
        except (redis.RedisError, OSError) as exc:
            # The slot is freed anyway; the message, still in `unacked`, comes back when the
            # lease lapses, and a stored result keeps it from running twice.
            log.warning("task id=%s: ack not recorded (%s)", lease.task_id, type(exc).__name__)
        virtual.QoS.ack(self, delivery_tag)

    def _live_qos(self, book: LeaseBook | None) -> LeasedQoS:
        """This channel's QoS, or, once the channel is closed (its connection was lost while
        the task ran, and Celery reconnected on a new one), a live channel's: the task's
        ack must still reach Redis."""
        if self.channel.connection is not None or book is None or book.live_channel is None:
            return self
        qos: LeasedQoS = book.live_channel().qos
        return qos

    def restore_unacked_once(self, stderr: Any = None) -> None:
        """Called when the channel closes (a lost connection included): kombu would put
        back every message this worker is still running, so a Redis blip or a failover
        ran each of them twice. A message under a valid lease needs no restore: its task
        finishes and acks it, or, should this worker die, the lease lapses and a live
        worker restores it. Cold stops hand running messages back themselves
        (worker/shutdown.py calls `restore_unacked`)."""
        book = _installed
        if book is not None:
            self._flush()
            for tag in list(self._delivered):
                lease = book.get(tag)
                if lease is not None and lease.valid():
                    del self._delivered[tag]
        super().restore_unacked_once(stderr)

    def _give_back(self, tag: str, lease: Lease) -> None:
        """The task gave its message up (handed back, or abandoned): Celery acks it anyway,
        so put it back on its queue instead of removing it.

        Removing it would lose it whenever the lease is still ours in Redis: a hand-back
        whose release Redis refused (restarting) before it accepted this ack, or renewals
        Redis applied but whose replies never came back.
        """
        try:
            task_id = self._live_qos(_installed).restore_by_tag(tag, leftmost=True)
        except (redis.RedisError, OSError, OperationalError) as exc:
            # No longer renewed: the lease lapses and a live worker's sweep restores it.
            log.warning("task id=%s: not handed back yet (%s)", lease.task_id, type(exc).__name__)
            return
        if task_id is not None:
            log.info("task id=%s: handed back to the front of its queue", task_id)

    def set_aside(self, delivery_tag: str) -> None:
        """Hand a message back without a word to Redis (it just failed): stop renewing its
        lease and free its slot here. It stays in `unacked` until the lease lapses; then a
        live worker's sweep puts it back on its queue. Restoring it at once would take it
        again at once, for as long as Redis fails."""
        book = _installed
        lease = book.pop(delivery_tag) if book is not None else None
        if lease is None:
            return  # no lease to lapse: left to kombu's visibility timeout
        lease.mark_lost()
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if requeue:
            self.restore_by_tag(delivery_tag, leftmost=True)
            virtual.QoS.ack(self, delivery_tag)
        else:
            self.ack(delivery_tag)

    def restore_visible(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().restore_visible(*args, **kwargs)
        except redis.ResponseError as exc:
            # Out of memory or a read-only replica: the next sweep tries again.
            log.warning("visibility timeout sweep skipped (%s)", exc)

    def restore_by_tag(self, tag: str, client: Any = None, leftmost: bool = False) -> str | None:
        """Put the message back on its queue, unless another worker holds its lease.

        Returns the task id of the message restored, or None if nothing was restored.
        """
        tag = bytes_to_str(tag)  # kombu's own sweep passes tags as read from Redis
        book = _installed
        owner = book.owner if book is not None else None
        key = lease_key(tag)
        restored: list[str] = []

        def restore_transaction(pipe: Any) -> None:
            restored.clear()
            holder = pipe.get(key)
            if holder is not None and bytes_to_str(holder) != owner:
                return  # a live worker runs it (possibly redelivered under the same tag)
            payload = pipe.hget(self.unacked_key, tag)
            pipe.multi()
            self._remove_from_indices(tag, pipe)
            pipe.delete(key)
            pipe.zrem(LEASED_KEY, tag)
            if payload:
                message, exchange, routing_key = loads(bytes_to_str(payload))
                headers = message.get("headers") if isinstance(message, dict) else None
                restored.append(str((headers or {}).get("id") or tag))
                self.channel._do_restore_message(message, exchange, routing_key, pipe, leftmost)

        with self.channel.conn_or_acquire(client) as conn:
            conn.transaction(restore_transaction, self.unacked_key, key)
        if book is not None:
            book.pop(tag)
        return restored[0] if restored else None
