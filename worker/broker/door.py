"""The consumer's door: every task message is checked before Celery sees it.

`Door.admit` runs the rules of worker/broker/intake.py on each message the consumer
(worker/broker/consumer.py) takes; the remote-control mailbox (worker/broker/remote_control.py)
reads the door's settings and counts its refusals in the door's metrics. Both import this
module, and it imports neither, so the dependencies run one way.

A refused message is dead-lettered, acknowledged (so it is never delivered again, to this
worker or any other), logged in one line without payload, counted in
`vq_messages_refused_total`, and, when its id is readable, answered with `invalid_input`.
Redis failing during that bookkeeping never stops the consumer: the message is then handed
back without Redis (`LeasedQoS.set_aside`): its lease is no longer renewed, so a live
worker's sweep puts it back on its queue once the lease lapses (VQ_LEASE_TTL_S), to be
refused again, and dead-lettered once Redis takes the write. Left unacknowledged under its
lease, as before, it stayed in `unacked` for as long as the worker lived (its lease renewed
every beat) and held the consumer's only prefetch slot: the worker took nothing more.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from kombu.exceptions import OperationalError

from vision_queue.settings import Settings
from worker.broker.dead_letters import dead_letter_entry, push_dead_letter, store_refusal_failure
from worker.broker.intake import ETA_SLACK_S, Refusal, check_message, sanitize_brpop_reply
from worker.broker.leases import LeasedQoS

if TYPE_CHECKING:
    from worker.health import HealthReporter
    from worker.metrics import WorkerMetrics

log = logging.getLogger("vision_queue.worker")


@dataclass
class Door:
    """Everything the consumer's door needs, built once by the runner."""

    settings: Settings
    worker: str
    redis: redis.Redis
    backend: Any  # the app's Celery result backend
    metrics: WorkerMetrics
    health: HealthReporter

    def admit(self, message: Any) -> bool:
        """True when the message may go on to Celery; otherwise it has been refused."""
        try:
            refusal = check_message(
                message.content_type,
                message.content_encoding,
                message.headers,
                message.body,
                now=time.time(),
                eta_horizon_s=self.settings.retry_backoff_max_s + ETA_SLACK_S,
            )
        except Exception as exc:  # a rule tripping over input: refuse, never crash
            refusal = Refusal("internal", f"checking the message failed ({type(exc).__name__})")
        if refusal is None:
            return True
        self.refuse(message, refusal)
        return False

    def refuse(self, message: Any, refusal: Refusal) -> None:
        queue = _queue_of(message)
        log.warning(
            "refused message id=%s task=%s queue=%s code=%s: %s",
            refusal.task_id or "-",
            refusal.task or "-",
            queue,
            refusal.code,
            refusal.reason,
        )
        self.metrics.refused.labels(refusal.code).inc()
        try:
            push_dead_letter(
                self.redis,
                dead_letter_entry(
                    refusal,
                    worker=self.worker,
                    queue=queue,
                    content_type=message.content_type,
                    content_encoding=message.content_encoding,
                    headers=message.headers,
                    body=message.body,
                ),
            )
            store_refusal_failure(self.backend, refusal, self.worker)
        except (redis.RedisError, OperationalError, OSError) as exc:
            log.warning(
                "could not dead-letter a refused message (%s); it returns to its queue once "
                "its lease lapses",
                type(exc).__name__,
            )
            _set_aside(message)
            return
        _ack(message)

    def on_consumer_started(self, consumer: Any) -> None:
        self.health.consumer_started()
        client = consumer.task_consumer.channel.client
        default = client.response_callbacks.get("BRPOP")

        def brpop(response: Any, **options: Any) -> Any:
            reply = default(response, **options) if default is not None else response
            return sanitize_brpop_reply(reply)

        client.set_response_callback("BRPOP", brpop)


def _queue_of(message: Any) -> str:
    info = message.delivery_info if isinstance(message.delivery_info, dict) else {}
    queue = info.get("routing_key")
    return queue[:64] if isinstance(queue, str) and queue else "-"


def _set_aside(message: Any) -> None:
    qos = getattr(getattr(message, "channel", None), "qos", None)
    if isinstance(qos, LeasedQoS):
        qos.set_aside(message.delivery_tag)
    # Without a lease (another transport) it stays unacknowledged until the visibility timeout.


def _ack(message: Any) -> None:
    try:
        message.ack()
    except Exception as exc:  # already acknowledged, or the channel went away
        log.warning("could not acknowledge a refused message (%s)", type(exc).__name__)
