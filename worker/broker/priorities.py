"""Which priority's list a worker takes its next task from.

Each priority has its own Redis list (`vision_queue.protocol.priority_queues`: `<queue>.high`,
`<queue>`, `<queue>.low`). kombu's Redis transport takes a channel's next message with one
BRPOP over every list the channel consumes, and Redis answers from the first non-empty
key in the order given, so the order of the keys is the whole policy. kombu asks the
channel's queue cycle for that order before each BRPOP (`consume`) and tells it which list
delivered (`rotate`). Its default cycle, round robin, moves the list that just delivered
to the end: a fair share between the lists, not an order. `PriorityOrder` replaces it
(the worker's channel, worker/broker/transport.py, installs it).

The rule, per worker channel (K = VQ_PRIORITY_MAX_SKIPS):

* the lists are tried highest first, so a waiting high task is taken before normal ones
  and those before low ones;
* each list counts the tasks taken from higher lists since its last turn; a take is its
  turn when the list served it, or was tried before the list that did (it was empty, so
  nothing of it waited);
* a list whose count has reached K is tried before the others on the next take (when both
  lower lists are due, normal then low: the next take serves the higher of them that
  holds a task, and the other stays due for the take after).

So a task waits at most K + 1 takes from other lists before its list's turn comes: low
tasks are never starved, nor normal ones under floods of both, and a high task waits for
at most two turns of the lower lists. tests/worker/broker/test_priorities.py checks the bound.

Nothing here changes how many messages a slot holds: one BRPOP still takes one message,
issued only when the slot is free (prefetch 1, late acks).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

# Transport options (`broker_transport_options`) that turn `PriorityOrder` on: the rank of
# each list (0 = highest) and K.
RANKS_OPTION = "vq_priority_ranks"
MAX_SKIPS_OPTION = "vq_priority_max_skips"

log = logging.getLogger("vision_queue.worker")


class PriorityOrder:
    """A kombu queue cycle (`update`, `consume`, `rotate`) that keeps priorities in order,
    with the share above for the lower lists."""

    def __init__(self, ranks: Mapping[str, int], max_skips: int) -> None:
        if max_skips < 1:
            raise ValueError("max_skips must be at least 1")
        self.ranks = dict(ranks)
        self.max_skips = max_skips
        self.items: list[str] = []
        self.skipped: dict[str, int] = {}
        self._order: list[str] = []  # the last BRPOP's keys, in order

    def rank(self, queue: str) -> int:
        # A list outside the three (none is consumed today) ranks below them all.
        return self.ranks.get(queue, len(self.ranks))

    def update(self, queues: Iterable[str]) -> None:
        """The lists the channel consumes now (kombu calls it on every consume/cancel)."""
        self.items = sorted(queues, key=self.rank)
        self.skipped = {queue: self.skipped.get(queue, 0) for queue in self.items}

    def consume(self, n: int) -> list[str]:
        """The order of the next BRPOP's keys."""
        order = self.items[:n]
        due = [queue for queue in order if self.skipped[queue] >= self.max_skips]
        if due:
            # Every due list ahead: one that turns out empty costs the others nothing.
            order = [*due, *(queue for queue in order if queue not in due)]
        self._order = order
        return order

    def rotate(self, last_used: str) -> None:
        """`last_used` delivered the message the last BRPOP took."""
        # kombu calls this between popping the message and delivering it: an exception
        # here would lose the message, so a fault only costs the counts.
        try:
            self._count(last_used)
        except Exception:
            log.exception("priority counts reset after a fault")
            self.skipped = dict.fromkeys(self.items, 0)

    def _count(self, last_used: str) -> None:
        rank = self.rank(last_used)
        order = self._order if last_used in self._order else [last_used]
        tried = order[: order.index(last_used) + 1]  # all empty but the last, which served
        for queue in self.items:
            if queue in tried:
                self.skipped[queue] = 0
            elif self.rank(queue) > rank:
                self.skipped[queue] += 1
