"""A loopback OTLP/HTTP collector for the tracing tests: it keeps every export request and
parses them with opentelemetry-proto (installed with the otel extra)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class OtlpCollector:
    """Answers POST /v1/traces with 200 and keeps the bodies; `url` is the endpoint base."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                collector.bodies.append(self.rfile.read(length))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> OtlpCollector:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def services_of_spans(self) -> dict[bytes, str]:
        """The service that exported each span, by span id."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        found: dict[bytes, str] = {}
        for body in list(self.bodies):
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            for resource_spans in request.resource_spans:
                names = [a.value.string_value for a in resource_spans.resource.attributes
                         if a.key == "service.name"]
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        found[span.span_id] = names[0] if names else ""
        return found

    def spans(self) -> tuple[list[Any], set[str]]:
        """Every span received, and the service names they came from."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        spans: list[Any] = []
        services: set[str] = set()
        for body in list(self.bodies):
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            for resource_spans in request.resource_spans:
                for attribute in resource_spans.resource.attributes:
                    if attribute.key == "service.name":
                        services.add(attribute.value.string_value)
                for scope_spans in resource_spans.scope_spans:
                    spans.extend(scope_spans.spans)
        return spans, services
