"""OpenTelemetry tracing, off unless asked for: nothing is imported or exported otherwise.

Tracing is on in a process when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, `OTEL_SDK_DISABLED` is not `true`, and the
`otel` extra is installed (`pip install vision-queue[otel]`). Otherwise every function here
returns at once and this module imports no `opentelemetry` module (redis-py 8 loads the
API by itself when it is installed); no provider, exporter or instrumentation is loaded
(tests/vision_queue/test_tracing.py checks both). The rest of the standard variables
(`OTEL_SERVICE_NAME`, `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_TRACES_SAMPLER`,
`OTEL_RESOURCE_ATTRIBUTES`, ...) are the SDK's own and work as documented there.

How one request becomes one trace (docs/tracing.md): the gateway's and the client's
submit span injects its context into the task message's headers (`trace_headers`, W3C
`traceparent`/`tracestate`); the worker's Celery instrumentation extracts it from there
and runs the task inside it; the worker adds `vq.queue_wait` (from the request's
`submitted_at`) and its own stages with `span`, and stages timed elsewhere (prefill and
decode run on the engine's device thread) with `record_span`.

Redis spans (the `redis` instrumentation) are kept only inside a trace: the worker's broker
polls Redis every second, and a root span per poll would bury the traces (the root sampler
starts no trace at a client span). Commands are recorded without their arguments
("LPUSH ? ?"): the instrumentation sanitizes them, so no prompt or image byte reaches a span.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger("vision_queue.tracing")

TRACER_NAME = "vision_queue"
# The W3C trace-context headers a task message may carry (the worker's door allows them).
TRACE_HEADERS = ("traceparent", "tracestate")
_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")

_lock = threading.Lock()
_state: dict[str, Any] = {"configured": False, "enabled": False, "service": None}


def requested(environ: Mapping[str, str] | None = None) -> bool:
    """Tracing is asked for: an OTLP endpoint is set and the SDK is not disabled."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(env.get(name, "").strip() for name in _ENDPOINT_VARIABLES)


def enabled() -> bool:
    """`setup` ran in this process and tracing is on."""
    return bool(_state["enabled"])


def setup(service_name: str, *, instrument_redis: bool = True) -> bool:
    """Start exporting spans as `service_name` (unless OTEL_SERVICE_NAME says otherwise).

    Idempotent; True when tracing is on. Call it once per process, after any fork (a
    fork's child does not inherit the exporter's thread). Without the endpoint variable
    it returns False at once; with it but without the `otel` extra it logs one warning.
    """
    if not requested():
        return False
    with _lock:
        if _state["configured"]:
            return bool(_state["enabled"])
        _state["configured"] = True
        try:
            _configure(service_name, instrument_redis)
        except ImportError as exc:
            log.warning(
                "OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed "
                "(pip install 'vision-queue[otel]'): no traces exported (%s)",
                exc,
            )
            return False
        _state["enabled"] = True
        _state["service"] = service_name
        return True


def _configure(service_name: str, instrument_redis: bool) -> None:
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased

    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        # The application (a web backend using our client) configured OpenTelemetry
        # itself: keep its provider, exporter and sampler.
        provider = current
    else:
        # Resource.create adds OTEL_RESOURCE_ATTRIBUTES; OTEL_SERVICE_NAME wins over ours.
        name = os.environ.get("OTEL_SERVICE_NAME", "").strip() or service_name
        resource = Resource.create({"service.name": name})
        provider = TracerProvider(resource=resource, sampler=ParentBased(root=_root_sampler()))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
        atexit.register(provider.shutdown)  # flush what is buffered when the process ends
    if instrument_redis:
        with contextlib.suppress(ImportError):
            from opentelemetry.instrumentation.redis import RedisInstrumentor

            RedisInstrumentor().instrument(tracer_provider=provider)


def _root_sampler() -> Any:
    """The SDK's sampler from OTEL_TRACES_SAMPLER (default: always on), except that a client
    call outside any trace (a broker poll, a heartbeat's Redis commands) starts no trace."""
    from opentelemetry.sdk.trace.sampling import (
        Decision,
        Sampler,
        SamplingResult,
        _get_from_env_or_default,
    )
    from opentelemetry.trace import SpanKind

    class NoClientRoots(Sampler):
        def __init__(self, inner: Sampler) -> None:
            self.inner = inner

        def should_sample(self, parent_context: Any, trace_id: int, name: str,
                          kind: Any = None, attributes: Any = None, links: Any = None,
                          trace_state: Any = None) -> SamplingResult:
            if kind == SpanKind.CLIENT:
                return SamplingResult(Decision.DROP)
            return self.inner.should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state
            )

        def get_description(self) -> str:
            return f"NoClientRoots({self.inner.get_description()})"

    return NoClientRoots(_get_from_env_or_default())


def instrument_fastapi(app: Any) -> None:
    """The FastAPI instrumentation on `app` (a server span per request), when tracing is on."""
    if not enabled():
        return
    try:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    except ImportError:
        log.warning("opentelemetry-instrumentation-fastapi missing: no request spans")
        return
    # /metrics and the probes are scraped every few seconds: no trace for them.
    FastAPIInstrumentor.instrument_app(app, excluded_urls="metrics,healthz,readyz")


def instrument_celery() -> None:
    """The Celery instrumentation: a worker runs each task inside the trace its message
    carries (`traceparent` header), and a retry it publishes carries the trace on."""
    if not enabled():
        return
    try:
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
    except ImportError:
        log.warning("opentelemetry-instrumentation-celery missing: no task spans")
        return
    CeleryInstrumentor().instrument()


def _tracer() -> Tracer:
    from opentelemetry import trace

    return trace.get_tracer(TRACER_NAME)


def trace_headers() -> dict[str, str]:
    """The current trace context as task-message headers ({} when tracing is off or no
    span is current): what a producer adds to the headers of the message it writes."""
    if not enabled():
        return {}
    from opentelemetry.propagate import inject

    carrier: dict[str, str] = {}
    inject(carrier)
    return {name: carrier[name] for name in TRACE_HEADERS if name in carrier}


def context_from_headers(headers: Mapping[str, Any] | None) -> Context | None:
    """The trace context a task message's headers carry, or None."""
    if not enabled() or not headers:
        return None
    from opentelemetry.propagate import extract

    carrier = {name: str(headers[name]) for name in TRACE_HEADERS if headers.get(name)}
    return extract(carrier) if carrier else None


@contextlib.contextmanager
def span(
    name: str,
    attributes: Mapping[str, Any] | None = None,
    *,
    kind: str = "internal",
    context: Context | None = None,
) -> Iterator[Span | None]:
    """A span around the block (a child of the current one, or of `context`); yields None
    and does nothing when tracing is off. `kind`: internal, producer, consumer, client,
    server."""
    if not enabled():
        yield None
        return
    from opentelemetry.trace import SpanKind

    with _tracer().start_as_current_span(
        name,
        context=context,
        kind=SpanKind[kind.upper()],
        attributes=dict(attributes or {}),
    ) as current:
        yield current


def record_span(
    name: str,
    start_s: float,
    end_s: float,
    attributes: Mapping[str, Any] | None = None,
    *,
    context: Context | None = None,
) -> None:
    """A finished span from two Unix times measured elsewhere (a queue wait from the
    request's `submitted_at`, a prefill timed on the device thread); a child of the
    current span or of `context`. Nothing when tracing is off."""
    if not enabled():
        return
    start_ns, end_ns = int(start_s * 1e9), int(max(start_s, end_s) * 1e9)
    recorded = _tracer().start_span(
        name, context=context, attributes=dict(attributes or {}), start_time=start_ns
    )
    recorded.end(end_time=end_ns)


def _reset_for_tests() -> None:
    """Forget the configuration (tests configure several times in one process)."""
    with _lock:
        _state.update(configured=False, enabled=False, service=None)
