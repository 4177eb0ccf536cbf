"""The heartbeat of leases (`worker.broker.leases`): renew ours, announce presence, restore lapsed.

One thread per worker. Each beat it renews every lease the worker holds (GET + PEXPIRE in
one Lua call, which Redis allows even when it is out of memory), marks lost the leases a
renewal finds gone or someone else's, announces the worker on `vq:presence:<queue>`, and,
if it wins the `vq:lease-sweep` lock, restores the messages whose lease lapsed while they
were still in `unacked` to the front of their queue. Its kombu connection also serves acks
of messages whose own channel closed (`LeaseBook.live_channel`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from kombu.utils.encoding import bytes_to_str

from vision_queue.master_fence import FENCE
from vision_queue.presence import announce, withdraw
from vision_queue.protocol import LEASE_SWEEP_LOCK_KEY, LEASED_KEY, STATS_KEY
from worker.broker.leases import Lease, LeaseBook, lease_key

log = logging.getLogger("vision_queue.worker")

# KEYS: lease keys. ARGV: owner, ttl ms. Returns 1 (renewed) or 0 (lost) per key.
_RENEW = """
local held = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
    held[i] = 1
  else
    held[i] = 0
  end
end
return held
"""
# KEYS: lease. ARGV: owner.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
_UNLOCK = _RELEASE


class LeaseKeeper:
    """The heartbeat of leases: renew ours, announce presence, hand back lapsed ones."""

    def __init__(
        self,
        book: LeaseBook,
        client: redis.Redis,
        queues: list[str],
        interval_s: float,
        connect: Callable[[], Any],
    ) -> None:
        self.book = book
        self.client = client
        self.queues = queues
        self.interval_s = interval_s
        self._connect = connect  # a kombu Connection on LeasedTransport, for restores
        self._connection: Any = None
        self._connection_lock = threading.Lock()  # the keeper's thread and acks share it
        book.live_channel = self._channel_for_restore
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
        self._renew = client.register_script(_RENEW)
        self._unlock = client.register_script(_UNLOCK)
        self._release = client.register_script(_RELEASE)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s * 3)
        self._drop_connection()
        try:
            withdraw(self.client, self.queues, self.book.owner)
        except (redis.RedisError, OSError) as exc:
            log.warning("could not withdraw from the queues' presence (%s)", exc)

    def release(self, lease: Lease) -> None:
        """Give a lease up now (the task is handed back): the next sweep restores it."""
        lease.mark_lost()
        try:
            self._release(keys=[lease_key(lease.tag)], args=[lease.owner])
        except (redis.RedisError, OSError) as exc:
            log.warning("task id=%s: lease not released (%s)", lease.task_id, exc)

    def _run(self) -> None:
        failing: set[str] = set()  # steps that failed last time: logged once per outage
        while not self._stop.wait(self.interval_s):
            for step in (self.watch_master, self.renew, self.announce, self.sweep):
                name = step.__name__
                try:
                    step()
                except (redis.RedisError, OSError) as exc:
                    if name not in failing:
                        log.warning("lease keeper: %s failed (%s); retrying each beat", name, exc)
                    failing.add(name)
                    continue
                except Exception:  # the keeper must outlive any single failure
                    log.exception("lease keeper: %s crashed", name)
                    continue
                if name in failing:
                    failing.discard(name)
                    log.info("lease keeper: %s works again", name)

    def watch_master(self) -> None:
        """Through Sentinel, learn of a failover within a beat (vision_queue/master_fence.py):
        renewals, acks and the consumer then leave the replaced master."""
        FENCE.refresh(thorough=True)

    def renew(self) -> None:
        # A lease given up stays given up, even if Redis refused to release it.
        leases = [lease for lease in self.book.held() if not lease.lost()]
        if not leases:
            return
        sent_at = time.monotonic()
        held = self._renew(
            keys=[lease_key(lease.tag) for lease in leases],
            args=[self.book.owner, int(self.book.ttl_s * 1000)],
        )
        for lease, still in zip(leases, held, strict=True):
            if still:
                lease.renewed_at = max(lease.renewed_at, sent_at)
            elif self.book.get(lease.tag) is lease:  # not acked meanwhile
                if lease.valid():
                    log.warning("task id=%s: lease lost; abandoning the task", lease.task_id)
                lease.mark_lost()

    def announce(self) -> None:
        announce(self.client, self.queues, self.book.owner, self.book.ttl_s)

    def sweep(self) -> int:
        """Restore messages whose lease lapsed; one worker at a time. Returns how many."""
        lock_ms = int(self.interval_s * 3000)
        if not self.client.set(LEASE_SWEEP_LOCK_KEY, self.book.owner, nx=True, px=lock_ms):
            return 0
        try:
            return self._sweep()
        except Exception:
            self._drop_connection()
            raise
        finally:
            self._unlock(keys=[LEASE_SWEEP_LOCK_KEY], args=[self.book.owner])

    def _sweep(self) -> int:
        tags = [bytes_to_str(tag) for tag in self.client.zrange(LEASED_KEY, 0, -1)]
        if not tags:
            return 0
        channel = self._channel_for_restore()
        pipe = self.client.pipeline(transaction=False)
        for tag in tags:
            pipe.exists(lease_key(tag))
            pipe.hexists(channel.unacked_key, tag)
        replies = pipe.execute()
        restored = 0
        for index, tag in enumerate(tags):
            has_lease, unacked = replies[2 * index], replies[2 * index + 1]
            if has_lease:
                continue
            if not unacked:
                self.client.zrem(LEASED_KEY, tag)  # acknowledged or restored already
                continue
            task_id = channel.qos.restore_by_tag(tag, leftmost=False)
            if task_id is not None:
                restored += 1
                log.warning(
                    "task id=%s: its worker's lease lapsed (dead or frozen); handed back "
                    "to the queue",
                    task_id,
                )
        if restored:
            # The fleet's redelivery count (vq:stats; producer/queue_exporter exports it).
            self.client.hincrby(STATS_KEY, "redelivered", restored)
        return restored

    def _channel_for_restore(self) -> Any:
        with self._connection_lock:
            if self._connection is None:
                self._connection = self._connect()
            # One attempt per URL (each sentinel of a `;` list), no pause: kombu would
            # otherwise retry for seconds inside an ack (a worker stopping while Redis is
            # unreachable waited that long). Failing here loses nothing: the message stays
            # in `unacked` and comes back once its lease lapses.
            attempts = max(1, len(getattr(self._connection, "alt", None) or ()))
            try:
                self._connection.ensure_connection(max_retries=attempts - 1)
            except Exception:
                self._drop_connection_locked()
                raise
            return self._connection.default_channel

    def _drop_connection(self) -> None:
        with self._connection_lock:
            self._drop_connection_locked()

    def _drop_connection_locked(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.release()
            except Exception as exc:  # a broken connection may fail to close: forget it
                log.debug("restore connection not closed cleanly: %s", exc)
