"""vision_queue/tracing.py: off without an OTLP endpoint (nothing imported), and with one,
spans from a "producer" and a "worker" side joined into one trace through the headers a
task message carries, exported over OTLP/HTTP to a loopback collector. Real processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.otlp import OtlpCollector
from support.workers import base_env

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import sys, time
    from vision_queue import tracing

    on = tracing.setup("vq-test-client")
    print("enabled", on, tracing.enabled())
    tracing.trace_headers(), tracing.context_from_headers({"traceparent": "x"})
    with tracing.span("off"):
        tracing.record_span("off", 0.0, 1.0)
    print("early", any(name.startswith("opentelemetry") for name in sys.modules))
    import redis  # redis-py 8 imports the OpenTelemetry API itself when it is installed
    client = redis.Redis.from_url(sys.argv[1])
    client.ping()  # outside any trace: no span of its own
    with tracing.span("vq.submit", {"vq.task": "describe"}, kind="producer"):
        headers = tracing.trace_headers()
        client.lpush("gpu", "x")  # inside: a child span
    print("headers", sorted(headers))
    # The worker's side, from the headers alone (as the Celery instrumentation does).
    context = tracing.context_from_headers({"id": "x", **headers})
    with tracing.span("vq.task", kind="consumer", context=context):
        now = time.time()
        tracing.record_span("vq.queue_wait", now - 2.0, now - 1.0, {"vq.queue": "gpu"})
    # (redis-py 8 itself loads parts of the API and the SDK's metrics when installed.)
    ours = ("opentelemetry.exporter", "opentelemetry.instrumentation", "opentelemetry.sdk.trace")
    print("modules", any(name.startswith(ours) for name in sys.modules))
    """
)


@pytest.fixture
def collector() -> Iterator[OtlpCollector]:
    with OtlpCollector() as running:
        yield running


def run_script(redis_url: str, **env: str) -> str:
    environment = base_env(redis_url, **env)
    for name in list(environment):
        if name.startswith("OTEL_") and name not in env:
            del environment[name]
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, redis_url], cwd=ROOT, env=environment,
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_without_an_endpoint_nothing_is_imported_or_exported(redis_url: str) -> None:
    out = run_script(redis_url)
    assert "enabled False False" in out
    assert "headers []" in out
    assert "early False" in out  # tracing.py alone imports no opentelemetry module
    assert "modules False" in out  # and no tracer provider, exporter or instrumentation is loaded


def test_the_sdk_switch_turns_it_off_even_with_an_endpoint(
    redis_url: str, collector: OtlpCollector
) -> None:
    out = run_script(
        redis_url, OTEL_EXPORTER_OTLP_ENDPOINT=collector.url, OTEL_SDK_DISABLED="true"
    )
    assert "enabled False False" in out and "early False" in out and "modules False" in out
    assert collector.bodies == []


def test_producer_and_worker_spans_form_one_trace(
    redis_url: str, collector: OtlpCollector
) -> None:
    pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")
    out = run_script(redis_url, OTEL_EXPORTER_OTLP_ENDPOINT=collector.url)
    assert "enabled True True" in out
    assert "headers ['traceparent']" in out
    spans, services = collector.spans()
    assert services == {"vq-test-client"}
    # The "off" spans (made while tracing was on in this run) are traces of their own.
    spans = [span for span in spans if span.name != "off"]
    # The ping outside a trace made no span; the LPUSH inside the submit did.
    by_name = {span.name: span for span in spans}
    assert sorted(by_name) == ["LPUSH", "vq.queue_wait", "vq.submit", "vq.task"], by_name
    assert len({span.trace_id for span in spans}) == 1  # one trace
    submit, task, wait = by_name["vq.submit"], by_name["vq.task"], by_name["vq.queue_wait"]
    assert by_name["LPUSH"].parent_span_id == submit.span_id
    assert task.parent_span_id == submit.span_id  # joined through the message headers
    assert wait.parent_span_id == task.span_id
    assert wait.end_time_unix_nano - wait.start_time_unix_nano == pytest.approx(1e9, rel=1e-3)
    statement = [a.value.string_value for a in by_name["LPUSH"].attributes
                 if a.key in ("db.statement", "db.query.text")]
    assert statement == ["LPUSH ? ?"]  # arguments never reach a span
