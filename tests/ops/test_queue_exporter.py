"""The queue exporter (producer/queue_exporter.py) as a real process against a real Redis.

Tasks are queued by the real client (no worker consumes them), leases, dead letters and
counters are written with the key names the workers use, and the exporter's /metrics is
scraped over loopback and parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from support.redis_server import RedisServer, free_port
from support.workers import base_env, terminate

from producer.client import Client
from producer.queue_exporter import message_submitted_at
from vision_queue.presence import announce
from vision_queue.protocol import (
    DEAD_LETTER_KEY,
    LEASE_KEY,
    LEASED_KEY,
    STATS_KEY,
    WEBHOOK_KEY,
    WEBHOOK_OUTBOX_KEY,
)
from vision_queue.settings import Settings

ROOT = Path(__file__).resolve().parents[2]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class ExporterProcess:
    def __init__(self, redis_url: str, logdir: Path) -> None:
        self.port = free_port()
        self.redis_url = redis_url
        self.log_path = logdir / "exporter.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30) -> ExporterProcess:
        env = base_env(self.redis_url, VQ_QUEUE="gpu")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "producer.queue_exporter", "--port", str(self.port),
                 "--queue", "gpu", "--queue", "cpu"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"exporter exited: {self.log_path.read_text()}")
            try:
                self.scrape_text()
                return self
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"exporter did not listen: {self.log_path.read_text()}")

    def scrape_text(self) -> str:
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    def scrape(self) -> Samples:
        samples: Samples = {}
        for family in text_string_to_metric_families(self.scrape_text()):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process, 5)


@pytest.fixture
def exporter(redis_url: str, tmp_path: Path) -> Iterator[ExporterProcess]:
    process = ExporterProcess(redis_url, tmp_path).start()
    try:
        yield process
    finally:
        process.stop()


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_message_age_is_read_from_the_request() -> None:
    body = base64.b64encode(json.dumps([[{"submitted_at": 1700000000.5}], {}, {}]).encode())
    entry = {"body": body.decode(), "properties": {"body_encoding": "base64"}}
    assert message_submitted_at(json.dumps(entry)) == 1700000000.5
    assert message_submitted_at(b"not json") is None
    assert message_submitted_at(json.dumps({"body": "e30=", "properties": {}})) is None
    assert message_submitted_at(None) is None


def test_exporter_reports_queues_leases_dead_letters_and_memory(
    redis_url: str, exporter: ExporterProcess, redis_server: RedisServer
) -> None:
    admin = redis.Redis.from_url(redis_url)
    empty = exporter.scrape()
    assert _value(empty, "vq_exporter_redis_up") == 1
    assert _value(empty, "vq_queue_waiting_tasks", queue="gpu", priority="high") == 0
    assert _value(empty, "vq_queue_oldest_task_age_seconds", queue="gpu", priority="low") == 0
    assert _value(empty, "vq_workers_live", queue="gpu") == 0
    assert _value(empty, "vq_redelivered_total") == 0

    settings = Settings.from_env({}, redis_url=redis_url, queue="gpu", connect_timeout_s=3.0)
    with Client(settings) as client:
        for _ in range(3):
            client.submit("ask", prompt="hello", priority="low")
        client.submit("ask", prompt="hello", priority="high")
    # The oldest low task was submitted a minute ago (its request says so).
    oldest = admin.lindex("gpu.low", -1)
    assert oldest is not None
    entry = json.loads(oldest)
    args = json.loads(base64.b64decode(entry["body"]))
    args[0][0]["submitted_at"] = time.time() - 60
    entry["body"] = base64.b64encode(json.dumps(args).encode()).decode()
    admin.lset("gpu.low", -1, json.dumps(entry))

    announce(admin, ["gpu"], "gpu0@host-a", ttl_s=30)
    announce(admin, ["gpu"], "gpu0@host-b", ttl_s=30)
    for tag, owner in (("t1", "gpu0@host-a"), ("t2", "gpu0@host-a"), ("t3", "gpu0@host-b")):
        admin.set(LEASE_KEY.format(tag=tag), owner, ex=30)
        admin.zadd(LEASED_KEY, {tag: time.time()})
    admin.zadd(LEASED_KEY, {"t4": time.time()})  # its lease lapsed
    admin.lpush(DEAD_LETTER_KEY, json.dumps({"at": 1700000000.25, "code": "body"}))
    admin.hincrby(STATS_KEY, "redelivered", 2)
    admin.hincrby(STATS_KEY, "webhooks_dropped", 1)
    admin.zadd(WEBHOOK_OUTBOX_KEY, {"a": 1, "b": 2})
    admin.hset(WEBHOOK_KEY.format(task_id="a"), mapping={"attempts": 2})
    admin.hset(WEBHOOK_KEY.format(task_id="b"), mapping={"attempts": 0})

    samples = exporter.scrape()
    assert _value(samples, "vq_queue_waiting_tasks", queue="gpu", priority="low") == 3
    assert _value(samples, "vq_queue_waiting_tasks", queue="gpu", priority="high") == 1
    assert _value(samples, "vq_queue_waiting_tasks", queue="gpu", priority="normal") == 0
    assert _value(samples, "vq_queue_waiting_tasks", queue="cpu", priority="normal") == 0
    age = _value(samples, "vq_queue_oldest_task_age_seconds", queue="gpu", priority="low")
    assert 59 <= age < 3600
    assert _value(samples, "vq_queue_oldest_task_age_seconds", queue="gpu", priority="high") < 60
    assert _value(samples, "vq_workers_live", queue="gpu") == 2
    assert _value(samples, "vq_workers_live", queue="cpu") == 0
    assert _value(samples, "vq_worker_leased_tasks", worker="gpu0@host-a") == 2
    assert _value(samples, "vq_worker_leased_tasks", worker="gpu0@host-b") == 1
    assert _value(samples, "vq_worker_leased_tasks", worker="(lapsed)") == 1
    assert _value(samples, "vq_dead_letters") == 1
    assert _value(samples, "vq_dead_letter_newest_timestamp_seconds") == 1700000000.25
    assert _value(samples, "vq_redelivered_total") == 2
    assert _value(samples, "vq_webhooks_dropped_total") == 1
    assert _value(samples, "vq_webhooks_delivered_total") == 0
    assert _value(samples, "vq_webhooks_pending") == 2
    assert _value(samples, "vq_webhooks_retrying") == 1
    assert _value(samples, "vq_redis_used_memory_bytes") > 0
    assert _value(samples, "vq_redis_maxmemory_bytes") >= 0


def test_exporter_says_when_redis_is_gone(
    redis_url: str, exporter: ExporterProcess, redis_server: RedisServer
) -> None:
    redis_server.stop()
    try:
        samples = exporter.scrape()
        assert _value(samples, "vq_exporter_redis_up") == 0
        assert not any(name == "vq_queue_waiting_tasks" for name, _ in samples)
    finally:
        redis_server.start()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_ends_the_exporter_with_status_0(
    exporter: ExporterProcess, signum: int
) -> None:
    # Given an exporter serving scrapes
    assert "vq_exporter_redis_up 1.0" in exporter.scrape_text()
    assert exporter.process is not None
    # When a supervisor stops it
    exporter.process.send_signal(signum)
    # Then it closes its listener and exits 0, not killed by the signal (143 or 130)
    assert exporter.process.wait(timeout=30) == 0, exporter.log_path.read_text()
    assert "vq-exporter: stopped" in exporter.log_path.read_text()
