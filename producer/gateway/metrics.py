"""Prometheus metrics of one gateway process: requests by route, method and status.

Every label is a bounded set: the route is the path template (`/v1/tasks/{task_id}`),
never the path, so task ids do not multiply the series; a path no route matched is
`unmatched`; a request the door refused before routing is matched against the routes
here, so its label is the template it would have reached. A method outside the usual
seven is `OTHER`. Nothing about the caller (key, address) is a label of these; the
usage counters (`producer.gateway.usage`) are labelled by the key's id, a bounded set the
operator configures (a hash prefix, never the secret). The same middleware writes the
access line (`producer.gateway.logs`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producer.gateway.logs import log_access, method_label

_SECONDS_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "vq_gateway_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "vq_gateway_request_seconds",
            "Time to the end of the response (a stream counts until it ends), by route.",
            ["route"],
            buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def route_label(scope: Scope, routes: Sequence[BaseRoute] = ()) -> str:
    template = getattr(scope.get("route"), "path", None)
    if isinstance(template, str):
        return template
    for route in routes:  # refused before routing: the template it would have reached
        match, _ = route.matches(scope)
        path = getattr(route, "path", None)
        if match is not Match.NONE and isinstance(path, str):
            return path
    return "unmatched"


def flat_routes(routes: Sequence[BaseRoute]) -> list[BaseRoute]:
    """The routes themselves, out of the routers FastAPI includes them through."""
    out: list[BaseRoute] = []
    for route in routes:
        inner = getattr(getattr(route, "original_router", None), "routes", None)
        out.extend(flat_routes(inner) if inner is not None else [route])
    return out


class MetricsMiddleware:
    def __init__(
        self, app: ASGIApp, metrics: GatewayMetrics, routes: Sequence[BaseRoute] = ()
    ) -> None:
        self.app = app
        self.metrics = metrics
        self._given = routes
        self._routes: list[BaseRoute] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 500  # if the app fails before answering

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            if self._routes is None:
                self._routes = flat_routes(self._given)
            route = route_label(scope, self._routes)
            seconds = time.perf_counter() - began
            self.metrics.requests.labels(route, method_label(scope["method"]), str(status)).inc()
            self.metrics.duration.labels(route).observe(seconds)
            client = scope.get("client")
            address = f"{client[0]}:{client[1]}" if client else "-"
            request_id = str(scope.get("state", {}).get("request_id", "-"))
            log_access(address, scope["method"], scope["path"], route, status, seconds, request_id)
