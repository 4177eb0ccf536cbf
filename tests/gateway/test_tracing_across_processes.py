"""One request, one trace: with OTEL_EXPORTER_OTLP_ENDPOINT set on the gateway, a client
and the worker, the spans of a task's whole way (HTTP handling, submit, the queue wait,
fetch, preprocess, prefill, decode, store, its webhook's attempts) share one trace id,
each under its parent.
Real processes: redis-server, `producer serve`, `worker run`, a loopback OTLP collector."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_support import API_KEY, STACK_ENV, GatewayProcess
from support.otlp import OtlpCollector
from support.webhook_receiver import WebhookReceiver
from support.workers import WorkerProcess, base_env

pytest.importorskip("opentelemetry.instrumentation.fastapi", reason="no otel extra")

ROOT = Path(__file__).resolve().parents[2]
WORKER_STAGES = {
    "vq.queue_wait", "vq.fetch", "vq.preprocess", "vq.prefill", "vq.decode", "vq.store"
}
TRACED = {"OTEL_BSP_SCHEDULE_DELAY": "200"}  # export within 0.2 s, not 5 s


@pytest.fixture
def collector() -> Iterator[OtlpCollector]:
    with OtlpCollector() as running:
        yield running


@pytest.fixture
def traced_worker(
    redis_url: str, tmp_path: Path, collector: OtlpCollector
) -> Iterator[WorkerProcess]:
    env = {**STACK_ENV, **TRACED, "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url}
    with WorkerProcess(redis_url, tmp_path / "worker", **env) as worker:
        yield worker


def _trace_of(collector: OtlpCollector, task_id: str, needed: set[str]) -> list[Any]:
    """The spans of the trace whose worker run is `task_id`, once `needed` all arrived."""
    deadline = time.monotonic() + 60
    while True:
        spans, _ = collector.spans()
        # The Celery instrumentation names the task's id in an attribute of its run span.
        runs = [s for s in spans if s.name.startswith("run/") and any(
            a.value.string_value == task_id for a in s.attributes
        )]
        trace = [s for s in spans if runs and s.trace_id == runs[0].trace_id]
        if runs and needed <= {s.name for s in trace}:
            return trace
        assert time.monotonic() < deadline, sorted({s.name for s in spans})
        time.sleep(0.2)


def _parent(spans: list[Any], child: Any) -> Any:
    (parent,) = [s for s in spans if s.span_id == child.parent_span_id]
    return parent


def test_a_gateway_request_is_one_trace_down_to_the_decode(
    redis_url: str, tmp_path: Path, collector: OtlpCollector, traced_worker: WorkerProcess
) -> None:
    env = {**TRACED, "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url}
    with (
        GatewayProcess(redis_url, tmp_path / "gateway", **env) as gateway,
        httpx.Client(
            base_url=gateway.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
        ) as api,
        WebhookReceiver(statuses=(503, 200)) as receiver,
    ):
        # Given a traced gateway and worker, when a task is submitted over HTTP, runs, and
        # its webhook is answered 503 once, then 200
        answer = api.post("/v1/tasks", json={"task": "ask", "prompt": "Hi", "options": {
            "max_new_tokens": 4}, "callback_url": receiver.url("/hooks/traced?token=secret")})
        assert answer.status_code == 202, answer.text
        task_id = answer.json()["id"]
        deadline = time.monotonic() + 60
        while api.get(f"/v1/tasks/{task_id}").json().get("state") not in ("SUCCESS", "FAILURE"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        receiver.wait_for(2)
        spans = _trace_of(collector, task_id, {"vq.submit", "vq.webhook", *WORKER_STAGES})
        while len([s for s in spans if s.name == "vq.webhook"]) < 2:
            time.sleep(0.2)
            spans = _trace_of(collector, task_id, {"vq.webhook"})
    # Then its spans form one trace: the HTTP request, the submit in it, the worker's run
    # under the submit, the worker's stages under the run, and each webhook attempt (a
    # client span naming the host and the outcome, never the URL) under the run too
    services = collector.services_of_spans()
    (submit,) = [s for s in spans if s.name == "vq.submit"]
    (run,) = [s for s in spans if s.name.startswith("run/")]
    assert services[submit.span_id] == "vq-gateway" and services[run.span_id] == "vq-worker"
    assert _parent(spans, submit).name.startswith("POST /v1/tasks")
    assert run.parent_span_id == submit.span_id
    for name in WORKER_STAGES:
        (stage,) = [s for s in spans if s.name == name]
        assert stage.parent_span_id == run.span_id, name
    attempts = sorted(
        ({a.key: a.value for a in s.attributes} for s in spans if s.name == "vq.webhook"),
        key=lambda about: about["vq.webhook.attempt"].int_value,
    )
    assert [a["vq.webhook.outcome"].string_value for a in attempts] == ["503", "delivered"]
    hooks = [s for s in spans if s.name == "vq.webhook"]
    assert all(_parent(spans, hook) is run for hook in hooks)
    assert not any("secret" in str(a) for a in attempts)


CLIENT_SCRIPT = """
import sys
from producer import Client
with Client() as client:
    handle = client.submit("ask", [], "Hi", max_new_tokens=4)
    result = client.result(handle.id, wait=True, timeout=60)
    print(handle.id, result["state"])
"""


def test_a_python_client_submit_starts_the_trace_the_worker_joins(
    redis_url: str, collector: OtlpCollector, traced_worker: WorkerProcess
) -> None:
    env = base_env(redis_url, **STACK_ENV, **TRACED, OTEL_EXPORTER_OTLP_ENDPOINT=collector.url)
    done = subprocess.run(
        [sys.executable, "-c", CLIENT_SCRIPT], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    task_id, state = done.stdout.split()
    assert state == "SUCCESS"
    spans = _trace_of(collector, task_id, {"vq.submit", *WORKER_STAGES})
    services = collector.services_of_spans()
    (submit,) = [s for s in spans if s.name == "vq.submit"]
    (run,) = [s for s in spans if s.name.startswith("run/")]
    assert services[submit.span_id] == "vq-client"
    assert run.parent_span_id == submit.span_id
