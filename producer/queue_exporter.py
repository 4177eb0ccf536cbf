"""`vq-exporter`: the queue's Prometheus metrics, read from Redis at every scrape.

Workers export what they do (worker/metrics.py), the gateway its requests, Flower its
task events; none of them is the place to say how many tasks wait, because workers come
and go and the gateway is optional. This small process is always on (compose service
`queue-exporter`, the Kubernetes Deployment `queue-exporter`) and only reads Redis: per
scrape a handful of commands, whatever the length of the queues.

    vq-exporter [--queue gpu ...] [--address 127.0.0.1] [--port 9150]

It reads REDIS_URL (and the rest of the Redis settings) and VQ_QUEUE like a client does.
The listener has no authentication; it defaults to loopback, and binding it elsewhere
(compose and Kubernetes do, for Prometheus) exposes queue lengths, worker names and Redis
memory, never task contents (ops/README.md, "Monitoring").

Every metric is documented with its unit in ops/README.md ("Metrics reference") and in
`HELP`; tests/ops/test_monitoring.py checks the alert rules and the dashboard against them.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import redis
from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from vision_queue.presence import presence_key
from vision_queue.protocol import (
    DEAD_LETTER_KEY,
    LEASE_KEY,
    LEASED_KEY,
    STATS_FIELDS,
    STATS_KEY,
    WEBHOOK_KEY,
    WEBHOOK_OUTBOX_KEY,
    Priority,
    priority_queue,
)
from vision_queue.redis_connect import redis_client
from vision_queue.settings import Settings, SettingsError

log = logging.getLogger("vision_queue.exporter")

DEFAULT_PORT = 9150
# Lease keys and webhook records read per MGET / pipeline, so a large fleet stays cheap.
_CHUNK = 500
# A worker whose lease has lapsed and whose message a live worker has not handed back yet.
LAPSED = "(lapsed)"


def message_submitted_at(raw: bytes | str | None) -> float | None:
    """The `submitted_at` (Unix time) of a kombu list entry holding one of our tasks.

    The request is the first positional argument of Celery's protocol-2 body, which
    kombu's Redis transport keeps base64-encoded (producer/envelope.py). None for
    anything else: a foreign or broken message counts as waiting but has no age.
    """
    if raw is None:
        return None
    try:
        entry = json.loads(raw)
        body = entry["body"]
        if entry.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        value = args[0]["submitted_at"]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class QueueCollector(Collector):
    """Reads Redis when Prometheus scrapes; yields nothing it could not read."""

    def __init__(self, client: redis.Redis, queues: Sequence[str]) -> None:
        self.client = client
        self.queues = list(queues)
        self._lock = threading.Lock()  # one scrape at a time reads Redis

    def collect(self) -> Iterator[Any]:
        with self._lock:
            up = GaugeMetricFamily(
                "vq_exporter_redis_up", "1 if the last scrape read Redis, else 0."
            )
            started = time.monotonic()
            try:
                families = list(self._read())
            except (redis.RedisError, OSError) as exc:
                log.warning("scrape failed: %s: %s", type(exc).__name__, exc)
                up.add_metric([], 0)
                yield up
                return
            up.add_metric([], 1)
            yield up
            yield from families
            took = GaugeMetricFamily(
                "vq_exporter_scrape_seconds", "Seconds the last scrape spent reading Redis."
            )
            took.add_metric([], time.monotonic() - started)
            yield took

    def _read(self) -> Iterator[Any]:
        now = time.time()
        yield from self._queues(now)
        yield from self._leases()
        yield from self._dead_letters()
        yield from self._webhooks()
        yield from self._stats()
        yield from self._memory()

    def _queues(self, now: float) -> Iterator[Any]:
        waiting = GaugeMetricFamily(
            "vq_queue_waiting_tasks",
            "Tasks waiting in the Redis list of one queue and priority (LLEN), in tasks.",
            labels=["queue", "priority"],
        )
        oldest = GaugeMetricFamily(
            "vq_queue_oldest_task_age_seconds",
            "Seconds since the oldest waiting task of one queue and priority was submitted "
            "(its request's submitted_at); 0 when none waits.",
            labels=["queue", "priority"],
        )
        live = GaugeMetricFamily(
            "vq_workers_live",
            "Workers whose presence heartbeat on the queue is current, in workers.",
            labels=["queue"],
        )
        pipe = self.client.pipeline(transaction=False)
        lists = [(q, p, priority_queue(q, p)) for q in self.queues for p in Priority]
        for _, _, name in lists:
            # LPUSH adds at the head and workers take from the tail, where restored
            # messages also go: the oldest is at one of the two ends.
            pipe.llen(name)
            pipe.lindex(name, -1)
            pipe.lindex(name, 0)
        for queue in self.queues:
            pipe.zcount(presence_key(queue), f"({now}", "+inf")
        replies = pipe.execute()
        for index, (queue, priority, _) in enumerate(lists):
            length, tail, head = replies[3 * index : 3 * index + 3]
            waiting.add_metric([queue, priority.value], int(length))
            times = [t for t in (message_submitted_at(tail), message_submitted_at(head)) if t]
            age = max(0.0, now - min(times)) if length and times else 0.0
            oldest.add_metric([queue, priority.value], age)
        for index, queue in enumerate(self.queues):
            live.add_metric([queue], int(replies[3 * len(lists) + index]))
        yield from (waiting, oldest, live)

    def _leases(self) -> Iterator[Any]:
        leased = GaugeMetricFamily(
            "vq_worker_leased_tasks",
            "Messages a worker has taken and holds a lease on (running, or prefetched "
            "waiting for a batch slot), in tasks; worker=\"(lapsed)\": lease expired, "
            "not handed back yet.",
            labels=["worker"],
        )
        tags = [_text(tag) for tag in self.client.zrange(LEASED_KEY, 0, -1)]
        owners: Counter[str] = Counter()
        for start in range(0, len(tags), _CHUNK):
            chunk = tags[start : start + _CHUNK]
            values = self.client.mget([LEASE_KEY.format(tag=tag) for tag in chunk])
            owners.update(_text(value) if value is not None else LAPSED for value in values)
        for worker, count in sorted(owners.items()):
            leased.add_metric([worker], count)
        yield leased

    def _dead_letters(self) -> Iterator[Any]:
        pipe = self.client.pipeline(transaction=False)
        pipe.llen(DEAD_LETTER_KEY)
        pipe.lindex(DEAD_LETTER_KEY, 0)
        count, newest = pipe.execute()
        entries = GaugeMetricFamily(
            "vq_dead_letters",
            "Entries in the dead-letter list (messages refused at a worker's door), in "
            "messages; capped at 1000, expires 7 days after the last.",
        )
        entries.add_metric([], int(count))
        yield entries
        at = GaugeMetricFamily(
            "vq_dead_letter_newest_timestamp_seconds",
            "Unix time of the newest dead letter; 0 when there is none.",
        )
        at.add_metric([], _entry_time(newest))
        yield at

    def _webhooks(self) -> Iterator[Any]:
        ids = [_text(task_id) for task_id in self.client.zrange(WEBHOOK_OUTBOX_KEY, 0, -1)]
        retrying = 0
        for start in range(0, len(ids), _CHUNK):
            pipe = self.client.pipeline(transaction=False)
            for task_id in ids[start : start + _CHUNK]:
                pipe.hget(WEBHOOK_KEY.format(task_id=task_id), "attempts")
            retrying += sum(1 for made in pipe.execute() if made and int(made) > 0)
        pending = GaugeMetricFamily(
            "vq_webhooks_pending",
            "Webhook deliveries in the outbox (not yet delivered or given up), in deliveries.",
        )
        pending.add_metric([], len(ids))
        failing = GaugeMetricFamily(
            "vq_webhooks_retrying",
            "Webhook deliveries in the outbox with at least one failed attempt, in deliveries.",
        )
        failing.add_metric([], retrying)
        yield from (pending, failing)

    def _stats(self) -> Iterator[Any]:
        values = self.client.hmget(STATS_KEY, list(STATS_FIELDS))
        for (field, help_text), value in zip(STATS_FIELDS.items(), values, strict=True):
            counter = CounterMetricFamily(f"vq_{field}", help_text)
            counter.add_metric([], int(value or 0))
            yield counter

    def _memory(self) -> Iterator[Any]:
        info = self.client.info("memory")
        used = GaugeMetricFamily("vq_redis_used_memory_bytes", "Redis used_memory, in bytes.")
        used.add_metric([], float(info.get("used_memory", 0)))
        limit = GaugeMetricFamily(
            "vq_redis_maxmemory_bytes", "Redis maxmemory, in bytes; 0 when unlimited."
        )
        limit.add_metric([], float(info.get("maxmemory", 0)))
        yield from (used, limit)


def _entry_time(raw: bytes | str | None) -> float:
    if raw is None:
        return 0.0
    try:
        at = json.loads(raw).get("at")
    except (ValueError, AttributeError):
        return 0.0
    return float(at) if isinstance(at, (int, float)) and not isinstance(at, bool) else 0.0


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vq-exporter",
        description="Prometheus exporter of the vision-queue queues, leases, dead letters "
        "and Redis memory (reads REDIS_URL and VQ_QUEUE).",
    )
    parser.add_argument(
        "--queue",
        action="append",
        help="queue name (its three priority lists); repeat for several (default VQ_QUEUE)",
    )
    parser.add_argument(
        "--address",
        default="127.0.0.1",
        help="listen address (default 127.0.0.1; the endpoint has no authentication)",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="listen port")
    return parser


def registry_for(client: redis.Redis, queues: Sequence[str]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueCollector(client, queues))
    return registry


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        settings = Settings.from_env(reader="client")
    except SettingsError as exc:
        print(f"vq-exporter: invalid settings: {exc}", file=sys.stderr)
        return 2
    queues = args.queue or [settings.queue]
    client = redis_client(settings, socket_connect_timeout=5, socket_timeout=10)
    # A SIGTERM (how supervisors stop it) or SIGINT closes the listener and ends with
    # status 0, instead of the process dying of the signal (status 143, read as a crash).
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    server, thread = start_http_server(
        args.port, addr=args.address, registry=registry_for(client, queues)
    )
    log.info("vq-exporter: queues %s, metrics on http://%s:%d/metrics",
             ", ".join(queues), args.address, args.port)
    stopping.wait()
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)
    client.close()
    log.info("vq-exporter: stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
