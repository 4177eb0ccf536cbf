"""After a Sentinel failover, no connection of this process keeps talking to the old master.

A planned failover (`SENTINEL FAILOVER`) promotes the replica at once but leaves the old
master alive, and still a master, until the sentinels reconfigure it about 10 s later;
the demotion then discards whatever was written there. In that window a connection opened
before the failover stays on the old master while every new one reaches the new master,
so one process works against two masters at once. A worker took a message and recorded
its lease on the old master, found the lease missing on the new one (where its streams
and results go), abandoned the task and handed it back on the old master, and took it
again, several times within milliseconds, each take counted as a delivery.

The fence knows which addresses the sentinels replaced: `SentinelWatch.refresh` asks every
sentinel which master it follows and keeps the answer with the highest config epoch (a
sentinel that has not heard of the failover yet reports an older epoch, so one lagging
sentinel never moves the fence back; the sentinels agreeing on a master always do).
Connections made by `vision_queue.redis_connect` and the worker's kombu
channels check the fence before each command (`FencedConnection`): one whose server was
replaced drops its socket and reconnects through the sentinels, or, where a reconnect
under the caller is unsafe (kombu's event loop), raises a connection error, on which
kombu restarts its consumer. A process nobody refreshes (no watch: plain Redis, clients)
fences nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import redis

log = logging.getLogger("vision_queue.redis")

Address = tuple[str, int]
# A sentinel that failed to answer is asked again only by a thorough refresh (the lease
# keeper's, each beat), and not before this long: a dead sentinel must not add its connect
# timeout to every take.
_SKIP_FAILED_SENTINEL_S = 5.0


class MasterFence:
    """The master the newest sentinel configuration names, and the ones it replaced."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._epoch = -1
        self._current: Address | None = None
        self._replaced: frozenset[Address] = frozenset()
        self._watch: SentinelWatch | None = None

    def observe(self, address: Address, epoch: int, *, agreed: bool = False) -> bool:
        """Record the sentinels' newest answer; True when it names a new master.

        An answer with an older epoch than one seen is a sentinel that has not heard of a
        failover yet, and changes nothing, unless every sentinel that answered `agreed`
        on it: whatever the epochs say, the fence never refuses the master all the
        sentinels name (it would refuse Redis altogether).
        """
        with self._lock:
            if address == self._current:
                self._epoch = max(self._epoch, epoch)
                return False
            if epoch < self._epoch and not agreed:
                return False
            previous, self._current = self._current, address
            self._epoch = max(self._epoch, epoch) if agreed else epoch
            replaced = self._replaced if previous is None else self._replaced | {previous}
            self._replaced = replaced - {address}
            if previous is None:
                return False
        log.warning(
            "the sentinels replaced the Redis master %s:%d by %s:%d; "
            "connections to the old one are dropped",
            previous[0],
            previous[1],
            address[0],
            address[1],
        )
        return True

    def replaced(self, host: str | None, port: int | str | None) -> bool:
        """True when `host:port` is a master the sentinels replaced (cheap: a set lookup)."""
        if not self._replaced or host is None or port is None:
            return False
        return (str(host), int(port)) in self._replaced

    def reset(self) -> None:
        """Forget every answer and the watch (tests sharing one process)."""
        with self._lock:
            self._epoch, self._current, self._replaced = -1, None, frozenset()
            self._watch = None

    def watch(self, watch: SentinelWatch | None) -> None:
        """Who `refresh` asks (the worker sets one in sentinel mode)."""
        self._watch = watch

    def refresh(self, *, thorough: bool = False) -> bool:
        """Ask the sentinels now, if this process watches them; True on a failover.
        Only a `thorough` refresh asks the sentinels that failed lately."""
        watch = self._watch
        return watch.refresh(thorough=thorough) if watch is not None else False


FENCE = MasterFence()


class SentinelWatch:
    """Asks every sentinel which master it follows and tells the fence the newest answer."""

    def __init__(
        self, sentinels: Sequence[redis.Redis], master_name: str, fence: MasterFence = FENCE
    ) -> None:
        self.sentinels = list(sentinels)
        self.master_name = master_name
        self.fence = fence
        # When a sentinel that failed may be asked again (0.0: it answered last time).
        self._skip_until = [0.0] * len(self.sentinels)

    def refresh(self, *, thorough: bool = False) -> bool:
        # No lock held while asking: a dead sentinel's connect timeout in the keeper's
        # refresh must not hold up the consumer's. Two refreshes at once are harmless.
        answers: list[tuple[int, Address]] = []
        for index, sentinel in enumerate(self.sentinels):
            skip_until = self._skip_until[index]
            if skip_until and (not thorough or skip_until > time.monotonic()):
                continue
            try:
                state = sentinel.sentinel_master(self.master_name)
            except (redis.RedisError, OSError) as exc:
                self._skip_until[index] = time.monotonic() + _SKIP_FAILED_SENTINEL_S
                log.debug("sentinel %d did not answer (%s)", index, type(exc).__name__)
                continue
            self._skip_until[index] = 0.0
            answer = _master_of(state)
            if answer is not None:
                answers.append(answer)
        if not answers:
            return False
        epoch, address = max(answers)
        # Agreement of one sentinel among several is no agreement: it may lag.
        agreed = len(answers) >= min(2, len(self.sentinels)) and all(
            other == address for _, other in answers
        )
        return self.fence.observe(address, epoch, agreed=agreed)

    def close(self) -> None:
        for sentinel in self.sentinels:
            sentinel.close()


def _master_of(state: Any) -> tuple[int, Address] | None:
    """(config epoch, address) from a `SENTINEL MASTER` reply; None while it is unsure."""
    if not isinstance(state, dict) or not state.get("is_master"):
        return None
    if state.get("is_sdown") or state.get("is_odown"):
        return None
    # The failover's leader reports the new epoch with the old address until it switches.
    if "failover_in_progress" in str(state.get("flags", "")):
        return None
    try:
        return int(state["config-epoch"]), (str(state["ip"]), int(state["port"]))
    except (KeyError, TypeError, ValueError):
        return None


class FencedConnection:
    """Mixed into a redis-py connection class: never send a command to a replaced master.

    redis-py runs `check_health` before sending each command (pipelines and transactions
    included). A pooled connection reconnects there, through the sentinels, and the command
    goes to the new master; an event-loop connection (`reconnect_when_fenced = False`) has
    its socket registered with kombu's poller, so it raises instead and kombu restarts the
    consumer on a new connection.
    """

    reconnect_when_fenced = True
    host: str
    port: int

    def check_health(self) -> None:
        # The reconnect below sends commands itself (AUTH, ROLE): those are not checked.
        if (
            FENCE.replaced(self.host, self.port)
            and not getattr(self, "_fence_busy", False)
            and (FENCE.refresh() or FENCE.replaced(self.host, self.port))
        ):
            self.disconnect()  # type: ignore[attr-defined]
            if not self.reconnect_when_fenced:
                raise redis.ConnectionError("the sentinels replaced this Redis master")
            self._fence_busy = True
            try:
                self.connect()  # type: ignore[attr-defined]
            finally:
                self._fence_busy = False
            if FENCE.replaced(self.host, self.port):
                self.disconnect()  # type: ignore[attr-defined]
                raise redis.ConnectionError("the sentinels still name the replaced master")
        super().check_health()  # type: ignore[misc]


def fenced(connection_class: type[Any], *, reconnect: bool = True) -> type[Any]:
    """`connection_class` with the fence checked before each command."""
    if issubclass(connection_class, FencedConnection) and (
        connection_class.reconnect_when_fenced == reconnect
    ):
        return connection_class
    return type(
        f"Fenced{connection_class.__name__}",
        (FencedConnection, connection_class),
        {"reconnect_when_fenced": reconnect},
    )
