"""A traced worker (OTEL_EXPORTER_OTLP_ENDPOINT set) runs a task inside the trace its
message's `traceparent` header names: real redis-server, real `worker run`, a loopback
OTLP collector. The producer's side writes the header as a traced client will
(docs/tracing.md); the door lets it through."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import redis
from support.messages import envelope, headers, push, valid_body
from support.otlp import OtlpCollector
from support.workers import WorkerProcess

from producer.client import Client
from vision_queue.protocol import SUBMITTED_KEY
from vision_queue.settings import Settings

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
STAGES = {"vq.queue_wait", "vq.fetch", "vq.preprocess", "vq.prefill", "vq.decode", "vq.store"}


def test_a_task_joins_the_trace_its_message_carries(redis_url: str, tmp_path: Path) -> None:
    pytest.importorskip("opentelemetry.instrumentation.celery", reason="no otel extra")
    with OtlpCollector() as collector:
        worker = WorkerProcess(
            redis_url, tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT=collector.url,
            OTEL_BSP_SCHEDULE_DELAY="200",  # export within 0.2 s, not 5 s
        )
        with worker:
            task_id = str(uuid.uuid4())
            traced = {**headers(task_id), "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
            admin = redis.Redis.from_url(redis_url)
            admin.set(SUBMITTED_KEY.format(task_id=task_id), "ask", ex=600)  # as a client does
            push(admin, envelope(valid_body(), traced))
            settings = Settings.from_env({}, redis_url=redis_url, connect_timeout_s=3.0)
            with Client(settings) as client:
                result = client.result(task_id, wait=True, timeout=120)
            assert result["state"] == "SUCCESS", result
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                spans, services = collector.spans()
                runs = [s for s in spans if s.name.startswith("run/vision_queue.ask")]
                if runs and {s.name for s in spans} >= STAGES:
                    break
                time.sleep(0.2)
    assert runs, [s.name for s in spans]
    (run,) = runs
    assert run.trace_id.hex() == TRACE_ID and run.parent_span_id.hex() == PARENT_ID
    # The time in Redis, from the request's submitted_at, under the task's span.
    (wait,) = [s for s in spans if s.name == "vq.queue_wait"]
    assert wait.parent_span_id == run.span_id
    assert run.start_time_unix_nano - 10**9 <= wait.end_time_unix_nano
    assert wait.start_time_unix_nano <= wait.end_time_unix_nano
    # Each stage of the request path is a child of the task's span, in order.
    stages = {s.name: s for s in spans if s.name in STAGES}
    assert set(stages) == STAGES
    assert all(s.parent_span_id == run.span_id for s in stages.values())
    order = ["vq.fetch", "vq.preprocess", "vq.prefill", "vq.decode", "vq.store"]
    ends = [stages[name].end_time_unix_nano for name in order]
    assert ends == sorted(ends)
    assert services == {"vq-worker"}
    # Broker polls and heartbeats outside a trace export nothing; what is exported
    # belongs to the task's trace.
    assert {span.trace_id.hex() for span in spans} == {TRACE_ID}
