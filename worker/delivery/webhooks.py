"""Webhooks: when a task that named a `callback_url` ends, its worker POSTs the result there.

The body is the result JSON (the same object `Client.result` returns, `state` included).
It is signed so the receiver can tell it came from this deployment and is fresh:

    X-VQ-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(VQ_WEBHOOK_SECRET, "<t>." + body)>

(docs/security.md has the receiver's check). Delivery never holds up generation: the task
hands the result to a small pool of background threads and returns. A delivery is tried up
to VQ_WEBHOOK_MAX_ATTEMPTS times, waiting VQ_WEBHOOK_BACKOFF_S, then twice as long each
time, while the receiver answers 408, 429, 5xx or cannot be reached; a 2xx ends it, any
other answer (a redirect included: webhooks do not follow them) drops it at once.

The target is attacker-chosen like an image URL, so the same guard applies, shared with
image fetches (`worker.outbound_http`): `check_url` before connecting, every resolved
address public (unless the host is in VQ_WEBHOOK_ALLOWED_PRIVATE_HOSTS), the socket pinned
to the checked address, one deadline (VQ_WEBHOOK_TIMEOUT_S) per attempt enforced by a
watchdog.

Every delivery is kept in Redis until it ends (`worker.delivery.webhook_outbox`), so one whose
worker stops or dies (between attempts, or before the first) is taken over by another
worker's sender: delivery is at least once, bounded by VQ_WEBHOOK_MAX_ATTEMPTS in all.

Traced (docs/tracing.md): the task's trace context is kept with the delivery, so each
attempt is a `vq.webhook` client span in the task's trace, whichever sender makes it.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from vision_queue import tracing
from vision_queue.addresses import ParsedUrl, check_url
from vision_queue.errors import VisionQueueError
from vision_queue.schemas import check_callback_url
from vision_queue.settings import Settings
from worker.delivery.webhook_outbox import Delivery, WebhookOutbox
from worker.outbound_http import (
    Deadline,
    Resolver,
    default_ssl_context,
    pinned_connection,
    resolve_checked,
)

log = logging.getLogger("vision_queue.webhook")

SIGNATURE_HEADER = "X-VQ-Signature"
TASK_ID_HEADER = "X-VQ-Task-Id"
ATTEMPT_HEADER = "X-VQ-Attempt"
_RETRY_STATUSES = frozenset({408, 429})
_MAX_PENDING = 1000
# A delivery recorded or taken over is held this long until its first attempt here.
_QUEUED_HOLD_S = 30.0
# Beyond an attempt's deadline and the backoff after it, before another sender may take over.
_HOLD_MARGIN_S = 5.0
_CLAIM_AT_ONCE = 100
_SENDER_THREADS = 4
_LONGEST_BACKOFF_S = 300.0
# Outcomes of a run that did not end the task (it runs again, or another worker's run
# did or will), so this run sends nothing.
_NOT_ENDED = frozenset({"retry", "requeued", "abandoned", "duplicate"})


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value for `body` sent at `timestamp`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def notify_task_end(
    sender: WebhookSender, args: tuple[Any, ...], result: dict[str, Any], outcome: str
) -> None:
    """Called once at the end of every run, after its result is stored; queues a webhook if
    the task asked for one.

    Never raises: it runs in the task's `finally`, where an error would replace the outcome.
    """
    try:
        _queue_webhook(sender, args, result, outcome)
    except Exception:
        log.exception("webhook task=%s not queued", result.get("id", ""))


def _queue_webhook(
    sender: WebhookSender, args: tuple[Any, ...], result: dict[str, Any], outcome: str
) -> None:
    settings = sender.settings
    if outcome in _NOT_ENDED or len(args) != 1 or not isinstance(args[0], dict):
        return
    url = args[0].get("callback_url")
    if url is None:
        return
    task_id = str(result.get("id", ""))
    if not settings.webhook_secret:
        log.warning("webhook task=%s skipped: VQ_WEBHOOK_SECRET is not set", task_id)
        return
    try:
        check_callback_url(url, settings.webhook_host_allowlist)
    except VisionQueueError as exc:
        log.warning("webhook task=%s refused: %s", task_id, exc.message)
        return
    state = "SUCCESS" if outcome == "success" else "FAILURE"
    body = json.dumps({**result, "state": state}, ensure_ascii=False, separators=(",", ":"))
    headers = tracing.trace_headers()  # the task's span is current here
    trace = json.dumps(headers, separators=(",", ":")) if headers else ""
    sender.submit(Delivery(url, task_id, body.encode(), trace=trace))


class WebhookSender:
    """A bounded queue drained by a few daemon threads; `submit` never blocks.

    With an outbox (always, in a worker), every delivery is recorded in Redis first and
    held there while this sender works on it; a poller takes over deliveries other
    senders held and gave up (their worker died).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        outbox: WebhookOutbox | None = None,
        poll_s: float = 2.0,
        resolve: Resolver = socket.getaddrinfo,
        ssl_context: ssl.SSLContext | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.outbox = outbox
        self._poll_s = poll_s
        self._resolve = resolve
        self._ssl_context = ssl_context
        self._sleep = sleep
        self._closed = threading.Event()
        self._pending: queue.Queue[Delivery] = queue.Queue(maxsize=_MAX_PENDING)
        for number in range(_SENDER_THREADS):
            threading.Thread(target=self._drain, name=f"vq-webhook-{number}", daemon=True).start()
        if outbox is not None:
            threading.Thread(target=self._take_over, name="vq-webhook-outbox", daemon=True).start()

    def close(self) -> None:
        """Stop taking over other senders' deliveries (those in memory are kept in Redis)."""
        self._closed.set()

    def submit(self, delivery: Delivery) -> None:
        recorded = False
        if self.outbox is not None:
            try:
                if not self.outbox.record(delivery, _QUEUED_HOLD_S):
                    log.info("webhook task=%s already recorded: not sent again", delivery.task_id)
                    return
                recorded = True
            except (redis.RedisError, OSError) as exc:
                log.warning(
                    "webhook task=%s not recorded (%s): sent from memory only",
                    delivery.task_id,
                    type(exc).__name__,
                )
        try:
            self._pending.put_nowait(delivery)
        except queue.Full:
            if recorded:
                log.info(
                    "webhook task=%s left in the outbox: %d waiting here",
                    delivery.task_id,
                    _MAX_PENDING,
                )
            else:
                log.warning(
                    "webhook task=%s dropped: %d already waiting", delivery.task_id, _MAX_PENDING
                )

    def deliver(self, delivery: Delivery) -> bool:
        """Try until delivered or hopeless; True once the receiver answered 2xx."""
        settings = self.settings
        try:
            hop = check_url(delivery.url, settings.webhook_host_allowlist)
        except VisionQueueError as exc:  # checked at submit; a changed allow-list since
            log.warning("webhook task=%s refused: %s", delivery.task_id, exc.message)
            self._finish(delivery.task_id, delivered=False)
            return False
        status: int | str = "none"
        attempt = delivery.attempts_made
        trace = tracing.context_from_headers(json.loads(delivery.trace or "{}"))
        for attempt in range(delivery.attempts_made + 1, settings.webhook_max_attempts + 1):
            self._hold(delivery.task_id, attempt)
            # The host, never the URL: its path or query may carry a token.
            about = {"vq.webhook.attempt": attempt, "server.address": hop.host}
            with tracing.span("vq.webhook", about, kind="client", context=trace) as span:
                status, retry = self._attempt(hop, delivery, attempt)
                if span is not None:
                    span.set_attribute("vq.webhook.outcome", str(status))
            if status == "delivered" or not retry:
                break
            if attempt < settings.webhook_max_attempts:
                self._sleep(self._backoff_s(attempt))
        delivered = status == "delivered"
        self._finish(delivery.task_id, delivered=delivered)
        log.info(
            "webhook task=%s url=%s outcome=%s attempts=%d last=%s",
            delivery.task_id,
            hop.redacted,
            "delivered" if delivered else "dropped",
            attempt,
            status,
        )
        return delivered

    def _backoff_s(self, attempt: int) -> float:
        """The wait after attempt number `attempt` failed."""
        return float(min(self.settings.webhook_backoff_s * 2 ** (attempt - 1), _LONGEST_BACKOFF_S))

    def _hold(self, task_id: str, attempt: int) -> None:
        """Before attempt `attempt` (counted as made, so a crash loop stays bounded): hold
        the delivery through the attempt and the wait after it."""
        if self.outbox is None:
            return
        hold_s = self.settings.webhook_timeout_s + self._backoff_s(attempt) + _HOLD_MARGIN_S
        try:
            self.outbox.hold(task_id, attempt, hold_s)
        except (redis.RedisError, OSError) as exc:
            log.warning("webhook task=%s hold not renewed (%s)", task_id, type(exc).__name__)

    def _finish(self, task_id: str, *, delivered: bool) -> None:
        if self.outbox is None:
            return
        try:
            self.outbox.finish(task_id, delivered)
        except (redis.RedisError, OSError) as exc:
            # It falls due again, and its next sender finds it out of attempts or sends it
            # once more (at least once).
            log.warning("webhook task=%s not cleared (%s)", task_id, type(exc).__name__)

    def _drain(self) -> None:
        while True:
            delivery = self._pending.get()
            try:
                self.deliver(delivery)
            except Exception:  # a sender thread must outlive any one delivery
                log.exception("webhook task=%s crashed", delivery.task_id)

    def _take_over(self) -> None:
        assert self.outbox is not None
        while not self._closed.wait(self._poll_s):
            room = _MAX_PENDING - self._pending.qsize()
            if room <= 0:
                continue
            try:
                claimed = self.outbox.claim_due(min(room, _CLAIM_AT_ONCE), _QUEUED_HOLD_S)
            except (redis.RedisError, OSError):
                continue  # Redis is down: the next poll tries again
            for delivery in claimed:
                log.info(
                    "webhook task=%s taken over after %d attempt(s) elsewhere",
                    delivery.task_id,
                    delivery.attempts_made,
                )
                self._pending.put(delivery)

    def _attempt(self, hop: ParsedUrl, delivery: Delivery, attempt: int) -> tuple[int | str, bool]:
        """("delivered", False), (HTTP status or error name, whether to try again)."""
        clock = Deadline(self.settings.webhook_timeout_s)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "vision-queue-worker/0.1",
            "Connection": "close",
            TASK_ID_HEADER: delivery.task_id,
            ATTEMPT_HEADER: str(attempt),
            SIGNATURE_HEADER: sign(self.settings.webhook_secret, int(time.time()), delivery.body),
        }
        try:
            addresses = resolve_checked(hop, self._resolve, clock)
        except VisionQueueError as exc:
            return type(exc).__name__, exc.transient
        context = self._ssl_context or default_ssl_context()
        with pinned_connection(hop, addresses, clock, context) as conn:
            try:
                conn.request("POST", hop.target, body=delivery.body, headers=headers)
                response = conn.getresponse()
                response.read(64 * 1024)  # the answer is not used; never read an endless one
                status = response.status
            except ssl.SSLCertVerificationError:
                return "tls_verification_failed", False
            except (OSError, http.client.HTTPException, VisionQueueError) as exc:
                return type(exc).__name__, True
        if 200 <= status < 300:
            return "delivered", False
        return status, status >= 500 or status in _RETRY_STATUSES
